//! Following a job from the CLI: stage lines, a progress bar on a terminal, warnings, and the
//! result. The subscription is made before the call that starts the job, so even a job that
//! ends at once is seen.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};

use anyhow::bail;
use futures_util::StreamExt;
use serde_json::json;
use zbus::message::Type;
use zbus::{MatchRule, MessageStream, OwnedObjectPath, OwnedVariant};

use super::Output;

/// Signals from banger, subscribed before a job starts.
pub struct JobWatch(MessageStream);

/// Subscribes to every signal banger sends.
pub async fn subscribe(conn: &zbus::Connection) -> anyhow::Result<JobWatch> {
    let rule = MatchRule::builder()
        .msg_type(Type::Signal)
        .sender("org.banger")
        .build()?;
    Ok(JobWatch(
        MessageStream::for_match_rule(rule, conn, None).await?,
    ))
}

fn bar(progress: f64, stage: &str) -> String {
    let progress = if progress.is_nan() {
        0.0
    } else {
        progress.clamp(0.0, 1.0)
    };
    let filled = (progress * 30.0).round() as usize;
    format!(
        "\r[{}{}] {:>3.0}% {stage:<16}",
        "#".repeat(filled),
        ".".repeat(30 - filled),
        progress * 100.0
    )
}

impl JobWatch {
    /// Follows job `id` at `path` until it is removed; fails when the job did not succeed.
    pub async fn follow(
        mut self,
        out: &Output,
        id: u32,
        path: &OwnedObjectPath,
    ) -> anyhow::Result<()> {
        let tty = !out.json && std::io::stderr().is_terminal();
        let mut err = std::io::stderr();
        let (mut stage, mut error) = (String::new(), String::new());
        let result = loop {
            let Some(msg) = self.0.next().await else {
                bail!("The connection to the bus closed while job {id} ran")
            };
            let msg = msg?;
            let hdr = msg.header();
            let (Some(member), Some(p)) = (hdr.member(), hdr.path()) else {
                continue;
            };
            let on_job = p.as_str() == path.as_str();
            match member.as_str() {
                "StageChanged" if on_job => {
                    let (s, text): (String, String) = msg.body().deserialize()?;
                    stage = s;
                    if !out.json {
                        let _ = write!(err, "{}", if tty { "\r\x1b[K" } else { "" });
                        let _ = writeln!(err, "==> {text}");
                    }
                }
                "LogMessage" if on_job => {
                    let (prio, line): (u32, String) = msg.body().deserialize()?;
                    if prio <= 4 && !out.json {
                        let _ =
                            writeln!(err, "{}warning: {line}", if tty { "\r\x1b[K" } else { "" });
                    }
                }
                "PropertiesChanged" if on_job => {
                    let (_, changed, _): (String, HashMap<String, OwnedVariant>, Vec<String>) =
                        msg.body().deserialize()?;
                    if let Some(e) = changed
                        .get("Error")
                        .and_then(|v| String::try_from(v.clone()).ok())
                    {
                        error = e;
                    }
                    if let Some(p) = changed
                        .get("Progress")
                        .and_then(|v| f64::try_from(v.clone()).ok())
                    {
                        if tty {
                            let _ = write!(err, "{}", bar(p, &stage));
                            let _ = err.flush();
                        }
                    }
                }
                "JobRemoved" => {
                    let (rid, _, result): (u32, OwnedObjectPath, String) =
                        msg.body().deserialize()?;
                    if rid == id {
                        break result;
                    }
                }
                _ => {}
            }
        };
        if tty {
            let _ = writeln!(err, "\r\x1b[K");
        }
        if out.json {
            out.object(vec![
                ("job_id", json!(id)),
                ("result", json!(result)),
                ("error", json!(error)),
            ]);
        }
        match result.as_str() {
            "done" => Ok(()),
            "canceled" => bail!("Job {id} was canceled"),
            _ if error.is_empty() => bail!("Job {id} failed"),
            _ => bail!("{error}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bar_fills_with_progress() {
        assert!(bar(0.5, "fetch").contains("[###############...............]  50% fetch"));
        assert!(bar(2.0, "x").contains("100%"));
    }
}
