//! `CreateVM`, whose phase 3 is the start it shares with `StartVM` (`start.rs`, one function
//! per stage).
//!
//! 1. resolve, no lock: the image and kernel, pulled from the catalog when missing;
//! 2. reserve: one transaction re-checks the name and takes a CID and an address;
//! 3. start, under the VM's lock only: disks, network, boot, wait for the agent.
//!
//! Every stage goes out as the job's `StageChanged`, as `CreateProgress`, into the VM's
//! `Stage` property and into the journal with `VM_ID=`, `VM_NAME=`, `STAGE=`.

use std::sync::Arc;
use std::time::Duration;

use super::error::{failed, invalid};
use super::VmError;
use super::{bounds, lifetime, publish, share, snapshot, CreateOptions, Vms};
use crate::auth::Action;
use crate::events::ObjectEvent;
use crate::images::ImageError;
use crate::jobs::{Job, JobContext, JobSpec};
use crate::kernels::KernelError;
use crate::model::{new_id, now_us, Image, Kernel, Vm, VmState};
use crate::store::rows;
use crate::{Error, Result};

/// Reports stages of one VM's creation or start.
pub(super) struct Stages<'a> {
    pub ctx: &'a JobContext,
    pub vms: &'a Vms,
    /// Whether the VM row exists yet (before `reserve` only the job and signal carry it).
    pub saved: bool,
}

impl Stages<'_> {
    pub async fn enter(
        &mut self,
        vm: &mut Vm,
        stage: &str,
        message: impl Into<String>,
    ) -> Result<()> {
        let message = message.into();
        tracing::info!(vm_id = %vm.id, vm_name = %vm.name, stage, "{message}");
        self.ctx.stage(stage, message.clone());
        self.vms.events.send(ObjectEvent::CreateProgress {
            vm_id: vm.id.clone(),
            stage: stage.into(),
            message,
        });
        vm.stage = stage.into();
        if self.saved {
            self.vms.save(vm).await?;
        }
        Ok(())
    }
}

/// A MAC address from the VM's id: locally administered, unicast.
fn mac_for(id: &str) -> String {
    let b = id.as_bytes();
    let pair = |i: usize| std::str::from_utf8(&b[i..i + 2]).unwrap_or("00").to_owned();
    format!(
        "02:{}:{}:{}:{}:{}",
        pair(0),
        pair(2),
        pair(4),
        pair(6),
        pair(8)
    )
}

impl Vms {
    /// Creates (and by default starts) a VM; returns it and its job at once. The VM's
    /// object appears when the reservation is made.
    pub async fn create(
        &self,
        uid: u32,
        name: &str,
        mut o: CreateOptions,
    ) -> Result<(Vm, Arc<Job>)> {
        o.validate()?;
        // A restore takes its shape from the snapshot, and only that shape.
        let snapshot = match o.snapshot.clone() {
            Some(key) => Some(self.restorable(&key, &mut o).await?),
            None => None,
        };
        bounds::VmLimits::of(&self.config).check(o.vcpus, o.memory_mib, o.disk_size)?;
        let usage = self.usage_of(uid, "").await?;
        bounds::owned_quota(uid, usage.owned, self.config.max_vms_per_user)?;
        if o.start {
            // Checked again, atomically, as the VM moves to `starting`.
            bounds::RunQuota::of(&self.config).check(uid, usage, o.vcpus, o.memory_mib)?;
        }
        // A network namespace: root's to give (it is wired to whatever that namespace's eth0
        // reaches), checked now as every start checks it again. Otherwise banger's network,
        // whose subnet the start-up check may have refused: say why before anything is
        // reserved.
        let netns =
            match &o.netns {
                Some(_) if uid != crate::model::SYSTEM_UID => return Err(invalid(
                    "netns (--netns): only root puts a VM in a network namespace of its choosing \
                     (containerd's shim does, for a pod); leave it out for banger's network",
                )),
                Some(_) if self.vmm.name() == "firecracker" => {
                    return Err(invalid(
                        "netns (--netns): the firecracker VMM is not wired into other namespaces; \
                     set vmm = \"qemu\" in the configuration",
                    ))
                }
                Some(ns) => {
                    crate::net::netns::open_netns(ns)?;
                    ns.clone()
                }
                None => {
                    self.net.subnet()?;
                    String::new()
                }
            };
        // Published host ports: free now, and no other VM's.
        let wanted = publish::check(&o.publish)?;
        if !wanted.is_empty() {
            for other in self.list().await? {
                for p in other
                    .publish
                    .iter()
                    .filter_map(|s| publish::Publish::parse(s).ok())
                {
                    if wanted.iter().any(|w| w.clashes(&p)) {
                        return Err(invalid(format!(
                            "publish: host port {} is VM {}'s; pick another",
                            p.host_port(),
                            other.name
                        )));
                    }
                }
            }
            publish::check_free(&wanted)?;
        }
        // Shared folders: checked with the owner's own rights, kept as they resolved.
        if !o.shares.is_empty() && self.vmm.name() == "firecracker" {
            return Err(invalid(
                "share: the firecracker VMM has no virtio-fs; set vmm = \"qemu\" in the \
                 configuration to share folders",
            ));
        }
        let shares = share::verify(uid, o.shares.clone()).await?;
        // A root folder: checked as a share's, with the owner's own rights, kept resolved.
        let rootfs_dir = match &o.rootfs_dir {
            Some(_) if self.vmm.name() == "firecracker" => {
                return Err(invalid(
                    "rootfs_dir: the firecracker VMM has no virtio-fs; set vmm = \"qemu\" in \
                     the configuration to boot a folder",
                ))
            }
            Some(d) => share::verify_root(uid, d.clone()).await?,
            None => String::new(),
        };
        let n = name.to_owned();
        if self
            .store
            .call(move |c| rows::find_vm(c, &n))
            .await?
            .is_some()
        {
            return Err(taken(name));
        }
        let id = new_id();
        let mut vm = Vm {
            id: id.clone(),
            name: name.into(),
            state: VmState::Created,
            stage: String::new(),
            image_id: String::new(),
            kernel: String::new(),
            vcpus: o.vcpus,
            memory_mib: o.memory_mib,
            disk_size: o.disk_size.unwrap_or(0),
            owner_uid: uid,
            guest_address: String::new(),
            mac_address: mac_for(&id),
            vsock_cid: 0,
            tap_name: format!("bgr{}", &id[..12]),
            ssh_address: String::new(),
            created_at: now_us(),
            ssh_host_key: String::new(),
            network: o.network,
            egress: o.egress.clone(),
            init: o.init.clone(),
            main: Vec::new(),
            exit_status: -1,
            publish: wanted.iter().map(|p| p.spec()).collect(),
            shares,
            snapshot: snapshot.as_ref().map(|s| s.id.clone()).unwrap_or_default(),
            machine: String::new(),
            labels: o.labels.clone(),
            // Until the VM is ready its lifetime also covers the boot, so a slow start is not
            // ended half-way; it counts from ready once there (see below). Should the daemon
            // die before, the VM still ends.
            expires_at: lifetime::expiry(if o.timeout_sec == 0 {
                0
            } else {
                o.timeout_sec
                    .saturating_add(u32::try_from(self.config.boot_timeout_sec).unwrap_or(u32::MAX))
            }),
            on_expire: o.on_expire,
            rootfs_dir,
            netns,
        };
        if let Some(s) = &snapshot {
            vm.init = s.init.clone();
        }
        let spec = JobSpec {
            kind: "create-vm".into(),
            target: name.into(),
            action: Action::VmsManage,
            owner_uid: uid,
        };
        let this = self.clone();
        let v = vm.clone();
        let job = self.jobs.spawn(
            spec,
            move |ctx| async move { this.run_create(ctx, v, o).await },
        );
        self.note_start(&vm.id, &job);
        Ok((vm, job))
    }

