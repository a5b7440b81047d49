//! The VM service: the three-phase create (resolve without locks, reserve in one short
//! transaction, start under the VM's own lock), start, stop, delete, and re-adoption of VMs
//! whose VMM outlived the daemon.

pub mod bounds;
pub mod control;
pub(crate) mod create;
mod error;
mod lifecycle;
pub mod lifetime;
mod move_memory;
pub mod publish;
pub mod share;
pub mod snapshot;
mod start;
pub mod state;
mod warm;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use crate::auth::Action;
use crate::config::Config;
use crate::events::{Events, ObjectEvent};
use crate::images::Images;
use crate::jobs::Jobs;
use crate::kernels::Kernels;
use crate::layout::Layout;
use crate::model::{validate_name, NameKind, Vm, VmState};
use crate::net::HostNet;
use crate::store::{rows, Store};
use crate::vmm::Vmm;
use crate::Result;
use error::invalid;
pub use error::VmError;

/// Options of `CreateVM`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOptions {
    /// The image; the configured default when absent.
    pub image: Option<String>,
    /// The kernel; the image's, else the configured default, when absent.
    pub kernel: Option<String>,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u32,
    /// Root disk size in bytes; the image's when absent.
    pub disk_size: Option<u64>,
    /// An SSH public key for root.
    pub ssh_key: Option<String>,
    /// Start it once reserved.
    pub start: bool,
    /// Isolated (the default) or shared with the owner's other shared VMs.
    pub network: crate::model::NetworkMode,
    /// Where the VM may send (`CIDR[:PORT]`); empty for no narrowing.
    pub egress: Vec<String>,
    /// The guest's init (see `Vm::init`).
    pub init: String,
    /// Run the image's Entrypoint+Cmd (or `command`) as the VM's main process.
    pub entrypoint: bool,
    /// The main process's arguments instead of the image's Cmd (with `entrypoint`).
    pub command: Vec<String>,
    /// Published ports, `[ADDR:]HOSTPORT:GUESTPORT`.
    pub publish: Vec<String>,
    /// Shared host folders (see [`share`]).
    pub shares: Vec<crate::model::Share>,
    /// Boot even when a warm snapshot of this shape exists (see `warm`).
    pub cold: bool,
    /// Restore this snapshot instead of booting; `vcpus` and `memory_mib` 0 then mean the
    /// snapshot's (any other value must be the snapshot's).
    pub snapshot: Option<String>,
    /// May boot another user's image or kernel: set by the operations layer once polkit
    /// granted `manage-any`, never by a front end.
    pub foreign_ok: bool,
    /// The owner's key/value pairs (see `model::check_labels`).
    pub labels: std::collections::BTreeMap<String, String>,
    /// Its lifetime in seconds from its creation; 0: none.
    pub timeout_sec: u32,
    /// What happens to it when its lifetime ends.
    pub on_expire: crate::model::OnExpire,
    /// A host folder as its root filesystem instead of an image (see `Vm::rootfs_dir`).
    pub rootfs_dir: Option<String>,
    /// A network namespace whose `eth0` is the VM's network (see `Vm::netns`); root's only.
    pub netns: Option<String>,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            image: None,
            kernel: None,
            vcpus: 2,
            memory_mib: 1024,
            disk_size: None,
            ssh_key: None,
            start: true,
            network: Default::default(),
            egress: Vec::new(),
            init: String::new(),
            entrypoint: false,
            command: Vec::new(),
            publish: Vec::new(),
            shares: Vec::new(),
            cold: false,
            snapshot: None,
            foreign_ok: false,
            labels: Default::default(),
            timeout_sec: 0,
            on_expire: Default::default(),
            rootfs_dir: None,
            netns: None,
        }
    }
}

/// Options of `StopVM`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopOptions {
    /// Kill at once instead of asking the guest.
    pub force: bool,
    /// Seconds to wait for a clean shutdown before killing.
    pub timeout_sec: u32,
}

impl Default for StopOptions {
    fn default() -> Self {
        StopOptions {
            force: false,
            timeout_sec: 30,
        }
    }
}

/// The largest `command` CreateVM takes (all arguments together).
pub const MAX_COMMAND_BYTES: usize = 64 * 1024;

/// The bounds `CreateVM` accepts.
pub const MAX_VCPUS: u32 = 64;
/// Smallest guest memory that boots a Debian guest with systemd.
pub const MIN_MEMORY_MIB: u32 = 128;

