//! Every operation a front end offers, once, below all of them (as Cloud Hypervisor shares one
//! typed action per operation between its HTTP and D-Bus front ends). An operation checks its
//! arguments and looks up what they name, says which polkit actions this caller needs for
//! this object ([`Ready::needs`]), and holds its work unstarted ([`Ready`]); [`perform`] asks
//! the authority for each action and only then runs the work. A front end converts arguments,
//! identifies the caller, calls `perform`, and maps errors: no authorization decision, file or
//! process handling lives in a front end.

use std::future::Future;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::Arc;

use crate::auth::{self, Action, Authority, Caller};
use crate::images::{BuildOptions, PullOptions, RegisterOptions};
use crate::jobs::Job;
use crate::kernels::ImportOptions;
use crate::model::{validate_name, Image, Kernel, NameKind, Vm};
use crate::service::Banger;
use crate::vms::snapshot::SnapshotError;
use crate::vms::snapshot::SnapshotOptions;
use crate::vms::VmError;
use crate::vms::{action_for, CreateOptions, StopOptions};
use crate::{Error, Result};

/// An operation whose arguments were checked: the actions it needs, and its work, which
/// does not start until [`perform`] has them all allowed.
pub struct Ready<'a, T> {
    needs: Vec<Action>,
    act: Pin<Box<dyn Future<Output = Result<T>> + Send + 'a>>,
}

impl<'a, T> Ready<'a, T> {
    fn new(needs: Vec<Action>, act: impl Future<Output = Result<T>> + Send + 'a) -> Self {
        Ready {
            needs,
            act: Box::pin(act),
        }
    }

    /// The polkit actions, in the order they are asked.
    pub fn needs(&self) -> &[Action] {
        &self.needs
    }
}

/// Validates (the operation's own future), authorises every action it named, then acts.
/// A refusal is [`Error::Denied`]; nothing of the work has run then.
pub async fn perform<'a, T>(
    authority: &dyn Authority,
    caller: &Caller,
    op: impl Future<Output = Result<Ready<'a, T>>>,
) -> Result<T> {
    let ready = op.await?;
    for action in &ready.needs {
        auth::authorize(authority, caller, *action)
            .await
            .map_err(|e| {
                tracing::warn!(uid = caller.uid, action = action.id(), "Refused: {e}");
                Error::Denied(e)
            })?;
    }
    ready.act.await
}

/// Adds `manage-any` to `needs` when the caller is not `owner` and, to merely use the
/// object, `owner` is not the system either; true then (the operation may touch another
/// user's object once polkit granted it).
fn owner_needs(needs: &mut Vec<Action>, owner: u32, caller: &Caller, only_use: bool) -> bool {
    let theirs = if only_use {
        !crate::model::usable_by(owner, caller.uid)
    } else {
        owner != caller.uid
    };
    if theirs && !needs.contains(&Action::VmsManageAny) {
        needs.push(Action::VmsManageAny);
    }
    theirs
}

/// `manage-any` for a named kernel (installed, not the caller's nor the system's); whether
/// it was added.
async fn kernel_needs(b: &Banger, needs: &mut Vec<Action>, caller: &Caller, name: &str) -> bool {
    match b.kernels.get(name).await {
        Ok(k) => owner_needs(needs, k.owner_uid, caller, true),
        Err(_) => false,
    }
}

/// What changing image `key` (promote, delete) needs, and the key to act on: the image's id
/// once found (its name may change hands before the act), else `key` itself, so that a
/// missing image is reported only once authorised and a caller without the action learns
/// nothing from a mutating call.
async fn image_change(b: &Banger, caller: &Caller, key: &str) -> (Vec<Action>, String) {
    let mut needs = vec![Action::ImagesManage];
    match b.images.get(key).await {
        Ok(i) => {
            owner_needs(&mut needs, i.owner_uid, caller, false);
            (needs, i.id)
        }
        Err(_) => (needs, key.to_owned()),
    }
}

/// The action a caller needs on a VM (its owner, or an administrator), and the VM.
async fn vm_for(b: &Banger, caller: &Caller, key: &str) -> Result<(Vm, Action)> {
    let vm = b.vms.get(key).await?;
    let action = action_for(&vm, caller.uid);
    Ok((vm, action))
}

