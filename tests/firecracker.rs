//! The Firecracker driver's requests, checked against Firecracker's own API specification
//! (`tests/firecracker-api.yaml`, Swagger 2.0): a stand-in API server on a Unix socket records
//! what the driver sends, and every body is validated against the schema of its path's `PUT`
//! operation, in the order Firecracker requires. Firecracker itself cannot run here (no
//! usable KVM), so this is the driver's contract test.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use banger::vmm::{firecracker, BootSpec};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;

fn spec_doc() -> Value {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/firecracker-api.yaml"),
    )
    .unwrap();
    serde_yaml::from_str(&text).unwrap()
}

fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let name = r.strip_prefix("#/definitions/").expect("local $ref");
            resolve(doc, &doc["definitions"][name])
        }
        None => schema,
    }
}

/// A JSON-schema check of the subset Swagger 2.0 uses here: types, required, properties
/// (unknown ones refused, as Firecracker's deserializer does), enum, minimum, maximum.
fn validate(doc: &Value, schema: &Value, v: &Value, at: &str, errors: &mut Vec<String>) {
    let schema = resolve(doc, schema);
    if let Some(e) = schema.get("enum").and_then(Value::as_array) {
        if !e.contains(v) {
            errors.push(format!("{at}: {v} is not one of {e:?}"));
        }
    }
    let ty = schema.get("type").and_then(Value::as_str);
    match ty {
        Some("object") | None if schema.get("properties").is_some() => {
            let Some(obj) = v.as_object() else {
                errors.push(format!("{at}: expected an object, got {v}"));
                return;
            };
            for r in schema["required"].as_array().into_iter().flatten() {
                if !obj.contains_key(r.as_str().unwrap()) {
                    errors.push(format!("{at}: missing required {r}"));
                }
            }
            for (k, val) in obj {
                match schema["properties"].get(k) {
                    Some(s) => validate(doc, s, val, &format!("{at}.{k}"), errors),
                    None => errors.push(format!("{at}: unknown property {k}")),
                }
            }
        }
        Some("string") if !v.is_string() => {
            errors.push(format!("{at}: expected a string, got {v}"))
        }
        Some("boolean") if !v.is_boolean() => {
            errors.push(format!("{at}: expected a boolean, got {v}"))
        }
        Some("integer") => match v.as_i64() {
            None => errors.push(format!("{at}: expected an integer, got {v}")),
            Some(n) => {
                if let Some(min) = schema.get("minimum").and_then(Value::as_i64) {
                    if n < min {
                        errors.push(format!("{at}: {n} < minimum {min}"));
                    }
                }
                if let Some(max) = schema.get("maximum").and_then(Value::as_i64) {
                    if n > max {
                        errors.push(format!("{at}: {n} > maximum {max}"));
                    }
                }
            }
        },
        _ => {}
    }
}

/// The spec's `PUT` body schema for a concrete path (`/drives/root` → `/drives/{drive_id}`),
/// with the path parameter's value.
fn body_schema<'a>(
    doc: &'a Value,
    method: &str,
    path: &str,
) -> Option<(&'a Value, Option<(String, String)>)> {
    for (template, item) in doc["paths"].as_object().unwrap() {
        let (t, p): (Vec<&str>, Vec<&str>) =
            (template.split('/').collect(), path.split('/').collect());
        if t.len() != p.len() {
            continue;
        }
        let mut param = None;
        let matches = t.iter().zip(&p).all(|(a, b)| {
            if a.starts_with('{') {
                param = Some((
                    a.trim_matches(|c| c == '{' || c == '}').to_owned(),
                    b.to_string(),
                ));
                true
            } else {
                a == b
            }
        });
        if !matches {
            continue;
        }
        let body = item[method.to_lowercase().as_str()]["parameters"]
            .as_array()?
            .iter()
            .find(|p| p["in"] == "body")?;
        return Some((&body["schema"], param));
    }
    None
}

/// A stand-in Firecracker API: records `(method, path, body)` and answers 204.
async fn stand_in(sock: PathBuf) -> Arc<Mutex<Vec<(String, String, Value)>>> {
    stand_in_for(sock, None).await.0
}

