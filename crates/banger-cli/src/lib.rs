//! The `banger` command line: a client of banger's D-Bus or Varlink API and nothing more,
//! one file per noun, every verb written once over `transport::Transport`. It reads some of
//! `banger-core`'s types (names, the agent's client, OCI credentials) but never calls the
//! daemon's services.

// What the CLI reads of banger-core, under the names it always had.
use banger_core::{agent, config, guestinit, host, model, net, oci, vmm, VERSION};

mod assets;
mod cp;
mod doctor;
mod e2b;
mod files;
mod image;
mod job;
mod kernel;
mod output;
mod snapshot;
mod status;
mod term;
mod transport;
mod varlink;
mod vm;
mod watch;

use clap::{Parser, Subcommand};

pub use output::Output;

/// One-command sandbox microVMs.
#[derive(Debug, Parser)]
#[command(name = "banger", version, about, propagate_version = true)]
pub struct Cli {
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    /// Talk to banger over its Varlink socket (default /run/banger/io.banger; another with
    /// --varlink=SOCKET) instead of the system bus; BANGER_VARLINK=1 (or a socket path) does
    /// the same.
    #[arg(long, global = true, value_name = "SOCKET", num_args = 0..=1, require_equals = true, default_missing_value = "1", env = "BANGER_VARLINK")]
    pub varlink: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The verbs.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show the daemon's version and what it manages.
    Status,
    /// Manage images.
    #[command(subcommand)]
    Image(image::ImageCommand),
    /// Manage kernels.
    #[command(subcommand)]
    Kernel(kernel::KernelCommand),
    /// Manage VMs.
    #[command(subcommand)]
    Vm(Box<vm::VmCommand>),
    /// Manage snapshots of VMs.
    #[command(subcommand)]
    Snapshot(snapshot::SnapshotCommand),
    /// Follow, inspect and cancel long operations.
    #[command(subcommand)]
    Job(job::JobCommand),
    /// Serve E2B's API as you, so E2B's SDKs drive your banger VMs.
    #[command(subcommand)]
    E2b(e2b::E2bCommand),
    /// Check that this host can run banger, and say what to install.
    Doctor,
    /// Write the man pages and shell completions into DIR (packaging).
    #[command(hide = true)]
    GenerateAssets {
        /// Output directory.
        dir: std::path::PathBuf,
    },
    /// The names shell completion offers: vm, image, kernel or snapshot (one a line, nothing
    /// when the daemon cannot be asked).
    #[command(hide = true)]
    CompleteNames {
        /// What to name.
        kind: String,
    },
}

/// A size as people write it: a number with an optional binary unit (`K`, `M`, `G`, `T`,
/// also as `KiB`… or `KB`…, which mean the same here, as in docker and qemu-img), in units of
/// `unit` bytes when it has none.
fn parse_size(text: &str, unit: u64) -> Result<u64, String> {
    let t = text.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, suffix) = t.split_at(digits);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("'{text}' is not a size; write e.g. 512M, 2G or 1024"))?;
    let scale: u64 = match suffix.trim().to_ascii_uppercase().as_str() {
        "" => unit,
        "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        "T" | "TB" | "TIB" => 1 << 40,
        _ => {
            return Err(format!(
                "'{text}': unknown unit '{suffix}'; use K, M, G or T (binary: 1G = 1024M)"
            ))
        }
    };
    n.checked_mul(scale)
        .ok_or_else(|| format!("'{text}' is too large"))
}

/// `--memory`: MiB, as a plain number or with a unit (`512M`, `2G`).
pub(crate) fn parse_memory_mib(text: &str) -> Result<u32, String> {
    let bytes = parse_size(text, 1 << 20)?;
    if bytes % (1 << 20) != 0 {
        return Err(format!("'{text}' is not a whole number of MiB"));
    }
    u32::try_from(bytes >> 20).map_err(|_| format!("'{text}' is too large"))
}

/// `--disk-size`, `--size`: bytes, as a plain number or with a unit (`10G`).
pub(crate) fn parse_bytes(text: &str) -> Result<u64, String> {
    parse_size(text, 1)
}

/// `--timeout`: a duration in seconds, or with a unit (`90s`, `10m`, `2h`, `1d`); `0` for
/// none.
pub(crate) fn parse_duration_sec(text: &str) -> Result<u32, String> {
    let t = text.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(digits);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("'{text}' is not a duration; write e.g. 90s, 10m, 2h or 1d"))?;
    let scale = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("'{text}': unknown unit '{unit}'; use s, m, h or d")),
    };
    n.checked_mul(scale)
        .and_then(|s| u32::try_from(s).ok())
        .ok_or_else(|| format!("'{text}' is too long"))
}

