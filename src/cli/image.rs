//! `banger image …`.

use clap::Subcommand;
use serde_json::json;

use super::{explain, vm::opts, vm::print_job, Output};
use crate::dbus::proxy::Images1Proxy;

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

/// Runs an image verb.
pub async fn run(out: &Output, conn: &zbus::Connection, cmd: ImageCommand) -> anyhow::Result<()> {
    let p = Images1Proxy::new(conn).await?;
    match cmd {
        ImageCommand::List => {
            let rows = p.list_images().await.map_err(explain)?;
            let owners = super::owners(conn).await?;
            let rows = rows
                .into_iter()
                .map(|(id, name, managed, source, path)| {
                    let owner = owners.get(path.as_str()).copied().unwrap_or_default();
                    vec![
                        json!(name),
                        json!(id),
                        json!(super::owner_name(owner)),
                        json!(managed),
                        json!(source),
                        json!(path.as_str()),
                    ]
                })
                .collect();
            out.table(
                &["NAME", "ID", "OWNER", "MANAGED", "SOURCE", "OBJECT"],
                &["name", "id", "owner", "managed", "source", "path"],
                rows,
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
            let o = opts(
                name.map(|n| ("name", n.into()))
                    .into_iter()
                    .chain(kernel.map(|k| ("kernel", k.into())))
                    .chain(size.map(|s| ("size", s.into())))
                    .chain(insecure.then(|| ("insecure", true.into())))
                    .chain(ready_ports.map(|p| ("ready_ports", p.into())))
                    .chain(
                        registry_credentials(&reference).map(|c| ("auth", c.to_option().into())),
                    ),
            );
            let watch = super::watch::subscribe(conn).await?;
            let (id, path) = p.pull_image(&reference, o).await.map_err(explain)?;
            if no_wait {
                print_job(out, id, &path);
            } else {
                watch.follow(out, id, &path).await?;
                if !out.json {
                    println!("Pulled {reference}");
                }
            }
        }
        ImageCommand::Build {
            name,
            suite,
            packages,
            size,
            kernel,
            ready_ports,
        } => {
            let mut entries: Vec<(&str, zbus::Variant<'static>)> = Vec::new();
            if let Some(s) = suite {
                entries.push(("suite", s.into()));
            }
            if !packages.is_empty() {
                entries.push(("packages", packages.into()));
            }
            if let Some(s) = size {
                entries.push(("size", s.into()));
            }
            if let Some(k) = kernel {
                entries.push(("kernel", k.into()));
            }
            if !ready_ports.is_empty() {
                entries.push(("ready_ports", ready_ports.into()));
            }
            let watch = super::watch::subscribe(conn).await?;
            let (id, path) = p.build_image(&name, opts(entries)).await.map_err(explain)?;
            watch.follow(out, id, &path).await?;
            if !out.json {
                println!("Built image {name}");
            }
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
            let mut entries = vec![("rootfs", super::files::open_file(&rootfs)?)];
            if let Some(s) = work_seed {
                entries.push(("work_seed", super::files::open_file(&s)?));
            }
            if let Some(k) = kernel {
                entries.push(("kernel", k.into()));
            }
            if let Some(k) = kernel_path {
                entries.extend(super::files::kernel_entries(
                    &k,
                    initrd.as_deref(),
                    modules.as_deref(),
                )?);
            }
            if let Some(r) = ready_ports {
                entries.push(("ready_ports", r.into()));
            }
            let path = p
                .register_image(&name, opts(entries))
                .await
                .map_err(explain)?;
            out.object(vec![("name", json!(name)), ("path", json!(path.as_str()))]);
        }
        ImageCommand::Promote { name } => {
            let watch = super::watch::subscribe(conn).await?;
            let (id, path) = p.promote_image(&name).await.map_err(explain)?;
            watch.follow(out, id, &path).await?;
            if !out.json {
                println!("Image {name} is managed");
            }
        }
        ImageCommand::Warm {
            name,
            kernel,
            vcpus,
            memory,
        } => {
            let o = super::vm::opts(
                kernel
                    .map(|k| ("kernel", k.into()))
                    .into_iter()
                    .chain(vcpus.map(|v| ("vcpus", v.into())))
                    .chain(memory.map(|m| ("memory_mib", m.into()))),
            );
            let watch = super::watch::subscribe(conn).await?;
            let (id, path) = p.warm_image(&name, o).await.map_err(explain)?;
            watch.follow(out, id, &path).await?;
            out.done(vec![("name", json!(name)), ("warm", json!(true))]);
        }
        ImageCommand::Show { name } => {
            let path = p.get_image(&name).await.map_err(explain)?;
            let (mut fields, _) = super::vm::object_fields(
                conn,
                &path,
                "org.banger.Image1",
                &[
                    "Name",
                    "Id",
                    "Managed",
                    "Source",
                    "Kernel",
                    "SizeBytes",
                    "ReadyPorts",
                    "Env",
                    "WorkingDir",
                    "User",
                    "Entrypoint",
                    "Cmd",
                    "CreatedAt",
                ],
            )
            .await?;
            fields.push(("Path", json!(path.as_str())));
            out.object(fields);
        }
        ImageCommand::Delete { name } => {
            p.delete_image(&name).await.map_err(explain)?;
            out.done(vec![("name", json!(name)), ("deleted", json!(true))]);
        }
        ImageCommand::Prune => {
            let (bytes, blobs) = p.prune_cache(Default::default()).await.map_err(explain)?;
            pruned(out, bytes, blobs.into());
        }
    }
    Ok(())
}

/// What `image prune` says.
pub(super) fn pruned(out: &Output, bytes: u64, blobs: u64) {
    out.say(&format!(
        "Removed {blobs} cached blob(s), {:.1} MiB",
        bytes as f64 / (1u64 << 20) as f64
    ));
    out.done(vec![("freed_bytes", json!(bytes)), ("blobs", json!(blobs))]);
}
