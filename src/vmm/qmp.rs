//! A minimal QMP client: one connection per command, which is all banger needs (status and
//! power-off).

use std::path::Path;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use super::error::failed;
use crate::{Error, Result};

fn err(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Error {
    failed("QMP command failed", e)
}

type Lines = tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>;

async fn next(lines: &mut Lines) -> Result<Value> {
    loop {
        let line = lines
            .next_line()
            .await
            .map_err(err)?
            .ok_or_else(|| err("QEMU closed the QMP socket"))?;
        let v: Value = serde_json::from_str(&line).map_err(err)?;
        // Asynchronous events may come first; they are not answers.
        if v.get("event").is_none() {
            return Ok(v);
        }
    }
}

/// Runs one QMP command on the socket and returns its `return` value.
pub async fn execute(socket: &Path, command: &str) -> Result<Value> {
    let s = super::jail::connect_async(socket).map_err(err)?;
    let (r, mut w) = s.into_split();
    let mut lines = BufReader::new(r).lines();
    let greeting = next(&mut lines).await?;
    if greeting.get("QMP").is_none() {
        return Err(err(format!("unexpected QMP greeting {greeting}")));
    }
    for cmd in ["qmp_capabilities", command] {
        let mut msg = json!({ "execute": cmd }).to_string();
        msg.push('\n');
        w.write_all(msg.as_bytes()).await.map_err(err)?;
        let reply = next(&mut lines).await?;
        if let Some(e) = reply.get("error") {
            return Err(err(format!("{cmd}: {e}")));
        }
        if cmd == command {
            return Ok(reply.get("return").cloned().unwrap_or(Value::Null));
        }
    }
    unreachable!("the loop returns on the last command")
}

/// A QMP connection for a sequence of commands, some of which pass a descriptor (`getfd`
/// with the descriptor as `SCM_RIGHTS`): migration to and from a pipe the daemon holds. Blocking;
/// run it off the async workers.
pub struct Session {
    sock: std::os::unix::net::UnixStream,
    reader: std::io::BufReader<std::os::unix::net::UnixStream>,
}

impl Session {
    /// Connects (as [`execute`] does: through the VM's own directory) and negotiates.
    pub fn connect(socket: &Path) -> Result<Self> {
        let sock = super::jail::connect(socket).map_err(err)?;
        let reader = std::io::BufReader::new(sock.try_clone().map_err(err)?);
        let mut s = Session { sock, reader };
        let greeting = s.read()?;
        if greeting.get("QMP").is_none() {
            return Err(err(format!("unexpected QMP greeting {greeting}")));
        }
        s.command("qmp_capabilities", json!({}))?;
        Ok(s)
    }

    fn read(&mut self) -> Result<Value> {
        use std::io::BufRead;
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line).map_err(err)? == 0 {
                return Err(err("QEMU closed the QMP socket"));
            }
            let v: Value = serde_json::from_str(&line).map_err(err)?;
            if v.get("event").is_none() {
                return Ok(v);
            }
        }
    }

    fn answer(&mut self, cmd: &str) -> Result<Value> {
        let reply = self.read()?;
        if let Some(e) = reply.get("error") {
            return Err(err(format!("{cmd}: {e}")));
        }
        Ok(reply.get("return").cloned().unwrap_or(Value::Null))
    }

    /// Runs `cmd` with `args`; returns its `return` value.
    pub fn command(&mut self, cmd: &str, args: Value) -> Result<Value> {
        use std::io::Write;
        let mut msg = json!({ "execute": cmd, "arguments": args }).to_string();
        msg.push('\n');
        self.sock.write_all(msg.as_bytes()).map_err(err)?;
        self.answer(cmd)
    }

    /// Hands QEMU `fd` under `name` (QMP `getfd`).
    pub fn pass_fd(&mut self, name: &str, fd: std::os::fd::BorrowedFd<'_>) -> Result<()> {
        use std::os::fd::AsFd;
        let msg = json!({ "execute": "getfd", "arguments": { "fdname": name } }).to_string() + "\n";
        crate::host::send_with_fd(self.sock.as_fd(), msg.as_bytes(), fd).map_err(err)?;
        self.answer("getfd").map(|_| ())
    }

    /// Waits until the migration in either direction ends; an error names QEMU's reason.
    pub fn wait_migration(&mut self, limit: std::time::Duration) -> Result<()> {
        let deadline = std::time::Instant::now() + limit;
        loop {
            let info = self.command("query-migrate", json!({}))?;
            match info.get("status").and_then(Value::as_str).unwrap_or("") {
                "completed" => return Ok(()),
                "failed" | "cancelled" => {
                    let why = info
                        .get("error-desc")
                        .and_then(Value::as_str)
                        .unwrap_or("no reason given");
                    return Err(err(format!("migration failed: {why}")));
                }
                _ if std::time::Instant::now() > deadline => {
                    let _ = self.command("migrate_cancel", json!({}));
                    return Err(err(format!(
                        "migration did not finish within {} s",
                        limit.as_secs()
                    )));
                }
                _ => std::thread::sleep(std::time::Duration::from_millis(10)),
            }
        }
    }
}
