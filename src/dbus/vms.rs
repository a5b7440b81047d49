//! `org.banger.VMs1` on the manager object; the VM operations it shares with `VM1` are in
//! `vm.rs`.

use zbus::message::Header;
use zbus::object_server::SignalEmitter;
use zbus::{interface, Connection, OwnedObjectPath};

use super::options::request;
use super::vm::{delete, start, stop, take_snapshot};
use super::{vm_path, BusResult as Result, Ctx, OptionMap};
use crate::ops;
use crate::vms::CreateOptions;

/// The VM manager.
pub struct Vms1 {
    pub(super) ctx: Ctx,
}

/// Manages microVMs.
#[interface(name = "org.banger.VMs1")]
impl Vms1 {
    /// What every VM costs the host in memory now, in bytes: the sum of each VM's
    /// HostMemoryBytes (read on demand; no change signal).
    #[zbus(property(emits_changed_signal = "false"), name = "HostMemoryBytes")]
    async fn host_memory_bytes(&self) -> zbus::fdo::Result<u64> {
        self.ctx
            .banger
            .vms
            .host_memory_total()
            .await
            .map_err(|e| zbus::fdo::Error::Failed(e.full_message()))
    }

    /// Deletes a VM and its disks; a running VM only with force. Options: force b.
    #[zbus(name = "DeleteVM")]
    async fn delete_vm(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
        name_or_id: &str,
        options: OptionMap,
    ) -> Result<()> {
        delete(&self.ctx, conn, &hdr, name_or_id, options).await
    }

    /// The caller's use against their quotas, as (key, used, allowed): vms
    /// (max_vms_per_user), running_vms (max_running_vms_per_user), vcpus
    /// (max_vcpus_per_user) and memory_mib (max_memory_mib_per_user), these three summed
    /// over the caller's starting and running VMs, and disk_size (max_disk_size_per_user),
    /// the bytes the caller's images, kernels, snapshots and VMs hold on disk.
    #[zbus(name = "GetUsage", out_args("usage"))]
    async fn get_usage(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
    ) -> Result<Vec<(String, u64, u64)>> {
        let c = self.ctx.caller(conn, &hdr).await?;
        let usage = ops::usage(&self.ctx.banger, &c).await?;
        Ok(usage
            .into_iter()
            .map(|(k, used, max)| (k.to_owned(), used, max))
            .collect())
    }

    /// Lists every VM as (id, name, state, image, object path).
    #[zbus(name = "ListVMs")]
    async fn list_vms(&self) -> Result<Vec<(String, String, String, String, OwnedObjectPath)>> {
        let vms = self.ctx.banger.vms.list().await?;
        Ok(vms
            .into_iter()
            .map(|v| {
                let path = vm_path(&v.id);
                (v.id, v.name, v.state.as_str().to_owned(), v.image_id, path)
            })
            .collect())
    }

    /// Lists the caller's VMs that carry every one of these labels (key, value), as ListVMs
    /// does. Another user's labels are theirs: their VMs never match.
    #[zbus(name = "ListVMsByLabels")]
    async fn list_vms_by_labels(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
        labels: std::collections::HashMap<String, String>,
    ) -> Result<Vec<(String, String, String, String, OwnedObjectPath)>> {
        let c = self.ctx.caller(conn, &hdr).await?;
        let filter: std::collections::BTreeMap<String, String> = labels.into_iter().collect();
        crate::model::check_labels(&filter)?;
        let vms = self.ctx.banger.vms.list().await?;
        Ok(vms
            .into_iter()
            .filter(|v| v.private_to(c.uid) && crate::model::labels_match(&v.labels, &filter))
            .map(|v| {
                let path = vm_path(&v.id);
                (v.id, v.name, v.state.as_str().to_owned(), v.image_id, path)
            })
            .collect())
    }

    /// Returns the object path of the VM with this name or id.
    #[zbus(name = "GetVM")]
    async fn get_vm(
        &self,
        #[zbus(connection)] conn: &Connection,
        name_or_id: &str,
    ) -> Result<OwnedObjectPath> {
        let path = vm_path(&self.ctx.banger.vms.get(name_or_id).await?.id);
        Ok(self.ctx.live::<super::vm::Vm1>(conn, path).await)
    }

