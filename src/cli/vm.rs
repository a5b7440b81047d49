//! `banger vm …`.

use std::time::Duration;

use clap::Subcommand;
use serde_json::json;
use tokio::io::AsyncWriteExt;
use zbus::{OwnedObjectPath, OwnedVariant, Variant};

use super::{explain, Output};
use crate::dbus::proxy::{Opts, VM1Proxy, VMs1Proxy};

/// VM verbs.
#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// List VMs.
    List,
    /// Create a VM and start it, following its stages until it is ready.
    Create {
        /// VM name.
        name: String,
        /// Image name (the configured default image when omitted).
        #[arg(long)]
        image: Option<String>,
        /// Kernel name (the image's, else the configured default, when omitted).
        #[arg(long)]
        kernel: Option<String>,
        /// Virtual CPUs.
        #[arg(long)]
        vcpus: Option<u32>,
        /// Memory in MiB.
        #[arg(long)]
        memory: Option<u32>,
        /// Root disk size in bytes (at least the image's).
        #[arg(long)]
        disk_size: Option<u64>,
        /// Reserve it only; start it later with `banger vm start`.
        #[arg(long)]
        no_start: bool,
        /// Return once the job started instead of following it.
        #[arg(long)]
        no_wait: bool,
    },
    /// Start a stopped VM and follow it until it is ready.
    Start {
        /// VM name or id.
        name: String,
        /// Return once the job started instead of following it.
        #[arg(long)]
        no_wait: bool,
    },
    /// Stop a VM: a clean power-off, then a kill after the timeout.
    Stop {
        /// VM name or id.
        name: String,
        /// Kill it at once.
        #[arg(long)]
        force: bool,
        /// Seconds to wait for the guest to power off.
        #[arg(long)]
        timeout: Option<u32>,
    },
    /// Delete a VM and its disks.
    Delete {
        /// VM name or id.
        name: String,
        /// Delete it even while it runs.
        #[arg(long)]
        force: bool,
    },
    /// Show a VM's properties.
    Show {
        /// VM name or id.
        name: String,
    },
    /// Run a command in a running VM through its agent; exits with the command's status.
    Exec {
        /// VM name or id.
        name: String,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
        /// Extra environment for the command, KEY=VALUE (repeatable).
        #[arg(long = "env", short = 'e')]
        env: Vec<String>,
    },
    /// Print the VM's serial console log of its last boot.
    Logs {
        /// VM name or id.
        name: String,
        /// Keep printing what the console writes.
        #[arg(long, short = 'f')]
        follow: bool,
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

async fn vm_proxy<'a>(
    conn: &'a zbus::Connection,
    p: &VMs1Proxy<'_>,
    name: &str,
) -> anyhow::Result<VM1Proxy<'a>> {
    let path = p.get_vm(name).await.map_err(explain)?;
    Ok(VM1Proxy::builder(conn).path(path).build().await?)
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
        VmCommand::Create {
            name,
            image,
            kernel,
            vcpus,
            memory,
            disk_size,
            no_start,
            no_wait,
        } => {
            let o = opts(
                image
                    .map(|i| ("image", i.into()))
                    .into_iter()
                    .chain(kernel.map(|k| ("kernel", k.into())))
                    .chain(vcpus.map(|v| ("vcpus", v.into())))
                    .chain(memory.map(|m| ("memory_mib", m.into())))
                    .chain(disk_size.map(|d| ("disk_size", d.into())))
                    .chain(no_start.then(|| ("start", false.into()))),
            );
            let watch = super::watch::subscribe(conn).await?;
            let (vm, id, path) = p.create_vm(&name, o).await.map_err(explain)?;
            if no_wait {
                out.object(vec![
                    ("vm_path", json!(vm.as_str())),
                    ("job_id", json!(id)),
                    ("job_path", json!(path.as_str())),
                ]);
            } else {
                watch.follow(out, id, &path).await?;
                if !out.json {
                    println!(
                        "VM {name} is {}",
                        if no_start { "created" } else { "running" }
                    );
                }
            }
        }
        VmCommand::Start { name, no_wait } => {
            let watch = super::watch::subscribe(conn).await?;
            let (id, path) = p.start_vm(&name).await.map_err(explain)?;
            if no_wait {
                print_job(out, id, &path);
            } else {
                watch.follow(out, id, &path).await?;
                if !out.json {
                    println!("VM {name} is running");
                }
            }
        }
        VmCommand::Stop {
            name,
            force,
            timeout,
        } => p
            .stop_vm(
                &name,
                opts(
                    [("force", force.into())]
                        .into_iter()
                        .chain(timeout.map(|t| ("timeout_sec", t.into()))),
                ),
            )
            .await
            .map_err(explain)?,
        VmCommand::Delete { name, force } => p
            .delete_vm(&name, opts([("force", force.into())]))
            .await
            .map_err(explain)?,
        VmCommand::Show { name } => {
            let path = p.get_vm(&name).await.map_err(explain)?;
            let props = zbus::fdo::PropertiesProxy::builder(conn)
                .destination("org.banger")
                .path(path.clone())
                .build()
                .await?;
            let iface = zbus::names::InterfaceName::from_static_str("org.banger.VM1")?;
            let all = props.get_all(iface).await?;
            let mut fields = Vec::new();
            for key in [
                "Name",
                "Id",
                "State",
                "Stage",
                "Image",
                "Kernel",
                "VCpus",
                "MemoryMiB",
                "GuestAddress",
                "MacAddress",
                "VSockCID",
                "SSHAddress",
                "Owner",
                "CreatedAt",
            ] {
                let v = match all.get(key) {
                    Some(v) => match (
                        <&str>::try_from(&**v),
                        u32::try_from(&**v),
                        u64::try_from(&**v),
                    ) {
                        (Ok(s), _, _) => json!(s),
                        (_, Ok(n), _) => json!(n),
                        (_, _, Ok(n)) => json!(n),
                        _ => json!(null),
                    },
                    None => json!(null),
                };
                fields.push((key, v));
            }
            fields.push(("Path", json!(path.as_str())));
            out.object(fields);
        }
        VmCommand::Exec { name, command, env } => {
            let vm = vm_proxy(conn, &p, &name).await?;
            let fd = vm.open_agent().await.map_err(explain)?;
            let s = std::os::unix::net::UnixStream::from(std::os::fd::OwnedFd::from(fd));
            s.set_nonblocking(true)?;
            let s = tokio::net::UnixStream::from_std(s)?;
            let code = crate::agent::client::exec(
                s,
                command,
                env,
                tokio::io::stdin(),
                tokio::io::stdout(),
                tokio::io::stderr(),
            )
            .await?;
            // The blocking stdin reader would keep the runtime alive: leave at once.
            let _ = tokio::io::stdout().flush().await;
            std::process::exit(code);
        }
        VmCommand::Logs { name, follow } => {
            let vm = vm_proxy(conn, &p, &name).await?;
            let fd = vm.open_console().await.map_err(explain)?;
            let mut f =
                tokio::fs::File::from_std(std::fs::File::from(std::os::fd::OwnedFd::from(fd)));
            let mut stdout = tokio::io::stdout();
            loop {
                tokio::io::copy(&mut f, &mut stdout).await?;
                stdout.flush().await?;
                if !follow {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
    Ok(())
}
