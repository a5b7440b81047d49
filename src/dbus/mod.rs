//! The D-Bus face of the services: one file per interface, each method converts its
//! arguments, identifies the caller, performs one operation of [`crate::ops`] (which
//! validates, names the polkit actions it needs, and runs once they are allowed) and maps the
//! error. No authorization decision and no file or process handling lives here.

mod error;
mod image;
mod images;
mod job;
mod jobs;
mod kernel;
mod kernels;
mod options;
pub use banger_api::proxy;
mod pump;
mod snapshot;
mod snapshots;
mod vm;
mod vms;

use std::sync::Arc;

use zbus::message::Header;
use zbus::{Connection, OwnedObjectPath};

pub use error::{BusError, BusResult};
pub use options::{request, OptionMap, Options};

use crate::auth::{Authority, Caller};
use crate::model::escape_path_label;
use crate::service::Banger;

/// The well-known bus name.
pub const BUS_NAME: &str = "org.banger";
/// The manager object.
pub const MANAGER_PATH: &str = "/org/banger";

/// The object path of an image.
pub fn image_path(id: &str) -> OwnedObjectPath {
    child_path("image", id)
}
/// The object path of a kernel (its name escaped as sd-bus does).
pub fn kernel_path(name: &str) -> OwnedObjectPath {
    child_path("kernel", &escape_path_label(name))
}
/// The object path of a VM.
pub fn vm_path(id: &str) -> OwnedObjectPath {
    child_path("vm", id)
}
/// The object path of a snapshot.
pub fn snapshot_path(id: &str) -> OwnedObjectPath {
    child_path("snapshot", id)
}
/// The object path of a job.
pub fn job_path(id: u32) -> OwnedObjectPath {
    child_path("job", &id.to_string())
}

/// `/org/banger/<kind>/<label>`; a label that is not a valid path element (never the case
/// for banger's hex ids and escaped names) is escaped rather than trusted.
fn child_path(kind: &str, label: &str) -> OwnedObjectPath {
    let raw = format!("{MANAGER_PATH}/{kind}/{label}");
    OwnedObjectPath::try_from(raw).unwrap_or_else(|_| {
        let escaped = format!("{MANAGER_PATH}/{kind}/{}", escape_path_label(label));
        // An escaped label is [A-Za-z0-9_]+, always a valid element.
        OwnedObjectPath::try_from(escaped).expect("escaped labels are valid path elements")
    })
}

/// What every interface object shares.
#[derive(Clone)]
pub struct Ctx {
    /// The services.
    pub banger: Arc<Banger>,
    /// Who decides authorisation.
    pub authority: Arc<dyn Authority>,
    registry: Arc<pump::JobRegistry>,
}

impl Ctx {
    /// Performs an operation for `caller` (see [`crate::ops`]): the operation checks its
    /// arguments and names the actions it needs, the authority is asked for each, then it
    /// runs.
    pub async fn perform<'a, T>(
        &self,
        caller: &Caller,
        op: impl std::future::Future<Output = crate::Result<crate::ops::Ready<'a, T>>>,
    ) -> BusResult<T> {
        // A mutating call in progress keeps the daemon from idling out under it.
        let _held = self.banger.jobs.hold();
        Ok(crate::ops::perform(self.authority.as_ref(), caller, op).await?)
    }

    /// The caller, for reads that depend on who asks.
    pub async fn caller(&self, conn: &Connection, hdr: &Header<'_>) -> BusResult<Caller> {
        Ok(Caller::from_header(conn, hdr).await?)
    }

    /// Waits until a just-started job's object is on the bus, so the path a method returns can
    /// be used at once; returns its `(id, path)`.
    pub async fn job_reply(&self, job: &crate::jobs::Job) -> (u32, OwnedObjectPath) {
        self.registry.wait_published(job).await;
        (job.id, job_path(job.id))
    }

    /// `path`, once its object answers on the bus with interface `I`: a path handed to a
    /// caller is one it can use at once.
    pub async fn live<I: zbus::object_server::Interface>(
        &self,
        conn: &Connection,
        path: OwnedObjectPath,
    ) -> OwnedObjectPath {
        self.registry.wait_exported::<I>(conn, &path).await;
        path
    }
}

/// Serves the manager object, every existing object, and the pumps that keep the bus in step
/// with the services. Call before requesting the bus name, so nothing is missing when callers
/// arrive.
pub async fn serve(
    conn: &Connection,
    banger: Arc<Banger>,
    authority: Arc<dyn Authority>,
) -> crate::Result<()> {
    let registry = Arc::new(pump::JobRegistry::default());
    let ctx = Ctx {
        banger: banger.clone(),
        authority,
        registry: registry.clone(),
    };
    let server = conn.object_server();
    let fail = |e: zbus::Error| crate::Error::failed("Cannot export the D-Bus objects", e);
    server
        .at(MANAGER_PATH, images::Images1 { ctx: ctx.clone() })
        .await
        .map_err(fail)?;
    server
        .at(MANAGER_PATH, kernels::Kernels1 { ctx: ctx.clone() })
        .await
        .map_err(fail)?;
    server
        .at(MANAGER_PATH, vms::Vms1 { ctx: ctx.clone() })
        .await
        .map_err(fail)?;
    server
        .at(MANAGER_PATH, jobs::Jobs1 { ctx: ctx.clone() })
        .await
        .map_err(fail)?;
    server
        .at(MANAGER_PATH, snapshots::Snapshots1 { ctx: ctx.clone() })
        .await
        .map_err(fail)?;

    let mut known = pump::Known::default();
    for i in banger.images.list().await? {
        known.images.insert(i.id.clone());
        server
            .at(image_path(&i.id), image::Image1 { image: i })
            .await
            .map_err(fail)?;
    }
    for k in banger.kernels.list().await? {
        known.kernels.insert(k.name.clone());
        server
            .at(kernel_path(&k.name), kernel::Kernel1 { kernel: k })
            .await
            .map_err(fail)?;
    }
    for v in banger.vms.list().await? {
        known.vms.insert(v.id.clone());
        server
            .at(vm_path(&v.id), vm::Vm1::new(v, ctx.clone()))
            .await
            .map_err(fail)?;
    }
    for s in banger.vms.snapshots().await? {
        known.snapshots.insert(s.id.clone());
        server
            .at(snapshot_path(&s.id), snapshot::Snapshot1 { snapshot: s })
            .await
            .map_err(fail)?;
    }
    // Registered last: it announces everything already below it once.
    server
        .at(MANAGER_PATH, zbus::fdo::ObjectManager)
        .await
        .map_err(fail)?;

    pump::spawn(conn.clone(), ctx, known);
    Ok(())
}
