//! `io.banger.MachineControl`: how a VM's control socket reaches the daemon. The VM's relay
//! (see [`super::relay`]), a process of a uid of its own, hands over each connection it
//! accepted; the daemon then serves it as `io.systemd.MachineInstance` for that VM, its
//! caller the connection's own peer. Only the relays' uid (and root) may hand connections
//! over: a socket passed by anyone else could have a privileged process as its peer.

use std::os::fd::OwnedFd;

use serde_json::json;

use super::{Answer, Ctx, Fail, Failure, Params};
use crate::auth::Caller;
use crate::Error;

/// The interface's name.
pub const INTERFACE: &str = "io.banger.MachineControl";

/// Its description.
pub const DESCRIPTION: &str = concat!(
    r#"# How a VM's control socket ($RUNTIME_DIR/machines/banger-<id>, the controlAddress
# machined knows it by) reaches the daemon: the VM's relay hands over each connection it
# accepted, and the daemon serves it as io.systemd.MachineInstance for that VM, asking polkit
# for the connection's own peer. Only the relays' uid may call it.
interface io.banger.MachineControl

# Serves the connection passed as descriptor `connection` as io.systemd.MachineInstance for
# VM `vm` (its id).
method Take(vm: string, connection: int) -> ()
"#,
    errors!()
);

pub(super) async fn call(
    ctx: &Ctx,
    caller: &Caller,
    method: &str,
    mut p: Params,
) -> Result<Answer, Fail> {
    match method {
        "Take" => {
            if caller.uid != 0 && caller.uid != crate::vmm::jail::control_uid() {
                return Err(Fail::Varlink(Failure {
                    error: format!("{INTERFACE}.PermissionDenied"),
                    parameters: json!({
                        "message": format!(
                            "Only a VM's control relay hands connections over, not uid {}; \
                             connect to the VM's control socket instead",
                            caller.uid
                        ),
                    }),
                }));
            }
            let vm: String = p.req("vm")?;
            let connection = p.fd("connection")?;
            p.finish()?;
            let stream = connection_of(connection)?;
            let vm = ctx.banger.vms.get(&vm).await?;
            super::serve_machine(stream, ctx.clone(), vm.id);
            Ok(Answer::One(json!({})))
        }
        m => Err(super::no_method(INTERFACE, m)),
    }
}

/// The passed descriptor as a connection: a connected Unix stream socket whose peer is not
/// this daemon.
fn connection_of(fd: OwnedFd) -> crate::Result<tokio::net::UnixStream> {
    use std::os::fd::AsRawFd;
    let invalid = || {
        Error::InvalidArgument(
            "connection: not a Unix stream socket connected to a process other than the daemon"
                .into(),
        )
    };
    let raw = fd.as_raw_fd();
    let opt = |name| super::sockopt(raw, name);
    if opt(libc::SO_DOMAIN) != Some(libc::AF_UNIX)
        || opt(libc::SO_TYPE) != Some(libc::SOCK_STREAM)
        || opt(libc::SO_ACCEPTCONN) != Some(0)
    {
        return Err(invalid());
    }
    let std = std::os::unix::net::UnixStream::from(fd);
    std.set_nonblocking(true).map_err(|_| invalid())?;
    let stream = tokio::net::UnixStream::from_std(std).map_err(|_| invalid())?;
    // An unconnected socket has no peer (pid 0).
    let peer = stream.peer_cred().ok().and_then(|c| c.pid()).unwrap_or(0);
    if peer <= 0 || peer as u32 == std::process::id() {
        return Err(invalid());
    }
    Ok(stream)
}
