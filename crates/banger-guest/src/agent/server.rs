//! `banger-agent`'s service, in the guest: one thread per connection, std and libc only so
//! the static binary stays small and runs in any image.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use super::{frame, header, parse_header, Health, Reply, Request, PORT};

/// Where the agent listens.
#[derive(Debug, Clone)]
pub enum Listen {
    /// vsock, any CID, this port (the guest).
    Vsock(u32),
    /// A Unix socket path (tests on the host).
    Unix(std::path::PathBuf),
}

impl Default for Listen {
    fn default() -> Self {
        Listen::Vsock(PORT)
    }
}

fn vsock_listener(port: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: socket takes no pointers; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket this function owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain data; zeroed is a valid value before the fields are set.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_port = port;
    addr.svm_cid = libc::VMADDR_CID_ANY;
    // SAFETY: addr is a valid sockaddr_vm and its size is passed with it.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    // SAFETY: listen takes no pointers.
    if r != 0 || unsafe { libc::listen(fd.as_raw_fd(), 16) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

/// Accepts the next connection; on vsock, only the host's (CID 2): another guest, or a
/// process in this guest, never reaches the agent.
fn accept(listener: &OwnedFd, vsock: bool) -> std::io::Result<std::fs::File> {
    loop {
        // SAFETY: sockaddr_vm is plain data; zeroed is valid before accept fills it.
        let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
        // SAFETY: addr and len describe a sockaddr_vm-sized buffer; for a Unix socket the
        // kernel writes at most len bytes of its (shorter) address.
        let fd = unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                (&mut addr as *mut libc::sockaddr_vm).cast(),
                &mut len,
                libc::SOCK_CLOEXEC,
            )
        };
        if fd >= 0 {
            // SAFETY: fd is a fresh connection this function owns.
            let conn = unsafe { std::fs::File::from_raw_fd(fd) };
            if vsock && addr.svm_cid != libc::VMADDR_CID_HOST {
                eprintln!(
                    "banger-agent: refused a connection from CID {} (only the host's is served)",
                    addr.svm_cid
                );
                continue;
            }
            return Ok(conn);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Where the agent's channel is: the VM's virtio-serial port (QEMU), else vsock (Firecracker).
/// Devices appear as their modules probe, so this waits a little for either.
fn channel() -> Option<std::path::PathBuf> {
    let ports = std::path::Path::new("/sys/class/virtio-ports");
    let vsock = std::path::Path::new("/sys/bus/virtio/drivers/vmw_vsock_virtio_transport");
    let has_vsock = || {
        std::fs::read_dir(vsock)
            .map(|d| {
                d.flatten()
                    .any(|e| e.file_name().to_string_lossy().starts_with("virtio"))
            })
            .unwrap_or(false)
    };
    for _ in 0..200 {
        if let Some(p) = super::link::find_port(ports) {
            return Some(p);
        }
        if has_vsock() {
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    None
}

/// Serves forever.
pub fn serve(listen: Listen) -> std::io::Result<()> {
    if !matches!(listen, Listen::Unix(_)) {
        // The guest's OOM killer never picks the agent: a guest out of memory stays
        // reachable, and the host is told what was killed (`oom`). What it starts is back
        // at 0 (see `spawn`).
        if let Err(e) = std::fs::write("/proc/self/oom_score_adj", "-1000") {
            eprintln!("banger-agent: oom_score_adj: {e}");
        }
        super::identity::prepare();
    }
    if let (Listen::Vsock(PORT), Some(port)) = (&listen, channel()) {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&port)?;
        eprintln!(
            "banger-agent {} serving on {} ({})",
            crate::VERSION,
            port.display(),
            super::link::PORT_NAME
        );
        return super::link::serve_guest(
            file,
            |conn| {
                if let Err(e) = handle(conn) {
                    eprintln!("banger-agent: connection: {e}");
                }
            },
            |port| (port == super::HEALTH_PORT).then(health_line),
        );
    }
    let listener: OwnedFd = match &listen {
        Listen::Vsock(port) => vsock_listener(*port)?,
        Listen::Unix(path) => {
            let _ = std::fs::remove_file(path);
            std::os::unix::net::UnixListener::bind(path)?.into()
        }
    };
    eprintln!("banger-agent {} listening on {listen:?}", crate::VERSION);
    loop {
        let conn = accept(&listener, matches!(listen, Listen::Vsock(_)))?;
        std::thread::spawn(move || {
            if let Err(e) = handle(conn) {
                eprintln!("banger-agent: connection: {e}");
            }
        });
    }
}

pub(super) fn write_line(w: &mut impl Write, reply: &Reply) -> std::io::Result<()> {
    let mut s = serde_json::to_vec(reply).map_err(std::io::Error::other)?;
    s.push(b'\n');
    w.write_all(&s)
}

fn handle(conn: std::fs::File) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut writer = conn;
    let mut line = String::new();
    // A request line is small; a client that sends more without a newline is dropped.
    (&mut reader).take(64 * 1024).read_line(&mut line)?;
    let req: Request = match serde_json::from_str(line.trim_end()) {
        Ok(r) => r,
        Err(e) => return write_line(&mut writer, &Reply::error(format!("bad request: {e}"))),
    };
    match req {
        Request::Health => write_line(&mut writer, &health_reply()),
        Request::Unpark => match crate::guestinit::park::unpark() {
            Ok(()) => {
                write_line(&mut writer, &Reply::ok())?;
                // The reply must leave the guest before this agent does: the host hangs
                // up once it has it (or the wait ends), then init starts the root's agent.
                wait_hangup(&writer, std::time::Duration::from_secs(10));
                std::process::exit(0)
            }
            Err(e) => write_line(&mut writer, &Reply::error(format!("unpark: {e}"))),
        },
        Request::Shutdown => {
            write_line(&mut writer, &Reply::ok())?;
            drop(writer);
            power_off();
            Ok(())
        }
        Request::Exec {
            argv,
            env,
            cwd,
            user,
            tty,
            detach,
            tag,
            root,
            hostname,
            rlimits,
            cgroup,
        } => {
            let how = How {
                env,
                cwd,
                user,
                tty,
                root,
                hostname,
                rlimits,
                cgroup,
            };
            match detach {
                true => super::procs::start(reader, writer, argv, how, tag),
                false => exec(reader, writer, argv, how),
            }
        }
        Request::Attach { pid, tag } => match super::procs::find(pid, tag.as_deref()) {
            Ok(p) => super::procs::attach(reader, writer, p),
            Err(e) => write_line(&mut writer, &Reply::error(e)),
        },
        Request::Input { pid, tag } => match super::procs::find(pid, tag.as_deref()) {
            Ok(p) => super::procs::input(reader, writer, p),
            Err(e) => write_line(&mut writer, &Reply::error(e)),
        },
        Request::Procs => {
            let mut r = Reply::ok();
            r.procs = Some(super::procs::list());
            write_line(&mut writer, &r)
        }
        Request::Stats => match super::stats::sample() {
            Ok(stats) => {
                let mut r = Reply::ok();
                r.stats = Some(stats);
                write_line(&mut writer, &r)
            }
            Err(e) => write_line(&mut writer, &Reply::error(format!("stats: {e}"))),
        },
        Request::Mount {
            root,
            destination,
            fstype,
            options,
        } => {
            let root = std::path::PathBuf::from(root.as_deref().unwrap_or("/"));
            let r = match fstype.as_str() {
                "tmpfs" => super::mount::tmpfs(&root, &destination, &options),
                other => Err(format!("mount type {other:?}: the agent mounts tmpfs only")),
            };
            match r {
                Ok(()) => write_line(&mut writer, &Reply::ok()),
                Err(e) => write_line(&mut writer, &Reply::error(e)),
            }
        }
        Request::Unmount { root } => {
            match super::mount::unmount_below(std::path::Path::new(&root)) {
                Ok(_) => write_line(&mut writer, &Reply::ok()),
                Err(e) => write_line(&mut writer, &Reply::error(e)),
            }
        }
        Request::Cgroup { name, action } => match super::cgroup::act(&name, action) {
            Ok(stats) => {
                let mut r = Reply::ok();
                r.stats = stats;
                write_line(&mut writer, &r)
            }
            Err(e) => write_line(&mut writer, &Reply::error(e)),
        },
        Request::Oom => {
            drop(reader);
            match super::oom::follow(&writer.try_clone()?, &mut writer) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    write_line(&mut writer, &Reply::error(format!("/dev/kmsg: {e}")))
                }
                r => r,
            }
        }
        Request::Signal { pid, tag, signal } => {
            match super::procs::find(pid, tag.as_deref()).and_then(|p| p.signal(signal)) {
                Ok(()) => write_line(&mut writer, &Reply::ok()),
                Err(e) => write_line(&mut writer, &Reply::error(e)),
            }
        }
        Request::Fs { file, user } => {
            // The agent itself, as the user: the operation has that user's rights only.
            let json = serde_json::to_string(&file).map_err(std::io::Error::other)?;
            let argv = vec!["/proc/self/exe".into(), "fs".into(), json];
            exec(
                reader,
                writer,
                argv,
                How {
                    user,
                    ..Default::default()
                },
            )
        }
        Request::Put { path, name, dir } => put(reader, writer, &path, &name, dir),
        Request::Get { path } => get(writer, &path),
        Request::SetClock { time_ns, slew } => match super::identity::set_clock(time_ns, slew) {
            Ok(()) => write_line(&mut writer, &Reply::ok()),
            Err(e) => write_line(&mut writer, &Reply::error(e)),
        },
        Request::Identity(id) => match super::identity::apply(&id) {
            // With its health: the host need not ask again (a round trip a restore saves),
            // nor connect to sshd to know it listens.
            Ok(()) => {
                let mut r = health_reply();
                if let Some(h) = r.health.as_mut() {
                    // No sshd, nothing to look for (a read of /proc/net/tcp less).
                    h.ssh_listening = Some(
                        h.sshd == Some(true)
                            && super::identity::listening_everywhere(super::SSH_PORT),
                    );
                }
                write_line(&mut writer, &r)
            }
            Err(e) => write_line(&mut writer, &Reply::error(e)),
        },
        Request::Connect { port } => {
            drop(reader);
            match std::net::TcpStream::connect(("127.0.0.1", port)) {
                Ok(tcp) => {
                    write_line(&mut writer, &Reply::ok())?;
                    crate::splice::splice(writer, tcp);
                    Ok(())
                }
                Err(e) => write_line(
                    &mut writer,
                    &Reply::error(format!("nothing answers on the guest's port {port}: {e}")),
                ),
            }
        }
        Request::ConnectUdp { port } => {
            drop(reader);
            let sock = std::net::UdpSocket::bind(("127.0.0.1", 0))
                .and_then(|s| s.connect(("127.0.0.1", port)).map(|_| s));
            match sock {
                Ok(sock) => {
                    write_line(&mut writer, &Reply::ok())?;
                    relay_udp(writer, sock)
                }
                Err(e) => write_line(
                    &mut writer,
                    &Reply::error(format!("cannot reach the guest's UDP port {port}: {e}")),
                ),
            }
        }
    }
}

/// Carries datagrams between a stream (length-prefixed frames) and a connected UDP socket
/// until the stream ends.
fn relay_udp(stream: std::fs::File, sock: std::net::UdpSocket) -> std::io::Result<()> {
    use crate::splice::{read_datagram, write_datagram};
    let (mut from_host, mut to_host) = (stream.try_clone()?, stream);
    let back = sock.try_clone()?;
    std::thread::spawn(move || {
        let mut b = [0u8; 65536];
        // A refused send (nothing listens yet) is the guest's ICMP; the next may land.
        while let Ok(n) = back.recv(&mut b).or_else(|e| {
            if e.kind() == std::io::ErrorKind::ConnectionRefused {
                Ok(0)
            } else {
                Err(e)
            }
        }) {
            if n > 0 && write_datagram(&mut to_host, &b[..n]).is_err() {
                break;
            }
        }
    });
    let mut b = [0u8; 65536];
    while let Some(d) = read_datagram(&mut from_host, &mut b)? {
        let _ = sock.send(d);
    }
    // The stream ended: the socket goes, and with it the thread reading it (shut down).
    // SAFETY: shutdown takes no pointers; the descriptor is open.
    unsafe { libc::shutdown(std::os::fd::AsRawFd::as_raw_fd(&sock), libc::SHUT_RDWR) };
    Ok(())
}

/// Ends a copy: `EXIT` 0, or a `STDERR` frame with the reason and `EXIT` 1.
fn end_copy(writer: &mut std::fs::File, r: std::io::Result<()>, what: &str) -> std::io::Result<()> {
    let mut w = super::files::FrameWriter::new(writer, frame::STDERR);
    let code: i32 = match r {
        Ok(()) => 0,
        Err(e) => {
            w.frame(frame::STDERR, format!("{what}: {e}").as_bytes())?;
            1
        }
    };
    w.frame(frame::EXIT, &code.to_be_bytes())
}

fn put(
    reader: BufReader<std::fs::File>,
    mut writer: std::fs::File,
    path: &str,
    name: &str,
    dir: bool,
) -> std::io::Result<()> {
    use super::files;
    if name.is_empty() || name.contains('/') || name == ".." {
        return write_line(
            &mut writer,
            &Reply::error(format!("{name:?} is not a file name")),
        );
    }
    let dest = std::path::Path::new(path);
    let target = files::landing(dest, name);
    if !target
        .parent()
        .is_some_and(|p| p.as_os_str().is_empty() || p.is_dir())
    {
        return write_line(
            &mut writer,
            &Reply::error(format!(
                "{}: no such directory in the guest",
                dest.display()
            )),
        );
    }
    write_line(&mut writer, &Reply::ok())?;
    let mut input = files::FrameReader::new(reader, frame::STDIN);
    let r = files::unpack(&mut input, &target, dir);
    // Whatever is left of the stream is read, so the client is never blocked writing it.
    let _ = std::io::copy(&mut input, &mut std::io::sink());
    end_copy(&mut writer, r, &target.display().to_string())
}

fn get(mut writer: std::fs::File, path: &str) -> std::io::Result<()> {
    use super::files;
    let src = std::path::Path::new(path);
    let meta = match std::fs::symlink_metadata(src) {
        Ok(m) => m,
        Err(e) => return write_line(&mut writer, &Reply::error(format!("{path}: {e}"))),
    };
    let mut reply = Reply::ok();
    reply.dir = Some(meta.is_dir());
    write_line(&mut writer, &reply)?;
    let r = {
        let mut out = files::FrameWriter::new(&mut writer, frame::STDOUT);
        files::pack(src, &files::base_name(src), &mut out)
            .and_then(|_| out.frame(frame::STDOUT, b""))
    };
    end_copy(&mut writer, r, path)
}

/// A success carrying the agent's health (`health`, `identity`, [`super::HEALTH_PORT`]).
fn health_reply() -> Reply {
    let mut r = Reply::ok();
    r.health = Some(health());
    r
}

/// The answer on [`super::HEALTH_PORT`]: a `health` reply line.
fn health_line() -> Vec<u8> {
    let mut line = Vec::new();
    let _ = write_line(&mut line, &health_reply());
    line
}

/// Waits until the peer of `conn` hung up (its reads end), at most `limit`.
fn wait_hangup(conn: &std::fs::File, limit: std::time::Duration) {
    let end = std::time::Instant::now() + limit;
    let mut buf = [0u8; 512];
    loop {
        let left = end.saturating_duration_since(std::time::Instant::now());
        if left.is_zero()
            || crate::guestinit::supervise::wait_readable(&[conn.as_raw_fd()], left).is_empty()
        {
            return;
        }
        match (&*conn).read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

fn health() -> Health {
    let uptime = std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    Health {
        version: crate::VERSION.into(),
        uptime_sec: uptime,
        boot_id,
        systemd: std::path::Path::new("/run/systemd/system").is_dir(),
        sshd: Some(has_sshd()),
        parked: crate::guestinit::park::parked(),
        ssh_listening: None,
    }
}

/// Whether an executable `sshd` is in one of the usual `PATH` directories.
fn has_sshd() -> bool {
    use std::os::unix::fs::PermissionsExt;
    [
        "/usr/local/sbin",
        "/usr/local/bin",
        "/usr/sbin",
        "/usr/bin",
        "/sbin",
        "/bin",
    ]
    .iter()
    .any(|d| {
        std::fs::metadata(std::path::Path::new(d).join("sshd"))
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

fn power_off() {
    // banger-init is the guest's init: it stops every process and powers off.
    if std::env::var_os(crate::guestinit::supervise::INIT_ENV).is_some() {
        // SAFETY: kill takes no pointers.
        if unsafe { libc::kill(1, libc::SIGTERM) } == 0 {
            return;
        }
    }
    if std::path::Path::new("/run/systemd/system").is_dir() {
        let ok = Command::new("systemctl")
            .args(["--no-block", "poweroff"])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ok {
            return;
        }
    }
    // No service manager to ask: flush and power off directly.
    std::thread::sleep(std::time::Duration::from_millis(100));
    // SAFETY: sync and reboot take no pointers; reboot returns only on failure.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
}

pub(super) fn send(w: &Mutex<std::fs::File>, kind: u8, data: &[u8]) -> std::io::Result<()> {
    let mut w = w.lock().unwrap_or_else(|p| p.into_inner());
    w.write_all(&header(kind, data.len()))?;
    w.write_all(data)
}

fn pump_output(mut from: impl Read, to: Arc<Mutex<std::fs::File>>, kind: u8) {
    let mut buf = vec![0u8; frame::MAX];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if send(&to, kind, &buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

/// Reads the client's frames: `STDIN` (empty: end of input) to `stdin`, `RESIZE` to `resize`,
/// `SIGNAL` (one of [`super::FORWARDED_SIGNALS`]) to `signal`.
pub(super) fn pump_input(
    mut reader: BufReader<std::fs::File>,
    mut stdin: impl FnMut(&[u8]) -> bool,
    resize: impl Fn(u16, u16),
    signal: impl Fn(i32),
) {
    let mut h = [0u8; 5];
    let mut buf = vec![0u8; frame::MAX];
    while reader.read_exact(&mut h).is_ok() {
        let Some((kind, len)) = parse_header(h) else {
            return;
        };
        if reader.read_exact(&mut buf[..len]).is_err() {
            return;
        }
        match kind {
            frame::STDIN => {
                stdin(&buf[..len]);
            }
            frame::RESIZE if len == 4 => resize(
                u16::from_be_bytes([buf[0], buf[1]]),
                u16::from_be_bytes([buf[2], buf[3]]),
            ),
            frame::SIGNAL if len == 4 => {
                let sig = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
                if super::FORWARDED_SIGNALS.contains(&sig) {
                    signal(sig);
                }
            }
            _ => {}
        }
    }
}

/// A pseudo-terminal pair: the master (the agent's side) and the slave (the command's).
fn open_pty(rows: u16, cols: u16) -> std::io::Result<(std::fs::File, std::fs::File)> {
    // SAFETY: posix_openpt returns a new descriptor or -1.
    let m = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    if m < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new descriptor this function owns.
    let master = unsafe { std::fs::File::from_raw_fd(m) };
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: grantpt/unlockpt take the master; ptsname_r writes at most name.len() bytes.
    let ok = unsafe {
        libc::grantpt(m) == 0
            && libc::unlockpt(m) == 0
            && libc::ptsname_r(m, name.as_mut_ptr(), name.len()) == 0
    };
    if !ok {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: ptsname_r NUL-terminated the name.
    let path = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) };
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(std::ffi::OsStr::from_bytes(path.to_bytes()))?;
    set_size(&master, rows, cols);
    Ok((master, slave))
}

/// Sets a terminal's window size (the kernel tells its foreground process group, SIGWINCH).
pub(super) fn set_size(master: &std::fs::File, rows: u16, cols: u16) {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize through the pointer, valid for the call.
    unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
}

/// A command started for `exec`: the child and, on a terminal, the terminal's master side.
pub(super) struct Spawned {
    pub child: std::process::Child,
    pub pty: Option<std::fs::File>,
}

/// Why a command did not start: a refusal, or (as shells and docker do) an exit status for a
/// program that is not there (127) or may not be run (126), with the reason.
pub(super) enum NotStarted {
    Refused(String),
    Exit(i32, String),
}

/// How `exec` runs a command, beside the command itself (see `Request::Exec`).
#[derive(Debug, Clone, Default)]
pub(super) struct How {
    pub env: Vec<String>,
    pub cwd: Option<String>,
    pub user: Option<String>,
    pub tty: Option<super::Tty>,
    pub root: Option<String>,
    pub hostname: Option<String>,
    pub rlimits: Vec<super::Rlimit>,
    pub cgroup: Option<String>,
}

/// An OCI spec's `RLIMIT_…` name as the kernel's resource number.
fn resource(name: &str) -> Option<libc::__rlimit_resource_t> {
    Some(match name {
        "RLIMIT_AS" => libc::RLIMIT_AS,
        "RLIMIT_CORE" => libc::RLIMIT_CORE,
        "RLIMIT_CPU" => libc::RLIMIT_CPU,
        "RLIMIT_DATA" => libc::RLIMIT_DATA,
        "RLIMIT_FSIZE" => libc::RLIMIT_FSIZE,
        "RLIMIT_LOCKS" => libc::RLIMIT_LOCKS,
        "RLIMIT_MEMLOCK" => libc::RLIMIT_MEMLOCK,
        "RLIMIT_MSGQUEUE" => libc::RLIMIT_MSGQUEUE,
        "RLIMIT_NICE" => libc::RLIMIT_NICE,
        "RLIMIT_NOFILE" => libc::RLIMIT_NOFILE,
        "RLIMIT_NPROC" => libc::RLIMIT_NPROC,
        "RLIMIT_RSS" => libc::RLIMIT_RSS,
        "RLIMIT_RTPRIO" => libc::RLIMIT_RTPRIO,
        "RLIMIT_RTTIME" => libc::RLIMIT_RTTIME,
        "RLIMIT_SIGPENDING" => libc::RLIMIT_SIGPENDING,
        "RLIMIT_STACK" => libc::RLIMIT_STACK,
        _ => return None,
    })
}

/// A container's root: what its process is given before it is chrooted there.
struct Jail {
    root: std::ffi::CString,
    cwd: std::ffi::CString,
    /// `(source, target, fstype, flags)` mounted in its mount namespace first.
    mounts: Vec<(
        std::ffi::CString,
        std::ffi::CString,
        std::ffi::CString,
        libc::c_ulong,
    )>,
}

impl Jail {
    fn of(root: &std::path::Path, cwd: &str) -> Result<Jail, NotStarted> {
        let c = |s: &str| {
            std::ffi::CString::new(s)
                .map_err(|_| NotStarted::Refused(format!("{s:?} has a NUL byte")))
        };
        let mut mounts = Vec::new();
        for (src, dir, fs, flags) in [
            ("proc", "proc", "proc", 0),
            ("/dev", "dev", "", libc::MS_BIND | libc::MS_REC),
            ("/sys", "sys", "", libc::MS_BIND | libc::MS_REC),
        ] {
            // Where the root has the folder (a container image has them all).
            let target = root.join(dir);
            if target.is_dir() {
                mounts.push((c(src)?, c(&target.to_string_lossy())?, c(fs)?, flags));
            }
        }
        Ok(Jail {
            root: c(&root.to_string_lossy())?,
            cwd: c(cwd)?,
            mounts,
        })
    }

    /// In the child, before exec: a mount namespace of its own, the mounts, the chroot.
    fn enter(&self) -> std::io::Result<()> {
        let err = std::io::Error::last_os_error;
        // SAFETY: plain syscalls on NUL-terminated strings made before the fork.
        unsafe {
            if libc::unshare(libc::CLONE_NEWNS) != 0 {
                return Err(err());
            }
            let none = std::ptr::null();
            if libc::mount(
                none,
                c"/".as_ptr(),
                none,
                libc::MS_REC | libc::MS_PRIVATE,
                none.cast(),
            ) != 0
            {
                return Err(err());
            }
            for (src, target, fs, flags) in &self.mounts {
                let fs = if fs.is_empty() { none } else { fs.as_ptr() };
                if libc::mount(src.as_ptr(), target.as_ptr(), fs, *flags, none.cast()) != 0 {
                    return Err(err());
                }
            }
            if libc::chroot(self.root.as_ptr()) != 0 || libc::chdir(self.cwd.as_ptr()) != 0 {
                return Err(err());
            }
        }
        Ok(())
    }
}

/// Starts `argv` as `exec` asks: the image's Env, WorkingDir and User unless the request
/// says otherwise, in a process group of its own (a session, on a terminal); with `root`, in
/// that folder as its root.
pub(super) fn spawn(argv: Vec<String>, how: &How) -> Result<Spawned, NotStarted> {
    use crate::guestinit::runas;
    let (env, cwd, user, tty) = (
        &how.env[..],
        how.cwd.as_deref(),
        how.user.as_deref(),
        how.tty.as_ref(),
    );
    let jailed = match &how.root {
        Some(r) => {
            let p = std::path::Path::new(r);
            if !p.is_absolute() || !p.is_dir() {
                return Err(NotStarted::Refused(format!(
                    "root {r:?} is not a folder of the guest"
                )));
            }
            Some(p.to_owned())
        }
        None => None,
    };
    // The image's Env, WorkingDir and User (the root's), unless the request says otherwise.
    let root = jailed.as_deref().unwrap_or(std::path::Path::new("/"));
    let image = runas::image_config(root);
    let who =
        runas::resolve_user(user.unwrap_or(&image.user), root).map_err(NotStarted::Refused)?;
    // On a terminal, no command is the user's login shell.
    let argv = if argv.is_empty() && tty.is_some() {
        vec![who.shell.clone(), "-l".into()]
    } else {
        argv
    };
    let Some((prog, args)) = argv.split_first() else {
        return Err(NotStarted::Refused("exec needs a command".into()));
    };
    let cwd = runas::working_dir(cwd, &image.working_dir, &who);
    let mut vars = runas::environment(&who, &image.env, env);
    if let Some(t) = tty {
        vars.retain(|(k, _)| k != "TERM");
        vars.push(("TERM".into(), t.term.clone()));
    }
    // The program is found on the process's own PATH (the image's, or the request's).
    let path = vars
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    // In a root of its own, the program is found there once the process is inside (exec's
    // own search of PATH).
    let program = match jailed {
        Some(_) => prog.clone(),
        None => {
            crate::guestinit::supervise::find_program(prog, &path).unwrap_or_else(|| prog.clone())
        }
    };
    let jail = match &jailed {
        Some(r) => Some(Jail::of(r, &cwd)?),
        None => None,
    };
    let hostname = match &how.hostname {
        Some(h)
            if !h.is_empty()
                && h.len() <= 64
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-.".contains(&b)) =>
        {
            Some(h.clone().into_bytes())
        }
        Some(h) => return Err(NotStarted::Refused(format!("{h:?} is not a host name"))),
        None => None,
    };
    let mut limits = Vec::new();
    for r in &how.rlimits {
        let Some(res) = resource(&r.kind) else {
            return Err(NotStarted::Refused(format!(
                "{:?} is not a resource limit",
                r.kind
            )));
        };
        if r.soft > r.hard {
            return Err(NotStarted::Refused(format!(
                "{}: the soft limit {} is above the hard limit {}",
                r.kind, r.soft, r.hard
            )));
        }
        limits.push((
            res,
            libc::rlimit {
                rlim_cur: r.soft,
                rlim_max: r.hard,
            },
        ));
    }
    // Its cgroup is made before the fork; the child joins it first thing.
    let cgroup_procs = match &how.cgroup {
        Some(name) => Some(
            super::cgroup::create(name)
                .and_then(|p| {
                    std::ffi::CString::new(p.as_os_str().as_encoded_bytes())
                        .map_err(|e| e.to_string())
                })
                .map_err(NotStarted::Refused)?,
        ),
        None => None,
    };
    let mut cmd = Command::new(&program);
    cmd.args(args).env_clear().envs(vars);
    if jail.is_none() {
        cmd.current_dir(&cwd);
    }
    let pty = match tty {
        Some(t) => match open_pty(t.rows, t.cols) {
            Ok(p) => Some(p),
            Err(e) => return Err(NotStarted::Refused(format!("cannot open a terminal: {e}"))),
        },
        None => None,
    };
    match &pty {
        Some((_, slave)) => {
            let io = || {
                slave
                    .try_clone()
                    .map_err(|e| NotStarted::Refused(format!("cannot open a terminal: {e}")))
            };
            cmd.stdin(io()?).stdout(io()?).stderr(io()?);
        }
        None => {
            cmd.stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
        }
    }
    {
        use std::os::unix::process::CommandExt;
        let (uid, gid, groups) = (who.uid, who.gid, who.groups.clone());
        let on_tty = pty.is_some();
        // SAFETY: between fork and exec only open, write, close, setsid, ioctl, setgroups,
        // setgid and setuid run, on memory prepared before the fork.
        unsafe {
            cmd.pre_exec(move || {
                if let Some(procs) = &cgroup_procs {
                    let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                    libc::close(fd);
                }
                // Not the agent's protection from the OOM killer.
                let adj = libc::open(
                    c"/proc/self/oom_score_adj".as_ptr(),
                    libc::O_WRONLY | libc::O_CLOEXEC,
                );
                if adj >= 0 {
                    libc::write(adj, b"0".as_ptr().cast(), 1);
                    libc::close(adj);
                }
                // A container's root first: what follows (the terminal, the user) is the same
                // inside.
                if let Some(j) = &jail {
                    j.enter()?;
                }
                for (res, lim) in &limits {
                    if libc::setrlimit(*res, lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if let Some(h) = &hostname {
                    if libc::unshare(libc::CLONE_NEWUTS) != 0
                        || libc::sethostname(h.as_ptr().cast(), h.len()) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                // Its own session with the terminal as its controlling one: Ctrl-C from the
                // client reaches its foreground process group. Without a terminal, a process
                // group of its own, which the client's signals reach (with its children).
                if on_tty && (libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0) {
                    return Err(std::io::Error::last_os_error());
                }
                if !on_tty && libc::setpgid(0, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if (uid != 0 || gid != 0)
                    && (libc::setgroups(groups.len(), groups.as_ptr()) != 0
                        || libc::setgid(gid) != 0
                        || libc::setuid(uid) != 0)
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let child = cmd.spawn().map_err(|e| {
        let why = format!("cannot run {prog} in {cwd} as {}: {e}", who.name);
        match e.kind() {
            std::io::ErrorKind::NotFound => NotStarted::Exit(127, why),
            std::io::ErrorKind::PermissionDenied => NotStarted::Exit(126, why),
            _ => NotStarted::Refused(why),
        }
    })?;
    // Only the command holds the terminal's other end now: its output ends with it.
    drop(cmd);
    Ok(Spawned {
        child,
        pty: pty.map(|(master, _slave)| master),
    })
}

fn exec(
    reader: BufReader<std::fs::File>,
    writer: std::fs::File,
    argv: Vec<String>,
    how: How,
) -> std::io::Result<()> {
    let tty = how.tty.clone();
    let writer = Arc::new(Mutex::new(writer));
    let reply = |r: Reply| {
        let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
        write_line(&mut *w, &r)
    };
    let Spawned { mut child, pty } = match spawn(argv, &how) {
        Ok(s) => s,
        Err(NotStarted::Refused(why)) => return reply(Reply::error(why)),
        Err(NotStarted::Exit(code, why)) => {
            reply(Reply::ok())?;
            let kind = if tty.is_some() {
                frame::STDOUT
            } else {
                frame::STDERR
            };
            send(&writer, kind, format!("banger-agent: {why}\n").as_bytes())?;
            send(&writer, frame::EXIT, &code.to_be_bytes())?;
            // As a command's end: our side shut, then what the client still sends (its
            // end of input) read until it closes, so the close loses nothing in flight
            // (a close with unread input may reset the stream, and the client then
            // misses the exit).
            let w = writer.lock().unwrap_or_else(|p| p.into_inner());
            // SAFETY: shutdown takes no pointers; the fd is open for the guard's lifetime.
            unsafe { libc::shutdown(w.as_raw_fd(), libc::SHUT_WR) };
            drop(w);
            let _ = std::io::copy(&mut reader.take(1 << 20), &mut std::io::sink());
            return Ok(());
        }
    };
    reply(Reply::ok())?;
    type Input = Option<Box<dyn Write + Send>>;
    let (out, err, stdin, resize_to, pty_done): (_, _, Input, _, _) = match pty {
        Some(master) => {
            let m = master.try_clone()?;
            let resize_to = master.try_clone()?;
            let w = writer.clone();
            let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
            std::thread::spawn(move || {
                pump_output(m, w, frame::STDOUT);
                let _ = done_tx.send(());
            });
            (
                None,
                None,
                Some(Box::new(master) as _),
                Some(resize_to),
                Some(done_rx),
            )
        }
        None => {
            let stdin = child.stdin.take().map(|s| Box::new(s) as _);
            let out = child.stdout.take().map(|o| {
                let w = writer.clone();
                std::thread::spawn(move || pump_output(o, w, frame::STDOUT))
            });
            let err = child.stderr.take().map(|o| {
                let w = writer.clone();
                std::thread::spawn(move || pump_output(o, w, frame::STDERR))
            });
            (out, err, stdin, None, None)
        }
    };
    // Standard input runs on its own thread: the command may finish without reading it.
    // Signals go to the command's process group (its session's, on a terminal), which is
    // its pid until it exits; after that, kill finds no such group and does nothing.
    let group = child.id() as i32;
    std::thread::spawn(move || {
        let mut stdin = stdin;
        pump_input(
            reader,
            |data| write_input(&mut stdin, data),
            |r, c| {
                if let Some(t) = &resize_to {
                    set_size(t, r, c)
                }
            },
            // SAFETY: kill takes no pointers.
            |sig| unsafe {
                libc::kill(-group, sig);
            },
        )
    });
    let status = child.wait()?;
    for t in [out, err].into_iter().flatten() {
        let _ = t.join();
    }
    // A terminal's output ends when its last holder closes it; a process the command left in
    // the background may hold it on, so its output is waited for only briefly.
    if let Some(done) = pty_done {
        let _ = done.recv_timeout(std::time::Duration::from_millis(500));
    }
    send(&writer, frame::EXIT, &exit_code(status).to_be_bytes())?;
    let w = writer.lock().unwrap_or_else(|p| p.into_inner());
    // SAFETY: shutdown takes no pointers; the fd is open for the guard's lifetime.
    unsafe { libc::shutdown(w.as_raw_fd(), libc::SHUT_WR) };
    Ok(())
}

/// An exit status as shells report it: the code, or 128 + the signal that ended it.
pub(super) fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

/// Writes `data` to a command's input (empty: closes it); false once there is none.
pub(super) fn write_input(stdin: &mut Option<Box<dyn Write + Send>>, data: &[u8]) -> bool {
    if data.is_empty() {
        *stdin = None;
        return false;
    }
    if let Some(s) = stdin.as_mut() {
        if s.write_all(data).and_then(|_| s.flush()).is_err() {
            *stdin = None;
        }
    }
    stdin.is_some()
}
