//! `banger e2b`: E2B's API served as the calling user (see the `banger-e2b` crate), and the
//! environment that points E2B's SDKs at it.

use std::os::fd::FromRawFd;
use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;

use super::Output;

/// The address the facade listens on unless told otherwise.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:3000";

/// E2B verbs.
#[derive(Debug, Subcommand)]
pub enum E2bCommand {
    /// Serve E2B's API (sandboxes, commands, files, ports) on ADDR as you: every call it
    /// makes to bangerd is yours. Requests need your key (`banger e2b env` prints it).
    Serve {
        /// Where to listen (a systemd socket passed to it is used instead).
        #[arg(long, default_value = DEFAULT_LISTEN, value_name = "ADDR")]
        listen: String,
        /// A sandbox's vCPUs when its request names none.
        #[arg(long, default_value_t = 2)]
        cpu_count: u32,
        /// A sandbox's memory in MiB when its request names none.
        #[arg(long, default_value_t = 512)]
        memory_mb: u32,
    },
    /// Print the environment E2B's SDKs need to use `banger e2b serve`:
    /// eval "$(banger e2b env)"
    Env {
        /// The address `banger e2b serve` listens on.
        #[arg(long, default_value = DEFAULT_LISTEN, value_name = "ADDR")]
        listen: String,
    },
}

/// A listening socket systemd passed (`banger-e2b.socket`), if it is this process's.
fn passed_listener() -> Option<std::net::TcpListener> {
    let pid: u32 = std::env::var("LISTEN_PID").ok()?.parse().ok()?;
    let fds: u32 = std::env::var("LISTEN_FDS").ok()?.parse().ok()?;
    if pid != std::process::id() || fds != 1 {
        return None;
    }
    // SAFETY: systemd passed fd 3 to this process (LISTEN_PID is ours), a listening socket.
    Some(unsafe { std::net::TcpListener::from_raw_fd(3) })
}

/// The name sandboxes' ports are reached under: the listening address, `localhost` for
/// loopback (so `PORT-ID.localhost:3000` resolves to it).
fn domain(addr: std::net::SocketAddr) -> String {
    if addr.ip().is_loopback() {
        format!("localhost:{}", addr.port())
    } else {
        addr.to_string()
    }
}

/// Runs an `e2b` verb; `varlink` is the socket `--varlink` named (else the default).
pub async fn run(out: &Output, c: E2bCommand, varlink: Option<PathBuf>) -> anyhow::Result<()> {
    let key_path = banger_e2b::key::default_path();
    let key = banger_e2b::Key::load_or_create(&key_path)?;
    match c {
        E2bCommand::Env { listen } => {
            let url = format!("http://{listen}");
            if out.json {
                out.object(vec![
                    ("E2B_API_URL", serde_json::json!(url)),
                    ("E2B_SANDBOX_URL", serde_json::json!(url)),
                    ("E2B_API_KEY", serde_json::json!(key.secret())),
                ]);
            } else {
                println!("export E2B_API_URL={url}");
                println!("export E2B_SANDBOX_URL={url}");
                println!("export E2B_API_KEY={}", key.secret());
            }
            Ok(())
        }
        E2bCommand::Serve {
            listen,
            cpu_count,
            memory_mb,
        } => {
            let listener = match passed_listener() {
                Some(l) => l,
                None => std::net::TcpListener::bind(&listen)
                    .with_context(|| format!("Cannot listen on {listen}"))?,
            };
            let addr = listener.local_addr()?;
            let cfg = banger_e2b::Config {
                varlink: varlink.unwrap_or_else(|| PathBuf::from(super::varlink::DEFAULT_SOCKET)),
                domain: domain(addr),
                cpu_count,
                memory_mb,
            };
            eprintln!(
                "banger e2b: E2B's API on http://{addr} for {} (key in {}; `banger e2b env` \
                 points the SDKs here)",
                std::env::var("USER").unwrap_or_else(|_| "you".into()),
                key_path.display()
            );
            banger_e2b::serve(listener, cfg, key).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_named_localhost() {
        assert_eq!(domain("127.0.0.1:3000".parse().unwrap()), "localhost:3000");
        assert_eq!(domain("10.0.0.2:80".parse().unwrap()), "10.0.0.2:80");
    }
}
