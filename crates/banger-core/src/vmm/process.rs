//! VMM processes found again through pid files. A pid is trusted only while the process's
//! command line still names the VM's runtime directory, so a recycled pid is never killed.

use super::error::failed;
use std::path::Path;
use std::time::Duration;

/// The pid `pidfile` holds, once it is completely written.
pub fn read_pid(pidfile: &Path) -> Option<i32> {
    std::fs::read_to_string(pidfile).ok()?.trim().parse().ok()
}

/// Whether process `pid` exists and is not a zombie (whatever it runs: for a pid this daemon
/// just started, when its command line may be mid-exec and read empty).
pub fn exists(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").and_then(|(_, r)| r.chars().next()))
        .is_some_and(|state| state != 'Z')
}

/// The proportional set size of process `pid` in bytes (its private memory plus its share
/// of every page it maps with others), from `/proc/PID/smaps_rollup`; 0 when it is gone.
pub fn pss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|s| pss_of(&s))
        .unwrap_or(0)
}

/// The CPU time process `pid` has used (user and system), in nanoseconds; 0 when it is gone.
pub fn cpu_nsec(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // After the command's closing parenthesis: state is field 3, utime 14, stime 15.
    let Some((_, rest)) = stat.rsplit_once(") ") else {
        return 0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|i| f.get(*i).and_then(|v| v.parse::<u64>().ok()))
        .sum();
    // SAFETY: sysconf takes no pointers.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    ticks.saturating_mul(1_000_000_000 / hz)
}

/// The `Pss:` line of a `smaps_rollup`, in bytes.
fn pss_of(rollup: &str) -> Option<u64> {
    let line = rollup.lines().find(|l| l.starts_with("Pss:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib << 10)
}

/// What a pid file says of its process: alive (and the VM's), gone, or not known now.
#[derive(Debug)]
pub enum Liveness {
    /// The process runs and is the one the pid file was written for.
    Alive(i32),
    /// No pid file, no such process, a zombie, or a recycled pid (another program).
    Gone,
    /// The files that tell could not be read (descriptors or memory exhausted, a pid file
    /// mid-write): nothing may be concluded, least of all that the VM stopped.
    Unknown(std::io::Error),
}

impl Liveness {
    /// The pid when alive.
    pub fn pid(&self) -> Option<i32> {
        match self {
            Liveness::Alive(p) => Some(*p),
            _ => None,
        }
    }
}

/// Reads a file of a process's; `Gone` when it (or the process) does not exist, `Unknown`
/// for any other failure.
fn read_or(path: &str) -> Result<Vec<u8>, Liveness> {
    std::fs::read(path).map_err(|e| match e.raw_os_error() {
        Some(libc::ENOENT | libc::ESRCH) => Liveness::Gone,
        _ => Liveness::Unknown(e),
    })
}

/// Whether the process `pidfile` names is alive and its command line (or environment)
/// mentions `marker`; every failure to find out is [`Liveness::Unknown`], never `Gone`.
pub fn liveness(pidfile: &Path, marker: &str) -> Liveness {
    match liveness_of(pidfile, marker) {
        Ok(l) | Err(l) => l,
    }
}

fn liveness_of(pidfile: &Path, marker: &str) -> Result<Liveness, Liveness> {
    let text = match std::fs::read_to_string(pidfile) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Liveness::Gone),
        Err(e) => return Ok(Liveness::Unknown(e)),
    };
    let Ok(pid) = text.trim().parse::<i32>() else {
        // Written by a shell that is about to exec: read again later.
        return Ok(Liveness::Unknown(std::io::Error::other(format!(
            "{} holds no pid yet",
            pidfile.display()
        ))));
    };
    if pid <= 1 {
        return Ok(Liveness::Gone);
    }
    let cmdline = read_or(&format!("/proc/{pid}/cmdline"))?;
    let stat = read_or(&format!("/proc/{pid}/stat"))?;
    let stat = String::from_utf8_lossy(&stat);
    // A zombie is not running, whatever its command line says.
    let state = stat.rsplit_once(") ").and_then(|(_, r)| r.chars().next());
    if state == Some('Z') {
        return Ok(Liveness::Gone);
    }
    Ok(if names_run_dir(pid, &cmdline, marker)? {
        Liveness::Alive(pid)
    } else {
        Liveness::Gone
    })
}

/// Whether process `pid`, whose command line is `cmdline`, names the runtime directory
/// `marker`: in its arguments, or (a program whose arguments cannot) in its environment as
/// [`RUN_DIR_ENV`] (see `spawn`).
fn names_run_dir(pid: i32, cmdline: &[u8], marker: &str) -> Result<bool, Liveness> {
    if cmdline
        .windows(marker.len())
        .any(|w| w == marker.as_bytes())
    {
        return Ok(true);
    }
    let environ = read_or(&format!("/proc/{pid}/environ"))?;
    let want = format!("{RUN_DIR_ENV}={marker}");
    Ok(environ.split(|b| *b == 0).any(|e| e == want.as_bytes()))
}

/// The pid in `pidfile` if that process is alive and its command line mentions `marker`.
pub fn live_pid(pidfile: &Path, marker: &str) -> Option<i32> {
    liveness(pidfile, marker).pid()
}

/// A descriptor that becomes readable when process `pid` exits (`pidfd_open`): it cannot
/// miss the exit, nor mistake a recycled pid, once open.
pub fn pidfd(pid: i32) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open takes a pid and flags; the result is checked.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, libc::O_NONBLOCK) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor; nothing else owns it.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// The environment variable every detached process gets: the directory of its pid file,
/// which `live_pid` recognises it by when its command line does not name it.
pub const RUN_DIR_ENV: &str = "BANGER_RUN_DIR";