/// An object's owner as lists show it: `system` for the system's objects (uid 0), else the
/// user's name (or uid, when the password database has none).
pub(crate) fn owner_name(uid: u64) -> String {
    if uid == 0 {
        return "system".into();
    }
    match u32::try_from(uid).ok().and_then(crate::host::user_of) {
        Some((name, _)) => name,
        None => uid.to_string(),
    }
}

/// A time in µs since the epoch as people read it, in UTC (`2026-12-03 15:20:31 UTC`).
pub(crate) fn utc_time(us: u64) -> String {
    let secs = us / 1_000_000;
    let (days, rest) = ((secs / 86_400) as i64, secs % 86_400);
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// Each object's `Owner` property by object path, from the service's ObjectManager in one
/// call (list methods keep their shipped signatures, which have no owner).
pub(crate) async fn owners(
    conn: &zbus::Connection,
) -> anyhow::Result<std::collections::HashMap<String, u64>> {
    managed_numbers(conn, "Owner").await
}

/// Each object's numeric property `name` by object path, from the service's ObjectManager
/// in one call.
pub(crate) async fn managed_numbers(
    conn: &zbus::Connection,
    name: &str,
) -> anyhow::Result<std::collections::HashMap<String, u64>> {
    let om = zbus::fdo::ObjectManagerProxy::builder(conn)
        .destination("org.banger")
        .path("/org/banger")
        .build()
        .await?;
    let objects = om
        .get_managed_objects()
        .await
        .map_err(|e| explain(e.into()))?;
    let mut found = std::collections::HashMap::new();
    for (path, ifaces) in objects {
        for props in ifaces.values() {
            if let Some(v) = props.get(name) {
                let n = u32::try_from(&**v)
                    .map(u64::from)
                    .or_else(|_| u64::try_from(&**v));
                if let Ok(n) = n {
                    found.insert(path.to_string(), n);
                }
            }
        }
    }
    Ok(found)
}

/// Connects to the system bus (`DBUS_SYSTEM_BUS_ADDRESS` overrides).
pub async fn connect() -> anyhow::Result<zbus::Connection> {
    zbus::Connection::system().await.map_err(|e| {
        anyhow::anyhow!(
            "Cannot reach the system bus ({e}); is dbus running? On a host without systemd, \
             start a bus and set DBUS_SYSTEM_BUS_ADDRESS"
        )
    })
}

/// A refusal of banger's own, by its kind (`AlreadyExists`, `InvalidArgument`, …): the
/// message is what people read; a verb may look at the kind (on either transport).
#[derive(Debug)]
pub(crate) struct Refused {
    pub kind: String,
    pub message: String,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Refused {}

/// A long operation whose job started and then failed (not a refused call): the verbs show
/// the console's tail after a VM's.
#[derive(Debug)]
pub(crate) struct JobFailed(pub anyhow::Error);

impl std::fmt::Display for JobFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.0)
    }
}

impl std::error::Error for JobFailed {}

/// The kind of banger's refusal `e`, if it is one.
pub(crate) fn refusal(e: &anyhow::Error) -> Option<&str> {
    e.downcast_ref::<Refused>().map(|r| r.kind.as_str())
}

/// Turns a D-Bus error into a message for people.
pub fn explain(e: zbus::Error) -> anyhow::Error {
    let named = match &e {
        zbus::Error::MethodError(name, desc, _) => {
            Some((name.to_string(), desc.clone().unwrap_or_default()))
        }
        zbus::Error::FDO(fdo) => {
            use zbus::DBusError;
            Some((
                fdo.name().to_string(),
                fdo.description().unwrap_or_default().to_owned(),
            ))
        }
        _ => None,
    };
    if let Some((name, desc)) = named {
        return match name.as_str() {
            "org.freedesktop.DBus.Error.ServiceUnknown"
            | "org.freedesktop.DBus.Error.NameHasNoOwner" => {
                anyhow::anyhow!(
                    "The banger daemon is not running and the bus cannot start it: install banger \
                     (its D-Bus activation file) or run `bangerd`"
                )
            }
            "org.freedesktop.DBus.Error.AccessDenied"
            | "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired" => {
                anyhow::anyhow!("Permission denied: {desc}")
            }
            n if n.starts_with("org.banger.Error.") => anyhow::Error::new(Refused {
                kind: n.rsplit('.').next().unwrap_or_default().to_owned(),
                message: desc,
            }),
            n => anyhow::anyhow!("{desc} ({n})"),
        };
    }
    anyhow::anyhow!("D-Bus call failed: {e}")
}

