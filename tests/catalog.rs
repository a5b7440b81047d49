//! Catalog bundles for real: `.tar.zst` bundles the test builds, served by an HTTP server on
//! 127.0.0.1, named in the daemon's config.toml (`[[kernel_catalog]]`, `[[image_catalog]]`).
//! A good kernel bundle and a good image bundle are published; a wrong sha256, a truncated
//! download, a bundle with `../` paths and a bundle whose rootfs is not ext4 are refused with
//! nothing published and nothing staged. An OCI catalog entry pulls from a registry.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use banger::dbus::proxy::{Images1Proxy, Kernels1Proxy};
use common::oci::*;
use common::*;
use sha2::Digest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Serves `files` by path; a path in `truncate` announces its full length but sends half.
struct Http {
    port: u16,
}

impl Http {
    async fn start(files: HashMap<String, Vec<u8>>, truncate: Vec<String>) -> Http {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let files = Arc::new(files);
        let truncate = Arc::new(truncate);
        tokio::spawn(async move {
            while let Ok((mut c, _)) = listener.accept().await {
                let (files, truncate) = (files.clone(), truncate.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let n = c.read(&mut buf).await.unwrap_or(0);
                    let req = String::from_utf8_lossy(&buf[..n]).into_owned();
                    let path = req.split_whitespace().nth(1).unwrap_or("/").to_owned();
                    match files.get(&path) {
                        Some(body) => {
                            let head = format!(
                                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                                body.len()
                            );
                            let _ = c.write_all(head.as_bytes()).await;
                            let send = if truncate.contains(&path) {
                                &body[..body.len() / 2]
                            } else {
                                &body[..]
                            };
                            let _ = c.write_all(send).await;
                        }
                        None => {
                            let _ = c
                                .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                                .await;
                        }
                    }
                    let _ = c.shutdown().await;
                });
            }
        });
        Http { port }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

/// A `.tar.zst` of `entries` (name, bytes); names are written raw, `../` included.
fn bundle(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    for (name, data) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_entry_type(tar::EntryType::Regular);
        // set_path refuses "..": write the raw name like a hostile producer would.
        let raw = &mut h.as_old_mut().name;
        raw[..name.len()].copy_from_slice(name.as_bytes());
        h.set_cksum();
        tar.append(&h, *data).unwrap();
    }
    zstd::encode_all(&tar.into_inner().unwrap()[..], 3).unwrap()
}

fn sha(b: &[u8]) -> String {
    format!("{:x}", sha2::Sha256::digest(b))
}

fn tiny_ext4(dir: &Path) -> Vec<u8> {
    let tree = dir.join("tree");
    std::fs::create_dir_all(tree.join("root")).unwrap();
    std::fs::write(tree.join("hello"), "from a bundle\n").unwrap();
    let img = dir.join("rootfs.ext4");
    let ok = Command::new("mkfs.ext4")
        .args(["-q", "-d"])
        .arg(&tree)
        .arg(&img)
        .arg("8M")
        .status()
        .unwrap()
        .success();
    assert!(ok);
    std::fs::read(img).unwrap()
}

fn entry(table: &str, name: &str, url: &str, sha256: &str) -> String {
    format!("[[{table}]]\nname = \"{name}\"\nurl = \"{url}\"\nsha256 = \"{sha256}\"\n")
}