/// `PullImage`.
pub async fn pull_image<'a>(
    b: &'a Banger,
    caller: &Caller,
    reference: &'a str,
    opts: PullOptions,
) -> Result<Ready<'a, Arc<Job>>> {
    b.images.validate_pull(reference, &opts)?;
    let mut needs = vec![Action::ImagesManage];
    if let Some(k) = &opts.kernel {
        let any = kernel_needs(b, &mut needs, caller, k).await;
        b.check_kernel_name(caller.uid, k, any).await?;
    }
    let uid = caller.uid;
    Ok(Ready::new(needs, async move {
        b.check_disk_quota(uid, 0, "the image").await?;
        b.images.pull(uid, reference, opts).await
    }))
}

/// `RegisterImage`: kernel files become a kernel of their own, which needs the kernels
/// action as well.
pub async fn register_image<'a>(
    b: &'a Banger,
    caller: &Caller,
    name: &'a str,
    opts: RegisterOptions,
) -> Result<Ready<'a, Image>> {
    validate_name(NameKind::Image, name)?;
    opts.validate()?;
    let mut needs = vec![Action::ImagesManage];
    if opts.kernel_path.is_some() {
        needs.push(Action::KernelsManage);
    }
    // Replacing another user's image (or the system's, for a member) is an administrator's.
    let mut any = match b.images.get(name).await {
        Ok(i) => owner_needs(&mut needs, i.owner_uid, caller, false),
        Err(_) => false,
    };
    if let Some(k) = &opts.kernel {
        any |= kernel_needs(b, &mut needs, caller, k).await;
    }
    let uid = caller.uid;
    Ok(Ready::new(needs, async move {
        b.check_disk_quota(uid, 0, "the image").await?;
        b.register_image(uid, name, opts, any).await
    }))
}

/// `PromoteImage`.
pub async fn promote_image<'a>(
    b: &'a Banger,
    caller: &Caller,
    key: &'a str,
) -> Result<Ready<'a, Arc<Job>>> {
    let (needs, key) = image_change(b, caller, key).await;
    let uid = caller.uid;
    Ok(Ready::new(needs, async move {
        b.images.promote(uid, &key).await
    }))
}

/// `BuildImage`.
pub async fn build_image<'a>(
    b: &'a Banger,
    caller: &Caller,
    name: &'a str,
    opts: BuildOptions,
) -> Result<Ready<'a, Arc<Job>>> {
    validate_name(NameKind::Image, name)?;
    let mut needs = vec![Action::ImagesManage];
    if let Some(k) = &opts.kernel {
        let any = kernel_needs(b, &mut needs, caller, k).await;
        b.check_kernel_name(caller.uid, k, any).await?;
    }
    let uid = caller.uid;
    Ok(Ready::new(needs, async move {
        b.check_disk_quota(uid, 0, "the image").await?;
        b.images.build(uid, name, opts).await
    }))
}

/// What `WarmImage` makes: the warm snapshot of an image for a kernel and shape.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WarmOptions {
    /// The kernel (the image's, else the default).
    pub kernel: Option<String>,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u32,
}

/// `WarmImage`: a job, or InUse while the same warm snapshot is being made.
pub async fn warm_image<'a>(
    b: &'a Banger,
    caller: &Caller,
    key: &'a str,
    o: WarmOptions,
) -> Result<Ready<'a, Arc<Job>>> {
    let mut needs = vec![Action::VmsManage];
    if let Some(k) = &o.kernel {
        validate_name(NameKind::Kernel, k)?;
        kernel_needs(b, &mut needs, caller, k).await;
    }
    // A warm snapshot is the system's and boots the image: only of images the caller may use.
    let image = b.images.get(key).await?;
    owner_needs(&mut needs, image.owner_uid, caller, true);
    Ok(Ready::new(needs, async move {
        b.vms
            .warm(key, o.kernel.as_deref(), o.vcpus, o.memory_mib)
            .await?
            .ok_or_else(|| {
                SnapshotError::Busy(format!(
                    "The warm snapshot of image {key} ({} vCPUs, {} MiB) is being made \
                     already; `banger job list` shows its job",
                    o.vcpus, o.memory_mib
                ))
                .into()
            })
    }))
}

