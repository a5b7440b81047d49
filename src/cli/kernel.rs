//! `banger kernel …`.

use clap::Subcommand;
use serde_json::json;

use super::{explain, vm::opts, vm::print_job, Output};
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
            let rows = rows
                .into_iter()
                .map(|(n, v, s, path)| vec![json!(n), json!(v), json!(s), json!(path.as_str())])
                .collect();
            out.table(
                &["NAME", "VERSION", "SOURCE", "OBJECT"],
                &["name", "version", "source", "path"],
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
            let (id, path) = p.pull_kernel(&name, opts(None)).await.map_err(explain)?;
            print_job(out, id, &path);
        }
        KernelCommand::Delete { name } => p.delete_kernel(&name).await.map_err(explain)?,
    }
    Ok(())
}
