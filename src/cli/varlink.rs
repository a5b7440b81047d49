//! `banger --varlink …`: the verbs over banger's Varlink socket (`io.banger.*`) instead of the
//! system bus, for hosts where no bus runs. The same daemon answers both, with the same
//! operations and the same polkit checks; what differs is how a call travels and that objects
//! are named by their id, not by a D-Bus path. Long operations follow their job through the
//! method's own `more` replies. Verbs this front end does not carry yet say so and name the
//! D-Bus way.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::{json, Map, Value};

use super::transport::Socket;
use super::vm::VmCommand;
use super::{Command, Output};

/// The socket's default path (`bangerd.socket`'s `ListenStream=`).
pub const DEFAULT_SOCKET: &str = "/run/banger/io.banger";

/// Where `--varlink` (or `BANGER_VARLINK`) points: a socket path, or the default for `1`.
pub fn socket_of(value: &str) -> PathBuf {
    match value {
        "" | "1" | "yes" | "true" => PathBuf::from(DEFAULT_SOCKET),
        p => PathBuf::from(p),
    }
}

/// A method call as zlink sends it: the name and the parameters.
#[derive(Debug, serde::Serialize)]
struct Method<'a> {
    method: &'a str,
    parameters: Value,
}

/// An error reply of banger's interfaces.
#[derive(Debug, serde::Deserialize)]
struct Fault {
    error: String,
    #[serde(default)]
    parameters: Value,
}

/// One connection to the daemon's Varlink socket.
pub struct Client {
    conn: zlink::tokio::unix::Connection,
    /// Put before each stage line (`vm fork`'s VMs, followed at once).
    label: String,
    /// The socket, for the further connections a verb makes.
    socket: PathBuf,
}

/// One reply of a call: its parameters, whether more follow, and descriptors sent with it.
struct Answer {
    params: Value,
    continues: bool,
    fds: Vec<OwnedFd>,
}

impl Client {
    /// Connects to the socket at `path`.
    pub async fn connect(path: &Path) -> anyhow::Result<Self> {
        let conn = zlink::tokio::unix::connect(path).await.map_err(|e| {
            anyhow::anyhow!(
                "Cannot reach banger's Varlink socket {} ({e}); is bangerd.socket enabled, or \
                 bangerd running? Leave out --varlink to use the system bus",
                path.display()
            )
        })?;
        Ok(Client {
            conn,
            label: String::new(),
            socket: path.to_owned(),
        })
    }

    async fn send(&mut self, method: &str, params: Value, more: bool) -> anyhow::Result<()> {
        let call = zlink::Call::new(Method {
            method,
            parameters: params,
        })
        .set_more(more);
        self.conn
            .send_call(&call, Vec::new())
            .await
            .with_context(|| format!("Cannot call {method}"))
    }

    async fn receive(&mut self, method: &str) -> anyhow::Result<Answer> {
        let (reply, fds) = self
            .conn
            .receive_reply::<Value, Fault>()
            .await
            .map_err(|e| anyhow::anyhow!("{method} failed: {e}"))?;
        match reply {
            Ok(r) => Ok(Answer {
                continues: r.continues().unwrap_or(false),
                params: r.into_parameters().unwrap_or_else(|| json!({})),
                fds,
            }),
            Err(f) => Err(explain(f)),
        }
    }

    /// Calls `method` and returns its one reply's parameters.
    pub async fn call(&mut self, method: &str, params: Value) -> anyhow::Result<Value> {
        self.send(method, params, false).await?;
        Ok(self.receive(method).await?.params)
    }

    /// Calls `method`, which answers with a descriptor: returns it.
    async fn call_fd(&mut self, method: &str, params: Value) -> anyhow::Result<OwnedFd> {
        self.send(method, params, false).await?;
        let a = self.receive(method).await?;
        a.fds
            .into_iter()
            .next()
            .with_context(|| format!("{method} answered without a descriptor"))
    }