/// `DeleteImage`.
pub async fn delete_image<'a>(
    b: &'a Banger,
    caller: &Caller,
    key: &'a str,
) -> Result<Ready<'a, ()>> {
    let (needs, key) = image_change(b, caller, key).await;
    Ok(Ready::new(needs, async move {
        // The image's warm snapshots are banger's cache, not the caller's: they go with it
        // (those a running VM was started from stay, and the image is refused as in use).
        if let Ok(image) = b.images.get(&key).await {
            b.vms.drop_warm_of_image(&image.id).await;
        }
        b.images.delete(&key).await
    }))
}

/// `PruneCache`: the download cache is the system's (every user's pulls reuse it), so
/// emptying it needs `manage-any`.
pub async fn prune_cache<'a>(b: &'a Banger, _caller: &Caller) -> Result<Ready<'a, (u64, u32)>> {
    Ok(Ready::new(
        vec![Action::ImagesManage, Action::VmsManageAny],
        b.images.prune_cache(),
    ))
}

/// `PullKernel`.
pub async fn pull_kernel<'a>(
    b: &'a Banger,
    caller: &Caller,
    name: &'a str,
) -> Result<Ready<'a, Arc<Job>>> {
    validate_name(NameKind::Kernel, name)?;
    let uid = caller.uid;
    Ok(Ready::new(vec![Action::KernelsManage], async move {
        b.check_disk_quota(uid, 0, "the kernel").await?;
        b.kernels.pull(uid, name).await
    }))
}

/// `ImportKernel`.
pub async fn import_kernel<'a>(
    b: &'a Banger,
    caller: &Caller,
    name: &'a str,
    opts: ImportOptions,
) -> Result<Ready<'a, Kernel>> {
    validate_name(NameKind::Kernel, name)?;
    opts.validate()?;
    let uid = caller.uid;
    Ok(Ready::new(vec![Action::KernelsManage], async move {
        b.check_disk_quota(uid, 0, "the kernel").await?;
        b.kernels.import(uid, name, opts).await
    }))
}

/// `DeleteKernel`.
pub async fn delete_kernel<'a>(
    b: &'a Banger,
    caller: &Caller,
    name: &'a str,
) -> Result<Ready<'a, ()>> {
    validate_name(NameKind::Kernel, name)?;
    // A missing kernel is reported once authorised (the owner then is nobody's).
    let owner = b.kernels.get(name).await.map(|k| k.owner_uid).ok();
    let mut needs = vec![Action::KernelsManage];
    if let Some(o) = owner {
        owner_needs(&mut needs, o, caller, false);
    }
    Ok(Ready::new(needs, async move {
        b.kernels.delete(name, owner.unwrap_or(u32::MAX)).await
    }))
}

/// `CreateVM`: restoring another user's snapshot reads their VM's memory, which needs
/// manage-any as well.
pub async fn create_vm<'a>(
    b: &'a Banger,
    caller: &Caller,
    name: &'a str,
    opts: CreateOptions,
) -> Result<Ready<'a, (Vm, Arc<Job>)>> {
    validate_name(NameKind::Vm, name)?;
    let mut opts = opts;
    opts.validate()?;
    let mut needs = vec![Action::VmsManage];
    if let Some(s) = &opts.snapshot {
        let snap = b.vms.snapshot(s).await?;
        let action = crate::vms::snapshot::action_for(&snap, caller.uid);
        if action != Action::VmsManage {
            needs.push(action);
        }
    }
    // Booting another user's image or kernel (not the system's) is an administrator's; the
    // create checks again once it resolved what it boots.
    let mut any = false;
    if let Some(i) = &opts.image {
        if let Ok(image) = b.images.get(i).await {
            any |= owner_needs(&mut needs, image.owner_uid, caller, true);
        }
    }
    if let Some(k) = &opts.kernel {
        any |= kernel_needs(b, &mut needs, caller, k).await;
    }
    opts.foreign_ok = any;
    let uid = caller.uid;
    Ok(Ready::new(needs, async move {
        b.check_disk_quota(uid, 0, "the VM").await?;
        b.vms.create(uid, name, opts).await
    }))
}

