//! Who a VM's processes run as. Each VM's VMM and helpers get a uid of their own,
//! [`VM_ID_BASE`] + the VM's vsock CID (unique among VMs, stable for a VM's life, far above
//! ordinary, system and container ranges), with no passwd entry, no capabilities and
//! `no_new_privs` (see `process::spawn_detached`). The VM's own directory and runtime
//! directory are that uid's alone (0700); what VMs share and only read (image root
//! filesystems, kernels, initrds) is group [`vmm_gid`]'s (0640), reached through banger's
//! directories opened to that group for traversal only (0710). A VMM that escapes its guest
//! can read no other VM's disks or sockets and write nothing of banger's but its own.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;

use crate::{Error, Result};

/// The first uid (and gid) of VM processes.
pub const VM_ID_BASE: u32 = 0x5BA0_0000;

/// The uid a VM's processes run as.
pub fn vm_uid(cid: u32) -> u32 {
    VM_ID_BASE + cid
}

/// The group every VM process has, which may read what VMs share.
pub fn vmm_gid() -> u32 {
    VM_ID_BASE
}

/// What one VM's processes get.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jail {
    /// Their uid (and primary gid).
    pub uid: u32,
    /// Supplementary groups: [`vmm_gid`], and `/dev/kvm`'s group when the VM uses KVM.
    pub groups: Vec<u32>,
    /// banger's roots (state, runtime) that its units see as empty, but for the paths below
    /// and the ones they write (systemd hosts: a mount namespace of the unit's own).
    pub hide: Vec<std::path::PathBuf>,
    /// Files under those roots the VM only reads (its image's root filesystem, its kernel).
    pub read_only: Vec<std::path::PathBuf>,
}

/// Sets owner and mode through a descriptor opened without following a final symbolic link,
/// so a link planted in a VM's directory never redirects root's change elsewhere.
fn set(path: &Path, uid: Option<u32>, gid: Option<u32>, mode: u32) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let fail =
        |e: std::io::Error| Error::failed(format!("Cannot hand {} to the VM", path.display()), e);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(fail)?;
    std::os::unix::fs::fchown(&f, uid, gid).map_err(fail)?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(fail)
}

/// Takes a VM's directories back before root works in them again (a start): the VM's uid had
/// them, so whatever it left there is hostile. Every entry that is not a regular file or a
/// socket (symbolic links above all, which root's later writes would follow) is removed, and
/// the rest becomes root's. Runs while none of the VM's processes run.
pub fn reclaim(dirs: &[&Path]) -> Result<()> {
    for dir in dirs {
        let meta = match std::fs::symlink_metadata(dir) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                return Err(Error::failed(
                    format!("Cannot inspect {}", dir.display()),
                    e,
                ))
            }
        };
        if !meta.is_dir() {
            return Err(Error::failed(
                format!("{} is not a directory", dir.display()),
                std::io::Error::other("refusing to use it"),
            ));
        }
        set(dir, Some(0), Some(0), 0o700)?;
        for e in std::fs::read_dir(dir)
            .map_err(|e| Error::failed(format!("Cannot list {}", dir.display()), e))?
            .flatten()
        {
            let p = e.path();
            match e.file_type() {
                Ok(t) if t.is_file() => set(&p, Some(0), Some(0), 0o600)?,
                Ok(t) if t.is_socket() => {
                    std::os::unix::fs::lchown(&p, Some(0), Some(0)).map_err(|err| {
                        Error::failed(format!("Cannot take back {}", p.display()), err)
                    })?
                }
                _ => {
                    tracing::warn!("Removing {} a VM left behind", p.display());
                    crate::layout::remove_any(&p)?;
                }
            }
        }
    }
    Ok(())
}

