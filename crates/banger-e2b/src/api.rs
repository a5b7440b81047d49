//! E2B's control plane (`spec/openapi.yml`): sandboxes made, listed, read, paused, resumed,
//! snapshotted, forked and killed, as banger VMs of the facade's user.
//!
//! A sandbox is a VM with the label `e2b.sandbox=1`; its template (`e2b.template`), metadata
//! (`e2b.meta.KEY`), environment (`e2b.env.KEY`) and start (`e2b.started`) are labels, which
//! bangerd shows only to the VM's owner: another user's sandbox reads as absent (404), never
//! as refused. A template is an image's name, or a snapshot's.

use std::collections::BTreeMap;

use http::{Method, StatusCode};
use hyper::body::Incoming;
use hyper::Request;
use serde_json::{json, Value};

use crate::daemon::Fault;
use crate::http::{self as h, Reply};
use crate::Facade;

/// The largest control-plane request body.
const MAX_BODY: usize = 1 << 20;
/// The longest lifetime a sandbox may be given, in seconds (30 days).
pub const MAX_TIMEOUT: u64 = 30 * 24 * 3600;
/// A sandbox's lifetime when the request names none (E2B's default).
pub const DEFAULT_TIMEOUT: u64 = 300;
/// The most sandboxes one fork makes (E2B's limit).
pub const MAX_FORKS: u64 = 100;

/// The label every sandbox carries.
pub const SANDBOX: &str = "e2b.sandbox";
const TEMPLATE: &str = "e2b.template";
const STARTED: &str = "e2b.started";
const META: &str = "e2b.meta.";
const ENV: &str = "e2b.env.";
/// How the snapshots `fork` makes are named.
const FORK: &str = "fork-";
/// Set on a sandbox that resumes by itself when a request reaches it while paused: the
/// lifetime (seconds) it then gets again, the one it was made with.
const AUTO_RESUME: &str = "e2b.autoResume";

/// A daemon fault as E2B's status and body.
pub fn fault(f: &Fault) -> Reply {
    let status = match f.kind.as_str() {
        "NotFound" => StatusCode::NOT_FOUND,
        "InvalidArgument" => StatusCode::BAD_REQUEST,
        "PermissionDenied" => StatusCode::FORBIDDEN,
        "AlreadyExists" | "InUse" => StatusCode::CONFLICT,
        "QuotaExceeded" | "LimitExceeded" => StatusCode::TOO_MANY_REQUESTS,
        "Unavailable" => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    h::error(status, f)
}

/// Whether the request carries the user's key (`X-API-Key`, or `Authorization: Bearer`).
pub fn authorized<B>(f: &Facade, req: &Request<B>) -> bool {
    let header = |n: &str| req.headers().get(n).and_then(|v| v.to_str().ok());
    if let Some(k) = header("x-api-key") {
        return f.key.matches(k);
    }
    matches!(header("authorization").and_then(|a| a.strip_prefix("Bearer ")), Some(k) if f.key.matches(k))
}

/// Seconds since the epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `secs` since the epoch as RFC 3339 (UTC).
pub fn rfc3339(secs: u64) -> String {
    chrono::DateTime::from_timestamp(secs as i64, 0)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// A VM's labels.
fn labels(vm: &Value) -> BTreeMap<String, String> {
    vm["labels"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect()
        })
        .unwrap_or_default()
}

/// The labels under `prefix`, the prefix taken off.
pub fn under(vm: &Value, prefix: &str) -> BTreeMap<String, String> {
    labels(vm)
        .into_iter()
        .filter_map(|(k, v)| k.strip_prefix(prefix).map(|k| (k.to_owned(), v)))
        .collect()
}

/// E2B's state of a VM: `running` (starting or running) or `paused` (paused or stopped).
fn state(vm: &Value) -> &'static str {
    match vm["state"].as_str().unwrap_or_default() {
        "paused" | "stopped" | "stopping" => "paused",
        _ => "running",
    }
}

/// When the VM's sandbox ends, in seconds since the epoch (0: never).
fn end_at(vm: &Value) -> u64 {
    vm["expiresAt"].as_u64().unwrap_or(0) / 1_000_000
}

impl Facade {
    /// A call to bangerd; its refusal as E2B's reply.
    async fn call(&self, method: &str, params: Value) -> Result<Value, Reply> {
        self.daemon
            .call(method, params)
            .await
            .map_err(|e| fault(&e))
    }

    /// A sandbox of the user's: its VM, or 404 (also for a VM that is not a sandbox, or
    /// another user's).
    pub async fn sandbox(&self, id: &str) -> Result<Value, Reply> {
        let missing = || h::error(StatusCode::NOT_FOUND, format!("sandbox {id} not found"));
        match self.daemon.vm(id).await {
            Ok(vm) if labels(&vm).get(SANDBOX).is_some_and(|v| v == "1") => Ok(vm),
            Ok(_) => Err(missing()),
            Err(f) if f.kind == "NotFound" => Err(missing()),
            Err(f) => Err(fault(&f)),
        }
    }

