//! Writes files straight into an ext4 image (made empty by `mkfs.ext4`) with libext2fs, the
//! library `mkfs.ext4 -d` itself writes with, so an image's layers go from the tar stream
//! into the filesystem without ever becoming a tree on the host: nothing a layer names can
//! touch a host path, and the filesystem is built while the layers still decompress.
//!
//! Paths resolve inside the image as [`crate::tree::inroot`] resolves them in a tree: the
//! image's own symlinks are followed with the image's root as `/`.

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void, CString, OsStr, OsString};
use std::io::{self, Read};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Component, Path};

use super::sys::{self, Errcode, Fs, Ino, Inode, Lib};
use crate::tree::{Meta, Node, Tree};

const S_IFMT: u16 = 0o170000;
const S_IFDIR: u16 = 0o040000;
const S_IFREG: u16 = 0o100000;
const S_IFLNK: u16 = 0o120000;
const S_IFCHR: u16 = 0o020000;
const S_IFBLK: u16 = 0o060000;
const S_IFIFO: u16 = 0o010000;

/// An ext4 image open for writing.
pub struct Writer {
    lib: &'static Lib,
    fs: Fs,
    /// Directories already looked up, by (parent, name); cleared when a directory goes.
    dirs: HashMap<(Ino, OsString), Ino>,
    block: usize,
    /// Reused for every file's data.
    buf: Vec<u8>,
    /// The image, to start its writeback early (see [`Writer::kick_writeback`]).
    image: std::fs::File,
    /// Bytes written since writeback was last started.
    unsynced: u64,
}

// SAFETY: the handle is only used through `&mut self`, by one thread at a time; libext2fs
// keeps no thread-affine state for it.
unsafe impl Send for Writer {}

/// A libext2fs error as an I/O error: system errors keep their errno, running out of
/// blocks or inodes is `StorageFull`, a missing name `NotFound`.
fn err(lib: &Lib, code: Errcode, what: &str) -> io::Error {
    if (1..4096).contains(&code) {
        let e = io::Error::from_raw_os_error(code as i32);
        return io::Error::new(e.kind(), format!("{what}: {e}"));
    }
    let kind = match code {
        sys::EXT2_ET_BLOCK_ALLOC_FAIL
        | sys::EXT2_ET_INODE_ALLOC_FAIL
        | sys::EXT2_ET_DIR_NO_SPACE => io::ErrorKind::StorageFull,
        sys::EXT2_ET_FILE_NOT_FOUND => io::ErrorKind::NotFound,
        sys::EXT2_ET_NO_DIRECTORY => io::ErrorKind::NotADirectory,
        sys::EXT2_ET_DIR_EXISTS => io::ErrorKind::AlreadyExists,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, format!("{what}: {}", lib.message(code)))
}

fn cname(name: &OsStr) -> io::Result<CString> {
    if name.is_empty() || name.len() > 255 || name.as_bytes().contains(&b'/') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a file name ext4 can hold"),
        ));
    }
    CString::new(name.as_bytes()).map_err(|_| io::ErrorKind::InvalidInput.into())
}

fn clamp_time(t: i64) -> u32 {
    t.clamp(0, u32::MAX as i64) as u32
}

fn file_type(mode: u16) -> c_int {
    match mode & S_IFMT {
        S_IFDIR => sys::EXT2_FT_DIR,
        S_IFLNK => sys::EXT2_FT_SYMLINK,
        S_IFCHR => sys::EXT2_FT_CHRDEV,
        S_IFBLK => sys::EXT2_FT_BLKDEV,
        S_IFIFO => sys::EXT2_FT_FIFO,
        _ => sys::EXT2_FT_REG_FILE,
    }
}

fn set_owner(inode: &mut Inode, uid: u32, gid: u32) {
    inode.i_uid = uid as u16;
    inode.l_i_uid_high = (uid >> 16) as u16;
    inode.i_gid = gid as u16;
    inode.l_i_gid_high = (gid >> 16) as u16;
}

fn set_times(inode: &mut Inode, mtime: i64) {
    let t = clamp_time(mtime);
    inode.i_atime = t;
    inode.i_mtime = t;
    inode.i_ctime = t;
}

