//! System calls the std library lacks, shared by the guest's binaries and the host's (the
//! daemon, the containerd shim).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Component, Path};

/// `openat2(2)`: `path` below `dirfd` opened with `flags` (`O_CLOEXEC` always) and `mode` when
/// it creates, resolved as `resolve` (`RESOLVE_*`) says. `ENOSYS` on kernels before 5.6 and
/// under seccomp filters older than the call.
pub fn openat2(
    dirfd: std::os::fd::RawFd,
    path: &std::path::Path,
    flags: i32,
    mode: u32,
    resolve: u64,
) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::ErrorKind::InvalidInput)?;
    // SAFETY: open_how is plain data; zeroed is a valid value for every field.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    if flags & libc::O_CREAT != 0 {
        how.mode = u64::from(mode);
    }
    how.resolve = resolve;
    // SAFETY: `c` is a valid NUL-terminated string and `how` a valid open_how of the size we
    // pass; the kernel reads both and returns a new fd or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dirfd,
            c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd to us; nobody else owns it.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// `path` inside the root `dirfd` as if it were `/`, no magic link followed.
fn in_root_open(dirfd: i32, path: &Path, flags: i32) -> io::Result<OwnedFd> {
    openat2(
        dirfd,
        path,
        flags,
        0,
        libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS,
    )
}

/// `destination` inside the folder `root` as if it were `/` (`RESOLVE_IN_ROOT`, no magic
/// link), made when missing: folders for the parents, the last a folder (`dir`) or an empty
/// file; opened `O_PATH`. With `replace_dangling`, a symlink at the last name that leads
/// nowhere inside the root is replaced by what is made (a container's copy of its image is its
/// own to change); without, such a destination is refused.
pub fn in_root(
    root: &OwnedFd,
    destination: &str,
    dir: bool,
    replace_dangling: bool,
) -> io::Result<OwnedFd> {
    let mut names = Vec::new();
    for c in Path::new(destination).components() {
        match c {
            Component::Normal(n) => names.push(n),
            Component::RootDir | Component::CurDir => {}
            _ => {
                return Err(io::Error::other(format!(
                    "{destination:?} is not a plain path"
                )))
            }
        }
    }
    let Some((last, parents)) = names.split_last() else {
        return Err(io::Error::other(
            "the root itself cannot be a mount's destination",
        ));
    };
    let mut at = std::path::PathBuf::new();
    let mut parent = in_root_open(
        root.as_raw_fd(),
        Path::new("."),
        libc::O_PATH | libc::O_DIRECTORY,
    )?;
    for name in parents {
        at.push(name);
        match in_root_open(root.as_raw_fd(), &at, libc::O_PATH | libc::O_DIRECTORY) {
            Ok(fd) => parent = fd,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                mkdir_in(&parent, name)?;
                parent = in_root_open(root.as_raw_fd(), &at, libc::O_PATH | libc::O_DIRECTORY)?;
            }
            Err(e) => return Err(e),
        }
    }
    at.push(last);
    match in_root_open(root.as_raw_fd(), &at, libc::O_PATH) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
            // A symlink of the image's that leads nowhere inside the root is replaced by what
            // the mount needs (the container's copy of the image is its own to change).
            let c = CString::new(last.as_encoded_bytes()).map_err(io::Error::other)?;
            // SAFETY: a zeroed stat is a valid out-buffer (and, below, a NUL-terminated name
            // below an open directory descriptor, not followed).
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            // SAFETY: as above.
            let lstat = unsafe {
                libc::fstatat(
                    parent.as_raw_fd(),
                    c.as_ptr(),
                    &mut st,
                    libc::AT_SYMLINK_NOFOLLOW,
                )
            };
            if replace_dangling && lstat == 0 && st.st_mode & libc::S_IFMT == libc::S_IFLNK {
                // SAFETY: as above; the name is the symlink's.
                if unsafe { libc::unlinkat(parent.as_raw_fd(), c.as_ptr(), 0) } != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            if dir {
                mkdir_in(&parent, last)?;
            } else {
                let c = CString::new(last.as_encoded_bytes()).map_err(io::Error::other)?;
                // SAFETY: a NUL-terminated name below an open directory descriptor.
                let fd = unsafe {
                    libc::openat(
                        parent.as_raw_fd(),
                        c.as_ptr(),
                        libc::O_CREAT
                            | libc::O_EXCL
                            | libc::O_WRONLY
                            | libc::O_NOFOLLOW
                            | libc::O_CLOEXEC,
                        0o644,
                    )
                };
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                // SAFETY: ours alone; closed at once.
                drop(unsafe { OwnedFd::from_raw_fd(fd) });
            }
            in_root_open(root.as_raw_fd(), &at, libc::O_PATH)
        }
        r => r,
    }
}

fn mkdir_in(parent: &OwnedFd, name: &std::ffi::OsStr) -> io::Result<()> {
    let c = CString::new(name.as_encoded_bytes()).map_err(io::Error::other)?;
    // SAFETY: a NUL-terminated name below an open directory descriptor.
    if unsafe { libc::mkdirat(parent.as_raw_fd(), c.as_ptr(), 0o755) } != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EEXIST) {
            return Err(e);
        }
    }
    Ok(())
}
