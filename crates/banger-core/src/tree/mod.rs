//! A root filesystem being assembled, wherever it lives: a host directory (every path
//! resolved inside it, see [`inroot`]) or an ext4 image written directly
//! ([`crate::ext4::writer`]). The layer flattener and the guest-asset injection speak only
//! this trait, so an image pulled straight into ext4 gets exactly the rules a tree gets.

use std::ffi::{CString, OsStr, OsString};
use std::hash::Hash;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

pub mod inroot;

use inroot::Root;

/// Ownership, permission bits (with setuid, setgid and sticky) and mtime of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    /// Permission bits, `0o7777` at most.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Seconds since the epoch.
    pub mtime: i64,
}

/// A special file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Node {
    /// A character device (major, minor).
    Char(u32, u32),
    /// A block device (major, minor).
    Block(u32, u32),
    /// A named pipe.
    Fifo,
}

/// A tree under construction. Every name is one path component; a `Dir` is a directory
/// already resolved inside the tree (never through a symlink at its last step), so
/// operations on `(dir, name)` cannot leave the tree.
pub trait Tree {
    /// A resolved directory.
    type Dir: Clone + Eq + Hash;

    /// Resolves directory `rel` (relative, normal components) inside the tree, following the
    /// tree's own symlinks as if the tree were `/`. With `create`, missing directories are
    /// made (root's, 0755) and returned, each as (its parent, its name).
    #[allow(clippy::type_complexity)]
    fn resolve_dir(
        &mut self,
        rel: &Path,
        create: bool,
    ) -> io::Result<(Self::Dir, Vec<(Self::Dir, OsString)>)>;
    /// The names in `dir`, without `.` and `..`.
    fn children(&mut self, dir: &Self::Dir) -> io::Result<Vec<OsString>>;
    /// What is at `name`: nothing, a directory (`Some(true)`) or anything else.
    fn probe(&mut self, dir: &Self::Dir, name: &OsStr) -> io::Result<Option<bool>>;
    /// Removes `name` and, for a directory, everything below it; nothing there is fine.
    fn remove(&mut self, dir: &Self::Dir, name: &OsStr) -> io::Result<()>;
    /// Makes directory `name` (nothing is there).
    fn mkdir(&mut self, dir: &Self::Dir, name: &OsStr) -> io::Result<()>;
    /// Sets owner and permission bits of `name` (a directory or special file), and its
    /// mtime.
    fn set_meta(&mut self, dir: &Self::Dir, name: &OsStr, meta: Meta) -> io::Result<()>;
    /// Sets only the mtime of `name`, never following a symlink.
    fn set_mtime(&mut self, dir: &Self::Dir, name: &OsStr, mtime: i64) -> io::Result<()>;
    /// Writes regular file `name` (nothing is there) of `size` bytes from `data`; returns
    /// the bytes written.
    fn write_file(
        &mut self,
        dir: &Self::Dir,
        name: &OsStr,
        meta: Meta,
        size: u64,
        data: &mut dyn Read,
    ) -> io::Result<u64>;
    /// Makes symlink `name` to `target` (nothing is there), owned and timed per `meta`.
    fn symlink(
        &mut self,
        dir: &Self::Dir,
        name: &OsStr,
        target: &Path,
        meta: Meta,
    ) -> io::Result<()>;
    /// Makes `name` another link to the non-directory `from` (nothing is at `name`).
    fn hard_link(
        &mut self,
        dir: &Self::Dir,
        name: &OsStr,
        from: (&Self::Dir, &OsStr),
    ) -> io::Result<()>;
    /// Makes special file `name` (nothing is there).
    fn mknod(&mut self, dir: &Self::Dir, name: &OsStr, node: Node, meta: Meta) -> io::Result<()>;
    /// Sets extended attribute `key` of `name`.
    fn set_xattr(
        &mut self,
        dir: &Self::Dir,
        name: &OsStr,
        key: &[u8],
        value: &[u8],
    ) -> io::Result<()>;
}

/// A host directory as a [`Tree`]; directories are their canonical host paths.
pub struct HostTree {
    root: Root,
    /// Set ownership (needs root; off only in unprivileged unit tests).
    preserve_owner: bool,
}

impl HostTree {
    /// The tree at `path`, created if missing.
    pub fn create(path: &Path, preserve_owner: bool) -> io::Result<Self> {
        Ok(HostTree {
            root: Root::create(path)?,
            preserve_owner,
        })
    }

    /// The tree's host path.
    pub fn path(&self) -> &Path {
        self.root.path()
    }

    fn own(&self, p: &Path, meta: Meta) -> io::Result<()> {
        if self.preserve_owner {
            std::os::unix::fs::lchown(p, Some(meta.uid), Some(meta.gid))?;
        }
        Ok(())
    }
}

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::ErrorKind::InvalidInput.into())
}

