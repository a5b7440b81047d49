//! `ImportKernel`: the caller's kernel, initrd and modules, taken once at call time with the
//! caller's rights (descriptors the client opened, or paths opened as the caller), staged in
//! `kernels/.staging-<id>/`, published as `kernels/<name>/` under the kernels lock. Nothing
//! the caller controls is opened after the call returns.

use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Component, Path};

use super::error::{failed, invalid, KernelError};
use super::{vmlinux, ImportOptions, Kernels};
use crate::callerfile::{self, Expect};
use crate::events::ObjectEvent;
use crate::layout::{StagingDir, STAGING_PREFIX};
use crate::model::{new_id, now_us, validate_name, Kernel, NameKind};
use crate::oci::flatten::{Flattener, Limits};
use crate::store::rows;
use crate::tree::HostTree;
use crate::{host, Result};

/// Copies the directory `dir` (a descriptor, opened with the caller's rights) into `dest`: a
/// `tar` that runs as `uid` archives it and the hardened flattener applies the archive, so
/// root never reads a file of it, and nothing but regular files, directories and symbolic
/// links that stay inside the tree comes through.
fn copy_modules(uid: u32, dir: &OwnedFd, dest: &Path, max_bytes: u64) -> Result<()> {
    let mut tar = host::tar_dirfd_as(uid, dir.as_raw_fd())?;
    let mut stdout = tar.stdout.take().expect("piped stdout");
    let tree = HostTree::create(dest, false)
        .map_err(|e| failed("Cannot create the modules directory", e))?;
    let mut f = Flattener::new(
        tree,
        Limits {
            max_bytes,
            max_entries: 500_000,
        },
    );
    let applied = f.apply_layer(&mut stdout);
    // The archive ends before tar's output does (it pads its last record to 10 KiB): read the
    // rest, or tar may write it to a closed pipe and die of SIGPIPE, silently (a kernel import
    // failed so, now and then, under load). Bounded: tar's padding is less than a record.
    let _ = std::io::copy(&mut (&mut stdout).take(1 << 20), &mut std::io::sink());
    drop(stdout);
    let mut stderr = String::new();
    if let Some(mut e) = tar.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    let status = tar.wait().map_err(|e| failed("tar failed", e))?;
    // The copy's own failure first: tar dies of a broken pipe, silently, when it stops.
    applied.map_err(|e| invalid(format!("modules_dir cannot be copied: {}", e)))?;
    if !status.success() {
        return Err(invalid(format!(
            "modules_dir: you cannot read all of it yourself ({}), so banger will not copy it for you",
            stderr.trim()
        )));
    }
    f.finish()
        .map_err(|e| failed("Cannot copy the modules", e))?;
    check_tree(dest, dest)
}

/// Refuses what a modules tree must not hold: symbolic links that leave it (absolute, or
/// climbing above it with `..`) and anything but files, directories and links.
pub(crate) fn check_tree(root: &Path, dir: &Path) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| failed("Cannot read the modules", e))?;
    for e in entries {
        let e = e.map_err(|e| failed("Cannot read the modules", e))?;
        let p = e.path();
        let rel = p.strip_prefix(root).unwrap_or(&p).to_owned();
        let t = e
            .file_type()
            .map_err(|e| failed("Cannot read the modules", e))?;
        if t.is_dir() {
            check_tree(root, &p)?;
        } else if t.is_symlink() {
            let target =
                std::fs::read_link(&p).map_err(|e| failed("Cannot read the modules", e))?;
            let depth = rel.components().count() as i64 - 1;
            if !stays_inside(&target, depth) {
                return Err(invalid(format!(
                    "modules_dir holds a symbolic link {} -> {} that leaves the modules tree; remove it and import again",
                    rel.display(),
                    target.display()
                )));
            }
        } else if !t.is_file() {
            return Err(invalid(format!(
                "modules_dir holds {}, which is neither a file, a directory nor a symbolic link",
                rel.display()
            )));
        }
    }
    Ok(())
}

