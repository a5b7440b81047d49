//! `banger-init`: PID 1 of banger's initrd. It loads the modules the initrd lists (in
//! dependency order, resolved by the host), waits a bounded time for the root device, mounts
//! it, moves `/dev`, `/proc` and `/sys` over and switches root to the system's init. Any
//! failure is printed on the console as `banger-init: …` and the VM powers off instead of
//! hanging. No shell or busybox is involved: this is the whole initrd userspace.

pub mod net;
pub mod park;
pub mod putfile;
pub mod runas;
pub mod supervise;

use std::ffi::CString;
use std::path::Path;
use std::time::{Duration, Instant};

/// The initrd file listing modules to load, one name per line, in load order.
pub const MODULE_LIST: &str = "etc/banger-modules";
/// Where the initrd keeps the modules (`modules/<name>.ko`).
pub const MODULE_DIR: &str = "modules";

/// What the kernel command line asks of the init.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cmdline {
    /// `root=`: the root device.
    pub root: String,
    /// `rootfstype=`.
    pub fstype: String,
    /// `ro` (the default) or `rw`.
    pub read_only: bool,
    /// `init=`: the system init to run.
    pub init: String,
    /// `banger.rootwait=`: seconds to wait for the root device.
    pub root_wait: u64,
    /// `banger.work=`: the persistent disk to mount on `/root`.
    pub work: Option<String>,
    /// `banger.init=banger`: `banger-init` stays PID 1 whatever the image holds (it does
    /// anyway when the image has no `init`).
    pub stay_init: bool,
    /// Whether `init=` named the init (then a missing one is an error, not banger-init's
    /// cue to stay).
    pub init_named: bool,
    /// `banger.main=1`: run the VM's main process (`/root/.banger/main.json`) and power off
    /// when it exits.
    pub main: bool,
    /// `banger.share=TAG:DIR[:ro]` (repeatable): virtio-fs shares to mount.
    pub shares: Vec<GuestShare>,
    /// `banger.park=1`: wait with the agent of the initrd until the host asks for the root
    /// (a warm template of folder roots; see [`park`]).
    pub park: bool,
}

/// A shared folder the guest mounts: its virtio-fs tag, where, and whether read-only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestShare {
    /// The virtio-fs tag.
    pub tag: String,
    /// The mount point (absolute).
    pub dir: String,
    /// Mounted read-only.
    pub read_only: bool,
}

impl GuestShare {
    fn parse(v: &str) -> Option<Self> {
        let (rest, read_only) = match v.strip_suffix(":ro") {
            Some(r) => (r, true),
            None => (v, false),
        };
        let (tag, dir) = rest.split_once(':')?;
        (!tag.is_empty() && dir.starts_with('/')).then(|| GuestShare {
            tag: tag.into(),
            dir: dir.into(),
            read_only,
        })
    }
}

/// Parses `/proc/cmdline`.
pub fn parse_cmdline(s: &str) -> Cmdline {
    let mut c = Cmdline {
        root: "/dev/vda".into(),
        fstype: "ext4".into(),
        read_only: true,
        init: "/sbin/init".into(),
        root_wait: 10,
        work: None,
        stay_init: false,
        init_named: false,
        main: false,
        shares: Vec::new(),
        park: false,
    };
    for arg in s.split_whitespace() {
        match arg.split_once('=') {
            Some(("root", v)) => c.root = v.into(),
            Some(("rootfstype", v)) => c.fstype = v.into(),
            Some(("init", v)) => {
                c.init = v.into();
                c.init_named = true;
            }
            Some(("banger.rootwait", v)) => c.root_wait = v.parse().unwrap_or(c.root_wait),
            Some(("banger.work", v)) => c.work = Some(v.into()),
            Some(("banger.init", v)) => c.stay_init = v == "banger",
            Some(("banger.main", v)) => c.main = v == "1",
            Some(("banger.park", v)) => c.park = v == "1",
            Some(("banger.share", v)) => c.shares.extend(GuestShare::parse(v)),
            None if arg == "rw" => c.read_only = false,
            None if arg == "ro" => c.read_only = true,
            _ => {}
        }
    }
    c
}

