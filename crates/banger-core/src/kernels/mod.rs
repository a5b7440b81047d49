//! The kernel service: kernels are triples (ELF vmlinux, initrd, modules) under
//! `kernels/<name>/`. Import copies a caller's files as that caller; publication and deletion
//! hold the kernels lock. Pulls from the catalog land with the rest of the kernels issue.

mod error;
mod import;
pub mod initrd;
mod pull;
#[cfg(test)]
mod tool_tests;
pub mod vmlinux;

pub use error::KernelError;

use std::path::PathBuf;
use std::sync::Arc;

use crate::callerfile::CallerInput;
use crate::events::{Events, ObjectEvent};
use crate::layout::Layout;
use crate::model::{owner_label, use_refusal, Kernel, SYSTEM_UID};
use crate::store::{rows, Store};
use crate::{Error, Result};
use error::invalid;

/// Options of `ImportKernel`: the caller's files, each taken once at call time.
#[derive(Debug, Default)]
pub struct ImportOptions {
    /// The kernel file (bzImage or ELF vmlinux).
    pub kernel_path: Option<CallerInput>,
    /// A ready initrd; banger builds one when absent.
    pub initrd_path: Option<CallerInput>,
    /// The modules directory.
    pub modules_dir: Option<CallerInput>,
}

impl ImportOptions {
    /// Checks the options that do not need the filesystem.
    pub fn validate(&self) -> Result<()> {
        if self.kernel_path.is_none() {
            return Err(invalid(
                "ImportKernel needs 'kernel_path', the kernel file to import",
            ));
        }
        for p in [&self.kernel_path, &self.initrd_path, &self.modules_dir]
            .into_iter()
            .flatten()
            .filter_map(|i| i.path())
        {
            if !p.is_absolute() {
                return Err(invalid(format!(
                    "{} is not an absolute path; the daemon does not know your working directory",
                    p.display()
                )));
            }
        }
        Ok(())
    }

    /// Files banger itself fetched (catalog pulls), by path, read as root.
    pub fn own_files(kernel: PathBuf, initrd: Option<PathBuf>, modules: Option<PathBuf>) -> Self {
        ImportOptions {
            kernel_path: Some(CallerInput::Path(kernel)),
            initrd_path: initrd.map(CallerInput::Path),
            modules_dir: modules.map(CallerInput::Path),
        }
    }
}

/// An entry of the kernel catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogKernel {
    /// The name `kernel pull` takes.
    pub name: String,
    /// The version it resolves to.
    pub version: String,
    /// What it is.
    pub description: String,
}

/// The kernel service; cheap to clone.
#[derive(Clone)]
pub struct Kernels {
    store: Store,
    layout: Layout,
    events: Events,
    config: Arc<crate::config::Config>,
    jobs: crate::jobs::Jobs,
    /// `kernels/`: publication and deletion in the one order (see `shelf`).
    shelf: crate::shelf::Shelf,
}

impl Kernels {
    /// A service over the store and layout.
    pub fn new(
        store: Store,
        layout: Layout,
        events: Events,
        jobs: crate::jobs::Jobs,
        config: crate::config::Config,
    ) -> Self {
        let shelf = crate::shelf::Shelf::new("kernel", layout.kernels_dir(), store.clone());
        Kernels {
            store,
            layout,
            events,
            jobs,
            config: Arc::new(config),
            shelf,
        }
    }

    /// Every installed kernel.
    pub async fn list(&self) -> Result<Vec<Kernel>> {
        self.store.call(|c| rows::list_kernels(c)).await
    }

    /// The installed kernel `name`.
    pub async fn get(&self, name: &str) -> Result<Kernel> {
        let n = name.to_owned();
        self.store
            .call(move |c| rows::find_kernel(c, &n))
            .await?
            .ok_or_else(|| self.not_found(name))
    }

    /// Deletes a kernel no image or VM uses: the row under the shelf's lock, then the files
    /// (`shelf`). `owner` is whose kernel the caller was authorised to delete: a kernel of
    /// that name made by someone else meanwhile stays.
    pub async fn delete(&self, name: &str, owner: u32) -> Result<()> {
        let (n, missing) = (name.to_owned(), self.not_found(name));
        self.shelf
            .delete(move |c| {
                match rows::find_kernel(c, &n)? {
                    None => return Ok(Err(missing)),
                    Some(k) if k.owner_uid != owner => {
                        return Ok(Err(KernelError::NameTaken(format!(
                            "Kernel {n:?} changed hands while the deletion was authorised; \
                             nothing was deleted"
                        ))
                        .into()))
                    }
                    Some(_) => {}
                }
                let users = rows::users_of_kernel(c, &n)?;
                if users > 0 {
                    return Ok(Err(KernelError::InUse { name: n, users }.into()));
                }
                rows::delete_kernel(c, &n)?;
                Ok(Ok(((), n)))
            })
            .await?;
        tracing::info!("Kernel {name} deleted");
        self.events
            .send(ObjectEvent::KernelRemoved(name.to_owned()));
        Ok(())
    }

    /// Whether a kernel named `name` is installed.
    async fn name_taken(&self, name: &str) -> Result<bool> {
        let n = name.to_owned();
        self.store
            .call(move |c| Ok(rows::find_kernel(c, &n)?.is_some()))
            .await
    }

    /// Refuses `name` for a new kernel of `owner`: installed already (names are one
    /// namespace for every user), or the system's (a catalog entry, the default kernel) and
    /// `owner` is not the system.
    async fn check_name_free(&self, name: &str, owner: u32) -> Result<()> {
        let n = name.to_owned();
        if let Some(k) = self.store.call(move |c| rows::find_kernel(c, &n)).await? {
            return Err(KernelError::NameTaken(format!(
                "A kernel named {name:?} exists ({}'s); delete it first or pick another name",
                owner_label(k.owner_uid)
            ))
            .into());
        }
        if owner != SYSTEM_UID && (self.in_catalog(name) || name == self.config.default_kernel) {
            return Err(KernelError::NameTaken(format!(
                "{name:?} is the system's kernel name (the catalog's or the default kernel); \
                 `banger kernel pull {name}` installs the system's, or import yours under \
                 another name"
            ))
            .into());
        }
        Ok(())
    }

    /// Refuses a kernel that `uid` may not boot or name: another user's (not theirs, not
    /// the system's), unless an administrator's `manage-any` was granted (`any`).
    pub fn check_usable(kernel: &Kernel, uid: u32, any: bool) -> Result<()> {
        let (name, owner) = (&kernel.name, kernel.owner_uid);
        match use_refusal("Kernel", name, owner, uid, any, "banger kernel list") {
            None => Ok(()),
            Some(why) => Err(KernelError::Foreign(why).into()),
        }
    }

    fn not_found(&self, name: &str) -> Error {
        KernelError::NotFound(name.to_owned()).into()
    }
}