impl CreateOptions {
    /// The vCPUs and memory of a create that names none: a restore's are its snapshot's (0
    /// stands for "the snapshot's"), a boot's the defaults.
    pub fn default_shape(restoring: bool) -> (u32, u32) {
        if restoring {
            (0, 0)
        } else {
            let d = CreateOptions::default();
            (d.vcpus, d.memory_mib)
        }
    }

    /// The network mode option `value` of `method`; absent is the default.
    pub fn network_option(method: &str, value: Option<&str>) -> Result<crate::model::NetworkMode> {
        let Some(n) = value else {
            return Ok(CreateOptions::default().network);
        };
        crate::model::NetworkMode::parse(n).ok_or_else(|| {
            invalid(format!(
                "{method}: network {n:?} is neither \"isolated\" nor \"shared\""
            ))
        })
    }

    /// Checks the options that do not need the store.
    pub fn validate(&self) -> Result<()> {
        if let Some(i) = &self.image {
            // An image's name, or a reference to pull (checked again when resolved).
            if validate_name(NameKind::Image, i).is_err() {
                crate::oci::reference::parse(i).map_err(|e| {
                    invalid(format!(
                        "image {i:?} is neither an image name nor an OCI reference: {e}"
                    ))
                })?;
            }
        }
        if let Some(k) = &self.kernel {
            validate_name(NameKind::Kernel, k)?;
        }
        let from_snapshot = self.snapshot.is_some();
        if let Some(s) = &self.snapshot {
            validate_name(NameKind::Snapshot, s)?;
            let conflicting = [
                (self.image.is_some(), "image"),
                (self.kernel.is_some(), "kernel"),
                (self.disk_size.is_some(), "disk_size"),
                (!self.shares.is_empty(), "shares"),
                (self.entrypoint, "entrypoint"),
                (!self.init.is_empty(), "init"),
            ];
            if let Some(what) = first_set(&conflicting) {
                return Err(invalid(format!(
                    "{what}: a VM restored from snapshot {s} has the snapshot's; leave {what} out"
                )));
            }
        }
        if let Some(dir) = &self.rootfs_dir {
            // The folder is the whole guest: nothing of an image's, nothing a snapshot could
            // save (virtio-fs devices do not migrate), no disk to size.
            let conflicting = [
                (self.image.is_some(), "image"),
                (self.snapshot.is_some(), "snapshot"),
                (self.disk_size.is_some(), "disk_size"),
                (self.entrypoint, "entrypoint"),
            ];
            if let Some(what) = first_set(&conflicting) {
                return Err(invalid(format!(
                    "{what}: a VM whose root is the folder {dir} has nothing of an image's; \
                     leave {what} out (or rootfs_dir, to boot an image)"
                )));
            }
            if !absolute_path(dir) {
                return Err(invalid(format!(
                    "rootfs_dir (--rootfs): {dir:?} must be an absolute path"
                )));
            }
        }
        if let Some(ns) = &self.netns {
            // The namespace's network is the guest's: nothing of banger's own network applies.
            let conflicting = [
                (!self.publish.is_empty(), "publish"),
                (!self.egress.is_empty(), "egress"),
                (self.network == crate::model::NetworkMode::Shared, "network"),
            ];
            if let Some(what) = first_set(&conflicting) {
                return Err(invalid(format!(
                    "{what}: a VM in the network namespace {ns} has that namespace's network, \
                     not banger's; leave {what} out (or netns, for banger's network)"
                )));
            }
            if !absolute_path(ns) {
                return Err(invalid(format!(
                    "netns (--netns): {ns:?} must be an absolute path (such as /run/netns/NAME)"
                )));
            }
        }
        let snapshots_shape = |v: u32| from_snapshot && v == 0;
        if !((1..=MAX_VCPUS).contains(&self.vcpus) || snapshots_shape(self.vcpus)) {
            return Err(invalid(format!(
                "vcpus (--vcpus) must be between 1 and {MAX_VCPUS}, not {}",
                self.vcpus
            )));
        }
        if let Some(k) = &self.ssh_key {
            validate_ssh_key(k)?;
        }
        crate::net::walls::check_egress(&self.egress)?;
        crate::model::check_labels(&self.labels)?;
        check_init(&self.init)?;
        publish::check(&self.publish)?;
        share::check(&self.shares)?;
        if !self.command.is_empty() && !self.entrypoint {
            return Err(invalid(
                "command is the main process's arguments: it needs entrypoint (CLI --entrypoint)",
            ));
        }
        let bytes: usize = self.command.iter().map(|a| a.len() + 1).sum();
        if bytes > MAX_COMMAND_BYTES || self.command.iter().any(|a| a.contains('\0')) {
            return Err(invalid(format!(
                "command must be at most {MAX_COMMAND_BYTES} bytes without NUL characters"
            )));
        }
        if self.memory_mib < MIN_MEMORY_MIB && !snapshots_shape(self.memory_mib) {
            return Err(invalid(format!(
                "memory_mib (--memory) must be at least {MIN_MEMORY_MIB} MiB, not {}",
                self.memory_mib
            )));
        }
        Ok(())
    }
}

