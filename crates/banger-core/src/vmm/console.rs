//! The guest's serial console, bounded. A guest may print without end, so its console never
//! goes straight to a file: the VMM writes into a socket that a small logger process
//! (`banger-vm-helper console-logger`, one per VM, outliving the daemon like the VMM) listens
//! on, and the logger keeps at most [`MAX_BYTES`] of the newest output in
//! `console.log`. Readers only ever read a bounded tail.
//!
//! The VMM's own standard output and error go through the same logger (into `qemu.log`
//! beside the console's, as bounded): a guest can make a VMM print — QEMU reports a device the
//! guest broke, or memory it could not give back, each time the guest does it — so that output
//! never goes straight to a file either.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

/// The most a console log holds; when it grows past this, the older half goes.
pub const MAX_BYTES: u64 = 2 << 20;

/// The most the VMM's own output log holds (it is a few lines unless something is wrong).
pub const OUTPUT_MAX_BYTES: u64 = 1 << 20;

/// The argument that runs the helpers' program (`process::helper_program`) as a console
/// logger.
pub const LOGGER_ARG: &str = "console-logger";

/// How long the logger waits, once the VMM's output ended (the VMM exited), for the rest of
/// its console; a VMM that failed before it connected its console sends none.
const CONSOLE_GRACE: Duration = Duration::from_secs(2);

/// Appends what arrives on `socket` (one connection: the VMM's console) to `log`, keeping the
/// newest `max` bytes at most; returns when the VMM hangs up. With `output` (a listening
/// socket, and its log), what arrives there — the VMM's standard output and error — goes to
/// that log, bounded by [`OUTPUT_MAX_BYTES`], and the logger returns once that ends: the
/// VMM is gone, whether or not it ever connected its console.
pub fn run_logger(
    socket: &Path,
    log: &Path,
    max: u64,
    output: Option<(UnixListener, &Path)>,
) -> std::io::Result<()> {
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket)?;
    let out = Bounded::open(log, max)?;
    let console = move || serve_one(listener, out);
    let Some((output, output_log)) = output else {
        let r = console();
        let _ = std::fs::remove_file(socket);
        return r;
    };
    let vmm = Bounded::open(output_log, OUTPUT_MAX_BYTES)?;
    let (done, console_done) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(console());
    });
    // The VMM's stdout, with its stderr a copy of it: one connection, until the VMM exits.
    let r = serve_one(output, vmm);
    let console = console_done.recv_timeout(CONSOLE_GRACE).unwrap_or(Ok(()));
    let _ = std::fs::remove_file(socket);
    r.and(console)
}

/// Appends what one connection to `listener` sends to `log`, keeping the newest `max` bytes:
/// the console of a VMM that writes it to its standard output (Firecracker), which the
/// listener takes (see [`run_logger`]'s `output`). Returns when it hangs up.
pub fn run_output_logger(listener: UnixListener, log: &Path, max: u64) -> std::io::Result<()> {
    serve_one(listener, Bounded::open(log, max)?)
}

/// Takes one connection on `listener` (no other may come after it) and keeps what it sends
/// in `out` until it hangs up.
fn serve_one(listener: UnixListener, mut out: Bounded) -> std::io::Result<()> {
    let (conn, _) = listener.accept()?;
    drop(listener);
    out.copy_from(conn)
}

/// A VM's console logger's pid file, in its runtime directory `run`.
pub fn logger_pidfile(run: &Path) -> PathBuf {
    named_logger_pidfile(run, CONSOLE)
}

/// The role of a VM's console logger (its pid file's and unit's name).
const CONSOLE: &str = "console";

/// The pid file of a VM's logger `name` (`console`, or one per helper whose output it keeps).
pub fn named_logger_pidfile(run: &Path, name: &str) -> PathBuf {
    run.join(format!("{name}.pid"))
}

