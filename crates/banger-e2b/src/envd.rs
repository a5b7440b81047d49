//! envd's API, served from the guest agent: `process.Process` and `filesystem.Filesystem`
//! over Connect, and the HTTP `/files`, `/health` and `/envs`. A command is started into the
//! agent's process table, so it outlives the stream that started it as envd's do; a file
//! operation runs as the request's user (`Authorization: Basic base64("user:")`, else the
//! image's user) with that user's rights only.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use banger_guest::agent::fsop::{self, FsOp};
use banger_guest::agent::{frame, Request as AgentRequest, Tty};
use base64::Engine as _;
use bytes::Bytes;
use http::{Method, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use hyper::Request;
use serde_json::json;

use crate::agent::{self, exit_status};
use crate::connect::{self, Codec, Error};
use crate::http::{self as h, Reply};
use crate::pb::filesystem as fs;
use crate::pb::process as pr;
use crate::Facade;

/// The most a file operation's answer may be (a `list`'s entries).
const MAX_ANSWER: usize = 64 << 20;
/// The longest line a watch takes from the guest.
const MAX_EVENT_LINE: usize = 64 << 10;
/// The most events a polling watcher keeps between two reads.
const MAX_WATCHER_EVENTS: usize = 10_000;
/// The most polling watchers held at once.
const MAX_WATCHERS: usize = 64;
/// The longest a stream goes without a message (a keepalive when nothing else comes).
const MAX_PING: Duration = Duration::from_secs(10);
/// The largest multipart upload (it is read whole); octet-stream uploads stream.
const MAX_MULTIPART: usize = 256 << 20;

/// A polling watcher (`CreateWatcher`): its sandbox, the events seen since the last read,
/// and the task that watches.
pub struct Watcher {
    sandbox: String,
    events: Arc<std::sync::Mutex<(Vec<fs::FilesystemEvent>, Option<String>)>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Who the request acts as: `Authorization: Basic base64("user:")`, else the image's user.
fn user_of<B>(req: &Request<B>) -> Result<Option<String>, String> {
    let Some(v) = req.headers().get("authorization") else {
        return Ok(None);
    };
    let v = v
        .to_str()
        .map_err(|_| "the Authorization header is not text".to_owned())?;
    let Some(b64) = v.strip_prefix("Basic ") else {
        return Ok(None);
    };
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map_err(|_| "the Authorization header is not base64".to_owned())?;
    let text = String::from_utf8(raw).map_err(|_| "the user is not UTF-8".to_owned())?;
    let user = text.split(':').next().unwrap_or_default().to_owned();
    let plain = user
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if user.len() > 64 || !plain {
        return Err(format!("{user:?} is not a user name"));
    }
    Ok((!user.is_empty()).then_some(user))
}

/// Whether the request may reach envd of sandbox `id`: its envd token (`X-Access-Token`), or
/// the user's key.
fn authorized<B>(f: &Facade, id: &str, req: &Request<B>) -> bool {
    let header = |n: &str| req.headers().get(n).and_then(|v| v.to_str().ok());
    if let Some(t) = header("x-access-token") {
        return crate::key::same(t.as_bytes(), f.key.envd_token(id).as_bytes());
    }
    crate::api::authorized(f, req)
}

/// Answers a request to sandbox `id`'s envd.
pub async fn handle(f: &Facade, id: &str, req: Request<Incoming>) -> Reply {
    if !authorized(f, id, &req) {
        return h::error(
            StatusCode::UNAUTHORIZED,
            "missing or wrong access token: send the sandbox's envdAccessToken as X-Access-Token",
        );
    }
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    // Health asks bangerd each time (the SDK asks it to learn whether a sandbox is still
    // there); the rest use what is known of the sandbox.
    if method == Method::GET && path == "/health" {
        return match f.sandbox(id).await {
            Ok(vm) if vm["state"] == "running" => h::status(StatusCode::NO_CONTENT),
            Ok(_) => h::error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("sandbox {id} is not running"),
            ),
            Err(r) => r,
        };
    }
    let env = match f.sandbox_env(id).await {
        Ok(env) => env,
        Err(r) => return r,
    };
    let user = match user_of(&req) {
        Ok(u) => u,
        Err(e) => return h::error(StatusCode::UNAUTHORIZED, e),
    };
    let ctx = Ctx {
        f,
        id: id.to_owned(),
        user,
        env,
    };
    match (&method, path.as_str()) {
        (&Method::GET, "/envs") => {
            let env: HashMap<&str, &str> =
                ctx.env.iter().filter_map(|kv| kv.split_once('=')).collect();
            h::json(StatusCode::OK, &json!(env))
        }
        (&Method::GET, "/files") => download(&ctx, &req).await,
        (&Method::POST, "/files") => upload(&ctx, req).await,
        (&Method::POST, p)
            if p.starts_with("/process.Process/") || p.starts_with("/filesystem.Filesystem/") =>
        {
            rpc(&ctx, req).await
        }
        _ => h::error(
            StatusCode::NOT_FOUND,
            format!("{method} {path} is not part of envd's API as banger serves it"),
        ),
    }
}

/// What a sandbox request acts with.
struct Ctx<'a> {
    f: &'a Facade,
    id: String,
    user: Option<String>,
    /// The sandbox's environment (`envVars`), `KEY=VALUE`.
    env: Vec<String>,
}