/// Hands the VM's own directories (and every file directly in them) to `uid`, 0700/0600.
pub fn hand_over(uid: u32, own_dirs: &[&Path]) -> Result<()> {
    for dir in own_dirs {
        set(dir, Some(uid), Some(uid), 0o700)?;
        for e in std::fs::read_dir(dir)
            .map_err(|e| Error::failed(format!("Cannot list {}", dir.display()), e))?
            .flatten()
        {
            let t = e.file_type().ok();
            if t.is_some_and(|t| t.is_file()) {
                set(&e.path(), Some(uid), Some(uid), 0o600)?;
            } else if t.is_some_and(|t| t.is_socket()) {
                std::os::unix::fs::lchown(e.path(), Some(uid), Some(uid)).map_err(|err| {
                    Error::failed(format!("Cannot hand {} to the VM", e.path().display()), err)
                })?;
            }
        }
    }
    Ok(())
}

/// Lets the VMM group read `files` (root:vmm 0640) and reach them. Nothing outside `roots`
/// changes.
pub fn share(files: &[&Path], roots: &[&Path]) -> Result<()> {
    for f in files {
        if roots.iter().any(|r| f.starts_with(r)) {
            set(f, Some(0), Some(vmm_gid()), 0o640)?;
            reach(f, roots)?;
        }
    }
    Ok(())
}

/// Lets the VMM group traverse every directory between `path` and the root it lies in
/// (root:vmm, group execute only; the owner's and others' bits kept).
pub fn reach(path: &Path, roots: &[&Path]) -> Result<()> {
    let Some(root) = roots.iter().find(|r| path.starts_with(r)) else {
        return Ok(());
    };
    let mut dir = path.parent();
    while let Some(d) = dir {
        if !d.starts_with(root) {
            break;
        }
        let mode = std::fs::metadata(d)
            .map_err(|e| Error::failed(format!("Cannot inspect {}", d.display()), e))?
            .permissions()
            .mode()
            & 0o7777;
        set(d, Some(0), Some(vmm_gid()), (mode & 0o7707) | 0o010)?;
        dir = d.parent();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_files_open_a_path_for_the_group_only_inside_the_roots() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("state");
        let img = root.join("images/0123");
        std::fs::create_dir_all(&img).unwrap();
        for p in [&root, &root.join("images"), &img] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o700)).unwrap();
        }
        let f = img.join("rootfs.ext4");
        std::fs::write(&f, b"x").unwrap();
        share(&[&f], &[&root]).unwrap();
        use std::os::unix::fs::MetadataExt;
        let m = |p: &Path| std::fs::metadata(p).unwrap();
        assert_eq!((m(&f).mode() & 0o777, m(&f).gid()), (0o640, vmm_gid()));
        for p in [&root, &root.join("images"), &img] {
            assert_eq!(m(p).mode() & 0o777, 0o710, "{}", p.display());
        }
        // The tempdir above the root is not touched.
        assert_ne!(m(d.path()).gid(), vmm_gid());

        // What a VM leaves in its directories is taken back before root works there again:
        // a planted link goes (and its target is untouched), files become root's.
        let target = d.path().join("precious");
        std::fs::write(&target, b"p").unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o644)).unwrap();

        let own = d.path().join("vm");
        std::fs::create_dir(&own).unwrap();
        std::fs::write(own.join("disk"), b"d").unwrap();
        hand_over(vm_uid(3), &[&own]).unwrap();
        assert_eq!((m(&own).uid(), m(&own).mode() & 0o777), (vm_uid(3), 0o700));
        assert_eq!(m(&own.join("disk")).uid(), vm_uid(3));
        std::os::unix::fs::symlink(&target, own.join("console.log")).unwrap();
        std::os::unix::fs::symlink(&target, own.join("work.ext4")).unwrap();
        hand_over(vm_uid(3), &[&own]).unwrap();
        assert_eq!(m(&target).mode() & 0o777, 0o644, "a link is not followed");
        reclaim(&[&own]).unwrap();
        assert!(std::fs::symlink_metadata(own.join("console.log")).is_err());
        assert!(std::fs::symlink_metadata(own.join("work.ext4")).is_err());
        assert_eq!((m(&own).uid(), m(&own.join("disk")).uid()), (0, 0));
        assert_eq!(std::fs::read(&target).unwrap(), b"p");
        assert_eq!(m(&target).mode() & 0o777, 0o644);
    }
}
