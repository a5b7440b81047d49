//! `banger job …`: the long operations the daemon runs (pulls, builds, creates, starts).

use clap::Subcommand;
use serde_json::json;

use super::transport::{no_job, show, table, Transport};
use super::Output;

/// Job verbs.
#[derive(Debug, Subcommand)]
pub enum JobCommand {
    /// List running jobs.
    List,
    /// Show a running job's properties.
    Show {
        /// Job id.
        id: u32,
    },
    /// Cancel a running job (needs the authorization of what it does).
    Cancel {
        /// Job id.
        id: u32,
    },
    /// Follow a running job's stages and progress until it ends; exits non-zero if it failed.
    Watch {
        /// Job id.
        id: u32,
    },
}

/// Runs a job verb over `t`.
pub(crate) async fn run(
    out: &Output,
    t: &mut impl Transport,
    cmd: JobCommand,
) -> anyhow::Result<()> {
    match cmd {
        JobCommand::List => {
            let mut jobs = t.jobs().await?;
            for j in &mut jobs {
                let pct = (j["progress"].as_f64().unwrap_or(0.0) * 100.0).round();
                j["progress_percent"] = json!(pct);
            }
            table(
                out,
                &["ID", "KIND", "TARGET", "PROGRESS%"],
                &["id", "kind", "target", "progress_percent"],
                &jobs,
            );
        }
        JobCommand::Show { id } => show(out, &t.job(id).await?.ok_or_else(|| no_job(id))?),
        JobCommand::Cancel { id } => {
            t.cancel_job(id).await?;
            out.done(vec![("job_id", json!(id)), ("canceled", json!(true))]);
        }
        JobCommand::Watch { id } => t.watch_job(out, id).await?,
    }
    Ok(())
}
