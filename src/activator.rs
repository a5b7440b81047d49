//! Socket activation where systemd is not PID 1 (the quickstart's private bus, containers).
//!
//! Under systemd, `bangerd.socket` holds `io.banger` while the daemon is idle-exited and
//! both activation paths (the socket and the bus name) start the one `bangerd.service`.
//! Without it, `bangerd activator [DAEMON OPTIONS]` does the socket's part: it binds
//! `RUNTIME_DIR/io.banger` once, and each time a connection waits on it while no daemon
//! runs it starts `bangerd DAEMON OPTIONS` with the socket passed as systemd passes it
//! (`LISTEN_FDS`, `LISTEN_PID`, `LISTEN_FDNAMES=io.banger`), then waits for that daemon to
//! exit. The bus's activation file names `bangerd wake`, which only knocks on the socket
//! and waits for the answer (the daemon owns the bus name before it serves the socket), so a
//! D-Bus call and a Varlink call arriving together still start one daemon, by one path.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;

/// `bangerd activator …`.
pub const ACTIVATOR_ARG: &str = "activator";

/// `bangerd wake …`.
pub const WAKE_ARG: &str = "wake";

/// How long `wake` waits for a daemon to answer (a first start may migrate the store).
const WAKE_LIMIT: Duration = Duration::from_secs(120);

/// A daemon that fails sooner than this after its start is started again only after
/// [`RETRY_PAUSE`]: a connection it never accepted would otherwise restart it in a loop.
const QUICK_FAILURE: Duration = Duration::from_secs(5);
const RETRY_PAUSE: Duration = Duration::from_secs(2);

/// The runtime directory the daemon options name.
fn runtime_dir(args: &[OsString]) -> Result<PathBuf, String> {
    let argv = std::iter::once(OsString::from("bangerd")).chain(args.iter().cloned());
    crate::daemon::Args::try_parse_from(argv)
        .map(|a| a.runtime_dir)
        .map_err(|e| e.to_string())
}

/// `bangerd activator [DAEMON OPTIONS]`: holds the socket and starts the daemon on demand;
/// returns only on failure.
pub fn run(args: &[OsString]) -> std::io::Error {
    match hold(args) {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

fn hold(args: &[OsString]) -> std::io::Result<std::convert::Infallible> {
    use std::os::unix::fs::DirBuilderExt;
    let runtime = runtime_dir(args).map_err(std::io::Error::other)?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(&runtime)?;
    let listener = crate::varlink::bind(&runtime).map_err(std::io::Error::other)?;
    let fd = listener.as_raw_fd();
    let program = std::fs::read_link("/proc/self/exe")?;
    eprintln!(
        "bangerd activator: holding {}; bangerd starts on the first call",
        crate::varlink::socket_path(&runtime).display()
    );
    loop {
        wait_readable(fd)?;
        // LISTEN_PID must be the daemon's own pid, known only once it runs: a shell sets it
        // to its own and execs the daemon in its place (as the same process).
        let mut cmd = std::process::Command::new("/bin/sh");
        cmd.arg("-c")
            .arg("LISTEN_PID=$$ exec \"$0\" \"$@\"")
            .arg(&program)
            .args(args)
            .env("LISTEN_FDS", "1")
            .env("LISTEN_FDNAMES", crate::varlink::SOCKET)
            .env_remove("LISTEN_PID")
            .stdin(std::process::Stdio::null());
        // SAFETY: dup2 and fcntl are async-signal-safe; they run between fork and exec and
        // put the listener on descriptor 3 without close-on-exec, where LISTEN_FDS says it
        // is (dup2 onto itself would leave the flag set).
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(move || {
                let r = if fd == 3 {
                    libc::fcntl(3, libc::F_SETFD, 0)
                } else {
                    libc::dup2(fd, 3)
                };
                if r < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let started = Instant::now();
        let status = cmd.spawn()?.wait()?;
        if !status.success() {
            eprintln!("bangerd activator: bangerd ended with {status}");
            if started.elapsed() < QUICK_FAILURE {
                std::thread::sleep(RETRY_PAUSE);
            }
        }
    }
}

/// Blocks until a connection waits on the listening socket `fd`.
fn wait_readable(fd: i32) -> std::io::Result<()> {
    loop {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let r = unsafe { libc::poll(&mut p, 1, -1) };
        if r > 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if r < 0 && e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// `bangerd wake [DAEMON OPTIONS]`: asks the socket for the service's description and
/// returns once a daemon answered (it owns its bus name by then).
pub fn wake(args: &[OsString]) -> Result<(), String> {
    let path = crate::varlink::socket_path(&runtime_dir(args)?);
    let mut s = std::os::unix::net::UnixStream::connect(&path).map_err(|e| {
        format!(
            "cannot reach {} ({e}): on a host without systemd, `bangerd activator` holds it \
             (packaging/quickstart.sh starts one)",
            path.display()
        )
    })?;
    let io = |e: std::io::Error| format!("{}: {e}", path.display());
    s.set_read_timeout(Some(WAKE_LIMIT)).map_err(io)?;
    s.write_all(b"{\"method\":\"org.varlink.service.GetInfo\"}\0")
        .map_err(io)?;
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    while !reply.contains(&0) {
        let n = s.read(&mut buf).map_err(io)?;
        if n == 0 || reply.len() > crate::varlink::MAX_CALL {
            return Err(format!("{}: no answer from bangerd", path.display()));
        }
        reply.extend_from_slice(&buf[..n]);
    }
    Ok(())
}
