//! OCI fixtures: layouts built here from tar layers, a real `docker-registry` on 127.0.0.1,
//! and `skopeo copy` to push.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use sha2::{Digest, Sha256};
use tar::{EntryType, Header};

fn sha(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A layer under construction.
pub struct Layer(tar::Builder<Vec<u8>>);

impl Default for Layer {
    fn default() -> Self {
        Layer(tar::Builder::new(Vec::new()))
    }
}

fn header(path: &str, t: EntryType, mode: u32, uid: u64, size: u64) -> Header {
    let mut h = Header::new_gnu();
    h.set_entry_type(t);
    h.set_mode(mode);
    h.set_uid(uid);
    h.set_gid(uid);
    h.set_size(size);
    h.set_mtime(1_700_000_000);
    let name = &mut h.as_gnu_mut().unwrap().name;
    name.fill(0);
    name[..path.len()].copy_from_slice(path.as_bytes());
    h.set_cksum();
    h
}

impl Layer {
    /// A directory.
    pub fn dir(mut self, path: &str, mode: u32) -> Self {
        self.0
            .append(&header(path, EntryType::Directory, mode, 0, 0), &[][..])
            .unwrap();
        self
    }
    /// A directory owned by `uid` (and the group of that number).
    #[allow(dead_code)]
    pub fn dir_owned(mut self, path: &str, mode: u32, uid: u64) -> Self {
        self.0
            .append(&header(path, EntryType::Directory, mode, uid, 0), &[][..])
            .unwrap();
        self
    }
    /// A regular file.
    pub fn file(mut self, path: &str, data: &[u8], mode: u32, uid: u64) -> Self {
        self.0
            .append(
                &header(path, EntryType::Regular, mode, uid, data.len() as u64),
                data,
            )
            .unwrap();
        self
    }
    /// A symlink or hard link.
    pub fn link(mut self, path: &str, t: EntryType, target: &str) -> Self {
        let mut h = header(path, t, 0o777, 0, 0);
        let l = &mut h.as_gnu_mut().unwrap().linkname;
        l.fill(0);
        l[..target.len()].copy_from_slice(target.as_bytes());
        h.set_cksum();
        self.0.append(&h, &[][..]).unwrap();
        self
    }
    /// A character device node.
    pub fn char_device(mut self, path: &str, major: u32, minor: u32) -> Self {
        let mut h = header(path, EntryType::Char, 0o666, 0, 0);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        h.set_cksum();
        self.0.append(&h, &[][..]).unwrap();
        self
    }
    /// A file with an xattr.
    pub fn xattr_file(mut self, path: &str, key: &str, value: &str) -> Self {
        self.0
            .append_pax_extensions([(format!("SCHILY.xattr.{key}").as_str(), value.as_bytes())])
            .unwrap();
        self.file(path, b"xattr", 0o644, 0)
    }
    /// The tar bytes.
    pub fn bytes(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }
}

/// How to compress layers.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Comp {
    /// gzip
    Gzip,
    /// zstd
    Zstd,
}

fn write_blob(dir: &Path, data: &[u8]) -> (String, u64) {
    let d = sha(data);
    std::fs::write(dir.join("blobs/sha256").join(&d), data).unwrap();
    (format!("sha256:{d}"), data.len() as u64)
}

/// Writes an OCI image layout with one linux/`arch` image (tag `tag`), returning the
/// manifest descriptor JSON for indexes.
pub fn image_manifest(dir: &Path, layers: &[Vec<u8>], comp: Comp, arch: &str) -> serde_json::Value {
    image_manifest_typed(dir, layers, comp, arch, None)
}

/// As [`image_manifest`], with every layer's media type replaced by `media_type` if given.
pub fn image_manifest_typed(
    dir: &Path,
    layers: &[Vec<u8>],
    comp: Comp,
    arch: &str,
    media_type: Option<&str>,
) -> serde_json::Value {
    image_manifest_full(
        dir,
        layers,
        comp,
        arch,
        media_type,
        serde_json::json!({"Cmd": ["/bin/sh"], "Labels": {}}),
    )
}

/// As [`image_manifest`], with these labels in the image configuration.
#[allow(dead_code)]
pub fn image_manifest_labeled(
    dir: &Path,
    layers: &[Vec<u8>],
    labels: serde_json::Value,
) -> serde_json::Value {
    image_manifest_full(
        dir,
        layers,
        Comp::Gzip,
        "amd64",
        None,
        serde_json::json!({"Cmd": ["/bin/sh"], "Labels": labels}),
    )
}

