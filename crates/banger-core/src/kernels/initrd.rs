//! banger's initrd for a modular kernel: the modules needed to reach an ext4 root on
//! virtio block, virtio-net and virtio vsock (over MMIO, and over PCI where the kernel has
//! it), resolved from the kernel's own `modules.dep`, `modules.softdep` and `modules.alias`
//! (dependencies first), packed with the static `banger-init` as `/init` into a newc cpio
//! archive.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use super::error::{failed, invalid};
use crate::guestinit::{MODULE_DIR, MODULE_LIST};
use crate::{host, Result};

/// What the guest needs from the initrd, by module name.
pub const WANTED: &[&str] = &[
    "virtio_mmio",
    "virtio_blk",
    "ext4",
    "virtio_net",
    "vsock",
    "vmw_vsock_virtio_transport",
    "virtio_console",
    "virtio_rng",
];

/// What the guest uses when the kernel has it: virtio over PCI (QEMU then puts the VM's
/// devices there, see [`VIRTIO_PCI`]), the ACPI power button and the event device it
/// reports through (banger-init powers off on it when it is the guest's init), virtio-fs for
/// shared folders, and the memory balloon that reports freed pages to the host.
pub const OPTIONAL: &[&str] = &[VIRTIO_PCI, "button", "evdev", "virtiofs", "virtio_balloon"];

/// The module of virtio's PCI transport. A VM whose initrd says its kernel has it (loaded
/// from the initrd or built in: [`VIRTIO_PCI_MARK`]) gets its devices on PCI (QEMU): a PCI
/// device's queues have the entries it asks for, where QEMU's virtio-mmio offers each 1024
/// whatever the device asked, and Linux fills and sizes to what is offered (8 MiB of the
/// agent port's receive buffers alone).
pub const VIRTIO_PCI: &str = "virtio_pci";

/// The entry of a banger initrd whose kernel has [`VIRTIO_PCI`] (as a module the initrd
/// carries, or built in). Initrds an older banger built have none, and are built again
/// ([`refresh`]).
pub const VIRTIO_PCI_MARK: &str = "etc/banger-virtio-pci";

/// The names of a newc archive's entries, in order, up to its trailer or the first entry that
/// does not parse (the rest is not read).
fn entry_names(cpio: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut at = 0usize;
    std::iter::from_fn(move || {
        let header = cpio.get(at..at + 110)?;
        if &header[..6] != b"070701" {
            return None;
        }
        let field = |i: usize| {
            std::str::from_utf8(&header[6 + 8 * i..14 + 8 * i])
                .ok()
                .and_then(|h| usize::from_str_radix(h, 16).ok())
        };
        let (size, name_len) = (field(6)?, field(11)?);
        let name_at = at + 110;
        let name = cpio.get(name_at..name_at + name_len.checked_sub(1)?)?;
        let data_at = (name_at + name_len).next_multiple_of(4);
        at = data_at.checked_add(size)?.next_multiple_of(4);
        (name != b"TRAILER!!!").then_some(name)
    })
}

/// Whether `initrd` (banger's) says its kernel has virtio's PCI transport.
pub fn virtio_pci(initrd: &[u8]) -> bool {
    entry_names(initrd).any(|n| n == VIRTIO_PCI_MARK.as_bytes())
}

/// A module's canonical name: file stem without `.ko*`, `-` as `_`.
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// The kernel's module index.
#[derive(Debug, Default)]
pub struct ModuleIndex {
    /// name → (path relative to the modules dir, dependency names in modules.dep order)
    deps: HashMap<String, (String, Vec<String>)>,
    /// name → soft pre-dependencies (names or aliases)
    softdeps: HashMap<String, Vec<String>>,
    /// alias → module names
    aliases: HashMap<String, Vec<String>>,
    builtin: HashSet<String>,
}

impl ModuleIndex {
    /// Parses the index files' texts.
    pub fn parse(dep: &str, softdep: &str, alias: &str, builtin: &str) -> Self {
        let mut idx = ModuleIndex::default();
        for line in dep.lines() {
            let Some((m, ds)) = line.split_once(':') else {
                continue;
            };
            let deps = ds.split_whitespace().map(module_name).collect();
            idx.deps.insert(module_name(m), (m.trim().to_owned(), deps));
        }
        for line in softdep.lines() {
            let mut w = line.split_whitespace();
            if w.next() != Some("softdep") {
                continue;
            }
            let Some(m) = w.next() else { continue };
            let mut pre = Vec::new();
            let mut in_pre = false;
            for t in w {
                match t {
                    "pre:" => in_pre = true,
                    "post:" => in_pre = false,
                    t if in_pre => pre.push(t.replace('-', "_")),
                    _ => {}
                }
            }
            idx.softdeps.insert(m.replace('-', "_"), pre);
        }
        for line in alias.lines() {
            let mut w = line.split_whitespace();
            if let (Some("alias"), Some(a), Some(m)) = (w.next(), w.next(), w.next()) {
                idx.aliases
                    .entry(a.replace('-', "_"))
                    .or_default()
                    .push(m.replace('-', "_"));
            }
        }
        idx.builtin = builtin.lines().map(module_name).collect();
        idx
    }

