//! `banger kernel …`.

use clap::Subcommand;
use serde_json::json;

use super::{explain, vm::opts, Output};
use crate::dbus::proxy::Kernels1Proxy;

/// Kernel verbs.
#[derive(Debug, Subcommand)]
pub enum KernelCommand {
    /// List installed kernels, or the catalog with --available.
    List {
        /// Show the catalog instead.
        #[arg(long)]
        available: bool,
    },
    /// Pull a catalog kernel.
    Pull {
        /// Catalog name.
        name: String,
    },
    /// Import a kernel file (bzImage or ELF), with an initrd and modules directory.
    Import {
        /// Kernel name.
        name: String,
        /// The kernel file.
        #[arg(long = "kernel")]
        kernel: std::path::PathBuf,
        /// A ready initrd.
        #[arg(long)]
        initrd: Option<std::path::PathBuf>,
        /// The modules directory (lib/modules/VERSION).
        #[arg(long)]
        modules: Option<std::path::PathBuf>,
    },
    /// Show an installed kernel.
    Show {
        /// Kernel name.
        name: String,
    },
    /// Delete a kernel nothing uses.
    Delete {
        /// Kernel name.
        name: String,
    },
}

/// Runs a kernel verb.
pub async fn run(out: &Output, conn: &zbus::Connection, cmd: KernelCommand) -> anyhow::Result<()> {
    let p = Kernels1Proxy::new(conn).await?;
    match cmd {
        KernelCommand::List { available: false } => {
            let rows = p.list_kernels().await.map_err(explain)?;
            let owners = super::owners(conn).await?;
            let rows = rows
                .into_iter()
                .map(|(n, v, s, path)| {
                    let owner = owners.get(path.as_str()).copied().unwrap_or_default();
                    vec![
                        json!(n),
                        json!(v),
                        json!(super::owner_name(owner)),
                        json!(s),
                        json!(path.as_str()),
                    ]
                })
                .collect();
            out.table(
                &["NAME", "VERSION", "OWNER", "SOURCE", "OBJECT"],
                &["name", "version", "owner", "source", "path"],
                rows,
            );
        }
        KernelCommand::List { available: true } => {
            let rows = p.list_available_kernels().await.map_err(explain)?;
            let rows = rows
                .into_iter()
                .map(|(n, v, d)| vec![json!(n), json!(v), json!(d)])
                .collect();
            out.table(
                &["NAME", "VERSION", "DESCRIPTION"],
                &["name", "version", "description"],
                rows,
            );
        }
        KernelCommand::Pull { name } => {
            let watch = super::watch::subscribe(conn).await?;
            let (id, path) = p.pull_kernel(&name, opts(None)).await.map_err(explain)?;
            watch.follow(out, id, &path).await?;
            if !out.json {
                println!("Pulled kernel {name}");
            }
        }
        KernelCommand::Import {
            name,
            kernel,
            initrd,
            modules,
        } => {
            // Opened here, as the user who runs this; the daemon gets descriptors.
            let entries =
                super::files::kernel_entries(&kernel, initrd.as_deref(), modules.as_deref())?;
            let path = p
                .import_kernel(&name, opts(entries))
                .await
                .map_err(explain)?;
            out.object(vec![("name", json!(name)), ("path", json!(path.as_str()))]);
        }
        KernelCommand::Show { name } => {
            let path = p.get_kernel(&name).await.map_err(explain)?;
            let k = crate::dbus::proxy::Kernel1Proxy::builder(conn)
                .path(path.clone())
                .build()
                .await?;
            out.object(vec![
                ("name", json!(k.name().await?)),
                ("version", json!(k.version().await?)),
                ("source", json!(k.source().await?)),
                ("kernel_path", json!(k.kernel_path().await?)),
                ("initrd_path", json!(k.initrd_path().await?)),
                ("modules_dir", json!(k.modules_dir().await?)),
                ("path", json!(path.as_str())),
            ]);
        }
        KernelCommand::Delete { name } => {
            p.delete_kernel(&name).await.map_err(explain)?;
            out.done(vec![("name", json!(name)), ("deleted", json!(true))]);
        }
    }
    Ok(())
}
