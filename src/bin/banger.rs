//! `banger`: the command line, a D-Bus client of `bangerd`.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = banger::cli::Cli::parse();
    let json = cli.json;
    match banger::cli::run(cli, || {
        <banger::daemon::Args as clap::CommandFactory>::command()
    })
    .await
    {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // Programs that asked for JSON get the error as JSON too (on stderr).
            if json {
                eprintln!("{}", serde_json::json!({ "error": format!("{e:#}") }));
            } else {
                eprintln!("banger: {e:#}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}
