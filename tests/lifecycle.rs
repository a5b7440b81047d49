//! The lifecycle matrix (issue 32): every way a VM is born — cold, warm (the default), from a
//! snapshot, from a snapshot an older banger saved, forked, with a share, with a published
//! port, from a host folder, on a given network namespace; by root and by a member — walked
//! through every transition: stop → start, pause → resume, snapshot, the daemon killed while
//! it runs and while it is stopped, stop → start → snapshot → restore, delete. After each step
//! every VM answers `vm exec` as itself (and its share and port still work), and the state
//! holds every invariant fault injection checks (no VMM without a running VM, no tap or
//! nftables element without a live VM, no leftovers). A new birth or transition is a row in
//! [`BIRTHS`] or [`STEPS`], not a scenario; the run prints `lifecycle: N paths, all hold`.
//!
//! The VMs of one step run its transition at once (one thread each); the daemon restarts are
//! one kill for every VM. The warm start of a folder root needs a newer QEMU than the host's;
//! its row walks the same steps in a test of its own on Debian's backport.

mod common;

use common::invariants::*;
use common::vm::*;
use common::*;

/// How a VM comes to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum How {
    /// A boot from its image (`--cold`).
    Cold,
    /// The image's warm snapshot of its shape, restored (the default once one exists).
    Warm,
    /// A restore of a user's snapshot of another VM (`--snapshot`).
    Snapshot,
    /// A restore of a snapshot an older banger saved: its VM's devices on virtio-mmio (the
    /// kernel's initrd did not yet say its kernel has virtio's PCI transport; the next daemon
    /// built it again). It restores onto the devices it was saved with, and so does a fork.
    Older,
    /// `vm fork` of a running VM.
    Fork,
    /// A host folder shared in (`--share`).
    Share,
    /// A guest port published on the host (`--publish`).
    Publish,
    /// A host folder as its root (`--rootfs`): no image.
    Folder,
    /// On a network namespace's eth0 (`--netns`, root's): no lease, bridge or walls.
    Netns,
    /// A host folder as its root, started from the warm snapshot of folder roots (a parked
    /// template; QEMU 8.2 and later, see [`a_folder_root_started_warm_goes_through_every_transition`]).
    WarmFolder,
}

/// One birth: the VM's name, its owner (None: root), how it is born.
struct Birth {
    name: &'static str,
    who: Option<&'static str>,
    how: How,
}

/// Every way a VM is born, by root and by a member.
const BIRTHS: &[Birth] = &[
    Birth {
        name: "cold",
        who: None,
        how: How::Cold,
    },
    Birth {
        name: "warm",
        who: Some(USER_OK),
        how: How::Warm,
    },
    Birth {
        name: "restored",
        who: None,
        how: How::Snapshot,
    },
    Birth {
        name: "upgraded",
        who: Some(USER_OK),
        how: How::Older,
    },
    Birth {
        name: "forked",
        who: Some(USER_OK),
        how: How::Fork,
    },
    Birth {
        name: "shared",
        who: Some(USER_OK),
        how: How::Share,
    },
    Birth {
        name: "rootshare",
        who: None,
        how: How::Share,
    },
    Birth {
        name: "published",
        who: None,
        how: How::Publish,
    },
    Birth {
        name: "folder",
        who: Some(USER_OK),
        how: How::Folder,
    },
    Birth {
        name: "podnet",
        who: None,
        how: How::Netns,
    },
];

/// The address of the netns birth's namespace's eth0 (the far end of a veth whose near end,
/// in the daemon's namespace, holds .1).
const POD_ADDRESS: &str = "10.79.0.2";

/// A transition every VM goes through, in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    StopStart,
    PauseResume,
    Snapshot,
    /// The daemon killed (SIGKILL) while the VMs run; the next call starts another.
    RestartRunning,
    /// The VMs stopped, the daemon killed, the VMs started by the next daemon.
    RestartStopped,
    /// Stop, start, snapshot, and a VM restored from that snapshot answers as itself.
    StopStartSnapshotRestore,
    /// Nothing of the VM is left: processes, taps, nftables elements, directories.
    Delete,
}

