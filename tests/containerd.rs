//! banger as a containerd runtime (issue 36, first part): Debian's containerd, started by the
//! test with a configuration of its own (root, state and socket under the test's directory),
//! pulls the tests' busybox image from the registry on the bus's loopback, and `ctr run
//! --runtime io.containerd.banger.v2` runs its process in a banger VM booted from the
//! bundle's rootfs: output, exit status, stdin, a terminal; a detached task's processes, an
//! exec, pause and resume, a kill and its removal; nothing left after.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::invariants::*;
use common::vm::*;
use common::*;

/// containerd in the bus's network namespace, with the shim on its PATH and told where
/// bangerd's Varlink socket is.
struct Containerd {
    child: std::sync::Mutex<Child>,
    socket: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

/// containerd in the bus's network and mount namespaces (bangerd must see the mounts the shim
/// makes; on a host, its unit's namespace receives the host's mounts), its configuration and
/// log in `dir`; its shims give metrics in cgroup version `cgroups`' types.
fn spawn_containerd(bus: &TestBus, dir: &std::path::Path, cgroups: &str) -> Child {
    // Built beside banger (the workspace's binaries share one directory).
    let shim_dir = std::path::Path::new(env!("CARGO_BIN_EXE_banger"))
        .parent()
        .unwrap()
        .to_owned();
    assert!(
        shim_dir.join("containerd-shim-banger-v2").exists(),
        "build the shim first (cargo build -p banger-shim)"
    );
    let path = format!(
        "{}:{}",
        shim_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("containerd.log"))
        .unwrap();
    Command::new("nsenter")
        .args([
            "-t",
            &bus.netns_pid().to_string(),
            "-n",
            "-m",
            "--",
            "containerd",
        ])
        .args(["--config", dir.join("config.toml").to_str().unwrap()])
        .env("PATH", path)
        .env("BANGER_VARLINK", bus.runtime.join("io.banger"))
        .env("BANGER_SHIM_CGROUPS", cgroups)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap();
        let _ = child.kill();
        let _ = child.wait();
        // Shims outlive their containerd by design: a test that failed half-way must not leave
        // its own behind (they are found by this containerd's address on their command line).
        for pid in processes_mentioning(&format!("-address\x00{}", self.socket.display())) {
            // SAFETY: kill takes no pointers.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

impl Containerd {
    /// containerd without its CRI plugin.
    fn start(bus: &TestBus) -> Containerd {
        Containerd::start_with(bus, |_| {
            "disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n".into()
        })
    }

    /// containerd with `plugins(dir)` in its configuration after `root`, `state` and
    /// `disabled_plugins`' place.
    fn start_with(bus: &TestBus, plugins: impl Fn(&std::path::Path) -> String) -> Containerd {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("containerd.sock");
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n{plugins}\
                 [grpc]\n  address = \"{sock}\"\n[ttrpc]\n  address = \"{sock}.ttrpc\"\n",
                root = dir.path().join("root").display(),
                state = dir.path().join("state").display(),
                sock = socket.display(),
                plugins = plugins(dir.path()),
            ),
        )
        .unwrap();
        let child = spawn_containerd(bus, dir.path(), "v1");
        let c = Containerd {
            child: std::sync::Mutex::new(child),
            socket,
            _dir: dir,
        };
        wait_until("containerd to serve", Duration::from_secs(60), || {
            c.ctr(bus, &["version"]).status.success()
        });
        c
    }

    /// containerd killed and started again on the same state (its shims run on); the shims it
    /// starts from then on give cgroup v2 metrics.
    fn restart(&self, bus: &TestBus) {
        {
            let mut child = self.child.lock().unwrap();
            let _ = child.kill();
            let _ = child.wait();
            *child = spawn_containerd(bus, self._dir.path(), "v2");
        }
        wait_until("containerd to serve again", Duration::from_secs(60), || {
            self.ctr(bus, &["version"]).status.success()
        });
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("containerd.log")).unwrap_or_default()
    }

    fn ctr_cmd(&self, bus: &TestBus, args: &[&str]) -> Command {
        let mut c = bus.in_netns("ctr");
        c.args(["--address", self.socket.to_str().unwrap()])
            .args(args);
        c
    }

    /// Task `id` SIGKILLed, then it and its container removed.
    fn kill_and_remove(&self, bus: &TestBus, id: &str) {
        for args in [
            &["task", "kill", "-s", "SIGKILL", id][..],
            &["task", "rm", "-f", id],
            &["container", "rm", id],
        ] {
            let out = self.ctr(bus, args);
            assert!(out.status.success(), "ctr {args:?}: {}", text(&out));
        }
    }