/// What the stand-in found in its chroot when asked to load a snapshot: the state, the
/// memory, and each file's owner, mode and allocated bytes.
#[derive(Debug, Clone, Default)]
struct Loaded {
    state: Vec<u8>,
    memory: Vec<u8>,
    owners: Vec<(u32, u32)>,
    memory_allocated: u64,
}

/// The state and memory the stand-in "saves" on `/snapshot/create`: a small state and 1 MiB
/// of memory, mostly zero pages.
fn saved_state() -> (Vec<u8>, Vec<u8>) {
    let mut memory = vec![0u8; 1 << 20];
    memory[..4096].fill(0x5a);
    memory[700_000..700_010].copy_from_slice(b"0123456789");
    (b"firecracker-state".to_vec(), memory)
}

/// The stand-in, acting on its chroot `root` as Firecracker does: `/snapshot/create` writes
/// the two files the body names, `/snapshot/load` reads them.
async fn stand_in_for(
    sock: PathBuf,
    root: Option<PathBuf>,
) -> (Arc<Mutex<Vec<(String, String, Value)>>>, Arc<Mutex<Loaded>>) {
    let loaded = Arc::new(Mutex::new(Loaded::default()));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let l = loaded.clone();
    let listener = UnixListener::bind(&sock).unwrap();
    let s = seen.clone();
    tokio::spawn(async move {
        loop {
            let (mut c, _) = listener.accept().await.unwrap();
            let (s, l, root) = (s.clone(), l.clone(), root.clone());
            tokio::spawn(async move {
                let mut head = Vec::new();
                while !head.ends_with(b"\r\n\r\n") {
                    head.push(c.read_u8().await.unwrap());
                }
                let head = String::from_utf8(head).unwrap();
                let mut first = head.lines().next().unwrap().split(' ');
                let (method, path) = (
                    first.next().unwrap().to_owned(),
                    first.next().unwrap().to_owned(),
                );
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("Content-Length: "))
                    .map(|v| v.trim().parse().unwrap())
                    .unwrap_or(0);
                let mut body = vec![0u8; len];
                c.read_exact(&mut body).await.unwrap();
                let body: Value = serde_json::from_slice(&body).unwrap();
                let at = |p: &Value| {
                    root.as_ref()
                        .unwrap()
                        .join(p.as_str().unwrap().trim_start_matches('/'))
                };
                if root.is_some() && path == "/snapshot/create" {
                    let (state, memory) = saved_state();
                    std::fs::write(at(&body["snapshot_path"]), state).unwrap();
                    std::fs::write(at(&body["mem_file_path"]), memory).unwrap();
                }
                if root.is_some() && path == "/snapshot/load" {
                    use std::os::unix::fs::MetadataExt;
                    let files = [
                        at(&body["snapshot_path"]),
                        at(&body["mem_backend"]["backend_path"]),
                    ];
                    let mut l = l.lock().unwrap();
                    l.state = std::fs::read(&files[0]).unwrap();
                    l.memory = std::fs::read(&files[1]).unwrap();
                    for f in &files {
                        let m = std::fs::metadata(f).unwrap();
                        l.owners.push((m.uid(), m.mode() & 0o777));
                    }
                    l.memory_allocated = std::fs::metadata(&files[1]).unwrap().blocks() * 512;
                }
                let reply: &[u8] = if path == "/refused" {
                    b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: 30\r\n\r\n{\"fault_message\":\"no such vm\"}"
                } else {
                    b"HTTP/1.1 204 No Content\r\n\r\n"
                };
                s.lock().unwrap().push((method, path, body));
                c.write_all(reply).await.unwrap();
            });
        }
    });
    (seen, loaded)
}

