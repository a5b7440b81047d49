//! Files from callers, taken once: at call time, with the caller's own rights, into banger's
//! store. The daemon is root and a caller is not, so a caller's path is hostile: it may be a
//! symbolic link to a root-only file, a FIFO that blocks the daemon, a device, or be swapped
//! for any of those after a check. So a caller's file reaches the daemon either as a file
//! descriptor the client opened (`h` over D-Bus, as systemd-importd's `ImportRaw` takes one) or
//! as a path the daemon opens once on a thread that carries the caller's file-system
//! credentials; either way the descriptor is checked (`fstat`) and copied, and the path is never
//! opened again by banger or a VMM.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// A file or path a caller named was refused, or could not be read as the caller.
#[derive(Debug, thiserror::Error)]
pub enum CallerFileError {
    /// The path or file is not acceptable; the message names it and why.
    #[error("{0}")]
    Refused(String),
    /// The file is larger than a configured bound; the message names the key.
    #[error("{0}")]
    TooLarge(String),
    /// Reading as the caller failed; `what` says which step.
    #[error("{what}")]
    Failed {
        /// What banger was doing.
        what: String,
        /// Why it failed.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl crate::error::Kind for CallerFileError {
    fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind;
        match self {
            CallerFileError::Refused(_) => ErrorKind::InvalidArgument,
            CallerFileError::TooLarge(_) => ErrorKind::LimitExceeded,
            CallerFileError::Failed { .. } => ErrorKind::Failed,
        }
    }
}

fn refused(message: impl Into<String>) -> Error {
    CallerFileError::Refused(message.into()).into()
}

fn too_large(message: impl Into<String>) -> Error {
    CallerFileError::TooLarge(message.into()).into()
}

fn failed(
    what: impl Into<String>,
    source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
) -> Error {
    CallerFileError::Failed {
        what: what.into(),
        source: source.into(),
    }
    .into()
}

/// A caller's file as a front end received it.
#[derive(Debug)]
pub enum CallerInput {
    /// A descriptor the client opened with its own rights.
    Fd(OwnedFd),
    /// An absolute path, opened once with the caller's rights.
    Path(PathBuf),
}

impl CallerInput {
    /// What a message should call it: the path, or "a file descriptor".
    pub fn describe(&self) -> String {
        match self {
            CallerInput::Fd(_) => "the file descriptor passed".into(),
            CallerInput::Path(p) => p.display().to_string(),
        }
    }

    /// The path, when the caller gave one (kept only as a label, never opened again).
    pub fn path(&self) -> Option<&Path> {
        match self {
            CallerInput::Fd(_) => None,
            CallerInput::Path(p) => Some(p),
        }
    }
}

/// A user's credentials: uid, primary gid, supplementary groups (from the password and
/// group databases, as a login would have them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Creds {
    /// The uid.
    pub uid: u32,
    /// The primary group.
    pub gid: u32,
    /// Every group, the primary one included.
    pub groups: Vec<libc::gid_t>,
}

/// `uid`'s credentials; an error when it has no entry in the password database.
pub fn creds(uid: u32) -> Result<Creds> {
    let (name, gid) = crate::host::user_of(uid)
        .ok_or_else(|| refused(format!("uid {uid} has no entry in the password database")))?;
    let cname = CString::new(name).map_err(|e| failed("Bad user name", e))?;
    let mut n: libc::c_int = 64;
    loop {
        let mut groups = vec![0 as libc::gid_t; n as usize];
        let mut count = n;
        // SAFETY: `groups` holds `count` entries; getgrouplist writes at most that many and
        // sets `count` to the number it needs.
        let r = unsafe { libc::getgrouplist(cname.as_ptr(), gid, groups.as_mut_ptr(), &mut count) };
        if r >= 0 {
            groups.truncate(count as usize);
            return Ok(Creds { uid, gid, groups });
        }
        if count <= n || count > 65536 {
            return Err(failed(
                format!("Cannot list the groups of uid {uid}"),
                std::io::Error::other("getgrouplist failed"),
            ));
        }
        n = count;
    }
}

