//! Keeps the bus in step with the services: job events become Job1 objects, signals and
//! PropertiesChanged; object events become Image1/Kernel1/VM1 objects and the manager's
//! signals. One task handles both streams, so signals leave in the order things happened.

use std::collections::BTreeSet;

use tokio::sync::{broadcast, watch};
use zbus::object_server::SignalEmitter;
use zbus::Connection;

use super::{
    image, image_path, images, job, job_path, jobs, kernel, kernel_path, vm, vm_path, vms, Ctx,
    MANAGER_PATH,
};
use crate::events::ObjectEvent;
use crate::jobs::{Job, JobEvent, JobState};

/// Which jobs' objects are on the bus, so a method can return a job path only once it works.
pub struct JobRegistry {
    published: watch::Sender<BTreeSet<u32>>,
    /// Bumped after each object event is on the bus, for [`JobRegistry::wait_exported`].
    objects: watch::Sender<u64>,
    /// The jobs whose JobRemoved went out, the last [`ANNOUNCED`] of them: a resync announces
    /// the others' ends.
    announced: std::sync::Mutex<std::collections::VecDeque<u32>>,
}

/// How many announced job ends the registry remembers (more than the jobs keep).
const ANNOUNCED: usize = 1024;

impl Default for JobRegistry {
    fn default() -> Self {
        JobRegistry {
            published: watch::Sender::new(BTreeSet::new()),
            objects: watch::Sender::new(0),
            announced: Default::default(),
        }
    }
}

impl JobRegistry {
    /// Returns once the job's object is published, or the job already ended (then its object
    /// is gone or never needed).
    pub async fn wait_published(&self, job: &Job) {
        let mut rx = self.published.subscribe();
        let _ = rx
            .wait_for(|s| s.contains(&job.id) || job.status().state != JobState::Running)
            .await;
    }

    /// Returns once `path` answers with interface `I` (the pump exports a new object when its
    /// event arrives, which may be after the service returned it), or after 5 s.
    pub async fn wait_exported<I: zbus::object_server::Interface>(
        &self,
        conn: &Connection,
        path: &zbus::ObjectPath<'_>,
    ) {
        let mut rx = self.objects.subscribe();
        let server = conn.object_server();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            while server.interface::<_, I>(path).await.is_err() {
                if rx.changed().await.is_err() {
                    break;
                }
            }
        })
        .await;
    }
}

/// Starts the pump over the objects `known` that `serve` exported. Subscribes before
/// returning, so no event after this call is missed.
pub(super) fn spawn(conn: Connection, ctx: Ctx, mut known: Known) {
    let mut job_rx = ctx.banger.jobs.subscribe();
    let mut obj_rx = ctx.banger.events.subscribe();
    tokio::spawn(async move {
        loop {
            let r = tokio::select! {
                e = job_rx.recv() => match e {
                    Ok(e) => on_job(&conn, &ctx, e).await,
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!("D-Bus pump lagged {n} job events; resyncing jobs");
                        resync_jobs(&conn, &ctx).await
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                },
                e = obj_rx.recv() => match e {
                    Ok(e) => match known.fresh(e) {
                        Some(e) => on_object(&conn, &ctx, e).await,
                        None => Ok(()),
                    },
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!("D-Bus pump lagged {n} object events; resyncing objects");
                        resync_objects(&conn, &ctx, &mut known).await
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                },
            };
            if let Err(e) = r {
                tracing::warn!("Cannot update the bus: {e}");
            }
        }
    });
}

fn manager(conn: &Connection) -> zbus::Result<SignalEmitter<'static>> {
    SignalEmitter::new(conn, MANAGER_PATH)
}

async fn publish_job(conn: &Connection, ctx: &Ctx, id: u32) -> zbus::Result<()> {
    // A job that already ended is published too: its Finished event, next, reports how.
    if let Some(j) = ctx.banger.jobs.find(id) {
        let obj = job::Job1 {
            job: j,
            ctx: ctx.clone(),
        };
        conn.object_server().at(job_path(id), obj).await?;
    }
    ctx.registry.published.send_modify(|s| {
        s.insert(id);
    });
    Ok(())
}

