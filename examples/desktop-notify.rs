//! Desktop notifications for banger: listens to the service on the system bus and shows a
//! notification through `org.freedesktop.Notifications` on the session bus when a job ends
//! (done, failed with its error, canceled) and when a VM stops without being asked to (its
//! guest powered off, its VMM ended, its main process exited). A requested stop says
//! nothing: the user knows.
//!
//! Run it in a desktop session (or as a user service):
//! `cargo run --example desktop-notify`. It prints `ready` once it listens.

use std::collections::HashMap;

use banger::dbus::proxy::{Jobs1Proxy, VM1Proxy, VMs1Proxy};
use futures_util::StreamExt;
use zbus::{OwnedObjectPath, OwnedVariant as OwnedValue, Variant as Value};

/// The notification server's `Notify`.
#[zbus::proxy(
    interface = "org.freedesktop.Notifications",
    default_service = "org.freedesktop.Notifications",
    default_path = "/org/freedesktop/Notifications"
)]
trait Notifications {
    #[allow(clippy::too_many_arguments)]
    fn notify(
        &self,
        app_name: &str,
        replaces_id: u32,
        app_icon: &str,
        summary: &str,
        body: &str,
        actions: &[&str],
        hints: HashMap<&str, Value<'_>>,
        expire_timeout: i32,
    ) -> zbus::Result<u32>;
}

/// What is known of a job by its object path: kind, target, error.
#[derive(Default, Clone)]
struct JobInfo {
    kind: String,
    target: String,
    error: String,
}

fn text(v: Option<&Value<'_>>) -> String {
    v.and_then(|v| <&str>::try_from(v).ok())
        .unwrap_or_default()
        .to_owned()
}

/// Notifications' urgency hint: 1 normal, 2 critical.
async fn show(n: &NotificationsProxy<'_>, summary: &str, body: &str, urgency: u8) {
    let hints = HashMap::from([
        ("urgency", Value::U8(urgency)),
        ("desktop-entry", Value::from("banger")),
    ]);
    if let Err(e) = n
        .notify("banger", 0, "computer", summary, body, &[], hints, -1)
        .await
    {
        eprintln!("desktop-notify: cannot show {summary:?}: {e}");
    }
}

#[tokio::main]
async fn main() -> zbus::Result<()> {
    let system = zbus::Connection::system().await?;
    let session = zbus::Connection::session().await?;
    let notifications = NotificationsProxy::new(&session).await?;
    let jobs = Jobs1Proxy::new(&system).await?;
    let vms = VMs1Proxy::new(&system).await?;
    let manager = zbus::fdo::ObjectManagerProxy::builder(&system)
        .destination("org.banger")
        .path("/org/banger")
        .build()
        .await?;
    // Every subscription is in place before `ready`: nothing that happens after is missed.
    let mut added = manager.receive_interfaces_added().await?;
    let mut removed = jobs.receive_job_removed().await?;
    let mut stopped = vms.receive_vm_stopped().await?;
    let job_changes = zbus::MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .sender("org.banger")
        .interface("org.freedesktop.DBus.Properties")
        .member("PropertiesChanged")
        .path_namespace("/org/banger/job")
        .arg(0, "org.banger.Job1")
        .build()?;
    let mut changes = zbus::MessageStream::for_match_rule(job_changes, &system, None).await?;
    let mut known: HashMap<OwnedObjectPath, JobInfo> = HashMap::new();
    println!("ready");
    loop {
        tokio::select! {
            // In the order the bus delivered them: a job's Error comes (PropertiesChanged)
            // before its JobRemoved, and each is queued on its own stream as it arrives, so
            // the streams are polled in that order rather than at random (which showed a
            // failure with an empty body now and then).
            biased;
            Some(a) = added.next() => {
                let Ok(a) = a.args() else { continue };
                if let Some(props) = a.interfaces_and_properties().get("org.banger.Job1") {
                    known.insert(a.object_path().to_owned().into(), JobInfo {
                        kind: text(props.get("Kind")),
                        target: text(props.get("Target")),
                        error: String::new(),
                    });
                }
            }
            Some(Ok(m)) = changes.next() => {
                let Some(path) = m.header().path().map(|p| OwnedObjectPath::from(p.to_owned())) else {
                    continue;
                };
                let Ok((_, props, _)) = m
                    .body()
                    .deserialize::<(String, HashMap<String, OwnedValue>, Vec<String>)>()
                else {
                    continue;
                };
                if let Some(e) = props.get("Error") {
                    known.entry(path).or_default().error = text(Some(e));
                }
            }
            Some(r) = removed.next() => {
                let Ok(r) = r.args() else { continue };
                let info = known.remove(&r.path).unwrap_or_default();
                // The service's own upkeep (a warm snapshot made for later starts) says nothing.
                if info.kind == "warm-image" {
                    continue;
                }
                let what = match (info.kind.as_str(), info.target.as_str()) {
                    ("", _) => format!("Job {}", r.id),
                    (k, "") => k.to_owned(),
                    (k, t) => format!("{k} {t}"),
                };
                match r.result.as_str() {
                    "failed" => show(&notifications, &format!("{what} failed"), &info.error, 2).await,
                    result => show(&notifications, &format!("{what} {result}"), "", 1).await,
                }
            }
            Some(s) = stopped.next() => {
                let Ok(s) = s.args() else { continue };
                let why = match s.reason.as_str() {
                    "requested" => continue,
                    "exited" => format!("Its main process exited with status {}", s.exit_status),
                    _ => "The guest powered off, or its VMM ended, without a stop".to_owned(),
                };
                let name = match VM1Proxy::builder(&system).path(s.path.clone()).build().await {
                    Ok(vm) => vm.name().await.unwrap_or_else(|_| s.id.clone()),
                    Err(_) => s.id.clone(),
                };
                show(&notifications, &format!("VM {name} stopped"), &why, 2).await;
            }
            else => return Ok(()),
        }
    }
}
