//! The user's files, opened by the CLI with the user's own rights and handed to the daemon as
//! descriptors (`h`), as `machinectl import-raw` hands importd one: the daemon never opens a
//! path of the user's.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::Context;
use zbus::Variant;

fn open(path: &Path, flags: i32) -> anyhow::Result<Variant<'static>> {
    let f = OpenOptions::new()
        .read(true)
        // Never block on a FIFO or take a terminal: the daemon refuses anything but the kind
        // it asked for anyway.
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | flags)
        .open(path)
        .with_context(|| format!("Cannot open {}", path.display()))?;
    Ok(Variant::from(zbus::Fd::from(std::os::fd::OwnedFd::from(f))))
}

/// A file of the user's, as an `h` option.
pub fn open_file(path: &Path) -> anyhow::Result<Variant<'static>> {
    open(path, 0)
}

/// A directory of the user's, as an `h` option.
pub fn open_dir(path: &Path) -> anyhow::Result<Variant<'static>> {
    open(path, libc::O_DIRECTORY)
}
