//! Path resolution inside a root directory, as if it were `/`: symlinks are followed within
//! the root (`openat2` with `RESOLVE_IN_ROOT`), `..` never climbs out, and nothing is ever
//! resolved against the host. Every write of the flattener goes through here.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
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
    use std::sync::atomic::{AtomicBool, Ordering};
    // Kernels before 5.6, and seccomp filters that predate the call (some systemd versions'
    // system call groups, systemd-nspawn's container filter), answer ENOSYS: then the same
    // resolution is done in userspace, one no-follow step at a time.
    static MISSING: AtomicBool = AtomicBool::new(false);
    if MISSING.load(Ordering::Relaxed) {
        return resolve_by_hand(dirfd, path, flags, resolve);
    }
    match crate::host::openat2(dirfd, path, flags as i32, 0, resolve) {
        Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
            MISSING.store(true, Ordering::Relaxed);
            resolve_by_hand(dirfd, path, flags, resolve)
        }
        r => r,
    }
}

use crate::host::openat;

fn dev_of(fd: &OwnedFd) -> io::Result<u64> {
    // SAFETY: a zeroed stat is a valid out-buffer; the fd is open.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.st_dev)
}

/// `openat2(dirfd, path, flags, RESOLVE_IN_ROOT | RESOLVE_NO_XDEV)` in userspace: every
/// component is opened `O_PATH | O_NOFOLLOW` below the one before; `..` stops at the root;
/// a symlink's target is resolved again from the root (absolute) or from where it sits
/// (relative), at most 40 times.
fn resolve_by_hand(dirfd: i32, path: &Path, flags: u64, resolve: u64) -> io::Result<OwnedFd> {
    use std::collections::VecDeque;
    use std::path::Component;
    let flags = flags as i32;
    if resolve == 0 {
        return openat(dirfd, path, flags);
    }
    let root = openat(dirfd, Path::new("."), libc::O_PATH | libc::O_DIRECTORY)?;
    let root_dev = dev_of(&root)?;
    // The directories from the root down to the current one.
    let mut stack: Vec<OwnedFd> = Vec::new();
    let mut todo: VecDeque<std::ffi::OsString> = VecDeque::new();
    let push = |todo: &mut VecDeque<std::ffi::OsString>, p: &Path, front: bool| {
        let parts: Vec<_> = p
            .components()
            .filter_map(|c| match c {
                Component::Normal(n) => Some(n.to_owned()),
                Component::ParentDir => Some("..".into()),
                _ => None,
            })
            .collect();
        if front {
            for part in parts.into_iter().rev() {
                todo.push_front(part);
            }
        } else {
            todo.extend(parts);
        }
    };
    push(&mut todo, path, false);
    let mut links = 0;
    while let Some(name) = todo.pop_front() {
        if name == ".." {
            stack.pop();
            continue;
        }
        let here = stack.last().unwrap_or(&root).as_raw_fd();
        let fd = openat(here, Path::new(&name), libc::O_PATH | libc::O_NOFOLLOW)?;
        // SAFETY: a zeroed stat is a valid out-buffer; the fd is open.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } < 0 {
            return Err(io::Error::last_os_error());
        }
        if st.st_mode & libc::S_IFMT == libc::S_IFLNK {
            links += 1;
            if links > 40 {
                return Err(io::Error::from_raw_os_error(libc::ELOOP));
            }
            let at = fd_path(stack.last().unwrap_or(&root))?.join(&name);
            let target = std::fs::read_link(at)?;
            if target.is_absolute() {
                stack.clear();
            }
            push(&mut todo, &target, true);
            continue;
        }
        if resolve & libc::RESOLVE_NO_XDEV != 0 && st.st_dev != root_dev {
            return Err(io::Error::from_raw_os_error(libc::EXDEV));
        }
        if !todo.is_empty() && st.st_mode & libc::S_IFMT != libc::S_IFDIR {
            return Err(io::Error::from_raw_os_error(libc::ENOTDIR));
        }
        stack.push(fd);
    }
    // Reopen the final directory (or the root) with the flags asked for.
    let last = stack.last().unwrap_or(&root);
    openat(last.as_raw_fd(), Path::new("."), flags)
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

    #[test]
    fn the_userspace_fallback_resolves_like_openat2() {
        let tmp = tempfile::tempdir().unwrap();
        let root = Root::create(&tmp.path().join("root")).unwrap();
        let r = root.path().to_owned();
        std::fs::create_dir_all(r.join("run/deep")).unwrap();
        std::fs::create_dir(r.join("var")).unwrap();
        std::os::unix::fs::symlink("/run", r.join("var/run")).unwrap();
        std::os::unix::fs::symlink("../../../../..", r.join("up")).unwrap();
        std::os::unix::fs::symlink("loop", r.join("loop")).unwrap();
        std::fs::write(r.join("file"), b"").unwrap();
        let how = |p: &str| {
            let flags = (libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC) as u64;
            let resolve =
                libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS | libc::RESOLVE_NO_XDEV;
            let by_hand = resolve_by_hand(root.fd.as_raw_fd(), Path::new(p), flags, resolve)
                .map(|fd| fd_path(&fd).unwrap());
            let kernel = openat2(root.fd.as_raw_fd(), Path::new(p), flags, resolve)
                .map(|fd| fd_path(&fd).unwrap());
            assert_eq!(
                by_hand.as_ref().map_err(|e| e.raw_os_error()),
                kernel.as_ref().map_err(|e| e.raw_os_error()),
                "{p}"
            );
            by_hand
        };
        assert_eq!(how("var/run/deep").unwrap(), r.join("run/deep"));
        assert_eq!(how("up/run").unwrap(), r.join("run"));
        assert_eq!(how("../../..").unwrap(), r);
        assert_eq!(how(".").unwrap(), r);
        assert!(how("loop").is_err());
        assert!(how("file").is_err());
        assert!(how("missing/x").is_err());
    }
}