impl Ctx<'_> {
    /// A request to the sandbox's agent: its reply (refused → `failed_precondition`) and the
    /// connection.
    async fn agent(
        &self,
        req: &AgentRequest,
    ) -> Result<(banger_guest::agent::Reply, agent::Conn), Error> {
        let stream = self.f.open_agent(&self.id).await.map_err(|e| {
            if e.kind == "NotFound" {
                self.f.forget(&self.id);
                return Error::new("not_found", format!("sandbox {} not found", self.id));
            }
            Error::new("unavailable", e.to_string())
        })?;
        let (reply, conn) = agent::request(stream, req)
            .await
            .map_err(|e| Error::new("unavailable", format!("the sandbox's agent: {e}")))?;
        if !reply.ok {
            let code = if reply.error.starts_with("no process") {
                "not_found"
            } else if reply.error.contains("runs already") {
                "already_exists"
            } else {
                "invalid_argument"
            };
            return Err(Error::new(code, reply.error));
        }
        Ok((reply, conn))
    }

    /// A file operation; its standard output once it succeeded.
    async fn fs(&self, op: FsOp) -> Result<Vec<u8>, Error> {
        let (_, mut conn) = self
            .agent(&AgentRequest::Fs {
                file: op,
                user: self.user.clone(),
            })
            .await?;
        conn.send(frame::STDIN, b"")
            .await
            .map_err(|e| Error::new("unavailable", e.to_string()))?;
        let (out, err, code) = conn
            .collect(MAX_ANSWER)
            .await
            .map_err(|e| Error::new("unavailable", e.to_string()))?;
        if code == fsop::status::OK {
            return Ok(out);
        }
        Err(fs_error(code, &err))
    }

    /// A file operation's entries.
    async fn entries(&self, op: FsOp) -> Result<Vec<fs::EntryInfo>, Error> {
        let out = self.fs(op).await?;
        let r: fsop::FsResult = serde_json::from_slice(&out)
            .map_err(|e| Error::new("internal", format!("the agent's answer: {e}")))?;
        Ok(r.entries.into_iter().map(entry_info).collect())
    }
}

/// A failure whose reason began with `first` (standard error): the rest of the reason and the
/// status, read to the exit frame.
async fn failure(conn: &mut agent::Conn, first: &[u8]) -> Error {
    let mut reason = first.to_vec();
    loop {
        match conn.next().await {
            Ok(Some((frame::STDERR, d))) => {
                if reason.len() < 4096 {
                    reason.extend_from_slice(&d);
                }
            }
            Ok(Some((frame::EXIT, s))) => return fs_error(exit_status(&s), &reason),
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => return fs_error(fsop::status::FAILED, &reason),
        }
    }
}

/// A file operation's failure as Connect's code.
fn fs_error(code: i32, stderr: &[u8]) -> Error {
    let message = String::from_utf8_lossy(stderr).trim().to_owned();
    let code = match code {
        fsop::status::NOT_FOUND => "not_found",
        fsop::status::EXISTS => "already_exists",
        fsop::status::DENIED => "permission_denied",
        fsop::status::INVALID => "invalid_argument",
        // The helper could not run as the user (no such user, say).
        126 | 127 => "invalid_argument",
        _ => "internal",
    };
    Error::new(code, message)
}

/// An agent entry as envd's `EntryInfo`.
fn entry_info(e: fsop::Entry) -> fs::EntryInfo {
    let kind = match e.kind {
        fsop::Kind::File => fs::FileType::File,
        fsop::Kind::Dir => fs::FileType::Directory,
        fsop::Kind::Symlink => fs::FileType::Symlink,
        fsop::Kind::Other => fs::FileType::Unspecified,
    };
    fs::EntryInfo {
        name: e.name,
        r#type: kind as i32,
        path: e.path,
        size: e.size as i64,
        mode: e.mode,
        permissions: e.permissions,
        owner: e.owner,
        group: e.group,
        modified_time: Some(pbjson_types::Timestamp {
            seconds: e.mtime,
            nanos: e.mtime_nsec as i32,
        }),
        symlink_target: e.target,
        metadata: Default::default(),
    }
}

/// A process selector as the agent's (pid, tag).
fn selector(s: Option<pr::ProcessSelector>) -> Result<(Option<u32>, Option<String>), Error> {
    match s.and_then(|s| s.selector) {
        Some(pr::process_selector::Selector::Pid(p)) => Ok((Some(p), None)),
        Some(pr::process_selector::Selector::Tag(t)) => Ok((None, Some(t))),
        None => Err(Error::new(
            "invalid_argument",
            "name the process by pid or tag",
        )),
    }
}

