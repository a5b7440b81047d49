//! `PullImage`: registry → verified blob cache → flattened tree → guest assets → ext4 →
//! work seed → publish. Everything before publication runs in `images/.staging-<id>` with
//! no lock held.

use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use oci_client::Reference;

use super::publish::Staging;
use super::{Images, PullOptions};
use crate::auth::Action;
use crate::jobs::{Job, JobContext, JobSpec};
use crate::model::{new_id, now_us, validate_name, Image, NameKind};
use crate::oci::flatten::{Flattener, Limits};
use crate::oci::inroot::Root;
use crate::oci::reference;
use crate::oci::registry::{layer_compression, Compression, Registry};
use crate::store::rows;
use crate::{ext4, guest, Error, Result};

const GIB: u64 = 1 << 30;

async fn blocking<T: Send + 'static>(
    what: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::failed(format!("{what} task failed"), e))?
}

fn open_layer(path: &Path, c: Compression) -> Result<Box<dyn Read + Send>> {
    let f =
        std::fs::File::open(path).map_err(|e| Error::failed("Cannot open a cached layer", e))?;
    let r = BufReader::with_capacity(1 << 20, f);
    Ok(match c {
        Compression::None => Box::new(r),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(r)),
        Compression::Zstd => Box::new(
            zstd::stream::read::Decoder::with_buffer(r)
                .map_err(|e| Error::failed("Cannot read a zstd layer", e))?,
        ),
    })
}

impl Images {
    /// Starts pulling `reference` as a job; fails at once on a bad reference or a taken name.
    pub async fn pull(&self, uid: u32, reference: &str, opts: PullOptions) -> Result<Arc<Job>> {
        let r = reference::parse(reference)?;
        let name = opts
            .name
            .clone()
            .unwrap_or_else(|| reference::default_name(&r));
        validate_name(NameKind::Image, &name)?;
        let n = name.clone();
        if self
            .store
            .call(move |c| Ok(rows::find_image(c, &n)?.is_some()))
            .await?
        {
            return Err(Error::AlreadyExists(format!(
                "An image named {name:?} exists; pass another name (--name) or delete it first"
            )));
        }
        let spec = JobSpec {
            kind: "pull-image".into(),
            target: r.whole(),
            action: Action::ImagesManage,
            owner_uid: uid,
        };
        let this = self.clone();
        Ok(self.jobs.spawn(spec, move |ctx| async move {
            this.run_pull(ctx, r, name, opts).await.map(|_| ())
        }))
    }