impl Writer {
    /// Opens `image`, an ext4 filesystem, for writing.
    pub fn open(image: &Path) -> io::Result<Writer> {
        let lib = sys::lib().map_err(io::Error::other)?;
        let path = CString::new(image.as_os_str().as_bytes())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let mut fs: Fs = std::ptr::null_mut();
        // SAFETY: `path` is NUL-terminated; `fs` receives a handle that `Drop` frees.
        let r = unsafe {
            (lib.ext2fs_open)(
                path.as_ptr(),
                sys::EXT2_FLAG_RW | sys::EXT2_FLAG_64BITS,
                0,
                0,
                lib.unix_io_manager,
                &mut fs,
            )
        };
        if r != 0 {
            return Err(err(lib, r, &format!("cannot open {}", image.display())));
        }
        let w = Writer {
            lib,
            fs,
            dirs: HashMap::new(),
            block: 4096,
            buf: vec![0u8; 1 << 20],
            image: std::fs::OpenOptions::new().write(true).open(image)?,
            unsynced: 0,
        };
        // SAFETY: `fs` is the live handle just opened.
        let r = unsafe { (lib.ext2fs_read_bitmaps)(w.fs) };
        if r != 0 {
            return Err(err(lib, r, "cannot read the allocation bitmaps"));
        }
        Ok(w)
    }

    /// Writes everything out and closes the image.
    pub fn close(mut self) -> io::Result<()> {
        let mut fs = std::mem::replace(&mut self.fs, std::ptr::null_mut());
        // SAFETY: `fs` is live; close_free flushes and frees it and nulls our copy.
        let r = unsafe { (self.lib.ext2fs_close_free)(&mut fs) };
        if r != 0 {
            return Err(err(self.lib, r, "cannot write the filesystem out"));
        }
        Ok(())
    }

    fn check(&self, r: Errcode, what: impl FnOnce() -> String) -> io::Result<()> {
        if r == 0 {
            Ok(())
        } else {
            Err(err(self.lib, r, &what()))
        }
    }

    /// Runs `add` (an entry's addition to `dir`) and, when the directory's blocks are full,
    /// grows it by a block and runs it again; returns `add`'s last result.
    fn growing(&self, dir: Ino, add: impl Fn() -> Errcode) -> io::Result<Errcode> {
        let r = add();
        if r != sys::EXT2_ET_DIR_NO_SPACE {
            return Ok(r);
        }
        // SAFETY: `dir` is a directory inode of this filesystem.
        let e = unsafe { (self.lib.ext2fs_expand_dir)(self.fs, dir) };
        self.check(e, || "cannot grow a directory".into())?;
        Ok(add())
    }

    fn read_inode(&self, ino: Ino) -> io::Result<Inode> {
        let mut inode = Inode::default();
        // SAFETY: `inode` is a 128-byte ext2_inode, what read_inode fills.
        let r = unsafe { (self.lib.ext2fs_read_inode)(self.fs, ino, &mut inode) };
        self.check(r, || format!("cannot read inode {ino}"))?;
        Ok(inode)
    }

    fn write_inode(&self, ino: Ino, inode: &mut Inode) -> io::Result<()> {
        // SAFETY: as in read_inode.
        let r = unsafe { (self.lib.ext2fs_write_inode)(self.fs, ino, inode) };
        self.check(r, || format!("cannot write inode {ino}"))
    }

    /// The inode of `name` in `dir`, if any.
    fn lookup(&mut self, dir: Ino, name: &OsStr) -> io::Result<Option<Ino>> {
        if let Some(ino) = self.dirs.get(&(dir, name.to_os_string())) {
            return Ok(Some(*ino));
        }
        let mut ino: Ino = 0;
        // SAFETY: the name pointer/length describe a live slice; buf may be null.
        let r = unsafe {
            (self.lib.ext2fs_lookup)(
                self.fs,
                dir,
                name.as_bytes().as_ptr().cast(),
                name.len() as c_int,
                std::ptr::null_mut(),
                &mut ino,
            )
        };
        match r {
            0 => Ok(Some(ino)),
            sys::EXT2_ET_FILE_NOT_FOUND => Ok(None),
            r => Err(err(self.lib, r, &format!("cannot look up {name:?}"))),
        }
    }

    fn new_inode(&self, dir: Ino, mode: u16) -> io::Result<Ino> {
        let mut ino: Ino = 0;
        // SAFETY: a null bitmap means the filesystem's own.
        let r = unsafe {
            (self.lib.ext2fs_new_inode)(self.fs, dir, mode as c_int, std::ptr::null_mut(), &mut ino)
        };
        self.check(r, || "cannot allocate an inode".into())?;
        Ok(ino)
    }

    /// Links `ino` as `name` into `dir`, growing the directory when its blocks are full.
    fn link(&self, dir: Ino, name: &CString, ino: Ino, mode: u16) -> io::Result<()> {
        let r = self.growing(dir, || {
            // SAFETY: `name` is NUL-terminated.
            unsafe { (self.lib.ext2fs_link)(self.fs, dir, name.as_ptr(), ino, file_type(mode)) }
        })?;
        self.check(r, || format!("cannot link {name:?}"))
    }