/// As [`image_manifest`], with this `config` section (Env, WorkingDir, Entrypoint, …).
#[allow(dead_code)]
pub fn image_manifest_configured(
    dir: &Path,
    layers: &[Vec<u8>],
    config: serde_json::Value,
) -> serde_json::Value {
    image_manifest_full(dir, layers, Comp::Gzip, "amd64", None, config)
}

fn image_manifest_full(
    dir: &Path,
    layers: &[Vec<u8>],
    comp: Comp,
    arch: &str,
    media_type: Option<&str>,
    run_config: serde_json::Value,
) -> serde_json::Value {
    std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    for l in layers {
        diff_ids.push(format!("sha256:{}", sha(l)));
        let (data, mt) = match comp {
            Comp::Gzip => {
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                e.write_all(l).unwrap();
                (
                    e.finish().unwrap(),
                    "application/vnd.oci.image.layer.v1.tar+gzip",
                )
            }
            Comp::Zstd => (
                zstd::encode_all(&l[..], 3).unwrap(),
                "application/vnd.oci.image.layer.v1.tar+zstd",
            ),
        };
        let (digest, size) = write_blob(dir, &data);
        let mt = media_type.unwrap_or(mt);
        descs.push(serde_json::json!({"mediaType": mt, "digest": digest, "size": size}));
    }
    let config = serde_json::json!({
        "architecture": arch, "os": "linux",
        "config": run_config,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let (cd, cs) = write_blob(dir, config.to_string().as_bytes());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
        "layers": descs,
    });
    let (md, ms) = write_blob(dir, manifest.to_string().as_bytes());
    serde_json::json!({
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": ms,
        "platform": {"architecture": arch, "os": "linux"},
    })
}

/// Writes `index.json` naming `entries` under `tag` (an image index when more than one).
pub fn finish_layout(dir: &Path, entries: Vec<serde_json::Value>, tag: &str) {
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let top = if entries.len() == 1 {
        let mut e = entries.into_iter().next().unwrap();
        e.as_object_mut().unwrap().remove("platform");
        e
    } else {
        let index = serde_json::json!({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": entries,
        });
        let (d, s) = write_blob(dir, index.to_string().as_bytes());
        serde_json::json!({"mediaType": "application/vnd.oci.image.index.v1+json", "digest": d, "size": s})
    };
    let mut top = top;
    top["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": tag});
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [top]});
    std::fs::write(dir.join("index.json"), index.to_string()).unwrap();
}

/// A registry on 127.0.0.1 with temporary storage, stopped on drop.
pub struct TestRegistry {
    child: Child,
    /// `127.0.0.1:PORT`
    pub host: String,
    _dir: tempfile::TempDir,
    /// The network namespace it serves in (a process of it), when not the host's.
    netns: Option<u32>,
}

impl TestRegistry {
    /// Starts it and waits until it answers.
    pub fn start() -> TestRegistry {
        Self::start_with(None, "")
    }

    /// Starts one in the network namespace of process `pid` (a test bus's, whose daemon
    /// then pulls from it on its own loopback).
    pub fn start_in_netns(pid: u32) -> TestRegistry {
        Self::start_with(Some(pid), "")
    }

    /// A command in the registry's network namespace.
    pub fn command(&self, program: &str) -> Command {
        in_ns(self.netns, program)
    }

