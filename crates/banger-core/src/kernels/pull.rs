//! `PullKernel`: catalog kernels. The `debian` entry is Debian stable's kernel for virtual
//! machines (its `cloud-amd64` flavour), `debian-generic` its kernel for any hardware, both
//! resolved through the host's own apt configuration: the package comes from apt's archive
//! cache when it is there, else from `apt-get download` (apt verifies it), and its SHA256 is
//! checked against apt's index either way before anything is unpacked or published.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use super::error::{failed, invalid, KernelError};
use super::{CatalogKernel, ImportOptions, Kernels};
use crate::auth::Action;
use crate::jobs::{Job, JobSpec};
use crate::model::{new_id, validate_name, NameKind};
use crate::{host, Result};

/// The Debian entries: name, the meta package whose dependency names the kernel, and what
/// `kernel list --available` says of it. The default (`debian`) is the flavour Debian builds
/// for virtual machines: the same virtio, file systems and netfilter, without the drivers of
/// real hardware, so a guest boots about a fifth faster under TCG and holds ~20 MiB less
/// (BENCHMARKS.md, *Density*).
const DEBIAN_ENTRIES: [(&str, &str, &str); 2] = [
    (
        "debian",
        "linux-image-cloud-amd64",
        "Debian stable's kernel for virtual machines (linux-image-cloud-amd64), through the host's apt",
    ),
    (
        "debian-generic",
        "linux-image-amd64",
        "Debian stable's kernel for any hardware (linux-image-amd64), through the host's apt",
    ),
];

/// The meta package of Debian entry `name`.
fn debian_meta(name: &str) -> Option<&'static str> {
    DEBIAN_ENTRIES
        .iter()
        .find(|(n, _, _)| *n == name)
        .map(|(_, meta, _)| *meta)
}
/// apt's archive cache.
const APT_ARCHIVES: &str = "/var/cache/apt/archives";

/// A resolved Debian kernel package.
#[derive(Debug, Clone)]
pub struct DebPackage {
    /// e.g. linux-image-6.1.0-56-amd64
    pub name: String,
    /// e.g. 6.1.192-2
    pub version: String,
    /// From apt's index.
    pub sha256: String,
}

fn apt_cache(args: &[&str]) -> Result<String> {
    let out = host::capture(
        Command::new("apt-cache").args(args),
        "apt-cache (is apt installed?)",
    )?;
    if !out.status.success() {
        return Err(failed(
            format!("apt-cache {} failed", args.join(" ")),
            std::io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_owned()),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Resolves the Debian stable kernel package that meta package `meta` names, through apt's
/// local index (no network).
pub fn resolve_debian(meta: &str) -> Result<DebPackage> {
    let deps = apt_cache(&["depends", meta])?;
    let name = deps
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| {
            p.starts_with("linux-image-") && p.chars().nth(12).is_some_and(|c| c.is_ascii_digit())
        })
        .ok_or_else(|| {
            KernelError::NotInApt(format!(
                "apt knows no {meta}; run apt-get update or add Debian's sources"
            ))
        })?
        .to_owned();
    let policy = apt_cache(&["policy", &name])?;
    let version = policy
        .lines()
        .find_map(|l| l.trim().strip_prefix("Candidate: "))
        .filter(|v| *v != "(none)")
        .ok_or_else(|| KernelError::NotInApt(format!("apt has no candidate version of {name}")))?
        .to_owned();
    let show = apt_cache(&["show", &format!("{name}={version}")])?;
    let sha256 = show
        .split("\n\n")
        .next()
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("SHA256: "))
        .ok_or_else(|| {
            KernelError::NotInApt(format!("apt's index has no SHA256 for {name} {version}"))
        })?
        .to_owned();
    Ok(DebPackage {
        name,
        version,
        sha256,
    })
}

fn sha256_file(p: &Path) -> Result<String> {
    std::fs::File::open(p)
        .and_then(crate::model::sha256_hex_of)
        .map_err(|e| failed(format!("Cannot read {}", p.display()), e))
}

/// The package's `.deb`: apt's cached copy, else a fresh `apt-get download` into `dir`;
/// checked against the index's SHA256.
pub fn fetch_deb(pkg: &DebPackage, dir: &Path) -> Result<PathBuf> {
    let file = format!("{}_{}_amd64.deb", pkg.name, pkg.version.replace(':', "%3a"));
    let cached = Path::new(APT_ARCHIVES).join(&file);
    let deb = if cached.is_file() {
        cached
    } else {
        let out = host::capture(
            Command::new("apt-get")
                .args(["download", "-q", &format!("{}={}", pkg.name, pkg.version)])
                .current_dir(dir),
            "apt-get",
        )?;
        if !out.status.success() {
            return Err(failed(
                format!("apt-get download {} failed", pkg.name),
                std::io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_owned()),
            ));
        }
        dir.join(&file)
    };
    let actual = sha256_file(&deb)?;
    if actual != pkg.sha256 {
        return Err(invalid(format!(
            "{} does not match apt's index (sha256 {actual}, expected {}); remove it and pull again",
            deb.display(),
            pkg.sha256
        )));
    }
    Ok(deb)
}

