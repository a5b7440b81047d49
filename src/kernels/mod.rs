//! The kernel service: listing and lookup now; the catalog, pull, import and delete land with
//! the kernels issue, behind the same signatures.

use std::path::PathBuf;
use std::sync::Arc;

use crate::jobs::Job;
use crate::layout::Layout;
use crate::model::Kernel;
use crate::service::Events;
use crate::store::{rows, Store};
use crate::{Error, Result};

/// Options of `ImportKernel`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImportOptions {
    /// The kernel file (bzImage or ELF vmlinux).
    pub kernel_path: Option<PathBuf>,
    /// A ready initrd; banger builds one when absent.
    pub initrd_path: Option<PathBuf>,
    /// The modules directory.
    pub modules_dir: Option<PathBuf>,
}

impl ImportOptions {
    /// Checks the options that do not need the filesystem.
    pub fn validate(&self) -> Result<()> {
        if self.kernel_path.is_none() {
            return Err(Error::InvalidArgument(
                "ImportKernel needs 'kernel_path', the kernel file to import".into(),
            ));
        }
        for p in [&self.kernel_path, &self.initrd_path, &self.modules_dir]
            .into_iter()
            .flatten()
        {
            if !p.is_absolute() {
                return Err(Error::InvalidArgument(format!(
                    "{} is not an absolute path; the daemon does not know your working directory",
                    p.display()
                )));
            }
        }
        Ok(())
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

/// The kernel service.
pub struct Kernels {
    store: Store,
    #[allow(dead_code)] // used by pulls and imports, with the kernels issue
    layout: Layout,
    #[allow(dead_code)]
    events: Events,
}

impl Kernels {
    /// A service over the store and layout.
    pub fn new(store: Store, layout: Layout, events: Events) -> Self {
        Kernels {
            store,
            layout,
            events,
        }
    }

    /// Every installed kernel.
    pub async fn list(&self) -> Result<Vec<Kernel>> {
        self.store.call(|c| rows::list_kernels(c)).await
    }

    /// The embedded catalog.
    pub fn available(&self) -> Vec<CatalogKernel> {
        vec![CatalogKernel {
            name: "debian".into(),
            version: "stable".into(),
            description: "Debian stable's linux-image-amd64, through the host's apt".into(),
        }]
    }

    /// The installed kernel `name`.
    pub async fn get(&self, name: &str) -> Result<Kernel> {
        let n = name.to_owned();
        self.store
            .call(move |c| rows::find_kernel(c, &n))
            .await?
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "No kernel {name:?}; `banger kernel list` shows installed kernels and \
                 `banger kernel list --available` the catalog"
                ))
            })
    }

    /// Pulls a catalog kernel, as a job.
    pub async fn pull(&self, _uid: u32, _name: &str) -> Result<Arc<Job>> {
        Err(Error::NotImplemented("PullKernel"))
    }

    /// Imports kernel files.
    pub async fn import(&self, _name: &str, _opts: ImportOptions) -> Result<Kernel> {
        Err(Error::NotImplemented("ImportKernel"))
    }

    /// Deletes a kernel nothing uses.
    pub async fn delete(&self, _name: &str) -> Result<()> {
        Err(Error::NotImplemented("DeleteKernel"))
    }
}