    /// Calls a method that answers with a job and follows it to its end: the stage lines go
    /// to stderr (as on D-Bus), warnings too, and with `--json` the result to stdout; returns
    /// the last reply's parameters.
    pub(super) async fn follow(
        &mut self,
        out: &Output,
        method: &str,
        params: Value,
    ) -> anyhow::Result<Value> {
        let mut job = Value::Null;
        let ended = {
            let following = self.follow_stages(!out.json, method, params, &mut job);
            tokio::select! {
                r = following => Some(r),
                _ = tokio::signal::ctrl_c() => None,
            }
        };
        // Ctrl-C: the job goes on; say so and how to follow or cancel it.
        let Some(ended) = ended else {
            super::watch::interrupted(&job["id"].as_u64().into_iter().collect::<Vec<_>>())
        };
        if out.json {
            let (result, error) = match &ended {
                Ok(_) => (
                    job["state"].clone(),
                    json!(job["error"].as_str().unwrap_or("")),
                ),
                Err(e) => (json!("failed"), json!(e.to_string())),
            };
            out.object(vec![
                ("job_id", job["id"].clone()),
                ("result", result),
                ("error", error),
            ]);
        }
        ended
    }

    /// [`Self::follow`] without the result: stage lines and warnings when `say`, the job as
    /// it was last in `job`.
    async fn follow_stages(
        &mut self,
        say: bool,
        method: &str,
        params: Value,
        job: &mut Value,
    ) -> anyhow::Result<Value> {
        self.send(method, params, true).await?;
        loop {
            let a = self.receive(method).await?;
            match a.params["job"]["message"].as_str() {
                Some(m) if say && !m.is_empty() => eprintln!("==> {}{m}", self.label),
                _ => {}
            }
            let log = &a.params["log"];
            if let (Some(p), Some(line), true) =
                (log["priority"].as_u64(), log["line"].as_str(), say)
            {
                if p <= 4 {
                    eprintln!("warning: {}{line}", self.label);
                }
            }
            *job = a.params["job"].clone();
            if !a.continues {
                return Ok(a.params);
            }
        }
    }
}

/// An error reply as a message for people.
fn explain(f: Fault) -> anyhow::Error {
    let message = f.parameters["message"].as_str().unwrap_or("").to_owned();
    match f.error.rsplit_once('.').map(|(_, kind)| kind) {
        Some("PermissionDenied") => anyhow::anyhow!("Permission denied: {message}"),
        _ if f.error.starts_with("io.banger.") && !message.is_empty() => anyhow::anyhow!(message),
        _ => anyhow::anyhow!("{} {}", f.error, f.parameters),
    }
}

/// Parameters from `(name, value)` pairs, leaving out the absent ones (`None`, empty lists).
pub(super) fn params<'a>(entries: impl IntoIterator<Item = (&'a str, Option<Value>)>) -> Value {
    let m: Map<String, Value> = entries
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k.to_owned(), v)))
        .filter(|(_, v)| !matches!(v, Value::Array(a) if a.is_empty()))
        .collect();
    Value::Object(m)
}

/// An absolute path for the daemon, which opens it with the caller's rights.
pub(super) fn absolute(p: &Path) -> anyhow::Result<Value> {
    let abs = std::fs::canonicalize(p).with_context(|| format!("Cannot reach {}", p.display()))?;
    Ok(json!(abs.to_string_lossy()))
}

/// Prints an object's fields (`key: value`, or one JSON object).
fn show(out: &Output, v: &Value) {
    let fields = v
        .as_object()
        .map(|m| m.iter().map(|(k, v)| (k.as_str(), v.clone())).collect())
        .unwrap_or_default();
    out.object(fields);
}

/// Rows of `list[keys…]`, for [`Output::table`].
fn rows(list: &Value, keys: &[&str]) -> Vec<Vec<Value>> {
    list.as_array()
        .map(|items| {
            items
                .iter()
                .map(|i| keys.iter().map(|k| i[*k].clone()).collect())
                .collect()
        })
        .unwrap_or_default()
}

