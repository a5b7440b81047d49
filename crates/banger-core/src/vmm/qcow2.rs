//! A VM's root disk on QEMU: a qcow2 overlay of its base (an image's ext4, or a snapshot's
//! disk), written here as `qemu-img create -f qcow2 -b BASE -F FORMAT [SIZE]` writes one:
//! qcow2 version 3, 64 KiB clusters, 16-bit refcounts, a header naming the backing file
//! and its format, one refcount table and block, an empty L1 table, nothing allocated
//! (QEMU's `docs/interop/qcow2.txt`). Why not that program: it cost every start 10–20 ms
//! (nearly all of it its own start), on the start's critical path.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::error::{failed, invalid};
use super::DiskFormat;
use crate::Result;

const MAGIC: u32 = 0x5146_49fb;
const CLUSTER_BITS: u32 = 16;
const CLUSTER: u64 = 1 << CLUSTER_BITS;
/// Bytes one L2 table maps: a cluster of 8-byte entries, each a cluster.
const L2_SPAN: u64 = CLUSTER * (CLUSTER / 8);
/// Version 3's fixed header, without the optional compression type.
const HEADER_LEN: u32 = 104;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// What QEMU reads of a backing file's name.
const MAX_BACKING_NAME: usize = 1023;
/// Clusters 0–2: header, refcount table, refcount block; the L1 table from 3 on.
const REFCOUNT_TABLE_AT: u64 = CLUSTER;
const REFCOUNT_BLOCK_AT: u64 = 2 * CLUSTER;
const L1_AT: u64 = 3 * CLUSTER;

/// A disk's virtual size: a raw file's length, a qcow2's header field.
pub fn virtual_size(path: &Path, format: DiskFormat) -> Result<u64> {
    let fail = |e| failed(format!("Cannot read {}", path.display()), e);
    let f = std::fs::File::open(path).map_err(fail)?;
    match format {
        DiskFormat::Raw => Ok(f.metadata().map_err(fail)?.len()),
        DiskFormat::Qcow2 => {
            let mut head = [0u8; 32];
            f.read_exact_at(&mut head, 0).map_err(fail)?;
            if be32(&head, 0) != MAGIC {
                return Err(invalid(format!("{} is not a qcow2 disk", path.display())));
            }
            Ok(be64(&head, 24))
        }
    }
}