/// Waits up to `limit` for the process `pidfile` names to end by itself; whether it did.
pub async fn wait_exit(pidfile: &Path, marker: &str, limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while live_pid(pidfile, marker).is_some() {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

/// Sends SIGTERM, waits up to `grace`, then SIGKILL; removes the pid file once the process
/// is gone. False when it outlived SIGKILL by [`KILL_WAIT`] (reported, pid file kept).
pub async fn terminate(pidfile: &Path, marker: &str, grace: Duration) -> bool {
    if let Some(pid) = live_pid(pidfile, marker) {
        // SAFETY: kill takes no pointers; pid was checked to be the VM's process.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        if !wait_exit(pidfile, marker, grace).await {
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            if !wait_exit(pidfile, marker, KILL_WAIT).await {
                // Stuck in the kernel (uninterruptible I/O): its pid file stays, so the next
                // stop or the start-up sweep finds it again.
                tracing::error!(
                    pid,
                    "Process {marker} did not die {}s after SIGKILL; giving up on it for now",
                    KILL_WAIT.as_secs()
                );
                return false;
            }
        }
    }
    let _ = std::fs::remove_file(pidfile);
    true
}

/// Kills (SIGKILL) whatever is left of a VM once its pid files are gone or no longer name
/// its processes (a runtime directory wiped, a pid file lost in a crash): every process whose
/// command line or `BANGER_RUN_DIR` names the VM's runtime directory (`marker`, unique: it
/// holds the VM's random id) and that runs as the VM's uid or is one of banger's, QEMU's,
/// Firecracker's or virtiofsd's programs (a share's server runs as the VM's owner). The uid
/// alone is not enough: it comes from the vsock CID, which another daemon on the host (a test
/// bus, a second state directory) may lease too. Waits (bounded by [`KILL_WAIT`]) until they
/// are gone; returns how many were found.
pub async fn kill_strays(vm_uid: Option<u32>, marker: &str) -> usize {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;
    let mine = |pid: i32| -> bool {
        let dir = format!("/proc/{pid}");
        let Ok(meta) = std::fs::metadata(&dir) else {
            return false;
        };
        let Ok(cmdline) = std::fs::read(format!("{dir}/cmdline")) else {
            return false;
        };
        if !names_run_dir(pid, &cmdline, marker).unwrap_or(false) {
            return false;
        }
        let program = cmdline.split(|&b| b == 0).next().unwrap_or_default();
        let name = program.rsplit(|&b| b == b'/').next().unwrap_or_default();
        vm_uid.is_some_and(|u| meta.uid() == u)
            || [
                &b"qemu-system-x86_64"[..],
                b"firecracker",
                b"jailer",
                b"virtiofsd",
                b"bangerd",
                HELPER_PROGRAM.as_bytes(),
            ]
            .contains(&name)
    };
    let me = std::process::id() as i32;
    let found: Vec<i32> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me && exists(pid) && mine(pid))
        .collect();
    for &pid in &found {
        // Through a pidfd, checked again once open: a pid that was recycled since the scan
        // is another process, which this never signals.
        let Ok(fd) = pidfd(pid) else { continue };
        if !mine(pid) {
            continue;
        }
        tracing::warn!(
            pid,
            "Killing process {pid} of {marker}, which no pid file named"
        );
        // SAFETY: pidfd_send_signal takes the open pidfd, a signal and no siginfo.
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                fd.as_raw_fd(),
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
    }
    let deadline = tokio::time::Instant::now() + KILL_WAIT;
    while found.iter().any(|&p| exists(p)) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    found.len()
}

/// How long [`terminate`] waits for a process to die after SIGKILL.
const KILL_WAIT: Duration = Duration::from_secs(10);

/// The resource bounds of a detached process's unit (systemd hosts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnitLimits {
    /// `MemoryMax=` in bytes: the guest's memory plus the VMM's own, or a helper's.
    pub memory_max: u64,
    /// `TasksMax=`: threads and processes.
    pub tasks_max: u32,
    /// Whether it may get transparent huge pages where the host's THP setting offers them;
    /// else it runs under `bangerd no-huge-pages` (see [`no_huge_pages_and_exec`]).
    pub huge_pages: bool,
}

impl UnitLimits {
    /// What a VMM of `vcpus` and `memory_mib` may take: the guest's memory plus
    /// [`VMM_OVERHEAD_MIB`], and a thread per vCPU plus QEMU's own.
    pub fn vmm(vcpus: u32, memory_mib: u32) -> Self {
        Self::vmm_with(vcpus, memory_mib, VMM_OVERHEAD_MIB)
    }

    /// What a VMM of `vcpus` and `memory_mib` may take with `overhead_mib` of its own. No
    /// transparent huge pages: QEMU asks for them on guest memory and TCG's code buffer, and
    /// then every 2 MiB a guest or TCG touches is resident whole (a cold-booted busybox VM
    /// cost the host 19 MiB more with them; see README, *Memory*).
    pub fn vmm_with(vcpus: u32, memory_mib: u32, overhead_mib: u64) -> Self {
        UnitLimits {
            memory_max: (u64::from(memory_mib) + overhead_mib) << 20,
            tasks_max: 32 + 2 * vcpus,
            huge_pages: false,
        }
    }

