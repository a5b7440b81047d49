//! `banger image …`.

use clap::Subcommand;
use serde_json::json;

use super::transport::{kernel_files, name_owners, show, table, JobCall, Opt, Opts, Transport};
use super::Output;

/// Image verbs.
#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// List images.
    List,
    /// Pull an image from an OCI registry and build a bootable ext4 from it.
    Pull {
        /// OCI reference, e.g. docker.io/library/debian:bookworm.
        reference: String,
        /// Image name (derived from the reference by default: debian-bookworm).
        #[arg(long)]
        name: Option<String>,
        /// The kernel the image boots with by default.
        #[arg(long)]
        kernel: Option<String>,
        /// Root filesystem size: bytes, or with a unit (4G); default the layers plus 25%, at
        /// least 1 GiB.
        #[arg(long, value_parser = super::parse_bytes)]
        size: Option<u64>,
        /// Talk plain HTTP to the registry.
        #[arg(long)]
        insecure: bool,
        /// TCP ports VMs wait for before they are ready, e.g. 8080,5432 (default: the
        /// image's `org.banger.ready_ports` label).
        #[arg(long, value_delimiter = ',')]
        ready_ports: Option<Vec<u16>>,
        /// Return once the job started instead of following it.
        #[arg(long)]
        no_wait: bool,
    },
    /// Build a Debian image with debootstrap from this host's apt sources.
    Build {
        /// Image name.
        name: String,
        /// Debian suite.
        #[arg(long)]
        suite: Option<String>,
        /// Extra packages (repeatable).
        #[arg(long = "package")]
        packages: Vec<String>,
        /// Root filesystem size: bytes, or with a unit (4G).
        #[arg(long, value_parser = super::parse_bytes)]
        size: Option<u64>,
        /// The kernel the image boots with by default.
        #[arg(long)]
        kernel: Option<String>,
        /// TCP ports VMs wait for before they are ready, e.g. 8080,5432.
        #[arg(long, value_delimiter = ',')]
        ready_ports: Vec<u16>,
        /// Make this account (uid 1000, passwordless sudo with --package sudo), which the
        /// image's commands, terminals and files then default to, in its home.
        #[arg(long)]
        user: Option<String>,
    },
    /// Register your own ext4 files as an image: they are opened here, as you, and the
    /// daemon copies them (re-registering a name replaces its files).
    Register {
        /// Image name.
        name: String,
        /// The root filesystem (an ext4 image file).
        #[arg(long)]
        rootfs: std::path::PathBuf,
        /// The seed of each VM's persistent /root disk (an ext4 image file).
        #[arg(long)]
        work_seed: Option<std::path::PathBuf>,
        /// An installed or catalog kernel the image boots with.
        #[arg(long, conflicts_with = "kernel_path")]
        kernel: Option<String>,
        /// A kernel file to import with the image (as kernel NAME).
        #[arg(long)]
        kernel_path: Option<std::path::PathBuf>,
        /// An initrd for --kernel-path (banger builds one from --modules when absent).
        #[arg(long, requires = "kernel_path")]
        initrd: Option<std::path::PathBuf>,
        /// The modules directory for --kernel-path.
        #[arg(long, requires = "kernel_path")]
        modules: Option<std::path::PathBuf>,
        /// TCP ports VMs wait for before they are ready, e.g. 8080,5432.
        #[arg(long, value_delimiter = ',')]
        ready_ports: Option<Vec<u16>>,
    },
    /// Make a registered image managed (banger's to keep and delete).
    Promote {
        /// Image name or id.
        name: String,
    },
    /// Make the image's warm snapshot now, from which later VMs of this shape start
    /// instantly (banger makes it by itself after the first cold boot of a shape).
    Warm {
        /// Image name or id.
        name: String,
        /// Kernel (the image's, else the default).
        #[arg(long)]
        kernel: Option<String>,
        /// Virtual CPUs of the VMs it serves.
        #[arg(long)]
        vcpus: Option<u32>,
        /// Memory of the VMs it serves: MiB, or with a unit (512M, 2G).
        #[arg(long, value_parser = super::parse_memory_mib)]
        memory: Option<u32>,
    },
    /// Show an image's properties, its OCI run settings among them.
    Show {
        /// Image name or id.
        name: String,
    },
    /// Delete an image no VM uses.
    Delete {
        /// Image name or id.
        name: String,
    },
    /// Empty the download cache: the registry layers pulls keep for later pulls (no image
    /// needs them). An administrator's verb: the cache is every user's.
    Prune,
}

/// The caller's own credentials for the registry of `reference` (an explicit reference
/// only, never a catalog name): `$REGISTRY_AUTH_FILE`, `$XDG_RUNTIME_DIR/containers/auth.json`
/// (podman, skopeo), then `~/.docker/config.json`. Read here, as the caller; the daemon
/// gets them for this pull only.
pub fn registry_credentials(reference: &str) -> Option<crate::oci::auth::Credentials> {
    if !reference.contains(['/', ':']) {
        return None;
    }
    let registry = crate::oci::reference::parse(reference)
        .ok()?
        .registry()
        .to_owned();
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(std::path::PathBuf::from)
    };
    [
        var("REGISTRY_AUTH_FILE"),
        var("XDG_RUNTIME_DIR").map(|d| d.join("containers/auth.json")),
        var("HOME").map(|h| h.join(".docker/config.json")),
    ]
    .into_iter()
    .flatten()
    .find_map(|f| crate::oci::auth::from_file(&f, &registry))
}

