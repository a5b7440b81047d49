//! `RegisterImage` (files stay where they are) and `PromoteImage` (a copy into managed
//! storage). Paths come from callers and the daemon is root, so each must be an absolute
//! path to a regular file that the caller could read itself.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::publish::Staging;
use super::{Images, RegisterOptions};
use crate::auth::Action;
use crate::jobs::{Job, JobSpec};
use crate::model::{new_id, now_us, Image};
use crate::service::ObjectEvent;
use crate::store::rows;
use crate::{host, Error, Result};

/// Resolves a caller's file: canonical, a regular file (never a device), readable by `uid`.
fn caller_file(uid: u32, what: &str, p: &Path) -> Result<(PathBuf, u64)> {
    let canon = std::fs::canonicalize(p)
        .map_err(|e| Error::InvalidArgument(format!("{what} {}: {e}", p.display())))?;
    let meta = std::fs::metadata(&canon)
        .map_err(|e| Error::InvalidArgument(format!("{what} {}: {e}", p.display())))?;
    if !meta.is_file() {
        return Err(Error::InvalidArgument(format!(
            "{what} {} is not a regular file; give an ext4 image file",
            p.display()
        )));
    }
    if !host::user_can_read(uid, &canon)? {
        return Err(Error::InvalidArgument(format!(
            "{what} {}: you cannot read this file yourself, so banger will not read it for you",
            p.display()
        )));
    }
    Ok((canon, meta.len()))
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::failed("Image task failed", e))?
}

impl Images {
    /// Registers (or re-registers) files as an unmanaged image for caller `uid`.
    pub async fn register(&self, uid: u32, name: &str, opts: RegisterOptions) -> Result<Image> {
        if opts.kernel_path.is_some() || opts.initrd_path.is_some() || opts.modules_dir.is_some() {
            return Err(Error::InvalidArgument(
                "kernel files are imported by Banger::register_image; Images::register takes a kernel name".into(),
            ));
        }
        let rootfs = opts.rootfs.clone().ok_or_else(|| {
            Error::InvalidArgument(
                "RegisterImage needs 'rootfs', the root filesystem image file".into(),
            )
        })?;
        let seed = opts.work_seed.clone();
        let (rootfs, size, seed) = blocking(move || {
            let (r, size) = caller_file(uid, "rootfs", &rootfs)?;
            let s = seed
                .map(|s| caller_file(uid, "work_seed", &s).map(|(p, _)| p))
                .transpose()?;
            Ok((r, size, s))
        })
        .await?;

        let guard = self.lock.lock().await;
        let n = name.to_owned();
        let existing = self.store.call(move |c| rows::find_image(c, &n)).await?;
        let image = match existing {
            Some(old) if old.managed => {
                return Err(Error::AlreadyExists(format!(
                "{name:?} is a managed image; RegisterImage cannot change it (pick another name)"
            )))
            }
            Some(old) => Image {
                rootfs_path: rootfs.clone(),
                work_seed_path: seed,
                kernel: opts.kernel,
                size_bytes: size,
                ready_ports: opts.ready_ports.unwrap_or(old.ready_ports.clone()),
                ..old
            },
            None => Image {
                id: new_id(),
                name: name.to_owned(),
                managed: false,
                source: format!("file:{}", rootfs.display()),
                rootfs_path: rootfs.clone(),
                work_seed_path: seed,
                kernel: opts.kernel,
                size_bytes: size,
                created_at: now_us(),
                ready_ports: opts.ready_ports.unwrap_or_default(),
            },
        };
        let row = image.clone();
        let updated = self
            .store
            .call(move |c| rows::upsert_image(c, &row))
            .await?;
        drop(guard);
        tracing::info!(image_id = %image.id, "Image {} registered from {}", image.name, rootfs.display());
        self.events.send(if updated {
            ObjectEvent::ImageChanged(image.clone())
        } else {
            ObjectEvent::ImageAdded(image.clone())
        });
        Ok(image)
    }

    /// Copies an unmanaged image's files into `images/<id>` (reflink where the filesystem
    /// can, else a sparse copy) as a job, then marks it managed.
    pub async fn promote(&self, uid: u32, key: &str) -> Result<Arc<Job>> {
        let image = self.get(key).await?;
        if image.managed {
            return Err(Error::InvalidArgument(format!(
                "Image {:?} is already managed",
                image.name
            )));
        }
        // The promoter may not be who registered it: check again, for this caller.
        let (r, s) = (image.rootfs_path.clone(), image.work_seed_path.clone());
        blocking(move || {
            caller_file(uid, "rootfs", &r)?;
            s.map(|s| caller_file(uid, "work_seed", &s)).transpose()?;
            Ok(())
        })
        .await?;
        let spec = JobSpec {
            kind: "promote-image".into(),
            target: image.name.clone(),
            action: Action::ImagesManage,
            owner_uid: uid,
        };
        let this = self.clone();
        Ok(self.jobs.spawn(spec, move |ctx| async move {
            let staging = Staging::create(this.layout.images_dir().join(format!(
                "{}{}",
                crate::layout::STAGING_PREFIX,
                new_id()
            )))?;
            let dir = staging.path().to_owned();
            ctx.stage("copy", format!("Copying {}", image.rootfs_path.display()));
            let (src, seed) = (image.rootfs_path.clone(), image.work_seed_path.clone());
            let has_seed = seed.is_some();
            blocking(move || {
                copy_sparse(&src, &dir.join("rootfs.ext4"))?;
                if let Some(s) = seed {
                    copy_sparse(&s, &dir.join("work-seed.ext4"))?;
                }
                Ok(())
            })
            .await?;
            ctx.stage("publish", "Moving the copy into managed storage");
            let final_dir = this.layout.images_dir().join(&image.id);
            let promoted = Image {
                managed: true,
                rootfs_path: final_dir.join("rootfs.ext4"),
                work_seed_path: has_seed.then(|| final_dir.join("work-seed.ext4")),
                ..image
            };
            this.publish_over(staging, promoted).await.map(|_| ())
        }))
    }
}

/// `cp --reflink=auto --sparse=always`: a clone where the filesystem has reflinks, else a
/// copy that keeps holes.
fn copy_sparse(src: &Path, dst: &Path) -> Result<()> {
    host::run(
        "cp",
        [
            "--reflink=auto".as_ref(),
            "--sparse=always".as_ref(),
            src.as_os_str(),
            dst.as_os_str(),
        ],
    )
}
