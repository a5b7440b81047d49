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
    /// Pull an image from the catalog or an OCI registry.
    Pull {
        /// Catalog name or OCI reference.
        reference: String,
        /// Image name (derived from the reference by default).
        #[arg(long)]
        name: Option<String>,
    },
    /// Delete an image no VM uses.
    Delete {
        /// Image name or id.
        name: String,
    },
}

/// Runs an image verb.
pub async fn run(out: &Output, conn: &zbus::Connection, cmd: ImageCommand) -> anyhow::Result<()> {
    let p = Images1Proxy::new(conn).await?;
    match cmd {
        ImageCommand::List => {
            let rows = p.list_images().await.map_err(explain)?;
            let rows = rows
                .into_iter()
                .map(|(id, name, managed, source, path)| {
                    vec![
                        json!(name),
                        json!(id),
                        json!(managed),
                        json!(source),
                        json!(path.as_str()),
                    ]
                })
                .collect();
            out.table(
                &["NAME", "ID", "MANAGED", "SOURCE", "OBJECT"],
                &["name", "id", "managed", "source", "path"],
                rows,
            );
        }
        ImageCommand::Pull { reference, name } => {
            let o = opts(name.map(|n| ("name", n.into())));
            let (id, path) = p.pull_image(&reference, o).await.map_err(explain)?;
            print_job(out, id, &path);
        }
        ImageCommand::Delete { name } => p.delete_image(&name).await.map_err(explain)?,
    }
    Ok(())
}
