//! `io.banger.VMs`: the operations of `org.banger.VMs1` and `VM1`.

use serde_json::{json, Value};

use super::{job_answer, no_method, Answer, Ctx, Fail, Params, Render};
use crate::auth::Caller;
use crate::model::Vm;
use crate::ops;
use crate::ops::request::{read, DeleteVmOptions};
use crate::vms::{CreateOptions, StopOptions};

/// The interface's name.
pub const INTERFACE: &str = "io.banger.VMs";

/// Its description.
pub const DESCRIPTION: &str = concat!(
    r#"# banger's microVMs: the operations of org.banger.VMs1 and org.banger.VM1 on D-Bus.
# Reads are open to everyone; every other method asks polkit (org.banger.vms.manage for
# your own VMs, org.banger.vms.manage-any for another user's).
interface io.banger.VMs

# A VM as it is now.
type VM (
  id: string,
  name: string,
  # created, starting, running, paused, stopping, stopped or failed
  state: string,
  # The last stage it reached.
  stage: string,
  image: string,
  kernel: string,
  vcpus: int,
  memoryMib: int,
  diskSize: int,
  owner: int,
  guestAddress: string,
  macAddress: string,
  vsockCid: int,
  sshAddress: string,
  sshHostKey: string,
  createdAt: int,
  # isolated or shared
  network: string,
  egress: []string,
  init: string,
  main: []string,
  exitStatus: int,
  published: []string,
  shares: []Share,
  # The snapshot its disks layer on, if any.
  snapshot: string,
  # What it costs the host in memory now: the proportional set size of its VMM and helper
  # processes (pages shared with other VMs divided among them); 0 without processes.
  hostMemoryBytes: int,
  # Its owner's key/value pairs (empty for anyone but its owner and root).
  labels: [string]string,
  # When its lifetime ends, µs since the epoch (0: it has none), and what happens then:
  # delete, stop or pause.
  expiresAt: int,
  onExpire: string,
  # The host folder that is its root filesystem (virtio-fs); empty when its root disk
  # layers on its image, and for anyone but its owner and root.
  rootfsDir: string,
  # The network namespace whose eth0 is its network (Create's netns); empty on banger's
  # network, and for anyone but its owner and root.
  netns: string
)

# A folder of the host in the guest (virtio-fs, served with its owner's rights).
type Share (
  host: string,
  guest: string,
  readOnly: bool
)

"#,
    job_types!(),
    r#"
# A snapshot of a VM (memory, devices and both disks), which VMs can be created from.
type Snapshot (
  id: string,
  name: string,
  # The VM it was taken of (its id and name then).
  vm: string,
  vmName: string,
  image: string,
  kernel: string,
  vcpus: int,
  memoryMib: int,
  sizeBytes: int,
  createdAt: int,
  owner: int
)

# Every VM; with labels, only those that carry every one of those pairs.
method List(labels: ?[string]string) -> (vms: []VM)

# One quota: how much of it the caller's objects use, and how much it allows.
type Usage (
  # vms (max_vms_per_user), running_vms (max_running_vms_per_user), vcpus
  # (max_vcpus_per_user) or memory_mib (max_memory_mib_per_user), these three sums over the
  # caller's starting and running VMs, or disk_size (max_disk_size_per_user), the bytes the
  # caller's images, kernels, snapshots and VMs hold on disk.
  quota: string,
  used: int,
  allowed: int
)

# The caller's use against their quotas.
method GetUsage() -> (usage: []Usage)

# The VM with this name or id.
method Get(name: string) -> (vm: VM)

# Creates a VM and, unless start is false, starts it: the options of CreateVM on D-Bus.
# The reply comes at once with the VM and its job; with "more", one reply follows for each
# stage until the VM is ready (the last reply) or the create failed (an error).
method Create(
  name: string,
  image: ?string,
  kernel: ?string,
  vcpus: ?int,
  memoryMib: ?int,
  diskSize: ?int,
  sshKey: ?string,
  start: ?bool,
  network: ?string,
  egress: ?[]string,
  init: ?string,
  entrypoint: ?bool,
  command: ?[]string,
  publish: ?[]string,
  shares: ?[]Share,
  snapshot: ?string,
  cold: ?bool,
  labels: ?[string]string,
  timeoutSec: ?int,
  onExpire: ?string,
  rootfsDir: ?string,
  netns: ?string
) -> (vm: VM, job: Job, log: ?LogLine)

# Starts a stopped VM; with "more", its stages follow as Create's do.
method Start(name: string) -> (vm: VM, job: Job, log: ?LogLine)

# A clean shutdown, then a kill after timeoutSec (force: kill at once).
method Stop(name: string, force: ?bool, timeoutSec: ?int) -> ()

# Deletes a VM and its disks; a running VM only with force.
method Delete(name: string, force: ?bool) -> ()

# Gives a VM a lifetime of timeoutSec seconds from now (0: none), replacing the one it had.
method SetTimeout(name: string, timeoutSec: int) -> ()

# Stops a VM's vCPUs; its memory stays.
method Pause(name: string) -> ()

# Lets a paused VM go on.
method Resume(name: string) -> ()

# A stream connected to the running VM's agent: the descriptor comes with the reply, fd is
# its index (the agent's protocol is in README.md).
method OpenAgent(name: string) -> (fd: int)

# A stream on which a shell (command, else the user's login shell) already runs on a
# terminal of its own in the guest; the descriptor comes with the reply.
method OpenShell(
  name: string,
  rows: ?int,
  cols: ?int,
  term: ?string,
  user: ?string,
  command: ?[]string
) -> (fd: int)

# The serial console log of the VM's last boot, read-only; the descriptor comes with the
# reply.
method OpenConsole(name: string) -> (fd: int)

# Every snapshot.
method ListSnapshots() -> (snapshots: []Snapshot)

# The snapshot with this name or id.
method GetSnapshot(name: string) -> (snapshot: Snapshot)

# Deletes a snapshot (its owner, or an administrator); InUse while VMs' disks layer on it.
method DeleteSnapshot(name: string) -> ()

# Snapshots a running or paused VM as snapshot (memory, devices, both disks); it goes on
# unless pause is true.
method Snapshot(name: string, snapshot: string, pause: ?bool) -> (job: Job, log: ?LogLine)

"#,
    errors!()
);