fn boot_spec(dir: &Path, vcpus: u32) -> BootSpec {
    BootSpec {
        name: "t".into(),
        id: "00ff00ff00ff00ff".into(),
        vcpus,
        memory_mib: 512,
        kernel: "/var/lib/banger/kernels/debian/vmlinux".into(),
        initrd: Some("/var/lib/banger/kernels/debian/initrd.img".into()),
        cmdline: "quiet".into(),
        rootfs: "/var/lib/banger/vms/00ff/rootfs.ext4".into(),
        work: "/var/lib/banger/vms/00ff/work.ext4".into(),
        cid: 3,
        run_dir: dir.to_owned(),
        console_log: dir.join("console.log"),
        net: Some(banger::vmm::NetSpec {
            tap: "bgr0123456789ab".into(),
            mac: "02:01:23:45:67:89".into(),
            netns: None,
        }),
        shares: Vec::new(),
        root_share: false,
        // The stand-in API server runs in the test's own (root's) directory.
        jail: banger::vmm::jail::Jail {
            uid: 0,
            gid: 0,
            groups: vec![0],
            hide: Vec::new(),
            read_only: Vec::new(),
            private: false,
            offline: false,
        },
        incoming: false,
        machine: Default::default(),
        memory: None,
    }
}

#[tokio::test]
async fn every_request_matches_the_firecracker_api_spec_in_order() {
    let doc = spec_doc();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let seen = stand_in(sock.clone()).await;
    let mut spec = boot_spec(dir.path(), 2);
    // A cold boot's devices: the balloon that gives freed pages back.
    spec.machine.balloon = true;
    firecracker::configure(&sock, &spec, &dir.path().join("vsock.sock"))
        .await
        .unwrap();
    // Power-off is a request too, and so are pause and resume.
    firecracker::put(
        &sock,
        "/actions",
        &serde_json::json!({"action_type": "SendCtrlAltDel"}),
    )
    .await
    .unwrap();
    for pause in [true, false] {
        let (path, body) = firecracker::pause_request(pause);
        firecracker::send(&sock, "PATCH", path, &body)
            .await
            .unwrap();
    }

    let seen = seen.lock().unwrap().clone();
    let paths: Vec<&str> = seen.iter().map(|(_, p, _)| p.as_str()).collect();
    assert_eq!(
        paths,
        [
            "/machine-config",
            "/boot-source",
            "/drives/root",
            "/drives/work",
            "/network-interfaces/eth0",
            "/vsock",
            "/balloon",
            "/actions",
            "/actions",
            "/vm",
            "/vm"
        ]
    );
    let mut errors = Vec::new();
    for (i, (method, path, body)) in seen.iter().enumerate() {
        assert_eq!(method, if i < 9 { "PUT" } else { "PATCH" });
        let (schema, param) = body_schema(&doc, method, path)
            .unwrap_or_else(|| panic!("{method} {path} is not in the spec"));
        validate(&doc, schema, body, path, &mut errors);
        // A path parameter must equal the body's field of the same name (Firecracker checks).
        if let Some((name, value)) = param {
            assert_eq!(body[&name], Value::from(value), "{path}");
        }
    }
    assert!(errors.is_empty(), "{errors:#?}");
    assert_eq!(
        seen[6].2,
        serde_json::json!({"amount_mib": 0, "deflate_on_oom": true, "free_page_reporting": true}),
        "never inflated, freed pages reported"
    );
    assert_eq!(seen[7].2["action_type"], "InstanceStart");
    assert_eq!(seen[8].2["action_type"], "SendCtrlAltDel");
    assert_eq!(
        (&seen[9].2["state"], &seen[10].2["state"]),
        (&Value::from("Paused"), &Value::from("Resumed"))
    );
    let args = seen[1].2["boot_args"].as_str().unwrap();
    assert!(
        args.contains("root=/dev/vda rw banger.work=/dev/vdb"),
        "{args}"
    );
}

#[tokio::test]
async fn the_validator_catches_what_firecracker_would_refuse() {
    // The check above is only worth something if a wrong body fails it.
    let doc = spec_doc();
    let (schema, _) = body_schema(&doc, "PUT", "/machine-config").unwrap();
    let mut errors = Vec::new();
    validate(
        &doc,
        schema,
        &serde_json::json!({"vcpu_count": 0, "mem": 5}),
        "m",
        &mut errors,
    );
    assert_eq!(errors.len(), 3, "{errors:?}"); // minimum, unknown property, missing mem_size_mib
    let (schema, _) = body_schema(&doc, "PUT", "/actions").unwrap();
    let mut errors = Vec::new();
    validate(
        &doc,
        schema,
        &serde_json::json!({"action_type": "Reboot"}),
        "a",
        &mut errors,
    );
    assert_eq!(errors.len(), 1, "{errors:?}");
}

