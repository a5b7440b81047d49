//! `bangerd`: the banger system service.

use std::path::PathBuf;

use banger::daemon::Args;
use clap::Parser;

/// The helper roles run before any thread exists (`jail-mounts` unshares the mount
/// namespace, which a multi-threaded process cannot); the daemon gets its runtime after.
fn main() -> std::process::ExitCode {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // Each role that becomes another program returns only when it could not.
    let role = argv.get(1).and_then(|a| a.to_str()).unwrap_or_default();
    let failed = match role {
        banger::vmm::jail::MOUNTS_ARG => banger::vmm::jail::mounts_and_exec(&argv[2..]),
        banger::vms::publish::FORWARD_ARG => banger::vms::publish::run_forwarder(&argv[2..]),
        banger::vmm::process::OPEN_TAP_ARG => banger::vmm::process::open_tap_and_exec(&argv[2..]),
        banger::vmm::process::LISTEN_ARG => banger::vmm::process::listen_and_exec(&argv[2..]),
        banger::vmm::process::NO_HUGE_PAGES_ARG => {
            banger::vmm::process::no_huge_pages_and_exec(&argv[2..])
        }
        banger::vmm::process::TAKE_RAM_ARG => banger::vmm::process::take_ram_and_exec(&argv[2..]),
        banger::vmm::nosetid::NO_SETID_ARG => banger::vmm::nosetid::deny_setid_and_exec(&argv[2..]),
        banger::varlink::relay::RELAY_ARG => banger::varlink::relay::run(&argv[2..]),
        banger::vmm::console::LOGGER_ARG => return console_logger(&argv[2..]),
        banger::agent::link::HELPER_ARG => return agent_link(&argv[2..]),
        banger::worker::WORKER_ARG => {
            return banger::worker::main(&argv[2..], banger::service::WORKS)
        }
        banger::activator::ACTIVATOR_ARG => banger::activator::run(&argv[2..]),
        banger::activator::WAKE_ARG => {
            return match banger::activator::wake(&argv[2..]) {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("bangerd wake: {e}");
                    std::process::ExitCode::FAILURE
                }
            }
        }
        _ => {
            return match tokio::runtime::Runtime::new() {
                Ok(rt) => rt.block_on(daemon()),
                Err(e) => {
                    eprintln!("bangerd: cannot start its runtime: {e}");
                    std::process::ExitCode::FAILURE
                }
            }
        }
    };
    eprintln!("bangerd {role}: {failed}");
    std::process::ExitCode::FAILURE
}

async fn daemon() -> std::process::ExitCode {
    let args = Args::parse();
    banger::logging::init("bangerd");
    let opts = banger::daemon::DaemonOptions {
        state_dir: args.state_dir,
        runtime_dir: args.runtime_dir,
        config_required: args.config.is_some(),
        config: args
            .config
            .unwrap_or_else(|| PathBuf::from("/etc/banger/config.toml")),
    };
    match banger::daemon::run(opts).await {
        Ok(_) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{}", e.full_message());
            std::process::ExitCode::FAILURE
        }
    }
}

/// `bangerd console-logger SOCKET LOG [OUTPUT_LOG]`: one VM's bounded console log, and with
/// `OUTPUT_LOG` its VMM's output, from the listening socket it gets as fd 3; `bangerd
/// console-logger - LOG`: a console that comes as a VMM's output on fd 3 (see
/// `vmm::console`).
fn console_logger(args: &[std::ffi::OsString]) -> std::process::ExitCode {
    let fd3 = || {
        use std::os::fd::FromRawFd;
        // SAFETY: fd 3 is the listener `bangerd listen` (or the daemon) made for this
        // process, which owns it from here on; it is checked to be a socket before use.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(3) };
        let listener = std::os::unix::net::UnixListener::from(fd);
        listener.local_addr().map(|_| listener)
    };
    let max = banger::vmm::console::MAX_BYTES;
    let done = match args {
        [socket, log] if socket == "-" => {
            fd3().and_then(|l| banger::vmm::console::run_output_logger(l, log.as_ref(), max))
        }
        [socket, log] => banger::vmm::console::run_logger(socket.as_ref(), log.as_ref(), max, None),
        [socket, log, output] if socket != "-" => fd3().and_then(|l| {
            let output = Some((l, std::path::Path::new(output)));
            banger::vmm::console::run_logger(socket.as_ref(), log.as_ref(), max, output)
        }),
        _ => {
            eprintln!("usage: bangerd console-logger SOCKET|- LOG [OUTPUT_LOG]");
            return std::process::ExitCode::from(2);
        }
    };
    match done {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bangerd console-logger: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `bangerd agent-link VMM_SOCKET CLIENT_SOCKET`: one VM's agent channel (see `agent::link`).
fn agent_link(args: &[std::ffi::OsString]) -> std::process::ExitCode {
    let [vmm, clients] = args else {
        eprintln!("usage: bangerd agent-link VMM_SOCKET CLIENT_SOCKET");
        return std::process::ExitCode::from(2);
    };
    match banger::agent::link::run_helper(vmm.as_ref(), clients.as_ref()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bangerd agent-link: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