/// A VM as `io.banger.VMs.VM`, with what it costs the host in memory now.
pub(super) fn view(v: &Vm, host_memory_bytes: u64) -> Value {
    json!({
        "id": v.id,
        "name": v.name,
        "state": v.state.as_str(),
        "stage": v.stage,
        "image": v.image_id,
        "kernel": v.kernel,
        "vcpus": v.vcpus,
        "memoryMib": v.memory_mib,
        "diskSize": v.disk_size,
        "owner": v.owner_uid,
        "guestAddress": v.guest_address,
        "macAddress": v.mac_address,
        "vsockCid": v.vsock_cid,
        "sshAddress": v.ssh_address,
        "sshHostKey": v.ssh_host_key,
        "createdAt": v.created_at,
        "network": v.network.as_str(),
        "egress": v.egress,
        "init": v.init,
        "main": v.main,
        "exitStatus": v.exit_status,
        "published": v.publish,
        "shares": v.shares.iter().map(|s| json!({
            "host": s.host, "guest": s.guest, "readOnly": s.read_only
        })).collect::<Vec<_>>(),
        "snapshot": v.snapshot,
        "hostMemoryBytes": host_memory_bytes,
        "labels": v.labels,
        "expiresAt": v.expires_at,
        "onExpire": v.on_expire.as_str(),
        "rootfsDir": v.rootfs_dir,
        "netns": v.netns,
    })
}

/// A snapshot as `io.banger.VMs.Snapshot`.
fn snapshot_view(s: &crate::model::Snapshot) -> Value {
    json!({
        "id": s.id,
        "name": s.name,
        "vm": s.vm_id,
        "vmName": s.vm_name,
        "image": s.image_id,
        "kernel": s.kernel,
        "vcpus": s.vcpus,
        "memoryMib": s.memory_mib,
        "sizeBytes": s.size_bytes,
        "createdAt": s.created_at,
        "owner": s.owner_uid,
    })
}

/// A descriptor as the one thing a reply carries: `{"fd": 0}`.
fn fd_answer(fd: std::os::fd::OwnedFd) -> Answer {
    Answer::WithFds(json!({ "fd": 0 }), vec![fd])
}

/// Later replies of a VM's job: the VM as it is now, and the job.
fn with_vm(ctx: &Ctx, id: String) -> Render {
    let banger = ctx.banger.clone();
    Box::new(move |job| {
        let (banger, id) = (banger.clone(), id.clone());
        Box::pin(async move {
            // What the VM costs the host is read (from its processes' smaps) once the job
            // ended, not at each of its stages.
            let ended = job["state"] != "running";
            let vm = banger.vms.get(&id).await.ok().map(|v| {
                let memory = if ended {
                    banger.vms.host_memory_bytes(&v)
                } else {
                    0
                };
                view(&v, memory)
            });
            json!({ "vm": vm, "job": job })
        })
    })
}

