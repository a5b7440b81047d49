//! Warm snapshots: instant starts by default. After a VM of some shape (image, kernel, vCPUs,
//! memory) booted cold, or on `banger image warm`, banger boots a template VM of its own of that
//! shape (root's, named `.warm-…`, which no user can name: it holds no one's key, folder or
//! data), snapshots it once it is ready and its own boot is done (`settle`) and deletes it.
//! Later creates of that shape that ask for nothing a snapshot cannot give (shares, an init, an
//! entrypoint, a disk size, `cold`) restore from that snapshot and get their own identity, as
//! any restore does.
//!
//! The key covers what the guest's memory depends on: the image's id, the kernel's name and
//! install time, the shape, banger's version and guest binaries, the snapshot's format, the
//! VMM's version (a saved state loads into the VMM that saved it) and the operator's kernel
//! arguments (`guest_kernel_args`).
//! Any change makes a new key, so a stale warm snapshot is never used; it stays while VMs
//! layer on it and goes once none do (`sweep_warm`).
//!
//! A template VM has no balloon, so its snapshot keeps the guest's memory as a file that every
//! warm start maps copy-on-write (see `vmm::ram`): VMs started warm share the template's pages
//! until they write them, and do not hand freed memory back (a cold boot does).
//!
//! VMs whose root is a folder (virtio-fs; containerd's bundles) start warm too where the VMM
//! can save a virtio-fs device (`Vmm::saves_folder_roots`: QEMU 8.2 and later, which moves
//! virtiofsd's state in its stream). Their template is one per kernel, shape and init, booted
//! with an empty folder of root's and parked before it mounts it (`banger.park=1`, see
//! `banger_guest::guestinit::park`); a restore serves the VM's own folder to it, and asks the
//! guest to mount it and go on booting before it takes its identity. Such a VM's memory is a
//! copy of its own (its folder's server maps it), so it forgets the snapshot once restored.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

use super::error::invalid;
use super::snapshot::SnapshotOptions;
use super::{CreateOptions, Vms};
use crate::auth::Action;
use crate::jobs::{Job, JobContext, JobSpec};
use crate::model::{Image, Kernel, Snapshot};
use crate::store::rows;
use crate::Result;

/// How long a template's own boot may take to finish after its agent answered.
const SETTLE: std::time::Duration = std::time::Duration::from_secs(60);

/// Warm snapshots being made, by key.
#[derive(Default)]
pub(super) struct Warming(Mutex<HashSet<String>>);

/// Whether `vm` is a template VM of banger's own (root's, named `.warm-…`).
pub(super) fn is_template(vm: &crate::model::Vm) -> bool {
    vm.owner_uid == 0 && vm.name.starts_with(".warm-")
}

/// What a warm snapshot holds the root of: an image's, or none yet (a template of folder
/// roots, parked before it mounts one; see `banger_guest::guestinit::park`).
#[derive(Clone)]
pub(super) enum WarmRoot {
    /// An image's root disk.
    Image(Box<Image>),
    /// A root folder, given at the restore; the VMs' init (`""` or `banger`).
    Folder {
        /// The init the VMs ask for.
        init: String,
    },
}

impl WarmRoot {
    /// What the key and the log call it.
    fn named(&self) -> String {
        match self {
            WarmRoot::Image(i) => format!("image {}", i.name),
            WarmRoot::Folder { .. } => "folder roots".into(),
        }
    }
}

/// The empty folder a template of folder roots boots with (in the state directory, root's),
/// whose server it never mounts.
pub(super) const TEMPLATE_ROOT: &str = "warm-root";

impl Vms {
    /// The key of the warm snapshot that serves this shape.
    pub(super) fn warm_key(
        &self,
        image: &Image,
        kernel: &Kernel,
        vcpus: u32,
        memory: u32,
    ) -> String {
        self.key_of(&image.id, kernel, vcpus, memory)
    }

    /// The key of the warm snapshot that serves VMs of this shape whose root is a folder
    /// (with `init`).
    pub(super) fn warm_folder_key(
        &self,
        kernel: &Kernel,
        vcpus: u32,
        memory: u32,
        init: &str,
    ) -> String {
        self.key_of(&format!("folder:{init}"), kernel, vcpus, memory)
    }