/// After a lag: every running job is on the bus, and every job that ended since has its
/// object gone and its JobRemoved sent (a client waiting for a job's end gets it).
async fn resync_jobs(conn: &Connection, ctx: &Ctx) -> zbus::Result<()> {
    let known = ctx.registry.published.borrow().clone();
    for j in ctx.banger.jobs.list() {
        if !known.contains(&j.id) {
            publish_job(conn, ctx, j.id).await?;
        }
    }
    let announced: BTreeSet<u32> = ctx
        .registry
        .announced
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .copied()
        .collect();
    let mut ended: BTreeSet<u32> = known
        .into_iter()
        .filter(|id| ctx.banger.jobs.get(*id).is_err())
        .collect();
    ended.extend(ctx.banger.jobs.finished().iter().map(|j| j.id));
    for id in ended.into_iter().filter(|id| !announced.contains(id)) {
        let (state, error) = match ctx.banger.jobs.find(id) {
            Some(j) => {
                let s = j.status();
                (s.state, s.error)
            }
            // Ended so long ago that the daemon forgot how; its object must go all the same.
            None => (JobState::Failed, String::new()),
        };
        on_job(conn, ctx, JobEvent::Finished { id, state, error }).await?;
    }
    Ok(())
}

/// The objects on the bus, by kind (ids; kernel names), as `serve` exported them and the
/// object events left them.
#[derive(Default)]
pub(super) struct Known {
    pub(super) images: BTreeSet<String>,
    pub(super) kernels: BTreeSet<String>,
    pub(super) vms: BTreeSet<String>,
    pub(super) snapshots: BTreeSet<String>,
}

impl Known {
    /// `e` as the bus still needs it after a resync may have mirrored it already: an
    /// addition of a known object is a change (or nothing), a removal of an unknown one
    /// nothing.
    fn fresh(&mut self, e: ObjectEvent) -> Option<ObjectEvent> {
        if self.note(&e) {
            return Some(e);
        }
        match e {
            ObjectEvent::ImageAdded(i) => Some(ObjectEvent::ImageChanged(i)),
            ObjectEvent::VmAdded(v) => Some(ObjectEvent::VmChanged(v)),
            _ => None,
        }
    }

    /// Notes what `e` adds or removes; false when that was known already.
    fn note(&mut self, e: &ObjectEvent) -> bool {
        match e {
            ObjectEvent::ImageAdded(i) => self.images.insert(i.id.clone()),
            ObjectEvent::ImageRemoved(id) => self.images.remove(id),
            ObjectEvent::KernelAdded(k) => self.kernels.insert(k.name.clone()),
            ObjectEvent::KernelRemoved(n) => self.kernels.remove(n),
            ObjectEvent::VmAdded(v) => self.vms.insert(v.id.clone()),
            ObjectEvent::VmRemoved(id) => self.vms.remove(id),
            ObjectEvent::SnapshotAdded(s) => self.snapshots.insert(s.id.clone()),
            ObjectEvent::SnapshotRemoved(id) => self.snapshots.remove(id),
            _ => true,
        }
    }
}

