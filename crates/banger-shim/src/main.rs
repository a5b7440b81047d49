//! `containerd-shim-banger-v2`: containerd's runtime `io.containerd.banger.v2`. Each task is a
//! banger VM whose root is the bundle's `rootfs` (CreateVM `rootfs_dir`: virtio-fs, no copy),
//! and the task's process runs in it through the guest agent, its stdio copied between
//! containerd's FIFOs and the agent's frames. The shim is a client of bangerd's Varlink API
//! (as root, which containerd runs it as) and of the agent's protocol, nothing more: every
//! privileged step is bangerd's.
//!
//! What works: create, start, wait, state, kill, delete, connect, shutdown and the `delete`
//! subcommand for a task whose shim died. Not yet: exec, PTYs, pause/resume, stats, pods,
//! a given network namespace, events (issue 36).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use banger_client::agent;
use banger_client::daemon::{Daemon, Fault};
use banger_guest::agent::{frame, Request};
use containerd_shim::asynchronous::{run, spawn, ExitSignal, Shim};
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Config, Error, Flags, StartOpts, TtrpcResult};
use containerd_shim_protos::api;
use containerd_shim_protos::protobuf::MessageField;
use containerd_shim_protos::shim_async::Task;
use containerd_shim_protos::ttrpc::r#async::TtrpcContext;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::sync::{watch, Mutex};

/// The file in a bundle that names the task's VM, for the `delete` subcommand.
const VM_FILE: &str = "banger-vm";

/// Where bangerd's Varlink socket is (`BANGER_VARLINK` overrides, as tests do).
fn daemon() -> Daemon {
    let socket = std::env::var_os("BANGER_VARLINK")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/banger/io.banger"));
    Daemon::new(&socket)
}

/// A task's VM name: banger's name rules (`[a-zA-Z0-9._-]{1,64}`), from containerd's
/// namespace and id.
fn vm_name(namespace: &str, id: &str) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                    c
                } else {
                    '-'
                }
            })
            .collect()
    };
    let mut name = format!("ctr-{}-{}", clean(namespace), clean(id));
    name.truncate(64);
    name
}

fn ttrpc_err(e: impl std::fmt::Display) -> containerd_shim_protos::ttrpc::Error {
    containerd_shim_protos::ttrpc::Error::Others(e.to_string())
}

fn fault(f: Fault) -> containerd_shim_protos::ttrpc::Error {
    ttrpc_err(format!("bangerd: {f}"))
}

/// What a task's process is to run, from the bundle's `config.json`.
#[derive(Clone, Default)]
struct Process {
    args: Vec<String>,
    env: Vec<String>,
    cwd: Option<String>,
    user: Option<String>,
}

impl Process {
    fn of(config: &Value) -> Process {
        let p = &config["process"];
        let strings = |v: &Value| -> Vec<String> {
            v.as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        };
        let user = match (p["user"]["uid"].as_u64(), p["user"]["gid"].as_u64()) {
            (Some(u), Some(g)) => Some(format!("{u}:{g}")),
            (Some(u), None) => Some(u.to_string()),
            _ => None,
        };
        Process {
            args: strings(&p["args"]),
            env: strings(&p["env"]),
            cwd: p["cwd"].as_str().map(str::to_owned),
            user,
        }
    }
}

/// One task's state.
struct TaskState {
    vm: String,
    bundle: PathBuf,
    process: Process,
    stdin: String,
    stdout: String,
    stderr: String,
    pid: u32,
    /// The exit status and time once the process ended.
    exited: watch::Receiver<Option<(u32, i64)>>,
    exit_tx: Option<watch::Sender<Option<(u32, i64)>>>,
    /// Told by `CloseIO`: the process's input ends (what is in the FIFO still reaches it).
    close_stdin: Arc<tokio::sync::Notify>,
}