    /// Allocates, links and writes a new non-directory inode (a regular file starts with an
    /// empty extent tree).
    fn create(&self, dir: Ino, name: &OsStr, mut inode: Inode) -> io::Result<Ino> {
        let c = cname(name)?;
        let ino = self.new_inode(dir, inode.i_mode)?;
        self.link(dir, &c, ino, inode.i_mode)?;
        // SAFETY: `ino` was just allocated from this filesystem.
        unsafe { (self.lib.ext2fs_inode_alloc_stats2)(self.fs, ino, 1, 0) };
        inode.i_links_count = 1;
        if inode.i_mode & S_IFMT == S_IFREG {
            // An empty extent tree in the inode, as mkfs.ext4 -d starts files.
            let mut handle: *mut c_void = std::ptr::null_mut();
            // SAFETY: `inode` has no blocks; extent_open2 writes an empty extent header into
            // it.
            let r =
                unsafe { (self.lib.ext2fs_extent_open2)(self.fs, ino, &mut inode, &mut handle) };
            self.check(r, || format!("cannot start the extents of {name:?}"))?;
            // SAFETY: `handle` was just opened.
            unsafe { (self.lib.ext2fs_extent_free)(handle) };
        }
        // SAFETY: a full 128-byte inode.
        let r = unsafe { (self.lib.ext2fs_write_new_inode)(self.fs, ino, &mut inode) };
        self.check(r, || format!("cannot write the inode of {name:?}"))?;
        Ok(ino)
    }

    /// Frees inode `ino` (whose last link is gone): its blocks, its attribute block, the
    /// inode itself.
    fn free(&self, ino: Ino, mut inode: Inode) -> io::Result<()> {
        let is_dir = inode.i_mode & S_IFMT == S_IFDIR;
        // SAFETY: `inode` is this inode's current contents.
        if unsafe { (self.lib.ext2fs_inode_has_valid_blocks2)(self.fs, &mut inode) } != 0 {
            // SAFETY: as above; a null block buffer lets libext2fs allocate its own.
            let r = unsafe {
                (self.lib.ext2fs_punch)(self.fs, ino, &mut inode, std::ptr::null_mut(), 0, !0)
            };
            self.check(r, || format!("cannot free the blocks of inode {ino}"))?;
        }
        let acl = inode.i_file_acl as u64 | ((inode.l_i_file_acl_high as u64) << 32);
        if acl != 0 {
            let mut count = 0u32;
            // SAFETY: `acl` is the inode's attribute block.
            let r = unsafe {
                (self.lib.ext2fs_adjust_ea_refcount3)(
                    self.fs,
                    acl,
                    std::ptr::null_mut(),
                    -1,
                    &mut count,
                    ino,
                )
            };
            self.check(r, || {
                format!("cannot release the attributes of inode {ino}")
            })?;
            if count == 0 {
                // SAFETY: the block is no longer referenced.
                unsafe { (self.lib.ext2fs_block_alloc_stats2)(self.fs, acl, -1) };
            }
            inode.i_file_acl = 0;
            inode.l_i_file_acl_high = 0;
        }
        inode.i_links_count = 0;
        inode.i_dtime = clamp_time(crate::model::now_us() as i64 / 1_000_000).max(1);
        self.write_inode(ino, &mut inode)?;
        // SAFETY: the inode is unlinked everywhere.
        unsafe { (self.lib.ext2fs_inode_alloc_stats2)(self.fs, ino, -1, is_dir as c_int) };
        Ok(())
    }

    fn list(&self, dir: Ino) -> io::Result<Vec<(OsString, Ino)>> {
        unsafe extern "C" fn each(
            _dir: Ino,
            _entry: c_int,
            d: *mut sys::DirEntry,
            _offset: c_int,
            _blocksize: c_int,
            _buf: *mut c_char,
            out: *mut c_void,
        ) -> c_int {
            // SAFETY: libext2fs passes a live entry (read field by field: the entry's name
            // is only as long as it says) and our Vec back.
            let (ino, len, out) = unsafe {
                (
                    (*d).inode,
                    ((*d).name_len & 0xff) as usize,
                    &mut *(out as *mut Vec<(OsString, Ino)>),
                )
            };
            // SAFETY: the entry's name holds `len` bytes.
            let name = unsafe {
                std::slice::from_raw_parts(std::ptr::addr_of!((*d).name).cast::<u8>(), len)
            };
            if ino != 0 && name != b"." && name != b".." {
                out.push((OsString::from_vec(name.to_vec()), ino));
            }
            0
        }
        let mut out: Vec<(OsString, Ino)> = Vec::new();
        // SAFETY: the callback only touches `out`, which outlives the call.
        let r = unsafe {
            (self.lib.ext2fs_dir_iterate2)(
                self.fs,
                dir,
                0,
                std::ptr::null_mut(),
                each,
                (&mut out as *mut Vec<(OsString, Ino)>).cast(),
            )
        };
        self.check(r, || format!("cannot list directory inode {dir}"))?;
        Ok(out)
    }

