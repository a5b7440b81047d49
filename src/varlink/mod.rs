//! The Varlink front end: `io.banger.Images`, `io.banger.Kernels`, `io.banger.VMs` and
//! `io.banger.Jobs` (one file each) and `org.varlink.service` on a socket of banger's own,
//! `$RUNTIME_DIR/io.banger`. Like the D-Bus front end it only converts: parameters become the
//! same operations ([`crate::ops`]), the peer's kernel-given credentials become the polkit
//! subject, errors become `io.banger.<Interface>.<Kind>`. Every connection is served by a task
//! of its own, so a slow or stuck client holds up no one else.
//!
//! Long operations answer with their job at once; a caller that sets `more` gets a reply for
//! each stage, progress step and log line of that job, and a last one when it ends (the
//! Varlink form of the D-Bus job signals).

/// The types of every interface that answers with jobs, as a literal for `concat!` (a
/// Varlink interface cannot name another's types, so each carries them).
macro_rules! job_types {
    () => {
        r#"
# A log line of a job.
type LogLine (
  # syslog priority: 3 error, 4 warning, 6 info, 7 debug
  priority: int,
  line: string
)

# A job, as io.banger.Jobs shows it.
type Job (
  id: int,
  kind: string,
  target: string,
  owner: int,
  stage: string,
  message: ?string,
  progress: float,
  # running, done, failed or canceled
  state: string,
  error: ?string
)
"#
    };
}

/// The errors of every io.banger interface, as a literal for `concat!`.
macro_rules! errors {
    () => {
        r#"
error NotFound (message: string)
error AlreadyExists (message: string)
error InUse (message: string)
error InvalidArgument (message: string)
error LimitExceeded (message: string)
error Failed (message: string)
error PermissionDenied (message: string)
"#
    };
}

mod bounded;
pub use bounded::MAX_CALL;
pub mod gate;
mod images;
mod jobs;
mod kernels;
mod machine_control;
mod machine_instance;
mod metrics;
mod params;
pub mod relay;
mod service;
mod vms;

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;
use serde_json::{json, Value};
use zlink::tokio::unix::Stream;
use zlink::{Connection, Reply};

use bounded::Bounded;

use crate::auth::{Authority, Caller};
use crate::error::ErrorKind;
use crate::jobs::{Job, JobEvent, JobState};
use crate::service::Banger;
use crate::Error;

use params::Params;

/// The socket's name in the runtime directory.
pub const SOCKET: &str = crate::layout::VARLINK_SOCKET;

/// What every interface shares.
#[derive(Clone)]
pub struct Ctx {
    /// The services.
    pub banger: Arc<Banger>,
    /// Who decides authorisation.
    pub authority: Arc<dyn Authority>,
    /// How many connections each uid, and all together, hold open.
    pub gate: Arc<gate::Gate>,
}

impl Ctx {
    /// Performs an operation for `caller` (see [`crate::ops`]), as the D-Bus front end does.
    pub async fn perform<'a, T>(
        &self,
        caller: &Caller,
        op: impl std::future::Future<Output = crate::Result<crate::ops::Ready<'a, T>>>,
    ) -> crate::Result<T> {
        let _held = self.banger.jobs.hold();
        crate::ops::perform(self.authority.as_ref(), caller, op).await
    }
}

/// The listening socket systemd passed (`bangerd.socket`: `LISTEN_FDS`, for this process by
/// `LISTEN_PID`, named `io.banger` by `LISTEN_FDNAMES` or the only one), if any. It is
/// checked to be a listening Unix stream socket and made close-on-exec, so no VMM or helper
/// inherits it. The environment is left as it is (changing it with threads running is not
/// safe); children see a `LISTEN_PID` that is not theirs and ignore it.
pub fn passed_listener() -> crate::Result<Option<std::os::unix::net::UnixListener>> {
    passed_named(SOCKET, true)
}