/// The object events that bring `known` (what the bus shows) to what the services hold.
pub(super) fn object_diff(
    known: (
        &BTreeSet<String>,
        &BTreeSet<String>,
        &BTreeSet<String>,
        &BTreeSet<String>,
    ),
    now: (
        Vec<crate::model::Image>,
        Vec<crate::model::Kernel>,
        Vec<crate::model::Vm>,
        Vec<crate::model::Snapshot>,
    ),
) -> Vec<ObjectEvent> {
    let (ki, kk, kv, ks) = known;
    let (images, kernels, vms, snapshots) = now;
    let mut out = Vec::new();
    let gone = |known: &BTreeSet<String>, live: BTreeSet<String>| -> Vec<String> {
        known.difference(&live).cloned().collect()
    };
    let live: BTreeSet<String> = images.iter().map(|i| i.id.clone()).collect();
    out.extend(gone(ki, live).into_iter().map(ObjectEvent::ImageRemoved));
    for i in images {
        out.push(if ki.contains(&i.id) {
            ObjectEvent::ImageChanged(i)
        } else {
            ObjectEvent::ImageAdded(i)
        });
    }
    let live: BTreeSet<String> = kernels.iter().map(|k| k.name.clone()).collect();
    out.extend(gone(kk, live).into_iter().map(ObjectEvent::KernelRemoved));
    out.extend(
        kernels
            .into_iter()
            .filter(|k| !kk.contains(&k.name))
            .map(ObjectEvent::KernelAdded),
    );
    let live: BTreeSet<String> = vms.iter().map(|v| v.id.clone()).collect();
    out.extend(gone(kv, live).into_iter().map(ObjectEvent::VmRemoved));
    for v in vms {
        out.push(if kv.contains(&v.id) {
            ObjectEvent::VmChanged(v)
        } else {
            ObjectEvent::VmAdded(v)
        });
    }
    let live: BTreeSet<String> = snapshots.iter().map(|s| s.id.clone()).collect();
    out.extend(gone(ks, live).into_iter().map(ObjectEvent::SnapshotRemoved));
    out.extend(
        snapshots
            .into_iter()
            .filter(|s| !ks.contains(&s.id))
            .map(ObjectEvent::SnapshotAdded),
    );
    out
}

/// After a lag: objects added, changed or removed meanwhile are mirrored with their signals.
async fn resync_objects(conn: &Connection, ctx: &Ctx, known: &mut Known) -> zbus::Result<()> {
    let b = &ctx.banger;
    let fail = |e: crate::Error| zbus::Error::Failure(e.full_message());
    let now = (
        b.images.list().await.map_err(fail)?,
        b.kernels.list().await.map_err(fail)?,
        b.vms.list().await.map_err(fail)?,
        b.vms.snapshots().await.map_err(fail)?,
    );
    let events = object_diff(
        (&known.images, &known.kernels, &known.vms, &known.snapshots),
        now,
    );
    for e in events {
        known.note(&e);
        if let Err(err) = on_object(conn, ctx, e).await {
            tracing::warn!("Cannot update the bus: {err}");
        }
    }
    Ok(())
}

/// Whether the job's JobRemoved went out already.
fn announced(ctx: &Ctx, id: u32) -> bool {
    ctx.registry
        .announced
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .contains(&id)
}

async fn on_job(conn: &Connection, ctx: &Ctx, e: JobEvent) -> zbus::Result<()> {
    let server = conn.object_server();
    match e {
        // A resync published it already.
        JobEvent::New { id } if ctx.registry.published.borrow().contains(&id) => {}
        JobEvent::New { id } => {
            publish_job(conn, ctx, id).await?;
            jobs::Jobs1::job_new(&manager(conn)?, id, job_path(id)).await?;
        }
        JobEvent::StageChanged { id, stage, message } => {
            let e = SignalEmitter::new(conn, job_path(id))?;
            job::Job1::stage_entered(&e, &stage, &message).await?;
            if let Ok(i) = server.interface::<_, job::Job1>(job_path(id)).await {
                i.get().await.stage_changed(i.signal_emitter()).await?;
            }
        }
        JobEvent::Progress { id, .. } => {
            if let Ok(i) = server.interface::<_, job::Job1>(job_path(id)).await {
                i.get().await.progress_changed(i.signal_emitter()).await?;
            }
        }
        JobEvent::Log { id, priority, line } => {
            let e = SignalEmitter::new(conn, job_path(id))?;
            job::Job1::log_message(&e, priority, &line).await?;
        }
        JobEvent::Finished { id, .. } if announced(ctx, id) => {}
        JobEvent::Finished { id, state, .. } => {
            // JobRemoved goes out whatever became of the object: clients wait for it.
            let mut changed = Ok(());
            if let Ok(i) = server.interface::<_, job::Job1>(job_path(id)).await {
                let obj = i.get().await;
                let e = i.signal_emitter();
                changed = async {
                    obj.state_changed(e).await?;
                    obj.error_changed(e).await?;
                    obj.progress_changed(e).await
                }
                .await;
            }
            let _ = server.remove::<job::Job1, _>(job_path(id)).await;
            ctx.registry.published.send_modify(|s| {
                s.remove(&id);
            });
            {
                let mut a = ctx
                    .registry
                    .announced
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                a.push_back(id);
                if a.len() > ANNOUNCED {
                    a.pop_front();
                }
            }
            jobs::Jobs1::job_removed(&manager(conn)?, id, job_path(id), state.as_str()).await?;
            changed?;
        }
    }
    Ok(())
}

