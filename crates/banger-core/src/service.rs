//! The daemon's services wired together.

use std::sync::Arc;

use crate::config::Config;
pub use crate::events::{Events, ObjectEvent};
use crate::images::Images;
use crate::jobs::Jobs;
use crate::kernels::KernelError;
use crate::kernels::Kernels;
use crate::layout::Layout;
use crate::store::{rows, Store};
use crate::vms::Vms;
use crate::Result;

/// Everything the D-Bus layer calls into.
pub struct Banger {
    /// The configuration in force.
    pub config: Config,
    /// The state layout.
    pub layout: Layout,
    /// The database.
    pub store: Store,
    /// Long operations.
    pub jobs: Jobs,
    /// Object events.
    pub events: Events,
    /// The image service.
    pub images: Images,
    /// The kernel service.
    pub kernels: Kernels,
    /// The VM service.
    pub vms: Vms,
}

/// Counts for `banger status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// Images.
    pub images: u32,
    /// Kernels.
    pub kernels: u32,
    /// VMs.
    pub vms: u32,
    /// VMs that run.
    pub running_vms: u32,
    /// Jobs that run.
    pub jobs: u32,
}

impl Banger {
    /// Wires the services over an opened store, with the VMM the configuration picks and
    /// the configured subnet taken as it is (the daemon checks it first: `for_host`).
    pub fn new(config: Config, layout: Layout, store: Store) -> Result<Arc<Self>> {
        let vmm = crate::vmm::select(&config);
        let subnet = config.subnet().map(|(n, p)| crate::net::Subnet::new(n, p));
        Self::on_host(config, layout, store, vmm, subnet)
    }

    /// The services with the host's parts: its bridge on `subnet`, machined.
    fn on_host(
        config: Config,
        layout: Layout,
        store: Store,
        vmm: Arc<dyn crate::vmm::Vmm>,
        subnet: Result<crate::net::Subnet>,
    ) -> Result<Arc<Self>> {
        let net = Arc::new(crate::net::Bridge::new(
            subnet,
            config.allowed_egress().unwrap_or_default(),
        ));
        let machines = Arc::new(crate::vmm::scope::Machined::default());
        Self::with_parts(config, layout, store, vmm, net, machines)
    }

    /// The daemon's wiring: the configured subnet is checked against the host's routes (a
    /// default one moves aside; a configured one that collides makes every VM creation fail
    /// with the reason, while images and kernels keep working).
    pub async fn for_host(mut config: Config, layout: Layout, store: Store) -> Result<Arc<Self>> {
        let chosen = match config.subnet() {
            Ok((n, p)) => {
                let wanted = crate::net::Subnet::new(n, p);
                crate::net::choose_subnet(wanted, config.subnet_is_default()).await
            }
            Err(e) => Err(e),
        };
        match &chosen {
            Ok(s) if s.to_string() != config.subnet => {
                tracing::warn!(subnet = %s, "The default guest subnet {} is taken on this host; using {s}", config.subnet);
                config.subnet = s.to_string();
            }
            Ok(_) => {}
            Err(e) => tracing::error!("VMs cannot be created: {}", e.full_message()),
        }
        let vmm = crate::vmm::select(&config);
        Self::on_host(config, layout, store, vmm, chosen)
    }

    /// Wires the services over an opened store, booting VMs with `vmm` on host network `net`
    /// and announcing them to `machines` (tests and benchmarks pass stand-ins). Job ids
    /// continue after the store's highest.
    pub fn with_parts(
        config: Config,
        layout: Layout,
        store: Store,
        vmm: Arc<dyn crate::vmm::Vmm>,
        net: Arc<dyn crate::net::HostNet>,
        machines: Arc<dyn crate::vmm::scope::Machines>,
    ) -> Result<Arc<Self>> {
        let last_job = store.call_blocking(|c| rows::max_job_id(c))?;
        let jobs = Jobs::new(last_job);
        let events = Events::new();
        let images = Images::new(
            store.clone(),
            layout.clone(),
            events.clone(),
            jobs.clone(),
            config.clone(),
        );
        let kernels = Kernels::new(
            store.clone(),
            layout.clone(),
            events.clone(),
            jobs.clone(),
            config.clone(),
        );
        let vms = Vms::new(
            store.clone(),
            layout.clone(),
            events.clone(),
            config.clone(),
            jobs.clone(),
            images.clone(),
            kernels.clone(),
            vmm,
            net,
            machines,
        );
        Ok(Arc::new(Banger {
            images,
            kernels,
            vms,
            config,
            layout,
            store,
            jobs,
            events,
        }))
    }

