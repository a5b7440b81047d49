//! `bangerd`'s life: prepare state, export objects, take `org.banger`, tell systemd we are
//! ready, and exit when idle (no calls for `idle_exit_sec` and no job running). VMs are not
//! the daemon's children, so an idle exit never stops one.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use sd_notify::NotifyState;
use tokio::time::Instant;
use zbus::fdo::{RequestNameFlags, RequestNameReply};
use zbus::message::Type as MessageType;

use crate::auth::Polkit;
use crate::config::Config;
use crate::layout::Layout;
use crate::model::now_us;
use crate::service::Banger;
use crate::store::{rows, Store};
use crate::{dbus, Error, Result};

/// The banger D-Bus system service.
#[derive(Debug, clap::Parser)]
#[command(name = "bangerd", version, about)]
pub struct Args {
    /// Where images, kernels, VMs and the database live.
    #[arg(long, default_value = "/var/lib/banger")]
    pub state_dir: PathBuf,
    /// Where sockets live.
    #[arg(long, default_value = "/run/banger")]
    pub runtime_dir: PathBuf,
    /// The configuration file.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

/// How the daemon was asked to run.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    /// State directory.
    pub state_dir: PathBuf,
    /// Runtime directory.
    pub runtime_dir: PathBuf,
    /// Configuration file.
    pub config: PathBuf,
    /// Whether a missing configuration file is an error (it was named explicitly).
    pub config_required: bool,
}

/// Why the daemon stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Idle for `idle_exit_sec`.
    Idle,
    /// SIGTERM or SIGINT.
    Signal,
    /// The bus connection closed.
    BusGone,
}

fn notify(states: &[NotifyState<'_>]) {
    // Outside systemd there is no NOTIFY_SOCKET and this is a no-op.
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::debug!("sd_notify failed: {e}");
    }
}

/// Prepares the state directory and opens the store.
pub fn prepare(opts: &DaemonOptions) -> Result<(Config, Layout, Store)> {
    let config = Config::load(&opts.config, opts.config_required)?;
    let layout = Layout::new(&opts.state_dir, &opts.runtime_dir);
    layout.create()?;
    crate::fault::arm(&layout.runtime_dir);
    // Programs a killed daemon's jobs started would write into what is swept next.
    let programs = layout.runtime_dir.join("programs");
    for pgid in crate::host::stop_orphaned_programs(&programs) {
        tracing::warn!(
            pgid,
            "Stopped the programs of a job the previous daemon left running"
        );
    }
    crate::host::record_programs_in(programs)?;
    for p in layout.sweep_staging()? {
        tracing::info!(path = %p.display(), "Removed staging leftover of an interrupted operation");
    }
    let store = Store::open(&layout.database())?;
    sweep_orphans(&layout, &store)?;
    sweep_initrds(&config, &store)?;
    let n = store.call_blocking(|c| rows::fail_interrupted_jobs(c, now_us()))?;
    if n > 0 {
        tracing::warn!("{n} job(s) were interrupted by the previous daemon's exit; marked failed");
    }
    Ok((config, layout, store))
}

/// Removes image, kernel, VM and snapshot directories no row names (see
/// `layout::sweep_orphans` for why that is safe), logging each with its id.
fn sweep_orphans(layout: &Layout, store: &Store) -> Result<()> {
    use std::collections::BTreeSet;
    let (images, kernels, vms, snapshots) = store.call_blocking(|c| {
        let ids = |v: Vec<String>| v.into_iter().collect::<BTreeSet<_>>();
        Ok((
            ids(rows::list_images(c)?.into_iter().map(|i| i.id).collect()),
            ids(rows::list_kernels(c)?.into_iter().map(|k| k.name).collect()),
            ids(rows::list_vms(c)?.into_iter().map(|v| v.id).collect()),
            ids(rows::list_snapshots(c)?.into_iter().map(|s| s.id).collect()),
        ))
    })?;
    for (dir, live, kind) in [
        (layout.images_dir(), images, "image"),
        (layout.kernels_dir(), kernels, "kernel"),
        (layout.vms_dir(), vms, "VM"),
        (layout.snapshots_dir(), snapshots, "snapshot"),
    ] {
        for id in crate::layout::sweep_orphans(&dir, &live)? {
            tracing::warn!(
                kind,
                id = %id,
                "Removed {kind} directory {id}: no row names it (a publish or delete the \
                 previous daemon did not finish)"
            );
        }
    }
    Ok(())
}

/// Builds again the kernels' initrds an older banger built without what this one adds
/// (`kernels::initrd::refresh`: virtio's PCI transport), then removes the initrds VMs booted
/// with (`kernels::initrd::current`) that were made for other guest binaries than the
/// configured ones or from an initrd built again, and any a killed daemon left half-written:
/// no start is choosing one yet, and a VM that runs keeps the file its VMM mapped.
fn sweep_initrds(config: &Config, store: &Store) -> Result<()> {
    use crate::kernels::initrd;
    let kernels = store.call_blocking(|c| rows::list_kernels(c))?;
    let (init, agent) = config.initrd_binaries();
    for k in kernels {
        let Some(dir) = k.dir() else {
            continue;
        };
        if let (Some(i), Some(m)) = (&k.initrd_path, &k.modules_dir) {
            // A kernel whose initrd cannot be built again boots as it did (MMIO).
            match initrd::refresh(i, m, &init) {
                Ok(true) => tracing::info!(
                    kernel = %k.name,
                    "Built the initrd of kernel {} again: its VMs' devices go on PCI",
                    k.name
                ),
                Ok(false) => {}
                Err(e) => tracing::warn!(
                    kernel = %k.name,
                    "Kept the initrd of kernel {} as an older banger built it: {e}",
                    k.name
                ),
            }
        }
        let keep = initrd::current_name(k.initrd_path.as_deref(), &init, &agent).ok();
        for name in initrd::sweep_current(dir, keep.as_deref())? {
            tracing::info!(kernel = %k.name, "Removed {name}: made from other guest binaries or an older initrd");
        }
    }
    Ok(())
}