/// Runs `f` on a thread of its own whose file-system credentials are the caller's: uid and
/// groups, so permission bits, ACLs and every directory on the way count as they would for
/// the caller, and root's capabilities that override them are dropped (the kernel clears
/// them when the fsuid leaves 0). Only that thread changes: the raw syscalls are used because
/// glibc's wrappers would change every thread of the daemon. Root callers run as they are.
pub fn as_caller<T: Send + 'static>(
    uid: u32,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let creds = if uid == 0 { None } else { Some(creds(uid)?) };
    std::thread::Builder::new()
        .name("banger-as-caller".into())
        .spawn(move || {
            if let Some(c) = creds {
                enter(&c)?;
            }
            f()
        })
        .map_err(|e| failed("Cannot start a thread", e))?
        .join()
        .map_err(|_| {
            failed(
                "Reading the caller's file failed",
                std::io::Error::other("panic"),
            )
        })?
}

fn enter(c: &Creds) -> Result<()> {
    let fail = |what: &str| {
        failed(
            format!("Cannot take on the caller's {what}"),
            std::io::Error::last_os_error(),
        )
    };
    // SAFETY: the pointer and length describe `c.groups`; SYS_setgroups changes this
    // thread's supplementary groups only.
    if unsafe { libc::syscall(libc::SYS_setgroups, c.groups.len(), c.groups.as_ptr()) } != 0 {
        return Err(fail("groups"));
    }
    // SAFETY: setfsgid/setfsuid take plain integers and change this thread only; the
    // result is checked by reading the value back (they report no errors themselves).
    unsafe {
        libc::syscall(libc::SYS_setfsgid, c.gid);
        libc::syscall(libc::SYS_setfsuid, c.uid);
    }
    // SAFETY: as above; -1 changes nothing and returns the current value.
    let (fsuid, fsgid) = unsafe {
        (
            libc::syscall(libc::SYS_setfsuid, u32::MAX) as u32,
            libc::syscall(libc::SYS_setfsgid, u32::MAX) as u32,
        )
    };
    if fsuid != c.uid || fsgid != c.gid {
        return Err(failed(
            "Cannot take on the caller's identity",
            std::io::Error::other("setfsuid/setfsgid did not take"),
        ));
    }
    Ok(())
}

/// What a caller's file must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// A regular file.
    File,
    /// A directory.
    Dir,
}

/// Opens a caller's input once and checks what it is: `what` names the option in messages.
/// A path is opened with the caller's rights, without following a final symbolic link and
/// without opening anything that is not the expected kind (no device is ever opened).
pub fn take(uid: u32, input: CallerInput, what: &str, expect: Expect) -> Result<OwnedFd> {
    let label = input.describe();
    let fd = match input {
        CallerInput::Fd(fd) => fd,
        CallerInput::Path(p) => {
            if !p.is_absolute() {
                return Err(refused(format!(
                    "{what} {}: not an absolute path; the daemon does not know your working directory",
                    p.display()
                )));
            }
            let what2 = what.to_owned();
            as_caller(uid, move || open_path(&p, &what2, expect))?
        }
    };
    check(&fd, what, &label, expect)?;
    Ok(fd)
}