#[tokio::test]
async fn odd_vcpu_counts_and_api_faults_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let e = firecracker::requests(&boot_spec(dir.path(), 3), Path::new("/v")).unwrap_err();
    assert!(e.to_string().contains("even number"), "{e}");
    let sock = dir.path().join("api.sock");
    let _seen = stand_in(sock.clone()).await;
    let e = firecracker::put(&sock, "/refused", &serde_json::json!({}))
        .await
        .unwrap_err();
    assert!(
        e.full_message().contains("HTTP 400: no such vm"),
        "{}",
        e.full_message()
    );
}

#[tokio::test]
async fn the_jailer_gets_what_it_accepts_and_the_chroot_holds_the_vms_files() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let (vm, kernels) = (
        dir.path().join("vms/00ff"),
        dir.path().join("kernels/debian"),
    );
    for d in [&vm, &kernels] {
        std::fs::create_dir_all(d).unwrap();
    }
    let exe = dir.path().join("firecracker-v1.10.1");
    for (p, what) in [
        (&exe, "binary"),
        (&kernels.join("vmlinux"), "kernel"),
        (&kernels.join("initrd.img"), "initrd"),
        (&vm.join("rootfs.ext4"), "root"),
        (&vm.join("work.ext4"), "work"),
    ] {
        std::fs::write(p, what).unwrap();
    }
    let mut spec = boot_spec(dir.path(), 2);
    spec.kernel = kernels.join("vmlinux");
    spec.initrd = Some(kernels.join("initrd.img"));
    spec.rootfs = vm.join("rootfs.ext4");
    spec.work = vm.join("work.ext4");
    spec.jail.uid = banger::vmm::jail::vm_uid(3);

    let chroot = firecracker::Chroot::of(&spec, &exe);
    let inside = chroot.populate(&spec).unwrap();
    let args = firecracker::jailer_args(&spec, &exe, &chroot, true);
    let stand_in = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/firecracker/jailer-stand-in");
    let out = std::process::Command::new(&stand_in)
        .args(&args)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.contains(&format!("chroot={}\n", chroot.root.display())),
        "{said}"
    );
    let uid = banger::vmm::jail::vm_uid(3);
    assert!(
        said.contains(&format!(
            "uid={uid} gid={} cgroup-version=2",
            banger::vmm::jail::vmm_gid()
        )),
        "{said}"
    );
    assert!(
        said.contains("forward=--api-sock /firecracker.sock\n"),
        "{said}"
    );

    // The stand-in refuses what the jailer refuses, so its yes above means something.
    for (bad, why) in [
        (
            vec!["--id", "a", "--uid", "1", "--gid", "1"],
            "missing required --exec-file",
        ),
        (
            vec![
                "--id",
                "a/b",
                "--exec-file",
                exe.to_str().unwrap(),
                "--uid",
                "1",
                "--gid",
                "1",
            ],
            "invalid id",
        ),
        (
            vec![
                "--id",
                "a",
                "--exec-file",
                "/bin/sh",
                "--uid",
                "1",
                "--gid",
                "1",
            ],
            "must include firecracker",
        ),
        (
            vec![
                "--id",
                "a",
                "--exec-file",
                exe.to_str().unwrap(),
                "--uid",
                "1",
                "--gid",
                "1",
                "--seccomp-level",
                "0",
            ],
            "unknown argument",
        ),
    ] {
        let out = std::process::Command::new(&stand_in)
            .args(&bad)
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(why),
            "{bad:?}"
        );
    }

    // Every file the requests name is in the chroot; the disks are the VM's own (hard
    // links: a write reaches them), and the bodies still match the API.
    let doc = spec_doc();
    let reqs = firecracker::requests(&inside, chroot.vsock()).unwrap();
    let mut named = Vec::new();
    let mut errors = Vec::new();
    for (path, body) in &reqs {
        let (schema, _) = body_schema(&doc, "PUT", path).unwrap();
        validate(&doc, schema, body, path, &mut errors);
        for key in ["kernel_image_path", "initrd_path", "path_on_host"] {
            if let Some(p) = body[key].as_str() {
                named.push(p.to_owned());
            }
        }
    }
    assert!(errors.is_empty(), "{errors:#?}");
    assert_eq!(
        named,
        ["/vmlinux", "/initrd.img", "/rootfs.ext4", "/work.ext4"]
    );
    for p in &named {
        assert!(chroot.host_path(p).is_file(), "{p} is not in the chroot");
    }
    for (inside, host) in [("/rootfs.ext4", &spec.rootfs), ("/work.ext4", &spec.work)] {
        assert_eq!(
            std::fs::metadata(chroot.host_path(inside)).unwrap().ino(),
            std::fs::metadata(host).unwrap().ino(),
            "{inside} is the VM's disk"
        );
    }
    assert_eq!(
        reqs.iter().find(|(p, _)| p == "/vsock").unwrap().1["uds_path"],
        "/vsock.sock"
    );
    // A second start builds the chroot afresh.
    chroot.populate(&spec).unwrap();
    assert!(chroot.host_path("/vmlinux").is_file());
}

