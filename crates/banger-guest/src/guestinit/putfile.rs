//! Making a guest file hold given bytes: the root files `banger-init` writes (`/etc/hosts`,
//! `hostname`, `resolv.conf`) and the identity a restored guest gets (machine id, systemd's
//! random seed, SSH host keys, `authorized_keys`). One rule for both: a regular file of one
//! link on the guest's own file system is rewritten in place (in a guest just restored under
//! TCG, creating a file and renaming it over another runs filesystem paths nothing has run
//! since the restore, inode allocation and the old inode's eviction, some 10 ms each), and
//! left alone when it already holds the bytes; anything else is replaced by a new file renamed
//! into place. They differ only at a mount point ([`AtMountPoint`]): a root file bound there is
//! whoever bound it's, an identity file is written through.

use std::ffi::CString;
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// What a file that is a mount point gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AtMountPoint {
    /// Left as it is: whoever bound it there writes it (a container runtime: CRI binds a
    /// pod's resolv.conf, hosts and hostname into its root).
    Leave,
    /// Written through, in place: the file must hold this VM's own bytes wherever it comes
    /// from (systemd binds `/run/machine-id` over `/etc/machine-id` until its first boot
    /// commits the id, so a VM restored from a snapshot taken before that has a bound one).
    WriteThrough,
}

/// Makes `path` hold `text`, its mode kept (a new file gets 0644); a mount point is left
/// alone. For the root files.
pub fn put_file(path: &Path, text: &str) -> Result<(), String> {
    put(path, text.as_bytes(), None, AtMountPoint::Leave)
}

/// Makes `path` hold `data` with `mode`, a mount point too. For a VM's identity.
pub fn put_own_file(path: &Path, data: &[u8], mode: u32) -> Result<(), String> {
    put(path, data, Some(mode), AtMountPoint::WriteThrough)
}

/// Makes `path` hold `data` (and `mode`, when given): see the module's rule. A file that
/// already holds `data` (and `mode`) is not written: a restored guest whose resolvers did not
/// change keeps its file untouched.
fn put(path: &Path, data: &[u8], mode: Option<u32>, at_mount: AtMountPoint) -> Result<(), String> {
    let fail = |e: std::io::Error| format!("cannot write {}: {e}", path.display());
    match existing(path) {
        Existing::MountPoint if at_mount == AtMountPoint::Leave => Ok(()),
        Existing::MountPoint | Existing::File => in_place(path, data, mode).map_err(fail),
        Existing::Other => {
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            let tmp = path.with_file_name(format!(".{name}.banger"));
            let made = std::fs::write(&tmp, data).and_then(|_| match mode {
                Some(m) => std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(m)),
                None => Ok(()),
            });
            match made.and_then(|_| std::fs::rename(&tmp, path)) {
                Ok(()) => Ok(()),
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    // Only a mount point refuses a rename over it this way: one the guest's
                    // kernel could not tell, a bind on the host's side of a shared folder,
                    // which is the host's to write.
                    if e.raw_os_error() == Some(libc::EBUSY) && at_mount == AtMountPoint::Leave {
                        return Ok(());
                    }
                    Err(fail(e))
                }
            }
        }
    }
}

/// Rewrites the regular file at `path` to hold `data` (and `mode`), unless it does already.
fn in_place(path: &Path, data: &[u8], mode: Option<u32>) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    let m = f.metadata()?;
    if !m.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let size = m.len();
    let mut same = false;
    if size == data.len() as u64 {
        let mut held = Vec::with_capacity(data.len());
        (&mut f).take(size).read_to_end(&mut held)?;
        same = held == data;
        f.rewind()?;
    }
    if !same {
        f.write_all(data)?;
        if size > data.len() as u64 {
            f.set_len(data.len() as u64)?;
        }
    }
    match mode {
        Some(want) if m.mode() & 0o7777 != want => {
            f.set_permissions(std::fs::Permissions::from_mode(want))
        }
        _ => Ok(()),
    }
}

/// `statx`'s attribute: the path is the root of a mount (Linux ≥ 5.8).
const STATX_ATTR_MOUNT_ROOT: u64 = 0x2000;

