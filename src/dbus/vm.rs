//! `org.banger.VM1`: one VM object.

use zbus::message::Header;
use zbus::{interface, Connection, OwnedObjectPath};

use super::options::request;
use super::{BusResult as Result, Ctx, OptionMap};
use crate::model::Vm;
use crate::ops;
use crate::ops::request::DeleteVmOptions;
use crate::vms::StopOptions;

/// A VM object; its properties are the VM's row.
///
/// The row sits behind a lock of its own, and the pump replaces it through a shared
/// reference: zbus holds an interface's read lock for the whole of a method call, and a method
/// such as `Start` waits for the pump (its job's object must be on the bus before it returns),
/// so an update that needed the interface's write lock would wait for that method, and the
/// method for the pump: every call would hang behind them.
pub struct Vm1 {
    vm: std::sync::RwLock<Vm>,
    ctx: Ctx,
}

impl Vm1 {
    /// The object of `vm`.
    pub(super) fn new(vm: Vm, ctx: Ctx) -> Self {
        Vm1 {
            vm: std::sync::RwLock::new(vm),
            ctx,
        }
    }

    /// The VM as last published (a guard never held across an await).
    pub(super) fn vm(&self) -> std::sync::RwLockReadGuard<'_, Vm> {
        self.vm.read().unwrap_or_else(|p| p.into_inner())
    }

    fn vm_id(&self) -> String {
        self.vm().id.clone()
    }

    /// The VM as the caller of the message `hdr` may see it (see `ops::vm_seen_by`): its
    /// owner, root and holders of manage-any see it whole; a property read with no message
    /// (a signal, which reaches everyone) sees what strangers see.
    async fn seen_by(&self, conn: &Connection, hdr: Option<&Header<'_>>) -> Vm {
        let vm = self.vm().clone();
        let caller = match hdr {
            Some(h) => crate::auth::Caller::from_header(conn, h).await.ok(),
            None => None,
        };
        match &caller {
            Some(c) => ops::vm_seen_by(self.ctx.authority.as_ref(), c, &vm).await,
            None => vm.shown(false),
        }
    }

    /// Puts the VM's new row in place; returns the old one.
    pub(super) fn replace(&self, vm: Vm) -> Vm {
        let mut held = self.vm.write().unwrap_or_else(|p| p.into_inner());
        std::mem::replace(&mut *held, vm)
    }
}

/// A microVM.
#[interface(name = "org.banger.VM1")]
impl Vm1 {
    /// Starts the VM. Returns the job at once.
    #[zbus(out_args("job_id", "job_path"))]
    async fn start(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
    ) -> Result<(u32, OwnedObjectPath)> {
        start(&self.ctx, conn, &hdr, &self.vm_id()).await
    }

    /// Stops the VM. Options: force b, timeout_sec u.
    async fn stop(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
        options: OptionMap,
    ) -> Result<()> {
        stop(&self.ctx, conn, &hdr, &self.vm_id(), options).await
    }

    /// Pauses the running VM: its vCPUs stop, its memory and devices are kept (state
    /// "paused"). Needs the same authorization as Stop.
    async fn pause(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
    ) -> Result<()> {
        let c = self.ctx.caller(conn, &hdr).await?;
        let id = self.vm_id();
        let op = ops::pause_vm(&self.ctx.banger, &c, &id);
        self.ctx.perform(&c, op).await
    }

    /// Gives the VM a lifetime of timeout_sec seconds from now, replacing the one it had (0:
    /// none); when it runs out the VM is deleted, stopped or paused as its OnExpire says.
    /// Needs the same authorization as Stop.
    #[zbus(name = "SetTimeout")]
    async fn set_timeout(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
        timeout_sec: u32,
    ) -> Result<()> {
        let c = self.ctx.caller(conn, &hdr).await?;
        let id = self.vm_id();
        let op = ops::set_vm_timeout(&self.ctx.banger, &c, &id, timeout_sec);
        self.ctx.perform(&c, op).await
    }

    /// When the VM's lifetime ends, µs since the epoch; 0 when it has none.
    #[zbus(property, name = "ExpiresAt")]
    fn expires_at(&self) -> u64 {
        self.vm().expires_at
    }

    /// What happens to the VM when its lifetime ends: delete, stop or pause.
    #[zbus(property(emits_changed_signal = "const"), name = "OnExpire")]
    fn on_expire(&self) -> String {
        self.vm().on_expire.as_str().to_owned()
    }

    /// Lets the paused VM go on where it was (state "running" again).
    async fn resume(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
    ) -> Result<()> {
        let c = self.ctx.caller(conn, &hdr).await?;
        let id = self.vm_id();
        let op = ops::resume_vm(&self.ctx.banger, &c, &id);
        self.ctx.perform(&c, op).await
    }

    /// Snapshots the VM under a name (as VMs1.SnapshotVM). Options: pause b.
    #[zbus(out_args("job_id", "job_path"))]
    async fn snapshot(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
        snapshot: &str,
        options: OptionMap,
    ) -> Result<(u32, OwnedObjectPath)> {
        take_snapshot(&self.ctx, conn, &hdr, &self.vm_id(), snapshot, options).await
    }

