//! `bangerd`: the banger system service.

use std::path::PathBuf;

use banger::daemon::Args;
use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
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