fn cstr(s: &str) -> CString {
    CString::new(s).unwrap_or_default()
}

fn say(msg: &str) {
    supervise::console(&format!("banger-init: {msg}"));
}

fn fail(msg: &str) -> ! {
    say(msg);
    park::tell_failure(msg);
    say("powering off");
    std::thread::sleep(Duration::from_secs(1));
    // SAFETY: sync and reboot take no pointers; reboot only returns on failure.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Mounts `src` on `target` (`fstype` empty: none, as for a bind).
pub(crate) fn mount(
    src: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
) -> Result<(), String> {
    let (s, t, f) = (cstr(src), cstr(target), cstr(fstype));
    let fptr = if fstype.is_empty() {
        std::ptr::null()
    } else {
        f.as_ptr()
    };
    // SAFETY: all strings are NUL-terminated and outlive the call; data is null.
    let r = unsafe { libc::mount(s.as_ptr(), t.as_ptr(), fptr, flags, std::ptr::null()) };
    if r != 0 {
        return Err(format!(
            "mount {src} on {target}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Mounts a shared folder under `root`, making its mount point when the image lacks it. A
/// share that cannot be mounted stops the boot: a guest that silently lacks a folder its
/// owner shared would write where the owner does not look.
fn mount_share(s: &GuestShare, root: &str) {
    let target = format!("{root}{}", s.dir);
    if let Err(e) = std::fs::create_dir_all(&target) {
        fail(&format!(
            "cannot make the mount point {} of share {}: {e}",
            s.dir, s.tag
        ));
    }
    let mut flags = libc::MS_NOSUID | libc::MS_NODEV;
    if s.read_only {
        flags |= libc::MS_RDONLY;
    }
    if let Err(e) = mount(&s.tag, &target, "virtiofs", flags) {
        fail(&format!(
            "cannot mount shared folder {} on {}: {e} (a kernel without virtiofs: pull the \
             kernel again with this banger)",
            s.tag, s.dir
        ));
    }
    say(&format!(
        "shared folder {} on {}{}",
        s.tag,
        s.dir,
        if s.read_only { " (read-only)" } else { "" }
    ));
}

fn mount_data(
    src: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> Result<(), String> {
    let (s, t, f, d) = (cstr(src), cstr(target), cstr(fstype), cstr(data));
    // SAFETY: all strings are NUL-terminated and outlive the call.
    let r = unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), flags, d.as_ptr().cast()) };
    if r != 0 {
        return Err(format!(
            "mount {fstype} on {target}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

fn load_module(path: &Path) -> Result<(), String> {
    let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    use std::os::fd::AsRawFd;
    // SAFETY: finit_module reads the module from the open fd; the params string is "".
    let r = unsafe { libc::syscall(libc::SYS_finit_module, f.as_raw_fd(), c"".as_ptr(), 0) };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EEXIST) {
            return Err(format!("{}: {e}", path.display()));
        }
    }
    Ok(())
}

/// The device a `root=`/`banger.work=` value names: a path, or `serial:S` for the virtio
/// disk whose serial is S (virtio-mmio disks are not numbered in command-line order).
pub fn resolve_device(spec: &str, sys_block: &Path) -> Option<String> {
    let Some(serial) = spec.strip_prefix("serial:") else {
        return Path::new(spec).exists().then(|| spec.to_owned());
    };
    for e in std::fs::read_dir(sys_block).ok()?.flatten() {
        let s = std::fs::read_to_string(e.path().join("serial")).unwrap_or_default();
        if s.trim() == serial {
            return Some(format!("/dev/{}", e.file_name().to_string_lossy()));
        }
    }
    None
}

fn wait_device(spec: &str, secs: u64) -> Option<String> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(d) = resolve_device(spec, Path::new("/sys/block")) {
            if Path::new(&d).exists() {
                return Some(d);
            }
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Where images carry the agent.
const AGENT: &str = "/usr/local/bin/banger-agent";

/// Starts the agent as a child when the system's init is not systemd (which starts it
/// through its unit).
fn start_agent_unless_systemd(init: &str) {
    let is_systemd = std::fs::canonicalize(init)
        .map(|p| p.file_name().is_some_and(|n| n == "systemd"))
        .unwrap_or(false);
    if is_systemd || !Path::new(AGENT).exists() {
        return;
    }
    let agent = cstr(AGENT);
    let argv = [agent.as_ptr(), std::ptr::null()];
    // SAFETY: the child only calls async-signal-safe functions (setsid, execv, _exit) on
    // memory prepared before the fork.
    unsafe {
        if libc::fork() == 0 {
            libc::setsid();
            libc::execv(agent.as_ptr(), argv.as_ptr());
            libc::_exit(127);
        }
    }
}

/// The agent as `banger-init` runs it when it stays the init; beside a main process its
/// messages go to the kernel log, so the console holds the main process's output alone.
fn agent_spawn(quiet: bool) -> Option<supervise::Spawn> {
    Path::new(AGENT).exists().then(|| supervise::Spawn {
        argv: vec![AGENT.into()],
        env: vec![
            format!("PATH={}", supervise::PATH),
            "HOME=/root".into(),
            format!("{}=1", supervise::INIT_ENV),
        ],
        cwd: "/".into(),
        output: quiet.then(|| "/dev/kmsg".into()),
        ..Default::default()
    })
}

/// Makes the mount points a Linux userland expects when the image lacks them (a writable
/// root only): container images often ship without `/dev`, `/proc`, `/sys` or `/run`.
fn mount_points(root: &str) {
    for (d, mode) in [
        ("dev", 0o755),
        ("proc", 0o555),
        ("sys", 0o555),
        ("run", 0o755),
        ("tmp", 0o1777),
        ("root", 0o700),
        ("etc", 0o755),
    ] {
        let p = Path::new(root).join(d);
        if std::fs::symlink_metadata(&p).is_err() {
            use std::os::unix::fs::DirBuilderExt;
            if let Err(e) = std::fs::DirBuilder::new().mode(mode).create(&p) {
                say(&format!("cannot create /{d}: {e}"));
            }
        }
    }
}

/// The VM's main process as the host wrote it (`/root/.banger/main.json`, on the work disk)
/// with the image's environment, working directory and user. When it cannot start, the VM
/// reports status 127 and powers off.
fn main_spawn() -> Option<supervise::Spawn> {
    let argv: Vec<String> = std::fs::read("/root/.banger/main.json")
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let root = Path::new("/");
    let image = runas::image_config(root);
    let who = runas::resolve_user(&image.user, root);
    let ok = !argv.is_empty();
    let (who, ok) = match who {
        Ok(w) => (w, ok),
        Err(e) => {
            say(&format!("cannot run the main process: {e}"));
            (runas::resolve_user("root", root).ok()?, false)
        }
    };
    if !ok {
        supervise::console(&format!("{}127", supervise::EXIT_LINE));
        supervise::power_off_now();
    }
    say(&format!("main process: {}", argv.join(" ")));
    Some(supervise::Spawn {
        cwd: runas::working_dir(None, &image.working_dir, &who),
        env: runas::environment(&who, &image.env, &[])
            .into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect(),
        argv,
        uid: who.uid,
        gid: who.gid,
        groups: who.groups,
        output: None,
    })
}

/// What every guest gets whatever its image holds: `/dev`, `/proc` and `/sys` moved over,
/// `/dev/pts` and `/dev/shm`, `/run` and `/tmp` as tmpfs (on the new root, before the switch).
fn base_mounts(root: &str) {
    for d in ["/dev", "/proc", "/sys"] {
        let target = format!("{root}{d}");
        if Path::new(&target).is_dir() {
            if let Err(e) = mount(d, &target, "", libc::MS_MOVE) {
                say(&e);
            }
        }
    }
    for d in ["dev/pts", "dev/shm"] {
        let _ = std::fs::create_dir_all(Path::new(root).join(d));
    }
    let nosuid_nodev = libc::MS_NOSUID | libc::MS_NODEV;
    for (src, target, fs, flags, data) in [
        (
            "devpts",
            "dev/pts",
            "devpts",
            libc::MS_NOSUID | libc::MS_NOEXEC,
            "gid=5,mode=620,ptmxmode=666",
        ),
        ("shm", "dev/shm", "tmpfs", nosuid_nodev, "mode=1777"),
        ("tmpfs", "run", "tmpfs", nosuid_nodev, "mode=0755"),
        ("tmpfs", "tmp", "tmpfs", nosuid_nodev, "mode=1777"),
    ] {
        let target = Path::new(root).join(target);
        if !target.is_dir() {
            continue;
        }
        if let Err(e) = mount_data(src, &target.to_string_lossy(), fs, flags, data) {
            say(&e);
        }
    }
}

/// The kernel's parameter for the smallest block of free memory the balloon reports (the
/// host puts `PAGE_REPORTING_PARAM=N` on the command line), and where it is set at run time.
pub const PAGE_REPORTING_PARAM: &str = "page_reporting.page_reporting_order";
const PAGE_REPORTING_SYSFS: &str = "/sys/module/page_reporting/parameters/page_reporting_order";

/// The guest kernel's proactive compaction (0 to 100; 0 is off), which banger-init turns off.
pub const COMPACTION_PROACTIVENESS: &str = "/proc/sys/vm/compaction_proactiveness";

/// `statfs`'s magic number of ramfs (the initramfs, unless it is a tmpfs); libc has none.
const RAMFS_MAGIC: libc::c_long = 0x8584_58f6;

/// Empties the initramfs before the switch, as `switch_root` does: its files (modules,
/// banger's binaries, some 10 MiB) would otherwise stay in the guest's memory for good, below
/// a root nothing can reach them from. Only when `/` is a ramfs or tmpfs, and never past a
/// mount (the new root, and whatever was not moved onto it).
fn free_initramfs() {
    // SAFETY: statfs is plain old data, for which all zeroes is a valid value.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    let slash = cstr("/");
    // SAFETY: the path is NUL-terminated and `fs` is a statfs the call may write.
    if unsafe { libc::statfs(slash.as_ptr(), &mut fs) } != 0 {
        return;
    }
    if fs.f_type != RAMFS_MAGIC && fs.f_type != libc::TMPFS_MAGIC {
        return;
    }
    if let Ok(m) = std::fs::symlink_metadata("/") {
        use std::os::unix::fs::MetadataExt;
        remove_below(Path::new("/"), m.dev());
    }
}

/// Removes what is below `dir` on device `dev`, depth first; entries on other devices
/// (mount points) and what cannot be removed stay.
fn remove_below(dir: &Path, dev: u64) {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(m) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if m.dev() != dev {
            continue;
        }
        if m.is_dir() {
            remove_below(&path, dev);
            let _ = std::fs::remove_dir(&path);
        } else {
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// Installs the agent the host put in this initrd (`/banger-agent`) into the root, so an
/// image built by an older banger runs today's agent. Written beside and renamed over.
fn refresh_agent() {
    let src = Path::new("/banger-agent");
    if !src.exists() {
        return;
    }
    let dest = Path::new("/newroot").join(AGENT.trim_start_matches('/'));
    let tmp = dest.with_extension("banger-new");
    let r = dest
        .parent()
        .map(std::fs::create_dir_all)
        .unwrap_or(Ok(()))
        .and_then(|_| std::fs::copy(src, &tmp))
        .and_then(|_| std::fs::rename(&tmp, &dest));
    if let Err(e) = r {
        say(&format!("cannot install the current agent: {e}"));
        let _ = std::fs::remove_file(&tmp);
    }
}

const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
/// `_IOW('f', 16, __u64)`: online resize of a mounted ext4.
const EXT4_IOC_RESIZE_FS: libc::c_ulong = 0x4008_6610;

/// Grows the mounted root filesystem to its disk when the disk is larger (a VM created with a
/// `disk_size` above its image's): ext4's online resize, what `resize2fs` does on a mounted
/// filesystem. Returns the new size in bytes when it grew.
fn grow_root(dev: &str, mountpoint: &str) -> Result<Option<u64>, String> {
    use std::os::fd::AsRawFd;
    let disk = std::fs::File::open(dev).map_err(|e| format!("{dev}: {e}"))?;
    let mut bytes: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which is valid for the call.
    if unsafe { libc::ioctl(disk.as_raw_fd(), BLKGETSIZE64, &mut bytes) } < 0 {
        return Err(format!(
            "size of {dev}: {}",
            std::io::Error::last_os_error()
        ));
    }
    let statvfs = |path: &str| -> Result<libc::statvfs, String> {
        let c = cstr(path);
        // SAFETY: a zeroed statvfs is a valid out-buffer; the path is NUL-terminated.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: as above; both pointers are valid for the call.
        if unsafe { libc::statvfs(c.as_ptr(), &mut st) } < 0 {
            return Err(format!(
                "statvfs {path}: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(st)
    };
    let before = statvfs(mountpoint)?;
    let block = before.f_frsize.max(1);
    let mut blocks: u64 = bytes / block;
    // f_blocks leaves out metadata, so it is always below the real count: only a disk a
    // megabyte beyond it is worth a resize call.
    if blocks.saturating_sub(before.f_blocks) * block < (1 << 20) {
        return Ok(None);
    }
    let dir = std::fs::File::open(mountpoint).map_err(|e| format!("{mountpoint}: {e}"))?;
    // SAFETY: EXT4_IOC_RESIZE_FS reads one u64 through the pointer, valid for the call.
    if unsafe { libc::ioctl(dir.as_raw_fd(), EXT4_IOC_RESIZE_FS, &mut blocks) } < 0 {
        return Err(format!("resize: {}", std::io::Error::last_os_error()));
    }
    let after = statvfs(mountpoint)?;
    Ok((after.f_blocks > before.f_blocks).then_some(after.f_blocks * block))
}

/// Runs as PID 1 and never returns.
pub fn run() -> ! {
    for d in ["/dev", "/proc", "/sys", "/newroot"] {
        let _ = std::fs::create_dir_all(d);
    }
    for (src, target, fs) in [
        ("devtmpfs", "/dev", "devtmpfs"),
        ("proc", "/proc", "proc"),
        ("sysfs", "/sys", "sysfs"),
    ] {
        if let Err(e) = mount(src, target, fs, libc::MS_NOSUID) {
            say(&e);
        }
    }
    let raw = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let cmdline = parse_cmdline(&raw);
    let list = std::fs::read_to_string(Path::new("/").join(MODULE_LIST)).unwrap_or_default();
    for name in list.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if let Err(e) = load_module(&Path::new("/").join(MODULE_DIR).join(format!("{name}.ko"))) {
            say(&format!("cannot load module {name}: {e}"));
        }
    }
    // Kernels before 6.3 let the balloon driver's registration override the reporting order
    // the command line asks for (`vmm::PAGE_REPORTING_ORDER`): it is set again once loaded.
    if let Some(order) = raw.split_whitespace().find_map(|w| {
        w.strip_prefix(PAGE_REPORTING_PARAM)
            .and_then(|v| v.strip_prefix('='))
    }) {
        let _ = std::fs::write(PAGE_REPORTING_SYSFS, order);
    }
    // No proactive compaction: kcompactd otherwise wakes twice a second to score the
    // fragmentation of an idle guest's free memory, which its VMM pays for in host CPU.
    // Compaction on demand (an allocation that needs it) stays; kernels before 5.9 have no
    // such knob.
    let _ = std::fs::write(COMPACTION_PROACTIVENESS, "0");
    let lease = net::parse(&raw);
    if let Some(h) = &lease.hostname {
        if let Err(e) = net::set_hostname(h) {
            say(&e);
        }
    }
    match net::configure(&lease, Path::new("/sys/class/net"), Duration::from_secs(5)) {
        Ok(Some(dev)) => say(&format!(
            "network {dev} {}",
            lease
                .address
                .map(|(a, p)| format!("{a}/{p}"))
                .unwrap_or_default()
        )),
        Ok(None) => {}
        Err(e) => say(&format!("the network stays down: {e}")),
    }
    // A parked template mounts its root only when the host asks (it is restored with
    // another folder's server than the one it booted with).
    let parked = cmdline.park.then(park::wait);
    // A root folder (virtio-fs) is a tag, mounted as it is; a disk is waited for.
    let root = if cmdline.fstype == "virtiofs" {
        cmdline.root.clone()
    } else {
        let Some(root) = wait_device(&cmdline.root, cmdline.root_wait) else {
            fail(&format!(
                "root device {} did not appear within {} s; is its driver in the initrd and the disk attached?",
                cmdline.root, cmdline.root_wait
            ));
        };
        root
    };
    let flags = if cmdline.read_only {
        libc::MS_RDONLY
    } else {
        0
    };
    if let Err(e) = mount(&root, "/newroot", &cmdline.fstype, flags) {
        fail(&format!("cannot mount the root filesystem: {e}"));
    }
    if !cmdline.read_only && cmdline.fstype == "ext4" {
        match grow_root(&root, "/newroot") {
            Ok(Some(bytes)) => say(&format!("root filesystem grown to {} MiB", bytes >> 20)),
            Ok(None) => {}
            Err(e) => say(&format!("the root filesystem keeps its size: {e}")),
        }
    }
    if !cmdline.read_only {
        mount_points("/newroot");
        refresh_agent();
        if let Err(e) = net::write_root_files(&lease, Path::new("/newroot")) {
            say(&e);
        }
    }
    if let Some(work) = &cmdline.work {
        match wait_device(work, cmdline.root_wait) {
            Some(dev) if Path::new("/newroot/root").is_dir() => {
                if let Err(e) = mount(&dev, "/newroot/root", "ext4", libc::MS_NOSUID) {
                    say(&format!("the work disk stays unmounted: {e}"));
                }
            }
            Some(_) => say("the image has no /root; the work disk stays unmounted"),
            None => say(&format!(
                "work disk {work} did not appear; /root is the image's"
            )),
        }
    }
    for s in &cmdline.shares {
        mount_share(s, "/newroot");
    }
    if !cmdline.read_only {
        if let Err(e) = net::install_host_key(Path::new("/newroot")) {
            say(&e);
        }
    }
    // An image without an init (most container images) gets banger-init as its init; an
    // init the VM was created with that is not there is an error.
    let missing = std::fs::symlink_metadata(format!("/newroot{}", cmdline.init)).is_err();
    if missing && cmdline.init_named && !cmdline.stay_init {
        fail(&format!(
            "{} is not on the root filesystem {}",
            cmdline.init, cmdline.root
        ));
    }
    let stay = cmdline.stay_init || missing;
    if let Some(p) = parked {
        p.release();
    }
    base_mounts("/newroot");
    free_initramfs();
    let (dot, slash) = (cstr("."), cstr("/"));
    if std::env::set_current_dir("/newroot").is_err() {
        fail("cannot enter /newroot");
    }
    if let Err(e) = mount(".", "/", "", libc::MS_MOVE) {
        fail(&format!("cannot switch root: {e}"));
    }
    // SAFETY: both paths are NUL-terminated strings that outlive the calls.
    let r = unsafe { libc::chroot(dot.as_ptr()) | libc::chdir(slash.as_ptr()) };
    if r != 0 {
        fail(&format!(
            "cannot switch root: {}",
            std::io::Error::last_os_error()
        ));
    }
    if stay {
        say(&format!(
            "root {root} mounted; {} is not an init of the image's, banger-init stays PID 1",
            cmdline.init
        ));
        let main = if cmdline.main { main_spawn() } else { None };
        supervise::run(agent_spawn(main.is_some()), main);
    }
    say(&format!("root {root} mounted, starting {}", cmdline.init));
    start_agent_unless_systemd(&cmdline.init);
    let init = cstr(&cmdline.init);
    let argv = [init.as_ptr(), std::ptr::null()];
    // SAFETY: argv is a NULL-terminated array of NUL-terminated strings; execv only returns
    // on failure.
    unsafe { libc::execv(init.as_ptr(), argv.as_ptr()) };
    fail(&format!(
        "cannot run {}: {}",
        cmdline.init,
        std::io::Error::last_os_error()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_defaults_and_overrides() {
        assert!(!parse_cmdline("quiet").init_named);
        let c = parse_cmdline(
            "init=/sbin/other banger.init=banger banger.main=1 banger.share=share0:/src \
             banger.share=share1:/data:ro banger.share=bad",
        );
        assert_eq!(
            c.shares,
            [
                GuestShare {
                    tag: "share0".into(),
                    dir: "/src".into(),
                    read_only: false
                },
                GuestShare {
                    tag: "share1".into(),
                    dir: "/data".into(),
                    read_only: true
                }
            ]
        );
        assert!(c.init_named && c.stay_init && c.main && !c.park);
        assert!(parse_cmdline("quiet banger.park=1").park);
        assert!(!parse_cmdline("quiet banger.park=0").park);
        let c = parse_cmdline("console=ttyS0 quiet");
        assert_eq!(
            (
                c.root.as_str(),
                c.fstype.as_str(),
                c.read_only,
                c.init.as_str()
            ),
            ("/dev/vda", "ext4", true, "/sbin/init")
        );
        let c = parse_cmdline("root=/dev/vdb rootfstype=ext4 rw init=/bin/sh banger.rootwait=3");
        assert_eq!(
            (c.root.as_str(), c.read_only, c.init.as_str(), c.root_wait),
            ("/dev/vdb", false, "/bin/sh", 3)
        );
    }

    #[test]
    fn the_initramfs_is_emptied_without_following_links_or_leaving_its_device() {
        use std::os::unix::fs::MetadataExt;
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("keep"), "x").unwrap();
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        std::fs::create_dir_all(r.join("modules/deep")).unwrap();
        std::fs::write(r.join("modules/deep/a.ko"), "m").unwrap();
        std::fs::write(r.join("init"), "i").unwrap();
        std::os::unix::fs::symlink(outside.path(), r.join("link")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("keep"), r.join("modules/f")).unwrap();
        // A device of its own, as a mount point has: left with what it holds.
        let dev = std::fs::metadata(r).unwrap().dev();
        remove_below(r, dev + 1);
        assert_eq!(std::fs::read_dir(r).unwrap().count(), 3);
        remove_below(r, dev);
        assert_eq!(std::fs::read_dir(r).unwrap().count(), 0);
        assert_eq!(
            std::fs::read_to_string(outside.path().join("keep")).unwrap(),
            "x"
        );
    }

    #[test]
    fn devices_resolve_by_virtio_serial() {
        let sys = tempfile::tempdir().unwrap();
        for (dev, serial) in [("vda", "work"), ("vdb", "root")] {
            std::fs::create_dir(sys.path().join(dev)).unwrap();
            std::fs::write(sys.path().join(dev).join("serial"), serial).unwrap();
        }
        assert_eq!(
            resolve_device("serial:root", sys.path()).as_deref(),
            Some("/dev/vdb")
        );
        assert_eq!(
            resolve_device("serial:work", sys.path()).as_deref(),
            Some("/dev/vda")
        );
        assert_eq!(resolve_device("serial:none", sys.path()), None);
        assert_eq!(
            parse_cmdline("banger.work=serial:work").work.as_deref(),
            Some("serial:work")
        );
    }
}