    /// Starts one whose `http:` section gets `extra` lines (e.g. htpasswd auth).
    pub fn start_with(netns: Option<u32>, extra: &str) -> TestRegistry {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let host = format!("127.0.0.1:{port}");
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {host}\n{extra}",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let mut child = in_ns(netns, "docker-registry")
            .args(["serve"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        for _ in 0..100 {
            // Ready when it accepts a connection, in its own namespace.
            let up = in_ns(netns, "bash")
                .args(["-c", &format!("echo > /dev/tcp/127.0.0.1/{port}")])
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if up {
                return TestRegistry {
                    child,
                    host,
                    _dir: dir,
                    netns,
                };
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("docker-registry did not start on {host}");
    }

    /// Pushes the layout's `tag` as `name:tag`; `extra` goes to skopeo (e.g. `--format v2s2`).
    pub fn push(&self, layout: &Path, tag: &str, name: &str, extra: &[&str]) -> String {
        let dest = format!("{}/{name}:{tag}", self.host);
        let out = self
            .command("skopeo")
            .args(["copy", "--quiet", "--all", "--dest-tls-verify=false"])
            .args(extra)
            .arg(format!("oci:{}:{tag}", layout.display()))
            .arg(format!("docker://{dest}"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "skopeo: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        dest
    }

    /// The registry's storage, to tamper with blobs.
    pub fn storage(&self) -> PathBuf {
        self._dir.path().join("data")
    }
}

fn in_ns(netns: Option<u32>, program: &str) -> Command {
    match netns {
        Some(pid) => {
            let mut c = Command::new("nsenter");
            c.args(["-t", &pid.to_string(), "-n", "--", program]);
            c
        }
        None => Command::new(program),
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The busybox-based test image's two layers.
pub fn busybox_layers() -> Vec<Vec<u8>> {
    let busybox = std::fs::read("/bin/busybox").expect("busybox-static");
    let lower = Layer::default()
        .dir("bin", 0o755)
        .file("bin/busybox", &busybox, 0o755, 0)
        .link("bin/sh", EntryType::Symlink, "busybox")
        .link("bin/hardbox", EntryType::Link, "bin/busybox")
        .dir("etc", 0o755)
        .file("etc/gone", b"whited out", 0o644, 0)
        .file("etc/hostname", b"tiny\n", 0o644, 0)
        .dir("opq", 0o755)
        .file("opq/old", b"old", 0o644, 0)
        .dir("usr/bin", 0o755)
        .file("usr/bin/su", b"#!/bin/sh\n", 0o4755, 0)
        .dir("home/user", 0o755)
        .file("home/user/mine", b"user data", 0o600, 1000)
        .dir("root", 0o700)
        .file("root/.profile", b"echo hi\n", 0o644, 0)
        .dir("dev", 0o755)
        .char_device("dev/null", 1, 3)
        .bytes();
    let upper = Layer::default()
        .file("etc/.wh.gone", b"", 0o644, 0)
        .file("opq/.wh..wh..opq", b"", 0o644, 0)
        .file("opq/new", b"new", 0o644, 0)
        .xattr_file("etc/xattr", "user.banger", "yes")
        .bytes();
    vec![lower, upper]
}

/// A TCP proxy to a registry that holds every connection until opened: a job pulling
/// through it is provably stuck inside its body, whatever the timing.
pub struct GateProxy {
    /// `127.0.0.1:PORT`
    pub host: String,
    open: tokio::sync::watch::Sender<bool>,
}

impl GateProxy {
    /// Starts a closed gate in front of `upstream`.
    pub async fn start(upstream: &str) -> GateProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let host = listener.local_addr().unwrap().to_string();
        let (open, rx) = tokio::sync::watch::channel(false);
        let upstream = upstream.to_owned();
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let mut rx = rx.clone();
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    if rx.wait_for(|o| *o).await.is_err() {
                        return;
                    }
                    if let Ok(mut up) = tokio::net::TcpStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut up).await;
                    }
                });
            }
        });
        GateProxy { host, open }
    }

    /// Lets every held and later connection through.
    pub fn open(&self) {
        self.open.send_replace(true);
    }
}

/// A TCP proxy to a registry that passes the first `budget` bytes each connection answers,
/// then holds the connection open without passing more: a pull through it stops inside a
/// layer larger than the budget, whatever the timing, for as long as the test needs.
pub struct StallProxy {
    /// `127.0.0.1:PORT`
    pub host: String,
}

impl StallProxy {
    /// Starts one in front of `upstream`.
    pub async fn start(upstream: &str, budget: usize) -> StallProxy {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let host = listener.local_addr().unwrap().to_string();
        let upstream = upstream.to_owned();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(up) = tokio::net::TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut ur, mut uw) = up.into_split();
                    tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut cr, &mut uw).await;
                    });
                    let mut left = budget;
                    let mut buf = vec![0u8; 16384];
                    while left > 0 {
                        let n = match ur.read(&mut buf[..left.min(16384)]).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        if cw.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                        left -= n;
                    }
                    // Held: the client waits for the rest until it goes away.
                    std::future::pending::<()>().await;
                    drop((cw, ur));
                });
            }
        });
        StallProxy { host }
    }
}