/// A Connect call: its codec and kind checked, its method answered.
async fn rpc(ctx: &Ctx<'_>, req: Request<Incoming>) -> Reply {
    let ct = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let Some((codec, streaming)) = connect::content_type(&ct) else {
        return h::error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("content-type {ct:?}: Connect calls are application/json, application/proto or their connect+ stream forms"),
        );
    };
    // A stream pings at the client's interval, and at least every MAX_PING: a write is how a
    // client that went is noticed (an idle HTTP/1 stream says nothing of it), so its agent
    // connection and task are let go within that.
    let keepalive = Some(
        req.headers()
            .get("keepalive-ping-interval")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|s| *s >= 1)
            .map(Duration::from_secs)
            .unwrap_or(MAX_PING)
            .min(MAX_PING),
    );
    let method = req.uri().path().to_owned();
    let streams = matches!(
        method.as_str(),
        "/process.Process/Start"
            | "/process.Process/Connect"
            | "/process.Process/StreamInput"
            | "/filesystem.Filesystem/WatchDir"
    );
    if streams != streaming {
        let e = Error::new(
            "invalid_argument",
            format!(
                "{method} is {} call",
                if streams { "a stream" } else { "a unary" }
            ),
        );
        return connect::error(codec, streaming, &e);
    }
    let compression = match connect::Compression::of(req.headers(), streaming) {
        Ok(c) => c,
        Err(e) => return connect::error(codec, streaming, &e),
    };
    if method == "/process.Process/StreamInput" {
        return stream_input(ctx, codec, req.into_body(), compression).await;
    }
    let body = match connect::one_message(req.into_body(), streaming, compression).await {
        Ok(b) => b,
        Err(e) => return connect::error(codec, streaming, &e),
    };
    let r = match method.as_str() {
        "/process.Process/Start" => {
            return match start(ctx, codec, &body, keepalive).await {
                Ok(r) => r,
                Err(e) => connect::error(codec, true, &e),
            }
        }
        "/process.Process/Connect" => {
            return match attach(ctx, codec, &body, keepalive).await {
                Ok(r) => r,
                Err(e) => connect::error(codec, true, &e),
            }
        }
        "/filesystem.Filesystem/WatchDir" => {
            return match watch_dir(ctx, codec, &body, keepalive).await {
                Ok(r) => r,
                Err(e) => connect::error(codec, true, &e),
            }
        }
        "/process.Process/List" => list(ctx, codec).await,
        "/process.Process/SendInput" => send_input(ctx, codec, &body).await,
        "/process.Process/SendSignal" => send_signal(ctx, codec, &body).await,
        "/process.Process/CloseStdin" => close_stdin(ctx, codec, &body).await,
        "/process.Process/Update" => update(ctx, codec, &body).await,
        "/filesystem.Filesystem/Stat" => {
            unary(codec, &body, |r: fs::StatRequest| async move {
                let mut e = ctx.entries(FsOp::Stat { path: r.path }).await?;
                Ok(fs::StatResponse { entry: e.pop() })
            })
            .await
        }
        "/filesystem.Filesystem/MakeDir" => {
            unary(codec, &body, |r: fs::MakeDirRequest| async move {
                let mut e = ctx.entries(FsOp::Mkdir { path: r.path }).await?;
                Ok(fs::MakeDirResponse { entry: e.pop() })
            })
            .await
        }
        "/filesystem.Filesystem/Move" => {
            unary(codec, &body, |r: fs::MoveRequest| async move {
                let op = FsOp::Move {
                    from: r.source,
                    to: r.destination,
                };
                let mut e = ctx.entries(op).await?;
                Ok(fs::MoveResponse { entry: e.pop() })
            })
            .await
        }
        "/filesystem.Filesystem/ListDir" => {
            unary(codec, &body, |r: fs::ListDirRequest| async move {
                let op = FsOp::List {
                    path: r.path,
                    depth: r.depth,
                };
                Ok(fs::ListDirResponse {
                    entries: ctx.entries(op).await?,
                })
            })
            .await
        }
        "/filesystem.Filesystem/Remove" => {
            unary(codec, &body, |r: fs::RemoveRequest| async move {
                ctx.fs(FsOp::Remove { path: r.path }).await?;
                Ok(fs::RemoveResponse {})
            })
            .await
        }
        "/filesystem.Filesystem/CreateWatcher" => create_watcher(ctx, codec, &body).await,
        "/filesystem.Filesystem/GetWatcherEvents" => watcher_events(ctx, codec, &body).await,
        "/filesystem.Filesystem/RemoveWatcher" => remove_watcher(ctx, codec, &body).await,
        other => Err(Error::new(
            "unimplemented",
            format!("{other} is not a method of envd's services"),
        )),
    };
    r.unwrap_or_else(|e| connect::error(codec, false, &e))
}

/// A unary call: `body` decoded as `M`, answered with what `answer` makes of it.
async fn unary<M, R, Fut>(
    codec: Codec,
    body: &[u8],
    answer: impl FnOnce(M) -> Fut,
) -> Result<Reply, Error>
where
    M: prost::Message + serde::de::DeserializeOwned + Default,
    R: prost::Message + serde::Serialize,
    Fut: std::future::Future<Output = Result<R, Error>>,
{
    let m: M = connect::decode(codec, body)?;
    Ok(connect::unary(codec, &answer(m).await?))
}

/// A process event as the message a stream sends.
type Wrap = fn(pr::ProcessEvent) -> Box<dyn ProcessMessage>;

/// `StartResponse` and `ConnectResponse`, which carry the same events.
trait ProcessMessage: Send {
    fn encode(&self, codec: Codec) -> Bytes;
}

impl ProcessMessage for pr::StartResponse {
    fn encode(&self, codec: Codec) -> Bytes {
        connect::encode(codec, self)
    }
}

impl ProcessMessage for pr::ConnectResponse {
    fn encode(&self, codec: Codec) -> Bytes {
        connect::encode(codec, self)
    }
}

fn event(e: pr::process_event::Event) -> pr::ProcessEvent {
    pr::ProcessEvent { event: Some(e) }
}

/// Carries a process's frames to a Connect stream until it exits or the client goes (which
/// only detaches: the process runs on). Pings every `keepalive` when asked.
async fn follow(
    mut conn: agent::Conn,
    out: connect::Stream,
    tty: bool,
    keepalive: Option<Duration>,
    wrap: Wrap,
) {
    use pr::process_event::{data_event::Output, DataEvent, EndEvent, Event, KeepAlive};
    let mut tick = tokio::time::interval(keepalive.unwrap_or(Duration::from_secs(3600)));
    tick.tick().await;
    loop {
        let msg = tokio::select! {
            f = conn.next() => match f {
                Ok(Some((frame::STDOUT, d))) => Event::Data(DataEvent {
                    output: Some(if tty { Output::Pty(d.to_vec()) } else { Output::Stdout(d.to_vec()) }),
                }),
                Ok(Some((frame::STDERR, d))) => Event::Data(DataEvent {
                    output: Some(Output::Stderr(d.to_vec())),
                }),
                Ok(Some((frame::EXIT, d))) => {
                    let code = exit_status(&d);
                    let end = Event::End(EndEvent {
                        exit_code: code,
                        exited: true,
                        status: format!("exit status {code}"),
                        error: None,
                    });
                    out.send_raw(wrap(event(end)).encode(out.codec())).await;
                    out.end(None).await;
                    return;
                }
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => {
                    out.end(Some(Error::new("unavailable", "the sandbox's agent ended the stream"))).await;
                    return;
                }
            },
            _ = tick.tick(), if keepalive.is_some() => Event::Keepalive(KeepAlive {}),
            _ = out.closed() => return,
        };
        if !out.send_raw(wrap(event(msg)).encode(out.codec())).await {
            return;
        }
    }
}