/// The metrics socket systemd passed (`bangerd-metrics.socket`, named `metrics`), if any.
pub fn passed_metrics_listener() -> crate::Result<Option<std::os::unix::net::UnixListener>> {
    passed_named(METRICS_SOCKET, false)
}

/// The name the metrics socket is passed under.
pub const METRICS_SOCKET: &str = "metrics";

/// Binds `$RUNTIME_DIR/report/io.banger` (a daemon not started by systemd: where systemd is,
/// `bangerd-metrics.socket` listens on `/run/systemd/report/io.banger`), open to every user.
pub fn bind_metrics(runtime_dir: &Path) -> crate::Result<std::os::unix::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let dir = runtime_dir.join("report");
    let path = dir.join("io.banger");
    let fail = |e| Error::failed(format!("Cannot listen on {}", path.display()), e);
    std::fs::create_dir_all(&dir).map_err(fail)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).map_err(fail)?;
    listen_open(&path).map_err(fail)
}

/// The passed socket named `name`, or the only one passed when `only` allows it.
fn passed_named(name: &str, only: bool) -> crate::Result<Option<std::os::unix::net::UnixListener>> {
    use std::os::fd::FromRawFd;
    let var = |k: &str| std::env::var(k).ok();
    let ours = var("LISTEN_PID")
        .and_then(|p| p.parse::<u32>().ok())
        .is_some_and(|p| p == std::process::id());
    let count = var("LISTEN_FDS")
        .and_then(|n| n.parse::<i32>().ok())
        .unwrap_or(0);
    if !ours || count < 1 {
        return Ok(None);
    }
    let names = var("LISTEN_FDNAMES").unwrap_or_default();
    let names: Vec<&str> = names.split(':').collect();
    const FIRST: i32 = 3;
    let fd = (0..count)
        .find(|i| names.get(*i as usize) == Some(&name))
        .or((only && count == 1).then_some(0))
        .map(|i| FIRST + i);
    let Some(fd) = fd else {
        if !only {
            return Ok(None);
        }
        return Err(Error::InvalidArgument(format!(
            "systemd passed {count} sockets (named {names:?}) and none is {SOCKET}; \
             bangerd.socket names its socket with FileDescriptorName={SOCKET}"
        )));
    };
    let opt = |name| sockopt(fd, name);
    if opt(libc::SO_DOMAIN) != Some(libc::AF_UNIX)
        || opt(libc::SO_TYPE) != Some(libc::SOCK_STREAM)
        || opt(libc::SO_ACCEPTCONN) != Some(1)
    {
        return Err(Error::InvalidArgument(format!(
            "descriptor {fd} that systemd passed is not a listening Unix stream socket; \
             bangerd.socket must have ListenStream=/run/banger/{SOCKET}"
        )));
    }
    // SAFETY: fcntl on a descriptor checked to be a socket above.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    // SAFETY: systemd handed this descriptor to this process, which owns it from here on.
    Ok(Some(unsafe {
        std::os::unix::net::UnixListener::from_raw_fd(fd)
    }))
}

/// An integer socket option of `fd` (`SOL_SOCKET`), if it has it.
pub(crate) fn sockopt(fd: std::os::fd::RawFd, name: libc::c_int) -> Option<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: v and len describe a c_int getsockopt may write.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            name,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    (r == 0).then_some(v)
}