    /// A helper (vsock device, console logger): it maps the guest's memory to serve
    /// virtqueues, so the guest's size counts, plus little of its own.
    pub fn helper(memory_mib: u32) -> Self {
        UnitLimits {
            memory_max: (u64::from(memory_mib) + 128) << 20,
            tasks_max: 32,
            huge_pages: true,
        }
    }
}

/// What a VMM needs beyond the guest's memory by default (Firecracker's; QEMU's driver adds
/// its TCG translation cache to 256 MiB of heap, threads and device state).
pub const VMM_OVERHEAD_MIB: u64 = 512;

/// What every VMM and helper unit runs under (systemd hosts), besides the VM's own uid (see
/// `jail`): only the capabilities `setpriv` needs to switch to that uid (it then drops them
/// all; the files are the uid's or its group's and the tap arrives attached as fd 3, so none
/// is needed after), no way to gain privileges, and a read-only system but for its
/// `writable` paths.
/// TCG needs writable-executable memory, so MemoryDenyWriteExecute stays off.
pub const CONFINED_UNIT: &[&str] = &[
    "--property=AmbientCapabilities=",
    "--property=NoNewPrivileges=yes",
    "--property=ProtectSystem=strict",
    "--property=ProtectKernelTunables=yes",
    "--property=ProtectKernelModules=yes",
    "--property=ProtectKernelLogs=yes",
    "--property=ProtectControlGroups=yes",
    "--property=ProtectClock=yes",
    "--property=ProtectHostname=yes",
    "--property=RestrictSUIDSGID=yes",
    "--property=RestrictRealtime=yes",
    "--property=LockPersonality=yes",
    "--property=SystemCallArchitectures=native",
    "--property=UMask=0077",
];

/// The address families of every unit but an offline VM process's ([`VM_UNIT`]).
pub const NETWORK_FAMILIES: &str =
    "--property=RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK AF_VSOCK";

/// An offline VM process's unit (see `jail::Jail::offline`) beyond [`SETPRIV_UNIT`]: Unix
/// sockets only (the tap arrives attached as fd 3; QMP, the console, the agent's port and
/// shares are Unix sockets), so a VMM an escaped guest controls opens no connection to the
/// host's network. (A network namespace of its own, as banger builds where systemd is not
/// PID 1, would keep `bangerd open-tap` from reaching the host's tap.) The host's private
/// places are hidden by [`namespace_properties`].
pub const VM_UNIT: &[&str] = &["--property=RestrictAddressFamilies=AF_UNIX"];

/// How a detached process becomes the VM's uid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Runner {
    /// `setpriv`, after banger's own namespace (hosts without systemd) or the unit's.
    Setpriv,
    /// `setpriv` to the VM's owner, for a shared folder's server (virtiofsd): it must reach
    /// the owner's folder wherever it is (home, /tmp) and build its own user-namespace
    /// sandbox.
    Owner,
    /// Firecracker's `jailer`, which builds its chroot and namespace and changes uid itself.
    Jailer,
}

/// What a VM's own processes' units keep beyond [`CONFINED_UNIT`]: only what setpriv needs
/// to become the VM's uid and drop everything.
pub const SETPRIV_UNIT: &[&str] = &[
    "--property=CapabilityBoundingSet=CAP_SETUID CAP_SETGID CAP_SETPCAP",
    "--property=RestrictNamespaces=yes",
    "--property=ProtectHome=yes",
    "--property=PrivateTmp=yes",
];

/// A shared folder's server's unit beyond [`CONFINED_UNIT`]: the owner's folder may be
/// anywhere the owner reaches (/home read-only but for the share, which is in its
/// ReadWritePaths; the host's /tmp), and virtiofsd's sandbox is a user, mount, pid and
/// network namespace of its own. CAP_CHOWN is `bangerd listen`'s, which hands the socket to
/// the VM's group before setpriv drops everything.
pub const OWNER_UNIT: &[&str] = &[
    "--property=CapabilityBoundingSet=CAP_SETUID CAP_SETGID CAP_SETPCAP CAP_CHOWN",
    "--property=RestrictNamespaces=user mnt pid net",
    "--property=ProtectHome=read-only",
    "--property=PrivateTmp=no",
    // virtiofsd mounts a /proc of its own in its user namespace, which the kernel allows only
    // where no part of the host's /proc is covered (these two cover /proc/sys and /proc/kmsg).
    "--property=ProtectKernelTunables=no",
    "--property=ProtectKernelLogs=no",
];

/// A shared folder's server for a folder of root's (the VM's owner is root): virtiofsd runs
/// as root, as libvirt runs it, and its sandbox (mount, pid and network namespaces, then
/// dropping to its own short list) needs these; without them it fails dropping its
/// supplementary groups. The guest still cannot make setuid or setgid files
/// (`RestrictSUIDSGID=` here, `bangerd no-setid` everywhere).
pub const ROOT_OWNER_UNIT: &[&str] = &[
    "--property=CapabilityBoundingSet=CAP_SETUID CAP_SETGID CAP_SETPCAP CAP_CHOWN \
     CAP_DAC_OVERRIDE CAP_FOWNER CAP_FSETID CAP_MKNOD CAP_SETFCAP CAP_SYS_ADMIN CAP_SYS_CHROOT",
    "--property=RestrictNamespaces=mnt pid net",
    "--property=ProtectHome=read-only",
    "--property=PrivateTmp=no",
    "--property=ProtectKernelTunables=no",
    "--property=ProtectKernelLogs=no",
];

