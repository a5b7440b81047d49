//! The Varlink API as a black box: bus-activated `bangerd` with a real polkitd, called on its
//! socket by clients no one here wrote (the `varlink` package from PyPI, which also parses
//! every interface description banger serves, and a raw `socat` exchange), as real uids.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use banger::model::{now_us, Image, Kernel};
use banger::store::{rows, Store};
use common::*;
use serde_json::{json, Value};

const TOOLS: &[&str] = &["dbus-daemon", "unshare", "runuser", "useradd", "socat"];

/// Where tests/run installed the PyPI `varlink` package (pure Python: any python3 reads it).
fn pyvarlink() -> Option<PathBuf> {
    let dir = repo().join("target/test-python");
    if dir.join("varlink").is_dir() {
        return Some(dir);
    }
    if std::env::var_os("BANGER_REQUIRE_INTEGRATION").is_some() {
        panic!(
            "the PyPI varlink package is not in {} (tests/run installs it)",
            dir.display()
        );
    }
    eprintln!("skipping: no PyPI varlink package in {}", dir.display());
    None
}

/// A raw exchange: the calls, each NUL-terminated, written by `socat` as `user`; the replies.
fn raw(bus: &TestBus, user: Option<&str>, calls: &[Value]) -> Vec<Value> {
    let mut input = Vec::new();
    for c in calls {
        input.extend(c.to_string().as_bytes());
        input.push(0);
    }
    let out = socat(bus, user, &input);
    let replies: Vec<Value> = out
        .stdout
        .split(|&b| b == 0)
        .filter(|r| !r.is_empty())
        .map(|r| serde_json::from_slice(r).unwrap())
        .collect();
    assert_eq!(replies.len(), calls.len(), "{}", text(&out));
    replies
}

/// `socat - UNIX-CONNECT:socket` as `user`, `input` on its standard input; ends when the
/// daemon has answered (-t: how long to go on reading once the input ended) or hung up.
fn socat(bus: &TestBus, user: Option<&str>, input: &[u8]) -> std::process::Output {
    let file = tempfile::tempfile().unwrap();
    std::fs::write(
        format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&file)),
        input,
    )
    .unwrap();
    use std::io::Seek;
    let mut file = file;
    file.rewind().unwrap();
    let addr = format!("UNIX-CONNECT:{}", bus.runtime.join("io.banger").display());
    bus.command_as(user, "socat", &["-t", "10", "-", &addr])
        .stdin(file)
        .output()
        .unwrap()
}

