//! `banger-agent`: the guest agent. Listens on vsock port 1024 (health, exec, shutdown);
//! `--unix PATH` serves on a Unix socket instead, for tests on the host.

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let listen = match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["--version"] | ["-V"] => {
            println!("banger-agent {}", banger_guest::VERSION);
            return std::process::ExitCode::SUCCESS;
        }
        [] => banger_guest::agent::server::Listen::default(),
        // A file operation as whoever runs this (the agent runs itself so, as a guest user).
        ["fs", op] => {
            let code = banger_guest::agent::fsop::main(op);
            return std::process::ExitCode::from(code as u8);
        }
        ["--unix", path] => banger_guest::agent::server::Listen::Unix(path.into()),
        _ => {
            eprintln!("usage: banger-agent [--unix PATH | --version]");
            return std::process::ExitCode::from(2);
        }
    };
    match banger_guest::agent::server::serve(listen) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("banger-agent: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