/// Accepts an `init` option: empty (the image's `/sbin/init`, else banger's), `banger`
/// (banger-init stays PID 1), or an absolute path of plain characters (it goes on the kernel
/// command line).
pub fn check_init(init: &str) -> Result<()> {
    if init.is_empty() || init == "banger" {
        return Ok(());
    }
    let plain = init
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._+-".contains(c));
    if !init.starts_with('/') || !plain || init.len() > 200 || init.split('/').any(|p| p == "..") {
        return Err(invalid(format!(
            "init {init:?} is neither \"banger\" nor an absolute path of letters, digits and /._+-; \
             leave it empty for the image's /sbin/init"
        )));
    }
    Ok(())
}

/// The kernel command line's part for an `init` option.
pub fn init_cmdline(init: &str) -> String {
    match init {
        "" => String::new(),
        "banger" => " banger.init=banger".into(),
        path => format!(" init={path}"),
    }
}

/// Accepts one OpenSSH public key line (`type base64 [comment]`), the way authorized_keys
/// holds it, and nothing that could add a second line or options.
pub fn validate_ssh_key(k: &str) -> Result<()> {
    let bad = |why: &str| {
        invalid(format!(
            "ssh_key is not an OpenSSH public key ({why}); pass the contents of a .pub file \
             such as ~/.ssh/id_ed25519.pub"
        ))
    };
    let k = k.trim();
    if k.len() > 16 * 1024 || k.chars().any(|c| c.is_control()) {
        return Err(bad("one line of printable text expected"));
    }
    let mut parts = k.split_whitespace();
    let kind = parts.next().unwrap_or_default();
    let body = parts.next().unwrap_or_default();
    let known = kind.starts_with("ssh-")
        || kind.starts_with("ecdsa-sha2-")
        || kind.starts_with("sk-ssh-")
        || kind.starts_with("sk-ecdsa-");
    if !known {
        return Err(bad("it must start with its type, e.g. ssh-ed25519"));
    }
    let b64 = body.len() >= 16
        && body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b));
    if !b64 {
        return Err(bad("the key material is not base64"));
    }
    Ok(())
}

/// A VM as the network walls see it (none without a valid address).
fn guest_port(v: &Vm) -> Option<crate::net::walls::GuestPort> {
    Some(crate::net::walls::GuestPort {
        id: v.id.clone(),
        tap: v.tap_name.clone(),
        mac: v.mac_address.clone(),
        address: v.guest_address.parse().ok()?,
        owner: v.owner_uid,
        network: v.network,
        egress: v
            .egress
            .iter()
            .filter_map(|e| crate::net::walls::Egress::parse(e, "egress", true).ok())
            .collect(),
    })
}

/// The polkit action `uid` needs to manage `vm`.
pub fn action_for(vm: &Vm, uid: u32) -> Action {
    if vm.owner_uid == uid {
        Action::VmsManage
    } else {
        Action::VmsManageAny
    }
}

