//! Long operations (pulls, builds, creates) as jobs, the way systemd-importd runs transfers:
//! the caller gets an id at once; the work runs in a task that reports stages, progress and
//! log lines; a cancel drops the work at its next await point. Everything a job does is also
//! an ordered [`JobEvent`] on one broadcast channel, which the D-Bus layer turns into
//! signals and the daemon into store rows. This module knows nothing of D-Bus.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{broadcast, watch};

use crate::auth::Action;
use crate::{Error, Result};

/// A job lookup's failure.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// No job of this id runs.
    #[error("No running job {0}; it may have finished already (see `banger status`)")]
    NotFound(u32),
}

impl crate::error::Kind for JobError {
    fn kind(&self) -> crate::error::ErrorKind {
        match self {
            JobError::NotFound(_) => crate::error::ErrorKind::NotFound,
        }
    }
}

/// How a job stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    /// Its work is under way.
    Running,
    /// Finished successfully.
    Done,
    /// Finished with an error.
    Failed,
    /// Canceled by a caller.
    Canceled,
}

impl JobState {
    /// The D-Bus spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Running => "running",
            JobState::Done => "done",
            JobState::Failed => "failed",
            JobState::Canceled => "canceled",
        }
    }
}

/// A job's changing part.
#[derive(Debug, Clone, PartialEq)]
pub struct JobStatus {
    /// The current stage's name.
    pub stage: String,
    /// 0..=1.
    pub progress: f64,
    /// Running or how it ended.
    pub state: JobState,
    /// The error's message when it failed.
    pub error: String,
}

/// One long operation.
#[derive(Debug)]
pub struct Job {
    /// Unique id, never reused (it continues from the store's highest).
    pub id: u32,
    /// What kind of work, e.g. `pull-image`.
    pub kind: String,
    /// What it works on, e.g. an image ref or a VM name.
    pub target: String,
    /// The polkit action a caller needs to cancel it.
    pub action: Action,
    /// The uid that started it.
    pub owner_uid: u32,
    status: Mutex<JobStatus>,
    cancel: watch::Sender<bool>,
    /// When a progress event last went out.
    progress_sent: Mutex<Option<std::time::Instant>>,
    finished: watch::Sender<bool>,
}

impl Job {
    /// A snapshot of the changing part.
    pub fn status(&self) -> JobStatus {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Waits until the job ended; `Err` with its error unless it succeeded.
    pub async fn wait(&self) -> Result<()> {
        let mut rx = self.finished.subscribe();
        let _ = rx.wait_for(|f| *f).await;
        let s = self.status();
        match s.state {
            JobState::Done => Ok(()),
            JobState::Canceled => Err(Error::Canceled),
            _ => Err(Error::failed(
                format!("Job {} ({} {}) failed", self.id, self.kind, self.target),
                std::io::Error::other(s.error),
            )),
        }
    }

    fn update(&self, f: impl FnOnce(&mut JobStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|p| p.into_inner()));
    }
}

/// Everything that happens to jobs, in the order it happened.
#[derive(Debug, Clone, PartialEq)]
pub enum JobEvent {
    /// A job was started.
    New {
        /// The job.
        id: u32,
    },
    /// The job entered a stage.
    StageChanged {
        /// The job.
        id: u32,
        /// The stage's name.
        stage: String,
        /// What it is doing, for people.
        message: String,
    },
    /// The job's progress moved.
    Progress {
        /// The job.
        id: u32,
        /// 0..=1.
        progress: f64,
    },
    /// A log line for the job's watchers.
    Log {
        /// The job.
        id: u32,
        /// syslog priority (3 error, 4 warning, 6 info, 7 debug).
        priority: u32,
        /// The line.
        line: String,
    },
    /// The job finished; its object is removed right after.
    Finished {
        /// The job.
        id: u32,
        /// `Done`, `Failed` or `Canceled`.
        state: JobState,
        /// The error's message, empty unless failed.
        error: String,
    },
}

/// What a job's work uses to report.
#[derive(Clone)]
pub struct JobContext {
    job: Arc<Job>,
    events: broadcast::Sender<JobEvent>,
}