    /// Deletes the VM. Options: force b.
    async fn delete(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
        options: OptionMap,
    ) -> Result<()> {
        delete(&self.ctx, conn, &hdr, &self.vm_id(), options).await
    }

    /// A stream connected to the guest agent (vsock port 1024) of the running VM, for
    /// `banger vm exec`. Needs the same authorization as Stop.
    #[zbus(name = "OpenAgent")]
    async fn open_agent(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
    ) -> Result<zbus::OwnedFd> {
        let c = self.ctx.caller(conn, &hdr).await?;
        let id = self.vm_id();
        let op = ops::open_agent(&self.ctx.banger, &c, &id);
        Ok(self.ctx.perform(&c, op).await?.into())
    }

    /// A stream to a shell on a terminal of its own in the running VM, through its agent:
    /// the agent's frames follow (see the README's agent protocol: `STDIN`, `RESIZE` in;
    /// `STDOUT`, `EXIT` out). Options: rows q, cols q (the terminal's size, 24×80), term s
    /// (`TERM`), user s (else the image's User), command as (else the user's login shell).
    /// Needs the same authorization as Stop.
    #[zbus(name = "OpenShell")]
    async fn open_shell(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
        options: super::options::OptionMap,
    ) -> Result<zbus::OwnedFd> {
        let what: crate::agent::ExecRequest = request("OpenShell", options)?;
        let c = self.ctx.caller(conn, &hdr).await?;
        let id = self.vm_id();
        let op = ops::open_shell(&self.ctx.banger, &c, &id, what);
        Ok(self.ctx.perform(&c, op).await?.into())
    }

    /// A read-only descriptor of the serial console log of the VM's last boot, for
    /// `banger vm logs`. Needs the same authorization as Stop.
    #[zbus(name = "OpenConsole")]
    async fn open_console(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
    ) -> Result<zbus::OwnedFd> {
        let c = self.ctx.caller(conn, &hdr).await?;
        let id = self.vm_id();
        let op = ops::open_console(&self.ctx.banger, &c, &id);
        Ok(self.ctx.perform(&c, op).await?.into())
    }

    /// The VM's hex id.
    #[zbus(property(emits_changed_signal = "const"), name = "Id")]
    fn id(&self) -> String {
        self.vm().id.clone()
    }
    /// The VM's unique name.
    #[zbus(property(emits_changed_signal = "const"), name = "Name")]
    fn name(&self) -> String {
        self.vm().name.clone()
    }
    /// created, starting, running, stopping, stopped or failed.
    #[zbus(property, name = "State")]
    fn state(&self) -> String {
        self.vm().state.as_str().to_owned()
    }
    /// The last creation or start stage reached.
    #[zbus(property, name = "Stage")]
    fn stage(&self) -> String {
        self.vm().stage.clone()
    }
    /// The image's id.
    #[zbus(property(emits_changed_signal = "const"), name = "Image")]
    fn image(&self) -> String {
        self.vm().image_id.clone()
    }
    /// The kernel's name.
    #[zbus(property(emits_changed_signal = "const"), name = "Kernel")]
    fn kernel(&self) -> String {
        self.vm().kernel.clone()
    }
    /// Virtual CPUs.
    #[zbus(property, name = "VCpus")]
    fn vcpus(&self) -> u32 {
        self.vm().vcpus
    }
    /// Guest memory in MiB.
    #[zbus(property, name = "MemoryMiB")]
    fn memory_mib(&self) -> u32 {
        self.vm().memory_mib
    }
    /// The guest's IPv4 address.
    #[zbus(property, name = "GuestAddress")]
    fn guest_address(&self) -> String {
        self.vm().guest_address.clone()
    }
    /// The guest NIC's MAC address.
    #[zbus(property, name = "MacAddress")]
    fn mac_address(&self) -> String {
        self.vm().mac_address.clone()
    }
    /// The guest's vsock context id.
    #[zbus(property, name = "VSockCID")]
    fn vsock_cid(&self) -> u32 {
        self.vm().vsock_cid
    }
    /// host:port of the guest's sshd, once it answered.
    #[zbus(property, name = "SSHAddress")]
    fn ssh_address(&self) -> String {
        self.vm().ssh_address.clone()
    }
    /// The public half of the VM's own SSH host key, for a known_hosts entry.
    #[zbus(property, name = "SSHHostKey")]
    fn ssh_host_key(&self) -> String {
        self.vm().ssh_host_key.clone()
    }
    /// isolated (reaches no other guest) or shared (reaches its owner's other shared VMs).
    #[zbus(property(emits_changed_signal = "const"), name = "Network")]
    fn network(&self) -> String {
        self.vm().network.as_str().to_owned()
    }
    /// Shared host folders, HOSTDIR:GUESTDIR[:ro]; empty for anyone but the VM's owner and
    /// root.
    #[zbus(property(emits_changed_signal = "const"), name = "Shares")]
    async fn shares(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Option<Header<'_>>,
    ) -> Vec<String> {
        let vm = self.seen_by(conn, hdr.as_ref()).await;
        vm.shares.iter().map(|s| s.spec()).collect()
    }