/// A pipe's two ends (a socket pair does as well for a byte stream).
fn pipe() -> (std::os::fd::OwnedFd, std::os::fd::OwnedFd) {
    let (r, w) = std::os::unix::net::UnixStream::pair().unwrap();
    (r.into(), w.into())
}

/// A jailed VM's runtime directory and chroot, as `boot` records them.
fn jailed_vm(dir: &Path, n: u32) -> (PathBuf, PathBuf) {
    let run = dir.join(format!("run{n}"));
    let root = dir.join(format!("vm{n}/jailer/firecracker/banger-{n}/root"));
    std::fs::create_dir_all(&run).unwrap();
    std::fs::create_dir_all(&root).unwrap();
    firecracker::record_chroot(&run, &root).unwrap();
    (run, root)
}

/// Saves the snapshot of the VM in `run` through the driver; returns the stream.
async fn save(run: &Path) -> banger::Result<Vec<u8>> {
    use banger::vmm::Vmm;
    let (r, w) = pipe();
    let reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut std::fs::File::from(r), &mut v).unwrap();
        v
    });
    let saved = firecracker::Firecracker.save_state(run, w).await;
    let stream = reader.join().unwrap();
    saved.map(|_| stream)
}

/// Loads `stream` into the VM `spec` describes through the driver.
async fn load(spec: &BootSpec, stream: Vec<u8>) -> banger::Result<()> {
    use banger::vmm::Vmm;
    let (r, w) = pipe();
    let writer = std::thread::spawn(move || {
        let _ = std::io::Write::write_all(&mut std::fs::File::from(w), &stream);
    });
    let loaded = firecracker::Firecracker.load_state(spec, r).await;
    writer.join().unwrap();
    loaded
}