const STEPS: &[Step] = &[
    Step::StopStart,
    Step::PauseResume,
    Step::Snapshot,
    Step::RestartRunning,
    Step::RestartStopped,
    Step::StopStartSnapshotRestore,
    Step::Delete,
];

/// What a birth cannot go through by design, and the refusal that says so: a VM with a
/// shared folder cannot be snapshotted (virtio-fs devices do not migrate). The refusal is
/// the path's outcome; the VM must go on answering after it.
fn refusal(how: How, step: Step) -> Option<&'static str> {
    match (how, step) {
        (How::Share, Step::Snapshot | Step::StopStartSnapshotRestore) => {
            Some("snapshot a VM without --share")
        }
        (How::Folder | How::WarmFolder, Step::Snapshot | Step::StopStartSnapshotRestore) => {
            Some("snapshot a VM booted from an image")
        }
        _ => None,
    }
}

/// The memory and vCPUs of every VM (one shape, so the warm snapshot serves them all).
const SHAPE: [&str; 4] = ["--memory", "256M", "--vcpus", "1"];
/// The host port the published VM's guest port 7070 is on.
const PORT: &str = "18181";

fn ok(out: std::process::Output, what: &str) -> String {
    assert!(out.status.success(), "{what}: {}", text(&out));
    text(&out)
}

/// How long the pause → resume step keeps each VM paused.
const PAUSE: std::time::Duration = std::time::Duration::from_secs(5);

/// The guest's wall clock less the host's, in seconds: 0 when the guest's reading lies
/// between the host's readings before and after the call.
fn clock_offset(bus: &TestBus, b: &Birth, vm: &str) -> f64 {
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64()
    };
    let before = now();
    let out = ok(
        bus.banger_as(b.who, &["vm", "exec", vm, "--", "/bin/busybox", "adjtimex"]),
        "adjtimex",
    );
    let after = now();
    let field = |k: &str| -> f64 {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(k))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{vm}: no {k} in {out}"))
    };
    let guest = field("time.tv_sec:") + field("time.tv_usec:") / 1e6;
    if guest < before {
        guest - before
    } else if guest > after {
        guest - after
    } else {
        0.0
    }
}

/// A VM's clock is on the host's once it is ready: a booted one's was set at ready, a restored
/// one's (snapshot, fork, warm start) stepped by its identity.
fn born_on_time(bus: &TestBus, b: &Birth) {
    let off = clock_offset(bus, b, b.name);
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "lifecycle: {} is {off:+.3} s off the host at its birth",
        b.name
    );
    assert!(
        off.abs() < 0.5,
        "{} at its birth: {off:+.3} s off the host",
        b.name
    );
}

/// A VM's boot id is its own, whoever it was restored from: `seen` holds the others'.
fn born_apart(bus: &TestBus, b: &Birth, seen: &mut Vec<String>) {
    let id = ok(
        bus.banger_as(
            b.who,
            &[
                "vm",
                "exec",
                b.name,
                "--",
                "cat",
                "/proc/sys/kernel/random/boot_id",
            ],
        ),
        "boot id",
    );
    assert_eq!(id.trim().len(), 36, "{}: boot id {id:?}", b.name);
    assert!(
        !seen.contains(&id),
        "{} has the boot id of another VM: {id}",
        b.name
    );
    seen.push(id);
}

fn refused(out: std::process::Output, why: &str) {
    assert!(
        !out.status.success() && text(&out).contains(why),
        "wanted a refusal saying {why:?}: {}",
        text(&out)
    );
}

/// `vm exec VM -- sh -c SCRIPT` as `who`.
fn sh(bus: &TestBus, who: Option<&str>, vm: &str, script: &str) -> std::process::Output {
    bus.banger_as(who, &["vm", "exec", vm, "--", "sh", "-c", script])
}

