//! ext4 images built from directory trees with `mkfs.ext4 -d` (e2fsprogs keeps ownership,
//! modes, xattrs, hard links and device nodes when run as root), sized from the tree.

use std::path::Path;

use crate::{host, Error, Result};

mod sys;
pub mod writer;

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
    // Enough inodes for the tree and room to grow, whatever the size-based default.
    let inodes = (u.entries * 2 + 16384).max(size / (16 * 1024));
    mkfs(image, size, inodes, label, Some(tree))
}

/// Makes `image` an empty ext4 filesystem of `size` bytes with `inodes` inodes, labelled
/// `label`, for [`writer::Writer`] to fill.
pub fn create_empty(image: &Path, size: u64, inodes: u64, label: &str) -> Result<()> {
    mkfs(image, size, inodes, label, None)
}

/// Shrinks the ext4 filesystem in `image` (and the file) to `size` bytes.
pub fn shrink(image: &Path, size: u64) -> Result<()> {
    host::run(
        "resize2fs",
        [
            "-f".as_ref(),
            image.as_os_str(),
            format!("{}K", size / 1024).as_ref(),
        ],
    )?;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(image)
        .map_err(|e| Error::failed(format!("Cannot open {}", image.display()), e))?;
    f.set_len(size)
        .map_err(|e| Error::failed(format!("Cannot size {}", image.display()), e))
}

fn mkfs(image: &Path, size: u64, inodes: u64, label: &str, tree: Option<&Path>) -> Result<()> {
    let f = std::fs::File::create(image)
        .map_err(|e| Error::failed(format!("Cannot create {}", image.display()), e))?;
    f.set_len(size)
        .map_err(|e| Error::failed(format!("Cannot size {}", image.display()), e))?;
    drop(f);
    let inodes = inodes.to_string();
    let mut args: Vec<&std::ffi::OsStr> = vec![
        "-q".as_ref(),
        "-F".as_ref(),
        "-L".as_ref(),
        label.as_ref(),
        "-N".as_ref(),
        inodes.as_ref(),
        // The file was just made, so it reads as zeros: mke2fs need not write the
        // journal's and inode tables' zeros, and marks the tables zeroed so the guest's
        // kernel does not zero them either on first mount.
        "-E".as_ref(),
        "root_owner=0:0,assume_storage_prezeroed=1".as_ref(),
    ];
    match tree {
        Some(tree) => args.extend(["-d".as_ref(), tree.as_os_str()]),
        // The writer counts on 4 KiB blocks, which mke2fs picks only from 512 MiB up.
        None => args.extend::<[&std::ffi::OsStr; 2]>(["-b".as_ref(), "4096".as_ref()]),
    }
    args.push(image.as_os_str());
    host::run("mkfs.ext4", args).map_err(|e| match e {
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

/// A file to place in an ext4 image with [`put_files`].
#[derive(Debug, Clone)]
pub struct Put<'a> {
    /// Absolute path inside the filesystem (plain names: letters, digits, `._-/`).
    pub path: &'a str,
    /// Contents.
    pub data: &'a [u8],
    /// Permission bits.
    pub mode: u32,
}

fn debugfs_path_ok(p: &str) -> bool {
    p.starts_with('/')
        && !p.contains("..")
        && p.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b))
}

/// Reads a file of an unmounted ext4 image (`None` when it does not exist).
pub fn read_file(image: &Path, path: &str) -> Result<Option<Vec<u8>>> {
    if !debugfs_path_ok(path) {
        return Err(Error::InvalidArgument(format!(
            "{path:?} is not a plain path"
        )));
    }
    let program = host::find_program("debugfs").ok_or_else(|| {
        Error::failed(
            "debugfs is not installed",
            std::io::Error::other("apt-get install e2fsprogs"),
        )
    })?;
    let debugfs = |request: String| {
        host::capture(
            std::process::Command::new(&program)
                .args(["-R", &request])
                .arg(image),
            "debugfs",
        )
    };
    let stat = debugfs(format!("stat {path}"))?;
    if !String::from_utf8_lossy(&stat.stdout).contains("Type: regular") {
        return Ok(None);
    }
    let out = debugfs(format!("cat {path}"))?;
    Ok(Some(out.stdout))
}

