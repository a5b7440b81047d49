//! `banger-vm-helper ROLE ARGS…`: one of the helpers that run beside each VM's VMM for as
//! long as it runs (see `banger::helpers`); the daemon starts them, nobody else.

fn main() -> std::process::ExitCode {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let role = argv.get(1).and_then(|a| a.to_str()).unwrap_or_default();
    banger::helpers::run(role, argv.get(2..).unwrap_or_default()).unwrap_or_else(|| {
        eprintln!(
            "usage: banger-vm-helper console-logger|agent-link|machine-control|port-forward ARGS…\n\
             (bangerd starts these beside each VM)"
        );
        std::process::ExitCode::from(2)
    })
}