/// Whether a relative link `target` in a directory `depth` levels below the root stays in it.
fn stays_inside(target: &Path, mut depth: i64) -> bool {
    for c in target.components() {
        match c {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir => {
                depth -= 1;
                if depth < 0 {
                    return false;
                }
            }
            Component::RootDir | Component::Prefix(_) => return false,
        }
    }
    true
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
        self.check_name_free(name, uid).await?;
        let staging_dir = self
            .layout
            .kernels_dir()
            .join(format!("{STAGING_PREFIX}{}", new_id()));
        let staging = StagingDir::create(staging_dir.clone())?;
        let (name2, dir) = (name.to_owned(), staging_dir.clone());
        let init = self.config.guest_binary("banger-init");
        let max_kernel = self.config.max_kernel_bytes;
        let max_modules = self.config.max_image_bytes;
        let kernel = crate::jobs::spawn_blocking(move || -> Result<Kernel> {
            let final_dir = dir.with_file_name(&name2);
            let kinput = opts.kernel_path.expect("validated");
            let label = source.unwrap_or_else(|| match kinput.path() {
                Some(p) => format!("file:{}", p.display()),
                None => "file descriptor".into(),
            });
            // Every input is taken (opened and checked) before any is read: a bad one is
            // refused before work starts.
            let kfd = callerfile::take(uid, kinput, "kernel_path", Expect::File)?;
            let ifd = opts
                .initrd_path
                .map(|i| callerfile::take(uid, i, "initrd_path", Expect::File))
                .transpose()?;
            let modules_version = opts
                .modules_dir
                .as_ref()
                .and_then(|m| m.path())
                .and_then(|m| m.file_name())
                .and_then(|n| vmlinux::plain_version(&n.to_string_lossy()));
            let mfd = opts
                .modules_dir
                .map(|m| callerfile::take(uid, m, "modules_dir", Expect::Dir))
                .transpose()?;
            let image = callerfile::read_all(kfd, "kernel_path", max_kernel, "max_kernel_bytes")?;
            let elf = vmlinux::to_elf(&image, max_kernel)?;
            let version = vmlinux::bzimage_version(&image).or_else(|| vmlinux::elf_version(&elf));
            vmlinux::write(&dir.join("vmlinux"), &elf)?;
            drop(elf);
            drop(image);
            let initrd = match ifd {
                Some(fd) => {
                    let data =
                        callerfile::read_all(fd, "initrd_path", max_kernel, "max_kernel_bytes")?;
                    vmlinux::write(&dir.join("initrd.img"), &data)?;
                    Some(final_dir.join("initrd.img"))
                }
                None => None,
            };
            let modules = match &mfd {
                Some(fd) => {
                    copy_modules(uid, fd, &dir.join("modules"), max_modules)?;
                    Some(final_dir.join("modules"))
                }
                None => None,
            };
            // A modular kernel without an initrd gets banger's own.
            let initrd = match (initrd, &modules) {
                (None, Some(_)) => {
                    let img = super::initrd::build(&dir.join("modules"), &init)?;
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
                source: label,
                kernel_path: final_dir.join("vmlinux"),
                initrd_path: initrd,
                modules_dir: modules,
                created_at: now_us(),
                owner_uid: uid,
            })
        });
        let kernel = kernel
            .await
            .map_err(|e| failed("Kernel import task failed", e))??;
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
        .map_err(|e| failed("Cannot write the kernel's manifest", e))?;

        let (taken, row) = (kernel.name.clone(), kernel.clone());
        self.shelf
            .publish(
                staging,
                name,
                move |c| {
                    if rows::find_kernel(c, &taken)?.is_some() {
                        return Ok(Err(KernelError::NameTaken(format!(
                            "A kernel named {taken:?} was imported meanwhile"
                        ))
                        .into()));
                    }
                    Ok(Ok(()))
                },
                move |c| rows::insert_kernel(c, &row).map(Ok),
            )
            .await?;
        tracing::info!("Kernel {name} {} imported", kernel.version);
        self.events.send(ObjectEvent::KernelAdded(kernel.clone()));
        Ok(kernel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_that_leave_the_tree_are_refused() {
        assert!(stays_inside(Path::new("kernel/fs/ext4.ko"), 0));
        assert!(stays_inside(Path::new("../x.ko"), 1));
        assert!(!stays_inside(Path::new("../x.ko"), 0));
        assert!(!stays_inside(Path::new("a/../../x"), 0));
        assert!(!stays_inside(Path::new("/etc/shadow"), 3));

        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("kernel/fs")).unwrap();
        std::os::unix::fs::symlink("../../modules.dep", d.path().join("kernel/fs/ok")).unwrap();
        check_tree(d.path(), d.path()).unwrap();
        std::os::unix::fs::symlink("/etc/shadow", d.path().join("kernel/fs/bad")).unwrap();
        let e = check_tree(d.path(), d.path()).unwrap_err();
        assert!(
            e.to_string().contains("kernel/fs/bad -> /etc/shadow"),
            "{e}"
        );
    }
}
