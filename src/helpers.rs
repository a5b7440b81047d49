//! The long-lived helpers beside each VM's VMM: its console logger, its agent link, its
//! machine-control relay and its port forwarder. Each runs for as long as the VM does, as the
//! VM's (or the relays') uid, so every VM pays for their processes: they are a small program
//! of their own, `banger-vm-helper ROLE ARGS…`, and not the daemon's binary, whose relocated
//! read-only data alone (~0.7 MiB, written once by the loader at start) would be private to
//! every helper of every VM (see `vmm::process::helper_program`). `bangerd ROLE ARGS…` runs the
//! same roles, for a daemon of an older release that still asks it to.

use std::ffi::OsString;
use std::process::ExitCode;

/// Runs helper `role` with `args`, or `None` when `role` is none of the helpers'.
pub fn run(role: &str, args: &[OsString]) -> Option<ExitCode> {
    let failed = match role {
        crate::vmm::console::LOGGER_ARG => return Some(console_logger(args)),
        crate::agent::link::HELPER_ARG => return Some(agent_link(args)),
        crate::varlink::relay::RELAY_ARG => crate::varlink::relay::run(args),
        crate::vms::publish::FORWARD_ARG => crate::vms::publish::run_forwarder(args),
        _ => return None,
    };
    eprintln!("banger-vm-helper {role}: {failed}");
    Some(ExitCode::FAILURE)
}

/// `console-logger SOCKET LOG [OUTPUT_LOG]`: one VM's bounded console log, and with
/// `OUTPUT_LOG` its VMM's output, from the listening socket it gets as fd 3;
/// `console-logger - LOG`: a console that comes as a VMM's output on fd 3 (see `vmm::console`).
fn console_logger(args: &[OsString]) -> ExitCode {
    let fd3 = || {
        use std::os::fd::FromRawFd;
        // SAFETY: fd 3 is the listener `bangerd listen` (or the daemon) made for this
        // process, which owns it from here on; it is checked to be a socket before use.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(3) };
        let listener = std::os::unix::net::UnixListener::from(fd);
        listener.local_addr().map(|_| listener)
    };
    let max = crate::vmm::console::MAX_BYTES;
    let done = match args {
        [socket, log] if socket == "-" => {
            fd3().and_then(|l| crate::vmm::console::run_output_logger(l, log.as_ref(), max))
        }
        [socket, log] => crate::vmm::console::run_logger(socket.as_ref(), log.as_ref(), max, None),
        [socket, log, output] if socket != "-" => fd3().and_then(|l| {
            let output = Some((l, std::path::Path::new(output)));
            crate::vmm::console::run_logger(socket.as_ref(), log.as_ref(), max, output)
        }),
        _ => {
            eprintln!("usage: banger-vm-helper console-logger SOCKET|- LOG [OUTPUT_LOG]");
            return ExitCode::from(2);
        }
    };
    match done {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("banger-vm-helper console-logger: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `agent-link VMM_SOCKET CLIENT_SOCKET`: one VM's agent channel (see `agent::link`).
fn agent_link(args: &[OsString]) -> ExitCode {
    let [vmm, clients] = args else {
        eprintln!("usage: banger-vm-helper agent-link VMM_SOCKET CLIENT_SOCKET");
        return ExitCode::from(2);
    };
    match crate::agent::link::run_helper(vmm.as_ref(), clients.as_ref()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("banger-vm-helper agent-link: {e}");
            ExitCode::FAILURE
        }
    }
}
