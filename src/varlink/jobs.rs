//! `io.banger.Jobs`: the operations of `org.banger.Jobs1`, and `Watch`, the Varlink form of
//! a job's signals.

use serde_json::{json, Value};

use super::{job_only, job_view, no_method, Answer, Ctx, Fail, Params};
use crate::auth::Caller;
use crate::jobs::JobState;

/// The interface's name.
pub const INTERFACE: &str = "io.banger.Jobs";

/// Its description.
pub const DESCRIPTION: &str = concat!(
    r#"# banger's long operations (pulls, builds, creates, snapshots): the operations of
# org.banger.Jobs1 on D-Bus. Reads are open to everyone; Cancel asks polkit for what the job
# does (and org.banger.vms.manage-any for another user's VM job).
interface io.banger.Jobs

"#,
    job_types!(),
    r#"
# The running jobs.
method List() -> (jobs: []Job)

# Cancels a running job.
method Cancel(id: int) -> ()

# The job as it is now; with "more", one reply for each of its stages, progress steps and
# log lines, and the last when it ends (or its error, when it failed).
method Watch(id: int) -> (job: Job, log: ?LogLine)

"#,
    errors!()
);

pub(super) async fn call(
    ctx: &Ctx,
    caller: &Caller,
    method: &str,
    mut p: Params,
) -> Result<Answer, Fail> {
    let b = &ctx.banger;
    match method {
        "List" => {
            p.finish()?;
            let jobs: Vec<Value> = b.jobs.list().iter().map(|j| job_view(j, None)).collect();
            Ok(Answer::One(json!({ "jobs": jobs })))
        }
        "Cancel" => {
            let id: u32 = p.req("id")?;
            p.finish()?;
            ctx.perform(caller, crate::ops::cancel_job(b, caller, id))
                .await?;
            Ok(Answer::One(json!({})))
        }
        "Watch" => {
            let id: u32 = p.req("id")?;
            p.finish()?;
            let events = b.jobs.subscribe();
            let job = b.jobs.get(id)?;
            let first = json!({ "job": job_view(&job, None) });
            if job.status().state != JobState::Running {
                return Ok(Answer::One(first));
            }
            Ok(Answer::Job {
                first,
                job,
                events,
                render: job_only(),
            })
        }
        m => Err(no_method(INTERFACE, m)),
    }
}
