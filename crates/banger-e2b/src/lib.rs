//! An E2B-compatible API over banger: E2B's SDKs (`pip install e2b`, `npm i e2b`), pointed
//! here by `E2B_API_URL`, `E2B_SANDBOX_URL` and `E2B_API_KEY`, drive banger VMs unmodified.
//!
//! The facade runs as the calling user and holds no privilege: every call it makes to bangerd
//! goes over banger's Varlink socket as that user, so polkit and ownership apply exactly as to
//! the CLI, and what it knows of a sandbox it reads back from bangerd (a sandbox is a VM with
//! the label `e2b.sandbox`; its template, metadata and environment are labels too). One
//! address serves E2B's control plane (REST, [`api`]) and the sandbox side: requests carrying
//! `E2b-Sandbox-Id` and `E2b-Sandbox-Port` (or a `Host` of `PORT-ID.DOMAIN`) go to envd's API
//! for port 49983 ([`envd`], over the guest agent) and to the guest's own port otherwise
//! ([`proxy`]). Every request but `GET /health` needs the user's key, or a sandbox's tokens
//! derived from it ([`key`]).

// A handler's refusal is the reply itself (`Result<_, Reply>`), built where the reason is
// known; replies are returned once per request, so their size does not matter.
#![allow(clippy::result_large_err)]

pub use banger_client::{agent, daemon};
pub mod api;
pub mod connect;
pub mod envd;
pub mod http;
pub mod key;
pub mod proxy;

/// The messages of envd's services, generated from `proto/` at build time.
#[allow(missing_docs, clippy::all)]
pub mod pb {
    /// `process.Process`.
    pub mod process {
        include!(concat!(env!("OUT_DIR"), "/process.rs"));
        include!(concat!(env!("OUT_DIR"), "/process.serde.rs"));
    }
    /// `filesystem.Filesystem`.
    pub mod filesystem {
        include!(concat!(env!("OUT_DIR"), "/filesystem.rs"));
        include!(concat!(env!("OUT_DIR"), "/filesystem.serde.rs"));
    }
}

use std::collections::HashMap;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::Request;

pub use key::Key;

/// The envd version the facade answers as: the SDK turns features on by it. 0.5.7 has
/// default users, stdin control and octet-stream uploads; file metadata (0.6.2) and watch
/// entries (0.6.3) are not served, so the SDK refuses them itself.
pub const ENVD_VERSION: &str = "0.5.7";

/// The port E2B's SDKs reach envd on.
pub const ENVD_PORT: u16 = 49983;

/// The most connections served at once.
pub const MAX_CONNECTIONS: usize = 512;

/// How the facade is set up.
#[derive(Debug, Clone)]
pub struct Config {
    /// bangerd's Varlink socket.
    pub varlink: std::path::PathBuf,
    /// The address clients reach the facade at (`localhost:3000`): replies name it as the
    /// sandboxes' `domain`, so `PORT-ID.DOMAIN` comes back here.
    pub domain: String,
    /// A sandbox's vCPUs when its request names none (E2B's default: 2).
    pub cpu_count: u32,
    /// A sandbox's memory in MiB when its request names none (E2B's default: 512).
    pub memory_mb: u32,
}

/// The facade's state: the daemon, the key, and the polling watchers it holds for clients.
pub struct Facade {
    /// bangerd.
    pub daemon: daemon::Daemon,
    /// The user's key.
    pub key: Key,
    /// See [`Config::domain`].
    pub domain: String,
    /// See [`Config::cpu_count`] and [`Config::memory_mb`].
    pub shape: (u32, u32),
    /// `CreateWatcher`'s watchers, by id.
    pub watchers: tokio::sync::Mutex<HashMap<String, envd::Watcher>>,
    /// Held while the `base` template is built, so concurrent creates build it once.
    pub building: tokio::sync::Mutex<()>,
    /// The sandboxes envd requests reached, with their environment (`KEY=VALUE`): a
    /// sandbox's labels never change, so a command does not wait for bangerd's answer about
    /// it each time; the agent's own open still checks the VM is there and the user's.
    pub known: std::sync::Mutex<HashMap<String, Vec<String>>>,
    /// The snapshots forks are being made from now (not swept while so).
    pub forking: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// Where a request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// E2B's control plane.
    Api,
    /// A sandbox's port.
    Sandbox(String, u16),
}

