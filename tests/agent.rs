//! The real `banger-agent` binary served on a Unix socket, driven by the host client: the
//! protocol the daemon and `banger vm exec` speak to guests.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Duration;

use banger::agent::client;
use tokio::net::UnixStream;

struct Agent(Child, tempfile::TempDir);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Agent {
    /// The agent `tests/run` built (static, as images get it: the `banger-guest` crate);
    /// None where it was not built, which only CI refuses.
    fn start() -> Option<Agent> {
        let bin = common::guest_bins()?.join("banger-agent");
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("agent.sock");
        let child = Command::new(bin).arg("--unix").arg(&sock).spawn().unwrap();
        // Ready means listening: the socket file appears at bind(), before listen(), so
        // only a connection that succeeds says the agent serves.
        common::wait_until(
            &format!("banger-agent listening on {}", sock.display()),
            Duration::from_secs(10),
            || std::os::unix::net::UnixStream::connect(&sock).is_ok(),
        );
        Some(Agent(child, dir))
    }
    fn sock(&self) -> PathBuf {
        self.1.path().join("agent.sock")
    }
    async fn conn(&self) -> UnixStream {
        UnixStream::connect(self.sock()).await.unwrap()
    }
}

async fn run(a: &Agent, argv: &[&str], stdin: &[u8]) -> (i32, Vec<u8>, Vec<u8>) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = client::exec(
        a.conn().await,
        banger::agent::ExecRequest {
            env: vec!["GREETING=hello".into()],
            ..banger::agent::ExecRequest::new(argv.iter().map(|s| s.to_string()).collect())
        },
        stdin,
        &mut out,
        &mut err,
    )
    .await
    .unwrap();
    (code, out, err)
}

#[tokio::test]
async fn health_reports_version_and_boot() {
    let Some(a) = Agent::start() else { return };
    let h = client::health(&mut a.conn().await).await.unwrap();
    assert_eq!(h.version, banger::VERSION);
    assert!(h.uptime_sec > 0.0);
    assert_eq!(h.boot_id.len(), 36, "{h:?}");
}

#[tokio::test]
async fn exec_streams_stdin_stdout_stderr_and_the_exit_code() {
    let Some(a) = Agent::start() else { return };
    let (code, out, err) = run(
        &a,
        &["sh", "-c", "cat; echo \"$GREETING\" >&2; exit 7"],
        b"line one\nline two\n",
    )
    .await;
    assert_eq!(code, 7);
    assert_eq!(out, b"line one\nline two\n");
    assert_eq!(err, b"hello\n");

    // Output larger than a frame arrives whole and in order.
    let (code, out, _) = run(&a, &["sh", "-c", "seq 1 100000"], b"").await;
    assert_eq!(code, 0);
    let expect: String = (1..=100000).map(|i| format!("{i}\n")).collect();
    assert_eq!(String::from_utf8(out).unwrap(), expect);

    // A command that ignores its input still ends; a signal is reported as 128 + n.
    let (code, _, _) = run(&a, &["sh", "-c", "kill -9 $$"], b"unread").await;
    assert_eq!(code, 137);
}

#[tokio::test]
async fn a_missing_program_exits_127_and_a_forbidden_one_126_as_shells_do() {
    let Some(a) = Agent::start() else { return };
    let (code, _, err) = run(&a, &["/nonexistent/prog"], b"").await;
    assert_eq!(code, 127);
    let err = String::from_utf8_lossy(&err);
    assert!(err.contains("cannot run /nonexistent/prog"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("not-a-program");
    std::fs::write(&plain, b"data\n").unwrap();
    let (code, _, err) = run(&a, &[plain.to_str().unwrap()], b"").await;
    assert_eq!(code, 126, "{}", String::from_utf8_lossy(&err));
}