/// What `path` is, without following a last symlink.
enum Existing {
    /// A regular file of one link, on the guest's own file system.
    File,
    /// A mount point (a file a container runtime bound there).
    MountPoint,
    /// A symlink, a directory, a file of several links or on a folder the host shares, or
    /// anything else; or nothing.
    Other,
}

fn existing(path: &Path) -> Existing {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return Existing::Other;
    };
    // SAFETY: statx is plain data; zeroed is valid before the call fills it.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is NUL-terminated and `st` a live statx for the call.
    let r = unsafe {
        libc::statx(
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
            libc::STATX_TYPE | libc::STATX_NLINK,
            &mut st,
        )
    };
    if r != 0 {
        return Existing::Other;
    }
    if st.stx_attributes & STATX_ATTR_MOUNT_ROOT != 0 {
        return Existing::MountPoint;
    }
    // A file another name links to keeps what it has (only this name changes).
    let regular = u32::from(st.stx_mode) & libc::S_IFMT == libc::S_IFREG && st.stx_nlink == 1;
    // A kernel that cannot tell a mount point, and a folder the host shares (whose files may
    // be mount points on the host: CRI's binds below a pod's root, which no guest call tells),
    // get the new file renamed over it, which a mount point refuses (EBUSY).
    if regular && st.stx_attributes_mask & STATX_ATTR_MOUNT_ROOT != 0 && guests_own(&c) {
        Existing::File
    } else {
        Existing::Other
    }
}

