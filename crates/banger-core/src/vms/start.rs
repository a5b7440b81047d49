//! A VM's start: phase 3 of `CreateVM`, and all of `StartVM`, under the VM's lock. One
//! function per stage the service reports, in order:
//!
//! - [`Vms::plan_start`] (no stage: the VM's directories taken back from its uid, and what
//!   this start restores or layers on);
//! - `prepare_rootfs`, `prepare_work_disk`, `network` and the initrd, made at once by
//!   [`Vms::prepare`];
//! - `restore` or `boot` ([`Vms::boot_or_restore`]);
//! - `wait_agent` (and `identity` for a restored guest), or `exited` when the main process
//!   ended first ([`Vms::reach_guest`]);
//! - `wait_ssh`, `wait_port_<N>`, `publish`, `ready` ([`Vms::make_ready`]).
//!
//! A failure names the stage whose work failed; `start_locked` (in `create.rs`) makes the
//! VM `failed` and stops what had started.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use super::create::{
    hostname_for, make_work_disk, new_host_key, seed_work_in_worker, timed, Stages, PENDING_KEY,
};
use super::error::failed;
use super::{share, snapshot, Vms};
use crate::agent::Health;
use crate::model::{Image, Kernel, Snapshot, Vm, VmState};
use crate::net::GuestNet;
use crate::store::rows;
use crate::vmm::jail::Jail;
use crate::vmm::{BootSpec, DiskFormat, Machine};
use crate::Result;

/// What a start decided before its first stage.
struct Plan {
    /// None for a VM whose root is a folder.
    image: Option<Image>,
    kernel: Kernel,
    /// The VM's state directory (disks) and runtime directory (pid files, logs).
    dir: PathBuf,
    run: PathBuf,
    /// The part of the runtime directory the VM's uid owns (its sockets).
    own_run: PathBuf,
    rootfs: PathBuf,
    work: PathBuf,
    /// The snapshot this start restores (the first start of a VM made from one), and its
    /// directory.
    restore: Option<(Snapshot, PathBuf)>,
    /// The snapshot disk the VM's disk layers on: on every start of a VM made from one, its
    /// VMM's view must hold it.
    layered_on: Option<PathBuf>,
    /// The caller's public key between `CreateVM` and the first start, and its file.
    pending: PathBuf,
    key: Option<String>,
    /// Whether this start writes SSH's keys (and the main process) to the work disk.
    ssh: bool,
}

/// Where a start's root disk comes from: nothing (the VM's own disk is kept), or a base it
/// layers on, with the base's format and the size to grow to.
type RootBase = Option<(PathBuf, DiskFormat, Option<u64>)>;

/// A new SSH host key being made off the runtime: its private half and public line.
type Keygen = tokio::task::JoinHandle<Result<(Vec<u8>, String)>>;

/// What the preparations made.
struct Prepared {
    /// The initrd, and whether its kernel has virtio's PCI transport.
    initrd: crate::kernels::initrd::Current,
    lease: GuestNet,
}

/// A VM whose VMM runs.
struct Booted {
    spec: BootSpec,
    /// A restored guest's new SSH host key, being made.
    keygen: Option<Keygen>,
}

impl Vms {
    /// Starts `vm` (in `starting`, its lock held) until it is `ready`, or `exited` when its
    /// main process ended before its agent was reached.
    pub(super) async fn start_phase(&self, st: &mut Stages<'_>, vm: &mut Vm) -> Result<()> {
        let plan = self.plan_start(vm).await?;
        let prepared = self.prepare(st, vm, &plan).await?;
        let booted = self.boot_or_restore(st, vm, &plan, &prepared).await?;
        // A balloon over a snapshot's sealed memory could give nothing back (see `vmm::ram`).
        let stop_reporting =
            booted.spec.machine.balloon && booted.spec.memory.as_ref().is_some_and(|m| !m.shared);
        let Some((health, control)) = self
            .reach_guest(st, vm, &plan, &prepared, booted.keygen, stop_reporting)
            .await?
        else {
            return Ok(());
        };
        self.make_ready(st, vm, &plan, &booted.spec, health, control)
            .await
    }