impl JobContext {
    /// The job's id.
    pub fn id(&self) -> u32 {
        self.job.id
    }

    /// Enters a stage (progress is left as it is).
    pub fn stage(&self, stage: &str, message: impl Into<String>) {
        crate::fault::point(&format!("stage:{stage}"));
        let message = message.into();
        tracing::info!(job_id = self.job.id, stage, "{message}");
        self.job.update(|s| s.stage = stage.to_owned());
        self.send(JobEvent::StageChanged {
            id: self.job.id,
            stage: stage.into(),
            message,
        });
    }

    /// Sets progress, clamped to 0..=1.
    pub fn progress(&self, progress: f64) {
        let progress = if progress.is_nan() {
            0.0
        } else {
            progress.clamp(0.0, 1.0)
        };
        self.job.update(|s| s.progress = progress);
        // At most ten updates a second reach watchers (the property is always current, and
        // the end of the job sends the last value).
        let now = std::time::Instant::now();
        {
            let mut last = self
                .job
                .progress_sent
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if matches!(*last, Some(t) if now.duration_since(t) < PROGRESS_INTERVAL) {
                return;
            }
            *last = Some(now);
        }
        self.send(JobEvent::Progress {
            id: self.job.id,
            progress,
        });
    }

    /// Sends a log line to the job's watchers and the journal.
    pub fn log(&self, priority: u32, line: impl Into<String>) {
        let line = line.into();
        if priority <= 4 {
            tracing::warn!(job_id = self.job.id, "{line}");
        } else {
            tracing::info!(job_id = self.job.id, "{line}");
        }
        self.send(JobEvent::Log {
            id: self.job.id,
            priority,
            line,
        });
    }

    /// Whether a cancel was asked for; for work that checks between blocking steps.
    pub fn is_canceled(&self) -> bool {
        *self.job.cancel.borrow()
    }

    fn send(&self, e: JobEvent) {
        // No receiver is fine: nobody is watching yet.
        let _ = self.events.send(e);
    }
}

/// What to start: the job's identity, before it has an id.
#[derive(Debug, Clone)]
pub struct JobSpec {
    /// What kind of work, e.g. `pull-image`.
    pub kind: String,
    /// What it works on.
    pub target: String,
    /// The polkit action a caller needs to cancel it.
    pub action: Action,
    /// The uid that started it.
    pub owner_uid: u32,
}

struct Inner {
    next_id: AtomicU32,
    jobs: Mutex<BTreeMap<u32, Arc<Job>>>,
    /// The last jobs that finished: a job can end before its `New` reaches a subscriber
    /// (one that fails at once), which must still find it to publish and record it.
    recent: Mutex<std::collections::VecDeque<Arc<Job>>>,
    events: broadcast::Sender<JobEvent>,
    running: watch::Sender<usize>,
}

/// How many finished jobs [`Jobs::find`] still finds.
const RECENT_JOBS: usize = 256;

/// The shortest time between two progress events of one job.
const PROGRESS_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

/// How long a canceled job waits for its blocking work to stop before its task is dropped
/// anyway (programs run through [`crate::host`] are killed within a tenth of a second).
const CANCEL_GRACE: std::time::Duration = std::time::Duration::from_secs(60);

pub use crate::cancel::{check_canceled, current_blocking, spawn_blocking, JobToken};

/// A call counted as work in progress (see [`Jobs::hold`]).
pub struct Held(Arc<Inner>);

