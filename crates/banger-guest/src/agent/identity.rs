//! The agent's side of a restore: a VM restored from a snapshot runs its source's memory, so
//! it has its source's host name, address, MAC, keys, machine id, RNG state and a stale
//! clock until the host hands it its own, which this applies (plain syscalls and files: any
//! image, with or without `ip` or systemd).

use std::net::Ipv4Addr;
use std::path::Path;

use super::Identity;
use crate::guestinit::{net, putfile};

/// Applies `id`; the first failure is the error (what went before stays applied).
pub fn apply(id: &Identity) -> Result<(), String> {
    if id.stop_page_reporting {
        stop_page_reporting(Path::new(BALLOON_DRIVER));
    }
    set_clock(id.time_ns, false)?;
    reseed(&id.seed)?;
    // From the host's per-VM seed, not the guest's RNG: a restored kernel's RNG state is its
    // source's until the kernel reseeds (up to a minute after credited entropy), so two
    // clones would draw the same bytes from it now.
    fresh_boot_id(&id.seed)?;
    fresh_random_seed(Path::new(RANDOM_SEED), &id.seed)?;
    let address = id
        .address
        .split_once('/')
        .and_then(|(a, p)| Some((a.parse::<Ipv4Addr>().ok()?, p.parse::<u8>().ok()?)))
        .ok_or_else(|| format!("bad address {:?}", id.address))?;
    let args = net::NetArgs {
        address: Some(address),
        gateway: id.gateway.parse().ok(),
        mac: None,
        dns: id.dns.iter().filter_map(|a| a.parse().ok()).collect(),
        hostname: Some(id.hostname.clone()),
    };
    net::set_hostname(&id.hostname)?;
    // The one NIC keeps its name; it gets the new MAC (the device learns it from the driver)
    // before its new address, so nothing leaves with the old pair once the host's walls know
    // only the new one.
    let known = NIC.lock().ok().and_then(|n| n.clone());
    let dev = match known.filter(|d| net::set_mac(d, &id.mac).is_ok()) {
        Some(dev) => dev,
        None => {
            let dev = find_nic().ok_or("the VM has no network interface")?;
            net::set_mac(&dev, &id.mac)?;
            dev
        }
    };
    net::address(&dev, &args)?;
    net::write_root_files(&args, Path::new("/"))?;
    if Path::new("/etc/machine-id").exists() {
        putfile::put_own_file(
            Path::new("/etc/machine-id"),
            format!("{}\n", id.machine_id).as_bytes(),
            0o444,
        )?;
    }
    if !id.host_key.is_empty() && Path::new("/etc/ssh").is_dir() {
        install_host_key(&id.host_key, &id.host_key_pub)?;
    }
    if !id.authorized_key.is_empty() {
        authorize(&id.authorized_key)?;
    }
    Ok(())
}

/// Readies what a restore's identity changes, once, when the agent starts (a guest's boot,
/// when nothing waits on it): the NIC's name is found and kept, and the kernel's boot id is
/// bound from a file (see [`fresh_boot_id`]). The guest's snapshot keeps both, so a restored
/// guest's identity only rewrites the file and uses the name: under TCG, every kernel path a
/// restored guest runs first costs its translation (mount, sysfs: some 20 ms).
pub fn prepare() {
    if let Some(dev) = find_nic() {
        if let Ok(mut nic) = NIC.lock() {
            *nic = Some(dev);
        }
    }
    let boot_id = std::fs::read_to_string(BOOT_ID).unwrap_or_default();
    if !boot_id.trim().is_empty() {
        if let Err(e) = bind_boot_id(boot_id.trim()) {
            eprintln!("banger-agent: {e}");
        }
    }
}

/// The guest's one NIC (a restored guest keeps its source's), as [`prepare`] found it.
static NIC: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

fn find_nic() -> Option<String> {
    net::find_interface(Path::new("/sys/class/net"), None, std::time::Duration::ZERO)
}

/// systemd's saved RNG seed, credited at the next boot: a clone must not share its source's.
const RANDOM_SEED: &str = "/var/lib/systemd/random-seed";
/// The kernel's boot id, read by journald, systemd and anything that tells boots apart.
const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";
/// Where the clone's own boot id is kept (tmpfs), bound over [`BOOT_ID`].
const OWN_BOOT_ID: &str = "/run/banger-boot-id";