pub(super) async fn call(
    ctx: &Ctx,
    caller: &Caller,
    method: &str,
    mut p: Params,
) -> Result<Answer, Fail> {
    let b = &ctx.banger;
    match method {
        "GetUsage" => {
            p.finish()?;
            let usage: Vec<Value> = ops::usage(b, caller)
                .await?
                .into_iter()
                .map(|(k, used, allowed)| json!({ "quota": k, "used": used, "allowed": allowed }))
                .collect();
            Ok(Answer::One(json!({ "usage": usage })))
        }
        "List" => {
            let filter: Option<std::collections::BTreeMap<String, String>> = p.opt("labels")?;
            p.finish()?;
            let filter = filter.unwrap_or_default();
            crate::model::check_labels(&filter)?;
            // What a VM runs is its owner's business (see `ops::vm_seen_by`), and manage-any's,
            // asked once and only when another user's VM is listed. A filter matches only what
            // the caller may see of a VM's labels.
            let mut all = b.vms.list().await?;
            if !filter.is_empty() {
                all.retain(|v| {
                    v.private_to(caller.uid) && crate::model::labels_match(&v.labels, &filter)
                });
            }
            let any = all.iter().any(|v| !v.private_to(caller.uid))
                && ops::manages_any(ctx.authority.as_ref(), caller).await;
            let vms: Vec<Value> = all
                .iter()
                .map(|v| {
                    view(
                        &v.shown(any || v.private_to(caller.uid)),
                        b.vms.host_memory_bytes(v),
                    )
                })
                .collect();
            Ok(Answer::One(json!({ "vms": vms })))
        }
        "Get" => {
            let name: String = p.req("name")?;
            p.finish()?;
            let vm = b.vms.get(&name).await?;
            let memory = b.vms.host_memory_bytes(&vm);
            let vm = ops::vm_seen_by(ctx.authority.as_ref(), caller, &vm).await;
            Ok(Answer::One(json!({ "vm": view(&vm, memory) })))
        }
        "Create" => {
            let name: String = p.req("name")?;
            let opts: CreateOptions = read(p)?;
            let events = b.jobs.subscribe();
            let (vm, job) = ctx
                .perform(caller, ops::create_vm(b, caller, &name, opts))
                .await?;
            let render = with_vm(ctx, vm.id.clone());
            let first = render(super::job_view(&job, None)).await;
            Ok(Answer::Job {
                first,
                job,
                events,
                render,
            })
        }
        "Start" => {
            let name: String = p.req("name")?;
            p.finish()?;
            let id = b.vms.get(&name).await?.id;
            let op = ops::start_vm(b, caller, &name);
            job_answer(ctx, caller, op, with_vm(ctx, id)).await
        }
        "Stop" => {
            let name: String = p.req("name")?;
            let opts: StopOptions = read(p)?;
            ctx.perform(caller, ops::stop_vm(b, caller, &name, opts))
                .await?;
            Ok(Answer::One(json!({})))
        }
        "Delete" => {
            let name: String = p.req("name")?;
            let opts: DeleteVmOptions = read(p)?;
            ctx.perform(caller, ops::delete_vm(b, caller, &name, opts.force))
                .await?;
            Ok(Answer::One(json!({})))
        }
        "SetTimeout" => {
            let name: String = p.req("name")?;
            let secs: u32 = p.req("timeoutSec")?;
            p.finish()?;
            ctx.perform(caller, ops::set_vm_timeout(b, caller, &name, secs))
                .await?;
            Ok(Answer::One(json!({})))
        }
        "Pause" | "Resume" => {
            let name: String = p.req("name")?;
            p.finish()?;
            if method == "Pause" {
                ctx.perform(caller, ops::pause_vm(b, caller, &name)).await?;
            } else {
                ctx.perform(caller, ops::resume_vm(b, caller, &name))
                    .await?;
            }
            Ok(Answer::One(json!({})))
        }
        "OpenAgent" => {
            let name: String = p.req("name")?;
            p.finish()?;
            let fd = ctx
                .perform(caller, ops::open_agent(b, caller, &name))
                .await?;
            Ok(fd_answer(fd))
        }
        "OpenShell" => {
            let name: String = p.req("name")?;
            let what = crate::agent::ExecRequest::shell(
                p.opt("rows")?,
                p.opt("cols")?,
                p.opt("term")?,
                p.opt("user")?,
                p.opt("command")?.unwrap_or_default(),
            );
            p.finish()?;
            let fd = ctx
                .perform(caller, ops::open_shell(b, caller, &name, what))
                .await?;
            Ok(fd_answer(fd))
        }
        "OpenConsole" => {
            let name: String = p.req("name")?;
            p.finish()?;
            let fd = ctx
                .perform(caller, ops::open_console(b, caller, &name))
                .await?;
            Ok(fd_answer(fd))
        }
        "ListSnapshots" => {
            p.finish()?;
            let all: Vec<Value> = b.vms.snapshots().await?.iter().map(snapshot_view).collect();
            Ok(Answer::One(json!({ "snapshots": all })))
        }
        "GetSnapshot" => {
            let name: String = p.req("name")?;
            p.finish()?;
            let snap = b.vms.snapshot(&name).await?;
            Ok(Answer::One(json!({ "snapshot": snapshot_view(&snap) })))
        }
        "DeleteSnapshot" => {
            let name: String = p.req("name")?;
            p.finish()?;
            ctx.perform(caller, ops::delete_snapshot(b, caller, &name))
                .await?;
            Ok(Answer::One(json!({})))
        }
        "Snapshot" => {
            let name: String = p.req("name")?;
            let snapshot: String = p.req("snapshot")?;
            let opts: crate::vms::snapshot::SnapshotOptions = read(p)?;
            let op = ops::snapshot_vm(b, caller, &name, &snapshot, opts);
            job_answer(ctx, caller, op, super::job_only()).await
        }
        m => Err(no_method(INTERFACE, m)),
    }
}