    /// Removes `name` (inode `ino`) from `dir`, recursively for a directory.
    fn remove_ino(&mut self, dir: Ino, name: &OsStr, ino: Ino) -> io::Result<()> {
        let mut inode = self.read_inode(ino)?;
        let is_dir = inode.i_mode & S_IFMT == S_IFDIR;
        if is_dir {
            for (child, cino) in self.list(ino)? {
                self.remove_ino(ino, &child, cino)?;
            }
            self.dirs.clear();
            inode = self.read_inode(ino)?;
        }
        let c = cname(name)?;
        // SAFETY: `c` is NUL-terminated.
        let r = unsafe { (self.lib.ext2fs_unlink)(self.fs, dir, c.as_ptr(), ino, 0) };
        self.check(r, || format!("cannot unlink {name:?}"))?;
        if is_dir {
            // Its `..` counted as a link of the parent.
            let mut parent = self.read_inode(dir)?;
            parent.i_links_count = parent.i_links_count.saturating_sub(1).max(2);
            self.write_inode(dir, &mut parent)?;
            return self.free(ino, inode);
        }
        inode.i_links_count = inode.i_links_count.saturating_sub(1);
        if inode.i_links_count == 0 {
            self.free(ino, inode)
        } else {
            self.write_inode(ino, &mut inode)
        }
    }

    /// Makes directory `name` in `dir` (root's, 0755).
    fn make_dir(&mut self, dir: Ino, name: &OsStr) -> io::Result<Ino> {
        let c = cname(name)?;
        let ino = self.new_inode(dir, S_IFDIR | 0o755)?;
        let r = self.growing(dir, || {
            // SAFETY: `c` is NUL-terminated; `ino` is free.
            unsafe { (self.lib.ext2fs_mkdir)(self.fs, dir, ino, c.as_ptr()) }
        })?;
        self.check(r, || format!("cannot make directory {name:?}"))?;
        let mut inode = self.read_inode(ino)?;
        inode.i_mode = S_IFDIR | 0o755;
        set_owner(&mut inode, 0, 0);
        self.write_inode(ino, &mut inode)?;
        self.dirs.insert((dir, name.to_os_string()), ino);
        Ok(ino)
    }

    /// The inode of `name` in `dir`, which the flattener just made or found there.
    fn existing(&mut self, dir: Ino, name: &OsStr) -> io::Result<Ino> {
        self.lookup(dir, name)?
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{name:?} is gone")))
    }

    fn update(&mut self, dir: Ino, name: &OsStr, f: impl FnOnce(&mut Inode)) -> io::Result<()> {
        let ino = self.existing(dir, name)?;
        let mut inode = self.read_inode(ino)?;
        f(&mut inode);
        self.write_inode(ino, &mut inode)
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if !self.fs.is_null() {
            // Not closed: an error path, whose image is thrown away unwritten.
            // SAFETY: `fs` is live and never used again.
            unsafe { (self.lib.ext2fs_free)(self.fs) };
        }
    }
}

impl Tree for Writer {
    type Dir = Ino;