/// What setpriv keeps for root's shared folder's server (see [`ROOT_OWNER_UNIT`]): those
/// capabilities in the bounding set (root gets them on exec; no new ones after).
const ROOT_OWNER_SETPRIV: &[&str] = &[
    "--bounding-set=-all,+chown,+dac_override,+fowner,+fsetid,+mknod,+setfcap,+setgid,\
     +setuid,+setpcap,+sys_admin,+sys_chroot",
    "--inh-caps=-all",
    "--ambient-caps=-all",
    "--no-new-privs",
];

/// What the jailer needs for its mount namespace, chroot, device nodes and the uid change;
/// it drops them all when it execs Firecracker as the VM's uid.
pub const JAILER_UNIT: &[&str] = &[
    "--property=CapabilityBoundingSet=CAP_SYS_ADMIN CAP_SYS_CHROOT CAP_MKNOD CAP_CHOWN \
     CAP_FOWNER CAP_DAC_OVERRIDE CAP_SETUID CAP_SETGID CAP_SETPCAP CAP_SYS_RESOURCE",
    "--property=RestrictNamespaces=mnt",
    "--property=ProtectHome=yes",
    "--property=PrivateTmp=yes",
];

impl Runner {
    /// What its unit keeps (systemd hosts), beyond [`CONFINED_UNIT`].
    fn unit_properties(self) -> &'static [&'static str] {
        match self {
            Runner::Setpriv => SETPRIV_UNIT,
            Runner::Owner => OWNER_UNIT,
            Runner::Jailer => JAILER_UNIT,
        }
    }
}

/// What `setpriv` does on either path, after switching to the VM's uid and groups: no
/// capability in any set, no way to gain one. (In a unit, systemd keeps only the
/// capabilities setpriv needs for that switch; setpriv then drops them all.)
const CONFINED_SETPRIV: &[&str] = &[
    "--bounding-set=-all",
    "--inh-caps=-all",
    "--ambient-caps=-all",
    "--no-new-privs",
];

/// A process to start detached from bangerd.
pub struct Detached<'a> {
    /// Where the shell that becomes it writes its pid.
    pub pidfile: &'a Path,
    /// Its transient unit on systemd hosts.
    pub unit: &'a str,
    /// The program and its arguments.
    pub program: &'a Path,
    /// Its arguments.
    pub args: &'a [&'a std::ffi::OsStr],
    /// Where its output goes.
    pub log: &'a Path,
    /// A socket that takes the program's standard output and error instead of `log` (a
    /// listener in a directory only root writes: the console logger's, which bounds them);
    /// `log` then only takes what `systemd-run` itself says.
    pub output: Option<&'a Path>,
    /// Its unit's memory and task bounds.
    pub limits: UnitLimits,
    /// What it may write (all else is read-only in its unit).
    pub writable: &'a [&'a Path],
    /// Who it runs as.
    pub jail: &'a super::jail::Jail,
    /// A tap it gets open and attached as its fd 3. The tap is owned by uid 0, so only root
    /// attaches it: the daemon itself where it starts the process, else (systemd cannot pass
    /// a descriptor into a transient unit) `bangerd open-tap` as the unit's first step, as
    /// root but without capabilities, before `setpriv` drops to the VM's uid.
    pub tap: Option<&'a str>,
    /// The network namespace `tap` is in (see `net::netns`): where the daemon opens it, or,
    /// on systemd hosts, the unit's own namespace (`NetworkNamespacePath=`), where `bangerd
    /// open-tap` finds it. `None`: the daemon's.
    pub tap_netns: Option<&'a str>,
    /// A Unix socket to listen on, handed over as fd 3 (instead of a tap): its path (in a
    /// directory only root writes) and the group that may connect (mode 0660). Made by the
    /// daemon where it starts the process, else by `bangerd listen` as the unit's first step.
    pub listen: Option<(&'a Path, u32)>,
    /// Guest memory it gets as its fd 4 (see `vmm::ram`): handed over by the daemon where it
    /// starts the process, else (systemd) received by `bangerd take-ram` as the unit's first
    /// step, from a socket in the VM's runtime directory that only root reaches and that the
    /// daemon serves for this one start.
    pub ram: Option<&'a std::os::fd::OwnedFd>,
}

/// The argument that runs the `bangerd` binary as `take-ram SOCKET -- PROGRAM ARGS…`.
pub const TAKE_RAM_ARG: &str = "take-ram";

/// `bangerd take-ram SOCKET -- PROGRAM ARGS…`: receives a descriptor from the daemon on Unix
/// socket SOCKET, makes it fd 4 and becomes PROGRAM.
pub fn take_ram_and_exec(args: &[std::ffi::OsString]) -> std::io::Error {
    let usage = || std::io::Error::other("usage: bangerd take-ram SOCKET -- PROGRAM ARGS…");
    let [sock, sep, program, rest @ ..] = args else {
        return usage();
    };
    if sep != "--" {
        return usage();
    }
    let fd = match std::os::unix::net::UnixStream::connect(sock)
        .and_then(|s| crate::host::recv_fd(std::os::fd::AsFd::as_fd(&s)))
    {
        Ok(fd) => fd,
        Err(e) => return std::io::Error::other(format!("cannot take the guest's memory: {e}")),
    };
    use std::os::fd::IntoRawFd;
    use std::os::unix::process::CommandExt;
    let raw = fd.into_raw_fd();
    if let Err(e) = crate::host::fds_at(&[(raw, super::ram::GUEST_RAM_FD)]) {
        return e;
    }
    std::process::Command::new(program).args(rest).exec()
}

