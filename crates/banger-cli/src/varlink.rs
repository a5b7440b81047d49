//! `banger --varlink …`: the verbs over banger's Varlink socket (`io.banger.*`) instead of the
//! system bus, for hosts where no bus runs. The same daemon answers both, with the same
//! operations and the same polkit checks; what differs is how a call travels and that objects
//! are named by their id, not by a D-Bus path. Long operations follow their job through the
//! method's own `more` replies. Verbs this front end does not carry yet say so and name the
//! D-Bus way.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::{json, Value};

use super::Output;

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
    pub(super) label: String,
    /// The socket, for the further connections a verb makes.
    pub(super) socket: PathBuf,
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
    pub(super) async fn call_fd(&mut self, method: &str, params: Value) -> anyhow::Result<OwnedFd> {
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
        // An error once the job was there is the job's failure, not a refused call.
        let ended = ended.map_err(|e| match job.is_null() {
            true => e,
            false => anyhow::Error::new(super::JobFailed(e)),
        });
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
    pub(super) async fn follow_stages(
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
        Some(kind) if f.error.starts_with("io.banger.") && !message.is_empty() => {
            anyhow::Error::new(super::Refused {
                kind: kind.to_owned(),
                message,
            })
        }
        _ => anyhow::anyhow!("{} {}", f.error, f.parameters),
    }
}

/// An absolute path for the daemon, which opens it with the caller's rights.
pub(super) fn absolute(p: &Path) -> anyhow::Result<Value> {
    let abs = std::fs::canonicalize(p).with_context(|| format!("Cannot reach {}", p.display()))?;
    Ok(json!(abs.to_string_lossy()))
}

#[cfg(test)]
mod tests {
    use super::*;

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
        // A verb can tell a refusal's kind, as over D-Bus.
        let exists = explain(f("io.banger.VMs.AlreadyExists", "A VM named x exists"));
        assert_eq!(super::super::refusal(&exists), Some("AlreadyExists"));
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
