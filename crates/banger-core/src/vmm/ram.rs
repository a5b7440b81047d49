//! Guest memory a VM starts with from a snapshot: the snapshot's plain RAM file (see
//! `ramsplit`) copied once into a memfd that is then sealed against every write, and mapped
//! by each VM restored from it copy-on-write (QEMU `memory-backend-file,share=off` over
//! `/proc/self/fd/4`). The VMs share every page none of them wrote; a page one writes becomes
//! its own. The seal is what makes the sharing safe between VMs that do not trust each other:
//! no process, the VMM of any of them included, can change the pages the others read (writes,
//! shared writable mappings, hole punching and resizing all fail), so a VMM that escapes its
//! guest still cannot reach into another VM.
//!
//! The copy is made from one read of the file that also checks its digest against the
//! snapshot's row (SHA-256 of its 2 MiB pieces, the pieces that are holes not read; see
//! [`hashed_copy`]): what the VMs map is exactly what was hashed, whatever happens to the
//! file later. A save makes that copy itself, from the read that computes the row's sha256
//! ([`hashed_copy`]), so the first restore of a snapshot just taken (a fork's) maps it at
//! once. A VM with shared folders gets a copy of its own instead (unsealed, mapped shared:
//! its virtio-fs server must see the guest's memory as the VMM does), made from the sealed one
//! ([`duplicate`]: only the pages it holds, no second hash).
//!
//! A known cost (measured on Linux 6.18): a fault on a hole of a private mapping of a memfd,
//! read or write, allocates a page of zeros in the memfd itself (shmem has no shared zero
//! page), which then stays for as long as the memfd does. So a page a restored guest touches
//! for the first time costs its own copy and a zero page in the shared memfd, and saving a
//! restored VM (a snapshot or fork of a VM that started warm), which reads every page of its
//! memory, fills the memfd to the guest's size: a busybox VM restored with 256 MiB showed
//! 240 MiB more of PSS after a fork of it (its save also took longer by those allocations).
//! Pages of zeros are not what the guest wrote, so a memfd that is not sealed against writes
//! could have them punched out again; sealed, it cannot.

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use sha2::{Digest, Sha256};

/// Memory a VMM is handed (as its fd 4).
#[derive(Debug, Clone)]
pub struct GuestRam {
    /// The memfd.
    pub fd: std::sync::Arc<OwnedFd>,
    /// Whether the VMM maps it shared (a copy of its own, for vhost-user servers) rather than
    /// copy-on-write.
    pub shared: bool,
}

/// The descriptor number the VMM finds the memory at.
pub const GUEST_RAM_FD: i32 = 4;

/// How a RAM digest made in pieces starts (see [`hashed_copy`]); one without it is the
/// SHA-256 of the whole file, as snapshots taken before recorded it.
pub const PIECES: &str = "sha256-pieces-2m:";

/// The size of a piece of a RAM digest.
const PIECE: u64 = 2 << 20;

/// Copies `file` (a snapshot's RAM, `size` bytes) into a new memfd, checking that its digest
/// is `digest` (either kind: see [`PIECES`]); with `seal`, the memfd is then sealed against
/// writes, growth and shrinking (and against further seals). Pages of zeros stay holes.
pub fn copy(
    file: &mut std::fs::File,
    size: u64,
    digest: &str,
    seal: bool,
) -> std::io::Result<OwnedFd> {
    let (fd, got) = if digest.starts_with(PIECES) {
        hashed_copy_in(file, size, false, PIECE)?
    } else {
        whole_file_copy(file, size)?
    };
    if got != digest {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "its RAM's sha256 differs from when it was taken",
        ));
    }
    if seal {
        seal_writes(&fd)?;
    }
    Ok(fd)
}