    async fn run_create(&self, ctx: JobContext, mut vm: Vm, o: CreateOptions) -> Result<()> {
        let mut st = Stages {
            ctx: &ctx,
            vms: self,
            saved: false,
        };
        // Phase 1: resolve, no lock. A restore's image and kernel are its snapshot's; a VM
        // whose root is a folder has no image.
        let restored = match &o.snapshot {
            Some(key) => Some(self.snapshot(key).await?),
            None => None,
        };
        let image = if vm.rootfs_dir.is_empty() {
            let image_name = restored
                .as_ref()
                .map(|s| s.image_id.clone())
                .or_else(|| o.image.clone())
                .unwrap_or_else(|| self.config.default_image.clone());
            st.enter(
                &mut vm,
                "resolve_image",
                format!("Looking up image {image_name}"),
            )
            .await?;
            let image = self.resolve_image(&mut st, &mut vm, &image_name).await?;
            // A restore boots its own snapshot's image, whoever owns that image now.
            if restored.is_none() {
                crate::images::Images::check_usable(&image, vm.owner_uid, o.foreign_ok)?;
            }
            Some(image)
        } else {
            let said = format!("No image: the VM's root is the folder {}", vm.rootfs_dir);
            st.enter(&mut vm, "resolve_image", said).await?;
            None
        };
        let kernel_name = restored
            .as_ref()
            .map(|s| s.kernel.clone())
            .or_else(|| o.kernel.clone())
            .or_else(|| image.as_ref().and_then(|i| i.kernel.clone()))
            .unwrap_or_else(|| self.config.default_kernel.clone());
        let kernel = self.resolve_kernel(&mut st, &mut vm, &kernel_name).await?;
        if restored.is_none() {
            crate::kernels::Kernels::check_usable(&kernel, vm.owner_uid, o.foreign_ok)?;
        }
        vm.kernel = kernel.name.clone();
        if let Some(image) = &image {
            if o.entrypoint {
                // As `docker run IMAGE ARGS`: the arguments replace the image's Cmd.
                let cmd = if o.command.is_empty() {
                    &image.config.cmd
                } else {
                    &o.command
                };
                vm.main = image.config.entrypoint.iter().chain(cmd).cloned().collect();
                if vm.main.is_empty() {
                    return Err(invalid(format!(
                        "Image {} has no Entrypoint or Cmd; give the command to run \
                         (`banger vm run --entrypoint -- CMD`)",
                        image.name
                    )));
                }
            }
            vm.image_id = image.id.clone();
            if vm.disk_size < image.size_bytes {
                vm.disk_size = image.size_bytes;
            }
        }
        // Instant start: a warm snapshot of this shape, when there is one.
        let warm = match &image {
            _ if !self.warm_eligible(&o) => None,
            Some(image) => Some(super::warm::WarmRoot::Image(Box::new(image.clone()))),
            None => Some(super::warm::WarmRoot::Folder {
                init: vm.init.clone(),
            }),
        };
        let mut warm_used = false;
        if let Some(root) = &warm {
            let key = self.warm_key_of(root, &kernel, vm.vcpus, vm.memory_mib);
            if let Some(w) = self.warm_snapshot(&key).await? {
                vm.snapshot = w.id;
                warm_used = true;
            }
        }

        // Phase 2: reserve, the only global critical section.
        st.enter(&mut vm, "reserve", "Reserving name, address and vsock CID")
            .await?;
        let (_, pool) = self.config.address_pool()?;
        let row = vm.clone();
        let max_owned = self.config.max_vms_per_user;
        let got = self
            .store
            .call(move |c| rows::reserve_vm(c, &row, &pool, max_owned))
            .await?
            .ok_or_else(|| taken(&vm.name))?;
        vm.guest_address = got.address;
        vm.vsock_cid = got.cid;
        st.saved = true;
        self.events.send(ObjectEvent::VmAdded(vm.clone()));
        if vm.expires_at != 0 {
            self.lifetime_changed();
        }
        ctx.log(
            6,
            format!(
                "Reserved {} (CID {}, {}, {})",
                vm.name, vm.vsock_cid, vm.guest_address, vm.mac_address
            ),
        );
        if let Some(key) = &o.ssh_key {
            // Installed on the work disk by the first start, whenever that comes.
            let dir = self.vm_dir(&vm.id);
            std::fs::create_dir_all(&dir)
                .and_then(|_| std::fs::write(dir.join(PENDING_KEY), format!("{}\n", key.trim())))
                .map_err(|e| failed("Cannot keep the SSH key for the first start", e))?;
        }
        let (id, timeout) = (vm.id.clone(), o.timeout_sec);
        if !o.start {
            return self.arm_lifetime(&id, timeout).await;
        }
        // Phase 3: start, under the VM's own lock.
        let (vcpus, memory) = (vm.vcpus, vm.memory_mib);
        self.start_locked(&mut st, vm).await?;
        self.arm_lifetime(&id, timeout).await?;
        if let (Some(root), false) = (warm, warm_used) {
            self.warm_later(root, &kernel, vcpus, memory).await;
        }
        Ok(())
    }

