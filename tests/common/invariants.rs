//! The invariants a daemon's state must hold whatever happened to it (checked after fault
//! injection's kills and after each step of the lifecycle matrix), and a daemon killer.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::vm::*;
use super::*;

/// The rows as the database holds them.
pub struct Rows {
    pub images: BTreeMap<String, banger::model::Image>,
    pub kernels: BTreeSet<String>,
    pub vms: Vec<banger::model::Vm>,
    pub snapshots: BTreeSet<String>,
    pub leases: Vec<(String, String)>,
}

pub fn rows(bus: &TestBus) -> Rows {
    use banger::store::rows;
    let store = banger::store::Store::open(&bus.state_dir().join("banger.db")).unwrap();
    store
        .call_blocking(|c| {
            let mut st = c
                .prepare("SELECT address, vm_id FROM address_leases")
                .unwrap();
            let leases = st
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .unwrap()
                .map(Result::unwrap)
                .collect();
            Ok(Rows {
                images: rows::list_images(c)?
                    .into_iter()
                    .map(|i| (i.id.clone(), i))
                    .collect(),
                kernels: rows::list_kernels(c)?.into_iter().map(|k| k.name).collect(),
                vms: rows::list_vms(c)?,
                snapshots: rows::list_snapshots(c)?.into_iter().map(|s| s.id).collect(),
                leases,
            })
        })
        .unwrap()
}

pub fn entries(dir: &std::path::Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// Processes other than the daemon, the bus, polkitd and the VMs' own that name the state
/// or runtime directory: a killed daemon's job helpers.
pub fn stray_programs(bus: &TestBus) -> Vec<String> {
    let state = bus.state_dir().to_string_lossy().into_owned();
    let run = bus.runtime.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(c) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let c = String::from_utf8_lossy(&c).replace('\0', " ");
        if !(c.contains(&state) || c.contains(&run)) {
            continue;
        }
        let ours = [
            "bangerd",
            "banger-vm-helper",
            "dbus-daemon",
            "polkitd",
            "qemu",
            "agent-link",
            "console-logger",
        ];
        if ours.iter().any(|o| c.contains(o)) {
            continue;
        }
        found.push(c);
    }
    found
}

/// Every invariant, once; the violations found.
pub fn check(bus: &TestBus) -> Vec<String> {
    let mut bad = Vec::new();
    let state = bus.state_dir();
    let r = rows(bus);

    // Staging leftovers and directories without rows (and rows without files).
    for (kind, live) in [
        ("images", r.images.keys().cloned().collect::<BTreeSet<_>>()),
        ("kernels", r.kernels.clone()),
        ("vms", r.vms.iter().map(|v| v.id.clone()).collect()),
        ("snapshots", r.snapshots.clone()),
    ] {
        let dirs = entries(&state.join(kind));
        for d in &dirs {
            if d.starts_with(".staging-") {
                bad.push(format!("{kind}/{d}: a staging leftover"));
            } else if !live.contains(d) {
                bad.push(format!("{kind}/{d}: no row names it"));
            }
        }
        if kind != "vms" {
            for id in live.difference(&dirs) {
                bad.push(format!("{kind} row {id}: its directory is missing"));
            }
        }
    }
    for (id, image) in &r.images {
        if !image.rootfs_path.exists() {
            bad.push(format!(
                "image {id}: {} is missing",
                image.rootfs_path.display()
            ));
        }
    }

    // VM states, their VMMs, and the files of VMs that ran.
    let procs = vm_process_dirs(bus);
    let running: BTreeSet<&str> = r
        .vms
        .iter()
        .filter(|v| matches!(v.state.as_str(), "running" | "paused"))
        .map(|v| v.id.as_str())
        .collect();
    for v in &r.vms {
        let st = v.state.as_str();
        if matches!(st, "starting" | "stopping") {
            bad.push(format!("VM {} is left {st}", v.name));
        }
        if matches!(st, "running" | "paused" | "stopped") && !state.join("vms").join(&v.id).is_dir()
        {
            bad.push(format!("VM {} is {st} without its directory", v.name));
        }
        if running.contains(v.id.as_str())
            && !procs
                .iter()
                .any(|(_, c)| c.contains("qemu") && c.contains(&v.id))
        {
            bad.push(format!("VM {} is {st} but its VMM is gone", v.name));
        }
    }
    for (_, c) in &procs {
        if !running.iter().any(|id| c.contains(id)) {
            bad.push(format!("a VM process without a running VM: {c}"));
        }
    }
    for c in stray_programs(bus) {
        bad.push(format!("a helper of a killed daemon still runs: {c}"));
    }

    // Addresses, leases, CIDs.
    let mut seen = BTreeSet::new();
    for v in r.vms.iter().filter(|v| v.vsock_cid != 0) {
        if !seen.insert(("cid", v.vsock_cid.to_string())) {
            bad.push(format!("CID {} is given twice", v.vsock_cid));
        }
        if !v.guest_address.is_empty() && !seen.insert(("addr", v.guest_address.clone())) {
            bad.push(format!("address {} is given twice", v.guest_address));
        }
    }
    for (addr, vm_id) in &r.leases {
        match r.vms.iter().find(|v| &v.id == vm_id) {
            None => bad.push(format!("lease {addr} names no VM ({vm_id})")),
            Some(v) if &v.guest_address != addr => bad.push(format!(
                "lease {addr} is VM {}'s, whose address is {}",
                v.name, v.guest_address
            )),
            _ => {}
        }
    }

    // Taps and nftables: only for live VMs.
    let live_taps: BTreeSet<&str> = r
        .vms
        .iter()
        .filter(|v| running.contains(v.id.as_str()))
        .map(|v| v.tap_name.as_str())
        .collect();
    let (links, _) = banger_network(bus);
    for l in links.iter().filter(|l| l.starts_with("bgr")) {
        if !live_taps.contains(l.as_str()) {
            bad.push(format!("tap {l} without a live VM"));
        }
    }
    let nft = bus
        .in_netns("nft")
        .args(["list", "ruleset"])
        .output()
        .unwrap();
    let nft = String::from_utf8_lossy(&nft.stdout);
    for word in nft.split(|c: char| !(c.is_ascii_alphanumeric())) {
        if word.starts_with("bgr") && word.len() > 3 && !live_taps.contains(word) {
            bad.push(format!("nftables names tap {word}, which no live VM has"));
        }
    }

    // Every running VM answers.
    for v in r.vms.iter().filter(|v| v.state.as_str() == "running") {
        let out = bus.banger_as(None, &["vm", "exec", &v.name, "--", "true"]);
        if !out.status.success() {
            bad.push(format!(
                "running VM {} does not answer: {}",
                v.name,
                text(&out)
            ));
        }
    }
    bad
}

/// SIGKILLs the daemon and waits until the bus has seen it go.
pub async fn kill_daemon(bus: &TestBus, conn: &zbus::Connection) {
    let pid = bus.owner_pid(conn, "org.banger").await.unwrap();
    // SAFETY: kill(2) with a constant signal on the daemon's pid.
    unsafe {
        libc::kill(pid as i32, libc::SIGKILL);
    }
    assert!(
        bus.wait_name_gone(conn, "org.banger", Duration::from_secs(30))
            .await
    );
}
