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

/// A request line on a new connection, its reply line, and the connection for what follows.
fn request(
    a: &Agent,
    req: serde_json::Value,
) -> (
    serde_json::Value,
    std::io::BufReader<std::os::unix::net::UnixStream>,
) {
    use std::io::{BufRead, Write};
    let mut s = std::os::unix::net::UnixStream::connect(a.sock()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(format!("{req}\n").as_bytes()).unwrap();
    let mut r = std::io::BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    (serde_json::from_str(&line).unwrap(), r)
}

/// Writes one frame.
fn frame(r: &mut std::io::BufReader<std::os::unix::net::UnixStream>, kind: u8, data: &[u8]) {
    use std::io::Write;
    let s = r.get_mut();
    s.write_all(&banger::agent::header(kind, data.len()))
        .unwrap();
    s.write_all(data).unwrap();
}

/// Reads frames until `until` says stop or the exit frame: (stdout, stderr, exit status).
fn frames(
    r: &mut std::io::BufReader<std::os::unix::net::UnixStream>,
    mut until: impl FnMut(&[u8]) -> bool,
) -> (Vec<u8>, Vec<u8>, Option<i32>) {
    use banger::agent::frame;
    use std::io::Read;
    let (mut out, mut err) = (Vec::new(), Vec::new());
    loop {
        let mut h = [0u8; 5];
        if r.read_exact(&mut h).is_err() {
            return (out, err, None);
        }
        let (kind, len) = banger::agent::parse_header(h).unwrap();
        let mut data = vec![0u8; len];
        r.read_exact(&mut data).unwrap();
        match kind {
            frame::STDOUT => out.extend(&data),
            frame::STDERR => err.extend(&data),
            frame::EXIT => {
                return (out, err, Some(i32::from_be_bytes(data.try_into().unwrap())));
            }
            _ => {}
        }
        if until(&out) {
            return (out, err, None);
        }
    }
}

#[tokio::test]
async fn a_detached_process_outlives_its_connection_and_is_found_again_by_pid_or_tag() {
    use banger::agent::frame;
    use serde_json::json;
    let Some(a) = Agent::start() else { return };
    let script = "echo started; while read l; do echo \"got:$l\"; done; echo eof; exit 3";
    let (reply, mut c) = request(
        &a,
        json!({"op": "exec", "argv": ["sh", "-c", script], "detach": true, "tag": "echoer"}),
    );
    assert_eq!(reply["ok"], true, "{reply}");
    let pid = reply["pid"].as_u64().unwrap();
    let (out, _, _) = frames(&mut c, |o| o.ends_with(b"started\n"));
    assert_eq!(out, b"started\n");
    // The client goes; the process stays in the table.
    drop(c);
    let (procs, _) = request(&a, json!({"op": "procs"}));
    let listed = procs["procs"].as_array().unwrap();
    assert_eq!(listed.len(), 1, "{procs}");
    assert_eq!(listed[0]["pid"], pid);
    assert_eq!(listed[0]["tag"], "echoer");
    assert_eq!(listed[0]["argv"], json!(["sh", "-c", script]));
    // A tag names one process only.
    let (dup, _) = request(
        &a,
        json!({"op": "exec", "argv": ["true"], "detach": true, "tag": "echoer"}),
    );
    assert_eq!(dup["ok"], false, "{dup}");
    assert!(
        dup["error"].as_str().unwrap().contains("runs already"),
        "{dup}"
    );

    // Attached by tag: input reaches it, its output from then on comes back.
    let (reply, mut by_tag) = request(&a, json!({"op": "attach", "tag": "echoer"}));
    assert_eq!(reply["pid"], pid, "{reply}");
    frame(&mut by_tag, frame::STDIN, b"one\n");
    let (out, _, _) = frames(&mut by_tag, |o| o.ends_with(b"got:one\n"));
    assert_eq!(out, b"got:one\n");
    // A second attachment, by pid, sees the same output; an empty frame closes the input.
    let (_, mut by_pid) = request(&a, json!({"op": "attach", "pid": pid}));
    frame(&mut by_pid, frame::STDIN, b"two\n");
    frame(&mut by_pid, frame::STDIN, b"");
    let (out1, _, code1) = frames(&mut by_tag, |_| false);
    let (out2, _, code2) = frames(&mut by_pid, |_| false);
    assert_eq!(out1, b"got:two\neof\n");
    assert_eq!(out2, b"got:two\neof\n");
    assert_eq!((code1, code2), (Some(3), Some(3)));
    let (procs, _) = request(&a, json!({"op": "procs"}));
    assert_eq!(
        procs["procs"],
        json!([]),
        "an exited process leaves the table"
    );
    let (gone, _) = request(&a, json!({"op": "attach", "pid": pid}));
    assert_eq!(gone["ok"], false, "{gone}");

    // A signal reaches the process's group; only signals a client may send are taken.
    let (reply, mut c) = request(
        &a,
        json!({"op": "exec", "argv": ["sh", "-c", "echo up; sleep 600 & wait"], "detach": true}),
    );
    let pid = reply["pid"].as_u64().unwrap();
    frames(&mut c, |o| o.ends_with(b"up\n"));
    let (no, _) = request(&a, json!({"op": "signal", "pid": pid, "signal": 19}));
    assert_eq!(no["ok"], false, "SIGSTOP: {no}");
    let (yes, _) = request(&a, json!({"op": "signal", "pid": pid, "signal": 9}));
    assert_eq!(yes["ok"], true, "{yes}");
    let (_, _, code) = frames(&mut c, |_| false);
    assert_eq!(code, Some(137));
    assert!(
        common::processes_mentioning("sleep 600").is_empty(),
        "the signal reached the whole group"
    );
}

#[tokio::test]
async fn file_operations_run_with_the_named_users_rights_only() {
    use serde_json::json;
    let Some(a) = Agent::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let at = |p: &str| dir.path().join(p).to_string_lossy().into_owned();
    // fs op → (stdout, stderr, status); `input` is the operation's standard input.
    let fs = |op: serde_json::Value, user: Option<&str>, input: &[u8]| {
        let mut req = json!({"op": "fs", "file": op});
        if let Some(u) = user {
            req["user"] = json!(u);
        }
        let (reply, mut c) = request(&a, req);
        assert_eq!(reply["ok"], true, "{reply}");
        if !input.is_empty() {
            frame(&mut c, banger::agent::frame::STDIN, input);
        }
        frame(&mut c, banger::agent::frame::STDIN, b"");
        let (out, err, code) = frames(&mut c, |_| false);
        (
            out,
            String::from_utf8_lossy(&err).into_owned(),
            code.unwrap(),
        )
    };
    let entries = |out: &[u8]| -> Vec<serde_json::Value> {
        serde_json::from_slice::<serde_json::Value>(out).unwrap()["entries"]
            .as_array()
            .unwrap()
            .clone()
    };
    let (out, err, code) = fs(
        json!({"fs": "write", "path": at("d/e/f.txt")}),
        None,
        b"bytes\0in",
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(entries(&out)[0]["size"], 8);
    assert_eq!(entries(&out)[0]["owner"], "root");
    let (out, _, code) = fs(json!({"fs": "read", "path": at("d/e/f.txt")}), None, b"");
    assert_eq!((code, out.as_slice()), (0, &b"bytes\0in"[..]));
    let (out, _, _) = fs(
        json!({"fs": "list", "path": at("d"), "depth": 2}),
        None,
        b"",
    );
    let names: Vec<_> = entries(&out).iter().map(|e| e["name"].clone()).collect();
    assert_eq!(names, [json!("e"), json!("f.txt")]);
    let (_, err, code) = fs(json!({"fs": "stat", "path": at("nope")}), None, b"");
    assert_eq!(code, 2, "not found: {err}");
    assert!(err.contains("nope"), "{err}");

    // As nobody, in a directory only root may write: refused, and nothing is made.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let (_, err, code) = fs(
        json!({"fs": "write", "path": at("by-nobody")}),
        Some("nobody"),
        b"x",
    );
    assert_eq!(code, 4, "permission denied: {err}");
    assert!(!dir.path().join("by-nobody").exists());
    let (_, err, code) = fs(
        json!({"fs": "remove", "path": at("d")}),
        Some("nobody"),
        b"",
    );
    assert_eq!(code, 4, "{err}");
    assert!(dir.path().join("d/e/f.txt").exists());
    // What nobody may write, nobody writes, and owns.
    let open = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        open.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let mine = open
        .path()
        .join("sub/mine.txt")
        .to_string_lossy()
        .into_owned();
    let (out, err, code) = fs(json!({"fs": "write", "path": mine}), Some("nobody"), b"n");
    assert_eq!(code, 0, "{err}");
    assert_eq!(entries(&out)[0]["owner"], "nobody");
}

#[tokio::test]
async fn a_watch_streams_changes_until_its_client_ends_it() {
    use serde_json::json;
    let Some(a) = Agent::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (reply, mut c) = request(
        &a,
        json!({"op": "fs", "file": {"fs": "watch", "path": dir.path(), "recursive": true}}),
    );
    assert_eq!(reply["ok"], true, "{reply}");
    // The first line says the watch is set.
    frames(&mut c, |o| o == b"{}\n");
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    // A directory made after the watch started is watched too (once its create is seen).
    let (out, _, _) = frames(&mut c, |o| String::from_utf8_lossy(o).contains("\"sub\""));
    assert!(String::from_utf8_lossy(&out).contains(r#"{"name":"sub","kind":"create"}"#));
    std::fs::write(dir.path().join("sub/new.txt"), b"x").unwrap();
    let (out, _, _) = frames(&mut c, |o| String::from_utf8_lossy(o).contains("write"));
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.contains(r#"{"name":"sub/new.txt","kind":"create"}"#),
        "{text}"
    );
    assert!(
        text.contains(r#"{"name":"sub/new.txt","kind":"write"}"#),
        "{text}"
    );
    // Input ends: the watch ends with status 0.
    frame(&mut c, banger::agent::frame::STDIN, b"");
    let (_, _, code) = frames(&mut c, |_| false);
    assert_eq!(code, Some(0));
}

#[tokio::test]
async fn a_command_runs_under_the_resource_limits_it_is_given() {
    use banger::agent::frame;
    use serde_json::json;
    let Some(a) = Agent::start() else { return };
    let exec = |rlimits: serde_json::Value| {
        let (reply, mut c) = request(
            &a,
            json!({"op": "exec", "argv": ["sh", "-c", "ulimit -n; ulimit -Hn"], "rlimits": rlimits}),
        );
        if reply["ok"] == true {
            frame(&mut c, frame::STDIN, b"");
        }
        (reply, frames(&mut c, |_| false))
    };
    let (reply, (out, _, code)) = exec(json!([{"type": "RLIMIT_NOFILE", "soft": 77, "hard": 99}]));
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(
        (String::from_utf8_lossy(&out).as_ref(), code),
        ("77\n99\n", Some(0))
    );
    // Refused by name: a limit the kernel does not know, a soft limit above the hard one.
    for (bad, says) in [
        (
            json!([{"type": "RLIMIT_NOPE", "soft": 1, "hard": 1}]),
            "not a resource limit",
        ),
        (
            json!([{"type": "RLIMIT_NOFILE", "soft": 9, "hard": 8}]),
            "above the hard limit",
        ),
    ] {
        let (reply, _) = exec(bad);
        assert_eq!(reply["ok"], false, "{reply}");
        assert!(reply["error"].as_str().unwrap().contains(says), "{reply}");
    }
}