    /// A sandbox's environment (its `envVars`, `KEY=VALUE`), known from an earlier request or
    /// asked of bangerd (404 as [`Self::sandbox`]).
    pub async fn sandbox_env(&self, id: &str) -> Result<Vec<String>, Reply> {
        if let Some(env) = self.known_env(id) {
            return Ok(env);
        }
        let vm = self.sandbox(id).await?;
        let env: Vec<String> = under(&vm, ENV)
            .into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        self.known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_owned(), env.clone());
        Ok(env)
    }

    fn known_env(&self, id: &str) -> Option<Vec<String>> {
        self.known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    /// Forgets what [`Self::sandbox_env`] knew of `id` (it went).
    pub fn forget(&self, id: &str) {
        self.known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    /// What E2B answers for a sandbox made or connected to.
    fn created(&self, vm: &Value) -> Value {
        let id = vm["name"].as_str().unwrap_or_default();
        let template = labels(vm).get(TEMPLATE).cloned().unwrap_or_default();
        json!({
            "templateID": template,
            "alias": template,
            "sandboxID": id,
            "clientID": "banger",
            "envdVersion": crate::ENVD_VERSION,
            "envdAccessToken": self.key.envd_token(id),
            "trafficAccessToken": self.key.traffic_token(id),
            "domain": self.domain,
        })
    }

    /// A sandbox as `GET /sandboxes/{id}` and the lists show it.
    fn detail(&self, vm: &Value) -> Value {
        let id = vm["name"].as_str().unwrap_or_default();
        let l = labels(vm);
        let template = l.get(TEMPLATE).cloned().unwrap_or_default();
        let started = started(vm);
        let end = end_at(vm);
        json!({
            "templateID": template,
            "alias": template,
            "sandboxID": id,
            "clientID": "banger",
            "startedAt": rfc3339(started),
            "endAt": rfc3339(if end == 0 { started + MAX_TIMEOUT } else { end }),
            "envdVersion": crate::ENVD_VERSION,
            "envdAccessToken": self.key.envd_token(id),
            "domain": self.domain,
            "cpuCount": vm["vcpus"],
            "memoryMB": vm["memoryMib"],
            "diskSizeMB": vm["diskSize"].as_u64().unwrap_or(0) >> 20,
            "metadata": under(vm, META),
            "state": state(vm),
            "lifecycle": {
                "autoResume": l.contains_key(AUTO_RESUME),
                "onTimeout": if vm["onExpire"] == "delete" { "kill" } else { "pause" },
            },
        })
    }
}

/// When a sandbox started, seconds since the epoch: its label, else its VM's creation.
fn started(vm: &Value) -> u64 {
    labels(vm)
        .get(STARTED)
        .and_then(|s| s.parse().ok())
        .unwrap_or(vm["createdAt"].as_u64().unwrap_or(0) / 1_000_000)
}

/// Answers a control-plane request.
pub async fn handle(f: &Facade, req: Request<Incoming>) -> Reply {
    let path = req.uri().path().trim_end_matches('/').to_owned();
    let method = req.method().clone();
    if method == Method::GET && path == "/health" {
        return h::json(StatusCode::OK, &json!({"message": "ok"}));
    }
    if !authorized(f, &req) {
        return h::error(
            StatusCode::UNAUTHORIZED,
            "missing or wrong API key: send X-API-Key (`eval \"$(banger e2b env)\"` sets \
             E2B_API_KEY for the SDK)",
        );
    }
    let query = h::query(req.uri().query());
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let body = || async { h::read(req.into_body(), MAX_BODY).await };
    let r = match (&method, parts.as_slice()) {
        (&Method::POST, ["sandboxes"]) | (&Method::POST, ["v2", "sandboxes"]) => {
            match body().await {
                Ok(b) => create(f, &b).await,
                Err(r) => Err(r),
            }
        }
        (&Method::GET, ["v2", "sandboxes"]) => list(f, &query, false).await,
        (&Method::GET, ["sandboxes"]) => list(f, &query, true).await,
        (&Method::GET, ["sandboxes", id]) => get(f, id).await,
        (&Method::DELETE, ["sandboxes", id]) => kill(f, id).await,
        (&Method::POST, ["sandboxes", id, "timeout"]) => match body().await {
            Ok(b) => set_timeout(f, id, &b, "timeout").await,
            Err(r) => Err(r),
        },
        (&Method::POST, ["sandboxes", id, "refreshes"]) => match body().await {
            Ok(b) => set_timeout(f, id, &b, "duration").await,
            Err(r) => Err(r),
        },
        (&Method::POST, ["sandboxes", id, "pause"]) => match body().await {
            Ok(b) => pause(f, id, &b).await,
            Err(r) => Err(r),
        },
        (&Method::POST, ["sandboxes", id, "connect"])
        | (&Method::POST, ["v2", "sandboxes", id, "connect"])
        | (&Method::POST, ["sandboxes", id, "resume"]) => match body().await {
            Ok(b) => connect(f, id, &b).await,
            Err(r) => Err(r),
        },
        (&Method::POST, ["sandboxes", id, "snapshots"]) => match body().await {
            Ok(b) => snapshot(f, id, &b).await,
            Err(r) => Err(r),
        },
        (&Method::GET, ["snapshots"]) => snapshots(f, &query).await,
        (&Method::DELETE, ["templates", id]) => delete_template(f, id).await,
        (&Method::POST, ["sandboxes", id, "fork"]) => match body().await {
            Ok(b) => fork(f, id, &b).await,
            Err(r) => Err(r),
        },
        (&Method::GET, ["sandboxes", id, "logs"])
        | (&Method::GET, ["v2", "sandboxes", id, "logs"]) => {
            logs(f, id, &query, parts[0] == "v2").await
        }
        (&Method::GET, ["sandboxes", id, "metrics"]) => metrics(f, id).await,
        _ => Err(h::error(
            StatusCode::NOT_FOUND,
            format!("{method} {path} is not part of the API banger serves"),
        )),
    };
    r.unwrap_or_else(|e| e)
}

fn bad(message: impl std::fmt::Display) -> Reply {
    h::error(StatusCode::BAD_REQUEST, message)
}

fn parse(body: &[u8]) -> Result<Value, Reply> {
    if body.is_empty() {
        return Ok(json!({}));
    }
    let v: Value =
        serde_json::from_slice(body).map_err(|e| bad(format!("the body is not JSON: {e}")))?;
    if !v.is_object() {
        return Err(bad("the body must be a JSON object"));
    }
    Ok(v)
}

/// A lifetime in seconds from the request, within bounds.
fn timeout_of(v: &Value, key: &str, default: u64) -> Result<u64, Reply> {
    match &v[key] {
        Value::Null => Ok(default),
        t => match t.as_u64() {
            Some(t) if (1..=MAX_TIMEOUT).contains(&t) => Ok(t),
            _ => Err(bad(format!(
                "{key} must be a whole number of seconds from 1 to {MAX_TIMEOUT}, not {t}"
            ))),
        },
    }
}

/// A map of strings from the request.
fn strings(v: &Value, key: &str) -> Result<BTreeMap<String, String>, Reply> {
    match &v[key] {
        Value::Null => Ok(BTreeMap::new()),
        Value::Object(m) => m
            .iter()
            .map(|(k, v)| match v.as_str() {
                Some(s) => Ok((k.clone(), s.to_owned())),
                None => Err(bad(format!("{key}.{k} must be a string"))),
            })
            .collect(),
        other => Err(bad(format!(
            "{key} must be an object of strings, not {other}"
        ))),
    }
}

/// A random sandbox id, E2B's form: `i` and 19 letters and digits.
fn new_id() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let hex = crate::key::random_hex(19);
    let mut id = String::from("i");
    for pair in hex.as_bytes().chunks(2) {
        let b = u8::from_str_radix(std::str::from_utf8(pair).unwrap_or("00"), 16).unwrap_or(0);
        id.push(ALPHABET[b as usize % ALPHABET.len()] as char);
    }
    id
}

