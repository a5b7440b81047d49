//! What the kernel unit tests share: the host's compressors, run on test data.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// The host's `tool`, or `None` (the test skips) where it is missing outside tests/run, which
/// installs it.
pub fn tool(name: &str) -> Option<PathBuf> {
    let found = crate::host::find_program(name);
    if found.is_none() {
        assert!(
            std::env::var("BANGER_REQUIRE_INTEGRATION").as_deref() != Ok("1"),
            "{name} is not installed (tests/run installs it)"
        );
        eprintln!("SKIPPED: {name} is not installed");
    }
    found
}

/// What `tool` with `args` writes for `data` on its standard input (fed from a thread of its
/// own, so a full output pipe cannot stall it); it must succeed.
pub fn through(tool: &PathBuf, args: &[&str], data: &[u8]) -> Vec<u8> {
    let mut child = Command::new(tool)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let data = data.to_vec();
    let feeder = std::thread::spawn(move || stdin.write_all(&data).unwrap());
    let out = child.wait_with_output().unwrap();
    feeder.join().unwrap();
    assert!(out.status.success(), "{} {args:?}", tool.display());
    out.stdout
}