    /// The snapshot a create restores, checked against the options, which take its shape.
    async fn restorable(&self, key: &str, o: &mut CreateOptions) -> Result<crate::model::Snapshot> {
        let snap = self.snapshot(key).await?;
        if snap.vmm != self.vmm.name() {
            return Err(super::snapshot::refused(format!(
                "Snapshot {} was taken on {} and restores only there, but this daemon runs VMs \
                 on {}; set vmm = \"{}\" in the configuration, or snapshot a VM of this host",
                snap.name,
                snap.vmm,
                self.vmm.name(),
                snap.vmm
            )));
        }
        for (what, given, theirs) in [
            ("vcpus", o.vcpus, snap.vcpus),
            ("memory_mib", o.memory_mib, snap.memory_mib),
        ] {
            if given != 0 && given != theirs {
                let what = super::option_named(what);
                return Err(super::snapshot::refused(format!(
                    "{what}: snapshot {} was taken with {theirs}, and a restore must use the \
                     same; leave {what} out",
                    snap.name
                )));
            }
        }
        // A damaged snapshot is refused before anything is reserved (and checked again
        // when the VM restores).
        let (dir, s2) = (self.snapshot_dir(&snap.id), snap.clone());
        crate::jobs::spawn_blocking(move || snapshot::verified_memory(&dir, &s2))
            .await
            .map_err(|e| failed("Snapshot task failed", e))??;
        o.vcpus = snap.vcpus;
        o.memory_mib = snap.memory_mib;
        o.disk_size = Some(snap.disk_size);
        Ok(snap)
    }

    async fn resolve_image(&self, st: &mut Stages<'_>, vm: &mut Vm, name: &str) -> Result<Image> {
        match self.images.get(name).await {
            Ok(i) => return Ok(i),
            Err(Error::Image(ImageError::NotFound(_)))
                if self.config.auto_pull_image && name == self.config.default_image => {}
            Err(e @ Error::Image(ImageError::NotFound(_))) if !self.images.pullable(name) => {
                return Err(e)
            }
            Err(Error::Image(ImageError::NotFound(_))) if !self.config.auto_pull_image => {
                return Err(ImageError::Unavailable(format!(
                    "No image {name:?} and auto_pull_image is off; pull it first \
                     (`banger image pull {name}`)"
                ))
                .into())
            }
            Err(Error::Image(ImageError::NotFound(_))) => {
                return self.pull_image_for(st, vm, name).await
            }
            Err(e) => return Err(e),
        }
        let job = self
            .images
            .build(vm.owner_uid, name, Default::default())
            .await?;
        st.enter(
            vm,
            "auto_pull_image",
            format!("Building the default image {name} (job {})", job.id),
        )
        .await?;
        let built = job.wait().await;
        // A parallel create may have built it first; what matters is that it exists now.
        match (self.images.get(name).await, built) {
            (Ok(i), _) => Ok(i),
            (Err(_), Err(e)) => Err(e),
            (Err(e), Ok(())) => Err(e),
        }
    }