/// E2B's default template: built on first use as E2B's is, Debian with these packages and an
/// account `user` (uid 1000, passwordless sudo) that commands, terminals and files default to.
pub const BASE: &str = "base";
/// What `base` has beyond banger's Debian image.
pub const BASE_PACKAGES: &[&str] = &[
    "python3",
    "python3-pip",
    "curl",
    "git",
    "sudo",
    "ca-certificates",
];

/// Builds the `base` template (debootstrap, minutes) unless another request does already.
async fn build_base(f: &Facade) -> Result<(), Reply> {
    let _one = f.building.lock().await;
    match f
        .daemon
        .call("io.banger.Images.Get", json!({"name": BASE}))
        .await
    {
        Ok(_) => return Ok(()),
        Err(e) if e.kind != "NotFound" => return Err(fault(&e)),
        Err(_) => {}
    }
    tracing::info!("building the base template (debootstrap; a few minutes, once)");
    f.daemon
        .follow(
            "io.banger.Images.Build",
            json!({"name": BASE, "packages": BASE_PACKAGES, "user": "user"}),
        )
        .await
        .map(|_| ())
        .map_err(|e| {
            h::error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("the base template could not be built: {e}"),
            )
        })
}

/// The template: an image's name or a snapshot's (404 naming those there are otherwise);
/// `base` is built when it is missing.
async fn template(f: &Facade, name: &str) -> Result<(&'static str, String), Reply> {
    if name.is_empty() {
        return Err(bad(
            "templateID is required: an image's or a snapshot's name",
        ));
    }
    if name == BASE {
        build_base(f).await?;
    }
    for (kind, method) in [
        ("image", "io.banger.Images.Get"),
        ("snapshot", "io.banger.VMs.GetSnapshot"),
    ] {
        match f.daemon.call(method, json!({"name": name})).await {
            Ok(_) => return Ok((kind, name.to_owned())),
            Err(e) if e.kind != "NotFound" => return Err(fault(&e)),
            Err(_) => {}
        }
    }
    let names = |v: Result<Value, Fault>, key: &str| -> Vec<String> {
        v.ok()
            .and_then(|v| v[key].as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter_map(|i| i["name"].as_str().map(str::to_owned))
            .filter(|n| !n.starts_with('.'))
            .collect()
    };
    let mut there = names(
        f.daemon.call("io.banger.Images.List", json!({})).await,
        "images",
    );
    there.extend(names(
        f.daemon
            .call("io.banger.VMs.ListSnapshots", json!({}))
            .await,
        "snapshots",
    ));
    Err(h::error(
        StatusCode::NOT_FOUND,
        format!(
            "template {name:?} not found: a template is an image's or a snapshot's name; there are {}",
            if there.is_empty() { "none".to_owned() } else { there.join(", ") }
        ),
    ))
}

/// Labels from E2B's metadata and environment variables, refused by name when banger's
/// label rules cannot hold them.
fn sandbox_labels(
    template: &str,
    metadata: &BTreeMap<String, String>,
    env: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, Reply> {
    let mut l = BTreeMap::new();
    l.insert(SANDBOX.to_owned(), "1".to_owned());
    l.insert(TEMPLATE.to_owned(), template.to_owned());
    l.insert(STARTED.to_owned(), now().to_string());
    let key_ok = |k: &str| {
        !k.is_empty()
            && k.len() <= 100
            && k.chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-/:".contains(c))
    };
    for (k, v) in metadata {
        if !key_ok(k) {
            return Err(bad(format!(
                "metadata key {k:?}: use up to 100 letters, digits or ._-/: (banger keeps metadata as VM labels)"
            )));
        }
        l.insert(format!("{META}{k}"), v.clone());
    }
    for (k, v) in env {
        if !key_ok(k) || k.contains(['/', ':', '.', '-']) {
            return Err(bad(format!("envVars name {k:?} is not a variable's name")));
        }
        l.insert(format!("{ENV}{k}"), v.clone());
    }
    Ok(l)
}

/// Egress walls from E2B's network settings: `allowOut` CIDRs or addresses become the VM's
/// egress list; `allow_internet_access: false` or `denyOut` of everything leaves it none.
fn egress(body: &Value) -> Result<Option<Vec<String>>, Reply> {
    let list = |key: &str| -> Result<Vec<String>, Reply> {
        match &body["network"][key] {
            Value::Null => Ok(Vec::new()),
            Value::Array(a) => a
                .iter()
                .map(|x| {
                    x.as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| bad(format!("network.{key} must be a list of strings")))
                })
                .collect(),
            _ => Err(bad(format!("network.{key} must be a list of strings"))),
        }
    };
    let allow = list("allowOut")?;
    let deny = list("denyOut")?;
    let everything = |c: &String| c == "0.0.0.0/0" || c == "::/0";
    if let Some(d) = deny.iter().find(|d| !everything(d)) {
        return Err(bad(format!(
            "network.denyOut {d:?}: banger's egress walls list what a sandbox may reach, not what \
             it may not; deny 0.0.0.0/0 and list allowOut instead"
        )));
    }
    let mut out = Vec::new();
    for a in &allow {
        let cidr = if a.contains('/') {
            a.clone()
        } else {
            format!("{a}/32")
        };
        if cidr
            .split('/')
            .next()
            .and_then(|ip| ip.parse::<std::net::Ipv4Addr>().ok())
            .is_none()
        {
            return Err(bad(format!(
                "network.allowOut {a:?}: banger's egress walls take IPv4 addresses and CIDRs, not names"
            )));
        }
        out.push(cidr);
    }
    let no_internet = body["allow_internet_access"] == json!(false) || !deny.is_empty();
    Ok(match (out.is_empty(), no_internet) {
        (false, _) => Some(out),
        // Only an unroutable address: nothing beyond the guest's DNS resolver.
        (true, true) => Some(vec!["0.0.0.0/32".to_owned()]),
        (true, false) => None,
    })
}

async fn create(f: &Facade, body: &[u8]) -> Result<Reply, Reply> {
    let b = parse(body)?;
    for unsupported in ["mcp", "volumeMounts", "iam"] {
        if !b[unsupported].is_null() {
            return Err(bad(format!(
                "{unsupported} is not something banger's sandboxes have"
            )));
        }
    }
    let template_id = b["templateID"].as_str().unwrap_or_default().to_owned();
    let (kind, name) = template(f, &template_id).await?;
    let timeout = timeout_of(&b, "timeout", DEFAULT_TIMEOUT)?;
    let metadata = strings(&b, "metadata")?;
    let env = strings(&b, "envVars")?;
    let mut labels = sandbox_labels(&template_id, &metadata, &env)?;
    // E2B's lifecycle: at the timeout the sandbox is killed, or paused with its memory
    // (banger's pause) or without it (banger's stop: the next connect boots it from its disks).
    let pause = b["autoPause"] == json!(true) || b["lifecycle"]["onTimeout"] == json!("pause");
    let on_expire = match (pause, b["autoPauseMemory"] == json!(false)) {
        (false, _) => "delete",
        (true, false) => "pause",
        (true, true) => "stop",
    };
    if b["autoResume"]["enabled"] == json!(true) {
        if !pause {
            return Err(bad(
                "autoResume needs autoPause: a sandbox killed at its timeout cannot resume",
            ));
        }
        labels.insert(AUTO_RESUME.to_owned(), timeout.to_string());
    }
    let id = new_id();
    let mut params = json!({
        "name": id,
        "labels": labels,
        "timeoutSec": timeout,
        "onExpire": on_expire,
    });
    params[kind] = json!(name);
    for (from, to, default) in [
        ("cpuCount", "vcpus", f.shape.0),
        ("memoryMB", "memoryMib", f.shape.1),
    ] {
        match &b[from] {
            Value::Null if kind == "image" => params[to] = json!(default),
            Value::Null => {}
            v => match v.as_u64() {
                Some(n) if kind == "image" => params[to] = json!(n),
                Some(_) => {
                    return Err(bad(format!(
                        "{from}: a sandbox from a snapshot has the snapshot's"
                    )))
                }
                None => return Err(bad(format!("{from} must be a whole number"))),
            },
        }
    }
    if let Some(e) = egress(&b)? {
        params["egress"] = json!(e);
    }
    // The last reply carries the VM as it is once ready.
    let done = f
        .daemon
        .follow("io.banger.VMs.Create", params)
        .await
        .map_err(|e| fault(&e))?;
    let vm = match &done["vm"] {
        Value::Object(_) => done["vm"].clone(),
        _ => f.daemon.vm(&id).await.map_err(|e| fault(&e))?,
    };
    Ok(h::json(StatusCode::CREATED, &f.created(&vm)))
}

async fn list(f: &Facade, query: &[(String, String)], running_only: bool) -> Result<Reply, Reply> {
    let mut filter = BTreeMap::from([(SANDBOX.to_owned(), "1".to_owned())]);
    let mut states = Vec::new();
    let (mut limit, mut next, mut after, mut desc) = (100usize, None, None, false);
    for (k, v) in query {
        match k.as_str() {
            // metadata=k1=v1&k2=v2, URL-encoded as one parameter.
            // metadata=k1=v1&k2=v2 as one parameter, each key and value quoted inside.
            "metadata" | "query" => {
                for pair in v.split('&').filter(|p| !p.is_empty()) {
                    let (mk, mv) = pair
                        .split_once('=')
                        .ok_or_else(|| bad(format!("metadata filter {pair:?} is not KEY=VALUE")))?;
                    filter.insert(
                        format!("{META}{}", h::percent_decode(mk)),
                        h::percent_decode(mv),
                    );
                }
            }
            "template" => {
                filter.insert(TEMPLATE.to_owned(), v.clone());
            }
            "state" => states.extend(v.split(',').map(str::to_owned)),
            "limit" => {
                limit = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=1000).contains(n))
                    .ok_or_else(|| bad("limit must be between 1 and 1000"))?
            }
            "nextToken" => next = Some(v.clone()),
            "startedAfter" => {
                let t = chrono::DateTime::parse_from_rfc3339(v)
                    .map_err(|e| bad(format!("startedAfter {v:?} is not an RFC 3339 time: {e}")))?;
                after = Some(t.timestamp().max(0) as u64);
            }
            "order" => {
                desc = match v.as_str() {
                    "asc" => false,
                    "desc" => true,
                    o => return Err(bad(format!("order must be asc or desc, not {o:?}"))),
                }
            }
            _ => {}
        }
    }
    if let Some(s) = states.iter().find(|s| *s != "running" && *s != "paused") {
        return Err(bad(format!("state {s:?} is neither running nor paused")));
    }
    let vms = f
        .daemon
        .call("io.banger.VMs.List", json!({ "labels": filter }))
        .await
        .map_err(|e| fault(&e))?;
    let mut vms: Vec<Value> = vms["vms"].as_array().cloned().unwrap_or_default();
    vms.retain(|v| {
        let s = state(v);
        (states.is_empty() || states.iter().any(|x| x == s))
            && (!running_only || s == "running")
            && after.is_none_or(|t| started(v) >= t)
    });
    vms.sort_by_key(|v| (started(v), v["name"].as_str().unwrap_or("").to_owned()));
    if desc {
        vms.reverse();
    }
    if let Some(after) = &next {
        match vms.iter().position(|v| v["name"].as_str() == Some(after)) {
            Some(i) => {
                vms.drain(..=i);
            }
            None => {
                return Err(bad(format!(
                    "nextToken {after:?} is not one this list gave"
                )))
            }
        }
    }
    let more = vms.len() > limit;
    vms.truncate(limit);
    let body: Vec<Value> = vms.iter().map(|v| f.detail(v)).collect();
    let mut reply = h::json(StatusCode::OK, &json!(body));
    if more {
        if let Some(last) = vms.last().and_then(|v| v["name"].as_str()) {
            if let Ok(v) = http::HeaderValue::from_str(last) {
                reply.headers_mut().insert("x-next-token", v);
            }
        }
    }
    Ok(reply)
}

