//! How the CLI reaches the daemon: over the system bus ([`Bus`]) or banger's Varlink socket
//! ([`Socket`], `--varlink`). A verb is written once, in its noun's file, against
//! [`Transport`]; a transport only turns the request into its calls and the answer into
//! records (JSON objects with the keys `--json` prints). What only D-Bus has, an object's
//! path, comes as the record's `path` field; a table shows its OBJECT column when the
//! records have one.
//!
//! A verb's options are given once as [`Opts`] (keys as D-Bus spells them); each transport
//! encodes them: D-Bus as `a{sv}` with the caller's files opened here, as the caller, and
//! sent as descriptors; Varlink as JSON with keys lowerCamelCased and files as absolute
//! paths (the daemon opens them once with the caller's rights).

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::{json, Value};
use zbus::{OwnedObjectPath, OwnedVariant, Variant};

use super::varlink::Client;
use super::{explain, Output};
use banger_api::proxy::{
    Images1Proxy, Jobs1Proxy, Kernels1Proxy, Snapshots1Proxy, VM1Proxy, VMs1Proxy,
};

/// An object's fields in the order they are shown.
pub(crate) type Fields = Vec<(String, Value)>;

/// One option of a call, as a verb gives it.
pub(crate) enum Opt {
    Str(String),
    Strs(Vec<String>),
    Bool(bool),
    U32(u32),
    U64(u64),
    Ports(Vec<u16>),
    /// A file of the caller's.
    File(PathBuf),
    /// A directory of the caller's.
    Dir(PathBuf),
    /// Shared folders: host folder, guest folder, read-only.
    Shares(Vec<(String, String, bool)>),
    /// Key/value pairs.
    Labels(Labels),
}

/// Labels, or a label filter.
pub(crate) type Labels = std::collections::BTreeMap<String, String>;

/// A call's options, keys as D-Bus spells them (`memory_mib`); absent ones left out.
pub(crate) type Opts = Vec<(&'static str, Opt)>;

/// A long operation's call: its name on both APIs, what it acts on, and its options.
pub(crate) struct JobCall<'a> {
    /// `Images1`, `Kernels1`, … (`io.banger.Images`, … over Varlink).
    pub interface: &'static str,
    /// The D-Bus method (`PullImage`) and the Varlink one (`Pull`).
    pub dbus: &'static str,
    pub varlink: &'static str,
    /// The object's argument: its Varlink parameter's name (`ref`, `name`) and value.
    pub target: (&'static str, &'a str),
    /// Whether the D-Bus method takes an options map.
    pub with_options: bool,
    pub opts: Opts,
}

/// What the verbs ask of the daemon.
pub(crate) trait Transport {
    /// The daemon's version.
    async fn version(&mut self) -> anyhow::Result<String>;
    /// The caller's use of each quota: its name, what is used and what is allowed.
    async fn usage(&mut self) -> anyhow::Result<Vec<(String, u64, u64)>>;

    /// Fills in each record's `owner` (a uid) where the listing lacked it: D-Bus lists name
    /// objects, whose owners take one more call (only the verbs that show owners make it);
    /// Varlink's lists carry them.
    async fn fill_owners(&mut self, records: &mut [Value]) -> anyhow::Result<()>;

    /// Fills in each VM record's `host_memory_bytes` (what it costs the host in memory now):
    /// D-Bus reads it from every object at once, Varlink's lists carry it.
    async fn fill_host_memory(&mut self, records: &mut [Value]) -> anyhow::Result<()>;
    /// What every VM costs the host in memory now, in bytes; `listed` is what [`Self::vms`]
    /// just gave (Varlink's records carry each VM's figure, D-Bus asks for the total).
    async fn host_memory(&mut self, listed: &[Value]) -> anyhow::Result<u64>;

    /// Installed kernels: `name`, `version`, `source`, `owner` (see [`Self::fill_owners`]).
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