    fn ctr(&self, bus: &TestBus, args: &[&str]) -> Output {
        self.ctr_cmd(bus, args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }
}

/// `ctr task metrics` of a running 256 MiB task, by the names its cgroup version gives them:
/// memory used below its limit, which is the VM's, CPU time and processes counted.
fn metrics_hold(out: &Output, [usage, limit, cpu]: [&str; 3]) {
    let m = |name: &str| metric_of(out, name);
    assert!(
        0 < m(usage)
            && m(usage) < m(limit)
            && m(limit) <= 256 << 20
            && m(cpu) > 0
            && m("pids.current") > 0,
        "{}",
        text(out)
    );
}

/// The value of metric `name` (a line's start) in `ctr task metrics`' output.
fn metric_of(out: &Output, name: &str) -> u64 {
    text(out)
        .lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in ctr task metrics: {}", text(out)))
}

#[tokio::test(flavor = "multi_thread")]
async fn ctr_runs_a_containers_process_in_a_banger_vm_through_the_banger_runtime() {
    if !available(&["containerd", "ctr"]) {
        return;
    }
    let Some((bus, reference, _keep)) = image_bus("", "ctr/tiny").await else {
        return;
    };
    // The test bus activates bangerd over D-Bus (its Varlink socket, which the shim calls,
    // is served while it runs; on a host, systemd's socket starts it).
    let out = bus.banger_as(None, &["status"]);
    assert!(out.status.success(), "{}", text(&out));
    let containerd = Containerd::start(&bus);
    let out = containerd.ctr(&bus, &["image", "pull", "--plain-http", &reference]);
    assert!(out.status.success(), "ctr image pull: {}", text(&out));
    // containerd's events, as a client sees them, for the whole test.
    let events_file = tempfile::NamedTempFile::new().unwrap();
    let mut events = containerd
        .ctr_cmd(&bus, &["events"])
        .stdin(Stdio::null())
        .stdout(events_file.reopen().unwrap())
        .spawn()
        .unwrap();
    // `ctr run --rm` of the image through banger's runtime, as task `id` running `cmd`.
    let run_args = |id: &'static str, cmd: &[&'static str]| -> Vec<String> {
        [
            "run",
            "--rm",
            "--snapshotter",
            "native",
            "--runtime",
            "io.containerd.banger.v2",
            reference.as_str(),
            id,
        ]
        .iter()
        .chain(cmd)
        .map(|s| s.to_string())
        .collect()
    };
    let run = |id: &'static str, cmd: &[&'static str]| -> Output {
        let a = run_args(id, cmd);
        containerd.ctr(&bus, &a.iter().map(String::as_str).collect::<Vec<_>>())
    };

    // Its output, through containerd's FIFOs.
    let out = run("t1", &["echo", "hi"]);
    assert!(
        out.status.success(),
        "ctr run: {}\ncontainerd's log:\n{}",
        text(&out),
        containerd.log()
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hi\n",
        "{}",
        text(&out)
    );
    // On containerd's default snapshotter, overlayfs: the shim mounts its overlay.
    let out = containerd.ctr(
        &bus,
        &[
            "run",
            "--rm",
            "--runtime",
            "io.containerd.banger.v2",
            &reference,
            "t6",
            "sh",
            "-c",
            "echo layered > /new; cat /new",
        ],
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "layered\n",
        "{}",
        text(&out)
    );
    // In a network namespace of its own (a pod's, as CNI's bridge plugin makes one: a veth's
    // far end as eth0): the VM takes over eth0, and the process reaches the veth's near end,
    // in the daemon's namespace, from eth0's address.
    let ns = format!("bctr{}", std::process::id());
    bus.sh_in_namespaces(&format!(
        "set -e; ip netns add {ns}; ip link add bch0 type veth peer name eth0 netns {ns}; \
         ip addr add 10.78.0.1/24 dev bch0; ip link set bch0 up; \
         ip -n {ns} addr add 10.78.0.2/24 dev eth0; ip -n {ns} link set eth0 up; \
         ip -n {ns} route add default via 10.78.0.1"
    ));
    let listener = bus
        .in_netns("busybox")
        .args(["nc", "-l", "-p", "7011"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let with_ns = format!("network:/run/netns/{ns}");
    let out = containerd.ctr(
        &bus,
        &[
            "run",
            "--rm",
            "--snapshotter",
            "native",
            "--with-ns",
            &with_ns,
            "--runtime",
            "io.containerd.banger.v2",
            &reference,
            "t7",
            "sh",
            "-c",
            "ip -o -4 addr show eth0; echo from-the-pod | nc -w 10 10.78.0.1 7011",
        ],
    );
    assert!(
        out.status.success() && text(&out).contains("inet 10.78.0.2/24"),
        "ctr run --with-ns: {}\n{}",
        text(&out),
        containerd.log()
    );
    let heard = listener.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&heard.stdout), "from-the-pod\n");
    bus.sh_in_namespaces(&format!("ip netns del {ns}"));
    // Its exit status.
    let out = run("t2", &["sh", "-c", "echo to-err >&2; exit 7"]);
    assert_eq!(out.status.code(), Some(7), "{}", text(&out));
    assert!(text(&out).contains("to-err"), "{}", text(&out));
    // Its output to a log URI instead of FIFOs (`ctr run --log-uri`): a file, both streams
    // appended, its directory made; and a logging program, as nerdctl's logging drivers are
    // (the streams on fds 3 and 4, ready once it closes fd 5, its URI's query as arguments).
    let logs = tempfile::tempdir().unwrap();
    let logger = logs.path().join("logger");
    std::fs::write(
        &logger,
        "#!/bin/sh\n\
         echo \"$CONTAINER_NAMESPACE/$CONTAINER_ID $*\" > \"$2.args\"\n\
         exec 5>&-\n\
         cat <&3 > \"$2.out\" & cat <&4 > \"$2.err\"\n\
         wait\n",
    )
    .unwrap();
    std::fs::set_permissions(&logger, std::fs::Permissions::from_mode(0o755)).unwrap();
    let to = logs.path().join("t9");
    let uris = [
        (
            "t8",
            format!("file://{}/made/t8.log", logs.path().display()),
        ),
        (
            "t9",
            format!("binary://{}?--to={}", logger.display(), to.display()),
        ),
    ];
    for (id, uri) in &uris {
        let mut a = run_args(id, &["sh", "-c", "echo out; echo err >&2; exit 5"]);
        a.insert(2, format!("--log-uri={uri}"));
        let out = containerd.ctr(&bus, &a.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(
            out.status.code(),
            Some(5),
            "ctr run --log-uri {uri}: {}\n{}",
            text(&out),
            containerd.log()
        );
        assert!(!text(&out).contains("out\n"), "{}", text(&out));
    }
    let logged = std::fs::read_to_string(logs.path().join("made/t8.log")).unwrap();
    let mut lines: Vec<&str> = logged.lines().collect();
    lines.sort();
    assert_eq!(lines, ["err", "out"], "{logged:?}");
    let read = |ext: &str| std::fs::read_to_string(format!("{}.{ext}", to.display())).unwrap();
    assert_eq!(
        (read("args"), read("out"), read("err")),
        (
            format!("default/t9 --to {}\n", to.display()),
            "out\n".to_owned(),
            "err\n".to_owned()
        )
    );
    // A tmpfs of the spec (`ctr run --mount type=tmpfs`): mounted in the guest, with its
    // options, its memory the VM's.
    let mut a = run_args(
        "t10",
        &[
            "sh",
            "-c",
            "grep ' /scratch ' /proc/mounts; echo kept > /scratch/f && cat /scratch/f",
        ],
    );
    a.insert(
        2,
        "--mount=type=tmpfs,src=tmpfs,dst=/scratch,options=nosuid:size=8m:mode=750".into(),
    );
    let out = containerd.ctr(&bus, &a.iter().map(String::as_str).collect::<Vec<_>>());
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success()
            && said.starts_with("tmpfs /scratch tmpfs rw,nosuid,")
            && said.contains("size=8192k")
            && said.contains("mode=750")
            && said.ends_with("\nkept\n"),
        "ctr run --mount type=tmpfs: {}\n{}",
        text(&out),
        containerd.log()
    );
    // Its input.
    let stdin_run = run_args("t3", &["cat"]);
    let mut child = containerd
        .ctr_cmd(
            &bus,
            &stdin_run.iter().map(String::as_str).collect::<Vec<_>>(),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"through stdin\n").unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "through stdin\n",
        "{:?} {}\n{}",
        out.status,
        text(&out),
        containerd.log()
    );

    // On a terminal (`-t`; ctr wants one of its own, which `script` gives it).
    let ctr_line = format!(
        "ctr --address {} run --rm -t --snapshotter native --runtime io.containerd.banger.v2 {} t4 tty",
        containerd.socket.display(),
        reference
    );
    let out = bus
        .in_netns("script")
        .args(["-qec", &ctr_line, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success() && text(&out).contains("/dev/pts/"),
        "ctr run -t: {}",
        text(&out)
    );

    // A task run detached: its processes, an exec, pause and resume, a kill, its removal.
    let detached = [
        "run",
        "-d",
        "--snapshotter",
        "native",
        "--runtime",
        "io.containerd.banger.v2",
        reference.as_str(),
        "d1",
        "sleep",
        "300",
    ];
    let out = containerd.ctr(&bus, &detached);
    assert!(out.status.success(), "ctr run -d: {}", text(&out));
    let out = containerd.ctr(&bus, &["task", "metrics", "d1"]);
    metrics_hold(
        &out,
        [
            "memory.usage_in_bytes",
            "memory.limit_in_bytes",
            "cpuacct.usage",
        ],
    );
    let out = containerd.ctr(&bus, &["task", "ps", "d1"]);
    assert!(
        out.status.success() && text(&out).lines().count() >= 2,
        "ctr task ps: {}",
        text(&out)
    );
    let out = containerd.ctr(
        &bus,
        &[
            "task",
            "exec",
            "--exec-id",
            "e1",
            "d1",
            "sh",
            "-c",
            "echo from-exec; exit 3",
        ],
    );
    assert_eq!(out.status.code(), Some(3), "ctr task exec: {}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "from-exec\n",
        "{}",
        text(&out)
    );
    let state = |want: &str| {
        let out = containerd.ctr(&bus, &["task", "ls"]);
        text(&out)
            .lines()
            .any(|l| l.starts_with("d1 ") && l.trim_end().ends_with(want))
    };
    for (verb, want) in [("pause", "PAUSED"), ("resume", "RUNNING")] {
        let out = containerd.ctr(&bus, &["task", verb, "d1"]);
        assert!(out.status.success(), "ctr task {verb}: {}", text(&out));
        assert!(
            state(want),
            "after {verb}: {}",
            text(&containerd.ctr(&bus, &["task", "ls"]))
        );
    }
    let out = containerd.ctr(&bus, &["task", "kill", "-s", "SIGKILL", "d1"]);
    assert!(out.status.success(), "ctr task kill: {}", text(&out));
    wait_until("the killed task to stop", Duration::from_secs(60), || {
        state("STOPPED")
    });
    for args in [["task", "rm", "d1"], ["container", "rm", "d1"]] {
        let out = containerd.ctr(&bus, &args);
        assert!(out.status.success(), "ctr {args:?}: {}", text(&out));
    }

    // What containerd's clients were told (`ctr events`).
    let seen = |topic: &str, has: &[&str]| {
        std::fs::read_to_string(events_file.path())
            .unwrap_or_default()
            .lines()
            .any(|l| l.contains(topic) && has.iter().all(|h| l.contains(h)))
    };
    // The guest's OOM killer: six processes holding 64 MiB each in the VM's 256 MiB. Some are
    // killed, containerd is told (`/tasks/oom`), and the task still answers (the OOM killer
    // spares the agent).
    let d6: Vec<&str> = detached[..7]
        .iter()
        .copied()
        .chain([
            "d6",
            "sh",
            "-c",
            "for i in 1 2 3 4 5 6; do dd if=/dev/zero bs=64M count=1 | sleep 300 & done; wait",
        ])
        .collect();
    let out = containerd.ctr(&bus, &d6);
    assert!(out.status.success(), "ctr run -d: {}", text(&out));
    wait_until("/tasks/oom of d6", Duration::from_secs(120), || {
        seen("/tasks/oom", &["\"container_id\":\"d6\""])
    });
    let out = containerd.ctr(
        &bus,
        &[
            "task",
            "exec",
            "--exec-id",
            "e6",
            "d6",
            "echo",
            "still answering",
        ],
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "still answering\n",
        "exec after the OOM kills: {}",
        text(&out)
    );
    containerd.kill_and_remove(&bus, "d6");

    // bangerd killed while a task runs: the task goes on (its agent stream is the VM's
    // helper's, not the daemon's) and its exit, with its status, still reaches containerd.
    let mut d4 = detached;
    d4[7] = "d4";
    d4[8] = "sh";
    d4[9] = "-c";
    let d4: Vec<&str> = d4
        .iter()
        .copied()
        .chain(["sleep 3; echo late; exit 4"])
        .collect();
    let out = containerd.ctr(&bus, &d4);
    assert!(out.status.success(), "ctr run -d: {}", text(&out));
    let conn = bus.connect().await;
    kill_daemon(&bus, &conn).await;
    // On a host the next call starts bangerd (socket activation); the test bus, over D-Bus.
    let out = bus.banger_as(None, &["status"]);
    assert!(out.status.success(), "{}", text(&out));
    for args in [&["task", "rm", "d4"][..], &["container", "rm", "d4"]] {
        wait_until("d4 to end and go", Duration::from_secs(60), || {
            containerd.ctr(&bus, args).status.success()
        });
    }

    // The shim's events reached containerd's clients: each task's exit with its status, the
    // exec's, the pause and the resume.
    let wanted: [(&str, &[&str]); 9] = [
        ("/tasks/exit", &["\"container_id\":\"t1\""]),
        (
            "/tasks/exit",
            &["\"container_id\":\"d4\"", "\"exit_status\":4"],
        ),
        (
            "/tasks/exit",
            &["\"container_id\":\"t2\"", "\"exit_status\":7"],
        ),
        ("/tasks/exit", &["\"id\":\"e1\"", "\"exit_status\":3"]),
        ("/tasks/exec-added", &["\"exec_id\":\"e1\""]),
        ("/tasks/exec-started", &["\"exec_id\":\"e1\""]),
        ("/tasks/paused", &["d1"]),
        ("/tasks/resumed", &["d1"]),
        ("/tasks/delete", &["d1"]),
    ];
    for (topic, has) in wanted {
        wait_until(
            &format!("event {topic} {has:?}"),
            Duration::from_secs(30),
            || seen(topic, has),
        );
    }
    let _ = events.kill();
    let _ = events.wait();

    // A shim killed mid-run: containerd runs the shim's `delete`, which removes the task's VM
    // and its rootfs mount. Then containerd restarted: it finds the running task's shim again
    // and serves new tasks.
    let (mut d2, mut d3) = (detached, detached);
    d2[7] = "d2";
    d3[7] = "d3";
    for args in [d2, d3] {
        let out = containerd.ctr(&bus, &args);
        assert!(out.status.success(), "ctr run -d: {}", text(&out));
    }
    let vm_listed = |name: &str| text(&bus.banger_as(None, &["vm", "list"])).contains(name);
    assert!(vm_listed("ctr-default-d2"));
    let shims: Vec<i32> = processes_mentioning("-id\x00d2")
        .into_iter()
        .filter(|p| {
            std::fs::read_link(format!("/proc/{p}/exe"))
                .is_ok_and(|e| e.ends_with("containerd-shim-banger-v2"))
        })
        .collect();
    assert!(!shims.is_empty(), "the shim of d2");
    for pid in shims {
        // SAFETY: kill takes no pointers.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    wait_until(
        "the dead shim's VM to be deleted",
        Duration::from_secs(60),
        || !vm_listed("ctr-default-d2"),
    );
    containerd.restart(&bus);
    let out = containerd.ctr(&bus, &["container", "rm", "d2"]);
    assert!(out.status.success(), "ctr container rm d2: {}", text(&out));
    let out = containerd.ctr(
        &bus,
        &[
            "task",
            "exec",
            "--exec-id",
            "e2",
            "d3",
            "echo",
            "still here",
        ],
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "still here\n",
        "exec after containerd's restart: {}\n{}",
        text(&out),
        containerd.log()
    );
    containerd.kill_and_remove(&bus, "d3");
    let out = run("t5", &["echo", "after the restart"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "after the restart\n",
        "{}",
        text(&out)
    );
    // Metrics as cgroup v2's types, as on a host whose cgroups are unified.
    let mut d5 = detached;
    d5[7] = "d5";
    let out = containerd.ctr(&bus, &d5);
    assert!(out.status.success(), "ctr run -d: {}", text(&out));
    let out = containerd.ctr(&bus, &["task", "metrics", "d5"]);
    metrics_hold(
        &out,
        ["memory.usage ", "memory.usage_limit", "cpu.usage_usec"],
    );
    assert!(metric_of(&out, "cpu.user_usec") > 0, "{}", text(&out));
    containerd.kill_and_remove(&bus, "d5");

    // A pod as CRI marks one (annotations, here through ctr): its container runs in the
    // sandbox's VM in a guest cgroup of its own, so pausing it freezes it alone (the pod's VM
    // and sandbox run on), its metrics are its own, and its delete removes the cgroup.
    let pod_run = |id: &str, kind: &str, cmd: &[&str]| -> Output {
        let mut a: Vec<String> = detached[..6].iter().map(|s| s.to_string()).collect();
        a.push(format!(
            "--annotation=io.kubernetes.cri.container-type={kind}"
        ));
        a.push("--annotation=io.kubernetes.cri.sandbox-id=p1".into());
        a.push(reference.clone());
        a.push(id.into());
        a.extend(cmd.iter().map(|s| s.to_string()));
        containerd.ctr(&bus, &a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    for (id, kind) in [("p1", "sandbox"), ("p1c", "container")] {
        let out = pod_run(id, kind, &["sleep", "300"]);
        assert!(out.status.success(), "ctr run -d {id}: {}", text(&out));
    }
    let execs = std::cell::Cell::new(0);
    let in_sandbox = |cmd: &str| -> String {
        execs.set(execs.get() + 1);
        let eid = format!("p1e{}", execs.get());
        let out = containerd.ctr(
            &bus,
            &["task", "exec", "--exec-id", &eid, "p1", "sh", "-c", cmd],
        );
        assert!(out.status.success(), "exec in p1: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let frozen = |v: &str| {
        in_sandbox("grep frozen /sys/fs/cgroup/p1c/cgroup.events") == format!("frozen {v}\n")
    };
    assert!(frozen("0"));
    let out = containerd.ctr(&bus, &["task", "pause", "p1c"]);
    assert!(out.status.success(), "ctr task pause p1c: {}", text(&out));
    assert!(frozen("1"), "p1c's cgroup is not frozen");
    let tasks = text(&containerd.ctr(&bus, &["task", "ls"]));
    assert!(
        tasks
            .lines()
            .any(|l| l.starts_with("p1c ") && l.contains("PAUSED"))
            && tasks
                .lines()
                .any(|l| l.starts_with("p1 ") && l.contains("RUNNING")),
        "{tasks}"
    );
    let out = containerd.ctr(&bus, &["task", "resume", "p1c"]);
    assert!(out.status.success(), "ctr task resume p1c: {}", text(&out));
    assert!(frozen("0"), "p1c's cgroup is still frozen");
    let out = containerd.ctr(&bus, &["task", "metrics", "p1c"]);
    assert_eq!(
        metric_of(&out, "pids.current"),
        1,
        "p1c's own: {}",
        text(&out)
    );
    containerd.kill_and_remove(&bus, "p1c");
    assert_eq!(
        in_sandbox("test -e /sys/fs/cgroup/p1c && echo left || echo gone"),
        "gone\n"
    );
    containerd.kill_and_remove(&bus, "p1");

    // Each ran in a VM of its own, and none is left, nor anything of them.
    let out = bus.banger_as(None, &["vm", "list"]);
    assert!(!text(&out).contains("ctr-"), "{}", text(&out));
    let bad = check(&bus);
    assert!(bad.is_empty(), "{bad:#?}");
}

/// Kubernetes' way in (issue 36): containerd's own CRI plugin, driven over its gRPC socket
/// as kubelet would (tests/common/cri.rs, since neither kubelet nor crictl is packaged here),
/// with banger as the runtime handler and Debian's CNI bridge plugin for the pod's network.
/// A pod sandbox is a banger VM on the pod's network namespace: its process (the sandbox
/// image's, an HTTP server here) answers on the pod's address from the node; stopping and
/// removing the pod leaves nothing. On a QEMU that saves virtio-fs devices (8.2 and later:
/// Debian's backport, which tests/run unpacks) the first pod boots cold and leads to the warm
/// snapshot of folder roots, which the next pod's VM restores onto its own namespace.
#[tokio::test(flavor = "multi_thread")]
async fn a_cri_pod_sandbox_is_a_banger_vm_on_the_pods_cni_network() {
    use common::cri::*;
    use common::oci::*;
    if !available(&["containerd", "ctr"]) || !std::path::Path::new("/usr/lib/cni/bridge").exists() {
        assert!(
            std::env::var_os("BANGER_REQUIRE_INTEGRATION").is_none(),
            "containerd and containernetworking-plugins are needed (tests/run installs them)"
        );
        return;
    }
    let Some((_state, bus)) = warm_folder_bus().await else {
        return;
    };
    // The sandbox image: the busybox VM image whose process serves /etc over HTTP.
    let registry = TestRegistry::start_in_netns(bus.netns_pid());
    let layout = tempfile::tempdir().unwrap();
    // A hostile image: its /etc/hostname (where CRI binds the pod's) leads to a host file.
    let victim = format!("/tmp/banger-cri-victim-{}", std::process::id());
    std::fs::write(&victim, "the host's own\n").unwrap();
    let mut layers = vm_image_layers();
    layers.push(
        Layer::default()
            .dir("etc", 0o755)
            .file("etc/pod-marker", b"from the pod sandbox\n", 0o644, 0)
            .link(
                "etc/hostname",
                tar::EntryType::Symlink,
                &format!("/../../../../../..{victim}"),
            )
            .bytes(),
    );
    // A volume for the web container, read-only.
    let volume = tempfile::tempdir().unwrap();
    std::fs::write(
        volume.path().join("volume-file"),
        "from the host's volume\n",
    )
    .unwrap();
    let m = image_manifest_configured(
        layout.path(),
        &layers,
        serde_json::json!({"Entrypoint": ["/bin/httpd", "-f", "-p", "8080", "-h", "/etc"]}),
    );
    finish_layout(layout.path(), vec![m], "v1");
    let sandbox_image = registry.push(layout.path(), "v1", "cri/pause", &[]);
    let host = sandbox_image.split('/').next().unwrap().to_owned();
    let out = bus.banger_as(None, &["status"]);
    assert!(out.status.success(), "{}", text(&out));

    let containerd = Containerd::start_with(&bus, |dir| {
        let cni = dir.join("cni");
        std::fs::create_dir_all(&cni).unwrap();
        std::fs::write(
            cni.join("10-pods.conflist"),
            serde_json::json!({
                "cniVersion": "0.4.0",
                "name": "bangerpods",
                "plugins": [
                    {
                        "type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false,
                        "ipam": {
                            "type": "host-local",
                            "ranges": [[{"subnet": "10.88.0.0/24"}]],
                            "routes": [{"dst": "0.0.0.0/0"}],
                            "dataDir": dir.join("ipam"),
                        },
                    },
                    {"type": "loopback"},
                ],
            })
            .to_string(),
        )
        .unwrap();
        format!(
            "[plugins.\"io.containerd.grpc.v1.cri\"]\n\
             \x20 sandbox_image = \"{sandbox_image}\"\n\
             \x20 stream_server_address = \"127.0.0.1\"\n\
             \x20 stream_server_port = \"0\"\n\
             \x20 [plugins.\"io.containerd.grpc.v1.cri\".cni]\n\
             \x20   bin_dir = \"/usr/lib/cni\"\n\
             \x20   conf_dir = \"{cni}\"\n\
             \x20 [plugins.\"io.containerd.grpc.v1.cri\".containerd]\n\
             \x20   snapshotter = \"native\"\n\
             \x20   default_runtime_name = \"banger\"\n\
             \x20   [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.banger]\n\
             \x20     runtime_type = \"io.containerd.banger.v2\"\n\
             \x20 [plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.\"{host}\"]\n\
             \x20   endpoint = [\"http://{host}\"]\n",
            cni = cni.display(),
        )
    });
    let cri = Cri::new(&containerd.socket);
    let v: VersionResponse = cri
        .runtime(
            "Version",
            &VersionRequest {
                version: "v1".into(),
            },
        )
        .await
        .unwrap_or_else(|e| panic!("CRI Version: {e}\n{}", containerd.log()));
    assert_eq!(v.runtime_name, "containerd", "{v:?}");

    let config = pod_config("web", "pod-uid-1");
    let id = cri
        .run_pod(&config, "banger")
        .await
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", containerd.log()));
    // One banger VM for the pod, named by its sandbox's id.
    let vms = text(&bus.banger_as(None, &["vm", "list"]));
    assert_eq!(vms.matches("ctr-k8s-io-").count(), 1, "{vms}");
    let status: PodSandboxStatusResponse = cri
        .runtime(
            "PodSandboxStatus",
            &PodSandboxStatusRequest {
                pod_sandbox_id: id.clone(),
                verbose: false,
            },
        )
        .await
        .unwrap();
    let status = status.status.unwrap();
    assert_eq!(status.state, 0, "SANDBOX_READY: {status:?}");
    assert_eq!(status.runtime_handler, "banger", "{status:?}");
    let ip = status.network.unwrap_or_default().ip;
    assert!(ip.starts_with("10.88.0."), "the pod's address: {ip:?}");
    // The pod's process answers on the pod's address, from the node (cni0's side).
    let every = Duration::from_millis(200);
    let mut said = String::new();
    let served = poll_until(every * 150, every, || {
        let out = bus
            .in_netns("sh")
            .args([
                "-c",
                &format!(
                    "printf 'GET /pod-marker HTTP/1.0\\r\\n\\r\\n' | busybox nc -w 3 {ip} 8080"
                ),
            ])
            .output()
            .unwrap();
        said = text(&out);
        said.contains("from the pod sandbox")
    });
    assert!(served, "http://{ip}:8080/pod-marker: {said}");

    // Two containers in the pod, each with a root of its own, in the pod's one VM: one
    // serves HTTP on 8081, the other reaches it (and the sandbox's 8080) on localhost.
    let pulled: PullImageResponse = cri
        .image(
            "PullImage",
            &PullImageRequest {
                image: Some(ImageSpec {
                    image: sandbox_image.clone(),
                }),
                sandbox_config: Some(config.clone()),
            },
        )
        .await
        .unwrap_or_else(|e| panic!("PullImage: {e}\n{}", containerd.log()));
    assert!(!pulled.image_ref.is_empty());
    let mut containers = Vec::new();
    for (name, command, args) in [
        ("web", "/bin/httpd", &["-f", "-p", "8081", "-h", "/etc"][..]),
        ("client", "/bin/sleep", &["300"][..]),
    ] {
        let mut c = container_config(name, &sandbox_image, command, args);
        if name == "web" {
            c.mounts.push(Mount {
                container_path: "/data".into(),
                host_path: volume.path().to_string_lossy().into_owned(),
                readonly: true,
            });
        }
        let made = cri
            .create_container(&id, &config, c)
            .await
            .unwrap_or_else(|e| panic!("CreateContainer {name}: {e}\n{}", containerd.log()));
        let _: Empty = cri
            .on_container("StartContainer", &made)
            .await
            .unwrap_or_else(|e| panic!("StartContainer {name}: {e}\n{}", containerd.log()));
        containers.push(made);
    }
    let exec = |c: &str, script: &str| {
        let req = ExecSyncRequest {
            container_id: c.to_owned(),
            cmd: vec!["sh".into(), "-c".into(), script.into()],
            timeout: 30,
        };
        let cri = &cri;
        async move {
            let r: Result<ExecSyncResponse, Status> = cri.runtime("ExecSync", &req).await;
            r.unwrap_or_else(|e| panic!("ExecSync {:?}: {e}", req.cmd))
        }
    };
    let (web, client) = (&containers[0], &containers[1]);
    let r = exec(client, "echo mine > /only-client; echo to-err >&2; exit 3").await;
    assert_eq!(
        (r.exit_code, String::from_utf8_lossy(&r.stderr).as_ref()),
        (3, "to-err\n"),
        "{r:?}"
    );
    let r = exec(web, "ls /only-client 2>&1; cat /etc/pod-marker").await;
    let said = String::from_utf8_lossy(&r.stdout).into_owned();
    assert!(
        said.contains("No such file") && said.contains("from the pod sandbox"),
        "the web container has a root of its own: {said}"
    );
    // The spec's mounts: the volume (read-only) and CRI's /etc/hostname, which the image's
    // symlink leads inside the container's root, never onto the host's file.
    let r = exec(
        web,
        "cat /data/volume-file; touch /data/new 2>/dev/null; echo touch=$?; cat /etc/hostname; hostname",
    )
    .await;
    let said = String::from_utf8_lossy(&r.stdout).into_owned();
    assert_eq!(said, "from the host's volume\ntouch=1\nweb\nweb\n", "{r:?}");
    assert_eq!(
        std::fs::read_to_string(&victim).unwrap(),
        "the host's own\n",
        "the image's symlink took a mount onto the host"
    );
    let mountinfo =
        std::fs::read_to_string(format!("/proc/{}/mountinfo", bus.netns_pid())).unwrap();
    assert!(!mountinfo.contains(&victim), "{mountinfo}");
    eprintln!("security (cri mounts): 1 image symlink out of the root tried, 0 host files reached");
    for port in ["8081", "8080"] {
        let get =
            format!("printf 'GET /pod-marker HTTP/1.0\\r\\n\\r\\n' | nc -w 3 127.0.0.1 {port}");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let said = loop {
            let r = exec(client, &get).await;
            let said = String::from_utf8_lossy(&r.stdout).into_owned();
            if said.contains("from the pod sandbox") || std::time::Instant::now() > deadline {
                break said;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert!(
            said.contains("from the pod sandbox"),
            "localhost:{port} from the client container: {said}"
        );
    }
    let stats: ContainerStatsResponse = cri
        .on_container("ContainerStats", client)
        .await
        .unwrap_or_else(|e| panic!("ContainerStats: {e}\n{}", containerd.log()));
    let st = stats.stats.unwrap_or_default();
    assert!(
        st.memory
            .clone()
            .and_then(|m| m.working_set_bytes)
            .unwrap_or_default()
            .value
            > 0
            && st
                .cpu
                .clone()
                .and_then(|c| c.usage_core_nano_seconds)
                .unwrap_or_default()
                .value
                > 0,
        "{st:?}"
    );
    let vms = text(&bus.banger_as(None, &["vm", "list"]));
    assert_eq!(vms.matches("ctr-").count(), 1, "one VM for the pod: {vms}");
    for c in &containers {
        let _: Empty = cri
            .runtime(
                "StopContainer",
                &StopContainerRequest {
                    container_id: c.clone(),
                    timeout: 5,
                },
            )
            .await
            .unwrap_or_else(|e| panic!("StopContainer: {e}\n{}", containerd.log()));
        let _: Empty = cri
            .on_container("RemoveContainer", c)
            .await
            .unwrap_or_else(|e| panic!("RemoveContainer: {e}\n{}", containerd.log()));
    }

    for (method, done) in [
        ("StopPodSandbox", "stopped"),
        ("RemovePodSandbox", "removed"),
    ] {
        let r: Result<Empty, Status> = cri.on_pod(method, &id).await;
        r.unwrap_or_else(|e| panic!("{method}: {e}\n{}", containerd.log()));
        eprintln!("cri: pod {id} {done}");
    }
    let vms = text(&bus.banger_as(None, &["vm", "list"]));
    assert!(!vms.contains("ctr-"), "{vms}");

    // The first pod's cold boot led to the warm snapshot of folder roots: the next pod's VM
    // is restored from it (stage `restore`, no `boot`), onto the next pod's namespace, where
    // CRI's binds of its resolv.conf, hosts and hostname are left as they are.
    wait_until(
        "the warm snapshot of folder roots",
        Duration::from_secs(240),
        || {
            text(&bus.banger_as(None, &["--json", "snapshot", "list", "--all"]))
                .contains("\".warm-")
        },
    );
    let conn = bus.connect().await;
    let vms1 = banger::dbus::proxy::VMs1Proxy::new(&conn).await.unwrap();
    let mut progress = vms1.receive_create_progress().await.unwrap();

    // A pod whose shim is SIGKILLed with a container running in it: containerd's cleanup
    // (the shim's delete) removes the pod's VM and unmounts the roots; the pod then stops and
    // goes as any other, and nothing of it is left.
    let crashed = pod_config("crash", "pod-uid-2");
    let crash_id = cri
        .run_pod(&crashed, "banger")
        .await
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", containerd.log()));
    let mut stages = Vec::new();
    while !stages.iter().any(|s| s == "ready") {
        use futures_util::StreamExt;
        match tokio::time::timeout(Duration::from_secs(30), progress.next()).await {
            Ok(Some(s)) => stages.push(s.args().unwrap().stage.to_string()),
            _ => break,
        }
    }
    assert!(
        stages.iter().any(|s| s == "restore") && !stages.iter().any(|s| s == "boot"),
        "the second pod's VM did not start warm: {stages:?}"
    );
    // Unread, its queue would fill and stall the connection (zbus stops reading it).
    drop(progress);
    eprintln!("cri: pod {crash_id} started warm ({})", stages.join(" → "));
    let made = cri
        .create_container(
            &crash_id,
            &crashed,
            container_config("sleeper", &sandbox_image, "/bin/sleep", &["300"]),
        )
        .await
        .unwrap_or_else(|e| panic!("CreateContainer: {e}\n{}", containerd.log()));
    let _: Empty = cri
        .on_container("StartContainer", &made)
        .await
        .unwrap_or_else(|e| panic!("StartContainer: {e}\n{}", containerd.log()));
    let shims: Vec<i32> = processes_mentioning(&format!("-id\x00{crash_id}"))
        .into_iter()
        .filter(|p| {
            std::fs::read_link(format!("/proc/{p}/exe"))
                .is_ok_and(|e| e.ends_with("containerd-shim-banger-v2"))
        })
        .collect();
    assert_eq!(shims.len(), 1, "the pod's one shim");
    // SAFETY: kill takes no pointers.
    unsafe { libc::kill(shims[0], libc::SIGKILL) };
    wait_until(
        "the killed pod's VM to be deleted",
        Duration::from_secs(60),
        || !text(&bus.banger_as(None, &["vm", "list"])).contains("ctr-"),
    );
    for method in ["StopPodSandbox", "RemovePodSandbox"] {
        let r: Result<Empty, Status> = cri.on_pod(method, &crash_id).await;
        r.unwrap_or_else(|e| panic!("{method} after the shim's death: {e}\n{}", containerd.log()));
    }
    // containerd cleans up after a dead shim on its own time: it runs the shim's `delete`
    // (which deletes the VM, whose row goes before its files, then unmounts the root) while
    // the CRI calls above already answer, and says nothing when it is done. So what must hold
    // once it is done is waited for, and shown if it never does.
    let mut left = Vec::new();
    let settled = poll_until(Duration::from_secs(60), Duration::from_millis(20), || {
        let mountinfo =
            std::fs::read_to_string(format!("/proc/{}/mountinfo", bus.netns_pid())).unwrap();
        left = [&crash_id, &made, &id]
            .into_iter()
            .filter(|id| mountinfo.contains(id.as_str()))
            .map(|id| format!("a mount of {id} is left: {mountinfo}"))
            .collect();
        if left.is_empty() {
            left = check(&bus);
        }
        left.is_empty()
    });
    assert!(settled, "60 s after the pod's removal: {left:#?}");
    eprintln!("cri: pod {crash_id} cleaned up after its shim was killed");
    let _ = std::fs::remove_file(&victim);
}