async fn get(f: &Facade, id: &str) -> Result<Reply, Reply> {
    let vm = f.sandbox(id).await?;
    Ok(h::json(StatusCode::OK, &f.detail(&vm)))
}

async fn kill(f: &Facade, id: &str) -> Result<Reply, Reply> {
    f.sandbox(id).await?;
    f.forget(id);
    f.call("io.banger.VMs.Delete", json!({"name": id, "force": true}))
        .await?;
    // Best effort: the sandbox is gone whether or not the sweep could list snapshots.
    let _ = f.sweep_forks().await;
    Ok(h::status(StatusCode::NO_CONTENT))
}

async fn set_timeout(f: &Facade, id: &str, body: &[u8], key: &str) -> Result<Reply, Reply> {
    let b = parse(body)?;
    if key == "timeout" && b[key].is_null() {
        return Err(bad("timeout is required"));
    }
    let t = timeout_of(&b, key, DEFAULT_TIMEOUT)?;
    f.sandbox(id).await?;
    f.call(
        "io.banger.VMs.SetTimeout",
        json!({"name": id, "timeoutSec": t}),
    )
    .await?;
    Ok(h::status(StatusCode::NO_CONTENT))
}

async fn pause(f: &Facade, id: &str, body: &[u8]) -> Result<Reply, Reply> {
    let b = parse(body)?;
    let vm = f.sandbox(id).await?;
    if state(&vm) == "paused" {
        return Err(h::error(
            StatusCode::CONFLICT,
            format!("sandbox {id} is paused already"),
        ));
    }
    // Without memory (E2B's "filesystem" pause) the VM stops; connect boots it again.
    let method = if b["memory"] == json!(false) {
        "io.banger.VMs.Stop"
    } else {
        "io.banger.VMs.Pause"
    };
    f.call(method, json!({"name": id})).await?;
    Ok(h::status(StatusCode::NO_CONTENT))
}