#[derive(Clone)]
struct Service {
    exit: Arc<ExitSignal>,
    namespace: String,
    tasks: Arc<Mutex<HashMap<String, TaskState>>>,
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn timestamp(
    secs: i64,
) -> MessageField<containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp> {
    let mut t = containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp::new();
    t.seconds = secs;
    MessageField::some(t)
}

/// Mounts containerd's rootfs mounts (a snapshotter's bind or overlay) at `target`.
fn mount_rootfs(mounts: &[api::Mount], target: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(target)?;
    for m in mounts {
        let (src, fstype, mut flags, data) = match m.type_.as_str() {
            "bind" => (
                m.source.clone(),
                String::new(),
                libc::MS_BIND | libc::MS_REC,
                String::new(),
            ),
            other => (m.source.clone(), other.to_owned(), 0, String::new()),
        };
        let mut opts: Vec<String> = Vec::new();
        for o in &m.options {
            match o.as_str() {
                "rbind" | "bind" => flags |= libc::MS_BIND | libc::MS_REC,
                "ro" => flags |= libc::MS_RDONLY,
                "rw" => {}
                other => opts.push(other.to_owned()),
            }
        }
        let data = if opts.is_empty() {
            data
        } else {
            opts.join(",")
        };
        let c = |s: &str| std::ffi::CString::new(s).map_err(std::io::Error::other);
        let (src, tgt, fs, d) = (
            c(&src)?,
            c(&target.to_string_lossy())?,
            c(&fstype)?,
            c(&data)?,
        );
        // SAFETY: NUL-terminated strings that outlive the call.
        let r = unsafe {
            libc::mount(
                src.as_ptr(),
                tgt.as_ptr(),
                if fstype.is_empty() {
                    std::ptr::null()
                } else {
                    fs.as_ptr()
                },
                flags,
                if data.is_empty() {
                    std::ptr::null()
                } else {
                    d.as_ptr().cast()
                },
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

fn unmount(target: &Path) {
    if let Ok(c) = std::ffi::CString::new(target.to_string_lossy().as_bytes()) {
        // SAFETY: a NUL-terminated path.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

/// Opens a FIFO containerd made, without blocking on its other end.
async fn open_fifo(path: &str, write: bool) -> std::io::Result<tokio::fs::File> {
    let mut o = tokio::fs::OpenOptions::new();
    if write {
        o.write(true);
    } else {
        o.read(true);
    }
    o.open(path).await
}

impl Service {
    /// Runs the task's process in its VM: stdio between containerd's FIFOs and the agent,
    /// the exit recorded once all output was written.
    async fn run_process(&self, id: &str) -> Result<u32, String> {
        let (vm, process, stdin, stdout, stderr, tx, close) = {
            let mut tasks = self.tasks.lock().await;
            let t = tasks.get_mut(id).ok_or_else(|| format!("no task {id}"))?;
            let tx = t.exit_tx.take().ok_or("the task started already")?;
            (
                t.vm.clone(),
                t.process.clone(),
                t.stdin.clone(),
                t.stdout.clone(),
                t.stderr.clone(),
                tx,
                t.close_stdin.clone(),
            )
        };
        let stream = daemon().agent(&vm).await.map_err(|e| e.to_string())?;
        let req = Request::Exec {
            argv: process.args,
            env: process.env,
            cwd: process.cwd,
            user: process.user,
            tty: None,
            detach: true,
            tag: None,
        };
        let (reply, conn) = agent::request(stream, &req)
            .await
            .map_err(|e| format!("the VM's agent: {e}"))?;
        if !reply.ok {
            return Err(reply.error);
        }
        let pid = reply.pid.unwrap_or(0);
        let (mut frames, mut input) = conn.split();
        // The agent follows the process for as long as our side of the stream is open (a
        // detached process's client that hangs up no longer gets its output): the input half
        // is held until the exit.
        let mut done = tx.subscribe();
        let mut done2 = tx.subscribe();
        let mut out = match stdout.is_empty() {
            true => None,
            false => Some(open_fifo(&stdout, true).await.map_err(|e| e.to_string())?),
        };
        let mut err = match stderr.is_empty() {
            true => None,
            false => Some(open_fifo(&stderr, true).await.map_err(|e| e.to_string())?),
        };
        if !stdin.is_empty() {
            // Read and write: the FIFO reads as empty (not ended) while no client writes to
            // it; the input ends at CloseIO, as containerd's clients ask, after what the FIFO
            // holds then.
            let fifo = tokio::net::unix::pipe::OpenOptions::new()
                .read_write(true)
                .open_receiver(&stdin)
                .map_err(|e| format!("stdin {stdin}: {e}"))?;
            tokio::spawn(async move {
                let mut buf = vec![0u8; frame::MAX];
                loop {
                    tokio::select! {
                        r = fifo.readable() => {
                            if r.is_err() {
                                break;
                            }
                            match fifo.try_read(&mut buf) {
                                Ok(0) => break,
                                Ok(n) => {
                                    if input.send(frame::STDIN, &buf[..n]).await.is_err() {
                                        break;
                                    }
                                }
                                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                                Err(_) => break,
                            }
                        }
                        _ = close.notified() => {
                            while let Ok(n) = fifo.try_read(&mut buf) {
                                if n == 0 || input.send(frame::STDIN, &buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                            break;
                        }
                    }
                }
                let _ = input.send(frame::STDIN, &[]).await;
                let _ = done.wait_for(Option::is_some).await;
                drop(input);
            });
        } else {
            tokio::spawn(async move {
                let _ = input.send(frame::STDIN, &[]).await;
                let _ = done2.wait_for(Option::is_some).await;
                drop(input);
            });
        }
        tokio::spawn(async move {
            let mut status = 255u32;
            while let Ok(Some((kind, data))) = frames.next().await {
                match kind {
                    frame::STDOUT => {
                        if let Some(o) = out.as_mut() {
                            let _ = o.write_all(&data).await;
                        }
                    }
                    frame::STDERR => {
                        if let Some(e) = err.as_mut() {
                            let _ = e.write_all(&data).await;
                        }
                    }
                    frame::EXIT => {
                        status = agent::exit_status(&data) as u32;
                        break;
                    }
                    _ => {}
                }
            }
            // Output is written before the exit is told, as runc's shim does.
            drop(out);
            drop(err);
            let _ = tx.send(Some((status, now_secs())));
        });
        Ok(pid)
    }
}

#[async_trait]
impl Shim for Service {
    type T = Service;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        Service {
            exit: Arc::new(ExitSignal::default()),
            namespace: args.namespace.clone(),
            tasks: Default::default(),
        }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> Result<String, Error> {
        let grouping = opts.id.clone();
        let vars: Vec<(&str, &str)> = Vec::new();
        spawn(opts, &grouping, vars).await
    }

    /// After a shim died: the task's VM deleted, its rootfs unmounted (cwd is the bundle).
    async fn delete_shim(&mut self) -> Result<api::DeleteResponse, Error> {
        let bundle = std::env::current_dir().map_err(|e| Error::Other(e.to_string()))?;
        if let Ok(vm) = std::fs::read_to_string(bundle.join(VM_FILE)) {
            let _ = daemon()
                .call(
                    "io.banger.VMs.Delete",
                    json!({"name": vm.trim(), "force": true}),
                )
                .await;
        }
        unmount(&bundle.join("rootfs"));
        Ok(api::DeleteResponse {
            exit_status: 137,
            exited_at: timestamp(now_secs()),
            ..Default::default()
        })
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
    }

    async fn create_task_service(&self, _publisher: RemotePublisher) -> Self::T {
        self.clone()
    }
}

#[async_trait]
impl Task for Service {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        if req.terminal {
            return Err(ttrpc_err(
                "banger's runtime has no terminals yet (run without -t)",
            ));
        }
        let bundle = PathBuf::from(&req.bundle);
        let config: Value =
            serde_json::from_slice(&std::fs::read(bundle.join("config.json")).map_err(ttrpc_err)?)
                .map_err(ttrpc_err)?;
        let rootfs = bundle.join("rootfs");
        if !req.rootfs.is_empty() {
            mount_rootfs(&req.rootfs, &rootfs).map_err(|e| ttrpc_err(format!("rootfs: {e}")))?;
        }
        log::info!("task {}: rootfs mounted at {}", req.id, rootfs.display());
        let vm = vm_name(&self.namespace, &req.id);
        std::fs::write(bundle.join(VM_FILE), &vm).map_err(ttrpc_err)?;
        let made = daemon()
            .follow(
                "io.banger.VMs.Create",
                json!({
                    "name": vm,
                    "rootfsDir": rootfs.to_string_lossy(),
                    "init": "banger",
                    "vcpus": 1,
                    "memoryMib": 256,
                }),
            )
            .await;
        if let Err(e) = made {
            let _ = daemon()
                .call("io.banger.VMs.Delete", json!({"name": vm, "force": true}))
                .await;
            unmount(&rootfs);
            return Err(fault(e));
        }
        let (tx, rx) = watch::channel(None);
        self.tasks.lock().await.insert(
            req.id.clone(),
            TaskState {
                vm,
                bundle,
                process: Process::of(&config),
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                pid: 0,
                exited: rx,
                exit_tx: Some(tx),
                close_stdin: Default::default(),
            },
        );
        Ok(api::CreateTaskResponse {
            pid: 0,
            ..Default::default()
        })
    }

    async fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        if !req.exec_id.is_empty() {
            return Err(ttrpc_err("exec is not supported yet"));
        }
        let pid = self.run_process(&req.id).await.map_err(ttrpc_err)?;
        if let Some(t) = self.tasks.lock().await.get_mut(&req.id) {
            t.pid = pid;
        }
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let tasks = self.tasks.lock().await;
        let t = tasks
            .get(&req.id)
            .ok_or_else(|| ttrpc_err(format!("no task {}", req.id)))?;
        let exited = *t.exited.borrow();
        let status = match (exited, t.exit_tx.is_some()) {
            (Some(_), _) => api::Status::STOPPED,
            (None, true) => api::Status::CREATED,
            (None, false) => api::Status::RUNNING,
        };
        let mut r = api::StateResponse {
            id: req.id.clone(),
            bundle: t.bundle.to_string_lossy().into_owned(),
            pid: t.pid,
            stdin: t.stdin.clone(),
            stdout: t.stdout.clone(),
            stderr: t.stderr.clone(),
            ..Default::default()
        };
        r.status = status.into();
        if let Some((code, at)) = exited {
            r.exit_status = code;
            r.exited_at = timestamp(at);
        }
        Ok(r)
    }

    async fn wait(
        &self,
        _ctx: &TtrpcContext,
        req: api::WaitRequest,
    ) -> TtrpcResult<api::WaitResponse> {
        let mut rx = {
            let tasks = self.tasks.lock().await;
            tasks
                .get(&req.id)
                .ok_or_else(|| ttrpc_err(format!("no task {}", req.id)))?
                .exited
                .clone()
        };
        let (code, at) = loop {
            if let Some(e) = *rx.borrow() {
                break e;
            }
            if rx.changed().await.is_err() {
                break (255, now_secs());
            }
        };
        Ok(api::WaitResponse {
            exit_status: code,
            exited_at: timestamp(at),
            ..Default::default()
        })
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        let (vm, pid) = {
            let tasks = self.tasks.lock().await;
            let t = tasks
                .get(&req.id)
                .ok_or_else(|| ttrpc_err(format!("no task {}", req.id)))?;
            (t.vm.clone(), t.pid)
        };
        if pid == 0 {
            return Ok(api::Empty::new());
        }
        let stream = daemon().agent(&vm).await.map_err(fault)?;
        let signal = Request::Signal {
            pid: Some(pid),
            tag: None,
            signal: req.signal as i32,
        };
        let (reply, _) = agent::request(stream, &signal).await.map_err(ttrpc_err)?;
        // A process that ended meanwhile has nothing to signal.
        if !reply.ok && !reply.error.contains("no process") {
            return Err(ttrpc_err(reply.error));
        }
        Ok(api::Empty::new())
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        let t = self
            .tasks
            .lock()
            .await
            .remove(&req.id)
            .ok_or_else(|| ttrpc_err(format!("no task {}", req.id)))?;
        let _ = daemon()
            .call("io.banger.VMs.Delete", json!({"name": t.vm, "force": true}))
            .await
            .map_err(fault)?;
        unmount(&t.bundle.join("rootfs"));
        let _ = std::fs::remove_file(t.bundle.join(VM_FILE));
        let (code, at) = t.exited.borrow().unwrap_or((137, now_secs()));
        Ok(api::DeleteResponse {
            pid: t.pid,
            exit_status: code,
            exited_at: timestamp(at),
            ..Default::default()
        })
    }

    async fn close_io(
        &self,
        _ctx: &TtrpcContext,
        req: api::CloseIORequest,
    ) -> TtrpcResult<api::Empty> {
        if req.stdin {
            if let Some(t) = self.tasks.lock().await.get(&req.id) {
                t.close_stdin.notify_one();
            }
        }
        Ok(api::Empty::new())
    }

    async fn pids(
        &self,
        _ctx: &TtrpcContext,
        req: api::PidsRequest,
    ) -> TtrpcResult<api::PidsResponse> {
        let tasks = self.tasks.lock().await;
        let t = tasks
            .get(&req.id)
            .ok_or_else(|| ttrpc_err(format!("no task {}", req.id)))?;
        let mut info = api::ProcessInfo::new();
        info.pid = t.pid;
        Ok(api::PidsResponse {
            processes: vec![info],
            ..Default::default()
        })
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let pid = self
            .tasks
            .lock()
            .await
            .get(&req.id)
            .map(|t| t.pid)
            .unwrap_or(0);
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: pid,
            version: "banger".into(),
            ..Default::default()
        })
    }

    async fn shutdown(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ShutdownRequest,
    ) -> TtrpcResult<api::Empty> {
        if self.tasks.lock().await.is_empty() {
            self.exit.signal();
        }
        Ok(api::Empty::new())
    }
}

#[tokio::main]
async fn main() {
    run::<Service>("io.containerd.banger.v2", None).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_names_follow_bangers_rules() {
        assert_eq!(vm_name("default", "t1"), "ctr-default-t1");
        assert_eq!(vm_name("k8s.io", "a/b c"), "ctr-k8s-io-a-b-c");
        assert_eq!(vm_name("n", &"x".repeat(100)).len(), 64);
    }

    #[test]
    fn the_process_comes_from_the_bundles_config() {
        let p = Process::of(&json!({"process": {
            "args": ["sh", "-c", "exit 7"], "env": ["PATH=/bin"], "cwd": "/",
            "user": {"uid": 0, "gid": 0}
        }}));
        assert_eq!(p.args, ["sh", "-c", "exit 7"]);
        assert_eq!(p.env, ["PATH=/bin"]);
        assert_eq!(p.cwd.as_deref(), Some("/"));
        assert_eq!(p.user.as_deref(), Some("0:0"));
    }
}