/// Where the guest's virtio devices are: `pci` when the PCI transport drives all of them,
/// `mmio` when it drives none.
fn transport(bus: &TestBus, who: Option<&str>, vm: &str) -> &'static str {
    let out = ok(
        sh(
            bus,
            who,
            vm,
            "ls /sys/bus/virtio/devices | grep -c virtio; \
             ls /sys/bus/pci/drivers/virtio-pci 2>/dev/null | grep -c :; true",
        ),
        &format!("{vm}: its virtio devices"),
    );
    let counts: Vec<usize> = out.lines().filter_map(|l| l.trim().parse().ok()).collect();
    match counts[..] {
        [all, pci] if all > 0 && pci == all => "pci",
        [all, 0] if all > 0 => "mmio",
        _ => panic!("{vm}: virtio devices, all and on PCI: {out}"),
    }
}

/// The VM answers `vm exec` as itself, and what its birth gave it still works.
fn answers(bus: &TestBus, b: &Birth, vm: &str, after: &str) {
    // Its name in the kernel and in the files that carry it (a restored guest's identity
    // rewrote its source's).
    let out = ok(
        sh(
            bus,
            b.who,
            vm,
            "hostname; cat /etc/hostname; grep 127.0.1.1 /etc/hosts",
        ),
        &format!("{vm} after {after}: vm exec"),
    );
    assert_eq!(
        out,
        format!("{vm}\n{vm}\n127.0.1.1\t{vm}\n"),
        "{vm} after {after}: hostname, /etc/hostname, /etc/hosts"
    );
    // Every boot on this kernel puts the devices on PCI; a restore, where they were saved.
    let saved_on_mmio = b.how == How::Older && after == "its birth";
    assert_eq!(
        transport(bus, b.who, vm),
        if saved_on_mmio { "mmio" } else { "pci" },
        "{vm} after {after}: where its virtio devices are"
    );
    if b.how == How::Share && vm == b.name {
        let out = bus.banger_as(b.who, &["vm", "exec", vm, "--", "cat", "/mnt/s/hello"]);
        assert!(
            out.status.success() && text(&out).contains("from the host"),
            "{vm} after {after}: the share: {}",
            text(&out)
        );
    }
    if matches!(b.how, How::Folder | How::WarmFolder) && vm == b.name {
        let out = bus.banger_as(b.who, &["vm", "exec", vm, "--", "cat", "/etc/marker"]);
        assert!(
            out.status.success() && text(&out).contains("from the host's folder"),
            "{vm} after {after}: the root folder: {}",
            text(&out)
        );
    }
    if b.how == How::Netns && vm == b.name {
        // eth0's address is the guest's, and the namespace's peer answers it.
        let out = sh(
            bus,
            b.who,
            vm,
            "ip -o -4 addr show; ping -c 1 -W 5 10.79.0.1",
        );
        assert!(
            out.status.success() && text(&out).contains(&format!("inet {POD_ADDRESS}/24")),
            "{vm} after {after}: the namespace's network: {}",
            text(&out)
        );
    }
    if b.how == How::Cold && vm == b.name {
        memory_is_its_own(bus, b, after);
    }
    if b.how == How::Publish && vm == b.name {
        // The forwarder accepts on the host's port whatever the guest listens on.
        let out = bus
            .in_netns("bash")
            .args(["-c", &format!("exec 3<>/dev/tcp/127.0.0.1/{PORT}")])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{vm} after {after}: the published port: {}",
            text(&out)
        );
    }
}

