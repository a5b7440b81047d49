//! `io.systemd.MachineInstance`, systemd's interface for controlling one running machine, as
//! each VM's control socket answers it (see [`super::relay`]): `machinectl poweroff`,
//! `terminate`, `pause` and `resume` of a banger VM end here, and `varlinkctl` can call it
//! too. The methods are banger's own operations on that VM, so polkit is asked exactly as
//! for `io.banger.VMs.Stop`, `Pause` and `Resume`; `Describe` is open, as reads are.

use serde_json::json;

use super::{Answer, Failure, Params};
use crate::auth::Caller;
use crate::error::ErrorKind;
use crate::model::VmState;
use crate::ops;
use crate::vms::StopOptions;
use crate::Error;

/// The interface's name.
pub const INTERFACE: &str = "io.systemd.MachineInstance";

/// Its description, as systemd defines it (`src/shared/varlink-io.systemd.MachineInstance.c`).
pub const DESCRIPTION: &str = r#"interface io.systemd.MachineInstance

# Forcefully terminate the machine immediately
method Terminate() -> ()

# Request a clean shutdown of the machine
method PowerOff() -> ()

# Reboot the machine
method Reboot() -> ()

# Pause/freeze the machine
method Pause() -> ()

# Resume a paused machine
method Resume() -> ()

# Query the current status of the machine
method Describe() -> (
  # True iff vCPUs are executing
  running: bool,
  # Backend-specific state string (e.g. 'running', 'paused', 'shutdown'); 'unknown' if unavailable
  status: string
)

# Subscribe to machine events. Returns a stream of events as they occur.
method SubscribeEvents(
  # If specified, only deliver events whose name matches one of these strings; null means all events
  filter: ?[]string
) -> (
  # Name of the event
  event: string,
  # Event-specific payload
  data: ?object
)

# The connection to the machine backend is not available
error NotConnected ()

# The requested operation is not supported
error NotSupported ()
"#;

/// `io.systemd.MachineInstance.<error>` with no parameters.
fn own_error(error: &str) -> Failure {
    Failure::bare(&format!("{INTERFACE}.{error}"))
}

/// A service error as this interface's callers understand it: a refusal is
/// `org.varlink.service.PermissionDenied` (as systemd's services answer one, and machinectl
/// reads as "permission denied"), a VM that is gone `NotConnected`; anything else is banger's
/// own error, whose message says what to do.
fn failure(e: Error) -> Failure {
    match e.kind() {
        ErrorKind::PermissionDenied => Failure::bare("org.varlink.service.PermissionDenied"),
        ErrorKind::NotFound => own_error("NotConnected"),
        _ => Failure::of("io.banger.VMs", e),
    }
}

/// Calls `method` for VM `vm` (its id).
pub(super) async fn call(
    ctx: &super::Ctx,
    caller: &Caller,
    vm: &str,
    method: &str,
    p: Params,
) -> Result<Answer, Failure> {
    let b = &ctx.banger;
    p.finish()?;
    match method {
        "Describe" => {
            let vm = b.vms.get(vm).await.map_err(failure)?;
            Ok(Answer::One(json!({
                "running": vm.state == VmState::Running,
                "status": vm.state.as_str(),
            })))
        }
        "PowerOff" | "Terminate" | "Pause" | "Resume" => {
            let force = method == "Terminate";
            let done = match method {
                "Pause" => ctx.perform(caller, ops::pause_vm(b, caller, vm)).await,
                "Resume" => ctx.perform(caller, ops::resume_vm(b, caller, vm)).await,
                _ => {
                    let opts = StopOptions {
                        force,
                        ..StopOptions::default()
                    };
                    ctx.perform(caller, ops::stop_vm(b, caller, vm, opts)).await
                }
            };
            done.map_err(failure)?;
            Ok(Answer::One(json!({})))
        }
        // A banger VM has no reboot of its own (stop and start it), and its events are
        // the D-Bus signals and io.banger.Jobs.Watch.
        "Reboot" | "SubscribeEvents" => Err(own_error("NotSupported")),
        m => Err(Failure::method_not_found(&format!("{INTERFACE}.{m}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_and_gone_vms_read_as_systemd_clients_expect() {
        let denied = Error::Denied(crate::auth::AuthError::Denied {
            action: crate::auth::Action::VmsManageAny,
        });
        assert_eq!(
            failure(denied).error,
            "org.varlink.service.PermissionDenied"
        );
        let gone = crate::vms::VmError::NotFound("v".into()).into();
        assert_eq!(
            failure(gone).error,
            "io.systemd.MachineInstance.NotConnected"
        );
        let other = Error::InvalidArgument("no".into());
        assert_eq!(failure(other).error, "io.banger.VMs.InvalidArgument");
    }

    #[test]
    fn the_description_names_every_method_systemd_defines() {
        for m in [
            "Terminate",
            "PowerOff",
            "Reboot",
            "Pause",
            "Resume",
            "Describe",
            "SubscribeEvents",
        ] {
            assert!(
                DESCRIPTION.contains(&format!("method {m}(")),
                "{m} is not described"
            );
        }
    }
}