    /// The VM's directories, taken back from its uid, and what this start begins from.
    async fn plan_start(&self, vm: &mut Vm) -> Result<Plan> {
        let image = match vm.rootfs_dir.is_empty() {
            true => Some(self.images.get(&vm.image_id).await?),
            false => None,
        };
        let kernel = self.kernels.get(&vm.kernel).await?;
        vm.state = VmState::Starting;
        let dir = self.vm_dir(&vm.id);
        let run = self.layout.vm_runtime_dir(&vm.id);
        for d in [&dir, &run] {
            std::fs::create_dir_all(d)
                .map_err(|e| failed(format!("Cannot create {}", d.display()), e))?;
        }
        // The VM's uid had its directories while it ran: take them back (and drop anything
        // it planted, its runtime directory whole) before root writes disks and logs there.
        let own_run = crate::vmm::jail::own_runtime(&run);
        {
            let (d, r, o) = (dir.clone(), run.clone(), own_run.clone());
            crate::jobs::spawn_blocking(move || -> Result<()> {
                crate::layout::remove_any(&o)?;
                crate::vmm::jail::reclaim(&[&d, &r])?;
                std::fs::create_dir(&o)
                    .map_err(|e| failed(format!("Cannot create {}", o.display()), e))
            })
            .await
            .map_err(|e| failed("Jail task failed", e))??;
        }

        let rootfs = self.vmm.rootfs_path(&dir);
        // A VM restored from a snapshot restores on its first start; later starts boot it.
        // A root folder leaves no disk to tell by: such a VM forgets its snapshot once
        // restored (see `make_ready`), and has none to layer on.
        let folder = !vm.rootfs_dir.is_empty();
        let restore = if !vm.snapshot.is_empty() && (folder || !rootfs.exists()) {
            let s = self.snapshot(&vm.snapshot).await?;
            let sd = self.snapshot_dir(&s.id);
            Some((s, sd))
        } else {
            None
        };
        // The snapshot's disk is in the chain QEMU opens on every start, not only the first
        // (the VM's disk layers on it): its view must hold it each time.
        let layered_on = match (&restore, vm.snapshot.is_empty()) {
            _ if folder => None,
            (Some((s, _)), _) => Some(s.clone()),
            (None, false) => Some(self.snapshot(&vm.snapshot).await?),
            (None, true) => None,
        }
        .map(|s| {
            self.snapshot_dir(&s.id)
                .join(snapshot::rootfs_file(snapshot::disk_format_of(&s)))
        });
        let work = dir.join("work.ext4");
        let pending = dir.join(PENDING_KEY);
        let key = std::fs::read_to_string(&pending).ok();
        // A restored guest has its disks mounted already: what it needs comes through its
        // agent (identity), never by writing under it. Otherwise the disk gets SSH's keys
        // (a new host key is made while the seed is copied) and, for banger-init, the main
        // process: its arguments may not fit a kernel command line; a VM without one has
        // none there.
        // A root folder has no disks to write to: it is the guest's own, as it is.
        // Nor does a VM in another network namespace: the daemon's cannot reach its address.
        let ssh = restore.is_none()
            && vm.rootfs_dir.is_empty()
            && vm.netns.is_empty()
            && (vm.ssh_host_key.is_empty() || key.is_some());
        Ok(Plan {
            image,
            kernel,
            dir,
            run,
            own_run,
            rootfs,
            work,
            restore,
            layered_on,
            pending,
            key,
            ssh,
        })
    }