    pub(super) fn warm_key_of(
        &self,
        root: &WarmRoot,
        kernel: &Kernel,
        vcpus: u32,
        memory: u32,
    ) -> String {
        match root {
            WarmRoot::Image(i) => self.warm_key(i, kernel, vcpus, memory),
            WarmRoot::Folder { init } => self.warm_folder_key(kernel, vcpus, memory, init),
        }
    }

    fn key_of(&self, root: &str, kernel: &Kernel, vcpus: u32, memory: u32) -> String {
        use std::os::unix::fs::MetadataExt;
        let stamp = |name: &str| {
            std::fs::metadata(self.config.guest_binary(name))
                .map(|m| format!("{}:{}", m.len(), m.mtime()))
                .unwrap_or_default()
        };
        let text = format!(
            "{}|{}|{}|{}|{vcpus}|{memory}|{}|{}|{}|{}|{}",
            self.vmm.name(),
            root,
            kernel.name,
            kernel.created_at,
            crate::VERSION,
            stamp("banger-init"),
            stamp("banger-agent"),
            // Its memory a file restores map (no balloon: see `vmm::ram`).
            "ram-file",
            // A saved state loads into the VMM that saved it (QEMU's microvm has no
            // versioned machine types): an upgrade makes the snapshot stale.
            self.vmm.version(),
        ) + &self
            .config
            .kernel_args()
            // The kernel booted with them (keys made without any stay as they were).
            .map(|a| format!("|args:{a}"))
            .unwrap_or_default();
        crate::model::hex(&Sha256::digest(text.as_bytes())[..8])
    }

    /// Whether a create with these options may start from a warm snapshot (or, when none
    /// exists yet, lead to one). A root folder may, with banger-init or the folder's own
    /// init, where the VMM can save its server (`Vmm::saves_folder_roots`), also on a
    /// network namespace (a pod's: the template's NIC is then wired to that namespace's eth0
    /// and the identity gives the guest eth0's address and MAC).
    pub(super) fn warm_eligible(&self, o: &CreateOptions) -> bool {
        let root = match &o.rootfs_dir {
            None => o.init.is_empty() && o.netns.is_none(),
            Some(_) => {
                (o.init.is_empty() || o.init == "banger") && self.vmm.saves_folder_roots().is_ok()
            }
        };
        self.config.warm_snapshots
            && self.vmm.name() == "qemu"
            && o.snapshot.is_none()
            && !o.cold
            && o.shares.is_empty()
            && !o.entrypoint
            && o.disk_size.is_none()
            && root
    }

    /// The warm snapshot serving `key`, if one is there.
    pub(super) async fn warm_snapshot(&self, key: &str) -> Result<Option<Snapshot>> {
        let k = key.to_owned();
        self.store
            .call(move |c| rows::find_warm_snapshot(c, &k))
            .await
    }

    /// Makes the warm snapshot of this shape in the background unless it exists or is
    /// being made.
    pub(super) async fn warm_later(
        &self,
        root: WarmRoot,
        kernel: &Kernel,
        vcpus: u32,
        memory: u32,
    ) {
        let key = self.warm_key_of(&root, kernel, vcpus, memory);
        match self.warm_snapshot(&key).await {
            Ok(None) => {}
            _ => return,
        }
        let _ = self.start_warming(root, kernel.clone(), vcpus, memory, key);
    }

    /// `banger image warm`: makes (or remakes) the warm snapshot of this shape now; the job,
    /// or `None` when it is being made already.
    pub async fn warm(
        &self,
        image: &str,
        kernel: Option<&str>,
        vcpus: u32,
        memory: u32,
    ) -> Result<Option<Arc<Job>>> {
        if self.vmm.name() != "qemu" {
            return Err(invalid(
                "Warm snapshots are made on the qemu VMM only (Firecracker snapshots are taken \
                 and restored on request, not kept warm); set vmm = \"qemu\" in the configuration",
            ));
        }
        super::bounds::VmLimits::of(&self.config).check(vcpus, memory, None)?;
        let image = self.images.get(image).await?;
        let kernel_name = kernel
            .map(str::to_owned)
            .or_else(|| image.kernel.clone())
            .unwrap_or_else(|| self.config.default_kernel.clone());
        let kernel = self.kernels.get(&kernel_name).await?;
        let key = self.warm_key(&image, &kernel, vcpus, memory);
        Ok(self.start_warming(WarmRoot::Image(Box::new(image)), kernel, vcpus, memory, key))
    }