/// `n` bytes derived from the host's per-VM `seed` (hex) for `purpose`: SHA-256 over
/// (purpose, block counter, seed), so what a guest user reads (the boot id) reveals nothing of
/// the seed the RNG was credited with.
fn derived(seed: &str, purpose: &str, n: usize) -> Result<Vec<u8>, String> {
    use sha2::{Digest, Sha256};
    if seed.len() < 32 {
        return Err("the seed is too short".into());
    }
    let mut out = Vec::with_capacity(n + 32);
    let mut block: u32 = 0;
    while out.len() < n {
        let mut h = Sha256::new();
        h.update(purpose.as_bytes());
        h.update(block.to_be_bytes());
        h.update(seed.as_bytes());
        out.extend_from_slice(&h.finalize());
        block += 1;
    }
    out.truncate(n);
    Ok(out)
}

/// A version 4 UUID as the kernel writes boot ids, from `seed`.
fn uuid4(seed: &str) -> Result<String, String> {
    let mut b = derived(seed, "banger boot id", 16)?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    ))
}

/// The kernel's boot id cannot be written, so a file holding a fresh one is bound over it.
fn fresh_boot_id(seed: &str) -> Result<(), String> {
    bind_boot_id(&uuid4(seed)?)
}

/// Makes [`BOOT_ID`] read `id`: [`OWN_BOOT_ID`] holds it, bound over the kernel's file unless
/// it is already (the agent's start did, or the identity of the guest this one was restored
/// from: writing the file is then enough).
fn bind_boot_id(id: &str) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let own = Path::new(OWN_BOOT_ID);
    std::fs::write(own, format!("{id}\n"))
        .map_err(|e| format!("cannot write {OWN_BOOT_ID}: {e}"))?;
    let same =
        |a: &std::fs::Metadata, b: &std::fs::Metadata| a.dev() == b.dev() && a.ino() == b.ino();
    if let (Ok(a), Ok(b)) = (std::fs::metadata(own), std::fs::metadata(BOOT_ID)) {
        if same(&a, &b) {
            return Ok(());
        }
    }
    let dst = std::ffi::CString::new(BOOT_ID).map_err(|e| e.to_string())?;
    // SAFETY: a NUL-terminated string; a failed unmount (nothing bound) is fine.
    unsafe { libc::umount2(dst.as_ptr(), libc::MNT_DETACH) };
    crate::guestinit::mount(OWN_BOOT_ID, BOOT_ID, "", libc::MS_BIND)
        .map_err(|e| format!("cannot give the guest a boot id of its own: {e}"))
}

/// Rewrites systemd's random seed (when the image has one) before anything reads it again.
fn fresh_random_seed(path: &Path, seed: &str) -> Result<(), String> {
    if !path.exists() {
        return Ok(());
    }
    let len = std::fs::metadata(path)
        .map(|m| m.len())
        .unwrap_or(512)
        .clamp(32, 4096);
    putfile::put_own_file(
        path,
        &derived(seed, "banger systemd random seed", len as usize)?,
        0o600,
    )
}

/// How far behind the host a guest's clock may be before a periodic correction steps it
/// forward rather than slewing it (ntpd's step threshold).
const STEP_AHEAD_NS: i128 = 128_000_000;