impl Kernels {
    /// The embedded catalog, with versions resolved through apt where it can.
    pub fn available(&self) -> Vec<CatalogKernel> {
        let mut all: Vec<CatalogKernel> = DEBIAN_ENTRIES
            .iter()
            .map(|(name, meta, description)| CatalogKernel {
                name: (*name).into(),
                version: resolve_debian(meta)
                    .map(|p| {
                        format!(
                            "{} ({})",
                            p.name.trim_start_matches("linux-image-"),
                            p.version
                        )
                    })
                    .unwrap_or_else(|_| "stable".into()),
                description: (*description).into(),
            })
            .collect();
        all.extend(self.config.kernel_catalog.iter().map(|e| CatalogKernel {
            name: e.name.clone(),
            version: "bundle".into(),
            description: if e.description.is_empty() {
                e.url.clone().unwrap_or_default()
            } else {
                e.description.clone()
            },
        }));
        all
    }

    /// Whether `name` is an entry of the kernel catalog.
    pub fn in_catalog(&self, name: &str) -> bool {
        debian_meta(name).is_some() || self.config.kernel_entry(name).is_some()
    }

    /// Pulls catalog kernel `name` as a job.
    pub async fn pull(&self, uid: u32, name: &str) -> Result<Arc<Job>> {
        validate_name(NameKind::Kernel, name)?;
        if !self.in_catalog(name) {
            return Err(KernelError::NotInCatalog(name.to_owned()).into());
        }
        if self.name_taken(name).await? {
            return Err(KernelError::NameTaken(format!(
                "Kernel {name:?} is installed already; delete it first to pull it again"
            ))
            .into());
        }
        if let Some(entry) = self.config.kernel_entry(name).cloned() {
            return Ok(self.pull_bundle(uid, entry));
        }
        let spec = JobSpec {
            kind: "pull-kernel".into(),
            target: name.into(),
            action: Action::KernelsManage,
            owner_uid: uid,
        };
        let meta = debian_meta(name).expect("in the catalog");
        let (this, name) = (self.clone(), name.to_owned());
        Ok(self.jobs.spawn(spec, move |ctx| async move {
            ctx.stage("resolve", format!("Resolving {meta} through apt"));
            let pkg = crate::jobs::spawn_blocking(move || resolve_debian(meta))
                .await
                .map_err(|e| failed("apt task failed", e))??;
            ctx.log(6, format!("{} {}", pkg.name, pkg.version));
            let work = this.layout.kernels_dir().join(format!(
                "{}{}",
                crate::layout::STAGING_PREFIX,
                new_id()
            ));
            let _cleanup = crate::layout::StagingDir::create(work.clone())?;
            ctx.stage("download", format!("Fetching {} {}", pkg.name, pkg.version));
            ctx.progress(0.1);
            let (p, w) = (pkg.clone(), work.clone());
            let root = crate::jobs::spawn_blocking(move || -> Result<PathBuf> {
                let deb = fetch_deb(&p, &w)?;
                let root = w.join("pkg");
                host::run(
                    "dpkg-deb",
                    ["-x".as_ref(), deb.as_os_str(), root.as_os_str()],
                )?;
                Ok(root)
            })
            .await
            .map_err(|e| failed("Kernel download task failed", e))??;
            ctx.stage("import", "Building the initrd and installing the kernel");
            ctx.progress(0.6);
            let release = pkg.name.trim_start_matches("linux-image-").to_owned();
            let opts = ImportOptions::own_files(
                root.join(format!("boot/vmlinuz-{release}")),
                None,
                Some(root.join(format!("lib/modules/{release}"))),
            );
            let source = format!("catalog:{name} ({} {})", pkg.name, pkg.version);
            this.import_from(0, &name, opts, Some(source))
                .await
                .map(|_| ())
        }))
    }
}

impl Kernels {
    /// Pulls a bundle kernel: download (hashed and checked), unpack, import.
    fn pull_bundle(&self, uid: u32, entry: crate::bundle::CatalogEntry) -> Arc<Job> {
        let spec = JobSpec {
            kind: "pull-kernel".into(),
            target: entry.name.clone(),
            action: Action::KernelsManage,
            owner_uid: uid,
        };
        let this = self.clone();
        self.jobs.spawn(spec, move |ctx| async move {
            let url = entry.url.clone().unwrap_or_default();
            let sha = entry.sha256.clone().unwrap_or_default();
            let work = this.layout.kernels_dir().join(format!(
                "{}{}",
                crate::layout::STAGING_PREFIX,
                new_id()
            ));
            let _cleanup = crate::layout::StagingDir::create(work.clone())?;
            ctx.stage("download", format!("Fetching {url}"));
            let max = this.config.max_image_bytes;
            let bundle =
                crate::bundle::download(&url, &sha, &work, max, |f| ctx.progress(0.6 * f)).await?;
            ctx.stage("unpack", "Unpacking the verified bundle");
            ctx.progress(0.6);
            let w = work.clone();
            let tree = crate::jobs::spawn_blocking(move || crate::bundle::unpack(&bundle, &w, max))
                .await
                .map_err(|e| failed("Unpack task failed", e))??;
            let manifest = crate::bundle::manifest(&tree)?;
            let kernel = crate::bundle::regular(&tree, "vmlinux")?
                .ok_or_else(|| invalid("The kernel bundle has no vmlinux"))?;
            let modules = tree.join("modules");
            let opts = ImportOptions::own_files(
                kernel,
                crate::bundle::regular(&tree, "initrd.img")?,
                modules.is_dir().then_some(modules),
            );
            ctx.stage("import", "Installing the kernel");
            ctx.progress(0.8);
            let source = format!(
                "catalog:{} ({url}{})",
                entry.name,
                manifest
                    .version
                    .map(|v| format!(", {v}"))
                    .unwrap_or_default()
            );
            this.import_from(0, &entry.name, opts, Some(source))
                .await
                .map(|_| ())
        })
    }
}
