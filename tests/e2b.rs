//! E2B's SDK against banger: `banger e2b serve` run by two members of group banger, each as
//! themselves, in the test bus's network namespace; E2B's Python SDK (PyPI `e2b`, pinned by
//! tests/run), unmodified, drives real VMs through it (`tests/e2b/sdk.py`). Then what the SDK
//! never sends: requests without the key or with another sandbox's token, malformed Connect
//! calls, a facade killed in the middle of a create.

mod common;

use std::io::BufReader;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::oci::*;
use common::vm::*;
use common::*;
use serde_json::Value;

/// `target/DIR` when tests/run installed `what` there (`marker` in it), else a skip (a
/// failure when integration tests are required).
fn installed(dir: &str, marker: &str, what: &str) -> Option<PathBuf> {
    let dir = repo().join("target").join(dir);
    if dir.join(marker).exists() {
        return Some(dir);
    }
    assert!(
        std::env::var("BANGER_REQUIRE_INTEGRATION").as_deref() != Ok("1"),
        "{} is missing: tests/run installs {what} there",
        dir.display()
    );
    eprintln!("SKIPPED: {what} is not installed (tests/run installs it)");
    None
}

/// The e2b package tests/run installs (its version is pinned there).
fn sdk_dir() -> Option<PathBuf> {
    installed("test-python-e2b", "e2b", "E2B's SDK")
}

/// The busybox guest with what E2B's SDK assumes of a sandbox: bash (Debian's static one),
/// an account `user` (uid 1000) with its home, which the image's configuration makes the
/// default user and directory, and `stty` for the terminal test.
fn sandbox_layers() -> Vec<Vec<u8>> {
    let mut layers = vm_image_layers();
    let bash = std::fs::read("/bin/bash-static").expect("bash-static (tests/run installs it)");
    let extra = Layer::default()
        .file("bin/bash", &bash, 0o755, 0)
        .link("bin/stty", tar::EntryType::Symlink, "busybox")
        .link("bin/stat", tar::EntryType::Symlink, "busybox")
        .link("bin/whoami", tar::EntryType::Symlink, "busybox")
        .link("bin/pwd", tar::EntryType::Symlink, "busybox")
        .link("bin/seq", tar::EntryType::Symlink, "busybox")
        .file(
            "etc/passwd",
            b"root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/bash\n",
            0o644,
            0,
        )
        .file("etc/group", b"root:x:0:\nuser:x:1000:\n", 0o644, 0)
        .dir("home", 0o755)
        .dir_owned("home/user", 0o755, 1000);
    layers.push(extra.bytes());
    layers
}

/// A process in the bus's namespace as `user`, with `env`.
fn as_user_in_netns(bus: &TestBus, user: &str, program: &str, args: &[&str]) -> Command {
    let mut c = bus.in_netns("runuser");
    c.args(["-u", user, "--", "timeout", "-k", "10", "900", program])
        .args(args)
        .env("DBUS_SYSTEM_BUS_ADDRESS", &bus.address)
        .stdin(Stdio::null());
    c
}

/// One user's facade: the process and its environment for the SDK.
struct Facade {
    child: Child,
    port: u16,
    /// Its `--varlink=` argument: the bus's own socket, so the marker below names this
    /// test's facade only (not another run's on the same port in another namespace).
    socket: String,
    env: Vec<(String, String)>,
    _config: tempfile::TempDir,
}

