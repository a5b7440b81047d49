//! Flattens OCI layers, in manifest order, into one directory tree: OCI whiteouts
//! (`.wh.NAME`, opaque `.wh..wh..opq`), ownership, mode bits (setuid, setgid, sticky),
//! symlinks, hard links, device nodes, FIFOs, xattrs and mtimes. Every path is resolved
//! inside the tree (see `inroot`), so no entry, link or whiteout can touch anything outside
//! it; entries that try are rejected with a clear error, and the caller throws the partial
//! tree away. The expanded size and entry count are capped against decompression bombs.

use std::collections::HashSet;
use std::ffi::CString;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use tar::EntryType;

use super::inroot::{normal_components, Root};

/// Why a layer could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum FlattenError {
    /// The layer tries to leave the tree or is malformed.
    #[error("Hostile or malformed layer entry {entry:?}: {reason}")]
    Hostile {
        /// The entry's path.
        entry: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The layer expands past the configured cap.
    #[error("Layer expands past the limit of {limit} {what}; raise max_image_bytes in the configuration if the image is genuine")]
    TooLarge {
        /// bytes or entries.
        what: &'static str,
        /// The cap.
        limit: u64,
    },
    /// Reading the layer or writing the tree failed.
    #[error("Cannot apply layer entry {entry:?}")]
    Io {
        /// The entry's path.
        entry: String,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
}

/// Caps on what layers may expand to.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Total bytes of tar stream across all layers.
    pub max_bytes: u64,
    /// Total entries across all layers.
    pub max_entries: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: 32 << 30,
            max_entries: 4_000_000,
        }
    }
}

/// What a flattening produced.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Bytes of regular file data written.
    pub file_bytes: u64,
    /// Entries applied.
    pub entries: u64,
}

/// Applies layers one after another to a tree.
pub struct Flattener {
    root: Root,
    limits: Limits,
    /// Set ownership from the layers (needs root; off only in unprivileged unit tests).
    preserve_owner: bool,
    stream_bytes: u64,
    stats: Stats,
    dir_times: Vec<(PathBuf, i64)>,
}

/// Counts the tar stream's bytes and fails past the cap.
struct Capped<'a, R> {
    inner: R,
    used: &'a mut u64,
    limit: u64,
}

impl<R: Read> Read for Capped<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        *self.used += n as u64;
        if *self.used > self.limit {
            return Err(io::Error::new(
                io::ErrorKind::FileTooLarge,
                "layer size cap exceeded",
            ));
        }
        Ok(n)
    }
}

fn hostile(entry: &Path, reason: impl Into<String>) -> FlattenError {
    FlattenError::Hostile {
        entry: entry.display().to_string(),
        reason: reason.into(),
    }
}

fn io_err(entry: &Path) -> impl FnOnce(io::Error) -> FlattenError + '_ {
    move |source| FlattenError::Io {
        entry: entry.display().to_string(),
        source,
    }
}

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::ErrorKind::InvalidInput.into())
}