/// The VM service; cheap to clone.
#[derive(Clone)]
pub struct Vms {
    store: Store,
    layout: Layout,
    events: Events,
    config: Config,
    jobs: Jobs,
    images: Images,
    kernels: Kernels,
    vmm: Arc<dyn Vmm>,
    net: Arc<dyn HostNet>,
    /// Where ready VMs are announced (machined).
    machines: Arc<dyn crate::vmm::scope::Machines>,
    /// Serialises tap creation against the bridge's removal when the last VM goes.
    net_lock: Arc<tokio::sync::Mutex<()>>,
    /// Held over an owner's running-VM count and the VM's move to `starting`, so parallel
    /// starts cannot all pass `max_running_vms_per_user`.
    start_gate: Arc<tokio::sync::Mutex<()>>,
    locks: Arc<std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
    /// The job starting each VM (a create or a start), while it may still run.
    starts: Arc<std::sync::Mutex<HashMap<String, Arc<crate::jobs::Job>>>>,
    /// Warm snapshots being made.
    warming: Arc<warm::Warming>,
    /// `snapshots/`: publication and deletion in the one order (see `shelf`).
    snapshots: crate::shelf::Shelf,
    /// Snapshots' RAM as sealed memfds, by snapshot id, made at their first restore (see
    /// `vmm::ram`); the lock is held while one is made, so restores at once share one.
    rams: Arc<tokio::sync::Mutex<HashMap<String, snapshot::CachedRam>>>,
    /// What keeps VMs' lifetimes (see [`lifetime`]).
    lifetimes: Arc<lifetime::Lifetimes>,
}

