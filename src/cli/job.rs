//! `banger job …`: the long operations the daemon runs (pulls, builds, creates, starts).

use clap::Subcommand;
use serde_json::json;

use super::{explain, Output};
use crate::dbus::proxy::Jobs1Proxy;

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

fn path_of(id: u32) -> anyhow::Result<zbus::OwnedObjectPath> {
    Ok(zbus::OwnedObjectPath::try_from(format!(
        "/org/banger/job/{id}"
    ))?)
}

/// Runs a job verb.
pub async fn run(out: &Output, conn: &zbus::Connection, cmd: JobCommand) -> anyhow::Result<()> {
    let p = Jobs1Proxy::new(conn).await?;
    let running = |id: u32, jobs: &[(u32, String, String, f64, zbus::OwnedObjectPath)]| {
        if jobs.iter().any(|j| j.0 == id) {
            Ok(())
        } else {
            Err(anyhow::anyhow!(
                "No running job {id}; `banger job list` shows the running ones (a finished \
                 job's result is in the journal)"
            ))
        }
    };
    match cmd {
        JobCommand::List => {
            let rows = p
                .list_jobs()
                .await
                .map_err(explain)?
                .into_iter()
                .map(|(id, kind, target, progress, path)| {
                    vec![
                        json!(id),
                        json!(kind),
                        json!(target),
                        json!((progress * 100.0).round()),
                        json!(path.as_str()),
                    ]
                })
                .collect();
            out.table(
                &["ID", "KIND", "TARGET", "PROGRESS%", "OBJECT"],
                &["id", "kind", "target", "progress_percent", "path"],
                rows,
            );
        }
        JobCommand::Show { id } => {
            running(id, &p.list_jobs().await.map_err(explain)?)?;
            let path = path_of(id)?;
            // The id is the object's name, not one of Job1's properties.
            let (props, _) = super::vm::object_fields(
                conn,
                &path,
                "org.banger.Job1",
                &["Kind", "Target", "Stage", "Progress", "State", "Error"],
            )
            .await?;
            let mut fields = vec![("Id", json!(id))];
            fields.extend(props);
            fields.push(("Path", json!(path.as_str())));
            out.object(fields);
        }
        JobCommand::Cancel { id } => {
            p.cancel_job(id).await.map_err(explain)?;
            out.done(vec![("job_id", json!(id)), ("canceled", json!(true))]);
        }
        JobCommand::Watch { id } => {
            // Subscribed first, then checked: a job that ends in between is not missed.
            let watch = super::watch::subscribe(conn).await?;
            let jobs = p.list_jobs().await.map_err(explain)?;
            running(id, &jobs)?;
            if let Some((_, kind, target, ..)) = jobs.iter().find(|j| j.0 == id) {
                if !out.json {
                    eprintln!(
                        "Following job {id} ({kind} {target}); Ctrl-C stops following, not the job"
                    );
                }
            }
            watch.follow(out, id, &path_of(id)?).await?;
        }
    }
    Ok(())
}
