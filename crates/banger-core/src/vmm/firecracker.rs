//! The Firecracker driver: `firecracker --api-sock` configured through its REST API over the
//! Unix socket (`/machine-config`, `/boot-source`, `/drives/{id}`, `/vsock`, then `/actions`
//! `InstanceStart`), raw per-VM disks (reflink copy where the filesystem has it, else sparse),
//! the guest's vsock on Firecracker's own hybrid socket, power-off by `SendCtrlAltDel`.
//! Snapshots: `PATCH /vm` pauses, `PUT /snapshot/create` writes the state and memory files in
//! the VM's chroot, which banger turns into one stream (see [`STREAM_MAGIC`]); a restore
//! writes them into the new VM's chroot and `PUT /snapshot/load`s them into a Firecracker
//! that was started but never configured. Snapshots need the jailer: in a chroot a VM's
//! disks and vsock have the same names in every VM, so the restored VM opens its own.
//!
//! Every request body is built by [`requests`], which the tests validate against
//! Firecracker's API specification (`tests/firecracker-api.yaml`) through a stand-in server.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::error::{failed, invalid};
use super::process::{live_pid, spawn_detached, terminate, wait_for_path};
use super::{BootSpec, Vmm};
use crate::host::find_program;
use crate::{Error, Result};

/// The Firecracker driver.
pub struct Firecracker;

const FIRECRACKER: &str = "firecracker";

/// The jailer Firecracker runs under when it is installed.
const JAILER: &str = "jailer";

/// The API socket: in the jailer's chroot when the VM runs jailed, else in the VM's own
/// runtime directory.
pub fn api_socket(run: &Path) -> PathBuf {
    match jailed_root(run) {
        Some(root) => root.join(Chroot::API_SOCKET.trim_start_matches('/')),
        None => super::jail::own_runtime(run).join("firecracker.sock"),
    }
}
fn pidfile(run: &Path) -> PathBuf {
    run.join("firecracker.pid")
}
/// The console logger that bounds Firecracker's standard output (the guest's serial console
/// and Firecracker's own words): its pid file, and the listener it gets, in root's runtime
/// directory (only root, or systemd for it, connects).
fn console_pidfile(run: &Path) -> PathBuf {
    super::console::logger_pidfile(run)
}
fn console_socket(run: &Path) -> PathBuf {
    run.join("console-output.sock")
}
/// Where a jailed VM's chroot is, written by root in root's runtime directory at boot.
fn chroot_record(run: &Path) -> PathBuf {
    run.join("jailer-root")
}
/// Records where the VM's chroot is (root's runtime directory, so the VM cannot move it).
pub fn record_chroot(run: &Path, root: &Path) -> Result<()> {
    std::fs::write(chroot_record(run), root.to_string_lossy().as_bytes())
        .map_err(|e| failed("Cannot record the VM's chroot", e))
}
fn jailed_root(run: &Path) -> Option<PathBuf> {
    let root = std::fs::read_to_string(chroot_record(run)).ok()?;
    Some(PathBuf::from(root.trim_end()))
}
/// What the VM's Firecracker's command line names, jailed or not: its jailer id.
fn marker(run: &Path) -> String {
    jailer_id(&run.file_name().unwrap_or_default().to_string_lossy())
}

/// The jailer's id of a VM (letters, digits and hyphens, at most 64: banger ids are 16 hex
/// digits).
pub fn jailer_id(vm_id: &str) -> String {
    format!("banger-{vm_id}")
}

/// The chroot Firecracker's jailer builds for a VM, `<base>/firecracker/<id>/root`, with its
/// base in the VM's own directory: on the filesystem of its disks and of the kernels, so
/// they enter the chroot as hard links (a write reaches the VM's disk; nothing is copied),
/// and taken back with the rest of the directory before each start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chroot {
    /// `--chroot-base-dir`.
    pub base: PathBuf,
    /// The jailed Firecracker's `/`.
    pub root: PathBuf,
}

impl Chroot {
    /// The API socket, as Firecracker in the chroot names it.
    pub const API_SOCKET: &'static str = "/firecracker.sock";
    const KERNEL: &'static str = "/vmlinux";
    const INITRD: &'static str = "/initrd.img";
    const ROOTFS: &'static str = "/rootfs.ext4";
    const WORK: &'static str = "/work.ext4";
    const VSOCK: &'static str = "/vsock.sock";

