//! How the CLI reaches the daemon: over the system bus ([`Bus`]) or banger's Varlink socket
//! ([`Socket`], `--varlink`). A verb is written once, in its noun's file, against
//! [`Transport`]; a transport only turns the request into its calls and the answer into
//! records (JSON objects with the keys `--json` prints). What only D-Bus has, an object's
//! path, comes as the record's `path` field; a table shows its OBJECT column when the
//! records have one.
//!
//! Nouns move onto the trait one at a time (issue 33): kernels, snapshots and jobs are on it;
//! images and VMs still have a verb per transport (`image.rs`/`vm.rs` and `varlink.rs`).

use std::path::Path;

use serde_json::{json, Value};

use super::varlink::Client;
use super::{explain, Output};
use crate::dbus::proxy::{Jobs1Proxy, Kernels1Proxy, Snapshots1Proxy};

/// An object's fields in the order they are shown.
pub(crate) type Fields = Vec<(String, Value)>;

/// What the verbs ask of the daemon.
pub(crate) trait Transport {
    /// Installed kernels: `name`, `version`, `owner` (a uid), `source`.
    async fn kernels(&mut self) -> anyhow::Result<Vec<Value>>;
    /// The catalog's kernels: `name`, `version`, `description`.
    async fn available_kernels(&mut self) -> anyhow::Result<Vec<Value>>;
    /// An installed kernel's fields.
    async fn kernel(&mut self, name: &str) -> anyhow::Result<Fields>;
    /// Pulls kernel `name` from the catalog, following its job to the end.
    async fn pull_kernel(&mut self, out: &Output, name: &str) -> anyhow::Result<()>;
    /// Imports kernel files (read as the caller) under `name`; the new kernel's fields.
    async fn import_kernel(
        &mut self,
        name: &str,
        kernel: &Path,
        initrd: Option<&Path>,
        modules: Option<&Path>,
    ) -> anyhow::Result<Fields>;
    /// Deletes kernel `name`.
    async fn delete_kernel(&mut self, name: &str) -> anyhow::Result<()>;

    /// Snapshots: `name`, `id`, `vm` (its VM's name).
    async fn snapshots(&mut self) -> anyhow::Result<Vec<Value>>;
    /// A snapshot's fields.
    async fn snapshot(&mut self, name: &str) -> anyhow::Result<Fields>;
    /// Deletes snapshot `name`.
    async fn delete_snapshot(&mut self, name: &str) -> anyhow::Result<()>;

    /// Running jobs: `id`, `kind`, `target`, `progress` (0 to 1).
    async fn jobs(&mut self) -> anyhow::Result<Vec<Value>>;
    /// Running job `id`'s fields, if it runs.
    async fn job(&mut self, id: u32) -> anyhow::Result<Option<Fields>>;
    /// Cancels job `id`.
    async fn cancel_job(&mut self, id: u32) -> anyhow::Result<()>;
    /// Follows job `id` to its end (stage lines, warnings; the result with `--json`).
    async fn watch_job(&mut self, out: &Output, id: u32) -> anyhow::Result<()>;
}

/// The message for a job that does not run (any more).
pub(crate) fn no_job(id: u32) -> anyhow::Error {
    anyhow::anyhow!(
        "No running job {id}; `banger job list` shows the running ones (a finished job's \
         result is in the journal)"
    )
}

/// Fields with static names, as [`Output::object`] takes them.
pub(crate) fn show(out: &Output, fields: &Fields) {
    out.object(
        fields
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect(),
    );
}

/// A table of `records` under `headers` (their keys `keys`), with the OBJECT column when the
/// records have paths.
pub(crate) fn table(out: &Output, headers: &[&str], keys: &[&str], records: &[Value]) {
    let with_path = records.iter().any(|r| r.get("path").is_some());
    let (mut headers, mut keys) = (headers.to_vec(), keys.to_vec());
    if with_path {
        headers.push("OBJECT");
        keys.push("path");
    }
    let rows = records
        .iter()
        .map(|r| keys.iter().map(|k| r[*k].clone()).collect())
        .collect();
    out.table(&headers, &keys, rows);
}

/// The system bus.
pub(crate) struct Bus {
    pub conn: zbus::Connection,
}

impl Bus {
    async fn kernels1(&self) -> anyhow::Result<Kernels1Proxy<'static>> {
        Ok(Kernels1Proxy::new(&self.conn).await?)
    }
    async fn snapshots1(&self) -> anyhow::Result<Snapshots1Proxy<'static>> {
        Ok(Snapshots1Proxy::new(&self.conn).await?)
    }
    async fn jobs1(&self) -> anyhow::Result<Jobs1Proxy<'static>> {
        Ok(Jobs1Proxy::new(&self.conn).await?)
    }
}

fn job_path(id: u32) -> anyhow::Result<zbus::OwnedObjectPath> {
    Ok(zbus::OwnedObjectPath::try_from(format!(
        "/org/banger/job/{id}"
    ))?)
}