impl Drop for Facade {
    fn drop(&mut self) {
        // runuser waits for the facade it started: the facade itself is killed, by its
        // command line.
        let marker = format!(
            "{}\x00e2b\x00serve\x00--listen\x00127.0.0.1:{}",
            self.socket, self.port
        );
        for pid in processes_mentioning(&marker) {
            // SAFETY: kill takes no pointers.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Facade {
    /// `banger e2b serve` as `user` on 127.0.0.1:`port`, its key made in a configuration
    /// directory of the user's own; ready once it says it listens.
    fn start(bus: &TestBus, user: &str, port: u16) -> Facade {
        let config = tempfile::tempdir().unwrap();
        let uid = uid_of(user);
        std::os::unix::fs::chown(config.path(), Some(uid), Some(uid)).unwrap();
        let socket = format!("--varlink={}", bus.runtime.join("io.banger").display());
        let listen = format!("127.0.0.1:{port}");
        let banger = env!("CARGO_BIN_EXE_banger");
        let out = as_user_in_netns(bus, user, banger, &["e2b", "env", "--listen", &listen])
            .env("XDG_CONFIG_HOME", config.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "e2b env: {}", text(&out));
        // `export NAME=VALUE` lines, for eval in a shell.
        let printed = String::from_utf8_lossy(&out.stdout).into_owned();
        let vars: std::collections::HashMap<&str, &str> = printed
            .lines()
            .filter_map(|l| l.strip_prefix("export ")?.split_once('='))
            .collect();
        let key_file = config.path().join("banger/e2b-api-key");
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&key_file).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600, "the key is the user's alone");
        let mut child = as_user_in_netns(
            bus,
            user,
            banger,
            &[
                &socket,
                "e2b",
                "serve",
                "--listen",
                &listen,
                "--cpu-count",
                "1",
                "--memory-mb",
                "256",
            ],
        )
        .env("XDG_CONFIG_HOME", config.path())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
        let mut err = BufReader::new(child.stderr.take().unwrap());
        read_until(&mut err, "E2B's API on", "banger e2b serve");
        // What it says later goes to the test's output.
        std::thread::spawn(move || {
            use std::io::BufRead;
            for l in err.lines().map_while(Result::ok) {
                eprintln!("[e2b serve {port}] {l}");
            }
        });
        let env = ["E2B_API_URL", "E2B_SANDBOX_URL", "E2B_API_KEY"]
            .iter()
            .map(|k| (k.to_string(), vars[k].to_owned()))
            .collect();
        Facade {
            child,
            port,
            socket,
            env,
            _config: config,
        }
    }

    fn key(&self) -> &str {
        &self.env[2].1
    }

