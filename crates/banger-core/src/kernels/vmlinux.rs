//! Kernel images: the version a bzImage declares, and the uncompressed ELF `vmlinux` that
//! Firecracker and QEMU's PVH entry boot (a bzImage spends seconds decompressing itself under
//! TCG).

use std::io::Write;
use std::path::Path;
use std::process::Stdio;

use super::error::{failed, invalid, KernelError};
use crate::{host, Result};

const ELF: &[u8] = b"\x7fELF";

/// The version string of a bzImage (its setup header's `kernel_version`), e.g.
/// `6.1.0-56-amd64`.
pub fn bzimage_version(img: &[u8]) -> Option<String> {
    if img.get(0x202..0x206)? != b"HdrS" {
        return None;
    }
    let ptr = u16::from_le_bytes([*img.get(0x20E)?, *img.get(0x20F)?]) as usize + 0x200;
    version_word(img.get(ptr..)?)
}

/// The version in an ELF vmlinux's banner (`Linux version 6.1.0-57-cloud-amd64 (…`).
pub fn elf_version(elf: &[u8]) -> Option<String> {
    const BANNER: &[u8] = b"Linux version ";
    let at = elf.windows(BANNER.len()).position(|w| w == BANNER)? + BANNER.len();
    version_word(&elf[at..])
}

/// The version that starts `tail`: up to its first NUL or space, within 256 bytes.
fn version_word(tail: &[u8]) -> Option<String> {
    let end = tail.iter().take(256).position(|&b| b == 0 || b == b' ')?;
    plain_version(std::str::from_utf8(&tail[..end]).ok()?)
}

/// `v` when it looks like a kernel version. A caller's kernel (or the name of its modules
/// directory) says what it likes: only a version's characters are taken, since users see it.
pub fn plain_version(v: &str) -> Option<String> {
    let plain = v
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._+~-".contains(&b));
    (!v.is_empty() && v.len() <= 128 && plain && !v.starts_with('.')).then(|| v.to_owned())
}

/// Decompresses `payload` (the compressed kernel inside a bzImage, or a compressed module)
/// with an external tool, reading at most `max` bytes of its output: a decompression bomb is
/// killed, not buffered.
pub(super) fn decompress(tool: &str, args: &[&str], payload: &[u8], max: u64) -> Result<Vec<u8>> {
    use std::io::Read;
    let path = host::find_program(tool).ok_or_else(|| {
        failed(
            format!("{tool} is not installed"),
            std::io::Error::from(std::io::ErrorKind::NotFound),
        )
    })?;
    // A caller's kernel image: its decompressor runs as a worker of its own, not as root.
    let mut child = crate::worker::filter_command(&path, args)?
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| failed(format!("Cannot run {tool}"), e))?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    let mut stdout = child.stdout.take().expect("piped stdout");
    let data = payload.to_vec();
    // Feed from another thread so a full stdout pipe cannot deadlock us.
    let feeder = std::thread::spawn(move || {
        let _ = stdin.write_all(&data);
    });
    let mut out = Vec::new();
    let read = (&mut stdout).take(max + 1).read_to_end(&mut out);
    let over = out.len() as u64 > max;
    if over {
        let _ = child.kill();
    }
    drop(stdout);
    let _ = child.wait();
    let _ = feeder.join();
    if over {
        return Err(KernelError::TooLarge(max).into());
    }
    read.map_err(|e| failed(format!("{tool} failed"), e))?;
    // Trailing data after the stream makes some tools complain; what counts is the ELF.
    Ok(out)
}

/// Returns the ELF vmlinux for a kernel image: the image itself when it is ELF already,
/// else the xz, zstd, lz4 (Debian's cloud kernels) or gzip payload of a bzImage,
/// decompressed to at most `max` bytes. The payload is where the setup header says it is
/// (boot protocol 2.08 and later); else the earliest magic number in the image is tried
/// first. A magic number can also occur by chance inside another compressor's stream, so a
/// tool that is not installed or does not yield an ELF is not the end: the next candidate is
/// tried, and the error names a missing tool only when nothing else worked.
pub fn to_elf(img: &[u8], max: u64) -> Result<Vec<u8>> {
    if img.starts_with(ELF) {
        return Ok(img.to_vec());
    }
    let kinds: [(&[u8], &str, &[&str]); 4] = [
        (b"\xfd7zXZ\x00", "xz", &["-dc", "--single-stream"]),
        (b"\x28\xb5\x2f\xfd", "zstd", &["-dcq"]),
        // The legacy frame the kernel's own lz4 makes (the tool ends on the bzImage's tail
        // with an error after writing the kernel; what counts is the ELF).
        (b"\x02\x21\x4c\x18", "lz4", &["-dc"]),
        (b"\x1f\x8b\x08\x00", "gzip", &["-dc"]),
    ];
    // The payload the header names first (tried once: the scan below finds it too), then
    // every magic number in the order they occur.
    let named = payload_offset(img).and_then(|at| {
        kinds
            .iter()
            .position(|(magic, _, _)| img[at..].starts_with(magic))
            .map(|k| (at, k))
    });
    let mut found: Vec<(usize, usize)> = kinds
        .iter()
        .enumerate()
        .filter_map(|(k, (magic, _, _))| {
            img.windows(magic.len())
                .position(|w| w == *magic)
                .map(|at| (at, k))
        })
        .filter(|c| Some(*c) != named)
        .collect();
    found.sort();
    let candidates = named.into_iter().chain(found);
    let mut missing = None;
    for (at, k) in candidates {
        let (_, tool, args) = kinds[k];
        match decompress(tool, args, &img[at..], max) {
            Ok(out) if out.starts_with(ELF) => return Ok(out),
            Ok(_) => {}
            Err(e @ crate::Error::Kernel(KernelError::TooLarge(_))) => return Err(e),
            Err(e) => {
                missing.get_or_insert(e);
            }
        }
    }
    Err(missing.unwrap_or_else(|| {
        invalid(
            "The kernel file is neither an ELF vmlinux nor a bzImage with an xz, zstd, lz4 or \
             gzip payload",
        )
    }))
}

