//! `banger-agent`'s service, in the guest: one thread per connection, std and libc only so
//! the static binary stays small and runs in any image.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
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

/// Serves forever.
pub fn serve(listen: Listen) -> std::io::Result<()> {
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

fn write_line(w: &mut impl Write, reply: &Reply) -> std::io::Result<()> {
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
        Request::Health => {
            let mut r = Reply::ok();
            r.health = Some(health());
            write_line(&mut writer, &r)
        }
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
        } => exec(reader, writer, argv, env, cwd, user),
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
    }
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

fn send(w: &Mutex<std::fs::File>, kind: u8, data: &[u8]) -> std::io::Result<()> {
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

fn exec(
    mut reader: BufReader<std::fs::File>,
    writer: std::fs::File,
    argv: Vec<String>,
    env: Vec<String>,
    cwd: Option<String>,
    user: Option<String>,
) -> std::io::Result<()> {
    use crate::guestinit::runas;
    let writer = Arc::new(Mutex::new(writer));
    let refuse = |msg: String| {
        let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
        write_line(&mut *w, &Reply::error(msg))
    };
    let Some((prog, args)) = argv.split_first() else {
        return refuse("exec needs a command".into());
    };
    // The image's Env, WorkingDir and User, unless the request says otherwise.
    let root = std::path::Path::new("/");
    let image = runas::image_config(root);
    let who = match runas::resolve_user(user.as_deref().unwrap_or(&image.user), root) {
        Ok(w) => w,
        Err(e) => return refuse(e),
    };
    let cwd = runas::working_dir(cwd.as_deref(), &image.working_dir, &who);
    let vars = runas::environment(&who, &image.env, &env);
    // The program is found on the process's own PATH (the image's, or the request's).
    let path = vars
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let program = if prog.contains('/') {
        prog.clone()
    } else {
        path.split(':')
            .map(|d| format!("{d}/{prog}"))
            .find(|p| std::path::Path::new(p).is_file())
            .unwrap_or_else(|| prog.clone())
    };
    let mut cmd = Command::new(&program);
    cmd.args(args)
        .current_dir(&cwd)
        .env_clear()
        .envs(vars)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if who.uid != 0 || who.gid != 0 {
        use std::os::unix::process::CommandExt;
        let (uid, gid, groups) = (who.uid, who.gid, who.groups.clone());
        // SAFETY: between fork and exec only setgroups, setgid and setuid run, on memory
        // prepared before the fork.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return refuse(format!("cannot run {prog} in {cwd} as {}: {e}", who.name)),
    };
    {
        let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
        write_line(&mut *w, &Reply::ok())?;
    }
    let mut stdin = child.stdin.take();
    let out = child.stdout.take().map(|o| {
        let w = writer.clone();
        std::thread::spawn(move || pump_output(o, w, frame::STDOUT))
    });
    let err = child.stderr.take().map(|o| {
        let w = writer.clone();
        std::thread::spawn(move || pump_output(o, w, frame::STDERR))
    });
    // Standard input runs on its own thread: the command may finish without reading it.
    std::thread::spawn(move || {
        let mut h = [0u8; 5];
        let mut buf = vec![0u8; frame::MAX];
        while reader.read_exact(&mut h).is_ok() {
            let Some((kind, len)) = parse_header(h) else {
                return;
            };
            if reader.read_exact(&mut buf[..len]).is_err() {
                return;
            }
            if kind != frame::STDIN {
                continue;
            }
            if len == 0 {
                stdin = None;
                continue;
            }
            if let Some(s) = stdin.as_mut() {
                if s.write_all(&buf[..len]).is_err() {
                    stdin = None;
                }
            }
        }
    });
    let status = child.wait()?;
    for t in [out, err].into_iter().flatten() {
        let _ = t.join();
    }
    use std::os::unix::process::ExitStatusExt;
    let code = status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
    send(&writer, frame::EXIT, &code.to_be_bytes())?;
    let w = writer.lock().unwrap_or_else(|p| p.into_inner());
    // SAFETY: shutdown takes no pointers; the fd is open for the guard's lifetime.
    unsafe { libc::shutdown(w.as_raw_fd(), libc::SHUT_WR) };
    Ok(())
}