    async fn run_pull(
        &self,
        ctx: JobContext,
        r: Reference,
        name: String,
        opts: PullOptions,
    ) -> Result<Image> {
        let id = new_id();
        let staging = Staging::create(
            self.layout
                .images_dir()
                .join(format!("{}{id}", crate::layout::STAGING_PREFIX)),
        )?;
        let dir = staging.path().to_owned();

        ctx.stage("resolve", format!("Resolving {}", r.whole()));
        let registry = Registry::new(opts.insecure);
        let (manifest, digest) = registry.manifest(&r).await?;
        let layers: Vec<_> = manifest
            .layers
            .iter()
            .map(|d| layer_compression(&d.media_type).map(|c| (d.clone(), c)))
            .collect::<Result<_>>()?;
        ctx.log(
            6,
            format!("{} is {digest}, {} layer(s)", r.whole(), layers.len()),
        );

        ctx.stage("fetch", format!("Fetching {} layer(s)", layers.len()));
        let total: u64 = layers
            .iter()
            .map(|(d, _)| d.size.max(0) as u64)
            .sum::<u64>()
            .max(1);
        let cache = self.layout.oci_cache_dir();
        let mut done = 0u64;
        let mut blobs: Vec<(PathBuf, Compression)> = Vec::new();
        for (desc, c) in &layers {
            let base = done;
            let p = registry
                .fetch_blob(&r, desc, &cache, |got| {
                    ctx.progress(0.5 * (base + got) as f64 / total as f64)
                })
                .await?;
            done += desc.size.max(0) as u64;
            blobs.push((p, *c));
        }

        ctx.stage("flatten", "Applying layers in manifest order");
        ctx.progress(0.5);
        // gzip layers of OS images expand about 3×; 8× leaves room for more.
        let in_memory = self.layout.scratch_fits(total.saturating_mul(8));
        let scratch = if in_memory {
            Some(Staging::create(
                self.layout
                    .scratch_dir()
                    .join(format!("{}{id}", crate::layout::STAGING_PREFIX)),
            )?)
        } else {
            None
        };
        let tree = scratch
            .as_ref()
            .map(|s| s.path())
            .unwrap_or(&dir)
            .join("tree");
        ctx.log(7, format!("Flattening in {}", tree.display()));
        let limits = Limits {
            max_bytes: self.config.max_image_bytes,
            ..Limits::default()
        };
        let t = tree.clone();
        let stats = blocking("Flatten", move || {
            let mut f = Flattener::new(&t, limits, true)
                .map_err(|e| Error::failed("Cannot create the image tree", e))?;
            for (path, c) in blobs {
                f.apply_layer(open_layer(&path, c)?).map_err(|e| {
                    Error::InvalidArgument(
                        crate::Error::failed("Cannot flatten the image", e).full_message(),
                    )
                })?;
            }
            f.finish()
                .map_err(|e| Error::failed("Cannot flatten the image", e))
        })
        .await?;
        ctx.log(
            6,
            format!(
                "{} entries, {} bytes of files",
                stats.entries, stats.file_bytes
            ),
        );

        ctx.stage("inject", "Installing the banger guest agent");
        ctx.progress(0.65);
        let (t, agent) = (tree.clone(), self.config.guest_binary("banger-agent"));
        blocking("Inject", move || guest::inject(&t, &agent)).await?;

        ctx.stage("build_rootfs", "Building rootfs.ext4");
        ctx.progress(0.7);
        let (t, d) = (tree.clone(), dir.clone());
        let requested = opts.size;
        let size = blocking("mkfs", move || {
            let u =
                ext4::usage(&t).map_err(|e| Error::failed("Cannot measure the image tree", e))?;
            let size = ext4::size_for(u, requested, GIB);
            ext4::build(&t, &d.join("rootfs.ext4"), size, u, "rootfs")?;
            Ok(size)
        })
        .await?;

        ctx.stage("work_seed", "Building the work seed from /root");
        ctx.progress(0.85);
        let (t, d) = (tree.clone(), dir.clone());
        let seed = blocking("Work seed", move || {
            build_work_seed(&t, &d.join("work-seed.ext4"))
        })
        .await;
        let work_seed = match seed {
            Ok(true) => Some(self.layout.images_dir().join(&id).join("work-seed.ext4")),
            Ok(false) => None,
            Err(e) => {
                ctx.log(4, format!("No work seed: {}", e.full_message()));
                None
            }
        };
        blocking("Cleanup", move || crate::layout::remove_any(&tree)).await?;
        drop(scratch);

        ctx.stage("publish", format!("Publishing image {name}"));
        let image = Image {
            id: id.clone(),
            name,
            managed: true,
            source: r.whole(),
            rootfs_path: self.layout.images_dir().join(&id).join("rootfs.ext4"),
            work_seed_path: work_seed,
            kernel: opts.kernel,
            size_bytes: size,
            created_at: now_us(),
        };
        self.publish(staging, image).await
    }
}

/// Builds the work seed from the tree's `/root` (resolved inside the tree); false when the
/// image has no `/root`.
fn build_work_seed(tree: &Path, image: &Path) -> Result<bool> {
    let root = Root::create(tree).map_err(|e| Error::failed("Cannot open the image tree", e))?;
    let dir = match root.resolve_dir(Path::new("root"), false) {
        Ok((d, _)) => d,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(false),
        Err(e) => return Err(Error::failed("Cannot open the image's /root", e)),
    };
    let u = ext4::usage(&dir).map_err(|e| Error::failed("Cannot measure /root", e))?;
    let size = ext4::size_for(u, None, 64 << 20);
    ext4::build(&dir, image, size, u, "work")?;
    Ok(true)
}