/// Sets the guest's wall clock to `ns`. Stepped (`slew` false: after a resume or a restore,
/// when the clock stood still), or corrected gently: a clock behind by more than
/// [`STEP_AHEAD_NS`] steps forward, anything else is slewed by the kernel (`adjtime`'s
/// single-shot offset, at most 0.5 ms per second), so a running program never sees the clock
/// go back.
pub(super) fn set_clock(ns: u64, slew: bool) -> Result<(), String> {
    if slew {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as i128)
            .unwrap_or(0);
        let offset = ns as i128 - now;
        if offset <= STEP_AHEAD_NS {
            // SAFETY: timex is plain data; zeroed is a valid request before the fields set.
            let mut tx: libc::timex = unsafe { std::mem::zeroed() };
            tx.modes = libc::ADJ_OFFSET_SINGLESHOT as libc::c_uint;
            // At most half a second either way: a request that waited in a paused guest is
            // stale, and the next one (seconds later) corrects what it did.
            tx.offset = (offset / 1000).clamp(-500_000, 500_000) as libc::c_long;
            // SAFETY: tx is a valid timex for the call's duration.
            if unsafe { libc::adjtimex(&mut tx) } < 0 {
                return Err(format!(
                    "cannot slew the clock: {}",
                    std::io::Error::last_os_error()
                ));
            }
            return Ok(());
        }
    }
    let ts = libc::timespec {
        tv_sec: (ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: ts is a valid timespec for the call's duration.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        return Err(format!(
            "cannot set the clock: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Mixes `hex` into the kernel's pool, credits it (RNDADDENTROPY) and makes the kernel's
/// crng reseed from the pool at once (RNDRESEEDCRNG, Linux ≥ 4.17), so two VMs restored from
/// one snapshot draw different numbers from here on (a credited seed alone waits for the
/// next periodic reseed, up to a minute; microvm has no VM generation id device).
fn reseed(hex: &str) -> Result<(), String> {
    let bytes: Vec<u8> = (0..hex.len() / 2)
        .filter_map(|i| u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok())
        .collect();
    if bytes.len() < 16 {
        return Err("the seed is too short".into());
    }
    #[repr(C)]
    struct Entropy {
        count: libc::c_int,
        size: libc::c_int,
        buf: [u8; 64],
    }
    let mut e = Entropy {
        count: (bytes.len().min(64) * 8) as libc::c_int,
        size: bytes.len().min(64) as libc::c_int,
        buf: [0; 64],
    };
    e.buf[..bytes.len().min(64)].copy_from_slice(&bytes[..bytes.len().min(64)]);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .map_err(|e| format!("cannot open /dev/urandom: {e}"))?;
    // RNDADDENTROPY = _IOW('R', 0x03, int[2])
    const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
    use std::os::fd::AsRawFd;
    // SAFETY: e is a rand_pool_info with `size` bytes of buffer after its two ints.
    if unsafe { libc::ioctl(f.as_raw_fd(), RNDADDENTROPY as _, &e) } != 0 {
        return Err(format!(
            "cannot reseed: {}",
            std::io::Error::last_os_error()
        ));
    }
    // RNDRESEEDCRNG = _IO('R', 0x07)
    const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
    // SAFETY: the request takes no argument.
    if unsafe { libc::ioctl(f.as_raw_fd(), RNDRESEEDCRNG as _) } != 0 {
        let e = std::io::Error::last_os_error();
        // Kernels before 4.17 lack it: they reseed on their own schedule.
        if e.raw_os_error() != Some(libc::EINVAL) {
            return Err(format!("cannot reseed the crng: {e}"));
        }
    }
    Ok(())
}

/// Where the balloon's driver lists the devices it drives.
const BALLOON_DRIVER: &str = "/sys/bus/virtio/drivers/virtio_balloon";

/// Unbinds the balloon's driver (`driver`) from each device it drives: its free page
/// reporting stops with it. The balloon is never inflated, so nothing is handed back. Best
/// effort: a report that still comes only fails on the host. Returns the devices unbound.
fn stop_page_reporting(driver: &Path) -> Vec<String> {
    let mut unbound = Vec::new();
    let Ok(entries) = std::fs::read_dir(driver) else {
        return unbound;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let is_device = name.to_str().is_some_and(|n| {
            n.strip_prefix("virtio")
                .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
        });
        if is_device && std::fs::write(driver.join("unbind"), name.as_encoded_bytes()).is_ok() {
            unbound.push(name.to_string_lossy().into_owned());
        }
    }
    unbound
}

/// Replaces every SSH host key with the VM's own, and makes sure a running sshd serves it to
/// the next connection before this returns (so the host's `wait_ssh` meets the new key).
fn install_host_key(private: &str, public: &str) -> Result<(), String> {
    let ssh = Path::new("/etc/ssh");
    for e in std::fs::read_dir(ssh).map_err(|e| e.to_string())?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("ssh_host_") && name.contains("_key") {
            let _ = std::fs::remove_file(e.path());
        }
    }
    putfile::put_own_file(&ssh.join("ssh_host_ed25519_key"), private.as_bytes(), 0o600)?;
    putfile::put_own_file(
        &ssh.join("ssh_host_ed25519_key.pub"),
        public.as_bytes(),
        0o644,
    )?;
    let Some(pid) = ["/run/sshd.pid", "/var/run/sshd.pid"].iter().find_map(|f| {
        std::fs::read_to_string(f)
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
            .filter(|&p| p > 1 && Path::new(&format!("/proc/{p}")).exists())
    }) else {
        return Ok(());
    };
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    if keys_read_per_connection(Path::new("/"), &args) {
        return Ok(());
    }
    restart_sshd(pid)
}

/// Whether the sshd running with `args` reads its host keys again for every connection, so
/// new key files serve the next connection without a restart. OpenSSH before 9.8 re-executes
/// itself for each connection (unless started with `-r`), and that child loads the host keys
/// from disk; from 9.8 on, each connection is an `sshd-session` that gets the keys the
/// listener loaded when it started, so only a restart changes them. Restarting costs the
/// time sshd takes to start again under emulation, with its port closed meanwhile.
fn keys_read_per_connection(root: &Path, args: &[&[u8]]) -> bool {
    const SESSION: [&str; 4] = [
        "usr/lib/openssh/sshd-session",
        "usr/libexec/openssh/sshd-session",
        "usr/libexec/sshd-session",
        "usr/lib/ssh/sshd-session",
    ];
    let split = SESSION.iter().any(|p| root.join(p).exists());
    // sshd rewrites its command line into one argument ("sshd: /usr/sbin/sshd -D
    // [listener] …"), so the options are looked for in its words.
    let no_rexec = args
        .iter()
        .flat_map(|a| a.split(|c| c.is_ascii_whitespace()))
        .skip(1)
        .any(|w| {
            // A word of flags; one that takes a value (sshd's getopt string) ends them.
            w.starts_with(b"-")
                && !w.starts_with(b"--")
                && w[1..]
                    .iter()
                    .take_while(|c| !b"CEbcfghkopu".contains(c))
                    .any(|&c| c == b'r')
        });
    !split && !no_rexec
}

/// Has sshd `pid` read its keys again (SIGHUP: it closes its listeners and re-executes
/// itself) and waits until it listens again, on sockets other than the ones it had.
fn restart_sshd(pid: i32) -> Result<(), String> {
    let before = listening_sockets(pid);
    // SAFETY: kill takes no pointers.
    if unsafe { libc::kill(pid, libc::SIGHUP) } != 0 {
        return Ok(());
    }
    if before.is_empty() {
        return Ok(());
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let now = listening_sockets(pid);
        if !now.is_empty() && now.iter().all(|s| !before.contains(s)) {
            return Ok(());
        }
        if std::time::Instant::now() > deadline || !Path::new(&format!("/proc/{pid}")).exists() {
            return Err("sshd did not listen again within 10 s of taking its new host key".into());
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// A TCP socket in LISTEN, from `/proc/net/tcp` or `tcp6`.
struct Listener {
    /// Bound to every address (`0.0.0.0` or `::`).
    any: bool,
    port: u16,
    inode: u64,
}

/// The guest's listening TCP sockets (IPv4 and IPv6).
fn listeners() -> Vec<Listener> {
    let mut found = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        found.extend(text.lines().skip(1).filter_map(parse_listener));
    }
    found
}

/// One line of `/proc/net/tcp{,6}` (`sl local remote st … inode`, the inode tenth; state 0A
/// is LISTEN; the local address is hex `ADDR:PORT`) when it is a listener.
fn parse_listener(line: &str) -> Option<Listener> {
    let f: Vec<&str> = line.split_whitespace().collect();
    if f.len() <= 9 || f[3] != "0A" {
        return None;
    }
    let (addr, port) = f[1].split_once(':')?;
    Some(Listener {
        any: addr.bytes().all(|b| b == b'0'),
        port: u16::from_str_radix(port, 16).ok()?,
        inode: f[9].parse().ok()?,
    })
}

/// Whether something listens on TCP `port` on every address (told to the host after an
/// identity: sshd then answers at the VM's new address without the host asking it).
pub(super) fn listening_everywhere(port: u16) -> bool {
    listeners().iter().any(|l| l.any && l.port == port)
}

/// The inodes of the TCP sockets process `pid` listens on.
fn listening_sockets(pid: i32) -> Vec<u64> {
    let listening: std::collections::HashSet<u64> =
        listeners().into_iter().map(|l| l.inode).collect();
    let mut own: Vec<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter_map(|l| {
                    l.to_str()?
                        .strip_prefix("socket:[")?
                        .strip_suffix(']')?
                        .parse::<u64>()
                        .ok()
                })
                .filter(|i| listening.contains(i))
                .collect()
        })
        .unwrap_or_default();
    own.sort_unstable();
    own
}

fn authorize(key: &str) -> Result<(), String> {
    let dir = Path::new("/root/.ssh");
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let path = dir.join("authorized_keys");
    let mut text = std::fs::read_to_string(&path).unwrap_or_default();
    if !text.lines().any(|l| l.trim() == key.trim()) {
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(key.trim());
        text.push('\n');
    }
    putfile::put_own_file(&path, text.as_bytes(), 0o600)
}

#[cfg(test)]
mod tests {

    #[test]
    fn boot_ids_differ_by_seed_and_look_like_the_kernels() {
        let a = uuid4(&"ab".repeat(32)).unwrap();
        let b = uuid4(&"cd".repeat(32)).unwrap();
        assert_ne!(a, b);
        assert_eq!((a.len(), &a[14..15]), (36, "4"), "{a}");
        assert!(derived("00", "x", 16).is_err(), "a short seed is refused");
        assert_eq!(derived(&"ab".repeat(32), "seed", 600).unwrap().len(), 600);
    }

    use super::*;

    #[test]
    fn page_reporting_stops_by_unbinding_each_balloon_device() {
        let driver = tempfile::tempdir().unwrap();
        for f in ["bind", "unbind", "module", "uevent", "virtio3", "virtio12"] {
            std::fs::write(driver.path().join(f), b"").unwrap();
        }
        let mut unbound = stop_page_reporting(driver.path());
        unbound.sort();
        assert_eq!(unbound, ["virtio12", "virtio3"]);
        assert_eq!(std::fs::read(driver.path().join("bind")).unwrap(), b"");
        assert!(stop_page_reporting(&driver.path().join("none")).is_empty());
    }

    #[test]
    fn only_an_sshd_that_loads_keys_per_connection_is_left_running() {
        let root = tempfile::tempdir().unwrap();
        let sshd: &[&[u8]] = &[b"sshd: /usr/sbin/sshd -D [listener] 0 of 10-100 startups"];
        assert!(keys_read_per_connection(root.path(), sshd));
        assert!(keys_read_per_connection(
            root.path(),
            &[b"/usr/sbin/sshd", b"-D"]
        ));
        // -r: no re-execution, so the keys loaded at start serve every connection.
        assert!(!keys_read_per_connection(
            root.path(),
            &[b"/usr/sbin/sshd", b"-Dr"]
        ));
        assert!(!keys_read_per_connection(
            root.path(),
            &[b"/usr/sbin/sshd", b"-r"]
        ));
        // OpenSSH 9.8 and later: sshd-session gets the listener's keys.
        std::fs::create_dir_all(root.path().join("usr/lib/openssh")).unwrap();
        std::fs::write(root.path().join("usr/lib/openssh/sshd-session"), b"").unwrap();
        assert!(!keys_read_per_connection(
            root.path(),
            &[b"/usr/sbin/sshd", b"-D"]
        ));
    }

    #[test]
    fn a_process_listening_sockets_are_found() {
        use std::os::fd::AsRawFd;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        // Its socket's inode (other tests of this process open and close theirs meanwhile).
        let link = std::fs::read_link(format!("/proc/self/fd/{}", l.as_raw_fd())).unwrap();
        let inode: u64 = link.to_str().unwrap()[8..]
            .trim_end_matches(']')
            .parse()
            .unwrap();
        assert!(listening_sockets(std::process::id() as i32).contains(&inode));
        drop(l);
        assert!(!listening_sockets(std::process::id() as i32).contains(&inode));
    }

    #[test]
    fn listeners_on_every_address_are_told_from_bound_ones() {
        // Lines as Linux writes them: sshd on 0.0.0.0:22 and [::]:22, a service on
        // 127.0.0.1:631, a connection (state 01) from port 22.
        let any4 = "   0: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1234 1 0000000000000000 100 0 0 10 0";
        let any6 = "   0: 00000000000000000000000000000000:0016 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1235 1 0000000000000000 100 0 0 10 0";
        let local = "   1: 0100007F:0277 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 99 1 0000000000000000 100 0 0 10 0";
        let conn = "   2: 0200A8C0:0016 0100A8C0:D431 01 00000000:00000000 00:00000000 00000000     0        0 7 1 0000000000000000 100 0 0 10 0";
        let l = parse_listener(any4).unwrap();
        assert!(l.any && l.port == 22 && l.inode == 1234);
        assert!(parse_listener(any6).unwrap().any);
        let l = parse_listener(local).unwrap();
        assert!(!l.any && l.port == 631 && l.inode == 99);
        assert!(parse_listener(conn).is_none());
        assert!(parse_listener("  sl  local_address rem_address   st").is_none());
    }

    #[test]
    fn a_listener_on_every_address_is_seen() {
        let l = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
        assert!(listening_everywhere(l.local_addr().unwrap().port()));
        let bound = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert!(!listening_everywhere(bound.local_addr().unwrap().port()));
    }
}
