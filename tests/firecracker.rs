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
    let seen = Arc::new(Mutex::new(Vec::new()));
    let listener = UnixListener::bind(&sock).unwrap();
    let s = seen.clone();
    tokio::spawn(async move {
        loop {
            let (mut c, _) = listener.accept().await.unwrap();
            let s = s.clone();
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
    seen
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
        }),
        shares: Vec::new(),
        // The stand-in API server runs in the test's own (root's) directory.
        jail: banger::vmm::jail::Jail {
            uid: 0,
            gid: 0,
            groups: vec![0],
            hide: Vec::new(),
            read_only: Vec::new(),
        },
        incoming: false,
    }
}

#[tokio::test]
async fn every_request_matches_the_firecracker_api_spec_in_order() {
    let doc = spec_doc();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let seen = stand_in(sock.clone()).await;
    let spec = boot_spec(dir.path(), 2);
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
            "/actions",
            "/actions",
            "/vm",
            "/vm"
        ]
    );
    let mut errors = Vec::new();
    for (i, (method, path, body)) in seen.iter().enumerate() {
        assert_eq!(method, if i < 8 { "PUT" } else { "PATCH" });
        let (schema, param) = body_schema(&doc, method, path)
            .unwrap_or_else(|| panic!("{method} {path} is not in the spec"));
        validate(&doc, schema, body, path, &mut errors);
        // A path parameter must equal the body's field of the same name (Firecracker checks).
        if let Some((name, value)) = param {
            assert_eq!(body[&name], Value::from(value), "{path}");
        }
    }
    assert!(errors.is_empty(), "{errors:#?}");
    assert_eq!(seen[6].2["action_type"], "InstanceStart");
    assert_eq!(seen[7].2["action_type"], "SendCtrlAltDel");
    assert_eq!(
        (&seen[8].2["state"], &seen[9].2["state"]),
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
