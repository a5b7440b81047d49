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