/// `StartVM`.
pub async fn start_vm<'a>(
    b: &'a Banger,
    caller: &Caller,
    key: &str,
) -> Result<Ready<'a, Arc<Job>>> {
    let (vm, action) = vm_for(b, caller, key).await?;
    let uid = caller.uid;
    Ok(Ready::new(vec![action], async move {
        b.vms.start(uid, &vm).await
    }))
}

/// `StopVM`.
pub async fn stop_vm<'a>(
    b: &'a Banger,
    caller: &Caller,
    key: &str,
    opts: StopOptions,
) -> Result<Ready<'a, ()>> {
    let (vm, action) = vm_for(b, caller, key).await?;
    Ok(Ready::new(vec![action], async move {
        b.vms.stop(&vm, opts).await
    }))
}

/// `VM1.Pause`.
pub async fn pause_vm<'a>(b: &'a Banger, caller: &Caller, key: &str) -> Result<Ready<'a, ()>> {
    let (vm, action) = vm_for(b, caller, key).await?;
    Ok(Ready::new(
        vec![action],
        async move { b.vms.pause(&vm).await },
    ))
}

/// `VM1.SetTimeout`: a lifetime of `secs` from now (0: none).
pub async fn set_vm_timeout<'a>(
    b: &'a Banger,
    caller: &Caller,
    key: &str,
    secs: u32,
) -> Result<Ready<'a, ()>> {
    crate::vms::lifetime::check_timeout(secs)?;
    let (vm, action) = vm_for(b, caller, key).await?;
    Ok(Ready::new(vec![action], async move {
        b.vms.set_timeout(&vm, secs).await.map(|_| ())
    }))
}

/// `VM1.Resume`.
pub async fn resume_vm<'a>(b: &'a Banger, caller: &Caller, key: &str) -> Result<Ready<'a, ()>> {
    let (vm, action) = vm_for(b, caller, key).await?;
    Ok(Ready::new(
        vec![action],
        async move { b.vms.resume(&vm).await },
    ))
}

/// `SnapshotVM`.
pub async fn snapshot_vm<'a>(
    b: &'a Banger,
    caller: &Caller,
    key: &str,
    name: &'a str,
    opts: SnapshotOptions,
) -> Result<Ready<'a, Arc<Job>>> {
    validate_name(NameKind::Snapshot, name)?;
    let (vm, action) = vm_for(b, caller, key).await?;
    let uid = caller.uid;
    Ok(Ready::new(vec![action], async move {
        // Its memory file is the guest's memory.
        let memory = u64::from(vm.memory_mib) << 20;
        b.check_disk_quota(uid, memory, "the snapshot").await?;
        b.vms.take_snapshot(uid, &vm, name, opts).await
    }))
}

/// `DeleteVM`.
pub async fn delete_vm<'a>(
    b: &'a Banger,
    caller: &Caller,
    key: &str,
    force: bool,
) -> Result<Ready<'a, ()>> {
    let (vm, action) = vm_for(b, caller, key).await?;
    Ok(Ready::new(vec![action], async move {
        b.vms.delete(&vm, force).await
    }))
}

/// `DeleteSnapshot`: its owner, or an administrator.
pub async fn delete_snapshot<'a>(
    b: &'a Banger,
    caller: &Caller,
    key: &str,
) -> Result<Ready<'a, ()>> {
    validate_name(NameKind::Snapshot, key)?;
    let snap = b.vms.snapshot(key).await?;
    let action = crate::vms::snapshot::action_for(&snap, caller.uid);
    Ok(Ready::new(vec![action], async move {
        b.vms.delete_snapshot(&snap).await
    }))
}

/// `CancelJob` (and `Job1.Cancel`): what the job does, and manage-any for another user's VM
/// job.
pub async fn cancel_job<'a>(b: &'a Banger, caller: &Caller, id: u32) -> Result<Ready<'a, ()>> {
    let job = b.jobs.get(id)?;
    let action = match job.action {
        Action::VmsManage if job.owner_uid != caller.uid => Action::VmsManageAny,
        a => a,
    };
    Ok(Ready::new(vec![action], async move { b.jobs.cancel(id) }))
}