    /// Stages `prepare_rootfs`, `prepare_work_disk` and `network`, and the initrd. They do
    /// not depend on each other: each stage is entered in order, then all four are made at
    /// once, so a cold start waits for the slowest of them rather than for their sum before
    /// its VMM runs.
    async fn prepare(&self, st: &mut Stages<'_>, vm: &mut Vm, plan: &Plan) -> Result<Prepared> {
        let base = self.enter_rootfs(st, vm, plan).await?;
        let root_disk = async {
            match &base {
                Some((base, format, size)) => self
                    .vmm
                    .prepare_rootfs(base, *format, &plan.dir, *size)
                    .await
                    .map(|_| ()),
                None => Ok(()),
            }
        };
        let seed = self.enter_work_disk(st, vm, plan).await?;
        let work_disk = self.work_disk(vm, plan, seed);

        // banger's bridge, or a namespace's eth0 (see `net::netns`).
        let subnet = if vm.netns.is_empty() {
            let subnet = self.net.subnet()?;
            st.enter(
                vm,
                "network",
                format!(
                    "Tap {} on {}, guest address {}/{}",
                    vm.tap_name,
                    crate::net::BRIDGE,
                    vm.guest_address,
                    subnet.prefix
                ),
            )
            .await?;
            Some(subnet)
        } else {
            st.enter(
                vm,
                "network",
                format!(
                    "Tap {} in {}, wired to its {}",
                    vm.tap_name,
                    vm.netns,
                    crate::net::netns::POD_IF
                ),
            )
            .await?;
            None
        };
        let (tap, netns) = (vm.tap_name.clone(), vm.netns.clone());
        let network = async {
            if !netns.is_empty() {
                return crate::net::netns::attach_in(&netns, &tap).await.map(Some);
            }
            let _net = self.net_lock.lock().await;
            let ports = self.guest_ports("").await?;
            self.net.attach(&tap, &ports).await.map(|_| None)
        };
        let initrd = self.current_initrd(&plan.kernel);
        // All four are awaited, failed or not, so none goes on behind the failure's cleanup.
        let t0 = std::time::Instant::now();
        let id = vm.id.as_str();
        let (root_disk, work_disk, network, initrd) = tokio::join!(
            timed(id, "root disk", t0, root_disk),
            timed(id, "work disk", t0, work_disk),
            timed(id, "network", t0, network),
            timed(id, "initrd", t0, initrd)
        );
        // A failure names the stage whose work failed, not the last one entered.
        let at = |vm: &mut Vm, stage: &str| vm.stage = stage.into();
        root_disk.inspect_err(|_| at(vm, "prepare_rootfs"))?;
        if let Some(public) = work_disk.inspect_err(|_| at(vm, "prepare_work_disk"))? {
            vm.ssh_host_key = public;
        }
        if plan.ssh {
            let _ = std::fs::remove_file(&plan.pending);
        }
        let pod = network?;
        let initrd = initrd?;
        vm.exit_status = -1;

        let lease = match (pod, subnet) {
            (Some(pod), _) => GuestNet {
                address: pod.address,
                prefix: pod.prefix,
                gateway: pod.gateway,
                dns: crate::net::host_resolvers(),
                mac: pod.mac,
            },
            (None, Some(subnet)) => GuestNet {
                address: vm
                    .guest_address
                    .parse()
                    .map_err(|e| failed(format!("VM {} has no valid address lease", vm.name), e))?,
                prefix: subnet.prefix,
                gateway: Some(subnet.gateway()),
                dns: crate::net::host_resolvers(),
                mac: vm.mac_address.clone(),
            },
            (None, None) => unreachable!("a VM without a namespace is on the bridge"),
        };
        Ok(Prepared { initrd, lease })
    }

    /// Stage `prepare_rootfs`: says where the root disk comes from.
    async fn enter_rootfs(
        &self,
        st: &mut Stages<'_>,
        vm: &mut Vm,
        plan: &Plan,
    ) -> Result<RootBase> {
        let Some(image) = &plan.image else {
            let said = format!(
                "Serving {} as the VM's root (virtio-fs, as its owner)",
                vm.rootfs_dir
            );
            st.enter(vm, "prepare_rootfs", said).await?;
            return Ok(None);
        };
        Ok(match &plan.restore {
            Some((snap, sd)) => {
                st.enter(
                    vm,
                    "prepare_rootfs",
                    format!("Layering the VM's root disk on snapshot {}", snap.name),
                )
                .await?;
                let format = snapshot::disk_format_of(snap);
                Some((sd.join(snapshot::rootfs_file(format)), format, None))
            }
            None if plan.rootfs.exists() => {
                st.enter(vm, "prepare_rootfs", "Keeping the VM's root disk")
                    .await?;
                None
            }
            None => {
                st.enter(
                    vm,
                    "prepare_rootfs",
                    format!("Layering the VM's root disk on image {}", image.name),
                )
                .await?;
                let size = (vm.disk_size > image.size_bytes).then_some(vm.disk_size);
                Some((image.rootfs_path.clone(), DiskFormat::Raw, size))
            }
        })
    }