    /// Checks that kernel `name` is installed or in the catalog (it is then pulled when a VM
    /// needs it), and that `uid` may use it (theirs or the system's, or `any`); anything else
    /// is refused at once with where to look.
    pub async fn check_kernel_name(&self, uid: u32, name: &str, any: bool) -> Result<()> {
        match self.kernels.get(name).await {
            Ok(k) => crate::kernels::Kernels::check_usable(&k, uid, any),
            Err(crate::Error::Kernel(KernelError::NotFound(_)))
                if self.kernels.in_catalog(name) =>
            {
                Ok(())
            }
            Err(crate::Error::Kernel(KernelError::NotFound(_))) => {
                Err(KernelError::Unavailable(format!(
                    "No kernel {name:?} installed or in the catalog; `banger kernel list \
                     --available` shows what can be pulled, `banger kernel import` adds your own"
                ))
                .into())
            }
            Err(e) => Err(e),
        }
    }

    /// `RegisterImage`: with kernel files, they are imported first as kernel `<image name>`
    /// (the caller's files read as the caller, like ImportKernel) and the image names it.
    pub async fn register_image(
        &self,
        uid: u32,
        name: &str,
        mut opts: crate::images::RegisterOptions,
        any: bool,
    ) -> Result<crate::model::Image> {
        if let Some(kernel_path) = opts.kernel_path.take() {
            if self.kernels.get(name).await.is_ok() {
                return Err(KernelError::NameTaken(format!(
                    "A kernel named {name:?} exists; register with 'kernel' {name:?} to keep it, \
                     or import the new files under another name first"
                ))
                .into());
            }
            let o = crate::kernels::ImportOptions {
                kernel_path: Some(kernel_path),
                initrd_path: opts.initrd_path.take(),
                modules_dir: opts.modules_dir.take(),
            };
            let kernel = self.kernels.import(uid, name, o).await?;
            opts.kernel = Some(kernel.name);
        }
        opts.initrd_path = None;
        opts.modules_dir = None;
        if let Some(k) = &opts.kernel {
            self.check_kernel_name(uid, k, any).await?;
        }
        self.images.register(uid, name, opts, any).await
    }

    /// Every image, kernel, VM and snapshot row, read at once.
    async fn rows(&self) -> Result<Rows> {
        self.store
            .call(|c| {
                Ok(Rows {
                    images: rows::list_images(c)?,
                    kernels: rows::list_kernels(c)?,
                    vms: rows::list_vms(c)?,
                    snapshots: rows::list_snapshots(c)?,
                })
            })
            .await
    }

    /// The disk `uid`'s images, kernels, snapshots and VMs take: the blocks their
    /// directories' files hold (a sparse or layered disk counts what it holds, not its size).
    pub async fn disk_use(&self, uid: u32) -> Result<u64> {
        let l = &self.layout;
        let Rows {
            images,
            kernels,
            vms,
            snapshots: snaps,
        } = self.rows().await?;
        let dirs: Vec<std::path::PathBuf> = (images.iter())
            .filter(|i| i.owner_uid == uid)
            .map(|i| l.images_dir().join(&i.id))
            .chain(
                (kernels.iter())
                    .filter(|k| k.owner_uid == uid)
                    .map(|k| l.kernels_dir().join(&k.name)),
            )
            .chain(
                (vms.iter())
                    .filter(|v| v.owner_uid == uid)
                    .map(|v| l.vms_dir().join(&v.id)),
            )
            .chain(
                (snaps.iter())
                    .filter(|s| s.owner_uid == uid)
                    .map(|s| l.snapshots_dir().join(&s.id)),
            )
            .collect();
        crate::jobs::spawn_blocking(move || dirs.iter().map(|d| allocated(d)).sum())
            .await
            .map_err(|e| crate::Error::failed("Disk use task failed", e))
    }

    /// `max_disk_size_per_user`, or three quarters of the filesystem the state is on.
    pub fn disk_quota(&self) -> u64 {
        self.config.max_disk_size_per_user.unwrap_or_else(|| {
            crate::host::filesystem_size(&self.layout.state_dir).unwrap_or(u64::MAX) / 4 * 3
        })
    }