    /// Refuses an index that names a module outside the modules tree (an absolute path, or
    /// one climbing out with `..`): root reads what it names into the initrd.
    fn check_paths(&self) -> Result<()> {
        for (path, _) in self.deps.values() {
            let inside = Path::new(path)
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)));
            if !inside || path.is_empty() {
                return Err(invalid(format!(
                    "modules.dep names {path:?}, outside the modules tree; banger reads only \
                     modules inside it (run depmod on the tree to rebuild the index)"
                )));
            }
        }
        Ok(())
    }

    /// Loads the index of `modules_dir`, running `depmod` first when it has none.
    pub fn load(modules_dir: &Path) -> Result<Self> {
        if !modules_dir.join("modules.dep").exists() {
            depmod(modules_dir)?;
        }
        let read = |f: &str| std::fs::read_to_string(modules_dir.join(f)).unwrap_or_default();
        let dep = std::fs::read_to_string(modules_dir.join("modules.dep"))
            .map_err(|e| failed("Cannot read modules.dep", e))?;
        let idx = Self::parse(
            &dep,
            &read("modules.softdep"),
            &read("modules.alias"),
            &read("modules.builtin"),
        );
        idx.check_paths()?;
        Ok(idx)
    }

    /// Whether the kernel has module `name`, as a module or built in.
    pub fn has(&self, name: &str) -> bool {
        let n = name.replace('-', "_");
        self.builtin.contains(&n) || self.deps.contains_key(&n)
    }

    /// The modules to load for `wanted`, dependencies first, as (name, relative path).
    pub fn resolve(&self, wanted: &[&str]) -> Result<Vec<(String, String)>> {
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        for w in wanted {
            let w = w.replace('-', "_");
            if self.builtin.contains(&w) {
                continue;
            }
            if !self.deps.contains_key(&w) {
                return Err(invalid(format!(
                    "The kernel has no module {w} and does not build it in; banger needs it to boot guests"
                )));
            }
            self.visit(&w, &mut seen, &mut out, false);
        }
        Ok(out)
    }

    fn visit(
        &self,
        name: &str,
        seen: &mut HashSet<String>,
        out: &mut Vec<(String, String)>,
        soft: bool,
    ) {
        if !seen.insert(name.to_owned()) || self.builtin.contains(name) {
            return;
        }
        let Some((path, deps)) = self.deps.get(name) else {
            // A soft dependency may name an alias (crc32c → crc32c_generic, crc32c_intel).
            if soft {
                for m in self.aliases.get(name).cloned().unwrap_or_default() {
                    self.visit(&m, seen, out, true);
                }
            }
            return;
        };
        for pre in self.softdeps.get(name).cloned().unwrap_or_default() {
            self.visit(&pre, seen, out, true);
        }
        // modprobe loads the last dependency first.
        for d in deps.iter().rev() {
            self.visit(d, seen, out, false);
        }
        out.push((name.to_owned(), path.clone()));
    }
}

/// Runs `depmod` for a modules directory, seen through `lib/modules/<name>` in a directory of
/// its own. depmod reads the name only to find the tree, so it is a fixed one: the kernel's
/// version may be unknown (an ELF vmlinux does not declare it) and is the caller's words.
fn depmod(modules_dir: &Path) -> Result<()> {
    const NAME: &str = "0.0-banger"; // depmod wants it to start like a version
    let tmp = tempfile::tempdir().map_err(|e| failed("Cannot create a temporary directory", e))?;
    let lib = tmp.path().join("lib/modules");
    std::fs::create_dir_all(&lib).map_err(|e| failed("Cannot prepare depmod", e))?;
    std::os::unix::fs::symlink(modules_dir, lib.join(NAME))
        .map_err(|e| failed("Cannot prepare depmod", e))?;
    host::run(
        "depmod",
        ["-b".as_ref(), tmp.path().as_os_str(), NAME.as_ref()],
    )
}

/// A newc cpio archive being written.
#[derive(Default)]
pub struct Cpio {
    out: Vec<u8>,
    ino: u32,
}

fn pad4(v: &mut Vec<u8>) {
    while !v.len().is_multiple_of(4) {
        v.push(0);
    }
}

