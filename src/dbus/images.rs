//! `org.banger.Images1` on the manager object.

use zbus::message::Header;
use zbus::object_server::SignalEmitter;
use zbus::{interface, Connection, OwnedObjectPath};

use super::options::request;
use super::{image_path, BusResult as Result, Ctx, OptionMap};
use crate::images::{BuildOptions, PullOptions, RegisterOptions};
use crate::ops;
use crate::ops::request::NoOptions;

/// The image manager.
pub struct Images1 {
    pub(super) ctx: Ctx,
}

/// Manages root filesystem images.
#[interface(name = "org.banger.Images1")]
impl Images1 {
    /// Lists every image as (id, name, managed, source, object path).
    async fn list_images(&self) -> Result<Vec<(String, String, bool, String, OwnedObjectPath)>> {
        let images = self.ctx.banger.images.list().await?;
        Ok(images
            .into_iter()
            .map(|i| {
                let path = image_path(&i.id);
                (i.id, i.name, i.managed, i.source, path)
            })
            .collect())
    }

    /// Returns the object path of the image with this name or id.
    async fn get_image(
        &self,
        #[zbus(connection)] conn: &Connection,
        name_or_id: &str,
    ) -> Result<OwnedObjectPath> {
        let path = image_path(&self.ctx.banger.images.get(name_or_id).await?.id);
        Ok(self.ctx.live::<super::image::Image1>(conn, path).await)
    }

    /// Pulls an image from the catalog or an OCI registry and builds a bootable ext4 from it.
    /// Options: name s, kernel s, size t, insecure b, ready_ports aq (default: the image label org.banger.ready_ports),
    /// auth s (user:password for the registry; default: the operator's auth_file). Returns the
    /// job at once.
    #[zbus(out_args("job_id", "job_path"))]
    async fn pull_image(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
        r#ref: &str,
        options: OptionMap,
    ) -> Result<(u32, OwnedObjectPath)> {
        let opts: PullOptions = request("PullImage", options)?;
        let c = self.ctx.caller(conn, &hdr).await?;
        let op = ops::pull_image(&self.ctx.banger, &c, r#ref, opts);
        let job = self.ctx.perform(&c, op).await?;
        Ok(self.ctx.job_reply(&job).await)
    }

    /// Registers the caller's files as an unmanaged image (re-registering updates it): they
    /// are copied now, read with the caller's rights, and never opened by path again.
    /// Options: rootfs h, work_seed h (descriptors the client opened, or absolute paths as s),
    /// kernel s, or kernel_path h, initrd_path h, modules_dir h; ready_ports aq.
    async fn register_image(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
        name: &str,
        options: OptionMap,
    ) -> Result<OwnedObjectPath> {
        let opts: RegisterOptions = request("RegisterImage", options)?;
        let c = self.ctx.caller(conn, &hdr).await?;
        let op = ops::register_image(&self.ctx.banger, &c, name, opts);
        Ok(image_path(&self.ctx.perform(&c, op).await?.id))
    }

    /// Makes a registered image managed. Returns the job at once.
    #[zbus(out_args("job_id", "job_path"))]
    async fn promote_image(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
        name_or_id: &str,
    ) -> Result<(u32, OwnedObjectPath)> {
        let c = self.ctx.caller(conn, &hdr).await?;
        let op = ops::promote_image(&self.ctx.banger, &c, name_or_id);
        let job = self.ctx.perform(&c, op).await?;
        Ok(self.ctx.job_reply(&job).await)
    }

    /// Builds a Debian image with debootstrap from the host's apt sources.
    /// Options: suite s, packages as, size t, kernel s, ready_ports aq, user s (an account,
    /// uid 1000, its home, passwordless sudo with the sudo package, that the image's commands,
    /// terminals and files default to). Returns the job at once.
    #[zbus(out_args("job_id", "job_path"))]
    async fn build_image(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
        name: &str,
        options: OptionMap,
    ) -> Result<(u32, OwnedObjectPath)> {
        let opts: BuildOptions = request("BuildImage", options)?;
        let c = self.ctx.caller(conn, &hdr).await?;
        let op = ops::build_image(&self.ctx.banger, &c, name, opts);
        let job = self.ctx.perform(&c, op).await?;
        Ok(self.ctx.job_reply(&job).await)
    }

    /// Makes the warm snapshot of an image now (a template VM of banger's own, snapshotted at
    /// ready), from which later VMs of this shape start instantly. Options: kernel s (the
    /// image's, else the default), vcpus u (2), memory_mib u (1024). Returns the job at once.
    #[zbus(out_args("job_id", "job_path"))]
    async fn warm_image(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
        name_or_id: &str,
        options: OptionMap,
    ) -> Result<(u32, OwnedObjectPath)> {
        let opts: ops::WarmOptions = request("WarmImage", options)?;
        let c = self.ctx.caller(conn, &hdr).await?;
        let op = ops::warm_image(&self.ctx.banger, &c, name_or_id, opts);
        let job = self.ctx.perform(&c, op).await?;
        Ok(self.ctx.job_reply(&job).await)
    }

    /// Deletes an image that no VM uses.
    async fn delete_image(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
        name_or_id: &str,
    ) -> Result<()> {
        let c = self.ctx.caller(conn, &hdr).await?;
        let op = ops::delete_image(&self.ctx.banger, &c, name_or_id);
        self.ctx.perform(&c, op).await
    }

    /// Empties the download cache (registry blobs kept for later pulls; no image needs
    /// them): returns the bytes and blobs removed. Needs `org.banger.vms.manage-any` (the
    /// cache is the system's). No options yet; an unknown one is refused.
    #[zbus(out_args("freed_bytes", "blobs"))]
    async fn prune_cache(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
        options: OptionMap,
    ) -> Result<(u64, u32)> {
        let NoOptions = request("PruneCache", options)?;
        let c = self.ctx.caller(conn, &hdr).await?;
        let op = ops::prune_cache(&self.ctx.banger, &c);
        self.ctx.perform(&c, op).await
    }

    /// An image was published.
    #[zbus(signal)]
    pub async fn image_new(
        e: &SignalEmitter<'_>,
        id: &str,
        path: OwnedObjectPath,
    ) -> zbus::Result<()>;

    /// An image was deleted.
    #[zbus(signal)]
    pub async fn image_removed(
        e: &SignalEmitter<'_>,
        id: &str,
        path: OwnedObjectPath,
    ) -> zbus::Result<()>;
}
