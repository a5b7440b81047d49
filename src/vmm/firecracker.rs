//! The Firecracker driver: `firecracker --api-sock` configured through its REST API over the
//! Unix socket (`/machine-config`, `/boot-source`, `/drives/{id}`, `/vsock`, then `/actions`
//! `InstanceStart`), raw per-VM disks (reflink copy where the filesystem has it, else sparse),
//! the guest's vsock on Firecracker's own hybrid socket, power-off by `SendCtrlAltDel`.
//!
//! Every request body is built by [`requests`], which the tests validate against
//! Firecracker's API specification (`tests/firecracker-api.yaml`) through a stand-in server.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use super::process::{live_pid, spawn_detached, terminate, wait_for_path};
use super::{BootSpec, Vmm};
use crate::host::find_program;
use crate::{Error, Result};

/// The Firecracker driver.
pub struct Firecracker;

const FIRECRACKER: &str = "firecracker";

/// The API socket in a VM's runtime directory.
pub fn api_socket(run: &Path) -> PathBuf {
    run.join("firecracker.sock")
}
fn pidfile(run: &Path) -> PathBuf {
    run.join("firecracker.pid")
}
fn marker(run: &Path) -> String {
    run.to_string_lossy().into_owned()
}

/// Whether the Firecracker driver can run here (its binary and a usable `/dev/kvm`).
pub fn usable() -> bool {
    find_program(FIRECRACKER).is_some() && super::qemu::kvm_opens()
}

/// The configuration requests, in the order Firecracker needs them, ending with
/// `InstanceStart`: `(path, body)`, all `PUT`.
pub fn requests(spec: &BootSpec, vsock: &Path) -> Result<Vec<(String, Value)>> {
    if spec.vcpus > 1 && spec.vcpus % 2 == 1 || spec.vcpus > 32 {
        return Err(Error::InvalidArgument(format!(
            "Firecracker runs 1 or an even number of vCPUs up to 32, not {}",
            spec.vcpus
        )));
    }
    let p = |p: &Path| p.to_string_lossy().into_owned();
    // Firecracker's virtio-mmio devices are numbered in the order they are added.
    let mut boot = json!({
        "kernel_image_path": p(&spec.kernel),
        "boot_args": format!(
            "console=ttyS0 reboot=k panic=1 pci=off root=/dev/vda rw banger.work=/dev/vdb {}",
            spec.cmdline
        ),
    });
    if let Some(i) = &spec.initrd {
        boot["initrd_path"] = json!(p(i));
    }
    let drive = |id: &str, path: &Path| {
        json!({
            "drive_id": id,
            "path_on_host": p(path),
            "is_root_device": false,
            "is_read_only": false,
        })
    };
    let mut reqs = vec![
        (
            "/machine-config".into(),
            json!({
                "vcpu_count": spec.vcpus,
                "mem_size_mib": spec.memory_mib,
                "smt": false,
            }),
        ),
        ("/boot-source".into(), boot),
        (
            format!("/drives/{}", super::ROOT_SERIAL),
            drive(super::ROOT_SERIAL, &spec.rootfs),
        ),
        (
            format!("/drives/{}", super::WORK_SERIAL),
            drive(super::WORK_SERIAL, &spec.work),
        ),
    ];
    if let Some(n) = &spec.net {
        reqs.push((
            "/network-interfaces/eth0".into(),
            json!({ "iface_id": "eth0", "host_dev_name": n.tap, "guest_mac": n.mac }),
        ));
    }
    reqs.push((
        "/vsock".into(),
        json!({ "guest_cid": spec.cid, "uds_path": p(vsock) }),
    ));
    reqs.push(("/actions".into(), json!({ "action_type": "InstanceStart" })));
    Ok(reqs)
}

fn api_err(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Error {
    Error::failed("Firecracker API request failed", e)
}

/// One `PUT` on the API socket; a non-2xx answer is an error carrying its `fault_message`.
pub async fn put(socket: &Path, path: &str, body: &Value) -> Result<()> {
    let mut s = UnixStream::connect(socket).await.map_err(api_err)?;
    let body = body.to_string();
    let req = format!(
        "PUT {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.map_err(api_err)?;
    // The head, then a body only as long as Content-Length says (the server keeps the
    // connection open).
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let b = s.read_u8().await.map_err(api_err)?;
        head.push(b);
        if head.len() > 16 * 1024 {
            return Err(api_err("response head too long"));
        }
    }
    let head = String::from_utf8_lossy(&head);
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| api_err(format!("bad status line in {head:?}")))?;
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len.min(1 << 20)];
    s.read_exact(&mut body).await.map_err(api_err)?;
    if (200..300).contains(&status) {
        return Ok(());
    }
    let fault = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v["fault_message"].as_str().map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
    Err(api_err(format!("PUT {path}: HTTP {status}: {fault}")))
}