    /// The host folder that is the VM's root filesystem (CreateVM rootfs_dir, served over
    /// virtio-fs as the owner); empty when its root disk layers on its image, and for anyone
    /// but the VM's owner and root.
    #[zbus(property(emits_changed_signal = "const"), name = "RootfsDir")]
    async fn rootfs_dir(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Option<Header<'_>>,
    ) -> String {
        self.seen_by(conn, hdr.as_ref()).await.rootfs_dir
    }

    /// The network namespace whose eth0 is the VM's network (CreateVM netns); empty when it
    /// is on banger's network, and for anyone but the VM's owner and root.
    #[zbus(property(emits_changed_signal = "const"), name = "Netns")]
    async fn netns(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Option<Header<'_>>,
    ) -> String {
        self.seen_by(conn, hdr.as_ref()).await.netns
    }

    /// Published ports, ADDR:HOSTPORT:GUESTPORT (host connections reach the guest's port on
    /// its loopback through the agent); empty for anyone but the VM's owner and root.
    #[zbus(property(emits_changed_signal = "const"), name = "Published")]
    async fn published(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Option<Header<'_>>,
    ) -> Vec<String> {
        self.seen_by(conn, hdr.as_ref()).await.publish
    }

    /// The main process's last exit status (CreateVM entrypoint); -1 when none is known.
    #[zbus(property, name = "ExitStatus")]
    fn exit_status(&self) -> i32 {
        self.vm().exit_status
    }

    /// Where the VM may send (CIDR[:PORT]); empty: anywhere the host's walls allow (and
    /// empty for anyone but the VM's owner and root).
    #[zbus(property(emits_changed_signal = "const"), name = "Egress")]
    async fn egress(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Option<Header<'_>>,
    ) -> Vec<String> {
        self.seen_by(conn, hdr.as_ref()).await.egress
    }
    /// Its owner's key/value pairs (CreateVM labels); empty for anyone but the owner and root.
    #[zbus(property(emits_changed_signal = "const"), name = "Labels")]
    async fn labels(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Option<Header<'_>>,
    ) -> std::collections::HashMap<String, String> {
        self.seen_by(conn, hdr.as_ref())
            .await
            .labels
            .into_iter()
            .collect()
    }
    /// What the VM costs the host in memory now, in bytes: the proportional set size of its
    /// VMM and helper processes (pages shared with other VMs, such as a snapshot's
    /// restored into several, are divided among them); 0 when it has no processes. Read on
    /// demand; no change signal.
    #[zbus(property(emits_changed_signal = "false"), name = "HostMemoryBytes")]
    fn host_memory_bytes(&self) -> u64 {
        self.ctx.banger.vms.host_memory_bytes(&self.vm())
    }

    /// The uid that created the VM.
    #[zbus(property(emits_changed_signal = "const"), name = "Owner")]
    fn owner(&self) -> u32 {
        self.vm().owner_uid
    }
    /// Creation time, µs since the epoch.
    #[zbus(property(emits_changed_signal = "const"), name = "CreatedAt")]
    fn created_at(&self) -> u64 {
        self.vm().created_at
    }
}

// The operations `VMs1` also offers by name (StartVM, StopVM, SnapshotVM, DeleteVM).

pub(super) async fn start(
    ctx: &Ctx,
    conn: &Connection,
    hdr: &Header<'_>,
    key: &str,
) -> Result<(u32, OwnedObjectPath)> {
    let c = ctx.caller(conn, hdr).await?;
    let job = ctx.perform(&c, ops::start_vm(&ctx.banger, &c, key)).await?;
    Ok(ctx.job_reply(&job).await)
}

pub(super) async fn stop(
    ctx: &Ctx,
    conn: &Connection,
    hdr: &Header<'_>,
    key: &str,
    options: OptionMap,
) -> Result<()> {
    let opts: StopOptions = request("StopVM", options)?;
    let c = ctx.caller(conn, hdr).await?;
    ctx.perform(&c, ops::stop_vm(&ctx.banger, &c, key, opts))
        .await
}

pub(super) async fn take_snapshot(
    ctx: &Ctx,
    conn: &Connection,
    hdr: &Header<'_>,
    key: &str,
    name: &str,
    options: OptionMap,
) -> Result<(u32, OwnedObjectPath)> {
    let opts: crate::vms::snapshot::SnapshotOptions = request("SnapshotVM", options)?;
    let c = ctx.caller(conn, hdr).await?;
    let op = ops::snapshot_vm(&ctx.banger, &c, key, name, opts);
    let job = ctx.perform(&c, op).await?;
    Ok(ctx.job_reply(&job).await)
}

pub(super) async fn delete(
    ctx: &Ctx,
    conn: &Connection,
    hdr: &Header<'_>,
    key: &str,
    options: OptionMap,
) -> Result<()> {
    let opts: DeleteVmOptions = request("DeleteVM", options)?;
    let c = ctx.caller(conn, hdr).await?;
    ctx.perform(&c, ops::delete_vm(&ctx.banger, &c, key, opts.force))
        .await
}
