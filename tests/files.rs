//! The files a package installs: the systemd unit passes `systemd-analyze verify`, its
//! sandboxing score is recorded, and the polkit policy and bus files say what the code does.

mod common;

use std::process::Command;

use banger::auth::Action;
use common::*;

fn unit_with_built_binary(dir: &std::path::Path) -> std::path::PathBuf {
    // verify checks that ExecStart exists; point it at the binary this build made.
    let unit = std::fs::read_to_string(repo().join("systemd/bangerd.service")).unwrap();
    assert!(
        unit.contains("ExecStart=/usr/bin/bangerd "),
        "the unit starts /usr/bin/bangerd"
    );
    let unit = unit.replace(
        "ExecStart=/usr/bin/bangerd ",
        &format!("ExecStart={} ", env!("CARGO_BIN_EXE_bangerd")),
    );
    let path = dir.join("bangerd.service");
    std::fs::write(&path, unit).unwrap();
    path
}

#[test]
fn unit_verifies_and_is_sandboxed() {
    if !available(&["systemd-analyze"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_with_built_binary(dir.path());
    // The socket beside it (verify follows its Service= to the unit above).
    let socket = dir.path().join("bangerd.socket");
    std::fs::copy(repo().join("systemd/bangerd.socket"), &socket).unwrap();
    let text_of = std::fs::read_to_string(&socket).unwrap();
    assert!(text_of.contains("ListenStream=/run/banger/io.banger"));
    assert!(text_of.contains("SocketMode=0666"));
    assert!(std::fs::read_to_string(&unit)
        .unwrap()
        .contains("Sockets=bangerd.socket"));
    let metrics = dir.path().join("bangerd-metrics.socket");
    std::fs::copy(repo().join("systemd/bangerd-metrics.socket"), &metrics).unwrap();
    let m = std::fs::read_to_string(&metrics).unwrap();
    assert!(m.contains("ListenStream=/run/systemd/report/io.banger"));
    assert!(m.contains("FileDescriptorName=metrics") && m.contains("Service=bangerd.service"));
    assert!(std::fs::read_to_string(&unit)
        .unwrap()
        .contains("Sockets=bangerd.socket bangerd-metrics.socket"));
    verify(&[&unit, &socket, &metrics]);

    let score = exposure(&unit);
    println!("systemd-analyze security exposure: {score}");
    // README.md records this number; the goal is 4.0 or less.
    assert!(score <= 4.0, "sandboxing regressed to {score}");
}

/// `systemd-analyze verify` of these unit files passes and says nothing.
fn verify(units: &[&std::path::Path]) {
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(units)
        .output()
        .unwrap();
    assert!(
        out.status.success() && text(&out).trim().is_empty(),
        "verify: {}",
        text(&out)
    );
}

/// The exposure `systemd-analyze security` gives a unit file.
fn exposure(unit: &std::path::Path) -> f64 {
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(unit)
        .output()
        .unwrap();
    let report = text(&out);
    let line = report
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .expect(&report);
    line.split(':')
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn vm_units_are_confined_more_than_before() {
    if !available(&["systemd-analyze"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, props: &[String]| {
        let p = dir.path().join(name);
        let mut text = String::from(
            "[Unit]\nDescription=banger VM\n[Service]\nExecStart=/bin/true\nKillMode=mixed\n",
        );
        for prop in props {
            text.push_str(prop);
            text.push('\n');
        }
        std::fs::write(&p, text).unwrap();
        p
    };
    // What VM units ran with before the isolation work.
    let before = write(
        "banger-vm-before.service",
        &[
            "CapabilityBoundingSet=CAP_NET_ADMIN CAP_DAC_OVERRIDE CAP_SYS_RESOURCE".into(),
            "NoNewPrivileges=yes".into(),
            "ProtectHome=yes".into(),
        ],
    );
    use banger::vmm::process::{
        CONFINED_UNIT, NETWORK_FAMILIES, OWNER_UNIT, SETPRIV_UNIT, VM_UNIT,
    };
    let unit = |name: &str, extra: &[&[&str]], writable: &str| {
        let mut props: Vec<String> = CONFINED_UNIT
            .iter()
            .chain(extra.iter().flat_map(|e| e.iter()))
            .map(|p| p.trim_start_matches("--property=").to_owned())
            .collect();
        props.push(format!("ReadWritePaths={writable}"));
        let path = write(name, &props);
        let out = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(out.status.success(), "verify {name}: {}", text(&out));
        path
    };
    let now = unit(
        "banger-vm-now.service",
        &[SETPRIV_UNIT, VM_UNIT],
        "/run/banger/vms/0123456789abcdef",
    );
    // A shared folder's server runs as the owner with a user namespace of its own: it is
    // verified and its exposure shown, not compared (it is the owner's own process).
    let owner = unit(
        "banger-vm-share.service",
        &[OWNER_UNIT, &[NETWORK_FAMILIES]],
        "/run/banger/vms/0123456789abcdef /home/someone/src",
    );
    let (b, n) = (exposure(&before), exposure(&now));
    println!(
        "VM unit exposure: {n} (was {b}); shared folder server: {}",
        exposure(&owner)
    );
    assert!(
        n < b,
        "VM units are no more confined than before: {n} vs {b}"
    );
}

#[test]
fn unit_and_activation_file_agree_on_the_bus_name() {
    let unit = std::fs::read_to_string(repo().join("systemd/bangerd.service")).unwrap();
    for line in [
        "Type=notify",
        "BusName=org.banger",
        "StateDirectory=banger",
        "RuntimeDirectory=banger",
        "ProtectSystem=strict",
    ] {
        assert!(unit.lines().any(|l| l == line), "unit lacks {line}");
    }
    let activation = std::fs::read_to_string(repo().join("dbus/org.banger.service")).unwrap();
    assert!(activation.lines().any(|l| l == "Name=org.banger"));
    assert!(activation
        .lines()
        .any(|l| l == "SystemdService=bangerd.service"));
    let policy = std::fs::read_to_string(repo().join("dbus/org.banger.conf")).unwrap();
    assert!(
        policy.contains(r#"<policy user="root">"#)
            && policy.contains(r#"<allow own="org.banger"/>"#)
    );
}

#[test]
fn polkit_policy_declares_exactly_the_actions_the_code_checks() {
    let policy = std::fs::read_to_string(repo().join("polkit/org.banger.policy")).unwrap();
    let declared: Vec<&str> = policy
        .split("<action id=\"")
        .skip(1)
        .map(|s| s.split('"').next().unwrap())
        .collect();
    let mut expected: Vec<&str> = Action::ALL.iter().map(|a| a.id()).collect();
    let mut declared_sorted = declared.clone();
    declared_sorted.sort();
    expected.sort();
    assert_eq!(declared_sorted, expected);
    assert_eq!(
        policy
            .matches("<allow_any>auth_admin_keep</allow_any>")
            .count(),
        4
    );
    let rules = std::fs::read_to_string(repo().join("polkit/50-banger.rules")).unwrap();
    assert!(rules.contains("isInGroup(\"banger\")") && rules.contains("org.banger.vms.manage-any"));
}

#[test]
fn every_dbus_member_is_documented() {
    let mut files = 0;
    for entry in std::fs::read_dir(repo().join("dbus")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("xml") {
            continue;
        }
        files += 1;
        let xml = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = xml.lines().map(str::trim).collect();
        for (i, l) in lines.iter().enumerate() {
            if l.starts_with("<method ") || l.starts_with("<signal ") || l.starts_with("<property ")
            {
                assert_eq!(lines[i - 1], "-->", "{}: undocumented {l}", path.display());
            }
        }
    }
    // Images1, Kernels1, VMs1, Jobs1, Snapshots1, Image1, Kernel1, VM1, Job1, Snapshot1.
    assert_eq!(files, 10);
}

#[test]
fn the_e2b_user_units_verify_and_hand_the_service_its_socket() {
    if !available(&["systemd-analyze"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let service = std::fs::read_to_string(repo().join("systemd/banger-e2b.service")).unwrap();
    assert!(
        service.contains("ExecStart=/usr/bin/banger e2b serve"),
        "{service}"
    );
    let socket = std::fs::read_to_string(repo().join("systemd/banger-e2b.socket")).unwrap();
    // Loopback only, at the address `banger e2b env` prints by default.
    assert!(socket.contains("ListenStream=127.0.0.1:3000"), "{socket}");
    let service = service.replace(
        "ExecStart=/usr/bin/banger ",
        &format!("ExecStart={} ", env!("CARGO_BIN_EXE_banger")),
    );
    std::fs::write(dir.path().join("banger-e2b.service"), service).unwrap();
    std::fs::write(dir.path().join("banger-e2b.socket"), socket).unwrap();
    verify(&[
        &dir.path().join("banger-e2b.service"),
        &dir.path().join("banger-e2b.socket"),
    ]);
}
