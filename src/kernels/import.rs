//! `ImportKernel`: the caller's kernel, initrd and modules, read as the caller, staged in
//! `kernels/.staging-<id>/`, published as `kernels/<name>/` under the kernels lock.

use std::io::Read;
use std::path::Path;

use super::{vmlinux, ImportOptions, Kernels};
use crate::layout::{StagingDir, STAGING_PREFIX};
use crate::model::{new_id, now_us, validate_name, Kernel, NameKind};
use crate::oci::flatten::{Flattener, Limits};
use crate::service::ObjectEvent;
use crate::store::rows;
use crate::{host, Error, Result};

/// Copies `dir` as `uid` (tar as the user, applied by the hardened flattener) into `dest`.
fn copy_modules(uid: u32, dir: &Path, dest: &Path) -> Result<()> {
    let mut tar = host::tar_dir_as(uid, dir)?;
    let stdout = tar.stdout.take().expect("piped stdout");
    let mut f = Flattener::new(
        dest,
        Limits {
            max_bytes: 8 << 30,
            max_entries: 500_000,
        },
        false,
    )
    .map_err(|e| Error::failed("Cannot create the modules directory", e))?;
    let applied = f.apply_layer(stdout);
    let mut stderr = String::new();
    if let Some(mut e) = tar.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    let status = tar.wait().map_err(|e| Error::failed("tar failed", e))?;
    if !status.success() {
        return Err(Error::InvalidArgument(format!(
            "modules_dir {}: you cannot read all of it yourself ({}), so banger will not copy it for you",
            dir.display(),
            stderr.trim()
        )));
    }
    applied.map_err(|e| Error::failed("Cannot copy the modules", e))?;
    f.finish()
        .map_err(|e| Error::failed("Cannot copy the modules", e))?;
    Ok(())
}

impl Kernels {
    /// Imports kernel files for caller `uid` under `name`.
    pub async fn import(&self, uid: u32, name: &str, opts: ImportOptions) -> Result<Kernel> {
        self.import_from(uid, name, opts, None).await
    }

    /// Imports with a recorded source (`None`: the kernel file's path).
    pub(super) async fn import_from(
        &self,
        uid: u32,
        name: &str,
        opts: ImportOptions,
        source: Option<String>,
    ) -> Result<Kernel> {
        validate_name(NameKind::Kernel, name)?;
        opts.validate()?;
        if self.name_taken(name).await? {
            return Err(Error::AlreadyExists(format!(
                "A kernel named {name:?} exists; delete it first or pick another name"
            )));
        }
        let staging_dir = self
            .layout
            .kernels_dir()
            .join(format!("{STAGING_PREFIX}{}", new_id()));
        let mut staging = StagingDir::create(staging_dir.clone())?;
        let (name2, dir) = (name.to_owned(), staging_dir.clone());
        let init = self.config.guest_binary("banger-init");
        let kernel = tokio::task::spawn_blocking(move || -> Result<Kernel> {
            let final_dir = dir.with_file_name(&name2);
            let kpath = opts.kernel_path.as_deref().expect("validated");
            let image = host::read_file_as(uid, kpath, "kernel_path")?;
            let version = vmlinux::bzimage_version(&image);
            vmlinux::write(&dir.join("vmlinux"), &vmlinux::to_elf(&image)?)?;
            let initrd = match &opts.initrd_path {
                Some(p) => {
                    vmlinux::write(
                        &dir.join("initrd.img"),
                        &host::read_file_as(uid, p, "initrd_path")?,
                    )?;
                    Some(final_dir.join("initrd.img"))
                }
                None => None,
            };
            let modules = match &opts.modules_dir {
                Some(m) => {
                    copy_modules(uid, m, &dir.join("modules"))?;
                    Some(final_dir.join("modules"))
                }
                None => None,
            };
            let modules_version = opts
                .modules_dir
                .as_ref()
                .and_then(|m| m.file_name())
                .map(|n| n.to_string_lossy().into_owned());
            // A modular kernel without an initrd gets banger's own.
            let initrd = match (initrd, &modules) {
                (None, Some(_)) => {
                    let v = version
                        .clone()
                        .or(modules_version.clone())
                        .unwrap_or_default();
                    let img = super::initrd::build(&dir.join("modules"), &v, &init)?;
                    vmlinux::write(&dir.join("initrd.img"), &img)?;
                    Some(final_dir.join("initrd.img"))
                }
                (i, _) => i,
            };
            Ok(Kernel {
                name: name2,
                version: version
                    .or(modules_version)
                    .unwrap_or_else(|| "unknown".into()),
                source: source.unwrap_or_else(|| format!("file:{}", kpath.display())),
                kernel_path: final_dir.join("vmlinux"),
                initrd_path: initrd,
                modules_dir: modules,
                created_at: now_us(),
            })
        });
        let kernel = kernel
            .await
            .map_err(|e| Error::failed("Kernel import task failed", e))??;
        // The directory describes itself too: what it is and where it came from.
        let manifest = serde_json::json!({
            "name": kernel.name,
            "version": kernel.version,
            "source": kernel.source,
            "kernel": "vmlinux",
            "initrd": kernel.initrd_path.as_ref().map(|_| "initrd.img"),
            "modules": kernel.modules_dir.as_ref().map(|_| "modules"),
            "created_at": kernel.created_at,
        });
        std::fs::write(
            staging_dir.join("manifest.json"),
            serde_json::to_vec_pretty(&manifest).unwrap_or_default(),
        )
        .map_err(|e| Error::failed("Cannot write the kernel's manifest", e))?;

        let guard = self.lock.lock().await;
        if self.name_taken(&kernel.name).await? {
            return Err(Error::AlreadyExists(format!(
                "A kernel named {name:?} was imported meanwhile"
            )));
        }
        let final_dir = self.layout.kernels_dir().join(name);
        std::fs::rename(&staging_dir, &final_dir)
            .map_err(|e| Error::failed("Cannot move the kernel into place", e))?;
        staging.keep();
        let row = kernel.clone();
        if let Err(e) = self.store.call(move |c| rows::insert_kernel(c, &row)).await {
            let _ = crate::layout::remove_any(&final_dir);
            return Err(e);
        }
        drop(guard);
        tracing::info!("Kernel {name} {} imported", kernel.version);
        self.events.send(ObjectEvent::KernelAdded(kernel.clone()));
        Ok(kernel)
    }
}
