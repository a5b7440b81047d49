//! `RegisterImage` (a caller's own files become an image) and `PromoteImage` (a registered
//! image becomes managed). The caller's files are taken once, at call time, with the caller's
//! rights (descriptors the client opened, or paths opened as the caller) and copied into
//! `images/<id>/`: after the call, neither banger nor a VMM opens a path the caller controls.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use super::error::{failed, invalid, ImageError};
use super::publish::Staging;
use super::{Images, RegisterOptions};
use crate::auth::Action;
use crate::callerfile::{self, CallerInput, Expect};
use crate::events::ObjectEvent;
use crate::jobs::{Job, JobSpec};
use crate::layout::STAGING_PREFIX;
use crate::model::{new_id, now_us, owner_label, Image, SYSTEM_UID};
use crate::store::rows;
use crate::Result;

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    crate::jobs::spawn_blocking(f)
        .await
        .map_err(|e| failed("Image task failed", e))?
}

/// Whether the file holds an ext4 (or ext2/3) superblock: magic 0xEF53 at byte 1080.
fn is_ext(fd: &OwnedFd) -> bool {
    let mut magic = [0u8; 2];
    // SAFETY: magic holds 2 bytes; pread writes at most that many.
    let n = unsafe { libc::pread(fd.as_raw_fd(), magic.as_mut_ptr().cast(), 2, 1080) };
    n == 2 && magic == [0x53, 0xEF]
}

/// Takes one caller file (opened and checked now) of at most `max` bytes.
fn take_image_file(uid: u32, input: CallerInput, what: &str, max: u64) -> Result<(OwnedFd, u64)> {
    let label = input.describe();
    let fd = callerfile::take(uid, input, what, Expect::File)?;
    let size = callerfile::size_within(&fd, what, max, "max_image_bytes")?;
    if !is_ext(&fd) {
        return Err(invalid(format!(
            "{what} {label} is not an ext4 file system image; make one with mkfs.ext4 -d"
        )));
    }
    Ok((fd, size))
}

impl Images {
    /// Registers (or re-registers) a caller's files as an unmanaged image for caller `uid`:
    /// copies of them, made now, in `images/<id>/`. Another user's image of that name is
    /// replaced only with `any` (`manage-any` granted); it keeps its owner then.
    pub async fn register(
        &self,
        uid: u32,
        name: &str,
        opts: RegisterOptions,
        any: bool,
    ) -> Result<Image> {
        if uid != SYSTEM_UID && self.reserved(name) {
            return Err(super::reserved_error(name));
        }
        if opts.kernel_path.is_some() || opts.initrd_path.is_some() || opts.modules_dir.is_some() {
            return Err(invalid(
                "kernel files are imported by Banger::register_image; Images::register takes a kernel name",
            ));
        }
        let rootfs = opts.rootfs.ok_or_else(|| {
            invalid("RegisterImage needs 'rootfs', the root filesystem image file")
        })?;
        let source = match rootfs.path() {
            Some(p) => format!("file:{}", p.display()),
            None => "file descriptor".into(),
        };
        let max = self.config.max_image_bytes;
        let seed = opts.work_seed;
        let staging = Staging::create(
            self.layout
                .images_dir()
                .join(format!("{STAGING_PREFIX}{}", new_id())),
        )?;
        let dir = staging.path().to_owned();
        let (size, has_seed) = blocking(move || {
            let (r, size) = take_image_file(uid, rootfs, "rootfs", max)?;
            let s = seed
                .map(|s| take_image_file(uid, s, "work_seed", max))
                .transpose()?;
            callerfile::copy_into(&r, &dir.join("rootfs.ext4"), size)?;
            if let Some((fd, n)) = &s {
                callerfile::copy_into(fd, &dir.join("work-seed.ext4"), *n)?;
            }
            Ok((size, s.is_some()))
        })
        .await?;

        let guard = self.shelf.lock().await;
        let n = name.to_owned();
        let (existing, users) = self
            .store
            .call(move |c| {
                let old = rows::find_image(c, &n)?;
                let users = match &old {
                    Some(i) => rows::vms_using_image(c, &i.id)?,
                    None => 0,
                };
                Ok((old, users))
            })
            .await?;
        let id = match &existing {
            // Checked again under the lock: the name may have changed hands since the call
            // was authorised.
            Some(old) if old.owner_uid != uid && !any => {
                return Err(ImageError::Foreign(format!(
                    "Image {name:?} is {}'s; only its owner (or an administrator) may replace \
                     it: register yours under another name",
                    owner_label(old.owner_uid)
                ))
                .into())
            }
            Some(old) if old.managed => {
                return Err(ImageError::Conflict(format!(
                "{name:?} is a managed image; RegisterImage cannot change it (pick another name)"
            ))
                .into())
            }
            Some(_) if users > 0 => {
                return Err(ImageError::InUse {
                    name: name.to_owned(),
                    users,
                    next: "VM(s), whose disks layer on its files; delete them first or \
                           register under another name",
                }
                .into())
            }
            Some(old) => old.id.clone(),
            None => new_id(),
        };
        let final_dir = self.layout.images_dir().join(&id);
        let image = Image {
            rootfs_path: final_dir.join("rootfs.ext4"),
            work_seed_path: has_seed.then(|| final_dir.join("work-seed.ext4")),
            kernel: opts.kernel,
            size_bytes: size,
            ..match existing {
                Some(old) => Image {
                    ready_ports: opts.ready_ports.unwrap_or(old.ready_ports.clone()),
                    source: source.clone(),
                    ..old
                },
                None => Image {
                    id: id.clone(),
                    name: name.to_owned(),
                    managed: false,
                    source: source.clone(),
                    rootfs_path: Default::default(),
                    work_seed_path: None,
                    kernel: None,
                    size_bytes: 0,
                    created_at: now_us(),
                    config: Default::default(),
                    ready_ports: opts.ready_ports.unwrap_or_default(),
                    owner_uid: uid,
                },
            }
        };
        // The old copy moves aside under a staging name (swept after a crash), the new one
        // takes its place, then the row follows.
        let aside = self
            .layout
            .images_dir()
            .join(format!("{STAGING_PREFIX}{}", new_id()));
        let had_dir = final_dir.exists();
        if had_dir {
            std::fs::rename(&final_dir, &aside)
                .map_err(|e| failed("Cannot move the old copy aside", e))?;
        }
        let mut staging = staging;
        std::fs::rename(staging.path(), &final_dir)
            .map_err(|e| failed("Cannot move the image into place", e))?;
        staging.keep();
        let row = image.clone();
        let updated = self
            .store
            .call(move |c| rows::upsert_image(c, &row))
            .await?;
        drop(guard);
        if had_dir {
            let _ = blocking(move || crate::layout::remove_any(&aside)).await;
        }
        tracing::info!(image_id = %image.id, "Image {} registered from {source}", image.name);
        self.events.send(if updated {
            ObjectEvent::ImageChanged(image.clone())
        } else {
            ObjectEvent::ImageAdded(image.clone())
        });
        Ok(image)
    }

