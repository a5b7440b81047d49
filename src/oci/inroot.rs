//! Path resolution inside a root directory, as if it were `/`: symlinks are followed within
//! the root (`openat2` with `RESOLVE_IN_ROOT`), `..` never climbs out, and nothing is ever
//! resolved against the host. Every write of the flattener goes through here.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

/// A root directory, held open.
pub struct Root {
    fd: OwnedFd,
    path: PathBuf,
}

/// Splits a layer path into normal components, rejecting `..`, absolute paths and empties.
pub fn normal_components(p: &Path) -> Result<Vec<&std::ffi::OsStr>, String> {
    let mut out = Vec::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::ParentDir => return Err(format!("path {} contains '..'", p.display())),
            Component::RootDir | Component::Prefix(_) => {
                return Err(format!("path {} is absolute", p.display()))
            }
        }
    }
    if out.is_empty() {
        return Err(format!("path {:?} names no file", p.display()));
    }
    Ok(out)
}

fn openat2(dirfd: i32, path: &Path, flags: u64, resolve: u64) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: open_how is plain data; zeroed is a valid value for every field.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = flags;
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
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd to us; nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

impl Root {
    /// Creates (mode 0755) and opens the root directory.
    pub fn create(path: &Path) -> io::Result<Self> {
        match std::fs::create_dir(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        // Canonical, so that resolved paths can be checked to lie below it.
        let path = &std::fs::canonicalize(path)?;
        let fd = openat2(
            libc::AT_FDCWD,
            path,
            (libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC | libc::O_NOFOLLOW) as u64,
            0,
        )?;
        Ok(Root {
            fd,
            path: path.to_owned(),
        })
    }

    /// The root's host path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn open_dir(&self, rel: &Path) -> io::Result<OwnedFd> {
        let rel = if rel.as_os_str().is_empty() {
            Path::new(".")
        } else {
            rel
        };
        openat2(
            self.fd.as_raw_fd(),
            rel,
            (libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC) as u64,
            libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS | libc::RESOLVE_NO_XDEV,
        )
    }

    /// The host path of directory `rel` resolved in the root, creating missing directories
    /// (root-owned, 0755) when `create`. Returns the path and the directories it created.
    /// The returned path is canonical (it contains no symlink), so plain path operations on
    /// a child name, with no-follow semantics for that last name, stay inside the root.
    pub fn resolve_dir(&self, rel: &Path, create: bool) -> io::Result<(PathBuf, Vec<PathBuf>)> {
        let mut created = Vec::new();
        let fd = match self.open_dir(rel) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) && create => {
                let mut prefix = PathBuf::new();
                let mut last = self.open_dir(Path::new(""))?;
                for c in rel.components() {
                    prefix.push(c);
                    last = match self.open_dir(&prefix) {
                        Ok(fd) => fd,
                        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                            let parent = fd_path(&last)?;
                            let name = prefix.file_name().ok_or(io::ErrorKind::InvalidInput)?;
                            let at = parent.join(name);
                            if let Ok(target) = std::fs::read_link(&at) {
                                return Err(io::Error::new(
                                    io::ErrorKind::NotADirectory,
                                    format!(
                                        "it writes through the symlink {} -> {}, whose target is not in the image",
                                        prefix.display(),
                                        target.display()
                                    ),
                                ));
                            }
                            std::fs::create_dir(at)?;
                            let fd = self.open_dir(&prefix)?;
                            let real = fd_path(&fd)?;
                            created.push(real.strip_prefix(&self.path).unwrap_or(&real).to_owned());
                            fd
                        }
                        Err(e) => return Err(e),
                    };
                }
                last
            }
            Err(e) => return Err(e),
        };
        let real = fd_path(&fd)?;
        // Belt and braces: the kernel already guarantees this.
        if !real.starts_with(&self.path) {
            return Err(io::Error::other(format!(
                "{} resolved outside the root",
                rel.display()
            )));
        }
        Ok((real, created))
    }
}

fn fd_path(fd: &OwnedFd) -> io::Result<PathBuf> {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn components_reject_escapes() {
        assert!(normal_components(Path::new("./a/b")).is_ok());
        assert!(normal_components(Path::new("a/../b")).is_err());
        assert!(normal_components(Path::new("/etc/passwd")).is_err());
        assert!(normal_components(Path::new(".")).is_err());
    }

    #[test]
    fn symlinks_resolve_inside_the_root() {
        let tmp = tempfile::tempdir().unwrap();
        let root = Root::create(&tmp.path().join("root")).unwrap();
        std::fs::create_dir(root.path().join("run")).unwrap();
        std::fs::create_dir(root.path().join("var")).unwrap();
        std::os::unix::fs::symlink("/run", root.path().join("var/run")).unwrap();
        std::os::unix::fs::symlink("../../../../..", root.path().join("up")).unwrap();
        let (p, _) = root.resolve_dir(Path::new("var/run"), false).unwrap();
        assert_eq!(p, root.path().join("run"));
        let (p, _) = root.resolve_dir(Path::new("up"), false).unwrap();
        assert_eq!(p, root.path().to_path_buf());
        let (p, created) = root.resolve_dir(Path::new("up/new/deep"), true).unwrap();
        assert_eq!(p, root.path().join("new/deep"));
        assert_eq!(created.len(), 2);
    }
}
