//! VMs for real: a busybox image pulled from a registry on 127.0.0.1, the Debian kernel
//! imported with a banger-built initrd, and VMs booted under QEMU (TCG) with the guest agent
//! on a virtio-serial port through banger's agent link, all driven as a real user through the CLI and the bus.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use banger::dbus::proxy::{Images1Proxy, VMs1Proxy};
use common::oci::*;
use common::scenario::{self, Steps};
use common::vm::*;
use common::*;
use futures_util::StreamExt;

/// The shared folders' servers (virtiofsd) of this bus's VMs: their `/proc/PID/status`. They
/// carry their VM's runtime directory in their environment, not on their command line.
/// Every path under `dir`, links not followed.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if e.file_type().unwrap().is_dir() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}

fn share_servers(bus: &TestBus) -> Vec<String> {
    let marker = format!("BANGER_RUN_DIR={}", bus.runtime.display());
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        let env = std::fs::read(e.path().join("environ")).unwrap_or_default();
        if comm.trim() == "virtiofsd"
            && env
                .split(|b| *b == 0)
                .any(|v| v.starts_with(marker.as_bytes()))
        {
            // Only the sandbox's outer process: its children are in its pid namespace.
            let status = std::fs::read_to_string(e.path().join("status")).unwrap_or_default();
            let nspid = status
                .lines()
                .find(|l| l.starts_with("NSpid:"))
                .unwrap_or_default();
            if nspid.split_whitespace().count() == 2 {
                found.push(status);
            }
        }
    }
    found
}

