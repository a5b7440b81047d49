//! The image service: listing and lookup now; pull, register, promote, build and delete land
//! with the images issue, behind the same signatures.

use std::path::PathBuf;
use std::sync::Arc;

use crate::jobs::Job;
use crate::layout::Layout;
use crate::model::{validate_name, Image, NameKind};
use crate::service::Events;
use crate::store::{rows, Store};
use crate::{Error, Result};

/// Options of `PullImage`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PullOptions {
    /// The image name; derived from the ref when absent.
    pub name: Option<String>,
    /// The kernel the image boots with by default.
    pub kernel: Option<String>,
    /// The root filesystem size in bytes.
    pub size: Option<u64>,
    /// Allow plain HTTP and unverified TLS to the registry.
    pub insecure: bool,
}

/// Options of `RegisterImage`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegisterOptions {
    /// The root filesystem file.
    pub rootfs: Option<PathBuf>,
    /// The work seed file.
    pub work_seed: Option<PathBuf>,
    /// A kernel by name, exclusive with the paths below.
    pub kernel: Option<String>,
    /// A kernel file.
    pub kernel_path: Option<PathBuf>,
    /// An initrd file.
    pub initrd_path: Option<PathBuf>,
    /// A modules directory.
    pub modules_dir: Option<PathBuf>,
}

/// Options of `BuildImage`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BuildOptions {
    /// The Debian suite.
    pub suite: Option<String>,
    /// Extra packages.
    pub packages: Vec<String>,
    /// The root filesystem size in bytes.
    pub size: Option<u64>,
    /// The default kernel.
    pub kernel: Option<String>,
}

impl RegisterOptions {
    /// Checks the options that do not need the filesystem.
    pub fn validate(&self) -> Result<()> {
        let paths = self.kernel_path.is_some() || self.initrd_path.is_some();
        if self.kernel.is_some() && (paths || self.modules_dir.is_some()) {
            return Err(Error::InvalidArgument(
                "Give either 'kernel' (a kernel name) or 'kernel_path'/'initrd_path'/'modules_dir', not both".into(),
            ));
        }
        for p in [
            &self.rootfs,
            &self.work_seed,
            &self.kernel_path,
            &self.initrd_path,
            &self.modules_dir,
        ]
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

/// The image service.
pub struct Images {
    store: Store,
    #[allow(dead_code)] // used by pulls, with the images issue
    layout: Layout,
    #[allow(dead_code)]
    events: Events,
}

impl Images {
    /// A service over the store and layout.
    pub fn new(store: Store, layout: Layout, events: Events) -> Self {
        Images {
            store,
            layout,
            events,
        }
    }

    /// Every image.
    pub async fn list(&self) -> Result<Vec<Image>> {
        self.store.call(|c| rows::list_images(c)).await
    }

    /// The image whose name or id is `key`.
    pub async fn get(&self, key: &str) -> Result<Image> {
        let k = key.to_owned();
        self.store
            .call(move |c| rows::find_image(c, &k))
            .await?
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "No image {key:?}; `banger image list` shows the images"
                ))
            })
    }

    /// Checks `PullImage`'s arguments before authorisation.
    pub fn validate_pull(&self, reference: &str, opts: &PullOptions) -> Result<()> {
        if reference.is_empty()
            || reference
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(Error::InvalidArgument(format!(
                "Invalid image reference {reference:?}; use e.g. docker.io/library/debian:bookworm"
            )));
        }
        if let Some(n) = &opts.name {
            validate_name(NameKind::Image, n)?;
        }
        if let Some(k) = &opts.kernel {
            validate_name(NameKind::Kernel, k)?;
        }
        Ok(())
    }

    /// Pulls an image as a job.
    pub async fn pull(&self, _uid: u32, _reference: &str, _opts: PullOptions) -> Result<Arc<Job>> {
        Err(Error::NotImplemented("PullImage"))
    }

    /// Registers files as an unmanaged image.
    pub async fn register(&self, _name: &str, _opts: RegisterOptions) -> Result<Image> {
        Err(Error::NotImplemented("RegisterImage"))
    }

    /// Copies an unmanaged image into managed storage, as a job.
    pub async fn promote(&self, _uid: u32, _key: &str) -> Result<Arc<Job>> {
        Err(Error::NotImplemented("PromoteImage"))
    }

    /// Builds an image with debootstrap, as a job.
    pub async fn build(&self, _uid: u32, _name: &str, _opts: BuildOptions) -> Result<Arc<Job>> {
        Err(Error::NotImplemented("BuildImage"))
    }

    /// Deletes an image no VM uses.
    pub async fn delete(&self, _key: &str) -> Result<()> {
        Err(Error::NotImplemented("DeleteImage"))
    }
}
