//! The create phases under concurrency, with a VMM stand-in behind the `Vmm` trait: creates
//! overlap outside the reservation, names have one winner, leases and CIDs stay unique.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::{CreateOptions, Vms};
use crate::config::Config;
use crate::layout::Layout;
use crate::model::{new_id, now_us, Image, Kernel, VmState};
use crate::store::{rows, Store};
use crate::vmm::{BootSpec, Vmm};
use crate::Result;

/// Boots only when `n` VMs are booting at once (a barrier), then "dies" at once.
struct GateVmm(tokio::sync::Barrier);

#[async_trait]
impl Vmm for GateVmm {
    fn name(&self) -> &'static str {
        "gate"
    }
    fn rootfs_path(&self, vm_dir: &Path) -> PathBuf {
        vm_dir.join("rootfs.img")
    }
    fn disk_format(&self) -> crate::vmm::DiskFormat {
        crate::vmm::DiskFormat::Raw
    }
    async fn prepare_rootfs(
        &self,
        _: &Path,
        _: crate::vmm::DiskFormat,
        vm_dir: &Path,
        _: Option<u64>,
    ) -> Result<PathBuf> {
        let p = self.rootfs_path(vm_dir);
        std::fs::write(&p, b"").unwrap();
        Ok(p)
    }
    async fn boot(&self, _: &BootSpec) -> Result<()> {
        self.0.wait().await;
        Ok(())
    }
    fn liveness(&self, _: &Path) -> crate::vmm::process::Liveness {
        crate::vmm::process::Liveness::Gone
    }
    fn pids(&self, _: &Path) -> Vec<u32> {
        Vec::new()
    }
    async fn request_power_off(&self, _: &Path) -> Result<()> {
        Ok(())
    }
    async fn save_state(&self, _: &Path, _: std::os::fd::OwnedFd) -> Result<()> {
        Ok(())
    }
    async fn load_state(&self, _: &BootSpec, _: std::os::fd::OwnedFd) -> Result<()> {
        Ok(())
    }
    async fn pause(&self, _: &Path) -> Result<()> {
        Ok(())
    }
    async fn resume(&self, _: &Path) -> Result<()> {
        Ok(())
    }
    async fn kill(&self, _: &Path) -> Result<()> {
        Ok(())
    }
}

/// A host network that only remembers its taps.
#[derive(Default)]
pub(super) struct FakeNet(pub std::sync::Mutex<Vec<String>>);

#[async_trait]
impl crate::net::HostNet for FakeNet {
    fn subnet(&self) -> Result<crate::net::Subnet> {
        Ok(crate::net::Subnet::new(
            std::net::Ipv4Addr::new(10, 0, 0, 0),
            16,
        ))
    }
    async fn attach(&self, tap: &str, _: &[crate::net::walls::GuestPort]) -> Result<()> {
        self.0.lock().unwrap().push(tap.to_owned());
        Ok(())
    }
    async fn detach(&self, tap: &str, _: &[crate::net::walls::GuestPort]) -> Result<()> {
        self.0.lock().unwrap().retain(|t| t != tap);
        Ok(())
    }
    async fn teardown(&self) -> Result<()> {
        Ok(())
    }
}

fn service(dir: &Path, gate: usize, subnet: &str) -> Vms {
    banger(dir, gate, subnet).vms.clone()
}

/// The services over a temporary layout and an in-memory store holding image `img` and
/// kernel `k`, with the gate VMM (booting once `gate` VMs boot together) and no host network.
pub(crate) fn banger(dir: &Path, gate: usize, subnet: &str) -> Arc<crate::service::Banger> {
    banger_with_net(dir, gate, subnet).0
}