    /// Marks a registered image managed, as a job. Its files are banger's copies already; an
    /// image registered by path by an older banger is copied now, read as the promoter.
    pub async fn promote(&self, uid: u32, key: &str) -> Result<Arc<Job>> {
        let image = self.get(key).await?;
        if image.managed {
            return Err(invalid(format!(
                "Image {:?} is already managed",
                image.name
            )));
        }
        let legacy = self.check_in_store(&image).is_err();
        // Files outside the store are the caller's: taken now, with the promoter's rights.
        let files = if legacy {
            let max = self.config.max_image_bytes;
            let (r, s) = (image.rootfs_path.clone(), image.work_seed_path.clone());
            Some(
                blocking(move || {
                    let r = take_image_file(uid, CallerInput::Path(r), "rootfs", max)?;
                    let s = s
                        .map(|s| take_image_file(uid, CallerInput::Path(s), "work_seed", max))
                        .transpose()?;
                    Ok((r, s))
                })
                .await?,
            )
        } else {
            None
        };
        let spec = JobSpec {
            kind: "promote-image".into(),
            target: image.name.clone(),
            action: Action::ImagesManage,
            owner_uid: uid,
        };
        let this = self.clone();
        Ok(self.jobs.spawn(spec, move |ctx| async move {
            let final_dir = this.layout.images_dir().join(&image.id);
            let promoted = Image {
                managed: true,
                rootfs_path: final_dir.join("rootfs.ext4"),
                work_seed_path: image
                    .work_seed_path
                    .as_ref()
                    .map(|_| final_dir.join("work-seed.ext4")),
                ..image.clone()
            };
            let Some((rootfs, seed)) = files else {
                ctx.stage("publish", "Marking the image managed");
                return this.mark_managed(promoted).await.map(|_| ());
            };
            let staging = Staging::create(
                this.layout
                    .images_dir()
                    .join(format!("{STAGING_PREFIX}{}", new_id())),
            )?;
            let dir = staging.path().to_owned();
            ctx.stage("copy", format!("Copying {}", image.rootfs_path.display()));
            blocking(move || {
                callerfile::copy_into(&rootfs.0, &dir.join("rootfs.ext4"), rootfs.1)?;
                if let Some((fd, n)) = seed {
                    callerfile::copy_into(&fd, &dir.join("work-seed.ext4"), n)?;
                }
                Ok(())
            })
            .await?;
            ctx.stage("publish", "Moving the copy into managed storage");
            this.publish_over(staging, promoted).await.map(|_| ())
        }))
    }
}
