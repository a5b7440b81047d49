//! One booted VM shared by many named tests. A file's scenario boots once (TCG boot time is
//! paid once), then runs its behaviours in order, each through [`Steps::run`]; each
//! behaviour is a test of its own in the harness's report (libtest-mimic, the file has
//! `harness = false`), so the first failure no longer hides the rest: a failed step is
//! reported and the scenario goes on to the next. A step the scenario never reached (its
//! setup failed) fails naming why.
//!
//! The scenario runs on a thread of its own, which takes one of the harness's test threads:
//! the other tests run beside it as before, and each step's trial (listed after them) waits
//! for that step's outcome.

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Condvar, Mutex};

use futures_util::FutureExt;
use libtest_mimic::{Arguments, Failed, Trial};

/// What became of each step so far, and whether the scenario has ended (and how).
#[derive(Default)]
struct Outcomes {
    steps: HashMap<&'static str, Result<(), String>>,
    /// `Some(None)`: the scenario returned; `Some(Some(why))`: it panicked outside a step.
    ended: Option<Option<String>>,
}

/// The outcomes of a scenario's steps, shared between the scenario's thread and the trials.
#[derive(Clone, Default)]
pub struct Steps {
    state: Arc<(Mutex<Outcomes>, Condvar)>,
    names: Arc<Vec<&'static str>>,
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panicked".into())
}

impl Steps {
    /// Runs step `name` (one of the names the scenario was declared with): a panic in it is
    /// that step's failure, and the scenario goes on.
    pub async fn run(&self, name: &'static str, f: impl Future<Output = ()>) {
        assert!(
            self.names.contains(&name),
            "step {name} is not among the declared steps"
        );
        eprintln!("scenario: step {name}");
        let r = AssertUnwindSafe(f)
            .catch_unwind()
            .await
            .map_err(panic_message);
        if let Err(e) = &r {
            eprintln!("scenario: step {name} FAILED: {e}");
        }
        let (lock, cv) = &*self.state;
        lock.lock().unwrap().steps.insert(name, r);
        cv.notify_all();
    }

    fn end(&self, why: Option<String>) {
        let (lock, cv) = &*self.state;
        lock.lock().unwrap().ended = Some(why);
        cv.notify_all();
    }

    /// Waits for step `name`'s outcome.
    fn wait(&self, name: &'static str) -> Result<(), Failed> {
        let (lock, cv) = &*self.state;
        let mut o = lock.lock().unwrap();
        loop {
            if let Some(r) = o.steps.get(name) {
                return r.clone().map_err(Failed::from);
            }
            match &o.ended {
                // A scenario that returned before any step skipped (tools missing, and
                // BANGER_REQUIRE_INTEGRATION unset): so do its steps.
                Some(None) if o.steps.is_empty() => return Ok(()),
                Some(None) => {
                    return Err(Failed::from(format!(
                        "the scenario ended without reaching step {name}"
                    )))
                }
                Some(Some(why)) => {
                    return Err(Failed::from(format!(
                        "the scenario stopped before step {name}: {why}"
                    )))
                }
                None => o = cv.wait(o).unwrap(),
            }
        }
    }
}

/// Whether the harness's arguments select the test named `name` (as libtest-mimic filters).
fn selected(args: &Arguments, name: &str) -> bool {
    let hit = |f: &str| {
        if args.exact {
            name == f
        } else {
            name.contains(f)
        }
    };
    args.filter.as_deref().is_none_or(hit) && !args.skip.iter().any(|s| hit(s))
}

/// The trials of scenario `scenario` with steps `names`, run by `body` on a thread of its
/// own with a multi-threaded runtime, and only if one of the steps is selected; that thread
/// is one of the `--test-threads` (by default one a core). Put them after the other trials.
pub fn trials<F, Fut>(
    args: &mut Arguments,
    scenario: &str,
    names: &[&'static str],
    body: F,
) -> (Vec<Trial>, Option<std::thread::JoinHandle<()>>)
where
    F: FnOnce(Steps) -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    let steps = Steps {
        names: Arc::new(names.to_vec()),
        ..Default::default()
    };
    let full = |n: &str| format!("{scenario}::{n}");
    let wanted = !args.list && names.iter().any(|n| selected(args, &full(n)));
    if wanted {
        let threads = args
            .test_threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        args.test_threads = Some(threads.saturating_sub(1).max(1));
    }
    let runner = wanted.then(|| {
        let s = steps.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .unwrap();
            let r = std::panic::catch_unwind(AssertUnwindSafe(|| rt.block_on(body(s.clone()))));
            s.end(r.err().map(panic_message));
        })
    });
    let trials = names
        .iter()
        .map(|&n| {
            let s = steps.clone();
            Trial::test(full(n), move || s.wait(n))
        })
        .collect();
    (trials, runner)
}

/// A test run on a multi-threaded runtime of its own, as `#[tokio::test(flavor =
/// "multi_thread")]` runs it.
pub fn async_trial<Fut>(name: &str, f: fn() -> Fut) -> Trial
where
    Fut: Future<Output = ()> + 'static,
{
    Trial::test(name, move || {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f());
        Ok(())
    })
}
