//! The integration harness: a private system bus of its own (no `<user>`, no
//! `<servicehelper>`) inside a mount namespace where polkit's action and rules directories are
//! the project's own files, a real polkitd and a real `bangerd`, both started by bus
//! activation, and real test users. Everything runs as root; when something is missing the
//! tests skip, unless `BANGER_REQUIRE_INTEGRATION=1`, when they fail.

#![allow(dead_code)]

pub mod cri;
pub mod invariants;
pub mod oci;
pub mod scenario;
pub mod vm;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

use zbus::Connection;

/// The group the shipped polkit rules authorise.
pub const GROUP: &str = "banger";
/// A member of `banger`.
pub const USER_OK: &str = "banger-it-ok";
/// A user in no special group.
pub const USER_NO: &str = "banger-it-no";
/// A second member of the group, for what members may not do to each other.
pub const USER_OK2: &str = "banger-it-ok2";
/// A member an operator's rule (every test bus has it) grants `manage-any`, as a site grants
/// its administrators without making them root.
pub const USER_ADMIN: &str = "banger-it-admin";

/// The repository's root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Whether the integration tests can run here; panics instead of skipping when CI asks.
pub fn available(tools: &[&str]) -> bool {
    let mut missing: Vec<String> = tools
        .iter()
        .filter(|t| !have(t))
        .map(|t| t.to_string())
        .collect();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root".into());
    }
    if !Path::new("/usr/lib/polkit-1/polkitd").exists() {
        missing.push("polkitd".into());
    }
    if missing.is_empty() {
        return true;
    }
    if std::env::var("BANGER_REQUIRE_INTEGRATION").as_deref() == Ok("1") {
        panic!(
            "integration test requirements missing: {}",
            missing.join(", ")
        );
    }
    eprintln!(
        "SKIPPED: integration test requirements missing: {}",
        missing.join(", ")
    );
    false
}

/// Waits until `ready` holds (checked every 20 ms) for at most `limit`; panics naming `what`
/// when it never did. For a test that must wait for a condition, never a fixed sleep.
#[allow(dead_code)]
pub fn wait_until(what: &str, limit: Duration, ready: impl FnMut() -> bool) {
    assert!(
        poll_until(limit, Duration::from_millis(20), ready),
        "{what}: not within {limit:?}"
    );
}

/// [`wait_until`] in an async test: sleeps on the runtime between checks, never blocking it.
#[allow(dead_code)]
pub async fn wait_until_async(what: &str, limit: Duration, ready: impl FnMut() -> bool) {
    assert!(
        poll_until_async(limit, Duration::from_millis(20), ready).await,
        "{what}: not within {limit:?}"
    );
}

/// Checks `ready` every `every` until it holds or `limit` has passed; whether it held. For a
/// wait whose failure the caller explains itself (with what it saw last).
#[allow(dead_code)]
pub fn poll_until(limit: Duration, every: Duration, mut ready: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if ready() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(every);
    }
}

/// [`poll_until`] in an async test.
#[allow(dead_code)]
pub async fn poll_until_async(
    limit: Duration,
    every: Duration,
    mut ready: impl FnMut() -> bool,
) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if ready() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(every).await;
    }
}

/// Reads lines from `r` until one contains `marker` (a program saying it is ready); panics
/// when the stream ends first, naming `who`.
#[allow(dead_code)]
pub fn read_until<R: std::io::BufRead>(r: &mut R, marker: &str, who: &str) {
    let mut line = String::new();
    while !line.contains(marker) {
        line.clear();
        assert!(r.read_line(&mut line).unwrap() > 0, "{who} ended");
    }
}

/// Creates the `banger` group and the three test users once per test process.
pub fn ensure_users() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let ok = |c: &mut Command| {
            let out = c.output().expect("run user tools");
            // 9 = the group or user exists already.
            assert!(
                out.status.success() || out.status.code() == Some(9),
                "{out:?}"
            );
        };
        ok(Command::new("groupadd").args(["--system", GROUP]));
        ok(Command::new("useradd").args(["-M", "-N", "-G", GROUP, USER_OK]));
        ok(Command::new("useradd").args(["-M", "-N", "-G", GROUP, USER_OK2]));
        ok(Command::new("useradd").args(["-M", "-N", "-G", GROUP, USER_ADMIN]));
        ok(Command::new("useradd").args(["-M", "-N", USER_NO]));
        // Users left by an earlier run keep their membership even if the group was made
        // again since (a package's purge removes it).
        for member in [USER_OK, USER_OK2, USER_ADMIN] {
            ok(Command::new("usermod").args(["-a", "-G", GROUP, member]));
        }
    });
}

