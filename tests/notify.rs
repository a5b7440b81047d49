//! The desktop integration (issue 32, item 6): `examples/desktop-notify.rs` listens to the
//! real service on its bus and shows notifications through `org.freedesktop.Notifications` on
//! a session bus of the test's own, where a recording server stands in for the desktop's
//! (same interface, same calls). Jobs that end say so (a failure with its error, critical); a
//! VM that stops without being asked to (its VMM killed) says so; a requested stop says
//! nothing.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::vm::*;
use common::*;

/// One `Notify` call: summary, body, urgency.
type Shown = (String, String, u8);

/// The session bus's notification server, recording what it is asked to show.
struct Recorder {
    shown: tokio::sync::mpsc::UnboundedSender<Shown>,
    next: u32,
}

#[zbus::interface(name = "org.freedesktop.Notifications")]
impl Recorder {
    #[allow(clippy::too_many_arguments)]
    async fn notify(
        &mut self,
        _app_name: String,
        _replaces_id: u32,
        _app_icon: String,
        summary: String,
        body: String,
        _actions: Vec<String>,
        hints: HashMap<String, zbus::OwnedVariant>,
        _expire_timeout: i32,
    ) -> u32 {
        let urgency = hints
            .get("urgency")
            .and_then(|v| u8::try_from(v).ok())
            .unwrap_or(1);
        let _ = self.shown.send((summary, body, urgency));
        self.next += 1;
        self.next
    }

    fn get_capabilities(&self) -> Vec<String> {
        vec!["body".into()]
    }

    fn get_server_information(&self) -> (String, String, String, String) {
        (
            "recorder".into(),
            "banger tests".into(),
            "1".into(),
            "1.2".into(),
        )
    }
}

/// Waits for the next notification whose summary contains `needle`, returning it and every
/// other one shown before it.
async fn shown(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<Shown>,
    needle: &str,
) -> (Shown, Vec<Shown>) {
    let mut before = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(600), rx.recv()).await {
            Ok(Some(s)) if s.0.contains(needle) => return (s, before),
            Ok(Some(s)) => before.push(s),
            _ => panic!("no notification {needle:?}; shown: {before:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn jobs_that_end_and_vms_that_stop_unasked_become_desktop_notifications() {
    let Some((bus, reference, _keep)) = image_bus("", "test/notify").await else {
        return;
    };
    if !available(&["dbus-daemon"]) {
        return;
    }
    // A session bus of the test's own, with the recording notification server on it.
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("session.sock");
    std::fs::write(
        dir.path().join("session.conf"),
        format!(
            r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"#,
            sock.display()
        ),
    )
    .unwrap();
    let mut session = Command::new("dbus-daemon")
        .arg(format!(
            "--config-file={}",
            dir.path().join("session.conf").display()
        ))
        .args(["--nofork", "--print-address=1"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut address = String::new();
    std::io::BufReader::new(session.stdout.take().unwrap())
        .read_line(&mut address)
        .unwrap();
    let address = address.trim().to_owned();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let _server = zbus::connection::Builder::address(address.as_str())
        .name("org.freedesktop.Notifications")
        .serve_at(
            "/org/freedesktop/Notifications",
            Recorder { shown: tx, next: 0 },
        )
        .build()
        .await
        .unwrap();

    // The example, as a desktop session would run it.
    let example = std::path::Path::new(env!("CARGO_BIN_EXE_banger"))
        .parent()
        .unwrap()
        .join("examples/desktop-notify");
    if !example.exists() {
        let built = Command::new("cargo")
            .args(["build", "--quiet", "--example", "desktop-notify"])
            .current_dir(repo())
            .status()
            .unwrap();
        assert!(built.success(), "cargo build --example desktop-notify");
    }
    let mut notifier = Command::new(&example)
        .env("DBUS_SYSTEM_BUS_ADDRESS", &bus.address)
        .env("DBUS_SESSION_BUS_ADDRESS", &address)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    std::io::BufReader::new(notifier.stdout.take().unwrap())
        .read_line(&mut ready)
        .unwrap();
    assert_eq!(ready.trim(), "ready");

    let ok = |out: std::process::Output, what: &str| {
        assert!(out.status.success(), "{what}: {}", text(&out));
    };
    ok(
        bus.banger_as(None, &["image", "pull", &reference, "--name", "note"]),
        "image pull",
    );
    let (done, _) = shown(&mut rx, "pull-image").await;
    assert!(done.0.ends_with(" done") && done.2 == 1, "{done:?}");

    let bad = "127.0.0.1:1/nothing:v1";
    let out = bus.banger_as(None, &["image", "pull", bad, "--name", "nope"]);
    assert!(!out.status.success(), "a pull from a closed port");
    let (failed, _) = shown(&mut rx, bad).await;
    assert!(
        failed.0.ends_with(" failed") && failed.2 == 2 && failed.1.contains(bad),
        "{failed:?}"
    );

    ok(
        bus.banger_as(None, &["vm", "create", "n1", "--image", "note", "--cold"]),
        "vm create",
    );
    shown(&mut rx, "create-vm n1 done").await;
    ok(bus.banger_as(None, &["vm", "stop", "n1"]), "vm stop");
    ok(bus.banger_as(None, &["vm", "start", "n1"]), "vm start");
    let (_, before) = shown(&mut rx, "start-vm n1 done").await;
    assert!(
        !before.iter().any(|s| s.0.contains("stopped")),
        "a requested stop said something: {before:?}"
    );

    // Its VMM killed, the VM stops without anyone asking.
    let conn = bus.connect().await;
    let vms = banger::dbus::proxy::VMs1Proxy::new(&conn).await.unwrap();
    let path = vms.get_vm("n1").await.unwrap();
    let vm = banger::dbus::proxy::VM1Proxy::builder(&conn)
        .path(path)
        .build()
        .await
        .unwrap();
    let id = vm.id().await.unwrap();
    let pid: i32 = std::fs::read_to_string(bus.runtime.join("vms").join(&id).join("qemu.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // SAFETY: plain kill(2) of the VM's QEMU.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let (stopped, before) = shown(&mut rx, "VM n1 stopped").await;
    assert!(
        stopped.2 == 2 && stopped.1.contains("without a stop"),
        "{stopped:?}"
    );
    assert!(before.is_empty(), "{before:?}");

    let _ = notifier.kill();
    let _ = notifier.wait();
    let _ = session.kill();
    let _ = session.wait();
    writeln!(
        std::io::stderr(),
        "desktop notifications: 5 shown as expected, a requested stop silent"
    )
    .unwrap();
}