    /// The chroot of the VM `spec` boots, whose directory holds its root disk.
    pub fn of(spec: &BootSpec, exec_file: &Path) -> Self {
        let vm_dir = spec.rootfs.parent().unwrap_or(Path::new("/"));
        let base = vm_dir.join("jailer");
        let name = exec_file.file_name().unwrap_or_default();
        let root = base.join(name).join(jailer_id(&spec.id)).join("root");
        Chroot { base, root }
    }

    /// A path as the host sees it, for one the jailed Firecracker names.
    pub fn host_path(&self, inside: &str) -> PathBuf {
        self.root.join(inside.trim_start_matches('/'))
    }

    /// Builds the chroot afresh with what the VM uses (hard links to its disks, kernel and
    /// initrd, copies where a link cannot be made) and returns the spec as the jailed
    /// Firecracker sees it.
    pub fn populate(&self, spec: &BootSpec) -> Result<BootSpec> {
        crate::layout::remove_any(&self.base)?;
        std::fs::create_dir_all(&self.root)
            .map_err(|e| failed(format!("Cannot create {}", self.root.display()), e))?;
        let mut inside = spec.clone();
        let put = |from: &Path, to: &'static str, link: bool| -> Result<PathBuf> {
            let dst = self.host_path(to);
            let fail = |e| failed(format!("Cannot put {} in the jail", from.display()), e);
            if !link || std::fs::hard_link(from, &dst).is_err() {
                // A copy is the VM's to read (0600), whoever owned the original.
                std::fs::copy(from, &dst).map_err(fail)?;
                std::os::unix::fs::chown(&dst, Some(spec.jail.uid), Some(spec.jail.uid))
                    .map_err(fail)?;
                std::fs::set_permissions(&dst, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                    .map_err(fail)?;
            }
            Ok(PathBuf::from(to))
        };
        inside.kernel = put(&spec.kernel, Self::KERNEL, true)?;
        if let Some(i) = &spec.initrd {
            inside.initrd = Some(put(i, Self::INITRD, true)?);
        }
        // Disks must be links: a copy would boot, and lose every write.
        for (disk, to, slot) in [
            (&spec.rootfs, Self::ROOTFS, &mut inside.rootfs),
            (&spec.work, Self::WORK, &mut inside.work),
        ] {
            std::fs::hard_link(disk, self.host_path(to))
                .map_err(|e| failed(format!("Cannot link {} into the jail", disk.display()), e))?;
            *slot = PathBuf::from(to);
        }
        Ok(inside)
    }

    /// The vsock socket, as the jailed Firecracker names it.
    pub fn vsock(&self) -> &'static Path {
        Path::new(Self::VSOCK)
    }
}

/// The jailer's command line for `spec`: Firecracker `exec_file` as the VM's uid and the VMM
/// group (which may read the kernel), in `chroot`, its API socket at [`Chroot::API_SOCKET`].
/// `cgroups`: the jailer bounds memory and tasks itself (hosts without systemd, where no
/// unit does).
pub fn jailer_args(
    spec: &BootSpec,
    exec_file: &Path,
    chroot: &Chroot,
    cgroups: bool,
) -> Vec<std::ffi::OsString> {
    let mut a: Vec<std::ffi::OsString> = vec![
        "--id".into(),
        jailer_id(&spec.id).into(),
        "--exec-file".into(),
        exec_file.into(),
        "--uid".into(),
        spec.jail.uid.to_string().into(),
        "--gid".into(),
        super::jail::vmm_gid().to_string().into(),
        "--chroot-base-dir".into(),
        chroot.base.clone().into(),
    ];
    if cgroups {
        let limits = super::process::UnitLimits::vmm(spec.vcpus, spec.memory_mib);
        a.extend([
            "--cgroup-version".into(),
            "2".into(),
            "--parent-cgroup".into(),
            "banger".into(),
            "--cgroup".into(),
            format!("memory.max={}", limits.memory_max).into(),
            "--cgroup".into(),
            format!("pids.max={}", limits.tasks_max).into(),
        ]);
    }
    a.extend([
        "--resource-limit".into(),
        "no-file=1024".into(),
        "--".into(),
        "--api-sock".into(),
        Chroot::API_SOCKET.into(),
    ]);
    a
}