/// Runs `c` with `input` on its standard input; its output.
fn fed(mut c: Command, input: &[u8]) -> std::process::Output {
    let mut child = c
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

fn exec_with_stdin(bus: &TestBus, vm: &str, stdin: &str, cmd: &[&str]) -> std::process::Output {
    let mut c = Command::new("runuser");
    c.args([
        "-u",
        USER_OK,
        "--",
        env!("CARGO_BIN_EXE_banger"),
        "vm",
        "exec",
        vm,
        "--",
    ])
    .args(cmd)
    .env("DBUS_SYSTEM_BUS_ADDRESS", &bus.address);
    fed(c, stdin.as_bytes())
}

/// The steps of the shared VM's scenario, in the order it runs them.
const STEPS: &[&str] = &[
    "commands_stream_exit_status_and_the_work_disk",
    "shared_folders_serve_as_the_owner_and_refuse_setid",
    "pause_and_resume",
    "a_terminal_through_the_agent",
    "files_in_and_out_through_the_agent",
    "a_non_members_connection_flood_is_capped",
    "a_published_port_reaches_the_guests_loopback",
    "the_vmm_and_its_helpers_run_confined",
    "freed_guest_memory_goes_back_to_the_host",
    "an_idle_guest_wakes_its_vmm_only_for_its_own_timers",
    "every_virtqueue_has_the_entries_its_device_asks_for",
    "a_console_flood_is_capped",
    "the_guest_network_isolated_and_shared",
    "running_vms_are_not_deleted_by_accident",
    "a_killed_daemons_successor_adopts_the_vm",
    "stop_and_start_keep_root_and_json_says_what_was_done",
    "a_guest_that_powers_off_is_noticed",
    "an_escaped_vmm_cannot_swap_its_vsock_socket_and_a_forced_delete_leaves_nothing",
    "two_creates_of_one_name_one_wins",
];

/// One VM, `t1`, booted once as a member through the CLI while its stages are watched, then
/// each behaviour in [`STEPS`] on it (and on the VMs some steps add), in order.
async fn a_vm_boots_runs_commands_keeps_its_root_disk_and_goes_away(steps: Steps) {
    if !available(VM_TOOLS) {
        return;
    }
    let Some((vmlinuz, modules, _)) = debian_kernel() else {
        return;
    };
    if guest_bins().is_none() {
        return;
    }
    // Images and kernels come in with the host's loopback registry; the VMs then boot with
    // the daemon in a network namespace of the test's own.
    let state = tempfile::tempdir().unwrap();
    {
        let prep = TestBus::start(BusOptions {
            state_dir: Some(state.path().to_owned()),
            ..Default::default()
        });
        let conn = prep.connect().await;
        let registry = TestRegistry::start();
        let layout = tempfile::tempdir().unwrap();
        let m = image_manifest_labeled(
            layout.path(),
            &vm_image_layers(),
            serde_json::json!({"org.banger.ready_ports": "8080"}),
        );
        finish_layout(layout.path(), vec![m], "v1");
        let reference = registry.push(layout.path(), "v1", "vm/tiny", &[]);
        let images = Images1Proxy::new(&conn).await.unwrap();
        let (id, _) = images
            .pull_image(
                &reference,
                opt(&[("insecure", true.into()), ("name", "tiny".into())]),
            )
            .await
            .unwrap();
        assert_eq!(job_result(&prep, id).await.0, "done");
        let image = images.get_image("tiny").await.unwrap();
        let ports = prep.busctl_as(
            None,
            &[
                "get-property",
                "org.banger",
                image.as_str(),
                "org.banger.Image1",
                "ReadyPorts",
            ],
        );
        assert_eq!(text(&ports).trim(), "aq 1 8080", "from the image's label");
        import_kernel(&conn, "test", &vmlinuz, &modules).await;
    }
    let bus = TestBus::start(BusOptions {
        extra_config: "accel = \"tcg\"\nboot_timeout_sec = 240\n\
                       allow_egress = [\"10.99.1.0/24\"]\n\
                       guest_kernel_args = \"initcall_blacklist=tracer_init_tracefs\"\n"
            .into(),
        netns: true,
        state_dir: Some(state.path().to_owned()),
        ..Default::default()
    });
    let conn = bus.connect().await;

    // Shared folders: two of USER_OK's (one read-only) and one of root's that USER_OK may
    // not write, which is refused at create with nothing made.
    let shared = tempfile::tempdir().unwrap();
    let (src, ro, not_mine) = (
        shared.path().join("src"),
        shared.path().join("ro"),
        shared.path().join("not-mine"),
    );
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(shared.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        for d in [&src, &ro, &not_mine] {
            std::fs::create_dir(d).unwrap();
        }
        std::fs::write(src.join("hello"), "from the host\n").unwrap();
        std::fs::write(ro.join("keep"), "kept\n").unwrap();
        for p in [&src, &src.join("hello"), &ro, &ro.join("keep")] {
            std::os::unix::fs::chown(p, Some(uid_of(USER_OK)), None).unwrap();
        }
    }
    let share_arg = |dir: &std::path::Path, guest: &str| format!("{}:{guest}", dir.display());
    let out = bus.banger_as(
        Some(USER_OK),
        &[
            "vm",
            "create",
            "nope",
            "--image",
            "tiny",
            "--kernel",
            "test",
            "--no-start",
            "--share",
            &share_arg(&not_mine, "/mnt/x"),
        ],
    );
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("is not yours") && text(&out).contains("share a folder of yours"),
        "{}",
        text(&out)
    );

    // Create through the CLI, as a member of the banger group, while watching the stages.
    let vms = VMs1Proxy::new(&conn).await.unwrap();
    assert!(
        vms.get_vm("nope").await.is_err(),
        "a refused share makes no VM"
    );
    let mut progress = vms.receive_create_progress().await.unwrap();
    let out = bus.banger_as(
        Some(USER_OK),
        &[
            "vm",
            "create",
            "t1",
            "--image",
            "tiny",
            "--kernel",
            "test",
            "--vcpus",
            "1",
            "--memory",
            "256",
            "--publish",
            "18080:7070",
            "--share",
            &share_arg(&src, "/mnt/src"),
            "--share",
            &format!("{}:ro", share_arg(&ro, "/mnt/ro")),
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("==> Waiting for the guest agent"), "{err}");
    let mut stages = Vec::new();
    while let Ok(Some(s)) = tokio::time::timeout(Duration::from_secs(2), progress.next()).await {
        stages.push(s.args().unwrap().stage.to_string());
    }
    // A signal stream nobody reads fills its queue, and zbus then stops reading the
    // connection, replies included: every later call on it would wait forever.
    drop(progress);
    assert_eq!(
        stages,
        [
            "resolve_image",
            "reserve",
            "prepare_rootfs",
            "prepare_work_disk",
            "network",
            "boot",
            "wait_agent",
            "wait_ssh",
            "wait_port_8080",
            "publish",
            "ready"
        ]
    );
    let path = vms.get_vm("t1").await.unwrap();
    let get = |prop: &str| {
        text(&bus.busctl_as(
            None,
            &[
                "get-property",
                "org.banger",
                path.as_str(),
                "org.banger.VM1",
                prop,
            ],
        ))
    };
    assert_eq!(get("State").trim(), "s \"running\"");
    assert_eq!(get("VSockCID").trim(), "u 3");
    assert_eq!(get("Owner").trim(), format!("u {}", uid_of(USER_OK)));
    assert!(
        get("GuestAddress").contains("172.30.99.2"),
        "{}",
        get("GuestAddress")
    );

    steps
        .run("commands_stream_exit_status_and_the_work_disk", async {
            // Commands: streams, exit status, environment, the work disk on /root.
            let out = exec_with_stdin(
                &bus,
                "t1",
                "piped in\n",
                &[
                    "sh",
                    "-c",
                    "cat; echo to-err >&2; cat /proc/cmdline; cat /root/seeded; exit 3",
                ],
            );
            assert_eq!(out.status.code(), Some(3), "{}", text(&out));
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(stdout.starts_with("piped in\n"), "{stdout}");
            assert!(stdout.contains("banger.work=serial:work"), "{stdout}");
            assert!(stdout.contains("from the image"), "{stdout}");
            assert_eq!(String::from_utf8_lossy(&out.stderr), "to-err\n");
            // The operator's kernel arguments (`guest_kernel_args`) come before banger's own,
            // and take: the kernel made none of tracefs's files for its trace events.
            let at = |w: &str| stdout.find(w).unwrap_or_else(|| panic!("{w} in {stdout}"));
            assert!(
                at("initcall_blacklist=tracer_init_tracefs") < at("banger.hostname="),
                "{stdout}"
            );
            let tracefs = exec_as(
                &bus,
                Some(USER_OK),
                "t1",
                &[
                    "sh",
                    "-c",
                    "busybox mkdir -p /tmp/tr && busybox mount -t tracefs nodev /tmp/tr && \
                     busybox ls /tmp/tr; busybox umount /tmp/tr",
                ],
            );
            let files: Vec<&str> = tracefs.lines().collect();
            assert!(
                files.contains(&"kprobe_events") && !files.contains(&"events"),
                "{tracefs}"
            );
            let out = bus.banger_as(
                Some(USER_OK),
                &[
                    "vm",
                    "exec",
                    "t1",
                    "--",
                    "sh",
                    "-c",
                    "echo kept > /root/marker && sync",
                ],
            );
            assert!(out.status.success(), "{}", text(&out));
            let out = bus.banger_as(Some(USER_NO), &["vm", "exec", "t1", "--", "true"]);
            assert!(!out.status.success());
            assert!(text(&out).contains("Permission denied"), "{}", text(&out));
            let out = bus.banger_as(Some(USER_OK), &["vm", "logs", "t1"]);
            assert!(text(&out).contains("banger-init: root"), "{}", text(&out));
        })
        .await;

    let sh = |script: &str| {
        bus.banger_as(
            Some(USER_OK),
            &["vm", "exec", "t1", "--", "sh", "-c", script],
        )
    };
    steps
        .run("shared_folders_serve_as_the_owner_and_refuse_setid", async {
            // The shared folders: the host's file in the guest, owned by the guest's root; what the
            // guest writes is USER_OK's on the host; the read-only share refuses writes. Each is
            // served as USER_OK, not root.
            let out = sh("cat /mnt/src/hello && ls -ln /mnt/src/hello && echo from-guest > /mnt/src/made");
            assert!(out.status.success(), "{}", text(&out));
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(stdout.starts_with("from the host\n"), "{stdout}");
            assert_eq!(
                stdout
                    .lines()
                    .nth(1)
                    .and_then(|l| l.split_whitespace().nth(2)),
                Some("0"),
                "the owner's file is the guest root's: {stdout}"
            );
            {
                use std::os::unix::fs::MetadataExt;
                assert_eq!(
                    std::fs::read_to_string(src.join("made")).unwrap(),
                    "from-guest\n"
                );
                assert_eq!(
                    std::fs::metadata(src.join("made")).unwrap().uid(),
                    uid_of(USER_OK)
                );
            }
            // A guest's setuid or setgid bit never reaches the owner's folder: chmod is refused
            // with EPERM, and so is a file created with such a mode; plain modes still work.
            let out = sh("cp /bin/busybox /mnt/src/sh && chmod 755 /mnt/src/sh && \
                 { chmod 4755 /mnt/src/sh 2>&1; echo suid=$?; chmod g+s /mnt/src/sh 2>&1; echo sgid=$?; \
                   mkdir /mnt/src/d && chmod 2775 /mnt/src/d 2>&1; echo dir=$?; }");
            let said = text(&out);
            for refused in ["suid=1", "sgid=1", "dir=1"] {
                assert!(said.contains(refused), "{refused}: {said}");
            }
            assert!(said.contains("Operation not permitted"), "{said}");
            {
                use std::os::unix::fs::PermissionsExt;
                for p in ["sh", "d"] {
                    let m = std::fs::metadata(src.join(p)).unwrap().permissions().mode();
                    assert_eq!(m & 0o7000, 0, "{p} in the share is {m:o}");
                }
                // Straight to the stream, past the harness's capture: CI's log shows the counts.
                use std::io::Write;
                let _ = writeln!(
                    std::io::stderr(),
                    "security (share): 3 setid modes tried, 3 refused, 0 leaked"
                );
            }
            let out = sh("cat /mnt/ro/keep && echo x > /mnt/ro/new");
            assert!(!out.status.success(), "{}", text(&out));
            assert!(
                text(&out).contains("kept") && text(&out).contains("Read-only file system"),
                "{}",
                text(&out)
            );
            assert!(!ro.join("new").exists());
            let servers = share_servers(&bus);
            assert_eq!(servers.len(), 2, "one virtiofsd a share");
            for status in &servers {
                let uid = uid_of(USER_OK).to_string();
                let line = status
                    .lines()
                    .find(|l| l.starts_with("Uid:"))
                    .unwrap_or_default();
                assert_eq!(
                    line.split_whitespace().skip(1).collect::<Vec<_>>(),
                    [uid.as_str(); 4],
                    "{status}"
                );
                assert!(status.contains("NoNewPrivs:\t1"), "{status}");
                // What it prints (a guest can make it print per bad request) goes to a
                // logger that keeps the newest of it, not to a file of its own.
                let pid = status
                    .lines()
                    .find_map(|l| l.strip_prefix("Pid:"))
                    .unwrap_or_default()
                    .trim();
                for fd in [1, 2] {
                    let to = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).unwrap();
                    assert!(
                        to.to_string_lossy().starts_with("socket:"),
                        "virtiofsd's fd {fd} is {}",
                        to.display()
                    );
                }
            }
            let vm_dir = bus
                .state_dir()
                .join("vms")
                .join(path.as_str().rsplit('/').next().unwrap());
            for share in ["share0", "share1"] {
                let said = vm_dir.join(format!("virtiofsd-{share}.log"));
                assert!(
                    banger::vmm::console::tail_lines(&said, 20).contains("Waiting for vhost-user"),
                    "{}",
                    said.display()
                );
            }
            let out = bus.banger_as(Some(USER_OK), &["--json", "vm", "show", "t1"]);
            let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(
                shown["shares"],
                serde_json::json!([
                    share_arg(&src, "/mnt/src"),
                    format!("{}:ro", share_arg(&ro, "/mnt/ro"))
                ]),
                "{shown}"
            );
        })
        .await;

    steps
        .run("pause_and_resume", async {
            // Pause and resume: a paused VM keeps its memory, refuses an exec with what to do, and
            // goes on where it was; a user without rights can do neither.
            let out = sh("echo in-memory > /tmp/kept");
            assert!(out.status.success(), "{}", text(&out));
            let out = bus.banger_as(Some(USER_OK), &["vm", "pause", "t1"]);
            assert!(out.status.success(), "{}", text(&out));
            assert_eq!(get("State").trim(), "s \"paused\"");
            let out = sh("true");
            assert!(
                !out.status.success() && text(&out).contains("is paused; resume it first"),
                "{}",
                text(&out)
            );
            let out = bus.banger_as(Some(USER_NO), &["vm", "resume", "t1"]);
            assert!(text(&out).contains("Permission denied"), "{}", text(&out));
            let out = bus.banger_as(Some(USER_OK), &["--json", "vm", "resume", "t1"]);
            assert!(out.status.success(), "{}", text(&out));
            assert_eq!(get("State").trim(), "s \"running\"");
            let out = bus.banger_as(Some(USER_OK), &["vm", "resume", "t1"]);
            assert!(text(&out).contains("only a paused VM"), "{}", text(&out));
            let out = sh("cat /tmp/kept");
            assert_eq!(
                String::from_utf8_lossy(&out.stdout),
                "in-memory\n",
                "{}",
                text(&out)
            );
        })
        .await;

    steps
        .run("a_terminal_through_the_agent", async {
            // A terminal through the agent, no SSH: vm exec -t runs on a PTY of its own, vm shell
            // is a login shell where Ctrl-C reaches the guest's process and the exit status returns.
            {
                let t = Duration::from_secs(60);
                let tty = PtyRun::start(
                    bus.banger_on_terminal(USER_OK, &["vm", "exec", "-t", "t1", "--", "tty"]),
                );
                tty.wait_for("/dev/pts/", t);
                assert_eq!(tty.wait(), Some(0));
                let mut sh = PtyRun::start(bus.banger_on_terminal(USER_OK, &["vm", "shell", "t1"]));
                sh.type_keys("echo mark-$((6*7))\r");
                sh.wait_for("mark-42", t);
                sh.type_keys("sleep 100\r");
                // Ctrl-C once the sleep runs (seen from another exec), not before the shell forked it.
                let every = Duration::from_millis(100);
                let sleeping = poll_until(every * 300, every, || {
                    let out = bus.banger_as(
                        Some(USER_OK),
                        &[
                            "vm",
                            "exec",
                            "t1",
                            "--",
                            "sh",
                            "-c",
                            "cat /proc/[0-9]*/comm",
                        ],
                    );
                    String::from_utf8_lossy(&out.stdout)
                        .lines()
                        .any(|l| l == "sleep")
                });
                assert!(sleeping, "sleep 100 never ran:\n{}", sh.output());
                sh.type_keys("\x03");
                sh.type_keys("echo after-$((1+1))\r");
                sh.wait_for("after-2", t);
                sh.type_keys("exit 3\r");
                assert_eq!(sh.wait(), Some(3));

                // Without a terminal, Ctrl-C (SIGINT to the client) reaches the command and its
                // children in the guest, as ssh forwards it, instead of leaving them running there.
                let mut exec = bus
                    .banger_command(
                        Some(USER_OK),
                        &[
                            "vm",
                            "exec",
                            "t1",
                            "--",
                            "sh",
                            "-c",
                            "echo started; sleep 4242; echo never",
                        ],
                    )
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap();
                let mut started = String::new();
                std::io::BufRead::read_line(
                    &mut std::io::BufReader::new(exec.stdout.as_mut().unwrap()),
                    &mut started,
                )
                .unwrap();
                assert_eq!(started, "started\n");
                let client = processes_mentioning("sleep 4242; echo never")
                    .into_iter()
                    .find(|&pid| {
                        std::fs::read(format!("/proc/{pid}/cmdline"))
                            .is_ok_and(|c| c.starts_with(env!("CARGO_BIN_EXE_banger").as_bytes()))
                    })
                    .expect("the banger client");
                // SAFETY: kill takes no pointers.
                unsafe { libc::kill(client, libc::SIGINT) };
                let status = exec.wait().unwrap();
                assert_eq!(status.code(), Some(130), "{status:?}");
                let left = bus.banger_as(
                    Some(USER_OK),
                    &[
                        "vm",
                        "exec",
                        "t1",
                        "--",
                        "sh",
                        "-c",
                        "cat /proc/[0-9]*/cmdline | tr '\\0' ' '",
                    ],
                );
                assert!(
                    !String::from_utf8_lossy(&left.stdout).contains("sleep 4242"),
                    "the command outlived Ctrl-C: {}",
                    text(&left)
                );

                // vm run for a user with no SSH key ends in the agent's shell, never at a password
                // prompt; --rm removes the VM after.
                let home = tempfile::tempdir().unwrap();
                let mut cmd = bus.banger_on_terminal(
                    USER_OK,
                    &[
                        "vm", "run", "r1", "--rm", "--image", "tiny", "--kernel", "test",
                        "--vcpus", "1", "--memory", "256",
                    ],
                );
                cmd.env("HOME", home.path());
                let mut run = PtyRun::start(cmd);
                run.wait_for("VM r1 is ready", Duration::from_secs(300));
                run.type_keys("echo run-$((6*7))\r");
                run.wait_for("run-42", t);
                assert!(!run.output().contains("password"), "{}", run.output());
                run.type_keys("exit\r");
                assert_eq!(run.wait(), Some(0));
                assert!(vms.get_vm("r1").await.is_err(), "--rm removed r1");
            }
        })
        .await;

    steps
        .run("files_in_and_out_through_the_agent", async {
            // Files in and out through the agent: a 20 MB random file and a tree with modes and a
            // link come back byte-identical; the host side is the user's own.
            {
                use std::os::unix::fs::PermissionsExt;
                let dir = tempfile::tempdir().unwrap();
                let (d, uid) = (dir.path(), uid_of(USER_OK));
                let mut big = vec![0u8; 20 << 20];
                std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").unwrap(), &mut big)
                    .unwrap();
                std::fs::write(d.join("big.bin"), &big).unwrap();
                std::fs::create_dir_all(d.join("tree/sub")).unwrap();
                std::fs::write(d.join("tree/sub/run.sh"), b"echo tree-ok\n").unwrap();
                std::fs::set_permissions(
                    d.join("tree/sub/run.sh"),
                    std::fs::Permissions::from_mode(0o751),
                )
                .unwrap();
                std::os::unix::fs::symlink("sub/run.sh", d.join("tree/link")).unwrap();
                for p in [
                    d.to_owned(),
                    d.join("big.bin"),
                    d.join("tree"),
                    d.join("tree/sub"),
                    d.join("tree/sub/run.sh"),
                ] {
                    std::os::unix::fs::chown(&p, Some(uid), None).unwrap();
                }
                std::os::unix::fs::lchown(d.join("tree/link"), Some(uid), None).unwrap();
                let cp = |a: &str, b: &str| {
                    let out = bus.banger_as(Some(USER_OK), &["vm", "cp", a, b]);
                    assert!(out.status.success(), "cp {a} {b}: {}", text(&out));
                };
                let host = |p: &str| d.join(p).to_string_lossy().into_owned();
                let out = bus.banger_as(
                    Some(USER_OK),
                    &["--json", "vm", "cp", &host("big.bin"), "t1:/tmp/"],
                );
                let said: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                assert_eq!(said["to"], "t1:/tmp/", "{said}");
                cp(&host("tree"), "t1:/root/tree");
                let out = bus.banger_as(
                    Some(USER_OK),
                    &["vm", "exec", "t1", "--", "sh", "/root/tree/link"],
                );
                assert_eq!(
                    String::from_utf8_lossy(&out.stdout),
                    "tree-ok\n",
                    "{}",
                    text(&out)
                );
                cp("t1:/tmp/big.bin", &host("back.bin"));
                cp("t1:/root/tree", &host("back-tree"));
                assert!(
                    std::fs::read(d.join("back.bin")).unwrap() == big,
                    "20 MB byte-identical"
                );
                let m = std::fs::metadata(d.join("back-tree/sub/run.sh")).unwrap();
                assert_eq!(m.permissions().mode() & 0o777, 0o751);
                assert_eq!(
                    std::fs::read_link(d.join("back-tree/link")).unwrap(),
                    std::path::Path::new("sub/run.sh")
                );
                let out = bus.banger_as(Some(USER_OK), &["vm", "cp", "t1:/no/such", &host("x")]);
                assert!(
                    !out.status.success() && text(&out).contains("/no/such"),
                    "{}",
                    text(&out)
                );

                // A hostile guest's files, copied out by root and by the member: no setuid or setgid
                // file, device, FIFO or link out of the copy lands on the host.
                let out = bus.banger_as(
                    Some(USER_OK),
                    &[
                        "vm",
                        "exec",
                        "t1",
                        "--",
                        "sh",
                        "-c",
                        "mkdir -p /root/evil/d && cp /bin/busybox /root/evil/sh && chmod 4755 /root/evil/sh \
                         && cp /bin/busybox /root/evil/d/g && chmod 2755 /root/evil/d/g && chmod 3777 /root/evil/d \
                         && mkfifo /root/evil/fifo && mknod /root/evil/null c 1 3 \
                         && ln -s /etc/shadow /root/evil/shadow && ln -s ../../etc /root/evil/up \
                         && ln -s d/g /root/evil/inside",
                    ],
                );
                assert!(out.status.success(), "{}", text(&out));
                let (mut tried, mut leaked) = (0, 0);
                for (who, dest) in [
                    (None, d.join("root-evil")),
                    (Some(USER_OK), d.join("member-evil")),
                ] {
                    let out = bus.banger_as(who, &["vm", "cp", "t1:/root/evil", dest.to_str().unwrap()]);
                    assert!(out.status.success(), "{who:?}: {}", text(&out));
                    assert!(text(&out).contains("skipped 4"), "{who:?}: {}", text(&out));
                    for e in walk(&dest) {
                        tried += 1;
                        let m = std::fs::symlink_metadata(&e).unwrap();
                        let ft = m.file_type();
                        use std::os::unix::fs::FileTypeExt;
                        let bad = m.permissions().mode() & 0o7000 != 0
                            || ft.is_fifo()
                            || ft.is_char_device()
                            || ft.is_block_device()
                            || (ft.is_symlink() && std::fs::read_link(&e).unwrap().is_absolute());
                        if bad {
                            leaked += 1;
                            eprintln!(
                                "{who:?}: {} is {:o} {ft:?}",
                                e.display(),
                                m.permissions().mode()
                            );
                        }
                    }
                    assert_eq!(
                        std::fs::read_link(dest.join("inside")).unwrap(),
                        std::path::Path::new("d/g")
                    );
                    // One setuid file alone, too.
                    let one = dest.with_extension("sh");
                    let out = bus.banger_as(
                        who,
                        &["vm", "cp", "t1:/root/evil/sh", one.to_str().unwrap()],
                    );
                    assert!(out.status.success(), "{who:?}: {}", text(&out));
                    let mode = std::fs::metadata(&one).unwrap().permissions().mode();
                    assert_eq!(mode & 0o7777, 0o755, "{who:?}");
                }
                use std::io::Write;
                let _ = writeln!(
                    std::io::stderr(),
                    "security (vm cp out): {tried} entries landed, {leaked} leaked"
                );
                assert_eq!(leaked, 0);
            }
        })
        .await;

    steps
        .run("a_non_members_connection_flood_is_capped", async {
            // A local user outside the group floods banger's world-open Varlink socket: connections
            // over the per-uid cap are refused with LimitExceeded, a member is served meanwhile, and
            // t1 (its VMM, walls and bridge) goes on as it was.
            {
                use std::io::BufRead;
                const FLOOD: &str = r#"
import json, socket, sys, time
path, n = sys.argv[1], int(sys.argv[2])
socks = []
for _ in range(n):
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    socks.append(s)
refused, pending, deadline = 0, list(socks), time.time() + 60
while pending and time.time() < deadline:
    still = []
    for s in pending:
        s.setblocking(False)
        try:
            d = s.recv(4096)
        except BlockingIOError:
            still.append(s)
            continue
        if b"LimitExceeded" in d:
            refused += 1
    pending = still
    if refused >= n - 32:
        break
print(json.dumps({"opened": n, "refused": refused}), flush=True)
sys.stdin.read()
"#;
                let sock = bus.runtime.join("io.banger");
                let mut flood = bus
                    .command_as(
                        Some(USER_NO),
                        "python3",
                        &["-c", FLOOD, sock.to_str().unwrap(), "400"],
                    )
                    .stdin(std::process::Stdio::piped())
                    .stdout(std::process::Stdio::piped())
                    .spawn()
                    .unwrap();
                let mut line = String::new();
                std::io::BufReader::new(flood.stdout.take().unwrap())
                    .read_line(&mut line)
                    .unwrap();
                let counts: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
                assert_eq!(counts["refused"], 400 - 32, "{counts}");
                let sock_arg = format!("--varlink={}", sock.display());
                let out = bus.banger_as(Some(USER_OK), &[&sock_arg, "vm", "list", "--json"]);
                assert!(
                    out.status.success(),
                    "a member during the flood: {}",
                    text(&out)
                );
                let out = bus.banger_as(Some(USER_OK), &["vm", "exec", "t1", "--", "true"]);
                assert!(out.status.success(), "t1 during the flood: {}", text(&out));
                assert_eq!(get("State").trim(), "s \"running\"");
                let (links, walls) = banger_network(&bus);
                assert!(
                    links.iter().any(|l| l == "banger0") && walls,
                    "the bridge and walls stay during the flood: {links:?} {walls}"
                );
                // Closing its input ends the flood.
                drop(flood.stdin.take());
                assert!(flood.wait().unwrap().success());
                use std::io::Write;
                let _ = writeln!(
                    std::io::stderr(),
                    "security (connection flood): {} connections tried, {} refused, 0 VMs misjudged",
                    counts["opened"],
                    counts["refused"]
                );
            }
        })
        .await;

    let fetch = || {
        let out = bus
            .in_netns("bash")
            .args([
                "-c",
                "exec 3<>/dev/tcp/127.0.0.1/18080 && printf 'GET /seeded HTTP/1.0\\r\\n\\r\\n' >&3 && cat <&3",
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    steps
        .run("a_published_port_reaches_the_guests_loopback", async {
            // A published port reaches a guest service bound to the guest's own loopback, though
            // t1's network is isolated; a second VM may not take the same host port.
            let out = bus.banger_as(
                Some(USER_OK),
                &[
                    "vm",
                    "exec",
                    "t1",
                    "--",
                    "sh",
                    "-c",
                    // It forks into the background: its output must not hold the exec's pipes.
                    "httpd -p 127.0.0.1:7070 -h /root </dev/null >/dev/null 2>&1",
                ],
            );
            assert!(out.status.success(), "{}", text(&out));
            assert!(fetch().contains("from the image"), "{}", fetch());
            let out = bus.banger_as(Some(USER_OK), &["--json", "vm", "show", "t1"]);
            let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(
                shown["published"],
                serde_json::json!(["127.0.0.1:18080:7070"]),
                "{shown}"
            );
            let out = bus.banger_as(
                Some(USER_OK),
                &[
                    "vm",
                    "create",
                    "taken",
                    "--image",
                    "tiny",
                    "--kernel",
                    "test",
                    "--publish",
                    "18080:80",
                    "--no-start",
                ],
            );
            assert!(
                text(&out).contains("host port 18080 is VM t1's"),
                "{}",
                text(&out)
            );
        })
        .await;

    steps
        .run("the_vmm_and_its_helpers_run_confined", async {
            // The VMM and its helpers run confined: no capability in any set, no new privileges,
            // and QEMU under its seccomp sandbox.
            let mut confined = 0;
            for (dir, c) in vm_process_dirs(&bus) {
                let which = ["qemu-system", "agent-link", "console-logger"]
                    .into_iter()
                    .find(|w| c.contains(w))
                    .unwrap_or("?");
                let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
                let field = |k: &str| {
                    status
                        .lines()
                        .find(|l| l.starts_with(k))
                        .map(|l| l[k.len()..].trim().to_owned())
                        .unwrap_or_default()
                };
                for k in ["CapEff:", "CapPrm:", "CapBnd:", "CapAmb:"] {
                    assert_eq!(field(k), "0000000000000000", "{which} {k}\n{status}");
                }
                assert_eq!(field("NoNewPrivs:"), "1", "{which}\n{status}");
                // A uid of the VM's own (t1 has CID 3), in every slot.
                let uid = banger::vmm::jail::vm_uid(3).to_string();
                let uids: Vec<&str> = status
                    .lines()
                    .find(|l| l.starts_with("Uid:"))
                    .unwrap_or_default()
                    .split_whitespace()
                    .skip(1)
                    .collect();
                assert_eq!(uids, [uid.as_str(); 4], "{which}\n{status}");
                if which == "qemu-system" {
                    assert_eq!(field("Seccomp:"), "2", "QEMU runs under its seccomp filter");
                    // And without transparent huge pages (`huge_pages` is off by default),
                    // which QEMU would ask for on guest memory and TCG's code buffer.
                    assert_eq!(field("THP_enabled:"), "0", "{which}\n{status}");
                } else {
                    // The helpers are a small program of their own, not the daemon's binary
                    // again (whose relocated data alone would cost each ~0.7 MiB).
                    let exe = std::fs::read_link(dir.join("exe")).unwrap();
                    assert_eq!(
                        exe.file_name().unwrap_or_default(),
                        "banger-vm-helper",
                        "{which} runs {}",
                        exe.display()
                    );
                }
                confined += 1;
            }
            assert_eq!(confined, 3, "QEMU, its agent link and its console logger");
            // What the VM costs the host is the PSS of exactly those processes, on D-Bus
            // (VM1 and the VMs1 total), in `vm list`, `vm show` and `status`, and on Varlink.
            {
                let pss: u64 = vm_process_dirs(&bus)
                    .iter()
                    .map(|(dir, _)| {
                        let r = std::fs::read_to_string(dir.join("smaps_rollup")).unwrap();
                        let l = r.lines().find(|l| l.starts_with("Pss:")).unwrap();
                        l.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() << 10
                    })
                    .sum();
                let json_of = |args: &[&str]| -> serde_json::Value {
                    let out = bus.banger_as(Some(USER_OK), args);
                    assert!(out.status.success(), "{}", text(&out));
                    serde_json::from_slice(&out.stdout).unwrap()
                };
                let shown = json_of(&["--json", "vm", "show", "t1"])["hostMemoryBytes"]
                    .as_u64()
                    .unwrap();
                let listed = json_of(&["--json", "vm", "list"])
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|v| v["name"] == "t1")
                    .unwrap()["hostMemoryMib"]
                    .as_u64()
                    .unwrap();
                let total = json_of(&["--json", "status"])["vmsHostMemoryMib"]
                    .as_u64()
                    .unwrap();
                let sock = format!("--varlink={}", bus.runtime.join("io.banger").display());
                let over_varlink = json_of(&[&sock, "--json", "vm", "show", "t1"])
                    ["hostMemoryBytes"]
                    .as_u64()
                    .unwrap();
                // And on the metrics socket systemd-report reads (io.systemd.Metrics).
                let metrics = {
                    let addr = format!(
                        "UNIX-CONNECT:{}",
                        bus.runtime.join("report/io.banger").display()
                    );
                    let c = bus.command_as(Some(USER_NO), "socat", &["-t", "10", "-", &addr]);
                    fed(
                        c,
                        b"{\"method\":\"io.systemd.Metrics.List\",\"more\":true}\0",
                    )
                    .stdout
                    .split(|&b| b == 0)
                    .filter(|r| !r.is_empty())
                    .map(|r| serde_json::from_slice::<serde_json::Value>(r).unwrap())
                    .collect::<Vec<_>>()
                };
                let of_t1 = |name: &str| {
                    metrics
                        .iter()
                        .find(|r| {
                            r["parameters"]["name"] == name && r["parameters"]["object"] == "t1"
                        })
                        .unwrap_or_else(|| panic!("no {name} of t1: {metrics:?}"))["parameters"]
                        ["value"]
                        .as_u64()
                        .unwrap()
                };
                assert!(of_t1("io.banger.vm_cpu_usage_nsec") > 0);
                let reported = of_t1("io.banger.vm_host_memory_bytes");
                // Memory moves between reads: the same order of magnitude is what is checked.
                for (what, bytes) in [
                    ("vm show", shown),
                    ("vm list", listed << 20),
                    ("status", total << 20),
                    ("vm show over Varlink", over_varlink),
                    ("io.systemd.Metrics", reported),
                ] {
                    assert!(
                        bytes > pss / 2 && bytes < pss * 2 + (64 << 20),
                        "{what}: {bytes} bytes, the processes' PSS {pss}"
                    );
                }
                println!(
                    "host memory of t1: {} MiB (PSS of its processes)",
                    pss >> 20
                );
            }
            // Its disks are its uid's alone.
            {
                use std::os::unix::fs::MetadataExt;
                let vm_dir = bus
                    .state_dir()
                    .join("vms")
                    .join(path.as_str().rsplit('/').next().unwrap());
                let m = std::fs::metadata(&vm_dir).unwrap();
                assert_eq!(
                    (m.uid(), m.mode() & 0o777),
                    (banger::vmm::jail::vm_uid(3), 0o700)
                );
                // Each process has a mount namespace of its own: QEMU sees its disks, the agent
                // link does not; neither sees banger's database.
                let inside = |which: &str, p: &std::path::Path| {
                    let (dir, _) = vm_process_dirs(&bus)
                        .into_iter()
                        .find(|(_, c)| c.contains(which))
                        .unwrap_or_else(|| panic!("{which} runs"));
                    inside_dir(&dir, p)
                };
                fn inside_dir(dir: &std::path::Path, p: &std::path::Path) -> bool {
                    dir.join("root").join(p.strip_prefix("/").unwrap()).exists()
                }
                let db = bus.state_dir().join("banger.db");
                assert!(db.exists(), "{}", db.display());
                assert!(inside("qemu-system", &vm_dir.join("work.ext4")));
                assert!(!inside("qemu-system", &db));
                assert!(!inside("agent-link", &vm_dir.join("work.ext4")));
                assert!(!inside("agent-link", &db));
                // Nor anything of the host's own (homes, temporary files, bus and runtime sockets:
                // each an empty tmpfs of banger's in its mount table), and no network but its tap: a
                // network namespace of its own, not the daemon's.
                let marker = std::path::Path::new("/tmp")
                    .join(format!("host-private-{}", std::process::id()));
                std::fs::write(&marker, b"").unwrap();
                let daemon = {
                    let out = Command::new("busctl")
                        .arg(format!("--address={}", bus.address))
                        .args([
                            "call",
                            "org.freedesktop.DBus",
                            "/org/freedesktop/DBus",
                            "org.freedesktop.DBus",
                            "GetConnectionUnixProcessID",
                            "s",
                            "org.banger",
                        ])
                        .output()
                        .unwrap();
                    assert!(out.status.success(), "{}", text(&out));
                    text(&out).trim().trim_start_matches("u ").to_owned()
                };
                let net_of =
                    |dir: &std::path::Path| std::fs::read_link(dir.join("ns/net")).unwrap();
                let daemon_net = net_of(std::path::Path::new(&format!("/proc/{daemon}")));
                let mut hidden = 0;
                for (dir, c) in vm_process_dirs(&bus) {
                    assert!(!inside_dir(&dir, &marker), "{c} sees the host's /tmp");
                    let mountinfo = std::fs::read_to_string(dir.join("mountinfo")).unwrap();
                    for p in ["/home", "/root", "/tmp", "/var/tmp", "/run", "/dev/shm"] {
                        if !std::path::Path::new(p).is_dir() {
                            continue;
                        }
                        // The last mount on a path is what the process sees there.
                        let last = mountinfo
                            .lines()
                            .rfind(|l| l.split(' ').nth(4) == Some(p))
                            .unwrap_or_default();
                        let after = last.split(" - ").nth(1).unwrap_or_default();
                        assert!(
                            after.starts_with("tmpfs ") && after.contains("mode=711"),
                            "{c}: {p} is not hidden: {last:?}"
                        );
                        hidden += 1;
                    }
                    assert_ne!(net_of(&dir), daemon_net, "{c} shares the daemon's network");
                }
                let _ = std::fs::remove_file(&marker);
                assert!(hidden >= 3 * 4, "{hidden} host places checked");
                // Root's runtime files (pid files, logs) are root's; the VM's sockets are in a
                // directory of its uid's own.
                let run = bus.runtime.join("vms").join(vm_dir.file_name().unwrap());
                for (p, uid, mode) in [
                    (run.clone(), 0, 0o710),
                    (run.join("jail"), banger::vmm::jail::vm_uid(3), 0o700),
                ] {
                    let m = std::fs::symlink_metadata(&p).unwrap();
                    assert_eq!((m.uid(), m.mode() & 0o777), (uid, mode), "{}", p.display());
                }
                for f in ["qemu.pid", "agent-link.pid", "console.pid", "qemu.log"] {
                    let m = std::fs::symlink_metadata(run.join(f)).unwrap();
                    assert!(m.is_file() && m.uid() == 0 && m.mode() & 0o022 == 0, "{f}");
                }
                // The initrd QEMU maps is one file per kernel and guest binaries, beside the
                // kernel's, that every VM's VMM maps (no copy per VM): root's, the VMM group's
                // to read, no VM's to change.
                let (qemu, _) = vm_process_dirs(&bus)
                    .into_iter()
                    .find(|(_, c)| c.contains("qemu-system"))
                    .unwrap();
                let maps = std::fs::read_to_string(qemu.join("maps")).unwrap();
                let initrd = maps
                    .lines()
                    .find_map(|l| l.split_whitespace().nth(5).filter(|p| p.contains("initrd")))
                    .map(std::path::PathBuf::from)
                    .unwrap_or_else(|| panic!("QEMU maps no initrd: {maps}"));
                let kernel_dir = bus.state_dir().join("kernels/test");
                assert_eq!(
                    initrd.parent(),
                    Some(kernel_dir.as_path()),
                    "{}",
                    initrd.display()
                );
                assert!(
                    initrd
                        .file_name()
                        .unwrap()
                        .to_string_lossy()
                        .starts_with("initrd.banger-"),
                    "{}",
                    initrd.display()
                );
                let m = std::fs::metadata(&initrd).unwrap();
                assert_eq!(
                    (m.uid(), m.gid(), m.mode() & 0o777),
                    (0, banger::vmm::jail::vmm_gid(), 0o640),
                    "{}",
                    initrd.display()
                );
                assert!(!run.join("jail/initrd.img").exists());
            }
        })
        .await;

    steps
        .run("freed_guest_memory_goes_back_to_the_host", async {
            // A guest that touches 200 MiB and frees it: its balloon reports the free pages and
            // the host takes them back, so the VM costs about what it did before.
            let out = bus.banger_as(
                Some(USER_OK),
                &[
                    "vm", "create", "bal", "--image", "tiny", "--kernel", "test", "--vcpus", "1",
                    "--memory", "512",
                ],
            );
            assert!(out.status.success(), "{}", text(&out));
            let drivers = exec_as(&bus, Some(USER_OK), "bal", &["busybox", "ls", "/sys/bus/virtio/drivers"]);
            assert!(drivers.contains("virtio_balloon"), "{drivers}");
            // Freed runs of 128 KiB are reported, not only 2 MiB ones (6.1 lets the driver
            // override the command line's order: banger-init sets it again), and the initramfs
            // was emptied before the switch (its files were ramfs pages, unevictable).
            let order = exec_as(
                &bus,
                Some(USER_OK),
                "bal",
                &["cat", "/sys/module/page_reporting/parameters/page_reporting_order"],
            );
            assert_eq!(order.trim(), banger::vmm::PAGE_REPORTING_ORDER.to_string());
            let meminfo = exec_as(&bus, Some(USER_OK), "bal", &["cat", "/proc/meminfo"]);
            let unevictable = meminfo
                .lines()
                .find_map(|l| l.strip_prefix("Unevictable:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .unwrap_or_else(|| panic!("{meminfo}"));
            assert!(unevictable < 1024, "the initramfs stays: {meminfo}");
            // No kernel memory accounting (`vmm::NO_KERNEL_MEMORY_ACCOUNTING`): no accounted
            // kmalloc caches, and so no 4 MiB table the kernel zeroes at boot for them.
            let slabs = exec_as(&bus, Some(USER_OK), "bal", &["cat", "/proc/slabinfo"]);
            let accounted: Vec<&str> = slabs.lines().filter(|l| l.starts_with("kmalloc-cg-")).collect();
            assert!(
                slabs.contains("kmalloc-") && accounted.is_empty(),
                "kernel memory is accounted: {accounted:?}"
            );
            let memory = || -> u64 {
                vm_shown(&bus, "bal")["hostMemoryBytes"].as_u64().unwrap()
            };
            let idle = memory();
            // dd holds its 200 MiB buffer, written full of zeros, while its reader waits for /tmp/go.
            let mut holder = bus
                .command_as(
                    Some(USER_OK),
                    env!("CARGO_BIN_EXE_banger"),
                    &[
                        "vm",
                        "exec",
                        "bal",
                        "--",
                        "sh",
                        "-c",
                        "dd if=/dev/zero bs=200M count=1 2>/dev/null | \
                         { busybox head -c 1 >/dev/null; until [ -e /tmp/go ]; do sleep 0.1; done; }",
                    ],
                )
                .spawn()
                .unwrap();
            let mut peak = 0;
            wait_until_async("the guest's 200 MiB on the host", Duration::from_secs(120), || {
                // Pages the guest had touched and freed before (in pieces too small to
                // report) are reused first: most of the 200 MiB, not all, is new to the host.
                peak = memory();
                peak > idle + (100 << 20)
            })
            .await;
            let freed_at = std::time::Instant::now();
            exec_as(&bus, Some(USER_OK), "bal", &["busybox", "touch", "/tmp/go"]);
            assert!(holder.wait().unwrap().success());
            let mut now = peak;
            wait_until_async(
                "the freed memory back on the host",
                Duration::from_secs(120),
                || {
                    now = memory();
                    now <= idle + (40 << 20)
                },
            )
            .await;
            println!(
                "balloon: idle {} MiB, holding {} MiB, {} MiB {:.1} s after the guest freed it",
                idle >> 20,
                peak >> 20,
                now >> 20,
                freed_at.elapsed().as_secs_f64()
            );
            let out = bus.banger_as(Some(USER_OK), &["vm", "delete", "--force", "bal"]);
            assert!(out.status.success(), "{}", text(&out));
        })
        .await;

    steps
        .run(
            "an_idle_guest_wakes_its_vmm_only_for_its_own_timers",
            async {
                // What woke an idle VM's QEMU most is gone: the PIT (QEMU toggles its channel 0
                // 36 times a second from reset, and Linux, ticking on the APIC timer, never stops
                // it), the guest's checks of its TSC against jiffies under TCG (its TSC is the
                // host's) and kcompactd's proactive compaction, each twice a second.
                let id = vm_shown(&bus, "t1")["id"].as_str().unwrap().to_owned();
                let pit = qmp(&bus, "t1")
                    .command(
                        "qom-get",
                        serde_json::json!({"path": "/machine", "property": "pit"}),
                    )
                    .unwrap();
                assert_eq!(pit, "off", "the VMM has a PIT");
                let seen = exec_as(
                    &bus,
                    Some(USER_OK),
                    "t1",
                    &[
                        "cat",
                        "/proc/sys/vm/compaction_proactiveness",
                        "/sys/devices/system/clocksource/clocksource0/current_clocksource",
                        "/proc/cmdline",
                    ],
                );
                let lines: Vec<&str> = seen.lines().collect();
                assert_eq!(lines[..2], ["0", "tsc"], "{seen}");
                let pid =
                    std::fs::read_to_string(bus.runtime.join("vms").join(&id).join("qemu.pid"))
                        .unwrap();
                let tcg = std::fs::read(format!("/proc/{}/cmdline", pid.trim()))
                    .map(|c| String::from_utf8_lossy(&c).contains("tcg,tb-size="))
                    .unwrap();
                assert_eq!(
                    lines[2].split_whitespace().any(|w| w == "tsc=reliable"),
                    tcg,
                    "tsc=reliable under TCG only: {seen}"
                );
            },
        )
        .await;

    steps
        .run(
            "every_virtqueue_has_the_entries_its_device_asks_for",
            async {
                // The default kernel's initrd loads virtio's PCI transport, so the VM's devices
                // sit on PCI, where each queue has the entries its device asks for: QEMU's
                // virtio-mmio offers 1024 whatever was asked, and Linux filled the agent
                // port's and the control queue's with a page each (8 MiB of the guest).
                let mut s = qmp(&bus, "t1");
                let devices = s.command("x-query-virtio", serde_json::json!({})).unwrap();
                let devices = devices.as_array().unwrap();
                let (mut queues, mut names) = (0, Vec::new());
                for d in devices {
                    let path = d["path"].as_str().unwrap();
                    names.push(d["name"].as_str().unwrap().to_owned());
                    for queue in 0.. {
                        let Ok(q) = s.command(
                            "x-query-virtio-queue-status",
                            serde_json::json!({"path": path, "queue": queue}),
                        ) else {
                            break;
                        };
                        let (num, asked) = (&q["vring-num"], &q["vring-num-default"]);
                        assert!(
                            num.as_u64().unwrap() <= asked.as_u64().unwrap(),
                            "{} queue {queue}: {num} entries, its device asks {asked}",
                            d["name"]
                        );
                        queues += 1;
                    }
                }
                names.sort();
                names.dedup();
                assert_eq!(
                    names,
                    [
                        "virtio-balloon",
                        "virtio-blk",
                        "virtio-net",
                        "virtio-serial",
                        "virtio-user-fs"
                    ],
                    "{devices:?}"
                );
                assert!(queues >= 12, "{queues} queues");
                // The guest drives each of them through virtio-pci.
                let bound = exec_as(
                    &bus,
                    Some(USER_OK),
                    "t1",
                    &[
                        "sh",
                        "-c",
                        "for d in /sys/bus/pci/drivers/virtio-pci/0000:*; do echo ${d##*/}; done",
                    ],
                );
                let on_pci = bound.lines().filter(|l| l.starts_with("0000:")).count();
                assert_eq!(on_pci, devices.len(), "{bound}");
            },
        )
        .await;

    steps
        .run("a_console_flood_is_capped", async {
            // A guest that floods its console leaves a log no larger than the cap.
            let out = bus.banger_as(
                Some(USER_OK),
                &[
                    "vm", "exec", "t1", "--", "sh", "-c",
                    "dd if=/dev/zero bs=1024 count=2600 2>/dev/null | tr '\\0' x > /dev/ttyS0; echo flooded > /dev/ttyS0",
                ],
            );
            assert!(out.status.success(), "{}", text(&out));
            let console = bus
                .state_dir()
                .join("vms")
                .join(path.as_str().rsplit('/').next().unwrap())
                .join("console.log");
            let every = Duration::from_millis(100);
            let flooded = poll_until_async(every * 100, every, || {
                banger::vmm::console::tail_lines(&console, 1).contains("flooded")
            })
            .await;
            let size = std::fs::metadata(&console).unwrap().len();
            assert!(flooded, "the flood's end reached the log");
            assert!(
                size <= banger::vmm::console::MAX_BYTES,
                "console.log is {size} bytes"
            );
        })
        .await;

    steps
        .run("the_guest_network_isolated_and_shared", async {
            // The guest network: a second VM, shared; t1 is isolated, so neither reaches the other.
            let out = bus.banger_as(
                Some(USER_OK),
                &[
                    "vm",
                    "create",
                    "t2",
                    "--network",
                    "shared",
                    "--image",
                    "tiny",
                    "--kernel",
                    "test",
                    "--vcpus",
                    "1",
                    "--memory",
                    "256",
                    "--disk-size",
                    "2147483648",
                ],
            );
            assert!(out.status.success(), "{}", text(&out));
            let (links, table) = banger_network(&bus);
            assert!(table, "table inet banger is up");
            assert_eq!(links.len(), 3, "banger0 and two taps: {links:?}");
            for vm in ["t1", "t2"] {
                let out = bus.banger_as(Some(USER_OK), &["vm", "exec", vm, "--", "hostname"]);
                assert_eq!(
                    String::from_utf8_lossy(&out.stdout),
                    format!("{vm}\n"),
                    "{}",
                    text(&out)
                );
            }
            network_matrix(&bus).await;
            // --disk-size: banger-init grew t2's root filesystem (a 1 GiB image) to its 2 GiB disk.
            let root_kib = |vm: &str| -> u64 {
                let out = bus.banger_as(
                    Some(USER_OK),
                    &["vm", "exec", vm, "--", "sh", "-c", "df -k / | tail -1"],
                );
                let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
                stdout
                    .split_whitespace()
                    .nth(1)
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| panic!("{stdout}"))
            };
            let (small, big) = (root_kib("t1"), root_kib("t2"));
            assert!(
                small < 1_100_000 && big > 1_900_000,
                "t1 {small} KiB, t2 {big} KiB"
            );
            let out = bus.banger_as(Some(USER_OK), &["vm", "delete", "--force", "t2"]);
            assert!(out.status.success(), "{}", text(&out));
            let (links, table) = banger_network(&bus);
            assert!(
                table && links.len() == 2,
                "t2's tap went, t1's network stays: {links:?}"
            );
        })
        .await;

    steps
        .run("running_vms_are_not_deleted_by_accident", async {
            // Running VMs are not deleted by accident.
            let out = bus.banger_as(Some(USER_OK), &["vm", "delete", "t1"]);
            assert!(text(&out).contains("is running"), "{}", text(&out));
        })
        .await;

    steps
        .run("a_killed_daemons_successor_adopts_the_vm", async {
            // The daemon dies hard; the VM does not, and the next call's daemon re-adopts it.
            let pid = bus
                .owner_pid(&conn, "org.banger")
                .await
                .expect("bangerd runs");
            // SAFETY: plain kill(2) of the bangerd this test's bus started.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            assert!(
                bus.wait_name_gone(&conn, "org.banger", Duration::from_secs(10))
                    .await
            );
            let out = bus.banger_as(Some(USER_NO), &["--json", "vm", "show", "t1"]);
            assert!(out.status.success(), "{}", text(&out));
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(
                (v["state"].as_str(), v["vsockCid"].as_u64()),
                (Some("running"), Some(3)),
                "{v}"
            );
            // Users think in image names: vm show and vm list give it beside the id.
            assert_eq!(v["imageName"], "tiny", "{v}");
            let out = bus.banger_as(Some(USER_NO), &["--json", "vm", "list"]);
            let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(list[0]["imageName"], "tiny", "{list}");
            let out = bus.banger_as(
                Some(USER_OK),
                &["vm", "exec", "t1", "--", "cat", "/root/marker"],
            );
            assert_eq!(
                String::from_utf8_lossy(&out.stdout),
                "kept\n",
                "{}",
                text(&out)
            );
            // The published port outlived the daemon.
            assert!(fetch().contains("from the image"), "{}", fetch());
        })
        .await;

    steps
        .run(
            "stop_and_start_keep_root_and_json_says_what_was_done",
            async {
                // Stop (through the agent), start again: /root survived. With --json, a verb that says
                // nothing to people says what it did to programs, and an error is JSON too.
                let out = bus.banger_as(Some(USER_OK), &["--json", "vm", "stop", "t1"]);
                assert!(out.status.success(), "{}", text(&out));
                let said: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                assert_eq!(said, serde_json::json!({"name": "t1", "state": "stopped"}));
                let out = bus.banger_as(Some(USER_OK), &["--json", "vm", "show", "no-such-vm"]);
                let err: serde_json::Value = serde_json::from_slice(&out.stderr).unwrap();
                assert!(
                    !out.status.success() && err["error"].as_str().unwrap().contains("no-such-vm"),
                    "{err}"
                );
                assert_eq!(get("State").trim(), "s \"stopped\"");
                assert!(vm_processes(&bus).is_empty(), "{:?}", vm_processes(&bus));
                assert!(
                    share_servers(&bus).is_empty(),
                    "the shares' servers stopped with the VM"
                );
                let out = bus.banger_as(Some(USER_OK), &["vm", "start", "t1"]);
                assert!(out.status.success(), "{}", text(&out));
                let out = bus.banger_as(
                    Some(USER_OK),
                    &["vm", "exec", "t1", "--", "cat", "/mnt/src/made"],
                );
                assert_eq!(
                    String::from_utf8_lossy(&out.stdout),
                    "from-guest\n",
                    "{}",
                    text(&out)
                );
                let out = bus.banger_as(
                    Some(USER_OK),
                    &["vm", "exec", "t1", "--", "cat", "/root/marker"],
                );
                assert_eq!(
                    String::from_utf8_lossy(&out.stdout),
                    "kept\n",
                    "{}",
                    text(&out)
                );
            },
        )
        .await;

    steps
        .run("a_guest_that_powers_off_is_noticed", async {
            // A guest that powers itself off is noticed.
            let _ = bus.banger_as(
                Some(USER_OK),
                &["vm", "exec", "t1", "--", "busybox", "poweroff", "-f"],
            );
            let mut state = String::new();
            let every = Duration::from_millis(100);
            poll_until_async(every * 100, every, || {
                state = get("State");
                state.contains("stopped")
            })
            .await;
            assert_eq!(state.trim(), "s \"stopped\"");
            assert!(vm_processes(&bus).is_empty(), "{:?}", vm_processes(&bus));
        })
        .await;

    steps
        .run(
            "an_escaped_vmm_cannot_swap_its_vsock_socket_and_a_forced_delete_leaves_nothing",
            async {
                // Start, then delete by force: processes, disks and the lease go.
                let out = bus.banger_as(Some(USER_OK), &["vm", "start", "t1"]);
                assert!(out.status.success(), "{}", text(&out));
                let vm_id = path.as_str().rsplit('/').next().unwrap().to_owned();

                // An escaped VMM swaps its vsock socket for another service's (a hard link keeps that
                // socket's owner; a symbolic link points anywhere): root connects to neither.
                {
                    use std::os::unix::fs::PermissionsExt;
                    let jail = bus.runtime.join("vms").join(&vm_id).join("jail");
                    let vsock = jail.join("vsock.sock");
                    let other = tempfile::tempdir().unwrap();
                    let foreign = other.path().join("service.sock");
                    let listener = std::os::unix::net::UnixListener::bind(&foreign).unwrap();
                    listener.set_nonblocking(true).unwrap();
                    std::fs::set_permissions(&foreign, std::fs::Permissions::from_mode(0o666))
                        .unwrap();
                    std::fs::remove_file(&vsock).unwrap();
                    std::os::unix::fs::symlink(&foreign, &vsock).unwrap();
                    let out = bus.banger_as(Some(USER_OK), &["vm", "exec", "t1", "--", "true"]);
                    assert!(!out.status.success(), "{}", text(&out));
                    assert!(text(&out).contains("refusing to connect"), "{}", text(&out));
                    std::fs::remove_file(&vsock).unwrap();
                    std::fs::rename(&foreign, &vsock).unwrap();
                    let out = bus.banger_as(Some(USER_OK), &["vm", "exec", "t1", "--", "true"]);
                    assert!(!out.status.success(), "{}", text(&out));
                    assert!(text(&out).contains("refusing to connect"), "{}", text(&out));
                    assert_eq!(
                        listener.accept().map(|_| ()).map_err(|e| e.kind()),
                        Err(std::io::ErrorKind::WouldBlock),
                        "the foreign socket got no connection"
                    );
                }
                let out = bus.banger_as(Some(USER_OK), &["vm", "delete", "--force", "t1"]);
                assert!(out.status.success(), "{}", text(&out));
                assert!(vm_processes(&bus).is_empty(), "{:?}", vm_processes(&bus));
                assert!(
                    share_servers(&bus).is_empty(),
                    "the shares' servers went with the VM"
                );
                assert!(
                    !fetch().contains("from the image"),
                    "the published port went with the VM"
                );
                let forwarders: Vec<i32> = processes_mentioning(&bus.runtime.to_string_lossy())
                    .into_iter()
                    .filter(|pid| {
                        std::fs::read(format!("/proc/{pid}/cmdline"))
                            .is_ok_and(|c| String::from_utf8_lossy(&c).contains("port-forward"))
                    })
                    .collect();
                assert!(
                    forwarders.is_empty(),
                    "the port forwarder went: {forwarders:?}"
                );
                assert!(!bus.state_dir().join("vms").join(&vm_id).exists());
                assert!(vms.list_vms().await.unwrap().is_empty());
                assert_eq!(
                    banger_network(&bus),
                    (Vec::new(), false),
                    "no VM left: bridge, taps and the nft table are gone"
                );
            },
        )
        .await;

    steps
        .run("two_creates_of_one_name_one_wins", async {
            // Two creates of one name: exactly one reservation wins; the address is reused.
            let no_start = || {
                opt(&[
                    ("image", "tiny".into()),
                    ("kernel", "test".into()),
                    ("start", false.into()),
                ])
            };
            let (a, b) = tokio::join!(
                vms.create_vm("dup", no_start()),
                vms.create_vm("dup", no_start())
            );
            let mut results = Vec::new();
            for r in [a, b] {
                match r {
                    Ok((_, id, _)) => results.push(job_result(&bus, id).await),
                    Err(e) => results.push(("refused".into(), e.to_string())),
                }
            }
            let winners = results.iter().filter(|(r, _)| r == "done").count();
            assert_eq!(winners, 1, "{results:?}");
            assert!(
                results
                    .iter()
                    .any(|(_, e)| e.contains("A VM named \"dup\" exists")),
                "{results:?}"
            );
            let listed = vms.list_vms().await.unwrap();
            assert_eq!((listed.len(), listed[0].2.as_str()), (1, "created"));
            let dup = vms.get_vm("dup").await.unwrap();
            let addr = text(&bus.busctl_as(
                None,
                &[
                    "get-property",
                    "org.banger",
                    dup.as_str(),
                    "org.banger.VM1",
                    "GuestAddress",
                ],
            ));
            assert!(
                addr.contains("172.30.99.2"),
                "the freed lease is reused: {addr}"
            );
        })
        .await;
}

/// A second network namespace routed behind the daemon's (a host "out there"), with
/// listeners: what guests may and may not reach through the host. Removed on drop.
struct Peer {
    name: String,
    listeners: Vec<std::process::Child>,
}

impl Drop for Peer {
    fn drop(&mut self) {
        for l in &mut self.listeners {
            let _ = l.kill();
            let _ = l.wait();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn sh_ok(c: &mut Command) {
    let out = c.output().unwrap();
    assert!(out.status.success(), "{c:?}: {}", text(&out));
}

/// The peer: 198.51.100.2 (public space), 10.99.0.2 (private, walled), 10.99.1.2 (private,
/// allowed by the test's allow_egress) and 169.254.169.254 (metadata), all on a veth whose
/// other end, in the daemon's namespace, holds 198.51.100.1 and 10.99.0.1 and 10.99.1.1 (host
/// addresses). Listeners: the peer on 7000 and 7001, the daemon's namespace on 7002.
fn peer(bus: &TestBus) -> Peer {
    let name = format!("banger-peer-{}", std::process::id());
    let _ = Command::new("ip").args(["netns", "del", &name]).status();
    sh_ok(Command::new("ip").args(["netns", "add", &name]));
    let mut p = Peer {
        name: name.clone(),
        listeners: Vec::new(),
    };
    sh_ok(bus.in_netns("ip").args([
        "link", "add", "bgw0", "type", "veth", "peer", "name", "peth", "netns", &name,
    ]));
    let host = "set -e; for a in 198.51.100.1/24 10.99.0.1/24 10.99.1.1/24; do ip addr add $a dev bgw0; done; \
                ip link set bgw0 up; ip route add 169.254.169.254/32 dev bgw0";
    sh_ok(bus.in_netns("sh").args(["-c", host]));
    let far = format!(
        "set -e; ip -n {name} link set lo up; \
         for a in 198.51.100.2/24 10.99.0.2/24 10.99.1.2/24 169.254.169.254/32; do ip -n {name} addr add $a dev peth; done; \
         ip -n {name} link set peth up"
    );
    sh_ok(Command::new("sh").args(["-c", &far]));
    for port in ["7000", "7001"] {
        p.listeners.push(
            Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &name,
                    "busybox",
                    "nc",
                    "-ll",
                    "-p",
                    port,
                    "-e",
                    "/bin/true",
                ])
                .spawn()
                .unwrap(),
        );
    }
    p.listeners.push(
        bus.in_netns("busybox")
            .args(["nc", "-ll", "-p", "7002", "-e", "/bin/true"])
            .spawn()
            .unwrap(),
    );
    // Ready when each answers a connection (from the daemon's namespace, outside the walls).
    for (addr, port) in [
        ("198.51.100.2", "7000"),
        ("198.51.100.2", "7001"),
        ("127.0.0.1", "7002"),
    ] {
        let every = Duration::from_millis(50);
        let up = poll_until(every * 100, every, || {
            bus.in_netns("busybox")
                .args(["nc", "-w", "1", addr, port])
                .stdin(std::process::Stdio::null())
                .output()
                .unwrap()
                .status
                .success()
        });
        assert!(up, "the listener on {addr}:{port} did not come up");
    }
    p
}

/// Whether `vm` connects to `addr:port` (a TCP handshake within 3 s).
fn connects(bus: &TestBus, vm: &str, addr: &str, port: &str) -> bool {
    let script = format!("nc -w 3 {addr} {port} </dev/null && echo OPEN || echo CLOSED");
    let out = bus.banger_as(
        Some(USER_OK),
        &["vm", "exec", vm, "--", "sh", "-c", &script],
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        stdout.contains("OPEN") || stdout.contains("CLOSED"),
        "{vm}: {}",
        text(&out)
    );
    stdout.contains("OPEN")
}

/// The guest-network matrix: t1 isolated, t2 and t3 shared (same owner), t3 narrowed to
/// 198.51.100.0/24:7000; prints what it tried.
async fn network_matrix(bus: &TestBus) {
    let out = bus.banger_as(
        Some(USER_OK),
        &[
            "vm",
            "create",
            "t3",
            "--image",
            "tiny",
            "--kernel",
            "test",
            "--vcpus",
            "1",
            "--memory",
            "256",
            "--network",
            "shared",
            "--egress",
            "198.51.100.0/24:7000",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let show = bus.banger_as(Some(USER_OK), &["--json", "vm", "show", "t3"]);
    let v: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    assert_eq!(v["network"], "shared", "{v}");
    assert_eq!(v["egress"][0], "198.51.100.0/24:7000", "{v}");
    assert!(
        v["walls"].as_str().unwrap().contains("egress only to"),
        "{v}"
    );
    let _peer = peer(bus);
    let (t1, t2, t3) = ("172.30.99.2", "172.30.99.3", "172.30.99.4");
    let tried = std::cell::Cell::new(0);
    let check = |vm: &str, addr: &str, port: &str, open: bool, what: &str| {
        tried.set(tried.get() + 1);
        assert_eq!(
            connects(bus, vm, addr, port),
            open,
            "{vm} → {addr}:{port} ({what})"
        );
    };
    // Out there: reachable, unless private, link-local or narrowed away.
    check("t1", "198.51.100.2", "7000", true, "a public address");
    check("t1", "10.99.0.2", "7000", false, "a private address");
    check(
        "t1",
        "10.99.1.2",
        "7000",
        true,
        "a private address allow_egress names",
    );
    check(
        "t1",
        "169.254.169.254",
        "7000",
        false,
        "link-local metadata",
    );
    check("t3", "198.51.100.2", "7000", true, "t3's egress list");
    check(
        "t3",
        "198.51.100.2",
        "7001",
        false,
        "a port t3's egress list leaves out",
    );
    // The host: none of its addresses, whatever listens there.
    check("t1", "172.30.99.1", "7002", false, "the bridge address");
    check("t1", "198.51.100.1", "7002", false, "another host address");
    check(
        "t2",
        "10.99.1.1",
        "7002",
        false,
        "a host address in an allowed range",
    );
    // Guests: shared VMs of one owner meet; an isolated one meets nobody. (Each runs the
    // image's httpd on 8080.)
    check("t2", t3, "8080", true, "a shared VM of the same owner");
    check("t3", t2, "8080", true, "a shared VM of the same owner");
    check("t1", t2, "8080", false, "isolated → shared");
    check("t2", t1, "8080", false, "shared → isolated");
    // Spoofing: another address or another MAC gets nowhere.
    let spoof = |vm: &str, prepare: &str, restore: &str| {
        let script = format!(
            "{prepare}; nc -w 3 198.51.100.2 7000 </dev/null && r=OPEN || r=CLOSED; {restore}; echo $r"
        );
        let out = bus.banger_as(
            Some(USER_OK),
            &["vm", "exec", vm, "--", "sh", "-c", &script],
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let ip_spoof = spoof(
        "t1",
        "ip addr del 172.30.99.2/24 dev eth0; ip addr add 172.30.99.50/24 dev eth0; ip route add default via 172.30.99.1",
        "ip addr del 172.30.99.50/24 dev eth0; ip addr add 172.30.99.2/24 dev eth0; ip route add default via 172.30.99.1",
    );
    assert!(
        ip_spoof.contains("CLOSED"),
        "a spoofed source address got out: {ip_spoof}"
    );
    let mac = {
        let show = bus.banger_as(Some(USER_OK), &["--json", "vm", "show", "t1"]);
        let v: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
        v["macAddress"].as_str().unwrap().to_owned()
    };
    let mac_spoof = spoof(
        "t1",
        "ip link set eth0 down; ip link set eth0 address 02:aa:bb:cc:dd:ee; ip link set eth0 up; ip route add default via 172.30.99.1",
        &format!("ip link set eth0 down; ip link set eth0 address {mac}; ip link set eth0 up; ip route add default via 172.30.99.1"),
    );
    assert!(
        mac_spoof.contains("CLOSED"),
        "a spoofed MAC got out: {mac_spoof}"
    );
    tried.set(tried.get() + 2);
    // After both, t1 is itself again.
    check("t1", "198.51.100.2", "7000", true, "t1 restored");
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "network matrix: {} cases, all as expected",
        tried.get()
    );
    let out = bus.banger_as(Some(USER_OK), &["vm", "delete", "--force", "t3"]);
    assert!(out.status.success(), "{}", text(&out));
}

async fn a_boot_that_fails_names_its_stage_keeps_the_console_and_leaves_nothing_running() {
    if !available(VM_TOOLS) {
        return;
    }
    let Some((vmlinuz, modules, _)) = debian_kernel() else {
        return;
    };
    if guest_bins().is_none() {
        return;
    }
    let bus = TestBus::start(BusOptions {
        extra_config: "accel = \"tcg\"\nboot_timeout_sec = 240\n".into(),
        netns: true,
        ..Default::default()
    });
    let conn = bus.connect().await;
    // A VM created with an init its image does not have: banger-init reports it and powers
    // off (an image with no init at all gets banger-init as its init instead).
    let rootfs = bus.dir.path().join("noinit.ext4");
    let empty = tempfile::tempdir().unwrap();
    std::fs::create_dir(empty.path().join("root")).unwrap();
    let ok = Command::new("mkfs.ext4")
        .args(["-q", "-d"])
        .arg(empty.path())
        .arg(&rootfs)
        .arg("16M")
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let images = Images1Proxy::new(&conn).await.unwrap();
    images
        .register_image(
            "noinit",
            opt(&[("rootfs", rootfs.to_string_lossy().into_owned().into())]),
        )
        .await
        .unwrap();
    import_kernel(&conn, "test", &vmlinuz, &modules).await;
    let vms = VMs1Proxy::new(&conn).await.unwrap();
    let (path, id, _) = vms
        .create_vm(
            "broken",
            opt(&[
                ("image", "noinit".into()),
                ("kernel", "test".into()),
                ("vcpus", 1u32.into()),
                ("memory_mib", 256u32.into()),
                ("init", "/sbin/init".into()),
            ]),
        )
        .await
        .unwrap();
    let (result, error) = job_result(&bus, id).await;
    assert_eq!(result, "failed");
    assert!(error.contains("failed at stage wait_agent"), "{error}");
    // The public error points at the log; the guest's console stays its owner's.
    assert!(error.contains("banger vm logs broken"), "{error}");
    assert!(!error.contains("/sbin/init"), "{error}");
    let state = text(&bus.busctl_as(
        None,
        &[
            "get-property",
            "org.banger",
            path.as_str(),
            "org.banger.VM1",
            "State",
        ],
    ));
    assert_eq!(state.trim(), "s \"failed\"");
    assert!(vm_processes(&bus).is_empty(), "{:?}", vm_processes(&bus));
    let out = bus.banger_as(None, &["vm", "logs", "broken"]);
    assert!(text(&out).contains("powering off"), "{}", text(&out));
    assert!(
        text(&out).contains("/sbin/init is not on the root filesystem"),
        "{}",
        text(&out)
    );
    // A registered image nobody injected anything into: banger-init installs the agent the
    // host appended to the initrd and starts it, so the VM still becomes ready.
    let tree = tempfile::tempdir().unwrap();
    let t = tree.path();
    for d in ["bin", "sbin", "etc", "root", "dev", "proc", "sys"] {
        std::fs::create_dir(t.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", t.join("bin/busybox")).unwrap();
    for a in ["sh", "cat", "true"] {
        std::os::unix::fs::symlink("busybox", t.join("bin").join(a)).unwrap();
    }
    std::os::unix::fs::symlink("/bin/busybox", t.join("sbin/init")).unwrap();
    std::fs::write(t.join("etc/inittab"), "::sysinit:/bin/true\n").unwrap();
    let plain = bus.dir.path().join("plain.ext4");
    let ok = Command::new("mkfs.ext4")
        .args(["-q", "-E", "root_owner=0:0", "-d"])
        .arg(t)
        .arg(&plain)
        .arg("64M")
        .status()
        .unwrap()
        .success();
    assert!(ok);
    // Registered with kernel files: they become kernel "plain", which the image names.
    images
        .register_image(
            "plain",
            opt(&[
                ("rootfs", plain.to_string_lossy().into_owned().into()),
                ("kernel_path", vmlinuz.to_string_lossy().into_owned().into()),
                ("modules_dir", modules.to_string_lossy().into_owned().into()),
            ]),
        )
        .await
        .unwrap();
    let out = bus.banger_as(None, &["kernel", "show", "plain"]);
    assert!(out.status.success(), "{}", text(&out));
    let (_, id, _) = vms
        .create_vm(
            "plain-vm",
            opt(&[
                ("image", "plain".into()),
                ("vcpus", 1u32.into()),
                ("memory_mib", 256u32.into()),
            ]),
        )
        .await
        .unwrap();
    let (result, error) = job_result(&bus, id).await;
    assert_eq!(result, "done", "{error}");
    let out = bus.banger_as(
        None,
        &["vm", "exec", "plain-vm", "--", "cat", "/proc/1/comm"],
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "init\n",
        "{}",
        text(&out)
    );
    let out = bus.banger_as(None, &["vm", "delete", "--force", "plain-vm"]);
    assert!(out.status.success(), "{}", text(&out));

    // A missing kernel is named, with where to look.
    let out = bus.banger_as(
        Some(USER_OK),
        &[
            "vm", "create", "nokernel", "--image", "noinit", "--kernel", "nope",
        ],
    );
    assert!(!out.status.success());
    assert!(
        text(&out).contains("banger kernel list --available"),
        "{}",
        text(&out)
    );
}

/// `banger ARGS` in the bus's network namespace as root with `home` as HOME, fed `stdin`.
fn banger_netns(
    bus: &TestBus,
    home: &std::path::Path,
    args: &[&str],
    stdin: &str,
) -> std::process::Output {
    let mut c = bus.in_netns(env!("CARGO_BIN_EXE_banger"));
    c.args(args)
        .env("DBUS_SYSTEM_BUS_ADDRESS", &bus.address)
        .env("HOME", home)
        .env_remove("XDG_STATE_HOME");
    fed(c, stdin.as_bytes())
}

async fn the_default_image_is_built_on_demand_and_vm_run_gives_an_ssh_session_in_a_namespace() {
    if !available(
        &[
            VM_TOOLS,
            &["debootstrap", "ssh", "ssh-keygen", "nsenter", "nft"],
        ]
        .concat(),
    ) {
        return;
    }
    let Some((vmlinuz, modules, _)) = debian_kernel() else {
        return;
    };
    if guest_bins().is_none() {
        return;
    }
    let state = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    let key = home.path().join(".ssh/id_ed25519");
    std::fs::create_dir_all(key.parent().unwrap()).unwrap();
    let ok = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key)
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    {
        // With the host's network: the default kernel ("debian") imported from the package
        // tests/run fetched; the default image is missing, so CreateVM builds it (debootstrap
        // from this host's apt mirror).
        let prep = TestBus::start(BusOptions {
            state_dir: Some(state.path().to_owned()),
            ..Default::default()
        });
        let conn = prep.connect().await;
        import_kernel(&conn, "debian", &vmlinuz, &modules).await;
        let vms = VMs1Proxy::new(&conn).await.unwrap();
        let mut progress = vms.receive_create_progress().await.unwrap();
        let pubkey = key.with_extension("pub");
        let out = prep.banger_as(
            Some(USER_OK),
            &[
                "vm",
                "create",
                "deb",
                "--no-start",
                "--ssh-key",
                pubkey.to_str().unwrap(),
            ],
        );
        assert!(out.status.success(), "{}", text(&out));
        let mut stages = Vec::new();
        while let Ok(Some(s)) = tokio::time::timeout(Duration::from_secs(2), progress.next()).await
        {
            stages.push(s.args().unwrap().stage.to_string());
        }
        assert_eq!(
            stages,
            ["resolve_image", "auto_pull_image", "reserve"],
            "{stages:?}"
        );
    }

    // The VMs, in a namespace of the test's own.
    let bus = TestBus::start(BusOptions {
        extra_config: "accel = \"tcg\"\nboot_timeout_sec = 240\n".into(),
        netns: true,
        state_dir: Some(state.path().to_owned()),
        ..Default::default()
    });
    let conn = bus.connect().await;
    let out = bus.banger_as(Some(USER_OK), &["vm", "start", "deb"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("==> Waiting for sshd on 172.30.99.2:22"),
        "{}",
        text(&out)
    );
    let vms = VMs1Proxy::new(&conn).await.unwrap();
    let deb = vms.get_vm("deb").await.unwrap();
    let vm = banger::dbus::proxy::VM1Proxy::builder(&conn)
        .path(deb.clone())
        .build()
        .await
        .unwrap();
    assert_eq!(vm.ssh_address().await.unwrap(), "172.30.99.2:22");
    let host_key = vm.ssh_host_key().await.unwrap();
    assert!(host_key.starts_with("ssh-ed25519 "), "{host_key}");

    let out = bus.banger_as(
        Some(USER_OK),
        &[
            "vm", "exec", "deb", "--", "sh", "-c",
            "cat /proc/1/comm; cat /etc/debian_version; systemctl is-active banger-agent; findmnt -no SOURCE /root; \
             cat /etc/ssh/ssh_host_ed25519_key.pub; ls /etc/ssh | grep -c _key; cat /root/.ssh/authorized_keys; cat /etc/resolv.conf",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "systemd", "{stdout}");
    assert!(lines[1].starts_with("12."), "{stdout}");
    assert_eq!(lines[2], "active", "{stdout}");
    assert!(
        lines[3].starts_with("/dev/vd"),
        "the work disk is on /root: {stdout}"
    );
    let fields = |l: &str| l.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
    assert_eq!(
        fields(lines[4]),
        fields(&host_key),
        "the guest runs the key banger made"
    );
    assert_eq!(lines[5], "2", "only the VM's own host key pair: {stdout}");
    assert_eq!(lines[6].trim(), public.trim(), "{stdout}");
    for ns in banger::net::host_resolvers() {
        assert!(
            stdout.contains(&format!("nameserver {ns}")),
            "resolvers: {stdout}"
        );
    }

    // `banger vm run`: create a second VM from the default image, wait for it, and hand the
    // session (here fed on stdin) to ssh; --rm deletes it after.
    let session =
        "uname -a\nhostname\ntimeout 5 bash -c 'echo > /dev/tcp/172.30.99.2/22' && echo reached-deb || echo walled-off\n";
    let out = banger_netns(&bus, home.path(), &["vm", "run", "web", "--rm"], session);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("Linux web "), "{stdout}");
    assert!(stdout.contains("\nweb\n"), "{stdout}");
    assert!(
        stdout.contains("walled-off") && !stdout.contains("reached-deb"),
        "isolated VMs (the default) do not reach each other: {stdout}"
    );
    assert!(
        text(&out).contains("==> Waiting for sshd"),
        "{}",
        text(&out)
    );
    let listed: Vec<String> = vms
        .list_vms()
        .await
        .unwrap()
        .into_iter()
        .map(|v| v.1)
        .collect();
    assert_eq!(listed, ["deb"], "--rm deleted the VM");

    // `banger vm ssh` with the host key banger keeps in the user's known_hosts.
    let out = banger_netns(
        &bus,
        home.path(),
        &["vm", "ssh", "deb", "--", "uname", "-n"],
        "",
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "deb\n",
        "{}",
        text(&out)
    );
    let known =
        std::fs::read_to_string(home.path().join(".local/state/banger/known_hosts")).unwrap();
    assert!(known.contains(&fields(&host_key)), "{known}");

    // A fork of it is ready only once its sshd serves the fork's own host key (strict host key
    // checking against the key banger recorded), and the host reaches the fork at its new
    // address and MAC on the first try (the address was the deleted `web`'s a moment ago).
    let out = bus.banger_as(Some(USER_OK), &["vm", "fork", "deb", "deb2"]);
    assert!(out.status.success(), "{}", text(&out));
    // Its agent saw sshd listen once it had the new key: the host only checks the new
    // address answers, and asks sshd nothing (no connection child left running).
    assert!(
        text(&out).contains(": the guest's sshd listens"),
        "{}",
        text(&out)
    );
    let out = banger_netns(
        &bus,
        home.path(),
        &["vm", "ssh", "deb2", "--", "uname", "-n"],
        "",
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "deb2\n",
        "{}",
        text(&out)
    );
    let deb2 = vm_shown(&bus, "deb2");
    let key2 = deb2["sshHostKey"].as_str().unwrap().to_owned();
    assert_ne!(
        fields(&key2),
        fields(&host_key),
        "the fork has a key of its own"
    );
    let known =
        std::fs::read_to_string(home.path().join(".local/state/banger/known_hosts")).unwrap();
    assert!(known.contains(&fields(&key2)), "{known}");
    for args in [
        &["vm", "delete", "deb2", "--force"][..],
        &["snapshot", "delete", "deb2"],
    ] {
        let out = bus.banger_as(Some(USER_OK), args);
        assert!(out.status.success(), "{args:?}: {}", text(&out));
    }

    // A generated name, a command through the agent, its exit status, and --rm.
    let out = banger_netns(
        &bus,
        home.path(),
        &["vm", "run", "--rm", "--", "sh", "-c", "hostname; exit 7"],
        "",
    );
    assert_eq!(out.status.code(), Some(7), "{}", text(&out));
    let name = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert_eq!(name.matches('-').count(), 2, "generated name: {name:?}");
    assert_eq!(vms.list_vms().await.unwrap().len(), 1);

    // A clean power-off through the agent and systemd, then nothing of banger's network.
    let out = bus.banger_as(Some(USER_OK), &["vm", "stop", "deb"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(vm_processes(&bus).is_empty(), "{:?}", vm_processes(&bus));
    assert_eq!(banger_network(&bus), (Vec::new(), false));
    let out = bus.banger_as(Some(USER_OK), &["vm", "delete", "deb"]);
    assert!(out.status.success(), "{}", text(&out));
}

async fn a_subnet_over_a_host_route_refuses_vms_with_the_reason_and_keeps_the_rest_working() {
    if !available(&["dbus-daemon", "unshare", "nsenter", "ip", "nft"]) {
        return;
    }
    let bus = TestBus::start(BusOptions {
        extra_config: "subnet = \"172.30.97.0/24\"\n".into(),
        netns: true,
        ..Default::default()
    });
    // Before the daemon starts (it is bus-activated by the first call): a host route that
    // covers the configured subnet.
    let out = bus
        .in_netns("sh")
        .args(["-c", "ip link add up0 type bridge && ip addr add 172.30.96.1/22 dev up0 && ip link set up0 up"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let out = bus.banger_as(Some(USER_OK), &["vm", "create", "x", "--image", "any"]);
    assert!(!out.status.success());
    let msg = text(&out);
    assert!(
        msg.contains("172.30.97.0/24")
            && msg.contains("overlaps the host route 172.30.96.0/22 (dev up0)")
            && msg.contains("config.toml"),
        "{msg}"
    );
    let conn = bus.connect().await;
    let vms = VMs1Proxy::new(&conn).await.unwrap();
    assert!(
        vms.list_vms().await.unwrap().is_empty(),
        "nothing half-created"
    );
    // Images and kernels do not depend on the VM network.
    let out = bus.banger_as(Some(USER_OK), &["image", "list"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(banger_network(&bus), (Vec::new(), false));
}

/// A container image as most registries serve them: busybox's userland, no init, and no
/// `/dev`, `/proc`, `/sys`, `/run`, `/tmp` or `/root`.
fn init_less_layers() -> Vec<Vec<u8>> {
    let busybox = std::fs::read("/bin/busybox").expect("busybox-static");
    let mut l = Layer::default()
        .dir("bin", 0o755)
        .file("bin/busybox", &busybox, 0o755, 0)
        .dir("srv/app", 0o755)
        .file("srv/app/hello", b"from the image\n", 0o644, 0);
    for applet in [
        "sh", "cat", "echo", "grep", "wc", "id", "kill", "pidof", "hostname", "ls", "sleep",
    ] {
        l = l.link(&format!("bin/{applet}"), tar::EntryType::Symlink, "busybox");
    }
    vec![l.bytes()]
}

/// How many jobs of `kind` the daemon ever ran.
fn jobs_of_kind(bus: &TestBus, kind: &str) -> usize {
    let store = banger::store::Store::open(&bus.state_dir().join("banger.db")).unwrap();
    let k = kind.to_owned();
    store
        .call_blocking(move |c| {
            let max = banger::store::rows::max_job_id(c)?;
            let mut n = 0;
            for id in 1..=max {
                if banger::store::rows::find_job(c, id)?.is_some_and(|j| j.kind == k) {
                    n += 1;
                }
            }
            Ok(n)
        })
        .unwrap()
}

async fn an_init_less_image_boots_by_its_reference_alone_with_banger_init_as_its_init() {
    let Some((_state, bus)) = kernel_ready_bus(&[], "").await else {
        return;
    };
    let conn = bus.connect().await;
    // The registry serves on the daemon's own loopback: pulled by reference alone.
    let registry = TestRegistry::start_in_netns(bus.netns_pid());
    let layout = tempfile::tempdir().unwrap();
    // Its configuration as `docker build` writes one.
    let m = image_manifest_configured(
        layout.path(),
        &init_less_layers(),
        serde_json::json!({
            "Env": ["PATH=/bin", "GREETING=hello from the image"],
            "WorkingDir": "/srv/app",
            "Entrypoint": ["/bin/sh", "-c"],
            "Cmd": ["echo \"$GREETING in $(pwd)\"; exit 3"],
        }),
    );
    finish_layout(layout.path(), vec![m], "v1");
    let reference = registry.push(layout.path(), "v1", "library/bare", &[]);

    // Two creates of one missing reference share one pull; one of them boots.
    let vms = VMs1Proxy::new(&conn).await.unwrap();
    let create = |name: &'static str, start: bool| {
        let (vms, reference) = (vms.clone(), reference.clone());
        async move {
            vms.create_vm(
                name,
                opt(&[
                    ("image", reference.clone().into()),
                    ("vcpus", 1u32.into()),
                    ("memory_mib", 256u32.into()),
                    ("start", start.into()),
                ]),
            )
            .await
            .unwrap()
        }
    };
    let ((_, j1, _), (_, j2, _)) = tokio::join!(create("b1", true), create("b2", false));
    for j in [j1, j2] {
        let (state, error) = job_result(&bus, j).await;
        assert_eq!(state, "done", "{error}");
    }
    assert_eq!(jobs_of_kind(&bus, "pull-image"), 1, "one pull for both");
    let images = Images1Proxy::new(&conn).await.unwrap();
    assert_eq!(images.list_images().await.unwrap().len(), 1);
    // The image keeps its configuration.
    let out = bus.banger_as(None, &["--json", "image", "show", "bare-v1"]);
    let shown: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", text(&out)));
    assert_eq!(shown["workingDir"], "/srv/app", "{shown}");
    assert_eq!(shown["env"][1], "GREETING=hello from the image", "{shown}");
    assert_eq!(
        shown["entrypoint"],
        serde_json::json!(["/bin/sh", "-c"]),
        "{shown}"
    );

    let exec = |cmd: &str| {
        let out = bus.banger_as(None, &["vm", "exec", "b1", "--", "sh", "-c", cmd]);
        assert!(out.status.success(), "{cmd}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(exec("cat /proc/version").starts_with("Linux version"));
    assert_eq!(
        exec("echo gone > /dev/null && cat /srv/app/hello"),
        "from the image\n"
    );
    // banger-init is the init, and the base every guest gets is there.
    assert_eq!(exec("cat /proc/1/comm"), "init\n");
    let mounts = exec("cat /proc/mounts");
    for m in [
        " /proc proc",
        " /sys sysfs",
        " /dev devtmpfs",
        " /dev/pts devpts",
        " /dev/shm tmpfs",
        " /run tmpfs",
        " /tmp tmpfs",
        " /root ext4",
    ] {
        assert!(mounts.contains(m), "{m} in\n{mounts}");
    }
    assert_eq!(exec("cat /etc/hostname"), "b1\n");
    assert!(exec("cat /etc/hosts").contains("127.0.1.1\tb1\n"));
    // vm exec runs with the image's environment and working directory, unless told.
    assert_eq!(
        exec("echo \"$GREETING|$(pwd)|$PATH\""),
        "hello from the image|/srv/app|/bin\n"
    );
    let out = bus.banger_as(
        None,
        &[
            "vm",
            "exec",
            "b1",
            "--env",
            "GREETING=overridden",
            "--workdir",
            "/tmp",
            "--user",
            "4242",
            "--",
            "sh",
            "-c",
            "echo \"$GREETING|$(pwd)|$(id -u)\"",
        ],
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "overridden|/tmp|4242\n",
        "{}",
        text(&out)
    );

    // The agent is supervised: killed, it comes back.
    let _ = bus.banger_as(
        None,
        &[
            "vm",
            "exec",
            "b1",
            "--",
            "sh",
            "-c",
            "kill -9 $(pidof banger-agent)",
        ],
    );
    let mut last = String::new();
    let every = Duration::from_millis(200);
    let back = poll_until_async(every * 100, every, || {
        let out = bus.banger_as(None, &["vm", "exec", "b1", "--", "echo"]);
        last = text(&out);
        out.status.success()
    })
    .await;
    let path = vms.get_vm("b1").await.unwrap();
    let vm_id = path.as_str().rsplit('/').next().unwrap().to_owned();
    let console = bus.state_dir().join("vms").join(&vm_id).join("console.log");
    assert!(
        back,
        "the agent came back: {last}\n{}",
        std::fs::read_to_string(&console).unwrap_or_default()
    );
    let stopped = |bus: &TestBus| {
        let out = bus.banger_as(None, &["--json", "vm", "show", "b1"]);
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["state"] == "stopped"
    };
    // The ACPI power button (QMP system_powerdown, what banger uses when the agent does not
    // answer) powers it off through banger-init.
    let qmp = bus.runtime.join("vms").join(&vm_id).join("jail/qmp.sock");
    banger::vmm::qmp::execute(&qmp, "system_powerdown")
        .await
        .unwrap();
    let every = Duration::from_millis(100);
    let off = poll_until_async(every * 300, every, || stopped(&bus)).await;
    let log = std::fs::read_to_string(&console).unwrap_or_default();
    assert!(off, "the power button powered it off:\n{log}");
    assert!(log.contains("banger-init: power button pressed"), "{log}");

    // Started again, it stops through the agent: banger-init shuts down cleanly.
    let out = bus.banger_as(None, &["vm", "start", "b1"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = bus.banger_as(None, &["vm", "stop", "b1"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(stopped(&bus));
    let log = std::fs::read_to_string(&console).unwrap_or_default();
    assert!(log.contains("banger-init: shutting down"), "{log}");
    for vm in ["b1", "b2"] {
        let out = bus.banger_as(None, &["vm", "delete", vm]);
        assert!(out.status.success(), "{}", text(&out));
    }

    // The image's Entrypoint+Cmd as the VM's main process: its output, its status.
    let out = bus.banger_as(
        None,
        &[
            "vm",
            "run",
            "m1",
            "--image",
            &reference,
            "--entrypoint",
            "--memory",
            "256",
            "--vcpus",
            "1",
        ],
    );
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello from the image in /srv/app\n",
        "{}",
        text(&out)
    );
    let m1 = vms.get_vm("m1").await.unwrap();
    let status = bus.busctl_as(
        None,
        &[
            "get-property",
            "org.banger",
            m1.as_str(),
            "org.banger.VM1",
            "ExitStatus",
        ],
    );
    assert_eq!(text(&status).trim(), "i 3");
    let out = bus.banger_as(None, &["vm", "logs", "m1"]);
    assert!(
        text(&out).contains("hello from the image in /srv/app"),
        "{}",
        text(&out)
    );
    // A command replaces Cmd, as `docker run IMAGE ARGS` does; --rm removes the VM.
    let out = bus.banger_as(
        None,
        &[
            "vm",
            "run",
            "m2",
            "--image",
            &reference,
            "--entrypoint",
            "--rm",
            "--memory",
            "256",
            "--vcpus",
            "1",
            "--",
            "echo replaced; exit 0",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "replaced\n",
        "{}",
        text(&out)
    );
    assert!(vms.get_vm("m2").await.is_err(), "--rm removed it");
    let out = bus.banger_as(None, &["vm", "delete", "m1"]);
    assert!(out.status.success(), "{}", text(&out));
}

/// Runs a tool of the test's fixtures, failing the test with its words when it fails.
fn tool(program: &str, args: &[&str]) {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Real images from tools no one here wrote, pushed with skopeo, pulled by reference and
/// booted: a Debian minbase tree made by debootstrap (no init, as Docker's `debian` image),
/// packed as an OCI layer by umoci, and a umoci image whose second layer deletes files (the
/// whiteouts umoci's own diff writes).
async fn debootstrap_and_umoci_images_boot_by_reference() {
    let Some((_state, bus)) = kernel_ready_bus(&["debootstrap", "umoci"], "").await else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let w = |p: &str| work.path().join(p).to_string_lossy().into_owned();

    // Debian minbase from the host's own mirror and suite.
    let mirror = banger::images::host_mirror().unwrap();
    let suite = std::fs::read_to_string("/etc/os-release")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME=").map(str::to_owned))
        .unwrap_or_else(|| "bookworm".into());
    tool(
        "debootstrap",
        &["--variant=minbase", &suite, &w("debian"), &mirror],
    );
    assert!(
        !work.path().join("debian/sbin/init").exists(),
        "minbase has no init"
    );
    tool("umoci", &["init", "--layout", &w("layout")]);
    tool(
        "umoci",
        &["new", "--image", &format!("{}:minbase", w("layout"))],
    );
    tool(
        "umoci",
        &[
            "unpack",
            "--image",
            &format!("{}:minbase", w("layout")),
            &w("b1"),
        ],
    );
    tool(
        "sh",
        &[
            "-c",
            &format!("cp -a {}/. {}/rootfs/", w("debian"), w("b1")),
        ],
    );
    tool(
        "umoci",
        &[
            "repack",
            "--image",
            &format!("{}:minbase", w("layout")),
            &w("b1"),
        ],
    );

    // Two layers, the second a real diff that deletes a file and a directory.
    let busybox = "/bin/busybox";
    tool(
        "umoci",
        &["new", "--image", &format!("{}:layered", w("layout"))],
    );
    tool(
        "umoci",
        &[
            "unpack",
            "--image",
            &format!("{}:layered", w("layout")),
            &w("b2"),
        ],
    );
    tool(
        "sh",
        &["-c", &format!(
            "set -e; r={}/rootfs; mkdir -p $r/bin $r/etc/old.d $r/srv; cp {busybox} $r/bin/busybox; \
             for a in sh cat ls echo; do ln -s busybox $r/bin/$a; done; \
             echo stays > $r/srv/kept; echo goes > $r/srv/gone; echo x > $r/etc/old.d/conf",
            w("b2")
        )],
    );
    tool(
        "umoci",
        &[
            "repack",
            "--image",
            &format!("{}:layered", w("layout")),
            &w("b2"),
        ],
    );
    // Unpacked afresh, changed, repacked: umoci's diff against the unpack is the new layer.
    let layered_ref = format!("{}:layered", w("layout"));
    tool("umoci", &["unpack", "--image", &layered_ref, &w("b3")]);
    tool(
        "sh",
        &[
            "-c",
            &format!("rm -r {0}/rootfs/srv/gone {0}/rootfs/etc/old.d", w("b3")),
        ],
    );
    tool("umoci", &["repack", "--image", &layered_ref, &w("b3")]);
    let stat = Command::new("umoci")
        .args(["stat", "--json", "--image", &layered_ref])
        .output()
        .unwrap();
    let history: serde_json::Value = serde_json::from_slice(&stat.stdout).unwrap();
    let layers = history["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| !h["empty_layer"].as_bool().unwrap_or(false))
        .count();
    assert_eq!(layers, 2, "two layers: {history}");

    let registry = TestRegistry::start_in_netns(bus.netns_pid());
    let layout = work.path().join("layout");
    let debian = registry.push(&layout, "minbase", "debian/minbase", &[]);
    let layered = registry.push(&layout, "layered", "umoci/layered", &[]);
    // Both pull and boot at once; the Debian one publishes a UDP port.
    let create = |name: &str, image: &str, extra: &[&str]| {
        let mut args = vec![
            "vm", "create", name, "--image", image, "--memory", "512", "--vcpus", "1",
        ];
        args.extend(extra);
        bus.banger_as(None, &args)
    };
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| create("deb", &debian, &["--publish", "18053:7053/udp"]));
        let b = s.spawn(|| create("lay", &layered, &[]));
        (a.join().unwrap(), b.join().unwrap())
    });
    for out in [&a, &b] {
        assert!(out.status.success(), "{}", text(out));
    }
    let exec = |vm: &str, cmd: &str| {
        let out = bus.banger_as(None, &["vm", "exec", vm, "--", "sh", "-c", cmd]);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            text(&out),
        )
    };
    let (ok, stdout, all) = exec(
        "deb",
        "apt-get --version | head -1; cat /etc/debian_version",
    );
    assert!(ok && stdout.starts_with("apt "), "{all}");
    // A published UDP port reaches an echo bound to the guest's loopback (perl from
    // perl-base), and the answer comes back to the host's client.
    let (ok, _, all) = exec(
        "deb",
        "setsid perl -MIO::Socket::INET -e '$s = IO::Socket::INET->new(LocalAddr => \"127.0.0.1:7053\", \
         Proto => \"udp\") or die $!; while (defined(my $p = $s->recv(my $m, 65535))) { $s->send(uc $m, 0, $p) }' \
         </dev/null >/dev/null 2>&1 &",
    );
    assert!(ok, "{all}");
    let out = bus
        .in_netns("python3")
        .args([
            "-c",
            "import socket, time\n\
             s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(0.5)\n\
             for _ in range(120):\n    s.sendto(b'ping over udp', ('127.0.0.1', 18053))\n    \
             try:\n        print(s.recv(100).decode()); break\n    \
             except OSError:\n        time.sleep(0.25)\n",
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "PING OVER UDP",
        "{}",
        text(&out)
    );
    let (ok, stdout, all) = exec("lay", "cat /srv/kept; ls /srv /etc");
    assert!(ok, "{all}");
    assert!(stdout.starts_with("stays\n"), "{stdout}");
    assert!(
        !stdout.contains("gone") && !stdout.contains("old.d"),
        "{stdout}"
    );
    for vm in ["deb", "lay"] {
        let out = bus.banger_as(None, &["vm", "delete", "--force", vm]);
        assert!(out.status.success(), "{}", text(&out));
    }
}

/// A QMP session with VM `vm`'s QEMU, as the daemon has it.
fn qmp(bus: &TestBus, vm: &str) -> banger::vmm::qmp::Session {
    let id = vm_shown(bus, vm)["id"].as_str().unwrap().to_owned();
    let socket = bus.runtime.join("vms").join(id).join("jail/qmp.sock");
    banger::vmm::qmp::Session::connect(&socket).unwrap()
}

/// `banger vm exec VM -- ARGS` as `user`; the output, or a panic naming what failed.
fn exec_as(bus: &TestBus, user: Option<&str>, vm: &str, args: &[&str]) -> String {
    let mut a = vec!["vm", "exec", vm, "--"];
    a.extend(args);
    let out = bus.banger_as(user, &a);
    assert!(
        out.status.success(),
        "exec {args:?} in {vm}: {}",
        text(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `banger --json vm show VM` as root.
fn vm_shown(bus: &TestBus, vm: &str) -> serde_json::Value {
    let out = bus.banger_as(None, &["--json", "vm", "show", vm]);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", text(&out)))
}

async fn a_snapshot_forks_a_running_vm_into_vms_of_their_own_and_bad_restores_are_refused() {
    let Some((bus, reference, _keep)) = image_bus("warm_snapshots = true\n", "vm/snap").await
    else {
        return;
    };
    let ok = |out: std::process::Output| {
        assert!(out.status.success(), "{}", text(&out));
        text(&out)
    };
    let refused = |out: std::process::Output, why: &str| {
        assert!(!out.status.success(), "{}", text(&out));
        assert!(
            text(&out).contains(why),
            "wanted {why:?} in: {}",
            text(&out)
        );
    };

    // A VM of root's, with a process that counts and files in /tmp and /root.
    ok(bus.banger_as(
        None,
        &[
            "vm", "create", "src", "--image", &reference, "--memory", "256", "--vcpus", "1",
        ],
    ));
    exec_as(
        &bus,
        None,
        "src",
        &[
            "/bin/sh",
            "-c",
            "echo in-tmp > /tmp/mark; echo in-root > /root/mark; echo 0 > /tmp/count; \
             setsid /bin/sh -c 'i=0; while :; do i=$((i+1)); echo $i > /tmp/count.new; \
             mv /tmp/count.new /tmp/count; sleep 0.2; done' \
             </dev/null >/dev/null 2>&1 &",
        ],
    );
    // The counter's file exists before the loop runs (the exec wrote it), and the loop replaces
    // it by a rename, so a read never meets it truncated (`echo > file` let `cat` see "" now
    // and then); whether the loop goes on is seen by waiting for a larger number, not by
    // sleeping a guessed time.
    let count = |vm: &str| -> u64 {
        let out = exec_as(&bus, None, vm, &["cat", "/tmp/count"]);
        out.trim()
            .parse()
            .unwrap_or_else(|e| panic!("{vm}: /tmp/count is {out:?}: {e}"))
    };
    let counts_past = |vm: &str, n: u64, what: &str| {
        let every = Duration::from_millis(100);
        let past = poll_until(Duration::from_secs(60), every, || count(vm) > n);
        assert!(past, "{vm}: {what}: the count stays at {n} for 60 s");
    };
    let before = count("src");
    counts_past("src", before, "the process counts");
    let before = count("src");

    // The agent's link answers its health port at once: a `health` reply line, then the end.
    let id = vm_shown(&bus, "src")["id"].as_str().unwrap().to_owned();
    let sock = bus.runtime.join("vms").join(&id).join("jail/vsock.sock");
    let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    use std::io::{Read, Write};
    writeln!(s, "CONNECT {}", banger::agent::HEALTH_PORT).unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    let reply = answer.lines().nth(1).unwrap_or_default();
    let reply: serde_json::Value =
        serde_json::from_str(reply).unwrap_or_else(|e| panic!("{answer:?}: {e}"));
    assert_eq!(reply["ok"], true, "{answer}");
    assert_eq!(reply["health"]["version"], banger::VERSION, "{answer}");

    // Another user may not snapshot it; a stopped VM, a taken name are refused.
    refused(
        bus.banger_as(Some(USER_OK), &["vm", "snapshot", "src", "theirs"]),
        "manage-any",
    );
    let out = ok(bus.banger_as(None, &["vm", "snapshot", "src", "s1"]));
    assert!(out.contains("Saving memory and device state"), "{out}");
    refused(
        bus.banger_as(None, &["vm", "snapshot", "src", "s1"]),
        "A snapshot named \"s1\" exists",
    );
    counts_past("src", before, "the source keeps running");

    // Restores that would not match the snapshot, or of another user's snapshot, are
    // refused before anything is made.
    for (user, args, why) in [
        (
            None,
            vec!["--vcpus", "2"],
            "vcpus (--vcpus): snapshot s1 was taken with 1",
        ),
        (
            None,
            vec!["--kernel", "test"],
            "kernel (--kernel): a VM restored from snapshot s1",
        ),
        (
            None,
            vec!["--share", "/tmp:/mnt/t"],
            "shares (--share): a VM restored from snapshot s1 has the snapshot's",
        ),
        (Some(USER_OK), vec![], "manage-any"),
    ] {
        let mut a = vec!["vm", "create", "bad", "--snapshot", "s1"];
        a.extend(args);
        refused(bus.banger_as(user, &a), why);
        refused(bus.banger_as(None, &["vm", "show", "bad"]), "No VM");
    }

    // The VM's QEMU may rewrite its disk's header: point src's backing file at a file only
    // root may read. A snapshot's copy must layer on the image whatever the header says
    // (restores open the chain as root, then as the restored VM).
    let src_id = vm_shown(&bus, "src")["id"].as_str().unwrap().to_owned();
    let src_disk = bus
        .state_dir()
        .join("vms")
        .join(&src_id)
        .join("rootfs.qcow2");
    let image_disk = {
        use std::io::{Read, Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&src_disk)
            .unwrap();
        let mut head = [0u8; 20];
        f.read_exact(&mut head).unwrap();
        let offset = u64::from_be_bytes(head[8..16].try_into().unwrap());
        let len = u32::from_be_bytes(head[16..20].try_into().unwrap()) as usize;
        let mut name = vec![0u8; len];
        f.seek(SeekFrom::Start(offset)).unwrap();
        f.read_exact(&mut name).unwrap();
        let name = String::from_utf8(name).unwrap();
        assert!(name.ends_with("/rootfs.ext4"), "{name}");
        let decoy = format!("{}.ext5", name.strip_suffix(".ext4").unwrap());
        std::fs::write(&decoy, vec![7u8; 1 << 20]).unwrap();
        f.seek(SeekFrom::Start(offset)).unwrap();
        f.write_all(decoy.as_bytes()).unwrap();
        name
    };

    // Two VMs forked from the running one: the process still counts in each, both files
    // are there, and each has its own name, address, MAC and host key.
    let out = ok(bus.banger_as(None, &["vm", "fork", "src", "f", "--count", "2"]));
    let f_id = {
        let out = ok(bus.banger_as(None, &["--json", "snapshot", "show", "f"]));
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["id"].as_str().unwrap().to_owned()
    };
    let info = std::process::Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(
            bus.state_dir()
                .join("snapshots")
                .join(&f_id)
                .join("rootfs.qcow2"),
        )
        .output()
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["backing-filename"], image_disk.as_str(), "{info}");
    assert!(out.contains("f-1: Restoring snapshot f"), "{out}");
    let src = vm_shown(&bus, "src");
    let mut keys = vec![src["sshHostKey"].as_str().unwrap_or_default().to_owned()];
    let mut addrs = vec![src["guestAddress"].as_str().unwrap().to_owned()];
    let boot_id = |vm: &str| exec_as(&bus, None, vm, &["cat", "/proc/sys/kernel/random/boot_id"]);
    let mut boot_ids = vec![boot_id("src")];
    // The kernel's crng reseeds at the restore, from the host's per-VM seed: clones draw
    // different bytes at once, not after its next periodic reseed.
    let draw = |vm: &str| {
        exec_as(
            &bus,
            None,
            vm,
            &["sh", "-c", "head -c 16 /dev/urandom | od -An -tx1"],
        )
    };
    let mut draws = vec![draw("src")];
    for vm in ["f-1", "f-2"] {
        let d = draw(vm);
        assert!(!draws.contains(&d), "{vm} draws {d} as another VM did");
        assert!(d.split_whitespace().count() == 16, "{vm}: {d:?}");
        draws.push(d);
    }
    for vm in ["f-1", "f-2"] {
        // Each clone's boot id is its own (the kernel's is its source's; the agent binds a
        // fresh one over it).
        let id = boot_id(vm);
        assert!(!boot_ids.contains(&id), "{vm} shares boot id {id}");
        assert_eq!(id.trim().len(), 36, "{vm}: {id:?}");
        boot_ids.push(id);
        let shown = vm_shown(&bus, vm);
        assert_eq!(shown["state"], "running", "{shown}");
        let c = count(vm);
        counts_past(vm, c, "the snapshot's process goes on");
        assert_eq!(
            exec_as(&bus, None, vm, &["cat", "/tmp/mark", "/root/mark"]),
            "in-tmp\nin-root\n"
        );
        assert_eq!(exec_as(&bus, None, vm, &["hostname"]).trim(), vm);
        let mac = exec_as(&bus, None, vm, &["cat", "/sys/class/net/eth0/address"]);
        assert_eq!(mac.trim(), shown["macAddress"].as_str().unwrap(), "{vm}");
        let ip = exec_as(&bus, None, vm, &["ip", "-4", "-o", "addr", "show", "eth0"]);
        let addr = shown["guestAddress"].as_str().unwrap().to_owned();
        assert!(ip.contains(&format!("inet {addr}/")), "{vm}: {ip}");
        keys.push(shown["sshHostKey"].as_str().unwrap_or_default().to_owned());
        addrs.push(addr);
    }
    keys.sort();
    keys.dedup();
    addrs.sort();
    addrs.dedup();
    assert_eq!((keys.len(), addrs.len()), (3, 3), "{keys:?} {addrs:?}");
    // Isolated as any VM: a fork does not reach its source's service, which the source
    // itself reaches on its own address.
    let src_addr = src["guestAddress"].as_str().unwrap();
    let probe = format!("nc -w 3 {src_addr} 8080 </dev/null && echo OPEN || echo CLOSED");
    assert_eq!(
        exec_as(&bus, None, "src", &["sh", "-c", &probe]).trim(),
        "OPEN"
    );
    assert_eq!(
        exec_as(&bus, None, "f-1", &["sh", "-c", &probe]).trim(),
        "CLOSED"
    );

    // Snapshots are listed; one that VMs layer on stays until they go.
    let out = ok(bus.banger_as(None, &["--json", "snapshot", "list"]));
    assert!(out.contains("\"s1\"") && out.contains("\"f\""), "{out}");
    refused(
        bus.banger_as(None, &["snapshot", "delete", "f"]),
        "is the base of 2 VM(s)",
    );
    for vm in ["f-1", "f-2"] {
        ok(bus.banger_as(None, &["vm", "delete", vm, "--force"]));
    }
    ok(bus.banger_as(None, &["snapshot", "delete", "f"]));

    // Through Varlink (the PyPI client): a create from s1 streams its stages, each reply
    // with the VM as it is then, and the last one is the ready VM.
    let replies = py_call(
        &bus,
        None,
        "io.banger.VMs.Create",
        serde_json::json!({"name": "v", "snapshot": "s1"}),
        true,
    );
    let stages: Vec<&str> = replies
        .iter()
        .map(|r| r["job"]["stage"].as_str().unwrap_or_default())
        .collect();
    for stage in ["restore", "wait_agent", "identity", "ready"] {
        assert!(stages.contains(&stage), "{stage}: {replies:#?}");
    }
    let last = replies.last().unwrap();
    assert_eq!(last["job"]["state"], "done", "{last}");
    assert_eq!(last["vm"]["state"], "running", "{last}");
    assert_eq!(last["vm"]["name"], "v", "{last}");
    assert_eq!(exec_as(&bus, None, "v", &["cat", "/tmp/mark"]), "in-tmp\n");

    // Its control socket answers systemd's io.systemd.MachineInstance, which machinectl
    // calls where machined knows control addresses: Describe is open, the rest asks polkit
    // as banger's own methods do (v is root's: manage-any, which neither test user has).
    let id = vm_shown(&bus, "v")["id"].as_str().unwrap().to_owned();
    let control = bus.runtime.join("machines").join(format!("banger-{id}"));
    let instance = |user: Option<&str>, method: &str| {
        py_call_at(
            &bus,
            user,
            &control,
            &format!("io.systemd.MachineInstance.{method}"),
            serde_json::json!({}),
            false,
        )
    };
    assert_eq!(
        instance(Some(USER_NO), "Describe"),
        [serde_json::json!({"running": true, "status": "running"})]
    );
    for user in [USER_NO, USER_OK] {
        let r = instance(Some(user), "Pause");
        assert_eq!(
            r[0]["error"], "org.varlink.service.PermissionDenied",
            "{r:?}"
        );
    }
    assert_eq!(vm_shown(&bus, "v")["state"], "running");
    assert_eq!(instance(None, "Pause"), [serde_json::json!({})]);
    assert_eq!(
        instance(None, "Describe"),
        [serde_json::json!({"running": false, "status": "paused"})]
    );
    let r = instance(None, "Reboot");
    assert_eq!(
        r[0]["error"], "io.systemd.MachineInstance.NotSupported",
        "{r:?}"
    );
    assert_eq!(instance(None, "Resume"), [serde_json::json!({})]);
    assert_eq!(exec_as(&bus, None, "v", &["cat", "/tmp/mark"]), "in-tmp\n");
    assert_eq!(instance(None, "PowerOff"), [serde_json::json!({})]);
    assert_eq!(vm_shown(&bus, "v")["state"], "stopped");
    assert!(!control.exists(), "the control socket outlived its VM");
    let r = py_call(
        &bus,
        None,
        "io.banger.VMs.Delete",
        serde_json::json!({"name": "v", "force": true}),
        false,
    );
    assert_eq!(r, [serde_json::json!({})], "{r:?}");
    refused(bus.banger_as(None, &["vm", "show", "v"]), "No VM");

    // The CLI over Varlink, with no bus to reach: a create follows its stages to ready, an
    // exec runs through the agent's descriptor, a delete ends it.
    let sock = bus.runtime.join("io.banger");
    let sock_arg = format!("--varlink={}", sock.display());
    let over_varlink = |args: &[&str]| {
        let mut a = vec![sock_arg.as_str()];
        a.extend_from_slice(args);
        bus.command_as(None, env!("CARGO_BIN_EXE_banger"), &a)
            .env("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=/nonexistent/bus")
            .output()
            .unwrap()
    };
    let out = ok(over_varlink(&["vm", "create", "vl", "--snapshot", "s1"]));
    assert!(out.contains("VM vl is running"), "{out}");
    let out = over_varlink(&["vm", "exec", "vl", "--", "cat", "/tmp/mark"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "in-tmp\n",
        "{}",
        text(&out)
    );
    ok(over_varlink(&["vm", "delete", "vl", "--force"]));
    refused(bus.banger_as(None, &["vm", "show", "vl"]), "No VM");
    // `vm run --rm`: create, the command through the agent, its output, delete.
    let out = over_varlink(&[
        "vm",
        "run",
        "vr",
        "--snapshot",
        "s1",
        "--rm",
        "--",
        "cat",
        "/tmp/mark",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "in-tmp\n",
        "{}",
        text(&out)
    );
    refused(bus.banger_as(None, &["vm", "show", "vr"]), "No VM");

    // A snapshot whose memory changed on disk is refused before any VMM loads it.
    let s1 = {
        let out = ok(bus.banger_as(None, &["--json", "snapshot", "show", "s1"]));
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["id"].as_str().unwrap().to_owned()
    };
    let memory = bus
        .state_dir()
        .join("snapshots")
        .join(&s1)
        .join("memory.zst");
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&memory)
            .unwrap();
        f.write_all(b"x").unwrap();
    }
    refused(
        bus.banger_as(None, &["vm", "create", "z", "--snapshot", "s1"]),
        "Snapshot s1 is damaged",
    );
    refused(bus.banger_as(None, &["vm", "show", "z"]), "No VM");

    // src's cold boot left a warm snapshot of its shape, made from a template VM of banger's
    // own: the next create of that shape starts from it, as itself, with none of src's data.
    // banger's own warm snapshots show with --all only.
    let mut out = String::new();
    let warm = poll_until(Duration::from_secs(240), Duration::from_millis(500), || {
        out = ok(bus.banger_as(None, &["--json", "snapshot", "list", "--all"]));
        out.contains("\".warm-")
    });
    assert!(warm, "no warm snapshot: {out}");
    let shape = ["--image", "snap-v1", "--memory", "256", "--vcpus", "1"];
    let mut args = vec!["vm", "create", "w"];
    args.extend(shape);
    let out = ok(bus.banger_as(None, &args));
    assert!(out.contains("Restoring the warm snapshot"), "{out}");
    assert_eq!(exec_as(&bus, None, "w", &["hostname"]).trim(), "w");
    let leaked = bus.banger_as(None, &["vm", "exec", "w", "--", "cat", "/root/mark"]);
    assert!(!leaked.status.success(), "the warm VM has src's file");
    // `image warm` remakes the shape's warm snapshot, also while a VM maps the one it
    // replaces; that one goes once no VM uses it (the next remake's sweep).
    let warm_snaps = || {
        ok(bus.banger_as(None, &["snapshot", "list", "--all"]))
            .matches(".warm-")
            .count()
    };
    let mut warm_args = vec!["image", "warm", "snap-v1"];
    warm_args.extend(&shape[2..]);
    ok(bus.banger_as(None, &warm_args));
    assert_eq!(warm_snaps(), 2, "the remake beside the one w maps");
    assert_eq!(exec_as(&bus, None, "w", &["hostname"]).trim(), "w");
    ok(bus.banger_as(None, &["vm", "delete", "w", "--force"]));
    ok(bus.banger_as(None, &warm_args));
    assert_eq!(
        warm_snaps(),
        1,
        "the remakes' sweep left more than the newest"
    );
    let mut args = vec!["vm", "create", "w"];
    args.extend(shape);
    let out = ok(bus.banger_as(None, &args));
    assert!(out.contains("Restoring the warm snapshot"), "{out}");
    let mut args = vec!["vm", "create", "c", "--cold"];
    args.extend(shape);
    let out = ok(bus.banger_as(None, &args));
    assert!(
        out.contains("Booting on qemu") && !out.contains("warm snapshot"),
        "{out}"
    );
    for vm in ["w", "c"] {
        ok(bus.banger_as(None, &["vm", "delete", vm, "--force"]));
    }

    ok(bus.banger_as(None, &["vm", "stop", "src"]));
    refused(
        bus.banger_as(None, &["vm", "snapshot", "src", "s2"]),
        "only a running or paused VM",
    );
    ok(bus.banger_as(None, &["vm", "delete", "src"]));
    ok(bus.banger_as(None, &["snapshot", "delete", "s1"]));
}

/// The QEMU process of VM `id`.
fn qemu_of(id: &str) -> std::path::PathBuf {
    let name = format!("banger-{id},");
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            std::fs::read(p.join("cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(&name))
                .unwrap_or(false)
        })
        .unwrap_or_else(|| panic!("no QEMU for VM {id}"))
}

/// The mapping of a snapshot's sealed RAM in a QEMU: its inode and its smaps fields (kB).
fn snapshot_ram_mapping(
    qemu: &std::path::Path,
) -> Option<(String, std::collections::HashMap<String, u64>)> {
    let smaps = std::fs::read_to_string(qemu.join("smaps")).unwrap_or_default();
    let mut lines = smaps.lines();
    while let Some(l) = lines.next() {
        if !l.contains("memfd:banger-snapshot-ram") {
            continue;
        }
        let inode = l.split_whitespace().nth(4).unwrap_or_default().to_owned();
        let mut fields = std::collections::HashMap::new();
        for f in lines.by_ref() {
            let mut w = f.split_whitespace();
            let (Some(k), Some(v)) = (w.next(), w.next()) else {
                break;
            };
            if !k.ends_with(':') {
                break;
            }
            if let Ok(v) = v.parse() {
                fields.insert(k.trim_end_matches(':').to_owned(), v);
            }
            if k == "VmFlags:" {
                break;
            }
        }
        return Some((inode, fields));
    }
    None
}

async fn restores_share_their_snapshots_memory_and_a_changed_ram_file_is_refused() {
    let Some((bus, reference, _keep)) = image_bus("warm_snapshots = true\n", "vm/cow").await else {
        return;
    };
    let ok = |out: std::process::Output| {
        assert!(out.status.success(), "{}", text(&out));
        text(&out)
    };
    let shape = ["--image", &reference, "--memory", "256", "--vcpus", "1"];
    let create = |name: &str, extra: &[&str]| {
        let mut a = vec!["vm", "create", name];
        a.extend(shape);
        a.extend(extra);
        ok(bus.banger_as(None, &a))
    };
    // The first VM of the shape boots cold (with a balloon) and leads to the warm snapshot.
    create("cold", &[]);
    wait_until_async("the warm snapshot", Duration::from_secs(300), || {
        let out = bus.banger_as(None, &["--json", "snapshot", "list", "--all"]);
        String::from_utf8_lossy(&out.stdout).contains(".warm-")
    })
    .await;
    let snaps = bus.state_dir().join("snapshots");

    // A snapshot of the cold-booted VM (which has a balloon) keeps its memory as a file too,
    // and its restores map it: the agent switches the balloon's reports off, since QEMU
    // cannot give back what the guest frees in a snapshot's sealed memory.
    ok(bus.banger_as(None, &["vm", "snapshot", "cold", "c0"]));
    let c0: serde_json::Value = serde_json::from_slice(
        &bus.banger_as(None, &["--json", "snapshot", "show", "c0"])
            .stdout,
    )
    .unwrap();
    assert!(snaps.join(c0["id"].as_str().unwrap()).join("ram").exists());
    ok(bus.banger_as(None, &["vm", "delete", "--force", "cold"]));
    ok(bus.banger_as(None, &["vm", "create", "r0", "--snapshot", "c0"]));
    let r0 = vm_shown(&bus, "r0")["id"].as_str().unwrap().to_owned();
    assert!(
        snapshot_ram_mapping(&qemu_of(&r0)).is_some(),
        "r0's QEMU maps no snapshot RAM"
    );
    let balloon = "for d in /sys/bus/virtio/devices/*; do \
                   [ \"$(cat $d/device)\" = 0x0005 ] && echo ${d##*/}; done";
    let device = exec_as(&bus, None, "r0", &["sh", "-c", balloon]);
    assert!(
        device.trim().starts_with("virtio"),
        "no balloon device: {device:?}"
    );
    let bound = exec_as(
        &bus,
        None,
        "r0",
        &["busybox", "ls", "/sys/bus/virtio/drivers/virtio_balloon"],
    );
    assert!(
        !bound.contains("virtio"),
        "the balloon is still driven: {bound}"
    );
    // A guest that binds it again and frees memory: each report fails in QEMU, which says
    // so on its output, through the console logger (bounded) into the VM's qemu.log; QEMU
    // itself writes no file, and the VM goes on.
    exec_as(
        &bus,
        None,
        "r0",
        &[
            "sh",
            "-c",
            &format!(
                "echo {} > /sys/bus/virtio/drivers/virtio_balloon/bind && \
                 busybox dd if=/dev/zero of=/dev/null bs=100M count=1 2>/dev/null",
                device.trim()
            ),
        ],
    );
    let said = bus.state_dir().join("vms").join(&r0).join("qemu.log");
    let mut log = String::new();
    wait_until_async(
        "QEMU's refused discards in its log",
        Duration::from_secs(60),
        || {
            let max = banger::vmm::console::OUTPUT_MAX_BYTES;
            log = String::from_utf8_lossy(&banger::vmm::console::read_tail(&said, max).unwrap())
                .into_owned();
            log.contains("ram_block_discard_range")
        },
    )
    .await;
    let refused = log.matches("ram_block_discard_range").count();
    let direct = bus.runtime.join("vms").join(&r0).join("qemu.log");
    assert_eq!(
        std::fs::metadata(&direct).unwrap().len(),
        0,
        "{}",
        direct.display()
    );
    assert_eq!(exec_as(&bus, None, "r0", &["echo", "up"]).trim(), "up");
    println!(
        "security (balloon over sealed memory): {refused} reports refused by QEMU, its output \
         in the logger's bounded log ({} bytes), none in a file of QEMU's own: {}",
        log.len(),
        log.lines().last().unwrap_or_default()
    );
    ok(bus.banger_as(None, &["vm", "delete", "--force", "r0"]));
    ok(bus.banger_as(None, &["snapshot", "delete", "c0"]));

    // The warm snapshot's memory is a plain file of the VM's size beside the saved devices.
    let warm_dir = std::fs::read_dir(&snaps)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.join("ram").exists())
        .expect("a snapshot with a RAM file");
    assert_eq!(
        std::fs::metadata(warm_dir.join("ram")).unwrap().len(),
        256 << 20
    );
    let state = std::fs::metadata(warm_dir.join("memory.zst"))
        .unwrap()
        .len();
    assert!(
        state < 4 << 20,
        "the saved state without RAM is {state} bytes"
    );

    // Three warm starts map one sealed copy of it and share the pages none of them wrote.
    let mut inodes = std::collections::HashSet::new();
    for vm in ["w1", "w2", "w3"] {
        create(vm, &[]);
        assert_eq!(exec_as(&bus, None, vm, &["echo", "up"]).trim(), "up");
    }
    for vm in ["w1", "w2", "w3"] {
        let id = vm_shown(&bus, vm)["id"].as_str().unwrap().to_owned();
        let (inode, f) = snapshot_ram_mapping(&qemu_of(&id))
            .unwrap_or_else(|| panic!("{vm}'s QEMU maps no snapshot RAM"));
        // Shared: mapped by more than one process (the memfd's pages count as dirty).
        let shared = f["Shared_Clean"] + f["Shared_Dirty"];
        assert!(shared > f["Rss"] / 2, "{vm} shares little: {f:?}");
        assert!(f["Pss"] < f["Rss"], "{vm}: {f:?}");
        println!(
            "{vm}: snapshot RAM mapped, {} kB resident, {shared} kB shared with the others, \
             {} kB its own",
            f["Rss"], f["Anonymous"]
        );
        inodes.insert(inode);
    }
    assert_eq!(inodes.len(), 1, "one memfd for all: {inodes:?}");

    // A VM started warm has no balloon, so its snapshots keep RAM as a file too.
    ok(bus.banger_as(None, &["vm", "snapshot", "w1", "s2"]));
    let s2 = bus
        .banger_as(None, &["--json", "snapshot", "show", "s2"])
        .stdout;
    let s2: serde_json::Value = serde_json::from_slice(&s2).unwrap();
    let ram = snaps.join(s2["id"].as_str().unwrap()).join("ram");
    assert!(ram.exists());

    // One byte of it changed after publication: the restore is refused before any VMM
    // maps it, and leaves nothing; put back, it restores.
    let (mut tried, mut refused) = (0, 0);
    let flip = |at: u64| {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::options()
            .read(true)
            .write(true)
            .open(&ram)
            .unwrap();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, at).unwrap();
        f.write_all_at(&[b[0] ^ 0xff], at).unwrap();
    };
    for at in [0u64, 1 << 20, (256 << 20) - 1] {
        flip(at);
        tried += 1;
        let out = bus.banger_as(None, &["vm", "create", "bad", "--snapshot", "s2"]);
        if !out.status.success() && text(&out).contains("sha256 differs") {
            refused += 1;
        }
        let _ = bus.banger_as(None, &["vm", "delete", "--force", "bad"]);
        flip(at);
    }
    assert_eq!(refused, tried);
    ok(bus.banger_as(None, &["vm", "create", "good", "--snapshot", "s2"]));
    assert_eq!(exec_as(&bus, None, "good", &["echo", "up"]).trim(), "up");
    println!("security (snapshot RAM): {tried} changed files tried, {refused} refused, 0 mapped");

    // A snapshot that restores map is in use.
    let out = bus.banger_as(None, &["snapshot", "delete", "s2"]);
    assert!(
        !out.status.success() && text(&out).contains("is the base of"),
        "{}",
        text(&out)
    );
    for vm in ["w1", "w2", "w3", "good"] {
        ok(bus.banger_as(None, &["vm", "delete", "--force", vm]));
    }
    ok(bus.banger_as(None, &["snapshot", "delete", "s2"]));
}

async fn a_host_folder_boots_as_a_vms_root_served_as_its_owner() {
    let Some((_state, bus)) = kernel_ready_bus(&[], "").await else {
        return;
    };
    let top = tempfile::tempdir().unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(top.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let root = top.path().join("root");
    std::fs::create_dir(&root).unwrap();
    busybox_tree(&root, uid_of(USER_OK));
    let not_mine = top.path().join("not-mine");
    std::fs::create_dir(&not_mine).unwrap();
    let rootfs = root.to_str().unwrap();

    // Bad input: another's folder, a folder with an image; nothing is made.
    let refused = |args: &[&str], says: &str| {
        let out = bus.banger_as(Some(USER_OK), args);
        assert!(!out.status.success(), "{args:?}: {}", text(&out));
        assert!(text(&out).contains(says), "{args:?}: {}", text(&out));
    };
    let not_mine_arg = not_mine.to_str().unwrap();
    refused(
        &["vm", "create", "r0", "--rootfs", not_mine_arg, "--no-start"],
        "is not yours",
    );
    refused(
        &["vm", "create", "r0", "--rootfs", rootfs, "--image", "x"],
        "--image",
    );
    let conn = bus.connect().await;
    let vms = VMs1Proxy::new(&conn).await.unwrap();
    let e = vms
        .create_vm(
            "r0",
            opt(&[
                ("rootfs_dir", rootfs.to_owned().into()),
                ("disk_size", (1u64 << 30).into()),
            ]),
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("disk_size") && e.contains("leave"), "{e}");
    let out = bus.banger_as(Some(USER_OK), &["vm", "list"]);
    assert!(!text(&out).contains("r0"), "{}", text(&out));

    let out = bus.banger_as(
        Some(USER_OK),
        &[
            "vm", "create", "r1", "--rootfs", rootfs, "--vcpus", "1", "--memory", "256",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("==> Serving {rootfs} as the VM's root")),
        "{err}"
    );
    let sh = |cmd: &str| bus.banger_as(Some(USER_OK), &["vm", "exec", "r1", "--", "sh", "-c", cmd]);
    let out = sh("cat /etc/marker; grep ' / ' /proc/mounts; cat /proc/1/comm; ls -ln /etc/marker");
    assert!(out.status.success(), "{}", text(&out));
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(said.starts_with("from the host's folder\n"), "{said}");
    assert!(
        said.contains("rootfs / virtiofs rw"),
        "the root is the folder: {said}"
    );
    assert!(said.contains("init\n"), "banger-init is its init: {said}");
    assert_eq!(
        said.lines()
            .nth(3)
            .and_then(|l| l.split_whitespace().nth(2)),
        Some("0"),
        "the owner's file is the guest root's: {said}"
    );
    // A program the folder lacks: the shell's 127 and the reason, as for an image.
    let out = bus.banger_as(None, &["vm", "exec", "r1", "--", "nosuch"]);
    assert_eq!(out.status.code(), Some(127), "{}", text(&out));
    assert!(text(&out).contains("cannot run nosuch"), "{}", text(&out));
    // What the guest writes is the owner's, in the folder, at once.
    let out = sh("echo from-guest > /made && mkdir -p /srv/x && echo y > /srv/x/y");
    assert!(out.status.success(), "{}", text(&out));
    {
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            std::fs::read_to_string(root.join("made")).unwrap(),
            "from-guest\n"
        );
        assert_eq!(
            std::fs::metadata(root.join("made")).unwrap().uid(),
            uid_of(USER_OK)
        );
        assert_eq!(
            std::fs::read_to_string(root.join("srv/x/y")).unwrap(),
            "y\n"
        );
    }
    // A setuid or setgid bit set by the guest never reaches the host's folder.
    let out = sh("cp /bin/busybox /bb && { chmod 4755 /bb 2>&1; echo suid=$?; chmod 2755 /bb 2>&1; echo sgid=$?; }");
    let said = text(&out);
    for refused in ["suid=1", "sgid=1"] {
        assert!(said.contains(refused), "{refused}: {said}");
    }
    {
        use std::os::unix::fs::PermissionsExt;
        let m = std::fs::metadata(root.join("bb"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(m & 0o7000, 0, "the guest's copy is {m:o}");
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "security (rootfs): 2 setid modes tried, 2 refused, 0 leaked"
        );
    }
    // Served by a virtiofsd of the owner's, not root's.
    let servers = share_servers(&bus);
    assert_eq!(servers.len(), 1, "one virtiofsd: the root's");
    let uid = uid_of(USER_OK).to_string();
    assert!(
        servers[0]
            .lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some(uid.as_str())),
        "{}",
        servers[0]
    );
    let shown = vm_shown(&bus, "r1");
    assert_eq!(shown["rootfsDir"], rootfs, "{shown}");
    assert_eq!(shown["image"], "", "{shown}");
    // No snapshot of it (virtio-fs does not migrate): a clear refusal, the VM runs on.
    refused(&["vm", "snapshot", "r1", "s1"], "virtio-fs");
    // Stopped and started: the same folder, what the guest wrote still there.
    for args in [["vm", "stop", "r1"], ["vm", "start", "r1"]] {
        let out = bus.banger_as(Some(USER_OK), &args);
        assert!(out.status.success(), "{args:?}: {}", text(&out));
    }
    let out = sh("cat /made");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "from-guest\n",
        "{}",
        text(&out)
    );
    // Deleted: the VM goes, the folder and all the guest wrote in it stay.
    let out = bus.banger_as(Some(USER_OK), &["vm", "delete", "--force", "r1"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(root.join("made").exists() && root.join("etc/marker").exists());
    assert!(share_servers(&bus).is_empty(), "its virtiofsd went with it");
}

/// Where QEMU can save a virtio-fs device (8.2 and later; Debian's backport here, the host's
/// own QEMU being 7.2), VMs whose root is a folder start warm: the shape's first cold boot
/// leads to a template of banger's own, parked before it mounts a root, whose snapshot each
/// later create of the shape restores with its own folder, mounted after the restore.
async fn folder_roots_start_warm_where_qemu_can_save_virtio_fs() {
    let Some((_state, bus)) = warm_folder_bus().await else {
        return;
    };
    let ok = |out: std::process::Output| {
        assert!(out.status.success(), "{}", text(&out));
        text(&out)
    };
    let top = tempfile::tempdir().unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(top.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let folder = |name: &str| {
        let root = top.path().join(name);
        std::fs::create_dir(&root).unwrap();
        busybox_tree(&root, uid_of(USER_OK));
        std::fs::write(root.join("etc/marker"), format!("{name}\n")).unwrap();
        std::os::unix::fs::lchown(root.join("etc/marker"), Some(uid_of(USER_OK)), None).unwrap();
        root
    };
    let (a, b) = (folder("a"), folder("b"));
    let create = |vm: &str, root: &std::path::Path| {
        ok(bus.banger_as(
            Some(USER_OK),
            &[
                "vm",
                "create",
                vm,
                "--rootfs",
                root.to_str().unwrap(),
                "--vcpus",
                "1",
                "--memory",
                "256",
            ],
        ))
    };
    // The shape's first VM boots cold and leads to the warm snapshot.
    let out = create("f1", &a);
    assert!(
        out.contains("Booting on qemu") && !out.contains("warm snapshot"),
        "{out}"
    );
    let mut out = String::new();
    let warm = poll_until(Duration::from_secs(240), Duration::from_millis(500), || {
        out = ok(bus.banger_as(None, &["--json", "snapshot", "list", "--all"]));
        out.contains("\".warm-")
    });
    assert!(warm, "no warm snapshot of folder roots: {out}");
    // The template never mounted its own (empty) folder: nothing was written there.
    let template_root = bus.state_dir().join("warm-root");
    assert_eq!(
        std::fs::read_dir(&template_root).unwrap().count(),
        0,
        "the template wrote into its folder"
    );
    // The next one restores it, with its own folder as its root and its own identity.
    let out = create("f2", &b);
    assert!(out.contains("Restoring the warm snapshot"), "{out}");
    let said = exec_as(
        &bus,
        Some(USER_OK),
        "f2",
        &[
            "sh",
            "-c",
            "cat /etc/marker; grep ' / ' /proc/mounts; hostname; cat /proc/1/comm; \
             echo from-f2 > /made",
        ],
    );
    let lines: Vec<&str> = said.lines().collect();
    assert_eq!(lines[0], "b", "f2's root is its own folder: {said}");
    assert!(lines[1].contains("virtiofs rw"), "{said}");
    assert_eq!(lines[2], "f2", "{said}");
    assert_eq!(lines[3], "init", "banger-init is its init: {said}");
    {
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            std::fs::read_to_string(b.join("made")).unwrap(),
            "from-f2\n"
        );
        assert_eq!(
            std::fs::metadata(b.join("made")).unwrap().uid(),
            uid_of(USER_OK),
            "what the guest writes is the owner's"
        );
    }
    assert!(!a.join("made").exists(), "f2 wrote into f1's folder");
    let shown = vm_shown(&bus, "f2");
    let address = shown["guestAddress"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert_ne!(
        address,
        vm_shown(&bus, "f1")["guestAddress"]
            .as_str()
            .unwrap_or_default()
    );
    // Its snapshot is still refused (only banger's parked templates are saved).
    let out = bus.banger_as(Some(USER_OK), &["vm", "snapshot", "f2", "s"]);
    assert!(
        !out.status.success() && text(&out).contains("virtio-fs"),
        "{}",
        text(&out)
    );
    // Stopped and started, it boots cold, on the same folder.
    ok(bus.banger_as(Some(USER_OK), &["vm", "stop", "f2"]));
    let out = ok(bus.banger_as(Some(USER_OK), &["vm", "start", "f2"]));
    assert!(!out.contains("warm snapshot"), "{out}");
    let said = exec_as(&bus, Some(USER_OK), "f2", &["cat", "/etc/marker", "/made"]);
    assert_eq!(said, "b\nfrom-f2\n");
    // Two at once from the same template, each on its own folder.
    let c = folder("c");
    let (o3, o4) = std::thread::scope(|s| {
        let t3 = s.spawn(|| create("f3", &a));
        let t4 = s.spawn(|| create("f4", &c));
        (t3.join().unwrap(), t4.join().unwrap())
    });
    for out in [&o3, &o4] {
        assert!(out.contains("Restoring the warm snapshot"), "{out}");
    }
    assert_eq!(exec_as(&bus, None, "f3", &["cat", "/etc/marker"]), "a\n");
    assert_eq!(exec_as(&bus, None, "f4", &["cat", "/etc/marker"]), "c\n");
    // On a network namespace (a pod's, as CNI leaves one): the template's NIC is wired to
    // its eth0, and the guest takes eth0's address and MAC and reaches its peer.
    let ns = format!("bnw{}", std::process::id());
    let mac = bus.sh_in_namespaces(&format!(
        "set -e; ip netns add {ns}; ip link add bnw0 type veth peer name eth0 netns {ns}; \
         ip addr add 10.78.0.1/24 dev bnw0; ip link set bnw0 up; \
         ip -n {ns} addr add 10.78.0.2/24 dev eth0; ip -n {ns} link set eth0 up; \
         ip -n {ns} link set lo up; ip -n {ns} route add default via 10.78.0.1; \
         ip netns exec {ns} cat /sys/class/net/eth0/address"
    ));
    let p = folder("p");
    let out = ok(bus.banger_as(
        None,
        &[
            "vm",
            "create",
            "f5",
            "--rootfs",
            p.to_str().unwrap(),
            "--netns",
            &format!("/run/netns/{ns}"),
            "--vcpus",
            "1",
            "--memory",
            "256",
        ],
    ));
    assert!(out.contains("Restoring the warm snapshot"), "{out}");
    let said = exec_as(
        &bus,
        None,
        "f5",
        &[
            "sh",
            "-c",
            "busybox ip -o -4 addr show eth0; cat /sys/class/net/eth0/address; \
             busybox ping -c 1 -W 5 10.78.0.1 >/dev/null && echo reached",
        ],
    );
    assert!(said.contains("inet 10.78.0.2/24"), "eth0's address: {said}");
    assert!(
        said.contains(mac.trim()),
        "eth0's MAC {}: {said}",
        mac.trim()
    );
    assert!(said.contains("reached"), "the namespace's peer: {said}");
    for vm in ["f1", "f2", "f3", "f4", "f5"] {
        ok(bus.banger_as(None, &["vm", "delete", "--force", vm]));
    }
    assert!(
        share_servers(&bus).is_empty(),
        "a virtiofsd outlived its VM"
    );
    let bad = common::invariants::check(&bus);
    assert!(bad.is_empty(), "{bad:#?}");
    bus.sh_in_namespaces(&format!("ip netns del {ns}"));
}

/// A VM given a network namespace (CreateVM netns, as containerd's shim does for a pod) takes
/// over that namespace's eth0: its tap lives there, wired to eth0 both ways, and the guest has
/// eth0's address, MAC and default route. The namespace here is a veth pair's far end, as
/// CNI's bridge plugin makes one; its near end, in the daemon's namespace, holds 10.77.0.1.
async fn a_vm_given_a_network_namespace_takes_over_its_eth0() {
    let Some((_state, bus)) = kernel_ready_bus(&["ip", "tc"], "").await else {
        return;
    };
    let top = tempfile::tempdir().unwrap();
    let root = top.path().join("root");
    std::fs::create_dir(&root).unwrap();
    busybox_tree(&root, 0);
    let rootfs = root.to_str().unwrap();
    let ns = format!("bnt{}", std::process::id());
    let path = format!("/run/netns/{ns}");
    let bare = format!("{ns}-bare");
    bus.sh_in_namespaces(&format!(
        "set -e; ip netns add {ns}; ip netns add {bare}; \
             ip link add bnh0 type veth peer name eth0 netns {ns}; \
             ip addr add 10.77.0.1/24 dev bnh0; ip link set bnh0 up; \
             ip -n {ns} addr add 10.77.0.2/24 dev eth0; ip -n {ns} link set eth0 up; \
             ip -n {ns} link set lo up; ip -n {ns} route add default via 10.77.0.1"
    ));
    let mac = bus.sh_in_namespaces(&format!(
        "cat /sys/class/net/bnh0/address; ip -n {ns} -o link show eth0"
    ));
    let mac = mac
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .unwrap()
        .to_owned();

    // Refused, each by name, and nothing made: a member's (only root gives namespaces),
    // something that is not a network namespace, the daemon's own, and banger's network
    // options beside it.
    let mut tried = 0;
    let refused = |user: Option<&str>, args: &[&str], says: &str| {
        let out = bus.banger_as(user, args);
        assert!(!out.status.success(), "{args:?}: {}", text(&out));
        assert!(text(&out).contains(says), "{args:?}: {}", text(&out));
    };
    let create = |user: Option<&str>, netns: &str, says: &str| {
        refused(
            user,
            &["vm", "create", "n0", "--rootfs", rootfs, "--netns", netns],
            says,
        )
    };
    create(Some(USER_OK), &path, "only root");
    create(None, "/etc/passwd", "not a namespace file");
    create(None, "/proc/self/ns/net", "bangerd's own");
    create(None, "relative", "absolute path");
    tried += 4;
    let conn = bus.connect().await;
    let vms = VMs1Proxy::new(&conn).await.unwrap();
    for (key, value) in [
        ("publish", zbus::Variant::from(vec!["8080:80".to_owned()])),
        ("egress", zbus::Variant::from(vec!["10.0.0.0/8".to_owned()])),
        ("network", zbus::Variant::from("shared")),
    ] {
        let e = vms
            .create_vm(
                "n0",
                opt(&[
                    ("rootfs_dir", rootfs.to_owned().into()),
                    ("netns", path.clone().into()),
                    (key, value),
                ]),
            )
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains(key) && e.contains("leave"), "{key}: {e}");
        tried += 1;
    }
    let out = bus.banger_as(None, &["vm", "list"]);
    assert!(!text(&out).contains("n0"), "{}", text(&out));
    eprintln!(
        "security (netns): {tried} bad namespaces or options tried, {tried} refused, 0 VMs made"
    );

    let out = bus.banger_as(
        None,
        &[
            "vm", "create", "n1", "--rootfs", rootfs, "--netns", &path, "--vcpus", "1", "--memory",
            "256",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("in {path}, wired to its eth0")),
        "{}",
        text(&out)
    );
    let shown = vm_shown(&bus, "n1");
    assert_eq!(shown["netns"], path.as_str(), "{shown}");
    let exec = |cmd: &str| bus.banger_as(None, &["vm", "exec", "n1", "--", "sh", "-c", cmd]);
    let out = exec("busybox ip -o -4 addr show; busybox ip route; cat /sys/class/net/eth0/address");
    assert!(out.status.success(), "{}", text(&out));
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(said.contains("inet 10.77.0.2/24"), "eth0's address: {said}");
    assert!(
        said.contains("default via 10.77.0.1"),
        "eth0's route: {said}"
    );
    assert!(said.contains(&mac), "eth0's MAC {mac}: {said}");
    // A TCP handshake from the guest to the namespace's peer: the guest's SYN leaves through
    // eth0 and the answer comes back to the guest (the namespace's own stack, which holds the
    // same address, would reset it).
    let reach = |what: &str| {
        let listener = bus
            .in_netns("busybox")
            .args(["nc", "-l", "-p", "7010"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let every = Duration::from_millis(100);
        let sent = poll_until(every * 100, every, || {
            exec("echo hello-from-the-guest | busybox nc -w 3 10.77.0.1 7010")
                .status
                .success()
        });
        assert!(sent, "{what}: the guest never reached 10.77.0.1:7010");
        let out = listener.wait_with_output().unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "hello-from-the-guest\n",
            "{what}"
        );
    };
    reach("first start");
    let wiring = || {
        bus.sh_in_namespaces(&format!(
            "ip -n {ns} -o link show; tc -n {ns} qdisc show dev eth0"
        ))
    };
    let wired = wiring();
    assert!(
        wired.contains("bgr") && wired.contains("ingress"),
        "{wired}"
    );
    assert!(
        !bus.sh_in_namespaces("ip -o link show").contains("bgr"),
        "the tap is in the namespace, not the daemon's"
    );
    // Stopped: the tap and eth0's wiring go; started again, both come back.
    let out = bus.banger_as(None, &["vm", "stop", "n1"]);
    assert!(out.status.success(), "{}", text(&out));
    let unwired = wiring();
    assert!(
        !unwired.contains("bgr") && !unwired.contains("ingress"),
        "{unwired}"
    );
    let out = bus.banger_as(None, &["vm", "start", "n1"]);
    assert!(out.status.success(), "{}", text(&out));
    reach("second start");
    let bad = common::invariants::check(&bus);
    assert!(bad.is_empty(), "{bad:#?}");
    // A namespace without eth0: the start fails naming it, and leaves nothing running.
    let out = bus.banger_as(
        None,
        &[
            "vm",
            "create",
            "n2",
            "--rootfs",
            rootfs,
            "--netns",
            &format!("/run/netns/{bare}"),
            "--vcpus",
            "1",
            "--memory",
            "256",
        ],
    );
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("has no eth0"), "{}", text(&out));
    for vm in ["n2", "n1"] {
        let out = bus.banger_as(None, &["vm", "delete", "--force", vm]);
        assert!(out.status.success(), "{vm}: {}", text(&out));
    }
    let left = wiring();
    assert!(!left.contains("bgr") && !left.contains("ingress"), "{left}");
    let bad = common::invariants::check(&bus);
    assert!(bad.is_empty(), "{bad:#?}");
    bus.sh_in_namespaces(&format!("ip netns del {ns}; ip netns del {bare}"));
}

/// banger's microVM kernel (packaging/kernel/build.sh), which tests/run builds in the
/// background: the path of its `vmlinux` once the build ended well. None outside tests/run
/// (a failure under BANGER_REQUIRE_INTEGRATION); a failed build fails with its log.
fn microvm_kernel() -> Option<std::path::PathBuf> {
    let Ok(dir) = std::env::var("BANGER_TEST_MICROVM_KERNEL") else {
        assert!(
            std::env::var("BANGER_REQUIRE_INTEGRATION").as_deref() != Ok("1"),
            "BANGER_TEST_MICROVM_KERNEL is not set: run through tests/run"
        );
        eprintln!("SKIPPED: BANGER_TEST_MICROVM_KERNEL is not set (tests/run builds the kernel)");
        return None;
    };
    // tests/run writes the build's exit status when it ends; it has the cores to itself only
    // once the other tests leave them idle.
    let status = std::path::PathBuf::from(format!("{dir}.status"));
    wait_until(
        "the microVM kernel's build",
        Duration::from_secs(3600),
        || status.exists(),
    );
    let code = std::fs::read_to_string(&status).unwrap();
    let log = std::fs::read_to_string(format!("{dir}.log")).unwrap_or_default();
    assert_eq!(code.trim(), "0", "packaging/kernel/build.sh failed:\n{log}");
    Some(std::path::Path::new(&dir).join("vmlinux"))
}

/// The microVM kernel, every driver built in and no modules, imported by a member as the
/// kernel file alone: its VM boots the busybox image with banger's own initrd (no module
/// list), answers `vm exec`, has the balloon's free page reporting (its order set by
/// banger-init) and virtio-fs, and starts again after a stop with the same initrd file.
async fn the_microvm_kernel_boots_with_every_driver_built_in() {
    let Some(vmlinux) = microvm_kernel() else {
        return;
    };
    let Some((bus, reference, _keep)) = image_bus("", "vm/micro").await else {
        return;
    };
    use std::os::unix::fs::PermissionsExt;
    // The member's own copy, which the import reads as the member.
    let files = tempfile::tempdir().unwrap();
    std::fs::set_permissions(files.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let copy = files.path().join("vmlinux");
    std::fs::copy(&vmlinux, &copy).unwrap();
    let ok = |out: std::process::Output| {
        assert!(out.status.success(), "{}", text(&out));
        text(&out)
    };
    let k = copy.to_str().unwrap();
    ok(bus.banger_as(Some(USER_OK), &["kernel", "import", "micro", "--kernel", k]));
    let dir = bus.state_dir().join("kernels/micro");
    assert!(
        !dir.join("initrd.img").exists() && !dir.join("modules").exists(),
        "a kernel file alone"
    );
    let create = [
        "vm", "create", "m", "--image", &reference, "--kernel", "micro", "--memory", "256",
        "--vcpus", "1",
    ];
    ok(bus.banger_as(Some(USER_OK), &create));
    // Its memory savings: queues of at most 256 entries (a disk's request pool is the queue's
    // size; QEMU's virtio-mmio offers 1024), no kernel memory accounting.
    let checks = "uname -r; cat /sys/module/page_reporting/parameters/page_reporting_order; \
                  grep -c virtiofs /proc/filesystems; test -e /proc/modules || echo no-modules; \
                  cat /sys/block/vda/queue/nr_requests /sys/block/vdb/queue/nr_requests; \
                  grep -o cgroup.memory=nokmem /proc/cmdline | grep -c nokmem";
    let seen = exec_as(&bus, Some(USER_OK), "m", &["sh", "-c", checks]);
    let lines: Vec<&str> = seen.lines().collect();
    assert!(lines[0].ends_with("-banger"), "{seen}");
    assert_eq!(
        lines[1..],
        // nokmem twice: the kernel's built-in command line's and banger's.
        ["5", "1", "no-modules", "256", "256", "2"],
        "{seen}"
    );
    let initrds = || -> Vec<String> {
        std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("initrd.banger-"))
            .collect()
    };
    let made = initrds();
    assert_eq!(made.len(), 1, "{made:?}");
    ok(bus.banger_as(Some(USER_OK), &["vm", "stop", "m"]));
    ok(bus.banger_as(Some(USER_OK), &["vm", "start", "m"]));
    assert_eq!(
        exec_as(&bus, Some(USER_OK), "m", &["uname", "-r"]).trim(),
        lines[0]
    );
    assert_eq!(initrds(), made, "the same initrd serves the second start");
    ok(bus.banger_as(Some(USER_OK), &["vm", "delete", "--force", "m"]));
    let bad = common::invariants::check(&bus);
    assert!(bad.is_empty(), "{bad:#?}");
}

fn main() {
    let mut args = libtest_mimic::Arguments::from_args();
    let (steps, scenario) = scenario::trials(
        &mut args,
        "a_booted_vm",
        STEPS,
        a_vm_boots_runs_commands_keeps_its_root_disk_and_goes_away,
    );
    let mut trials = vec![
        scenario::async_trial(
            "a_boot_that_fails_names_its_stage_keeps_the_console_and_leaves_nothing_running",
            a_boot_that_fails_names_its_stage_keeps_the_console_and_leaves_nothing_running,
        ),
        scenario::async_trial(
            "the_default_image_is_built_on_demand_and_vm_run_gives_an_ssh_session_in_a_namespace",
            the_default_image_is_built_on_demand_and_vm_run_gives_an_ssh_session_in_a_namespace,
        ),
        scenario::async_trial(
            "a_subnet_over_a_host_route_refuses_vms_with_the_reason_and_keeps_the_rest_working",
            a_subnet_over_a_host_route_refuses_vms_with_the_reason_and_keeps_the_rest_working,
        ),
        scenario::async_trial(
            "an_init_less_image_boots_by_its_reference_alone_with_banger_init_as_its_init",
            an_init_less_image_boots_by_its_reference_alone_with_banger_init_as_its_init,
        ),
        scenario::async_trial(
            "debootstrap_and_umoci_images_boot_by_reference",
            debootstrap_and_umoci_images_boot_by_reference,
        ),
        scenario::async_trial(
            "a_snapshot_forks_a_running_vm_into_vms_of_their_own_and_bad_restores_are_refused",
            a_snapshot_forks_a_running_vm_into_vms_of_their_own_and_bad_restores_are_refused,
        ),
        scenario::async_trial(
            "a_host_folder_boots_as_a_vms_root_served_as_its_owner",
            a_host_folder_boots_as_a_vms_root_served_as_its_owner,
        ),
        scenario::async_trial(
            "a_vm_given_a_network_namespace_takes_over_its_eth0",
            a_vm_given_a_network_namespace_takes_over_its_eth0,
        ),
        scenario::async_trial(
            "folder_roots_start_warm_where_qemu_can_save_virtio_fs",
            folder_roots_start_warm_where_qemu_can_save_virtio_fs,
        ),
        scenario::async_trial(
            "restores_share_their_snapshots_memory_and_a_changed_ram_file_is_refused",
            restores_share_their_snapshots_memory_and_a_changed_ram_file_is_refused,
        ),
        scenario::async_trial(
            "the_microvm_kernel_boots_with_every_driver_built_in",
            the_microvm_kernel_boots_with_every_driver_built_in,
        ),
    ];
    trials.extend(steps);
    let conclusion = libtest_mimic::run(&args, trials);
    if let Some(s) = scenario {
        s.join().unwrap();
    }
    conclusion.exit();
}
