//! `banger kernel …`.

use clap::Subcommand;
use serde_json::json;

use super::transport::{name_owners, show, table, Transport};
use super::Output;

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

/// Runs a kernel verb over `t`.
pub(crate) async fn run(
    out: &Output,
    t: &mut impl Transport,
    cmd: KernelCommand,
) -> anyhow::Result<()> {
    match cmd {
        KernelCommand::List { available: false } => {
            let mut kernels = t.kernels().await?;
            name_owners(t, &mut kernels).await?;
            table(
                out,
                &["NAME", "VERSION", "OWNER", "SOURCE"],
                &["name", "version", "owner", "source"],
                &kernels,
            );
        }
        KernelCommand::List { available: true } => {
            table(
                out,
                &["NAME", "VERSION", "DESCRIPTION"],
                &["name", "version", "description"],
                &t.available_kernels().await?,
            );
        }
        KernelCommand::Pull { name } => {
            t.pull_kernel(out, &name).await?;
            out.say(&format!("Pulled kernel {name}"));
        }
        KernelCommand::Import {
            name,
            kernel,
            initrd,
            modules,
        } => {
            let k = t
                .import_kernel(&name, &kernel, initrd.as_deref(), modules.as_deref())
                .await?;
            show(out, &k);
        }
        KernelCommand::Show { name } => show(out, &t.kernel(&name).await?),
        KernelCommand::Delete { name } => {
            t.delete_kernel(&name).await?;
            out.done(vec![("name", json!(name)), ("deleted", json!(true))]);
        }
    }
    Ok(())
}