#[tokio::test]
async fn a_snapshot_goes_through_the_api_and_one_stream_into_another_vms_chroot() {
    let doc = spec_doc();
    let dir = tempfile::tempdir().unwrap();
    let (run1, root1) = jailed_vm(dir.path(), 1);
    let (seen1, _) = stand_in_for(root1.join("firecracker.sock"), Some(root1.clone())).await;
    let stream = save(&run1).await.unwrap();
    let (state, memory) = saved_state();
    assert_eq!(&stream[..8], firecracker::STREAM_MAGIC);
    assert_eq!(stream.len(), 16 + state.len() + memory.len());
    for f in ["snapshot.state", "snapshot.mem"] {
        assert!(
            !root1.join(f).exists(),
            "{f} was left in the source's chroot"
        );
    }

    // Another VM, with a uid and a tap of its own, loads it; its state directory is reached
    // through a link the administrator made (only below the VM's directory are links refused).
    std::fs::create_dir(dir.path().join("real")).unwrap();
    std::os::unix::fs::symlink(dir.path().join("real"), dir.path().join("linked")).unwrap();
    let (run2, root2) = jailed_vm(&dir.path().join("linked"), 2);
    let (seen2, loaded) = stand_in_for(root2.join("firecracker.sock"), Some(root2.clone())).await;
    let mut spec = boot_spec(&run2, 2);
    spec.memory_mib = 1;
    spec.jail.uid = banger::vmm::jail::vm_uid(5);
    load(&spec, stream.clone()).await.unwrap();
    let loaded = loaded.lock().unwrap().clone();
    assert_eq!(loaded.state, state);
    assert!(
        loaded.memory == memory,
        "the memory Firecracker loads is not what it saved"
    );
    let uid = banger::vmm::jail::vm_uid(5);
    assert_eq!(loaded.owners, [(uid, 0o600), (uid, 0o600)]);
    assert!(
        loaded.memory_allocated < memory.len() as u64 / 2,
        "zero pages were written out: {} bytes allocated",
        loaded.memory_allocated
    );
    for f in ["snapshot.state", "snapshot.mem"] {
        assert!(
            !root2.join(f).exists(),
            "{f} was left in the restored VM's chroot"
        );
    }

    // Both requests are Firecracker's, in order, with the restored VM's own tap.
    let mut errors = Vec::new();
    for (method, path, body) in seen1
        .lock()
        .unwrap()
        .iter()
        .chain(seen2.lock().unwrap().iter())
    {
        assert_eq!(method, "PUT");
        let (schema, _) = body_schema(&doc, method, path).unwrap();
        validate(&doc, schema, body, path, &mut errors);
    }
    assert!(errors.is_empty(), "{errors:#?}");
    let seen2 = seen2.lock().unwrap().clone();
    assert_eq!(seen1.lock().unwrap()[0].1, "/snapshot/create");
    assert_eq!(seen2.len(), 1);
    assert_eq!(seen2[0].1, "/snapshot/load");
    assert_eq!(seen2[0].2["resume_vm"], false);
    assert_eq!(
        seen2[0].2["network_overrides"][0]["host_dev_name"],
        "bgr0123456789ab"
    );
}

#[tokio::test]
async fn bad_snapshot_streams_links_and_unjailed_vms_are_refused_and_leave_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut tried = 0;
    // An unjailed VM: its disks are named by host paths, which a restore must not open.
    let run = dir.path().join("plain");
    std::fs::create_dir_all(&run).unwrap();
    let e = save(&run).await.unwrap_err();
    assert!(e.to_string().contains("jailer"), "{e}");
    tried += 1;

    // A chroot whose memory file is a link to a secret: nothing of the secret leaves.
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "root's secret").unwrap();
    let (run1, root1) = jailed_vm(dir.path(), 1);
    let _api = stand_in_for(root1.join("firecracker.sock"), None).await;
    std::fs::write(root1.join("snapshot.state"), "state").unwrap();
    std::os::unix::fs::symlink(&secret, root1.join("snapshot.mem")).unwrap();
    let e = save(&run1).await.unwrap_err();
    assert!(
        e.full_message().contains("snapshot.mem"),
        "{}",
        e.full_message()
    );
    tried += 1;
    // A chroot that is itself a link, planted under the state's name's directory.
    std::fs::remove_file(root1.join("snapshot.mem")).unwrap();
    std::fs::write(root1.join("snapshot.mem"), "memory").unwrap();
    let elsewhere = dir.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let moved = dir.path().join("vm1/jailer/firecracker/banger-1/moved");
    std::fs::rename(&root1, &moved).unwrap();
    std::os::unix::fs::symlink(&moved, &root1).unwrap();
    // (Refused at the API socket already, whose directory is not reached through a link.)
    assert!(
        save(&run1).await.is_err(),
        "a chroot swapped for a link was followed"
    );
    tried += 1;

    // Streams that are not what `save` wrote.
    let (run2, root2) = jailed_vm(dir.path(), 2);
    let (seen, _) = stand_in_for(root2.join("firecracker.sock"), Some(root2.clone())).await;
    let mut spec = boot_spec(&run2, 2);
    spec.memory_mib = 1;
    let mut good = firecracker::STREAM_MAGIC.to_vec();
    good.extend(5u64.to_le_bytes());
    good.extend(b"state");
    let mut too_big = good.clone();
    too_big.extend(vec![1u8; (1 << 20) + 1]);
    let mut huge_state = firecracker::STREAM_MAGIC.to_vec();
    huge_state.extend(u64::MAX.to_le_bytes());
    for (stream, why) in [
        (b"QEVM0003 qemu's stream".to_vec(), "header is not banger's"),
        (good[..10].to_vec(), "ends before its header"),
        (good[..18].to_vec(), "ends inside its state"),
        (huge_state, "state length is out of range"),
        (too_big, "larger than the VM's"),
    ] {
        let e = load(&spec, stream).await.unwrap_err();
        assert!(
            e.full_message().contains(why),
            "{why}: {}",
            e.full_message()
        );
        for f in ["snapshot.state", "snapshot.mem"] {
            assert!(!root2.join(f).exists(), "{why}: {f} was left behind");
        }
        tried += 1;
    }
    assert!(
        seen.lock().unwrap().is_empty(),
        "a bad stream reached Firecracker"
    );
    println!("firecracker snapshots: {tried} bad cases tried, {tried} refused, 0 leaked");
}