/// The sandbox and port a request is for, from E2B's headers or a `PORT-ID.DOMAIN` host.
pub fn target<B>(req: &Request<B>) -> Target {
    let header = |n: &str| {
        req.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    if let (Some(id), Some(port)) = (header("e2b-sandbox-id"), header("e2b-sandbox-port")) {
        if let Ok(port) = port.parse() {
            return Target::Sandbox(id, port);
        }
    }
    let host = header("host")
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .unwrap_or_default();
    let first = host.split('.').next().unwrap_or("");
    if host.contains('.') {
        if let Some((port, id)) = first.split_once('-') {
            if let Ok(port) = port.parse() {
                if !id.is_empty() {
                    return Target::Sandbox(id.to_owned(), port);
                }
            }
        }
    }
    Target::Api
}

impl Facade {
    /// The facade over `cfg`'s daemon with `key`.
    pub fn new(cfg: &Config, key: Key) -> Arc<Facade> {
        Arc::new(Facade {
            daemon: daemon::Daemon::new(&cfg.varlink),
            key,
            domain: cfg.domain.clone(),
            shape: (cfg.cpu_count, cfg.memory_mb),
            watchers: Default::default(),
            building: Default::default(),
            known: Default::default(),
            forking: Default::default(),
        })
    }

    /// Answers one request.
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> http::Reply {
        match target(&req) {
            Target::Sandbox(id, ENVD_PORT) => envd::handle(&self, &id, req).await,
            Target::Sandbox(id, port) => proxy::handle(&self, &id, port, req).await,
            Target::Api => api::handle(&self, req).await,
        }
    }
}

/// Serves `listener` until it fails.
pub async fn serve(listener: std::net::TcpListener, cfg: Config, key: Key) -> anyhow::Result<()> {
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let facade = Facade::new(&cfg, key);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tracing::info!("E2B API on {}", listener.local_addr()?);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        // Over the cap a connection waits for a slot rather than being served.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let facade = facade.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let f = facade.clone();
                async move { Ok::<_, std::convert::Infallible>(f.handle(req).await) }
            });
            let mut builder =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            builder
                .http1()
                // A client that ends its side after the request (socat, nc) still gets
                // the answer.
                .half_close(true)
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(30));
            builder
                .http2()
                .timer(hyper_util::rt::TokioTimer::new())
                .keep_alive_interval(std::time::Duration::from_secs(30));
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = builder.serve_connection_with_upgrades(io, service).await;
            drop(slot);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_go_by_e2bs_headers_or_the_host() {
        let req = |host: &str, headers: &[(&str, &str)]| {
            let mut b = Request::builder().uri("/").header("host", host);
            for (k, v) in headers {
                b = b.header(*k, *v);
            }
            b.body(()).unwrap()
        };
        assert_eq!(target(&req("localhost:3000", &[])), Target::Api);
        assert_eq!(
            target(&req(
                "localhost:3000",
                &[("E2b-Sandbox-Id", "iabc"), ("E2b-Sandbox-Port", "49983")]
            )),
            Target::Sandbox("iabc".into(), 49983)
        );
        assert_eq!(
            target(&req("8000-iabc.localhost:3000", &[])),
            Target::Sandbox("iabc".into(), 8000)
        );
        assert_eq!(target(&req("127.0.0.1:3000", &[])), Target::Api);
        assert_eq!(target(&req("api-x.localhost", &[])), Target::Api);
    }
}