fn utime(p: &Path, secs: i64) -> io::Result<()> {
    let t = libc::timespec {
        tv_sec: secs,
        tv_nsec: 0,
    };
    let times = [t, t];
    let c = cstr(p)?;
    // SAFETY: `c` is NUL-terminated and `times` holds two timespecs, as utimensat requires.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Tree for HostTree {
    type Dir = PathBuf;

    fn resolve_dir(
        &mut self,
        rel: &Path,
        create: bool,
    ) -> io::Result<(PathBuf, Vec<(PathBuf, OsString)>)> {
        let (dir, created) = self.root.resolve_dir(rel, create)?;
        let base = self.root.path().to_owned();
        let created = created
            .into_iter()
            .map(|p| {
                let abs = base.join(&p);
                let parent = abs.parent().unwrap_or(&base).to_owned();
                (parent, abs.file_name().unwrap_or_default().to_owned())
            })
            .collect();
        Ok((dir, created))
    }

    fn children(&mut self, dir: &PathBuf) -> io::Result<Vec<OsString>> {
        std::fs::read_dir(dir)?
            .map(|e| e.map(|e| e.file_name()))
            .collect()
    }

    fn probe(&mut self, dir: &PathBuf, name: &OsStr) -> io::Result<Option<bool>> {
        match std::fs::symlink_metadata(dir.join(name)) {
            Ok(m) => Ok(Some(m.is_dir())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn remove(&mut self, dir: &PathBuf, name: &OsStr) -> io::Result<()> {
        let p = dir.join(name);
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(p),
            Ok(_) => std::fs::remove_file(p),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn mkdir(&mut self, dir: &PathBuf, name: &OsStr) -> io::Result<()> {
        std::fs::create_dir(dir.join(name))
    }

    fn set_meta(&mut self, dir: &PathBuf, name: &OsStr, meta: Meta) -> io::Result<()> {
        let p = dir.join(name);
        self.own(&p, meta)?;
        // After chown, which clears setuid and setgid.
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(meta.mode))?;
        utime(&p, meta.mtime)
    }

    fn set_mtime(&mut self, dir: &PathBuf, name: &OsStr, mtime: i64) -> io::Result<()> {
        utime(&dir.join(name), mtime)
    }

    fn write_file(
        &mut self,
        dir: &PathBuf,
        name: &OsStr,
        meta: Meta,
        _size: u64,
        data: &mut dyn Read,
    ) -> io::Result<u64> {
        let p = dir.join(name);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&p)?;
        let n = io::copy(data, &mut f)?;
        if self.preserve_owner {
            std::os::unix::fs::fchown(&f, Some(meta.uid), Some(meta.gid))?;
        }
        f.set_permissions(std::fs::Permissions::from_mode(meta.mode))?;
        drop(f);
        utime(&p, meta.mtime)?;
        Ok(n)
    }

    fn symlink(
        &mut self,
        dir: &PathBuf,
        name: &OsStr,
        target: &Path,
        meta: Meta,
    ) -> io::Result<()> {
        let p = dir.join(name);
        std::os::unix::fs::symlink(target, &p)?;
        self.own(&p, meta)?;
        utime(&p, meta.mtime)
    }

    fn hard_link(
        &mut self,
        dir: &PathBuf,
        name: &OsStr,
        from: (&PathBuf, &OsStr),
    ) -> io::Result<()> {
        std::fs::hard_link(from.0.join(from.1), dir.join(name))
    }

    fn mknod(&mut self, dir: &PathBuf, name: &OsStr, node: Node, meta: Meta) -> io::Result<()> {
        let p = dir.join(name);
        let (fmt, major, minor) = match node {
            Node::Char(a, b) => (libc::S_IFCHR, a, b),
            Node::Block(a, b) => (libc::S_IFBLK, a, b),
            Node::Fifo => (libc::S_IFIFO, 0, 0),
        };
        let c = cstr(&p)?;
        // SAFETY: `c` is NUL-terminated; mknod creates a node and never follows the last
        // component.
        let r = unsafe { libc::mknod(c.as_ptr(), fmt | 0o600, libc::makedev(major, minor)) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        self.set_meta(dir, name, meta)
    }

    fn set_xattr(
        &mut self,
        dir: &PathBuf,
        name: &OsStr,
        key: &[u8],
        value: &[u8],
    ) -> io::Result<()> {
        let c = cstr(&dir.join(name))?;
        let n = CString::new(key).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: both strings are NUL-terminated; value/len describe a live slice.
        let r = unsafe {
            libc::lsetxattr(
                c.as_ptr(),
                n.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Writes `data` as file `rel` (root's, `mode`), replacing whatever is there and creating
/// missing parents.
pub fn put_file<T: Tree>(tree: &mut T, rel: &str, data: &[u8], mode: u32) -> io::Result<()> {
    let (dir, name) = clear(tree, rel)?;
    tree.write_file(
        &dir,
        name,
        root_meta(mode),
        data.len() as u64,
        &mut &data[..],
    )?;
    Ok(())
}

/// Makes `rel` a symlink to `target` (root's), replacing whatever is there.
pub fn put_symlink<T: Tree>(tree: &mut T, rel: &str, target: &str) -> io::Result<()> {
    let (dir, name) = clear(tree, rel)?;
    tree.symlink(&dir, name, Path::new(target), root_meta(0o777))
}

/// Resolves `rel`'s parent (creating it) and removes whatever `rel` is; returns the parent
/// and the name.
fn clear<'a, T: Tree>(tree: &mut T, rel: &'a str) -> io::Result<(T::Dir, &'a OsStr)> {
    let rel = Path::new(rel);
    let parent = rel.parent().unwrap_or(Path::new(""));
    let name = rel.file_name().ok_or(io::ErrorKind::InvalidInput)?;
    let (dir, _) = tree.resolve_dir(parent, true)?;
    tree.remove(&dir, name)?;
    Ok((dir, name))
}

fn root_meta(mode: u32) -> Meta {
    Meta {
        mode,
        uid: 0,
        gid: 0,
        mtime: now(),
    }
}

/// Seconds since the epoch, for what banger itself writes into a tree.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
