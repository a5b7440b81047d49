//! The image service. Pulls do all their work in a staging directory with no global lock;
//! only publication (re-check the name, rename staging → `images/<id>`, insert the row) and
//! deletion (lookup, reference check, row delete) hold the images lock.

mod build;
mod error;
mod finish;
mod publish;
pub(crate) mod pull;
mod register;

pub use build::host_mirror;
pub use error::ImageError;

use std::sync::Arc;

use crate::callerfile::CallerInput;
use crate::config::Config;
use crate::events::{Events, ObjectEvent};
use crate::jobs::Jobs;
use crate::layout::Layout;
use crate::model::{usable_by, use_refusal, validate_name, Image, NameKind, SYSTEM_UID};
use crate::store::{rows, Store};
use crate::{Error, Result};
use error::{failed, invalid};

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
    /// Ports to wait for; the image's `org.banger.ready_ports` label when absent.
    pub ready_ports: Option<Vec<u16>>,
    /// Registry credentials; the operator's `auth_file` entry for the registry when absent.
    pub auth: Option<crate::oci::auth::Credentials>,
}

/// Options of `RegisterImage`: the caller's files, each taken once at call time.
#[derive(Debug, Default)]
pub struct RegisterOptions {
    /// The root filesystem file.
    pub rootfs: Option<CallerInput>,
    /// The work seed file.
    pub work_seed: Option<CallerInput>,
    /// A kernel by name, exclusive with the files below.
    pub kernel: Option<String>,
    /// A kernel file.
    pub kernel_path: Option<CallerInput>,
    /// An initrd file.
    pub initrd_path: Option<CallerInput>,
    /// A modules directory.
    pub modules_dir: Option<CallerInput>,
    /// Ports to wait for (kept from the earlier registration when absent).
    pub ready_ports: Option<Vec<u16>>,
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
    /// Ports to wait for.
    pub ready_ports: Vec<u16>,
    /// An account to make (uid 1000, its home, passwordless sudo when the image has sudo),
    /// which the image's commands, terminals and files then default to, in its home.
    pub user: Option<String>,
}

impl BuildOptions {
    /// Whether these are the default image's own recipe (a size aside): the only build a
    /// member may make under the system's image name.
    pub fn is_default_recipe(&self) -> bool {
        self.suite.as_deref().is_none_or(|s| s == "bookworm")
            && self.packages.is_empty()
            && self.kernel.is_none()
            && self.ready_ports.is_empty()
            && self.user.is_none()
    }
}

