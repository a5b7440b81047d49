//! `banger vm …`.

use clap::Subcommand;
use serde_json::json;
use zbus::{OwnedObjectPath, OwnedVariant, Variant};

use super::{explain, Output};
use crate::dbus::proxy::{Opts, VMs1Proxy};

/// VM verbs.
#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// List VMs.
    List,
    /// Create and start a VM.
    Create {
        /// VM name.
        name: String,
        /// Image name (the default image when omitted).
        #[arg(long)]
        image: Option<String>,
    },
    /// Start a stopped VM.
    Start {
        /// VM name or id.
        name: String,
    },
    /// Stop a VM.
    Stop {
        /// VM name or id.
        name: String,
        /// Kill it at once.
        #[arg(long)]
        force: bool,
    },
    /// Delete a VM.
    Delete {
        /// VM name or id.
        name: String,
        /// Delete it even while it runs.
        #[arg(long)]
        force: bool,
    },
}

/// Builds an options map from optional entries.
pub fn opts<'a>(entries: impl IntoIterator<Item = (&'a str, Variant<'static>)>) -> Opts {
    entries
        .into_iter()
        .filter_map(|(k, v)| OwnedVariant::try_from(v).ok().map(|v| (k.to_owned(), v)))
        .collect()
}

/// Reports a started job.
pub fn print_job(out: &Output, id: u32, path: &OwnedObjectPath) {
    out.object(vec![
        ("job_id", json!(id)),
        ("job_path", json!(path.as_str())),
    ]);
}

/// Runs a VM verb.
pub async fn run(out: &Output, conn: &zbus::Connection, cmd: VmCommand) -> anyhow::Result<()> {
    let p = VMs1Proxy::new(conn).await?;
    match cmd {
        VmCommand::List => {
            let rows = p.list_vms().await.map_err(explain)?;
            let rows = rows
                .into_iter()
                .map(|(id, name, state, image, path)| {
                    vec![
                        json!(name),
                        json!(id),
                        json!(state),
                        json!(image),
                        json!(path.as_str()),
                    ]
                })
                .collect();
            out.table(
                &["NAME", "ID", "STATE", "IMAGE", "OBJECT"],
                &["name", "id", "state", "image", "path"],
                rows,
            );
        }
        VmCommand::Create { name, image } => {
            let o = opts(image.map(|i| ("image", i.into())));
            let (vm, id, path) = p.create_vm(&name, o).await.map_err(explain)?;
            out.object(vec![
                ("vm_path", json!(vm.as_str())),
                ("job_id", json!(id)),
                ("job_path", json!(path.as_str())),
            ]);
        }
        VmCommand::Start { name } => {
            let (id, path) = p.start_vm(&name).await.map_err(explain)?;
            print_job(out, id, &path);
        }
        VmCommand::Stop { name, force } => p
            .stop_vm(&name, opts([("force", force.into())]))
            .await
            .map_err(explain)?,
        VmCommand::Delete { name, force } => p
            .delete_vm(&name, opts([("force", force.into())]))
            .await
            .map_err(explain)?,
    }
    Ok(())
}
