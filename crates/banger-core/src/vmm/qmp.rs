//! A minimal QMP client: one connection per command, which is all banger needs (status and
//! power-off). The VMM runs a guest, so what it says is bounded: a reply line is at most
//! [`MAX_LINE`] bytes and a command gets [`DEADLINE`] to be answered; past either the command
//! fails (and the caller's stop goes on to kill the VMM) instead of the daemon growing or
//! waiting on a wedged VMM.

use std::path::Path;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use super::error::failed;
use crate::{Error, Result};

fn err(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Error {
    failed("QMP command failed", e)
}

/// The longest QMP line read (QEMU's replies to banger's commands are a few hundred bytes).
pub const MAX_LINE: u64 = 1 << 20;
/// How long one command (with the greeting and negotiation) may take.
pub const DEADLINE: std::time::Duration = std::time::Duration::from_secs(15);
/// At most this many asynchronous events are skipped while waiting for an answer.
const MAX_EVENTS: usize = 1000;

type Lines = BufReader<tokio::net::unix::OwnedReadHalf>;

/// One JSON line of at most [`MAX_LINE`] bytes.
fn parse_line(line: &[u8]) -> Result<Value> {
    if line.last() != Some(&b'\n') {
        return Err(if line.is_empty() {
            err("QEMU closed the QMP socket")
        } else {
            err(format!("QEMU sent a QMP line over {MAX_LINE} bytes"))
        });
    }
    serde_json::from_slice(line).map_err(err)
}

async fn next(lines: &mut Lines) -> Result<Value> {
    use tokio::io::AsyncReadExt;
    for _ in 0..MAX_EVENTS {
        let mut line = Vec::new();
        (&mut *lines)
            .take(MAX_LINE)
            .read_until(b'\n', &mut line)
            .await
            .map_err(err)?;
        let v = parse_line(&line)?;
        // Asynchronous events may come first; they are not answers.
        if v.get("event").is_none() {
            return Ok(v);
        }
    }
    Err(err(format!("QEMU sent {MAX_EVENTS} events and no answer")))
}

/// Runs one QMP command on the socket and returns its `return` value, within [`DEADLINE`].
pub async fn execute(socket: &Path, command: &str) -> Result<Value> {
    tokio::time::timeout(DEADLINE, execute_now(socket, command))
        .await
        .map_err(|_| {
            err(format!(
                "QEMU did not answer {command} within {} s",
                DEADLINE.as_secs()
            ))
        })?
}

async fn execute_now(socket: &Path, command: &str) -> Result<Value> {
    let s = super::jail::connect_async(socket).map_err(err)?;
    let (r, mut w) = s.into_split();
    let mut lines = BufReader::new(r);
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
        // Each read waits at most the command deadline: a VMM that stops answering fails
        // the operation instead of holding it (and the VM's lock) forever.
        sock.set_read_timeout(Some(DEADLINE)).map_err(err)?;
        sock.set_write_timeout(Some(DEADLINE)).map_err(err)?;
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
        use std::io::{BufRead, Read};
        for _ in 0..MAX_EVENTS {
            let mut line = Vec::new();
            (&mut self.reader)
                .take(MAX_LINE)
                .read_until(b'\n', &mut line)
                .map_err(err)?;
            let v = parse_line(&line)?;
            if v.get("event").is_none() {
                return Ok(v);
            }
        }
        Err(err(format!("QEMU sent {MAX_EVENTS} events and no answer")))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A "QEMU" that greets, then streams one line without end: the command fails at the
    /// line bound instead of growing the daemon.
    #[tokio::test]
    async fn an_endless_line_fails_the_command_at_its_bound() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("qmp.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let _ = s.write_all(b"{\"QMP\": {}}\n").await;
            let chunk = vec![b'x'; 64 * 1024];
            // Up to twice the bound, then hold the connection open.
            for _ in 0..(2 * MAX_LINE as usize / chunk.len()) {
                if s.write_all(&chunk).await.is_err() {
                    return;
                }
            }
            tokio::time::sleep(std::time::Duration::from_secs(30)).await;
        });
        let e = execute(&path, "query-status").await.unwrap_err();
        assert!(e.full_message().contains("over 1048576 bytes"), "{e}");
        server.abort();
    }
}