/// Firecracker writes the guest's serial console to its standard output, and a guest may
/// print without end: that output goes through the console logger (`vmm::console`), which
/// keeps the newest 2 MiB, never straight to a file. Firecracker cannot run here, so a
/// stand-in for its binary prints 4.5 MB as a flooding guest would, and exits (the boot then
/// fails: no API socket).
#[tokio::test]
async fn firecrackers_console_goes_through_the_bounded_logger() {
    use banger::vmm::Vmm;
    // SAFETY: geteuid takes nothing and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        if std::env::var_os("BANGER_REQUIRE_INTEGRATION").is_some() {
            panic!("the console test runs as root (it starts the VM's helpers as a uid)");
        }
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let lines = 100_000;
    std::fs::write(
        bin.join("firecracker"),
        format!(
            "#!/bin/sh\ni=0\nwhile [ $i -lt {lines} ]; do \
             echo \"line $i of a guest that never stops talking\"; i=$((i+1)); done\n\
             echo 'the stand-in exits' >&2\n"
        ),
    )
    .unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            bin.join("firecracker"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
    }
    // The stand-in first, then this build's bangerd (the logger), then the host's tools.
    let bangerd = Path::new(env!("CARGO_BIN_EXE_bangerd")).parent().unwrap();
    std::env::set_var(
        "PATH",
        format!(
            "{}:{}:{}",
            bin.display(),
            bangerd.display(),
            std::env::var("PATH").unwrap_or_default()
        ),
    );
    let run = dir.path().join("run");
    let vm = dir.path().join("vm");
    std::fs::create_dir_all(run.join("jail")).unwrap();
    std::fs::create_dir(&vm).unwrap();
    let mut spec = boot_spec(&run, 1);
    spec.net = None;
    spec.rootfs = vm.join("rootfs.ext4");
    spec.work = vm.join("work.ext4");
    spec.console_log = vm.join("console.log");
    let err = firecracker::Firecracker.boot(&spec).await.unwrap_err();
    assert!(
        err.full_message().contains("did not open its API socket"),
        "{}",
        err.full_message()
    );
    let len = std::fs::metadata(&spec.console_log).unwrap().len();
    assert!(
        len <= banger::vmm::console::MAX_BYTES && len > 1 << 20,
        "{len} bytes"
    );
    let tail = banger::vmm::console::tail_lines(&spec.console_log, 2);
    assert_eq!(
        tail,
        format!(
            "line {} of a guest that never stops talking\nthe stand-in exits",
            lines - 1
        )
    );
    assert_eq!(
        std::fs::metadata(run.join("firecracker.log"))
            .unwrap()
            .len(),
        0
    );
    assert!(firecracker::Firecracker.pids(&run).is_empty());
    let printed: usize = (0..lines)
        .map(|i| format!("line {i} of a guest that never stops talking\n").len())
        .sum();
    println!(
        "security (Firecracker console flood): {printed} bytes printed, {len} kept, the newest last"
    );
}
