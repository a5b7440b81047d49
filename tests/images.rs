//! Image pulls for real: a docker-registry on 127.0.0.1, layouts built here and pushed with
//! skopeo, `PullImage` through the bus-activated daemon, the result read back with debugfs.

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use banger::dbus::proxy::{Images1Proxy, Jobs1Proxy};
use common::oci::*;
use common::*;
use futures_util::StreamExt;
use zbus::{OwnedVariant, Variant};

const TOOLS: &[&str] = &[
    "dbus-daemon",
    "gdbus",
    "unshare",
    "docker-registry",
    "skopeo",
    "debugfs",
    "mkfs.ext4",
    "busybox",
];

fn opts(name: Option<&str>) -> HashMap<String, OwnedVariant> {
    let mut m = HashMap::new();
    m.insert(
        "insecure".into(),
        OwnedVariant::try_from(Variant::from(true)).unwrap(),
    );
    if let Some(n) = name {
        m.insert(
            "name".into(),
            OwnedVariant::try_from(Variant::from(n)).unwrap(),
        );
    }
    m
}

/// Pulls and waits for the job; returns (result, error) or the method's own error.
async fn pull(
    bus: &TestBus,
    conn: &zbus::Connection,
    reference: &str,
    name: Option<&str>,
) -> Result<(String, String), zbus::Error> {
    let jobs = Jobs1Proxy::new(conn).await.unwrap();
    let mut removed = jobs.receive_job_removed().await.unwrap();
    let images = Images1Proxy::new(conn).await.unwrap();
    let (id, _) = images.pull_image(reference, opts(name)).await?;
    let result = loop {
        let sig = removed.next().await.expect("JobRemoved");
        let a = sig.args().unwrap();
        if a.id == id {
            break a.result.clone();
        }
    };
    let store = banger::store::Store::open(&bus.state_dir().join("banger.db")).unwrap();
    let mut error = String::new();
    let every = std::time::Duration::from_millis(50);
    poll_until_async(every * 50, every, || {
        let rec = store
            .call_blocking(move |c| banger::store::rows::find_job(c, id))
            .unwrap();
        rec.filter(|r| r.state != "running")
            .map(|r| error = r.error)
            .is_some()
    })
    .await;
    Ok((result, error))
}

