//! A minimal QMP client: one connection per command, which is all banger needs (status and
//! power-off).

use std::path::Path;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::{Error, Result};

fn err(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Error {
    Error::failed("QMP command failed", e)
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