/// Copies `file` (`size` bytes) into a new memfd as [`copy`] does, and returns its digest:
/// what a snapshot's row records as its RAM's when the file was just written (the save's
/// copy, sealed with `seal`, is then what the first restore maps, with no second read; see
/// `vms::snapshot`). The digest is [`PIECES`] and the SHA-256 of the size and of the SHA-256
/// of each 2 MiB piece (holes read as zeros): the pieces are hashed on every core, and a
/// piece that is all hole (most of a guest's memory) is not read at all, its digest being
/// that of zeros. A busybox guest's 256 MiB took 150 ms to hash whole.
pub fn hashed_copy(
    file: &std::fs::File,
    size: u64,
    seal: bool,
) -> std::io::Result<(OwnedFd, String)> {
    hashed_copy_in(file, size, seal, PIECE)
}

/// A new memfd `name` of `size` bytes, made with `flags` besides `MFD_CLOEXEC`.
fn new_memfd(
    name: &std::ffi::CStr,
    flags: libc::c_uint,
    size: u64,
) -> std::io::Result<std::fs::File> {
    // SAFETY: memfd_create with a NUL-terminated name; the result is checked.
    let raw = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | flags) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: memfd_create returned a fresh descriptor this function now owns.
    let mem = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(raw) });
    mem.set_len(size)?;
    Ok(mem)
}

fn check_size(file: &std::fs::File, size: u64, when: &str) -> std::io::Result<()> {
    let len = file.metadata()?.len();
    if len != size {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("its RAM is {len} bytes, {size} {when}"),
        ));
    }
    Ok(())
}

/// Writes each run of pages of `chunk` (at `at` in the file) that are not all zeros into
/// `mem` at the same place, in one write per run: zeros stay holes.
fn write_pages(mem: &std::fs::File, chunk: &[u8], at: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut run = None;
    for (i, page) in chunk.chunks(4096).enumerate() {
        match (!all_zeros(page), run) {
            (true, None) => run = Some(i * 4096),
            (false, Some(start)) => {
                mem.write_all_at(&chunk[start..i * 4096], at + start as u64)?;
                run = None;
            }
            _ => {}
        }
    }
    if let Some(start) = run {
        mem.write_all_at(&chunk[start..], at + start as u64)?;
    }
    Ok(())
}

/// Where `lseek(at, whence)` (`SEEK_DATA` or `SEEK_HOLE`) lands in `file`; `None` when there
/// is no data at or after `at` (ENXIO). Only positioned reads follow, which the offset it
/// moves does not concern.
fn seek(file: &std::fs::File, at: u64, whence: i32) -> std::io::Result<Option<u64>> {
    // SAFETY: lseek takes no pointers.
    let r = unsafe { libc::lseek(file.as_raw_fd(), at as libc::off_t, whence) };
    if r >= 0 {
        return Ok(Some(r as u64));
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ENXIO) => Ok(None),
        _ => Err(e),
    }
}

/// Whether `file` holds data (not only a hole) in `[at, at + len)`.
fn has_data(file: &std::fs::File, at: u64, len: u64) -> std::io::Result<bool> {
    match seek(file, at, libc::SEEK_DATA) {
        Ok(found) => Ok(found.is_some_and(|p| p < at + len)),
        // A file system without SEEK_DATA: read it.
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP)) => Ok(true),
        Err(e) => Err(e),
    }
}

/// Pieces a thread hashed: each one's index and digest.
type Pieces = Vec<(usize, [u8; 32])>;