impl Cpio {
    /// Appends an entry; `mode` includes the file type bits.
    pub fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.ino += 1;
        let fields = [
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        pad4(&mut self.out);
        self.out.extend_from_slice(data);
        pad4(&mut self.out);
    }

    /// Ends the archive.
    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.out
    }
}

/// Builds the initrd for `modules_dir` with `init` (the static banger-init) as `/init`.
pub fn build(modules_dir: &Path, init: &Path) -> Result<Vec<u8>> {
    // The index first: a hostile one is refused before anything is read.
    let idx = ModuleIndex::load(modules_dir)?;
    let mut wanted: Vec<&str> = WANTED.to_vec();
    wanted.extend(OPTIONAL.iter().filter(|m| idx.has(m)));
    let modules = idx.resolve(&wanted)?;
    let init_bin = std::fs::read(init)
        .map_err(|e| failed(format!("Cannot read banger-init at {}", init.display()), e))?;
    if !host::is_static_elf(&init_bin) {
        return Err(failed(
            format!(
                "{} is not a static executable and cannot run in an initrd",
                init.display()
            ),
            std::io::Error::other(
                "build banger-init with RUSTFLAGS='-C target-feature=+crt-static'",
            ),
        ));
    }
    let mut cpio = skeleton();
    cpio.entry("init", 0o100755, (0, 0), &init_bin);
    let mut list = String::new();
    for (name, rel) in &modules {
        let data = module_object(rel, read_inside(modules_dir, rel)?)?;
        cpio.entry(&format!("{MODULE_DIR}/{name}.ko"), 0o100644, (0, 0), &data);
        list.push_str(name);
        list.push('\n');
    }
    if idx.has(VIRTIO_PCI) {
        cpio.entry(VIRTIO_PCI_MARK, 0o100644, (0, 0), &[]);
    }
    cpio.entry(MODULE_LIST, 0o100644, (0, 0), list.as_bytes());
    Ok(cpio.finish())
}

/// Builds a kernel's banger initrd (`initrd`, from its `modules_dir`) again when an older
/// banger built it without what this one adds for a kernel that has it: today virtio's PCI
/// transport ([`VIRTIO_PCI_MARK`]). Written aside, synced and renamed over the old one; a VM
/// that runs keeps the file its VMM mapped (made from the old one by [`current`]), and the
/// next start makes its own from the new one. `Ok(false)` when there is nothing to do: not
/// banger's, marked already, or a kernel without the transport. For the daemon's start, when
/// no start is choosing an initrd. Blocking.
pub fn refresh(initrd: &Path, modules_dir: &Path, init: &Path) -> Result<bool> {
    let old = std::fs::read(initrd)
        .map_err(|e| failed(format!("Cannot read {}", initrd.display()), e))?;
    if !is_bangers(&old) || virtio_pci(&old) || !ModuleIndex::load(modules_dir)?.has(VIRTIO_PCI) {
        return Ok(false);
    }
    let data = build(modules_dir, init)?;
    let mode = std::fs::metadata(initrd)
        .map_err(|e| failed(format!("Cannot inspect {}", initrd.display()), e))?
        .permissions();
    write_aside(initrd, &data, Some(mode))?;
    Ok(true)
}

/// Writes `data` as `path`: aside in its directory (named so [`sweep_current`] removes what a
/// crash leaves), synced, with `mode` (else the staging file's 0600), renamed in. Blocking.
fn write_aside(path: &Path, data: &[u8], mode: Option<std::fs::Permissions>) -> Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let staging = tempfile::Builder::new()
        .prefix(CURRENT_STAGING)
        .tempfile_in(dir)
        .map_err(|e| failed(format!("Cannot write in {}", dir.display()), e))?;
    let fail = |e| failed(format!("Cannot write {}", path.display()), e);
    staging.as_file().write_all(data).map_err(fail)?;
    if let Some(mode) = mode {
        staging.as_file().set_permissions(mode).map_err(fail)?;
    }
    // A torn file after a crash would be taken for a whole one by its name.
    staging.as_file().sync_all().map_err(fail)?;
    staging.persist(path).map_err(|e| fail(e.error))?;
    Ok(())
}

/// What every banger initrd holds before its init and modules: the mount points, the
/// console banger-init writes to before devtmpfs, and the modules' directory.
fn skeleton() -> Cpio {
    let mut cpio = Cpio::default();
    for d in ["dev", "proc", "sys", "newroot", "etc", MODULE_DIR] {
        cpio.entry(d, 0o040755, (0, 0), &[]);
    }
    cpio.entry("dev/console", 0o020600, (5, 1), &[]);
    cpio
}