    /// Starts a long operation and follows its job to the end, or with `wait` false, says
    /// which job it started and returns.
    async fn run_job(&mut self, out: &Output, call: JobCall<'_>, wait: bool) -> anyhow::Result<()>;

    /// Images: `name`, `id`, `managed`, `source`, `owner` (see [`Self::fill_owners`]).
    async fn images(&mut self) -> anyhow::Result<Vec<Value>>;
    /// An image's fields, its OCI run settings among them.
    async fn image(&mut self, name: &str) -> anyhow::Result<Fields>;
    /// Registers the caller's files as image `name`; the image's fields.
    async fn register_image(&mut self, name: &str, opts: Opts) -> anyhow::Result<Fields>;
    /// Deletes image `name`.
    async fn delete_image(&mut self, name: &str) -> anyhow::Result<()>;
    /// Empties the download cache: the bytes and blobs removed.
    async fn prune_cache(&mut self) -> anyhow::Result<(u64, u64)>;

    /// VMs: `name`, `id`, `state`, `image` (its id); with `labels`, only the caller's that
    /// carry all of them.
    async fn vms(&mut self, labels: &Labels) -> anyhow::Result<Vec<Value>>;
    /// A VM's fields, named as `org.banger.VM1`'s properties.
    async fn vm(&mut self, name: &str) -> anyhow::Result<Fields>;
    /// What the verbs read of a VM to act on it.
    async fn vm_info(&mut self, name: &str) -> anyhow::Result<VmInfo>;
    /// Creates VM `name` and, with `wait`, follows its job (stages as `follow` says them);
    /// without, the started job's fields.
    async fn create_vm(
        &mut self,
        follow: &Output,
        name: &str,
        opts: Opts,
        wait: bool,
    ) -> anyhow::Result<Fields>;
    /// Creates the VMs `creates` at once and follows them all, each stage line labelled.
    async fn create_vms(
        &mut self,
        out: &Output,
        creates: Vec<(String, Opts)>,
    ) -> anyhow::Result<()>;
    /// Starts VM `name` and, with `wait`, follows its job; without, the job's fields.
    async fn start_vm(&mut self, out: &Output, name: &str, wait: bool) -> anyhow::Result<Fields>;
    /// Stops VM `name`.
    async fn stop_vm(&mut self, name: &str, opts: Opts) -> anyhow::Result<()>;
    /// Deletes VM `name`.
    async fn delete_vm(&mut self, name: &str, opts: Opts) -> anyhow::Result<()>;
    /// Pauses (`pause`) or resumes VM `name`.
    async fn pause_vm(&mut self, name: &str, pause: bool) -> anyhow::Result<()>;
    /// Gives VM `name` a lifetime of `secs` from now (0: none).
    async fn set_timeout(&mut self, name: &str, secs: u32) -> anyhow::Result<()>;
    /// Snapshots VM `name` as `snapshot`, following the job.
    async fn snapshot_vm(
        &mut self,
        out: &Output,
        name: &str,
        snapshot: &str,
        opts: Opts,
    ) -> anyhow::Result<()>;
    /// A stream to VM `name`'s agent.
    async fn open_agent(&mut self, name: &str) -> anyhow::Result<OwnedFd>;
    /// VM `name`'s console log, read only.
    async fn open_console(&mut self, name: &str) -> anyhow::Result<OwnedFd>;
    /// Waits until VM `name` is stopped or failed (its main process ended).
    async fn wait_stopped(&mut self, name: &str) -> anyhow::Result<()>;
}

/// What the VM verbs read of one VM.
pub(crate) struct VmInfo {
    pub id: String,
    pub owner: u64,
    pub state: String,
    pub ssh_address: String,
    pub ssh_host_key: String,
    pub exit_status: i32,
}

/// The options for a kernel's files (`ImportKernel`, `RegisterImage` with kernel files).
pub(crate) fn kernel_files(kernel: &Path, initrd: Option<&Path>, modules: Option<&Path>) -> Opts {
    let mut o = vec![("kernel_path", Opt::File(kernel.to_owned()))];
    if let Some(i) = initrd {
        o.push(("initrd_path", Opt::File(i.to_owned())));
    }
    if let Some(m) = modules {
        o.push(("modules_dir", Opt::Dir(m.to_owned())));
    }
    o
}

/// `opts` as `a{sv}`, the caller's files opened here.
fn dbus_options(opts: Opts) -> anyhow::Result<banger_api::proxy::Opts> {
    let mut entries: Vec<(&str, zbus::Variant<'static>)> = Vec::new();
    for (k, o) in opts {
        entries.push((
            k,
            match o {
                Opt::Str(s) => s.into(),
                Opt::Strs(l) => l.into(),
                Opt::Bool(b) => b.into(),
                Opt::U32(n) => n.into(),
                Opt::U64(n) => n.into(),
                Opt::Ports(p) => p.into(),
                Opt::File(p) => super::files::open_file(&p)?,
                Opt::Dir(p) => super::files::open_dir(&p)?,
                Opt::Shares(l) => l.into(),
                Opt::Labels(m) => m
                    .into_iter()
                    .collect::<std::collections::HashMap<_, _>>()
                    .into(),
            },
        ));
    }
    Ok(dbus_opts(entries))
}

/// `opts` as Varlink parameters, beside `extra`.
fn varlink_params(
    extra: Vec<(&str, Value)>,
    opts: Opts,
) -> anyhow::Result<serde_json::Map<String, Value>> {
    let mut m: serde_json::Map<String, Value> =
        extra.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
    for (k, o) in opts {
        let v = match o {
            Opt::Str(s) => json!(s),
            Opt::Strs(l) => json!(l),
            Opt::Bool(b) => json!(b),
            Opt::U32(n) => json!(n),
            Opt::U64(n) => json!(n),
            Opt::Ports(p) => json!(p),
            Opt::File(p) | Opt::Dir(p) => super::varlink::absolute(&p)?,
            Opt::Shares(l) => json!(l
                .into_iter()
                .map(|(host, guest, ro)| json!({"host": host, "guest": guest, "readOnly": ro}))
                .collect::<Vec<_>>()),
            Opt::Labels(l) => json!(l),
        };
        m.insert(super::output::json_key(k), v);
    }
    Ok(m)
}

/// Shows each record's owner by name (`image list`, `kernel list`).
pub(crate) async fn name_owners(
    t: &mut impl Transport,
    records: &mut [Value],
) -> anyhow::Result<()> {
    t.fill_owners(records).await?;
    for r in records {
        r["owner"] = json!(super::owner_name(r["owner"].as_u64().unwrap_or_default()));
    }
    Ok(())
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
    async fn images1(&self) -> anyhow::Result<Images1Proxy<'static>> {
        Ok(Images1Proxy::new(&self.conn).await?)
    }
    async fn vms1(&self) -> anyhow::Result<VMs1Proxy<'static>> {
        Ok(VMs1Proxy::new(&self.conn).await?)
    }
    async fn vm1(&self, name: &str) -> anyhow::Result<VM1Proxy<'static>> {
        let path = self.vms1().await?.get_vm(name).await.map_err(explain)?;
        Ok(VM1Proxy::builder(&self.conn).path(path).build().await?)
    }
}

