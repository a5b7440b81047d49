//! `banger-agent`: the guest agent. Its vsock service (health, exec, shutdown on port 1024)
//! lands with the VM lifecycle work; today it only reports its version, so image injection
//! has a real binary to install.

fn main() -> std::process::ExitCode {
    match std::env::args().nth(1).as_deref() {
        Some("--version") | Some("-V") => {
            println!("banger-agent {}", env!("CARGO_PKG_VERSION"));
            std::process::ExitCode::SUCCESS
        }
        _ => {
            eprintln!("banger-agent: the vsock service is not implemented yet; try --version");
            std::process::ExitCode::FAILURE
        }
    }
}
