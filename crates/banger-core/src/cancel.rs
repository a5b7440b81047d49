//! What a piece of a job's work sees of its job: whether it was canceled. At the bottom of
//! the map (docs/ARCHITECTURE.md), so the helpers that loop over data or run programs
//! (`host`, `ext4`, `callerfile`, `shelf`) look here and never at `jobs`, which sets it.

use std::sync::Arc;

use tokio::sync::watch;

/// What a job's blocking work sees of its job: whether it was canceled. While blocking work
/// of a job runs, a cancel waits for it to end before the job's task (and the staging
/// directories it holds) is dropped, so nothing writes into a directory after its removal.
#[derive(Clone)]
pub struct JobToken {
    cancel: watch::Receiver<bool>,
    busy: Arc<watch::Sender<u32>>,
}

impl JobToken {
    /// A job's token: `cancel` turns true when the job is canceled, `busy` counts its blocking
    /// work (the job waits for it to reach 0 before it drops its work).
    pub fn new(cancel: watch::Receiver<bool>, busy: Arc<watch::Sender<u32>>) -> Self {
        JobToken { cancel, busy }
    }

    /// Whether a cancel was asked for.
    pub fn is_canceled(&self) -> bool {
        *self.cancel.borrow()
    }
}

tokio::task_local! {
    static CURRENT: JobToken;
}

thread_local! {
    static BLOCKING: std::cell::RefCell<Option<JobToken>> = const { std::cell::RefCell::new(None) };
}

/// The job whose blocking work runs on this thread, if any (see [`spawn_blocking`]).
pub fn current_blocking() -> Option<JobToken> {
    BLOCKING.with(|b| b.borrow().clone())
}

/// Between chunks of a long copy in a job's blocking work: an error once the job is canceled
/// (outside a job, always fine). Programs are killed by [`crate::host::output`]; loops of
/// banger's own look here.
pub fn check_canceled() -> std::io::Result<()> {
    match current_blocking() {
        Some(t) if t.is_canceled() => Err(std::io::Error::other("the job was canceled")),
        _ => Ok(()),
    }
}

/// Counts a piece of blocking work of a job for as long as it runs.
struct Busy(Arc<watch::Sender<u32>>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// Resets this thread's job when a piece of blocking work ends, even by a panic.
struct Entered;

impl Drop for Entered {
    fn drop(&mut self) {
        BLOCKING.with(|b| *b.borrow_mut() = None);
    }
}

/// `tokio::task::spawn_blocking` for a job's work: the closure runs knowing its job, so the
/// programs it runs through [`crate::host`] are killed when the job is canceled, and a
/// canceled job ends only after the closure has returned. Outside a job, plain
/// `spawn_blocking`. Like it, the closure starts at once, not when the handle is awaited
/// (work that feeds it, or that it feeds, runs meanwhile).
pub fn spawn_blocking<T, F>(f: F) -> tokio::task::JoinHandle<T>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let token = CURRENT.try_with(|t| t.clone()).ok();
    let busy = token.as_ref().map(|t| {
        t.busy.send_modify(|n| *n += 1);
        Busy(t.busy.clone())
    });
    tokio::task::spawn_blocking(move || {
        let _busy = busy;
        BLOCKING.with(|b| *b.borrow_mut() = token);
        let _entered = Entered;
        f()
    })
}

/// Runs `work` as the job `token` belongs to: what it starts with [`spawn_blocking`] knows the
/// job.
pub async fn scope<F: std::future::Future>(token: JobToken, work: F) -> F::Output {
    CURRENT.scope(token, work).await
}
