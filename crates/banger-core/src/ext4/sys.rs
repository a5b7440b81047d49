//! The few libext2fs entry points [`super::writer`] uses, loaded with `dlopen` from the
//! `libext2fs.so.2` that e2fsprogs (which banger needs anyway for `mkfs.ext4`) installs, so
//! building banger needs no development headers and nothing links the guest's static
//! binaries against it. Declarations follow e2fsprogs 1.47's `ext2fs.h`.

use std::ffi::{c_char, c_int, c_long, c_uint, c_void, CStr};
use std::sync::OnceLock;

/// `errcode_t`.
pub type Errcode = c_long;
/// `ext2_filsys`, opaque.
pub type Fs = *mut c_void;
/// `ext2_file_t`, opaque.
pub type File = *mut c_void;
/// `ext2_ino_t`.
pub type Ino = u32;

/// `struct ext2_inode`: the 128-byte on-disk inode every ext2 revision has.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Inode {
    pub i_mode: u16,
    pub i_uid: u16,
    pub i_size: u32,
    pub i_atime: u32,
    pub i_ctime: u32,
    pub i_mtime: u32,
    pub i_dtime: u32,
    pub i_gid: u16,
    pub i_links_count: u16,
    pub i_blocks: u32,
    pub i_flags: u32,
    pub osd1: u32,
    pub i_block: [u32; 15],
    pub i_generation: u32,
    pub i_file_acl: u32,
    pub i_size_high: u32,
    pub i_faddr: u32,
    pub l_i_blocks_hi: u16,
    pub l_i_file_acl_high: u16,
    pub l_i_uid_high: u16,
    pub l_i_gid_high: u16,
    pub l_i_checksum_lo: u16,
    pub l_i_reserved: u16,
}

const _: () = assert!(std::mem::size_of::<Inode>() == 128);

/// `struct ext2_dir_entry` (its fixed head; the name follows).
#[repr(C)]
pub struct DirEntry {
    pub inode: u32,
    pub rec_len: u16,
    /// Low byte: the name's length; high byte: the file type.
    pub name_len: u16,
    pub name: [c_char; 255],
}

pub const EXT2_FLAG_RW: c_int = 0x01;
pub const EXT2_FLAG_64BITS: c_int = 0x20000;
pub const EXT2_FILE_WRITE: c_int = 0x0001;
/// `EXT4_INLINE_DATA_FL`: the inode's data sits in the inode itself.
pub const EXT4_INLINE_DATA_FL: u32 = 0x1000_0000;
pub const EXT2_ROOT_INO: Ino = 2;

pub const EXT2_FT_REG_FILE: c_int = 1;
pub const EXT2_FT_DIR: c_int = 2;
pub const EXT2_FT_CHRDEV: c_int = 3;
pub const EXT2_FT_BLKDEV: c_int = 4;
pub const EXT2_FT_FIFO: c_int = 5;
pub const EXT2_FT_SYMLINK: c_int = 7;

const ET_BASE: Errcode = 2_133_571_328;
pub const EXT2_ET_DIR_NO_SPACE: Errcode = ET_BASE + 38;
pub const EXT2_ET_SYMLINK_LOOP: Errcode = ET_BASE + 64;
pub const EXT2_ET_BLOCK_ALLOC_FAIL: Errcode = ET_BASE + 72;
pub const EXT2_ET_INODE_ALLOC_FAIL: Errcode = ET_BASE + 73;
pub const EXT2_ET_NO_DIRECTORY: Errcode = ET_BASE + 74;
pub const EXT2_ET_FILE_NOT_FOUND: Errcode = ET_BASE + 76;
pub const EXT2_ET_DIR_EXISTS: Errcode = ET_BASE + 79;

/// `int (*)(ext2_ino_t dir, int entry, struct ext2_dir_entry *, int offset, int blocksize,
/// char *buf, void *priv)`.
pub type DirIterFn = unsafe extern "C" fn(
    Ino,
    c_int,
    *mut DirEntry,
    c_int,
    c_int,
    *mut c_char,
    *mut c_void,
) -> c_int;

macro_rules! library {
    ($($name:ident : fn($($arg:ty),*) $(-> $ret:ty)?;)*) => {
        /// libext2fs's functions, resolved once.
        #[allow(missing_docs)]
        pub struct Lib {
            /// `unix_io_manager`, the `io_manager` for files and block devices.
            pub unix_io_manager: *mut c_void,
            error_message: unsafe extern "C" fn(Errcode) -> *const c_char,
            $(pub $name: unsafe extern "C" fn($($arg),*) $(-> $ret)?,)*
        }

        impl Lib {
            fn load() -> Result<Lib, String> {
                let ext2fs = open(c"libext2fs.so.2")?;
                let com_err = open(c"libcom_err.so.2")?;
                // SAFETY: each symbol is looked up by its C name and given the type its
                // header declares.
                unsafe {
                    let io = sym(ext2fs, c"unix_io_manager")? as *const *mut c_void;
                    Ok(Lib {
                        unix_io_manager: *io,
                        error_message: std::mem::transmute::<
                            *mut c_void,
                            unsafe extern "C" fn(Errcode) -> *const c_char,
                        >(sym(com_err, c"error_message")?),
                        $($name: std::mem::transmute::<
                            *mut c_void,
                            unsafe extern "C" fn($($arg),*) $(-> $ret)?,
                        >(sym(
                            ext2fs,
                            &std::ffi::CString::new(stringify!($name)).expect("no NUL"),
                        )?),)*
                    })
                }
            }
        }
    };
}