/// Runs the daemon until it is idle, signalled, or the bus goes away.
pub async fn run(opts: DaemonOptions) -> Result<Exit> {
    // Before anything else: a SIGTERM at any moment after start (systemd may send one right
    // after READY=1) must end in a clean stop, never the default kill.
    let signals = Signals::install()?;
    let (config, layout, store) = prepare(&opts)?;
    let idle = Duration::from_secs(config.idle_exit_sec);
    let banger = Banger::for_host(config, layout, store).await?;
    banger.vms.adopt().await?;
    // VMs' lifetimes, those that ran out while the daemon was down first.
    let keeper = banger.clone();
    tokio::spawn(async move { keeper.vms.keep_lifetimes().await });

    let conn = zbus::connection::Builder::system()
        .build()
        .await
        .map_err(|e| Error::failed("Cannot connect to the system bus", e))?;
    let authority = Arc::new(Polkit::new(conn.clone()));
    dbus::serve(&conn, banger.clone(), authority.clone()).await?;
    crate::recorder::record_jobs(&banger);

    let reply = conn
        .request_name_with_flags(dbus::BUS_NAME, RequestNameFlags::DO_NOT_QUEUE)
        .await
        .map_err(|e| Error::failed(format!("Cannot own {}", dbus::BUS_NAME), e))?;
    if reply != RequestNameReply::PrimaryOwner {
        return Err(Error::AlreadyExists(format!(
            "{} is already owned by another bangerd ({reply:?})",
            dbus::BUS_NAME
        )));
    }
    // Once the name is banger's (a second daemon must not take the first one's socket):
    // socket activation (bangerd.socket) passes the socket; started any other way, bangerd
    // binds it itself and removes it when it exits.
    let (listener, bound) = match crate::varlink::passed_listener()? {
        Some(l) => (l, None),
        None => (
            crate::varlink::bind(&opts.runtime_dir)?,
            Some(crate::varlink::socket_path(&opts.runtime_dir)),
        ),
    };
    let ctx = crate::varlink::Ctx {
        banger: banger.clone(),
        authority,
        gate: Default::default(),
    };
    // The metrics socket systemd-report reads: passed by bangerd-metrics.socket, else bound
    // in the runtime directory (and removed on exit) as the Varlink socket is.
    let (metrics, metrics_bound) = match crate::varlink::passed_metrics_listener()? {
        Some(l) => (l, None),
        None => (
            crate::varlink::bind_metrics(&opts.runtime_dir)?,
            Some(opts.runtime_dir.join("report/io.banger")),
        ),
    };
    crate::varlink::serve_metrics(metrics, ctx.clone())?;
    crate::varlink::serve(listener, ctx)?;
    tracing::info!(version = crate::VERSION, state_dir = %opts.state_dir.display(), "bangerd ready");
    notify(&[
        NotifyState::Ready,
        NotifyState::Status("Ready, waiting for calls"),
    ]);

    let exit = wait_for_exit(&conn, &banger, idle, signals).await;
    tracing::info!(?exit, "bangerd stopping");
    notify(&[NotifyState::Stopping, NotifyState::Status("Stopping")]);
    // Give the name back first, so a call arriving now activates a fresh daemon instead of
    // reaching one that is going away.
    let _ = conn.release_name(dbus::BUS_NAME).await;
    for path in [bound, metrics_bound].into_iter().flatten() {
        let _ = std::fs::remove_file(path);
    }
    Ok(exit)
}

/// SIGTERM and SIGINT, caught from the start.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        let fail = |e| Error::failed("Cannot install signal handlers", e);
        Ok(Signals {
            term: signal(SignalKind::terminate()).map_err(fail)?,
            int: signal(SignalKind::interrupt()).map_err(fail)?,
        })
    }
}

async fn wait_for_exit(
    conn: &zbus::Connection,
    banger: &Banger,
    idle: Duration,
    signals: Signals,
) -> Exit {
    let mut messages = zbus::MessageStream::from(conn);
    let mut running = banger.jobs.running();
    let mut last_call = Instant::now();
    let Signals { mut term, mut int } = signals;
    loop {
        let busy = *running.borrow() > 0;
        let deadline = last_call + idle;
        let idle_timer = async {
            if idle.is_zero() || busy {
                std::future::pending::<()>().await
            } else {
                tokio::time::sleep_until(deadline).await
            }
        };
        tokio::select! {
            m = messages.next() => match m {
                Some(Ok(m)) if m.message_type() == MessageType::MethodCall => last_call = Instant::now(),
                Some(_) => {}
                None => return Exit::BusGone,
            },
            r = running.changed() => {
                if r.is_err() {
                    return Exit::BusGone;
                }
                let n = *running.borrow();
                // The idle clock restarts when the last job or held call ends.
                if n == 0 {
                    last_call = Instant::now();
                    notify(&[NotifyState::Status("Ready, waiting for calls")]);
                } else {
                    notify(&[NotifyState::Status(&format!("Running {n} job(s) or call(s)"))]);
                }
            }
            _ = idle_timer => {
                // A VM's lifetime runs: the daemon stays to end it.
                if banger.vms.lifetimes_pending() {
                    last_call = Instant::now();
                    continue;
                }
                return Exit::Idle;
            }
            _ = term.recv() => return Exit::Signal,
            _ = int.recv() => return Exit::Signal,
        }
    }
}
