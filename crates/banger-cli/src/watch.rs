//! Following a job from the CLI: stage lines, a progress bar on a terminal, warnings, and the
//! result. The subscription is made before the call that starts the job, so even a job that
//! ends at once is seen.

use std::collections::HashMap;
use std::io::IsTerminal;

use anyhow::bail;
use futures_util::StreamExt;
use serde_json::json;
use zbus::message::Type;
use zbus::{MatchRule, MessageStream, OwnedObjectPath, OwnedVariant};

use super::Output;

/// Signals from banger, subscribed before a job starts.
pub struct JobWatch(MessageStream, Interrupt);

/// Ctrl-C, taken from the moment the watch exists: a SIGINT between the first line the watch
/// prints and its first wait must stop following, not kill the client unexplained.
struct Interrupt(Option<tokio::signal::unix::Signal>);

impl Interrupt {
    fn new() -> Interrupt {
        Interrupt(tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).ok())
    }

    async fn recv(&mut self) {
        match self.0.as_mut() {
            Some(s) => {
                s.recv().await;
            }
            None => std::future::pending().await,
        }
    }
}

/// Signals a watch keeps before its reader takes them.
const WATCH_QUEUE: std::num::NonZeroUsize = std::num::NonZeroUsize::new(65536).unwrap();

/// Subscribes to every signal banger sends.
pub async fn subscribe(conn: &zbus::Connection) -> anyhow::Result<JobWatch> {
    let rule = MatchRule::builder()
        .msg_type(Type::Signal)
        .sender("org.banger")
        .build()?;
    let interrupt = Interrupt::new();
    Ok(JobWatch(
        // Room for every signal of several VMs' creations while the caller still makes
        // calls: a full queue drops the oldest, which may be a JobRemoved waited for.
        MessageStream::for_match_rule(rule, conn, Some(WATCH_QUEUE)).await?,
        interrupt,
    ))
}

/// The progress bar on a terminal (indicatif, drawn on stderr): stage lines and warnings
/// are printed above it.
fn progress_bar() -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::with_draw_target(
        Some(1000),
        indicatif::ProgressDrawTarget::stderr(),
    );
    if let Ok(style) = indicatif::ProgressStyle::with_template("[{bar:30}] {percent:>3}% {msg}") {
        pb.set_style(style.progress_chars("#>."));
    }
    pb
}

/// Progress (0..=1, NaN as 0) as the bar's position out of 1000.
fn position(progress: f64) -> u64 {
    let p = if progress.is_nan() {
        0.0
    } else {
        progress.clamp(0.0, 1.0)
    };
    (p * 1000.0).round() as u64
}

/// Ctrl-C while a job is followed: the job goes on in the daemon (it is the daemon's, not
/// this client's), so say so and how to follow or cancel it, and end as interrupted (130).
pub fn interrupted(ids: &[u64]) -> ! {
    let list: Vec<String> = ids.iter().map(u64::to_string).collect();
    let (jobs, first) = match list.as_slice() {
        [] => ("The job".to_owned(), "ID".to_owned()),
        [one] => (format!("Job {one}"), one.clone()),
        more => (format!("Jobs {}", more.join(", ")), more[0].clone()),
    };
    eprintln!(
        "\n{jobs} still running in bangerd: Ctrl-C stopped following, not the work. \
         `banger job watch {first}` follows it again, `banger job cancel {first}` stops it."
    );
    std::process::exit(130)
}

impl JobWatch {
    /// Follows job `id` at `path` until it is removed; fails when the job did not succeed.
    /// Ctrl-C stops following and says how to go on ([`interrupted`]).
    pub async fn follow(
        mut self,
        out: &Output,
        id: u32,
        path: &OwnedObjectPath,
    ) -> anyhow::Result<()> {
        let mut interrupt = std::mem::replace(&mut self.1, Interrupt(None));
        tokio::select! {
            r = self.follow_job(out, id, path) => r,
            _ = interrupt.recv() => interrupted(&[id.into()]),
        }
    }

