//! `bangerd`: the banger system service.

use std::path::PathBuf;

use clap::Parser;

/// The banger D-Bus system service.
#[derive(Debug, Parser)]
#[command(name = "bangerd", version, about)]
struct Args {
    /// Where images, kernels, VMs and the database live.
    #[arg(long, default_value = "/var/lib/banger")]
    state_dir: PathBuf,
    /// Where sockets live.
    #[arg(long, default_value = "/run/banger")]
    runtime_dir: PathBuf,
    /// The configuration file.
    #[arg(long)]
    config: Option<PathBuf>,
}

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
