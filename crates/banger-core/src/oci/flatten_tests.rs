//! Flattener tests: tars built here, applied to a temp tree and to an ext4 image written
//! with libext2fs (checked by `e2fsck` and read back with `debugfs`), inspected on disk.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tar::{EntryType, Header};

use super::flatten::{FlattenError, Flattener, Limits};
use crate::ext4::writer::Writer;
use crate::tree::HostTree;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Builds a layer tar from (path, type, data or link target, mode, uid).
struct Layer(tar::Builder<Vec<u8>>);

impl Layer {
    fn new() -> Self {
        Layer(tar::Builder::new(Vec::new()))
    }
    fn header(path: &str, t: EntryType, mode: u32, uid: u64, size: u64) -> Header {
        let mut h = Header::new_gnu();
        h.set_entry_type(t);
        h.set_mode(mode);
        h.set_uid(uid);
        h.set_gid(uid);
        h.set_size(size);
        h.set_mtime(1_600_000_000);
        // set_path refuses '..'; write the raw name so hostile names reach the flattener.
        let name = &mut h.as_gnu_mut().unwrap().name;
        name.fill(0);
        name[..path.len()].copy_from_slice(path.as_bytes());
        h.set_cksum();
        h
    }
    fn dir(mut self, path: &str, mode: u32) -> Self {
        let h = Self::header(path, EntryType::Directory, mode, 0, 0);
        self.0.append(&h, &[][..]).unwrap();
        self
    }
    fn file(mut self, path: &str, data: &str, mode: u32, uid: u64) -> Self {
        let h = Self::header(path, EntryType::Regular, mode, uid, data.len() as u64);
        self.0.append(&h, data.as_bytes()).unwrap();
        self
    }
    fn link(mut self, path: &str, t: EntryType, target: &str) -> Self {
        let mut h = Self::header(path, t, 0o777, 0, 0);
        let l = &mut h.as_gnu_mut().unwrap().linkname;
        l.fill(0);
        l[..target.len()].copy_from_slice(target.as_bytes());
        h.set_cksum();
        self.0.append(&h, &[][..]).unwrap();
        self
    }
    fn xattr_file(mut self, path: &str, key: &str, value: &str) -> Self {
        self.0
            .append_pax_extensions([(format!("SCHILY.xattr.{key}").as_str(), value.as_bytes())])
            .unwrap();
        self.file(path, "x", 0o644, 0)
    }
    fn bytes(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }
}

/// Where a test flattens to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    /// A host directory.
    Host,
    /// An ext4 image, dumped into a host directory with `debugfs rdump` for inspection.
    Ext4,
}

const BACKENDS: [Backend; 2] = [Backend::Host, Backend::Ext4];

/// A finished flattening.
struct Flat {
    tmp: tempfile::TempDir,
    backend: Backend,
}