/// Removes whatever is at `p` (never following a symlink).
fn remove_existing(p: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p),
        Ok(_) => std::fs::remove_file(p),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn set_mtime(p: &Path, secs: i64) -> io::Result<()> {
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

fn set_xattr(p: &Path, name: &[u8], value: &[u8]) -> io::Result<()> {
    let c = cstr(p)?;
    let n = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
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

/// Whether a relative symlink target, read from the directory `depth` levels below the
/// root, climbs above the root.
fn climbs_out(target: &Path, mut depth: usize) -> bool {
    for c in target.components() {
        match c {
            Component::ParentDir if depth == 0 => return true,
            Component::ParentDir => depth -= 1,
            Component::Normal(_) => depth += 1,
            _ => {}
        }
    }
    false
}

impl Flattener {
    /// A flattener writing into `tree` (created if missing).
    pub fn new(tree: &Path, limits: Limits, preserve_owner: bool) -> io::Result<Self> {
        Ok(Flattener {
            root: Root::create(tree)?,
            limits,
            preserve_owner,
            stream_bytes: 0,
            stats: Stats::default(),
            dir_times: Vec::new(),
        })
    }

    /// Applies one uncompressed layer tar stream on top of what is there.
    pub fn apply_layer(&mut self, layer: impl Read) -> Result<(), FlattenError> {
        let limit = self.limits.max_bytes;
        let mut used = self.stream_bytes;
        let capped = Capped {
            inner: layer,
            used: &mut used,
            limit,
        };
        let mut archive = tar::Archive::new(capped);
        let mut this_layer: HashSet<PathBuf> = HashSet::new();
        let entries = archive.entries().map_err(io_err(Path::new("<layer>")))?;
        for entry in entries {
            let mut entry = entry.map_err(|e| self.read_error(e))?;
            self.stats.entries += 1;
            if self.stats.entries > self.limits.max_entries {
                return Err(FlattenError::TooLarge {
                    what: "entries",
                    limit: self.limits.max_entries,
                });
            }
            let path = entry.path().map_err(|e| self.read_error(e))?.into_owned();
            self.apply_entry(&mut entry, &path, &mut this_layer)?;
        }
        drop(archive);
        self.stream_bytes = used;
        Ok(())
    }

    fn read_error(&self, e: io::Error) -> FlattenError {
        if e.kind() == io::ErrorKind::FileTooLarge {
            return FlattenError::TooLarge {
                what: "bytes",
                limit: self.limits.max_bytes,
            };
        }
        FlattenError::Io {
            entry: "<layer>".into(),
            source: e,
        }
    }

    fn apply_entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        path: &Path,
        this_layer: &mut HashSet<PathBuf>,
    ) -> Result<(), FlattenError> {
        let kind = entry.header().entry_type();
        if matches!(
            kind,
            EntryType::XGlobalHeader
                | EntryType::XHeader
                | EntryType::GNULongName
                | EntryType::GNULongLink
        ) {
            return Ok(());
        }
        let comps = match normal_components(path) {
            Ok(c) => c,
            // The tree's root itself ("./"): nothing to create.
            Err(_)
                if kind == EntryType::Directory
                    && path
                        .components()
                        .all(|c| c == Component::CurDir || c == Component::RootDir) =>
            {
                return Ok(())
            }
            Err(reason) => return Err(hostile(path, reason)),
        };
        let (name, parent_comps) = comps
            .split_last()
            .expect("normal_components is never empty");
        let parent_rel: PathBuf = parent_comps.iter().collect();
        let name_bytes = name.as_bytes();

        // Whiteouts remove from lower layers and are not files themselves.
        if name_bytes.starts_with(b".wh.") {
            let parent = match self.root.resolve_dir(&parent_rel, false) {
                Ok((p, _)) => p,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
                Err(e) => return Err(io_err(path)(e)),
            };
            if name_bytes == b".wh..wh..opq" {
                let canon_parent = self.rel(&parent);
                for child in std::fs::read_dir(&parent).map_err(io_err(path))? {
                    let child = child.map_err(io_err(path))?;
                    if !this_layer.contains(&canon_parent.join(child.file_name())) {
                        remove_existing(&child.path()).map_err(io_err(path))?;
                    }
                }
            } else {
                let victim = std::ffi::OsStr::from_bytes(&name_bytes[4..]);
                if victim.is_empty() || victim == "." || victim == ".." {
                    return Err(hostile(path, "whiteout names no file"));
                }
                remove_existing(&parent.join(victim)).map_err(io_err(path))?;
            }
            return Ok(());
        }

        let (parent, created) = self.root.resolve_dir(&parent_rel, true).map_err(|e| {
            if e.kind() == io::ErrorKind::NotADirectory {
                let reason = if e.raw_os_error().is_some() {
                    "a parent is not a directory".into()
                } else {
                    e.to_string()
                };
                hostile(path, reason)
            } else {
                io_err(path)(e)
            }
        })?;
        this_layer.extend(created);
        let target = parent.join(name);
        let rel = self.rel(&target);
        let header = entry.header();
        let mode = header.mode().map_err(io_err(path))? & 0o7777;
        let uid = header.uid().map_err(io_err(path))? as u32;
        let gid = header.gid().map_err(io_err(path))? as u32;
        let mtime = header.mtime().map_err(io_err(path))? as i64;

        match kind {
            EntryType::Directory => {
                match std::fs::symlink_metadata(&target) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => {
                        remove_existing(&target).map_err(io_err(path))?;
                        std::fs::create_dir(&target).map_err(io_err(path))?;
                    }
                    Err(_) => std::fs::create_dir(&target).map_err(io_err(path))?,
                }
                self.own(&target, uid, gid, path)?;
                std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode))
                    .map_err(io_err(path))?;
                self.dir_times.push((target.clone(), mtime));
            }
            EntryType::Regular | EntryType::Continuous => {
                remove_existing(&target).map_err(io_err(path))?;
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                    .open(&target)
                    .map_err(io_err(path))?;
                let n = io::copy(entry, &mut f).map_err(|e| self.read_error(e))?;
                self.stats.file_bytes += n;
                if self.preserve_owner {
                    std::os::unix::fs::fchown(&f, Some(uid), Some(gid)).map_err(io_err(path))?;
                }
                // After chown, which clears setuid and setgid.
                f.set_permissions(std::fs::Permissions::from_mode(mode))
                    .map_err(io_err(path))?;
                drop(f);
                set_mtime(&target, mtime).map_err(io_err(path))?;
            }
            EntryType::Symlink => {
                let link = entry
                    .link_name()
                    .map_err(io_err(path))?
                    .ok_or_else(|| hostile(path, "symlink without a target"))?;
                if link.is_relative() && climbs_out(&link, parent_comps.len()) {
                    return Err(hostile(
                        path,
                        format!("symlink target {} climbs out of the image", link.display()),
                    ));
                }
                remove_existing(&target).map_err(io_err(path))?;
                std::os::unix::fs::symlink(&link, &target).map_err(io_err(path))?;
                self.own(&target, uid, gid, path)?;
                set_mtime(&target, mtime).map_err(io_err(path))?;
            }
            EntryType::Link => {
                let link = entry
                    .link_name()
                    .map_err(io_err(path))?
                    .ok_or_else(|| hostile(path, "hard link without a target"))?;
                let lcomps = normal_components(&link)
                    .map_err(|r| hostile(path, format!("hard link target: {r}")))?;
                let (lname, lparent) = lcomps.split_last().expect("never empty");
                let lparent: PathBuf = lparent.iter().collect();
                let (lp, _) = self.root.resolve_dir(&lparent, false).map_err(|_| {
                    hostile(
                        path,
                        format!("hard link to {} which is not in the image", link.display()),
                    )
                })?;
                let original = lp.join(lname);
                match std::fs::symlink_metadata(&original) {
                    Ok(m) if !m.is_dir() => {}
                    _ => {
                        return Err(hostile(
                            path,
                            format!(
                                "hard link to {} which is not a file in the image",
                                link.display()
                            ),
                        ))
                    }
                }
                if original == target {
                    return Ok(());
                }
                remove_existing(&target).map_err(io_err(path))?;
                std::fs::hard_link(&original, &target).map_err(io_err(path))?;
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                let fmt = match kind {
                    EntryType::Char => libc::S_IFCHR,
                    EntryType::Block => libc::S_IFBLK,
                    _ => libc::S_IFIFO,
                };
                let (major, minor) = if kind == EntryType::Fifo {
                    (0, 0)
                } else {
                    let major = header.device_major().map_err(io_err(path))?.unwrap_or(0);
                    let minor = header.device_minor().map_err(io_err(path))?.unwrap_or(0);
                    (major, minor)
                };
                remove_existing(&target).map_err(io_err(path))?;
                let c = cstr(&target).map_err(io_err(path))?;
                // SAFETY: `c` is NUL-terminated; mknod creates a node and never follows the
                // last component.
                let r =
                    unsafe { libc::mknod(c.as_ptr(), fmt | 0o600, libc::makedev(major, minor)) };
                if r != 0 {
                    return Err(io_err(path)(io::Error::last_os_error()));
                }
                self.own(&target, uid, gid, path)?;
                std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode))
                    .map_err(io_err(path))?;
                set_mtime(&target, mtime).map_err(io_err(path))?;
            }
            other => {
                return Err(hostile(
                    path,
                    format!("unsupported tar entry type {other:?}"),
                ))
            }
        }

        if let Some(exts) = entry.pax_extensions().map_err(io_err(path))? {
            for ext in exts {
                let ext = ext.map_err(io_err(path))?;
                if let Some(name) = ext.key_bytes().strip_prefix(b"SCHILY.xattr.") {
                    set_xattr(&target, name, ext.value_bytes()).map_err(io_err(path))?;
                }
            }
        }
        this_layer.insert(rel);
        Ok(())
    }

    fn own(&self, p: &Path, uid: u32, gid: u32, entry: &Path) -> Result<(), FlattenError> {
        if self.preserve_owner {
            std::os::unix::fs::lchown(p, Some(uid), Some(gid)).map_err(io_err(entry))?;
        }
        Ok(())
    }

    fn rel(&self, p: &Path) -> PathBuf {
        p.strip_prefix(self.root.path()).unwrap_or(p).to_owned()
    }

    /// Sets directory mtimes (last: adding children changes them) and returns the totals.
    pub fn finish(mut self) -> Result<Stats, FlattenError> {
        for (dir, mtime) in self.dir_times.drain(..).rev() {
            // A later layer may have removed it.
            if std::fs::symlink_metadata(&dir)
                .map(|m| m.is_dir())
                .unwrap_or(false)
            {
                set_mtime(&dir, mtime).map_err(io_err(&dir))?;
            }
        }
        Ok(self.stats)
    }
}
