//! Jobs over the real bus: the service is served in-process on a private system bus (with
//! the real polkitd) so the test can start jobs whose work it controls, then watches the
//! signals and objects a client sees.

mod common;

use std::sync::Arc;
use std::time::Duration;

use banger::auth::{Action, Polkit};
use banger::daemon::{prepare, DaemonOptions};
use banger::jobs::JobSpec;
use banger::recorder::record_jobs;
use banger::service::Banger;
use common::*;
use futures_util::StreamExt;
use tokio::sync::oneshot;
use zbus::message::Type;
use zbus::{MatchRule, MessageStream};

const TOOLS: &[&str] = &["dbus-daemon", "gdbus", "unshare", "runuser", "useradd"];

/// Signal member and body as text, for comparison.
async fn next_signal(stream: &mut MessageStream) -> (String, String) {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(30), stream.next())
            .await
            .expect("a signal within 30 s")
            .unwrap()
            .unwrap();
        let hdr = m.header();
        let member = hdr.member().unwrap().to_string();
        if matches!(
            member.as_str(),
            "JobNew" | "JobRemoved" | "StageChanged" | "LogMessage"
        ) {
            let body = m.body();
            let text = match member.as_str() {
                "JobNew" => format!(
                    "{:?}",
                    body.deserialize::<(u32, zbus::OwnedObjectPath)>().unwrap()
                ),
                "JobRemoved" => {
                    format!(
                        "{:?}",
                        body.deserialize::<(u32, zbus::OwnedObjectPath, String)>()
                            .unwrap()
                    )
                }
                "StageChanged" => format!("{:?}", body.deserialize::<(String, String)>().unwrap()),
                _ => format!("{:?}", body.deserialize::<(u32, String)>().unwrap()),
            };
            return (member, text);
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn jobs_emit_their_signals_in_order_and_cancel_is_authorised() {
    if !available(TOOLS) {
        return;
    }
    let bus = TestBus::start(BusOptions {
        activate_bangerd: false,
        ..Default::default()
    });
    let d = bus.dir.path();
    let opts = DaemonOptions {
        state_dir: d.join("state"),
        runtime_dir: d.join("run"),
        config: d.join("config.toml"),
        config_required: true,
    };
    let (config, layout, store) = prepare(&opts).unwrap();
    let banger = Banger::new(config, layout, store.clone()).unwrap();
    let service = bus.connect().await;
    banger::dbus::serve(
        &service,
        banger.clone(),
        Arc::new(Polkit::new(service.clone())),
    )
    .await
    .unwrap();
    record_jobs(&banger);
    service.request_name("org.banger").await.unwrap();

    let client = bus.connect().await;
    let rule = MatchRule::builder()
        .msg_type(Type::Signal)
        .sender("org.banger")
        .build()
        .unwrap();
    let mut signals =
        MessageStream::for_match_rule(rule, &client, std::num::NonZeroUsize::new(256))
            .await
            .unwrap();

    // A job that pauses on a gate after its first stage.
    let (gate_tx, gate_rx) = oneshot::channel::<()>();
    let spec = |target: &str| JobSpec {
        kind: "test".into(),
        target: target.into(),
        action: Action::ImagesManage,
        owner_uid: 0,
    };
    let job = banger.jobs.spawn(spec("gated"), |ctx| async move {
        ctx.stage("one", "First stage");
        ctx.log(6, "a log line");
        ctx.progress(0.25);
        let _ = gate_rx.await;
        ctx.stage("two", "Second stage");
        Ok(())
    });
    let path = format!("/org/banger/job/{}", job.id);
    assert_eq!(next_signal(&mut signals).await.0, "JobNew");
    assert_eq!(
        next_signal(&mut signals).await,
        ("StageChanged".into(), "(\"one\", \"First stage\")".into())
    );
    assert_eq!(
        next_signal(&mut signals).await,
        ("LogMessage".into(), "(6, \"a log line\")".into())
    );

    // While it waits: the object is on the bus with live properties and the contract's shape.
    assert_interface_matches_file(&client, &path, "org.banger.Job1").await;
    let proxy = banger::dbus::proxy::Job1Proxy::builder(&client)
        .path(path.as_str())
        .build()
        .await
        .unwrap();
    assert_eq!(proxy.stage().await.unwrap(), "one");
    assert_eq!(proxy.state().await.unwrap(), "running");
    assert_eq!(proxy.progress().await.unwrap(), 0.25);
    let jobs = banger::dbus::proxy::Jobs1Proxy::new(&client).await.unwrap();
    let listed = jobs.list_jobs().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0].0, listed[0].1.as_str(), listed[0].2.as_str()),
        (job.id, "test", "gated")
    );
    // The CLI covers the same: job list, job show, and job watch, which follows the job to
    // its end (ready once it says so on stderr).
    let json_of = |args: &[&str]| -> serde_json::Value {
        let out = bus.banger_as(None, args);
        serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", text(&out)))
    };
    let id = job.id.to_string();
    assert_eq!(json_of(&["--json", "job", "list"])[0]["target"], "gated");
    let shown = json_of(&["--json", "job", "show", &id]);
    assert_eq!(
        (shown["stage"].as_str(), shown["progress"].as_f64()),
        (Some("one"), Some(0.25)),
        "{shown}"
    );
    let mut watcher = bus
        .banger_command(None, &["job", "watch", &id])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut watch_err = std::io::BufReader::new(watcher.stderr.take().unwrap());
    let mut first = String::new();
    std::io::BufRead::read_line(&mut watch_err, &mut first).unwrap();
    assert!(
        first.starts_with(&format!("Following job {id} (test gated)")),
        "{first}"
    );
    // Ctrl-C stops following, not the job, and says how to go on (it once exited silently).
    {
        let mut second = bus
            .banger_command(None, &["job", "watch", &id])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut err = std::io::BufReader::new(second.stderr.take().unwrap());
        let mut line = String::new();
        std::io::BufRead::read_line(&mut err, &mut line).unwrap();
        assert!(line.starts_with("Following job"), "{line}");
        // SAFETY: kill takes no pointers (timeout passes SIGINT on to banger).
        unsafe { libc::kill(second.id() as i32, libc::SIGINT) };
        let mut said = String::new();
        std::io::Read::read_to_string(&mut err, &mut said).unwrap();
        let status = second.wait().unwrap();
        assert_eq!(status.code(), Some(130), "{said}");
        assert!(
            said.contains(&format!("Job {id} still running"))
                && said.contains(&format!("banger job watch {id}"))
                && said.contains(&format!("banger job cancel {id}")),
            "{said}"
        );
        let out = bus.banger_as(None, &["job", "show", &id]);
        assert!(
            out.status.success(),
            "the job went with Ctrl-C: {}",
            text(&out)
        );
    }
    let out = bus.banger_as(None, &["job", "show", "999999"]);
    assert!(
        text(&out).contains("No running job 999999"),
        "{}",
        text(&out)
    );

    // A stranger may not cancel it, by either method.
    let out = text(&bus.gdbus_as(
        Some(USER_NO),
        true,
        "/org/banger",
        "org.banger.Jobs1.CancelJob",
        &[&id],
    ));
    assert!(
        out.contains("GDBus.Error:org.freedesktop.DBus.Error.AccessDenied:"),
        "{out}"
    );
    let out = text(&bus.gdbus_as(Some(USER_NO), true, &path, "org.banger.Job1.Cancel", &[]));
    assert!(
        out.contains("GDBus.Error:org.freedesktop.DBus.Error.AccessDenied:"),
        "{out}"
    );

    gate_tx.send(()).unwrap();
    assert_eq!(
        next_signal(&mut signals).await,
        ("StageChanged".into(), "(\"two\", \"Second stage\")".into())
    );
    let (member, body) = next_signal(&mut signals).await;
    assert_eq!(member, "JobRemoved");
    assert_eq!(
        body,
        format!(
            "({}, OwnedObjectPath(ObjectPath(\"{path}\")), \"done\")",
            job.id
        )
    );
    let status = watcher.wait().unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut watch_err, &mut rest).unwrap();
    assert!(status.success(), "{rest}");
    assert!(rest.contains("==> Second stage"), "{rest}");

    // A member of the banger group cancels a job that would never end.
    let stuck = banger.jobs.spawn(spec("stuck"), |_| std::future::pending());
    let stuck_path = format!("/org/banger/job/{}", stuck.id);
    assert_eq!(next_signal(&mut signals).await.0, "JobNew");
    // The object exists as soon as JobNew is out; the CLI cancels it.
    let out = bus.banger_as(Some(USER_OK), &["job", "cancel", &stuck.id.to_string()]);
    assert!(out.status.success(), "{}", text(&out));
    let (member, body) = next_signal(&mut signals).await;
    assert_eq!(member, "JobRemoved");
    assert!(body.ends_with("\"canceled\")"), "{body}");
    // The object is gone once the job is.
    let gone = bus.busctl_as(None, &["introspect", "org.banger", &stuck_path]);
    assert!(!text(&gone).contains("org.banger.Job1"), "{}", text(&gone));

    // Both ends are recorded (by the recorder, after the signals), and ids continue after a
    // restart of the runner.
    let rec = |id: u32| {
        store
            .call_blocking(move |c| banger::store::rows::find_job(c, id))
            .unwrap()
            .map(|r| r.state)
            .unwrap_or_default()
    };
    wait_until("both jobs' ends recorded", Duration::from_secs(10), || {
        rec(job.id) == "done" && rec(stuck.id) == "canceled"
    });
    let again = Banger::new(banger.config.clone(), banger.layout.clone(), store.clone()).unwrap();
    let next = again.jobs.spawn(spec("after"), |_| async { Ok(()) });
    assert!(next.id > stuck.id);
}
