//! A blocking client of the agent, for the host's helper processes (the link's clock keeper,
//! port forwarders), which run without an async runtime.

use super::{Reply, Request};

/// Blocking: on `s`, a fresh connection to a hybrid socket (the vsock proxy or the agent
/// link), opens the agent's port and sends the request `req` makes once the port is open
/// (a time in it is then current); returns the stream once the agent said ok (after a
/// `Connect`, it carries the guest's port). Each line read is bounded: the guest answers.
pub fn request_blocking(
    mut s: std::os::unix::net::UnixStream,
    req: impl FnOnce() -> Request,
) -> std::io::Result<std::os::unix::net::UnixStream> {
    let mut req = Some(req);
    use std::io::{Read, Write};
    s.write_all(format!("CONNECT {}\n", super::PORT).as_bytes())?;
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    // Two lines: the hybrid socket's `OK …`, then the agent's reply.
    for _ in 0..2 {
        line.clear();
        loop {
            s.read_exact(&mut b)?;
            if b[0] == b'\n' {
                break;
            }
            line.push(b[0]);
            if line.len() > 4096 {
                return Err(std::io::Error::other("reply too long"));
            }
        }
        if let Some(req) = line.starts_with(b"OK ").then(|| req.take()).flatten() {
            let req = serde_json::to_vec(&req()).map_err(std::io::Error::other)?;
            s.write_all(&req)?;
            s.write_all(b"\n")?;
            continue;
        }
        let reply: Reply = serde_json::from_slice(&line).map_err(std::io::Error::other)?;
        if !reply.ok {
            return Err(std::io::Error::other(reply.error));
        }
    }
    Ok(s)
}
