//! Benchmark: N parallel `CreateVM`s through the real VM service (store, reservation, disks,
//! stages, the agent wait) with a VMM stand-in whose boot takes 1 s and whose "guest agent"
//! answers at once. If the creates overlap everywhere but the reservation, the wall time stays
//! near 1 s; serialised creates would take N s. Prints the wall time and the ratio to the
//! serial time. Run: `cargo run --release --example parallel-create [N]` (default 8).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use banger::config::Config;
use banger::layout::Layout;
use banger::model::{new_id, now_us, Image, Kernel};
use banger::service::Banger;
use banger::store::{rows, Store};
use banger::vmm::{BootSpec, Vmm};
use banger::vms::CreateOptions;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const BOOT: Duration = Duration::from_secs(1);

/// Boots in [`BOOT`], then serves the hybrid vsock socket with an agent that is healthy.
struct SlowVmm;

#[async_trait]
impl Vmm for SlowVmm {
    fn name(&self) -> &'static str {
        "stand-in"
    }
    fn rootfs_path(&self, vm_dir: &Path) -> PathBuf {
        vm_dir.join("rootfs.img")
    }
    fn disk_format(&self) -> banger::vmm::DiskFormat {
        banger::vmm::DiskFormat::Raw
    }
    async fn prepare_rootfs(
        &self,
        _: &Path,
        _: banger::vmm::DiskFormat,
        vm_dir: &Path,
        _: Option<u64>,
    ) -> banger::Result<PathBuf> {
        let p = self.rootfs_path(vm_dir);
        std::fs::write(&p, b"").map_err(|e| banger::Error::failed("rootfs", e))?;
        Ok(p)
    }
    async fn save_state(&self, _: &Path, _: std::os::fd::OwnedFd) -> banger::Result<()> {
        Ok(())
    }
    async fn load_state(&self, _: &BootSpec, _: std::os::fd::OwnedFd) -> banger::Result<()> {
        Ok(())
    }
    async fn boot(&self, spec: &BootSpec) -> banger::Result<()> {
        tokio::time::sleep(BOOT).await;
        let sock = self.vsock_socket(&spec.run_dir);
        let _ = std::fs::remove_file(&sock);
        let listener =
            tokio::net::UnixListener::bind(&sock).map_err(|e| banger::Error::failed("vsock", e))?;
        tokio::spawn(async move {
            while let Ok((c, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (r, mut w) = c.into_split();
                    let mut lines = BufReader::new(r).lines();
                    let _ = lines.next_line().await; // CONNECT 1024
                    let _ = w.write_all(b"OK 1024\n").await;
                    let _ = lines.next_line().await; // {"op":"health"}
                    let health = banger::agent::Health {
                        version: banger::VERSION.into(),
                        uptime_sec: 1.0,
                        boot_id: new_id(),
                        systemd: false,
                        sshd: Some(false),
                        parked: false,
                        ssh_listening: None,
                    };
                    let mut reply = banger::agent::Reply::ok();
                    reply.health = Some(health);
                    let mut line = serde_json::to_vec(&reply).unwrap_or_default();
                    line.push(b'\n');
                    let _ = w.write_all(&line).await;
                });
            }
        });
        Ok(())
    }
    fn liveness(&self, run_dir: &Path) -> banger::vmm::process::Liveness {
        if self.vsock_socket(run_dir).exists() {
            banger::vmm::process::Liveness::Alive(0)
        } else {
            banger::vmm::process::Liveness::Gone
        }
    }
    fn pids(&self, _: &Path) -> Vec<u32> {
        Vec::new()
    }
    async fn request_power_off(&self, _: &Path) -> banger::Result<()> {
        Ok(())
    }
    async fn pause(&self, _: &Path) -> banger::Result<()> {
        Ok(())
    }
    async fn resume(&self, _: &Path) -> banger::Result<()> {
        Ok(())
    }
    async fn kill(&self, run_dir: &Path) -> banger::Result<()> {
        let _ = std::fs::remove_file(self.vsock_socket(run_dir));
        Ok(())
    }
}

/// The host network stand-in: taps are names only (the benchmark measures the service).
struct NoNet;

#[async_trait]
impl banger::net::HostNet for NoNet {
    fn subnet(&self) -> banger::Result<banger::net::Subnet> {
        Ok(banger::net::Subnet::new(
            std::net::Ipv4Addr::new(172, 30, 99, 0),
            24,
        ))
    }
    async fn attach(&self, _: &str, _: &[banger::net::walls::GuestPort]) -> banger::Result<()> {
        Ok(())
    }
    async fn detach(&self, _: &str, _: &[banger::net::walls::GuestPort]) -> banger::Result<()> {
        Ok(())
    }
    async fn teardown(&self) -> banger::Result<()> {
        Ok(())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(8);
    // Not bangerd: the work disk's seeding runs here (the stand-in's disks are the
    // benchmark's own, nothing hostile).
    banger::worker::run_in_process();
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let layout = Layout::new(d.join("state"), d.join("run"));
    layout.create()?;
    let store = Store::open(&layout.database())?;
    let seed = d.join("seed.ext4");
    std::fs::File::create(&seed)?.set_len(8 << 20)?;
    banger::host::run(
        "mkfs.ext4",
        ["-q".as_ref(), "-F".as_ref(), seed.as_os_str()],
    )?;
    let image = Image {
        id: new_id(),
        name: "img".into(),
        managed: true,
        source: "bench".into(),
        rootfs_path: d.join("rootfs.ext4"),
        work_seed_path: Some(seed),
        kernel: Some("k".into()),
        size_bytes: 1 << 20,
        created_at: now_us(),
        ready_ports: Vec::new(),
        config: Default::default(),
        owner_uid: 0,
    };
    let kernel = Kernel {
        name: "k".into(),
        version: "1".into(),
        source: "bench".into(),
        kernel_path: d.join("vmlinux"),
        initrd_path: None,
        modules_dir: None,
        created_at: now_us(),
        owner_uid: 0,
    };
    store.call_blocking(move |c| {
        rows::insert_image(c, &image)?;
        rows::insert_kernel(c, &kernel)
    })?;
    // Many VMs of one user at once: the per-user sums must not be what is measured.
    let config = Config {
        max_running_vms_per_user: u32::MAX,
        max_vms_per_user: u32::MAX,
        max_vcpus_per_user: Some(u32::MAX / 4),
        max_memory_mib_per_user: Some(u32::MAX / 4),
        ..Config::default()
    };
    let vms = Banger::with_parts(
        config,
        layout,
        store,
        Arc::new(SlowVmm),
        Arc::new(NoNet),
        Arc::new(banger::vmm::scope::NoMachines),
    )?
    .vms
    .clone();
    let opts = CreateOptions {
        image: Some("img".into()),
        ..CreateOptions::default()
    };
    let t0 = Instant::now();
    let mut started = Vec::new();
    for i in 0..n {
        started.push(vms.create(1000, &format!("vm{i}"), opts.clone()).await?.1);
    }
    for job in started {
        job.wait().await?;
    }
    let wall = t0.elapsed().as_secs_f64();
    let serial = n as f64 * BOOT.as_secs_f64();
    println!(
        "{n} parallel creates with a {:.0} s boot: wall {wall:.2} s; serial would be ≥ {serial:.0} s \
         (serial / wall = {:.1}×)",
        BOOT.as_secs_f64(),
        serial / wall
    );
    Ok(())
}