impl Flat {
    /// The tree (for ext4, what `debugfs rdump` made of the image; devices and FIFOs are
    /// not dumped, and hard links come out as copies).
    fn tree(&self) -> PathBuf {
        self.tmp.path().join("tree")
    }
    fn image(&self) -> PathBuf {
        self.tmp.path().join("rootfs.ext4")
    }
    fn debugfs(&self, cmd: &str) -> String {
        let out = std::process::Command::new("debugfs")
            .args(["-R", cmd])
            .arg(self.image())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
    /// `rel`'s inode number.
    fn ino(&self, rel: &str) -> u64 {
        match self.backend {
            Backend::Host => std::fs::symlink_metadata(self.tree().join(rel))
                .unwrap()
                .ino(),
            Backend::Ext4 => {
                let out = self.debugfs(&format!("stat /{rel}"));
                let n = out.split_whitespace().nth(1).unwrap_or_default().to_owned();
                n.parse()
                    .unwrap_or_else(|_| panic!("no inode for {rel}: {out}"))
            }
        }
    }
    /// `rel`'s extended attribute `key`.
    fn xattr(&self, rel: &str, key: &str) -> String {
        match self.backend {
            Backend::Host => {
                let mut buf = [0u8; 64];
                let p = std::ffi::CString::new(self.tree().join(rel).to_str().unwrap()).unwrap();
                let k = std::ffi::CString::new(key).unwrap();
                // SAFETY: both strings are NUL-terminated and the buffer is 64 writable bytes.
                let n =
                    unsafe { libc::lgetxattr(p.as_ptr(), k.as_ptr(), buf.as_mut_ptr().cast(), 64) };
                assert!(n >= 0, "no xattr {key} on {rel}");
                String::from_utf8_lossy(&buf[..n as usize]).into_owned()
            }
            Backend::Ext4 => self.debugfs(&format!("ea_get /{rel} {key}")),
        }
    }
}

fn flatten_on(backend: Backend, layers: Vec<Vec<u8>>) -> (Flat, Result<(), FlattenError>) {
    flatten_with(backend, layers, Limits::default())
}

fn flatten_with(
    backend: Backend,
    layers: Vec<Vec<u8>>,
    limits: Limits,
) -> (Flat, Result<(), FlattenError>) {
    let flat = Flat {
        tmp: tempfile::tempdir().unwrap(),
        backend,
    };
    fn apply<T: crate::tree::Tree>(
        mut f: Flattener<T>,
        layers: Vec<Vec<u8>>,
    ) -> Result<T, FlattenError> {
        for l in layers {
            f.apply_layer(&l[..])?;
        }
        Ok(f.finish()?.1)
    }
    match backend {
        Backend::Host => {
            let tree = HostTree::create(&flat.tree(), is_root()).unwrap();
            let r = apply(Flattener::new(tree, limits), layers).map(|_| ());
            (flat, r)
        }
        Backend::Ext4 => {
            crate::ext4::create_empty(&flat.image(), 64 << 20, 4096, "test").unwrap();
            let w = Writer::open(&flat.image()).unwrap();
            match apply(Flattener::new(w, limits), layers) {
                Err(e) => (flat, Err(e)),
                Ok(w) => {
                    w.close().unwrap();
                    let fsck = std::process::Command::new("e2fsck")
                        .args(["-fn"])
                        .arg(flat.image())
                        .output()
                        .unwrap();
                    assert!(
                        fsck.status.success(),
                        "e2fsck found the image inconsistent:\n{}",
                        String::from_utf8_lossy(&fsck.stdout)
                    );
                    std::fs::create_dir(flat.tree()).unwrap();
                    flat.debugfs(&format!("rdump / {}", flat.tree().display()));
                    std::fs::remove_dir(flat.tree().join("lost+found")).unwrap();
                    (flat, Ok(()))
                }
            }
        }
    }
}

#[test]
fn layers_apply_in_order_with_whiteouts_and_opaque_dirs() {
    for b in BACKENDS {
        layers_apply_in_order(b);
    }
}

fn layers_apply_in_order(b: Backend) {
    let lower = Layer::new()
        .dir("etc", 0o755)
        .file("etc/keep", "keep", 0o644, 0)
        .file("etc/gone", "gone", 0o644, 0)
        .dir("opq", 0o755)
        .file("opq/old", "old", 0o644, 0)
        .file("replaced", "v1", 0o644, 0)
        .bytes();
    let upper = Layer::new()
        .file("etc/.wh.gone", "", 0o644, 0)
        .file("opq/.wh..wh..opq", "", 0o644, 0)
        .file("opq/new", "new", 0o644, 0)
        .file("replaced", "v2", 0o644, 0)
        .bytes();
    let (flat, r) = flatten_on(b, vec![lower, upper]);
    r.unwrap();
    let t = flat.tree();
    assert!(t.join("etc/keep").exists());
    assert!(!t.join("etc/gone").exists());
    assert!(!t.join("etc/.wh.gone").exists());
    assert!(!t.join("opq/old").exists());
    assert_eq!(std::fs::read_to_string(t.join("opq/new")).unwrap(), "new");
    assert!(!t.join("opq/.wh..wh..opq").exists());
    assert_eq!(std::fs::read_to_string(t.join("replaced")).unwrap(), "v2");
}

#[test]
fn modes_owners_links_and_xattrs_are_kept() {
    for b in BACKENDS {
        modes_owners_links_and_xattrs(b);
    }
}

fn modes_owners_links_and_xattrs(b: Backend) {
    let layer = Layer::new()
        .dir("usr/bin", 0o755)
        .file("usr/bin/su", "su", 0o4755, 0)
        .file("home-file", "mine", 0o640, 1000)
        .dir("tmp", 0o1777)
        .link("usr/bin/sh", EntryType::Symlink, "/bin/busybox")
        .link("usr/bin/su2", EntryType::Link, "usr/bin/su")
        .xattr_file("caps", "user.banger", "yes")
        .bytes();
    let (flat, r) = flatten_on(b, vec![layer]);
    r.unwrap();
    let t = flat.tree();
    let su = std::fs::metadata(t.join("usr/bin/su")).unwrap();
    if b == Backend::Host {
        assert_eq!(su.permissions().mode() & 0o7777, 0o4755);
    } else {
        // debugfs chowns after chmod when it dumps, which drops setuid: ask the image.
        let stat = flat.debugfs("stat /usr/bin/su");
        assert!(stat.contains("Mode:  04755"), "{stat}");
    }
    if b == Backend::Host {
        assert_eq!(
            std::fs::metadata(t.join("tmp"))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777,
            0o1777
        );
    } else {
        let stat = flat.debugfs("stat /tmp");
        assert!(stat.contains("Mode:  01777"), "{stat}");
    }
    assert_eq!(su.mtime(), 1_600_000_000);
    if is_root() {
        assert_eq!(std::fs::metadata(t.join("home-file")).unwrap().uid(), 1000);
    }
    assert_eq!(
        std::fs::read_link(t.join("usr/bin/sh")).unwrap(),
        Path::new("/bin/busybox")
    );
    assert_eq!(flat.ino("usr/bin/su2"), flat.ino("usr/bin/su"), "{b:?}");
    assert!(flat.xattr("caps", "user.banger").contains("yes"), "{b:?}");
}

#[test]
fn absolute_symlinks_resolve_inside_the_tree() {
    for b in BACKENDS {
        absolute_symlinks_resolve_inside(b);
    }
}

fn absolute_symlinks_resolve_inside(b: Backend) {
    // var/run -> /run is legitimate; writing var/run/x must land in the tree's /run.
    let lower = Layer::new()
        .dir("run", 0o755)
        .dir("var", 0o755)
        .link("var/run", EntryType::Symlink, "/run")
        .bytes();
    let upper = Layer::new().file("var/run/x", "x", 0o644, 0).bytes();
    let (flat, r) = flatten_on(b, vec![lower, upper]);
    r.unwrap();
    assert!(flat.tree().join("run/x").exists(), "{b:?}");
}

#[test]
fn a_symlink_to_the_host_root_never_lets_a_write_out() {
    for b in BACKENDS {
        no_write_out(b);
    }
}

fn no_write_out(b: Backend) {
    let outside = tempfile::tempdir().unwrap();
    let target = outside.path().to_str().unwrap().to_owned();
    let lower = Layer::new()
        .link("escape", EntryType::Symlink, &target)
        .bytes();
    let upper = Layer::new().file("escape/pwned", "x", 0o644, 0).bytes();
    let (_flat, r) = flatten_on(b, vec![lower.clone(), upper.clone()]);
    match r {
        Err(e @ FlattenError::Hostile { .. }) => assert!(
            e.to_string().contains("writes through the symlink escape"),
            "{e}"
        ),
        other => panic!("{other:?}"),
    }
    assert!(
        !outside.path().join("pwned").exists(),
        "wrote outside the tree"
    );
    // When the target exists inside the image, the write lands there, never on the host.
    let mkdirs = Layer::new()
        .dir(target.trim_start_matches('/'), 0o755)
        .bytes();
    let (flat, r) = flatten_on(b, vec![lower, mkdirs, upper]);
    r.unwrap();
    assert!(
        !outside.path().join("pwned").exists(),
        "wrote outside the tree"
    );
    let inside = flat
        .tree()
        .join(target.trim_start_matches('/'))
        .join("pwned");
    assert!(inside.exists());
}

fn assert_hostile(layers: Vec<Vec<u8>>, needle: &str) {
    for b in BACKENDS {
        let (flat, r) = flatten_on(b, layers.clone());
        match r {
            Err(e @ FlattenError::Hostile { .. }) => {
                assert!(e.to_string().contains(needle), "{b:?}: {e}")
            }
            other => panic!("{b:?}: expected a hostile-entry error with {needle:?}, got {other:?}"),
        }
        // Nothing next to the tree (or the image).
        let names: Vec<_> = std::fs::read_dir(flat.tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        let only = if b == Backend::Host {
            "tree"
        } else {
            "rootfs.ext4"
        };
        assert_eq!(names, vec![std::ffi::OsString::from(only)]);
    }
}

#[test]
fn hostile_entries_are_rejected() {
    assert_hostile(
        vec![Layer::new().file("../evil", "x", 0o644, 0).bytes()],
        "contains '..'",
    );
    assert_hostile(
        vec![Layer::new().file("a/../../evil", "x", 0o644, 0).bytes()],
        "contains '..'",
    );
    assert_hostile(
        vec![Layer::new().file("/etc/evil", "x", 0o644, 0).bytes()],
        "is absolute",
    );
    assert_hostile(
        vec![Layer::new()
            .dir("a", 0o755)
            .link("a/up", EntryType::Symlink, "../../../etc")
            .bytes()],
        "climbs out of the image",
    );
    assert_hostile(
        vec![Layer::new()
            .link("shadow", EntryType::Link, "../../etc/shadow")
            .bytes()],
        "hard link target",
    );
    assert_hostile(
        vec![Layer::new()
            .link("shadow", EntryType::Link, "/etc/shadow")
            .bytes()],
        "hard link target",
    );
    assert_hostile(
        vec![Layer::new()
            .link("ghost", EntryType::Link, "not/there")
            .bytes()],
        "not in the image",
    );
}

#[test]
fn decompression_bombs_hit_the_cap() {
    let big = "x".repeat(64 * 1024);
    let layer = Layer::new()
        .file("a", &big, 0o644, 0)
        .file("b", &big, 0o644, 0)
        .bytes();
    let limits = Limits {
        max_bytes: 100 * 1024,
        max_entries: 10,
    };
    let many = (0..20)
        .fold(Layer::new(), |l, i| l.file(&format!("f{i}"), "", 0o644, 0))
        .bytes();
    for b in BACKENDS {
        match flatten_with(b, vec![layer.clone()], limits).1 {
            Err(FlattenError::TooLarge { what: "bytes", .. }) => {}
            other => panic!("{b:?}: {other:?}"),
        }
        match flatten_with(b, vec![many.clone()], limits).1 {
            Err(FlattenError::TooLarge {
                what: "entries", ..
            }) => {}
            other => panic!("{b:?}: {other:?}"),
        }
    }
}

#[test]
fn device_nodes_and_fifos_are_created() {
    if !is_root() {
        return;
    }
    let mut l = Layer::new();
    let mut h = Layer::header("dev-null", EntryType::Char, 0o666, 0, 0);
    h.set_device_major(1).unwrap();
    h.set_device_minor(3).unwrap();
    h.set_cksum();
    l.0.append(&h, &[][..]).unwrap();
    let h = Layer::header("fifo", EntryType::Fifo, 0o600, 0, 0);
    l.0.append(&h, &[][..]).unwrap();
    let l = l.bytes();
    let (flat, r) = flatten_on(Backend::Host, vec![l.clone()]);
    r.unwrap();
    use std::os::unix::fs::FileTypeExt;
    let m = std::fs::symlink_metadata(flat.tree().join("dev-null")).unwrap();
    assert!(m.file_type().is_char_device());
    assert_eq!(m.rdev(), libc::makedev(1, 3));
    assert!(std::fs::symlink_metadata(flat.tree().join("fifo"))
        .unwrap()
        .file_type()
        .is_fifo());
    let (flat, r) = flatten_on(Backend::Ext4, vec![l]);
    r.unwrap();
    let dev = flat.debugfs("stat /dev-null");
    assert!(dev.contains("Type: character special"), "{dev}");
    assert!(dev.contains("Device major/minor number: 01:03"), "{dev}");
    assert!(flat.debugfs("stat /fifo").contains("Type: FIFO"));
}

#[test]
fn an_ext4_image_stays_consistent_through_replacements_and_deletions() {
    // Big files (several extents, holes), a directory that outgrows its first blocks,
    // hard links, xattrs; then a layer that deletes and replaces across all of them.
    // e2fsck (in flatten_on) checks every block and inode count after.
    let big: String = (0..3 << 20)
        .map(|i| (b'a' + (i % 26) as u8) as char)
        .collect();
    let holes = format!("{}{}", "\0".repeat(1 << 20), "tail");
    let mut lower = Layer::new()
        .dir("d", 0o755)
        .dir("d/deep", 0o755)
        .dir("d/deep/er", 0o755)
        .file("d/deep/er/big", &big, 0o644, 0)
        .file("holes", &holes, 0o644, 0)
        .file("linked", "one inode", 0o644, 0)
        .link("d/link2", EntryType::Link, "linked")
        .xattr_file("d/caps", "user.banger", "yes")
        .dir("many", 0o755);
    for i in 0..600 {
        lower = lower.file(
            &format!("many/a-rather-long-file-name-{i:04}"),
            "x",
            0o644,
            0,
        );
    }
    let upper = Layer::new()
        .file(".wh.d", "", 0o644, 0)
        .file("many/.wh..wh..opq", "", 0o644, 0)
        .file("many/only", "left", 0o644, 0)
        .file("holes", "short now", 0o644, 0)
        .bytes();
    let (flat, r) = flatten_on(Backend::Ext4, vec![lower.bytes(), upper]);
    r.unwrap();
    let t = flat.tree();
    assert!(!t.join("d").exists());
    assert_eq!(
        std::fs::read_to_string(t.join("linked")).unwrap(),
        "one inode"
    );
    assert_eq!(
        std::fs::read_to_string(t.join("holes")).unwrap(),
        "short now"
    );
    let names: Vec<_> = std::fs::read_dir(t.join("many")).unwrap().collect();
    assert_eq!(names.len(), 1);
    let links = flat.debugfs("stat /linked");
    assert!(links.contains("Links: 1"), "{links}");

    // And a file with holes reads back whole, while taking fewer blocks than its size.
    let (flat, r) = flatten_on(
        Backend::Ext4,
        vec![Layer::new()
            .file("holes", &holes, 0o644, 0)
            .file("big", &big, 0o644, 0)
            .bytes()],
    );
    r.unwrap();
    assert_eq!(
        std::fs::read(flat.tree().join("holes")).unwrap(),
        holes.as_bytes()
    );
    assert_eq!(
        std::fs::read(flat.tree().join("big")).unwrap(),
        big.as_bytes()
    );
    let stat = flat.debugfs("stat /holes");
    assert!(stat.contains("Blockcount: 8\n"), "{stat}");
}