/// banger's initrd for a kernel that has every driver it needs built in (no modules, no
/// initrd of its own): the skeleton and an empty module list. banger-init is appended as
/// for every banger initrd ([`current`]).
fn builtin_base() -> Vec<u8> {
    let mut cpio = skeleton();
    cpio.entry(MODULE_LIST, 0o100644, (0, 0), b"");
    cpio.finish()
}

/// The most a module may decompress to: the initrd's are far smaller (Debian's largest
/// module of all is about 20 MiB).
const MAX_MODULE_BYTES: u64 = 64 << 20;

/// Module `rel` (its file's `data`) as the kernel loads it: a compressed one (`.ko.xz`,
/// `.ko.zst`, `.ko.gz`: bookworm-backports' 6.12 kernels ship xz) decompressed by
/// its tool, run as a worker (not root), to at most [`MAX_MODULE_BYTES`], and it must then be
/// an ELF object. banger-init loads uncompressed modules only, whatever the kernel can do.
fn module_object(rel: &str, data: Vec<u8>) -> Result<Vec<u8>> {
    let (tool, args): (&str, &[&str]) = if rel.ends_with(".ko.xz") {
        ("xz", &["-dc"])
    } else if rel.ends_with(".ko.zst") {
        ("zstd", &["-dcq"])
    } else if rel.ends_with(".ko.gz") {
        ("gzip", &["-dc"])
    } else {
        return Ok(data);
    };
    let out = match super::vmlinux::decompress(tool, args, &data, MAX_MODULE_BYTES) {
        Err(crate::Error::Kernel(super::error::KernelError::TooLarge(_))) => {
            return Err(invalid(format!(
                "Module {rel} decompresses to more than {MAX_MODULE_BYTES} bytes; it is not a \
                 module banger will load"
            )))
        }
        r => r?,
    };
    if !out.starts_with(b"\x7fELF") {
        return Err(invalid(format!(
            "Module {rel} did not decompress to an ELF object ({tool} -d); it is not a module \
             banger will load"
        )));
    }
    Ok(out)
}

/// Reads `rel` below `root` without following a symbolic link on the way (the import
/// refused links that leave the tree; this holds even for a tree made otherwise).
fn read_inside(root: &Path, rel: &str) -> Result<Vec<u8>> {
    let mut p = root.to_path_buf();
    for c in Path::new(rel).components() {
        p.push(c);
        let meta = std::fs::symlink_metadata(&p)
            .map_err(|e| failed(format!("Cannot read module {rel}"), e))?;
        if meta.file_type().is_symlink() {
            return Err(invalid(format!(
                "Module {rel} is reached through a symbolic link; banger reads only modules stored in the tree"
            )));
        }
    }
    std::fs::read(&p).map_err(|e| failed(format!("Cannot read module {rel}"), e))
}

/// Whether `initrd` is one banger built (it lists its modules in `etc/banger-modules`).
pub fn is_bangers(initrd: &[u8]) -> bool {
    entry_names(initrd).any(|n| n == MODULE_LIST.as_bytes())
}

/// Where the appended archive carries the current agent; banger-init installs it in the root.
pub const AGENT_IN_INITRD: &str = "banger-agent";

/// `initrd` followed by a second archive holding `init` as `/init` (and `agent`, when given,
/// as `/banger-agent`). The kernel unpacks concatenated archives in order, so the init of this
/// banger replaces the one the initrd was built with, and banger-init refreshes the image's
/// agent: kernels and images made by an older banger still boot with today's guest side.
pub fn with_current_init(initrd: &[u8], init: &Path, agent: Option<&Path>) -> Result<Vec<u8>> {
    let init_bin = std::fs::read(init)
        .map_err(|e| failed(format!("Cannot read banger-init at {}", init.display()), e))?;
    if !host::is_static_elf(&init_bin) {
        return Err(failed(
            format!("{} is not a static executable", init.display()),
            std::io::Error::other(
                "build banger-init with RUSTFLAGS='-C target-feature=+crt-static'",
            ),
        ));
    }
    let mut cpio = Cpio::default();
    cpio.entry("init", 0o100755, (0, 0), &init_bin);
    if let Some(a) = agent {
        let bin =
            std::fs::read(a).map_err(|e| failed(format!("Cannot read {}", a.display()), e))?;
        if host::is_static_elf(&bin) {
            cpio.entry(AGENT_IN_INITRD, 0o100755, (0, 0), &bin);
        } else {
            tracing::warn!(
                "{} is not static; guests keep the agent their image has",
                a.display()
            );
        }
    }
    let mut out = initrd.to_vec();
    // Each archive starts on a 4-byte boundary.
    out.resize(out.len().next_multiple_of(4), 0);
    out.extend(cpio.finish());
    Ok(out)
}