/// Serves `fd` once on a new Unix socket `sock` (root's, mode 0600) to a peer running as root
/// (`bangerd take-ram` in a VMM's unit), for up to 30 s, on a thread of its own.
fn serve_ram(sock: &Path, fd: &std::os::fd::OwnedFd) -> std::io::Result<()> {
    let _ = std::fs::remove_file(sock);
    let listener = std::os::unix::net::UnixListener::bind(sock)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(sock, std::fs::Permissions::from_mode(0o600))?;
    let fd = fd.try_clone()?;
    let sock = sock.to_owned();
    // A blocking accept that gives up after 30 s (Linux applies SO_RCVTIMEO to accept).
    let wait = libc::timeval {
        tv_sec: 30,
        tv_usec: 0,
    };
    use std::os::fd::AsRawFd;
    // SAFETY: setsockopt reads a timeval of the size passed from a live local.
    let set = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&wait as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if set != 0 {
        return Err(std::io::Error::last_os_error());
    }
    std::thread::spawn(move || {
        use std::os::fd::AsFd;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::time::Instant::now() < deadline {
            let Ok((conn, _)) = listener.accept() else {
                break;
            };
            let root = crate::host::peer_uid(conn.as_fd()).is_ok_and(|uid| uid == 0);
            if root && crate::host::send_with_fd(conn.as_fd(), b"m", fd.as_fd()).is_ok() {
                break;
            }
        }
        let _ = std::fs::remove_file(&sock);
    });
    Ok(())
}

/// The argument that runs the `bangerd` binary as `no-huge-pages -- PROGRAM ARGS…`.
pub const NO_HUGE_PAGES_ARG: &str = "no-huge-pages";

/// `bangerd no-huge-pages -- PROGRAM ARGS…`: turns transparent huge pages off for this process
/// (`PR_SET_THP_DISABLE`, which outranks a program's own `MADV_HUGEPAGE` and lasts across
/// exec and into children) and becomes PROGRAM.
pub fn no_huge_pages_and_exec(args: &[std::ffi::OsString]) -> std::io::Error {
    let [sep, program, rest @ ..] = args else {
        return std::io::Error::other("usage: bangerd no-huge-pages -- PROGRAM ARGS…");
    };
    if sep != "--" {
        return std::io::Error::other("usage: bangerd no-huge-pages -- PROGRAM ARGS…");
    }
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) } != 0 {
        let e = std::io::Error::last_os_error();
        return std::io::Error::other(format!("cannot turn transparent huge pages off: {e}"));
    }
    use std::os::unix::process::CommandExt;
    std::process::Command::new(program).args(rest).exec()
}

/// The argument that runs the `bangerd` binary as `listen PATH GID -- PROGRAM ARGS…`.
pub const LISTEN_ARG: &str = "listen";

/// `bangerd listen PATH GID -- PROGRAM ARGS…`: listens on Unix socket PATH (root:GID 0660)
/// as fd 3 and becomes PROGRAM.
pub fn listen_and_exec(args: &[std::ffi::OsString]) -> std::io::Error {
    let usage = || std::io::Error::other("usage: bangerd listen PATH GID -- PROGRAM ARGS…");
    let [path, gid, sep, program, rest @ ..] = args else {
        return usage();
    };
    let Some(gid) = gid.to_str().and_then(|g| g.parse().ok()) else {
        return usage();
    };
    if sep != "--" {
        return usage();
    }
    match crate::host::listen_unix(Path::new(path), gid) {
        Ok(fd) => exec_with_fd3(fd, program, rest),
        Err(e) => e,
    }
}

/// Makes `fd` this process's fd 3 and becomes `program` with `args`; returns only the
/// error that stopped it.
fn exec_with_fd3(
    fd: std::os::fd::OwnedFd,
    program: &std::ffi::OsStr,
    args: &[std::ffi::OsString],
) -> std::io::Error {
    use std::os::fd::IntoRawFd;
    use std::os::unix::process::CommandExt;
    let fd = fd.into_raw_fd();
    if let Err(e) = crate::host::fds_at(&[(fd, 3)]) {
        return e;
    }
    if fd != 3 {
        // SAFETY: fd is this process's own copy, now duplicated as 3.
        unsafe { libc::close(fd) };
    }
    std::process::Command::new(program).args(args).exec()
}

/// The argument that runs the `bangerd` binary as `open-tap TAP -- PROGRAM ARGS…`.
pub const OPEN_TAP_ARG: &str = "open-tap";

/// The program of the helpers that run beside each VM for as long as it runs (console
/// logger, agent link, machine-control relay, port forwarder; the root crate's `helpers`).
pub const HELPER_PROGRAM: &str = "banger-vm-helper";

/// [`HELPER_PROGRAM`]: the one next to this binary, else the installed one
/// (`/usr/lib/banger`), else `bangerd` itself, which runs the same roles. A program of its
/// own because every VM pays for its helpers' processes: the daemon's binary, started again,
/// would give each its own ~0.7 MiB copy of the relocated read-only data of the whole daemon.
pub fn helper_program() -> crate::Result<std::path::PathBuf> {
    let sibling = std::env::current_exe()
        .ok()
        .and_then(|p| Some(p.parent()?.join(HELPER_PROGRAM)));
    match sibling {
        Some(p) if p.is_file() => Ok(p),
        _ => crate::host::find_program(HELPER_PROGRAM).map_or_else(bangerd_program, Ok),
    }
}