/// Runs one command line over the socket at `socket`.
pub async fn run(out: &Output, socket: &Path, command: Command) -> anyhow::Result<()> {
    let mut c = Client::connect(socket).await?;
    match command {
        Command::Status => {
            let info = c.call("org.varlink.service.GetInfo", json!({})).await?;
            let mut lists = Vec::new();
            for (m, key) in [
                ("io.banger.Images.List", "images"),
                ("io.banger.Kernels.List", "kernels"),
                ("io.banger.VMs.List", "vms"),
                ("io.banger.Jobs.List", "jobs"),
            ] {
                let v = c.call(m, json!({})).await?;
                lists.push(v[key].as_array().cloned().unwrap_or_default());
            }
            let [images, kernels, vms, jobs] =
                <[Vec<Value>; 4]>::try_from(lists).map_err(|_| anyhow::anyhow!("four lists"))?;
            let running = vms.iter().filter(|v| v["state"] == "running").count();
            let counts = [images.len(), kernels.len(), vms.len(), running, jobs.len()];
            let got = c.call("io.banger.VMs.GetUsage", json!({})).await?;
            let usage: Vec<(String, u64, u64)> = got["usage"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|u| {
                    (
                        u["quota"].as_str().unwrap_or_default().to_owned(),
                        u["used"].as_u64().unwrap_or_default(),
                        u["allowed"].as_u64().unwrap_or_default(),
                    )
                })
                .collect();
            let version = info["version"].as_str().unwrap_or("");
            super::status::print(out, version, counts, &usage);
        }
        Command::Image(cmd) => super::image::run(out, &mut Socket { client: c }, cmd).await?,
        Command::Kernel(cmd) => super::kernel::run(out, &mut Socket { client: c }, cmd).await?,
        Command::Vm(cmd) => vm(out, &mut c, cmd).await?,
        Command::Snapshot(cmd) => super::snapshot::run(out, &mut Socket { client: c }, cmd).await?,
        Command::Job(cmd) => super::job::run(out, &mut Socket { client: c }, cmd).await?,
        Command::Doctor => super::doctor::run(out)?,
        Command::GenerateAssets { dir } => super::assets::generate(&dir)?,
        Command::CompleteNames { kind } => {
            let (method, key) = match kind.as_str() {
                "vm" => ("io.banger.VMs.List", "vms"),
                "image" => ("io.banger.Images.List", "images"),
                "kernel" => ("io.banger.Kernels.List", "kernels"),
                "snapshot" => ("io.banger.VMs.ListSnapshots", "snapshots"),
                _ => return Ok(()),
            };
            let v = c.call(method, json!({})).await?;
            super::assets::print_names(
                v[key]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|o| o["name"].as_str().map(str::to_owned)),
            );
        }
    }
    Ok(())
}

/// Drops the entries whose names start with a dot (banger's warm templates and snapshots)
/// unless `all`, as the D-Bus lists do.
fn hide_dotted(list: &mut serde_json::Value, all: bool) {
    if let (false, Some(a)) = (all, list.as_array_mut()) {
        a.retain(|e| !e["name"].as_str().unwrap_or_default().starts_with('.'));
    }
}