    /// Stage `prepare_work_disk`: where the work disk comes from, a snapshot's copy, the
    /// image's seed (`Some(seed)`), or nowhere (`None`: the VM's own disk is kept).
    async fn enter_work_disk(
        &self,
        st: &mut Stages<'_>,
        vm: &mut Vm,
        plan: &Plan,
    ) -> Result<Option<Option<PathBuf>>> {
        let Some(image) = &plan.image else {
            st.enter(
                vm,
                "prepare_work_disk",
                "No /root disk: /root is the root folder's",
            )
            .await?;
            return Ok(None);
        };
        Ok(if let Some((_, sd)) = &plan.restore {
            st.enter(vm, "prepare_work_disk", "Copying the snapshot's /root disk")
                .await?;
            Some(Some(sd.join(snapshot::WORK)))
        } else if plan.work.exists() {
            st.enter(vm, "prepare_work_disk", "Keeping the VM's /root disk")
                .await?;
            None
        } else {
            st.enter(
                vm,
                "prepare_work_disk",
                "Creating the VM's /root disk from the image's work seed",
            )
            .await?;
            Some(image.work_seed_path.clone())
        })
    }

    /// The work disk's making, begun at once (the copy and a new host key run while the
    /// other preparations are entered): the disk from `seed`, then SSH's keys and the main
    /// process written into it. Yields the VM's new public host key, if it got one.
    fn work_disk(
        &self,
        vm: &Vm,
        plan: &Plan,
        seed: Option<Option<PathBuf>>,
    ) -> impl Future<Output = Result<Option<String>>> + 'static {
        let host_key = (plan.ssh && vm.ssh_host_key.is_empty()).then(|| {
            let name = vm.name.clone();
            crate::jobs::spawn_blocking(move || new_host_key(&name))
        });
        let (w, main, key) = (plan.work.clone(), vm.main.clone(), plan.key.clone());
        let run_dir = self.layout.runtime_dir.clone();
        let hide = vec![self.layout.state_dir.clone(), run_dir.clone()];
        let restoring = plan.restore.is_some();
        let folder = plan.image.is_none();
        let made = seed.map(|seed| {
            let w = w.clone();
            crate::jobs::spawn_blocking(move || make_work_disk(seed.as_deref(), &w))
        });
        async move {
            if let Some(made) = made {
                made.await
                    .map_err(|e| failed("Work disk task failed", e))??;
            }
            let host_key = match host_key {
                Some(k) => Some(k.await.map_err(|e| failed("SSH key task failed", e))??),
                None => None,
            };
            if restoring || folder {
                return Ok(None);
            }
            crate::jobs::spawn_blocking(move || {
                seed_work_in_worker(&w, &hide, &run_dir, host_key, key.as_deref(), &main)
            })
            .await
            .map_err(|e| failed("Work disk task failed", e))?
        }
    }

    /// Stage `restore` (a snapshot's memory, checked before any VMM process exists) or
    /// `boot`: the VM's shares checked again, its directories handed to its uid, its VMM
    /// started.
    async fn boot_or_restore(
        &self,
        st: &mut Stages<'_>,
        vm: &mut Vm,
        plan: &Plan,
        prepared: &Prepared,
    ) -> Result<Booted> {
        // A restored VM's new SSH host key is made while its VMM starts and loads.
        let keygen = plan.restore.is_some().then(|| {
            let name = vm.name.clone();
            crate::jobs::spawn_blocking(move || new_host_key(&name))
        });
        let memory = match &plan.restore {
            Some((snap, sd)) => {
                let what = if snap.warm.is_empty() {
                    format!("Restoring snapshot {} on {}", snap.name, self.vmm.name())
                } else if snap.image_id.is_empty() {
                    format!(
                        "Restoring the warm snapshot of folder roots on {} (an instant start; \
                         --cold boots instead)",
                        self.vmm.name()
                    )
                } else {
                    format!(
                        "Restoring the warm snapshot of this image on {} (an instant start; \
                         --cold boots instead)",
                        self.vmm.name()
                    )
                };
                st.enter(vm, "restore", what).await?;
                let (sd, s2) = (sd.clone(), snap.clone());
                Some(
                    crate::jobs::spawn_blocking(move || snapshot::verified_memory(&sd, &s2))
                        .await
                        .map_err(|e| failed("Snapshot task failed", e))??,
                )
            }
            None => {
                st.enter(vm, "boot", format!("Booting on {}", self.vmm.name()))
                    .await?;
                None
            }
        };
        let mut spec = self.boot_spec(vm, plan, prepared, memory.is_some()).await?;
        vm.machine = spec.machine.spelled();
        if let Some((snap, sd)) = plan
            .restore
            .as_ref()
            .filter(|(s, _)| !s.ram_sha256.is_empty())
        {
            spec.memory = Some(self.guest_ram(snap, sd, !spec.shares.is_empty()).await?);
        }
        // The VM's processes run as a uid of its own: its directories become that uid's, what
        // it only reads (image, kernel) the VMM group's.
        {
            // What the VM only reads and the roots its units hide are the jail's own lists.
            let cell = spec.jail.clone();
            let (vm_dir, own_run) = (plan.dir.clone(), plan.own_run.clone());
            crate::jobs::spawn_blocking(move || {
                use crate::vmm::jail;
                let roots: Vec<&std::path::Path> = cell.hide.iter().map(|r| r.as_path()).collect();
                let files: Vec<&std::path::Path> =
                    cell.read_only.iter().map(|f| f.as_path()).collect();
                jail::share(&files, &roots)?;
                for own in [&vm_dir, &own_run] {
                    jail::reach(own, &roots)?;
                }
                jail::hand_over(cell.uid, &[&vm_dir, &own_run])
            })
            .await
            .map_err(|e| failed("Jail task failed", e))??;
        }
        self.vmm.boot(&spec).await?;
        if let Some(file) = memory {
            let (input, feeder) = snapshot::memory_stream(file)?;
            self.load_and_resume(&spec, input, feeder).await?;
        }
        Ok(Booted { spec, keygen })
    }

    /// Loads a saved state that `feeder` writes into `input` into the VMM `spec` started
    /// (with `incoming`), and lets the guest go on.
    pub(super) async fn load_and_resume(
        &self,
        spec: &BootSpec,
        input: std::os::fd::OwnedFd,
        feeder: std::thread::JoinHandle<Result<()>>,
    ) -> Result<()> {
        let loaded = self.vmm.load_state(spec, input).await;
        let fed = crate::jobs::spawn_blocking(move || feeder.join())
            .await
            .map_err(|e| failed("Saved state task failed", e))?
            .map_err(|_| failed("Saved state task failed", std::io::Error::other("panic")))?;
        loaded?;
        fed?;
        self.vmm.resume(&spec.run_dir).await
    }

    /// What the VMM is given: the kernel and its command line, disks, network, shares (each
    /// checked again with the owner's rights: access lost since the create is a clear error
    /// here, not a guest that cannot mount) and the jail.
    async fn boot_spec(
        &self,
        vm: &Vm,
        plan: &Plan,
        prepared: &Prepared,
        incoming: bool,
    ) -> Result<BootSpec> {
        let mut shares: Vec<crate::vmm::ShareSpec> = if vm.shares.is_empty() {
            Vec::new()
        } else {
            let owner = crate::callerfile::creds(vm.owner_uid)?;
            share::verify(vm.owner_uid, vm.shares.clone())
                .await?
                .into_iter()
                .enumerate()
                .map(|(i, s)| crate::vmm::ShareSpec {
                    tag: share::tag(i),
                    host: s.host.into(),
                    read_only: s.read_only,
                    owner: owner.clone(),
                })
                .collect()
        };
        // A root folder: checked again with the owner's rights (it may have gone or changed
        // hands since the create), served as a share is.
        if !vm.rootfs_dir.is_empty() {
            let host = share::verify_root(vm.owner_uid, vm.rootfs_dir.clone()).await?;
            shares.push(crate::vmm::ShareSpec {
                tag: share::ROOT_TAG.into(),
                host: host.into(),
                read_only: false,
                owner: crate::callerfile::creds(vm.owner_uid)?,
            });
        }
        let kernel = &plan.kernel;
        // Devices on PCI where both ends can: the VMM, and the guest's initrd loading the
        // transport.
        let pci = prepared.initrd.virtio_pci && self.vmm.virtio_pci();
        // A saved state loads only into the devices it was saved with.
        let machine = match &plan.restore {
            Some((snap, _)) => Machine::parse(&snap.machine).ok_or_else(|| {
                super::error::VmError::Invalid(format!(
                    "Snapshot {} needs devices this banger does not know ({:?}): a newer \
                     banger made it; boot cold (--cold) or upgrade",
                    snap.name, snap.machine
                ))
            })?,
            // A template's snapshot is mapped by every warm start: no balloon (`vmm::ram`).
            None if super::warm::is_template(vm) => Machine::template(pci),
            None => Machine::current(&self.config, pci),
        };
        // The operator's kernel arguments, before banger's own (none of which they name:
        // `Config::parse` checks).
        let operator_args = self
            .config
            .kernel_args()
            .map(|a| format!(" {a}"))
            .unwrap_or_default();
        Ok(BootSpec {
            id: vm.id.clone(),
            name: vm.name.clone(),
            vcpus: vm.vcpus,
            memory_mib: vm.memory_mib,
            kernel: kernel.kernel_path.clone(),
            initrd: Some(prepared.initrd.path.clone()),
            cmdline: format!(
                "quiet {}{} {} banger.hostname={}{}{}",
                crate::vmm::NO_KERNEL_MEMORY_ACCOUNTING,
                operator_args,
                prepared.lease.cmdline(),
                hostname_for(&vm.name),
                if vm.main.is_empty() {
                    super::init_cmdline(&vm.init)
                } else {
                    // banger-init runs the main process, whatever init the image has.
                    " banger.init=banger banger.main=1".into()
                },
                share::cmdline(&vm.shares)
            ) + if super::warm::is_template(vm) && !vm.rootfs_dir.is_empty() {
                // A template of folder roots waits for its root (see `warm::WarmRoot`).
                " banger.park=1"
            } else {
                ""
            },
            net: Some(crate::vmm::NetSpec {
                tap: vm.tap_name.clone(),
                mac: prepared.lease.mac.clone(),
                netns: (!vm.netns.is_empty()).then(|| vm.netns.clone()),
            }),
            root_share: !vm.rootfs_dir.is_empty(),
            shares,
            rootfs: plan.rootfs.clone(),
            work: plan.work.clone(),
            cid: vm.vsock_cid,
            run_dir: plan.run.clone(),
            console_log: self.console_log(&vm.id),
            jail: Jail {
                uid: crate::vmm::jail::vm_uid(vm.vsock_cid),
                gid: crate::vmm::jail::vm_uid(vm.vsock_cid),
                groups: vec![crate::vmm::jail::vmm_gid()],
                hide: vec![
                    self.layout.state_dir.clone(),
                    self.layout.runtime_dir.clone(),
                ],
                read_only: plan
                    .image
                    .iter()
                    .map(|i| i.rootfs_path.clone())
                    .chain([kernel.kernel_path.clone()])
                    .chain([prepared.initrd.path.clone()])
                    .chain(plan.layered_on.clone())
                    .collect(),
                private: true,
                offline: true,
            },
            incoming,
            machine,
            memory: None,
        })
    }

    /// Stage `wait_agent` (and `identity` for a restored guest), while the VM's control
    /// socket starts (so it costs no time). Yields the guest's health and the control
    /// socket, or `None` when the main process ended first: the VM is then stopped, at stage
    /// `exited`.
    async fn reach_guest(
        &self,
        st: &mut Stages<'_>,
        vm: &mut Vm,
        plan: &Plan,
        prepared: &Prepared,
        keygen: Option<Keygen>,
        stop_reporting: bool,
    ) -> Result<Option<(Health, Result<PathBuf>)>> {
        st.enter(vm, "wait_agent", "Waiting for the guest agent")
            .await?;
        let vm_id = vm.id.clone();
        let run = &plan.run;
        let (health, control) = tokio::join!(
            async {
                // A restored guest's agent runs already: the connection that finds it carries the
                // guest's new identity behind its opening, and the answer its health. Sending
                // only after `OK`, or asking for health apart, would each cost a round trip
                // through a TCG guest whose translations are all cold (tens of ms).
                match keygen {
                    Some(keygen) => {
                        if !vm.rootfs_dir.is_empty() {
                            // A warm template of folder roots, parked: it mounts the VM's own
                            // root now, and its root's agent takes the identity.
                            let agent = self.reach_agent(run).await?;
                            st.ctx
                                .log(6, "Mounting the root folder in the restored guest");
                            self.unpark(run, agent).await?;
                        }
                        // Made while the VMM started (a few ms; the restore takes longer).
                        let (private, public) = keygen
                            .await
                            .map_err(|e| failed("SSH key task failed", e))??;
                        let agent = self
                            .reach_with_identity(
                                vm,
                                run,
                                &prepared.lease,
                                (&private, &public),
                                plan.key.as_deref(),
                                stop_reporting,
                            )
                            .await?;
                        st.enter(
                            vm,
                            "identity",
                            "Giving the guest its own name, address, keys and clock",
                        )
                        .await?;
                        let health = self.identity_taken(vm, agent, &public).await?;
                        let _ = std::fs::remove_file(&plan.pending);
                        Ok(health)
                    }
                    None => self.wait_agent(run).await,
                }
            },
            self.start_control(&vm_id)
        );
        match health {
            Ok(health) => Ok(Some((health, control))),
            Err(e) => {
                // A main process that finished before the agent was reached: the VM is done.
                let status = (!vm.main.is_empty() && !self.vmm.running(run))
                    .then(|| self.main_exit_status(&vm.id))
                    .flatten();
                let Some(code) = status else {
                    return Err(e);
                };
                vm.exit_status = code;
                self.power_down(vm).await?;
                vm.state = VmState::Stopped;
                st.enter(
                    vm,
                    "exited",
                    format!("The main process exited with status {code}"),
                )
                .await?;
                self.release_network_if_idle().await;
                Ok(None)
            }
        }
    }

    /// Has a parked guest (see `warm::WarmRoot::Folder`) mount its root through `agent`,
    /// then waits until the root's own agent answers.
    async fn unpark(&self, run: &std::path::Path, mut agent: tokio::net::UnixStream) -> Result<()> {
        let limit = Duration::from_secs(self.config.boot_timeout_sec.max(1));
        tokio::time::timeout(limit, crate::agent::client::unpark(&mut agent))
            .await
            .map_err(|_| {
                failed(
                    "The restored guest did not mount its root folder in time",
                    std::io::Error::other("timeout"),
                )
            })?
            .map_err(|e| {
                failed(
                    "The restored guest could not mount its root folder",
                    std::io::Error::other(e.full_message()),
                )
            })?;
        // Hanging up lets the parked agent end; until it has, it still answers as parked.
        drop(agent);
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if !self.wait_agent(run).await?.parked {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(failed(
                    "The restored guest's root agent did not start",
                    std::io::Error::other("timeout"),
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stages `wait_ssh`, `wait_port_<N>` for each of the image's ready ports, `move_memory`
    /// (see `move_memory`), `publish`, and `ready`: the VM announced to machined, its clock set,
    /// watched from now on.
    async fn make_ready(
        &self,
        st: &mut Stages<'_>,
        vm: &mut Vm,
        plan: &Plan,
        spec: &BootSpec,
        health: Health,
        control: Result<PathBuf>,
    ) -> Result<()> {
        let run = &plan.run;
        let moves = self.moves_memory(vm, spec, plan.restore.is_some());
        // A guest that just booted keeps its RTC's time, up to a second off: it starts on the
        // host's (forward only), set while the other stages wait (sshd, ports), done before
        // `ready`; its agent link keeps it there. One restored had its clock stepped by its
        // identity a moment ago (behind by that message's way into the guest, which this
        // would only slew at 0.5 ms a second, as the link does): another round trip through
        // its cold vCPU would cost its `ready` some 40 ms under TCG and set nothing.
        // A guest whose memory moves stands still meanwhile: its clock is set after.
        let set_clock = |vm: &Vm| {
            let (this, vm) = (self.clone(), vm.clone());
            tokio::spawn(async move { this.sync_clock(&vm, true).await })
        };
        let mut clock = (plan.restore.is_none() && !moves).then(|| set_clock(vm));
        // An agent that says whether there is an sshd saves asking it to run a shell.
        let has_sshd = match health.sshd {
            Some(has) => has,
            None => self.guest_has_sshd(vm).await,
        };
        if has_sshd {
            // A restored guest whose agent saw sshd listen on every address once it took the
            // identity (sshd then serves the new key): that the new address answers is all
            // that is left to know. Asking sshd would start its per-connection child, which
            // would then run on the guest's vCPU after `ready` (the next command's time). A
            // guest whose firewall drops the probe is asked for sshd's banner, as at a boot.
            let addr = format!("{}:{}", vm.guest_address, crate::agent::SSH_PORT);
            let listening = health.ssh_listening == Some(true);
            let what = if listening {
                format!("Reaching {}: the guest's sshd listens", vm.guest_address)
            } else {
                format!("Waiting for sshd on {addr}")
            };
            st.enter(vm, "wait_ssh", what).await?;
            if !(listening && guest_answers(&vm.guest_address).await) {
                self.wait_port(run, &addr, true).await?;
            }
            vm.ssh_address = addr;
        } else {
            st.enter(vm, "wait_ssh", "Skipped: the image has no sshd")
                .await?;
        }
        for port in plan.image.iter().flat_map(|i| &i.ready_ports) {
            let addr = format!("{}:{port}", vm.guest_address);
            st.enter(
                vm,
                &format!("wait_port_{port}"),
                format!("Waiting for the image's service on {addr}"),
            )
            .await?;
            self.wait_port(run, &addr, false).await?;
        }
        if moves {
            self.move_memory(st, vm, run, spec).await?;
            clock = Some(set_clock(vm));
        }
        if !vm.publish.is_empty() {
            st.enter(
                vm,
                "publish",
                format!("Publishing {}", vm.publish.join(", ")),
            )
            .await?;
            self.start_forwarder(vm, &spec.jail).await?;
        }
        // Its control socket is a convenience (machinectl, varlinkctl): the VM runs without.
        let control = match control {
            Ok(socket) => Some(socket.to_string_lossy().into_owned()),
            Err(e) => {
                tracing::warn!(vm_id = %vm.id, vm_name = %vm.name, "{}", e.full_message());
                None
            }
        };
        let pids = self.vmm.pids(run);
        self.machines
            .announce(&crate::vmm::scope::Machine {
                name: &vm.name,
                id: &vm.id,
                pids: &pids,
                cid: vm.vsock_cid,
                ssh_address: &vm.ssh_address,
                control_address: control.as_deref(),
            })
            .await;
        if let Some(clock) = clock {
            let _ = clock.await;
        }
        if plan.restore.is_some() && !vm.rootfs_dir.is_empty() {
            let id = vm.id.clone();
            self.store
                .call(move |c| rows::forget_vm_snapshot(c, &id))
                .await?;
            vm.snapshot.clear();
        }
        vm.state = VmState::Running;
        st.enter(vm, "ready", format!("VM {} is ready", vm.name))
            .await?;
        self.watch(vm.clone());
        Ok(())
    }
}

/// The port [`guest_answers`] knocks at: tcpmux's, which guests leave closed (a service there
/// answers too).
const PROBE_PORT: u16 = 1;

/// Whether the guest's kernel answers at `address` within [`PROBE_WAIT`]: a TCP connection to
/// [`PROBE_PORT`], refused (the guest's reset: the host's walls only drop) or taken. Either
/// proves the path both ways with the VM's own MAC and address, and starts no server. `false`
/// when nothing answers (a firewall in the guest that drops it).
async fn guest_answers(address: &str) -> bool {
    let answered = answers((address, PROBE_PORT), PROBE_WAIT).await;
    if !answered {
        tracing::info!(
            "Nothing answered on {address}:{PROBE_PORT} (a firewall in the guest?): asking sshd"
        );
    }
    answered
}

/// How long [`guest_answers`] waits: a restored guest on a busy host answers in well under it.
const PROBE_WAIT: Duration = Duration::from_secs(2);

/// Whether a TCP connection to `to` is taken or refused within `wait`.
async fn answers(to: (&str, u16), wait: Duration) -> bool {
    match tokio::time::timeout(wait, tokio::net::TcpStream::connect(to)).await {
        Ok(Ok(_)) => true,
        Ok(Err(e)) => e.kind() == std::io::ErrorKind::ConnectionRefused,
        Err(_) => false,
    }
}

#[cfg(test)]
mod probe_tests {
    use super::*;

    #[tokio::test]
    async fn a_refused_or_taken_probe_is_an_answer_and_silence_is_not() {
        use std::os::fd::AsRawFd;
        let wait = Duration::from_secs(2);
        // Taken.
        let open = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = open.local_addr().unwrap().port();
        assert!(answers(("127.0.0.1", port), wait).await);
        // Refused: nothing listens there any more.
        drop(open);
        assert!(answers(("127.0.0.1", port), wait).await);
        // Silence, as a firewall that drops: a listener whose queue is full drops the SYN.
        let full = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        // SAFETY: listen on a socket this test owns; backlog 0 holds one connection.
        assert_eq!(unsafe { libc::listen(full.as_raw_fd(), 0) }, 0);
        let port = full.local_addr().unwrap().port();
        let _queued = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        assert!(!answers(("127.0.0.1", port), Duration::from_millis(500)).await);
    }
}