/// A VM booted cold had its memory moved once it was up (stage `move_memory`): its QEMU maps a
/// file of the state directory's that has no name, is the VM's uid's and no one else's.
fn memory_is_its_own(bus: &TestBus, b: &Birth, after: &str) {
    use std::os::unix::fs::MetadataExt;
    let id = vm_id(bus, b);
    let (qemu, _) = vm_process_dirs(bus)
        .into_iter()
        .find(|(_, c)| c.contains("qemu") && c.contains(&format!("banger-{id},")))
        .unwrap_or_else(|| panic!("{} after {after}: no QEMU", b.name));
    let maps = std::fs::read_to_string(qemu.join("maps")).unwrap();
    let vms = bus.state_dir().join("vms");
    let mapped = maps
        .lines()
        .any(|l| l.contains(&format!(" {}/#", vms.display())) && l.ends_with("(deleted)"));
    assert!(
        mapped,
        "{} after {after}: its memory is not a file of its own:\n{maps}",
        b.name
    );
    let m = std::fs::metadata(qemu.join("fd/4")).unwrap();
    assert_eq!(
        (
            m.nlink(),
            m.mode() & 0o7777,
            m.uid() != 0 && m.uid() == m.gid()
        ),
        (0, 0o600, true),
        "{} after {after}: its memory file",
        b.name
    );
}

/// A VM's id, from `vm show --json`.
fn vm_id(bus: &TestBus, b: &Birth) -> String {
    let out = bus.banger_as(b.who, &["--json", "vm", "show", b.name]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("vm show {}: {e}: {}", b.name, text(&out)));
    v["id"].as_str().unwrap().to_owned()
}

/// Runs `f` for every VM still in the matrix at once.
fn each(vms: &[&Birth], f: impl Fn(&Birth) + Sync) {
    std::thread::scope(|s| {
        for b in vms {
            let f = &f;
            s.spawn(move || f(b));
        }
    });
}