/// [`hashed_copy`] with pieces of `piece` bytes.
fn hashed_copy_in(
    file: &std::fs::File,
    size: u64,
    seal: bool,
    piece: u64,
) -> std::io::Result<(OwnedFd, String)> {
    use std::os::unix::fs::FileExt;
    check_size(file, size, "when taken")?;
    let mem = new_memfd(c"banger-snapshot-ram", libc::MFD_ALLOW_SEALING, size)?;
    let n = size.div_ceil(piece) as usize;
    let threads = std::thread::available_parallelism()
        .map(|t| t.get())
        .unwrap_or(1)
        .clamp(1, 4)
        .min(n.max(1));
    let zeros = |len: usize| -> [u8; 32] { Sha256::digest(vec![0u8; len]).into() };
    let full_zeros = zeros(piece as usize);
    let parts: Vec<std::io::Result<Pieces>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let mem = &mem;
                s.spawn(move || -> std::io::Result<Pieces> {
                    let mut buf = vec![0u8; piece as usize];
                    let mut done = Vec::new();
                    for i in (t..n).step_by(threads) {
                        let at = i as u64 * piece;
                        let len = piece.min(size - at) as usize;
                        let digest = if !has_data(file, at, len as u64)? {
                            if len == piece as usize {
                                full_zeros
                            } else {
                                zeros(len)
                            }
                        } else {
                            file.read_exact_at(&mut buf[..len], at)?;
                            write_pages(mem, &buf[..len], at)?;
                            Sha256::digest(&buf[..len]).into()
                        };
                        done.push((i, digest));
                    }
                    Ok(done)
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|_| Err(std::io::Error::other("a hashing thread panicked")))
            })
            .collect()
    });
    let mut digests = vec![[0u8; 32]; n];
    for part in parts {
        for (i, d) in part? {
            digests[i] = d;
        }
    }
    check_size(file, size, "expected: it changed while read")?;
    let mut outer = Sha256::new();
    outer.update(size.to_be_bytes());
    for d in &digests {
        outer.update(d);
    }
    let fd: OwnedFd = mem.into();
    if seal {
        seal_writes(&fd)?;
    }
    Ok((
        fd,
        format!("{PIECES}{}", crate::model::hex(&outer.finalize())),
    ))
}

/// The copy and whole-file SHA-256 a snapshot taken before [`PIECES`] is checked with.
fn whole_file_copy(file: &mut std::fs::File, size: u64) -> std::io::Result<(OwnedFd, String)> {
    use std::io::Seek;
    check_size(file, size, "when taken")?;
    let mem = new_memfd(c"banger-snapshot-ram", libc::MFD_ALLOW_SEALING, size)?;
    file.rewind()?;
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hash.update(&buf[..n]);
        write_pages(&mem, &buf[..n], at)?;
        at += n as u64;
    }
    if at != size {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("its RAM changed while read ({at} bytes, {size} expected)"),
        ));
    }
    Ok((mem.into(), crate::model::hex(&hash.finalize())))
}

/// Whether `page` holds only zeros. Folded without an early exit, which the compiler makes
/// SIMD: 5 ms for 256 MiB where `any` took 75 (measured, release build).
fn all_zeros(page: &[u8]) -> bool {
    page.iter().fold(0u8, |a, &b| a | b) == 0
}