/// The system bus as a [`transport::Transport`].
async fn bus() -> anyhow::Result<transport::Bus> {
    Ok(transport::Bus {
        conn: connect().await?,
    })
}

/// Runs one command line.
///
/// `daemon` is `bangerd`'s command line, whose man page `generate-assets` writes beside
/// banger's (this crate cannot name the daemon's).
pub async fn run(cli: Cli, daemon: fn() -> clap::Command) -> anyhow::Result<()> {
    let out = Output { json: cli.json };
    let varlink = (cli.varlink.as_deref())
        .filter(|v| !matches!(*v, "" | "0" | "no" | "false"))
        .map(varlink::socket_of);
    match (cli.command, varlink) {
        (Command::Doctor, _) => doctor::run(&out),
        (Command::E2b(c), socket) => e2b::run(&out, c, socket).await,
        (Command::GenerateAssets { dir }, _) => assets::generate(&dir, daemon()),
        // A completion must never print an error into the user's command line.
        (Command::CompleteNames { kind }, Some(socket)) => {
            if let Ok(client) = varlink::Client::connect(&socket).await {
                let mut t = transport::Socket { client };
                assets::print_names(assets::names(&mut t, &kind).await.unwrap_or_default());
            }
            Ok(())
        }
        (Command::CompleteNames { kind }, None) => {
            if let Ok(mut t) = bus().await {
                assets::print_names(assets::names(&mut t, &kind).await.unwrap_or_default());
            }
            Ok(())
        }
        (c, Some(socket)) => {
            let client = varlink::Client::connect(&socket).await?;
            verb(&out, &mut transport::Socket { client }, c, daemon).await
        }
        (c, None) => verb(&out, &mut bus().await?, c, daemon).await,
    }
}

/// Runs a verb that talks to the daemon over `t`.
async fn verb(
    out: &Output,
    t: &mut impl transport::Transport,
    c: Command,
    daemon: fn() -> clap::Command,
) -> anyhow::Result<()> {
    match c {
        Command::Status => status::run(out, t).await,
        Command::Image(c) => image::run(out, t, c).await,
        Command::Kernel(c) => kernel::run(out, t, c).await,
        Command::Vm(c) => vm::run(out, t, *c).await,
        Command::Snapshot(c) => snapshot::run(out, t, c).await,
        Command::Job(c) => job::run(out, t, c).await,
        // `run` answers these before it connects; the same answers here.
        Command::Doctor => doctor::run(out),
        Command::E2b(c) => e2b::run(out, c, None).await,
        Command::GenerateAssets { dir } => assets::generate(&dir, daemon()),
        Command::CompleteNames { kind } => {
            assets::print_names(assets::names(t, &kind).await.unwrap_or_default());
            Ok(())
        }
    }
}

#[cfg(test)]
mod size_tests {
    use super::{parse_bytes, parse_memory_mib};

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(parse_memory_mib("512"), Ok(512));
        assert_eq!(parse_memory_mib("512M"), Ok(512));
        assert_eq!(parse_memory_mib("512MiB"), Ok(512));
        assert_eq!(parse_memory_mib("2G"), Ok(2048));
        assert_eq!(parse_memory_mib("2g"), Ok(2048));
        assert!(parse_memory_mib("1500K")
            .unwrap_err()
            .contains("whole number of MiB"));
        assert!(parse_memory_mib("2X").unwrap_err().contains("unknown unit"));
        assert!(parse_memory_mib("lots").unwrap_err().contains("512M"));
        assert_eq!(parse_bytes("10G"), Ok(10 << 30));
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert!(parse_bytes("99999999999T")
            .unwrap_err()
            .contains("too large"));
    }
}

#[cfg(test)]
mod time_tests {
    #[test]
    fn utc_time_reads_as_a_calendar_date() {
        assert_eq!(super::utc_time(0), "1970-01-01 00:00:00 UTC");
        // 2024-02-29 12:34:56 UTC, a leap day.
        assert_eq!(
            super::utc_time(1_709_210_096_000_000),
            "2024-02-29 12:34:56 UTC"
        );
        assert_eq!(
            super::utc_time(1_796_311_231_552_401),
            "2026-12-03 15:20:31 UTC"
        );
    }
}
