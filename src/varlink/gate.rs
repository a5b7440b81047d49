//! How many Varlink connections (banger's socket and the VMs' control sockets together) the
//! daemon holds: per uid and in total, well under its descriptor limit, so that a local user
//! (the sockets are world-open) who opens thousands of connections is refused while everyone
//! else is served, and the daemon keeps the descriptors its VMs' watchers and helpers need.
//! Root's connections are not capped: an administrator is not the load to fend off.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The most connections one uid may hold open.
pub const PER_UID: usize = 32;
/// The most connections of all non-root uids together.
pub const TOTAL: usize = 256;
/// How long a connection may send nothing (between calls) before it is closed.
pub const IDLE: std::time::Duration = std::time::Duration::from_secs(120);

/// The count of open connections.
#[derive(Debug)]
pub struct Gate {
    per_uid: usize,
    total: usize,
    open: Mutex<(usize, HashMap<u32, usize>)>,
}

impl Default for Gate {
    fn default() -> Self {
        Gate::new(PER_UID, TOTAL)
    }
}

/// One admitted connection; dropping it gives its place back.
#[derive(Debug)]
pub struct Pass {
    gate: Option<Arc<Gate>>,
    uid: u32,
}

impl Drop for Pass {
    fn drop(&mut self) {
        if let Some(g) = &self.gate {
            let mut open = g.open.lock().unwrap_or_else(|e| e.into_inner());
            open.0 = open.0.saturating_sub(1);
            if let Some(n) = open.1.get_mut(&self.uid) {
                *n -= 1;
                if *n == 0 {
                    open.1.remove(&self.uid);
                }
            }
        }
    }
}

impl Gate {
    /// A gate of `per_uid` connections a uid and `total` in all.
    pub fn new(per_uid: usize, total: usize) -> Self {
        Gate {
            per_uid,
            total,
            open: Mutex::new((0, HashMap::new())),
        }
    }

    /// Admits a connection of `uid`, or says which cap it hit.
    pub fn admit(self: &Arc<Self>, uid: u32) -> Result<Pass, String> {
        if uid == 0 {
            return Ok(Pass { gate: None, uid });
        }
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let mine = open.1.get(&uid).copied().unwrap_or(0);
        if mine >= self.per_uid {
            return Err(format!(
                "uid {uid} holds {mine} open Varlink connections, the most one user may; close \
                 some (each call can share one connection)"
            ));
        }
        if open.0 >= self.total {
            return Err(format!(
                "banger holds {} open Varlink connections, the most it serves at once; try again \
                 shortly",
                open.0
            ));
        }
        open.0 += 1;
        *open.1.entry(uid).or_default() += 1;
        Ok(Pass {
            gate: Some(self.clone()),
            uid,
        })
    }

    /// Open connections: all, and `uid`'s.
    pub fn count(&self, uid: u32) -> (usize, usize) {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        (open.0, open.1.get(&uid).copied().unwrap_or(0))
    }
}

/// Refuses a connection the gate did not admit: one Varlink error reply (as if to its first
/// call), written without waiting, then the connection is closed.
pub fn refuse(stream: &tokio::net::UnixStream, why: &str) {
    let reply = serde_json::json!({
        "error": "io.banger.LimitExceeded",
        "parameters": { "message": why },
    });
    let mut bytes = reply.to_string().into_bytes();
    bytes.push(0);
    let _ = stream.try_write(&bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_uid_and_the_whole_are_capped_and_places_come_back() {
        let g = Arc::new(Gate::new(2, 3));
        let a1 = g.admit(1000).unwrap();
        let _a2 = g.admit(1000).unwrap();
        assert!(g.admit(1000).unwrap_err().contains("the most one user may"));
        let _b1 = g.admit(1001).unwrap();
        assert!(g.admit(1002).unwrap_err().contains("the most it serves"));
        // Root is never refused, nor counted.
        let _r = g.admit(0).unwrap();
        assert_eq!(g.count(1000), (3, 2));
        drop(a1);
        assert_eq!(g.count(1000), (2, 1));
        assert!(g.admit(1002).is_ok());
    }
}