/// The `bangerd` binary (`open-tap` and the other steps before a program): this one, unless
/// it was replaced on disk (an upgrade), then the installed one.
pub fn bangerd_program() -> crate::Result<std::path::PathBuf> {
    match std::env::current_exe() {
        Ok(p) if p.is_file() && p.file_name().is_some_and(|n| n == "bangerd") => Ok(p),
        _ => crate::host::find_program("bangerd").ok_or_else(|| {
            failed(
                "bangerd is not installed",
                std::io::Error::from(std::io::ErrorKind::NotFound),
            )
        }),
    }
}

/// `bangerd open-tap TAP -- PROGRAM ARGS…`: attaches tap `TAP` as fd 3 and becomes PROGRAM.
pub fn open_tap_and_exec(args: &[std::ffi::OsString]) -> std::io::Error {
    let (Some(tap), Some(sep)) = (args.first(), args.get(1)) else {
        return std::io::Error::other("usage: bangerd open-tap TAP -- PROGRAM ARGS…");
    };
    if sep != "--" || args.len() < 3 {
        return std::io::Error::other("usage: bangerd open-tap TAP -- PROGRAM ARGS…");
    }
    match crate::net::open_tap(&tap.to_string_lossy()) {
        Ok(fd) => exec_with_fd3(fd, &args[2], &args[3..]),
        Err(e) => std::io::Error::other(e.full_message()),
    }
}

/// Whether `d` is one of a VM's own processes, run by setpriv (the jailer builds its own
/// namespace).
fn vm_own(d: &Detached<'_>, runner: Runner) -> bool {
    d.jail.private && runner == Runner::Setpriv
}

/// The unit's own view of banger's directories: its roots empty (a tmpfs), with only what the
/// process writes bound back read-write and what it reads bound back read-only, so it sees no
/// other VM, image, kernel or the database at all; for a VM's own process (`private`), the
/// host's private places too (see `jail::HOST_PRIVATE`).
fn namespace_properties(d: &Detached<'_>, private: bool, programs: &[&Path]) -> Vec<String> {
    let join = |paths: &mut dyn Iterator<Item = &Path>| {
        paths
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(" ")
    };
    if d.jail.hide.is_empty() {
        return Vec::new();
    }
    // SETPRIV_UNIT's ProtectHome= and PrivateTmp= hide homes and temporary files; the rest
    // of the host's private places that exist (a unit's tmpfs needs its mount point).
    let covered = ["/home", "/root", "/tmp", "/var/tmp"];
    let all: Vec<&Path> = d
        .jail
        .hide
        .iter()
        .map(|r| r.as_path())
        .chain(
            super::jail::HOST_PRIVATE
                .iter()
                .filter(|p| private && !covered.contains(p) && Path::new(p).is_dir())
                .map(Path::new),
        )
        .collect();
    // A root inside another is hidden with it (/run/banger under /run).
    let roots: Vec<&Path> = all
        .iter()
        .copied()
        .filter(|r| !all.iter().any(|o| o != r && r.starts_with(o)))
        .collect();
    let inside = |p: &Path| roots.iter().any(|r| p.starts_with(r));
    let mut props = vec![format!(
        "--property=TemporaryFileSystem={}",
        join(&mut roots.iter().copied())
    )];
    let rw: Vec<&Path> = d.writable.iter().copied().filter(|p| inside(p)).collect();
    if !rw.is_empty() {
        props.push(format!(
            "--property=BindPaths={}",
            join(&mut rw.into_iter())
        ));
    }
    // What it runs stays visible where a hidden root holds it (a test build under /tmp).
    let ro: Vec<&Path> = d
        .jail
        .read_only
        .iter()
        .map(|p| p.as_path())
        .chain(programs.iter().copied().filter(|p| p.is_absolute()))
        .filter(|p| inside(p))
        .collect();
    if !ro.is_empty() {
        props.push(format!(
            "--property=BindReadOnlyPaths={}",
            join(&mut ro.into_iter())
        ));
    }
    props
}

/// Starts a [`Detached`] process, its pid written to its pid file by the shell that then
/// becomes it, its output to its log. It must outlive the daemon and must not inherit its
/// sandbox (QEMU's TCG needs writable-executable memory, which the daemon's unit denies): on a
/// systemd host it runs as its transient service started by systemd (`systemd-run`),
/// elsewhere in a session of its own (`setsid -f`). Either way `setpriv` makes it the VM's
/// uid with no capabilities and no new privileges (see [`CONFINED_UNIT`]). Returns once it
/// started, not when ready.
pub async fn spawn_detached(d: &Detached<'_>) -> crate::Result<()> {
    spawn(d, Runner::Setpriv).await
}

/// Starts a shared folder's server as a [`Detached`] process that becomes `d.jail`, the VM's
/// owner (see [`Runner::Owner`]).
pub async fn spawn_as_owner(d: &Detached<'_>) -> crate::Result<()> {
    spawn(d, Runner::Owner).await
}

/// Starts Firecracker's `jailer` (`d.program`, its arguments `d.args`) as a [`Detached`]
/// process: as root, in its unit on systemd hosts (with the capabilities the jailer needs,
/// see [`Runner::Jailer`]); the jailer then builds the VM's chroot and becomes its uid.
pub async fn spawn_jailer(d: &Detached<'_>) -> crate::Result<()> {
    spawn(d, Runner::Jailer).await
}