    /// An image by reference (a catalog entry or an OCI reference): the one pulled from it
    /// already, else pulled now, sharing the pull another create of it started.
    async fn pull_image_for(
        &self,
        st: &mut Stages<'_>,
        vm: &mut Vm,
        reference: &str,
    ) -> Result<Image> {
        if let Some(i) = self.images.pulled(vm.owner_uid, reference).await? {
            return Ok(i);
        }
        // A short name that is no image here is a registry reference: say which one, so a
        // typo shows as `docker.io/library/typo:latest` rather than as a pull of "typo".
        let resolved = match self.config.image_entry(reference) {
            Some(_) => None,
            None => crate::oci::reference::parse(reference)
                .ok()
                .map(|r| r.whole())
                .filter(|whole| whole != reference),
        };
        let job = self.images.pull_shared(vm.owner_uid, reference).await?;
        let what = match &resolved {
            Some(whole) => format!("No image named {reference:?}: pulling {whole}"),
            None => format!("Pulling image {reference}"),
        };
        st.enter(vm, "auto_pull_image", format!("{what} (job {})", job.id))
            .await?;
        let pulled = job.wait().await;
        match (self.images.pulled(vm.owner_uid, reference).await?, pulled) {
            (Some(i), _) => Ok(i),
            (None, Err(e)) => Err(match resolved {
                Some(whole) => ImageError::Unavailable(format!(
                    "No image named {reference:?}, and pulling it as {whole} failed: {}. \
                     `banger image list` shows the images there are",
                    e.full_message()
                ))
                .into(),
                None => e,
            }),
            (None, Ok(())) => Err(ImageError::Gone(format!(
                "The pull of {reference} finished but left no image of it"
            ))
            .into()),
        }
    }

    async fn resolve_kernel(&self, st: &mut Stages<'_>, vm: &mut Vm, name: &str) -> Result<Kernel> {
        match self.kernels.get(name).await {
            Ok(k) => return Ok(k),
            Err(Error::Kernel(KernelError::NotFound(_))) => {}
            Err(e) => return Err(e),
        }
        let in_catalog = self.kernels.in_catalog(name);
        if !in_catalog || !self.config.auto_pull_kernel {
            return Err(KernelError::Unavailable(format!(
                "No kernel {name:?} installed{}; `banger kernel list --available` shows what \
                 can be pulled, `banger kernel import` adds your own",
                if in_catalog {
                    " and auto_pull_kernel is off"
                } else {
                    " or in the catalog"
                }
            ))
            .into());
        }
        let job = match self.kernels.pull(vm.owner_uid, name).await {
            Ok(j) => Some(j),
            Err(Error::Kernel(KernelError::NameTaken(_))) => None,
            Err(e) => return Err(e),
        };
        if let Some(job) = job {
            st.enter(
                vm,
                "auto_pull_kernel",
                format!("Pulling kernel {name} from the catalog (job {})", job.id),
            )
            .await?;
            let pulled = job.wait().await;
            if let (Err(e), Err(_)) = (&pulled, self.kernels.get(name).await) {
                return Err(failed(format!("Cannot pull kernel {name}"), e.to_string()));
            }
        }
        self.kernels.get(name).await
    }

    /// Phase 3 under the VM's lock; on failure the VM is `failed`, its processes gone.
    pub(super) async fn start_locked(&self, st: &mut Stages<'_>, mut vm: Vm) -> Result<()> {
        let held = self.lock_of(&vm.id).lock_owned().await;
        // Deleted, or started by someone else, while this waited for the lock: nothing starts.
        super::state::check(&self.get(&vm.id).await?, super::state::VmOp::Start)?;
        // Over the owner's running quota nothing has started: the VM stays as it was.
        self.enter_starting(&mut vm).await?;
        // Cancel drops this future; the guard still cleans up, and holds the lock until then.
        let mut guard = FailGuard {
            vms: self.clone(),
            vm: Some(vm.clone()),
            held: Some(held),
        };
        let r = self.start_phase(st, &mut vm).await;
        guard.vm = None;
        match r {
            Ok(()) => Ok(()),
            Err(e) => {
                let stage = vm.stage.clone();
                self.fail(&mut vm).await;
                // The job's error is public (every local user can read it): the guest's
                // console is not. Its owner reads it with `banger vm logs` (the CLI prints
                // the tail itself when a create fails).
                let msg = format!(
                    "VM {} failed at stage {stage}; `banger vm logs {}` shows its console",
                    vm.name, vm.name
                );
                Err(failed(msg, e))
            }
        }
    }

    /// The initrd the VM boots with: the kernel's, with this banger's init and agent appended
    /// when banger built it (`kernels::initrd::current`: one file per kernel that every VM
    /// maps, so kernels imported by an older banger boot with the init the rest of this
    /// banger expects); for a kernel without one (every driver built in), banger's own
    /// without modules.
    pub(super) async fn current_initrd(
        &self,
        kernel: &crate::model::Kernel,
    ) -> Result<crate::kernels::initrd::Current> {
        let initrd = kernel.initrd_path.clone();
        let dir = kernel.dir().unwrap_or(std::path::Path::new(".")).to_owned();
        let (init, agent) = self.config.initrd_binaries();
        crate::jobs::spawn_blocking(move || {
            crate::kernels::initrd::current(&dir, initrd.as_deref(), &init, &agent)
        })
        .await
        .map_err(|e| failed("Initrd task failed", e))?
    }