fn nothing_staged(dir: &Path) {
    let left: Vec<_> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        left.iter()
            .all(|n| !n.to_string_lossy().starts_with(".staging")),
        "{left:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bundles_are_verified_unpacked_safely_and_published() {
    if !available(&[
        "dbus-daemon",
        "mkfs.ext4",
        "docker-registry",
        "skopeo",
        "depmod",
        "xz",
    ]) {
        return;
    }
    let Some((vmlinuz, modules, _)) = debian_kernel() else {
        return;
    };
    // A kernel with banger's initrd, to pack as a bundle: imported on a bus of its own.
    let files = tempfile::tempdir().unwrap();
    let (vmlinux, initrd) = {
        let prep = TestBus::start(BusOptions::default());
        let conn = prep.connect().await;
        Kernels1Proxy::new(&conn)
            .await
            .unwrap()
            .import_kernel(
                "base",
                opt(&[
                    ("kernel_path", vmlinuz.to_string_lossy().into_owned().into()),
                    ("modules_dir", modules.to_string_lossy().into_owned().into()),
                ]),
            )
            .await
            .unwrap();
        let k = prep.state_dir().join("kernels/base");
        (
            std::fs::read(k.join("vmlinux")).unwrap(),
            std::fs::read(k.join("initrd.img")).unwrap(),
        )
    };
    let manifest = br#"{"version": "6.1-test"}"#;
    let good_kernel = bundle(&[
        ("vmlinux", &vmlinux),
        ("initrd.img", &initrd),
        ("manifest.json", manifest),
    ]);
    let evil = bundle(&[("vmlinux", &vmlinux), ("../../escaped", b"x")]);
    let rootfs = tiny_ext4(files.path());
    let bundle_manifest = br#"{"kernel": "kb", "ready_ports": [8080]}"#;
    let good_image = bundle(&[("rootfs.ext4", &rootfs), ("manifest.json", bundle_manifest)]);
    let not_ext4 = bundle(&[("rootfs.ext4", b"not a filesystem at all")]);

    let http = Http::start(
        HashMap::from([
            ("/k.tar.zst".to_string(), good_kernel.clone()),
            ("/evil.tar.zst".to_string(), evil.clone()),
            ("/cut.tar.zst".to_string(), good_kernel.clone()),
            ("/img.tar.zst".to_string(), good_image.clone()),
            ("/bad-img.tar.zst".to_string(), not_ext4.clone()),
        ]),
        vec!["/cut.tar.zst".to_string()],
    )
    .await;
    let registry = TestRegistry::start();
    let layout = tempfile::tempdir().unwrap();
    let m = image_manifest(layout.path(), &busybox_layers(), Comp::Gzip, "amd64");
    finish_layout(layout.path(), vec![m], "v1");
    let reference = registry.push(layout.path(), "v1", "cat/tiny", &[]);

    let mut config = String::new();
    config += &entry(
        "kernel_catalog",
        "kb",
        &http.url("/k.tar.zst"),
        &sha(&good_kernel),
    );
    config += &entry(
        "kernel_catalog",
        "badsha",
        &http.url("/k.tar.zst"),
        &"0".repeat(64),
    );
    config += &entry(
        "kernel_catalog",
        "cut",
        &http.url("/cut.tar.zst"),
        &sha(&good_kernel),
    );
    config += &entry(
        "kernel_catalog",
        "evil",
        &http.url("/evil.tar.zst"),
        &sha(&evil),
    );
    config += &entry(
        "kernel_catalog",
        "kb2",
        &http.url("/k.tar.zst"),
        &sha(&good_kernel),
    );
    config += &entry(
        "image_catalog",
        "ib",
        &http.url("/img.tar.zst"),
        &sha(&good_image),
    );
    config += &entry(
        "image_catalog",
        "notext4",
        &http.url("/bad-img.tar.zst"),
        &sha(&not_ext4),
    );
    config += &format!("[[image_catalog]]\nname = \"io\"\noci = \"{reference}\"\n");
    let bus = TestBus::start(BusOptions {
        extra_config: config,
        ..Default::default()
    });
    let conn = bus.connect().await;

    // The operator's entries are in the catalog, after Debian's two flavours (resolved
    // through this host's apt: the default one is the cloud flavour).
    let out = bus.banger_as(Some(USER_OK), &["kernel", "list", "--available"]);
    let listed = text(&out);
    assert!(
        out.status.success()
            && listed.contains("kb")
            && listed.contains("debian-generic")
            && listed.contains("linux-image-cloud-amd64"),
        "{listed}"
    );

    // Kernels: the good bundle is published; the others fail, saying why.
    let kernels = Kernels1Proxy::new(&conn).await.unwrap();
    for (name, expect) in [
        ("kb", ""),
        ("badsha", "not the catalog's"),
        ("cut", "ended after"),
        ("evil", "escaped"),
    ] {
        let (id, _) = kernels.pull_kernel(name, opt(&[])).await.unwrap();
        let (result, error) = job_result(&bus, id).await;
        if expect.is_empty() {
            assert_eq!(result, "done", "{name}: {error}");
        } else {
            assert_eq!(result, "failed", "{name}");
            assert!(error.contains(expect), "{name}: {error}");
        }
    }
    let listed: Vec<String> = kernels
        .list_kernels()
        .await
        .unwrap()
        .into_iter()
        .map(|k| k.0)
        .collect();
    assert_eq!(listed, ["kb"], "only the good bundle is published");
    let out = bus.banger_as(None, &["kernel", "show", "kb"]);
    assert!(text(&out).contains("catalog:kb"), "{}", text(&out));
    let kdir = bus.state_dir().join("kernels");
    assert_eq!(std::fs::read(kdir.join("kb/vmlinux")).unwrap(), vmlinux);
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(kdir.join("kb/manifest.json")).unwrap()).unwrap();
    assert_eq!(
        (m["name"].as_str(), m["initrd"].as_str()),
        (Some("kb"), Some("initrd.img")),
        "{m}"
    );
    assert!(
        m["source"].as_str().unwrap_or("").starts_with("catalog:kb"),
        "{m}"
    );
    assert!(!kdir.join("escaped").exists() && !bus.state_dir().join("escaped").exists());
    nothing_staged(&kdir);

    // Images: catalog first (bundle, OCI entry), then the registry.
    let images = Images1Proxy::new(&conn).await.unwrap();
    let (id, _) = images.pull_image("ib", opt(&[])).await.unwrap();
    assert_eq!(job_result(&bus, id).await, ("done".into(), String::new()));
    let path = images.get_image("ib").await.unwrap();
    let prop = |p: &str| {
        text(&bus.busctl_as(
            None,
            &[
                "get-property",
                "org.banger",
                path.as_str(),
                "org.banger.Image1",
                p,
            ],
        ))
    };
    assert_eq!(
        prop("Kernel").trim(),
        "s \"kb\"",
        "the manifest names the kernel"
    );
    assert_eq!(prop("ReadyPorts").trim(), "aq 1 8080");
    let (id, _) = images.pull_image("notext4", opt(&[])).await.unwrap();
    let (result, error) = job_result(&bus, id).await;
    assert_eq!(result, "failed");
    assert!(error.contains("not an ext4 filesystem"), "{error}");
    let (id, _) = images
        .pull_image("io", opt(&[("insecure", true.into())]))
        .await
        .unwrap();
    let (result, error) = job_result(&bus, id).await;
    assert_eq!(result, "done", "{error}");
    let mut names: Vec<String> = images
        .list_images()
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.1)
        .collect();
    names.sort();
    assert_eq!(names, ["ib", "io"]);
    nothing_staged(&bus.state_dir().join("images"));

    // Kernel resolution: an image pull naming a kernel nobody has is refused at once.
    match images
        .pull_image(
            "io",
            opt(&[("name", "io2".into()), ("kernel", "nosuch".into())]),
        )
        .await
    {
        Err(e) => assert!(e.to_string().contains("kernel list --available"), "{e}"),
        Ok(_) => panic!("an unknown kernel was accepted"),
    }
    // VM create: a local kernel is used as it is, a catalog one is pulled on the miss
    // (auto_pull_kernel), an unknown one says where to look. (Reserved only: no boot.)
    let vms = banger::dbus::proxy::VMs1Proxy::new(&conn).await.unwrap();
    let create = |name: &'static str, kernel: &'static str| {
        let vms = vms.clone();
        async move {
            vms.create_vm(
                name,
                opt(&[
                    ("image", "ib".into()),
                    ("kernel", kernel.into()),
                    ("start", false.into()),
                ]),
            )
            .await
            .unwrap()
            .1
        }
    };
    let id = create("local", "kb").await;
    let (result, error) = job_result(&bus, id).await;
    assert_eq!(result, "done", "{error}");
    assert_eq!(
        kernels.list_kernels().await.unwrap().len(),
        1,
        "a local hit pulls nothing"
    );
    let id = create("miss", "kb2").await;
    let (result, error) = job_result(&bus, id).await;
    assert_eq!(result, "done", "{error}");
    assert_eq!(
        kernels.list_kernels().await.unwrap().len(),
        2,
        "kb2 was auto-pulled"
    );
    // A path handed out answers at once: the kernel's right after the job that pulled it
    // ended, a new VM's right after CreateVM returned (both were seen answering "Unknown
    // object" before the pump had exported them).
    let answers = |path: zbus::OwnedObjectPath, iface: &'static str| {
        let conn = conn.clone();
        async move {
            let props = zbus::fdo::PropertiesProxy::builder(&conn)
                .destination("org.banger")
                .path(path.clone())
                .build()
                .await
                .unwrap();
            let iface = zbus::names::InterfaceName::from_static_str_unchecked(iface);
            if let Err(e) = props.get(iface, "Name").await {
                panic!("{path} does not answer yet: {e}");
            }
        }
    };
    answers(
        kernels.get_kernel("kb2").await.unwrap(),
        "org.banger.Kernel1",
    )
    .await;
    let (vm, id, _) = vms
        .create_vm(
            "live",
            opt(&[
                ("image", "ib".into()),
                ("kernel", "kb".into()),
                ("start", false.into()),
            ]),
        )
        .await
        .unwrap();
    answers(vm, "org.banger.VM1").await;
    let (result, error) = job_result(&bus, id).await;
    assert_eq!(result, "done", "{error}");
    let id = create("unknown", "nosuch").await;
    let (result, error) = job_result(&bus, id).await;
    assert_eq!(result, "failed");
    assert!(error.contains("kernel list --available"), "{error}");
}

#[test]
fn a_bad_catalog_entry_is_a_clear_configuration_error() {
    for (text, expect) in [
        ("[[kernel_catalog]]\nname = \"k\"\nurl = \"ftp://x/k\"\nsha256 = \"00\"\n", "http"),
        (
            "[[kernel_catalog]]\nname = \"debian\"\nurl = \"http://x/k\"\nsha256 = \"0000000000000000000000000000000000000000000000000000000000000000\"\n",
            "shadows the built-in",
        ),
        (
            "[[kernel_catalog]]\nname = \"debian-generic\"\nurl = \"http://x/k\"\nsha256 = \"0000000000000000000000000000000000000000000000000000000000000000\"\n",
            "shadows the built-in",
        ),
        ("[[image_catalog]]\nname = \"i\"\n", "url and sha256"),
    ] {
        let e = banger::config::Config::parse(text).unwrap_err().to_string();
        assert!(e.contains(expect), "{text}: {e}");
    }
}