fn job_path(id: u32) -> anyhow::Result<zbus::OwnedObjectPath> {
    Ok(zbus::OwnedObjectPath::try_from(format!(
        "/org/banger/job/{id}"
    ))?)
}

/// Builds an options map from optional entries.
pub fn dbus_opts<'a>(
    entries: impl IntoIterator<Item = (&'a str, Variant<'static>)>,
) -> banger_api::proxy::Opts {
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

/// An object's properties `keys` of interface `iface`, as JSON fields (strings, numbers and
/// string lists; null for others), and last its path under `path_key`.
async fn properties(
    conn: &zbus::Connection,
    path: &OwnedObjectPath,
    iface: &'static str,
    keys: &[&'static str],
    path_key: &str,
) -> anyhow::Result<Fields> {
    let props = zbus::fdo::PropertiesProxy::builder(conn)
        .destination("org.banger")
        .path(path.clone())
        .build()
        .await?;
    let all = props
        .get_all(zbus::names::InterfaceName::from_static_str(iface)?)
        .await?;
    let mut fields = Vec::new();
    for &key in keys {
        let v = match all.get(key) {
            Some(v) => match (
                <&str>::try_from(&**v),
                u32::try_from(&**v),
                u64::try_from(&**v),
            ) {
                (Ok(s), _, _) => json!(s),
                (_, Ok(n), _) => json!(n),
                (_, _, Ok(n)) => json!(n),
                _ => {
                    if let Ok(b) = bool::try_from(&**v) {
                        json!(b)
                    } else if let Ok(f) = f64::try_from(&**v) {
                        json!(f)
                    } else if let Ok(list) = <Vec<String>>::try_from(v.try_clone()?) {
                        json!(list)
                    } else if let Ok(list) = <Vec<u16>>::try_from(v.try_clone()?) {
                        json!(list)
                    } else if let Ok(map) =
                        <std::collections::HashMap<String, String>>::try_from(v.try_clone()?)
                    {
                        json!(map
                            .into_iter()
                            .collect::<std::collections::BTreeMap<_, _>>())
                    } else {
                        json!(null)
                    }
                }
            },
            None => json!(null),
        };
        fields.push((key.to_owned(), v));
    }
    fields.push((path_key.to_owned(), json!(path.as_str())));
    Ok(fields)
}

impl Transport for Bus {
    async fn fill_owners(&mut self, records: &mut [Value]) -> anyhow::Result<()> {
        let owners = super::owners(&self.conn).await?;
        for r in records {
            let owner = r["path"]
                .as_str()
                .and_then(|p| owners.get(p).copied())
                .unwrap_or_default();
            r["owner"] = json!(owner);
        }
        Ok(())
    }

    async fn fill_host_memory(&mut self, records: &mut [Value]) -> anyhow::Result<()> {
        let memory = super::managed_numbers(&self.conn, "HostMemoryBytes").await?;
        for r in records {
            let bytes = r["path"]
                .as_str()
                .and_then(|p| memory.get(p).copied())
                .unwrap_or_default();
            r["host_memory_bytes"] = json!(bytes);
        }
        Ok(())
    }

    async fn host_memory(&mut self, _: &[Value]) -> anyhow::Result<u64> {
        self.vms1()
            .await?
            .host_memory_bytes()
            .await
            .map_err(explain)
    }

    async fn version(&mut self) -> anyhow::Result<String> {
        self.jobs1().await?.version().await.map_err(explain)
    }

    async fn usage(&mut self) -> anyhow::Result<Vec<(String, u64, u64)>> {
        self.vms1().await?.get_usage().await.map_err(explain)
    }

    async fn kernels(&mut self) -> anyhow::Result<Vec<Value>> {
        let list = self
            .kernels1()
            .await?
            .list_kernels()
            .await
            .map_err(explain)?;
        Ok(list
            .into_iter()
            .map(|(name, version, source, path)| {
                json!({"name": name, "version": version, "source": source, "path": path.as_str()})
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
        let k = banger_api::proxy::Kernel1Proxy::builder(&self.conn)
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
            .pull_kernel(name, dbus_opts(None))
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
        let opts = dbus_options(kernel_files(kernel, initrd, modules))?;
        let path = self
            .kernels1()
            .await?
            .import_kernel(name, opts)
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
            "path",
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
            "Path",
        )
        .await?;
        let mut fields = vec![("Id".to_owned(), json!(id))];
        fields.extend(props);
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

    async fn run_job(&mut self, out: &Output, call: JobCall<'_>, wait: bool) -> anyhow::Result<()> {
        let watch = super::watch::subscribe(&self.conn).await?;
        // Like the typed proxies' changes (`allow_interactive_auth`): polkit may ask.
        let manager = zbus::proxy::Builder::<zbus::Proxy>::new(&self.conn)
            .destination("org.banger")
            .path("/org/banger")
            .interface(format!("org.banger.{}", call.interface))
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await?;
        let flags = zbus::proxy::MethodFlags::ALLOW_INTERACTIVE_AUTH;
        let reply: Option<(u32, OwnedObjectPath)> = if call.with_options {
            let body = (call.target.1, dbus_options(call.opts)?);
            manager.call_with_flags(call.dbus, flags, &body).await
        } else {
            manager
                .call_with_flags(call.dbus, flags, &(call.target.1,))
                .await
        }
        .map_err(explain)?;
        let (id, path) = reply.context("the daemon answered nothing")?;
        if wait {
            watch.follow(out, id, &path).await
        } else {
            print_job(out, id, &path);
            Ok(())
        }
    }

    async fn images(&mut self) -> anyhow::Result<Vec<Value>> {
        let list = self.images1().await?.list_images().await.map_err(explain)?;
        Ok(list
            .into_iter()
            .map(|(id, name, managed, source, path)| {
                json!({"name": name, "id": id, "managed": managed, "source": source,
                       "path": path.as_str()})
            })
            .collect())
    }

    async fn image(&mut self, name: &str) -> anyhow::Result<Fields> {
        let path = self
            .images1()
            .await?
            .get_image(name)
            .await
            .map_err(explain)?;
        properties(
            &self.conn,
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
            "Path",
        )
        .await
    }

    async fn register_image(&mut self, name: &str, opts: Opts) -> anyhow::Result<Fields> {
        let opts = dbus_options(opts)?;
        let path = self
            .images1()
            .await?
            .register_image(name, opts)
            .await
            .map_err(explain)?;
        Ok(vec![
            ("name".into(), json!(name)),
            ("path".into(), json!(path.as_str())),
        ])
    }

    async fn delete_image(&mut self, name: &str) -> anyhow::Result<()> {
        self.images1()
            .await?
            .delete_image(name)
            .await
            .map_err(explain)
    }

    async fn prune_cache(&mut self) -> anyhow::Result<(u64, u64)> {
        let p = self.images1().await?;
        let (bytes, blobs) = p.prune_cache(Default::default()).await.map_err(explain)?;
        Ok((bytes, blobs.into()))
    }

    async fn vms(&mut self, labels: &Labels) -> anyhow::Result<Vec<Value>> {
        let vms1 = self.vms1().await?;
        let list = if labels.is_empty() {
            vms1.list_vms().await
        } else {
            let l: std::collections::HashMap<&str, &str> = labels
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            vms1.list_vms_by_labels(l).await
        }
        .map_err(explain)?;
        Ok(list
            .into_iter()
            .map(|(id, name, state, image, path)| {
                json!({"name": name, "id": id, "state": state, "image": image,
                       "path": path.as_str()})
            })
            .collect())
    }

    async fn vm(&mut self, name: &str) -> anyhow::Result<Fields> {
        let path = self.vms1().await?.get_vm(name).await.map_err(explain)?;
        properties(&self.conn, &path, "org.banger.VM1", VM_FIELDS, "Path").await
    }

    async fn vm_info(&mut self, name: &str) -> anyhow::Result<VmInfo> {
        let vm = self.vm1(name).await?;
        Ok(VmInfo {
            id: vm.id().await?,
            owner: vm.owner().await?.into(),
            state: vm.state().await?,
            ssh_address: vm.ssh_address().await?,
            ssh_host_key: vm.ssh_host_key().await?,
            exit_status: vm.exit_status().await?,
        })
    }

    async fn create_vm(
        &mut self,
        follow: &Output,
        name: &str,
        opts: Opts,
        wait: bool,
    ) -> anyhow::Result<Fields> {
        let opts = dbus_options(opts)?;
        let watch = super::watch::subscribe(&self.conn).await?;
        let (vm, id, path) = self
            .vms1()
            .await?
            .create_vm(name, opts)
            .await
            .map_err(explain)?;
        if wait {
            let followed = watch.follow(follow, id, &path).await;
            followed.map_err(|e| anyhow::Error::new(super::JobFailed(e)))?;
            return Ok(Vec::new());
        }
        Ok(vec![
            ("vm_id".into(), json!(vm.as_str().rsplit('/').next())),
            ("vm_path".into(), json!(vm.as_str())),
            ("job_id".into(), json!(id)),
            ("job_path".into(), json!(path.as_str())),
        ])
    }

    async fn create_vms(
        &mut self,
        out: &Output,
        creates: Vec<(String, Opts)>,
    ) -> anyhow::Result<()> {
        let watch = super::watch::subscribe(&self.conn).await?;
        let p = self.vms1().await?;
        let mut jobs = Vec::new();
        for (n, opts) in creates {
            let (_, id, path) = p
                .create_vm(&n, dbus_options(opts)?)
                .await
                .map_err(explain)?;
            jobs.push((id, path, n));
        }
        watch.follow_all(out, &jobs).await
    }

    async fn start_vm(&mut self, out: &Output, name: &str, wait: bool) -> anyhow::Result<Fields> {
        let watch = super::watch::subscribe(&self.conn).await?;
        let (id, path) = self.vms1().await?.start_vm(name).await.map_err(explain)?;
        if wait {
            let followed = watch.follow(out, id, &path).await;
            followed.map_err(|e| anyhow::Error::new(super::JobFailed(e)))?;
            return Ok(Vec::new());
        }
        Ok(vec![
            ("job_id".into(), json!(id)),
            ("job_path".into(), json!(path.as_str())),
        ])
    }

    async fn stop_vm(&mut self, name: &str, opts: Opts) -> anyhow::Result<()> {
        let opts = dbus_options(opts)?;
        self.vms1()
            .await?
            .stop_vm(name, opts)
            .await
            .map_err(explain)
    }

    async fn delete_vm(&mut self, name: &str, opts: Opts) -> anyhow::Result<()> {
        let opts = dbus_options(opts)?;
        self.vms1()
            .await?
            .delete_vm(name, opts)
            .await
            .map_err(explain)
    }

    async fn set_timeout(&mut self, name: &str, secs: u32) -> anyhow::Result<()> {
        let vm = self.vm1(name).await?;
        vm.set_timeout(secs).await.map_err(explain)
    }

    async fn pause_vm(&mut self, name: &str, pause: bool) -> anyhow::Result<()> {
        let vm = self.vm1(name).await?;
        if pause {
            vm.pause().await
        } else {
            vm.resume().await
        }
        .map_err(explain)
    }

    async fn snapshot_vm(
        &mut self,
        out: &Output,
        name: &str,
        snapshot: &str,
        opts: Opts,
    ) -> anyhow::Result<()> {
        let opts = dbus_options(opts)?;
        let watch = super::watch::subscribe(&self.conn).await?;
        let (id, path) = self
            .vms1()
            .await?
            .snapshot_vm(name, snapshot, opts)
            .await
            .map_err(explain)?;
        watch.follow(out, id, &path).await
    }

    async fn open_agent(&mut self, name: &str) -> anyhow::Result<OwnedFd> {
        let fd = self.vm1(name).await?.open_agent().await.map_err(explain)?;
        Ok(fd.into())
    }

    async fn open_console(&mut self, name: &str) -> anyhow::Result<OwnedFd> {
        let fd = self
            .vm1(name)
            .await?
            .open_console()
            .await
            .map_err(explain)?;
        Ok(fd.into())
    }

    async fn wait_stopped(&mut self, name: &str) -> anyhow::Result<()> {
        use futures_util::StreamExt;
        let vm = self.vm1(name).await?;
        let mut changes = vm.receive_state_changed().await;
        while !matches!(vm.state().await?.as_str(), "stopped" | "failed") {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), changes.next()).await;
        }
        Ok(())
    }
}

/// `org.banger.VM1`'s properties `vm show` prints, in its order.
const VM_FIELDS: &[&str] = &[
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
    "SSHHostKey",
    "Network",
    "Egress",
    "Published",
    "Shares",
    "RootfsDir",
    "Netns",
    "Owner",
    "CreatedAt",
    "HostMemoryBytes",
    "Labels",
    "ExpiresAt",
    "OnExpire",
];

/// banger's Varlink socket.
pub(crate) struct Socket {
    pub client: Client,
}

const K: &str = "io.banger.Kernels";
const I: &str = "io.banger.Images";
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
    async fn fill_owners(&mut self, _: &mut [Value]) -> anyhow::Result<()> {
        Ok(())
    }

    async fn fill_host_memory(&mut self, records: &mut [Value]) -> anyhow::Result<()> {
        for r in records {
            r["host_memory_bytes"] = r["hostMemoryBytes"].clone();
        }
        Ok(())
    }

    async fn host_memory(&mut self, listed: &[Value]) -> anyhow::Result<u64> {
        Ok(listed
            .iter()
            .filter_map(|v| v["hostMemoryBytes"].as_u64())
            .sum())
    }

    async fn version(&mut self) -> anyhow::Result<String> {
        let info = self
            .client
            .call("org.varlink.service.GetInfo", json!({}))
            .await?;
        Ok(info["version"].as_str().unwrap_or("").to_owned())
    }

    async fn usage(&mut self) -> anyhow::Result<Vec<(String, u64, u64)>> {
        let got = self
            .client
            .call(&format!("{V}.GetUsage"), json!({}))
            .await?;
        Ok(list(got, "usage")
            .iter()
            .map(|u| {
                (
                    u["quota"].as_str().unwrap_or_default().to_owned(),
                    u["used"].as_u64().unwrap_or_default(),
                    u["allowed"].as_u64().unwrap_or_default(),
                )
            })
            .collect())
    }

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
        let p = varlink_params(
            vec![("name", json!(name))],
            kernel_files(kernel, initrd, modules),
        )?;
        let v = self
            .client
            .call(&format!("{K}.Import"), Value::Object(p))
            .await?;
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

    async fn run_job(&mut self, out: &Output, call: JobCall<'_>, wait: bool) -> anyhow::Result<()> {
        let method = format!(
            "io.banger.{}.{}",
            call.interface.trim_end_matches('1'),
            call.varlink
        );
        let p = Value::Object(varlink_params(
            vec![(call.target.0, json!(call.target.1))],
            call.opts,
        )?);
        if wait {
            self.client.follow(out, &method, p).await.map(|_| ())
        } else {
            let v = self.client.call(&method, p).await?;
            out.object(vec![("job_id", v["job"]["id"].clone())]);
            Ok(())
        }
    }

    async fn images(&mut self) -> anyhow::Result<Vec<Value>> {
        let v = self.client.call(&format!("{I}.List"), json!({})).await?;
        Ok(list(v, "images"))
    }

    async fn image(&mut self, name: &str) -> anyhow::Result<Fields> {
        let v = self
            .client
            .call(&format!("{I}.Get"), json!({ "name": name }))
            .await?;
        Ok(fields(&v["image"]))
    }

    async fn register_image(&mut self, name: &str, opts: Opts) -> anyhow::Result<Fields> {
        let p = varlink_params(vec![("name", json!(name))], opts)?;
        let v = self
            .client
            .call(&format!("{I}.Register"), Value::Object(p))
            .await?;
        Ok(vec![
            ("name".into(), v["image"]["name"].clone()),
            ("id".into(), v["image"]["id"].clone()),
        ])
    }

    async fn delete_image(&mut self, name: &str) -> anyhow::Result<()> {
        self.client
            .call(&format!("{I}.Delete"), json!({ "name": name }))
            .await
            .map(|_| ())
    }

    async fn prune_cache(&mut self) -> anyhow::Result<(u64, u64)> {
        let v = self
            .client
            .call(&format!("{I}.PruneCache"), json!({}))
            .await?;
        Ok((
            v["freedBytes"].as_u64().unwrap_or(0),
            v["blobs"].as_u64().unwrap_or(0),
        ))
    }

    async fn vms(&mut self, labels: &Labels) -> anyhow::Result<Vec<Value>> {
        let p = if labels.is_empty() {
            json!({})
        } else {
            json!({ "labels": labels })
        };
        let v = self.client.call(&format!("{V}.List"), p).await?;
        Ok(list(v, "vms"))
    }

    async fn vm(&mut self, name: &str) -> anyhow::Result<Fields> {
        let v = self
            .client
            .call(&format!("{V}.Get"), json!({ "name": name }))
            .await?;
        let vm = &v["vm"];
        Ok(VM_FIELDS
            .iter()
            .map(|&k| {
                let value = match k {
                    "Shares" => json!(vm["shares"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|s| format!(
                            "{}:{}{}",
                            s["host"].as_str().unwrap_or(""),
                            s["guest"].as_str().unwrap_or(""),
                            if s["readOnly"] == json!(true) {
                                ":ro"
                            } else {
                                ""
                            }
                        ))
                        .collect::<Vec<_>>()),
                    k => vm[super::output::json_key(k)].clone(),
                };
                (k.to_owned(), value)
            })
            .collect())
    }

    async fn vm_info(&mut self, name: &str) -> anyhow::Result<VmInfo> {
        let v = self
            .client
            .call(&format!("{V}.Get"), json!({ "name": name }))
            .await?;
        let s = |k: &str| v["vm"][k].as_str().unwrap_or("").to_owned();
        Ok(VmInfo {
            id: s("id"),
            owner: v["vm"]["owner"].as_u64().unwrap_or(u64::MAX),
            state: s("state"),
            ssh_address: s("sshAddress"),
            ssh_host_key: s("sshHostKey"),
            exit_status: v["vm"]["exitStatus"].as_i64().unwrap_or(-1) as i32,
        })
    }

    async fn create_vm(
        &mut self,
        follow: &Output,
        name: &str,
        opts: Opts,
        wait: bool,
    ) -> anyhow::Result<Fields> {
        let p = Value::Object(varlink_params(vec![("name", json!(name))], opts)?);
        if wait {
            self.client
                .follow(follow, &format!("{V}.Create"), p)
                .await?;
            return Ok(Vec::new());
        }
        let v = self.client.call(&format!("{V}.Create"), p).await?;
        Ok(vec![
            ("vm_id".into(), v["vm"]["id"].clone()),
            ("job_id".into(), v["job"]["id"].clone()),
        ])
    }

    async fn create_vms(
        &mut self,
        out: &Output,
        creates: Vec<(String, Opts)>,
    ) -> anyhow::Result<()> {
        // Each create on a connection of its own, followed at once.
        let json = out.json;
        let socket = self.client.socket.clone();
        let mut calls = Vec::new();
        for (n, opts) in creates {
            let p = Value::Object(varlink_params(vec![("name", json!(n))], opts)?);
            let socket = socket.clone();
            calls.push(async move {
                let mut c = Client::connect(&socket).await?;
                c.label = format!("{n}: ");
                c.follow_stages(!json, &format!("{V}.Create"), p, &mut Value::Null)
                    .await
                    .map_err(|e| anyhow::anyhow!("{n}: {e}"))
            });
        }
        let results = tokio::select! {
            r = futures_util::future::join_all(calls) => r,
            _ = tokio::signal::ctrl_c() => super::watch::interrupted(&[]),
        };
        let failed: Vec<String> = results
            .into_iter()
            .filter_map(|r| r.err().map(|e| e.to_string()))
            .collect();
        anyhow::ensure!(failed.is_empty(), "{}", failed.join("; "));
        Ok(())
    }

    async fn start_vm(&mut self, out: &Output, name: &str, wait: bool) -> anyhow::Result<Fields> {
        let p = json!({ "name": name });
        if wait {
            self.client.follow(out, &format!("{V}.Start"), p).await?;
            return Ok(Vec::new());
        }
        let v = self.client.call(&format!("{V}.Start"), p).await?;
        Ok(vec![("job_id".into(), v["job"]["id"].clone())])
    }

    async fn stop_vm(&mut self, name: &str, opts: Opts) -> anyhow::Result<()> {
        let p = Value::Object(varlink_params(vec![("name", json!(name))], opts)?);
        self.client.call(&format!("{V}.Stop"), p).await.map(|_| ())
    }

    async fn delete_vm(&mut self, name: &str, opts: Opts) -> anyhow::Result<()> {
        let p = Value::Object(varlink_params(vec![("name", json!(name))], opts)?);
        self.client
            .call(&format!("{V}.Delete"), p)
            .await
            .map(|_| ())
    }

    async fn set_timeout(&mut self, name: &str, secs: u32) -> anyhow::Result<()> {
        self.client
            .call(
                &format!("{V}.SetTimeout"),
                json!({ "name": name, "timeoutSec": secs }),
            )
            .await
            .map(|_| ())
    }

    async fn pause_vm(&mut self, name: &str, pause: bool) -> anyhow::Result<()> {
        let method = if pause { "Pause" } else { "Resume" };
        self.client
            .call(&format!("{V}.{method}"), json!({ "name": name }))
            .await
            .map(|_| ())
    }

    async fn snapshot_vm(
        &mut self,
        out: &Output,
        name: &str,
        snapshot: &str,
        opts: Opts,
    ) -> anyhow::Result<()> {
        let p = varlink_params(
            vec![("name", json!(name)), ("snapshot", json!(snapshot))],
            opts,
        )?;
        self.client
            .follow(out, &format!("{V}.Snapshot"), Value::Object(p))
            .await
            .map(|_| ())
    }

    async fn open_agent(&mut self, name: &str) -> anyhow::Result<OwnedFd> {
        self.client
            .call_fd(&format!("{V}.OpenAgent"), json!({ "name": name }))
            .await
    }

    async fn open_console(&mut self, name: &str) -> anyhow::Result<OwnedFd> {
        // On a connection of its own: `vm logs -f` opens it again and again.
        let mut c = Client::connect(&self.client.socket).await?;
        c.call_fd(&format!("{V}.OpenConsole"), json!({ "name": name }))
            .await
    }

    async fn wait_stopped(&mut self, name: &str) -> anyhow::Result<()> {
        while !matches!(
            self.vm_info(name).await?.state.as_str(),
            "stopped" | "failed"
        ) {
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_become_varlink_parameters_with_its_key_names() {
        let dir = tempfile::tempdir().unwrap();
        let p = varlink_params(
            vec![("name", json!("a"))],
            vec![
                ("memory_mib", Opt::U32(512)),
                ("ready_ports", Opt::Ports(vec![8080])),
                ("work_seed", Opt::File(dir.path().to_owned())),
                (
                    "shares",
                    Opt::Shares(vec![("/h".into(), "/g".into(), true)]),
                ),
            ],
        )
        .unwrap();
        assert_eq!(
            Value::Object(p),
            json!({
                "name": "a", "memoryMib": 512, "readyPorts": [8080],
                "workSeed": dir.path().canonicalize().unwrap().to_string_lossy(),
                "shares": [{"host": "/h", "guest": "/g", "readOnly": true}],
            })
        );
        // And as D-Bus options, the same keys as the daemon reads them.
        let o = dbus_options(vec![
            ("memory_mib", Opt::U32(512)),
            (
                "shares",
                Opt::Shares(vec![("/h".into(), "/g".into(), true)]),
            ),
        ])
        .unwrap();
        assert_eq!(o.len(), 2);
        assert_eq!(u32::try_from(&*o["memory_mib"]).unwrap(), 512);
    }
}