async fn start(
    ctx: &Ctx<'_>,
    codec: Codec,
    body: &[u8],
    keepalive: Option<Duration>,
) -> Result<Reply, Error> {
    let r: pr::StartRequest = connect::decode(codec, body)?;
    let p = r
        .process
        .ok_or_else(|| Error::new("invalid_argument", "process is required"))?;
    if p.cmd.is_empty() {
        return Err(Error::new("invalid_argument", "process.cmd is required"));
    }
    let mut argv = vec![p.cmd];
    argv.extend(p.args);
    let mut env = ctx.env.clone();
    let mut extra: Vec<_> = p.envs.into_iter().collect();
    extra.sort();
    env.extend(extra.into_iter().map(|(k, v)| format!("{k}={v}")));
    let tty = r.pty.map(|pty| {
        let size = pty.size.unwrap_or_default();
        Tty {
            rows: size.rows.clamp(1, 1000) as u16,
            cols: size.cols.clamp(1, 1000) as u16,
            ..Default::default()
        }
    });
    let on_tty = tty.is_some();
    let (reply, mut conn) = ctx
        .agent(&AgentRequest::Exec {
            argv,
            env,
            cwd: p.cwd.filter(|c| !c.is_empty()),
            user: ctx.user.clone(),
            tty,
            detach: true,
            tag: r.tag,
            root: None,
            hostname: None,
            rlimits: Vec::new(),
            cgroup: None,
        })
        .await?;
    let pid = reply.pid.unwrap_or_default();
    // envd's default is an open input; the SDK asks for none unless it will write.
    if r.stdin == Some(false) && !on_tty {
        conn.send(frame::STDIN, b"")
            .await
            .map_err(|e| Error::new("unavailable", e.to_string()))?;
    }
    let wrap: Wrap = |e| Box::new(pr::StartResponse { event: Some(e) });
    Ok(stream_process(codec, conn, pid, on_tty, keepalive, wrap))
}

/// A stream of process `pid`'s events: its start (pid), then what [`follow`] carries.
fn stream_process(
    codec: Codec,
    conn: agent::Conn,
    pid: u32,
    tty: bool,
    keepalive: Option<Duration>,
    wrap: Wrap,
) -> Reply {
    let (out, reply) = connect::Stream::open(codec);
    tokio::spawn(async move {
        let start = event(pr::process_event::Event::Start(
            pr::process_event::StartEvent { pid },
        ));
        if out.send_raw(wrap(start).encode(out.codec())).await {
            follow(conn, out, tty, keepalive, wrap).await;
        }
    });
    reply
}

async fn attach(
    ctx: &Ctx<'_>,
    codec: Codec,
    body: &[u8],
    keepalive: Option<Duration>,
) -> Result<Reply, Error> {
    let r: pr::ConnectRequest = connect::decode(codec, body)?;
    let (pid, tag) = selector(r.process)?;
    let procs = ctx
        .agent(&AgentRequest::Procs)
        .await?
        .0
        .procs
        .unwrap_or_default();
    let tty = procs
        .iter()
        .any(|p| (Some(p.pid) == pid || (tag.is_some() && p.tag == tag)) && p.tty);
    let (reply, conn) = ctx.agent(&AgentRequest::Attach { pid, tag }).await?;
    let pid = reply.pid.unwrap_or_default();
    let wrap: Wrap = |e| Box::new(pr::ConnectResponse { event: Some(e) });
    Ok(stream_process(codec, conn, pid, tty, keepalive, wrap))
}

async fn list(ctx: &Ctx<'_>, codec: Codec) -> Result<Reply, Error> {
    let (reply, _) = ctx.agent(&AgentRequest::Procs).await?;
    let processes = reply
        .procs
        .unwrap_or_default()
        .into_iter()
        .map(|p| {
            let mut argv = p.argv.into_iter();
            pr::ProcessInfo {
                config: Some(pr::ProcessConfig {
                    cmd: argv.next().unwrap_or_default(),
                    args: argv.collect(),
                    envs: p
                        .env
                        .iter()
                        .filter_map(|kv| {
                            kv.split_once('=')
                                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                        })
                        .collect(),
                    cwd: (!p.cwd.is_empty()).then_some(p.cwd),
                }),
                pid: p.pid,
                tag: p.tag,
            }
        })
        .collect();
    Ok(connect::unary(codec, &pr::ListResponse { processes }))
}

/// Writes frames to a process's input through the agent and waits until the agent took them
/// all (the connection's end), so calls that follow come after.
async fn to_input(
    ctx: &Ctx<'_>,
    pid: Option<u32>,
    tag: Option<String>,
    frames: &[(u8, Vec<u8>)],
) -> Result<(), Error> {
    let (_, conn) = ctx.agent(&AgentRequest::Input { pid, tag }).await?;
    let (mut rx, mut tx) = conn.split();
    let gone = |e: std::io::Error| Error::new("unavailable", e.to_string());
    for (kind, data) in frames {
        tx.send(*kind, data).await.map_err(gone)?;
    }
    tx.finish().await.map_err(gone)?;
    while rx.next().await.map_err(gone)?.is_some() {}
    Ok(())
}

fn input_bytes(i: Option<pr::ProcessInput>) -> Vec<u8> {
    match i.and_then(|i| i.input) {
        Some(pr::process_input::Input::Stdin(b)) | Some(pr::process_input::Input::Pty(b)) => b,
        None => Vec::new(),
    }
}