    /// Starts the VM's port forwarder (`banger-vm-helper port-forward`, a helper as the VM's
    /// uid) and waits until it listens on every published port.
    pub(super) async fn start_forwarder(
        &self,
        vm: &Vm,
        jail: &crate::vmm::jail::Jail,
    ) -> Result<()> {
        use crate::vmm::process;
        let run = self.layout.vm_runtime_dir(&vm.id);
        let (pidfile, log) = (run.join(FORWARD_PID), run.join("port-forward.log"));
        process::terminate(&pidfile, &run.to_string_lossy(), Duration::from_secs(2)).await;
        let bin = process::helper_program()?;
        let vsock = self.vmm.vsock_socket(&run);
        let mut args: Vec<std::ffi::OsString> =
            vec![publish::FORWARD_ARG.into(), vsock.into_os_string()];
        args.extend(vm.publish.iter().map(|p| p.into()));
        let argv: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
        // The one VM process that reaches the host's network: it listens there.
        let jail = crate::vmm::jail::Jail {
            offline: false,
            ..jail.clone()
        };
        process::spawn_detached(&process::Detached {
            pidfile: &pidfile,
            unit: &crate::vmm::scope::helper_unit(&vm.id, "publish"),
            program: &bin,
            args: &argv,
            log: &log,
            output: None,
            limits: process::UnitLimits {
                memory_max: 64 << 20,
                tasks_max: 256,
                huge_pages: true,
            },
            writable: &[run.as_path()],
            jail: &jail,
            tap: None,
            tap_netns: None,
            listen: None,
            ram: None,
        })
        .await?;
        // Ready once it says it listens; an exit first is a failure with its words.
        let marker = run.to_string_lossy();
        let ready = "port-forward: listening";
        process::wait_for_log(&pidfile, &marker, &log, ready, Duration::from_secs(10))
            .await
            .map_err(|said| failed("Cannot publish the VM's ports", std::io::Error::other(said)))
    }

    /// Waits until the guest agent answers a health request; returns its answer.
    pub(super) async fn wait_agent(&self, run: &std::path::Path) -> Result<crate::agent::Health> {
        let sock = self.vmm.vsock_socket(run);
        self.wait_guest(run, "its agent", "The guest agent", || async {
            // The link's own answer first (it waits for the agent's HELLO): no request.
            let quick = crate::agent::client::health_at_once(&sock)
                .await
                .map_err(|e| e.full_message())?;
            let h = match quick {
                Some(h) => h,
                None => {
                    let mut s = crate::agent::client::connect(&sock, crate::agent::PORT)
                        .await
                        .map_err(|e| e.full_message())?;
                    crate::agent::client::health(&mut s)
                        .await
                        .map_err(|e| e.full_message())?
                }
            };
            tracing::debug!(?h, "Agent answered");
            Ok(h)
        })
        .await
    }

    /// Connects to the guest agent, waiting for it as [`Self::wait_agent`] does, and asks
    /// nothing yet.
    pub(super) async fn reach_agent(
        &self,
        run: &std::path::Path,
    ) -> Result<tokio::net::UnixStream> {
        let sock = self.vmm.vsock_socket(run);
        self.wait_guest(run, "its agent", "The guest agent", || async {
            crate::agent::client::connect(&sock, crate::agent::PORT)
                .await
                .map_err(|e| e.full_message())
        })
        .await
    }

    /// Reaches a restored guest's agent with its own identity (see `agent::identity`) sent
    /// behind the connection's `CONNECT` line, as [`Self::reach_agent`] waits for it: the
    /// guest takes both in one go (each round trip costs a TCG guest whose translations are
    /// all cold tens of ms). Returns the connection once the agent is reached; the answer is
    /// [`Self::identity_taken`]'s to read.
    pub(super) async fn reach_with_identity(
        &self,
        vm: &Vm,
        run: &std::path::Path,
        lease: &crate::net::GuestNet,
        (private, public): (&[u8], &str),
        key: Option<&str>,
        stop_page_reporting: bool,
    ) -> Result<tokio::net::UnixStream> {
        let mut seed = [0u8; 32];
        // SAFETY: the pointer and length describe `seed`.
        if unsafe { libc::getrandom(seed.as_mut_ptr().cast(), seed.len(), 0) } != 32 {
            return Err(failed(
                "Cannot draw a seed for the guest",
                std::io::Error::last_os_error(),
            ));
        }
        let id = crate::agent::Identity {
            hostname: hostname_for(&vm.name),
            // The lease's: a VM on a namespace's eth0 takes that eth0's MAC.
            mac: lease.mac.clone(),
            address: format!("{}/{}", lease.address, lease.prefix),
            gateway: lease.gateway.map(|g| g.to_string()).unwrap_or_default(),
            dns: lease.dns.iter().map(|a| a.to_string()).collect(),
            machine_id: format!("{}{}", crate::model::new_id(), crate::model::new_id()),
            host_key: String::from_utf8_lossy(private).into_owned(),
            host_key_pub: public.to_owned(),
            authorized_key: key.unwrap_or_default().trim().to_owned(),
            seed: crate::model::hex(&seed),
            time_ns: 0,
            stop_page_reporting,
        };
        let sock = self.vmm.vsock_socket(run);
        self.wait_guest(run, "its agent", "The guest agent", || {
            // The host's time as each try leaves: the guest's clock is stepped to it.
            let id = crate::agent::Identity {
                time_ns: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(0),
                ..id.clone()
            };
            let sock = &sock;
            async move {
                let line = crate::agent::client::request_line(&crate::agent::Request::Identity(
                    Box::new(id),
                ))
                .map_err(|e| e.full_message())?;
                crate::agent::client::connect_sending(sock, crate::agent::PORT, &line)
                    .await
                    .map_err(|e| e.full_message())
            }
        })
        .await
    }