impl RegisterOptions {
    /// Checks the options that do not need the filesystem.
    pub fn validate(&self) -> Result<()> {
        let paths = self.kernel_path.is_some() || self.initrd_path.is_some();
        if self.kernel.is_some() && (paths || self.modules_dir.is_some()) {
            return Err(invalid(
                "Give either 'kernel' (a kernel name) or 'kernel_path'/'initrd_path'/'modules_dir', not both",
            ));
        }
        if self.kernel_path.is_none() && (self.initrd_path.is_some() || self.modules_dir.is_some())
        {
            return Err(invalid(
                "'initrd_path' and 'modules_dir' go with 'kernel_path', the kernel file",
            ));
        }
        if self.rootfs.is_none() {
            return Err(invalid(
                "RegisterImage needs 'rootfs', the root filesystem image file",
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
}

/// Pulls started for VMs, by user and reference.
type SharedPulls = std::collections::HashMap<(u32, String), Arc<crate::jobs::Job>>;

/// The image service; cheap to clone.
#[derive(Clone)]
pub struct Images {
    store: Store,
    layout: Layout,
    events: Events,
    jobs: Jobs,
    config: Arc<Config>,
    /// `images/`: publication and deletion in the one order (see `shelf`), and the lock
    /// they hold, never over downloads or builds.
    shelf: crate::shelf::Shelf,
    /// Pulls started for VMs by reference, so creates from one missing image share one.
    shared_pulls: Arc<tokio::sync::Mutex<SharedPulls>>,
    /// The download cache (`cache/oci/`): every pull reads it under a shared hold, and a
    /// prune empties it only while it holds it alone.
    cache_lock: Arc<tokio::sync::RwLock<()>>,
}

impl Images {
    /// A service over the store and layout.
    pub fn new(store: Store, layout: Layout, events: Events, jobs: Jobs, config: Config) -> Self {
        let shelf = crate::shelf::Shelf::new("image", layout.images_dir(), store.clone());
        Images {
            store,
            layout,
            events,
            jobs,
            config: Arc::new(config),
            shelf,
            shared_pulls: Default::default(),
            cache_lock: Default::default(),
        }
    }

    /// Empties the download cache (the registry blobs pulls keep for the next pull; no image
    /// needs them once published): waits for running pulls, holds new ones back while it
    /// works. Returns the bytes and blobs removed.
    pub async fn prune_cache(&self) -> Result<(u64, u32)> {
        use std::os::unix::fs::MetadataExt;
        let _alone = self.cache_lock.write().await;
        let dir = self.layout.oci_cache_dir().join("sha256");
        tokio::task::spawn_blocking(move || {
            let (mut bytes, mut blobs) = (0u64, 0u32);
            let entries = match std::fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((0, 0)),
                Err(e) => return Err(failed(format!("Cannot read {}", dir.display()), e)),
            };
            for e in entries.flatten() {
                // Only plain files are blobs (or a download's leftover); nothing is followed.
                let Ok(m) = e.metadata() else { continue };
                if !m.file_type().is_file() {
                    continue;
                }
                std::fs::remove_file(e.path())
                    .map_err(|err| failed(format!("Cannot remove {}", e.path().display()), err))?;
                bytes += m.blocks() * 512;
                blobs += 1;
            }
            Ok((bytes, blobs))
        })
        .await
        .map_err(|e| {
            failed(
                "The cache prune failed",
                std::io::Error::other(e.to_string()),
            )
        })?
    }

    /// A hold on the download cache for a pull (see [`Images::prune_cache`]).
    pub(crate) async fn cache_hold(&self) -> tokio::sync::OwnedRwLockReadGuard<()> {
        self.cache_lock.clone().read_owned().await
    }

    /// Whether `name` can be pulled: a catalog entry or an OCI reference.
    pub fn pullable(&self, name: &str) -> bool {
        self.config.image_entry(name).is_some() || crate::oci::reference::parse(name).is_ok()
    }

    /// The image a pull of `reference` made that `uid` may boot (theirs or the system's):
    /// the catalog entry's name, or the newest image whose source is that reference.
    pub async fn pulled(&self, uid: u32, reference: &str) -> Result<Option<Image>> {
        if let Some(entry) = self.config.image_entry(reference) {
            let name = entry.name.clone();
            return self.store.call(move |c| rows::find_image(c, &name)).await;
        }
        let Ok(r) = crate::oci::reference::parse(reference) else {
            return Ok(None);
        };
        let whole = r.whole();
        Ok(self
            .list()
            .await?
            .into_iter()
            .filter(|i| i.source == whole && usable_by(i.owner_uid, uid))
            .max_by_key(|i| i.created_at))
    }

    /// Pulls `reference` for a VM of `uid`, or joins the pull of it another create of the
    /// same user started (another user's pull makes an image that is theirs).
    pub async fn pull_shared(&self, uid: u32, reference: &str) -> Result<Arc<crate::jobs::Job>> {
        let mut pulls = self.shared_pulls.lock().await;
        pulls.retain(|_, j| j.status().state == crate::jobs::JobState::Running);
        let key = (uid, reference.to_owned());
        if let Some(j) = pulls.get(&key) {
            return Ok(j.clone());
        }
        let job = self.pull(uid, reference, PullOptions::default()).await?;
        pulls.insert(key, job.clone());
        Ok(job)
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
            .ok_or_else(|| self.not_found(key))
    }

    /// Checks `PullImage`'s arguments before authorisation.
    pub fn validate_pull(&self, reference: &str, opts: &PullOptions) -> Result<()> {
        if self.config.image_entry(reference).is_none() {
            crate::oci::reference::parse(reference)?;
        }
        if let Some(n) = &opts.name {
            validate_name(NameKind::Image, n)?;
        }
        if let Some(k) = &opts.kernel {
            validate_name(NameKind::Kernel, k)?;
        }
        Ok(())
    }

    /// Deletes an image no VM or snapshot uses: the row under the shelf's lock, then the
    /// files (`shelf`). Registered images have their copies in the store too; an image
    /// registered by path by an older banger has no directory there (nothing to remove), and
    /// its files are the caller's.
    pub async fn delete(&self, key: &str) -> Result<()> {
        let (k, missing) = (key.to_owned(), self.not_found(key));
        let image = self
            .shelf
            .delete(move |c| {
                let Some(image) = rows::find_image(c, &k)? else {
                    return Ok(Err(missing));
                };
                // Snapshots' root disks layer on the image as VMs' do.
                let users = rows::vms_using_image(c, &image.id)?
                    + rows::snapshots_using_image(c, &image.id)?;
                if users > 0 {
                    return Ok(Err(ImageError::InUse {
                        name: k,
                        users,
                        next: "VM(s) or snapshot(s); delete them first (`banger vm list`, \
                               `banger snapshot list`)",
                    }
                    .into()));
                }
                rows::delete_image(c, &image.id)?;
                let id = image.id.clone();
                Ok(Ok((image, id)))
            })
            .await?;
        tracing::info!(image_id = %image.id, "Image {} deleted", image.name);
        self.events.send(ObjectEvent::ImageRemoved(image.id));
        Ok(())
    }

    /// Refuses an image whose files are not banger's own (registered by path by an older
    /// banger, which kept the caller's paths): a VMM must never open a path a caller controls.
    pub fn check_in_store(&self, image: &Image) -> Result<()> {
        let dir = self.layout.images_dir().join(&image.id);
        let inside = |p: &std::path::Path| p.starts_with(&dir);
        if inside(&image.rootfs_path) && image.work_seed_path.as_deref().is_none_or(inside) {
            return Ok(());
        }
        Err(invalid(format!(
            "Image {:?} was registered by path by an older banger and its files are not banger's own; \
             run `banger image promote {}` (it copies them, reading as you) or register it again",
            image.name, image.name
        )))
    }

    /// Whether `name` is the system's: the default image's or a catalog entry's. Only the
    /// system's image may carry it, so no member's image stands in for the one everyone's
    /// `banger vm run` boots.
    pub fn reserved(&self, name: &str) -> bool {
        name == self.config.default_image
            || name == build::DEFAULT_IMAGE
            || self.config.image_entry(name).is_some()
    }

    /// Refuses `name` for a new image of `owner`: taken (by anyone: names are one namespace
    /// for every user, so a name never resolves to another user's image), or the system's
    /// and `owner` is not.
    async fn check_name_free(&self, name: &str, owner: u32, next: &'static str) -> Result<()> {
        let n = name.to_owned();
        let existing = self.store.call(move |c| rows::find_image(c, &n)).await?;
        if let Some(i) = existing {
            return Err(ImageError::NameTaken {
                name: name.to_owned(),
                owner: i.owner_uid,
                next,
            }
            .into());
        }
        if owner != SYSTEM_UID && self.reserved(name) {
            return Err(reserved_error(name));
        }
        Ok(())
    }

    /// The name a pull without `--name` gives an image of `owner`: the reference's, or,
    /// when another user's image (or the system's name) has that, the same with the
    /// owner's uid after it, so two users pulling one reference each get an image.
    async fn derived_name(&self, base: &str, owner: u32) -> Result<String> {
        let b = base.to_owned();
        let existing = self.store.call(move |c| rows::find_image(c, &b)).await?;
        let theirs = existing.is_some_and(|i| i.owner_uid != owner);
        if theirs || (owner != SYSTEM_UID && self.reserved(base)) {
            return Ok(format!("{base}-u{owner}"));
        }
        Ok(base.to_owned())
    }

    /// Refuses an image that `uid` may not boot: another user's (not theirs, not the
    /// system's), unless an administrator's `manage-any` was granted (`any`).
    pub fn check_usable(image: &Image, uid: u32, any: bool) -> Result<()> {
        let (name, owner) = (&image.name, image.owner_uid);
        match use_refusal("Image", name, owner, uid, any, "banger image list") {
            None => Ok(()),
            Some(why) => Err(ImageError::Foreign(why).into()),
        }
    }

    fn not_found(&self, key: &str) -> Error {
        ImageError::NotFound(key.to_owned()).into()
    }
}

/// The refusal of the system's image name to a member's own image.
pub(crate) fn reserved_error(name: &str) -> Error {
    ImageError::Reserved(format!(
        "{name:?} is the system's image name (the default image or a catalog entry); only \
         the system's image may have it: pick another name"
    ))
    .into()
}