/// Writes `out` (replacing it) as an empty overlay of `base`, whose format is `format`, of
/// `size` bytes or else the base's size. Blocking.
pub fn create_overlay(
    out: &Path,
    base: &Path,
    format: DiskFormat,
    size: Option<u64>,
) -> Result<()> {
    let name = base.as_os_str().as_bytes();
    if !base.is_absolute() || name.len() > MAX_BACKING_NAME {
        return Err(invalid(format!(
            "{} cannot back a qcow2 disk (an absolute path of at most {MAX_BACKING_NAME} bytes)",
            base.display()
        )));
    }
    let size = match size {
        Some(s) => s,
        None => virtual_size(base, format)?,
    };
    // qemu-img rounds a size up to whole sectors.
    let size = size
        .checked_next_multiple_of(512)
        .ok_or_else(|| invalid(format!("a disk of {size} bytes is too large")))?;
    let l1_entries = size.div_ceil(L2_SPAN);
    let l1_clusters = (l1_entries * 8).div_ceil(CLUSTER).max(1);
    let clusters = 3 + l1_clusters;
    // One refcount block counts a cluster's worth of 2-byte refcounts.
    if clusters > CLUSTER / 2 {
        return Err(invalid(format!("a disk of {size} bytes is too large")));
    }

    let mut head = Vec::with_capacity(512);
    let format = format.as_str().as_bytes();
    let exts_len = 8 + format.len().next_multiple_of(8) + 8;
    let name_at = u64::from(HEADER_LEN) + exts_len as u64;
    head.extend(MAGIC.to_be_bytes());
    head.extend(3u32.to_be_bytes()); // version
    head.extend(name_at.to_be_bytes()); // backing_file_offset
    head.extend((name.len() as u32).to_be_bytes()); // backing_file_size
    head.extend(CLUSTER_BITS.to_be_bytes());
    head.extend(size.to_be_bytes());
    head.extend(0u32.to_be_bytes()); // crypt_method: none
    head.extend((l1_entries as u32).to_be_bytes()); // l1_size
    head.extend(L1_AT.to_be_bytes());
    head.extend(REFCOUNT_TABLE_AT.to_be_bytes());
    head.extend(1u32.to_be_bytes()); // refcount_table_clusters
    head.extend(0u32.to_be_bytes()); // nb_snapshots
    head.extend(0u64.to_be_bytes()); // snapshots_offset
    head.extend(0u64.to_be_bytes()); // incompatible_features
    head.extend(0u64.to_be_bytes()); // compatible_features
    head.extend(0u64.to_be_bytes()); // autoclear_features
    head.extend(4u32.to_be_bytes()); // refcount_order: 16-bit refcounts
    head.extend(HEADER_LEN.to_be_bytes());
    debug_assert_eq!(head.len(), HEADER_LEN as usize);
    // Header extensions: the backing file's format, then the end.
    head.extend(EXT_BACKING_FORMAT.to_be_bytes());
    head.extend((format.len() as u32).to_be_bytes());
    head.extend(format);
    head.resize(head.len().next_multiple_of(8), 0);
    head.extend([0u8; 8]);
    debug_assert_eq!(head.len() as u64, name_at);
    head.extend(name);

    let mut refcounts = Vec::with_capacity(clusters as usize * 2);
    for _ in 0..clusters {
        refcounts.extend(1u16.to_be_bytes());
    }

    let fail = |e| failed(format!("Cannot write {}", out.display()), e);
    let _ = std::fs::remove_file(out);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(out)
        .map_err(fail)?;
    // Sparse: the L1 table and the rest of each cluster are zeroes.
    f.set_len(L1_AT + l1_entries * 8).map_err(fail)?;
    f.write_all_at(&head, 0).map_err(fail)?;
    f.write_all_at(&REFCOUNT_BLOCK_AT.to_be_bytes(), REFCOUNT_TABLE_AT)
        .map_err(fail)?;
    f.write_all_at(&refcounts, REFCOUNT_BLOCK_AT)
        .map_err(fail)?;
    Ok(())
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn qemu_img(args: &[&std::ffi::OsStr]) -> Option<String> {
        let out = match Command::new("qemu-img").args(args).output() {
            Ok(o) => o,
            Err(_) if std::env::var_os("BANGER_REQUIRE_INTEGRATION").is_none() => return None,
            Err(e) => panic!("qemu-img (apt-get install qemu-utils): {e}"),
        };
        assert!(out.status.success(), "qemu-img {args:?}: {out:?}");
        Some(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Overlays of a raw base and of a qcow2 one, at the base's size and at others: QEMU's
    /// own checker finds nothing wrong, its reading of the header is what was asked, and
    /// what reads through the overlay is the base's data; a qcow2 base's size is read.
    #[test]
    fn overlays_are_what_qemu_img_would_write() {
        let d = tempfile::tempdir().unwrap();
        let base = d.path().join("base.ext4");
        std::fs::write(&base, b"").unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&base).unwrap();
        f.set_len(100 << 20).unwrap();
        f.write_all_at(b"the base's own bytes", 3 << 20).unwrap();
        let cases: [(&str, &Path, DiskFormat, Option<u64>, u64); 4] = [
            ("as-base.qcow2", &base, DiskFormat::Raw, None, 100 << 20),
            (
                "grown.qcow2",
                &base,
                DiskFormat::Raw,
                Some((5 << 30) + 1),
                (5 << 30) + 512,
            ),
            ("huge.qcow2", &base, DiskFormat::Raw, Some(5 << 40), 5 << 40),
            (
                "on-qcow2.qcow2",
                &d.path().join("grown.qcow2"),
                DiskFormat::Qcow2,
                None,
                (5 << 30) + 512,
            ),
        ];
        for (name, backing, format, size, expect) in cases {
            let out = d.path().join(name);
            create_overlay(&out, backing, format, size).unwrap();
            let Some(check) = qemu_img(&["check".as_ref(), out.as_os_str()]) else {
                eprintln!("skipped: no qemu-img");
                return;
            };
            assert!(check.contains("No errors were found"), "{name}: {check}");
            let info: serde_json::Value = serde_json::from_str(
                &qemu_img(&["info".as_ref(), "--output=json".as_ref(), out.as_os_str()]).unwrap(),
            )
            .unwrap();
            assert_eq!(info["virtual-size"], expect, "{name}: {info}");
            assert_eq!(
                info["backing-filename"],
                backing.to_str().unwrap(),
                "{name}"
            );
            assert_eq!(info["backing-filename-format"], format.as_str(), "{name}");
            assert_eq!(virtual_size(&out, DiskFormat::Qcow2).unwrap(), expect);
        }
        // Read through two overlays: the base's bytes.
        let flat = d.path().join("flat.raw");
        qemu_img(&[
            "convert".as_ref(),
            "-O".as_ref(),
            "raw".as_ref(),
            d.path().join("on-qcow2.qcow2").as_os_str(),
            flat.as_os_str(),
        ])
        .unwrap();
        let mut got = [0u8; 20];
        std::fs::File::open(&flat)
            .unwrap()
            .read_exact_at(&mut got, 3 << 20)
            .unwrap();
        assert_eq!(&got, b"the base's own bytes");
        // A relative or overlong backing name, and a base that is not qcow2, are refused.
        for (backing, format) in [
            (Path::new("base.ext4").to_owned(), DiskFormat::Raw),
            (Path::new("/").join("x".repeat(1100)), DiskFormat::Raw),
            (base.clone(), DiskFormat::Qcow2),
        ] {
            let e = create_overlay(&d.path().join("bad.qcow2"), &backing, format, None);
            assert!(e.is_err(), "{}", backing.display());
        }
    }
}