fn violations(bus: &TestBus, after: &str) {
    let bad = check(bus);
    assert!(bad.is_empty(), "after {after}: {bad:#?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_birth_through_every_transition_leaves_a_vm_that_answers() {
    let Some((bus, reference, _keep)) = image_bus("warm_snapshots = true\n", "vm/life").await
    else {
        return;
    };
    ok(
        bus.banger_as(None, &["image", "pull", &reference, "--name", "life"]),
        "image pull",
    );
    let conn = bus.connect().await;
    let create = |who: Option<&str>, name: &str, extra: &[&str]| {
        let mut a = vec!["vm", "create", name, "--image", "life"];
        a.extend(SHAPE);
        a.extend(extra);
        ok(bus.banger_as(who, &a), &format!("vm create {name}"))
    };

    // What an older banger left on this host: the kernel's initrd without the entry that says
    // its kernel has virtio's PCI transport (so its VMs' devices were on MMIO), and a
    // member's snapshot of such a VM. The next daemon builds the initrd again.
    let initrd = bus.state_dir().join("kernels/test/initrd.img");
    unmark_virtio_pci(&initrd);
    let older = |args: &[&str], what: &str| ok(bus.banger_as(Some(USER_OK), args), what);
    create(Some(USER_OK), "older", &["--cold"]);
    assert_eq!(transport(&bus, Some(USER_OK), "older"), "mmio");
    older(
        &["vm", "snapshot", "older", "older-snap"],
        "vm snapshot older",
    );
    older(&["vm", "delete", "--force", "older"], "vm delete older");
    kill_daemon(&bus, &conn).await;
    ok(bus.banger_as(None, &["kernel", "list"]), "the next daemon");
    assert_eq!(
        virtio_pci_marks(&initrd),
        1,
        "the next daemon built the initrd again"
    );

    // A folder of the member's and one of root's, the source of the snapshot birth, and the
    // warm snapshot.
    let folder = tempfile::tempdir().unwrap();
    let (share, root_share) = (folder.path().join("s"), folder.path().join("r"));
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(folder.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        for d in [&share, &root_share] {
            std::fs::create_dir(d).unwrap();
            std::fs::write(d.join("hello"), "from the host\n").unwrap();
        }
        for p in [&share, &share.join("hello")] {
            std::os::unix::fs::chown(p, Some(uid_of(USER_OK)), None).unwrap();
        }
    }
    let tree = folder.path().join("tree");
    std::fs::create_dir(&tree).unwrap();
    busybox_tree(&tree, uid_of(USER_OK));
    create(None, "source", &["--cold"]);
    ok(
        bus.banger_as(None, &["vm", "snapshot", "source", "source-snap"]),
        "the source's snapshot",
    );
    ok(
        bus.banger_as(
            None,
            &["image", "warm", "life", "--memory", "256", "--vcpus", "1"],
        ),
        "image warm",
    );
    // banger's own warm snapshot is no user's business: listed with --all only.
    let listed = ok(
        bus.banger_as(Some(USER_OK), &["snapshot", "list"]),
        "snapshot list",
    );
    assert!(!listed.contains(".warm-"), "{listed}");
    let listed = ok(
        bus.banger_as(Some(USER_OK), &["snapshot", "list", "--all"]),
        "snapshot list --all",
    );
    assert!(listed.contains(".warm-"), "{listed}");

    // The netns birth's namespace, as CNI's bridge plugin leaves a pod's.
    let ns = format!("blife{}", std::process::id());
    bus.sh_in_namespaces(&format!(
        "set -e; ip netns add {ns}; ip link add blh0 type veth peer name eth0 netns {ns}; \
         ip addr add 10.79.0.1/24 dev blh0; ip link set blh0 up; \
         ip -n {ns} addr add {POD_ADDRESS}/24 dev eth0; ip -n {ns} link set eth0 up; \
         ip -n {ns} route add default via 10.79.0.1"
    ));
    let netns = format!("/run/netns/{ns}");

    // The births.
    let share_arg = |who: Option<&str>| {
        let dir = if who.is_some() { &share } else { &root_share };
        format!("{}:/mnt/s", dir.display())
    };
    let publish_arg = format!("127.0.0.1:{PORT}:7070");
    let mut boot_ids = Vec::new();
    for b in BIRTHS {
        match b.how {
            How::Cold => {
                create(b.who, b.name, &["--cold"]);
            }
            How::Warm => {
                let out = create(b.who, b.name, &[]);
                assert!(out.contains("Restoring the warm snapshot"), "{out}");
                // People read the owner's name and a calendar time.
                let shown = ok(bus.banger_as(b.who, &["vm", "show", b.name]), "vm show");
                assert!(
                    shown.contains(&format!("{USER_OK} (")) && shown.contains(" UTC"),
                    "{shown}"
                );
            }
            How::Snapshot => {
                // The snapshot's image and shape are the VM's. `--json` answers with the VM
                // itself, as `vm show --json` does (the stages go to stderr).
                let out = bus.banger_as(
                    b.who,
                    &[
                        "--json",
                        "vm",
                        "create",
                        b.name,
                        "--snapshot",
                        "source-snap",
                    ],
                );
                assert!(out.status.success(), "vm create --snapshot: {}", text(&out));
                let vm: serde_json::Value = serde_json::from_slice(&out.stdout)
                    .unwrap_or_else(|e| panic!("vm create --json: {e}: {}", text(&out)));
                assert_eq!(
                    (
                        vm["name"].as_str(),
                        vm["state"].as_str(),
                        vm["memoryMib"].as_u64()
                    ),
                    (Some(b.name), Some("running"), Some(256)),
                    "{vm}"
                );
            }
            How::Older => {
                ok(
                    bus.banger_as(b.who, &["vm", "create", b.name, "--snapshot", "older-snap"]),
                    "vm create --snapshot of an older banger's",
                );
                // A fork of it (a snapshot of a VM running on MMIO, restored) keeps them too.
                let fork = format!("{}-fork", b.name);
                ok(
                    bus.banger_as(b.who, &["vm", "fork", b.name, &fork]),
                    "vm fork",
                );
                answers(&bus, b, &fork, "its birth");
                ok(
                    bus.banger_as(b.who, &["vm", "delete", "--force", &fork]),
                    "vm delete",
                );
                ok(
                    bus.banger_as(b.who, &["snapshot", "delete", &fork]),
                    "snapshot delete",
                );
            }
            How::Fork => {
                ok(
                    bus.banger_as(b.who, &["vm", "fork", "warm", b.name]),
                    "vm fork",
                );
            }
            How::Share => {
                create(b.who, b.name, &["--cold", "--share", &share_arg(b.who)]);
            }
            How::Publish => {
                create(b.who, b.name, &["--publish", &publish_arg]);
            }
            How::Folder => {
                let mut a = vec!["vm", "create", b.name, "--rootfs", tree.to_str().unwrap()];
                a.extend(SHAPE);
                ok(bus.banger_as(b.who, &a), "vm create --rootfs");
            }
            How::Netns => {
                create(b.who, b.name, &["--netns", &netns]);
            }
            How::WarmFolder => unreachable!("walked on a newer QEMU, below"),
        }
        answers(&bus, b, b.name, "its birth");
        born_on_time(&bus, b);
        born_apart(&bus, b, &mut boot_ids);
        if b.how == How::Share {
            // Root's folder above all: a setuid file there would be a root shell for anyone.
            let out = sh(
                &bus,
                b.who,
                b.name,
                "cp /bin/busybox /mnt/s/sh && chmod 4755 /mnt/s/sh",
            );
            refused(out, "Operation not permitted");
            let dir = if b.who.is_some() { &share } else { &root_share };
            let mode = std::os::unix::fs::PermissionsExt::mode(
                &std::fs::metadata(dir.join("sh")).unwrap().permissions(),
            );
            assert_eq!(mode & 0o6000, 0, "{}: sh is {mode:o}", b.name);
        }
    }
    // `vm run` of one's own VM the next day enters it (started when stopped) instead of
    // refusing the name; another user's name stays refused; --rm wants a new VM.
    let out = ok(
        bus.banger_as(Some(USER_OK), &["vm", "run", "warm", "--", "hostname"]),
        "vm run of a running VM",
    );
    assert!(
        out.contains("exists: entering it") && out.contains("warm"),
        "{out}"
    );
    ok(bus.banger_as(None, &["vm", "stop", "cold"]), "vm stop");
    let out = ok(
        bus.banger_as(None, &["vm", "run", "cold", "--", "hostname"]),
        "vm run of a stopped VM",
    );
    assert!(
        out.contains("exists: entering it") && out.contains("cold"),
        "{out}"
    );
    refused(
        bus.banger_as(Some(USER_OK2), &["vm", "run", "warm", "--", "hostname"]),
        "exists",
    );
    refused(
        bus.banger_as(
            Some(USER_OK),
            &["vm", "run", "--rm", "warm", "--", "hostname"],
        ),
        "exists",
    );
    ok(
        bus.banger_as(None, &["vm", "delete", "--force", "source"]),
        "delete source",
    );
    violations(&bus, "the births");

    let vms: Vec<&Birth> = BIRTHS.iter().collect();
    let paths = walk(&bus, &conn, &vms).await;
    // The snapshots the walk took go last (a VM layered on each until its delete).
    for b in BIRTHS
        .iter()
        .filter(|b| refusal(b.how, Step::Snapshot).is_none())
    {
        ok(
            bus.banger_as(b.who, &["snapshot", "delete", &format!("{}-s", b.name)]),
            "snapshot delete",
        );
    }
    for snap in ["forked", "source-snap"] {
        let _ = bus.banger_as(None, &["snapshot", "delete", snap]);
    }
    older(
        &["snapshot", "delete", "older-snap"],
        "snapshot delete older-snap",
    );
    // The image goes with its warm snapshot (banger's cache, which no one else can delete),
    // and nothing of either is left.
    ok(
        bus.banger_as(None, &["image", "delete", "life"]),
        "image delete",
    );
    let left = ok(
        bus.banger_as(None, &["snapshot", "list", "--all"]),
        "snapshot list",
    );
    assert!(!left.contains(".warm"), "{left}");
    let dirs = entries(&bus.state_dir().join("snapshots"));
    assert!(
        dirs.is_empty(),
        "snapshot directories outlive their image: {dirs:?}"
    );
    violations(&bus, "the cleanup");
    // The folder VM's root outlives it, with what its guest wrote.
    assert!(tree.join("etc/marker").exists() && tree.join("usr/local/bin/banger-agent").exists());
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "lifecycle: {paths} paths ({} births × {} transitions), all hold",
        BIRTHS.len(),
        STEPS.len()
    );
    assert_eq!(paths, BIRTHS.len() * STEPS.len());
}