    /// The agent's answer to the identity [`Self::reach_with_identity`] sent on `agent`: once
    /// the guest applied it, the health the agent answers with, and the VM's SSH host key is
    /// `public`.
    pub(super) async fn identity_taken(
        &self,
        vm: &mut Vm,
        mut agent: tokio::net::UnixStream,
        public: &str,
    ) -> Result<crate::agent::Health> {
        let health = tokio::time::timeout(
            Duration::from_secs(30),
            crate::agent::client::identity_reply(&mut agent),
        )
        .await
        .map_err(|_| {
            failed(
                "The guest agent did not take its identity within 30 s",
                std::io::Error::other("timeout"),
            )
        })??;
        vm.ssh_host_key = public.trim().to_owned();
        match health {
            Some(h) => Ok(h),
            // The agent of a snapshot older than this banger answers with nothing.
            None => {
                let mut s = self.open_agent_any(vm).await?;
                crate::agent::client::health(&mut s).await
            }
        }
    }

    /// Retries `attempt` (each try bounded to 5 s, tries at least 250 ms apart) until it
    /// succeeds (its value is returned), the VMM exits, or `boot_timeout_sec` passes; the
    /// errors name `what` and the last failure.
    async fn wait_guest<T, F, Fut>(
        &self,
        run: &std::path::Path,
        what: &str,
        what_capitalised: &str,
        mut attempt: F,
    ) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, String>>,
    {
        let deadline =
            tokio::time::Instant::now() + Duration::from_secs(self.config.boot_timeout_sec);
        let mut last = String::new();
        loop {
            if !self.vmm.running(run) {
                return Err(failed(
                    format!("The VM stopped before {what} answered"),
                    std::io::Error::other(last),
                ));
            }
            let tried = tokio::time::Instant::now();
            match tokio::time::timeout(Duration::from_secs(5), attempt()).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) => last = e,
                Err(_) => last = "no answer within 5 s".into(),
            }
            if tokio::time::Instant::now() > deadline {
                return Err(failed(
                    format!(
                        "{what_capitalised} did not answer within {} s (boot_timeout_sec)",
                        self.config.boot_timeout_sec
                    ),
                    std::io::Error::other(last),
                ));
            }
            // An attempt that waited for the guest (the agent link holds a connection until
            // the agent says it is there) is tried again at once; one refused at once waits.
            tokio::time::sleep_until(tried + Duration::from_millis(250)).await;
        }
    }

    /// Whether the guest has an SSH server to wait for (asked through the agent).
    pub(super) async fn guest_has_sshd(&self, vm: &Vm) -> bool {
        let ask = self.run_quietly(
            vm,
            &["/bin/sh", "-c", "command -v sshd || test -x /usr/sbin/sshd"],
        );
        matches!(
            tokio::time::timeout(Duration::from_secs(30), ask).await,
            Ok(Ok(0))
        )
    }

    /// Runs `argv` in the guest through its agent, as root in `/` (whatever user and directory
    /// the image names), its output dropped; its exit status.
    pub(super) async fn run_quietly(&self, vm: &Vm, argv: &[&str]) -> Result<i32> {
        let s = self.open_agent_any(vm).await?;
        let what = crate::agent::ExecRequest {
            cwd: Some("/".into()),
            user: Some("root".into()),
            ..crate::agent::ExecRequest::new(argv.iter().map(|a| a.to_string()).collect())
        };
        crate::agent::client::exec(
            s,
            what,
            tokio::io::empty(),
            tokio::io::sink(),
            tokio::io::sink(),
        )
        .await
    }

    /// Waits until `addr` in the guest accepts a connection (and, for sshd, sends its banner).
    pub(super) async fn wait_port(
        &self,
        run: &std::path::Path,
        addr: &str,
        ssh: bool,
    ) -> Result<()> {
        use tokio::io::AsyncReadExt;
        self.wait_guest(run, addr, addr, || async {
            let mut s = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| e.to_string())?;
            if !ssh {
                return Ok(());
            }
            let mut buf = [0u8; 64];
            let n = s.read(&mut buf).await.map_err(|e| e.to_string())?;
            if buf[..n].starts_with(b"SSH-") {
                Ok(())
            } else {
                Err("the answer was not an SSH banner".into())
            }
        })
        .await
    }

    /// The last `n` lines of the VM's console log (read from its tail only).
    pub fn console_tail(&self, id: &str, n: usize) -> String {
        crate::vmm::console::tail_lines(&self.console_log(id), n)
    }

    /// Marks the VM failed and releases its running resources (disks stay for a retry).
    pub(super) async fn fail(&self, vm: &mut Vm) {
        let _ = self.power_down(vm).await;
        vm.state = VmState::Failed;
        if let Err(e) = self.save(vm).await {
            tracing::error!(vm_id = %vm.id, "Cannot record the failure: {e}");
        }
        self.release_network_if_idle().await;
    }
}