    fn resolve_dir(&mut self, rel: &Path, create: bool) -> io::Result<(Ino, Vec<(Ino, OsString)>)> {
        let mut created = Vec::new();
        let mut cur = sys::EXT2_ROOT_INO;
        for c in rel.components() {
            let name = match c {
                Component::Normal(n) => n,
                Component::CurDir | Component::RootDir => continue,
                Component::ParentDir | Component::Prefix(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("{} is not a plain relative path", rel.display()),
                    ))
                }
            };
            let ino = match self.lookup(cur, name)? {
                Some(ino) => ino,
                None if create => {
                    let ino = self.make_dir(cur, name)?;
                    created.push((cur, name.to_os_string()));
                    cur = ino;
                    continue;
                }
                None => {
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("{} is not in the image", rel.display()),
                    ))
                }
            };
            let inode = self.read_inode(ino)?;
            let target = match inode.i_mode & S_IFMT {
                S_IFDIR => ino,
                S_IFLNK => {
                    let mut res: Ino = 0;
                    // SAFETY: follows `ino` inside this filesystem with its root as `/`.
                    let r = unsafe {
                        (self.lib.ext2fs_follow_link)(
                            self.fs,
                            sys::EXT2_ROOT_INO,
                            cur,
                            ino,
                            &mut res,
                        )
                    };
                    let dangling =
                        r == sys::EXT2_ET_FILE_NOT_FOUND || r == sys::EXT2_ET_NO_DIRECTORY;
                    let is_dir = r == 0 && self.read_inode(res)?.i_mode & S_IFMT == S_IFDIR;
                    if !is_dir {
                        if dangling && create {
                            return Err(io::Error::new(
                                io::ErrorKind::NotADirectory,
                                format!(
                                    "it writes through the symlink {}, whose target is not in the image",
                                    name.to_string_lossy()
                                ),
                            ));
                        }
                        if r == sys::EXT2_ET_SYMLINK_LOOP {
                            return Err(io::Error::from_raw_os_error(libc::ELOOP));
                        }
                        if dangling {
                            return Err(io::Error::from_raw_os_error(libc::ENOENT));
                        }
                        return Err(io::Error::from_raw_os_error(libc::ENOTDIR));
                    }
                    res
                }
                _ => return Err(io::Error::from_raw_os_error(libc::ENOTDIR)),
            };
            if target == ino {
                self.dirs.insert((cur, name.to_os_string()), ino);
            }
            cur = target;
        }
        Ok((cur, created))
    }

    fn children(&mut self, dir: &Ino) -> io::Result<Vec<OsString>> {
        Ok(self.list(*dir)?.into_iter().map(|(n, _)| n).collect())
    }

    fn probe(&mut self, dir: &Ino, name: &OsStr) -> io::Result<Option<bool>> {
        match self.lookup(*dir, name)? {
            None => Ok(None),
            Some(ino) => Ok(Some(self.read_inode(ino)?.i_mode & S_IFMT == S_IFDIR)),
        }
    }

    fn remove(&mut self, dir: &Ino, name: &OsStr) -> io::Result<()> {
        match self.lookup(*dir, name)? {
            None => Ok(()),
            Some(ino) => {
                self.dirs.remove(&(*dir, name.to_os_string()));
                self.remove_ino(*dir, name, ino)
            }
        }
    }

    fn mkdir(&mut self, dir: &Ino, name: &OsStr) -> io::Result<()> {
        self.make_dir(*dir, name).map(|_| ())
    }

    fn set_meta(&mut self, dir: &Ino, name: &OsStr, meta: Meta) -> io::Result<()> {
        self.update(*dir, name, |inode| {
            inode.i_mode = (inode.i_mode & S_IFMT) | (meta.mode & 0o7777) as u16;
            set_owner(inode, meta.uid, meta.gid);
            set_times(inode, meta.mtime);
        })
    }

    fn set_mtime(&mut self, dir: &Ino, name: &OsStr, mtime: i64) -> io::Result<()> {
        self.update(*dir, name, |inode| set_times(inode, mtime))
    }

    fn write_file(
        &mut self,
        dir: &Ino,
        name: &OsStr,
        meta: Meta,
        size: u64,
        data: &mut dyn Read,
    ) -> io::Result<u64> {
        let mut inode = Inode {
            i_mode: S_IFREG | (meta.mode & 0o7777) as u16,
            ..Inode::default()
        };
        set_owner(&mut inode, meta.uid, meta.gid);
        set_times(&mut inode, meta.mtime);
        // SAFETY: `inode` is a full inode; size_set only sets its size fields.
        let r = unsafe { (self.lib.ext2fs_inode_size_set)(self.fs, &mut inode, size) };
        self.check(r, || format!("cannot size {name:?}"))?;
        let ino = self.create(*dir, name, inode)?;
        if size == 0 {
            return Ok(0);
        }
        let mut file: sys::File = std::ptr::null_mut();
        // SAFETY: `ino` is a regular file of this filesystem.
        let r =
            unsafe { (self.lib.ext2fs_file_open)(self.fs, ino, sys::EXT2_FILE_WRITE, &mut file) };
        self.check(r, || format!("cannot open {name:?}"))?;
        let mut buf = std::mem::take(&mut self.buf);
        let result = self.copy_into(file, size, data, &mut buf);
        self.buf = buf;
        // SAFETY: `file` is open; closing flushes its last block.
        let r = unsafe { (self.lib.ext2fs_file_close)(file) };
        let n = result?;
        self.check(r, || format!("cannot write {name:?}"))?;
        self.unsynced += n;
        if self.unsynced >= WRITEBACK_EVERY {
            self.kick_writeback();
        }
        if n != size {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{name:?} ended after {n} of {size} bytes"),
            ));
        }
        Ok(n)
    }

    fn symlink(&mut self, dir: &Ino, name: &OsStr, target: &Path, meta: Meta) -> io::Result<()> {
        let c = cname(name)?;
        let t = CString::new(target.as_os_str().as_bytes())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        if t.as_bytes().is_empty() || t.as_bytes().len() >= self.block {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("symlink target of {} bytes", t.as_bytes().len()),
            ));
        }
        let ino = self.new_inode(*dir, S_IFLNK | 0o777)?;
        let r = self.growing(*dir, || {
            // SAFETY: both strings are NUL-terminated; `ino` is free.
            unsafe { (self.lib.ext2fs_symlink)(self.fs, *dir, ino, c.as_ptr(), t.as_ptr()) }
        })?;
        self.check(r, || format!("cannot make symlink {name:?}"))?;
        let mut inode = self.read_inode(ino)?;
        set_owner(&mut inode, meta.uid, meta.gid);
        set_times(&mut inode, meta.mtime);
        self.write_inode(ino, &mut inode)
    }

    fn hard_link(&mut self, dir: &Ino, name: &OsStr, from: (&Ino, &OsStr)) -> io::Result<()> {
        let ino = self.existing(*from.0, from.1)?;
        let mut inode = self.read_inode(ino)?;
        if inode.i_links_count == u16::MAX {
            return Err(io::Error::from_raw_os_error(libc::EMLINK));
        }
        let c = cname(name)?;
        self.link(*dir, &c, ino, inode.i_mode)?;
        inode.i_links_count += 1;
        self.write_inode(ino, &mut inode)
    }

    fn mknod(&mut self, dir: &Ino, name: &OsStr, node: Node, meta: Meta) -> io::Result<()> {
        let (fmt, major, minor) = match node {
            Node::Char(a, b) => (S_IFCHR, a, b),
            Node::Block(a, b) => (S_IFBLK, a, b),
            Node::Fifo => (S_IFIFO, 0, 0),
        };
        let mut inode = Inode {
            i_mode: fmt | (meta.mode & 0o7777) as u16,
            ..Inode::default()
        };
        set_owner(&mut inode, meta.uid, meta.gid);
        set_times(&mut inode, meta.mtime);
        // The device number, in the old encoding when it fits, else the new one (as the
        // kernel and mkfs.ext4 -d store it).
        if major < 256 && minor < 256 {
            inode.i_block[0] = major * 256 + minor;
        } else {
            inode.i_block[1] = (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12);
        }
        self.create(*dir, name, inode).map(|_| ())
    }

    fn set_xattr(&mut self, dir: &Ino, name: &OsStr, key: &[u8], value: &[u8]) -> io::Result<()> {
        let ino = self.existing(*dir, name)?;
        let k = CString::new(key).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let mut h: *mut c_void = std::ptr::null_mut();
        // SAFETY: `ino` is an inode of this filesystem; `h` is closed below.
        let r = unsafe { (self.lib.ext2fs_xattrs_open)(self.fs, ino, &mut h) };
        self.check(r, || format!("cannot open the attributes of {name:?}"))?;
        // SAFETY: `h` is open; the key is NUL-terminated and value/len a live slice.
        let mut r = unsafe { (self.lib.ext2fs_xattrs_read)(h) };
        if r == 0 {
            // SAFETY: as above.
            r = unsafe {
                (self.lib.ext2fs_xattr_set)(h, k.as_ptr(), value.as_ptr().cast(), value.len())
            };
        }
        // SAFETY: `h` is open; close writes and frees it.
        let c = unsafe { (self.lib.ext2fs_xattrs_close)(&mut h) };
        self.check(r, || format!("cannot set attribute {k:?} of {name:?}"))?;
        self.check(c, || format!("cannot write the attributes of {name:?}"))
    }
}