async fn send_input(ctx: &Ctx<'_>, codec: Codec, body: &[u8]) -> Result<Reply, Error> {
    let r: pr::SendInputRequest = connect::decode(codec, body)?;
    let (pid, tag) = selector(r.process)?;
    let data = input_bytes(r.input);
    if !data.is_empty() {
        to_input(ctx, pid, tag, &[(frame::STDIN, data)]).await?;
    }
    Ok(connect::unary(codec, &pr::SendInputResponse {}))
}

async fn close_stdin(ctx: &Ctx<'_>, codec: Codec, body: &[u8]) -> Result<Reply, Error> {
    let r: pr::CloseStdinRequest = connect::decode(codec, body)?;
    let (pid, tag) = selector(r.process)?;
    to_input(ctx, pid, tag, &[(frame::STDIN, Vec::new())]).await?;
    Ok(connect::unary(codec, &pr::CloseStdinResponse {}))
}

async fn update(ctx: &Ctx<'_>, codec: Codec, body: &[u8]) -> Result<Reply, Error> {
    let r: pr::UpdateRequest = connect::decode(codec, body)?;
    let (pid, tag) = selector(r.process)?;
    if let Some(size) = r.pty.and_then(|p| p.size) {
        let (rows, cols) = (
            size.rows.clamp(1, 1000) as u16,
            size.cols.clamp(1, 1000) as u16,
        );
        let mut d = rows.to_be_bytes().to_vec();
        d.extend(cols.to_be_bytes());
        to_input(ctx, pid, tag, &[(frame::RESIZE, d)]).await?;
    }
    Ok(connect::unary(codec, &pr::UpdateResponse {}))
}

async fn send_signal(ctx: &Ctx<'_>, codec: Codec, body: &[u8]) -> Result<Reply, Error> {
    let r: pr::SendSignalRequest = connect::decode(codec, body)?;
    let (pid, tag) = selector(r.process)?;
    let signal = match pr::Signal::try_from(r.signal) {
        Ok(pr::Signal::Sigkill) => libc::SIGKILL,
        Ok(pr::Signal::Sigterm) => libc::SIGTERM,
        _ => {
            return Err(Error::new(
                "invalid_argument",
                "signal must be SIGTERM or SIGKILL",
            ))
        }
    };
    ctx.agent(&AgentRequest::Signal { pid, tag, signal })
        .await?;
    Ok(connect::unary(codec, &pr::SendSignalResponse {}))
}

/// `StreamInput`: a client stream whose first message names the process and whose others
/// are its input, in order.
async fn stream_input(
    ctx: &Ctx<'_>,
    codec: Codec,
    body: Incoming,
    compression: connect::Compression,
) -> Reply {
    use pr::stream_input_request::Event;
    let mut incoming = connect::ClientStream::new(body, compression);
    let r = async {
        let first = incoming
            .next()
            .await?
            .ok_or_else(|| Error::new("invalid_argument", "the stream is empty"))?;
        let first: pr::StreamInputRequest = connect::decode(codec, &first)?;
        let Some(Event::Start(start)) = first.event else {
            return Err(Error::new(
                "invalid_argument",
                "the first message must name the process",
            ));
        };
        let (pid, tag) = selector(start.process)?;
        let (_, conn) = ctx.agent(&AgentRequest::Input { pid, tag }).await?;
        let (mut rx, mut tx) = conn.split();
        let gone = |e: std::io::Error| Error::new("unavailable", e.to_string());
        while let Some(m) = incoming.next().await? {
            let m: pr::StreamInputRequest = connect::decode(codec, &m)?;
            if let Some(Event::Data(d)) = m.event {
                let data = input_bytes(d.input);
                if !data.is_empty() {
                    tx.send(frame::STDIN, &data).await.map_err(gone)?;
                }
            }
        }
        tx.finish().await.map_err(gone)?;
        while rx.next().await.map_err(gone)?.is_some() {}
        Ok(())
    }
    .await;
    let (out, reply) = connect::Stream::open(codec);
    tokio::spawn(async move {
        match r {
            Ok(()) => {
                out.send(&pr::StreamInputResponse {}).await;
                out.end(None).await;
            }
            Err(e) => out.end(Some(e)).await,
        }
    });
    reply
}

/// Reads a watch's event lines; `None` at the end.
async fn next_line(conn: &mut agent::Conn, buf: &mut Vec<u8>) -> Result<Option<Vec<u8>>, Error> {
    loop {
        if let Some(i) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=i).collect();
            return Ok(Some(line));
        }
        if buf.len() > MAX_EVENT_LINE {
            return Err(Error::new(
                "internal",
                "the guest sent an event line over the limit",
            ));
        }
        match conn.next().await {
            Ok(Some((frame::STDOUT, d))) => buf.extend_from_slice(&d),
            Ok(Some((frame::EXIT, d))) => {
                let code = exit_status(&d);
                return if code == 0 {
                    Ok(None)
                } else {
                    Err(fs_error(code, b"the watch ended"))
                };
            }
            // The helper's reason comes before its status.
            Ok(Some((frame::STDERR, d))) => return Err(failure(conn, &d).await),
            Ok(Some(_)) => {}
            Ok(None) => return Ok(None),
            Err(e) => return Err(Error::new("unavailable", e.to_string())),
        }
    }
}

fn event_type(kind: &str) -> fs::EventType {
    match kind {
        "create" => fs::EventType::Create,
        "write" => fs::EventType::Write,
        "remove" => fs::EventType::Remove,
        "rename" => fs::EventType::Rename,
        "chmod" => fs::EventType::Chmod,
        _ => fs::EventType::Unspecified,
    }
}