/// Starts a VM's console logger (the helpers' program in its logger role, `args` after the
/// role, as the VM's uid) with the listener root makes at `listen` (in root's runtime
/// directory: only root, or systemd for it, connects) as its fd 3, and waits until `ready`
/// exists (the console's socket, or that listener): the VMM connects once it does.
pub async fn start_logger(
    spec: &super::BootSpec,
    args: &[&std::ffi::OsStr],
    listen: &Path,
    ready: &Path,
) -> crate::Result<()> {
    start_named_logger(spec, CONSOLE, args, listen, ready).await
}

/// [`start_logger`] for a logger called `name`, whose pid file is
/// [`named_logger_pidfile`]: another process's output (a share's virtio-fs server) kept
/// beside the console's.
pub async fn start_named_logger(
    spec: &super::BootSpec,
    name: &str,
    args: &[&std::ffi::OsStr],
    listen: &Path,
    ready: &Path,
) -> crate::Result<()> {
    use super::process::{helper_program, spawn_detached, wait_for_path, Detached, UnitLimits};
    let run = &spec.run_dir;
    let log_dir = spec.console_log.parent().unwrap_or(run);
    let mut argv = vec![LOGGER_ARG.as_ref()];
    argv.extend_from_slice(args);
    let own_log = run.join(format!("{name}-logger.log"));
    spawn_detached(&Detached {
        pidfile: &named_logger_pidfile(run, name),
        unit: &super::scope::helper_unit(&spec.id, name),
        program: &helper_program()?,
        args: &argv,
        log: &own_log,
        output: None,
        limits: UnitLimits {
            memory_max: 64 << 20,
            tasks_max: 8,
            huge_pages: true,
        },
        writable: &[run, log_dir],
        jail: &spec.jail,
        tap: None,
        tap_netns: None,
        listen: Some((listen, 0)),
        ram: None,
    })
    .await?;
    if !wait_for_path(ready, Duration::from_secs(10)).await {
        let log = std::fs::read_to_string(&own_log).unwrap_or_default();
        return Err(super::error::failed(
            format!("The {name} logger did not open its socket"),
            std::io::Error::other(log.trim().to_owned()),
        ));
    }
    Ok(())
}

/// A log file kept to its newest `max` bytes.
struct Bounded {
    path: PathBuf,
    file: File,
    max: u64,
}

impl Bounded {
    fn open(path: &Path, max: u64) -> std::io::Result<Self> {
        Ok(Self {
            path: path.to_owned(),
            file: open_log(path)?,
            max,
        })
    }

    /// Appends what `conn` sends until it hangs up.
    fn copy_from(&mut self, mut conn: UnixStream) -> std::io::Result<()> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match conn.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            self.file.write_all(&buf[..n])?;
            if self.file.metadata()?.len() > self.max {
                self.file = rotate(&self.path, self.max / 2)?;
            }
        }
    }
}

fn open_log(log: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(log)
}

/// Keeps the last `keep` bytes of `log` (a new file renamed over it, so a reader holding the
/// old one still reads what it had) and returns the new file, open for appending.
fn rotate(log: &Path, keep: u64) -> std::io::Result<File> {
    let tail = read_tail(log, keep)?;
    let tmp = tmp_name(log);
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&tail)?;
    }
    std::fs::rename(&tmp, log)?;
    open_log(log)
}

fn tmp_name(log: &Path) -> PathBuf {
    let mut s = log.as_os_str().to_owned();
    s.push(".rotating");
    PathBuf::from(s)
}

/// The last `max` bytes of a file (all of it when smaller); missing is empty.
pub fn read_tail(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    let mut f = match open_log_file(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(max)))?;
    let mut v = Vec::new();
    f.take(max).read_to_end(&mut v)?;
    Ok(v)
}

/// Opens a console log for reading as root: the VM's uid writes the directory it is in, so a
/// symbolic link (or anything but a regular file) there is refused, never followed.
pub fn open_log_file(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    if !f.metadata()?.is_file() {
        return Err(std::io::Error::other(
            "the console log is not a regular file",
        ));
    }
    Ok(f)
}