/// The birth that needs a QEMU able to save virtio-fs devices (8.2 and later; the host's
/// is 7.2, so Debian's backport, which tests/run unpacks): a member's VM whose root is a
/// folder, started from the warm snapshot of folder roots, beside a cold one of root's.
const NEWER_QEMU_BIRTHS: &[Birth] = &[
    Birth {
        name: "folder",
        who: None,
        how: How::Folder,
    },
    Birth {
        name: "warmfolder",
        who: Some(USER_OK),
        how: How::WarmFolder,
    },
];

#[tokio::test(flavor = "multi_thread")]
async fn a_folder_root_started_warm_goes_through_every_transition() {
    let Some((_state, bus)) = warm_folder_bus().await else {
        return;
    };
    let folder = tempfile::tempdir().unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(folder.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let mut boot_ids = Vec::new();
    for b in NEWER_QEMU_BIRTHS {
        let tree = folder.path().join(b.name);
        std::fs::create_dir(&tree).unwrap();
        busybox_tree(&tree, b.who.map(uid_of).unwrap_or(0));
        let mut a = vec!["vm", "create", b.name, "--rootfs", tree.to_str().unwrap()];
        a.extend(SHAPE);
        let out = ok(bus.banger_as(b.who, &a), "vm create --rootfs");
        match b.how {
            // The shape's first boots cold and leads to the warm snapshot.
            How::Folder => {
                assert!(!out.contains("warm snapshot"), "{out}");
                let warm = poll_until(
                    std::time::Duration::from_secs(240),
                    std::time::Duration::from_millis(500),
                    || {
                        text(&bus.banger_as(None, &["--json", "snapshot", "list", "--all"]))
                            .contains("\".warm-")
                    },
                );
                assert!(warm, "no warm snapshot of folder roots");
            }
            _ => assert!(
                out.contains("Restoring the warm snapshot of folder roots"),
                "{out}"
            ),
        }
        answers(&bus, b, b.name, "its birth");
        born_on_time(&bus, b);
        born_apart(&bus, b, &mut boot_ids);
    }
    violations(&bus, "the births");
    let conn = bus.connect().await;
    let vms: Vec<&Birth> = NEWER_QEMU_BIRTHS.iter().collect();
    let paths = walk(&bus, &conn, &vms).await;
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "lifecycle (newer QEMU): {paths} paths ({} births × {} transitions), all hold",
        NEWER_QEMU_BIRTHS.len(),
        STEPS.len()
    );
    assert_eq!(paths, NEWER_QEMU_BIRTHS.len() * STEPS.len());
}