/// Binds `$RUNTIME_DIR/io.banger` (a socket left by an earlier daemon is replaced), open to
/// every local user as the bus is: reads are open, and every mutating method asks polkit.
pub fn bind(runtime_dir: &Path) -> crate::Result<std::os::unix::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let path = socket_path(runtime_dir);
    let fail = |e| Error::failed(format!("Cannot listen on {}", path.display()), e);
    // Everyone must reach the socket: the runtime directory is 0755, as the unit's
    // RuntimeDirectoryMode makes it (what is private in it is private by its own mode).
    let m = std::fs::metadata(runtime_dir).map_err(fail)?;
    if m.permissions().mode() & 0o777 != 0o755 {
        use std::os::unix::fs::MetadataExt;
        // SAFETY: geteuid takes no arguments.
        if m.uid() != unsafe { libc::geteuid() } {
            return Err(Error::failed(
                format!("Cannot listen on {}", path.display()),
                std::io::Error::other(format!(
                    "{} is not the daemon's own (uid {}); give banger a runtime directory of its own",
                    runtime_dir.display(),
                    m.uid()
                )),
            ));
        }
        std::fs::set_permissions(runtime_dir, std::fs::Permissions::from_mode(0o755))
            .map_err(fail)?;
    }
    listen_open(&path).map_err(fail)
}

/// Listens on `path` (a socket left there by an earlier daemon is replaced), mode 0666.
fn listen_open(path: &Path) -> std::io::Result<std::os::unix::net::UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Ok(m) = std::fs::symlink_metadata(path) {
        if m.file_type().is_socket() {
            std::fs::remove_file(path)?;
        }
    }
    let listener = std::os::unix::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
    Ok(listener)
}

/// Serves `listener` until the daemon ends: each connection in a task of its own.
pub fn serve(listener: std::os::unix::net::UnixListener, ctx: Ctx) -> crate::Result<()> {
    serve_as(listener, ctx, Front::Banger)
}

/// Serves the metrics socket (`io.systemd.Metrics`, see [`metrics`]) until the daemon ends.
pub fn serve_metrics(listener: std::os::unix::net::UnixListener, ctx: Ctx) -> crate::Result<()> {
    serve_as(listener, ctx, Front::Metrics)
}

