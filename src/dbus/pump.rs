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
use crate::jobs::{Job, JobEvent, JobState};
use crate::service::ObjectEvent;

/// Which jobs' objects are on the bus, so a method can return a job path only once it works.
pub struct JobRegistry {
    published: watch::Sender<BTreeSet<u32>>,
}

impl Default for JobRegistry {
    fn default() -> Self {
        JobRegistry {
            published: watch::Sender::new(BTreeSet::new()),
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
}

/// Starts the pump. Subscribes before returning, so no event after this call is missed.
pub fn spawn(conn: Connection, ctx: Ctx) {
    let mut job_rx = ctx.banger.jobs.subscribe();
    let mut obj_rx = ctx.banger.events.subscribe();
    tokio::spawn(async move {
        loop {
            let r = tokio::select! {
                e = job_rx.recv() => match e {
                    Ok(e) => on_job(&conn, &ctx, e).await,
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!("D-Bus pump lagged {n} job events; resyncing job objects");
                        resync_jobs(&conn, &ctx).await
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                },
                e = obj_rx.recv() => match e {
                    Ok(e) => on_object(&conn, &ctx, e).await,
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!("D-Bus pump lagged {n} object events");
                        Ok(())
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

async fn resync_jobs(conn: &Connection, ctx: &Ctx) -> zbus::Result<()> {
    let known = ctx.registry.published.borrow().clone();
    for j in ctx.banger.jobs.list() {
        if !known.contains(&j.id) {
            publish_job(conn, ctx, j.id).await?;
        }
    }
    Ok(())
}

async fn on_job(conn: &Connection, ctx: &Ctx, e: JobEvent) -> zbus::Result<()> {
    let server = conn.object_server();
    match e {
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
            jobs::Jobs1::job_removed(&manager(conn)?, id, job_path(id), state.as_str()).await?;
            changed?;
        }
    }
    Ok(())
}

async fn on_object(conn: &Connection, ctx: &Ctx, e: ObjectEvent) -> zbus::Result<()> {
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
                .at(
                    path.clone(),
                    vm::Vm1 {
                        vm: v,
                        ctx: ctx.clone(),
                    },
                )
                .await?;
            vms::Vms1::vm_new(&manager(conn)?, &id, path).await?;
        }
        ObjectEvent::VmChanged(v) => {
            let i = server.interface::<_, vm::Vm1>(vm_path(&v.id)).await?;
            let mut obj = i.get_mut().await;
            let old = std::mem::replace(&mut obj.vm, v);
            let em = i.signal_emitter();
            if old.state != obj.vm.state {
                obj.state_changed(em).await?;
            }
            if old.stage != obj.vm.stage {
                obj.stage_changed(em).await?;
            }
            if old.guest_address != obj.vm.guest_address {
                obj.guest_address_changed(em).await?;
            }
            if old.ssh_address != obj.vm.ssh_address {
                obj.s_s_h_address_changed(em).await?;
            }
            if old.ssh_host_key != obj.vm.ssh_host_key {
                obj.s_s_h_host_key_changed(em).await?;
            }
            if old.exit_status != obj.vm.exit_status {
                obj.exit_status_changed(em).await?;
            }
            if (old.vcpus, old.memory_mib) != (obj.vm.vcpus, obj.vm.memory_mib) {
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
    }
    Ok(())
}
