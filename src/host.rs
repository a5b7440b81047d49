//! Host programs: finding them (root's sbin directories included) and running them with
//! their error output kept for the message.

use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::Command;

use crate::{Error, Result};

/// Finds a program on PATH or in the sbin directories a non-root PATH often lacks.
pub fn find_program(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin", "/root/.cargo/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| {
            p.metadata()
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

/// Runs `program` to completion (blocking); a failure carries its stderr.
pub fn run<I, S>(program: &str, args: I) -> Result<()>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let path = find_program(program).ok_or_else(|| {
        Error::failed(
            format!("{program} is not installed"),
            std::io::Error::from(std::io::ErrorKind::NotFound),
        )
    })?;
    let out = Command::new(&path)
        .args(args)
        .output()
        .map_err(|e| Error::failed(format!("Cannot run {program}"), e))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        return Err(Error::failed(
            format!("{program} failed ({})", out.status),
            std::io::Error::other(stderr),
        ));
    }
    Ok(())
}
