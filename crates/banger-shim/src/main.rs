//! `containerd-shim-banger-v2`: containerd's runtime `io.containerd.banger.v2`. Each task is a
//! banger VM whose root is the bundle's `rootfs` (CreateVM `rootfs_dir`: virtio-fs, no copy),
//! and the task's process runs in it through the guest agent, its stdio copied between
//! containerd's FIFOs and the agent's frames. The shim is a client of bangerd's Varlink API
//! (as root, which containerd runs it as) and of the agent's protocol, nothing more: every
//! privileged step is bangerd's.
//!
//! What works: create, start, wait, state, kill, delete, exec (and an exec's start, wait,
//! state, kill, delete), terminals and their size, CloseIO, pause/resume, pids, connect,
//! shutdown and the `delete` subcommand for a task whose shim died; the task events
//! (`/tasks/create`, `start`, `exec-added`, `exec-started`, `exit`, `delete`, `paused`,
//! `resumed`, `oom`); stats as cgroup v1 or v2 metrics of the guest; output to FIFOs or log URIs
//! ([`logio`]); a network namespace given by the spec; pods ([`pod`]); the spec's bind mounts
//! ([`mounts`]).

mod cgroup2;
mod logio;
mod mounts;
mod outbox;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use banger_client::agent;
use banger_client::daemon::{Daemon, Fault};
use banger_guest::agent::{frame, OomKill, Request};
use containerd_shim::asynchronous::{run, spawn, ExitSignal, Shim};
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Config, Error, Flags, StartOpts, TtrpcResult};
use containerd_shim_protos::api;
use containerd_shim_protos::events::task as events;
use containerd_shim_protos::protobuf::MessageField;
use containerd_shim_protos::shim_async::Task;
use containerd_shim_protos::topics;
use containerd_shim_protos::ttrpc::r#async::TtrpcContext;
use outbox::Outbox;
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
    /// Its container's root in the VM, for a container of a pod (see [`pod`]).
    root: Option<String>,
    /// The spec's host name.
    hostname: Option<String>,
    /// The spec's resource limits.
    rlimits: Vec<banger_guest::agent::Rlimit>,
    /// The guest cgroup of a pod's container (its id), which its processes run in.
    cgroup: Option<String>,
}

impl Process {
    /// From a bundle's `config.json`.
    fn of(config: &Value) -> Process {
        Process {
            hostname: config["hostname"]
                .as_str()
                .filter(|h| !h.is_empty())
                .map(str::to_owned),
            ..Process::of_spec(&config["process"])
        }
    }

    /// From an OCI process spec (`config.json`'s `process`, or an exec's).
    fn of_spec(p: &Value) -> Process {
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
            root: None,
            hostname: None,
            rlimits: serde_json::from_value(p["rlimits"].clone()).unwrap_or_default(),
            cgroup: None,
        }
    }
}

/// What a process is started with: its command and its stdio (containerd's FIFOs).
#[derive(Clone)]
struct Spec {
    process: Process,
    terminal: bool,
    stdin: String,
    stdout: String,
    stderr: String,
}

/// One process of a task: its init (exec id "") or an exec.
struct Proc {
    spec: Spec,
    pid: u32,
    /// The exit status and time once the process ended.
    exited: watch::Receiver<Option<(u32, i64)>>,
    exit_tx: Option<watch::Sender<Option<(u32, i64)>>>,
    /// Told by `CloseIO`: the process's input ends (what is in the FIFO still reaches it).
    close_stdin: Arc<tokio::sync::Notify>,
    /// `ResizePty`'s sizes (rows, cols) for its terminal.
    resize: tokio::sync::mpsc::UnboundedSender<(u16, u16)>,
    resize_rx: Option<tokio::sync::mpsc::UnboundedReceiver<(u16, u16)>>,
}

impl Proc {
    fn new(process: Process, terminal: bool, stdin: &str, stdout: &str, stderr: &str) -> Proc {
        let (exit_tx, exited) = watch::channel(None);
        let (resize, resize_rx) = tokio::sync::mpsc::unbounded_channel();
        Proc {
            spec: Spec {
                process,
                terminal,
                stdin: stdin.to_owned(),
                stdout: stdout.to_owned(),
                stderr: stderr.to_owned(),
            },
            pid: 0,
            exited,
            exit_tx: Some(exit_tx),
            close_stdin: Default::default(),
            resize,
            resize_rx: Some(resize_rx),
        }
    }

    fn status(&self) -> api::Status {
        match (*self.exited.borrow(), self.exit_tx.is_some()) {
            (Some(_), _) => api::Status::STOPPED,
            (None, true) => api::Status::CREATED,
            (None, false) => api::Status::RUNNING,
        }
    }
}

/// One task: its VM, bundle and processes by exec id.
struct TaskState {
    vm: String,
    bundle: PathBuf,
    paused: bool,
    procs: HashMap<String, Proc>,
    /// For a container of a pod: where its rootfs is bound in the pod sandbox's rootfs (the
    /// VM is the sandbox's, not its own).
    in_pod: Option<PathBuf>,
}

impl TaskState {
    /// A task just created, its init process not started.
    fn new(vm: String, bundle: PathBuf, init: Proc, in_pod: Option<PathBuf>) -> TaskState {
        TaskState {
            vm,
            bundle,
            paused: false,
            procs: HashMap::from([(String::new(), init)]),
            in_pod,
        }
    }
}