/// Replies to `input` on the metrics socket as `user` (socat), each NUL-terminated message.
fn metrics_replies(bus: &TestBus, user: Option<&str>, input: &[Value]) -> Vec<Value> {
    let mut bytes = Vec::new();
    for c in input {
        bytes.extend(c.to_string().as_bytes());
        bytes.push(0);
    }
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &bytes).unwrap();
    let addr = format!(
        "UNIX-CONNECT:{}",
        bus.runtime.join("report/io.banger").display()
    );
    let out = bus
        .command_as(user, "socat", &["-t", "10", "-", &addr])
        .stdin(std::fs::File::open(file.path()).unwrap())
        .output()
        .unwrap();
    out.stdout
        .split(|&b| b == 0)
        .filter(|r| !r.is_empty())
        .map(|r| serde_json::from_slice(r).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_metrics_socket_answers_io_systemd_metrics_for_systemd_report() {
    let Some(bus) = seeded_bus() else {
        return;
    };
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let sock = bus.runtime.join("report/io.banger");
    let m = std::fs::metadata(&sock).unwrap();
    assert!(m.file_type().is_socket());
    assert_eq!(m.permissions().mode() & 0o777, 0o666);

    // As systemd-report asks, as anyone: List with more, one reply per metric, the last
    // without `continues`.
    let list = metrics_replies(
        &bus,
        Some(USER_NO),
        &[json!({"method": "io.systemd.Metrics.List", "more": true})],
    );
    let (last, rest) = list.split_last().unwrap();
    assert!(rest.iter().all(|r| r["continues"] == true), "{list:?}");
    assert!(last.get("continues").is_none(), "{last}");
    let value_of = |name: &str| {
        list.iter()
            .find(|r| r["parameters"]["name"] == name)
            .unwrap_or_else(|| panic!("no {name} in {list:?}"))["parameters"]["value"]
            .as_u64()
            .unwrap()
    };
    // No VM runs: nothing per VM, totals of zero.
    assert_eq!(value_of("io.banger.vms_active"), 0);
    assert_eq!(value_of("io.banger.host_memory_bytes"), 0);
    assert!(!list
        .iter()
        .any(|r| r["parameters"]["name"] == "io.banger.vm_host_memory_bytes"));

    // Describe: each family with its type; on one connection, in order, with the errors.
    let replies = metrics_replies(
        &bus,
        None,
        &[
            json!({"method": "io.systemd.Metrics.Describe", "more": true}),
            json!({"method": "io.systemd.Metrics.List"}),
            json!({"method": "io.banger.VMs.List"}),
            json!({"method": "org.varlink.service.GetInfo"}),
        ],
    );
    let described: Vec<&Value> = replies
        .iter()
        .filter(|r| r["parameters"]["type"].is_string())
        .collect();
    assert_eq!(described.len(), 5, "{replies:?}");
    assert!(described
        .iter()
        .any(|r| r["parameters"]["name"] == "io.banger.vm_cpu_usage_nsec"
            && r["parameters"]["type"] == "counter"));
    let errors: Vec<&Value> = replies.iter().filter(|r| r["error"].is_string()).collect();
    assert_eq!(
        errors[0]["error"], "org.varlink.service.ExpectedMore",
        "{replies:?}"
    );
    assert_eq!(
        errors[1]["error"], "org.varlink.service.InterfaceNotFound",
        "{replies:?}"
    );
    let info = replies.last().unwrap();
    assert_eq!(
        info["parameters"]["interfaces"],
        json!(["org.varlink.service", "io.systemd.Metrics"]),
        "{info}"
    );
}

/// Rows an earlier daemon would have left: an image, a kernel, a VM of root's and two of
/// USER_OK's.
fn seed(bus: &TestBus) {
    let state = bus.state_dir();
    std::fs::create_dir_all(&state).unwrap();
    let store = Store::open(&state.join("banger.db")).unwrap();
    let image = Image {
        id: banger::model::new_id(),
        name: "seeded-image".into(),
        managed: true,
        source: "docker.io/library/debian:bookworm".into(),
        rootfs_path: state.join("images/x/rootfs.ext4"),
        work_seed_path: None,
        kernel: Some("debian-6.1".into()),
        size_bytes: 1 << 30,
        created_at: now_us(),
        ready_ports: vec![8080],
        config: Default::default(),
        owner_uid: 0,
    };
    let kernel = Kernel {
        name: "debian-6.1".into(),
        version: "6.1.0-30-amd64".into(),
        source: "catalog:debian".into(),
        kernel_path: state.join("kernels/debian-6.1/vmlinux"),
        initrd_path: None,
        modules_dir: None,
        created_at: now_us(),
        owner_uid: 0,
    };
    let vms = [
        vm_row("roots-vm", &image, 0, 3, "debian-6.1"),
        vm_row("users-vm", &image, uid_of(USER_OK), 4, "debian-6.1"),
        vm_row("users-vm2", &image, uid_of(USER_OK), 5, "debian-6.1"),
    ];
    // users-vm booted once: its console log is there.
    let console = state.join("vms").join(&vms[1].id);
    std::fs::create_dir_all(&console).unwrap();
    std::fs::write(console.join("console.log"), "users-vm booted\n").unwrap();
    store
        .call_blocking(move |c| {
            rows::insert_image(c, &image)?;
            rows::insert_kernel(c, &kernel)?;
            for v in &vms {
                rows::insert_vm(c, v)?;
            }
            Ok(())
        })
        .unwrap();
}

/// A bus with seeded rows and bangerd running (the first D-Bus call activates it, and it
/// then listens on its Varlink socket too); `None` when a tool is missing.
fn seeded_bus() -> Option<TestBus> {
    if !available(TOOLS) || pyvarlink().is_none() {
        return None;
    }
    let bus = TestBus::start(BusOptions::default());
    seed(&bus);
    let out = bus.banger_as(None, &["status"]);
    assert!(out.status.success(), "{}", text(&out));
    Some(bus)
}

#[tokio::test(flavor = "multi_thread")]
async fn every_interface_is_described_reads_are_open_and_errors_are_named() {
    let Some(bus) = seeded_bus() else {
        return;
    };
    let sock = bus.runtime.join("io.banger");
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let m = std::fs::metadata(&sock).unwrap();
    assert!(m.file_type().is_socket());
    assert_eq!(m.permissions().mode() & 0o777, 0o666);

    // A raw exchange as a stranger: GetInfo lists the interfaces; several calls on one
    // connection are answered in order; what is wrong is named.
    let replies = raw(
        &bus,
        Some(USER_NO),
        &[
            json!({"method": "org.varlink.service.GetInfo"}),
            json!({"method": "io.banger.VMs.List"}),
            json!({"method": "io.banger.VMs.Lst"}),
            json!({"method": "io.banger.Nothing.List"}),
            json!({"method": "io.banger.VMs.Get", "parameters": {"name": "nope"}}),
            json!({"method": "io.banger.VMs.Get", "parameters": {"nmae": "users-vm"}}),
            json!({"method": "io.banger.VMs.Delete", "parameters": {"name": "users-vm", "froce": true}}),
            json!({"method": "io.banger.Images.Get", "parameters": {"name": 7}}),
            // Only VM control relays hand connections over.
            json!({"method": "io.banger.MachineControl.Take", "parameters": {"vm": "users-vm", "connection": 0}}),
        ],
    );
    assert_eq!(
        replies[0]["parameters"]["interfaces"],
        json!([
            "org.varlink.service",
            "io.banger.Images",
            "io.banger.Kernels",
            "io.banger.VMs",
            "io.banger.Jobs",
            "io.banger.MachineControl"
        ]),
        "{replies:?}"
    );
    assert_eq!(
        replies[8]["error"], "io.banger.MachineControl.PermissionDenied",
        "{replies:?}"
    );
    let take = json!({"method": "io.banger.MachineControl.Take", "parameters": {"vm": "users-vm", "connection": 0}});
    let r = raw(&bus, Some(USER_OK), &[take]);
    assert_eq!(
        r[0]["error"], "io.banger.MachineControl.PermissionDenied",
        "{r:?}"
    );
    let names: Vec<&str> = replies[1]["parameters"]["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 3, "{names:?}");
    for name in ["roots-vm", "users-vm", "users-vm2"] {
        assert!(names.contains(&name), "{names:?}");
    }
    assert_eq!(
        replies[2],
        json!({"error": "org.varlink.service.MethodNotFound", "parameters": {"method": "io.banger.VMs.Lst"}})
    );
    assert_eq!(
        replies[3],
        json!({"error": "org.varlink.service.InterfaceNotFound", "parameters": {"interface": "io.banger.Nothing"}})
    );
    assert_eq!(replies[4]["error"], "io.banger.VMs.NotFound", "{replies:?}");
    assert!(
        replies[4]["parameters"]["message"]
            .as_str()
            .unwrap()
            .contains("banger vm list"),
        "the message says what to do: {replies:?}"
    );
    for (i, p) in [(5, "name"), (6, "froce"), (7, "name")] {
        assert_eq!(
            replies[i],
            json!({"error": "org.varlink.service.InvalidParameter", "parameters": {"parameter": p}}),
            "{i}"
        );
    }

    // The PyPI client opens each interface from the description banger serves (it parses
    // the IDL), and reads as a stranger.
    for iface in [
        "io.banger.Images",
        "io.banger.Kernels",
        "io.banger.VMs",
        "io.banger.Jobs",
        "io.banger.MachineControl",
    ] {
        let r = py_call(
            &bus,
            Some(USER_NO),
            "org.varlink.service.GetInterfaceDescription",
            json!({ "interface": iface }),
            false,
        );
        assert!(
            r[0]["description"]
                .as_str()
                .unwrap()
                .contains(&format!("interface {iface}")),
            "{r:?}"
        );
    }
    let r = py_call(
        &bus,
        Some(USER_NO),
        "io.banger.Images.List",
        json!({}),
        false,
    );
    assert_eq!(r[0]["images"][0]["name"], "seeded-image", "{r:?}");
    assert_eq!(r[0]["images"][0]["readyPorts"], json!([8080]), "{r:?}");
    let r = py_call(
        &bus,
        Some(USER_NO),
        "io.banger.Kernels.List",
        json!({}),
        false,
    );
    assert_eq!(r[0]["kernels"][0]["name"], "debian-6.1", "{r:?}");
    let r = py_call(
        &bus,
        Some(USER_NO),
        "io.banger.VMs.Get",
        json!({"name": "users-vm"}),
        false,
    );
    assert_eq!(r[0]["vm"]["owner"], json!(uid_of(USER_OK)), "{r:?}");
    assert_eq!(r[0]["vm"]["state"], "stopped", "{r:?}");
    let r = py_call(&bus, Some(USER_NO), "io.banger.Jobs.List", json!({}), false);
    assert_eq!(r[0]["jobs"], json!([]), "{r:?}");
    let r = py_call(
        &bus,
        Some(USER_NO),
        "io.banger.Images.Get",
        json!({"name": "nope"}),
        false,
    );
    assert_eq!(r[0]["error"], "io.banger.Images.NotFound", "{r:?}");
}

/// Every mutating method, with arguments that get past validation.
fn mutating_calls() -> Vec<(&'static str, Value)> {
    vec![
        // Loopback port 9 (discard): an authorised pull fails to connect and reaches
        // nothing outside this machine.
        (
            "io.banger.Images.Pull",
            json!({"ref": "127.0.0.1:9/none/x:v1", "insecure": true}),
        ),
        (
            "io.banger.Images.Register",
            json!({"name": "img", "rootfs": "/srv/rootfs.ext4"}),
        ),
        ("io.banger.Images.Promote", json!({"name": "seeded-image"})),
        ("io.banger.Images.Build", json!({"name": "built"})),
        ("io.banger.Images.Warm", json!({"name": "seeded-image"})),
        ("io.banger.Kernels.Pull", json!({"name": "debian"})),
        (
            "io.banger.Kernels.Import",
            json!({"name": "k", "kernelPath": "/boot/vmlinuz"}),
        ),
        (
            "io.banger.VMs.Create",
            json!({"name": "newvm", "start": false}),
        ),
        ("io.banger.VMs.Start", json!({"name": "users-vm"})),
        ("io.banger.VMs.Stop", json!({"name": "users-vm"})),
        ("io.banger.VMs.Pause", json!({"name": "users-vm"})),
        ("io.banger.VMs.Resume", json!({"name": "users-vm"})),
        (
            "io.banger.VMs.Snapshot",
            json!({"name": "users-vm", "snapshot": "s"}),
        ),
        // The deletes come last: an authorised one really deletes.
        ("io.banger.Images.Delete", json!({"name": "seeded-image"})),
        ("io.banger.Kernels.Delete", json!({"name": "debian-6.1"})),
        (
            "io.banger.VMs.Delete",
            json!({"name": "users-vm2", "force": true}),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn every_mutating_method_asks_polkit_for_the_peer_process() {
    let Some(bus) = seeded_bus() else {
        return;
    };
    let (mut tried, mut refused, mut leaked) = (0, 0, Vec::new());
    for (method, params) in mutating_calls() {
        let interface = method.rsplit_once('.').unwrap().0;
        // Not in the banger group: refused, before anything happens.
        let r = raw(
            &bus,
            Some(USER_NO),
            &[json!({"method": method, "parameters": params})],
        );
        tried += 1;
        if r[0]["error"] == format!("{interface}.PermissionDenied") {
            refused += 1;
        } else {
            leaked.push(format!("{method}: {}", r[0]));
        }
        // A member of the banger group gets through polkit to the capability itself, except
        // to change the system's image and kernel (the seeded rows), which is an
        // administrator's: root gets through there.
        let call = [json!({"method": method, "parameters": params})];
        let r = raw(&bus, Some(USER_OK), &call);
        let system_object = [
            "io.banger.Images.Promote",
            "io.banger.Images.Delete",
            "io.banger.Kernels.Delete",
        ]
        .contains(&method);
        if system_object {
            assert_eq!(
                r[0]["error"],
                format!("{interface}.PermissionDenied"),
                "{method}: {}",
                r[0]
            );
            assert!(
                r[0].to_string().contains("manage-any"),
                "{method}: {}",
                r[0]
            );
            let r = raw(&bus, None, &call);
            assert_ne!(
                r[0]["error"],
                format!("{interface}.PermissionDenied"),
                "{method} as root: {}",
                r[0]
            );
        } else {
            assert_ne!(
                r[0]["error"],
                format!("{interface}.PermissionDenied"),
                "{method}: {}",
                r[0]
            );
        }
    }
    // Another user's VM needs manage-any, which the rules keep for root.
    for method in [
        "io.banger.VMs.Stop",
        "io.banger.VMs.Delete",
        "io.banger.VMs.Start",
    ] {
        let r = raw(
            &bus,
            Some(USER_OK),
            &[json!({"method": method, "parameters": {"name": "roots-vm"}})],
        );
        tried += 1;
        let message = r[0]["parameters"]["message"].as_str().unwrap_or_default();
        if r[0]["error"] == "io.banger.VMs.PermissionDenied"
            && message.contains("org.banger.vms.manage-any")
        {
            refused += 1;
        } else {
            leaked.push(format!("{method} on roots-vm: {}", r[0]));
        }
    }
    println!(
        "varlink security: {tried} cases tried, {refused} refused, {} leaked",
        leaked.len()
    );
    assert!(leaked.is_empty(), "{leaked:#?}");
    // Nothing of the strangers' calls happened: the VMs the group member did not delete are
    // there, with the states they had.
    let r = py_call(&bus, None, "io.banger.VMs.List", json!({}), false);
    let names: Vec<&str> = r[0]["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"roots-vm") && names.contains(&"users-vm"),
        "{names:?}"
    );
    assert!(
        !names.contains(&"users-vm2"),
        "the member's delete went through: {names:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_that_never_ends_is_cut_off() {
    if !available(TOOLS) || pyvarlink().is_none() {
        return;
    }
    let bus = TestBus::start(BusOptions::default());
    let out = bus.banger_as(None, &["status"]);
    assert!(out.status.success(), "{}", text(&out));
    // 1 MiB without a NUL: the daemon drops the connection (socat then ends with what it
    // read: nothing) and goes on serving others.
    let out = socat(&bus, None, &vec![b' '; 1 << 20]);
    assert!(out.stdout.is_empty(), "{}", text(&out));
    let r = raw(&bus, None, &[json!({"method": "io.banger.Jobs.List"})]);
    assert_eq!(r[0]["parameters"]["jobs"], json!([]), "{r:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_first_varlink_call_starts_a_socket_activated_daemon_which_idles_out_after_its_last_connection(
) {
    if !available(&[TOOLS, &["systemd-socket-activate"]].concat()) {
        return;
    }
    use std::io::{Read, Write};
    use std::os::unix::fs::PermissionsExt;
    let bus = TestBus::start(BusOptions {
        activate_bangerd: false,
        idle_exit_sec: 2,
        ..Default::default()
    });
    std::fs::create_dir_all(&bus.runtime).unwrap();
    std::fs::set_permissions(&bus.runtime, std::fs::Permissions::from_mode(0o755)).unwrap();
    let sock = bus.runtime.join("io.banger");
    let config = bus.dir.path().join("config.toml");
    let bus_env = format!("DBUS_SYSTEM_BUS_ADDRESS={}", bus.address);
    // As bangerd.socket does: systemd's activator listens, and starts bangerd (with the
    // socket as fd 3, named io.banger) on the first connection.
    let mut daemon = std::process::Command::new("systemd-socket-activate")
        .args([
            "-l",
            sock.to_str().unwrap(),
            "--fdname=io.banger",
            "-E",
            &bus_env,
        ])
        .arg(env!("CARGO_BIN_EXE_bangerd"))
        .args(["--state-dir", bus.state_dir().to_str().unwrap()])
        .args(["--runtime-dir", bus.runtime.to_str().unwrap()])
        .args(["--config", config.to_str().unwrap()])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Ready once the activator says it listens.
    let mut stderr = std::io::BufReader::new(daemon.stderr.take().unwrap());
    read_until(&mut stderr, "Listening on", "the activator");
    // SocketMode=0666, as bangerd.socket says.
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = stderr.read_to_string(&mut rest);
    });
    let conn = bus.connect().await;
    assert_eq!(bus.owner_pid(&conn, "org.banger").await, None);

    // The first call starts the daemon, which answers it and owns org.banger as well.
    let r = raw(
        &bus,
        Some(USER_NO),
        &[json!({"method": "org.varlink.service.GetInfo"})],
    );
    assert_eq!(r[0]["parameters"]["product"], "bangerd", "{r:?}");
    let pid = bus
        .owner_pid(&conn, "org.banger")
        .await
        .expect("on the bus");
    assert_eq!(pid, daemon.id(), "the activator became bangerd");

    // An open connection keeps it, idle or not, past its idle time.
    let mut held = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    std::thread::sleep(std::time::Duration::from_secs(4));
    assert!(
        daemon.try_wait().unwrap().is_none(),
        "exited under a connection"
    );
    held.write_all(b"{\"method\":\"io.banger.Jobs.List\"}\0")
        .unwrap();
    let mut reply = Vec::new();
    let mut b = [0u8; 1];
    while held.read(&mut b).unwrap() == 1 && b[0] != 0 {
        reply.push(b[0]);
    }
    assert_eq!(
        serde_json::from_slice::<Value>(&reply).unwrap(),
        json!({"parameters": {"jobs": []}})
    );
    // Once it is closed, the daemon idles out, cleanly.
    drop(held);
    let status = daemon.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(
        bus.wait_name_gone(&conn, "org.banger", std::time::Duration::from_secs(10))
            .await
    );
}

/// Where systemd is not PID 1 (the quickstart's private bus), `bangerd activator` holds the
/// socket while the daemon is idle-exited, and the bus's activation file runs `bangerd wake`,
/// so both kinds of call start the daemon, and only ever one (issue 32, bug 7: the socket
/// used to go away with the daemon until some D-Bus call started it again).
#[tokio::test(flavor = "multi_thread")]
async fn without_systemd_the_activator_holds_the_socket_and_both_buses_start_one_daemon() {
    if !available(&[TOOLS, &["busctl"]].concat()) {
        return;
    }
    use std::io::BufRead;
    // Long enough an idle time that the owner is still there when the test asks, right after
    // a call.
    let bus = TestBus::start(BusOptions {
        activate_bangerd: false,
        idle_exit_sec: 3,
        ..Default::default()
    });
    let sock = bus.runtime.join("io.banger");
    let config = bus.dir.path().join("config.toml");
    let daemon_args = [
        "--state-dir",
        bus.state_dir().to_str().unwrap(),
        "--runtime-dir",
        bus.runtime.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ]
    .map(str::to_owned);
    // The quickstart's activation file, as it writes it where systemd is not PID 1.
    std::fs::write(
        bus.dir.path().join("services/org.banger.service"),
        format!(
            "[D-BUS Service]\nName=org.banger\nExec={} wake {}\nUser=root\n",
            env!("CARGO_BIN_EXE_bangerd"),
            daemon_args.join(" ")
        ),
    )
    .unwrap();
    let conn = bus.connect().await;
    zbus::fdo::DBusProxy::new(&conn)
        .await
        .unwrap()
        .reload_config()
        .await
        .unwrap();
    let mut activator = std::process::Command::new(env!("CARGO_BIN_EXE_bangerd"))
        .arg("activator")
        .args(&daemon_args)
        .env("DBUS_SYSTEM_BUS_ADDRESS", &bus.address)
        .env("BANGER_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Ready once it says it holds the socket; everything it says after is kept.
    let mut stderr = std::io::BufReader::new(activator.stderr.take().unwrap());
    read_until(&mut stderr, "holding", "the activator");
    let said = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let log = said.clone();
    std::thread::spawn(move || {
        for l in stderr.lines().map_while(Result::ok) {
            log.lock().unwrap().push_str(&(l + "\n"));
        }
    });
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let meta = std::fs::metadata(&sock).unwrap();
    assert!(meta.file_type().is_socket() && meta.permissions().mode() & 0o777 == 0o666);
    assert_eq!(bus.owner_pid(&conn, "org.banger").await, None);
    let parent_of = |pid: u32| -> u32 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("PPid:"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let idle_out = || async {
        assert!(
            bus.wait_name_gone(&conn, "org.banger", std::time::Duration::from_secs(30))
                .await,
            "the daemon did not idle out"
        );
    };
    let dbus_call = || {
        bus.busctl_as(
            Some(USER_NO),
            &[
                "call",
                "org.banger",
                "/org/banger",
                "org.banger.VMs1",
                "ListVMs",
            ],
        )
    };
    let varlink_call = || {
        raw(
            &bus,
            Some(USER_NO),
            &[json!({"method": "io.banger.Jobs.List"})],
        )
    };

    // A D-Bus call: the bus runs `wake`, which knocks on the socket; the activator's
    // daemon answers and owns the name.
    let out = dbus_call();
    assert!(
        out.status.success(),
        "{}\n{}",
        text(&out),
        said.lock().unwrap()
    );
    let first = bus
        .owner_pid(&conn, "org.banger")
        .await
        .expect("on the bus");
    assert_eq!(parent_of(first), activator.id(), "started by the activator");
    idle_out().await;
    // Idle-exited, the socket is still there and a Varlink call starts the daemon again.
    assert!(std::fs::symlink_metadata(&sock)
        .unwrap()
        .file_type()
        .is_socket());
    assert_eq!(varlink_call()[0]["parameters"]["jobs"], json!([]));
    let second = bus
        .owner_pid(&conn, "org.banger")
        .await
        .expect("on the bus");
    assert!(second != first && parent_of(second) == activator.id());
    idle_out().await;
    // Both at once, from idle, three times: both answered, by one daemon each time (a second
    // one would have ended failing to own the name, which the activator would report).
    for _ in 0..3 {
        let (d, v) = std::thread::scope(|s| {
            let d = s.spawn(dbus_call);
            let v = s.spawn(varlink_call);
            (d.join().unwrap(), v.join().unwrap())
        });
        assert!(d.status.success(), "{}", text(&d));
        assert_eq!(v[0]["parameters"]["jobs"], json!([]), "{v:?}");
        idle_out().await;
    }
    let said = said.lock().unwrap().clone();
    assert!(!said.contains("ended with"), "{said}");
    activator.kill().unwrap();
    let _ = activator.wait();
}

/// A descriptor-passing call by hand (Python's own socket module, as `user`): the reply and
/// what the passed descriptor reads.
const FD_CLIENT: &str = r#"
import json, os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
s.sendall(sys.argv[2].encode() + b"\0")
data, fds, _, _ = socket.recv_fds(s, 65536, 4)
reply = json.loads(data.rstrip(b"\0"))
read = os.read(fds[reply["parameters"]["fd"]], 4096).decode() if fds else None
print(json.dumps({"reply": reply, "fds": len(fds), "read": read}))
"#;

#[tokio::test(flavor = "multi_thread")]
async fn a_descriptor_comes_with_the_reply_and_only_to_whom_polkit_allows() {
    let Some(bus) = seeded_bus() else {
        return;
    };
    let call = json!({"method": "io.banger.VMs.OpenConsole", "parameters": {"name": "users-vm"}})
        .to_string();
    let sock = bus.runtime.join("io.banger");
    let run = |user| {
        let out = bus
            .command_as(
                Some(user),
                "/usr/bin/python3",
                &["-c", FD_CLIENT, sock.to_str().unwrap(), &call],
            )
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    let got = run(USER_OK);
    assert_eq!(got["reply"], json!({"parameters": {"fd": 0}}), "{got}");
    assert_eq!(got["fds"], 1, "{got}");
    assert_eq!(got["read"], "users-vm booted\n", "{got}");
    let got = run(USER_NO);
    assert_eq!(
        got["reply"]["error"], "io.banger.VMs.PermissionDenied",
        "{got}"
    );
    assert_eq!(got["fds"], 0, "{got}");

    // Snapshots are listed and deleted through the same interface.
    let r = raw(
        &bus,
        Some(USER_NO),
        &[
            json!({"method": "io.banger.VMs.ListSnapshots"}),
            json!({"method": "io.banger.VMs.GetSnapshot", "parameters": {"name": "nope"}}),
        ],
    );
    assert_eq!(r[0], json!({"parameters": {"snapshots": []}}));
    assert_eq!(r[1]["error"], "io.banger.VMs.NotFound", "{r:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_path_a_caller_names_is_opened_with_the_callers_rights_only() {
    let Some(bus) = seeded_bus() else {
        return;
    };
    use std::os::unix::fs::PermissionsExt;
    // A root-only file, and a link to it the caller could have made.
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let secret = dir.path().join("secret.ext4");
    std::fs::write(&secret, vec![0u8; 4096]).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let link = dir.path().join("link.ext4");
    std::os::unix::fs::symlink(&secret, &link).unwrap();
    let mut tried = 0;
    for (path, said) in [
        (&secret, "you cannot read this file yourself"),
        (&link, "is a symbolic link"),
    ] {
        for (method, params) in [
            (
                "io.banger.Images.Register",
                json!({"name": "stolen", "rootfs": path.to_str().unwrap()}),
            ),
            (
                "io.banger.Kernels.Import",
                json!({"name": "stolen", "kernelPath": path.to_str().unwrap()}),
            ),
        ] {
            let interface = method.rsplit_once('.').unwrap().0;
            let r = raw(
                &bus,
                Some(USER_OK),
                &[json!({"method": method, "parameters": params})],
            );
            tried += 1;
            assert_eq!(
                r[0]["error"],
                format!("{interface}.InvalidArgument"),
                "{r:?}"
            );
            let message = r[0]["parameters"]["message"].as_str().unwrap();
            assert!(message.contains(said), "{method}: {message}");
        }
    }
    let r = raw(
        &bus,
        None,
        &[
            json!({"method": "io.banger.Images.Get", "parameters": {"name": "stolen"}}),
            json!({"method": "io.banger.Kernels.Get", "parameters": {"name": "stolen"}}),
        ],
    );
    assert_eq!(r[0]["error"], "io.banger.Images.NotFound", "{r:?}");
    assert_eq!(r[1]["error"], "io.banger.Kernels.NotFound", "{r:?}");
    println!("varlink caller files: {tried} cases tried, {tried} refused, 0 leaked");
}

/// `banger --varlink=SOCKET …` (or `BANGER_VARLINK`) as `user`, with the system bus's address
/// pointing nowhere: whatever it does, it did over Varlink.
fn cli_over_varlink(bus: &TestBus, user: Option<&str>, args: &[&str]) -> std::process::Output {
    let sock = format!("--varlink={}", bus.runtime.join("io.banger").display());
    let mut a = vec![sock.as_str()];
    a.extend_from_slice(args);
    bus.command_as(user, env!("CARGO_BIN_EXE_banger"), &a)
        .env("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=/nonexistent/bus")
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cli_does_its_verbs_over_varlink_with_no_bus_to_reach() {
    let Some(bus) = seeded_bus() else {
        return;
    };
    let ok = |user: Option<&str>, args: &[&str]| {
        let out = cli_over_varlink(&bus, user, args);
        assert!(out.status.success(), "{args:?}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // The same verbs, the same tables and the same JSON keys as over D-Bus.
    let status: Value = serde_json::from_str(&ok(None, &["--json", "status"])).unwrap();
    assert_eq!(status["vms"], 3, "{status}");
    assert_eq!(status["images"], 1, "{status}");
    assert_eq!(status["daemonVersion"], banger::VERSION, "{status}");
    let vms = ok(Some(USER_NO), &["vm", "list"]);
    for name in ["NAME", "roots-vm", "users-vm", "users-vm2"] {
        assert!(vms.contains(name), "{vms}");
    }
    let images: Value = serde_json::from_str(&ok(None, &["--json", "image", "list"])).unwrap();
    assert_eq!(images[0]["name"], "seeded-image", "{images}");
    let kernel = ok(None, &["kernel", "show", "debian-6.1"]);
    assert!(kernel.contains("version: 6.1.0-30-amd64"), "{kernel}");
    let vm: Value = serde_json::from_str(&ok(None, &["--json", "vm", "show", "users-vm"])).unwrap();
    assert_eq!(vm["owner"], uid_of(USER_OK), "{vm}");
    assert!(ok(None, &["job", "list"]).starts_with("ID"));
    // A descriptor comes with a reply: the console log of users-vm's boot.
    assert_eq!(
        ok(Some(USER_OK), &["vm", "logs", "users-vm"]),
        "users-vm booted\n"
    );

    // Refusals read as they do over D-Bus, and change nothing.
    let refused = |user: Option<&str>, args: &[&str], why: &str| {
        let out = cli_over_varlink(&bus, user, args);
        assert!(!out.status.success(), "{args:?} succeeded: {}", text(&out));
        assert!(text(&out).contains(why), "{args:?}: {}", text(&out));
    };
    refused(
        Some(USER_NO),
        &["vm", "delete", "users-vm"],
        "Permission denied",
    );
    refused(None, &["vm", "show", "nope"], "No VM");
    refused(
        Some(USER_NO),
        &["image", "delete", "seeded-image"],
        "Permission denied",
    );
    assert!(ok(None, &["vm", "list"]).contains("users-vm"));
    // A member of group banger deletes a VM of theirs; the environment variable works too.
    let out = bus
        .command_as(
            Some(USER_OK),
            env!("CARGO_BIN_EXE_banger"),
            &["vm", "delete", "users-vm2"],
        )
        .env("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=/nonexistent/bus")
        .env("BANGER_VARLINK", bus.runtime.join("io.banger"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(!ok(None, &["vm", "list"]).contains("users-vm2"));
    // Without a daemon socket: a clear error naming the way back to D-Bus.
    let out = bus
        .command_as(
            None,
            env!("CARGO_BIN_EXE_banger"),
            &["--varlink=/nonexistent/sock", "status"],
        )
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(text(&out).contains("Leave out --varlink"), "{}", text(&out));
}

#[tokio::test(flavor = "multi_thread")]
async fn labels_find_a_users_own_vms_over_both_apis_and_never_another_users() {
    let Some(bus) = seeded_bus() else {
        return;
    };
    let ok = |out: std::process::Output, what: &str| {
        assert!(out.status.success(), "{what}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // Over D-Bus (the CLI) and over Varlink, two users label a VM each the same way.
    ok(
        bus.banger_as(
            Some(USER_OK),
            &[
                "vm",
                "create",
                "lab-ok",
                "--image",
                "seeded-image",
                "--no-start",
                "--label",
                "app=e2b",
                "--label",
                "sandbox.team=a b/c",
            ],
        ),
        "vm create --label",
    );
    let r = raw(
        &bus,
        Some(USER_OK2),
        &[json!({"method": "io.banger.VMs.Create", "parameters": {
            "name": "lab-ok2", "image": "seeded-image", "start": false,
            "labels": {"app": "e2b"}}})],
    );
    assert!(r[0].get("error").is_none(), "{r:?}");
    // The reply comes with the job; the VM is there once the job reserved it.
    let get = |user: Option<&str>, name: &str| {
        raw(
            &bus,
            user,
            &[json!({"method": "io.banger.VMs.Get", "parameters": {"name": name}})],
        )
        .remove(0)
    };
    wait_until("lab-ok2 reserved", Duration::from_secs(20), || {
        get(Some(USER_OK2), "lab-ok2")["parameters"]["vm"]["state"] == "created"
    });
    assert_eq!(
        get(Some(USER_OK2), "lab-ok2")["parameters"]["vm"]["labels"],
        json!({"app": "e2b"})
    );

    // Each finds only their own, whichever API asks; a filter of two pairs needs both.
    let listed = |user: &str, args: &[&str]| -> Vec<String> {
        let mut a = vec!["--json", "vm", "list"];
        a.extend_from_slice(args);
        let v: Value = serde_json::from_str(&ok(bus.banger_as(Some(user), &a), "vm list")).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(listed(USER_OK, &["--label", "app=e2b"]), ["lab-ok"]);
    assert_eq!(listed(USER_OK2, &["--label", "app=e2b"]), ["lab-ok2"]);
    assert_eq!(
        listed(
            USER_OK,
            &["--label", "app=e2b", "--label", "sandbox.team=a b/c"]
        ),
        ["lab-ok"]
    );
    assert!(listed(
        USER_OK,
        &["--label", "app=e2b", "--label", "sandbox.team=x"]
    )
    .is_empty());
    assert_eq!(
        listed(USER_OK, &[]).len(),
        5,
        "without a filter every VM is listed"
    );
    let over_varlink = |user: Option<&str>, labels: Value| -> Vec<String> {
        let r = raw(
            &bus,
            user,
            &[json!({"method": "io.banger.VMs.List", "parameters": {"labels": labels}})],
        );
        r[0]["parameters"]["vms"]
            .as_array()
            .unwrap_or_else(|| panic!("{r:?}"))
            .iter()
            .map(|v| v["name"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(
        over_varlink(Some(USER_OK), json!({"app": "e2b"})),
        ["lab-ok"]
    );
    assert_eq!(
        over_varlink(Some(USER_OK2), json!({"app": "e2b"})),
        ["lab-ok2"]
    );
    // Root's filter sees every owner's labels.
    assert_eq!(
        over_varlink(None, json!({"app": "e2b"})),
        ["lab-ok", "lab-ok2"]
    );

    // Another user reads no labels of a VM that is not theirs, on either API.
    let shown: Value = serde_json::from_str(&ok(
        bus.banger_as(Some(USER_OK2), &["--json", "vm", "show", "lab-ok"]),
        "vm show",
    ))
    .unwrap();
    assert_eq!(shown["labels"], json!({}), "{shown}");
    let mine: Value = serde_json::from_str(&ok(
        bus.banger_as(Some(USER_OK), &["--json", "vm", "show", "lab-ok"]),
        "vm show",
    ))
    .unwrap();
    assert_eq!(
        mine["labels"],
        json!({"app": "e2b", "sandbox.team": "a b/c"}),
        "{mine}"
    );
    let r = get(Some(USER_OK2), "lab-ok");
    assert_eq!(r["parameters"]["vm"]["labels"], json!({}), "{r:?}");

    // Bad labels are refused by name on both APIs, and nothing is created.
    let (mut tried, mut refused) = (0, 0);
    for (label, why) in [
        ("bad key=x", "key \"bad key\""),
        ("k=\u{7}", "control characters"),
        ("=v", "key \"\""),
    ] {
        tried += 1;
        let out = bus.banger_as(
            Some(USER_OK),
            &[
                "vm",
                "create",
                "lab-bad",
                "--image",
                "seeded-image",
                "--no-start",
                "--label",
                label,
            ],
        );
        if !out.status.success() && text(&out).contains(why) {
            refused += 1;
        } else {
            panic!("--label {label:?}: {}", text(&out));
        }
    }
    let r = raw(
        &bus,
        Some(USER_OK),
        &[json!({"method": "io.banger.VMs.Create", "parameters": {
            "name": "lab-bad", "image": "seeded-image", "start": false,
            "labels": {"k": "x".repeat(2000)}}})],
    );
    tried += 1;
    assert_eq!(r[0]["error"], "io.banger.VMs.InvalidArgument", "{r:?}");
    refused += 1;
    assert!(
        bus.banger_as(None, &["vm", "show", "lab-bad"])
            .status
            .code()
            != Some(0)
    );
    println!("security (labels): {tried} bad labels tried, {refused} refused, 0 created");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_vm_whose_lifetime_ran_out_is_ended_also_when_it_ran_out_while_bangerd_was_down() {
    if !available(TOOLS) || pyvarlink().is_none() {
        return;
    }
    let bus = TestBus::start(BusOptions::default());
    seed(&bus);
    // A row an earlier daemon left, whose lifetime ran out while no daemon ran.
    {
        let store = Store::open(&bus.state_dir().join("banger.db")).unwrap();
        let image = store
            .call_blocking(|c| rows::find_image(c, "seeded-image"))
            .unwrap()
            .unwrap();
        let mut gone = vm_row("expired-vm", &image, uid_of(USER_OK), 9, "debian-6.1");
        gone.expires_at = now_us() - 1_000_000;
        store
            .call_blocking(move |c| rows::insert_vm(c, &gone))
            .unwrap();
    }
    let ok = |out: std::process::Output, what: &str| {
        assert!(out.status.success(), "{what}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let exists = |name: &str| bus.banger_as(None, &["vm", "show", name]).status.success();
    // The first call starts the daemon, which ends it at once.
    ok(bus.banger_as(None, &["status"]), "status");
    wait_until(
        "the expired VM to be deleted",
        Duration::from_secs(30),
        || !exists("expired-vm"),
    );

    // A lifetime given at creation runs out and the VM goes.
    ok(
        bus.banger_as(
            Some(USER_OK),
            &[
                "vm",
                "create",
                "short",
                "--image",
                "seeded-image",
                "--no-start",
                "--timeout",
                "2s",
            ],
        ),
        "vm create --timeout",
    );
    let shown: Value = serde_json::from_str(&ok(
        bus.banger_as(Some(USER_OK), &["--json", "vm", "show", "short"]),
        "vm show",
    ))
    .unwrap();
    assert!(shown["expiresAt"].as_u64().unwrap() > now_us(), "{shown}");
    assert_eq!(shown["onExpire"], "delete", "{shown}");
    wait_until(
        "the VM whose lifetime ran out to go",
        Duration::from_secs(30),
        || !exists("short"),
    );

    // `vm timeout` changes a lifetime; 0 takes it away; stop ends a VM that does not run by
    // taking its lifetime away, and the VM stays.
    ok(
        bus.banger_as(
            Some(USER_OK),
            &[
                "vm",
                "create",
                "kept",
                "--image",
                "seeded-image",
                "--no-start",
                "--timeout",
                "1h",
                "--on-expire",
                "stop",
            ],
        ),
        "vm create --on-expire stop",
    );
    let expires = |name: &str| -> u64 {
        let v: Value =
            serde_json::from_slice(&bus.banger_as(None, &["--json", "vm", "show", name]).stdout)
                .unwrap();
        v["expiresAt"].as_u64().unwrap()
    };
    assert!(expires("kept") > now_us() + 3_000_000_000);
    ok(
        bus.banger_as(Some(USER_OK), &["vm", "timeout", "kept", "0"]),
        "vm timeout 0",
    );
    assert_eq!(expires("kept"), 0);
    // Over Varlink and D-Bus alike.
    let r = raw(
        &bus,
        Some(USER_OK),
        &[
            json!({"method": "io.banger.VMs.SetTimeout", "parameters": {"name": "kept", "timeoutSec": 1}}),
        ],
    );
    assert!(r[0].get("error").is_none(), "{r:?}");
    wait_until(
        "the stopped VM's lifetime to be taken away",
        Duration::from_secs(30),
        || expires("kept") == 0,
    );
    assert!(exists("kept"), "on_expire stop keeps the VM");

    // Refusals: another user's VM, a lifetime over ten years, an unknown action.
    let (mut tried, mut refused) = (0, 0);
    for (user, args, why) in [
        (
            USER_OK2,
            vec!["vm", "timeout", "kept", "60"],
            "Permission denied",
        ),
        (USER_OK, vec!["vm", "timeout", "kept", "4000d"], "at most"),
        (
            USER_OK,
            vec![
                "vm",
                "create",
                "bad",
                "--image",
                "seeded-image",
                "--no-start",
                "--timeout",
                "1m",
                "--on-expire",
                "explode",
            ],
            "delete, stop or pause",
        ),
    ] {
        tried += 1;
        let out = bus.banger_as(Some(user), &args);
        assert!(
            !out.status.success() && text(&out).contains(why),
            "{args:?}: {}",
            text(&out)
        );
        refused += 1;
    }
    assert_eq!(expires("kept"), 0);
    assert!(!exists("bad"));
    println!("security (lifetimes): {tried} tried, {refused} refused, nothing changed");
}
