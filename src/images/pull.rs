//! `PullImage`: registry → verified blob cache → flattened tree → guest assets → ext4 →
//! work seed → publish. Everything before publication runs in `images/.staging-<id>` with
//! no lock held.

use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use oci_client::Reference;

use super::finish::{blocking, TreeImage};
use super::publish::Staging;
use super::{Images, PullOptions};
use crate::auth::Action;
use crate::jobs::{Job, JobContext, JobSpec};
use crate::model::{new_id, validate_name, Image, NameKind};
use crate::oci::flatten::{Flattener, Limits};
use crate::oci::reference;
use crate::oci::registry::{layer_compression, Compression, Registry};
use crate::{Error, Result};

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
        if self.name_taken(&name).await? {
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
        let ready_ports = match opts.ready_ports.clone() {
            Some(p) => p,
            None => {
                if !(0..=1 << 20).contains(&manifest.config.size) {
                    return Err(Error::InvalidArgument(format!(
                        "The image configuration of {} claims {} bytes; at most 1 MiB is read",
                        r.whole(),
                        manifest.config.size
                    )));
                }
                let config = registry
                    .fetch_blob(&r, &manifest.config, &self.layout.oci_cache_dir(), |_| {})
                    .await?;
                ready_ports_label(&config)?
            }
        };

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
        let (tree, scratch) = self.tree_dir(&id, &dir, total.saturating_mul(8))?;
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

        let t = TreeImage {
            id,
            name,
            source: r.whole(),
            kernel: opts.kernel,
            size: opts.size,
            ready_ports,
        };
        self.finish_tree(&ctx, staging, tree, scratch, t).await
    }
}

/// The OCI label an image declares its service ports with.
pub const READY_PORTS_LABEL: &str = "org.banger.ready_ports";

/// The ports of the `org.banger.ready_ports` label in an image config blob (none without it).
fn ready_ports_label(config: &std::path::Path) -> Result<Vec<u16>> {
    let text = std::fs::read(config)
        .map_err(|e| Error::failed("Cannot read the image configuration", e))?;
    let v: serde_json::Value = serde_json::from_slice(&text)
        .map_err(|e| Error::InvalidArgument(format!("The image configuration is not JSON: {e}")))?;
    match v["config"]["Labels"][READY_PORTS_LABEL].as_str() {
        Some(s) => crate::model::parse_ready_ports(s).map_err(|e| {
            Error::InvalidArgument(format!("The image's label {READY_PORTS_LABEL}: {e}"))
        }),
        None => Ok(Vec::new()),
    }
}

#[cfg(test)]
mod label_tests {
    use super::*;

    #[test]
    fn the_label_gives_the_ports_and_bad_ones_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("c");
        let with = |labels: serde_json::Value| {
            std::fs::write(
                &p,
                serde_json::json!({"config": {"Labels": labels}}).to_string(),
            )
            .unwrap();
            ready_ports_label(&p)
        };
        assert_eq!(
            with(serde_json::json!({READY_PORTS_LABEL: "8080, 5432"})).unwrap(),
            [8080, 5432]
        );
        assert_eq!(
            with(serde_json::json!({"other": "x"})).unwrap(),
            Vec::<u16>::new()
        );
        assert_eq!(with(serde_json::json!(null)).unwrap(), Vec::<u16>::new());
        for bad in [
            "0",
            "70000",
            "http",
            "1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17",
        ] {
            assert!(
                with(serde_json::json!({READY_PORTS_LABEL: bad})).is_err(),
                "{bad}"
            );
        }
    }
}