/// What the caller's objects take against their quotas, as (key, used, allowed): `vms`,
/// `running_vms`, `vcpus`, `memory_mib`, `disk_size` (bytes). A read of one's own: no action
/// needed.
pub async fn usage(b: &Banger, caller: &Caller) -> Result<Vec<(&'static str, u64, u64)>> {
    let u = b.vms.usage_of(caller.uid, "").await?;
    let q = b.vms.run_quota();
    Ok(vec![
        ("vms", u.owned.into(), b.vms.max_vms_per_user().into()),
        ("running_vms", u.active.into(), q.vms.into()),
        ("vcpus", u.vcpus.into(), q.vcpus.into()),
        ("memory_mib", u.memory_mib, q.memory_mib),
        ("disk_size", b.disk_use(caller.uid).await?, b.disk_quota()),
    ])
}

/// Whether `caller` holds `manage-any` (root does), asked without interaction: a read that
/// depends on it (what another user's VM runs) never prompts, and a member the shipped rules
/// only let an administrator's password through does not see it.
pub async fn manages_any(authority: &dyn crate::auth::Authority, caller: &Caller) -> bool {
    if caller.uid == crate::model::SYSTEM_UID {
        return true;
    }
    let quiet = Caller {
        interactive: false,
        ..caller.clone()
    };
    matches!(
        authority.check(&quiet, Action::VmsManageAny).await,
        Ok(crate::auth::Verdict::Allowed)
    )
}

/// `vm` as `caller` may see it: whole for its owner, root and holders of `manage-any`
/// (polkit asked only when the caller is none of the first two), else without what it runs.
pub async fn vm_seen_by(authority: &dyn crate::auth::Authority, caller: &Caller, vm: &Vm) -> Vm {
    vm.shown(vm.private_to(caller.uid) || manages_any(authority, caller).await)
}

/// A connected stream as a blocking descriptor for a caller in another process.
fn hand_out(s: tokio::net::UnixStream) -> Result<OwnedFd> {
    let fail = |e| Error::failed("Cannot hand out the stream", e);
    let s = s.into_std().map_err(fail)?;
    s.set_nonblocking(false).map_err(fail)?;
    Ok(OwnedFd::from(s))
}

/// `VM1.OpenAgent`: a stream to the running VM's agent.
pub async fn open_agent<'a>(
    b: &'a Banger,
    caller: &Caller,
    key: &str,
) -> Result<Ready<'a, OwnedFd>> {
    let (vm, action) = vm_for(b, caller, key).await?;
    Ok(Ready::new(vec![action], async move {
        hand_out(b.vms.open_agent(&vm).await?)
    }))
}

/// `VM1.OpenShell`: a stream to a shell on a terminal of its own, through the agent.
pub async fn open_shell<'a>(
    b: &'a Banger,
    caller: &Caller,
    key: &str,
    what: crate::agent::ExecRequest,
) -> Result<Ready<'a, OwnedFd>> {
    let (vm, action) = vm_for(b, caller, key).await?;
    Ok(Ready::new(vec![action], async move {
        let mut s = b.vms.open_agent(&vm).await?;
        crate::agent::client::start(&mut s, what).await?;
        hand_out(s)
    }))
}

/// `VM1.OpenConsole`: the serial console log of the VM's last boot, read-only.
pub async fn open_console<'a>(
    b: &'a Banger,
    caller: &Caller,
    key: &str,
) -> Result<Ready<'a, OwnedFd>> {
    let (vm, action) = vm_for(b, caller, key).await?;
    Ok(Ready::new(vec![action], async move {
        let log = b.vms.console_log(&vm.id);
        let f = crate::vmm::console::open_log_file(&log).map_err(|e| {
            Error::from(VmError::Missing(format!(
                "VM {} has no console log yet ({e}); it has not booted",
                vm.name
            )))
        })?;
        Ok(OwnedFd::from(f))
    }))
}

pub mod request;

#[cfg(test)]
mod tests;
