//! `banger snapshot …`.

use clap::Subcommand;
use serde_json::json;

use super::transport::{show, table, Transport};
use super::Output;

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

/// Runs a snapshot verb over `t`.
pub(crate) async fn run(
    out: &Output,
    t: &mut impl Transport,
    cmd: SnapshotCommand,
) -> anyhow::Result<()> {
    match cmd {
        SnapshotCommand::List { all } => {
            let mut snapshots = t.snapshots().await?;
            snapshots.retain(|s| all || !s["name"].as_str().unwrap_or("").starts_with('.'));
            table(
                out,
                &["NAME", "ID", "VM"],
                &["name", "id", "vm"],
                &snapshots,
            );
        }
        SnapshotCommand::Show { name } => show(out, &t.snapshot(&name).await?),
        SnapshotCommand::Delete { name } => {
            t.delete_snapshot(&name).await?;
            out.done(vec![("name", json!(name)), ("deleted", json!(true))]);
        }
    }
    Ok(())
}