/// Runs an image verb over `t`.
pub(crate) async fn run(
    out: &Output,
    t: &mut impl Transport,
    cmd: ImageCommand,
) -> anyhow::Result<()> {
    let job = |dbus, varlink, target, opts| JobCall {
        interface: "Images1",
        dbus,
        varlink,
        target,
        with_options: true,
        opts,
    };
    match cmd {
        ImageCommand::List => {
            let mut images = t.images().await?;
            name_owners(t, &mut images).await?;
            table(
                out,
                &["NAME", "ID", "OWNER", "MANAGED", "SOURCE"],
                &["name", "id", "owner", "managed", "source"],
                &images,
            );
        }
        ImageCommand::Pull {
            reference,
            name,
            kernel,
            size,
            insecure,
            ready_ports,
            no_wait,
        } => {
            let opts = [
                name.map(|n| ("name", Opt::Str(n))),
                kernel.map(|k| ("kernel", Opt::Str(k))),
                size.map(|s| ("size", Opt::U64(s))),
                insecure.then_some(("insecure", Opt::Bool(true))),
                ready_ports.map(|p| ("ready_ports", Opt::Ports(p))),
                registry_credentials(&reference).map(|c| ("auth", Opt::Str(c.to_option()))),
            ];
            let call = job("PullImage", "Pull", ("ref", &reference), some(opts));
            t.run_job(out, call, !no_wait).await?;
            if !no_wait {
                out.say(&format!("Pulled {reference}"));
            }
        }
        ImageCommand::Build {
            name,
            suite,
            packages,
            size,
            kernel,
            ready_ports,
            user,
        } => {
            let opts = [
                suite.map(|s| ("suite", Opt::Str(s))),
                user.map(|u| ("user", Opt::Str(u))),
                (!packages.is_empty()).then_some(("packages", Opt::Strs(packages))),
                size.map(|s| ("size", Opt::U64(s))),
                kernel.map(|k| ("kernel", Opt::Str(k))),
                (!ready_ports.is_empty()).then_some(("ready_ports", Opt::Ports(ready_ports))),
            ];
            let call = job("BuildImage", "Build", ("name", &name), some(opts));
            t.run_job(out, call, true).await?;
            out.say(&format!("Built image {name}"));
        }
        ImageCommand::Register {
            name,
            rootfs,
            work_seed,
            kernel,
            kernel_path,
            initrd,
            modules,
            ready_ports,
        } => {
            let mut opts = some([
                Some(("rootfs", Opt::File(rootfs))),
                work_seed.map(|s| ("work_seed", Opt::File(s))),
                kernel.map(|k| ("kernel", Opt::Str(k))),
            ]);
            if let Some(k) = kernel_path {
                opts.extend(kernel_files(&k, initrd.as_deref(), modules.as_deref()));
            }
            opts.extend(ready_ports.map(|r| ("ready_ports", Opt::Ports(r))));
            show(out, &t.register_image(&name, opts).await?);
        }
        ImageCommand::Promote { name } => {
            let call = JobCall {
                with_options: false,
                ..job("PromoteImage", "Promote", ("name", &name), Vec::new())
            };
            t.run_job(out, call, true).await?;
            out.say(&format!("Image {name} is managed"));
        }
        ImageCommand::Warm {
            name,
            kernel,
            vcpus,
            memory,
        } => {
            let opts = [
                kernel.map(|k| ("kernel", Opt::Str(k))),
                vcpus.map(|v| ("vcpus", Opt::U32(v))),
                memory.map(|m| ("memory_mib", Opt::U32(m))),
            ];
            let call = job("WarmImage", "Warm", ("name", &name), some(opts));
            t.run_job(out, call, true).await?;
            out.done(vec![("name", json!(name)), ("warm", json!(true))]);
        }
        ImageCommand::Show { name } => show(out, &t.image(&name).await?),
        ImageCommand::Delete { name } => {
            t.delete_image(&name).await?;
            out.done(vec![("name", json!(name)), ("deleted", json!(true))]);
        }
        ImageCommand::Prune => {
            let (bytes, blobs) = t.prune_cache().await?;
            pruned(out, bytes, blobs);
        }
    }
    Ok(())
}

/// The options given.
fn some<const N: usize>(opts: [Option<(&'static str, Opt)>; N]) -> Opts {
    opts.into_iter().flatten().collect()
}

/// What `image prune` says.
pub(super) fn pruned(out: &Output, bytes: u64, blobs: u64) {
    out.say(&format!(
        "Removed {blobs} cached blob(s), {:.1} MiB",
        bytes as f64 / (1u64 << 20) as f64
    ));
    out.done(vec![("freed_bytes", json!(bytes)), ("blobs", json!(blobs))]);
}