/// Bytes of file data after which the image's writeback is started.
const WRITEBACK_EVERY: u64 = 32 << 20;

impl Writer {
    /// Starts writing the image's dirty pages to disk without waiting for them, so the
    /// `fsync` that closing ends with finds most of them written already, and the disk works
    /// while the layers still decompress.
    fn kick_writeback(&mut self) {
        use std::os::fd::AsRawFd;
        self.unsynced = 0;
        // SAFETY: a plain syscall on a descriptor we own; it only starts writeback. Failure
        // costs nothing but the head start.
        unsafe { libc::sync_file_range(self.image.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
    }

    /// Copies `data` into the open `file`, leaving all-zero blocks as holes.
    fn copy_into(
        &self,
        file: sys::File,
        size: u64,
        data: &mut dyn Read,
        buf: &mut [u8],
    ) -> io::Result<u64> {
        let mut done = 0u64;
        let mut hole = false;
        loop {
            crate::cancel::check_canceled()?;
            let want = buf.len().min((size - done) as usize);
            if want == 0 {
                // Nothing more is expected; anything more would be a lie about the size.
                break;
            }
            let n = match data.read(&mut buf[..want]) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            let mut at = 0;
            while at < n {
                let end = n.min(at + self.block - (done as usize + at) % self.block);
                let piece = &buf[at..end];
                if piece.iter().all(|b| *b == 0) && end - at == self.block {
                    // A whole zero block: skip it (a hole reads as zeros).
                    let mut pos = 0u64;
                    // SAFETY: `file` is open.
                    let r = unsafe {
                        (self.lib.ext2fs_file_llseek)(file, done + end as u64, 0, &mut pos)
                    };
                    self.check(r, || "cannot seek".into())?;
                    hole = true;
                } else {
                    if hole {
                        let mut pos = 0u64;
                        // SAFETY: `file` is open.
                        let r = unsafe {
                            (self.lib.ext2fs_file_llseek)(file, done + at as u64, 0, &mut pos)
                        };
                        self.check(r, || "cannot seek".into())?;
                        hole = false;
                    }
                    let mut written: u32 = 0;
                    // SAFETY: `piece` is a live slice; `file` is open for writing.
                    let r = unsafe {
                        (self.lib.ext2fs_file_write)(
                            file,
                            piece.as_ptr().cast(),
                            piece.len() as u32,
                            &mut written,
                        )
                    };
                    self.check(r, || "cannot write file data".into())?;
                    if written as usize != piece.len() {
                        return Err(io::Error::new(io::ErrorKind::WriteZero, "short write"));
                    }
                }
                at = end;
            }
            done += n as u64;
        }
        Ok(done)
    }
}

/// A regular file (or a slow symlink) of the image, read through libext2fs.
struct FileReader<'a> {
    lib: &'static Lib,
    file: sys::File,
    _image: std::marker::PhantomData<&'a Writer>,
}

impl<'a> FileReader<'a> {
    fn open(w: &'a Writer, ino: Ino) -> io::Result<Self> {
        let mut file: sys::File = std::ptr::null_mut();
        // SAFETY: `ino` is an inode of this filesystem; flags 0 open it read-only.
        let r = unsafe { (w.lib.ext2fs_file_open)(w.fs, ino, 0, &mut file) };
        w.check(r, || format!("cannot open inode {ino}"))?;
        Ok(FileReader {
            lib: w.lib,
            file,
            _image: std::marker::PhantomData,
        })
    }
}

impl Read for FileReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut got: u32 = 0;
        let want = buf.len().min(1 << 20) as u32;
        // SAFETY: `buf` is live for `want` bytes; the file is open.
        let r = unsafe {
            (self.lib.ext2fs_file_read)(self.file, buf.as_mut_ptr().cast(), want, &mut got)
        };
        if r != 0 {
            return Err(err(self.lib, r, "cannot read file data"));
        }
        Ok(got as usize)
    }
}

