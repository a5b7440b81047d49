//! The guest's serial console, bounded. A guest may print without end, so its console never
//! goes straight to a file: the VMM writes into a socket that a small logger process (the
//! `bangerd` binary run as `bangerd console-logger`, one per VM, outliving the daemon like
//! the VMM) listens on, and the logger keeps at most [`MAX_BYTES`] of the newest output in
//! `console.log`. Readers only ever read a bounded tail.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

/// The most a console log holds; when it grows past this, the older half goes.
pub const MAX_BYTES: u64 = 2 << 20;

/// The argument that runs the `bangerd` binary as a console logger.
pub const LOGGER_ARG: &str = "console-logger";

/// Appends what arrives on `socket` (one connection: the VMM's) to `log`, keeping the newest
/// `max` bytes at most; returns when the VMM hangs up.
pub fn run_logger(socket: &Path, log: &Path, max: u64) -> std::io::Result<()> {
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket)?;
    let mut out = open_log(log)?;
    let (mut conn, _) = listener.accept()?;
    drop(listener);
    let _ = std::fs::remove_file(socket);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match conn.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        out.write_all(&buf[..n])?;
        if out.metadata()?.len() > max {
            out = rotate(log, max / 2)?;
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
        let mut f = File::create(&tmp)?;
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
        let logger = std::thread::spawn(move || run_logger(&s2, &l2, 64 * 1024));
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
}