async fn spawn(d: &Detached<'_>, runner: Runner) -> crate::Result<()> {
    let (jail, log) = (d.jail, d.log);
    let root_owner = runner == Runner::Owner && jail.uid == 0;
    // What runs inside the process's namespace: the program, and bangerd's own steps.
    let bangerd = bangerd_program().ok();
    let mut programs: Vec<&Path> = std::iter::once(d.program)
        .chain(bangerd.as_deref())
        .collect();
    // Once each: a second bind over the first would open the program itself for writing.
    programs.dedup();
    let groups: Vec<String> = jail.groups.iter().map(|g| g.to_string()).collect();
    let what = d
        .program
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    let fail = |e: std::io::Error| failed(format!("Cannot start {what}"), e);
    let out = std::fs::File::create(log).map_err(fail)?;
    let err = out.try_clone().map_err(fail)?;
    // The shell writes its pid (about to become the program's) for live_pid to find.
    // Nothing runs unless its pid file was written: a process no pid file names would be
    // an orphan no one stops.
    let mut script = "echo $$ > \"$0\" && exec \"$@\"".to_owned();
    let run_dir = d
        .pidfile
        .parent()
        .unwrap_or(Path::new("/"))
        .display()
        .to_string();
    let mut cmd = if super::scope::systemd_booted() {
        // systemd expands $VAR in ExecStart; $$ is its escape for a literal $.
        script = script.replace('$', "$$");
        let mut c = tokio::process::Command::new("systemd-run");
        c.arg(format!("--unit={}", d.unit))
            .args(["--quiet", "--collect", "--service-type=exec"])
            .arg(format!("--description=banger {what} ({})", d.unit))
            .args(match d.output {
                // systemd connects a `file:` that is a Unix socket; stderr is a copy of
                // stdout, one connection.
                Some(sock) => [
                    format!("--property=StandardOutput=file:{}", sock.display()),
                    "--property=StandardError=inherit".to_owned(),
                ],
                None => [
                    format!("--property=StandardOutput=append:{}", log.display()),
                    format!("--property=StandardError=append:{}", log.display()),
                ],
            })
            .args(["--property=KillMode=mixed", "--property=TimeoutStopSec=10"])
            .arg(format!("--setenv={RUN_DIR_ENV}={run_dir}"))
            .args(CONFINED_UNIT)
            .args(if root_owner {
                ROOT_OWNER_UNIT
            } else {
                runner.unit_properties()
            })
            .args(if d.jail.offline && runner == Runner::Setpriv {
                VM_UNIT
            } else {
                &[NETWORK_FAMILIES]
            })
            .arg(format!(
                "--property=ReadWritePaths={}",
                d.writable
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(" ")
            ))
            .args(namespace_properties(d, vm_own(d, runner), &programs))
            .args(
                d.tap_netns
                    .map(|ns| format!("--property=NetworkNamespacePath={ns}")),
            )
            .arg(format!("--property=MemoryMax={}", d.limits.memory_max))
            .arg(format!("--property=TasksMax={}", d.limits.tasks_max))
            .arg("--");
        c
    } else {
        let mut c = tokio::process::Command::new("setsid");
        c.arg("-f").env(RUN_DIR_ENV, &run_dir);
        c
    };
    // In order, each becoming the next: [`bangerd no-huge-pages` (a VMM)], [`bangerd
    // jail-mounts` (no systemd: the namespace a unit gets from systemd)], [`bangerd open-tap`
    // (systemd: the tap as fd 3)], the shell that writes the pid file (root's, in root's
    // runtime directory), `setpriv` (the VM's uid, no capabilities), the program.
    let mut fd3: Option<std::os::fd::OwnedFd> = None;
    if !d.limits.huge_pages {
        cmd.arg(bangerd_program()?).args([NO_HUGE_PAGES_ARG, "--"]);
    }
    if super::scope::systemd_booted() {
        if let Some(tap) = d.tap {
            cmd.arg(bangerd_program()?).args([OPEN_TAP_ARG, tap, "--"]);
        }
        if let Some((path, gid)) = d.listen {
            cmd.arg(bangerd_program()?)
                .arg(LISTEN_ARG)
                .arg(path)
                .arg(gid.to_string())
                .arg("--");
        }
        if let Some(fd) = d.ram {
            let sock = Path::new(&run_dir).join("ram.sock");
            serve_ram(&sock, fd).map_err(fail)?;
            cmd.arg(bangerd_program()?)
                .arg(TAKE_RAM_ARG)
                .arg(&sock)
                .arg("--");
        }
    } else if runner != Runner::Jailer {
        if !d.jail.hide.is_empty() {
            let m = super::jail::Mounts::of(d.jail, d.writable, &programs);
            cmd.arg(bangerd_program()?)
                .arg(super::jail::MOUNTS_ARG)
                .args(m.args());
        }
        // The daemon attaches the tap, or listens, before the uid changes.
        if let Some(tap) = d.tap {
            fd3 = Some(match d.tap_netns {
                Some(ns) => crate::net::netns::open_tap_in(ns, tap).await?,
                None => crate::net::open_tap(tap)?,
            });
        }
        if let Some((path, gid)) = d.listen {
            fd3 = Some(crate::host::listen_unix(path, gid).map_err(fail)?);
        }
    }
    cmd.args(["sh", "-c", &script]).arg(d.pidfile);
    if runner != Runner::Jailer {
        cmd.arg("setpriv")
            .arg(format!("--reuid={}", jail.uid))
            .arg(format!("--regid={}", jail.gid))
            .arg(if groups.is_empty() {
                "--clear-groups".to_owned()
            } else {
                format!("--groups={}", groups.join(","))
            })
            .args(if root_owner {
                ROOT_OWNER_SETPRIV
            } else {
                CONFINED_SETPRIV
            })
            .arg("--");
    }
    {
        use std::os::fd::AsRawFd;
        let mut fds = Vec::new();
        if let Some(fd) = &fd3 {
            fds.push((fd.as_raw_fd(), 3));
        }
        if let (Some(fd), false) = (d.ram, super::scope::systemd_booted()) {
            fds.push((fd.as_raw_fd(), super::ram::GUEST_RAM_FD));
        }
        if !fds.is_empty() {
            // SAFETY: between fork and exec only fcntl and dup2 run (fds_at), all
            // async-signal-safe; the descriptors stay open in the parent across the spawn.
            unsafe {
                cmd.pre_exec(move || crate::host::fds_at(&fds));
            }
        }
    }
    // Without systemd the program inherits what its starter gets.
    let (out, err): (std::process::Stdio, std::process::Stdio) =
        match (d.output, super::scope::systemd_booted()) {
            (Some(sock), false) => {
                let c = std::os::unix::net::UnixStream::connect(sock).map_err(fail)?;
                let e = c.try_clone().map_err(fail)?;
                (
                    std::os::fd::OwnedFd::from(c).into(),
                    std::os::fd::OwnedFd::from(e).into(),
                )
            }
            _ => (out.into(), err.into()),
        };
    // status(), not output(): output() would pipe stdout to the detached process too.
    let status = cmd
        .arg(d.program)
        .args(d.args)
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(err)
        .status()
        .await
        .map_err(fail)?;
    if !status.success() {
        let msg = std::fs::read_to_string(log).unwrap_or_default();
        return Err(fail(std::io::Error::other(format!(
            "{status}: {}",
            msg.trim()
        ))));
    }
    Ok(())
}