/// Kubernetes' pods, as CRI marks their containers' specs: one VM per pod, the sandbox's.
/// Every container of the pod is in the shim of its sandbox (`start` groups them by the
/// sandbox's id), and each runs in the sandbox's VM with its own rootfs as its root: the
/// rootfs is bound below the sandbox's rootfs (the VM's root over virtio-fs, made a shared
/// mount before the VM's virtio-fs server starts, so the server sees mounts made under it
/// later) at `/.banger/containers/ID`, and the agent runs the container's processes in a mount
/// namespace of their own chrooted there. Containers of a pod share its network (the VM's,
/// on the pod's namespace) and reach each other on localhost.
mod pod {
    use serde_json::Value;

    pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
    pub const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
    /// Where the containers' roots are, in the sandbox's rootfs (the VM's `/`).
    pub const CONTAINERS: &str = ".banger/containers";

    /// The pod sandbox a container belongs to, for a container CRI made in a pod.
    pub fn sandbox_of(config: &Value) -> Option<String> {
        let a = &config["annotations"];
        (a[CONTAINER_TYPE] == "container")
            .then(|| a[SANDBOX_ID].as_str().map(str::to_owned))
            .flatten()
            .filter(|s| !s.is_empty())
    }

    /// Whether the spec is a pod's sandbox.
    pub fn is_sandbox(config: &Value) -> bool {
        config["annotations"][CONTAINER_TYPE] == "sandbox"
    }

    /// The shim's grouping: a pod's containers share their sandbox's shim.
    pub fn grouping(config: &Value, id: &str) -> String {
        sandbox_of(config).unwrap_or_else(|| id.to_owned())
    }
}

#[derive(Clone)]
struct Service {
    exit: Arc<ExitSignal>,
    namespace: String,
    tasks: Arc<Mutex<HashMap<String, TaskState>>>,
    /// containerd's events service (forwarding once the task service runs).
    events: Outbox,
    /// Held (shared) by every Kill while it runs; an exit is told only once none runs. A
    /// process that dies of the signal ends before the agent answers the Kill, and containerd,
    /// told of the exit, deletes the task and closes its connection to the shim: the Kill's
    /// answer would be lost on it ("ttrpc: closed", as CRI's StopContainer once saw).
    kills: Arc<tokio::sync::RwLock<()>>,
}