/// Writes `files` (root-owned, replacing what is there, parent directories made 0700) into
/// an unmounted ext4 image with `debugfs -w`, then checks each one landed.
pub fn put_files(image: &Path, files: &[Put<'_>]) -> Result<()> {
    let staging = tempfile::tempdir().map_err(|e| Error::failed("Cannot stage files", e))?;
    let mut script = String::new();
    for (i, f) in files.iter().enumerate() {
        if !debugfs_path_ok(f.path) || f.path.ends_with('/') {
            return Err(Error::InvalidArgument(format!(
                "{:?} is not a plain path",
                f.path
            )));
        }
        let mut dir = String::new();
        let parts: Vec<&str> = f.path.split('/').filter(|p| !p.is_empty()).collect();
        for part in &parts[..parts.len() - 1] {
            dir.push('/');
            dir.push_str(part);
            script.push_str(&format!(
                "mkdir {dir}\nsif {dir} uid 0\nsif {dir} gid 0\nsif {dir} mode 040700\n"
            ));
        }
        let local = staging.path().join(i.to_string());
        std::fs::write(&local, f.data).map_err(|e| Error::failed("Cannot stage files", e))?;
        script.push_str(&format!(
            "rm {p}\nwrite {l} {p}\nsif {p} uid 0\nsif {p} gid 0\nsif {p} mode 0100{m:03o}\n",
            p = f.path,
            l = local.display(),
            m = f.mode & 0o777
        ));
    }
    let cmds = staging.path().join("cmds");
    std::fs::write(&cmds, script).map_err(|e| Error::failed("Cannot stage files", e))?;
    host::run(
        "debugfs",
        [
            "-w".as_ref(),
            "-f".as_ref(),
            cmds.as_os_str(),
            image.as_os_str(),
        ],
    )?;
    // Checked with one more debugfs, which copies each file out as written.
    let mut script = String::new();
    for (i, f) in files.iter().enumerate() {
        let back = staging.path().join(format!("back{i}"));
        script.push_str(&format!("dump {} {}\n", f.path, back.display()));
    }
    std::fs::write(&cmds, script).map_err(|e| Error::failed("Cannot stage files", e))?;
    host::run(
        "debugfs",
        ["-f".as_ref(), cmds.as_os_str(), image.as_os_str()],
    )?;
    for (i, f) in files.iter().enumerate() {
        let back = std::fs::read(staging.path().join(format!("back{i}"))).ok();
        if back.as_deref() != Some(f.data) {
            return Err(Error::failed(
                format!("Cannot write {} into {}", f.path, image.display()),
                std::io::Error::other("debugfs did not store it"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod put_tests {
    use super::*;

    #[test]
    fn a_written_image_shrinks_and_keeps_its_files() {
        let tmp = tempfile::tempdir().unwrap();
        let img = tmp.path().join("s.ext4");
        create_empty(&img, 512 << 20, 8192, "s").unwrap();
        let mut w = writer::Writer::open(&img).unwrap();
        crate::tree::put_file(&mut w, "etc/hello", b"hello\n", 0o644).unwrap();
        w.close().unwrap();
        shrink(&img, 128 << 20).unwrap();
        assert_eq!(std::fs::metadata(&img).unwrap().len(), 128 << 20);
        assert_clean(&img);
        assert_eq!(
            read_file(&img, "/etc/hello").unwrap().as_deref(),
            Some(&b"hello\n"[..])
        );
    }

    #[test]
    fn files_land_root_owned_with_their_modes_and_replace_old_ones() {
        if host::find_program("debugfs").is_none() || host::find_program("mkfs.ext4").is_none() {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let img = tmp.path().join("w.ext4");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(16 << 20)
            .unwrap();
        host::run("mkfs.ext4", ["-q".as_ref(), "-F".as_ref(), img.as_os_str()]).unwrap();
        let put = |data: &'static [u8]| {
            put_files(
                &img,
                &[
                    Put {
                        path: "/.ssh/authorized_keys",
                        data,
                        mode: 0o600,
                    },
                    Put {
                        path: "/.banger/k.pub",
                        data: b"pub\n",
                        mode: 0o644,
                    },
                ],
            )
        };
        put(b"first\n").unwrap();
        put(b"second\n").unwrap();
        assert_eq!(
            read_file(&img, "/.ssh/authorized_keys").unwrap().unwrap(),
            b"second\n"
        );
        assert_eq!(read_file(&img, "/.ssh/missing").unwrap(), None);
        let out = std::process::Command::new("debugfs")
            .args(["-R", "stat /.ssh/authorized_keys"])
            .arg(&img)
            .output()
            .unwrap();
        let stat = String::from_utf8_lossy(&out.stdout);
        assert!(
            stat.contains("Mode:  0600") && stat.contains("User:     0"),
            "{stat}"
        );
        assert!(put_files(
            &img,
            &[Put {
                path: "/../x",
                data: b"",
                mode: 0o600
            }]
        )
        .is_err());
        assert!(read_file(&img, "/a b").is_err());
    }

    /// The work seed's copy: what is under a directory of one image becomes the root of
    /// another, owners, modes, links and nodes kept, read back by e2fsprogs' own debugfs.
    #[test]
    fn a_directory_copies_into_another_image() {
        use crate::tree::{Meta, Node, Tree};
        if host::find_program("debugfs").is_none() || host::find_program("mkfs.ext4").is_none() {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let (src, dst) = (tmp.path().join("src.ext4"), tmp.path().join("dst.ext4"));
        create_empty(&src, 64 << 20, 4096, "rootfs").unwrap();
        create_empty(&dst, 64 << 20, 4096, "work").unwrap();
        let mut w = writer::Writer::open(&src).unwrap();
        let meta = |mode, uid| Meta {
            mode,
            uid,
            gid: uid + 1,
            mtime: 1_700_000_000,
        };
        let (root, _) = w.resolve_dir("root/sub".as_ref(), true).unwrap();
        let (top, _) = w.resolve_dir("root".as_ref(), false).unwrap();
        let (slash, _) = w.resolve_dir("".as_ref(), false).unwrap();
        w.set_meta(&slash, "root".as_ref(), meta(0o700, 0)).unwrap();
        let long = "t".repeat(100);
        w.write_file(
            &root,
            "f".as_ref(),
            meta(0o640, 1000),
            5,
            &mut &b"hello"[..],
        )
        .unwrap();
        w.hard_link(&root, "g".as_ref(), (&root, "f".as_ref()))
            .unwrap();
        w.symlink(&top, "short".as_ref(), "sub/f".as_ref(), meta(0o777, 7))
            .unwrap();
        w.symlink(&top, "long".as_ref(), long.as_ref(), meta(0o777, 7))
            .unwrap();
        w.mknod(&top, "fifo".as_ref(), Node::Fifo, meta(0o600, 0))
            .unwrap();
        w.mknod(&top, "null".as_ref(), Node::Char(1, 3), meta(0o666, 0))
            .unwrap();
        w.write_file(
            &slash,
            "outside".as_ref(),
            meta(0o644, 0),
            1,
            &mut &b"x"[..],
        )
        .unwrap();
        let u = w.usage_of("root".as_ref()).unwrap().unwrap();
        assert_eq!(u.entries, 7, "{u:?}");
        assert_eq!(w.usage_of("nowhere".as_ref()).unwrap(), None);
        let mut d = writer::Writer::open(&dst).unwrap();
        assert!(w.copy_dir_to("root".as_ref(), &mut d).unwrap());
        d.close().unwrap();
        w.close().unwrap();
        let dbg = |cmd: &str| {
            let out = std::process::Command::new("debugfs")
                .args(["-R", cmd])
                .arg(&dst)
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        assert_eq!(dbg("cat /sub/f"), "hello");
        let f = dbg("stat /sub/f");
        assert!(
            f.contains("Mode:  0640") && f.contains("User:  1000") && f.contains("Links: 2"),
            "{f}"
        );
        assert!(dbg("stat /short").contains("Fast link dest: \"sub/f\""));
        assert!(dbg("stat /long").contains("Type: symlink"));
        assert!(dbg("stat /fifo").contains("Type: FIFO"));
        assert!(dbg("stat /null").contains("Device major/minor number: 01:03"));
        assert!(dbg("stat /").contains("Mode:  0700"));
        assert!(!dbg("ls /").contains("outside"));
        assert_clean(&dst);
        assert!(dbg("stat /long").contains("Size: 100"));
    }

    /// e2fsck finds nothing to fix in `img`.
    fn assert_clean(img: &Path) {
        let fsck = std::process::Command::new("e2fsck")
            .arg("-fn")
            .arg(img)
            .output()
            .unwrap();
        assert!(
            fsck.status.success(),
            "{}",
            String::from_utf8_lossy(&fsck.stdout)
        );
    }
}