async fn vm(out: &Output, c: &mut Client, cmd: VmCommand) -> anyhow::Result<()> {
    const V: &str = "io.banger.VMs";
    match cmd {
        VmCommand::List { all } => {
            let mut v = c.call(&format!("{V}.List"), json!({})).await?;
            hide_dotted(&mut v["vms"], all);
            out.table(
                &["NAME", "ID", "STATE", "IMAGE ID"],
                &["name", "id", "state", "image"],
                rows(&v["vms"], &["name", "id", "state", "image"]),
            );
        }
        VmCommand::Show { name } => {
            let v = c.call(&format!("{V}.Get"), json!({ "name": name })).await?;
            show(out, &v["vm"]);
        }
        VmCommand::Create {
            name,
            spec,
            disk_size,
            no_start,
            no_wait,
        } => {
            let mut p = spec.varlink_params()?;
            p["name"] = json!(name);
            if let Some(d) = disk_size {
                p["diskSize"] = json!(d);
            }
            if no_start {
                p["start"] = json!(false);
            }
            if no_wait {
                let v = c.call(&format!("{V}.Create"), p).await?;
                out.object(vec![
                    ("vm_id", v["vm"]["id"].clone()),
                    ("job_id", v["job"]["id"].clone()),
                ]);
            } else {
                // With --json, stdout gets the VM as `vm show` prints it; stages go to stderr.
                c.follow(&Output { json: false }, &format!("{V}.Create"), p)
                    .await?;
                if out.json {
                    let v = c.call(&format!("{V}.Get"), json!({ "name": name })).await?;
                    show(out, &v["vm"]);
                } else {
                    println!(
                        "VM {name} is {}",
                        if no_start { "created" } else { "running" }
                    );
                }
            }
        }
        VmCommand::Start { name, no_wait } => {
            let p = json!({ "name": name });
            if no_wait {
                let v = c.call(&format!("{V}.Start"), p).await?;
                out.object(vec![("job_id", v["job"]["id"].clone())]);
            } else {
                c.follow(out, &format!("{V}.Start"), p).await?;
                out.say(&format!("VM {name} is running"));
            }
        }
        VmCommand::Stop {
            name,
            force,
            timeout,
        } => {
            let p = params([
                ("name", Some(json!(name))),
                ("force", force.then_some(json!(true))),
                ("timeoutSec", timeout.map(|t| json!(t))),
            ]);
            c.call(&format!("{V}.Stop"), p).await?;
            out.done(vec![("name", json!(name)), ("state", json!("stopped"))]);
        }
        VmCommand::Delete { name, force } => {
            let p = params([
                ("name", Some(json!(name))),
                ("force", force.then_some(json!(true))),
            ]);
            c.call(&format!("{V}.Delete"), p).await?;
            out.done(vec![("name", json!(name)), ("deleted", json!(true))]);
        }
        VmCommand::Pause { name } => {
            c.call(&format!("{V}.Pause"), json!({ "name": name }))
                .await?;
            out.done(vec![("name", json!(name)), ("state", json!("paused"))]);
        }
        VmCommand::Resume { name } => {
            c.call(&format!("{V}.Resume"), json!({ "name": name }))
                .await?;
            out.done(vec![("name", json!(name)), ("state", json!("running"))]);
        }
        VmCommand::Snapshot {
            name,
            snapshot,
            pause,
        } => {
            let p = params([
                ("name", Some(json!(name))),
                ("snapshot", Some(json!(snapshot))),
                ("pause", pause.then_some(json!(true))),
            ]);
            c.follow(out, &format!("{V}.Snapshot"), p).await?;
            out.done(vec![("vm", json!(name)), ("snapshot", json!(snapshot))]);
        }
        VmCommand::Exec {
            name,
            command,
            env,
            workdir,
            user,
            tty,
        } => {
            let fd = c
                .call_fd(&format!("{V}.OpenAgent"), json!({ "name": name }))
                .await?;
            let what = super::vm::exec_request(command, env, workdir, user, tty);
            super::vm::leave(super::vm::exec_on(fd, what).await?).await;
        }
        VmCommand::Shell { name, user } => {
            let fd = c
                .call_fd(&format!("{V}.OpenAgent"), json!({ "name": name }))
                .await?;
            let what = super::vm::shell_request(user);
            super::vm::leave(super::vm::exec_on(fd, what).await?).await;
        }
        VmCommand::Cp { src, dst } => {
            let (from, to) = (src.clone(), dst.clone());
            let (vm, job) = super::cp::plan(&src, &dst)?;
            let fd = c
                .call_fd(&format!("{V}.OpenAgent"), json!({ "name": vm }))
                .await?;
            let s = std::os::unix::net::UnixStream::from(fd);
            tokio::task::spawn_blocking(move || job(s)).await??;
            out.done(vec![("from", json!(from)), ("to", json!(to))]);
        }
        VmCommand::Logs { name, follow } => {
            let socket = c.socket.clone();
            let open = || {
                let (socket, name) = (socket.clone(), name.clone());
                async move {
                    let mut c = Client::connect(&socket).await?;
                    c.call_fd(&format!("{V}.OpenConsole"), json!({ "name": name }))
                        .await
                }
            };
            super::vm::print_console(open, follow).await?;
        }
        VmCommand::Ssh {
            name,
            identity,
            command,
        } => {
            use std::os::unix::process::CommandExt;
            let mut ssh = ssh_command(c, &name, identity, command).await?;
            let e = ssh.exec();
            anyhow::bail!("Cannot run ssh: {e}; is openssh-client installed?");
        }
        VmCommand::Fork { name, new, count } => {
            anyhow::ensure!(
                (1..=64).contains(&count),
                "--count must be between 1 and 64, not {count}"
            );
            let p = json!({ "name": name, "snapshot": new });
            c.follow(out, &format!("{V}.Snapshot"), p).await?;
            let names: Vec<String> = if count == 1 {
                vec![new.clone()]
            } else {
                (1..=count).map(|i| format!("{new}-{i}")).collect()
            };
            let key = super::vm::read_public_key(None)?;
            // Each create on a connection of its own, followed at once.
            let json = out.json;
            let creates = names.iter().map(|n| {
                let (socket, key, new) = (c.socket.clone(), key.clone(), new.clone());
                async move {
                    let mut c = Client::connect(&socket).await?;
                    c.label = format!("{n}: ");
                    let p = params([
                        ("name", Some(json!(n))),
                        ("snapshot", Some(json!(new))),
                        ("sshKey", key.map(|k| json!(k))),
                    ]);
                    c.follow_stages(!json, &format!("{V}.Create"), p, &mut Value::Null)
                        .await
                        .map_err(|e| anyhow::anyhow!("{n}: {e}"))
                }
            });
            let all = futures_util::future::join_all(creates);
            let results = tokio::select! {
                r = all => r,
                _ = tokio::signal::ctrl_c() => super::watch::interrupted(&[]),
            };
            let failed: Vec<String> = results
                .into_iter()
                .filter_map(|r| r.err().map(|e| e.to_string()))
                .collect();
            anyhow::ensure!(failed.is_empty(), "{}", failed.join("; "));
            out.done(vec![
                ("vm", json!(name)),
                ("snapshot", json!(new)),
                ("vms", json!(names)),
            ]);
        }
        VmCommand::Run {
            name,
            spec,
            rm,
            shell,
            command,
        } => {
            let name = name.unwrap_or_else(super::vm::generated_name);
            // SSH with a key, else the agent's shell: never a password prompt.
            let shell =
                shell || (spec.ssh_key.is_none() && super::vm::default_public_key().is_none());
            let mut p = spec.varlink_params()?;
            p["name"] = json!(name);
            if spec.entrypoint && !command.is_empty() {
                p["command"] = json!(command);
            }
            let created = c.follow(out, &format!("{V}.Create"), p).await;
            let code = match created {
                Err(e) => Err(e),
                Ok(_) if spec.entrypoint => main_process(c, &name).await,
                Ok(_) if !command.is_empty() || shell => {
                    let fd = c
                        .call_fd(&format!("{V}.OpenAgent"), json!({ "name": name }))
                        .await?;
                    let what = if command.is_empty() {
                        super::vm::shell_request(None)
                    } else {
                        crate::agent::ExecRequest::new(command)
                    };
                    super::vm::exec_on(fd, what).await
                }
                Ok(_) => {
                    let identity = spec.ssh_key.map(|k| k.with_extension(""));
                    let mut ssh = ssh_command(c, &name, identity, Vec::new()).await?;
                    let status = ssh.status().context("Cannot run ssh")?;
                    Ok(status.code().unwrap_or(255))
                }
            };
            if rm {
                let p = json!({ "name": name, "force": true });
                if let Err(e) = c.call(&format!("{V}.Delete"), p).await {
                    eprintln!("banger: cannot delete VM {name}: {e}");
                }
            }
            super::vm::leave(code?).await;
        }
    }
    Ok(())
}