/// Fields read as an object's properties, and its path.
async fn properties(
    conn: &zbus::Connection,
    path: &zbus::OwnedObjectPath,
    iface: &'static str,
    keys: &[&'static str],
) -> anyhow::Result<Fields> {
    let (fields, _) = super::vm::object_fields(conn, path, iface, keys).await?;
    let mut fields: Fields = fields.into_iter().map(|(k, v)| (k.into(), v)).collect();
    fields.push(("path".into(), json!(path.as_str())));
    Ok(fields)
}

impl Transport for Bus {
    async fn kernels(&mut self) -> anyhow::Result<Vec<Value>> {
        let list = self
            .kernels1()
            .await?
            .list_kernels()
            .await
            .map_err(explain)?;
        let owners = super::owners(&self.conn).await?;
        Ok(list
            .into_iter()
            .map(|(name, version, source, path)| {
                let owner = owners.get(path.as_str()).copied().unwrap_or_default();
                json!({"name": name, "version": version, "owner": owner, "source": source,
                       "path": path.as_str()})
            })
            .collect())
    }

    async fn available_kernels(&mut self) -> anyhow::Result<Vec<Value>> {
        let list = self.kernels1().await?;
        let list = list.list_available_kernels().await.map_err(explain)?;
        Ok(list
            .into_iter()
            .map(|(name, version, description)| {
                json!({"name": name, "version": version, "description": description})
            })
            .collect())
    }

    async fn kernel(&mut self, name: &str) -> anyhow::Result<Fields> {
        let path = self
            .kernels1()
            .await?
            .get_kernel(name)
            .await
            .map_err(explain)?;
        let k = crate::dbus::proxy::Kernel1Proxy::builder(&self.conn)
            .path(path.clone())
            .build()
            .await?;
        Ok(vec![
            ("name".into(), json!(k.name().await?)),
            ("version".into(), json!(k.version().await?)),
            ("source".into(), json!(k.source().await?)),
            ("kernel_path".into(), json!(k.kernel_path().await?)),
            ("initrd_path".into(), json!(k.initrd_path().await?)),
            ("modules_dir".into(), json!(k.modules_dir().await?)),
            ("path".into(), json!(path.as_str())),
        ])
    }

    async fn pull_kernel(&mut self, out: &Output, name: &str) -> anyhow::Result<()> {
        let watch = super::watch::subscribe(&self.conn).await?;
        let (id, path) = self
            .kernels1()
            .await?
            .pull_kernel(name, super::vm::opts(None))
            .await
            .map_err(explain)?;
        watch.follow(out, id, &path).await
    }

    async fn import_kernel(
        &mut self,
        name: &str,
        kernel: &Path,
        initrd: Option<&Path>,
        modules: Option<&Path>,
    ) -> anyhow::Result<Fields> {
        // Opened here, as the user who runs this; the daemon gets descriptors.
        let entries = super::files::kernel_entries(kernel, initrd, modules)?;
        let path = self
            .kernels1()
            .await?
            .import_kernel(name, super::vm::opts(entries))
            .await
            .map_err(explain)?;
        Ok(vec![
            ("name".into(), json!(name)),
            ("path".into(), json!(path.as_str())),
        ])
    }

    async fn delete_kernel(&mut self, name: &str) -> anyhow::Result<()> {
        self.kernels1()
            .await?
            .delete_kernel(name)
            .await
            .map_err(explain)
    }

    async fn snapshots(&mut self) -> anyhow::Result<Vec<Value>> {
        let list = self
            .snapshots1()
            .await?
            .list_snapshots()
            .await
            .map_err(explain)?;
        Ok(list
            .into_iter()
            .map(|(id, name, vm, path)| {
                json!({"name": name, "id": id, "vm": vm, "path": path.as_str()})
            })
            .collect())
    }

    async fn snapshot(&mut self, name: &str) -> anyhow::Result<Fields> {
        let path = self
            .snapshots1()
            .await?
            .get_snapshot(name)
            .await
            .map_err(explain)?;
        properties(
            &self.conn,
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
        .await
    }

    async fn delete_snapshot(&mut self, name: &str) -> anyhow::Result<()> {
        let p = self.snapshots1().await?;
        p.delete_snapshot(name).await.map_err(explain)
    }

    async fn jobs(&mut self) -> anyhow::Result<Vec<Value>> {
        let list = self.jobs1().await?.list_jobs().await.map_err(explain)?;
        Ok(list
            .into_iter()
            .map(|(id, kind, target, progress, path)| {
                json!({"id": id, "kind": kind, "target": target, "progress": progress,
                       "path": path.as_str()})
            })
            .collect())
    }

    async fn job(&mut self, id: u32) -> anyhow::Result<Option<Fields>> {
        let jobs = self.jobs1().await?.list_jobs().await.map_err(explain)?;
        if !jobs.iter().any(|j| j.0 == id) {
            return Ok(None);
        }
        // The id is the object's name, not one of Job1's properties.
        let props = properties(
            &self.conn,
            &job_path(id)?,
            "org.banger.Job1",
            &["Kind", "Target", "Stage", "Progress", "State", "Error"],
        )
        .await?;
        let mut fields = vec![("Id".to_owned(), json!(id))];
        fields.extend(props.into_iter().map(|(k, v)| {
            let k = if k == "path" { "Path".to_owned() } else { k };
            (k, v)
        }));
        Ok(Some(fields))
    }

    async fn cancel_job(&mut self, id: u32) -> anyhow::Result<()> {
        self.jobs1().await?.cancel_job(id).await.map_err(explain)
    }

    async fn watch_job(&mut self, out: &Output, id: u32) -> anyhow::Result<()> {
        // Subscribed first, then checked: a job that ends in between is not missed.
        let watch = super::watch::subscribe(&self.conn).await?;
        let jobs = self.jobs1().await?.list_jobs().await.map_err(explain)?;
        let Some((_, kind, target, ..)) = jobs.iter().find(|j| j.0 == id) else {
            return Err(no_job(id));
        };
        if !out.json {
            eprintln!("Following job {id} ({kind} {target}); Ctrl-C stops following, not the job");
        }
        watch.follow(out, id, &job_path(id)?).await
    }
}

/// banger's Varlink socket.
pub(crate) struct Socket {
    pub client: Client,
}

const K: &str = "io.banger.Kernels";
const V: &str = "io.banger.VMs";
const J: &str = "io.banger.Jobs";

/// `v[key]`, a list.
fn list(mut v: Value, key: &str) -> Vec<Value> {
    match v[key].take() {
        Value::Array(items) => items,
        _ => Vec::new(),
    }
}

/// An object's fields, in its own order.
fn fields(v: &Value) -> Fields {
    v.as_object()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default()
}

impl Transport for Socket {
    async fn kernels(&mut self) -> anyhow::Result<Vec<Value>> {
        let v = self.client.call(&format!("{K}.List"), json!({})).await?;
        Ok(list(v, "kernels"))
    }

    async fn available_kernels(&mut self) -> anyhow::Result<Vec<Value>> {
        let v = self
            .client
            .call(&format!("{K}.ListAvailable"), json!({}))
            .await?;
        Ok(list(v, "kernels"))
    }

    async fn kernel(&mut self, name: &str) -> anyhow::Result<Fields> {
        let v = self
            .client
            .call(&format!("{K}.Get"), json!({ "name": name }))
            .await?;
        Ok(fields(&v["kernel"]))
    }

    async fn pull_kernel(&mut self, out: &Output, name: &str) -> anyhow::Result<()> {
        self.client
            .follow(out, &format!("{K}.Pull"), json!({ "name": name }))
            .await
            .map(|_| ())
    }

    async fn import_kernel(
        &mut self,
        name: &str,
        kernel: &Path,
        initrd: Option<&Path>,
        modules: Option<&Path>,
    ) -> anyhow::Result<Fields> {
        let file = |p: Option<&Path>| p.map(super::varlink::absolute).transpose();
        let p = super::varlink::params([
            ("name", Some(json!(name))),
            ("kernelPath", Some(super::varlink::absolute(kernel)?)),
            ("initrdPath", file(initrd)?),
            ("modulesDir", file(modules)?),
        ]);
        let v = self.client.call(&format!("{K}.Import"), p).await?;
        Ok(vec![("name".into(), v["kernel"]["name"].clone())])
    }

    async fn delete_kernel(&mut self, name: &str) -> anyhow::Result<()> {
        self.client
            .call(&format!("{K}.Delete"), json!({ "name": name }))
            .await
            .map(|_| ())
    }

    async fn snapshots(&mut self) -> anyhow::Result<Vec<Value>> {
        let v = self
            .client
            .call(&format!("{V}.ListSnapshots"), json!({}))
            .await?;
        Ok(list(v, "snapshots")
            .into_iter()
            .map(|s| json!({"name": s["name"], "id": s["id"], "vm": s["vmName"]}))
            .collect())
    }

    async fn snapshot(&mut self, name: &str) -> anyhow::Result<Fields> {
        let v = self
            .client
            .call(&format!("{V}.GetSnapshot"), json!({ "name": name }))
            .await?;
        Ok(fields(&v["snapshot"]))
    }

    async fn delete_snapshot(&mut self, name: &str) -> anyhow::Result<()> {
        self.client
            .call(&format!("{V}.DeleteSnapshot"), json!({ "name": name }))
            .await
            .map(|_| ())
    }

    async fn jobs(&mut self) -> anyhow::Result<Vec<Value>> {
        let v = self.client.call(&format!("{J}.List"), json!({})).await?;
        Ok(list(v, "jobs"))
    }

    async fn job(&mut self, id: u32) -> anyhow::Result<Option<Fields>> {
        let jobs = self.jobs().await?;
        Ok(jobs.iter().find(|j| j["id"] == json!(id)).map(fields))
    }

    async fn cancel_job(&mut self, id: u32) -> anyhow::Result<()> {
        self.client
            .call(&format!("{J}.Cancel"), json!({ "id": id }))
            .await
            .map(|_| ())
    }

    async fn watch_job(&mut self, out: &Output, id: u32) -> anyhow::Result<()> {
        self.client
            .follow(out, &format!("{J}.Watch"), json!({ "id": id }))
            .await
            .map(|_| ())
    }
}