/// Starts a watch: the connection once the guest said the watch is set.
async fn open_watch(
    ctx: &Ctx<'_>,
    path: String,
    recursive: bool,
) -> Result<(agent::Conn, Vec<u8>), Error> {
    let (_, mut conn) = ctx
        .agent(&AgentRequest::Fs {
            file: FsOp::Watch { path, recursive },
            user: ctx.user.clone(),
        })
        .await?;
    let mut buf = Vec::new();
    match next_line(&mut conn, &mut buf).await? {
        Some(_) => Ok((conn, buf)),
        None => Err(Error::new("internal", "the watch ended at once")),
    }
}

fn parse_event(line: &[u8]) -> Result<fs::FilesystemEvent, Error> {
    let e: fsop::FsEvent = serde_json::from_slice(line)
        .map_err(|e| Error::new("internal", format!("a watch event from the guest: {e}")))?;
    Ok(fs::FilesystemEvent {
        name: e.name,
        r#type: event_type(&e.kind) as i32,
        entry: None,
    })
}

async fn watch_dir(
    ctx: &Ctx<'_>,
    codec: Codec,
    body: &[u8],
    keepalive: Option<Duration>,
) -> Result<Reply, Error> {
    use fs::watch_dir_response::{Event, KeepAlive, StartEvent};
    let r: fs::WatchDirRequest = connect::decode(codec, body)?;
    if r.include_entry {
        return Err(Error::new("unimplemented", "include_entry is not served"));
    }
    let (mut conn, mut buf) = open_watch(ctx, r.path, r.recursive).await?;
    let (out, reply) = connect::Stream::open(codec);
    tokio::spawn(async move {
        let send = |e: Event| fs::WatchDirResponse { event: Some(e) };
        if !out.send(&send(Event::Start(StartEvent {}))).await {
            return;
        }
        let mut tick = tokio::time::interval(keepalive.unwrap_or(Duration::from_secs(3600)));
        tick.tick().await;
        loop {
            let msg = tokio::select! {
                l = next_line(&mut conn, &mut buf) => match l.and_then(|l| l.map(|l| parse_event(&l)).transpose()) {
                    Ok(Some(e)) => Event::Filesystem(e),
                    Ok(None) => { out.end(None).await; return; }
                    Err(e) => { out.end(Some(e)).await; return; }
                },
                _ = tick.tick(), if keepalive.is_some() => Event::Keepalive(KeepAlive {}),
                // The client went: dropping the connection ends the guest's watch.
                _ = out.closed() => return,
            };
            if !out.send(&send(msg)).await {
                return;
            }
        }
    });
    Ok(reply)
}

async fn create_watcher(ctx: &Ctx<'_>, codec: Codec, body: &[u8]) -> Result<Reply, Error> {
    let r: fs::CreateWatcherRequest = connect::decode(codec, body)?;
    if r.include_entry {
        return Err(Error::new("unimplemented", "include_entry is not served"));
    }
    if ctx.f.watchers.lock().await.len() >= MAX_WATCHERS {
        return Err(Error::new(
            "resource_exhausted",
            format!("{MAX_WATCHERS} watchers exist; remove one first"),
        ));
    }
    let (mut conn, mut buf) = open_watch(ctx, r.path, r.recursive).await?;
    let events: Arc<std::sync::Mutex<(Vec<fs::FilesystemEvent>, Option<String>)>> =
        Default::default();
    let store = events.clone();
    let task = tokio::spawn(async move {
        loop {
            let got = next_line(&mut conn, &mut buf).await;
            let mut s = store.lock().unwrap_or_else(|p| p.into_inner());
            match got.and_then(|l| l.map(|l| parse_event(&l)).transpose()) {
                Ok(Some(e)) if s.0.len() < MAX_WATCHER_EVENTS => s.0.push(e),
                Ok(Some(_)) => {
                    s.1 = Some(format!(
                        "more than {MAX_WATCHER_EVENTS} events between two reads; the watcher stopped"
                    ));
                    return;
                }
                Ok(None) => {
                    s.1 = Some("the watch ended".into());
                    return;
                }
                Err(e) => {
                    s.1 = Some(e.message);
                    return;
                }
            }
        }
    });
    let id = crate::key::random_hex(12);
    ctx.f.watchers.lock().await.insert(
        id.clone(),
        Watcher {
            sandbox: ctx.id.clone(),
            events,
            task,
        },
    );
    Ok(connect::unary(
        codec,
        &fs::CreateWatcherResponse { watcher_id: id },
    ))
}

async fn watcher_events(ctx: &Ctx<'_>, codec: Codec, body: &[u8]) -> Result<Reply, Error> {
    let r: fs::GetWatcherEventsRequest = connect::decode(codec, body)?;
    let watchers = ctx.f.watchers.lock().await;
    let w = watchers
        .get(&r.watcher_id)
        .filter(|w| w.sandbox == ctx.id)
        .ok_or_else(|| Error::new("not_found", format!("no watcher {}", r.watcher_id)))?;
    let mut s = w.events.lock().unwrap_or_else(|p| p.into_inner());
    if s.0.is_empty() {
        if let Some(e) = &s.1 {
            return Err(Error::new("failed_precondition", e.clone()));
        }
    }
    let events = std::mem::take(&mut s.0);
    Ok(connect::unary(
        codec,
        &fs::GetWatcherEventsResponse { events },
    ))
}

async fn remove_watcher(ctx: &Ctx<'_>, codec: Codec, body: &[u8]) -> Result<Reply, Error> {
    let r: fs::RemoveWatcherRequest = connect::decode(codec, body)?;
    let mut watchers = ctx.f.watchers.lock().await;
    match watchers.get(&r.watcher_id) {
        Some(w) if w.sandbox == ctx.id => {
            watchers.remove(&r.watcher_id);
            Ok(connect::unary(codec, &fs::RemoveWatcherResponse {}))
        }
        _ => Err(Error::new(
            "not_found",
            format!("no watcher {}", r.watcher_id),
        )),
    }
}