    async fn follow_job(
        mut self,
        out: &Output,
        id: u32,
        path: &OwnedObjectPath,
    ) -> anyhow::Result<()> {
        let tty = !out.json && std::io::stderr().is_terminal();
        let bar = tty.then(progress_bar);
        // A line above the bar (or plain on stderr without one).
        let say = |line: String| match &bar {
            Some(b) => b.println(line),
            None => eprintln!("{line}"),
        };
        let mut error = String::new();
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
                    let (stage, text): (String, String) = msg.body().deserialize()?;
                    if let Some(b) = &bar {
                        b.set_message(stage);
                    }
                    if !out.json {
                        say(format!("==> {text}"));
                    }
                }
                "LogMessage" if on_job => {
                    let (prio, line): (u32, String) = msg.body().deserialize()?;
                    if prio <= 4 && !out.json {
                        say(format!("warning: {line}"));
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
                        if let Some(b) = &bar {
                            b.set_position(position(p));
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
        if let Some(b) = &bar {
            b.finish_and_clear();
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

    /// Follows several jobs at once (`(id, path, label)`), each stage line prefixed with its
    /// label, until all are removed; fails naming every job that did not succeed.
    pub async fn follow_all(
        mut self,
        out: &Output,
        jobs: &[(u32, OwnedObjectPath, String)],
    ) -> anyhow::Result<()> {
        let ids: Vec<u64> = jobs.iter().map(|(id, _, _)| u64::from(*id)).collect();
        let mut interrupt = std::mem::replace(&mut self.1, Interrupt(None));
        tokio::select! {
            r = self.follow_jobs(out, jobs) => r,
            _ = interrupt.recv() => interrupted(&ids),
        }
    }

    async fn follow_jobs(
        mut self,
        out: &Output,
        jobs: &[(u32, OwnedObjectPath, String)],
    ) -> anyhow::Result<()> {
        let mut left: HashMap<u32, &str> =
            jobs.iter().map(|(id, _, l)| (*id, l.as_str())).collect();
        let mut errors: HashMap<u32, String> = HashMap::new();
        let mut failed = Vec::new();
        while !left.is_empty() {
            let Some(msg) = self.0.next().await else {
                bail!("The connection to the bus closed while the jobs ran")
            };
            let msg = msg?;
            let hdr = msg.header();
            let (Some(member), Some(p)) = (hdr.member(), hdr.path()) else {
                continue;
            };
            let job = jobs.iter().find(|(_, jp, _)| jp.as_str() == p.as_str());
            match (member.as_str(), job) {
                ("StageChanged", Some((_, _, label))) if !out.json => {
                    let (_, text): (String, String) = msg.body().deserialize()?;
                    eprintln!("==> {label}: {text}");
                }
                ("PropertiesChanged", Some((id, _, _))) => {
                    let (_, changed, _): (String, HashMap<String, OwnedVariant>, Vec<String>) =
                        msg.body().deserialize()?;
                    if let Some(e) = changed
                        .get("Error")
                        .and_then(|v| String::try_from(v.clone()).ok())
                    {
                        errors.insert(*id, e);
                    }
                }
                ("JobRemoved", _) => {
                    let (rid, _, result): (u32, OwnedObjectPath, String) =
                        msg.body().deserialize()?;
                    if let Some(label) = left.remove(&rid) {
                        if result != "done" {
                            let e = errors.remove(&rid).unwrap_or_else(|| result.clone());
                            failed.push(format!("{label}: {e}"));
                        }
                    }
                }
                _ => {}
            }
        }
        if !failed.is_empty() {
            bail!("{}", failed.join("; "));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_maps_onto_the_bar() {
        assert_eq!(position(0.5), 500);
        assert_eq!(position(2.0), 1000);
        assert_eq!(position(f64::NAN), 0);
    }
}
