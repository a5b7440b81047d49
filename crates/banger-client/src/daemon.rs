//! bangerd, reached as the calling user over banger's Varlink socket: every call is
//! that user's, checked by polkit and by owner exactly as the CLI's are.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

/// A refusal or failure of the daemon's: its kind (`NotFound`, `InvalidArgument`, …) and
/// message.
#[derive(Debug, Clone)]
pub struct Fault {
    /// The error's last name part (`io.banger.VMs.NotFound` → `NotFound`).
    pub kind: String,
    /// What it says.
    pub message: String,
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.message.is_empty() {
            write!(f, "{}", self.kind)
        } else {
            write!(f, "{}", self.message)
        }
    }
}

impl Fault {
    /// A failure on this side (the socket, the stream), as `Unavailable`.
    pub fn local(message: impl Into<String>) -> Fault {
        Fault {
            kind: "Unavailable".into(),
            message: message.into(),
        }
    }
}

#[derive(Debug, serde::Serialize)]
struct Method<'a> {
    method: &'a str,
    parameters: Value,
}

#[derive(Debug, serde::Deserialize)]
struct Error {
    error: String,
    #[serde(default)]
    parameters: Value,
}

/// banger's Varlink socket.
#[derive(Debug, Clone)]
pub struct Daemon {
    socket: PathBuf,
}

type Conn = zlink::tokio::unix::Connection;

impl Daemon {
    /// The daemon at `socket`.
    pub fn new(socket: &Path) -> Daemon {
        Daemon {
            socket: socket.to_owned(),
        }
    }

    async fn connect(&self) -> Result<Conn, Fault> {
        zlink::tokio::unix::connect(&self.socket)
            .await
            .map_err(|e| {
                Fault::local(format!(
                    "cannot reach bangerd's Varlink socket {}: {e}",
                    self.socket.display()
                ))
            })
    }

    async fn send(conn: &mut Conn, method: &str, params: Value, more: bool) -> Result<(), Fault> {
        let call = zlink::Call::new(Method {
            method,
            parameters: params,
        })
        .set_more(more);
        conn.send_call(&call, Vec::new())
            .await
            .map_err(|e| Fault::local(format!("cannot call {method}: {e}")))
    }

    async fn receive(conn: &mut Conn, method: &str) -> Result<(Value, bool, Vec<OwnedFd>), Fault> {
        let (reply, fds) = conn
            .receive_reply::<Value, Error>()
            .await
            .map_err(|e| Fault::local(format!("{method}: {e}")))?;
        match reply {
            Ok(r) => {
                let more = r.continues().unwrap_or(false);
                Ok((r.into_parameters().unwrap_or_else(|| json!({})), more, fds))
            }
            Err(e) => Err(Fault {
                kind: e
                    .error
                    .rsplit_once('.')
                    .map(|(_, k)| k.to_owned())
                    .unwrap_or(e.error.clone()),
                message: e.parameters["message"]
                    .as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| e.error.clone()),
            }),
        }
    }

    /// Calls `method` (`io.banger.VMs.Get`) and returns its reply's parameters.
    pub async fn call(&self, method: &str, params: Value) -> Result<Value, Fault> {
        let mut conn = self.connect().await?;
        Self::send(&mut conn, method, params, false).await?;
        Ok(Self::receive(&mut conn, method).await?.0)
    }

    /// Calls a method that answers with a job and follows it to its end (its last reply).
    pub async fn follow(&self, method: &str, params: Value) -> Result<Value, Fault> {
        let mut conn = self.connect().await?;
        Self::send(&mut conn, method, params, true).await?;
        loop {
            let (params, more, _) = Self::receive(&mut conn, method).await?;
            if !more {
                return Ok(params);
            }
        }
    }

    /// Calls a method that answers with a descriptor.
    pub async fn call_fd(&self, method: &str, params: Value) -> Result<OwnedFd, Fault> {
        let mut conn = self.connect().await?;
        Self::send(&mut conn, method, params, false).await?;
        Self::receive(&mut conn, method)
            .await?
            .2
            .into_iter()
            .next()
            .ok_or_else(|| Fault::local(format!("{method} answered without a descriptor")))
    }

    /// A VM of the caller's, as `io.banger.VMs.VM`.
    pub async fn vm(&self, name: &str) -> Result<Value, Fault> {
        Ok(self
            .call("io.banger.VMs.Get", json!({ "name": name }))
            .await?["vm"]
            .take())
    }

    /// A stream to VM `name`'s guest agent.
    pub async fn agent(&self, name: &str) -> Result<tokio::net::UnixStream, Fault> {
        let fd = self
            .call_fd("io.banger.VMs.OpenAgent", json!({ "name": name }))
            .await?;
        let std = std::os::unix::net::UnixStream::from(fd);
        std.set_nonblocking(true)
            .and_then(|_| tokio::net::UnixStream::from_std(std))
            .map_err(|e| Fault::local(format!("agent stream: {e}")))
    }
}