/// The uid of a user.
pub fn uid_of(user: &str) -> u32 {
    let out = Command::new("id").args(["-u", user]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// How to set up a bus.
#[derive(Clone)]
pub struct BusOptions {
    /// Install the activation file for `bangerd` (off when a test serves in-process).
    pub activate_bangerd: bool,
    /// `idle_exit_sec` in the daemon's config.
    pub idle_exit_sec: u64,
    /// Run a journald of its own in the bus's mount namespace, so the daemon logs to a
    /// real journal.
    pub journal: bool,
    /// Put the daemon's runtime directory on tmpfs, as `/run/banger` is on systemd hosts.
    pub runtime_on_tmpfs: bool,
    /// More lines for the daemon's config.toml.
    pub extra_config: String,
    /// Run the bus, and so the daemon and its VMs, in a network namespace of its own (only
    /// loopback up): banger's bridge, taps and nft table never touch the host's.
    pub netns: bool,
    /// The daemon's state directory, when it must outlive this bus (one bus prepares images
    /// with the host's network, the next boots VMs in a namespace).
    pub state_dir: Option<PathBuf>,
    /// A folder searched before the host's `PATH` for the programs the daemon runs (a newer
    /// QEMU's, see [`newer_qemu`]).
    pub path_first: Option<PathBuf>,
}

impl Default for BusOptions {
    fn default() -> Self {
        BusOptions {
            activate_bangerd: true,
            idle_exit_sec: 0,
            journal: false,
            runtime_on_tmpfs: false,
            extra_config: String::new(),
            netns: false,
            state_dir: None,
            path_first: None,
        }
    }
}

/// A private system bus with polkitd and (optionally) bangerd activatable on it.
pub struct TestBus {
    /// Keeps the directory alive.
    pub dir: tempfile::TempDir,
    /// The bus address.
    pub address: String,
    child: Child,
    /// The daemon's runtime directory.
    pub runtime: PathBuf,
    state: PathBuf,
    _runtime_tmpfs: Option<tempfile::TempDir>,
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

fn chmod(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

impl TestBus {
    /// Starts the bus; nothing on it runs until a call activates it.
    pub fn start(opts: BusOptions) -> TestBus {
        ensure_users();
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        chmod(d, 0o755);
        let sock = d.join("bus.sock");
        write(
            &d.join("bus.conf"),
            &format!(
                r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={sock}</listen>
  <auth>EXTERNAL</auth>
  <servicedir>{d}/services</servicedir>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Properties"/>
  </policy>
  <policy user="root">
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Monitoring"/>
  </policy>
  <includedir>/usr/share/dbus-1/system.d</includedir>
  <includedir>{d}/system.d</includedir>
</busconfig>
"#,
                sock = sock.display(),
                d = d.display()
            ),
        );
        // The project's own bus policy, polkit policy and rules, as a package installs them.
        std::fs::create_dir_all(d.join("system.d")).unwrap();
        std::fs::copy(
            repo().join("dbus/org.banger.conf"),
            d.join("system.d/org.banger.conf"),
        )
        .unwrap();
        for (sub, src) in [
            ("actions", "polkit/org.banger.policy"),
            ("rules", "polkit/50-banger.rules"),
        ] {
            let target = d.join(sub);
            std::fs::create_dir_all(&target).unwrap();
            chmod(&target, 0o755);
            let file = target.join(Path::new(src).file_name().unwrap());
            std::fs::copy(repo().join(src), &file).unwrap();
            chmod(&file, 0o644);
        }
        // An operator's own rule, read before the shipped one: USER_ADMIN manages anyone's.
        let admin = d.join("rules/40-banger-tests.rules");
        write(
            &admin,
            &format!(
                "polkit.addRule(function(action, subject) {{\n\
                 \x20   if (action.id == \"org.banger.vms.manage-any\" && subject.user == \"{USER_ADMIN}\")\n\
                 \x20       return polkit.Result.YES;\n\
                 }});\n"
            ),
        );
        chmod(&admin, 0o644);
        write(
            &d.join("services/org.freedesktop.PolicyKit1.service"),
            "[D-BUS Service]\nName=org.freedesktop.PolicyKit1\nExec=/usr/lib/polkit-1/polkitd --no-debug\nUser=root\n",
        );
        write(
            &d.join("config.toml"),
            &format!(
                "idle_exit_sec = {}\n{}{}{}",
                opts.idle_exit_sec,
                // Template VMs for warm snapshots only where a test asks for them: each
                // is one more boot on the CI's two cores.
                if opts.extra_config.contains("warm_snapshots") {
                    ""
                } else {
                    "warm_snapshots = false\n"
                },
                // The static guest binaries tests/run builds.
                std::env::var("BANGER_GUEST_BIN_DIR")
                    .map(|d| format!("guest_bin_dir = \"{d}\"\n"))
                    .unwrap_or_default(),
                // Last: it may hold [[tables]].
                opts.extra_config,
            ),
        );
        let runtime_tmpfs = opts
            .runtime_on_tmpfs
            .then(|| tempfile::tempdir_in("/dev/shm").unwrap());
        let runtime = runtime_tmpfs
            .as_ref()
            .map(|t| t.path().to_owned())
            .unwrap_or_else(|| d.join("run"));
        let state = opts.state_dir.clone().unwrap_or_else(|| d.join("state"));
        if opts.activate_bangerd {
            write(
                &d.join("services/org.banger.service"),
                &format!(
                    "[D-BUS Service]\nName=org.banger\nExec={bin} --state-dir {s} --runtime-dir {r} --config {d}/config.toml\nUser=root\n",
                    bin = env!("CARGO_BIN_EXE_bangerd"),
                    s = state.display(),
                    d = d.display(),
                    r = runtime.display()
                ),
            );
        }
        let journal = if opts.journal {
            // tmpfs over the journal's directories: this journald is the namespace's own.
            format!(
                "mount -t tmpfs tmpfs /run/systemd; mkdir -p /run/log; mount -t tmpfs tmpfs /run/log; \
                 /lib/systemd/systemd-journald </dev/null >/dev/null 2>&1 & echo $! > {d}/journald.pid; \
                 for i in $(seq 100); do [ -S /run/systemd/journal/socket ] && break; sleep 0.05; done; ",
                d = d.display()
            )
        } else {
            String::new()
        };
        let netns = if opts.netns {
            "ip link set lo up; "
        } else {
            ""
        };
        let script = format!(
            "set -e; {netns}mount --bind {d}/actions /usr/share/polkit-1/actions; \
             mkdir -p /etc/polkit-1/rules.d; mount --bind {d}/rules /etc/polkit-1/rules.d; \
             {journal}exec dbus-daemon --config-file={d}/bus.conf --nofork --print-address",
            d = d.display()
        );
        let mut unshare = Command::new("unshare");
        unshare.args(["--mount", "--propagation", "private"]);
        if opts.netns {
            unshare.arg("--net");
        }
        if let Some(first) = &opts.path_first {
            let path = std::env::var("PATH").unwrap_or_default();
            unshare.env("PATH", format!("{}:{path}", first.display()));
        }
        let mut child = unshare
            .args(["sh", "-c", &script])
            .env("BANGER_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start dbus-daemon");
        let mut line = String::new();
        {
            use std::io::BufRead;
            let stdout = child.stdout.take().unwrap();
            std::io::BufReader::new(stdout)
                .read_line(&mut line)
                .unwrap();
        }
        assert!(
            line.starts_with("unix:"),
            "dbus-daemon did not start: {line:?}"
        );
        TestBus {
            dir,
            address: format!("unix:path={}", sock.display()),
            child,
            runtime,
            state,
            _runtime_tmpfs: runtime_tmpfs,
        }
    }

    /// The daemon's state directory.
    pub fn state_dir(&self) -> PathBuf {
        self.state.clone()
    }

    /// A process in the bus's network namespace (to `nsenter -t` it).
    pub fn netns_pid(&self) -> u32 {
        self.child.id()
    }

    /// `program` in the bus's network namespace (the daemon's and its VMs').
    pub fn in_netns(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.args(["-t", &self.child.id().to_string(), "-n", "--", program]);
        c
    }

    /// `program` in the bus's network and mount namespaces (what the daemon sees: a network
    /// namespace `ip netns add` names there is one the daemon can open).
    pub fn in_namespaces(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.args([
            "-t",
            &self.child.id().to_string(),
            "-n",
            "-m",
            "--",
            program,
        ]);
        c
    }

    /// `sh -c script` in the bus's network and mount namespaces, which must succeed; its
    /// stdout.
    pub fn sh_in_namespaces(&self, script: &str) -> String {
        let out = self
            .in_namespaces("sh")
            .args(["-c", script])
            .output()
            .unwrap();
        assert!(out.status.success(), "{script}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A new client connection as root.
    pub async fn connect(&self) -> Connection {
        zbus::connection::Builder::address(self.address.as_str())
            .build()
            .await
            .expect("connect to the test bus")
    }

    pub fn command_as(&self, user: Option<&str>, program: &str, args: &[&str]) -> Command {
        // Every client call is bounded: a call that never returns fails its test after ten
        // minutes (exit status 124) instead of holding CI until its deadline.
        let bounded = ["timeout", "-k", "10", "600", program];
        let mut c = match user {
            Some(u) => {
                let mut c = Command::new("runuser");
                c.args(["-u", u, "--"]).args(bounded);
                c
            }
            None => {
                let mut c = Command::new(bounded[0]);
                c.args(&bounded[1..]);
                c
            }
        };
        c.args(args)
            .env("DBUS_SYSTEM_BUS_ADDRESS", &self.address)
            .stdin(Stdio::null());
        c
    }

    /// Runs `gdbus call` on the manager as `user`; `interactive` sets
    /// ALLOW_INTERACTIVE_AUTHORIZATION on the message.
    pub fn gdbus_as(
        &self,
        user: Option<&str>,
        interactive: bool,
        path: &str,
        method: &str,
        args: &[&str],
    ) -> Output {
        let mut all = vec![
            "call",
            "--address",
            &self.address,
            "--dest",
            "org.banger",
            "--object-path",
            path,
            "--method",
            method,
            // gdbus gives up after 25 s by default; a kernel import on a loaded CI machine
            // once took longer (8 s usually). A slow answer is not what these tests check.
            "--timeout",
            "600",
        ];
        if interactive {
            all.push("--interactive");
        }
        all.extend_from_slice(args);
        self.command_as(user, "gdbus", &all).output().unwrap()
    }

    /// Runs `busctl` against the bus as `user`.
    pub fn busctl_as(&self, user: Option<&str>, args: &[&str]) -> Output {
        let addr = format!("--address={}", self.address);
        let mut all = vec![addr.as_str()];
        all.extend_from_slice(args);
        self.command_as(user, "busctl", &all).output().unwrap()
    }

    /// The `banger` CLI as `user`, in the caller's process group (for a terminal of the
    /// test's: `timeout` would put it in a background group, which may not read the tty).
    pub fn banger_on_terminal(&self, user: &str, args: &[&str]) -> Command {
        let mut c = Command::new("runuser");
        c.args(["-u", user, "--", env!("CARGO_BIN_EXE_banger")])
            .args(args)
            .env("DBUS_SYSTEM_BUS_ADDRESS", &self.address);
        c
    }

    /// The `banger` CLI as `user`, to spawn.
    pub fn banger_command(&self, user: Option<&str>, args: &[&str]) -> Command {
        self.command_as(user, env!("CARGO_BIN_EXE_banger"), args)
    }

    /// Runs the `banger` CLI as `user`.
    pub fn banger_as(&self, user: Option<&str>, args: &[&str]) -> Output {
        self.command_as(user, env!("CARGO_BIN_EXE_banger"), args)
            .output()
            .unwrap()
    }

    /// The pid owning `name`, if any.
    pub async fn owner_pid(&self, conn: &Connection, name: &str) -> Option<u32> {
        let dbus = zbus::fdo::DBusProxy::new(conn).await.unwrap();
        let name = zbus::names::BusName::try_from(name).unwrap();
        dbus.get_connection_unix_process_id(name).await.ok()
    }

    /// Waits (bounded) until nobody owns `name`.
    pub async fn wait_name_gone(&self, conn: &Connection, name: &str, limit: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < limit {
            if self.owner_pid(conn, name).await.is_none() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }

    /// Waits until the bus no longer names `pid` as `name`'s owner: it has seen that process
    /// go. Another owner may already hold the name (a call sent after the kill activates the next
    /// daemon), which `wait_name_gone` would wait out in vain.
    pub async fn wait_owner_gone(
        &self,
        conn: &Connection,
        name: &str,
        pid: u32,
        limit: Duration,
    ) -> bool {
        let start = Instant::now();
        while start.elapsed() < limit {
            if self.owner_pid(conn, name).await != Some(pid) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }

    /// Stops polkitd for good: no activation file, then kill it.
    pub async fn stop_polkit(&self, conn: &Connection) {
        std::fs::remove_file(
            self.dir
                .path()
                .join("services/org.freedesktop.PolicyKit1.service"),
        )
        .unwrap();
        let dbus = zbus::fdo::DBusProxy::new(conn).await.unwrap();
        dbus.reload_config().await.unwrap();
        if let Some(pid) = self.owner_pid(conn, "org.freedesktop.PolicyKit1").await {
            // SAFETY: plain kill(2) of a pid we just looked up.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        assert!(
            self.wait_name_gone(conn, "org.freedesktop.PolicyKit1", Duration::from_secs(10))
                .await
        );
    }
}

impl TestBus {
    /// The journal entries of `identifier` in this bus's namespace, as JSON objects.
    pub fn journal(&self, identifier: &str) -> Vec<serde_json::Value> {
        let out = Command::new("nsenter")
            .args([
                "-t",
                &self.child.id().to_string(),
                "-m",
                "journalctl",
                "--no-pager",
                "-o",
                "json",
            ])
            .arg(format!("SYSLOG_IDENTIFIER={identifier}"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

impl Drop for TestBus {
    fn drop(&mut self) {
        // bangerd and polkitd exit when their bus goes away; journald does not.
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Ok(pid) = std::fs::read_to_string(self.dir.path().join("journald.pid")) {
            if let Ok(pid) = pid.trim().parse::<i32>() {
                // SAFETY: plain kill(2) of the journald this bus started.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
        }
        // VMM processes outlive bangerd by design; a failed test must not leak them.
        for pid in processes_mentioning(&self.runtime.to_string_lossy()) {
            // SAFETY: plain kill(2) of a process whose command line names this bus's runtime dir.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Processes whose command line contains `marker`.
pub fn processes_mentioning(marker: &str) -> Vec<i32> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(c) = std::fs::read(e.path().join("cmdline")) {
            if String::from_utf8_lossy(&c).contains(marker) && pid != std::process::id() as i32 {
                found.push(pid);
            }
        }
    }
    found
}

/// Extracts `<interface name="NAME">…</interface>` from introspection XML, each line trimmed.
pub fn interface_block(xml: &str, name: &str) -> Option<String> {
    let start = xml.find(&format!("<interface name=\"{name}\">"))?;
    let end = start + xml[start..].find("</interface>")? + "</interface>".len();
    Some(
        xml[start..end]
            .lines()
            .map(str::trim)
            .collect::<Vec<_>>()
            .join("\n"),
    )
}

/// Introspects `path` on `org.banger`.
pub async fn introspect(conn: &Connection, path: &str) -> String {
    let p = zbus::fdo::IntrospectableProxy::builder(conn)
        .destination("org.banger")
        .path(path)
        .build()
        .await
        .unwrap();
    p.introspect().await.unwrap()
}

/// Asserts the running service's `iface` at `path` equals `dbus/<iface>.xml`; with
/// `BANGER_UPDATE_DBUS_XML=1` rewrites the file instead (then review the diff).
pub async fn assert_interface_matches_file(conn: &Connection, path: &str, iface: &str) {
    let live = introspect(conn, path).await;
    let live_block =
        interface_block(&live, iface).unwrap_or_else(|| panic!("{iface} not at {path}"));
    let file = repo().join("dbus").join(format!("{iface}.xml"));
    if std::env::var("BANGER_UPDATE_DBUS_XML").as_deref() == Ok("1") {
        let raw_start = live.find(&format!("<interface name=\"{iface}\">")).unwrap();
        let raw_end = raw_start + live[raw_start..].find("</interface>").unwrap() + 12;
        let doc = format!(
            "<!DOCTYPE node PUBLIC \"-//freedesktop//DTD D-BUS Object Introspection 1.0//EN\"\n \"http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd\">\n<node>\n  {}\n</node>\n",
            &live[raw_start..raw_end]
        );
        std::fs::write(&file, doc).unwrap();
        return;
    }
    let text = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let file_block = interface_block(&text, iface).expect("interface in the file");
    assert_eq!(
        live_block, file_block,
        "{iface}: the running service differs from {}; run the tests with BANGER_UPDATE_DBUS_XML=1 and review",
        file.display()
    );
}

/// The text a failed command printed, for assertions.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The unpacked kernel package: (vmlinuz, modules dir, version).
pub fn debian_kernel() -> Option<(PathBuf, PathBuf, String)> {
    let deb = match std::env::var("BANGER_TEST_KERNEL_DEB") {
        Ok(d) => PathBuf::from(d),
        Err(_) if std::env::var("BANGER_REQUIRE_INTEGRATION").as_deref() == Ok("1") => {
            panic!("BANGER_TEST_KERNEL_DEB is not set: run the tests through tests/run")
        }
        Err(_) => {
            eprintln!("SKIPPED: BANGER_TEST_KERNEL_DEB is not set (tests/run sets it)");
            return None;
        }
    };
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(deb.with_extension("unpacked").file_name().unwrap());
    static UNPACK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = UNPACK.lock().unwrap_or_else(|p| p.into_inner());
    if !root.exists() {
        let tmp = root.with_extension(format!("unpacking-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let ok = Command::new("dpkg-deb")
            .arg("-x")
            .arg(&deb)
            .arg(&tmp)
            .status()
            .unwrap()
            .success();
        assert!(ok, "dpkg-deb -x {}", deb.display());
        std::fs::rename(&tmp, &root).unwrap();
    }
    let version = std::fs::read_dir(root.join("lib/modules"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .file_name();
    let version = version.to_string_lossy().to_string();
    Some((
        root.join(format!("boot/vmlinuz-{version}")),
        root.join(format!("lib/modules/{version}")),
        version,
    ))
}

/// How many times banger's initrd `initrd` names the entry that says its kernel has virtio's
/// PCI transport.
pub fn virtio_pci_marks(initrd: &Path) -> usize {
    let mark = banger::kernels::initrd::VIRTIO_PCI_MARK.as_bytes();
    let data = std::fs::read(initrd).unwrap();
    data.windows(mark.len()).filter(|w| *w == mark).count()
}

/// Makes banger's initrd `initrd`, marked for virtio's PCI transport, read as one an older
/// banger built: the entry's name changed, its size kept. The next daemon builds it again.
pub fn unmark_virtio_pci(initrd: &Path) {
    let mark = banger::kernels::initrd::VIRTIO_PCI_MARK.as_bytes();
    let mut data = std::fs::read(initrd).unwrap();
    let at = data
        .windows(mark.len())
        .position(|w| w == mark)
        .expect("the initrd says its kernel has virtio_pci");
    data[at + mark.len() - 1] = b'X';
    std::fs::write(initrd, &data).unwrap();
}

/// The folder holding a QEMU newer than the host's (`qemu-system-x86_64` of Debian's
/// bookworm-backports, which tests/run unpacks: QEMU 8.2 and later save virtio-fs devices),
/// or `None` (skip) outside tests/run.
#[allow(dead_code)]
pub fn newer_qemu() -> Option<PathBuf> {
    match std::env::var("BANGER_TEST_NEWER_QEMU") {
        Ok(d) => Some(PathBuf::from(d)),
        Err(_) => {
            assert!(
                std::env::var("BANGER_REQUIRE_INTEGRATION").as_deref() != Ok("1"),
                "BANGER_TEST_NEWER_QEMU is not set: run through tests/run"
            );
            eprintln!("SKIPPED: BANGER_TEST_NEWER_QEMU is not set (tests/run unpacks it)");
            None
        }
    }
}

/// The static guest binaries' directory tests/run builds, or `None` (skip) outside it.
pub fn guest_bins() -> Option<PathBuf> {
    match std::env::var("BANGER_GUEST_BIN_DIR") {
        Ok(d) => Some(PathBuf::from(d)),
        Err(_) => {
            assert!(
                std::env::var("BANGER_REQUIRE_INTEGRATION").as_deref() != Ok("1"),
                "BANGER_GUEST_BIN_DIR is not set: run through tests/run"
            );
            eprintln!("SKIPPED: BANGER_GUEST_BIN_DIR is not set (tests/run builds the static guest binaries)");
            None
        }
    }
}

/// An `a{sv}` options map.
#[allow(dead_code)]
pub fn opt(
    entries: &[(&str, zbus::Variant<'static>)],
) -> std::collections::HashMap<String, zbus::OwnedVariant> {
    entries
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                zbus::OwnedVariant::try_from(v.clone()).unwrap(),
            )
        })
        .collect()
}

/// Waits for job `id` to end; returns its result and error, as the store recorded them.
#[allow(dead_code)]
pub async fn job_result(bus: &TestBus, id: u32) -> (String, String) {
    let store = banger::store::Store::open(&bus.state_dir().join("banger.db")).unwrap();
    for _ in 0..6000 {
        let rec = store
            .call_blocking(move |c| banger::store::rows::find_job(c, id))
            .unwrap();
        if let Some(r) = rec.filter(|r| r.state != "running") {
            return (r.state, r.error);
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("job {id} did not end within 10 minutes");
}

/// A program on a pseudo-terminal the test holds the other end of, as a person at a
/// terminal runs it: what it writes is collected, keys are written to it.
pub struct PtyRun {
    /// The program.
    pub child: std::process::Child,
    master: std::fs::File,
    seen: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

impl PtyRun {
    /// Starts `cmd` with a new terminal as its stdin, stdout, stderr and controlling terminal.
    pub fn start(mut cmd: Command) -> PtyRun {
        use std::os::fd::{AsRawFd, FromRawFd};
        use std::os::unix::process::CommandExt;
        // SAFETY: posix_openpt returns a new descriptor or -1.
        let m = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
        assert!(m >= 0);
        // SAFETY: a new descriptor this function owns.
        let master = unsafe { std::fs::File::from_raw_fd(m) };
        let mut name = [0 as libc::c_char; 128];
        // SAFETY: the master descriptor; ptsname_r writes at most name.len() bytes.
        unsafe {
            assert_eq!(libc::grantpt(m), 0);
            assert_eq!(libc::unlockpt(m), 0);
            assert_eq!(libc::ptsname_r(m, name.as_mut_ptr(), name.len()), 0);
        }
        // SAFETY: ptsname_r NUL-terminated it.
        let path = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        let slave = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let ws = libc::winsize {
            ws_row: 40,
            ws_col: 120,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize.
        unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        cmd.stdin(slave.try_clone().unwrap())
            .stdout(slave.try_clone().unwrap())
            .stderr(slave);
        // SAFETY: setsid and ioctl only, between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                libc::ioctl(0, libc::TIOCSCTTY, 0);
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (mut r, s) = (master.try_clone().unwrap(), seen.clone());
        std::thread::spawn(move || {
            use std::io::Read;
            let mut buf = [0u8; 4096];
            while let Ok(n) = r.read(&mut buf) {
                if n == 0 {
                    break;
                }
                s.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        PtyRun {
            child,
            master,
            seen,
        }
    }

    /// Types `keys`.
    pub fn type_keys(&mut self, keys: &str) {
        use std::io::Write;
        self.master.write_all(keys.as_bytes()).unwrap();
    }

    /// Everything written so far.
    pub fn output(&self) -> String {
        String::from_utf8_lossy(&self.seen.lock().unwrap()).into_owned()
    }

    /// Waits until the output holds `text` (panics with the output after `limit`: the
    /// program never wrote it).
    pub fn wait_for(&self, text: &str, limit: std::time::Duration) {
        let deadline = std::time::Instant::now() + limit;
        while !self.output().contains(text) {
            assert!(
                std::time::Instant::now() < deadline,
                "{text:?} never came; the terminal shows:\n{}",
                self.output()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// Waits for the program's exit status.
    pub fn wait(mut self) -> Option<i32> {
        self.child.wait().unwrap().code()
    }
}

/// A python3 every test user can run (a python under /root is not theirs to read).
fn python() -> &'static str {
    if std::path::Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

/// Calls `interface.method(params)` through the `varlink` package as `user`; each reply (or
/// the error, as `{"error", "parameters"}`) is a line of JSON.
const CLIENT: &str = r#"
import json, sys, varlink
sock, iface, method, params, more = sys.argv[1:6]
params = json.loads(params)
with varlink.Client(address="unix:" + sock) as client:
    with client.open(iface, namespaced=False) as con:
        fn = getattr(con, method)
        try:
            if more == "more":
                for r in fn(**params, _more=True):
                    print(json.dumps(r), flush=True)
            else:
                print(json.dumps(fn(**params)), flush=True)
        except varlink.VarlinkError as e:
            print(json.dumps({"error": e.error(), "parameters": e.parameters()}), flush=True)
"#;

/// The replies of one call through the PyPI client.
pub fn py_call(
    bus: &TestBus,
    user: Option<&str>,
    method: &str,
    params: serde_json::Value,
    more: bool,
) -> Vec<serde_json::Value> {
    py_call_at(
        bus,
        user,
        &bus.runtime.join("io.banger"),
        method,
        params,
        more,
    )
}

/// The replies of one call through the PyPI client on the socket `sock`.
pub fn py_call_at(
    bus: &TestBus,
    user: Option<&str>,
    sock: &Path,
    method: &str,
    params: serde_json::Value,
    more: bool,
) -> Vec<serde_json::Value> {
    let dir = repo().join("target/test-python");
    let (iface, name) = method.rsplit_once('.').unwrap();
    let p = params.to_string();
    let out = bus
        .command_as(
            user,
            python(),
            &[
                "-c",
                CLIENT,
                sock.to_str().unwrap(),
                iface,
                name,
                &p,
                if more { "more" } else { "one" },
            ],
        )
        .env("PYTHONPATH", &dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{method}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{method}: {e}: {l}")))
        .collect()
}

/// An image row as an earlier daemon would have written it (its files need not exist).
pub fn image_row(state: &Path, name: &str, kernel: &str) -> banger::model::Image {
    banger::model::Image {
        id: banger::model::new_id(),
        name: name.into(),
        managed: true,
        source: "docker.io/library/debian:bookworm".into(),
        rootfs_path: state.join("images/x/rootfs.ext4"),
        work_seed_path: None,
        kernel: Some(kernel.into()),
        size_bytes: 1 << 30,
        created_at: banger::model::now_us(),
        ready_ports: Vec::new(),
        config: Default::default(),
        owner_uid: 0,
    }
}

/// A kernel row as an earlier daemon would have written it (its files need not exist).
pub fn kernel_row(state: &Path, name: &str, initrd: bool) -> banger::model::Kernel {
    let dir = state.join("kernels").join(name);
    banger::model::Kernel {
        name: name.into(),
        version: "6.1.0-30-amd64".into(),
        source: "catalog:debian".into(),
        kernel_path: dir.join("vmlinux"),
        initrd_path: initrd.then(|| dir.join("initrd.img")),
        modules_dir: None,
        created_at: banger::model::now_us(),
        owner_uid: 0,
    }
}

/// A small deterministic generator (splitmix64) for the suites that print their seed.
pub struct SplitMix(pub u64);

impl SplitMix {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    pub fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
    pub fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len())]
    }
}

/// A VM row as an earlier daemon would have written it (stopped, never booted here).
pub fn vm_row(
    name: &str,
    image: &banger::model::Image,
    owner: u32,
    cid: u32,
    kernel: &str,
) -> banger::model::Vm {
    banger::model::Vm {
        id: banger::model::new_id(),
        name: name.into(),
        state: banger::model::VmState::Stopped,
        stage: "ready".into(),
        image_id: image.id.clone(),
        kernel: kernel.into(),
        vcpus: 2,
        memory_mib: 1024,
        disk_size: 1 << 30,
        owner_uid: owner,
        guest_address: format!("10.219.0.{cid}"),
        mac_address: format!("52:54:00:00:00:{cid:02x}"),
        vsock_cid: cid,
        tap_name: format!("bgr{cid}"),
        ssh_address: String::new(),
        created_at: banger::model::now_us(),
        ssh_host_key: String::new(),
        network: Default::default(),
        egress: Vec::new(),
        init: String::new(),
        main: Vec::new(),
        exit_status: -1,
        publish: Vec::new(),
        shares: Vec::new(),
        snapshot: String::new(),
        machine: String::new(),
        labels: Default::default(),
        expires_at: 0,
        on_expire: Default::default(),
        rootfs_dir: String::new(),
        netns: String::new(),
    }
}
