//! The tail every image build shares once it has a root tree: inject the guest assets, build
//! `rootfs.ext4` and the work seed, publish.

use std::path::{Path, PathBuf};

use super::error::failed;
use super::publish::Staging;
use super::Images;
use crate::jobs::JobContext;
use crate::model::{now_us, Image};
use crate::tree::inroot::Root;
use crate::{ext4, guest, Result};

const GIB: u64 = 1 << 30;

/// What the finished image is to be.
pub(super) struct TreeImage {
    pub id: String,
    pub name: String,
    pub source: String,
    pub kernel: Option<String>,
    pub size: Option<u64>,
    pub ready_ports: Vec<u16>,
    pub config: crate::model::ImageConfig,
    /// Who owns the image (see [`Image::owner_uid`]).
    pub owner_uid: u32,
}

pub(super) async fn blocking<T: Send + 'static>(
    what: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    crate::jobs::spawn_blocking(f)
        .await
        .map_err(|e| failed(format!("{what} task failed"), e))?
}

impl Images {
    /// Where to build the tree of image `id`: the tmpfs scratch directory when a tree of
    /// `expected` bytes fits there, else the image's staging directory `dir`.
    pub(super) fn tree_dir(
        &self,
        id: &str,
        dir: &Path,
        expected: u64,
    ) -> Result<(PathBuf, Option<Staging>)> {
        if self.layout.scratch_fits(expected) {
            let s = Staging::create(
                self.layout
                    .scratch_dir()
                    .join(format!("{}{id}", crate::layout::STAGING_PREFIX)),
            )?;
            Ok((s.path().join("tree"), Some(s)))
        } else {
            Ok((dir.join("tree"), None))
        }
    }

    /// Injects, builds the ext4 images and publishes the tree at `tree`.
    pub(super) async fn finish_tree(
        &self,
        ctx: &JobContext,
        staging: Staging,
        tree: PathBuf,
        scratch: Option<Staging>,
        t: TreeImage,
    ) -> Result<Image> {
        let dir = staging.path().to_owned();
        let scratch_tree = scratch.is_some();
        ctx.stage("inject", "Installing the banger guest agent");
        ctx.progress(0.65);
        let (tr, agent) = (tree.clone(), self.config.guest_binary("banger-agent"));
        let config = t.config.clone();
        blocking("Inject", move || {
            let mut tree = crate::tree::HostTree::create(&tr, true)
                .map_err(|e| failed("Cannot open the image tree", e))?;
            guest::inject(&mut tree, &agent)?;
            guest::inject_config(&mut tree, &config)
        })
        .await?;

        // The root filesystem and the work seed (from /root) are built at once: both only
        // read the tree.
        ctx.stage(
            "build_rootfs",
            "Building rootfs.ext4 and the work seed from /root",
        );
        ctx.progress(0.7);
        let (tr, d, requested) = (tree.clone(), dir.clone(), t.size);
        let rootfs = blocking("mkfs", move || {
            let u = ext4::usage(&tr).map_err(|e| failed("Cannot measure the image tree", e))?;
            let size = ext4::size_for(u, requested, GIB);
            ext4::build(&tr, &d.join("rootfs.ext4"), size, u, "rootfs")?;
            Ok(size)
        });
        let (tr, d) = (tree.clone(), dir.clone());
        let seed = blocking("Work seed", move || {
            build_work_seed(&tr, &d.join("work-seed.ext4"))
        });
        let (size, seed) = tokio::join!(rootfs, seed);
        let size = size?;
        let seed = match seed {
            Ok(seed) => seed,
            Err(e) => {
                ctx.log(4, format!("No work seed: {}", e.full_message()));
                false
            }
        };
        // A tree in the memory scratch goes after publication, off the job's path (a daemon
        // that dies first leaves it to the start-up sweep); one in the staging directory
        // must go before the directory becomes the image's.
        let cleanup = move || {
            let r = crate::layout::remove_any(&tree);
            drop(scratch);
            r
        };
        let later = if scratch_tree {
            Some(cleanup)
        } else {
            blocking("Cleanup", cleanup).await?;
            None
        };

        let published = self.publish_built(ctx, staging, t, size, seed).await;
        if let Some(cleanup) = later {
            tokio::task::spawn_blocking(move || {
                if let Err(e) = cleanup() {
                    tracing::warn!(
                        "Cannot remove an image's scratch tree: {}",
                        e.full_message()
                    );
                }
            });
        }
        published
    }

    /// Publishes a staging directory holding `rootfs.ext4` (and `work-seed.ext4` when
    /// `seed`).
    pub(super) async fn publish_built(
        &self,
        ctx: &JobContext,
        staging: Staging,
        t: TreeImage,
        size: u64,
        seed: bool,
    ) -> Result<Image> {
        ctx.stage("publish", format!("Publishing image {}", t.name));
        let final_dir = self.layout.images_dir().join(&t.id);
        let image = Image {
            id: t.id,
            name: t.name,
            managed: true,
            source: t.source,
            rootfs_path: final_dir.join("rootfs.ext4"),
            work_seed_path: seed.then(|| final_dir.join("work-seed.ext4")),
            kernel: t.kernel,
            size_bytes: size,
            created_at: now_us(),
            ready_ports: t.ready_ports,
            config: t.config,
            owner_uid: t.owner_uid,
        };
        self.publish(staging, image).await
    }
}

/// Builds the work seed from the tree's `/root` (resolved inside the tree); false when the
/// image has no `/root`.
fn build_work_seed(tree: &Path, image: &Path) -> Result<bool> {
    let root = Root::create(tree).map_err(|e| failed("Cannot open the image tree", e))?;
    let dir = match root.resolve_dir(Path::new("root"), false) {
        Ok((d, _)) => d,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(false),
        Err(e) => return Err(failed("Cannot open the image's /root", e)),
    };
    let u = ext4::usage(&dir).map_err(|e| failed("Cannot measure /root", e))?;
    let size = ext4::size_for(u, None, 64 << 20);
    ext4::build(&dir, image, size, u, "work")?;
    Ok(true)
}