/// Walks `vms` through every step of [`STEPS`] (each step's VMs at once), checking that
/// each answers and the invariants hold after every step; returns the paths walked.
async fn walk(bus: &TestBus, conn: &zbus::Connection, vms: &[&Birth]) -> usize {
    let mut paths = 0;
    for step in STEPS {
        let after = format!("{step:?}");
        match step {
            Step::StopStart => each(vms, |b| {
                ok(bus.banger_as(b.who, &["vm", "stop", b.name]), "vm stop");
                // Both verbs are idempotent, as docker's and machinectl's are.
                ok(
                    bus.banger_as(b.who, &["vm", "stop", b.name]),
                    "vm stop again",
                );
                ok(bus.banger_as(b.who, &["vm", "start", b.name]), "vm start");
                let again = ok(
                    bus.banger_as(b.who, &["vm", "start", b.name]),
                    "vm start again",
                );
                assert!(again.contains("is running already"), "{again}");
                answers(bus, b, b.name, &after);
            }),
            Step::PauseResume => each(vms, |b| {
                ok(bus.banger_as(b.who, &["vm", "pause", b.name]), "vm pause");
                // Paused for a while (what is under test, not a wait for readiness): its
                // clock stands still meanwhile, and the resume sets it.
                std::thread::sleep(PAUSE);
                ok(bus.banger_as(b.who, &["vm", "resume", b.name]), "vm resume");
                let off = clock_offset(bus, b, b.name);
                use std::io::Write;
                let _ = writeln!(
                    std::io::stderr(),
                    "lifecycle: {} is {off:+.3} s off the host after a {} s pause",
                    b.name,
                    PAUSE.as_secs()
                );
                assert!(off.abs() < 0.5, "{}: {off:+.3} s off the host", b.name);
                answers(bus, b, b.name, &after);
            }),
            Step::Snapshot => each(vms, |b| {
                let snap = format!("{}-s", b.name);
                let out = bus.banger_as(b.who, &["vm", "snapshot", b.name, &snap]);
                match refusal(b.how, *step) {
                    Some(why) => refused(out, why),
                    None => drop(ok(out, "vm snapshot")),
                }
                answers(bus, b, b.name, &after);
            }),
            Step::RestartRunning => {
                kill_daemon(bus, conn).await;
                each(vms, |b| answers(bus, b, b.name, &after));
            }
            Step::RestartStopped => {
                each(vms, |b| {
                    ok(bus.banger_as(b.who, &["vm", "stop", b.name]), "vm stop");
                });
                kill_daemon(bus, conn).await;
                each(vms, |b| {
                    ok(bus.banger_as(b.who, &["vm", "start", b.name]), "vm start");
                    answers(bus, b, b.name, &after);
                });
            }
            Step::StopStartSnapshotRestore => each(vms, |b| {
                ok(bus.banger_as(b.who, &["vm", "stop", b.name]), "vm stop");
                ok(bus.banger_as(b.who, &["vm", "start", b.name]), "vm start");
                let snap = format!("{}-r", b.name);
                let out = bus.banger_as(b.who, &["vm", "snapshot", b.name, &snap]);
                if let Some(why) = refusal(b.how, *step) {
                    refused(out, why);
                    answers(bus, b, b.name, &after);
                    return;
                }
                ok(out, "vm snapshot");
                let copy = format!("{}-copy", b.name);
                ok(
                    bus.banger_as(b.who, &["vm", "create", &copy, "--snapshot", &snap]),
                    "the restore",
                );
                answers(bus, b, &copy, &after);
                answers(bus, b, b.name, &after);
                ok(
                    bus.banger_as(b.who, &["vm", "delete", "--force", &copy]),
                    "delete the copy",
                );
                ok(
                    bus.banger_as(b.who, &["snapshot", "delete", &snap]),
                    "delete the snapshot",
                );
            }),
            Step::Delete => {
                each(vms, |b| {
                    if b.how == How::Publish {
                        // The daemon loses track of this one: its pid files go (a crash
                        // between a write and a rename, a wiped runtime directory). A
                        // forced delete must still leave nothing running (it once left
                        // QEMU and its helpers and said nothing).
                        let id = vm_id(bus, b);
                        let run = bus.runtime.join("vms").join(&id);
                        for e in std::fs::read_dir(&run).unwrap().flatten() {
                            if e.file_name().to_string_lossy().ends_with(".pid") {
                                std::fs::remove_file(e.path()).unwrap();
                            }
                        }
                    }
                    ok(
                        bus.banger_as(b.who, &["vm", "delete", "--force", b.name]),
                        "vm delete",
                    );
                    let gone = bus.banger_as(b.who, &["vm", "show", b.name]);
                    assert!(!gone.status.success(), "{} is still shown", b.name);
                });
                assert!(
                    vm_processes(bus).is_empty(),
                    "VM processes outlive their VMs: {:?}",
                    vm_processes(bus)
                );
                let dirs = entries(&bus.state_dir().join("vms"));
                assert!(
                    dirs.is_empty(),
                    "VM directories outlive their VMs: {dirs:?}"
                );
            }
        }
        violations(bus, &after);
        paths += vms.len();
    }
    paths
}