/// [`banger`], and its host network's record of taps.
fn banger_with_net(
    dir: &Path,
    gate: usize,
    subnet: &str,
) -> (Arc<crate::service::Banger>, Arc<FakeNet>) {
    let layout = Layout::new(dir.join("state"), dir.join("run"));
    layout.create().unwrap();
    let store = Store::open_in_memory().unwrap();
    let seed = dir.join("seed.ext4");
    std::fs::File::create(&seed)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    crate::host::run(
        "mkfs.ext4",
        ["-q".as_ref(), "-F".as_ref(), seed.as_os_str()],
    )
    .unwrap();
    let image = Image {
        id: new_id(),
        name: "img".into(),
        managed: true,
        source: "test".into(),
        rootfs_path: dir.join("rootfs.ext4"),
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
        source: "test".into(),
        kernel_path: dir.join("vmlinux"),
        initrd_path: None,
        modules_dir: None,
        created_at: now_us(),
        owner_uid: 0,
    };
    store
        .call_blocking(move |c| {
            rows::insert_image(c, &image)?;
            rows::insert_kernel(c, &kernel)
        })
        .unwrap();
    // The kernel has no initrd, so each start makes (or finds) banger's own, which appends
    // banger-init: here the smallest file taken for a static ELF, a header alone.
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let mut init = b"\x7fELF\x02".to_vec();
    init.resize(64, 0);
    std::fs::write(bin.join("banger-init"), init).unwrap();
    // Many VMs of one user at once: the per-user sums must not be what stops them.
    let config = Config {
        subnet: subnet.into(),
        guest_bin_dir: Some(bin),
        max_vcpus_per_user: Some(10_000),
        max_memory_mib_per_user: Some(10_000_000),
        ..Config::default()
    };
    let vmm = Arc::new(GateVmm(tokio::sync::Barrier::new(gate)));
    let net = Arc::new(FakeNet::default());
    (
        crate::service::Banger::with_parts(
            config,
            layout,
            store,
            vmm,
            net.clone(),
            Arc::new(crate::vmm::scope::NoMachines),
        )
        .unwrap(),
        net,
    )
}