/// Whether the Firecracker driver can run here (its binary and a usable `/dev/kvm`).
pub fn usable() -> bool {
    find_program(FIRECRACKER).is_some() && super::qemu::kvm_opens()
}

/// The configuration requests, in the order Firecracker needs them, ending with
/// `InstanceStart`: `(path, body)`, all `PUT`.
pub fn requests(spec: &BootSpec, vsock: &Path) -> Result<Vec<(String, Value)>> {
    if spec.vcpus > 1 && spec.vcpus % 2 == 1 || spec.vcpus > 32 {
        return Err(invalid(format!(
            "Firecracker runs 1 or an even number of vCPUs up to 32, not {}",
            spec.vcpus
        )));
    }
    let p = |p: &Path| p.to_string_lossy().into_owned();
    // Firecracker's virtio-mmio devices are numbered in the order they are added.
    let mut boot = json!({
        "kernel_image_path": p(&spec.kernel),
        "boot_args": format!(
            "console=ttyS0 reboot=k panic=1 pci=off root=/dev/vda rw banger.work=/dev/vdb {}{}",
            spec.cmdline,
            if spec.machine.balloon {
                super::page_reporting_arg()
            } else {
                String::new()
            }
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
    if spec.machine.balloon {
        // As on QEMU: never inflated (the guest keeps what it was given); the pages it frees
        // are reported and Firecracker gives them back to the host.
        reqs.push((
            "/balloon".into(),
            json!({ "amount_mib": 0, "deflate_on_oom": true, "free_page_reporting": true }),
        ));
    }
    reqs.push(("/actions".into(), json!({ "action_type": "InstanceStart" })));
    Ok(reqs)
}

fn api_err(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Error {
    failed("Firecracker API request failed", e)
}

/// The request that pauses (or resumes) a Firecracker VM: `PATCH /vm`.
pub fn pause_request(pause: bool) -> (&'static str, Value) {
    (
        "/vm",
        json!({ "state": if pause { "Paused" } else { "Resumed" } }),
    )
}

/// `PUT path` with a JSON body on Firecracker's API socket; Ok on a 2xx answer.
pub async fn put(socket: &Path, path: &str, body: &Value) -> Result<()> {
    send(socket, "PUT", path, body).await
}

/// How long a snapshot request may take (Firecracker writes or maps the guest's memory
/// before it answers); every other request has QMP's deadline.
const SNAPSHOT_DEADLINE: Duration = Duration::from_secs(300);

/// One request with a JSON body on the API socket; a non-2xx answer is an error carrying its
/// `fault_message`. Bounded like QMP: a head over 16 KiB, a body over 1 MiB or no answer
/// within the deadline fails the request, so a wedged VMM never holds the VM's lock.
pub async fn send(socket: &Path, method: &str, path: &str, body: &Value) -> Result<()> {
    let deadline = if path.starts_with("/snapshot") {
        SNAPSHOT_DEADLINE
    } else {
        super::qmp::DEADLINE
    };
    send_within(socket, method, path, body, deadline).await
}

async fn send_within(
    socket: &Path,
    method: &str,
    path: &str,
    body: &Value,
    deadline: Duration,
) -> Result<()> {
    match tokio::time::timeout(deadline, exchange(socket, method, path, body)).await {
        Ok(r) => r,
        Err(_) => Err(api_err(format!(
            "{method} {path}: Firecracker did not answer within {deadline:?}"
        ))),
    }
}

async fn exchange(socket: &Path, method: &str, path: &str, body: &Value) -> Result<()> {
    let mut s = super::jail::connect_async(socket).map_err(api_err)?;
    let body = body.to_string();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
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

    fn disk_format(&self) -> super::DiskFormat {
        super::DiskFormat::Raw
    }

    async fn prepare_rootfs(
        &self,
        image: &Path,
        format: super::DiskFormat,
        vm_dir: &Path,
        size: Option<u64>,
    ) -> Result<PathBuf> {
        if format != super::DiskFormat::Raw {
            return Err(invalid(
                "Firecracker boots raw disks only, and this one is qcow2 (a snapshot taken on \
                 qemu restores only there)",
            ));
        }
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
                    .map_err(|e| failed("Cannot grow the root disk", e))?;
                if f.metadata().map(|m| m.len() < size).unwrap_or(false) {
                    f.set_len(size)
                        .map_err(|e| failed("Cannot grow the root disk", e))?;
                    crate::host::run("resize2fs", ["-f".as_ref(), o.as_os_str()])?;
                }
            }
            Ok(())
        })
        .await
        .map_err(|e| failed("Root disk task failed", e))??;
        Ok(out)
    }

    async fn boot(&self, spec: &BootSpec) -> Result<()> {
        let bin = find_program(FIRECRACKER).ok_or_else(|| {
            failed(
                "firecracker is not installed; put a release binary in /usr/local/bin or set vmm = \"qemu\"",
                std::io::Error::from(std::io::ErrorKind::NotFound),
            )
        })?;
        if !spec.shares.is_empty() {
            return Err(invalid(
                "Firecracker has no virtio-fs, so a VM with shared folders boots only on \
                 qemu (vmm = \"qemu\")",
            ));
        }
        let run = &spec.run_dir;
        self.kill(run).await?;
        let _ = std::fs::remove_file(chroot_record(run));
        // Firecracker opens the tap by name as the VM's uid: the tap is that uid's.
        if let Some(n) = &spec.net {
            crate::net::own_tap(&n.tap, spec.jail.uid)?;
        }
        let vm_dir = spec.rootfs.parent().unwrap_or(run.as_path());
        let api_plain = super::jail::own_runtime(run).join("firecracker.sock");
        let id = jailer_id(&spec.id);
        let plain_args: Vec<&std::ffi::OsStr> = vec![
            "--api-sock".as_ref(),
            api_plain.as_os_str(),
            "--id".as_ref(),
            id.as_ref(),
        ];
        // Under the jailer when it is installed: it builds the chroot and mount namespace,
        // makes the devices, and becomes the VM's uid itself.
        let jailed = match find_program(JAILER) {
            Some(jailer) => {
                let chroot = Chroot::of(spec, &bin);
                let (c, s) = (chroot.clone(), spec.clone());
                let inside = tokio::task::spawn_blocking(move || c.populate(&s))
                    .await
                    .map_err(|e| failed("Jail task failed", e))??;
                let args = jailer_args(spec, &bin, &chroot, !super::scope::systemd_booted());
                record_chroot(run, &chroot.root)?;
                Some((jailer, args, inside, chroot))
            }
            None => None,
        };
        let writable = [run.as_path(), vm_dir];
        let limits = super::process::UnitLimits::vmm(spec.vcpus, spec.memory_mib);
        // Firecracker writes the guest's serial console to its standard output.
        let (program, argv): (&Path, Vec<&std::ffi::OsStr>) = match &jailed {
            Some((jailer, args, _, _)) => (jailer, args.iter().map(|a| a.as_os_str()).collect()),
            None => (&bin, plain_args),
        };
        // Firecracker attaches its tap by name itself, in the host's network namespace.
        let jail = super::jail::Jail {
            offline: false,
            ..spec.jail.clone()
        };
        // A guest may print without end: its console goes to a logger that keeps the newest
        // of it (`vmm::console`), never straight to a file.
        let console = console_socket(run);
        let args = ["-".as_ref(), spec.console_log.as_os_str()];
        if let Err(e) = super::console::start_logger(spec, &args, &console, &console).await {
            self.kill(run).await?;
            return Err(e);
        }
        let detached = super::process::Detached {
            pidfile: &pidfile(run),
            unit: &super::scope::vm_unit(&spec.id),
            program,
            args: &argv,
            log: &run.join("firecracker.log"),
            output: Some(&console),
            limits,
            writable: &writable,
            jail: &jail,
            tap: None,
            tap_netns: None,
            listen: None,
            ram: None,
        };
        let spawned = if jailed.is_some() {
            super::process::spawn_jailer(&detached).await
        } else {
            spawn_detached(&detached).await
        };
        if let Err(e) = spawned {
            self.kill(run).await?;
            return Err(e);
        }
        let api = api_socket(run);
        if !wait_for_path(&api, Duration::from_secs(10)).await {
            self.kill(run).await?;
            return Err(failed(
                "firecracker did not open its API socket",
                std::io::Error::other(spec.console_log.display().to_string()),
            ));
        }
        // A restore loads a snapshot into a Firecracker nothing has configured yet.
        let r = match &jailed {
            _ if spec.incoming => Ok(()),
            Some((_, _, inside, chroot)) => configure(&api, inside, chroot.vsock()).await,
            None => configure(&api, spec, &self.vsock_socket(run)).await,
        };
        if r.is_err() {
            self.kill(run).await?;
        }
        r
    }

    fn vsock_socket(&self, run_dir: &Path) -> PathBuf {
        match jailed_root(run_dir) {
            Some(root) => root.join(Chroot::VSOCK.trim_start_matches('/')),
            None => super::jail::own_runtime(run_dir).join("vsock.sock"),
        }
    }

    fn liveness(&self, run_dir: &Path) -> super::process::Liveness {
        super::process::liveness(&pidfile(run_dir), &marker(run_dir))
    }

    fn pids(&self, run_dir: &Path) -> Vec<u32> {
        [pidfile(run_dir), console_pidfile(run_dir)]
            .iter()
            .filter_map(|f| live_pid(f, &marker(run_dir)))
            .map(|p| p as u32)
            .collect()
    }

    async fn pause(&self, run_dir: &Path) -> Result<()> {
        let (path, body) = pause_request(true);
        send(&api_socket(run_dir), "PATCH", path, &body).await
    }

    async fn resume(&self, run_dir: &Path) -> Result<()> {
        let (path, body) = pause_request(false);
        send(&api_socket(run_dir), "PATCH", path, &body).await
    }

    async fn save_state(&self, run_dir: &Path, out: std::os::fd::OwnedFd) -> Result<()> {
        let root = jailed_for_snapshots(run_dir)?;
        let (path, body) = snapshot_create_request();
        put(&api_socket(run_dir), path, &body).await?;
        tokio::task::spawn_blocking(move || stream_snapshot(&root, std::fs::File::from(out)))
            .await
            .map_err(|e| failed("Snapshot task failed", e))?
    }

    async fn load_state(&self, spec: &BootSpec, input: std::os::fd::OwnedFd) -> Result<()> {
        let root = jailed_for_snapshots(&spec.run_dir)?;
        let (r, owner, limit) = (root.clone(), spec.jail.uid, (spec.memory_mib as u64) << 20);
        let unpacked = tokio::task::spawn_blocking(move || {
            unpack_snapshot(std::fs::File::from(input), &r, owner, limit)
        })
        .await
        .map_err(|e| failed("Snapshot task failed", e))?;
        let loaded = match unpacked {
            Ok(()) => {
                let (path, body) = snapshot_load_request(spec);
                put(&api_socket(&spec.run_dir), path, &body).await
            }
            Err(e) => Err(e),
        };
        // Loaded, the state is read and the memory mapped; refused, they are of no use:
        // either way neither file stays.
        for f in [SNAP_STATE, SNAP_MEMORY] {
            let _ = remove_in_chroot(&root, f);
        }
        loaded
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
        terminate(
            &console_pidfile(run_dir),
            &marker(run_dir),
            Duration::from_secs(2),
        )
        .await;
        for s in [
            api_socket(run_dir),
            self.vsock_socket(run_dir),
            console_socket(run_dir),
        ] {
            let _ = std::fs::remove_file(s);
        }
        Ok(())
    }
}

/// The files a snapshot's state and memory go to, as the jailed Firecracker names them.
pub const SNAP_STATE: &str = "/snapshot.state";
/// See [`SNAP_STATE`].
pub const SNAP_MEMORY: &str = "/snapshot.mem";
/// How banger keeps a Firecracker snapshot as one stream: this magic, the state file's
/// length (u64, little-endian), the state, then the memory to the end.
pub const STREAM_MAGIC: &[u8; 8] = b"BGFCSNP1";
/// Firecracker's state files are kilobytes; anything near this is not one.
const MAX_STATE: u64 = 64 << 20;

/// `PUT /snapshot/create`: a full snapshot into the chroot's state and memory files.
pub fn snapshot_create_request() -> (&'static str, Value) {
    (
        "/snapshot/create",
        json!({
            "snapshot_type": "Full",
            "snapshot_path": SNAP_STATE,
            "mem_file_path": SNAP_MEMORY,
        }),
    )
}

/// `PUT /snapshot/load` for the VM `spec` restores: its own tap (every other name is the
/// same in each chroot), left paused (banger gives the guest its identity after `Resumed`).
pub fn snapshot_load_request(spec: &BootSpec) -> (&'static str, Value) {
    let mut body = json!({
        "snapshot_path": SNAP_STATE,
        "mem_backend": { "backend_type": "File", "backend_path": SNAP_MEMORY },
        "resume_vm": false,
        "vsock_override": { "uds_path": Chroot::VSOCK },
    });
    if let Some(n) = &spec.net {
        body["network_overrides"] = json!([{ "iface_id": "eth0", "host_dev_name": n.tap }]);
    }
    ("/snapshot/load", body)
}

/// The chroot of a jailed VM; snapshots of an unjailed one are refused (its disks are named
/// by their host paths, which a restored VM must not open).
fn jailed_for_snapshots(run: &Path) -> Result<PathBuf> {
    jailed_root(run).ok_or_else(|| {
        invalid(
            "Snapshots of Firecracker VMs need Firecracker's jailer (in its chroot every VM's \
             disks have the same names, so a restored VM opens its own): install `jailer` from \
             the Firecracker release beside `firecracker`, or set vmm = \"qemu\"",
        )
    })
}

/// A file of the chroot `root` as root reaches it: the VM's directory above the chroot
/// ([`Chroot::of`]'s `<vm>/jailer/<exec>/<id>/root`), named as it is, and the path below it,
/// in which the VM's uid may have planted anything (see `jail::open_beneath`).
fn chroot_file(root: &Path, file: &str) -> std::io::Result<(PathBuf, PathBuf)> {
    let vm_dir = root
        .ancestors()
        .nth(4)
        .ok_or(std::io::ErrorKind::InvalidInput)?;
    let below = root
        .strip_prefix(vm_dir)
        .map_err(|_| std::io::ErrorKind::InvalidInput)?;
    Ok((vm_dir.to_owned(), below.join(file.trim_start_matches('/'))))
}

/// Opens a chroot file (see [`chroot_file`]).
fn open_in_chroot(
    root: &Path,
    file: &str,
    flags: i32,
    mode: u32,
) -> std::io::Result<std::fs::File> {
    let (base, rel) = chroot_file(root, file)?;
    super::jail::open_beneath(&base, &rel, flags, mode)
}

/// Removes a chroot file (see [`chroot_file`]); fine when it is not there.
fn remove_in_chroot(root: &Path, file: &str) -> std::io::Result<()> {
    let (base, rel) = chroot_file(root, file)?;
    super::jail::remove_beneath(&base, &rel)
}

/// Writes the state and memory files Firecracker left in the chroot `root` to `out` as one
/// stream ([`STREAM_MAGIC`]), then removes them. The chroot is the VM's to change: the files
/// are opened without following links and must be regular files.
pub fn stream_snapshot(root: &Path, out: std::fs::File) -> Result<()> {
    use std::io::Write;
    let open = |f: &str| {
        open_in_chroot(root, f, libc::O_RDONLY, 0)
            .map_err(|e| failed(format!("Cannot read Firecracker's snapshot file {f}"), e))
    };
    let (mut state, mut memory) = (open(SNAP_STATE)?, open(SNAP_MEMORY)?);
    let len = state.metadata().map(|m| m.len()).unwrap_or(0);
    if len > MAX_STATE {
        return Err(failed(
            "Firecracker's snapshot state is too large",
            std::io::Error::other(format!("{len} bytes")),
        ));
    }
    let fail = |e| failed("Cannot pass on Firecracker's snapshot", e);
    let mut out = std::io::BufWriter::with_capacity(1 << 20, out);
    out.write_all(STREAM_MAGIC).map_err(fail)?;
    out.write_all(&len.to_le_bytes()).map_err(fail)?;
    let copied =
        std::io::copy(&mut std::io::Read::take(&mut state, len), &mut out).map_err(fail)?;
    if copied != len {
        return Err(fail(std::io::Error::from(
            std::io::ErrorKind::UnexpectedEof,
        )));
    }
    std::io::copy(&mut memory, &mut out).map_err(fail)?;
    out.flush().map_err(fail)?;
    for f in [SNAP_STATE, SNAP_MEMORY] {
        remove_in_chroot(root, f)
            .map_err(|e| failed(format!("Cannot remove {f} from the VM's chroot"), e))?;
    }
    Ok(())
}

/// Writes a [`stream_snapshot`] stream back into the chroot `root` as the state and memory
/// files Firecracker loads, owned by `owner` (the VM's uid) and no one else's to read; the
/// memory may be at most `limit` bytes, and its zero pages stay holes.
pub fn unpack_snapshot(input: std::fs::File, root: &Path, owner: u32, limit: u64) -> Result<()> {
    use std::io::{Read, Seek, Write};
    let bad = |why: &str| {
        failed(
            "The snapshot is not a Firecracker snapshot banger took",
            std::io::Error::other(why.to_owned()),
        )
    };
    let mut input = std::io::BufReader::with_capacity(1 << 20, input);
    let mut head = [0u8; 16];
    input
        .read_exact(&mut head)
        .map_err(|_| bad("it ends before its header"))?;
    if &head[..8] != STREAM_MAGIC {
        return Err(bad("its header is not banger's"));
    }
    let len = u64::from_le_bytes(head[8..].try_into().expect("8 bytes"));
    if len > MAX_STATE {
        return Err(bad("its state length is out of range"));
    }
    let fail = |e| failed("Cannot write the snapshot into the VM's chroot", e);
    let create = |f: &str| -> Result<std::fs::File> {
        remove_in_chroot(root, f).map_err(fail)?;
        let file = open_in_chroot(root, f, libc::O_WRONLY | libc::O_CREAT, 0o600).map_err(fail)?;
        std::os::unix::fs::fchown(&file, Some(owner), Some(owner)).map_err(fail)?;
        Ok(file)
    };
    let mut state = create(SNAP_STATE)?;
    let copied = std::io::copy(&mut (&mut input).take(len), &mut state).map_err(fail)?;
    if copied != len {
        return Err(bad("it ends inside its state"));
    }
    let mut memory = create(SNAP_MEMORY)?;
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0u64;
    loop {
        let n = input.read(&mut buf).map_err(fail)?;
        if n == 0 {
            break;
        }
        total += n as u64;
        if total > limit {
            return Err(bad("its memory is larger than the VM's"));
        }
        if buf[..n].iter().all(|b| *b == 0) {
            memory
                .seek(std::io::SeekFrom::Current(n as i64))
                .map_err(fail)?;
        } else {
            memory.write_all(&buf[..n]).map_err(fail)?;
        }
    }
    memory.set_len(total).map_err(fail)?;
    Ok(())
}

#[cfg(test)]
mod api_tests {
    use super::*;

    /// An API socket that takes the request and then says nothing, or floods an endless
    /// head: the request fails within its deadline and its bound, never waits or grows.
    #[tokio::test]
    async fn a_silent_or_flooding_api_fails_the_request_within_bounds() {
        let d = tempfile::tempdir().unwrap();
        let serve = |name: &str, flood: bool| {
            let sock = d.path().join(name);
            let l = tokio::net::UnixListener::bind(&sock).unwrap();
            tokio::spawn(async move {
                while let Ok((mut c, _)) = l.accept().await {
                    tokio::spawn(async move {
                        let mut buf = [0u8; 4096];
                        let _ = c.read(&mut buf).await;
                        while flood && c.write_all(&[b'x'; 4096]).await.is_ok() {}
                        std::future::pending::<()>().await;
                    });
                }
            });
            sock
        };
        let (silent, flood) = (serve("silent.sock", false), serve("flood.sock", true));
        let short = Duration::from_millis(300);
        let e = send_within(&silent, "PUT", "/actions", &json!({}), short)
            .await
            .unwrap_err();
        assert!(e.full_message().contains("did not answer within"), "{e}");
        let e = send_within(
            &flood,
            "PUT",
            "/actions",
            &json!({}),
            Duration::from_secs(30),
        )
        .await
        .unwrap_err();
        assert!(e.full_message().contains("response head too long"), "{e}");
    }
}
