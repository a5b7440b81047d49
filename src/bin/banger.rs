//! `banger`: the command line, a D-Bus client of `bangerd`.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = banger::cli::Cli::parse();
    match banger::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("banger: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