    /// Refuses making `what`, which takes `adding` bytes at first, for `uid` when their
    /// disk use is at or would pass their quota. The quota is checked when something is
    /// made, not while it grows: a running VM's disk grows up to its own size. So that jobs
    /// still making theirs cannot pass it together, `uid` may run at most `max_jobs_per_user`
    /// at once. Root's objects are the system's and have no quota.
    pub async fn check_disk_quota(&self, uid: u32, adding: u64, what: &str) -> Result<()> {
        if uid == crate::model::SYSTEM_UID {
            return Ok(());
        }
        // What running jobs are still making is not counted yet: their number is bounded.
        let running = self
            .jobs
            .list()
            .iter()
            .filter(|j| j.owner_uid == uid)
            .count() as u32;
        let most = self.config.max_jobs_per_user;
        if running >= most {
            return Err(crate::Error::LimitExceeded(format!(
                "uid {uid} has {running} jobs running, against max_jobs_per_user ({most}): \
                 {what} waits until one ends (`banger job list` shows them, `banger job cancel` \
                 ends one), or have the operator raise max_jobs_per_user"
            )));
        }
        let (used, max) = (self.disk_use(uid).await?, self.disk_quota());
        if used.saturating_add(adding) > max || used >= max {
            let gib = |b: u64| match b {
                b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / f64::from(1u32 << 30)),
                b => format!("{} MiB", b.div_ceil(1 << 20)),
            };
            let more = if adding > 0 {
                format!(" and {what} would take {} more", gib(adding))
            } else {
                String::new()
            };
            return Err(crate::Error::LimitExceeded(format!(
                "uid {uid}'s images, kernels, snapshots and VMs take {} of disk{more}, \
                 against max_disk_size_per_user ({}); delete some (`banger vm delete`, \
                 `banger snapshot delete`, `banger image delete`) or have the operator raise \
                 max_disk_size_per_user in /etc/banger/config.toml",
                gib(used),
                gib(max)
            )));
        }
        Ok(())
    }

    /// How many of each thing there are.
    pub async fn counts(&self) -> Result<Counts> {
        let Rows {
            images,
            kernels,
            vms,
            ..
        } = self.rows().await?;
        let running = vms
            .iter()
            .filter(|v| v.state == crate::model::VmState::Running)
            .count();
        Ok(Counts {
            images: images.len() as u32,
            kernels: kernels.len() as u32,
            vms: vms.len() as u32,
            running_vms: running as u32,
            jobs: self.jobs.list().len() as u32,
        })
    }
}

/// Every row of each kind (see [`Banger::rows`]).
struct Rows {
    images: Vec<crate::model::Image>,
    kernels: Vec<crate::model::Kernel>,
    vms: Vec<crate::model::Vm>,
    snapshots: Vec<crate::model::Snapshot>,
}

/// How deep [`allocated`] counts: banger's object directories are shallow, and the walk holds
/// two descriptors a level.
const MAX_DEPTH: usize = 16;

/// The bytes the files under `dir` hold on disk (`du`). A VM's directory is its VM uid's (a
/// hostile VMM may have written it), so the walk goes by descriptors: each directory is
/// opened from its parent's descriptor without following a link and listed through its own,
/// and each entry is examined without following one, so a name swapped for a link while root
/// walks leads nowhere else. What cannot be read, and what lies deeper than [`MAX_DEPTH`],
/// counts as nothing.
fn allocated(dir: &std::path::Path) -> u64 {
    let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW;
    match crate::host::openat(libc::AT_FDCWD, dir, flags) {
        Ok(d) => allocated_in(&d, 0),
        Err(_) => 0,
    }
}

fn allocated_in(dir: &std::os::fd::OwnedFd, depth: usize) -> u64 {
    use std::os::fd::AsRawFd;
    let Ok(entries) = std::fs::read_dir(format!("/proc/self/fd/{}", dir.as_raw_fd())) else {
        return 0;
    };
    let mut total = 0;
    for e in entries.flatten() {
        let name = std::path::PathBuf::from(e.file_name());
        let flags = libc::O_PATH | libc::O_NOFOLLOW;
        let Ok(st) =
            crate::host::openat(dir.as_raw_fd(), &name, flags).and_then(|f| crate::host::fstat(&f))
        else {
            continue;
        };
        total += st.st_blocks as u64 * 512;
        if st.st_mode & libc::S_IFMT == libc::S_IFDIR && depth < MAX_DEPTH {
            let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW;
            if let Ok(sub) = crate::host::openat(dir.as_raw_fd(), &name, flags) {
                total += allocated_in(&sub, depth + 1);
            }
        }
    }
    total
}

/// The kinds of work `bangerd worker` does, each the service's that asks for it.
pub const WORKS: &[(&str, crate::worker::Work)] = &[
    ("pull", crate::images::pull::work),
    ("seed-work", crate::vms::create::seed_work_in_a_worker),
];

#[cfg(test)]
mod tests {
    #[test]
    fn disk_use_counts_what_is_inside_and_follows_no_link() {
        let t = tempfile::tempdir().unwrap();
        let (inside, outside) = (t.path().join("vm"), t.path().join("elsewhere"));
        std::fs::create_dir_all(inside.join("sub")).unwrap();
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(inside.join("sub/disk"), vec![1u8; 1 << 20]).unwrap();
        std::fs::write(outside.join("big"), vec![1u8; 8 << 20]).unwrap();
        // Links out (to a directory and to a file) count as the links they are.
        std::os::unix::fs::symlink(&outside, inside.join("link")).unwrap();
        std::os::unix::fs::symlink(outside.join("big"), inside.join("file-link")).unwrap();
        let n = super::allocated(&inside);
        assert!((1 << 20..2 << 20).contains(&n), "{n}");
        // A link given as the directory itself is not followed either.
        assert_eq!(super::allocated(&inside.join("link")), 0);
    }
}
