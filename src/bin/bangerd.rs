//! `bangerd`: the banger system service.

use std::path::PathBuf;

use banger::daemon::Args;
use clap::Parser;

/// The helper roles run before any thread exists (`jail-mounts` unshares the mount
/// namespace, which a multi-threaded process cannot); the daemon gets its runtime after.
fn main() -> std::process::ExitCode {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if argv
        .get(1)
        .is_some_and(|a| a == banger::vmm::jail::MOUNTS_ARG)
    {
        let e = banger::vmm::jail::mounts_and_exec(&argv[2..]);
        eprintln!("bangerd jail-mounts: {e}");
        return std::process::ExitCode::FAILURE;
    }
    if argv
        .get(1)
        .is_some_and(|a| a == banger::vms::publish::FORWARD_ARG)
    {
        let e = banger::vms::publish::run_forwarder(&argv[2..]);
        eprintln!("bangerd port-forward: {e}");
        return std::process::ExitCode::FAILURE;
    }
    if argv
        .get(1)
        .is_some_and(|a| a == banger::vmm::console::LOGGER_ARG)
    {
        return console_logger(&argv[2..]);
    }
    if argv
        .get(1)
        .is_some_and(|a| a == banger::vmm::process::OPEN_TAP_ARG)
    {
        // Only returns when it could not become the program.
        let e = banger::vmm::process::open_tap_and_exec(&argv[2..]);
        eprintln!("bangerd open-tap: {e}");
        return std::process::ExitCode::FAILURE;
    }
    match tokio::runtime::Runtime::new() {
        Ok(rt) => rt.block_on(daemon()),
        Err(e) => {
            eprintln!("bangerd: cannot start its runtime: {e}");
            std::process::ExitCode::FAILURE
        }
    }
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

/// `bangerd console-logger SOCKET LOG`: one VM's bounded console log (see `vmm::console`).
fn console_logger(args: &[std::ffi::OsString]) -> std::process::ExitCode {
    let [socket, log] = args else {
        eprintln!("usage: bangerd console-logger SOCKET LOG");
        return std::process::ExitCode::from(2);
    };
    let max = banger::vmm::console::MAX_BYTES;
    match banger::vmm::console::run_logger(socket.as_ref(), log.as_ref(), max) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bangerd console-logger: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