impl Vms {
    /// A service over the store and layout, booting VMs with `vmm`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Store,
        layout: Layout,
        events: Events,
        config: Config,
        jobs: Jobs,
        images: Images,
        kernels: Kernels,
        vmm: Arc<dyn Vmm>,
        net: Arc<dyn HostNet>,
        machines: Arc<dyn crate::vmm::scope::Machines>,
    ) -> Self {
        let snapshots = crate::shelf::Shelf::new("snapshot", layout.snapshots_dir(), store.clone());
        Vms {
            store,
            layout,
            events,
            config,
            jobs,
            images,
            kernels,
            vmm,
            net,
            machines,
            net_lock: Arc::default(),
            start_gate: Arc::default(),
            locks: Arc::default(),
            starts: Arc::default(),
            warming: Arc::default(),
            snapshots,
            rams: Arc::default(),
            lifetimes: Arc::default(),
        }
    }

    /// Every VM.
    pub async fn list(&self) -> Result<Vec<Vm>> {
        self.store.call(|c| rows::list_vms(c)).await
    }

    /// The VM whose name or id is `key`.
    pub async fn get(&self, key: &str) -> Result<Vm> {
        let k = key.to_owned();
        self.store
            .call(move |c| rows::find_vm(c, &k))
            .await?
            .ok_or_else(|| VmError::NotFound(key.to_owned()).into())
    }

    /// What VM `vm` costs the host in memory now: the proportional set size of its live
    /// processes (VMM and helpers), so pages shared with other VMs (a snapshot's, a
    /// kernel's) count once across them. 0 for a VM with no processes.
    pub fn host_memory_bytes(&self, vm: &Vm) -> u64 {
        self.over_processes(vm, crate::vmm::process::pss_bytes)
    }

    /// `of` summed over VM `vm`'s live processes (none unless it is active).
    fn over_processes(&self, vm: &Vm, of: fn(u32) -> u64) -> u64 {
        if !vm.state.is_active() {
            return 0;
        }
        self.vmm
            .pids(&self.layout.vm_runtime_dir(&vm.id))
            .into_iter()
            .map(of)
            .sum()
    }

    /// The CPU time VM `vm`'s live processes (VMM and helpers) have used, in nanoseconds.
    pub fn cpu_nsec(&self, vm: &Vm) -> u64 {
        self.over_processes(vm, crate::vmm::process::cpu_nsec)
    }

    /// [`Self::host_memory_bytes`] of every VM together.
    pub async fn host_memory_total(&self) -> Result<u64> {
        Ok(self
            .list()
            .await?
            .iter()
            .map(|v| self.host_memory_bytes(v))
            .sum())
    }

    /// What `uid`'s VMs other than `except` take (see [`bounds::Usage`]).
    pub async fn usage_of(&self, uid: u32, except: &str) -> Result<bounds::Usage> {
        let vms = self.list().await?;
        let mut u = bounds::Usage::default();
        for v in vms.iter().filter(|v| v.owner_uid == uid && v.id != except) {
            u.owned += 1;
            if v.state.is_active() {
                u.active += 1;
                u.vcpus += v.vcpus;
                u.memory_mib += u64::from(v.memory_mib);
            }
        }
        Ok(u)
    }

    /// The per-user quotas on what runs at once.
    pub fn run_quota(&self) -> bounds::RunQuota {
        bounds::RunQuota::of(&self.config)
    }

    /// `max_vms_per_user`.
    pub fn max_vms_per_user(&self) -> u32 {
        self.config.max_vms_per_user
    }

    /// Refuses starting `vm` when its owner's running VMs would pass a quota.
    async fn check_run_quota(&self, vm: &Vm) -> Result<()> {
        let u = self.usage_of(vm.owner_uid, &vm.id).await?;
        bounds::RunQuota::of(&self.config).check(vm.owner_uid, u, vm.vcpus, vm.memory_mib)
    }

    /// The guests the network walls are written for: every VM that starts, runs or stops,
    /// less `except`.
    async fn guest_ports(&self, except: &str) -> Result<Vec<crate::net::walls::GuestPort>> {
        let vms = self.list().await?;
        Ok(vms
            .iter()
            .filter(|v| v.id != except)
            .filter(|v| v.state.is_active())
            .filter_map(guest_port)
            .collect())
    }

    /// Checks the owner's running quotas (VMs, vCPUs, memory) and marks the VM `starting`,
    /// atomically among starts.
    async fn enter_starting(&self, vm: &mut Vm) -> Result<()> {
        let _gate = self.start_gate.lock().await;
        self.check_run_quota(vm).await?;
        vm.state = VmState::Starting;
        self.save(vm).await
    }

    /// Remembers the job that starts VM `id`.
    fn note_start(&self, id: &str, job: &Arc<crate::jobs::Job>) {
        let mut s = self.starts.lock().unwrap_or_else(|p| p.into_inner());
        s.retain(|_, j| j.status().state == crate::jobs::JobState::Running);
        s.insert(id.to_owned(), job.clone());
    }

    /// The job starting VM `id`, while it runs.
    fn running_start(&self, id: &str) -> Option<Arc<crate::jobs::Job>> {
        let s = self.starts.lock().unwrap_or_else(|p| p.into_inner());
        s.get(id)
            .filter(|j| j.status().state == crate::jobs::JobState::Running)
            .cloned()
    }

    /// Cancels the start of VM `id`, if one runs, and waits until it ended (its cleanup
    /// then runs under the VM's lock, which the caller takes next).
    async fn cancel_start(&self, id: &str) {
        if let Some(job) = self.running_start(id) {
            tracing::info!(vm_id = %id, job_id = job.id, "Canceling the VM's start");
            let _ = self.jobs.cancel(job.id);
            let _ = job.wait().await;
        }
    }

    /// The VM's own lock: its start, stop and delete never overlap.
    fn lock_of(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut l = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        l.entry(id.to_owned()).or_default().clone()
    }

    /// The VM's disks and console log.
    pub fn vm_dir(&self, id: &str) -> PathBuf {
        self.layout.vms_dir().join(id)
    }

    /// The serial console's log of the VM's last boot.
    pub fn console_log(&self, id: &str) -> PathBuf {
        self.vm_dir(id).join("console.log")
    }

    /// Writes the VM's changed state and stage and tells the bus.
    /// The main process's exit status as banger-init reported it last on the VM's console.
    pub(super) fn main_exit_status(&self, id: &str) -> Option<i32> {
        let tail = crate::vmm::console::tail_lines(&self.console_log(id), 64);
        tail.lines()
            .rev()
            .find_map(|l| {
                l.trim_end_matches('\r')
                    .strip_prefix(crate::guestinit::supervise::EXIT_LINE)
            })
            .and_then(|n| n.trim().parse().ok())
    }

    async fn save(&self, vm: &Vm) -> Result<()> {
        let v = vm.clone();
        self.store.call(move |c| rows::update_vm(c, &v)).await?;
        self.events.send(ObjectEvent::VmChanged(vm.clone()));
        Ok(())
    }

    /// A connection to the agent of a running VM, for `banger vm exec`.
    pub async fn open_agent(&self, vm: &Vm) -> Result<tokio::net::UnixStream> {
        if vm.state == VmState::Paused {
            return Err(invalid(format!(
                "VM {} is paused; resume it first (`banger vm resume {}`)",
                vm.name, vm.name
            )));
        }
        if vm.state != VmState::Running {
            return Err(invalid(format!(
                "VM {} is {}; start it first (`banger vm start {}`)",
                vm.name, vm.state, vm.name
            )));
        }
        self.open_agent_any(vm).await
    }
}

/// The first of `options` (whether it is set, its key) that is set, named as both its users
/// know it: the option a refusal names.
fn first_set(options: &[(bool, &str)]) -> Option<String> {
    options
        .iter()
        .find(|(set, _)| *set)
        .map(|(_, key)| option_named(key))
}