impl Drop for FileReader<'_> {
    fn drop(&mut self) {
        // SAFETY: the file is open and closed once; nothing was written through it.
        unsafe { (self.lib.ext2fs_file_close)(self.file) };
    }
}

fn owner_of(inode: &Inode) -> (u32, u32) {
    (
        inode.i_uid as u32 | (inode.l_i_uid_high as u32) << 16,
        inode.i_gid as u32 | (inode.l_i_gid_high as u32) << 16,
    )
}

fn meta_of(inode: &Inode) -> Meta {
    let (uid, gid) = owner_of(inode);
    Meta {
        mode: (inode.i_mode & 0o7777) as u32,
        uid,
        gid,
        mtime: inode.i_mtime as i64,
    }
}

fn size_of(inode: &Inode) -> u64 {
    inode.i_size as u64 | (inode.i_size_high as u64) << 32
}

/// How deep [`Writer::copy_dir_to`] descends.
const MAX_COPY_DEPTH: u32 = 256;

impl Writer {
    /// What directory `rel` holds (resolved inside the image as the flattener resolves it),
    /// as [`crate::ext4::usage`] measures a tree; `None` when there is no such directory.
    pub fn usage_of(&mut self, rel: &Path) -> io::Result<Option<crate::ext4::Usage>> {
        let Some(dir) = self.dir_if_any(rel)? else {
            return Ok(None);
        };
        let mut u = crate::ext4::Usage::default();
        let mut stack = vec![(dir, 0u32)];
        while let Some((d, depth)) = stack.pop() {
            for (_, ino) in self.list(d)? {
                let inode = self.read_inode(ino)?;
                u.entries += 1;
                u.bytes += size_of(&inode).div_ceil(4096) * 4096;
                if inode.i_mode & S_IFMT == S_IFDIR && depth < MAX_COPY_DEPTH {
                    stack.push((ino, depth + 1));
                }
            }
        }
        Ok(Some(u))
    }

