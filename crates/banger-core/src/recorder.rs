//! The job recorder: every job's start and end written to the store, so `JobRecords` and a
//! restarted daemon know how each one ended.

use std::sync::Arc;

use crate::jobs::JobEvent;
use crate::model::now_us;
use crate::service::Banger;
use crate::store::rows;

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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::time::Instant;

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