/// Whether `path` is an absolute path the daemon takes: no NUL, at most 4096 bytes.
fn absolute_path(path: &str) -> bool {
    path.starts_with('/') && !path.contains('\0') && path.len() <= 4096
}

/// A `CreateVM` option as both its users know it: the API key and the CLI flag
/// (`memory_mib (--memory)`), so a refusal reads right for `busctl` and for `banger`.
pub(crate) fn option_named(key: &str) -> String {
    let flag = match key {
        "memory_mib" => "--memory",
        "disk_size" => "--disk-size",
        "vcpus" => "--vcpus",
        "image" => "--image",
        "kernel" => "--kernel",
        "shares" => "--share",
        "entrypoint" => "--entrypoint",
        "init" => "--init",
        "rootfs_dir" => "--rootfs",
        "netns" => "--netns",
        "publish" => "--publish",
        "egress" => "--egress",
        "network" => "--network",
        _ => return key.to_owned(),
    };
    format!("{key} ({flag})")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_namespaces_network_takes_none_of_bangers_options_and_only_an_absolute_path() {
        let given = |o: CreateOptions| CreateOptions {
            netns: Some("/run/netns/cni-1".into()),
            ..o
        };
        given(CreateOptions::default()).validate().unwrap();
        for (o, says) in [
            (
                given(CreateOptions {
                    publish: vec!["8080:80".into()],
                    ..Default::default()
                }),
                "publish (--publish)",
            ),
            (
                given(CreateOptions {
                    egress: vec!["10.0.0.0/8".into()],
                    ..Default::default()
                }),
                "egress (--egress)",
            ),
            (
                given(CreateOptions {
                    network: crate::model::NetworkMode::Shared,
                    ..Default::default()
                }),
                "network (--network)",
            ),
            (
                CreateOptions {
                    netns: Some("cni-1".into()),
                    ..Default::default()
                },
                "absolute path",
            ),
        ] {
            let e = o.validate().unwrap_err().to_string();
            assert!(e.contains(says), "{says}: {e}");
        }
    }

    #[test]
    fn a_folder_root_takes_nothing_of_an_image_and_only_an_absolute_path() {
        let folder = |o: CreateOptions| CreateOptions {
            rootfs_dir: Some("/srv/root".into()),
            ..o
        };
        folder(CreateOptions::default()).validate().unwrap();
        for (o, named) in [
            (
                CreateOptions {
                    image: Some("debian".into()),
                    ..Default::default()
                },
                "image",
            ),
            (
                CreateOptions {
                    snapshot: Some("s".into()),
                    ..Default::default()
                },
                "snapshot",
            ),
            (
                CreateOptions {
                    disk_size: Some(1 << 30),
                    ..Default::default()
                },
                "disk_size (--disk-size)",
            ),
            (
                CreateOptions {
                    entrypoint: true,
                    ..Default::default()
                },
                "entrypoint (--entrypoint)",
            ),
        ] {
            let e = folder(o).validate().unwrap_err().to_string();
            assert!(e.starts_with(named) && e.contains("leave"), "{e}");
        }
        for bad in ["relative", "/a\0b", ""] {
            let o = CreateOptions {
                rootfs_dir: Some(bad.into()),
                ..Default::default()
            };
            let e = o.validate().unwrap_err().to_string();
            assert!(e.contains("absolute path"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn create_options_are_bounded() {
        CreateOptions::default().validate().unwrap();
        let zero = CreateOptions {
            vcpus: 0,
            ..Default::default()
        };
        assert!(zero.validate().is_err());
        let tiny = CreateOptions {
            memory_mib: 16,
            ..Default::default()
        };
        assert!(tiny.validate().is_err());
        let bad_image = CreateOptions {
            image: Some("../etc".into()),
            ..Default::default()
        };
        assert!(bad_image.validate().is_err());
        let key = |k: &str| CreateOptions {
            ssh_key: Some(k.into()),
            ..Default::default()
        };
        key("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBvh7Jq3 me@host\n")
            .validate()
            .unwrap();
        for bad in [
            "",
            "command=\"sh\" ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBvh7Jq3",
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBvh7Jq3\nssh-rsa AAAAB3NzaC1yc2EAAAADAQAB",
            "ssh-ed25519 not*base64*at*all*!!",
        ] {
            assert!(key(bad).validate().is_err(), "{bad:?}");
        }
    }
}

#[cfg(test)]
pub(crate) mod concurrency_tests;