impl Drop for Held {
    fn drop(&mut self) {
        self.0.running.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// A job's work ended by a panic: its message.
fn panic_message(e: tokio::task::JoinError) -> String {
    match e.try_into_panic() {
        Ok(p) => p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic".into()),
        Err(_) => "aborted".into(),
    }
}

/// The job table and runner; cheap to clone.
#[derive(Clone)]
pub struct Jobs {
    inner: Arc<Inner>,
}

impl Jobs {
    /// A runner whose first id is `last_id + 1`.
    pub fn new(last_id: u32) -> Self {
        let (events, _) = broadcast::channel(4096);
        let (running, _) = watch::channel(0);
        Jobs {
            inner: Arc::new(Inner {
                next_id: AtomicU32::new(last_id + 1),
                jobs: Mutex::new(BTreeMap::new()),
                recent: Mutex::default(),
                events,
                running,
            }),
        }
    }

    /// The jobs that finished last (up to 256), oldest first: what a subscriber that lagged
    /// may have missed the end of.
    pub fn finished(&self) -> Vec<Arc<Job>> {
        let recent = self.inner.recent.lock().unwrap_or_else(|p| p.into_inner());
        recent.iter().cloned().collect()
    }

    /// Subscribes to every event from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<JobEvent> {
        self.inner.events.subscribe()
    }

    /// A watch on how many jobs and held calls run, for the idle timer.
    pub fn running(&self) -> watch::Receiver<usize> {
        self.inner.running.subscribe()
    }

    /// Counts a method call as work in progress until the guard drops, so the idle exit
    /// waits for it as it waits for a job (a long `StopVM` or `ImportKernel` is not cut off).
    pub fn hold(&self) -> Held {
        self.inner.running.send_modify(|n| *n += 1);
        Held(self.inner.clone())
    }

    /// The jobs that run now, by id.
    pub fn list(&self) -> Vec<Arc<Job>> {
        self.table().values().cloned().collect()
    }

    /// A running job.
    pub fn get(&self, id: u32) -> Result<Arc<Job>> {
        self.table()
            .get(&id)
            .cloned()
            .ok_or_else(|| JobError::NotFound(id).into())
    }

    /// A job that runs or finished lately (for subscribers catching up with its events).
    pub fn find(&self, id: u32) -> Option<Arc<Job>> {
        if let Some(j) = self.table().get(&id) {
            return Some(j.clone());
        }
        self.inner
            .recent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|j| j.id == id)
            .cloned()
    }

    /// Asks a running job to stop; its work is dropped at its next await point.
    pub fn cancel(&self, id: u32) -> Result<()> {
        let job = self.get(id)?;
        job.cancel.send_replace(true);
        Ok(())
    }

    fn table(&self) -> std::sync::MutexGuard<'_, BTreeMap<u32, Arc<Job>>> {
        self.inner.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts `work` as a job and returns it at once. `New` is sent before the work can send
    /// anything, and `Finished` after it sent everything.
    pub fn spawn<F, Fut>(&self, spec: JobSpec, work: F) -> Arc<Job>
    where
        F: FnOnce(JobContext) -> Fut,
        Fut: Future<Output = Result<()>> + Send + 'static,
    {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (cancel, mut canceled) = watch::channel(false);
        let job = Arc::new(Job {
            id,
            kind: spec.kind,
            target: spec.target,
            action: spec.action,
            owner_uid: spec.owner_uid,
            status: Mutex::new(JobStatus {
                stage: String::new(),
                progress: 0.0,
                state: JobState::Running,
                error: String::new(),
            }),
            cancel,
            progress_sent: Mutex::new(None),
            finished: watch::channel(false).0,
        });
        self.table().insert(id, job.clone());
        self.inner.running.send_modify(|n| *n += 1);
        let _ = self.inner.events.send(JobEvent::New { id });
        tracing::info!(job_id = id, kind = %job.kind, target = %job.target, "Job started");

        let ctx = JobContext {
            job: job.clone(),
            events: self.inner.events.clone(),
        };
        let busy = Arc::new(watch::channel(0u32).0);
        let token = JobToken::new(canceled.clone(), busy.clone());
        let mut task = tokio::spawn(crate::cancel::scope(token, work(ctx)));
        let this = self.clone();
        let job2 = job.clone();
        tokio::spawn(async move {
            let result = tokio::select! {
                r = &mut task => match r {
                    Ok(r) => r,
                    // A panic ends the job failed (and counted out), never running forever.
                    Err(e) => Err(Error::failed(
                        "The job's work failed unexpectedly",
                        std::io::Error::other(panic_message(e)),
                    )),
                },
                _ = async { drop(canceled.wait_for(|c| *c).await) } => {
                    // Blocking work sees the cancel and stops its programs; only then is
                    // the work dropped, with the staging directories it holds.
                    let mut idle = busy.subscribe();
                    let _ = tokio::time::timeout(CANCEL_GRACE, idle.wait_for(|n| *n == 0)).await;
                    task.abort();
                    let _ = task.await;
                    Err(Error::Canceled)
                }
            };
            this.finish(&job2, result);
        });
        job
    }