/// Waits until a detached process says in its log that it serves (`ready`), up to `limit`,
/// and still runs as the process its pid file names (`marker`, see [`live_pid`]). An exit
/// first, or the limit, is an error carrying what its log said. The log is read as a log a
/// VM's uid may write (its newest 64 KiB, never through a link).
pub async fn wait_for_log(
    pidfile: &Path,
    marker: &str,
    log: &Path,
    ready: &str,
    limit: Duration,
) -> std::result::Result<(), String> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let tail = super::console::read_tail(log, 64 << 10).unwrap_or_default();
        let said = String::from_utf8_lossy(&tail);
        if said.contains(ready) && live_pid(pidfile, marker).is_some() {
            return Ok(());
        }
        let gone = read_pid(pidfile).is_some_and(|p| !exists(p));
        if gone || tokio::time::Instant::now() > deadline {
            return Err(said.trim().to_owned());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until `path` exists, up to `limit`.
pub async fn wait_for_path(path: &Path, limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while !path.exists() {
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ram_socket_hands_its_descriptor_once_to_root_and_goes() {
        let d = tempfile::tempdir().unwrap();
        let sock = d.path().join("ram.sock");
        let file = std::fs::File::from(
            crate::vmm::ram::copy(
                &mut std::fs::File::open("/dev/null").unwrap(),
                0,
                &crate::model::hex(&<sha2::Sha256 as sha2::Digest>::digest(b"")),
                false,
            )
            .unwrap(),
        );
        serve_ram(&sock, &file.into()).unwrap();
        let conn = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        let got = crate::host::recv_fd(std::os::fd::AsFd::as_fd(&conn)).unwrap();
        assert!(std::fs::File::from(got).metadata().unwrap().is_file());
        // The server removes its socket once it has served.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while sock.exists() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(!sock.exists());
    }

    #[test]
    fn pss_is_read_from_the_rollup_and_is_ours_for_this_process() {
        let rollup = "55d0-7ffe ---p 00000000 00:00 0   [rollup]\nRss:  2048 kB\nPss:  1536 kB\n";
        assert_eq!(pss_of(rollup), Some(1536 << 10));
        assert_eq!(pss_of("Rss: 1 kB\n"), None);
        assert!(pss_bytes(std::process::id()) > 0);
        let spin = std::time::Instant::now();
        while spin.elapsed() < std::time::Duration::from_millis(50) {
            std::hint::black_box(0u64);
        }
        assert!(cpu_nsec(std::process::id()) > 0);
        assert_eq!(cpu_nsec(u32::MAX), 0);
        assert_eq!(pss_bytes(u32::MAX), 0);
    }

    #[tokio::test]
    async fn only_the_process_that_names_the_marker_is_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().to_string_lossy().into_owned();
        // The marker is the shell's $0, so it is in the command line.
        let mut child = std::process::Command::new("sh")
            .args(["-c", "while :; do sleep 1; done", &marker])
            .spawn()
            .unwrap();
        let pidfile = dir.path().join("x.pid");
        std::fs::write(&pidfile, child.id().to_string()).unwrap();
        // Until the child has exec'd, its command line is still the test binary's.
        for _ in 0..500 {
            if live_pid(&pidfile, &marker).is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(live_pid(&pidfile, &marker), Some(child.id() as i32));
        assert_eq!(live_pid(&pidfile, "/some/other/vm"), None);
        terminate(&pidfile, "/some/other/vm", Duration::from_millis(10)).await;
        assert!(
            child.try_wait().unwrap().is_none(),
            "a foreign pid was killed"
        );
        std::fs::write(&pidfile, child.id().to_string()).unwrap();
        let waiter = std::thread::spawn(move || child.wait().unwrap());
        terminate(&pidfile, &marker, Duration::from_secs(5)).await;
        assert!(!waiter.join().unwrap().success());
        assert!(!pidfile.exists());
    }
}
