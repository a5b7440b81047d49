//! ext4 images built from directory trees with `mkfs.ext4 -d` (e2fsprogs keeps ownership,
//! modes, xattrs, hard links and device nodes when run as root), sized from the tree.

use std::path::Path;

use crate::{host, Error, Result};

/// What a tree holds.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Bytes of data, each file rounded up to 4 KiB blocks.
    pub bytes: u64,
    /// Files, directories and links.
    pub entries: u64,
}

/// Measures a tree without following symlinks.
pub fn usage(dir: &Path) -> std::io::Result<Usage> {
    let mut u = Usage::default();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            let m = e.path().symlink_metadata()?;
            u.entries += 1;
            u.bytes += m.len().div_ceil(4096) * 4096;
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    Ok(u)
}

const MIB: u64 = 1 << 20;

/// The image size for a tree: `requested`, else max(tree × 1.25 + 64 MiB, `minimum`), in MiB.
pub fn size_for(u: Usage, requested: Option<u64>, minimum: u64) -> u64 {
    let size = requested.unwrap_or_else(|| (u.bytes + u.bytes / 4 + 64 * MIB).max(minimum));
    size.div_ceil(MIB) * MIB
}

/// Builds `image` (a sparse file of `size` bytes) holding `tree`, labelled `label`.
pub fn build(tree: &Path, image: &Path, size: u64, u: Usage, label: &str) -> Result<()> {
    let f = std::fs::File::create(image)
        .map_err(|e| Error::failed(format!("Cannot create {}", image.display()), e))?;
    f.set_len(size)
        .map_err(|e| Error::failed(format!("Cannot size {}", image.display()), e))?;
    drop(f);
    // Enough inodes for the tree and room to grow, whatever the size-based default.
    let inodes = (u.entries * 2 + 16384).max(size / (16 * 1024));
    host::run(
        "mkfs.ext4",
        [
            "-q".as_ref(),
            "-F".as_ref(),
            "-L".as_ref(),
            label.as_ref(),
            "-N".as_ref(),
            inodes.to_string().as_ref(),
            "-E".as_ref(),
            "root_owner=0:0".as_ref(),
            "-d".as_ref(),
            tree.as_os_str(),
            image.as_os_str(),
        ],
    )
    .map_err(|e| match e {
        Error::Failed { context, source } => Error::Failed {
            context: format!("{context}; if the image is too small, pass a larger size"),
            source,
        },
        e => e,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_have_headroom_and_a_floor() {
        let u = Usage {
            bytes: 100 * MIB,
            entries: 10,
        };
        assert_eq!(size_for(u, None, 1 << 30), 1 << 30);
        let big = Usage {
            bytes: 2048 * MIB,
            entries: 10,
        };
        assert_eq!(size_for(big, None, 1 << 30), (2048 + 512 + 64) * MIB);
        assert_eq!(size_for(u, Some(3 * MIB + 1), 1 << 30), 4 * MIB);
    }
}