fn debugfs(image: &Path, cmd: &str) -> String {
    let out = Command::new("debugfs")
        .args(["-R", cmd])
        .arg(image)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn image_dir(bus: &TestBus, name: &str) -> PathBuf {
    let store = banger::store::Store::open(&bus.state_dir().join("banger.db")).unwrap();
    let n = name.to_owned();
    let img = store
        .call_blocking(move |c| banger::store::rows::find_image(c, &n))
        .unwrap()
        .expect("image row");
    img.rootfs_path.parent().unwrap().to_owned()
}

fn no_staging_left(bus: &TestBus) {
    let leftovers: Vec<_> = std::fs::read_dir(bus.state_dir().join("images"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with(".staging-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

fn busybox_layout(dir: &Path, comp: Comp) -> PathBuf {
    let layout = dir.join(if comp == Comp::Zstd { "zstd" } else { "gzip" });
    let m = image_manifest(&layout, &busybox_layers(), comp, "amd64");
    finish_layout(&layout, vec![m], "v1");
    layout
}

#[tokio::test(flavor = "multi_thread")]
async fn pull_flattens_layers_into_a_bootable_ext4() {
    if !available(TOOLS) {
        return;
    }
    let registry = TestRegistry::start();
    let work = tempfile::tempdir().unwrap();
    let layout = busybox_layout(work.path(), Comp::Gzip);
    let reference = registry.push(&layout, "v1", "test/tiny", &[]);
    // Runtime on tmpfs: the tree is flattened in memory, only the ext4 reaches the disk.
    let bus = TestBus::start(BusOptions {
        runtime_on_tmpfs: true,
        ..Default::default()
    });
    let conn = bus.connect().await;

    let (result, error) = pull(&bus, &conn, &reference, None).await.unwrap();
    assert_eq!(result, "done", "{error}");
    let images = Images1Proxy::new(&conn).await.unwrap();
    let listed = images.list_images().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].1, "tiny-v1");
    assert_eq!(listed[0].3, reference);
    let dir = image_dir(&bus, "tiny-v1");
    let rootfs = dir.join("rootfs.ext4");

    // Whiteouts and the opaque directory applied.
    let etc = debugfs(&rootfs, "ls /etc");
    assert!(
        etc.contains("hostname") && !etc.contains("gone") && !etc.contains(".wh."),
        "{etc}"
    );
    let opq = debugfs(&rootfs, "ls /opq");
    assert!(opq.contains("new") && !opq.contains("old"), "{opq}");
    // Owners, setuid, links and xattrs kept.
    let su = debugfs(&rootfs, "stat /usr/bin/su");
    assert!(
        su.contains("Mode:  04755") && su.contains("User:     0"),
        "{su}"
    );
    let mine = debugfs(&rootfs, "stat /home/user/mine");
    assert!(
        mine.contains("User:  1000") && mine.contains("Mode:  0600"),
        "{mine}"
    );
    let sh = debugfs(&rootfs, "stat /bin/sh");
    assert!(
        sh.contains("Type: symlink") && sh.contains("\"busybox\""),
        "{sh}"
    );
    assert!(debugfs(&rootfs, "stat /bin/hardbox").contains("Links: 2"));
    assert!(debugfs(&rootfs, "ea_get /etc/xattr user.banger").contains("yes"));
    let null = debugfs(&rootfs, "stat /dev/null");
    assert!(
        null.contains("Type: character special")
            && null.contains("Device major/minor number: 01:03"),
        "{null}"
    );
    // Guest assets injected with the right modes.
    let agent = debugfs(&rootfs, "stat /usr/local/bin/banger-agent");
    assert!(
        agent.contains("Mode:  0755") && agent.contains("User:     0"),
        "{agent}"
    );
    assert!(
        debugfs(&rootfs, "ls /etc/systemd/system/multi-user.target.wants")
            .contains("banger-agent.service")
    );
    assert!(debugfs(&rootfs, "cat /etc/modules-load.d/banger.conf")
        .contains("vmw_vsock_virtio_transport"));
    // The work seed holds /root.
    let seed = debugfs(&dir.join("work-seed.ext4"), "ls /");
    assert!(seed.contains(".profile"), "{seed}");
    // The tree was flattened in the tmpfs scratch directory and is gone from it.
    let journal_free = std::fs::read_dir(bus.runtime.join("scratch"))
        .unwrap()
        .count();
    assert_eq!(journal_free, 0, "scratch is empty after the pull");
    // Blobs (two layers and the configuration, read for its labels) are in the cache by
    // digest; no staging left.
    let blobs = std::fs::read_dir(bus.state_dir().join("cache/oci/sha256"))
        .unwrap()
        .count();
    assert_eq!(blobs, 3);
    no_staging_left(&bus);

    // A second pull of the same ref under the default name is refused at once.
    match pull(&bus, &conn, &reference, None).await {
        Err(zbus::Error::MethodError(n, Some(m), _)) => {
            assert_eq!(n.as_str(), "org.banger.Error.AlreadyExists");
            assert!(m.contains("tiny-v1"), "{m}");
        }
        other => panic!("{other:?}"),
    }

    // Delete refuses while a VM uses the image, then removes row and files.
    let store = banger::store::Store::open(&bus.state_dir().join("banger.db")).unwrap();
    let image = store
        .call_blocking(|c| banger::store::rows::find_image(c, "tiny-v1"))
        .unwrap()
        .unwrap();
    let vm_id = banger::model::new_id();
    let img_id = image.id.clone();
    let vid = vm_id.clone();
    store
        .call_blocking(move |c| {
            c.execute(
                "INSERT INTO vms (id, name, state, stage, image_id, kernel, vcpus, memory_mib, disk_size, owner_uid, \
                 guest_address, mac_address, vsock_cid, tap_name, created_at) \
                 VALUES (?1, 'user', 'stopped', '', ?2, 'k', 1, 256, 0, 0, '10.0.0.2', 'm', 3, 't', 0)",
                [&vid, &img_id],
            )?;
            Ok(())
        })
        .unwrap();
    match images.delete_image("tiny-v1").await {
        Err(zbus::Error::MethodError(n, Some(m), _)) => {
            assert_eq!(n.as_str(), "org.banger.Error.InUse");
            assert!(m.contains("1 VM"), "{m}");
        }
        other => panic!("{other:?}"),
    }
    store
        .call_blocking(move |c| Ok(c.execute("DELETE FROM vms WHERE id = ?1", [&vm_id])?))
        .unwrap();
    images.delete_image("tiny-v1").await.unwrap();
    assert!(images.list_images().await.unwrap().is_empty());
    assert!(!dir.exists());

    // The download cache is the system's: a member may not empty it, root may, over either
    // transport, and a pull after it fetches the layers again.
    let out = bus.banger_as(Some(USER_OK), &["image", "prune"]);
    assert!(
        !out.status.success() && text(&out).contains("org.banger.vms.manage-any"),
        "{}",
        text(&out)
    );
    let cached = || {
        std::fs::read_dir(bus.state_dir().join("cache/oci/sha256"))
            .unwrap()
            .count()
    };
    assert_eq!(cached(), 3);
    let out = bus.banger_as(None, &["--json", "image", "prune"]);
    assert!(out.status.success(), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["blobs"], 3, "{v}");
    assert!(v["freedBytes"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(cached(), 0);
    let (result, error) = pull(&bus, &conn, &reference, None).await.unwrap();
    assert_eq!(result, "done", "{error}");
    assert_eq!(cached(), 3);
    let sock = format!("--varlink={}", bus.runtime.join("io.banger").display());
    let out = bus.banger_as(None, &[&sock, "image", "prune"]);
    assert!(
        out.status.success() && text(&out).contains("Removed 3 cached blob(s)"),
        "{}",
        text(&out)
    );
    assert_eq!(cached(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn zstd_docker_v2s2_and_multi_arch_images_pull() {
    if !available(TOOLS) {
        return;
    }
    let registry = TestRegistry::start();
    let work = tempfile::tempdir().unwrap();
    let zstd = registry.push(
        &busybox_layout(work.path(), Comp::Zstd),
        "v1",
        "test/zstd",
        &[],
    );
    let v2s2 = registry.push(
        &busybox_layout(work.path(), Comp::Gzip),
        "v1",
        "test/docker",
        &["--format", "v2s2"],
    );
    // An index with an arm64 image first; banger must pick amd64.
    let multi = work.path().join("multi");
    let arm = image_manifest(
        &multi,
        &[Layer::default().file("arch", b"arm64", 0o644, 0).bytes()],
        Comp::Gzip,
        "arm64",
    );
    let amd = image_manifest(
        &multi,
        &[Layer::default().file("arch", b"amd64", 0o644, 0).bytes()],
        Comp::Gzip,
        "amd64",
    );
    finish_layout(&multi, vec![arm, amd], "v1");
    let multi = registry.push(&multi, "v1", "test/multi", &[]);

    let bus = TestBus::start(BusOptions::default());
    let conn = bus.connect().await;
    for (reference, name) in [
        (&zstd, "zstd-v1"),
        (&v2s2, "docker-v1"),
        (&multi, "multi-v1"),
    ] {
        let (result, error) = pull(&bus, &conn, reference, None).await.unwrap();
        assert_eq!(result, "done", "{reference}: {error}");
        let rootfs = image_dir(&bus, name).join("rootfs.ext4");
        if name == "multi-v1" {
            assert_eq!(debugfs(&rootfs, "cat /arch").trim(), "amd64");
        } else {
            assert!(
                debugfs(&rootfs, "stat /usr/bin/su").contains("Mode:  04755"),
                "{name}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_and_corrupt_images_are_refused_and_leave_nothing() {
    if !available(TOOLS) {
        return;
    }
    let registry = TestRegistry::start();
    let work = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let hostile: Vec<(&str, Vec<Vec<u8>>, &str)> = vec![
        (
            "dotdot",
            vec![Layer::default().file("../../evil", b"x", 0o644, 0).bytes()],
            "contains '..'",
        ),
        (
            "symlink",
            vec![
                Layer::default()
                    .link(
                        "escape",
                        tar::EntryType::Symlink,
                        outside.path().to_str().unwrap(),
                    )
                    .bytes(),
                Layer::default()
                    .file("escape/pwned", b"x", 0o644, 0)
                    .bytes(),
            ],
            "writes through the symlink",
        ),
        (
            "hardlink",
            vec![Layer::default()
                .link("shadow", tar::EntryType::Link, "/etc/shadow")
                .bytes()],
            "hard link target",
        ),
    ];
    let bus = TestBus::start(BusOptions::default());
    let conn = bus.connect().await;
    for (name, layers, needle) in hostile {
        let layout = work.path().join(name);
        let m = image_manifest(&layout, &layers, Comp::Gzip, "amd64");
        finish_layout(&layout, vec![m], "v1");
        let reference = registry.push(&layout, "v1", &format!("hostile/{name}"), &[]);
        let (result, error) = pull(&bus, &conn, &reference, None).await.unwrap();
        assert_eq!(result, "failed", "{name}");
        assert!(error.contains(needle), "{name}: {error}");
        // The CLI says so and fails.
        let out = bus.banger_as(
            None,
            &["image", "pull", "--insecure", "--name", "cli", &reference],
        );
        assert!(!out.status.success());
        assert!(text(&out).contains(needle), "{}", text(&out));
    }
    assert!(
        std::fs::read_dir(outside.path()).unwrap().next().is_none(),
        "wrote outside"
    );

    // A blob whose bytes do not match its digest.
    let layout = busybox_layout(work.path(), Comp::Gzip);
    let reference = registry.push(&layout, "v1", "test/tampered", &[]);
    let blobs = registry.storage().join("docker/registry/v2/blobs/sha256");
    let mut biggest: Option<(u64, PathBuf)> = None;
    for prefix in std::fs::read_dir(&blobs).unwrap() {
        for blob in std::fs::read_dir(prefix.unwrap().path()).unwrap() {
            let data = blob.unwrap().path().join("data");
            let len = std::fs::metadata(&data).unwrap().len();
            if biggest.as_ref().map(|(l, _)| len > *l).unwrap_or(true) {
                biggest = Some((len, data));
            }
        }
    }
    let (_, data) = biggest.unwrap();
    let mut bytes = std::fs::read(&data).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&data, bytes).unwrap();
    let (result, error) = pull(&bus, &conn, &reference, Some("tampered"))
        .await
        .unwrap();
    assert_eq!(result, "failed");
    assert!(error.contains("does not match its digest"), "{error}");

    // Bad arguments are refused before any job starts.
    let images = Images1Proxy::new(&conn).await.unwrap();
    for (r, name, needle) in [
        ("Not A Ref", None, "Malformed image reference"),
        (reference.as_str(), Some("../x"), "Invalid image name"),
    ] {
        match images.pull_image(r, opts(name)).await {
            Err(zbus::Error::MethodError(n, Some(m), _)) => {
                assert_eq!(n.as_str(), "org.banger.Error.InvalidArgument");
                assert!(m.contains(needle), "{m}");
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(images.list_images().await.unwrap().is_empty());
    no_staging_left(&bus);
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_pulls_of_one_name_have_exactly_one_winner() {
    if !available(TOOLS) {
        return;
    }
    let registry = TestRegistry::start();
    let work = tempfile::tempdir().unwrap();
    let reference = registry.push(
        &busybox_layout(work.path(), Comp::Gzip),
        "v1",
        "test/race",
        &[],
    );
    let bus = TestBus::start(BusOptions::default());
    let conn = bus.connect().await;
    // Fifty at once (issue 17's scale): one image, every other pull refused or failed with
    // the reason, nothing left behind.
    let results = futures_util::future::join_all(
        (0..50).map(|_| pull(&bus, &conn, &reference, Some("same"))),
    )
    .await;
    let mut winners = 0;
    for r in results {
        match r {
            Ok((res, _)) if res == "done" => winners += 1,
            Ok((res, err)) => {
                assert_eq!(res, "failed");
                assert!(err.contains("was published while this pull ran"), "{err}");
            }
            Err(zbus::Error::MethodError(n, _, _)) => {
                assert_eq!(n.as_str(), "org.banger.Error.AlreadyExists")
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    assert_eq!(winners, 1);
    let images = Images1Proxy::new(&conn).await.unwrap();
    assert_eq!(images.list_images().await.unwrap().len(), 1);
    no_staging_left(&bus);
}

/// Follows a job's stages until `stage` is reached.
async fn wait_for_stage(conn: &zbus::Connection, path: &zbus::OwnedObjectPath, stage: &str) {
    let job = banger::dbus::proxy::Job1Proxy::builder(conn)
        .path(path.clone())
        .build()
        .await
        .unwrap();
    let mut changes = job.receive_stage_changed().await;
    if job.stage().await.unwrap() == stage {
        return;
    }
    while let Some(c) = changes.next().await {
        if c.get().await.unwrap() == stage {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn pulls_of_different_names_overlap() {
    if !available(TOOLS) {
        return;
    }
    let registry = TestRegistry::start();
    let work = tempfile::tempdir().unwrap();
    let layout = busybox_layout(work.path(), Comp::Gzip);
    let direct = registry.push(&layout, "v1", "test/free", &[]);
    registry.push(&layout, "v1", "test/held", &[]);
    let gate = GateProxy::start(&registry.host).await;
    let held = format!("{}/test/held:v1", gate.host);
    let bus = TestBus::start(BusOptions::default());
    let conn = bus.connect().await;

    // The first pull is held inside its body (its job runs, its staging dir exists).
    let images = Images1Proxy::new(&conn).await.unwrap();
    let jobs = Jobs1Proxy::new(&conn).await.unwrap();
    let mut removed = jobs.receive_job_removed().await.unwrap();
    let (held_id, held_path) = images.pull_image(&held, opts(None)).await.unwrap();
    wait_for_stage(&conn, &held_path, "resolve").await;
    // A pull of another name runs from start to publication meanwhile.
    let (result, error) = pull(&bus, &conn, &direct, None).await.unwrap();
    assert_eq!(result, "done", "{error}");
    let running = jobs.list_jobs().await.unwrap();
    assert!(
        running.iter().any(|j| j.0 == held_id),
        "the held pull is still running"
    );
    // Opening the gate lets the first one finish too.
    gate.open();
    loop {
        let sig = removed.next().await.unwrap();
        let a = sig.args().unwrap();
        if a.id == held_id {
            assert_eq!(a.result, "done");
            break;
        }
    }
    let names: Vec<String> = images
        .list_images()
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.1)
        .collect();
    assert!(
        names.contains(&"free-v1".to_string()) && names.contains(&"held-v1".to_string()),
        "{names:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_daemon_killed_mid_pull_leaves_nothing_behind() {
    if !available(TOOLS) {
        return;
    }
    let registry = TestRegistry::start();
    let work = tempfile::tempdir().unwrap();
    let layout = busybox_layout(work.path(), Comp::Gzip);
    let first = registry.push(&layout, "v1", "test/first", &[]);
    let other = work.path().join("other");
    let m = image_manifest(
        &other,
        &[Layer::default().file("other", b"other", 0o644, 0).bytes()],
        Comp::Gzip,
        "amd64",
    );
    finish_layout(&other, vec![m], "v1");
    registry.push(&other, "v1", "test/killed", &[]);
    let gate = GateProxy::start(&registry.host).await;
    let bus = TestBus::start(BusOptions::default());
    let conn = bus.connect().await;
    // A completed pull fills the blob cache.
    let (result, error) = pull(&bus, &conn, &first, None).await.unwrap();
    assert_eq!(result, "done", "{error}");
    let cache = bus.state_dir().join("cache/oci/sha256");
    let cached: Vec<_> = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();

    // A second pull is held mid-way; the daemon dies.
    let images = Images1Proxy::new(&conn).await.unwrap();
    let (job_id, path) = images
        .pull_image(&format!("{}/test/killed:v1", gate.host), opts(None))
        .await
        .unwrap();
    wait_for_stage(&conn, &path, "resolve").await;
    // The job's history row is written by the recorder, beside (not before) the bus's view of
    // the job: kill once it is there, since what the next daemon makes of it is checked below.
    let store = banger::store::Store::open(&bus.state_dir().join("banger.db")).unwrap();
    wait_until_async(
        &format!("job {job_id} recorded"),
        std::time::Duration::from_secs(30),
        || {
            store
                .call_blocking(move |c| banger::store::rows::find_job(c, job_id))
                .unwrap()
                .is_some()
        },
    )
    .await;
    let staging: Vec<_> = std::fs::read_dir(bus.state_dir().join("images"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with(".staging-")
        })
        .collect();
    assert_eq!(staging.len(), 1, "the pull works in a staging dir");
    let pid = bus.owner_pid(&conn, "org.banger").await.unwrap();
    // SAFETY: plain kill(2) of the daemon we found on the bus.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    assert!(
        bus.wait_name_gone(&conn, "org.banger", std::time::Duration::from_secs(10))
            .await
    );

    // The next call starts a new daemon, which sweeps the leftovers before taking the name.
    let names: Vec<String> = images
        .list_images()
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.1)
        .collect();
    assert_eq!(names, vec!["first-v1".to_string()]);
    no_staging_left(&bus);
    let after: Vec<_> = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(after, cached, "the blob cache is intact");
    let rec = store
        .call_blocking(move |c| banger::store::rows::find_job(c, job_id))
        .unwrap()
        .unwrap();
    assert_eq!(rec.state, "failed");
    assert!(rec.error.contains("Interrupted"), "{}", rec.error);
    gate.open();
}

#[tokio::test(flavor = "multi_thread")]
async fn register_and_promote_only_take_files_the_caller_can_read() {
    if !available(&[
        "dbus-daemon",
        "gdbus",
        "unshare",
        "mkfs.ext4",
        "debugfs",
        "setpriv",
    ]) {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let files = tempfile::tempdir().unwrap();
    std::fs::set_permissions(files.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let tree = files.path().join("tree");
    std::fs::create_dir(&tree).unwrap();
    std::fs::write(tree.join("marker"), b"registered\n").unwrap();
    let rootfs = files.path().join("rootfs.ext4");
    let u = banger::ext4::usage(&tree).unwrap();
    banger::ext4::build(&tree, &rootfs, 64 << 20, u, "rootfs").unwrap();
    let seed = files.path().join("seed.ext4");
    std::fs::copy(&rootfs, &seed).unwrap();
    let ok_uid = uid_of(USER_OK);
    for f in [&rootfs, &seed] {
        std::os::unix::fs::chown(f, Some(ok_uid), None).unwrap();
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let secret = files.path().join("secret.ext4");
    std::fs::copy(&rootfs, &secret).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();

    let bus = TestBus::start(BusOptions::default());
    let conn = bus.connect().await;
    let register = |name: &str, path: &Path, seed: Option<&Path>| {
        let mut opts = format!("{{'rootfs': <'{}'>", path.display());
        if let Some(s) = seed {
            opts.push_str(&format!(", 'work_seed': <'{}'>", s.display()));
        }
        opts.push('}');
        text(&bus.gdbus_as(
            Some(USER_OK),
            true,
            "/org/banger",
            "org.banger.Images1.RegisterImage",
            &[name, &opts],
        ))
    };
    let out = register("mine", &rootfs, None);
    assert!(out.contains("/org/banger/image/"), "{out}");
    let out = register("stolen", &secret, None);
    assert!(
        out.contains("org.banger.Error.InvalidArgument")
            && out.contains("cannot read this file yourself"),
        "{out}"
    );
    let out = register("device", Path::new("/dev/null"), None);
    assert!(out.contains("not a regular file"), "{out}");

    let images = Images1Proxy::new(&conn).await.unwrap();
    let listed = images.list_images().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0].1.as_str(), listed[0].2), ("mine", false));
    // Re-registering updates the same image.
    let out = register("mine", &rootfs, Some(&seed));
    assert!(out.contains(&listed[0].4.to_string()), "{out}");
    let seed_prop = bus.busctl_as(
        None,
        &[
            "get-property",
            "org.banger",
            listed[0].4.as_str(),
            "org.banger.Image1",
            "WorkSeedPath",
        ],
    );
    assert!(
        text(&seed_prop).contains("seed.ext4"),
        "{}",
        text(&seed_prop)
    );

    // Promotion copies into managed storage, as a job.
    let jobs = Jobs1Proxy::new(&conn).await.unwrap();
    let mut removed = jobs.receive_job_removed().await.unwrap();
    let out = text(&bus.gdbus_as(
        Some(USER_OK),
        true,
        "/org/banger",
        "org.banger.Images1.PromoteImage",
        &["mine"],
    ));
    let id: u32 = out
        .split("uint32 ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{out}"));
    loop {
        let sig = removed.next().await.unwrap();
        let a = sig.args().unwrap();
        if a.id == id {
            assert_eq!(a.result, "done");
            break;
        }
    }
    let dir = image_dir(&bus, "mine");
    assert!(dir.starts_with(bus.state_dir()), "{}", dir.display());
    assert_eq!(
        debugfs(&dir.join("rootfs.ext4"), "cat /marker"),
        "registered\n"
    );
    assert!(dir.join("work-seed.ext4").exists());
    let listed = images.list_images().await.unwrap();
    assert!(listed[0].2, "managed now");
    // A managed image cannot be changed by registering, nor promoted twice.
    let out = register("mine", &rootfs, None);
    assert!(out.contains("org.banger.Error.AlreadyExists"), "{out}");
    match images.promote_image("mine").await {
        Err(zbus::Error::MethodError(n, Some(m), _)) => {
            assert_eq!(n.as_str(), "org.banger.Error.InvalidArgument");
            assert!(m.contains("already managed"), "{m}");
        }
        other => panic!("{other:?}"),
    }
    // The user's own file is untouched.
    assert!(rootfs.exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn build_image_debootstraps_the_default_image() {
    if !available(&[
        "dbus-daemon",
        "unshare",
        "debootstrap",
        "debugfs",
        "mkfs.ext4",
    ]) {
        return;
    }
    // debootstrap fetches from the host's Debian mirror (a package registry), as the
    // default image's build does for users; the state outlives this bus, whose daemon has
    // the host's network, for the one below that boots the image in a namespace.
    let state = tempfile::tempdir().unwrap();
    let bus = TestBus::start(BusOptions {
        runtime_on_tmpfs: true,
        state_dir: Some(state.path().to_owned()),
        ..Default::default()
    });
    let out = bus.banger_as(Some(USER_OK), &["image", "build", "debian-bookworm"]);
    assert!(out.status.success(), "{}", text(&out));
    let dir = image_dir(&bus, "debian-bookworm");
    let rootfs = dir.join("rootfs.ext4");
    for f in [
        "/usr/sbin/sshd",
        "/lib/systemd/systemd",
        "/usr/sbin/ip",
        "/usr/local/bin/banger-agent",
    ] {
        assert!(
            debugfs(&rootfs, &format!("stat {f}")).contains("Inode:"),
            "{f} missing"
        );
    }
    let wants = debugfs(&rootfs, "ls /etc/systemd/system/multi-user.target.wants");
    for unit in [
        "banger-agent.service",
        "banger-network.service",
        "banger-ssh-keygen.service",
    ] {
        assert!(wants.contains(unit), "{unit} not enabled: {wants}");
    }
    // The virtual terminals' login prompts are masked (a VM has no screen; each redraws
    // when a restored VM gets its address); the serial console's is not.
    for unit in ["getty@.service", "getty-static.service"] {
        let link = debugfs(&rootfs, &format!("stat /etc/systemd/system/{unit}"));
        assert!(
            link.contains("Type: symlink") && link.contains("\"/dev/null\""),
            "{unit} not masked: {link}"
        );
    }
    // No two VMs may share host keys: the image carries none.
    assert!(
        !debugfs(&rootfs, "ls /etc/ssh").contains("ssh_host_"),
        "host keys left in the image"
    );
    // The build log is kept.
    let logs: Vec<_> = std::fs::read_dir(bus.state_dir().join("logs"))
        .unwrap()
        .collect();
    assert_eq!(logs.len(), 1);
    let src = bus.busctl_as(
        None,
        &[
            "call",
            "org.banger",
            "/org/banger",
            "org.banger.Images1",
            "ListImages",
        ],
    );
    assert!(
        text(&src).contains("debootstrap:bookworm"),
        "{}",
        text(&src)
    );

    // Booted: a VM started warm is one whose boot is done (its template was snapshotted
    // once systemd's jobs were, not at the agent's first answer: every warm start finished
    // that boot after it was ready), with no login prompt but the serial console's.
    let Some((vmlinuz, modules, _)) = debian_kernel() else {
        return;
    };
    if guest_bins().is_none() || !available(vm::VM_TOOLS) {
        return;
    }
    vm::import_kernel(&bus.connect().await, "test", &vmlinuz, &modules).await;
    drop(bus);
    let bus = TestBus::start(BusOptions {
        extra_config: "accel = \"tcg\"\nboot_timeout_sec = 240\ndefault_kernel = \"test\"\n\
                       warm_snapshots = true\n"
            .into(),
        netns: true,
        state_dir: Some(state.path().to_owned()),
        ..Default::default()
    });
    let shape = [
        "--image",
        "debian-bookworm",
        "--memory",
        "256",
        "--vcpus",
        "1",
    ];
    let mut warm = vec!["image", "warm"];
    warm.extend(shape.iter().skip(1));
    let out = bus.banger_as(None, &warm);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("own boot to finish"), "{}", text(&out));
    let mut create = vec!["vm", "create", "d"];
    create.extend(shape);
    let out = bus.banger_as(None, &create);
    assert!(
        out.status.success() && text(&out).contains("Restoring the warm snapshot"),
        "{}",
        text(&out)
    );
    let out = bus.banger_as(
        None,
        &[
            "vm",
            "exec",
            "d",
            "--",
            "sh",
            "-c",
            "systemctl is-system-running; pgrep -c agetty; \
             systemctl show -p LoadState getty@tty1.service",
        ],
    );
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<&str> = said.lines().collect();
    assert!(
        matches!(lines.first(), Some(&"running") | Some(&"degraded")),
        "a warm start still booting: {}",
        text(&out)
    );
    assert_eq!(
        lines.get(1..),
        Some(&["1", "LoadState=masked"][..]),
        "{said}"
    );
    let out = bus.banger_as(None, &["vm", "delete", "d", "--force"]);
    assert!(out.status.success(), "{}", text(&out));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_image_that_outgrows_its_filesystem_still_pulls() {
    if !available(TOOLS) {
        return;
    }
    // Layers go straight into an ext4 image sized from their compressed size, which this
    // one outgrows: 70,000 empty files need more inodes than its filesystem has (a few
    // MiB of tar headers gzip small), beside 48 MiB of zeros (about 50 KiB gzipped). The
    // pull starts over in a filesystem twice as large, from the blobs it fetched.
    let registry = TestRegistry::start();
    let work = tempfile::tempdir().unwrap();
    let mut layers = busybox_layers();
    let mut many = Layer::default().dir("many", 0o755);
    for d in 0..350 {
        many = many.dir(&format!("many/{d}"), 0o755);
        for f in 0..200 {
            many = many.file(&format!("many/{d}/{f}"), b"", 0o644, 0);
        }
    }
    layers.push(many.bytes());
    layers.push(
        Layer::default()
            .dir("data", 0o755)
            .file("data/zeros", &vec![0u8; 48 << 20], 0o644, 0)
            .bytes(),
    );
    let layout = work.path().join("zeros");
    let m = image_manifest(&layout, &layers, Comp::Gzip, "amd64");
    finish_layout(&layout, vec![m], "v1");
    let reference = registry.push(&layout, "v1", "test/zeros", &[]);
    let bus = TestBus::start(BusOptions {
        runtime_on_tmpfs: true,
        ..Default::default()
    });
    let conn = bus.connect().await;
    let rule = zbus::MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .member("LogMessage")
        .build()
        .unwrap();
    let mut logs = zbus::MessageStream::for_match_rule(rule, &conn, None)
        .await
        .unwrap();
    let (result, error) = pull(&bus, &conn, &reference, None).await.unwrap();
    assert_eq!(result, "done", "{error}");
    let mut lines = Vec::new();
    while let Ok(Some(Ok(m))) =
        tokio::time::timeout(std::time::Duration::from_millis(500), logs.next()).await
    {
        let (_, line): (u32, String) = m.body().deserialize().unwrap();
        lines.push(line);
    }
    let said = "starting over in one twice as large";
    assert!(lines.iter().any(|l| l.contains(said)), "{said}: {lines:?}");
    let rootfs = image_dir(&bus, "zeros-v1").join("rootfs.ext4");
    assert!(debugfs(&rootfs, "stat /data/zeros").contains("Size: 50331648"));
    assert!(debugfs(&rootfs, "ls /many/349").contains("199"));
    let left = std::fs::read_dir(bus.runtime.join("scratch"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(left, 0, "the scratch tree went");
    no_staging_left(&bus);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_registry_that_needs_a_login_pulls_with_credentials_and_refuses_without() {
    if !available(TOOLS) || !available(&["htpasswd"]) {
        return;
    }
    // docker-registry behind htpasswd (bcrypt, as its auth module needs), made by htpasswd.
    let secrets = tempfile::tempdir().unwrap();
    let htpasswd = secrets.path().join("htpasswd");
    let password = "s3cret-Pa55-banger";
    let out = std::process::Command::new("htpasswd")
        .args(["-Bbc"])
        .arg(&htpasswd)
        .args(["alice", password])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let registry = TestRegistry::start_with(
        None,
        &format!(
            "auth:\n  htpasswd:\n    realm: banger-test\n    path: {}\n",
            htpasswd.display()
        ),
    );
    let work = tempfile::tempdir().unwrap();
    let creds = format!("alice:{password}");
    let reference = registry.push(
        &busybox_layout(work.path(), Comp::Gzip),
        "v1",
        "private/box",
        &["--dest-creds", &creds],
    );

    let bus = TestBus::start(BusOptions {
        journal: true,
        ..Default::default()
    });
    let conn = bus.connect().await;
    let images = Images1Proxy::new(&conn).await.unwrap();
    let job_error = |id: u32| {
        let bus = &bus;
        async move { job_result(bus, id).await }
    };
    // Without credentials: refused, naming the registry and how to log in.
    let (id, _) = images
        .pull_image(&reference, opts(Some("anon")))
        .await
        .unwrap();
    let (state, error) = job_error(id).await;
    assert_eq!(state, "failed");
    assert!(
        error.contains(&format!("Registry {} refused access", registry.host))
            && error.contains("podman login"),
        "{error}"
    );
    // Wrong credentials: refused as such.
    let mut o = opts(Some("wrong"));
    o.insert(
        "auth".into(),
        OwnedVariant::try_from(Variant::from("alice:not-the-password")).unwrap(),
    );
    let (id, _) = images.pull_image(&reference, o).await.unwrap();
    let (state, error) = job_error(id).await;
    assert_eq!(state, "failed");
    assert!(error.contains("credentials given were refused"), "{error}");
    // The caller's own login, read by the CLI from the containers auth file as podman
    // writes it.
    let runtime = tempfile::tempdir().unwrap();
    std::fs::create_dir(runtime.path().join("containers")).unwrap();
    let b64 = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(&creds)
    };
    std::fs::write(
        runtime.path().join("containers/auth.json"),
        serde_json::json!({"auths": {registry.host.clone(): {"auth": b64}}}).to_string(),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_banger"))
        .args(["image", "pull", &reference, "--name", "private-box"])
        .env("DBUS_SYSTEM_BUS_ADDRESS", &bus.address)
        .env("XDG_RUNTIME_DIR", runtime.path())
        .env("HOME", runtime.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let rootfs = image_dir(&bus, "private-box").join("rootfs.ext4");
    assert!(debugfs(&rootfs, "stat /bin/busybox").contains("Type: regular"));
    assert_no_credential(&bus, &[password, &b64]);
    // The operator's auth file serves pulls that bring none (CreateVM's auto-pulls).
    let operator = secrets.path().join("auth.json");
    std::fs::write(
        &operator,
        serde_json::json!({"auths": {registry.host.clone(): {"auth": b64}}}).to_string(),
    )
    .unwrap();
    drop(images);
    drop(conn);
    drop(bus);
    let bus = TestBus::start(BusOptions {
        journal: true,
        extra_config: format!("auth_file = \"{}\"\n", operator.display()),
        ..Default::default()
    });
    let conn = bus.connect().await;
    let (result, error) = pull(&bus, &conn, &reference, Some("operator-box"))
        .await
        .unwrap();
    assert_eq!(result, "done", "{error}");

    assert_no_credential(&bus, &[password, &b64]);
}

/// No credential anywhere: the daemon's journal, its jobs and its database.
fn assert_no_credential(bus: &TestBus, secrets: &[&str]) {
    let journal = serde_json::to_string(&bus.journal("bangerd")).unwrap();
    assert!(journal.contains("private/box"), "the journal was read");
    let mut db = Vec::new();
    for f in ["banger.db", "banger.db-wal"] {
        db.extend(std::fs::read(bus.state_dir().join(f)).unwrap_or_default());
    }
    let db = String::from_utf8_lossy(&db);
    for secret in secrets {
        assert!(!journal.contains(secret), "the journal holds a credential");
        assert!(!db.contains(secret), "the database holds a credential");
    }
}

/// The pull runs in a worker that is no one (item 8 of the tenancy issue): not root, no
/// capabilities, no way to gain any, under seccomp, not dumpable, banger's state and the
/// host's homes hidden. Killed inside a layer, it leaves nothing: no staging directory, no
/// blob half-cached, no image, and the job says how it ended.
#[tokio::test(flavor = "multi_thread")]
async fn a_pull_runs_in_a_confined_worker_and_its_death_leaves_nothing() {
    if !available(TOOLS) {
        return;
    }
    let registry = TestRegistry::start();
    let work = tempfile::tempdir().unwrap();
    // 8 MiB that no compressor shrinks, so the layer outlasts the proxy's budget.
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let noise: Vec<u8> = (0..8 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let layout = work.path().join("noise");
    let m = image_manifest(
        &layout,
        &[Layer::default().file("noise", &noise, 0o644, 0).bytes()],
        Comp::Gzip,
        "amd64",
    );
    finish_layout(&layout, vec![m], "v1");
    registry.push(&layout, "v1", "test/noise", &[]);
    let proxy = StallProxy::start(&registry.host, 1 << 20).await;
    let bus = TestBus::start(BusOptions::default());
    let conn = bus.connect().await;
    let images = Images1Proxy::new(&conn).await.unwrap();
    let jobs = Jobs1Proxy::new(&conn).await.unwrap();
    let mut removed = jobs.receive_job_removed().await.unwrap();
    let cache = bus.state_dir().join("cache/oci/sha256");
    let cached_before: Vec<_> = std::fs::read_dir(&cache)
        .map(|d| d.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    let (job_id, _) = images
        .pull_image(&format!("{}/test/noise:v1", proxy.host), opts(None))
        .await
        .unwrap();
    let daemon = bus.owner_pid(&conn, "org.banger").await.unwrap();

    // Inside the layer: the worker's download has passed half a MiB.
    let downloading = |bus: &TestBus| -> bool {
        let Ok(images) = std::fs::read_dir(bus.state_dir().join("images")) else {
            return false;
        };
        images.flatten().any(|s| {
            std::fs::read_dir(s.path().join("blobs/sha256"))
                .into_iter()
                .flatten()
                .flatten()
                .any(|b| b.metadata().is_ok_and(|m| m.len() >= 512 << 10))
        })
    };
    wait_until_async(
        "the layer's download started",
        std::time::Duration::from_secs(60),
        || downloading(&bus),
    )
    .await;
    let worker = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
            args.len() >= 5
                && args[1] == b"worker"
                && args[2] == b"pull"
                && args[4] == daemon.to_string().as_bytes()
        })
        .expect("the daemon's pull worker");
    let status = std::fs::read_to_string(format!("/proc/{worker}/status")).unwrap();
    let field = |name: &str| -> String {
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .unwrap_or_default()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    let uid: u32 = field("Uid").split(' ').next().unwrap().parse().unwrap();
    // What the worker sees, through its own root.
    let marker = tempfile::NamedTempFile::new_in("/tmp").unwrap();
    let seen = |p: &Path| {
        Path::new(&format!("/proc/{worker}/root"))
            .join(p.strip_prefix("/").unwrap())
            .exists()
    };
    let environ_owner = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(format!("/proc/{worker}/environ"))
            .unwrap()
            .uid()
    };
    let checks: Vec<(&str, bool)> = vec![
        (
            "runs as a uid of its own",
            uid >= banger::worker::UID_BASE && field("Uid") == vec![uid.to_string(); 4].join(" "),
        ),
        (
            "has only the cache's group",
            field("Groups") == banger::worker::gid().to_string(),
        ),
        ("holds no capability", field("CapEff") == "0000000000000000"),
        ("may hold none", field("CapPrm") == "0000000000000000"),
        ("cannot gain privileges", field("NoNewPrivs") == "1"),
        ("runs under seccomp", field("Seccomp") == "2"),
        ("is not dumpable", environ_owner == 0),
        (
            "sees banger's database hidden",
            !seen(&bus.state_dir().join("banger.db")) && bus.state_dir().join("banger.db").exists(),
        ),
        ("sees the host's /tmp hidden", !seen(marker.path())),
        (
            "holds its own directory, by descriptor only",
            !seen(&bus.state_dir().join("images"))
                && std::fs::read_link(format!("/proc/{worker}/fd/3"))
                    .is_ok_and(|l| l.to_string_lossy().contains("/images/.staging-")),
        ),
    ];
    let failed: Vec<_> = checks.iter().filter(|c| !c.1).map(|c| c.0).collect();
    assert!(failed.is_empty(), "the worker {failed:?}\n{status}");

    // SAFETY: plain kill(2) of the worker found above.
    unsafe { libc::kill(worker as i32, libc::SIGKILL) };
    let result = loop {
        let sig = removed.next().await.expect("JobRemoved");
        let a = sig.args().unwrap();
        if a.id == job_id {
            break a.result.clone();
        }
    };
    assert_eq!(result, "failed");
    let (_, error) = job_result(&bus, job_id).await;
    assert!(
        error.contains("pull worker was killed by signal 9") && error.contains("nothing it made"),
        "{error}"
    );
    no_staging_left(&bus);
    let cached_after: Vec<_> = std::fs::read_dir(&cache)
        .map(|d| d.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    // What it had verified (the image's configuration) may stay cached; nothing else.
    for name in cached_after.iter().filter(|n| !cached_before.contains(n)) {
        let bytes = std::fs::read(cache.join(name)).unwrap();
        let hex: String = <sha2::Sha256 as sha2::Digest>::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            name.to_str(),
            Some(hex.as_str()),
            "nothing half-fetched joined the cache"
        );
        assert!(
            bytes.len() < 1 << 20,
            "the stalled layer did not join the cache"
        );
    }
    assert!(images.list_images().await.unwrap().is_empty());
    writeln!(
        std::io::stderr(),
        "security (pull worker): {} cases tried, {} refused, 0 leaked",
        checks.len() + 1,
        checks.len() + 1
    )
    .unwrap();
}

/// `--image` with a short name that is no image here is a registry reference: the create
/// says which one it resolved to, and offline (the bus's namespace has no route out) fails
/// in seconds naming it, instead of a silent wait for a pull of "typo" (issue 32).
#[tokio::test(flavor = "multi_thread")]
async fn a_short_image_name_that_is_no_image_says_what_it_pulled_and_fails_fast_offline() {
    if !available(TOOLS) {
        return;
    }
    let bus = TestBus::start(BusOptions {
        netns: true,
        ..Default::default()
    });
    let started = std::time::Instant::now();
    let out = bus.banger_as(
        Some(USER_OK),
        &["vm", "create", "typo-vm", "--image", "debain", "--no-start"],
    );
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    for part in [
        "No image named \"debain\": pulling docker.io/library/debain:latest",
        "pulling it as docker.io/library/debain:latest failed",
        "`banger image list`",
    ] {
        assert!(said.contains(part), "{part:?} not in: {said}");
    }
    let _ = writeln!(
        std::io::stderr(),
        "images: an offline pull of a typo failed in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