/// The last `n` lines of a console log, read from its last 64 KiB only.
pub fn tail_lines(path: &Path, n: usize) -> String {
    let bytes = read_tail(path, 64 * 1024).unwrap_or_default();
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_leaves_no_more_than_the_cap_and_keeps_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let (sock, log) = (dir.path().join("c.sock"), dir.path().join("console.log"));
        let (s2, l2) = (sock.clone(), log.clone());
        let logger = std::thread::spawn(move || run_logger(&s2, &l2, 64 * 1024, None));
        while !sock.exists() {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let mut c = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        for i in 0..20_000 {
            writeln!(c, "line {i:06} of a guest that never stops talking").unwrap();
        }
        drop(c);
        logger.join().unwrap().unwrap();
        let len = std::fs::metadata(&log).unwrap().len();
        assert!(len <= 64 * 1024, "{len}");
        // Rotated, it is still the owner's alone.
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&log).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
        let tail = tail_lines(&log, 1);
        assert_eq!(tail, "line 019999 of a guest that never stops talking");
        assert!(!sock.exists());

        // A link in its place is refused, not followed.
        let secret = dir.path().join("secret");
        std::fs::write(&secret, b"root only\n").unwrap();
        std::fs::remove_file(&log).unwrap();
        std::os::unix::fs::symlink(&secret, &log).unwrap();
        assert!(open_log_file(&log).is_err());
        assert_eq!(tail_lines(&log, 1), "");
    }

    #[test]
    fn the_vmms_output_is_bounded_too_and_its_end_ends_the_logger() {
        let dir = tempfile::tempdir().unwrap();
        let (sock, log) = (dir.path().join("c.sock"), dir.path().join("console.log"));
        let (out_sock, out_log) = (dir.path().join("o.sock"), dir.path().join("qemu.log"));
        let output = UnixListener::bind(&out_sock).unwrap();
        let (s2, l2, o2) = (sock.clone(), log.clone(), out_log.clone());
        let logger =
            std::thread::spawn(move || run_logger(&s2, &l2, 64 * 1024, Some((output, &o2))));
        // A VMM that floods its output and exits without ever connecting its console (one
        // that failed at start): all of it is read, the newest kept, and the logger ends.
        let mut c = UnixStream::connect(&out_sock).unwrap();
        for i in 0..40_000 {
            writeln!(
                c,
                "qemu: error {i:06}: failed to give back the guest's memory"
            )
            .unwrap();
        }
        drop(c);
        let started = std::time::Instant::now();
        logger.join().unwrap().unwrap();
        assert!(started.elapsed() < CONSOLE_GRACE + Duration::from_secs(1));
        let len = std::fs::metadata(&out_log).unwrap().len();
        assert!(len > 40_000 && len <= OUTPUT_MAX_BYTES, "{len}");
        assert_eq!(
            tail_lines(&out_log, 1),
            "qemu: error 039999: failed to give back the guest's memory"
        );
        assert!(!sock.exists());
        assert_eq!(std::fs::metadata(&log).unwrap().len(), 0);

        // A VMM whose standard output is the console (Firecracker's): the same bound.
        let out_sock = dir.path().join("fc.sock");
        let listener = UnixListener::bind(&out_sock).unwrap();
        let fc_log = dir.path().join("fc-console.log");
        let l2 = fc_log.clone();
        let logger = std::thread::spawn(move || run_output_logger(listener, &l2, 64 * 1024));
        let mut c = UnixStream::connect(&out_sock).unwrap();
        for i in 0..20_000 {
            writeln!(c, "line {i:06} of a guest that never stops talking").unwrap();
        }
        drop(c);
        logger.join().unwrap().unwrap();
        assert!(std::fs::metadata(&fc_log).unwrap().len() <= 64 * 1024);
        assert_eq!(
            tail_lines(&fc_log, 1),
            "line 019999 of a guest that never stops talking"
        );
    }
}