fn opts(start: bool) -> CreateOptions {
    CreateOptions {
        image: Some("img".into()),
        start,
        ..CreateOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn creates_overlap_in_every_phase_but_the_reservation() {
    let dir = tempfile::tempdir().unwrap();
    let n = 6;
    let vms = service(dir.path(), n, "10.1.0.0/24");
    let mut jobs = Vec::new();
    for i in 0..n {
        jobs.push(
            vms.create(1000, &format!("vm{i}"), opts(true))
                .await
                .unwrap()
                .1,
        );
    }
    // The gate opens only when all n are inside boot at the same time: serialised starts
    // would never get there.
    for j in jobs {
        let r = tokio::time::timeout(Duration::from_secs(30), j.wait())
            .await
            .expect("the starts overlap");
        let e = r.unwrap_err().full_message();
        assert!(e.contains("failed at stage wait_agent"), "{e}");
    }
    for v in vms.list().await.unwrap() {
        assert_eq!(v.state, VmState::Failed, "{v:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_parallel_creates_get_unique_leases_and_fifty_of_one_name_have_one_winner() {
    let dir = tempfile::tempdir().unwrap();
    let vms = service(dir.path(), 1, "10.2.0.0/24");
    let mut tasks = Vec::new();
    for i in 0..50 {
        let v = vms.clone();
        tasks.push(tokio::spawn(async move {
            v.create(1000, &format!("p{i}"), opts(false))
                .await
                .unwrap()
                .1
                .wait()
                .await
        }));
    }
    for _ in 0..50 {
        let v = vms.clone();
        tasks.push(tokio::spawn(async move {
            match v.create(1000, "same", opts(false)).await {
                Ok((_, j)) => j.wait().await,
                Err(e) => Err(e),
            }
        }));
    }
    let mut same_ok = 0;
    for (i, t) in tasks.into_iter().enumerate() {
        let r = t.await.unwrap();
        if i < 50 {
            r.unwrap();
        } else if r.is_ok() {
            same_ok += 1;
        } else {
            let e = r.unwrap_err().full_message();
            assert!(e.contains("A VM named \"same\" exists"), "{e}");
        }
    }
    assert_eq!(same_ok, 1);
    let all = vms.list().await.unwrap();
    assert_eq!(all.len(), 51);
    let cids: std::collections::HashSet<_> = all.iter().map(|v| v.vsock_cid).collect();
    let addrs: std::collections::HashSet<_> = all.iter().map(|v| v.guest_address.clone()).collect();
    let macs: std::collections::HashSet<_> = all.iter().map(|v| v.mac_address.clone()).collect();
    assert_eq!((cids.len(), addrs.len(), macs.len()), (51, 51, 51));
    assert!(cids.iter().all(|c| *c >= 3));
}

#[tokio::test]
async fn an_exhausted_address_pool_is_a_clear_error_and_leaves_no_vm() {
    let dir = tempfile::tempdir().unwrap();
    let vms = service(dir.path(), 1, "10.3.0.0/29"); // 5 guest addresses
    for i in 0..5 {
        vms.create(0, &format!("v{i}"), opts(false))
            .await
            .unwrap()
            .1
            .wait()
            .await
            .unwrap();
    }
    let e = vms
        .create(0, "v5", opts(false))
        .await
        .unwrap()
        .1
        .wait()
        .await
        .unwrap_err()
        .full_message();
    assert!(e.contains("all 5 guest addresses are leased"), "{e}");
    assert_eq!(vms.list().await.unwrap().len(), 5);
    // Deleting one frees its address for the next.
    let v0 = vms.get("v0").await.unwrap();
    vms.delete(&v0, false).await.unwrap();
    vms.create(0, "v5", opts(false))
        .await
        .unwrap()
        .1
        .wait()
        .await
        .unwrap();
    assert_eq!(vms.get("v5").await.unwrap().guest_address, "10.3.0.2");
}

/// Waits until the VM's row says `starting` (its start is inside boot, which the gate holds).
async fn starting(vms: &Vms, name: &str) -> crate::model::Vm {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        // A create reserves its row in its job: not there yet at first.
        let vm = vms.get(name).await;
        if let Ok(vm) = &vm {
            if vm.state == VmState::Starting && vm.stage == "boot" {
                return vm.clone();
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never started: {vm:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_and_delete_of_a_starting_vm_cancel_its_start_and_leave_nothing_running() {
    let dir = tempfile::tempdir().unwrap();
    // A gate of 3 that only two VMs ever reach (one after the other: a canceled wait still
    // counts): boots that never end.
    let (b, net) = banger_with_net(dir.path(), 3, "10.7.0.0/24");
    let vms = b.vms.clone();

    // A second start of a starting VM is the same job.
    let (vm, create) = vms.create(1000, "s", opts(false)).await.unwrap();
    create.wait().await.unwrap();
    let first = vms.start(1000, &vm).await.unwrap();
    starting(&vms, "s").await;
    let second = vms.start(1000, &vm).await.unwrap();
    assert_eq!(first.id, second.id, "a second start began");
    // Delete without force is refused and cancels nothing.
    let e = vms.delete(&vm, false).await.unwrap_err();
    assert!(e.to_string().contains("is starting"), "{e}");
    assert_eq!(first.status().state, crate::jobs::JobState::Running);
    // Stop cancels the start; its cleanup ran before stop went on.
    tokio::time::timeout(Duration::from_secs(30), vms.stop(&vm, Default::default()))
        .await
        .expect("stop waited for the boot")
        .unwrap();
    assert!(matches!(first.wait().await, Err(crate::Error::Canceled)));
    assert_eq!(vms.get("s").await.unwrap().state, VmState::Stopped);
    assert!(
        net.0.lock().unwrap().is_empty(),
        "a tap stayed: {:?}",
        net.0.lock().unwrap()
    );

    // Delete --force of a VM still being created: the create is canceled, nothing stays.
    let (vm, create) = vms.create(1000, "d", opts(true)).await.unwrap();
    starting(&vms, "d").await;
    tokio::time::timeout(Duration::from_secs(30), vms.delete(&vm, true))
        .await
        .expect("delete waited for the boot")
        .unwrap();
    assert!(matches!(create.wait().await, Err(crate::Error::Canceled)));
    // The canceled start's cleanup must not bring the row back.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(vms.get("d").await.is_err(), "the VM came back");
    assert!(
        net.0.lock().unwrap().is_empty(),
        "a tap stayed: {:?}",
        net.0.lock().unwrap()
    );
    assert_eq!(vms.list().await.unwrap().len(), 1);
}