    fn start_warming(
        &self,
        root: WarmRoot,
        kernel: Kernel,
        vcpus: u32,
        memory: u32,
        key: String,
    ) -> Option<Arc<Job>> {
        if !self
            .warming
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.clone())
        {
            return None;
        }
        let spec = JobSpec {
            kind: "warm-image".into(),
            target: match &root {
                WarmRoot::Image(i) => i.name.clone(),
                WarmRoot::Folder { .. } => "folder roots".into(),
            },
            action: Action::VmsManage,
            owner_uid: 0,
        };
        let this = self.clone();
        Some(self.jobs.spawn(spec, move |ctx| async move {
            let r = this
                .run_warm(&ctx, &root, &kernel, vcpus, memory, &key)
                .await;
            this.warming
                .0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&key);
            r
        }))
    }

    /// Waits, at most [`SETTLE`], until a template's own boot is done: systemd's job queue
    /// empty (`systemctl is-system-running --wait`), the device events it triggered handled
    /// (`udevadm settle`) and udevd's workers gone (it ends idle ones 3 s after its last
    /// event), where the image has them. The agent answers long before: a Debian template was
    /// still starting units, with ten udev workers busy, when it was ready, and every VM
    /// restored from a snapshot taken then finished that boot itself, after it was ready: 0.8
    /// s of host CPU and 35 MiB more of TCG's cache each (a snapshot of a VM that had idled
    /// first: 18 MiB, no such burst). Snapshotted once the events were handled, each restore
    /// still ended the ten idle workers 3 s after it was ready (their exits and udevd's
    /// reaping: some 8000 translations, 4 MiB of TCG's cache each). Whatever the guest
    /// answers, the template is snapshotted after: an image that never settles is still a
    /// template.
    async fn settle(&self, vm: &crate::model::Vm) {
        // Workers are `(udev-worker)` since systemd 251, `systemd-udevd` like udevd before.
        const SCRIPT: &str = "if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; \
             then systemctl is-system-running --wait >/dev/null 2>&1; fi; \
             if command -v udevadm >/dev/null; then udevadm settle -t 30 >/dev/null 2>&1; \
             i=0; while [ $i -lt 100 ] && [ \"$(cat /proc/[0-9]*/comm 2>/dev/null | \
             grep -c -e '^(udev-worker)$' -e '^systemd-udevd$')\" -gt 1 ]; \
             do sleep 0.1; i=$((i+1)); done; fi; true";
        let ask = self.run_quietly(vm, &["/bin/sh", "-c", SCRIPT]);
        if tokio::time::timeout(SETTLE, ask).await.is_err() {
            tracing::info!(
                vm_id = %vm.id,
                "The template's boot did not finish within {} s; snapshotting it as it is",
                SETTLE.as_secs()
            );
        }
    }

    async fn run_warm(
        &self,
        ctx: &JobContext,
        root: &WarmRoot,
        kernel: &Kernel,
        vcpus: u32,
        memory: u32,
        key: &str,
    ) -> Result<()> {
        let name = format!(".warm-{key}");
        ctx.stage(
            "template",
            format!(
                "Booting a template VM of {} ({vcpus} vCPU, {memory} MiB)",
                root.named()
            ),
        );
        let mut o = CreateOptions {
            kernel: Some(kernel.name.clone()),
            vcpus,
            memory_mib: memory,
            cold: true,
            // A member's own image too: only creates its owner (or an administrator) may
            // make ever reach its warm snapshot, each checked as it is made.
            foreign_ok: true,
            ..Default::default()
        };
        match root {
            WarmRoot::Image(image) => o.image = Some(image.id.clone()),
            WarmRoot::Folder { init } => {
                // Parked before it mounts its root (see `start::boot_spec`), so the folder
                // it boots with is an empty one of root's that its restores replace.
                let dir = self.layout.state_dir.join(TEMPLATE_ROOT);
                std::fs::create_dir_all(&dir).map_err(|e| {
                    super::error::failed("Cannot make the template's root folder", e)
                })?;
                o.rootfs_dir = Some(dir.to_string_lossy().into_owned());
                o.init = init.clone();
            }
        }
        // Whatever happens, the template goes.
        let (vm, job) = self.create(0, &name, o).await?;
        let booted = job.wait().await;
        let made = match booted {
            Ok(()) => {
                if matches!(root, WarmRoot::Image(_)) {
                    ctx.stage("settle", "Waiting for the template's own boot to finish");
                    self.settle(&vm).await;
                }
                ctx.stage("snapshot", "Snapshotting the template at ready");
                // A remake sits beside the snapshot it replaces, which the sweep below
                // removes (or, while restored VMs map it, the sweep after they went).
                let taken: std::collections::HashSet<String> = self
                    .snapshots()
                    .await?
                    .into_iter()
                    .map(|s| s.name)
                    .collect();
                let snap_name = std::iter::once(name.clone())
                    .chain((2..).map(|n| format!("{name}-{n}")))
                    .find(|n| !taken.contains(n))
                    .unwrap_or_else(|| name.clone());
                self.run_snapshot(
                    ctx.clone(),
                    &vm.id,
                    &snap_name,
                    SnapshotOptions { pause: true },
                    key,
                )
                .await
            }
            Err(e) => Err(e),
        };
        if let Ok(v) = self.get(&vm.id).await {
            let _ = self.delete(&v, true).await;
        }
        let snap = made?;
        ctx.log(
            6,
            format!(
                "Warm snapshot {} of {} ready: later VMs of this shape start from it",
                snap.name,
                root.named()
            ),
        );
        self.sweep_warm().await;
        Ok(())
    }

    /// Removes the warm snapshots of image `image_id` no VM uses (an image's deletion takes
    /// its cache along).
    pub async fn drop_warm_of_image(&self, image_id: &str) {
        let Ok(all) = self.snapshots().await else {
            return;
        };
        for s in all
            .iter()
            .filter(|s| !s.warm.is_empty() && s.image_id == image_id)
        {
            match self.delete_snapshot(s).await {
                Ok(()) => {
                    tracing::info!(snapshot_id = %s.id, "Warm snapshot {} removed with its image", s.name)
                }
                Err(e) => {
                    tracing::info!(snapshot_id = %s.id, "Warm snapshot {} stays: {}", s.name, e.full_message())
                }
            }
        }
    }

    /// Deletes warm snapshots no VM layers on that a newer one of the same key, or a change
    /// of key (image, kernel, guest binaries), replaced.
    pub async fn sweep_warm(&self) {
        let Ok(all) = self.snapshots().await else {
            return;
        };
        for s in all.iter().filter(|s| !s.warm.is_empty()) {
            let newest = all
                .iter()
                .filter(|o| o.warm == s.warm)
                .max_by_key(|o| o.created_at)
                .is_some_and(|o| o.id == s.id);
            // A template of folder roots has no image; its init is the VMs'.
            let current = match self.kernels.get(&s.kernel).await {
                Ok(k) if s.image_id.is_empty() => {
                    self.warm_folder_key(&k, s.vcpus, s.memory_mib, &s.init) == s.warm
                }
                Ok(k) => match self.images.get(&s.image_id).await {
                    Ok(i) => self.warm_key(&i, &k, s.vcpus, s.memory_mib) == s.warm,
                    Err(_) => false,
                },
                Err(_) => false,
            };
            if newest && current {
                continue;
            }
            // In use: it stays until its VMs go (the next sweep takes it).
            if self.delete_snapshot(s).await.is_ok() {
                tracing::info!(snapshot_id = %s.id, "Stale warm snapshot {} removed", s.name);
            }
        }
    }
}