library! {
    ext2fs_open: fn(*const c_char, c_int, c_int, c_uint, *mut c_void, *mut Fs) -> Errcode;
    ext2fs_read_bitmaps: fn(Fs) -> Errcode;
    ext2fs_close_free: fn(*mut Fs) -> Errcode;
    ext2fs_free: fn(Fs);
    ext2fs_lookup: fn(Fs, Ino, *const c_char, c_int, *mut c_char, *mut Ino) -> Errcode;
    ext2fs_follow_link: fn(Fs, Ino, Ino, Ino, *mut Ino) -> Errcode;
    ext2fs_new_inode: fn(Fs, Ino, c_int, *mut c_void, *mut Ino) -> Errcode;
    ext2fs_inode_alloc_stats2: fn(Fs, Ino, c_int, c_int);
    ext2fs_block_alloc_stats2: fn(Fs, u64, c_int);
    ext2fs_read_inode: fn(Fs, Ino, *mut Inode) -> Errcode;
    ext2fs_write_inode: fn(Fs, Ino, *mut Inode) -> Errcode;
    ext2fs_write_new_inode: fn(Fs, Ino, *mut Inode) -> Errcode;
    ext2fs_inode_size_set: fn(Fs, *mut Inode, u64) -> Errcode;
    ext2fs_link: fn(Fs, Ino, *const c_char, Ino, c_int) -> Errcode;
    ext2fs_unlink: fn(Fs, Ino, *const c_char, Ino, c_int) -> Errcode;
    ext2fs_expand_dir: fn(Fs, Ino) -> Errcode;
    ext2fs_mkdir: fn(Fs, Ino, Ino, *const c_char) -> Errcode;
    ext2fs_symlink: fn(Fs, Ino, Ino, *const c_char, *const c_char) -> Errcode;
    ext2fs_extent_open2: fn(Fs, Ino, *mut Inode, *mut *mut c_void) -> Errcode;
    ext2fs_extent_free: fn(*mut c_void);
    ext2fs_file_open: fn(Fs, Ino, c_int, *mut File) -> Errcode;
    ext2fs_file_write: fn(File, *const c_void, c_uint, *mut c_uint) -> Errcode;
    ext2fs_file_read: fn(File, *mut c_void, c_uint, *mut c_uint) -> Errcode;
    ext2fs_file_llseek: fn(File, u64, c_int, *mut u64) -> Errcode;
    ext2fs_file_close: fn(File) -> Errcode;
    ext2fs_punch: fn(Fs, Ino, *mut Inode, *mut c_char, u64, u64) -> Errcode;
    ext2fs_inode_has_valid_blocks2: fn(Fs, *mut Inode) -> c_int;
    ext2fs_adjust_ea_refcount3: fn(Fs, u64, *mut c_char, c_int, *mut u32, Ino) -> Errcode;
    ext2fs_dir_iterate2: fn(Fs, Ino, c_int, *mut c_char, DirIterFn, *mut c_void) -> Errcode;
    ext2fs_xattrs_open: fn(Fs, Ino, *mut *mut c_void) -> Errcode;
    ext2fs_xattrs_read: fn(*mut c_void) -> Errcode;
    ext2fs_xattr_set: fn(*mut c_void, *const c_char, *const c_void, usize) -> Errcode;
    ext2fs_xattrs_close: fn(*mut *mut c_void) -> Errcode;
}

// SAFETY: the library's function pointers and the io_manager it exports are immutable
// after loading; each filesystem handle is used by one thread at a time (see the writer).
unsafe impl Send for Lib {}
// SAFETY: as above.
unsafe impl Sync for Lib {}

fn open(name: &CStr) -> Result<*mut c_void, String> {
    // SAFETY: `name` is NUL-terminated; the handle is never closed (the library stays
    // loaded for the life of the process).
    let h = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if h.is_null() {
        return Err(format!(
            "cannot load {} (from e2fsprogs; apt-get install e2fsprogs): {}",
            name.to_string_lossy(),
            dlerror()
        ));
    }
    Ok(h)
}

fn dlerror() -> String {
    // SAFETY: dlerror returns a NUL-terminated string or null.
    let e = unsafe { libc::dlerror() };
    if e.is_null() {
        return "unknown error".into();
    }
    // SAFETY: checked non-null above; copied before any other dl call.
    unsafe { CStr::from_ptr(e) }.to_string_lossy().into_owned()
}

/// # Safety
/// `h` is a handle from `dlopen`.
unsafe fn sym(h: *mut c_void, name: &CStr) -> Result<*mut c_void, String> {
    // SAFETY: `h` is live per the contract; `name` is NUL-terminated.
    let p = unsafe { libc::dlsym(h, name.as_ptr()) };
    if p.is_null() {
        return Err(format!(
            "libext2fs has no {} (e2fsprogs 1.46 or later is needed)",
            name.to_string_lossy()
        ));
    }
    Ok(p)
}

/// The loaded library, or why it cannot be loaded.
pub fn lib() -> Result<&'static Lib, &'static str> {
    static LIB: OnceLock<Result<Lib, String>> = OnceLock::new();
    LIB.get_or_init(Lib::load).as_ref().map_err(|e| e.as_str())
}

impl Lib {
    /// The com_err text of `code`.
    pub fn message(&self, code: Errcode) -> String {
        // SAFETY: error_message returns a pointer to a static or thread-local string.
        let p = unsafe { (self.error_message)(code) };
        if p.is_null() {
            return format!("ext2fs error {code}");
        }
        // SAFETY: non-null, NUL-terminated.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}