/// Sends the whole configuration and starts the instance.
pub async fn configure(socket: &Path, spec: &BootSpec, vsock: &Path) -> Result<()> {
    for (path, body) in requests(spec, vsock)? {
        put(socket, &path, &body).await?;
    }
    Ok(())
}

#[async_trait]
impl Vmm for Firecracker {
    fn name(&self) -> &'static str {
        "firecracker"
    }

    fn rootfs_path(&self, vm_dir: &Path) -> PathBuf {
        vm_dir.join("rootfs.ext4")
    }

    async fn prepare_rootfs(
        &self,
        image: &Path,
        vm_dir: &Path,
        size: Option<u64>,
    ) -> Result<PathBuf> {
        let out = self.rootfs_path(vm_dir);
        let (img, o) = (image.to_owned(), out.clone());
        tokio::task::spawn_blocking(move || -> Result<()> {
            crate::host::run(
                "cp",
                [
                    "--reflink=auto".as_ref(),
                    "--sparse=always".as_ref(),
                    img.as_os_str(),
                    o.as_os_str(),
                ],
            )?;
            if let Some(size) = size {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&o)
                    .map_err(|e| Error::failed("Cannot grow the root disk", e))?;
                if f.metadata().map(|m| m.len() < size).unwrap_or(false) {
                    f.set_len(size)
                        .map_err(|e| Error::failed("Cannot grow the root disk", e))?;
                    crate::host::run("resize2fs", ["-f".as_ref(), o.as_os_str()])?;
                }
            }
            Ok(())
        })
        .await
        .map_err(|e| Error::failed("Root disk task failed", e))??;
        Ok(out)
    }

    async fn boot(&self, spec: &BootSpec) -> Result<()> {
        let bin = find_program(FIRECRACKER).ok_or_else(|| {
            Error::failed(
                "firecracker is not installed; put a release binary in /usr/local/bin or set vmm = \"qemu\"",
                std::io::Error::from(std::io::ErrorKind::NotFound),
            )
        })?;
        let run = &spec.run_dir;
        self.kill(run).await?;
        // Firecracker writes the guest's serial console to its standard output.
        let (api, id) = (api_socket(run), format!("banger-{}", spec.id));
        let spawned = spawn_detached(&super::process::Detached {
            pidfile: &pidfile(run),
            unit: &super::scope::vm_unit(&spec.id),
            program: &bin,
            args: &[
                "--api-sock".as_ref(),
                api.as_os_str(),
                "--id".as_ref(),
                id.as_ref(),
            ],
            log: &spec.console_log,
            limits: super::process::UnitLimits::vmm(spec.vcpus, spec.memory_mib),
            writable: &[
                run.as_path(),
                spec.console_log.parent().unwrap_or(run.as_path()),
            ],
            jail: &spec.jail,
            tap: None,
        })
        .await;
        if let Err(e) = spawned {
            self.kill(run).await?;
            return Err(e);
        }
        if !wait_for_path(&api, Duration::from_secs(10)).await {
            self.kill(run).await?;
            return Err(Error::failed(
                "firecracker did not open its API socket",
                std::io::Error::other(spec.console_log.display().to_string()),
            ));
        }
        let r = configure(&api_socket(run), spec, &self.vsock_socket(run)).await;
        if r.is_err() {
            self.kill(run).await?;
        }
        r
    }

    fn running(&self, run_dir: &Path) -> bool {
        live_pid(&pidfile(run_dir), &marker(run_dir)).is_some()
    }

    fn pids(&self, run_dir: &Path) -> Vec<u32> {
        live_pid(&pidfile(run_dir), &marker(run_dir))
            .map(|p| vec![p as u32])
            .unwrap_or_default()
    }

    async fn request_power_off(&self, run_dir: &Path) -> Result<()> {
        put(
            &api_socket(run_dir),
            "/actions",
            &json!({ "action_type": "SendCtrlAltDel" }),
        )
        .await
    }

    async fn kill(&self, run_dir: &Path) -> Result<()> {
        terminate(&pidfile(run_dir), &marker(run_dir), Duration::from_secs(3)).await;
        for s in [api_socket(run_dir), self.vsock_socket(run_dir)] {
            let _ = std::fs::remove_file(s);
        }
        Ok(())
    }
}
