//! `org.banger.Kernels1` on the manager object.

use zbus::message::Header;
use zbus::{interface, Connection, OwnedObjectPath};

use super::options::request;
use super::{kernel_path, BusResult as Result, Ctx, OptionMap};
use crate::kernels::ImportOptions;
use crate::ops;
use crate::ops::request::NoOptions;

/// The kernel manager.
pub struct Kernels1 {
    pub(super) ctx: Ctx,
}

/// Manages kernels: each a kernel, an initrd and a modules directory.
#[interface(name = "org.banger.Kernels1")]
impl Kernels1 {
    /// Lists installed kernels as (name, version, source, object path).
    async fn list_kernels(&self) -> Result<Vec<(String, String, String, OwnedObjectPath)>> {
        let kernels = self.ctx.banger.kernels.list().await?;
        Ok(kernels
            .into_iter()
            .map(|k| {
                let path = kernel_path(&k.name);
                (k.name, k.version, k.source, path)
            })
            .collect())
    }

    /// Lists the kernel catalog as (name, version, description).
    async fn list_available_kernels(&self) -> Result<Vec<(String, String, String)>> {
        Ok(self
            .ctx
            .banger
            .kernels
            .available()
            .into_iter()
            .map(|k| (k.name, k.version, k.description))
            .collect())
    }

    /// Returns the object path of the installed kernel with this name.
    async fn get_kernel(
        &self,
        #[zbus(connection)] conn: &Connection,
        name: &str,
    ) -> Result<OwnedObjectPath> {
        let path = kernel_path(&self.ctx.banger.kernels.get(name).await?.name);
        Ok(self.ctx.live::<super::kernel::Kernel1>(conn, path).await)
    }

    /// Pulls a kernel from the catalog. No options yet. Returns the job at once.
    #[zbus(out_args("job_id", "job_path"))]
    async fn pull_kernel(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
        name: &str,
        options: OptionMap,
    ) -> Result<(u32, OwnedObjectPath)> {
        let NoOptions = request("PullKernel", options)?;
        let c = self.ctx.caller(conn, &hdr).await?;
        let job = self
            .ctx
            .perform(&c, ops::pull_kernel(&self.ctx.banger, &c, name))
            .await?;
        Ok(self.ctx.job_reply(&job).await)
    }

    /// Imports kernel files under a name; banger builds the initrd when none is given.
    /// Options: kernel_path h (required), initrd_path h, modules_dir h: descriptors the client
    /// opened (or absolute paths as s, opened once with the caller's rights).
    async fn import_kernel(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
        name: &str,
        options: OptionMap,
    ) -> Result<OwnedObjectPath> {
        let opts: ImportOptions = request("ImportKernel", options)?;
        let c = self.ctx.caller(conn, &hdr).await?;
        let op = ops::import_kernel(&self.ctx.banger, &c, name, opts);
        Ok(kernel_path(&self.ctx.perform(&c, op).await?.name))
    }

    /// Deletes a kernel that no image or VM uses.
    async fn delete_kernel(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
        name: &str,
    ) -> Result<()> {
        let c = self.ctx.caller(conn, &hdr).await?;
        let op = ops::delete_kernel(&self.ctx.banger, &c, name);
        self.ctx.perform(&c, op).await
    }
}