/// The system `ssh` for VM `name` (see `vm ssh`).
async fn ssh_command(
    c: &mut Client,
    name: &str,
    identity: Option<PathBuf>,
    command: Vec<String>,
) -> anyhow::Result<std::process::Command> {
    let v = c.call("io.banger.VMs.Get", json!({ "name": name })).await?;
    let s = |k: &str| v["vm"][k].as_str().unwrap_or("").to_owned();
    super::vm::ssh_command_for(
        name,
        &s("sshAddress"),
        &s("id"),
        &s("sshHostKey"),
        identity,
        command,
    )
}

/// Waits for VM `name`'s main process to end (the VM stops), prints what it wrote on the
/// console and returns its exit status.
async fn main_process(c: &mut Client, name: &str) -> anyhow::Result<i32> {
    let vm = loop {
        let v = c.call("io.banger.VMs.Get", json!({ "name": name })).await?;
        if matches!(v["vm"]["state"].as_str(), Some("stopped" | "failed")) {
            break v;
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    };
    let fd = c
        .call_fd("io.banger.VMs.OpenConsole", json!({ "name": name }))
        .await?;
    super::vm::print_main_output(fd).await;
    Ok(vm["vm"]["exitStatus"].as_i64().unwrap_or(-1) as i32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_parameters_are_left_out() {
        let p = params([
            ("name", Some(json!("a"))),
            ("kernel", None),
            ("egress", Some(json!([]))),
            ("vcpus", Some(json!(2))),
        ]);
        assert_eq!(p, json!({ "name": "a", "vcpus": 2 }));
    }

    #[test]
    fn errors_read_as_their_message() {
        let f = |error: &str, message: &str| Fault {
            error: error.into(),
            parameters: json!({ "message": message }),
        };
        assert_eq!(
            explain(f("io.banger.VMs.NotFound", "No VM x")).to_string(),
            "No VM x"
        );
        assert_eq!(
            explain(f("io.banger.VMs.PermissionDenied", "not allowed")).to_string(),
            "Permission denied: not allowed"
        );
    }

    #[test]
    fn the_socket_defaults_to_the_units() {
        assert_eq!(socket_of("1"), PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(socket_of("/tmp/x"), PathBuf::from("/tmp/x"));
    }
}