/// Publishes an event to containerd without holding up the call that caused it.
fn publish(
    events: &Outbox,
    namespace: &str,
    topic: &'static str,
    event: impl containerd_shim_protos::protobuf::MessageDyn + 'static,
) {
    events.publish(namespace, topic, Box::new(event));
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

/// Makes `target` a shared mount (binding it onto itself first when it is no mount point),
/// so that mounts made below it later reach the namespaces that copied it.
fn make_shared(target: &Path) -> std::io::Result<()> {
    let c = std::ffi::CString::new(target.to_string_lossy().as_bytes())
        .map_err(std::io::Error::other)?;
    let none = std::ptr::null();
    // SAFETY: a NUL-terminated path; no data.
    let shared = || unsafe { libc::mount(none, c.as_ptr(), none, libc::MS_SHARED, none.cast()) };
    if shared() == 0 {
        return Ok(());
    }
    bind(target, target)?;
    if shared() != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Binds `source` (and the mounts below it) onto `target`.
fn bind(source: &Path, target: &Path) -> std::io::Result<()> {
    let c = |p: &Path| {
        std::ffi::CString::new(p.to_string_lossy().as_bytes()).map_err(std::io::Error::other)
    };
    let (s, t) = (c(source)?, c(target)?);
    let none = std::ptr::null();
    // SAFETY: NUL-terminated paths; no filesystem type or data.
    let r = unsafe {
        libc::mount(
            s.as_ptr(),
            t.as_ptr(),
            none,
            libc::MS_BIND | libc::MS_REC,
            none.cast(),
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn unmount(target: &Path) {
    if let Ok(c) = std::ffi::CString::new(target.to_string_lossy().as_bytes()) {
        // SAFETY: a NUL-terminated path.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

/// One request to VM `vm`'s agent: its reply (and the stream, for requests that go on) when
/// it did what was asked, else why not.
async fn ask_agent(
    vm: &str,
    req: &Request,
) -> Result<(banger_guest::agent::Reply, agent::Conn), String> {
    let stream = daemon()
        .agent(vm)
        .await
        .map_err(|e| format!("bangerd: {e}"))?;
    let (reply, conn) = agent::request(stream, req)
        .await
        .map_err(|e| format!("the VM's agent: {e}"))?;
    match reply.ok {
        true => Ok((reply, conn)),
        false => Err(reply.error),
    }
}

/// The spec's tmpfs mounts, made by VM `vm`'s agent inside the container's root there
/// (`root`; the VM's own root when `None`).
async fn mount_tmpfs(vm: &str, root: Option<&str>, config: &Value) -> Result<(), String> {
    for t in mounts::tmpfs(config) {
        let req = Request::Mount {
            root: root.map(str::to_owned),
            destination: t.destination,
            fstype: "tmpfs".into(),
            options: t.options,
        };
        ask_agent(vm, &req).await?;
    }
    Ok(())
}

/// Unmounts what the agent mounted inside a pod container's root in VM `vm`.
async fn unmount_in_guest(vm: &str, root: &str) {
    let req = Request::Unmount { root: root.into() };
    if let Err(e) = ask_agent(vm, &req).await {
        log::warn!("VM {vm}: cannot unmount what is below {root}: {e}");
    }
}

/// Asks VM `vm`'s agent to act on a pod container's guest cgroup (see
/// `banger_guest::agent::cgroup`): its stats for `Stats`.
async fn cgroup(
    vm: &str,
    name: &str,
    action: banger_guest::agent::cgroup::Action,
) -> Result<Option<banger_guest::agent::Stats>, String> {
    let req = Request::Cgroup {
        name: name.into(),
        action,
    };
    Ok(ask_agent(vm, &req).await?.0.stats)
}

/// One read of what the (non-blocking) FIFO holds now: 0 when empty or ended.
fn read_now(f: &tokio::net::unix::pipe::Receiver, buf: &mut [u8]) -> usize {
    use std::os::fd::AsRawFd;
    // SAFETY: a read into `buf`, of at most its length, on a descriptor `f` keeps open.
    let n = unsafe { libc::read(f.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    n.max(0) as usize
}

impl Service {
    /// `/tasks/create` for `req`.
    fn created(&self, req: &api::CreateTaskRequest) {
        publish(
            &self.events,
            &self.namespace,
            topics::TASK_CREATE_EVENT_TOPIC,
            events::TaskCreate {
                container_id: req.id.clone(),
                bundle: req.bundle.clone(),
                rootfs: req.rootfs.clone(),
                io: MessageField::some(events::TaskIO {
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: req.terminal,
                    ..Default::default()
                }),
                ..Default::default()
            },
        );
    }

    /// Create of a container of a pod (see [`pod`]): its rootfs (mounted at its bundle's
    /// `rootfs`) bound below its sandbox's, its processes to run there in the sandbox's VM.
    async fn create_in_pod(
        &self,
        req: &api::CreateTaskRequest,
        config: &Value,
        sandbox: &str,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        let bundle = PathBuf::from(&req.bundle);
        let rootfs = bundle.join("rootfs");
        let refuse = |why: String| {
            unmount(&rootfs);
            Err(ttrpc_err(why))
        };
        // containerd's ids are letters, digits and ._- (a path component, never . or ..).
        let id_ok = !req.id.is_empty()
            && !req.id.starts_with('.')
            && req
                .id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !id_ok {
            return refuse(format!(
                "container id {:?} is not one containerd makes",
                req.id
            ));
        }
        let tasks = self.tasks.lock().await;
        let Some(s) = tasks.get(sandbox) else {
            return refuse(format!(
                "pod sandbox {sandbox} does not run in this shim: a pod's containers run in \
                 its sandbox's VM, so the sandbox starts first"
            ));
        };
        let vm = s.vm.clone();
        // The pod's host name is its sandbox's (CRI's containers join the sandbox's UTS
        // namespace rather than naming one).
        let pod_hostname = s.procs[""].spec.process.hostname.clone();
        let at = s.bundle.join("rootfs").join(pod::CONTAINERS).join(&req.id);
        // Not held while the agent mounts.
        drop(tasks);
        if let Err(e) = std::fs::create_dir_all(&at).and_then(|_| bind(&rootfs, &at)) {
            return refuse(format!("cannot bind the rootfs into the pod's VM: {e}"));
        }
        if let Err(e) = mounts::apply(&mounts::binds(config), &at) {
            unmount(&at);
            let _ = std::fs::remove_dir(&at);
            return refuse(e.to_string());
        }
        let root = format!("/{}/{}", pod::CONTAINERS, req.id);
        if let Err(e) = mount_tmpfs(&vm, Some(&root), config).await {
            unmount_in_guest(&vm, &root).await;
            unmount(&at);
            let _ = std::fs::remove_dir(&at);
            return refuse(e);
        }
        log::info!(
            "task {}: in pod {sandbox}'s VM {vm}, root {}",
            req.id,
            at.display()
        );
        let mut process = Process::of(config);
        process.root = Some(root);
        process.cgroup = Some(req.id.clone());
        process.hostname = process.hostname.or(pod_hostname);
        let init = Proc::new(process, req.terminal, &req.stdin, &req.stdout, &req.stderr);
        self.tasks
            .lock()
            .await
            .insert(req.id.clone(), TaskState::new(vm, bundle, init, Some(at)));
        self.created(req);
        Ok(api::CreateTaskResponse::default())
    }

    /// Tells containerd of each OOM kill in VM `vm` (`/tasks/oom`) while the VM runs (the
    /// agent's `oom` stream ends with it): for the container whose guest cgroup the killed
    /// process was in (a pod's container) or one of whose processes the agent started as the
    /// killed pid, else for `id`, the VM's own task (a container's processes are the VM's).
    /// Returns once the agent follows the guest's log, so no kill after it goes untold.
    async fn watch_oom(&self, vm: String, id: String) {
        let conn = match ask_agent(&vm, &Request::Oom).await {
            Ok((_, conn)) => conn,
            Err(e) => return log::warn!("VM {vm}: no OOM events: {e}"),
        };
        let svc = self.clone();
        tokio::spawn(async move {
            // The input half is held: the agent follows for as long as it is open.
            let (mut frames, _input) = conn.split();
            while let Ok(Some((kind, data))) = frames.next().await {
                if kind != frame::STDOUT {
                    continue;
                }
                let Ok(kill) = serde_json::from_slice::<OomKill>(&data) else {
                    continue;
                };
                let container = svc
                    .tasks
                    .lock()
                    .await
                    .iter()
                    .find(|(_, t)| {
                        let group = t.procs[""].spec.process.cgroup.as_deref();
                        t.vm == vm
                            && (t.procs.values().any(|p| p.pid == kill.pid)
                                || group.is_some_and(|g| kill.memcg == format!("/{g}")))
                    })
                    .map_or_else(|| id.clone(), |(c, _)| c.clone());
                log::info!(
                    "VM {vm}: the guest's OOM killer ended {} (pid {}): /tasks/oom for {container}",
                    kill.task,
                    kill.pid
                );
                publish(
                    &svc.events,
                    &svc.namespace,
                    topics::TASK_OOM_EVENT_TOPIC,
                    events::TaskOOM {
                        container_id: container,
                        ..Default::default()
                    },
                );
            }
        });
    }

    /// Runs one of a task's processes in its VM: stdio between containerd's FIFOs and the
    /// agent, the exit recorded once all output was written.
    async fn run_process(&self, id: &str, exec_id: &str) -> Result<u32, String> {
        let (vm, spec, tx, close, mut resize) = {
            let mut tasks = self.tasks.lock().await;
            let t = tasks.get_mut(id).ok_or_else(|| format!("no task {id}"))?;
            let vm = t.vm.clone();
            let p = t
                .procs
                .get_mut(exec_id)
                .ok_or_else(|| format!("no process {exec_id:?} in task {id}"))?;
            let tx = p.exit_tx.take().ok_or("the process started already")?;
            let resize = p.resize_rx.take().ok_or("the process started already")?;
            (vm, p.spec.clone(), tx, p.close_stdin.clone(), resize)
        };
        let req = Request::Exec {
            argv: spec.process.args.clone(),
            env: spec.process.env.clone(),
            cwd: spec.process.cwd.clone(),
            user: spec.process.user.clone(),
            tty: spec.terminal.then(|| banger_guest::agent::Tty {
                rows: 24,
                cols: 80,
                term: "xterm".into(),
            }),
            detach: true,
            tag: None,
            root: spec.process.root.clone(),
            hostname: spec.process.hostname.clone(),
            rlimits: spec.process.rlimits.clone(),
            cgroup: spec.process.cgroup.clone(),
        };
        let (reply, conn) = ask_agent(&vm, &req).await?;
        let pid = reply.pid.unwrap_or(0);
        let (mut frames, mut input) = conn.split();
        // The agent follows the process for as long as our side of the stream is open (a
        // detached process's client that hangs up no longer gets its output): the input half
        // is held until the exit.
        let mut done = tx.subscribe();
        let mut output =
            logio::Output::open(&spec.stdout, &spec.stderr, id, &self.namespace).await?;
        // Read and write: the FIFO reads as empty (not ended) while no client writes to it;
        // the input ends at CloseIO, as containerd's clients ask, after what the FIFO holds
        // then.
        let fifo = match spec.stdin.is_empty() {
            true => None,
            false => Some(
                tokio::net::unix::pipe::OpenOptions::new()
                    .read_write(true)
                    .open_receiver(&spec.stdin)
                    .map_err(|e| format!("stdin {}: {e}", spec.stdin))?,
            ),
        };
        tokio::spawn(async move {
            let mut buf = vec![0u8; frame::MAX];
            let mut open = fifo.is_some();
            if !open {
                // No input at all: it ends at once (the stream stays open, below).
                let _ = input.send(frame::STDIN, &[]).await;
            }
            loop {
                tokio::select! {
                    r = async { fifo.as_ref().unwrap().readable().await }, if open => {
                        let Some(f) = fifo.as_ref() else { break };
                        if r.is_err() {
                            break;
                        }
                        match f.try_read(&mut buf) {
                            Ok(0) => open = false,
                            Ok(n) => {
                                if input.send(frame::STDIN, &buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                            Err(_) => open = false,
                        }
                        if !open {
                            let _ = input.send(frame::STDIN, &[]).await;
                        }
                    }
                    _ = close.notified(), if open => {
                        if let Some(f) = fifo.as_ref() {
                            // What the FIFO holds now, read past the readiness the runtime
                            // may not have seen yet (the client wrote just before CloseIO).
                            loop {
                                let n = read_now(f, &mut buf);
                                if n == 0 || input.send(frame::STDIN, &buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                        }
                        open = false;
                        let _ = input.send(frame::STDIN, &[]).await;
                    }
                    Some((rows, cols)) = resize.recv() => {
                        let mut size = rows.to_be_bytes().to_vec();
                        size.extend(cols.to_be_bytes());
                        let _ = input.send(frame::RESIZE, &size).await;
                    }
                    _ = async { done.wait_for(Option::is_some).await.map(|_| ()) } => break,
                }
            }
            drop(input);
        });
        let kills = self.kills.clone();
        let (events, ns, cid, eid) = (
            self.events.clone(),
            self.namespace.clone(),
            id.to_owned(),
            if exec_id.is_empty() {
                id.to_owned()
            } else {
                exec_id.to_owned()
            },
        );
        tokio::spawn(async move {
            let mut status = 255u32;
            while let Ok(Some((kind, data))) = frames.next().await {
                match kind {
                    frame::STDOUT => {
                        if let Some(o) = output.out.as_mut() {
                            let _ = o.write_all(&data).await;
                        }
                    }
                    frame::STDERR => {
                        if let Some(e) = output.err.as_mut() {
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
            // Output is written (and a logging program done with it) before the exit is
            // told, as runc's shim does.
            output.finish().await;
            // Not while a Kill (this exit's cause, often) is still to answer.
            drop(kills.write().await);
            let at = now_secs();
            let _ = tx.send(Some((status, at)));
            publish(
                &events,
                &ns,
                topics::TASK_EXIT_EVENT_TOPIC,
                events::TaskExit {
                    container_id: cid,
                    id: eid,
                    pid,
                    exit_status: status,
                    exited_at: timestamp(at),
                    ..Default::default()
                },
            );
        });
        Ok(pid)
    }

    /// Runs `f` on task `id`'s process `exec_id`.
    async fn with_proc<T>(
        &self,
        id: &str,
        exec_id: &str,
        f: impl FnOnce(&mut TaskState, &str) -> Result<T, String>,
    ) -> TtrpcResult<T> {
        let mut tasks = self.tasks.lock().await;
        let t = tasks
            .get_mut(id)
            .ok_or_else(|| ttrpc_err(format!("no task {id}")))?;
        if !t.procs.contains_key(exec_id) {
            return Err(ttrpc_err(format!("no process {exec_id:?} in task {id}")));
        }
        f(t, exec_id).map_err(ttrpc_err)
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
            events: Outbox::default(),
            kills: Default::default(),
        }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> Result<String, Error> {
        // The bundle is the working directory: a pod's containers join their sandbox's shim.
        let config: Value = std::fs::read("config.json")
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let grouping = pod::grouping(&config, &opts.id);
        let vars: Vec<(&str, &str)> = Vec::new();
        let address = spawn(opts, &grouping, vars).await?;
        // The bundle's `address` is how a restarted containerd finds this shim again (the
        // crate writes it only when the socket existed already).
        std::fs::write("address", &address).map_err(|e| Error::Other(e.to_string()))?;
        Ok(address)
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
        // containerd shuts a shim down right after a task's Delete: its last events go first.
        if !self.events.drained(Duration::from_secs(5)).await {
            log::warn!("exiting with events containerd has not taken");
        }
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        // The crate's own queue cannot be waited for; the outbox forwards instead.
        self.events.start(publisher.address.clone());
        self.clone()
    }
}

/// The guest's figures as cgroup v1 metrics (CPU time in ns).
fn cgroup1_metrics(
    st: &banger_guest::agent::Stats,
) -> containerd_shim_protos::cgroups::metrics::Metrics {
    use containerd_shim_protos::cgroups::metrics as cg;
    cg::Metrics {
        pids: MessageField::some(cg::PidsStat {
            current: st.pids,
            ..Default::default()
        }),
        cpu: MessageField::some(cg::CPUStat {
            usage: MessageField::some(cg::CPUUsage {
                total: st.cpu_usage_usec.saturating_mul(1000),
                kernel: st.cpu_system_usec.saturating_mul(1000),
                user: st.cpu_user_usec.saturating_mul(1000),
                ..Default::default()
            }),
            ..Default::default()
        }),
        memory: MessageField::some(cg::MemoryStat {
            cache: st.mem_cache,
            total_cache: st.mem_cache,
            usage: MessageField::some(cg::MemoryEntry {
                usage: st.mem_used,
                limit: st.mem_total,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Which cgroup version's metrics Stats gives: `BANGER_SHIM_CGROUPS` (`v1` or `v2`) in
/// containerd's environment, else the host's own, as the runc shim does (kubelet reads the
/// version its host runs).
fn cgroups_v2() -> bool {
    match std::env::var("BANGER_SHIM_CGROUPS").as_deref() {
        Ok("v2") => true,
        Ok("v1") => false,
        _ => cgroup2::host_is_unified(),
    }
}

/// The path of the network namespace `config.json` joins (`linux.namespaces`, type
/// `network` with a path), if any.
fn network_namespace(config: &Value) -> Option<String> {
    config["linux"]["namespaces"]
        .as_array()?
        .iter()
        .find(|n| n["type"] == "network")?["path"]
        .as_str()
        .filter(|p| !p.is_empty())
        .map(str::to_owned)
}

#[async_trait]
impl Task for Service {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        let bundle = PathBuf::from(&req.bundle);
        let config: Value =
            serde_json::from_slice(&std::fs::read(bundle.join("config.json")).map_err(ttrpc_err)?)
                .map_err(ttrpc_err)?;
        let rootfs = bundle.join("rootfs");
        if !req.rootfs.is_empty() {
            mount_rootfs(&req.rootfs, &rootfs).map_err(|e| ttrpc_err(format!("rootfs: {e}")))?;
        }
        log::info!("task {}: rootfs mounted at {}", req.id, rootfs.display());
        if let Some(sandbox) = pod::sandbox_of(&config) {
            return self.create_in_pod(&req, &config, &sandbox).await;
        }
        if pod::is_sandbox(&config) {
            // Later containers' roots are bound below it: the VM's virtio-fs server must see
            // those mounts, which it does when this is a shared mount as it starts.
            if let Err(e) = make_shared(&rootfs) {
                unmount(&rootfs);
                return Err(ttrpc_err(format!("rootfs: {e}")));
            }
        }
        if let Err(e) = mounts::apply(&mounts::binds(&config), &rootfs) {
            unmount(&rootfs);
            return Err(ttrpc_err(e));
        }
        let vm = vm_name(&self.namespace, &req.id);
        std::fs::write(bundle.join(VM_FILE), &vm).map_err(ttrpc_err)?;
        let mut params = json!({
            "name": vm,
            "rootfsDir": rootfs.to_string_lossy(),
            "init": "banger",
            "vcpus": 1,
            "memoryMib": 256,
        });
        // The network namespace the spec joins (a pod sandbox's, made by CNI) is the VM's
        // network; without one, the VM is on banger's own.
        if let Some(ns) = network_namespace(&config) {
            params["netns"] = ns.into();
        }
        let made = daemon()
            .follow("io.banger.VMs.Create", params)
            .await
            .map_err(|e| format!("bangerd: {e}"));
        if let Err(e) = match made {
            Ok(_) => mount_tmpfs(&vm, None, &config).await,
            Err(e) => Err(e),
        } {
            let _ = daemon()
                .call("io.banger.VMs.Delete", json!({"name": vm, "force": true}))
                .await;
            unmount(&rootfs);
            return Err(ttrpc_err(e));
        }
        let init = Proc::new(
            Process::of(&config),
            req.terminal,
            &req.stdin,
            &req.stdout,
            &req.stderr,
        );
        self.tasks.lock().await.insert(
            req.id.clone(),
            TaskState::new(vm.clone(), bundle, init, None),
        );
        self.watch_oom(vm, req.id.clone()).await;
        self.created(&req);
        Ok(api::CreateTaskResponse::default())
    }

    async fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let pid = self
            .run_process(&req.id, &req.exec_id)
            .await
            .map_err(ttrpc_err)?;
        self.with_proc(&req.id, &req.exec_id, |t, e| {
            if let Some(p) = t.procs.get_mut(e) {
                p.pid = pid;
            }
            Ok(())
        })
        .await?;
        if req.exec_id.is_empty() {
            publish(
                &self.events,
                &self.namespace,
                topics::TASK_START_EVENT_TOPIC,
                events::TaskStart {
                    container_id: req.id.clone(),
                    pid,
                    ..Default::default()
                },
            );
        } else {
            publish(
                &self.events,
                &self.namespace,
                topics::TASK_EXEC_STARTED_EVENT_TOPIC,
                events::TaskExecStarted {
                    container_id: req.id.clone(),
                    exec_id: req.exec_id.clone(),
                    pid,
                    ..Default::default()
                },
            );
        }
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn exec(
        &self,
        _ctx: &TtrpcContext,
        req: api::ExecProcessRequest,
    ) -> TtrpcResult<api::Empty> {
        let spec: Value = req
            .spec
            .as_ref()
            .map(|a| serde_json::from_slice(&a.value))
            .transpose()
            .map_err(|e| ttrpc_err(format!("the exec's process spec: {e}")))?
            .unwrap_or_default();
        let mut process = Process::of_spec(&spec);
        let mut tasks = self.tasks.lock().await;
        let t = tasks
            .get_mut(&req.id)
            .ok_or_else(|| ttrpc_err(format!("no task {}", req.id)))?;
        // An exec in a container of a pod runs in that container's root.
        process.root = t.procs[""].spec.process.root.clone();
        process.hostname = t.procs[""].spec.process.hostname.clone();
        process.cgroup = t.procs[""].spec.process.cgroup.clone();
        let p = Proc::new(process, req.terminal, &req.stdin, &req.stdout, &req.stderr);
        if t.procs.contains_key(&req.exec_id) {
            return Err(ttrpc_err(format!("exec {} exists", req.exec_id)));
        }
        t.procs.insert(req.exec_id.clone(), p);
        publish(
            &self.events,
            &self.namespace,
            topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            events::TaskExecAdded {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                ..Default::default()
            },
        );
        Ok(api::Empty::new())
    }

    async fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let id = req.id.clone();
        self.with_proc(&req.id, &req.exec_id, move |t, e| {
            let p = &t.procs[e];
            let mut r = api::StateResponse {
                id,
                exec_id: e.to_owned(),
                bundle: t.bundle.to_string_lossy().into_owned(),
                pid: p.pid,
                stdin: p.spec.stdin.clone(),
                stdout: p.spec.stdout.clone(),
                stderr: p.spec.stderr.clone(),
                terminal: p.spec.terminal,
                ..Default::default()
            };
            let status = match p.status() {
                api::Status::RUNNING if t.paused => api::Status::PAUSED,
                s => s,
            };
            r.status = status.into();
            if let Some((code, at)) = *p.exited.borrow() {
                r.exit_status = code;
                r.exited_at = timestamp(at);
            }
            Ok(r)
        })
        .await
    }

    async fn wait(
        &self,
        _ctx: &TtrpcContext,
        req: api::WaitRequest,
    ) -> TtrpcResult<api::WaitResponse> {
        let mut rx = self
            .with_proc(&req.id, &req.exec_id, |t, e| Ok(t.procs[e].exited.clone()))
            .await?;
        let (code, at) = match rx.wait_for(Option::is_some).await {
            Ok(v) => v.unwrap_or((255, now_secs())),
            Err(_) => (255, now_secs()),
        };
        Ok(api::WaitResponse {
            exit_status: code,
            exited_at: timestamp(at),
            ..Default::default()
        })
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        let _answering = self.kills.read().await;
        let (vm, pids) = self
            .with_proc(&req.id, &req.exec_id, |t, e| {
                // `all`: every process of the task, as runc's shim signals the container's.
                let pids: Vec<u32> = if req.all && e.is_empty() {
                    t.procs.values().map(|p| p.pid).collect()
                } else {
                    vec![t.procs[e].pid]
                };
                Ok((t.vm.clone(), pids))
            })
            .await?;
        for pid in pids.into_iter().filter(|p| *p != 0) {
            let signal = Request::Signal {
                pid: Some(pid),
                tag: None,
                signal: req.signal as i32,
            };
            match ask_agent(&vm, &signal).await {
                // A process that ended meanwhile has nothing to signal.
                Err(e) if !e.contains("no process") => return Err(ttrpc_err(e)),
                _ => {}
            }
        }
        Ok(api::Empty::new())
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        let answer = |p: &Proc| {
            let (code, at) = p.exited.borrow().unwrap_or((137, now_secs()));
            api::DeleteResponse {
                pid: p.pid,
                exit_status: code,
                exited_at: timestamp(at),
                ..Default::default()
            }
        };
        if !req.exec_id.is_empty() {
            // An exec: it alone goes.
            let mut tasks = self.tasks.lock().await;
            let t = tasks
                .get_mut(&req.id)
                .ok_or_else(|| ttrpc_err(format!("no task {}", req.id)))?;
            let p = t
                .procs
                .remove(&req.exec_id)
                .ok_or_else(|| ttrpc_err(format!("no exec {}", req.exec_id)))?;
            return Ok(answer(&p));
        }
        let t = self
            .tasks
            .lock()
            .await
            .remove(&req.id)
            .ok_or_else(|| ttrpc_err(format!("no task {}", req.id)))?;
        match &t.in_pod {
            // A container of a pod: the VM is the sandbox's; its root goes from it.
            Some(at) => {
                let process = &t.procs[""].spec.process;
                if let (Some(name), true) = (&process.cgroup, t.procs[""].pid != 0) {
                    // Whatever of the container still runs goes with its cgroup.
                    if let Err(e) =
                        cgroup(&t.vm, name, banger_guest::agent::cgroup::Action::Remove).await
                    {
                        log::warn!("task {}: its guest cgroup: {e}", req.id);
                    }
                }
                if let Some(root) = &process.root {
                    unmount_in_guest(&t.vm, root).await;
                }
                unmount(at);
                let _ = std::fs::remove_dir(at);
            }
            None => {
                daemon()
                    .call("io.banger.VMs.Delete", json!({"name": t.vm, "force": true}))
                    .await
                    .map_err(fault)?;
            }
        }
        unmount(&t.bundle.join("rootfs"));
        let _ = std::fs::remove_file(t.bundle.join(VM_FILE));
        let a = answer(&t.procs[""]);
        publish(
            &self.events,
            &self.namespace,
            topics::TASK_DELETE_EVENT_TOPIC,
            events::TaskDelete {
                container_id: req.id.clone(),
                id: req.id.clone(),
                pid: a.pid,
                exit_status: a.exit_status,
                exited_at: a.exited_at.clone(),
                ..Default::default()
            },
        );
        Ok(a)
    }

    async fn close_io(
        &self,
        _ctx: &TtrpcContext,
        req: api::CloseIORequest,
    ) -> TtrpcResult<api::Empty> {
        self.with_proc(&req.id, &req.exec_id, |t, e| {
            if req.stdin {
                t.procs[e].close_stdin.notify_one();
            }
            Ok(())
        })
        .await?;
        Ok(api::Empty::new())
    }

    async fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        let size = (
            u16::try_from(req.height).unwrap_or(u16::MAX),
            u16::try_from(req.width).unwrap_or(u16::MAX),
        );
        self.with_proc(&req.id, &req.exec_id, |t, e| {
            let _ = t.procs[e].resize.send(size);
            Ok(())
        })
        .await?;
        Ok(api::Empty::new())
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        self.pause_or_resume(&req.id, true).await
    }

    async fn resume(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResumeRequest,
    ) -> TtrpcResult<api::Empty> {
        self.pause_or_resume(&req.id, false).await
    }

    /// `Stats` (`ctr task metrics`): what the VM's guest kernel counts (the agent's `stats`),
    /// as cgroup v2 or v1 metrics (see [`cgroups_v2`]): memory use and limit (the guest's
    /// memory), page cache, CPU time, processes.
    async fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        use containerd_shim_protos::protobuf::Message;
        let (vm, group) = self
            .with_proc(&req.id, "", |t, _| {
                Ok((t.vm.clone(), t.procs[""].spec.process.cgroup.clone()))
            })
            .await?;
        let st = match group {
            // A container of a pod: what its cgroup in the pod's VM uses.
            Some(name) => cgroup(&vm, &name, banger_guest::agent::cgroup::Action::Stats)
                .await
                .map_err(ttrpc_err)?
                .unwrap_or_default(),
            None => ask_agent(&vm, &Request::Stats)
                .await
                .map_err(ttrpc_err)?
                .0
                .stats
                .ok_or_else(|| ttrpc_err("the VM's agent has no stats"))?,
        };
        let mut any = containerd_shim_protos::protobuf::well_known_types::any::Any::new();
        if cgroups_v2() {
            any.type_url = cgroup2::TYPE_URL.into();
            any.value = cgroup2::Metrics {
                pids: st.pids,
                cpu_usage_usec: st.cpu_usage_usec,
                cpu_user_usec: st.cpu_user_usec,
                cpu_system_usec: st.cpu_system_usec,
                memory_usage: st.mem_used,
                memory_limit: st.mem_total,
                memory_file: st.mem_cache,
            }
            .encode();
        } else {
            any.type_url = "io.containerd.cgroups.v1.Metrics".into();
            any.value = cgroup1_metrics(&st).write_to_bytes().map_err(ttrpc_err)?;
        }
        Ok(api::StatsResponse {
            stats: MessageField::some(any),
            ..Default::default()
        })
    }

    async fn pids(
        &self,
        _ctx: &TtrpcContext,
        req: api::PidsRequest,
    ) -> TtrpcResult<api::PidsResponse> {
        self.with_proc(&req.id, "", |t, _| {
            let processes = t
                .procs
                .values()
                .filter(|p| p.pid != 0 && p.exited.borrow().is_none())
                .map(|p| {
                    let mut info = api::ProcessInfo::new();
                    info.pid = p.pid;
                    info
                })
                .collect();
            Ok(api::PidsResponse {
                processes,
                ..Default::default()
            })
        })
        .await
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
            .and_then(|t| t.procs.get(""))
            .map(|p| p.pid)
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

impl Service {
    /// `Pause`/`Resume`: the task's VM paused (its vCPUs stopped, memory kept) or let go on.
    async fn pause_or_resume(&self, id: &str, pause: bool) -> TtrpcResult<api::Empty> {
        let (vm, group) = self
            .with_proc(id, "", |t, _| {
                Ok((t.vm.clone(), t.procs[""].spec.process.cgroup.clone()))
            })
            .await?;
        match group {
            // A container of a pod: its cgroup is frozen, the pod's VM runs on.
            Some(name) => {
                use banger_guest::agent::cgroup::Action;
                let action = if pause { Action::Freeze } else { Action::Thaw };
                cgroup(&vm, &name, action).await.map_err(ttrpc_err)?;
            }
            None => {
                let method = if pause {
                    "io.banger.VMs.Pause"
                } else {
                    "io.banger.VMs.Resume"
                };
                daemon()
                    .call(method, json!({ "name": vm }))
                    .await
                    .map_err(fault)?;
            }
        }
        self.with_proc(id, "", |t, _| {
            t.paused = pause;
            Ok(())
        })
        .await?;
        if pause {
            let e = events::TaskPaused {
                container_id: id.to_owned(),
                ..Default::default()
            };
            publish(
                &self.events,
                &self.namespace,
                topics::TASK_PAUSED_EVENT_TOPIC,
                e,
            );
        } else {
            let e = events::TaskResumed {
                container_id: id.to_owned(),
                ..Default::default()
            };
            publish(
                &self.events,
                &self.namespace,
                topics::TASK_RESUMED_EVENT_TOPIC,
                e,
            );
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
    fn a_joined_network_namespace_is_the_vms_network() {
        let spec = |ns: Value| json!({"linux": {"namespaces": ns}});
        assert_eq!(
            network_namespace(&spec(json!([
                {"type": "pid"},
                {"type": "network", "path": "/var/run/netns/cni-1"}
            ]))),
            Some("/var/run/netns/cni-1".into())
        );
        for none in [
            json!([{"type": "network"}]),
            json!([{"type": "pid", "path": "/x"}]),
            json!(null),
        ] {
            assert_eq!(network_namespace(&spec(none.clone())), None, "{none}");
        }
    }

    #[test]
    fn the_process_comes_from_the_bundles_config() {
        let p = Process::of(&json!({"process": {
            "args": ["sh", "-c", "exit 7"], "env": ["PATH=/bin"], "cwd": "/",
            "user": {"uid": 0, "gid": 0},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 512}]
        }, "hostname": "web"}));
        assert_eq!(p.args, ["sh", "-c", "exit 7"]);
        assert_eq!(p.env, ["PATH=/bin"]);
        assert_eq!(p.cwd.as_deref(), Some("/"));
        assert_eq!(p.user.as_deref(), Some("0:0"));
        assert_eq!(p.hostname.as_deref(), Some("web"));
        assert_eq!(
            p.rlimits,
            [banger_guest::agent::Rlimit {
                kind: "RLIMIT_NOFILE".into(),
                soft: 512,
                hard: 1024
            }]
        );
    }
}
