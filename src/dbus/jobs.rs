//! `org.banger.Jobs1` on the manager object.

use zbus::message::Header;
use zbus::object_server::SignalEmitter;
use zbus::{interface, Connection, OwnedObjectPath};

use super::{job_path, BusResult as Result, Ctx};

/// The job manager.
pub struct Jobs1 {
    pub(super) ctx: Ctx,
}

/// Long operations: pulls, builds, creates.
#[interface(name = "org.banger.Jobs1")]
impl Jobs1 {
    /// Cancels a running job.
    async fn cancel_job(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
        id: u32,
    ) -> Result<()> {
        cancel(&self.ctx, conn, &hdr, id).await
    }

    /// Lists running jobs as (id, kind, target, progress, object path).
    async fn list_jobs(&self) -> Vec<(u32, String, String, f64, OwnedObjectPath)> {
        self.ctx
            .banger
            .jobs
            .list()
            .into_iter()
            .map(|j| {
                (
                    j.id,
                    j.kind.clone(),
                    j.target.clone(),
                    j.status().progress,
                    job_path(j.id),
                )
            })
            .collect()
    }

    /// The daemon's version.
    #[zbus(property(emits_changed_signal = "const"), name = "Version")]
    fn version(&self) -> String {
        crate::VERSION.to_owned()
    }

    /// A job was started.
    #[zbus(signal)]
    pub async fn job_new(e: &SignalEmitter<'_>, id: u32, path: OwnedObjectPath)
        -> zbus::Result<()>;

    /// A job finished with result done, failed or canceled; its object is gone.
    #[zbus(signal)]
    pub async fn job_removed(
        e: &SignalEmitter<'_>,
        id: u32,
        path: OwnedObjectPath,
        result: &str,
    ) -> zbus::Result<()>;
}

/// Cancels job `id` for the caller (see [`crate::ops::cancel_job`]).
pub(super) async fn cancel(ctx: &Ctx, conn: &Connection, hdr: &Header<'_>, id: u32) -> Result<()> {
    let c = ctx.caller(conn, hdr).await?;
    ctx.perform(&c, crate::ops::cancel_job(&ctx.banger, &c, id))
        .await
}
