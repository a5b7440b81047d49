//! Flattens OCI layers, in manifest order, into one directory tree: OCI whiteouts
//! (`.wh.NAME`, opaque `.wh..wh..opq`), ownership, mode bits (setuid, setgid, sticky),
//! symlinks, hard links, device nodes, FIFOs, xattrs and mtimes. Every path is resolved
//! inside the tree (see `inroot`), so no entry, link or whiteout can touch anything outside
//! it; entries that try are rejected with a clear error, and the caller throws the partial
//! tree away. The expanded size and entry count are capped against decompression bombs.

use std::collections::HashSet;
use std::ffi::OsString;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use tar::EntryType;

use crate::tree::inroot::normal_components;
use crate::tree::{Meta, Node, Tree};

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
pub struct Flattener<T: Tree> {
    tree: T,
    limits: Limits,
    stream_bytes: u64,
    stats: Stats,
    dir_times: Vec<(T::Dir, OsString, i64)>,
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

impl<T: Tree> Flattener<T> {
    /// A flattener writing into `tree`.
    pub fn new(tree: T, limits: Limits) -> Self {
        Flattener {
            tree,
            limits,
            stream_bytes: 0,
            stats: Stats::default(),
            dir_times: Vec::new(),
        }
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
        let mut this_layer: HashSet<(T::Dir, OsString)> = HashSet::new();
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
        this_layer: &mut HashSet<(T::Dir, OsString)>,
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
        let name = name.to_os_string();
        let parent_rel: PathBuf = parent_comps.iter().collect();
        let name_bytes = name.as_bytes();

        // Whiteouts remove from lower layers and are not files themselves.
        if name_bytes.starts_with(b".wh.") {
            let parent = match self.tree.resolve_dir(&parent_rel, false) {
                Ok((p, _)) => p,
                Err(e)
                    if e.raw_os_error() == Some(libc::ENOENT)
                        || e.kind() == io::ErrorKind::NotFound =>
                {
                    return Ok(())
                }
                Err(e) => return Err(io_err(path)(e)),
            };
            if name_bytes == b".wh..wh..opq" {
                for child in self.tree.children(&parent).map_err(io_err(path))? {
                    if !this_layer.contains(&(parent.clone(), child.clone())) {
                        self.tree.remove(&parent, &child).map_err(io_err(path))?;
                    }
                }
            } else {
                let victim = std::ffi::OsStr::from_bytes(&name_bytes[4..]);
                if victim.is_empty() || victim == "." || victim == ".." {
                    return Err(hostile(path, "whiteout names no file"));
                }
                self.tree.remove(&parent, victim).map_err(io_err(path))?;
            }
            return Ok(());
        }

        let (parent, created) = self.tree.resolve_dir(&parent_rel, true).map_err(|e| {
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
        let header = entry.header();
        let meta = Meta {
            mode: header.mode().map_err(io_err(path))? & 0o7777,
            uid: header.uid().map_err(io_err(path))? as u32,
            gid: header.gid().map_err(io_err(path))? as u32,
            mtime: header.mtime().map_err(io_err(path))? as i64,
        };
        let tree = &mut self.tree;

        match kind {
            EntryType::Directory => {
                match tree.probe(&parent, &name).map_err(io_err(path))? {
                    Some(true) => {}
                    Some(false) => {
                        tree.remove(&parent, &name).map_err(io_err(path))?;
                        tree.mkdir(&parent, &name).map_err(io_err(path))?;
                    }
                    None => tree.mkdir(&parent, &name).map_err(io_err(path))?,
                }
                tree.set_meta(&parent, &name, meta).map_err(io_err(path))?;
                self.dir_times
                    .push((parent.clone(), name.clone(), meta.mtime));
            }
            EntryType::Regular | EntryType::Continuous => {
                tree.remove(&parent, &name).map_err(io_err(path))?;
                let size = entry.size();
                let n = match tree.write_file(&parent, &name, meta, size, entry) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::FileTooLarge => {
                        return Err(FlattenError::TooLarge {
                            what: "bytes",
                            limit: self.limits.max_bytes,
                        })
                    }
                    Err(e) => return Err(io_err(path)(e)),
                };
                self.stats.file_bytes += n;
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
                tree.remove(&parent, &name).map_err(io_err(path))?;
                tree.symlink(&parent, &name, &link, meta)
                    .map_err(io_err(path))?;
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
                let (lp, _) = tree.resolve_dir(&lparent, false).map_err(|_| {
                    hostile(
                        path,
                        format!("hard link to {} which is not in the image", link.display()),
                    )
                })?;
                if tree.probe(&lp, lname).map_err(io_err(path))? != Some(false) {
                    return Err(hostile(
                        path,
                        format!(
                            "hard link to {} which is not a file in the image",
                            link.display()
                        ),
                    ));
                }
                if lp == parent && *lname == name {
                    return Ok(());
                }
                tree.remove(&parent, &name).map_err(io_err(path))?;
                tree.hard_link(&parent, &name, (&lp, lname))
                    .map_err(io_err(path))?;
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                let dev = |h: &tar::Header| -> io::Result<(u32, u32)> {
                    Ok((
                        h.device_major()?.unwrap_or(0),
                        h.device_minor()?.unwrap_or(0),
                    ))
                };
                let node = match kind {
                    EntryType::Char => {
                        let (a, b) = dev(header).map_err(io_err(path))?;
                        Node::Char(a, b)
                    }
                    EntryType::Block => {
                        let (a, b) = dev(header).map_err(io_err(path))?;
                        Node::Block(a, b)
                    }
                    _ => Node::Fifo,
                };
                tree.remove(&parent, &name).map_err(io_err(path))?;
                tree.mknod(&parent, &name, node, meta)
                    .map_err(io_err(path))?;
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
                if let Some(key) = ext.key_bytes().strip_prefix(b"SCHILY.xattr.") {
                    self.tree
                        .set_xattr(&parent, &name, key, ext.value_bytes())
                        .map_err(io_err(path))?;
                }
            }
        }
        this_layer.insert((parent, name));
        Ok(())
    }

    /// Sets directory mtimes (last: adding children changes them) and returns the totals
    /// and the tree.
    pub fn finish(mut self) -> Result<(Stats, T), FlattenError> {
        for (dir, name, mtime) in self.dir_times.drain(..).rev() {
            // A later layer may have removed it.
            if let Ok(Some(true)) = self.tree.probe(&dir, &name) {
                self.tree
                    .set_mtime(&dir, &name, mtime)
                    .map_err(io_err(Path::new(&name)))?;
            }
        }
        Ok((self.stats, self.tree))
    }
}