async fn on_object(conn: &Connection, ctx: &Ctx, e: ObjectEvent) -> zbus::Result<()> {
    let r = mirror_object(conn, ctx, e).await;
    ctx.registry.objects.send_modify(|n| *n += 1);
    r
}

async fn mirror_object(conn: &Connection, ctx: &Ctx, e: ObjectEvent) -> zbus::Result<()> {
    let server = conn.object_server();
    match e {
        ObjectEvent::ImageAdded(i) => {
            let (id, path) = (i.id.clone(), image_path(&i.id));
            server.at(path.clone(), image::Image1 { image: i }).await?;
            images::Images1::image_new(&manager(conn)?, &id, path).await?;
        }
        ObjectEvent::ImageChanged(i) => {
            let iface = server
                .interface::<_, image::Image1>(image_path(&i.id))
                .await?;
            let mut obj = iface.get_mut().await;
            obj.image = i;
            let em = iface.signal_emitter();
            obj.managed_changed(em).await?;
            obj.rootfs_path_changed(em).await?;
            obj.work_seed_path_changed(em).await?;
            obj.kernel_changed(em).await?;
            obj.size_bytes_changed(em).await?;
            obj.ready_ports_changed(em).await?;
            obj.env_changed(em).await?;
            obj.working_dir_changed(em).await?;
            obj.user_changed(em).await?;
            obj.entrypoint_changed(em).await?;
            obj.cmd_changed(em).await?;
        }
        ObjectEvent::ImageRemoved(id) => {
            server.remove::<image::Image1, _>(image_path(&id)).await?;
            images::Images1::image_removed(&manager(conn)?, &id, image_path(&id)).await?;
        }
        ObjectEvent::KernelAdded(k) => {
            server
                .at(kernel_path(&k.name), kernel::Kernel1 { kernel: k })
                .await?;
        }
        ObjectEvent::KernelRemoved(name) => {
            server
                .remove::<kernel::Kernel1, _>(kernel_path(&name))
                .await?;
        }
        ObjectEvent::VmAdded(v) => {
            let (id, path) = (v.id.clone(), vm_path(&v.id));
            server
                .at(path.clone(), vm::Vm1::new(v, ctx.clone()))
                .await?;
            vms::Vms1::vm_new(&manager(conn)?, &id, path).await?;
        }
        ObjectEvent::VmChanged(v) => {
            let i = server.interface::<_, vm::Vm1>(vm_path(&v.id)).await?;
            // A read lock: a method of this VM may be in progress, waiting for this pump.
            let obj = i.get().await;
            let old = obj.replace(v);
            let new = obj.vm().clone();
            let em = i.signal_emitter();
            if old.state != new.state {
                obj.state_changed(em).await?;
            }
            if old.stage != new.stage {
                obj.stage_changed(em).await?;
            }
            if old.guest_address != new.guest_address {
                obj.guest_address_changed(em).await?;
            }
            if old.ssh_address != new.ssh_address {
                obj.s_s_h_address_changed(em).await?;
            }
            if old.ssh_host_key != new.ssh_host_key {
                obj.s_s_h_host_key_changed(em).await?;
            }
            if old.exit_status != new.exit_status {
                obj.exit_status_changed(em).await?;
            }
            if old.expires_at != new.expires_at {
                obj.expires_at_changed(em).await?;
            }
            if (old.vcpus, old.memory_mib) != (new.vcpus, new.memory_mib) {
                obj.v_cpus_changed(em).await?;
                obj.memory_mi_b_changed(em).await?;
            }
        }
        ObjectEvent::VmRemoved(id) => {
            server.remove::<vm::Vm1, _>(vm_path(&id)).await?;
            vms::Vms1::vm_removed(&manager(conn)?, &id, vm_path(&id)).await?;
        }
        ObjectEvent::SnapshotAdded(s) => {
            let (id, path) = (s.id.clone(), super::snapshot_path(&s.id));
            server
                .at(path.clone(), super::snapshot::Snapshot1 { snapshot: s })
                .await?;
            super::snapshots::Snapshots1::snapshot_new(&manager(conn)?, &id, path).await?;
        }
        ObjectEvent::SnapshotRemoved(id) => {
            let path = super::snapshot_path(&id);
            server
                .remove::<super::snapshot::Snapshot1, _>(path.clone())
                .await?;
            super::snapshots::Snapshots1::snapshot_removed(&manager(conn)?, &id, path).await?;
        }
        ObjectEvent::CreateProgress {
            vm_id,
            stage,
            message,
        } => {
            vms::Vms1::create_progress(&manager(conn)?, vm_path(&vm_id), &stage, &message).await?;
        }
        ObjectEvent::VmStopped {
            vm_id,
            reason,
            exit_status,
        } => {
            vms::Vms1::vm_stopped(
                &manager(conn)?,
                &vm_id,
                vm_path(&vm_id),
                reason,
                exit_status,
            )
            .await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Snapshot, Vm};

    fn set(ids: &[&str]) -> BTreeSet<String> {
        ids.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_resync_adds_changes_and_removes_what_the_bus_missed() {
        let vm = |id: &str| Vm {
            id: id.into(),
            ..Default::default()
        };
        let snap = |id: &str| Snapshot {
            id: id.into(),
            ..Default::default()
        };
        let (images, kernels) = (set(&[]), set(&["gone-kernel"]));
        let (vms, snapshots) = (set(&["kept", "deleted"]), set(&["s-old"]));
        let events = object_diff(
            (&images, &kernels, &vms, &snapshots),
            (
                Vec::new(),
                Vec::new(),
                vec![vm("kept"), vm("new")],
                vec![snap("s-new")],
            ),
        );
        let names: Vec<String> = events
            .iter()
            .map(|e| match e {
                ObjectEvent::KernelRemoved(n) => format!("-kernel {n}"),
                ObjectEvent::VmRemoved(id) => format!("-vm {id}"),
                ObjectEvent::VmChanged(v) => format!("~vm {}", v.id),
                ObjectEvent::VmAdded(v) => format!("+vm {}", v.id),
                ObjectEvent::SnapshotRemoved(id) => format!("-snapshot {id}"),
                ObjectEvent::SnapshotAdded(s) => format!("+snapshot {}", s.id),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(
            names,
            [
                "-kernel gone-kernel",
                "-vm deleted",
                "~vm kept",
                "+vm new",
                "-snapshot s-old",
                "+snapshot s-new"
            ]
        );
        // Events still queued after the resync: a known addition becomes a change, a
        // removal of what is gone already nothing.
        let mut known = Known {
            vms: set(&["kept"]),
            ..Known::default()
        };
        assert!(matches!(
            known.fresh(ObjectEvent::VmAdded(vm("kept"))),
            Some(ObjectEvent::VmChanged(_))
        ));
        assert!(known
            .fresh(ObjectEvent::VmRemoved("never".into()))
            .is_none());
        assert!(known.fresh(ObjectEvent::VmRemoved("kept".into())).is_some());
    }
}