/// Runs a paused or stopped sandbox again (its memory back, or booted from its disks);
/// whether it had to.
async fn wake(f: &Facade, id: &str, vm: &Value) -> Result<bool, Reply> {
    Ok(match vm["state"].as_str().unwrap_or_default() {
        "paused" => {
            f.call("io.banger.VMs.Resume", json!({"name": id})).await?;
            true
        }
        "stopped" | "stopping" => {
            if vm["state"] == "stopping" {
                stopped(f, id).await?;
            }
            f.daemon
                .follow("io.banger.VMs.Start", json!({"name": id}))
                .await
                .map_err(|e| fault(&e))?;
            true
        }
        _ => false,
    })
}

/// Waits (up to a minute) for sandbox `id`, which is stopping (a pause without memory, or its
/// timeout's), to have stopped: bangerd starts a VM again only then.
async fn stopped(f: &Facade, id: &str) -> Result<(), Reply> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let vm = f.sandbox(id).await?;
        if vm["state"] != "stopping" {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(h::error(
                StatusCode::CONFLICT,
                format!("sandbox {id} has been stopping for a minute; try again later"),
            ));
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

impl Facade {
    /// A stream to sandbox `id`'s agent; a sandbox made with `autoResume` that is paused or
    /// stopped is woken first.
    pub async fn open_agent(&self, id: &str) -> Result<tokio::net::UnixStream, Fault> {
        match self.daemon.agent(id).await {
            Err(e) if e.kind == "InvalidArgument" && self.auto_resume(id).await => {
                self.daemon.agent(id).await
            }
            r => r,
        }
    }

    /// For a request that reached sandbox `id` when it did not run: wakes it when it was
    /// made with `autoResume` (E2B's auto-resume); whether it runs now.
    async fn auto_resume(&self, id: &str) -> bool {
        let Ok(vm) = self.sandbox(id).await else {
            return false;
        };
        let Some(timeout) = labels(&vm)
            .get(AUTO_RESUME)
            .and_then(|t| t.parse::<u64>().ok())
        else {
            return false;
        };
        match wake(self, id, &vm).await {
            Ok(true) => {
                tracing::info!(sandbox = id, "Resumed on a request (autoResume)");
                // Its lifetime starts again, as long as it was made with.
                let t = json!({"name": id, "timeoutSec": timeout});
                self.call("io.banger.VMs.SetTimeout", t).await.is_ok()
            }
            _ => false,
        }
    }
}

async fn connect(f: &Facade, id: &str, body: &[u8]) -> Result<Reply, Reply> {
    let b = parse(body)?;
    let vm = f.sandbox(id).await?;
    let resumed = wake(f, id, &vm).await?;
    if !b["timeout"].is_null() {
        let t = timeout_of(&b, "timeout", DEFAULT_TIMEOUT)?;
        f.call(
            "io.banger.VMs.SetTimeout",
            json!({"name": id, "timeoutSec": t}),
        )
        .await?;
    }
    let vm = f.sandbox(id).await?;
    let status = if resumed {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(h::json(status, &f.created(&vm)))
}

/// A snapshot as E2B's `SnapshotInfo`.
fn snapshot_info(name: &str) -> Value {
    json!({"snapshotID": name, "names": [name]})
}

async fn snapshot(f: &Facade, id: &str, body: &[u8]) -> Result<Reply, Reply> {
    let b = parse(body)?;
    f.sandbox(id).await?;
    let name = match &b["name"] {
        Value::Null => format!("snap-{}", &new_id()[1..13]),
        Value::String(s) => s.clone(),
        _ => return Err(bad("name must be a string")),
    };
    f.daemon
        .follow(
            "io.banger.VMs.Snapshot",
            json!({"name": id, "snapshot": name}),
        )
        .await
        .map_err(|e| fault(&e))?;
    Ok(h::json(StatusCode::CREATED, &snapshot_info(&name)))
}

async fn snapshots(f: &Facade, query: &[(String, String)]) -> Result<Reply, Reply> {
    let q = |k: &str| query.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let all = f.sweep_forks().await.map_err(|e| fault(&e))?;
    let of = |name: &str| {
        all["snapshots"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|s| s["name"] == name)
            .and_then(|s| s["vmName"].as_str())
            .unwrap_or_default()
            .to_owned()
    };
    let listed: Vec<Value> = mine(&all)
        .iter()
        .filter(|n| q("sandboxID").is_none_or(|id| of(n) == id))
        .filter(|n| q("name").is_none_or(|w| w == n.as_str()))
        .map(|n| snapshot_info(n))
        .collect();
    Ok(h::json(StatusCode::OK, &json!(listed)))
}

async fn fork(f: &Facade, id: &str, body: &[u8]) -> Result<Reply, Reply> {
    let b = parse(body)?;
    let vm = f.sandbox(id).await?;
    let count = match &b["count"] {
        Value::Null => 1,
        c => c
            .as_u64()
            .filter(|n| (1..=MAX_FORKS).contains(n))
            .ok_or_else(|| bad(format!("count must be between 1 and {MAX_FORKS}")))?,
    };
    let timeout = timeout_of(&b, "timeout", DEFAULT_TIMEOUT)?;
    let snap = format!("{FORK}{}", &new_id()[1..13]);
    f.lock_set(&f.forking).insert(snap.clone());
    let made = f
        .daemon
        .follow(
            "io.banger.VMs.Snapshot",
            json!({"name": id, "snapshot": snap}),
        )
        .await;
    if let Err(e) = made {
        f.lock_set(&f.forking).remove(&snap);
        return Err(fault(&e));
    }
    let template = labels(&vm).get(TEMPLATE).cloned().unwrap_or_default();
    let l = sandbox_labels(&template, &under(&vm, META), &under(&vm, ENV))?;
    let creates = (0..count).map(|_| {
        let child = new_id();
        let params = json!({
            "name": child, "snapshot": snap, "labels": l,
            "timeoutSec": timeout, "onExpire": "delete",
        });
        async move {
            match f.daemon.follow("io.banger.VMs.Create", params).await {
                Ok(_) => match f.daemon.vm(&child).await {
                    Ok(vm) => json!({"sandbox": f.created(&vm)}),
                    Err(e) => json!({"error": {"code": 500, "message": e.to_string()}}),
                },
                Err(e) => json!({"error": {"code": 500, "message": e.to_string()}}),
            }
        }
    });
    let results = futures_util::future::join_all(creates).await;
    f.lock_set(&f.forking).remove(&snap);
    // Gone at once when no fork came of it; else once the last fork goes.
    let _ = f.sweep_forks().await;
    Ok(h::json(StatusCode::CREATED, &json!(results)))
}

impl Facade {
    fn lock_set<'a>(
        &self,
        m: &'a std::sync::Mutex<std::collections::HashSet<String>>,
    ) -> std::sync::MutexGuard<'a, std::collections::HashSet<String>> {
        m.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Deletes the caller's fork snapshots (the ones `fork` makes, an implementation detail
    /// E2B users never asked for) that no VM is made from any more: bangerd refuses those
    /// still in use, which stay. Run on the calls that end or list sandboxes and snapshots;
    /// returns the `ListSnapshots` answer it read, less what it deleted.
    async fn sweep_forks(&self) -> Result<Value, Fault> {
        let mut all = self
            .daemon
            .call("io.banger.VMs.ListSnapshots", json!({}))
            .await?;
        let mut gone = Vec::new();
        for name in mine(&all) {
            if !name.starts_with(FORK) || self.lock_set(&self.forking).contains(&name) {
                continue;
            }
            let deleted = self
                .daemon
                .call("io.banger.VMs.DeleteSnapshot", json!({"name": name}))
                .await;
            if deleted.is_ok() {
                tracing::info!(snapshot = name, "Deleted a fork's snapshot no sandbox uses");
                gone.push(name);
            }
        }
        if let Some(list) = all["snapshots"].as_array_mut() {
            list.retain(|s| !gone.iter().any(|g| s["name"] == g.as_str()));
        }
        Ok(all)
    }
}

/// The caller's snapshots' names in a `ListSnapshots` answer (hidden ones left out).
fn mine(all: &Value) -> Vec<String> {
    // SAFETY: no arguments.
    let me = u64::from(unsafe { libc::geteuid() });
    all["snapshots"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["owner"].as_u64() == Some(me))
        .filter_map(|s| s["name"].as_str())
        .filter(|n| !n.starts_with('.'))
        .map(str::to_owned)
        .collect()
}

/// `DELETE /templates/{id}` (the SDK's `delete_snapshot`): a snapshot of the caller's.
async fn delete_template(f: &Facade, id: &str) -> Result<Reply, Reply> {
    let all = f
        .daemon
        .call("io.banger.VMs.ListSnapshots", json!({}))
        .await
        .map_err(|e| fault(&e))?;
    if !mine(&all).iter().any(|n| n == id) {
        return Err(h::error(
            StatusCode::NOT_FOUND,
            format!("no snapshot {id} of yours (templates banger deletes are snapshots; images are deleted with `banger image delete`)"),
        ));
    }
    f.call("io.banger.VMs.DeleteSnapshot", json!({"name": id}))
        .await?;
    Ok(h::status(StatusCode::NO_CONTENT))
}

/// How many log entries one answer holds at most (E2B's default `limit`).
const MAX_LOG_ENTRIES: usize = 1000;

async fn logs(f: &Facade, id: &str, query: &[(String, String)], v2: bool) -> Result<Reply, Reply> {
    let q = |k: &str| query.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let limit = match q("limit") {
        None => MAX_LOG_ENTRIES,
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|l| (1..=MAX_LOG_ENTRIES).contains(l))
            .ok_or_else(|| {
                bad(format!(
                    "limit must be from 1 to {MAX_LOG_ENTRIES}, not {l}"
                ))
            })?,
    };
    let backward = match q("direction") {
        None | Some("forward") => false,
        Some("backward") => true,
        Some(d) => {
            return Err(bad(format!(
                "direction must be forward or backward, not {d}"
            )))
        }
    };
    // The console's lines carry no level: all are `info`, so asking for warnings or errors
    // only finds none.
    let levels = match q("level") {
        None | Some("debug") | Some("info") => true,
        Some("warn") | Some("error") => false,
        Some(l) => {
            return Err(bad(format!(
                "level must be debug, info, warn or error, not {l}"
            )))
        }
    };
    let search = q("search").unwrap_or_default().to_owned();
    f.sandbox(id).await?;
    let fd = f
        .daemon
        .call_fd("io.banger.VMs.OpenConsole", json!({"name": id}))
        .await
        .map_err(|e| fault(&e))?;
    // The console's last 256 KiB: what the guest printed is bounded like every guest read.
    let text = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Seek, SeekFrom};
        let mut file = std::fs::File::from(fd);
        let len = file.seek(SeekFrom::End(0)).unwrap_or(0);
        let _ = file.seek(SeekFrom::Start(len.saturating_sub(256 << 10)));
        let mut buf = Vec::new();
        let _ = file.take(256 << 10).read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
    .await
    .unwrap_or_default();
    let mut picked: Vec<&str> = text
        .lines()
        .filter(|l| levels && l.contains(search.as_str()))
        .collect();
    if backward {
        picked.reverse();
    } else if !v2 {
        // The first API's answer is the latest lines, oldest first.
        picked.drain(..picked.len().saturating_sub(limit));
    }
    picked.truncate(limit);
    let at = rfc3339(now());
    let entries: Vec<Value> = picked
        .iter()
        .map(|l| json!({"timestamp": at, "level": "info", "message": l, "fields": {}}))
        .collect();
    Ok(h::json(
        StatusCode::OK,
        &if v2 {
            json!({"logs": entries})
        } else {
            let lines: Vec<Value> = picked
                .iter()
                .map(|l| json!({"timestamp": at, "line": l}))
                .collect();
            json!({"logs": lines, "logEntries": entries})
        },
    ))
}