fn open_path(p: &Path, what: &str, expect: Expect) -> Result<OwnedFd> {
    let c = CString::new(p.as_os_str().as_bytes())
        .map_err(|_| refused(format!("{what}: the path holds a NUL byte")))?;
    // O_PATH opens nothing: a FIFO or device is looked at, never opened.
    // SAFETY: `c` is a NUL-terminated string that lives across the call.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(open_error(what, p, std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh descriptor this function owns.
    let pathfd = unsafe { OwnedFd::from_raw_fd(fd) };
    let st = fstat(&pathfd).map_err(|e| open_error(what, p, e))?;
    kind_ok(&st, what, &p.display().to_string(), expect)?;
    // Re-open the very inode for reading, still with the caller's rights.
    let proc = CString::new(format!("/proc/self/fd/{}", pathfd.as_raw_fd())).expect("no NUL");
    let flags = libc::O_RDONLY
        | libc::O_CLOEXEC
        | libc::O_NOCTTY
        | if expect == Expect::Dir {
            libc::O_DIRECTORY
        } else {
            0
        };
    // SAFETY: `proc` is NUL-terminated and lives across the call.
    let fd = unsafe { libc::open(proc.as_ptr(), flags) };
    if fd < 0 {
        return Err(open_error(what, p, std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh descriptor this function owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn open_error(what: &str, p: &Path, e: std::io::Error) -> Error {
    let p = p.display();
    match e.raw_os_error() {
        Some(libc::ELOOP) => refused(format!(
            "{what} {p} is a symbolic link; give the file it points to"
        )),
        Some(libc::EACCES) | Some(libc::EPERM) => refused(format!(
            "{what} {p}: you cannot read this file yourself, so banger will not read it for you"
        )),
        Some(libc::ENOENT) | Some(libc::ENOTDIR) => refused(format!("{what} {p} does not exist")),
        _ => refused(format!("{what} {p}: {e}")),
    }
}

use crate::host::fstat;

fn kind_ok(st: &libc::stat, what: &str, label: &str, expect: Expect) -> Result<()> {
    let fmt = st.st_mode & libc::S_IFMT;
    let kind = match fmt {
        libc::S_IFREG => "a regular file",
        libc::S_IFDIR => "a directory",
        libc::S_IFLNK => "a symbolic link",
        libc::S_IFIFO => "a FIFO",
        libc::S_IFSOCK => "a socket",
        libc::S_IFCHR => "a character device",
        libc::S_IFBLK => "a block device",
        _ => "not a file",
    };
    let (want, ok) = match expect {
        Expect::File => ("a regular file", fmt == libc::S_IFREG),
        Expect::Dir => ("a directory", fmt == libc::S_IFDIR),
    };
    if !ok {
        return Err(refused(format!(
            "{what} {label} is {kind}, not {want}; give {want}"
        )));
    }
    Ok(())
}

/// Checks a descriptor: the expected kind, and open for reading.
fn check(fd: &OwnedFd, what: &str, label: &str, expect: Expect) -> Result<()> {
    let st = fstat(fd).map_err(|e| refused(format!("{what} {label}: {e}")))?;
    kind_ok(&st, what, label, expect)?;
    // SAFETY: F_GETFL takes no pointer.
    let fl = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if fl < 0
        || fl & libc::O_PATH != 0
        || (expect == Expect::File && fl & libc::O_ACCMODE == libc::O_WRONLY)
    {
        return Err(refused(format!(
            "{what} {label} is not open for reading; open it read-only and pass that"
        )));
    }
    Ok(())
}

/// The size of a checked regular file, refused over `max` (`key` names the bound).
pub fn size_within(fd: &OwnedFd, what: &str, max: u64, key: &str) -> Result<u64> {
    let st = fstat(fd).map_err(|e| failed(format!("Cannot stat {what}"), e))?;
    let size = st.st_size as u64;
    if size > max {
        return Err(too_large(format!(
            "{what} is {size} bytes, over the {max} bytes {key} allows; ask the operator to raise {key} in /etc/banger/config.toml"
        )));
    }
    Ok(size)
}

/// Copies the first `size` bytes of a caller's file into banger's `dst` (created, mode 0600):
/// a reflink where the file systems allow it, else a copy of the data extents only, so holes
/// stay holes. The source is read through its descriptor only.
pub fn copy_into(src: &OwnedFd, dst: &Path, size: u64) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dst)
        .map_err(|e| failed(format!("Cannot create {}", dst.display()), e))?;
    copy_fd(src, &out, size)
        .map_err(|e| failed(format!("Cannot copy into {}", dst.display()), e))?;
    out.sync_all()
        .map_err(|e| failed(format!("Cannot sync {}", dst.display()), e))
}

fn copy_fd(src: &OwnedFd, out: &File, size: u64) -> std::io::Result<()> {
    // FICLONE = _IOW(0x94, 9, int)
    const FICLONE: libc::c_ulong = 0x4004_9409;
    let st = fstat(src)?;
    if st.st_size as u64 == size {
        // SAFETY: both descriptors are open; FICLONE takes the source fd as its argument.
        if unsafe { libc::ioctl(out.as_raw_fd(), FICLONE, src.as_raw_fd()) } == 0 {
            return Ok(());
        }
    }
    let mut off: i64 = 0;
    let end = size as i64;
    let mut buf = vec![0u8; 1 << 20];
    while off < end {
        // SAFETY: lseek takes no pointers.
        let data = unsafe { libc::lseek(src.as_raw_fd(), off, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole remains
            }
            return Err(e);
        }
        if data >= end {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(src.as_raw_fd(), data, libc::SEEK_HOLE) };
        let hole = if hole < 0 { end } else { hole.min(end) };
        let mut pos = data;
        while pos < hole {
            crate::cancel::check_canceled()?;
            let want = ((hole - pos) as usize).min(buf.len());
            // SAFETY: buf holds at least `want` bytes; pread writes at most that many.
            let n = unsafe { libc::pread(src.as_raw_fd(), buf.as_mut_ptr().cast(), want, pos) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                // The caller shrank the file meanwhile: the rest reads as zeros.
                break;
            }
            std::os::unix::fs::FileExt::write_all_at(out, &buf[..n as usize], pos as u64)?;
            pos += n as i64;
        }
        off = hole;
    }
    out.set_len(size)
}

/// Reads a whole checked regular file of at most `max` bytes (kernels, initrds).
pub fn read_all(fd: OwnedFd, what: &str, max: u64, key: &str) -> Result<Vec<u8>> {
    use std::io::Read;
    size_within(&fd, what, max, key)?;
    let mut v = Vec::new();
    File::from(fd)
        .take(max + 1)
        .read_to_end(&mut v)
        .map_err(|e| refused(format!("{what}: cannot read it: {e}")))?;
    if v.len() as u64 > max {
        return Err(too_large(format!(
            "{what} grew over the {max} bytes {key} allows while it was read"
        )));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_symlink_fifo_or_directory_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, b"data").unwrap();
        let l = dir.path().join("l");
        std::os::unix::fs::symlink(&f, &l).unwrap();
        let fifo = dir.path().join("fifo");
        let c = CString::new(fifo.as_os_str().as_bytes()).unwrap();
        // SAFETY: c is NUL-terminated.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);

        let ok = take(0, CallerInput::Path(f.clone()), "rootfs", Expect::File).unwrap();
        assert_eq!(read_all(ok, "rootfs", 100, "k").unwrap(), b"data");
        let e = take(0, CallerInput::Path(l), "rootfs", Expect::File).unwrap_err();
        assert!(e.to_string().contains("is a symbolic link"), "{e}");
        let e = take(0, CallerInput::Path(fifo), "rootfs", Expect::File).unwrap_err();
        assert!(e.to_string().contains("is a FIFO"), "{e}");
        let e = take(
            0,
            CallerInput::Path(dir.path().into()),
            "rootfs",
            Expect::File,
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("is a directory, not a regular file"),
            "{e}"
        );
        let e = take(0, CallerInput::Path("rel".into()), "rootfs", Expect::File).unwrap_err();
        assert!(e.to_string().contains("not an absolute path"), "{e}");
        take(
            0,
            CallerInput::Path(dir.path().into()),
            "modules_dir",
            Expect::Dir,
        )
        .unwrap();
    }

    #[test]
    fn a_write_only_descriptor_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        let w = File::create(&f).unwrap();
        let e = take(0, CallerInput::Fd(w.into()), "rootfs", Expect::File).unwrap_err();
        assert!(e.to_string().contains("not open for reading"), "{e}");
    }

    #[test]
    fn sparse_copies_keep_holes_and_size() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let f = File::create(&src).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, b"head", 0).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, b"tail", 64 << 20).unwrap();
        drop(f);
        let fd = take(0, CallerInput::Path(src.clone()), "rootfs", Expect::File).unwrap();
        let size = size_within(&fd, "rootfs", u64::MAX, "k").unwrap();
        let dst = dir.path().join("dst");
        copy_into(&fd, &dst, size).unwrap();
        assert_eq!(std::fs::read(&dst).unwrap(), std::fs::read(&src).unwrap());
        use std::os::unix::fs::MetadataExt;
        assert!(
            std::fs::metadata(&dst).unwrap().blocks() < 1024,
            "holes kept"
        );
        let e = size_within(&fd, "rootfs", 10, "max_register_bytes").unwrap_err();
        assert!(
            matches!(e, Error::CallerFile(CallerFileError::TooLarge(_)))
                && e.to_string().contains("max_register_bytes"),
            "{e}"
        );
    }
}