/// An HTTP status for a file operation's failure.
fn http_error(e: &Error) -> Reply {
    h::error(e.status(), &e.message)
}

/// The `path` query parameter (required).
fn path_param(query: &[(String, String)]) -> Option<String> {
    query
        .iter()
        .find(|(k, _)| k == "path")
        .map(|(_, v)| v.clone())
        .filter(|p| !p.is_empty())
}

/// A `username` query parameter over the header's user.
fn with_query_user(ctx: &Ctx<'_>, query: &[(String, String)]) -> Result<Option<String>, Reply> {
    match query.iter().find(|(k, _)| k == "username") {
        Some((_, u)) if !u.is_empty() => {
            let plain = u
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
            if u.len() > 64 || !plain {
                return Err(h::error(
                    StatusCode::UNAUTHORIZED,
                    format!("{u:?} is not a user name"),
                ));
            }
            Ok(Some(u.clone()))
        }
        _ => Ok(ctx.user.clone()),
    }
}

/// `GET /files?path=…`: the file's bytes, streamed; its failure (absent, a directory, not
/// the user's to read) before any byte is sent.
async fn download(ctx: &Ctx<'_>, req: &Request<Incoming>) -> Reply {
    let query = h::query(req.uri().query());
    let Some(path) = path_param(&query) else {
        return h::error(StatusCode::BAD_REQUEST, "path is required");
    };
    let user = match with_query_user(ctx, &query) {
        Ok(u) => u,
        Err(r) => return r,
    };
    let opened = ctx
        .agent(&AgentRequest::Fs {
            file: FsOp::Read { path: path.clone() },
            user,
        })
        .await;
    let mut conn = match opened {
        Ok((_, c)) => c,
        Err(e) => return http_error(&e),
    };
    if let Err(e) = conn.send(frame::STDIN, b"").await {
        return h::error(StatusCode::SERVICE_UNAVAILABLE, e);
    }
    // The first frame tells: bytes (or the end of an empty file), or the failure.
    let first = match conn.next().await {
        Ok(Some((frame::STDOUT, d))) => Some(d),
        Ok(Some((frame::EXIT, d))) if exit_status(&d) == 0 => None,
        Ok(Some((frame::STDERR, d))) => return http_error(&failure(&mut conn, &d).await),
        Ok(Some((_, d))) => return http_error(&fs_error(exit_status(&d), b"")),
        Ok(None) | Err(_) => {
            return h::error(
                StatusCode::BAD_GATEWAY,
                "the sandbox's agent ended the stream",
            )
        }
    };
    let (tx, body) = h::channel();
    let name = path.rsplit('/').next().unwrap_or("file").replace('"', "");
    tokio::spawn(async move {
        let Some(first) = first else { return };
        if tx.send(Ok(Frame::data(first))).await.is_err() {
            return;
        }
        loop {
            match conn.next().await {
                Ok(Some((frame::STDOUT, d))) => {
                    if tx.send(Ok(Frame::data(d))).await.is_err() {
                        return;
                    }
                }
                Ok(Some((frame::EXIT, d))) if exit_status(&d) == 0 => return,
                Ok(Some((frame::STDERR, _))) => {}
                _ => {
                    let _ = tx
                        .send(Err(std::io::Error::other(
                            "the file could not be read to its end",
                        )))
                        .await;
                    return;
                }
            }
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/octet-stream")
        .header(
            "content-disposition",
            format!("attachment; filename=\"{name}\""),
        )
        .body(body)
        .expect("a valid reply")
}

/// Writes one file from a body's bytes; its entry as envd's upload answer.
async fn write_file(
    ctx: &Ctx<'_>,
    user: Option<String>,
    path: String,
    mut data: impl FnMut() -> futures_util::future::BoxFuture<'static, Result<Option<Bytes>, String>>,
) -> Result<serde_json::Value, Error> {
    let (_, conn) = ctx
        .agent(&AgentRequest::Fs {
            file: FsOp::Write { path },
            user,
        })
        .await?;
    let (mut rx, mut tx) = conn.split();
    let gone = |e: std::io::Error| Error::new("unavailable", e.to_string());
    // The helper may fail at once (a directory, no right to write): its answer is read while
    // the body is sent, so a refusal is not stuck behind an upload it will never read.
    let reader = tokio::spawn(async move {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        loop {
            match rx.next().await {
                Ok(Some((frame::STDOUT, d))) if out.len() < MAX_ANSWER => out.extend_from_slice(&d),
                Ok(Some((frame::STDERR, d))) if err.len() < 4096 => err.extend_from_slice(&d),
                Ok(Some((frame::EXIT, d))) => return Ok((out, err, exit_status(&d))),
                Ok(Some(_)) => {}
                Ok(None) => return Err(Error::new("unavailable", "the agent ended the stream")),
                Err(e) => return Err(Error::new("unavailable", e.to_string())),
            }
        }
    });
    loop {
        match data().await {
            Ok(Some(chunk)) => {
                if tx.send(frame::STDIN, &chunk).await.is_err() || reader.is_finished() {
                    break;
                }
            }
            Ok(None) => {
                tx.send(frame::STDIN, b"").await.map_err(gone)?;
                break;
            }
            Err(e) => {
                reader.abort();
                return Err(Error::new(
                    "canceled",
                    format!("the upload was cut short: {e}"),
                ));
            }
        }
    }
    let (out, err, code) = reader
        .await
        .map_err(|_| Error::new("internal", "the upload's reader failed"))??;
    if code != fsop::status::OK {
        return Err(fs_error(code, &err));
    }
    let r: fsop::FsResult = serde_json::from_slice(&out)
        .map_err(|e| Error::new("internal", format!("the agent's answer: {e}")))?;
    let e = r
        .entries
        .into_iter()
        .next()
        .ok_or_else(|| Error::new("internal", "the agent named no file"))?;
    Ok(json!({"name": e.name, "type": "file", "path": e.path}))
}

/// `POST /files`: an octet-stream body streamed into `path`, or a multipart form's files
/// (each at `path` when there is one, else at its part's file name).
async fn upload(ctx: &Ctx<'_>, req: Request<Incoming>) -> Reply {
    let query = h::query(req.uri().query());
    let user = match with_query_user(ctx, &query) {
        Ok(u) => u,
        Err(r) => return r,
    };
    if req
        .headers()
        .get("content-encoding")
        .is_some_and(|v| v.as_bytes() != b"identity")
    {
        return h::error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "compressed uploads are not taken; send the file as it is",
        );
    }
    let ct = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    if let Some(boundary) = ct
        .strip_prefix("multipart/form-data")
        .and_then(|rest| {
            rest.split(';')
                .find_map(|p| p.trim().strip_prefix("boundary="))
        })
        .map(|b| b.trim_matches('"').to_owned())
    {
        let body = match h::read(req.into_body(), MAX_MULTIPART).await {
            Ok(b) => b,
            Err(r) => return r,
        };
        let parts = match multipart(&body, &boundary) {
            Ok(p) => p,
            Err(e) => return h::error(StatusCode::BAD_REQUEST, e),
        };
        let single = path_param(&query);
        if single.is_some() && parts.len() > 1 {
            return h::error(
                StatusCode::BAD_REQUEST,
                "path names one file; this form has several",
            );
        }
        let mut written = Vec::new();
        for (filename, data) in parts {
            let Some(path) = single.clone().or(filename) else {
                return h::error(
                    StatusCode::BAD_REQUEST,
                    "a file part needs a file name, or path",
                );
            };
            let mut once = Some(data);
            let r = write_file(ctx, user.clone(), path, move || {
                let next = once.take();
                Box::pin(async move { Ok(next) })
            })
            .await;
            match r {
                Ok(v) => written.push(v),
                Err(e) => return http_error(&e),
            }
        }
        return h::json(StatusCode::OK, &json!(written));
    }
    let Some(path) = path_param(&query) else {
        return h::error(
            StatusCode::BAD_REQUEST,
            "path is required for an octet-stream upload",
        );
    };
    let body = Arc::new(tokio::sync::Mutex::new(req.into_body()));
    let r = write_file(ctx, user, path, move || {
        let body = body.clone();
        Box::pin(async move {
            let mut b = body.lock().await;
            loop {
                match b.frame().await {
                    None => return Ok(None),
                    Some(Err(e)) => return Err(e.to_string()),
                    Some(Ok(f)) => {
                        if let Ok(d) = f.into_data() {
                            if !d.is_empty() {
                                return Ok(Some(d));
                            }
                        }
                    }
                }
            }
        })
    })
    .await;
    match r {
        Ok(v) => h::json(StatusCode::OK, &json!([v])),
        Err(e) => http_error(&e),
    }
}

/// A multipart form's file parts: (file name, bytes).
fn multipart(body: &[u8], boundary: &str) -> Result<Vec<(Option<String>, Bytes)>, String> {
    let delim = format!("--{boundary}");
    let find = |hay: &[u8], needle: &[u8], from: usize| {
        hay[from..]
            .windows(needle.len())
            .position(|w| w == needle)
            .map(|i| i + from)
    };
    let mut parts = Vec::new();
    let mut at = find(body, delim.as_bytes(), 0).ok_or("no multipart boundary in the body")?;
    loop {
        at += delim.len();
        if body[at..].starts_with(b"--") {
            return Ok(parts);
        }
        let head_start = at + 2;
        let head_end = find(body, b"\r\n\r\n", head_start).ok_or("a part without headers")?;
        let head = String::from_utf8_lossy(&body[head_start..head_end]).into_owned();
        let data_start = head_end + 4;
        let next = find(body, format!("\r\n{delim}").as_bytes(), data_start)
            .ok_or("a part without its closing boundary")?;
        let filename = head
            .lines()
            .find(|l| l.to_ascii_lowercase().starts_with("content-disposition"))
            .and_then(|l| {
                l.split(';').find_map(|p| {
                    p.trim()
                        .strip_prefix("filename=")
                        .map(|f| f.trim_matches('"').to_owned())
                })
            });
        parts.push((filename, Bytes::copy_from_slice(&body[data_start..next])));
        at = next + 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multipart_forms_give_their_files() {
        let body = b"--xyz\r\nContent-Disposition: form-data; name=\"file\"; filename=\"/home/user/a.txt\"\r\nContent-Type: application/octet-stream\r\n\r\nhello\r\n--xyz\r\nContent-Disposition: form-data; name=\"file\"; filename=\"b\"\r\n\r\n\r\n--xyz--\r\n";
        let parts = multipart(body, "xyz").unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].0.as_deref(), Some("/home/user/a.txt"));
        assert_eq!(&parts[0].1[..], b"hello");
        assert_eq!(&parts[1].1[..], b"");
        assert!(multipart(b"--xyz\r\nno end", "xyz").is_err());
    }

    #[test]
    fn the_user_comes_from_basic_authorization() {
        let req = |v: &str| {
            Request::builder()
                .header("authorization", v)
                .body(())
                .unwrap()
        };
        assert_eq!(
            user_of(&req("Basic dXNlcjo=")).unwrap(),
            Some("user".into())
        );
        assert_eq!(user_of(&req("Bearer x")).unwrap(), None);
        assert!(
            user_of(&req("Basic Li4vZXRjOg==")).is_err(),
            "../etc: not a name"
        );
        assert_eq!(
            user_of(&Request::builder().body(()).unwrap()).unwrap(),
            None
        );
    }
}