/// Where a bzImage's compressed payload starts, from its setup header (boot protocol 2.08
/// and later: `payload_offset`, from the protected-mode code after the setup sectors).
fn payload_offset(img: &[u8]) -> Option<usize> {
    if img.get(0x202..0x206)? != b"HdrS" {
        return None;
    }
    let protocol = u16::from_le_bytes([*img.get(0x206)?, *img.get(0x207)?]);
    if protocol < 0x0208 {
        return None;
    }
    let setup_sects = match *img.get(0x1f1)? {
        0 => 4,
        n => n as usize,
    };
    let offset = u32::from_le_bytes(img.get(0x248..0x24c)?.try_into().ok()?) as usize;
    let at = (setup_sects + 1).checked_mul(512)?.checked_add(offset)?;
    (at < img.len()).then_some(at)
}

/// Writes `data` to `path`, readable by everyone (kernels are not secret).
pub fn write(path: &Path, data: &[u8]) -> Result<()> {
    std::fs::write(path, data).map_err(|e| failed(format!("Cannot write {}", path.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_bzimage(version: &str, payload: &[u8]) -> Vec<u8> {
        let mut img = vec![0u8; 0x600];
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x20E..0x210].copy_from_slice(&(0x300u16).to_le_bytes());
        img[0x500..0x500 + version.len()].copy_from_slice(version.as_bytes());
        img.extend_from_slice(payload);
        img
    }

    #[test]
    fn versions_come_from_the_setup_header() {
        let img = fake_bzimage("6.1.0-56-amd64 (debian-kernel@lists.debian.org) #1", b"");
        assert_eq!(bzimage_version(&img).as_deref(), Some("6.1.0-56-amd64"));
        assert_eq!(bzimage_version(b"not a kernel"), None);
        // What a hostile image may say is not a version: no path, no control characters.
        for bad in ["../../../etc/cron.d/x", "6.1/../x", "..", "6.1\u{1b}[2J"] {
            assert_eq!(bzimage_version(&fake_bzimage(bad, b"")), None, "{bad:?}");
        }
        let elf =
            b"\x7fELF...\0Linux version 6.1.0-57-cloud-amd64 (debian-kernel@lists.debian.org) #1\0";
        assert_eq!(elf_version(elf).as_deref(), Some("6.1.0-57-cloud-amd64"));
        assert_eq!(elf_version(b"\x7fELF\0Linux version ../x (y)"), None);
        assert_eq!(elf_version(b"\x7fELF no banner"), None);
    }

    #[test]
    fn elf_passes_and_a_gzip_payload_is_unpacked() {
        let elf = b"\x7fELF\x02\x01\x01 rest of the kernel".to_vec();
        assert_eq!(to_elf(&elf, 1 << 20).unwrap(), elf);
        if host::find_program("gzip").is_none() {
            return;
        }
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(&elf).unwrap();
        let img = fake_bzimage("6.1.0-test", &e.finish().unwrap());
        assert_eq!(to_elf(&img, 1 << 20).unwrap(), elf);
        assert!(to_elf(b"garbage", 1 << 20).is_err());
        // A bomb: 64 MiB of zeros in a few KiB of gzip, against a 1 MiB bound.
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..64 {
            e.write_all(&zeros).unwrap();
        }
        let img = fake_bzimage("6.1.0-bomb", &e.finish().unwrap());
        let err = to_elf(&img, 1 << 20).unwrap_err();
        assert!(
            matches!(err, crate::Error::Kernel(KernelError::TooLarge(_))),
            "{err}"
        );
    }

    /// Debian's cloud kernels carry an lz4 payload in the kernel's legacy frame, followed by
    /// the bzImage's tail (which makes the tool fail after it wrote the kernel).
    #[test]
    fn an_lz4_payload_is_unpacked() {
        let Some(lz4) = super::super::tool_tests::tool("lz4") else {
            return;
        };
        let elf = [b"\x7fELF\x02\x01\x01".as_slice(), &[7u8; 100_000]].concat();
        let mut payload = super::super::tool_tests::through(&lz4, &["-l", "-c"], &elf);
        assert_eq!(&payload[..4], b"\x02\x21\x4c\x18", "a legacy frame");
        payload.extend_from_slice(&[0x55; 16]);
        let img = fake_bzimage("6.1.0-57-cloud-amd64", &payload);
        assert_eq!(to_elf(&img, 1 << 20).unwrap(), elf);
        assert!(to_elf(&img, 50_000).is_err(), "bounded like the others");

        // A header that says where the payload is (protocol 2.08+), and a zstd magic number
        // before it by chance (Debian's cloud kernel has one): the payload is what is
        // unpacked, whether zstd is installed or not.
        let mut img = vec![0u8; 1024 + 16];
        img[0x1f1] = 1;
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        img[0x248..0x24c].copy_from_slice(&16u32.to_le_bytes());
        img[0x300..0x304].copy_from_slice(b"\x28\xb5\x2f\xfd");
        img.extend_from_slice(&payload);
        assert_eq!(payload_offset(&img), Some(1024 + 16));
        assert_eq!(to_elf(&img, 1 << 20).unwrap(), elf);
        assert_eq!(payload_offset(&img[..0x240]), None, "a header cut short");
    }
}