fn serve_as(
    listener: std::os::unix::net::UnixListener,
    ctx: Ctx,
    front: Front,
) -> crate::Result<()> {
    let fail = |e| Error::failed("Cannot serve Varlink", e);
    listener.set_nonblocking(true).map_err(fail)?;
    let listener = tokio::net::UnixListener::from_std(listener).map_err(fail)?;
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => spawn_connection(stream, ctx.clone(), front.clone()),
                Err(e) => {
                    // Out of descriptors, say: wait a moment rather than spin or stop.
                    tracing::warn!("Cannot accept a Varlink connection: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    });
    Ok(())
}

/// What a connection is served as.
#[derive(Clone)]
enum Front {
    /// banger's own socket: every io.banger interface.
    Banger,
    /// A VM's control socket (see [`relay`]): io.systemd.MachineInstance for the VM with
    /// this id.
    Machine(String),
    /// The metrics socket systemd-report reads: io.systemd.Metrics.
    Metrics,
}

fn spawn_connection(stream: tokio::net::UnixStream, ctx: Ctx, front: Front) {
    // Admitted before anything else is spent on it; refused with the reason at once.
    let pass = match stream.peer_cred() {
        Ok(cred) => ctx.gate.admit(cred.uid()),
        Err(e) => Err(format!("Cannot tell who connected: {e}")),
    };
    let pass = match pass {
        Ok(p) => p,
        Err(why) => {
            tracing::debug!("Refused a Varlink connection: {why}");
            gate::refuse(&stream, &why);
            return;
        }
    };
    tokio::spawn(async move {
        let _pass = pass;
        if let Err(e) = serve_connection(stream, ctx, front).await {
            tracing::debug!("Varlink connection ended: {e}");
        }
    });
}

/// Serves a connection to VM `vm_id`'s control socket that its relay handed over.
fn serve_machine(stream: tokio::net::UnixStream, ctx: Ctx, vm_id: String) {
    spawn_connection(stream, ctx, Front::Machine(vm_id));
}

/// A method call, owned.
#[derive(Debug, serde::Deserialize)]
struct AnyCall {
    method: String,
    #[serde(default)]
    parameters: Option<serde_json::Map<String, Value>>,
}

/// The caller behind a connection: the kernel's `SO_PEERCRED` at connect time. polkit gets
/// the process (pid, its start time and the uid), as `pkcheck --process` does; a peer with
/// no pid (another namespace) gets no subject, and polkit then denies.
fn caller_of(stream: &tokio::net::UnixStream) -> std::io::Result<Caller> {
    let cred = stream.peer_cred()?;
    let uid = cred.uid();
    let subject = cred
        .pid()
        .filter(|&p| p > 0)
        .and_then(|pid| {
            zbus_polkit::policykit1::Subject::new_for_pid(pid as u32, None, Some(uid)).ok()
        })
        .map(Arc::new);
    Ok(Caller {
        subject,
        uid,
        interactive: false,
    })
}

async fn serve_connection(
    stream: tokio::net::UnixStream,
    ctx: Ctx,
    front: Front,
) -> zlink::Result<()> {
    // An open connection is work in progress: the idle exit waits until it is closed.
    let _held = ctx.banger.jobs.hold();
    let caller = caller_of(&stream)?;
    let mut conn: Connection<Bounded> = Bounded(Stream::try_from(stream)?).into();
    loop {
        let (call, fds) = {
            // One call at a time per connection (the next is read once this one is
            // answered), and a connection that sends nothing for a while is closed.
            let Ok(received) =
                tokio::time::timeout(gate::IDLE, conn.receive_call::<AnyCall>()).await
            else {
                return Ok(());
            };
            let (call, fds) = received?;
            let c = Incoming {
                method: call.method().method.clone(),
                params: call.method().parameters.clone().unwrap_or_default(),
                more: call.more(),
                oneway: call.oneway(),
            };
            (c, fds)
        };
        if call.params.len() > 64 || call.method.len() > 256 {
            let e = Failure::invalid_parameter("parameters");
            send(&mut conn, &call, Err(e), false).await?;
            continue;
        }
        let answer = dispatch(&ctx, &caller, &front, &call, fds).await;
        match answer {
            Ok(Answer::One(v)) => send(&mut conn, &call, Ok(v), false).await?,
            Ok(Answer::WithFds(v, fds)) => send_with(&mut conn, &call, Ok(v), false, fds).await?,
            Ok(Answer::Many(_)) if !call.more => {
                let e = Failure::bare("org.varlink.service.ExpectedMore");
                send(&mut conn, &call, Err(e), false).await?
            }
            Ok(Answer::Many(all)) if all.is_empty() => {
                send(&mut conn, &call, Err(metrics::none()), false).await?
            }
            Ok(Answer::Many(all)) => {
                let last = all.len() - 1;
                for (i, v) in all.into_iter().enumerate() {
                    send(&mut conn, &call, Ok(v), i < last).await?;
                }
            }
            Err(e) => send(&mut conn, &call, Err(e), false).await?,
            Ok(Answer::Job {
                first,
                job,
                events,
                render,
            }) => follow(&mut conn, &call, first, job, events, render).await?,
        }
    }
}

/// A call as banger handles it.
struct Incoming {
    /// `interface.Method`.
    method: String,
    /// Its parameters.
    params: serde_json::Map<String, Value>,
    /// The caller takes more than one reply.
    more: bool,
    /// The caller takes no reply.
    oneway: bool,
}

/// How a method answers.
pub(crate) enum Answer {
    /// One reply.
    One(Value),
    /// One reply with descriptors, which its parameters name by index (as sd-varlink does).
    WithFds(Value, Vec<OwnedFd>),
    /// Several replies, for a caller that asked for more (a method that requires it).
    Many(Vec<Value>),
    /// A job's: `first` at once; with `more`, one reply (from `render`) per event of the job
    /// until it ends.
    Job {
        first: Value,
        job: Arc<Job>,
        events: tokio::sync::broadcast::Receiver<JobEvent>,
        render: Render,
    },
}

/// Makes a job's later replies (a VM's create, say, repeats the VM as it is now).
pub(crate) type Render = Box<
    dyn Fn(Value) -> std::pin::Pin<Box<dyn std::future::Future<Output = Value> + Send>>
        + Send
        + Sync,
>;

/// A render that sends the job alone.
pub(crate) fn job_only() -> Render {
    Box::new(|job| Box::pin(async move { json!({ "job": job }) }))
}

/// An error reply.
#[derive(Debug, Serialize)]
pub(crate) struct Failure {
    error: String,
    parameters: Value,
}

impl Failure {
    /// `org.varlink.service.InvalidParameter`.
    pub fn invalid_parameter(name: &str) -> Self {
        Failure {
            error: "org.varlink.service.InvalidParameter".into(),
            parameters: json!({ "parameter": name }),
        }
    }

    /// An error with no parameters.
    fn bare(error: &str) -> Self {
        Failure {
            error: error.into(),
            parameters: json!({}),
        }
    }

    /// `org.varlink.service.MethodNotFound`.
    fn method_not_found(method: &str) -> Self {
        Failure {
            error: "org.varlink.service.MethodNotFound".into(),
            parameters: json!({ "method": method }),
        }
    }

    /// `org.varlink.service.InterfaceNotFound`.
    fn interface_not_found(interface: &str) -> Self {
        Failure {
            error: "org.varlink.service.InterfaceNotFound".into(),
            parameters: json!({ "interface": interface }),
        }
    }

    /// A service error as `io.banger.<interface>.<Kind>`, its message (what went wrong and
    /// what to do) as the `message` parameter.
    pub fn of(interface: &str, e: Error) -> Self {
        let kind = match e.kind() {
            ErrorKind::NotFound => "NotFound",
            ErrorKind::AlreadyExists => "AlreadyExists",
            ErrorKind::InUse => "InUse",
            ErrorKind::InvalidArgument => "InvalidArgument",
            ErrorKind::LimitExceeded => "LimitExceeded",
            ErrorKind::PermissionDenied => "PermissionDenied",
            ErrorKind::Failed => "Failed",
        };
        Failure {
            error: format!("{interface}.{kind}"),
            parameters: json!({ "message": e.full_message() }),
        }
    }
}

/// Answers `call` as `front` serves it.
async fn dispatch(
    ctx: &Ctx,
    caller: &Caller,
    front: &Front,
    call: &Incoming,
    fds: Vec<OwnedFd>,
) -> Result<Answer, Failure> {
    let (interface, method) = call
        .method
        .rsplit_once('.')
        .ok_or_else(|| Failure::method_not_found(&call.method))?;
    let p = Params::new(method, call.params.clone(), fds);
    let answer = match (front, interface) {
        (Front::Banger, service::INTERFACE) => return service::call(method, p, &descriptions()),
        (Front::Machine(_), service::INTERFACE) => {
            return service::call(method, p, &machine_descriptions())
        }
        (Front::Machine(vm), machine_instance::INTERFACE) => {
            return machine_instance::call(ctx, caller, vm, method, p).await
        }
        (Front::Machine(_), _) => return Err(Failure::interface_not_found(interface)),
        (Front::Metrics, service::INTERFACE) => {
            return service::call(method, p, &metrics_descriptions())
        }
        (Front::Metrics, metrics::INTERFACE) => metrics::call(ctx, method, p).await,
        (Front::Metrics, _) => return Err(Failure::interface_not_found(interface)),
        (Front::Banger, images::INTERFACE) => images::call(ctx, caller, method, p).await,
        (Front::Banger, kernels::INTERFACE) => kernels::call(ctx, caller, method, p).await,
        (Front::Banger, vms::INTERFACE) => vms::call(ctx, caller, method, p).await,
        (Front::Banger, jobs::INTERFACE) => jobs::call(ctx, caller, method, p).await,
        (Front::Banger, machine_control::INTERFACE) => {
            machine_control::call(ctx, caller, method, p).await
        }
        (Front::Banger, _) => return Err(Failure::interface_not_found(interface)),
    };
    answer.map_err(|e| e.into_failure(interface))
}

/// What an interface's method fails with: a service error, or a Varlink one as it is.
#[derive(Debug)]
pub(crate) enum Fail {
    Service(Error),
    Varlink(Failure),
}

impl From<Error> for Fail {
    fn from(e: Error) -> Self {
        Fail::Service(e)
    }
}

impl From<Failure> for Fail {
    fn from(e: Failure) -> Self {
        Fail::Varlink(e)
    }
}

impl Fail {
    fn into_failure(self, interface: &str) -> Failure {
        match self {
            Fail::Service(e) => Failure::of(interface, e),
            Fail::Varlink(f) => f,
        }
    }
}

/// `MethodNotFound` for `interface.method`.
pub(crate) fn no_method(interface: &str, method: &str) -> Fail {
    Fail::Varlink(Failure::method_not_found(&format!("{interface}.{method}")))
}

async fn send(
    conn: &mut Connection<Bounded>,
    call: &Incoming,
    answer: Result<Value, Failure>,
    continues: bool,
) -> zlink::Result<()> {
    send_with(conn, call, answer, continues, Vec::new()).await
}

/// Sends a reply (or error) with `fds` beside it, unless the call was one-way.
async fn send_with(
    conn: &mut Connection<Bounded>,
    call: &Incoming,
    answer: Result<Value, Failure>,
    continues: bool,
    fds: Vec<OwnedFd>,
) -> zlink::Result<()> {
    if call.oneway {
        return Ok(());
    }
    match answer {
        Ok(v) => {
            let params = match v {
                Value::Object(m) if m.is_empty() => None,
                v => Some(v),
            };
            let reply = Reply::new(params).set_continues(continues.then_some(true));
            conn.send_reply(&reply, fds).await
        }
        Err(e) => conn.send_error(&e, fds).await,
    }
}

/// Sends `first`, and, when the caller asked for more, a reply per event of `job` until it
/// ends: the last reply is the finished job, or its error.
async fn follow(
    conn: &mut Connection<Bounded>,
    call: &Incoming,
    first: Value,
    job: Arc<Job>,
    mut events: tokio::sync::broadcast::Receiver<JobEvent>,
    render: Render,
) -> zlink::Result<()> {
    use tokio::sync::broadcast::error::RecvError;
    if !call.more {
        return send(conn, call, Ok(first), false).await;
    }
    send(conn, call, Ok(first), true).await?;
    loop {
        let event = match events.recv().await {
            Ok(e) if event_job(&e) == job.id => e,
            Ok(_) => continue,
            // Missed events: what the job is now still tells the caller where it stands.
            Err(RecvError::Lagged(_)) => {
                let s = job.status();
                if s.state == JobState::Running {
                    let v = render(job_view(&job, None)).await;
                    send(conn, call, Ok(v), true).await?;
                    continue;
                }
                JobEvent::Finished {
                    id: job.id,
                    state: s.state,
                    error: s.error,
                }
            }
            Err(RecvError::Closed) => JobEvent::Finished {
                id: job.id,
                state: JobState::Failed,
                error: "the daemon is stopping".into(),
            },
        };
        match event {
            JobEvent::StageChanged { message, .. } => {
                let v = render(job_view(&job, Some(&message))).await;
                send(conn, call, Ok(v), true).await?;
            }
            JobEvent::Progress { .. } => {
                let v = render(job_view(&job, None)).await;
                send(conn, call, Ok(v), true).await?;
            }
            JobEvent::Log { priority, line, .. } => {
                let mut v = render(job_view(&job, None)).await;
                v["log"] = json!({ "priority": priority, "line": line });
                send(conn, call, Ok(v), true).await?;
            }
            JobEvent::Finished { state, error, .. } => {
                let v = render(job_view(&job, None)).await;
                let answer = match state {
                    JobState::Done => Ok(v),
                    JobState::Canceled => Err(Error::Canceled),
                    _ => Err(Error::failed(
                        format!("Job {} ({} {}) failed", job.id, job.kind, job.target),
                        std::io::Error::other(error),
                    )),
                };
                let interface = call.method.rsplit_once('.').map(|m| m.0).unwrap_or("");
                let answer = answer.map_err(|e| Failure::of(interface, e));
                return send(conn, call, answer, false).await;
            }
            JobEvent::New { .. } => {}
        }
    }
}

fn event_job(e: &JobEvent) -> u32 {
    match e {
        JobEvent::New { id }
        | JobEvent::StageChanged { id, .. }
        | JobEvent::Progress { id, .. }
        | JobEvent::Log { id, .. }
        | JobEvent::Finished { id, .. } => *id,
    }
}

/// A job as Varlink shows it (`io.banger.Jobs.Job`).
pub(crate) fn job_view(job: &Job, message: Option<&str>) -> Value {
    let s = job.status();
    let mut v = json!({
        "id": job.id,
        "kind": job.kind,
        "target": job.target,
        "owner": job.owner_uid,
        "stage": s.stage,
        "progress": s.progress,
        "state": s.state.as_str(),
    });
    if let Some(m) = message {
        v["message"] = json!(m);
    }
    if !s.error.is_empty() {
        v["error"] = json!(s.error);
    }
    v
}

/// Performs `op` whose result is a job, for a call: subscribes to the job's events first, so
/// not one stage is missed, and answers with the job (rendered by `render`).
pub(crate) async fn job_answer<'a>(
    ctx: &Ctx,
    caller: &Caller,
    op: impl std::future::Future<Output = crate::Result<crate::ops::Ready<'a, Arc<Job>>>>,
    render: Render,
) -> Result<Answer, Fail> {
    let events = ctx.banger.jobs.subscribe();
    let job = ctx.perform(caller, op).await?;
    let first = render(job_view(&job, None)).await;
    Ok(Answer::Job {
        first,
        job,
        events,
        render,
    })
}

/// Every interface's description on banger's socket, for `org.varlink.service` (and for
/// the test that checks the README's calls against them).
pub fn descriptions() -> Vec<(&'static str, &'static str)> {
    vec![
        (service::INTERFACE, service::DESCRIPTION),
        (images::INTERFACE, images::DESCRIPTION),
        (kernels::INTERFACE, kernels::DESCRIPTION),
        (vms::INTERFACE, vms::DESCRIPTION),
        (jobs::INTERFACE, jobs::DESCRIPTION),
        (machine_control::INTERFACE, machine_control::DESCRIPTION),
    ]
}

/// The interfaces of the metrics socket.
pub fn metrics_descriptions() -> Vec<(&'static str, &'static str)> {
    vec![
        (service::INTERFACE, service::DESCRIPTION),
        (metrics::INTERFACE, metrics::DESCRIPTION),
    ]
}

/// The interfaces of a VM's control socket.
pub fn machine_descriptions() -> Vec<(&'static str, &'static str)> {
    vec![
        (service::INTERFACE, service::DESCRIPTION),
        (machine_instance::INTERFACE, machine_instance::DESCRIPTION),
    ]
}

/// The socket path for a runtime directory.
pub fn socket_path(runtime_dir: &Path) -> PathBuf {
    crate::layout::varlink_socket(runtime_dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_module_error_is_replied_under_its_kind() {
        let cases = crate::error::one_of_each_module();
        for (e, kind) in cases {
            let text = e.full_message();
            let f = Failure::of("io.banger.VMs", e);
            assert_eq!(f.error, format!("io.banger.VMs.{kind:?}"), "{text}");
            assert_eq!(f.parameters["message"], text.as_str());
        }
    }
}