    /// `tests/e2b/sdk.py` with this facade's environment, as `user`; its output shown.
    fn sdk(&self, bus: &TestBus, user: &str, args: &[&str]) -> String {
        let script = repo().join("tests/e2b/sdk.py");
        let mut all = vec![script.to_str().unwrap()];
        all.extend_from_slice(args);
        let mut c = as_user_in_netns(bus, user, "/usr/bin/python3", &all);
        c.envs(self.env.iter().cloned())
            .env("PYTHONPATH", sdk_dir().unwrap())
            .env("PYTHONUNBUFFERED", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let out = c.output().unwrap();
        let printed = text(&out);
        println!("{printed}");
        assert!(out.status.success(), "sdk.py {args:?} failed:\n{printed}");
        printed
    }
}

/// The npm package tests/run installs (its version is pinned there).
fn js_dir() -> Option<PathBuf> {
    installed(
        "test-node-e2b",
        "node_modules/e2b/dist/index.mjs",
        "E2B's JavaScript SDK",
    )
}

impl Facade {
    /// `tests/e2b/sdk.mjs` with this facade's environment, as `user`.
    fn js(&self, bus: &TestBus, user: &str, template: &str, js: &std::path::Path) -> String {
        let script = repo().join("tests/e2b/sdk.mjs");
        let node = ["/usr/bin/node", "/usr/local/bin/node"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect("node");
        let mut c = as_user_in_netns(bus, user, node, &[script.to_str().unwrap(), template]);
        c.envs(self.env.iter().cloned()).env("E2B_JS", js);
        let out = c.output().unwrap();
        let printed = text(&out);
        println!("{printed}");
        assert!(out.status.success(), "sdk.mjs failed:\n{printed}");
        printed
    }
}

/// An HTTP request to the facade from inside the namespace (curl), as `user`: (status, body).
fn curl(bus: &TestBus, user: &str, args: &[&str]) -> (u16, String) {
    let mut all = vec!["-sS", "-w", "\n%{http_code}", "--max-time", "60"];
    all.extend_from_slice(args);
    let out = as_user_in_netns(bus, user, "curl", &all).output().unwrap();
    let s = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = s.rsplit_once('\n').unwrap_or(("", "0"));
    let code = code.trim().parse().unwrap_or(0);
    if code == 0 || body.is_empty() {
        eprintln!("curl {args:?}: {}", text(&out));
    }
    (code, body.to_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn e2bs_python_sdk_drives_banger_vms_through_the_facade_as_each_user() {
    let Some(sdk) = sdk_dir() else { return };
    let _ = sdk;
    if !available(&["curl"]) {
        return;
    }
    let Some((_state, bus)) = kernel_ready_bus(&[], "").await else {
        return;
    };
    let registry = TestRegistry::start_in_netns(bus.netns_pid());
    let layout = tempfile::tempdir().unwrap();
    let m = image_manifest_configured(
        layout.path(),
        &sandbox_layers(),
        serde_json::json!({"Cmd": ["/bin/sh"], "User": "user", "WorkingDir": "/home/user"}),
    );
    finish_layout(layout.path(), vec![m], "v1");
    let reference = registry.push(layout.path(), "v1", "e2b/sandbox", &[]);
    // The template: an image of the first user's own.
    let out = bus.banger_as(
        Some(USER_OK),
        &[
            "image",
            "pull",
            &reference,
            "--name",
            "e2b-test",
            "--insecure",
        ],
    );
    assert!(out.status.success(), "image pull: {}", text(&out));

    let mine = Facade::start(&bus, USER_OK, 3000);
    let theirs = Facade::start(&bus, USER_OK2, 3001);
    assert_ne!(mine.key(), theirs.key(), "each user has a key of their own");

    let printed = mine.sdk(&bus, USER_OK, &["main", "e2b-test"]);
    let id = printed
        .lines()
        .find_map(|l| l.strip_prefix("SANDBOX "))
        .map(|j| {
            serde_json::from_str::<Value>(j).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .expect("the script names its sandbox");
    // The sandbox is a VM of the user's, labelled; bangerd holds its state, not the facade.
    let shown = bus.banger_as(Some(USER_OK), &["--json", "vm", "show", &id]);
    let vm: Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(vm["owner"], uid_of(USER_OK), "{vm}");
    assert_eq!(vm["labels"]["e2b.template"], "e2b-test", "{vm}");
    assert!(
        vm["expiresAt"].as_u64().unwrap_or(0) > 0,
        "a sandbox has a lifetime: {vm}"
    );

    // E2B's JavaScript SDK: one create, commands, files, kill.
    if let Some(js) = js_dir() {
        mine.js(&bus, USER_OK, "e2b-test", &js);
    }

    // The second user sees nothing of the first's sandbox through their own facade.
    theirs.sdk(&bus, USER_OK2, &["other", &id]);

    // What the SDK never sends: every control-plane and sandbox route refuses a request
    // without the key, with a wrong one, or with another sandbox's token, and does nothing.
    let api = "http://127.0.0.1:3000";
    let (mut tried, mut refused) = (0, 0);
    let wrong = format!("X-API-Key: e2b_{}", "1".repeat(40));
    let theirs_key = format!("X-API-Key: {}", theirs.key());
    let sandbox_hdr = format!("E2b-Sandbox-Id: {id}");
    for (what, args) in [
        ("list, no key", vec![format!("{api}/v2/sandboxes")]),
        (
            "list, wrong key",
            vec!["-H".into(), wrong.clone(), format!("{api}/v2/sandboxes")],
        ),
        (
            "list, another user's key",
            vec![
                "-H".into(),
                theirs_key.clone(),
                format!("{api}/v2/sandboxes"),
            ],
        ),
        (
            "kill, no key",
            vec![
                "-X".into(),
                "DELETE".into(),
                format!("{api}/sandboxes/{id}"),
            ],
        ),
        (
            "create, wrong key",
            vec![
                "-X".into(),
                "POST".into(),
                "-H".into(),
                wrong.clone(),
                "-d".into(),
                r#"{"templateID":"e2b-test"}"#.into(),
                format!("{api}/sandboxes"),
            ],
        ),
        (
            "envd, no token",
            vec![
                "-H".into(),
                sandbox_hdr.clone(),
                "-H".into(),
                "E2b-Sandbox-Port: 49983".into(),
                format!("{api}/envs"),
            ],
        ),
        (
            "envd, another sandbox's token",
            vec![
                "-H".into(),
                sandbox_hdr.clone(),
                "-H".into(),
                "E2b-Sandbox-Port: 49983".into(),
                "-H".into(),
                "X-Access-Token: 0123456789abcdef".into(),
                format!("{api}/files?path=/etc/passwd"),
            ],
        ),
        (
            "a port, no token",
            vec![
                "-H".into(),
                format!("Host: 8080-{id}.localhost:3000"),
                format!("{api}/passwd"),
            ],
        ),
    ] {
        tried += 1;
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, body) = curl(&bus, USER_NO, &args);
        if code == 401 {
            refused += 1;
        } else {
            panic!("{what}: {code} {body}");
        }
    }
    let (code, _) = curl(&bus, USER_NO, &[&format!("{api}/health")]);
    assert_eq!(code, 200, "health needs no key");
    // The sandbox is still there and still the first user's.
    let listed = bus.banger_as(Some(USER_OK), &["vm", "list", "--label", "e2b.sandbox=1"]);
    assert!(text(&listed).contains(&id), "{}", text(&listed));
    println!("security (e2b keys and tokens): {tried} requests tried, {refused} refused, 0 reached a sandbox");

    // Malformed Connect calls get Connect's errors, and the facade goes on serving.
    let key = format!("X-API-Key: {}", mine.key());
    let envd = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = vec![
            "-H".into(),
            key.clone(),
            "-H".into(),
            sandbox_hdr.clone(),
            "-H".into(),
            "E2b-Sandbox-Port: 49983".into(),
            "-X".into(),
            "POST".into(),
        ];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    // Bodies go in files (curl --data-binary @FILE): some are not text.
    let bodies = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        bodies.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let (mut tried, mut clear) = (0, 0);
    let stat = "http://127.0.0.1:3000/filesystem.Filesystem/Stat";
    let start = "http://127.0.0.1:3000/process.Process/Start";
    /// What it is, its content type, body, URL, more curl arguments, and what the answer says.
    type Case<'a> = (&'a str, &'a str, &'a [u8], &'a str, &'a [&'a str], &'a str);
    let cases: [Case; 6] = [
        (
            "not JSON",
            "application/json",
            b"{not json",
            stat,
            &[],
            "invalid_argument",
        ),
        (
            "not protobuf",
            "application/proto",
            b"\xff\xff\xff",
            stat,
            &[],
            "invalid_argument",
        ),
        (
            "a unary method as a stream",
            "application/connect+json",
            b"{}",
            stat,
            &[],
            "invalid_argument",
        ),
        (
            "an unknown method",
            "application/json",
            b"{}",
            "http://127.0.0.1:3000/process.Process/Explode",
            &[],
            "unimplemented",
        ),
        (
            "a stream's envelope over the cap",
            "application/connect+json",
            b"\x00\x7f\xff\xff\xff",
            start,
            &[],
            "resource_exhausted",
        ),
        (
            "a user that is not a name",
            "application/json",
            br#"{"path":"/"}"#,
            stat,
            &["-H", "Authorization: Basic Li4vZXRjOg=="],
            "not a user name",
        ),
    ];
    for (i, (what, ct, body, url, more, want)) in cases.into_iter().enumerate() {
        tried += 1;
        let file = bodies.path().join(format!("body{i}"));
        std::fs::write(&file, body).unwrap();
        std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .unwrap();
        let ct = format!("Content-Type: {ct}");
        let data = format!("@{}", file.display());
        let mut extra: Vec<&str> = vec!["-H", &ct, "--data-binary", &data];
        extra.extend_from_slice(more);
        extra.push(url);
        let args = envd(&extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, body) = curl(&bus, USER_OK, &args);
        assert!(code >= 200, "{what}: no answer");
        if body.contains(want) {
            clear += 1;
        } else {
            panic!("{what}: {code} {body}");
        }
    }
    let (code, body) = curl(
        &bus,
        USER_OK,
        &envd(&[
            "-H",
            "Content-Type: application/json",
            "-d",
            r#"{"path":"/home/user"}"#,
            "http://127.0.0.1:3000/filesystem.Filesystem/Stat",
        ])
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>(),
    );
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("FILE_TYPE_DIRECTORY"), "{body}");
    println!("malformed Connect calls: {tried} tried, {clear} refused with Connect's error");

    // Clients that go mid-stream (a command's output, a watch) leave nothing open in the
    // facade: its descriptors come back to where they were.
    let facade_pid = processes_mentioning(&format!("{}\x00e2b\x00serve", mine.socket))
        .into_iter()
        .find(|p| std::fs::read_link(format!("/proc/{p}/exe")).is_ok_and(|e| e.ends_with("banger")))
        .expect("the facade's process");
    let fds = || {
        std::fs::read_dir(format!("/proc/{facade_pid}/fd"))
            .unwrap()
            .count()
    };
    let before = fds();
    let token = format!("X-Access-Token: {}", {
        let (_, body) = curl(
            &bus,
            USER_OK,
            &[
                "-X",
                "POST",
                "-H",
                &key,
                "-d",
                "{}",
                &format!("{api}/sandboxes/{id}/connect"),
            ],
        );
        serde_json::from_str::<Value>(&body).unwrap()["envdAccessToken"]
            .as_str()
            .unwrap()
            .to_owned()
    });
    for (path, body) in [
        (
            "process.Process/Start",
            r#"{"process":{"cmd":"/bin/sh","args":["-c","echo started; sleep 20"]}}"#,
        ),
        ("filesystem.Filesystem/WatchDir", r#"{"path":"/home/user"}"#),
    ] {
        for _ in 0..3 {
            let file = bodies.path().join("stream");
            let mut env = vec![0u8];
            env.extend((body.len() as u32).to_be_bytes());
            env.extend(body.as_bytes());
            std::fs::write(&file, env).unwrap();
            std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o644))
                .unwrap();
            let data = format!("@{}", file.display());
            // curl gives up after 2 s, in the middle of the stream.
            let (_, out) = curl(
                &bus,
                USER_OK,
                &[
                    "--max-time",
                    "2",
                    "-H",
                    &sandbox_hdr,
                    "-H",
                    "E2b-Sandbox-Port: 49983",
                    "-H",
                    &token,
                    "-H",
                    "Content-Type: application/connect+json",
                    "--data-binary",
                    &data,
                    &format!("{api}/{path}"),
                ],
            );
            assert!(!out.contains("\"error\""), "{path}: {out}");
        }
    }
    wait_until(
        "the facade's descriptors to come back",
        Duration::from_secs(30),
        || fds() <= before,
    );
    println!(
        "streams cut by their clients: 6, facade descriptors {before} before and {} after",
        fds()
    );

    // A facade killed while it creates: the VM is bangerd's, and a new facade lists it.
    let creating = as_user_in_netns(
        &bus,
        USER_OK,
        "curl",
        &[
            "-s",
            "-X",
            "POST",
            "-H",
            &key,
            "-d",
            r#"{"templateID":"e2b-test","metadata":{"cut":"yes"}}"#,
            &format!("{api}/sandboxes"),
        ],
    )
    .spawn()
    .unwrap();
    wait_until(
        "the create to reach bangerd",
        Duration::from_secs(120),
        || {
            text(&bus.banger_as(
                Some(USER_OK),
                &["vm", "list", "--label", "e2b.meta.cut=yes"],
            ))
            .lines()
            .count()
                > 1
        },
    );
    drop(mine);
    let mut creating = creating;
    let _ = creating.wait();
    let again = Facade::start(&bus, USER_OK, 3000);
    let key = format!("X-API-Key: {}", again.key());
    let (code, body) = curl(
        &bus,
        USER_OK,
        &[
            "-H",
            &key,
            &format!("{api}/v2/sandboxes?metadata=cut%3Dyes"),
        ],
    );
    assert_eq!(code, 200, "{body}");
    let listed: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    assert_eq!(listed[0]["metadata"]["cut"], "yes", "{listed}");
}

#[tokio::test(flavor = "multi_thread")]
async fn e2bs_default_template_base_is_built_on_first_use_with_an_account_user_and_sudo() {
    if sdk_dir().is_none() || !available(&["curl", "debootstrap"]) || !available(VM_TOOLS) {
        return;
    }
    let Some((vmlinuz, modules, _)) = debian_kernel() else {
        return;
    };
    guest_bins().unwrap();
    let state = tempfile::tempdir().unwrap();
    let config = "accel = \"tcg\"\nboot_timeout_sec = 300\ndefault_kernel = \"test\"\n";
    {
        // With the host's network (debootstrap fetches from the host's Debian mirror, a
        // package registry): the first request for `base` builds it. Its memory is refused
        // after that, so nothing boots here.
        let prep = TestBus::start(BusOptions {
            state_dir: Some(state.path().to_owned()),
            extra_config: config.into(),
            ..Default::default()
        });
        import_kernel(&prep.connect().await, "test", &vmlinuz, &modules).await;
        assert!(prep.banger_as(None, &["status"]).status.success());
        let facade = Facade::start(&prep, USER_OK, 3010);
        let key = format!("X-API-Key: {}", facade.key());
        let (code, body) = curl(
            &prep,
            USER_OK,
            &[
                "--max-time",
                "1200",
                "-X",
                "POST",
                "-H",
                &key,
                "-d",
                r#"{"templateID":"base","memoryMB":1}"#,
                "http://127.0.0.1:3010/sandboxes",
            ],
        );
        assert_eq!(code, 400, "the build, then the shape refused: {body}");
        assert!(body.contains("memory"), "{body}");
        let shown = prep.banger_as(Some(USER_OK), &["--json", "image", "show", "base"]);
        assert!(
            shown.status.success(),
            "base was not built: {}",
            text(&shown)
        );
    }
    let bus = TestBus::start(BusOptions {
        extra_config: config.into(),
        netns: true,
        state_dir: Some(state.path().to_owned()),
        ..Default::default()
    });
    // The daemon up (a D-Bus call activates it), so its Varlink socket is there.
    assert!(bus.banger_as(None, &["status"]).status.success());
    let facade = Facade::start(&bus, USER_OK, 3011);
    facade.sdk(&bus, USER_OK, &["base"]);
}
