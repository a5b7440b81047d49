//! Logging: the journal (structured fields such as `JOB_ID=`, `VM_ID=`, `IMAGE_ID=`,
//! `STAGE=`, which tracing-journald upper-cases from the event's fields) when its socket
//! exists, stderr otherwise.

use std::path::Path;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

/// Where the logs went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sink {
    /// The systemd journal.
    Journal,
    /// Standard error.
    Stderr,
}

/// Installs the global subscriber; `BANGER_LOG` (an env-filter) sets the level, `info` by
/// default.
pub fn init(program: &str) -> Sink {
    let filter = EnvFilter::try_from_env("BANGER_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    if Path::new(JOURNAL_SOCKET).exists() {
        if let Ok(layer) = tracing_journald::layer() {
            // No prefix: fields must reach the journal as JOB_ID=, VM_ID=, STAGE=, not F_JOB_ID=.
            let layer = layer
                .with_syslog_identifier(program.to_owned())
                .with_field_prefix(None);
            if tracing_subscriber::registry()
                .with(filter)
                .with(layer)
                .try_init()
                .is_ok()
            {
                return Sink::Journal;
            }
            return Sink::Stderr;
        }
    }
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .try_init();
    Sink::Stderr
}

/// The most a helper's log (its standard error, a file systemd or the daemon opened for it in
/// root's runtime directory, a tmpfs) holds of lines others can cause: a peer's connections, a
/// guest's refusals.
pub const HELPER_LOG_MAX: u64 = 64 << 10;

/// Writes `line` to a helper's standard error, starting its log over once it would pass
/// [`HELPER_LOG_MAX`] (a helper whose lines a peer or a guest can cause must not fill the host's
/// runtime directory).
pub fn helper_line(line: &str) {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let err = std::io::stderr();
    let fd = std::os::fd::AsFd::as_fd(&err);
    bounded_line(fd, line, HELPER_LOG_MAX);
}

/// [`helper_line`] on `fd`, with `max` as the bound. A line is cut to 1 KiB. What is not a
/// regular file (a terminal, a pipe, the journal's socket) is written as it is.
fn bounded_line(fd: std::os::fd::BorrowedFd<'_>, line: &str, max: u64) {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    let mut cut = line.len().min(1024);
    while !line.is_char_boundary(cut) {
        cut -= 1;
    }
    let line = format!("{}\n", &line[..cut]);
    let raw = fd.as_raw_fd();
    // SAFETY: an all-zero stat is a valid value of this plain C struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat fills `st` for a descriptor borrowed for this call.
    let stated = unsafe { libc::fstat(raw, &mut st) } == 0;
    let regular = stated && st.st_mode & libc::S_IFMT == libc::S_IFREG;
    let mut out = std::fs::File::from(match fd.try_clone_to_owned() {
        Ok(f) => f,
        Err(_) => return,
    });
    if regular && st.st_size as u64 + line.len() as u64 > max {
        // Start over: the offset too, for a descriptor opened without O_APPEND (which would
        // otherwise write past a hole as large as what was dropped).
        // SAFETY: plain syscalls on a descriptor we hold.
        unsafe {
            libc::ftruncate(raw, 0);
            libc::lseek(raw, 0, libc::SEEK_SET);
        }
        let _ = writeln!(
            out,
            "[earlier lines dropped: this log keeps at most {} KiB]",
            max >> 10
        );
    }
    let _ = out.write_all(line.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_helpers_log_starts_over_at_its_bound() {
        use std::os::fd::AsFd;
        for append in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("helper.log");
            let f = std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .append(append)
                .open(&path)
                .unwrap();
            for i in 0..5000 {
                bounded_line(
                    f.as_fd(),
                    &format!("peer {i} refused: connection reset"),
                    16 << 10,
                );
            }
            let text = std::fs::read_to_string(&path).unwrap();
            assert!(text.starts_with("[earlier lines dropped"), "{append}");
            assert!(text.ends_with("peer 4999 refused: connection reset\n"));
            bounded_line(f.as_fd(), &"x".repeat(5000), 16 << 10);
            let meta = std::fs::metadata(&path).unwrap();
            use std::os::unix::fs::MetadataExt;
            assert!(
                meta.len() <= 16 << 10,
                "{} bytes (append {append})",
                meta.len()
            );
            assert!(
                meta.blocks() * 512 <= 64 << 10,
                "no hole kept (append {append})"
            );
            let text = std::fs::read_to_string(&path).unwrap();
            assert!(
                text.ends_with(&format!("{}\n", "x".repeat(1024))),
                "cut to 1 KiB"
            );
        }
    }
}