/// Seals `fd` (a memfd of [`hashed_copy`]'s) against writes, growth, shrinking and further
/// seals.
fn seal_writes(fd: &OwnedFd) -> std::io::Result<()> {
    let seals = libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE;
    // SAFETY: fcntl on a descriptor the caller holds.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A writable copy of `from` (a sealed copy [`copy`] made, so already checked) of `size`
/// bytes, for a VM whose memory must be its own: only the pages it holds are copied (its
/// holes stay holes, found with `SEEK_DATA`), so a copy costs what the guest had touched.
pub fn duplicate(from: &OwnedFd, size: u64) -> std::io::Result<OwnedFd> {
    use std::os::unix::fs::FileExt;
    let mem = new_memfd(c"banger-guest-ram", 0, size)?;
    let src = std::fs::File::from(from.try_clone()?);
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    while at < size {
        let Some(start) = seek(&src, at, libc::SEEK_DATA)? else {
            break;
        };
        let end = seek(&src, start, libc::SEEK_HOLE)?
            .unwrap_or(size)
            .min(size);
        let mut pos = start;
        while pos < end {
            let n = ((end - pos) as usize).min(buf.len());
            src.read_exact_at(&mut buf[..n], pos)?;
            mem.write_all_at(&buf[..n], pos)?;
            pos += n as u64;
        }
        at = end;
    }
    Ok(mem.into())
}

/// Whether `fd` is sealed against writes (what [`copy`] with `seal` made).
pub fn sealed(fd: &OwnedFd) -> bool {
    // SAFETY: fcntl on a descriptor the caller holds.
    let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
    seals >= 0 && seals & libc::F_SEAL_WRITE != 0 && seals & libc::F_SEAL_SEAL != 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn ram_file(d: &std::path::Path) -> (std::fs::File, String) {
        let p = d.join("ram");
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(64 * 4096).unwrap();
        f.write_all_at(&[7u8; 4096], 3 * 4096).unwrap();
        // A run of two pages, and the last page (a run that reaches the end of the read).
        f.write_all_at(&[5u8; 8192], 10 * 4096).unwrap();
        f.write_all_at(&[6u8; 4096], 63 * 4096).unwrap();
        let sha = crate::model::hex(&Sha256::digest(std::fs::read(&p).unwrap()));
        (std::fs::File::open(&p).unwrap(), sha)
    }

    #[test]
    fn a_duplicate_is_writable_holds_the_same_pages_and_only_those() {
        use std::os::unix::fs::MetadataExt;
        let d = tempfile::tempdir().unwrap();
        let (mut f, sha) = ram_file(d.path());
        let sealed = copy(&mut f, 64 * 4096, &sha, true).unwrap();
        let own = std::fs::File::from(duplicate(&sealed, 64 * 4096).unwrap());
        assert_eq!(own.metadata().unwrap().len(), 64 * 4096);
        let mut page = [0u8; 4096];
        for (at, byte) in [(0, 0u8), (3, 7), (10, 5), (11, 5), (12, 0), (63, 6)] {
            own.read_exact_at(&mut page, at * 4096).unwrap();
            assert_eq!(page, [byte; 4096], "page {at}");
        }
        assert_eq!(
            own.metadata().unwrap().blocks() * 512,
            4 * 4096,
            "holes stay holes"
        );
        own.write_all_at(&[1u8; 4096], 0).unwrap();
        let orig = std::fs::File::from(sealed.try_clone().unwrap());
        orig.read_exact_at(&mut page, 0).unwrap();
        assert_eq!(page, [0u8; 4096], "the sealed copy is untouched");
    }

    #[test]
    fn a_sealed_copy_holds_the_file_and_refuses_every_change() {
        let d = tempfile::tempdir().unwrap();
        let (mut f, sha) = ram_file(d.path());
        let fd = copy(&mut f, 64 * 4096, &sha, true).unwrap();
        assert!(sealed(&fd));
        let mem = std::fs::File::from(fd.try_clone().unwrap());
        let mut page = [0u8; 4096];
        mem.read_exact_at(&mut page, 3 * 4096).unwrap();
        assert_eq!(page, [7u8; 4096]);
        for (at, byte) in [(2, 0u8), (10, 5), (11, 5), (12, 0), (63, 6)] {
            mem.read_exact_at(&mut page, at * 4096).unwrap();
            assert_eq!(page, [byte; 4096], "page {at}");
        }
        // Writes, growth, shrinking and hole punching are all refused.
        assert!(mem.write_all_at(b"x", 0).is_err());
        assert!(mem.set_len(128 * 4096).is_err());
        assert!(mem.set_len(4096).is_err());
        // SAFETY: fallocate on a descriptor this test holds.
        let punched = unsafe {
            libc::fallocate(
                mem.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                3 * 4096,
                4096,
            )
        };
        assert_eq!(punched, -1);
        // A shared writable mapping is refused; a private one works and writes only itself.
        // SAFETY: mmap of a descriptor this test holds; results checked, unmapped below.
        unsafe {
            let shared = libc::mmap(
                std::ptr::null_mut(),
                64 * 4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                mem.as_raw_fd(),
                0,
            );
            assert_eq!(shared, libc::MAP_FAILED);
            let private = libc::mmap(
                std::ptr::null_mut(),
                64 * 4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE,
                mem.as_raw_fd(),
                0,
            );
            assert_ne!(private, libc::MAP_FAILED);
            let p = private.cast::<u8>().add(3 * 4096);
            assert_eq!(*p, 7);
            *p = 9;
            libc::munmap(private, 64 * 4096);
        }
        mem.read_exact_at(&mut page, 3 * 4096).unwrap();
        assert_eq!(page[0], 7, "the private write stayed private");
    }

    /// What [`hashed_copy_in`] should say of `data` in pieces of `piece`, computed plainly.
    fn pieces_digest(data: &[u8], piece: usize) -> String {
        let mut outer = Sha256::new();
        outer.update((data.len() as u64).to_be_bytes());
        for p in data.chunks(piece) {
            outer.update(Sha256::digest(p));
        }
        format!("{PIECES}{}", crate::model::hex(&outer.finalize()))
    }

    #[test]
    fn a_hashed_copy_says_the_files_digest_and_holds_its_pages() {
        let d = tempfile::tempdir().unwrap();
        let (f, whole) = ram_file(d.path());
        let data = std::fs::read(d.path().join("ram")).unwrap();
        let (fd, got) = hashed_copy(&f, 64 * 4096, true).unwrap();
        assert_eq!(got, pieces_digest(&data, PIECE as usize));
        assert!(sealed(&fd));
        let mem = std::fs::File::from(fd);
        let mut page = [0u8; 4096];
        for (at, byte) in [(0, 0u8), (3, 7), (10, 5), (11, 5), (12, 0), (63, 6)] {
            mem.read_exact_at(&mut page, at * 4096).unwrap();
            assert_eq!(page, [byte; 4096], "page {at}");
        }
        use std::os::unix::fs::MetadataExt;
        assert_eq!(mem.metadata().unwrap().blocks() * 512, 4 * 4096);
        // Both kinds of digest are checked: this one, and a whole file's (older rows).
        let mut f = std::fs::File::open(d.path().join("ram")).unwrap();
        copy(&mut f, 64 * 4096, &got, true).unwrap();
        copy(&mut f, 64 * 4096, &whole, true).unwrap();
    }

    #[test]
    fn pieces_that_are_holes_hash_as_zeros_and_every_byte_counts() {
        // Pieces of four pages: some all hole (not read), some partly, the last one short.
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("ram");
        let f = std::fs::File::create(&p).unwrap();
        let size = 61 * 4096;
        f.set_len(size).unwrap();
        f.write_all_at(&[7u8; 4096], 3 * 4096).unwrap();
        f.write_all_at(&[5u8; 3 * 4096], 21 * 4096).unwrap();
        f.write_all_at(&[0u8; 4096], 40 * 4096).unwrap();
        f.write_all_at(&[6u8; 4096], 60 * 4096).unwrap();
        let data = std::fs::read(&p).unwrap();
        let f = std::fs::File::open(&p).unwrap();
        let (fd, got) = hashed_copy_in(&f, size, false, 4 * 4096).unwrap();
        assert_eq!(got, pieces_digest(&data, 4 * 4096));
        let mem = std::fs::read(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap();
        assert!(mem == data, "the copy holds the file");
        // A byte changed in a piece, or data where a hole was: another digest.
        for (at, byte) in [(3 * 4096 + 9, 8u8), (50 * 4096, 1)] {
            let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
            let was = data[at];
            f.write_all_at(&[byte], at as u64).unwrap();
            let f = std::fs::File::open(&p).unwrap();
            let (_, changed) = hashed_copy_in(&f, size, false, 4 * 4096).unwrap();
            assert_ne!(changed, got, "byte {at}");
            let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
            f.write_all_at(&[was], at as u64).unwrap();
        }
        let f = std::fs::File::open(&p).unwrap();
        assert_eq!(hashed_copy_in(&f, size, false, 4 * 4096).unwrap().1, got);
    }

    #[test]
    fn a_file_that_differs_from_its_row_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let (mut f, sha) = ram_file(d.path());
        let e = copy(&mut f, 32 * 4096, &sha, true).unwrap_err();
        assert!(e.to_string().contains("when taken"), "{e}");
        let mut f = std::fs::File::open(d.path().join("ram")).unwrap();
        let e = copy(&mut f, 64 * 4096, &"0".repeat(64), true).unwrap_err();
        assert!(e.to_string().contains("sha256 differs"), "{e}");
        // Unsealed (a VM's own copy for shared folders): writable.
        let mut f = std::fs::File::open(d.path().join("ram")).unwrap();
        let fd = copy(&mut f, 64 * 4096, &sha, false).unwrap();
        assert!(!sealed(&fd));
        std::fs::File::from(fd).write_all_at(b"x", 0).unwrap();
    }
}
