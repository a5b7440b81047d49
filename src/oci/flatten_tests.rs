//! Flattener tests: tars built here, applied to a temp tree, inspected on disk.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use tar::{EntryType, Header};

use super::flatten::{FlattenError, Flattener, Limits};

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

fn flatten(layers: Vec<Vec<u8>>) -> (tempfile::TempDir, Result<(), FlattenError>) {
    let tmp = tempfile::tempdir().unwrap();
    let mut f = Flattener::new(&tmp.path().join("tree"), Limits::default(), is_root()).unwrap();
    for l in layers {
        if let Err(e) = f.apply_layer(&l[..]) {
            return (tmp, Err(e));
        }
    }
    f.finish().unwrap();
    (tmp, Ok(()))
}

#[test]
fn layers_apply_in_order_with_whiteouts_and_opaque_dirs() {
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
    let (tmp, r) = flatten(vec![lower, upper]);
    r.unwrap();
    let t = tmp.path().join("tree");
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
    let layer = Layer::new()
        .dir("usr/bin", 0o755)
        .file("usr/bin/su", "su", 0o4755, 0)
        .file("home-file", "mine", 0o640, 1000)
        .dir("tmp", 0o1777)
        .link("usr/bin/sh", EntryType::Symlink, "/bin/busybox")
        .link("usr/bin/su2", EntryType::Link, "usr/bin/su")
        .xattr_file("caps", "user.banger", "yes")
        .bytes();
    let (tmp, r) = flatten(vec![layer]);
    r.unwrap();
    let t = tmp.path().join("tree");
    let su = std::fs::metadata(t.join("usr/bin/su")).unwrap();
    assert_eq!(su.permissions().mode() & 0o7777, 0o4755);
    assert_eq!(
        std::fs::metadata(t.join("tmp"))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777,
        0o1777
    );
    assert_eq!(su.mtime(), 1_600_000_000);
    if is_root() {
        assert_eq!(std::fs::metadata(t.join("home-file")).unwrap().uid(), 1000);
    }
    assert_eq!(
        std::fs::read_link(t.join("usr/bin/sh")).unwrap(),
        Path::new("/bin/busybox")
    );
    assert_eq!(
        std::fs::metadata(t.join("usr/bin/su2")).unwrap().ino(),
        su.ino()
    );
    let mut buf = [0u8; 8];
    let p = std::ffi::CString::new(t.join("caps").to_str().unwrap()).unwrap();
    // SAFETY: both strings are NUL-terminated and the buffer is 8 writable bytes.
    let n = unsafe {
        libc::lgetxattr(
            p.as_ptr(),
            c"user.banger".as_ptr(),
            buf.as_mut_ptr().cast(),
            8,
        )
    };
    assert_eq!(&buf[..n as usize], b"yes");
}

#[test]
fn absolute_symlinks_resolve_inside_the_tree() {
    // var/run -> /run is legitimate; writing var/run/x must land in the tree's /run.
    let lower = Layer::new()
        .dir("run", 0o755)
        .dir("var", 0o755)
        .link("var/run", EntryType::Symlink, "/run")
        .bytes();
    let upper = Layer::new().file("var/run/x", "x", 0o644, 0).bytes();
    let (tmp, r) = flatten(vec![lower, upper]);
    r.unwrap();
    assert!(tmp.path().join("tree/run/x").exists());
}

#[test]
fn a_symlink_to_the_host_root_never_lets_a_write_out() {
    let outside = tempfile::tempdir().unwrap();
    let target = outside.path().to_str().unwrap().to_owned();
    let lower = Layer::new()
        .link("escape", EntryType::Symlink, &target)
        .bytes();
    let upper = Layer::new().file("escape/pwned", "x", 0o644, 0).bytes();
    let (_tmp, r) = flatten(vec![lower.clone(), upper.clone()]);
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
    let (tmp, r) = flatten(vec![lower, mkdirs, upper]);
    r.unwrap();
    assert!(
        !outside.path().join("pwned").exists(),
        "wrote outside the tree"
    );
    let inside = tmp
        .path()
        .join("tree")
        .join(target.trim_start_matches('/'))
        .join("pwned");
    assert!(inside.exists());
}

fn assert_hostile(layers: Vec<Vec<u8>>, needle: &str) {
    let (tmp, r) = flatten(layers);
    match r {
        Err(e @ FlattenError::Hostile { .. }) => assert!(e.to_string().contains(needle), "{e}"),
        other => panic!("expected a hostile-entry error with {needle:?}, got {other:?}"),
    }
    // Nothing next to the tree.
    let names: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("tree")]);
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
    let tmp = tempfile::tempdir().unwrap();
    let limits = Limits {
        max_bytes: 100 * 1024,
        max_entries: 10,
    };
    let mut f = Flattener::new(&tmp.path().join("tree"), limits, is_root()).unwrap();
    match f.apply_layer(&layer[..]) {
        Err(FlattenError::TooLarge { what: "bytes", .. }) => {}
        other => panic!("{other:?}"),
    }
    let many = (0..20)
        .fold(Layer::new(), |l, i| l.file(&format!("f{i}"), "", 0o644, 0))
        .bytes();
    let mut f = Flattener::new(&tmp.path().join("tree2"), limits, is_root()).unwrap();
    match f.apply_layer(&many[..]) {
        Err(FlattenError::TooLarge {
            what: "entries", ..
        }) => {}
        other => panic!("{other:?}"),
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
    let (tmp, r) = flatten(vec![l.bytes()]);
    r.unwrap();
    use std::os::unix::fs::FileTypeExt;
    let m = std::fs::symlink_metadata(tmp.path().join("tree/dev-null")).unwrap();
    assert!(m.file_type().is_char_device());
    assert_eq!(m.rdev(), libc::makedev(1, 3));
    assert!(std::fs::symlink_metadata(tmp.path().join("tree/fifo"))
        .unwrap()
        .file_type()
        .is_fifo());
}