    /// Creates a VM and, unless start is false, starts it. Options: image s, kernel s,
    /// vcpus u, memory_mib u, disk_size t, ssh_key s, start b, network s (isolated or
    /// shared), egress as (CIDR[:PORT] the VM may reach), init s ("banger" or a path; empty:
    /// the image's /sbin/init, else banger-init), entrypoint b (run the image's
    /// Entrypoint+Cmd as the main process; its exit powers the VM off, its status is
    /// ExitStatus), command as (the main process's arguments instead of Cmd), publish as
    /// ([ADDR:]HOSTPORT:GUESTPORT[/udp], through the agent to the guest's loopback), shares
    /// a(ssb) (host folder, guest folder, read-only: virtio-fs, served with the caller's own
    /// rights; the caller must own or be able to write the folder), snapshot s (restore this
    /// snapshot instead of booting: stage restore replaces boot; image, kernel, vcpus,
    /// memory_mib and disk size are the snapshot's), cold b (boot even when a warm snapshot of
    /// this image, kernel and shape exists; by default such a create restores from it),
    /// labels a{ss} (the owner's key/value pairs: at most 64, keys of letters, digits and
    /// ._-/:, values up to 1024 bytes; see ListVMsByLabels), timeout_sec u (a lifetime from
    /// now; see VM1.SetTimeout), on_expire s (delete, the default, stop or pause),
    /// rootfs_dir s (a host folder of the caller's as the VM's root filesystem, served over
    /// virtio-fs with the caller's rights, read-write and never copied: no image, no disks,
    /// no snapshots; QEMU only), netns s (root only: a network namespace, such as
    /// /run/netns/NAME, whose eth0 the VM takes over: its tap there, wired to eth0 both ways
    /// by tc, the guest with eth0's address, MAC and default route; no lease, bridge, walls,
    /// publish or egress of banger's; QEMU only). Returns the VM and its job at once;
    /// stages arrive as CreateProgress and the job's StageChanged.
    #[zbus(name = "CreateVM", out_args("vm_path", "job_id", "job_path"))]
    async fn create_vm(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
        name: &str,
        options: OptionMap,
    ) -> Result<(OwnedObjectPath, u32, OwnedObjectPath)> {
        let opts: CreateOptions = request("CreateVM", options)?;
        let c = self.ctx.caller(conn, &hdr).await?;
        let op = ops::create_vm(&self.ctx.banger, &c, name, opts);
        let (vm, job) = self.ctx.perform(&c, op).await?;
        let (id, path) = self.ctx.job_reply(&job).await;
        let vm_path = self.ctx.live::<super::vm::Vm1>(conn, vm_path(&vm.id)).await;
        Ok((vm_path, id, path))
    }

    /// Starts a stopped VM. Returns the job at once.
    #[zbus(name = "StartVM", out_args("job_id", "job_path"))]
    async fn start_vm(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
        name_or_id: &str,
    ) -> Result<(u32, OwnedObjectPath)> {
        start(&self.ctx, conn, &hdr, name_or_id).await
    }

    /// Stops a VM: a clean shutdown, then a kill after timeout_sec. Options: force b,
    /// timeout_sec u.
    #[zbus(name = "StopVM")]
    async fn stop_vm(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
        name_or_id: &str,
        options: OptionMap,
    ) -> Result<()> {
        stop(&self.ctx, conn, &hdr, name_or_id, options).await
    }

    /// Snapshots a running or paused VM: memory, device state and both disks, taken while
    /// its vCPUs stand still; the VM then goes on (or stays paused with pause b). Returns the
    /// job at once; the snapshot appears as SnapshotNew on org.banger.Snapshots1.
    #[zbus(name = "SnapshotVM", out_args("job_id", "job_path"))]
    async fn snapshot_vm(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
        name_or_id: &str,
        snapshot: &str,
        options: OptionMap,
    ) -> Result<(u32, OwnedObjectPath)> {
        take_snapshot(&self.ctx, conn, &hdr, name_or_id, snapshot, options).await
    }

    /// A VM was created.
    #[zbus(signal, name = "VMNew")]
    pub async fn vm_new(e: &SignalEmitter<'_>, id: &str, path: OwnedObjectPath)
        -> zbus::Result<()>;

    /// A VM was deleted.
    #[zbus(signal, name = "VMRemoved")]
    pub async fn vm_removed(
        e: &SignalEmitter<'_>,
        id: &str,
        path: OwnedObjectPath,
    ) -> zbus::Result<()>;

    /// A running VM stopped: `reason` is `requested` (a stop), `powered-off` (the guest
    /// powered off, or its VMM ended, on its own) or `exited` (its main process ended, with
    /// `exit_status`; -1 for a VM without one).
    #[zbus(signal, name = "VMStopped")]
    pub async fn vm_stopped(
        e: &SignalEmitter<'_>,
        id: &str,
        path: OwnedObjectPath,
        reason: &str,
        exit_status: i32,
    ) -> zbus::Result<()>;

    /// A VM's creation reached a stage.
    #[zbus(signal)]
    pub async fn create_progress(
        e: &SignalEmitter<'_>,
        vm: OwnedObjectPath,
        stage: &str,
        message: &str,
    ) -> zbus::Result<()>;
}
