//! A VM's control socket, `$RUNTIME_DIR/machines/banger-<id>`: what machined hands
//! `machinectl` as the machine's `controlAddress` (systemd ≥ 260), where
//! `io.systemd.MachineInstance` (`PowerOff`, `Terminate`, `Pause`, `Resume`, `Describe`) is
//! answered for that VM alone, the way systemd-vmspawn answers it for its VM.
//!
//! The socket must answer for as long as the VM runs, and the daemon exits when idle, so a
//! small process per VM holds it: `banger-vm-helper machine-control`, started beside the VMM,
//! as the relays' own uid (`jail::control_uid`, no VM's) without any capability, seeing none of
//! banger's state. It never reads what a client sends: it hands each accepted connection to the
//! daemon on its own socket (`io.banger.MachineControl.Take`, the connection as a passed
//! descriptor; that call socket-activates a daemon that is not running), and the daemon then
//! serves the connection itself, its caller the connection's own peer (`SO_PEERCRED` of the
//! accepted socket, which the kernel set when the client connected), so polkit decides exactly
//! as for banger's own methods. The daemon takes such connections from that uid (and root)
//! alone: a process of any other uid could pass a socket whose peer is a privileged process,
//! and a relay reads nothing a client sends, so no client can make it pass anything else.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use crate::vms::control::{LISTENING, RELAY_ARG};

/// How long a hand-over may take (a socket-activated daemon starting included).
const HAND_OVER_LIMIT: Duration = Duration::from_secs(30);

/// `banger-vm-helper machine-control SOCKET DAEMON VM_ID`: listens on SOCKET (mode 0666: anyone may
/// ask, polkit decides) and hands every connection to the daemon at DAEMON for VM VM_ID.
/// Returns only the error that stopped it.
pub fn run(args: &[OsString]) -> std::io::Error {
    let [socket, daemon, vm] = args else {
        return std::io::Error::other(
            "usage: banger-vm-helper machine-control SOCKET DAEMON VM_ID",
        );
    };
    let (socket, daemon) = (PathBuf::from(socket), PathBuf::from(daemon));
    let vm = vm.to_string_lossy().into_owned();
    let listener = match listen(&socket) {
        Ok(l) => l,
        Err(e) => return e,
    };
    eprintln!("{LISTENING} on {} for VM {vm}", socket.display());
    loop {
        match listener.accept() {
            Ok((client, _)) => {
                if let Err(e) = hand_over(&daemon, &vm, &client) {
                    eprintln!("machine-control: cannot hand a connection to the daemon: {e}");
                }
                // The daemon has its own copy now (or the client sees the connection close).
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                eprintln!("machine-control: cannot accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Binds and listens under a temporary name, opens the socket to everyone, then renames it
/// to `path` (replacing a stale one): the name exists only once the socket listens.
fn listen(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(format!(".{}", std::process::id()));
    let temporary = PathBuf::from(temporary);
    let _ = std::fs::remove_file(&temporary);
    let listener = UnixListener::bind(&temporary)?;
    std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(0o666))?;
    std::fs::rename(&temporary, path)?;
    Ok(listener)
}

/// The call that hands a connection over: the VM and the index of the passed descriptor.
pub fn take_call(vm: &str) -> serde_json::Value {
    serde_json::json!({
        "method": format!("{}.Take", super::machine_control::INTERFACE),
        "parameters": { "vm": vm, "connection": 0 },
    })
}

/// Hands `client` to the daemon at `daemon` and waits for its answer (an error reply is
/// returned as an error).
fn hand_over(daemon: &Path, vm: &str, client: &UnixStream) -> std::io::Result<()> {
    let conn = UnixStream::connect(daemon)?;
    conn.set_read_timeout(Some(HAND_OVER_LIMIT))?;
    conn.set_write_timeout(Some(HAND_OVER_LIMIT))?;
    let mut msg = take_call(vm).to_string().into_bytes();
    msg.push(0);
    crate::host::send_with_fd(conn.as_fd(), &msg, client.as_fd())?;
    let mut reply = Vec::new();
    BufReader::new(&conn)
        .take(64 * 1024)
        .read_until(0, &mut reply)?;
    if reply.pop() != Some(0) {
        return Err(std::io::Error::other(
            "the daemon hung up without an answer",
        ));
    }
    let reply: serde_json::Value = serde_json::from_slice(&reply)
        .map_err(|e| std::io::Error::other(format!("the daemon's answer is not JSON: {e}")))?;
    match reply.get("error") {
        Some(e) => Err(std::io::Error::other(format!(
            "the daemon refused it: {e} {}",
            reply.get("parameters").unwrap_or(&serde_json::Value::Null)
        ))),
        None => Ok(()),
    }
}