    fn dir_if_any(&mut self, rel: &Path) -> io::Result<Option<Ino>> {
        match self.resolve_dir(rel, false) {
            Ok((d, _)) => Ok(Some(d)),
            Err(e)
                if e.kind() == io::ErrorKind::NotFound
                    || e.kind() == io::ErrorKind::NotADirectory
                    || matches!(
                        e.raw_os_error(),
                        Some(libc::ENOENT | libc::ENOTDIR | libc::ELOOP)
                    ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Copies directory `rel` of this image (resolved inside it) into `dest` as its root
    /// directory, keeping owners, modes, mtimes, symlinks, hard links among the copied files,
    /// device nodes and FIFOs (not extended attributes); false when there is no such
    /// directory. The work seed is made so from an image's `/root` without the tree ever
    /// reaching the host (and so without privileges: owners are written, never applied).
    pub fn copy_dir_to(&mut self, rel: &Path, dest: &mut Writer) -> io::Result<bool> {
        let Some(src) = self.dir_if_any(rel)? else {
            return Ok(false);
        };
        let top = self.read_inode(src)?;
        let mut root = dest.read_inode(sys::EXT2_ROOT_INO)?;
        let meta = meta_of(&top);
        root.i_mode = S_IFDIR | meta.mode as u16;
        set_owner(&mut root, meta.uid, meta.gid);
        set_times(&mut root, meta.mtime);
        dest.write_inode(sys::EXT2_ROOT_INO, &mut root)?;
        let mut links = HashMap::new();
        self.copy_children(src, dest, sys::EXT2_ROOT_INO, &mut links, 0)?;
        Ok(true)
    }

    fn copy_children(
        &mut self,
        src: Ino,
        dest: &mut Writer,
        to: Ino,
        links: &mut HashMap<Ino, (Ino, OsString)>,
        depth: u32,
    ) -> io::Result<()> {
        if depth > MAX_COPY_DEPTH {
            return Err(io::Error::other(
                "the directory is nested too deeply to copy",
            ));
        }
        for (name, ino) in self.list(src)? {
            if depth == 0 && name == "lost+found" && dest.lookup(to, &name)?.is_some() {
                continue;
            }
            let inode = self.read_inode(ino)?;
            let meta = meta_of(&inode);
            match inode.i_mode & S_IFMT {
                S_IFDIR => {
                    let d = dest.make_dir(to, &name)?;
                    self.copy_children(ino, dest, d, links, depth + 1)?;
                    dest.set_meta(&to, &name, meta)?;
                }
                S_IFREG => {
                    if inode.i_links_count > 1 {
                        if let Some((d, n)) = links.get(&ino) {
                            dest.hard_link(&to, &name, (d, n.as_os_str()))?;
                            continue;
                        }
                        links.insert(ino, (to, name.clone()));
                    }
                    let size = size_of(&inode);
                    let mut data = FileReader::open(self, ino)?;
                    dest.write_file(&to, &name, meta, size, &mut data)?;
                }
                S_IFLNK => {
                    let target = self.link_target(ino, &inode)?;
                    dest.symlink(&to, &name, Path::new(OsStr::from_bytes(&target)), meta)?;
                }
                S_IFCHR | S_IFBLK => {
                    let (b0, b1) = (inode.i_block[0], inode.i_block[1]);
                    let (major, minor) = if b0 != 0 {
                        ((b0 >> 8) & 0xff, b0 & 0xff)
                    } else {
                        ((b1 >> 8) & 0xfff, (b1 & 0xff) | ((b1 >> 12) & 0xfff00))
                    };
                    let node = if inode.i_mode & S_IFMT == S_IFCHR {
                        Node::Char(major, minor)
                    } else {
                        Node::Block(major, minor)
                    };
                    dest.mknod(&to, &name, node, meta)?;
                }
                S_IFIFO => dest.mknod(&to, &name, Node::Fifo, meta)?,
                // Sockets mean nothing in a seed.
                _ => {}
            }
        }
        Ok(())
    }

    /// A symlink's target: in the inode (a fast link) or in its block.
    fn link_target(&self, ino: Ino, inode: &Inode) -> io::Result<Vec<u8>> {
        let size = size_of(inode) as usize;
        if size == 0 || size >= self.block || inode.i_flags & sys::EXT4_INLINE_DATA_FL != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("symlink inode {ino} is not one banger copies"),
            ));
        }
        let mut copy = *inode;
        // SAFETY: `copy` is this inode's contents; the call only reads it.
        if unsafe { (self.lib.ext2fs_inode_has_valid_blocks2)(self.fs, &mut copy) } == 0 {
            let bytes: Vec<u8> = inode.i_block.iter().flat_map(|w| w.to_le_bytes()).collect();
            return bytes
                .get(..size)
                .map(|b| b.to_vec())
                .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidData));
        }
        let mut target = Vec::with_capacity(size);
        FileReader::open(self, ino)?
            .take(size as u64)
            .read_to_end(&mut target)?;
        if target.len() != size {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
        }
        Ok(target)
    }
}