/// Awaits `f`, one of a start's preparations, and logs when it was done (debug level).
pub(super) async fn timed<T>(
    vm_id: &str,
    what: &str,
    t0: std::time::Instant,
    f: impl std::future::Future<Output = T>,
) -> T {
    let r = f.await;
    tracing::debug!(vm_id, "{what} prepared after {:?}", t0.elapsed());
    r
}

/// The caller's public key between `CreateVM` and the first start, in the VM's directory.
pub(super) const PENDING_KEY: &str = "authorized_key.pending";

/// The guest's host name: the VM's name with what a host name cannot hold turned into `-`.
pub(super) fn hostname_for(name: &str) -> String {
    let h: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(63)
        .collect();
    h.trim_matches('-').to_owned()
}

/// A new ed25519 host key for VM `name`: its private half (OpenSSH form) and public line.
pub(super) fn new_host_key(name: &str) -> Result<(Vec<u8>, String)> {
    let tmp = tempfile::tempdir().map_err(|e| failed("Cannot make a host key", e))?;
    let path = tmp.path().join("key");
    crate::host::run(
        "ssh-keygen",
        [
            "-q".as_ref(),
            "-t".as_ref(),
            "ed25519".as_ref(),
            "-N".as_ref(),
            "".as_ref(),
            "-C".as_ref(),
            format!("banger-{name}").as_ref(),
            "-f".as_ref(),
            path.as_os_str(),
        ],
    )?;
    let private = std::fs::read(&path).map_err(|e| failed("Cannot read the host key", e))?;
    let public = std::fs::read_to_string(path.with_extension("pub"))
        .map_err(|e| failed("Cannot read the host key", e))?;
    Ok((private, public))
}

/// What a `seed-work` worker is asked.
#[derive(serde::Serialize, serde::Deserialize)]
struct SeedWork {
    /// The new host key: its private half and public line.
    host_key: Option<(Vec<u8>, String)>,
    /// The caller's public key.
    key: Option<String>,
    /// The main process's arguments.
    main: Vec<String>,
}

/// [`seed_work`] on `work`, a disk the guest has written (a VM that ran before), in a worker
/// (see [`crate::worker`]): the disk is handed to the worker's uid for the call and taken back
/// through the descriptor root holds, so debugfs never parses a guest's filesystem as root.
/// `hide` are banger's roots, `scratch_in` where the worker's staging directory goes.
pub(super) fn seed_work_in_worker(
    work: &std::path::Path,
    hide: &[std::path::PathBuf],
    scratch_in: &std::path::Path,
    host_key: Option<(Vec<u8>, String)>,
    key: Option<&str>,
    main: &[String],
) -> Result<Option<String>> {
    use std::os::fd::AsRawFd;
    let public = host_key.as_ref().map(|(_, p)| p.trim().to_owned());
    if host_key.is_none() && key.is_none() && main.is_empty() {
        return Ok(public);
    }
    if crate::worker::in_process() {
        return seed_work(work, host_key, key, main);
    }
    let uid = crate::worker::next_uid();
    let fail = |what: &str, e: std::io::Error| failed(format!("Cannot {what} the work disk"), e);
    let disk = crate::host::openat(
        libc::AT_FDCWD,
        work,
        libc::O_RDWR | libc::O_NOFOLLOW | libc::O_NOCTTY | libc::O_NONBLOCK,
    )
    .map_err(|e| fail("open", e))?;
    let st = crate::host::fstat(&disk).map_err(|e| fail("inspect", e))?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(invalid(format!("{} is not a disk image", work.display())));
    }
    let chown = |u: u32, g: u32| {
        // SAFETY: fchown on a descriptor we own.
        match unsafe { libc::fchown(disk.as_raw_fd(), u, g) } {
            0 => Ok(()),
            _ => Err(std::io::Error::last_os_error()),
        }
    };
    // debugfs stages what it writes in a directory of the worker's own.
    let scratch = tempfile::Builder::new()
        .prefix(".work-")
        .tempdir_in(scratch_in)
        .map_err(|e| fail("stage files for", e))?;
    std::os::unix::fs::lchown(scratch.path(), Some(uid), Some(uid))
        .map_err(|e| fail("stage files for", e))?;
    let scratch_fd = crate::host::openat(
        libc::AT_FDCWD,
        scratch.path(),
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
    )
    .map_err(|e| fail("stage files for", e))?;
    chown(uid, uid).map_err(|e| fail("hand over", e))?;
    let request = serde_json::to_value(SeedWork {
        host_key,
        key: key.map(str::to_owned),
        main: main.to_vec(),
    })
    .map_err(|e| failed("Cannot encode", e))?;
    let spec = crate::worker::Spec {
        kind: "seed-work",
        uid,
        request: &request,
        hide: hide.to_vec(),
        fds: vec![disk.try_clone().map_err(|e| fail("open", e))?, scratch_fd],
    };
    let ran = crate::worker::run(&spec, &crate::worker::Quiet);
    chown(0, 0).map_err(|e| fail("take back", e))?;
    ran?;
    Ok(public)
}