/// The prefix of the initrds [`current`] makes beside a kernel's own.
const CURRENT_PREFIX: &str = "initrd.banger-";
/// The prefix of one being written.
const CURRENT_STAGING: &str = ".initrd.banger-";

/// The name of `initrd` with this `init` and `agent` appended, for the three files as they
/// are now (device, inode, size, change and modification times): a rebuilt guest binary or
/// a replaced initrd gives another name, an unchanged one the same, without reading them.
/// `initrd` None names the initrd of a kernel without one ([`builtin_base`]).
pub fn current_name(initrd: Option<&Path>, init: &Path, agent: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    if initrd.is_none() {
        h.update("built in\n");
    }
    for f in initrd.into_iter().chain([init, agent]) {
        match std::fs::metadata(f) {
            Ok(m) => {
                let (dev, ino, size, mtime, mtime_ns, ctime, ctime_ns) = file_id(&m);
                h.update(format!(
                    "{dev} {ino} {size} {mtime}.{mtime_ns} {ctime}.{ctime_ns}\n"
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && f == agent => h.update("-\n"),
            Err(e) => return Err(failed(format!("Cannot inspect {}", f.display()), e)),
        }
    }
    let hex: String = h.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(format!("{CURRENT_PREFIX}{hex}.img"))
}

/// The initrd a VM boots with, and whether it loads virtio's PCI transport.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Current {
    /// The file.
    pub path: std::path::PathBuf,
    /// Its kernel has [`VIRTIO_PCI`] (a banger initrd marked so, [`VIRTIO_PCI_MARK`]): the
    /// VM's devices may sit on PCI.
    pub virtio_pci: bool,
}

/// The initrd a VM boots with: a kernel's own, or, for one banger built, that initrd with
/// this banger's `init` and `agent` appended ([`with_current_init`]); for a kernel without
/// an initrd (`initrd` None: every driver built in), banger's own without modules
/// ([`builtin_base`]) with them appended, in `dir` (the kernel's). What banger makes is made once
/// per kernel and guest binaries, beside the kernel (written aside, synced, renamed in), and
/// every VM's VMM maps that one file: the host holds one copy in its page cache, not one
/// per VM. Blocking.
pub fn current(dir: &Path, initrd: Option<&Path>, init: &Path, agent: &Path) -> Result<Current> {
    // Which modules the kernel's initrd loads decides the VM's devices: it is read (a few
    // MiB) the first time its file is seen, then known by the file's identity.
    let read =
        |i: &Path| std::fs::read(i).map_err(|e| failed(format!("Cannot read {}", i.display()), e));
    let mut data = None;
    let pci = match initrd {
        Some(i) => {
            let (bangers, pci) = match seen_initrd(i)? {
                (_, Some(facts)) => facts,
                (id, None) => {
                    let d = read(i)?;
                    let facts = (is_bangers(&d), virtio_pci(&d));
                    remember_initrd(id, facts);
                    data = Some(d);
                    facts
                }
            };
            if !bangers {
                return Ok(Current {
                    path: i.to_owned(),
                    virtio_pci: false,
                });
            }
            pci
        }
        None => false,
    };
    let name = current_name(initrd, init, agent)?;
    let out = dir.join(&name);
    if out.exists() {
        return Ok(Current {
            path: out,
            virtio_pci: pci,
        });
    }
    let data = match (initrd, data) {
        (_, Some(d)) => d,
        (Some(i), None) => read(i)?,
        (None, None) => builtin_base(),
    };
    let agent = Some(agent).filter(|a| a.exists());
    let data = with_current_init(&data, init, agent)?;
    write_aside(&out, &data, None)?;
    Ok(Current {
        path: out,
        virtio_pci: pci,
    })
}

/// A file's identity: device, inode, size, modification and change times. A kernel's
/// initrd is root's and replaced whole, never rewritten in place: another file, another
/// identity.
type FileId = (u64, u64, u64, i64, i64, i64, i64);

fn file_id(m: &std::fs::Metadata) -> FileId {
    use std::os::unix::fs::MetadataExt;
    (
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec(),
    )
}

/// What [`current`] learnt of the initrds it read: whether each is banger's, and whether it
/// loads virtio's PCI transport. Reading and scanning one cost every start some 8 ms.
static SEEN_INITRDS: std::sync::Mutex<Option<HashMap<FileId, (bool, bool)>>> =
    std::sync::Mutex::new(None);

/// `initrd`'s identity (taken before any read of it) and what is known of it.
fn seen_initrd(initrd: &Path) -> Result<(FileId, Option<(bool, bool)>)> {
    let m = std::fs::metadata(initrd)
        .map_err(|e| failed(format!("Cannot read {}", initrd.display()), e))?;
    let id = file_id(&m);
    let seen = SEEN_INITRDS.lock().unwrap_or_else(|e| e.into_inner());
    Ok((id, seen.as_ref().and_then(|s| s.get(&id).copied())))
}

fn remember_initrd(id: FileId, facts: (bool, bool)) {
    let mut seen = SEEN_INITRDS.lock().unwrap_or_else(|e| e.into_inner());
    let seen = seen.get_or_insert_with(HashMap::new);
    // One entry per kernel; files of removed kernels would pile up without a bound.
    if seen.len() >= 256 {
        seen.clear();
    }
    seen.insert(id, facts);
}

/// Removes, in a kernel's directory, what [`current`] made that is not named `keep` (stale:
/// made for other guest binaries) and what it left half-written. For the daemon's start,
/// when no start is choosing an initrd; a VM that runs keeps the file it mapped.
pub fn sweep_current(kernel_dir: &Path, keep: Option<&str>) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let entries = match std::fs::read_dir(kernel_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(failed(format!("Cannot list {}", kernel_dir.display()), e)),
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let ours = name.starts_with(CURRENT_STAGING) || name.starts_with(CURRENT_PREFIX);
        if ours && Some(name.as_str()) != keep {
            std::fs::remove_file(entry.path())
                .map_err(|e| failed(format!("Cannot remove {}", entry.path().display()), e))?;
            removed.push(name);
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/virtio/virtio_mmio.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio.ko:
kernel/fs/ext4/ext4.ko: kernel/lib/crc16.ko kernel/fs/mbcache.ko kernel/fs/jbd2/jbd2.ko
kernel/lib/crc16.ko:
kernel/fs/mbcache.ko:
kernel/fs/jbd2/jbd2.ko:
kernel/crypto/crc32c_generic.ko:
kernel/drivers/char/hw_random/virtio-rng.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
";

    #[test]
    fn dependencies_come_first_with_softdeps_through_aliases() {
        let idx = ModuleIndex::parse(
            DEP,
            "softdep ext4 pre: crc32c\n",
            "alias crc32c crc32c_generic\n",
            "kernel/net/vsock.ko\n",
        );
        let order: Vec<String> = idx
            .resolve(&["virtio_blk", "ext4", "vsock", "virtio-rng"])
            .unwrap()
            .into_iter()
            .map(|m| m.0)
            .collect();
        let pos = |n: &str| {
            order
                .iter()
                .position(|m| m == n)
                .unwrap_or_else(|| panic!("{n} in {order:?}"))
        };
        assert!(
            pos("virtio") < pos("virtio_ring") && pos("virtio_ring") < pos("virtio_blk"),
            "{order:?}"
        );
        assert!(pos("crc32c_generic") < pos("ext4") && pos("jbd2") < pos("ext4"));
        assert!(!order.contains(&"vsock".to_string()), "built in");
        assert_eq!(order.iter().filter(|m| *m == "virtio").count(), 1);
        assert!(order.contains(&"virtio_rng".to_string()));
        let e = idx.resolve(&["virtio_net"]).unwrap_err();
        assert!(e.to_string().contains("no module virtio_net"), "{e}");
    }

    #[test]
    fn an_index_naming_files_outside_the_tree_is_refused() {
        assert!(ModuleIndex::parse(DEP, "", "", "").check_paths().is_ok());
        for bad in [
            "/etc/shadow.ko:",
            "kernel/../../x.ko:",
            "../x.ko: kernel/a.ko",
        ] {
            let e = ModuleIndex::parse(bad, "", "", "")
                .check_paths()
                .unwrap_err();
            assert!(e.to_string().contains("outside the modules tree"), "{e}");
        }
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("kernel")).unwrap();
        std::fs::write(d.path().join("kernel/a.ko"), b"module").unwrap();
        std::os::unix::fs::symlink("/etc/hostname", d.path().join("kernel/b.ko")).unwrap();
        assert_eq!(read_inside(d.path(), "kernel/a.ko").unwrap(), b"module");
        let e = read_inside(d.path(), "kernel/b.ko").unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
    }

    #[test]
    fn cpio_entries_are_newc_and_aligned() {
        let mut c = Cpio::default();
        c.entry("init", 0o100755, (0, 0), b"abc");
        let out = c.finish();
        assert!(out.starts_with(b"070701"));
        assert_eq!(out.len() % 4, 0);
        assert!(out.windows(10).any(|w| w == b"TRAILER!!!"));
    }

    #[test]
    fn only_static_elves_pass() {
        assert!(!host::is_static_elf(b"#!/bin/sh"));
        let me = std::fs::read("/proc/self/exe").unwrap();
        // Test binaries are dynamically linked.
        assert!(!host::is_static_elf(&me));
    }

    #[test]
    fn an_appended_init_follows_a_banger_initrd() {
        let mut c = Cpio::default();
        c.entry(MODULE_LIST, 0o100644, (0, 0), b"virtio\n");
        c.entry("init", 0o100755, (0, 0), b"old init");
        let old = c.finish();
        assert!(is_bangers(&old));
        assert!(!is_bangers(b"\x1f\x8b a gzip initrd from a distribution"));
        let init = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(init.path(), b"not an ELF").unwrap();
        assert!(
            with_current_init(&old, init.path(), None).is_err(),
            "a dynamic init is refused"
        );
        let me = std::fs::read("/proc/self/exe").unwrap();
        if host::is_static_elf(&me) {
            let new = with_current_init(&old, Path::new("/proc/self/exe"), None).unwrap();
            assert!(new.starts_with(&old) && new.len() > old.len() + me.len());
        }
    }

    #[test]
    fn the_current_initrd_is_made_once_per_guest_binaries_and_stale_ones_are_swept() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let mut c = Cpio::default();
        c.entry(MODULE_LIST, 0o100644, (0, 0), b"virtio\n");
        let base = c.finish();
        std::fs::write(d.join("initrd.img"), &base).unwrap();
        // The smallest static ELF is_static_elf takes: a header without program headers.
        let mut elf = b"\x7fELF\x02".to_vec();
        elf.resize(64, 0);
        let (init, agent) = (d.join("bin-init"), d.join("bin-agent"));
        std::fs::write(&init, &elf).unwrap();
        let first = current(d, Some(&d.join("initrd.img")), &init, &agent).unwrap();
        assert!(!first.virtio_pci, "no virtio_pci module");
        let first = first.path;
        assert_eq!(first.parent(), Some(d));
        let data = std::fs::read(&first).unwrap();
        assert!(
            data.starts_with(&base) && data.len() > base.len(),
            "init appended"
        );
        let ino = std::fs::metadata(&first).unwrap().ino();
        let again = current(d, Some(&d.join("initrd.img")), &init, &agent)
            .unwrap()
            .path;
        assert_eq!(
            (&again, std::fs::metadata(&again).unwrap().ino()),
            (&first, ino)
        );
        // Another init (a rebuilt banger): another file; the sweep keeps it and the kernel's.
        std::fs::remove_file(&init).unwrap();
        elf.push(0);
        std::fs::write(&init, &elf).unwrap();
        let second = current(d, Some(&d.join("initrd.img")), &init, &agent)
            .unwrap()
            .path;
        assert_ne!(second, first);
        std::fs::write(d.join(".initrd.banger-torn"), b"half").unwrap();
        let keep = current_name(Some(&d.join("initrd.img")), &init, &agent).unwrap();
        let mut removed = sweep_current(d, Some(&keep)).unwrap();
        removed.sort();
        let stale = first.file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(removed, [".initrd.banger-torn".to_string(), stale]);
        assert!(second.exists() && d.join("initrd.img").exists() && init.exists());
        // A distribution's initrd is booted as it is.
        std::fs::write(d.join("initrd.img"), b"\x1f\x8b gzip").unwrap();
        let theirs = current(d, Some(&d.join("initrd.img")), &init, &agent).unwrap();
        assert_eq!(
            theirs,
            Current {
                path: d.join("initrd.img"),
                virtio_pci: false
            }
        );
        // A banger initrd that carries virtio's PCI transport says so, made or already there.
        let mut c = skeleton();
        c.entry(&format!("{MODULE_DIR}/virtio.ko"), 0o100644, (0, 0), b"m");
        c.entry(
            &format!("{MODULE_DIR}/{VIRTIO_PCI}.ko"),
            0o100644,
            (0, 0),
            b"mm",
        );
        c.entry(VIRTIO_PCI_MARK, 0o100644, (0, 0), b"");
        c.entry(MODULE_LIST, 0o100644, (0, 0), b"virtio\nvirtio_pci\n");
        std::fs::write(d.join("initrd.img"), c.finish()).unwrap();
        let pci = current(d, Some(&d.join("initrd.img")), &init, &agent).unwrap();
        assert!(pci.virtio_pci && pci.path.exists());
        // Marked already, or not banger's: nothing to build again (the modules are not read).
        let none = d.join("no-modules");
        assert!(!refresh(&d.join("initrd.img"), &none, &init).unwrap());
        std::fs::write(d.join("theirs.img"), b"\x1f\x8b gzip").unwrap();
        assert!(!refresh(&d.join("theirs.img"), &none, &init).unwrap());
        assert_eq!(
            current(d, Some(&d.join("initrd.img")), &init, &agent).unwrap(),
            pci
        );
    }

    #[test]
    fn an_archives_entries_are_read_by_their_headers() {
        let mut c = skeleton();
        c.entry(
            &format!("{MODULE_DIR}/virtio_pci_modern_dev.ko"),
            0o100644,
            (0, 0),
            b"abcde",
        );
        c.entry(MODULE_LIST, 0o100644, (0, 0), b"virtio_pci_modern_dev\n");
        let a = c.finish();
        let names: Vec<String> = entry_names(&a)
            .map(|n| String::from_utf8_lossy(n).into_owned())
            .collect();
        assert_eq!(names.last().map(String::as_str), Some(MODULE_LIST));
        assert!(names.contains(&format!("{MODULE_DIR}/virtio_pci_modern_dev.ko")));
        assert!(is_bangers(&a) && !virtio_pci(&a));
        // A name only inside a file's data is not an entry.
        let mut c = Cpio::default();
        c.entry("notes", 0o100644, (0, 0), VIRTIO_PCI_MARK.as_bytes());
        c.entry(MODULE_LIST, 0o100644, (0, 0), b"");
        assert!(!virtio_pci(&c.finish()));
        // Torn or foreign archives end the walk; nothing past them is read.
        assert!(entry_names(&a[..a.len() / 2]).count() < names.len());
        assert_eq!(entry_names(b"\x1f\x8b gzip").count(), 0);
        assert_eq!(entry_names(b"070701zzzzzzzz").count(), 0);
    }

    /// A kernel without an initrd (every driver built in) boots with banger's own: no
    /// modules, an empty list (so banger-init loads none), this banger's init appended;
    /// made once, and kept by the sweep under its own name.
    #[test]
    fn a_kernel_without_an_initrd_gets_bangers_without_modules() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let mut elf = b"\x7fELF\x02".to_vec();
        elf.resize(64, 0);
        let (init, agent) = (d.join("bin-init"), d.join("bin-agent"));
        std::fs::write(&init, &elf).unwrap();
        let made = current(d, None, &init, &agent).unwrap();
        assert!(!made.virtio_pci, "built in: MMIO");
        let made = made.path;
        assert_eq!(made.parent(), Some(d));
        let data = std::fs::read(&made).unwrap();
        let base = builtin_base();
        assert!(
            data.starts_with(&base) && is_bangers(&data),
            "banger's skeleton first"
        );
        let text = String::from_utf8_lossy(&base);
        assert!(
            text.contains(MODULE_LIST) && !text.contains(".ko"),
            "no modules: {text:?}"
        );
        assert!(data.len() > base.len() + elf.len(), "init appended");
        assert_eq!(
            current(d, None, &init, &agent).unwrap().path,
            made,
            "made once"
        );
        let keep = current_name(None, &init, &agent).unwrap();
        assert_eq!(made.file_name().unwrap().to_string_lossy(), keep);
        assert!(sweep_current(d, Some(&keep)).unwrap().is_empty());
        // Its name is not that of a kernel's own initrd with the same binaries.
        std::fs::write(d.join("initrd.img"), &base).unwrap();
        assert_ne!(
            current_name(Some(&d.join("initrd.img")), &init, &agent).unwrap(),
            keep
        );
    }

    /// A compressed module is what its tool makes of it, if that is an ELF object of bounded
    /// size: a caller's module that decompresses to something else, or to a bomb, is refused.
    #[test]
    fn compressed_modules_are_decompressed_within_bounds() {
        use super::super::tool_tests::{through, tool};
        let Some(xz) = tool("xz") else {
            return;
        };
        let compress = |data: &[u8]| through(&xz, &["-0", "-c"], data);
        let elf = [b"\x7fELF\x02\x01\x01".as_slice(), &[7u8; 10_000]].concat();
        assert_eq!(module_object("k/a.ko.xz", compress(&elf)).unwrap(), elf);
        assert_eq!(
            module_object("k/a.ko", elf.clone()).unwrap(),
            elf,
            "as it is"
        );
        let e = module_object("k/b.ko.xz", compress(b"#!/bin/sh\n")).unwrap_err();
        assert!(
            e.to_string()
                .contains("did not decompress to an ELF object"),
            "{e}"
        );
        let bomb = compress(&vec![0u8; (MAX_MODULE_BYTES + (1 << 20)) as usize]);
        assert!(bomb.len() < 1 << 20, "{} bytes", bomb.len());
        let e = module_object("k/c.ko.xz", bomb).unwrap_err();
        assert!(e.to_string().contains("decompresses to more than"), "{e}");
        let e = module_object("k/d.ko.xz", b"not xz at all".to_vec()).unwrap_err();
        assert!(e.to_string().contains("xz"), "{e}");
    }
}
