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
use crate::jobs::JobEvent;
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

/// Runs the daemon until it is idle, signalled, or the bus goes away.
pub async fn run(opts: DaemonOptions) -> Result<Exit> {
    // Before anything else: a SIGTERM at any moment after start (systemd may send one right
    // after READY=1) must end in a clean stop, never the default kill.
    let signals = Signals::install()?;
    let (config, layout, store) = prepare(&opts)?;
    let idle = Duration::from_secs(config.idle_exit_sec);
    let banger = Banger::for_host(config, layout, store).await?;
    banger.vms.adopt().await?;

    let conn = zbus::connection::Builder::system()
        .build()
        .await
        .map_err(|e| Error::failed("Cannot connect to the system bus", e))?;
    let authority = Arc::new(Polkit::new(conn.clone()));
    dbus::serve(&conn, banger.clone(), authority.clone()).await?;
    record_jobs(&banger);

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
    crate::varlink::serve(
        listener,
        crate::varlink::Ctx {
            banger: banger.clone(),
            authority,
            gate: Default::default(),
        },
    )?;
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
    if let Some(path) = bound {
        let _ = std::fs::remove_file(path);
    }
    Ok(exit)
}

/// Records every job's start and end in the store, off the D-Bus path. A recorder that falls
/// behind (the event buffer overflowed) resynchronises from the jobs themselves and goes on.
pub fn record_jobs(banger: &Arc<Banger>) {
    let mut rx = banger.jobs.subscribe();
    let b = banger.clone();
    tokio::spawn(async move {
        loop {
            let r = match rx.recv().await {
                Ok(JobEvent::New { id }) => match b.jobs.find(id) {
                    Some(j) => record_start(&b, &j).await,
                    None => Ok(()),
                },
                Ok(JobEvent::Finished { id, state, error }) => {
                    record_end(&b, id, state.as_str(), error).await
                }
                Ok(_) => Ok(()),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!("The job recorder missed {n} events; resyncing from the jobs");
                    resync_records(&b).await
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            };
            if let Err(e) = r {
                tracing::warn!("Cannot record a job: {}", e.full_message());
            }
        }
    });
}

async fn record_start(b: &Banger, j: &crate::jobs::Job) -> crate::Result<()> {
    let rec = rows::JobRecord {
        id: j.id,
        kind: j.kind.clone(),
        target: j.target.clone(),
        state: "running".into(),
        error: String::new(),
    };
    b.store
        .call(move |c| {
            if rows::find_job(c, rec.id)?.is_none() {
                rows::insert_job(c, &rec, now_us())?;
            }
            Ok(())
        })
        .await
}

async fn record_end(b: &Banger, id: u32, state: &str, error: String) -> crate::Result<()> {
    let (at, state) = (now_us(), state.to_owned());
    b.store
        .call(move |c| {
            // A job too quick for its New to find it still gets a row.
            if rows::find_job(c, id)?.is_none() {
                let rec = rows::JobRecord {
                    id,
                    kind: String::new(),
                    target: String::new(),
                    state: "running".into(),
                    error: String::new(),
                };
                rows::insert_job(c, &rec, at)?;
            }
            rows::finish_job(c, id, &state, &error, at)
        })
        .await
}

/// After a lag: every running job has its row, and every job that ended since has its end.
async fn resync_records(b: &Banger) -> crate::Result<()> {
    for j in b.jobs.list() {
        record_start(b, &j).await?;
    }
    for j in b.jobs.finished() {
        let status = j.status();
        let id = j.id;
        let open = b
            .store
            .call(move |c| {
                Ok(rows::find_job(c, id)?
                    .map(|r| r.state == "running")
                    .unwrap_or(true))
            })
            .await?;
        if open {
            record_start(b, &j).await?;
            record_end(b, id, status.state.as_str(), status.error).await?;
        }
    }
    // Rows still `running` of jobs that ended so long ago the daemon forgot how.
    let live: std::collections::BTreeSet<u32> = b.jobs.list().iter().map(|j| j.id).collect();
    let open: Vec<u32> = b
        .store
        .call(|c| {
            let mut st = c.prepare("SELECT id FROM jobs WHERE state = 'running'")?;
            let ids = st.query_map([], |r| r.get::<_, u32>(0))?;
            Ok(ids.collect::<Result<Vec<_>, _>>()?)
        })
        .await?;
    for id in open.into_iter().filter(|id| !live.contains(id)) {
        let (state, error) = match b.jobs.find(id) {
            Some(j) => {
                let s = j.status();
                (s.state.as_str().to_owned(), s.error)
            }
            None => (
                "failed".to_owned(),
                "It ended while the job recorder was behind, and how was not kept".to_owned(),
            ),
        };
        record_end(b, id, &state, error).await?;
    }
    Ok(())
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
            _ = idle_timer => return Exit::Idle,
            _ = term.recv() => return Exit::Signal,
            _ = int.recv() => return Exit::Signal,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_job_recorder_survives_a_lag_and_records_every_end() {
        let dir = tempfile::tempdir().unwrap();
        let b = crate::vms::concurrency_tests::banger(dir.path(), 1, "10.6.0.0/24");
        record_jobs(&b);
        // The store is busy while more jobs end than the recorder's buffer holds: it lags.
        let store = b.store.clone();
        let (held_tx, held) = std::sync::mpsc::channel::<()>();
        let (go_tx, go) = std::sync::mpsc::channel::<()>();
        let blocker = std::thread::spawn(move || {
            store
                .call_blocking(|_| {
                    held_tx.send(()).unwrap();
                    go.recv().unwrap();
                    Ok(())
                })
                .unwrap();
        });
        held.recv().unwrap();
        let spec = || crate::jobs::JobSpec {
            kind: "t".into(),
            target: "t".into(),
            action: crate::auth::Action::ImagesManage,
            owner_uid: 0,
        };
        let mut last = None;
        for _ in 0..2500 {
            last = Some(b.jobs.spawn(spec(), |_| async { Ok(()) }));
        }
        let last = last.unwrap();
        last.wait().await.unwrap();
        while !b.jobs.list().is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        go_tx.send(()).unwrap();
        blocker.join().unwrap();
        // Every job ended, so every row it has says how, the last one's included.
        let deadline = Instant::now() + Duration::from_secs(60);
        let id = last.id;
        loop {
            let (row, running) = b
                .store
                .call(move |c| {
                    let running: i64 = c.query_row(
                        "SELECT COUNT(*) FROM jobs WHERE state = 'running'",
                        [],
                        |r| r.get(0),
                    )?;
                    Ok((rows::find_job(c, id)?, running))
                })
                .await
                .unwrap();
            if row.as_ref().map(|r| r.state.as_str()) == Some("done") && running == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the recorder stopped: last job {row:?}, {running} rows still running"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
