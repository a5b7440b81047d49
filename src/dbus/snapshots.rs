//! `org.banger.Snapshots1` on the manager object.

use zbus::message::Header;
use zbus::object_server::SignalEmitter;
use zbus::{interface, Connection, OwnedObjectPath};

use super::{snapshot_path, BusResult as Result, Ctx};

/// The snapshot manager.
pub struct Snapshots1 {
    pub(super) ctx: Ctx,
}

/// Manages snapshots of VMs (taken with VMs1.SnapshotVM, restored with CreateVM's snapshot
/// option).
#[interface(name = "org.banger.Snapshots1")]
impl Snapshots1 {
    /// Deletes a snapshot no VM's disks layer on (InUse otherwise); its owner, or an
    /// administrator.
    async fn delete_snapshot(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
        name_or_id: &str,
    ) -> Result<()> {
        let c = self.ctx.caller(conn, &hdr).await?;
        let op = crate::ops::delete_snapshot(&self.ctx.banger, &c, name_or_id);
        self.ctx.perform(&c, op).await
    }

    /// Lists snapshots as (id, name, VM id, object path).
    async fn list_snapshots(&self) -> Result<Vec<(String, String, String, OwnedObjectPath)>> {
        let snaps = self.ctx.banger.vms.snapshots().await?;
        Ok(snaps
            .into_iter()
            .map(|s| {
                let path = snapshot_path(&s.id);
                (s.id, s.name, s.vm_id, path)
            })
            .collect())
    }

    /// Returns the object path of the snapshot with this name or id.
    async fn get_snapshot(
        &self,
        #[zbus(connection)] conn: &Connection,
        name_or_id: &str,
    ) -> Result<OwnedObjectPath> {
        let path = snapshot_path(&self.ctx.banger.vms.snapshot(name_or_id).await?.id);
        Ok(self
            .ctx
            .live::<super::snapshot::Snapshot1>(conn, path)
            .await)
    }

    /// A snapshot was published.
    #[zbus(signal, name = "SnapshotNew")]
    pub async fn snapshot_new(
        e: &SignalEmitter<'_>,
        id: &str,
        path: OwnedObjectPath,
    ) -> zbus::Result<()>;

    /// A snapshot was deleted.
    #[zbus(signal, name = "SnapshotRemoved")]
    pub async fn snapshot_removed(
        e: &SignalEmitter<'_>,
        id: &str,
        path: OwnedObjectPath,
    ) -> zbus::Result<()>;
}