/// Whether the file system holding `path` is the guest's own: a disk's (ext2/3/4, XFS,
/// Btrfs) or memory (tmpfs), not a folder shared by the host (virtiofs, 9p) or an overlay.
fn guests_own(path: &CString) -> bool {
    const OWN: [i64; 4] = [0xEF53, 0x5846_5342, 0x9123_683E, 0x0102_1994];
    // SAFETY: statfs is plain data; zeroed is valid before the call fills it.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and `fs` a live statfs for the call.
    (unsafe { libc::statfs(path.as_ptr(), &mut fs) } == 0) && OWN.contains(&(fs.f_type as i64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// Asserts that `dir` holds `files` entries: no temporary file was left.
    fn no_temporary_file_left(dir: &Path, files: usize) {
        let names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), files, "no temporary file left: {names:?}");
    }

    #[test]
    fn a_regular_file_is_rewritten_in_place_and_left_alone_when_it_says_it_already() {
        let tmp = tempfile::tempdir().unwrap();
        let c = CString::new(tmp.path().as_os_str().to_str().unwrap()).unwrap();
        assert!(
            guests_own(&c),
            "this test wants $TMPDIR on ext4, XFS, Btrfs or tmpfs, as a guest's root is"
        );
        let hosts = tmp.path().join("hosts");
        std::fs::write(
            &hosts,
            "an image's long /etc/hosts, longer than what replaces it\n",
        )
        .unwrap();
        std::fs::set_permissions(&hosts, std::fs::Permissions::from_mode(0o640)).unwrap();
        let before = std::fs::metadata(&hosts).unwrap();
        put_file(&hosts, "127.0.1.1\tbox\n").unwrap();
        let after = std::fs::metadata(&hosts).unwrap();
        assert_eq!(std::fs::read_to_string(&hosts).unwrap(), "127.0.1.1\tbox\n");
        assert_eq!((after.ino(), after.mode() & 0o777), (before.ino(), 0o640));
        // The same text again: not written (a write would set its modification time to now).
        let long_ago = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000_000);
        let set_old = || {
            std::fs::File::options()
                .write(true)
                .open(&hosts)
                .unwrap()
                .set_modified(long_ago)
                .unwrap()
        };
        set_old();
        put_file(&hosts, "127.0.1.1\tbox\n").unwrap();
        assert_eq!(
            std::fs::metadata(&hosts).unwrap().modified().unwrap(),
            long_ago
        );
        // Text of the same length, different: written; longer: written whole.
        put_file(&hosts, "127.0.1.1\tbax\n").unwrap();
        assert_eq!(std::fs::read_to_string(&hosts).unwrap(), "127.0.1.1\tbax\n");
        assert_ne!(
            std::fs::metadata(&hosts).unwrap().modified().unwrap(),
            long_ago
        );
        put_file(&hosts, "127.0.1.1\ta-longer-name\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(&hosts).unwrap(),
            "127.0.1.1\ta-longer-name\n"
        );
        assert_eq!(std::fs::metadata(&hosts).unwrap().ino(), before.ino());
        // What the link named is not touched; the link becomes a file.
        let target = tmp.path().join("stub");
        std::fs::write(&target, "the resolver's\n").unwrap();
        let link = tmp.path().join("resolv.conf");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        put_file(&link, "nameserver 192.0.2.1\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(&target).unwrap(),
            "the resolver's\n"
        );
        assert!(!std::fs::symlink_metadata(&link).unwrap().is_symlink());
        assert_eq!(
            std::fs::read_to_string(&link).unwrap(),
            "nameserver 192.0.2.1\n"
        );
        no_temporary_file_left(tmp.path(), 3);
    }

    #[test]
    fn a_replaced_file_keeps_its_inode_unless_another_name_links_it() {
        let tmp = tempfile::tempdir().unwrap();
        let id = tmp.path().join("machine-id");
        std::fs::write(&id, "the source's machine id, and more\n").unwrap();
        let ino = std::fs::metadata(&id).unwrap().ino();
        put_own_file(&id, b"fresh\n", 0o444).unwrap();
        let m = std::fs::metadata(&id).unwrap();
        assert_eq!(std::fs::read(&id).unwrap(), b"fresh\n");
        assert_eq!((m.ino(), m.mode() & 0o7777), (ino, 0o444));
        // A second name of the file keeps what it had: the name gets a new file.
        let other = tmp.path().join("other");
        std::fs::hard_link(&id, &other).unwrap();
        put_own_file(&id, b"fresher\n", 0o444).unwrap();
        assert_eq!(std::fs::read(&other).unwrap(), b"fresh\n");
        assert_eq!(std::fs::read(&id).unwrap(), b"fresher\n");
        assert_ne!(std::fs::metadata(&id).unwrap().ino(), ino);
        // Nothing there: made.
        let new = tmp.path().join("new");
        put_own_file(&new, b"x", 0o600).unwrap();
        assert_eq!(std::fs::metadata(&new).unwrap().mode() & 0o7777, 0o600);
        // The same bytes with another mode: the mode changes, the file is not written.
        let long_ago = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000_000);
        let f = std::fs::File::options().write(true).open(&new).unwrap();
        f.set_modified(long_ago).unwrap();
        let ino = std::fs::metadata(&new).unwrap().ino();
        put_own_file(&new, b"x", 0o640).unwrap();
        let m = std::fs::metadata(&new).unwrap();
        assert_eq!((m.ino(), m.mode() & 0o7777), (ino, 0o640));
        assert_eq!(m.modified().unwrap(), long_ago);
        no_temporary_file_left(tmp.path(), 3);
    }

    #[test]
    fn a_mount_point_is_left_for_root_files_and_written_through_for_identity_files() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return; // a bind mount needs root
        }
        let tmp = tempfile::tempdir().unwrap();
        let (id, run) = (tmp.path().join("machine-id"), tmp.path().join("run-id"));
        std::fs::write(&id, "on disk\n").unwrap();
        std::fs::write(&run, "transient\n").unwrap();
        let path = |p: &Path| p.to_str().unwrap().to_owned();
        crate::guestinit::mount(&path(&run), &path(&id), "", libc::MS_BIND).unwrap();
        struct Unmount(CString);
        impl Drop for Unmount {
            fn drop(&mut self) {
                // SAFETY: a NUL-terminated path.
                unsafe { libc::umount2(self.0.as_ptr(), libc::MNT_DETACH) };
            }
        }
        let _bound = Unmount(CString::new(path(&id)).unwrap());
        put_file(&id, "a root file's text\n").unwrap();
        assert_eq!(std::fs::read_to_string(&id).unwrap(), "transient\n");
        put_own_file(&id, b"the VM's own\n", 0o444).unwrap();
        assert_eq!(std::fs::read_to_string(&id).unwrap(), "the VM's own\n");
        assert_eq!(std::fs::read_to_string(&run).unwrap(), "the VM's own\n");
        assert_eq!(std::fs::metadata(&run).unwrap().mode() & 0o7777, 0o444);
    }
}