/// A `seed-work` worker's work: [`seed_work`] on its fd 3, staging in its fd 4.
pub(crate) fn seed_work_in_a_worker(
    request: &[u8],
    _: &dyn crate::worker::Report,
) -> Result<serde_json::Value> {
    let r: SeedWork = serde_json::from_slice(request)
        .map_err(|e| invalid(format!("A seed-work worker's request is not one: {e}")))?;
    std::env::set_var("TMPDIR", crate::worker::fd_path(1));
    seed_work(
        &crate::worker::fd_path(0),
        r.host_key,
        r.key.as_deref(),
        &r.main,
    )?;
    Ok(serde_json::Value::Null)
}

/// Gives a work disk what its first start needs, in one write: a new host key for the VM
/// when one is given (its private half at `/root/.banger/`, where banger-init installs it into
/// `/etc/ssh`), the caller's public key appended to `/root/.ssh/authorized_keys`, and the main
/// process's arguments for banger-init (`/.banger/main.json`, the guest's
/// `/root/.banger/main.json`; banger-init reads it only when told to run one). Returns the
/// new host key's public half.
fn seed_work(
    work: &std::path::Path,
    host_key: Option<(Vec<u8>, String)>,
    key: Option<&str>,
    main: &[String],
) -> Result<Option<String>> {
    use crate::ext4::Put;
    let fresh = host_key.is_some();
    let (private, public) = host_key.unwrap_or_default();
    let mut authorized = Vec::new();
    if let Some(k) = key {
        authorized = crate::ext4::read_file(work, "/.ssh/authorized_keys")?.unwrap_or_default();
        let line = k.trim();
        if !String::from_utf8_lossy(&authorized)
            .lines()
            .any(|l| l.trim() == line)
        {
            if !authorized.is_empty() && !authorized.ends_with(b"\n") {
                authorized.push(b'\n');
            }
            authorized.extend_from_slice(line.as_bytes());
            authorized.push(b'\n');
        }
    }
    let main_text = serde_json::to_vec(main).map_err(|e| failed("Cannot encode", e))?;
    let mut files = Vec::new();
    if fresh {
        files.push(Put {
            path: "/.banger/ssh_host_ed25519_key",
            data: &private,
            mode: 0o600,
        });
        files.push(Put {
            path: "/.banger/ssh_host_ed25519_key.pub",
            data: public.as_bytes(),
            mode: 0o644,
        });
    }
    if key.is_some() {
        files.push(Put {
            path: "/.ssh/authorized_keys",
            data: &authorized,
            mode: 0o600,
        });
    }
    if !main.is_empty() {
        files.push(Put {
            path: MAIN_FILE,
            data: &main_text,
            mode: 0o600,
        });
    }
    if !files.is_empty() {
        crate::ext4::put_files(work, &files)?;
    }
    Ok(fresh.then(|| public.trim().to_owned()))
}

/// The port forwarder's pid file in a VM's runtime directory.
pub const FORWARD_PID: &str = "port-forward.pid";

/// Where the main process's arguments are on the work disk.
pub const MAIN_FILE: &str = "/.banger/main.json";

fn taken(name: &str) -> Error {
    VmError::NameTaken(name.to_owned()).into()
}

/// The work disk: a sparse copy of the image's seed, or an empty ext4 when it has none.
pub(super) fn make_work_disk(seed: Option<&std::path::Path>, out: &std::path::Path) -> Result<()> {
    let tmp = out.with_extension("ext4.tmp");
    let _ = std::fs::remove_file(&tmp);
    match seed {
        Some(seed) => crate::host::run(
            "cp",
            [
                "--sparse=always".as_ref(),
                "--reflink=auto".as_ref(),
                seed.as_os_str(),
                tmp.as_os_str(),
            ],
        )?,
        None => {
            let f = std::fs::File::create(&tmp)
                .map_err(|e| failed("Cannot create the work disk", e))?;
            f.set_len(1 << 30)
                .map_err(|e| failed("Cannot size the work disk", e))?;
            crate::host::run(
                "mkfs.ext4",
                [
                    "-q".as_ref(),
                    "-F".as_ref(),
                    "-L".as_ref(),
                    "work".as_ref(),
                    "-E".as_ref(),
                    "root_owner=0:0".as_ref(),
                    tmp.as_os_str(),
                ],
            )?
        }
    }
    std::fs::rename(&tmp, out).map_err(|e| failed("Cannot install the work disk", e))
}

/// Marks the VM failed if the start future is dropped (a canceled job) before it finished.
struct FailGuard {
    vms: Vms,
    vm: Option<Vm>,
    /// The VM's lock, released only once the cleanup is done.
    held: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Drop for FailGuard {
    fn drop(&mut self) {
        if let Some(mut vm) = self.vm.take() {
            let (vms, held) = (self.vms.clone(), self.held.take());
            tokio::spawn(async move {
                vms.fail(&mut vm).await;
                drop(held);
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_are_local_unicast_and_follow_the_id() {
        assert_eq!(mac_for("0123456789abcdef"), "02:01:23:45:67:89");
    }
}
