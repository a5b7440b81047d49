//! `banger snapshot …`.

use clap::Subcommand;
use serde_json::json;

use super::{explain, Output};
use crate::dbus::proxy::Snapshots1Proxy;

/// Snapshot verbs (taken with `banger vm snapshot`, restored with `vm create --snapshot`).
#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// List snapshots (banger's own warm snapshots, named `.warm-…`, only with --all).
    List {
        /// Also the snapshots whose names start with a dot (banger's warm snapshots).
        #[arg(long, short)]
        all: bool,
    },
    /// Show a snapshot.
    Show {
        /// Snapshot name or id.
        name: String,
    },
    /// Delete a snapshot no VM was restored from.
    Delete {
        /// Snapshot name or id.
        name: String,
    },
}

/// Runs a snapshot verb.
pub async fn run(
    out: &Output,
    conn: &zbus::Connection,
    cmd: SnapshotCommand,
) -> anyhow::Result<()> {
    let p = Snapshots1Proxy::new(conn).await?;
    match cmd {
        SnapshotCommand::List { all } => {
            let rows = p.list_snapshots().await.map_err(explain)?;
            let rows = rows
                .into_iter()
                .filter(|(_, name, ..)| all || !name.starts_with('.'))
                .map(|(id, name, vm, path)| {
                    vec![json!(name), json!(id), json!(vm), json!(path.as_str())]
                })
                .collect();
            out.table(
                &["NAME", "ID", "VM", "OBJECT"],
                &["name", "id", "vm", "path"],
                rows,
            );
        }
        SnapshotCommand::Show { name } => {
            let path = p.get_snapshot(&name).await.map_err(explain)?;
            let (mut fields, _) = super::vm::object_fields(
                conn,
                &path,
                "org.banger.Snapshot1",
                &[
                    "Name",
                    "Id",
                    "Vm",
                    "Image",
                    "Kernel",
                    "VCpus",
                    "MemoryMiB",
                    "SizeBytes",
                    "CreatedAt",
                    "Owner",
                ],
            )
            .await?;
            fields.push(("path", json!(path.as_str())));
            out.object(fields);
        }
        SnapshotCommand::Delete { name } => {
            p.delete_snapshot(&name).await.map_err(explain)?;
            out.done(vec![("name", json!(name)), ("deleted", json!(true))]);
        }
    }
    Ok(())
}