async fn metrics(f: &Facade, id: &str) -> Result<Reply, Reply> {
    let vm = f.sandbox(id).await?;
    if vm["state"] != "running" {
        // Nothing runs, so nothing is used: E2B answers an empty series then.
        return Ok(h::json(StatusCode::OK, &json!([])));
    }
    // What the guest's own kernel counts (the agent's `stats`), as envd reports it.
    let stats = async {
        let stream = f.daemon.agent(id).await.ok()?;
        let (reply, _) = crate::agent::request(stream, &banger_guest::agent::Request::Stats)
            .await
            .ok()?;
        reply.stats
    }
    .await
    .ok_or_else(|| {
        h::error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("sandbox {id}'s agent did not answer for its metrics; try again"),
        )
    })?;
    let now = now();
    Ok(h::json(
        StatusCode::OK,
        &json!([{
            "timestamp": rfc3339(now),
            "timestampUnix": now,
            "cpuCount": stats.cpu_count,
            "cpuUsedPct": stats.cpu_used_pct,
            "memUsed": stats.mem_used,
            "memTotal": stats.mem_total,
            "memCache": stats.mem_cache,
            "diskUsed": stats.disk_used,
            "diskTotal": stats.disk_total,
        }]),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_read_as_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_796_342_400 + 3661), "2026-12-04T01:01:01Z");
    }

    #[test]
    fn network_settings_become_egress_walls_or_a_clear_refusal() {
        assert_eq!(egress(&json!({})).unwrap(), None);
        assert_eq!(
            egress(&json!({"allow_internet_access": false})).unwrap(),
            Some(vec!["0.0.0.0/32".to_owned()])
        );
        assert_eq!(
            egress(&json!({"network": {"allowOut": ["1.2.3.4", "10.0.0.0/8"], "denyOut": ["0.0.0.0/0"]}}))
                .unwrap(),
            Some(vec!["1.2.3.4/32".to_owned(), "10.0.0.0/8".to_owned()])
        );
        assert!(egress(&json!({"network": {"allowOut": ["example.com"]}})).is_err());
        assert!(egress(&json!({"network": {"denyOut": ["8.8.8.8"]}})).is_err());
    }

    #[test]
    fn ids_are_e2bs_form_and_labels_keep_what_banger_can() {
        let id = new_id();
        assert_eq!(id.len(), 20);
        assert!(id.starts_with('i') && id.chars().all(|c| c.is_ascii_alphanumeric()));
        let meta = BTreeMap::from([("user".to_owned(), "a b".to_owned())]);
        let env = BTreeMap::from([("TOKEN".to_owned(), "x".to_owned())]);
        let l = sandbox_labels("base", &meta, &env).unwrap();
        assert_eq!(l["e2b.meta.user"], "a b");
        assert_eq!(l["e2b.env.TOKEN"], "x");
        assert!(
            sandbox_labels("base", &BTreeMap::from([("a b".into(), "".into())]), &env).is_err()
        );
    }
}