    fn finish(&self, job: &Job, result: Result<()>) {
        let (state, error) = match result {
            Ok(()) => (JobState::Done, String::new()),
            Err(Error::Canceled) => (JobState::Canceled, String::new()),
            Err(e) => (JobState::Failed, e.full_message()),
        };
        job.update(|s| {
            s.state = state;
            s.error = error.clone();
            if state == JobState::Done {
                s.progress = 1.0;
            }
        });
        match state {
            JobState::Failed => tracing::error!(job_id = job.id, "Job failed: {error}"),
            _ => tracing::info!(job_id = job.id, result = state.as_str(), "Job finished"),
        }
        if let Some(j) = self.table().remove(&job.id) {
            let mut recent = self.inner.recent.lock().unwrap_or_else(|p| p.into_inner());
            recent.push_back(j);
            if recent.len() > RECENT_JOBS {
                recent.pop_front();
            }
        }
        let _ = self.inner.events.send(JobEvent::Finished {
            id: job.id,
            state,
            error,
        });
        self.inner.running.send_modify(|n| *n -= 1);
        job.finished.send_replace(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_call_counts_as_work_until_it_ends() {
        let jobs = Jobs::new(0);
        let running = jobs.running();
        let a = jobs.hold();
        let b = jobs.hold();
        assert_eq!(*running.borrow(), 2);
        drop(a);
        assert_eq!(*running.borrow(), 1);
        drop(b);
        assert_eq!(*running.borrow(), 0);
    }
    use tokio::sync::oneshot;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn blocking_work_starts_before_its_handle_is_awaited() {
        // A consumer on the blocking pool and a producer awaited first, as a snapshot's
        // compressor and QEMU's migration, or a pull's flattener and its download, are.
        let jobs = Jobs::new(0);
        let job = jobs.spawn(spec(), |_| async {
            let (tx, mut rx) = tokio::sync::mpsc::channel::<u32>(1);
            let consumer = spawn_blocking(move || {
                let mut n = 0;
                while rx.blocking_recv().is_some() {
                    n += 1;
                }
                n
            });
            for i in 0..3 {
                tx.send(i).await.map_err(|e| Error::failed("send", e))?;
            }
            drop(tx);
            assert_eq!(consumer.await.unwrap(), 3);
            Ok(())
        });
        tokio::time::timeout(std::time::Duration::from_secs(10), job.wait())
            .await
            .expect("the producer waited for a consumer that had not started")
            .unwrap();
    }

    #[tokio::test]
    async fn a_job_whose_work_panics_ends_failed_with_the_message() {
        let jobs = Jobs::new(0);
        let job = jobs.spawn(spec(), |_| async { panic!("the work broke") });
        let e = job.wait().await.unwrap_err();
        assert!(e.full_message().contains("the work broke"), "{e}");
        assert_eq!(job.status().state, JobState::Failed);
        assert_eq!(*jobs.running().borrow(), 0, "still counted as running");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_canceled_job_kills_its_programs_and_its_staging_goes_after_them() {
        let dir = tempfile::tempdir().unwrap();
        let marker = format!("banger-cancel-test-{}", std::process::id());
        let (d, m) = (dir.path().join("staging"), marker.clone());
        let jobs = Jobs::new(0);
        let (started_tx, started) = oneshot::channel();
        let job = jobs.spawn(spec(), move |_| async move {
            let staging = crate::layout::StagingDir::create(d.clone())?;
            let _ = started_tx.send(());
            // A writer that starts writers of its own, in the staging directory, forever.
            let script = format!(
                "while :; do (touch {}/f-$$-$(date +%N); sleep 0.01) & sleep 0.02; done # {m}",
                d.display()
            );
            spawn_blocking(move || crate::host::run("sh", ["-c", script.as_str()]))
                .await
                .map_err(|e| Error::failed("join", e))??;
            drop(staging);
            Ok(())
        });
        started.await.unwrap();
        // Canceled once its writers are at work.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while dir
            .path()
            .join("staging")
            .read_dir()
            .unwrap()
            .next()
            .is_none()
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the writers never wrote"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        jobs.cancel(job.id).unwrap();
        assert!(matches!(job.wait().await, Err(Error::Canceled)));
        // The writers are gone (so nothing writes it again), and so is the directory.
        let left = || {
            std::process::Command::new("pgrep")
                .args(["-f", &marker])
                .output()
                .unwrap()
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !left().stdout.is_empty() || dir.path().join("staging").exists() {
            if std::time::Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(
            !dir.path().join("staging").exists(),
            "the staging directory stayed"
        );
        let left = left();
        assert!(
            left.stdout.is_empty(),
            "processes outlived the job: {}",
            String::from_utf8_lossy(&left.stdout)
        );
    }

    #[tokio::test]
    async fn a_job_that_ends_at_once_is_still_found_by_late_subscribers() {
        let jobs = Jobs::new(0);
        let job = jobs.spawn(
            JobSpec {
                kind: "t".into(),
                target: "t".into(),
                action: crate::auth::Action::VmsManage,
                owner_uid: 0,
            },
            |_| async { Err(Error::InvalidArgument("at once".into())) },
        );
        let _ = job.wait().await;
        assert!(jobs.get(job.id).is_err(), "not running any more");
        let found = jobs.find(job.id).expect("found after it ended");
        assert_eq!(found.status().error, "at once");
    }

    fn spec() -> JobSpec {
        JobSpec {
            kind: "test".into(),
            target: "t".into(),
            action: Action::ImagesManage,
            owner_uid: 0,
        }
    }

    async fn next_finished(rx: &mut broadcast::Receiver<JobEvent>) -> Vec<JobEvent> {
        let mut seen = Vec::new();
        loop {
            let e = rx.recv().await.unwrap();
            let done = matches!(e, JobEvent::Finished { .. });
            seen.push(e);
            if done {
                return seen;
            }
        }
    }

    #[tokio::test]
    async fn events_arrive_in_order_and_the_job_is_removed() {
        let jobs = Jobs::new(41);
        let mut rx = jobs.subscribe();
        let job = jobs.spawn(spec(), |ctx| async move {
            ctx.stage("fetch", "Fetching");
            ctx.progress(0.5);
            ctx.log(6, "half way");
            ctx.stage("publish", "Publishing");
            Ok(())
        });
        assert_eq!(job.id, 42);
        let events = next_finished(&mut rx).await;
        assert_eq!(
            events,
            vec![
                JobEvent::New { id: 42 },
                JobEvent::StageChanged {
                    id: 42,
                    stage: "fetch".into(),
                    message: "Fetching".into()
                },
                JobEvent::Progress {
                    id: 42,
                    progress: 0.5
                },
                JobEvent::Log {
                    id: 42,
                    priority: 6,
                    line: "half way".into()
                },
                JobEvent::StageChanged {
                    id: 42,
                    stage: "publish".into(),
                    message: "Publishing".into()
                },
                JobEvent::Finished {
                    id: 42,
                    state: JobState::Done,
                    error: String::new()
                },
            ]
        );
        assert_eq!(job.status().progress, 1.0);
        assert!(jobs.get(42).is_err());
        assert_eq!(*jobs.running().borrow(), 0);
    }

    #[tokio::test]
    async fn a_failure_keeps_its_message() {
        let jobs = Jobs::new(0);
        let mut rx = jobs.subscribe();
        let job = jobs.spawn(spec(), |_| async {
            Err(Error::InvalidArgument("bad ref".into()))
        });
        let events = next_finished(&mut rx).await;
        assert_eq!(
            events.last().unwrap(),
            &JobEvent::Finished {
                id: 1,
                state: JobState::Failed,
                error: "bad ref".into()
            }
        );
        assert_eq!(job.status().state, JobState::Failed);
    }

    #[tokio::test]
    async fn blocking_loops_see_their_jobs_cancel_between_chunks() {
        let jobs = Jobs::new(0);
        let (started_tx, started) = std::sync::mpsc::channel();
        let chunks = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counted = chunks.clone();
        let (ended_tx, ended) = std::sync::mpsc::channel();
        let job = jobs.spawn(spec(), move |_| async move {
            spawn_blocking(move || -> std::io::Result<()> {
                let _ = started_tx.send(());
                let stopped = loop {
                    if let Err(e) = check_canceled() {
                        break e;
                    }
                    counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    std::thread::sleep(std::time::Duration::from_millis(5));
                };
                let _ = ended_tx.send(());
                Err(stopped)
            })
            .await
            .map_err(|e| Error::failed("join", e))?
            .map_err(|e| Error::failed("copy", e))
        });
        tokio::task::spawn_blocking(move || started.recv().unwrap())
            .await
            .unwrap();
        jobs.cancel(job.id).unwrap();
        assert!(matches!(job.wait().await, Err(Error::Canceled)));
        // The loop itself stopped at its check (it would run forever otherwise), and counted
        // nothing after.
        let after = chunks.load(std::sync::atomic::Ordering::Relaxed);
        tokio::task::spawn_blocking(move || ended.recv_timeout(std::time::Duration::from_secs(10)))
            .await
            .unwrap()
            .expect("the blocking loop never saw the cancel");
        assert!(chunks.load(std::sync::atomic::Ordering::Relaxed) <= after + 1);
        // Outside a job there is nothing to cancel.
        assert!(check_canceled().is_ok());
    }

    #[tokio::test]
    async fn cancel_drops_the_work_at_its_await_point() {
        let jobs = Jobs::new(0);
        let mut rx = jobs.subscribe();
        let (started_tx, started_rx) = oneshot::channel();
        let (_never_tx, never_rx) = oneshot::channel::<()>();
        let (dropped_tx, dropped_rx) = oneshot::channel::<()>();
        let job = jobs.spawn(spec(), |_| async move {
            // Sends on drop, which proves the future was dropped, not left running.
            struct Guard(Option<oneshot::Sender<()>>);
            impl Drop for Guard {
                fn drop(&mut self) {
                    let _ = self.0.take().map(|t| t.send(()));
                }
            }
            let _g = Guard(Some(dropped_tx));
            started_tx.send(()).unwrap();
            let _ = never_rx.await;
            Ok(())
        });
        started_rx.await.unwrap();
        assert_eq!(*jobs.running().borrow(), 1);
        jobs.cancel(job.id).unwrap();
        dropped_rx.await.unwrap();
        let events = next_finished(&mut rx).await;
        assert_eq!(
            events.last().unwrap(),
            &JobEvent::Finished {
                id: job.id,
                state: JobState::Canceled,
                error: String::new()
            }
        );
        assert!(matches!(
            jobs.cancel(job.id),
            Err(Error::Job(JobError::NotFound(_)))
        ));
    }

    #[tokio::test]
    async fn jobs_run_concurrently_and_ids_are_unique() {
        let jobs = Jobs::new(0);
        let mut rx = jobs.subscribe();
        let gate = Arc::new(tokio::sync::Barrier::new(8));
        let ids: Vec<u32> = (0..8)
            .map(|_| {
                let gate = gate.clone();
                // Every job waits for all eight: it only finishes if they all run at once.
                jobs.spawn(spec(), |_| async move {
                    gate.wait().await;
                    Ok(())
                })
                .id
            })
            .collect();
        let mut unique = ids.clone();
        unique.dedup();
        assert_eq!(unique.len(), 8);
        let mut finished = 0;
        while finished < 8 {
            if let JobEvent::Finished { state, .. } = rx.recv().await.unwrap() {
                assert_eq!(state, JobState::Done);
                finished += 1;
            }
        }
    }
}
