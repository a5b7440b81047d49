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
    // The role's arguments; none when there is no role (`bangerd` alone is the daemon).
    let rest = argv.get(2..).unwrap_or_default();
    // What `banger-vm-helper` runs, which an older daemon may still ask of this binary.
    if let Some(code) = banger::helpers::run(role, rest) {
        return code;
    }
    let failed = match role {
        banger::vmm::jail::MOUNTS_ARG => banger::vmm::jail::mounts_and_exec(rest),
        banger::vmm::process::OPEN_TAP_ARG => banger::vmm::process::open_tap_and_exec(rest),
        banger::vmm::process::LISTEN_ARG => banger::vmm::process::listen_and_exec(rest),
        banger::vmm::process::NO_HUGE_PAGES_ARG => {
            banger::vmm::process::no_huge_pages_and_exec(rest)
        }
        banger::vmm::process::TAKE_RAM_ARG => banger::vmm::process::take_ram_and_exec(rest),
        banger::vmm::nosetid::NO_SETID_ARG => banger::vmm::nosetid::deny_setid_and_exec(rest),
        banger::worker::WORKER_ARG => return banger::worker::main(rest, banger::service::WORKS),
        banger::activator::ACTIVATOR_ARG => banger::activator::run(rest),
        banger::activator::WAKE_ARG => {
            return match banger::activator::wake(rest) {
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
