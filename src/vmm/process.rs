//! VMM processes found again through pid files. A pid is trusted only while the process's
//! command line still names the VM's runtime directory, so a recycled pid is never killed.

use std::path::Path;
use std::time::Duration;

/// The pid `pidfile` holds, once it is completely written.
pub fn read_pid(pidfile: &Path) -> Option<i32> {
    std::fs::read_to_string(pidfile).ok()?.trim().parse().ok()
}

/// Whether process `pid` exists and is not a zombie (whatever it runs: for a pid this daemon
/// just started, when its command line may be mid-exec and read empty).
pub fn exists(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").and_then(|(_, r)| r.chars().next()))
        .is_some_and(|state| state != 'Z')
}

/// The pid in `pidfile` if that process is alive and its command line mentions `marker`.
pub fn live_pid(pidfile: &Path, marker: &str) -> Option<i32> {
    let pid = read_pid(pidfile)?;
    if pid <= 1 {
        return None;
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // A zombie is not running, whatever its command line says.
    let state = stat.rsplit_once(") ").and_then(|(_, r)| r.chars().next());
    if state == Some('Z') {
        return None;
    }
    let cmdline = String::from_utf8_lossy(&cmdline);
    cmdline.contains(marker).then_some(pid)
}

/// Sends SIGTERM, waits up to `grace`, then SIGKILL; removes the pid file.
pub async fn terminate(pidfile: &Path, marker: &str, grace: Duration) {
    if let Some(pid) = live_pid(pidfile, marker) {
        // SAFETY: kill takes no pointers; pid was checked to be the VM's process.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = tokio::time::Instant::now() + grace;
        while live_pid(pidfile, marker).is_some() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if live_pid(pidfile, marker).is_some() {
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            while live_pid(pidfile, marker).is_some() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    let _ = std::fs::remove_file(pidfile);
}

/// The resource bounds of a detached process's unit (systemd hosts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnitLimits {
    /// `MemoryMax=` in bytes: the guest's memory plus the VMM's own, or a helper's.
    pub memory_max: u64,
    /// `TasksMax=`: threads and processes.
    pub tasks_max: u32,
}

impl UnitLimits {
    /// What a VMM of `vcpus` and `memory_mib` may take: the guest's memory plus
    /// [`VMM_OVERHEAD_MIB`], and a thread per vCPU plus QEMU's own.
    pub fn vmm(vcpus: u32, memory_mib: u32) -> Self {
        UnitLimits {
            memory_max: (u64::from(memory_mib) + VMM_OVERHEAD_MIB) << 20,
            tasks_max: 32 + 2 * vcpus,
        }
    }

    /// A helper (vsock device, console logger): it maps the guest's memory to serve
    /// virtqueues, so the guest's size counts, plus little of its own.
    pub fn helper(memory_mib: u32) -> Self {
        UnitLimits {
            memory_max: (u64::from(memory_mib) + 128) << 20,
            tasks_max: 32,
        }
    }
}

/// What QEMU needs beyond the guest's memory: its TCG translation cache (capped at
/// `tb-size=256` MiB by the driver) and its own heap, threads and device state.
pub const VMM_OVERHEAD_MIB: u64 = 512;

/// What every VMM and helper unit runs under (systemd hosts), besides the VM's own uid (see
/// `jail`): not a single capability (its files are its uid's or its group's, its tap is owned
/// by its uid, so none is needed), no way to gain privileges, and a read-only system but for
/// its `writable` paths.
/// TCG needs writable-executable memory, so MemoryDenyWriteExecute stays off.
pub const CONFINED_UNIT: &[&str] = &[
    "--property=CapabilityBoundingSet=",
    "--property=AmbientCapabilities=",
    "--property=NoNewPrivileges=yes",
    "--property=ProtectHome=yes",
    "--property=ProtectSystem=strict",
    "--property=PrivateTmp=yes",
    "--property=ProtectKernelTunables=yes",
    "--property=ProtectKernelModules=yes",
    "--property=ProtectKernelLogs=yes",
    "--property=ProtectControlGroups=yes",
    "--property=ProtectClock=yes",
    "--property=ProtectHostname=yes",
    "--property=RestrictSUIDSGID=yes",
    "--property=RestrictRealtime=yes",
    "--property=RestrictNamespaces=yes",
    "--property=LockPersonality=yes",
    "--property=SystemCallArchitectures=native",
    "--property=RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK AF_VSOCK",
    "--property=UMask=0077",
];

/// The same for a process started without systemd, through `setpriv`.
const CONFINED_SETPRIV: &[&str] = &[
    "--bounding-set=-all",
    "--inh-caps=-all",
    "--ambient-caps=-all",
    "--no-new-privs",
];

/// Starts `program args…` detached from bangerd, its pid written to `pidfile` by the shell
/// that then becomes it, its output to `log`. It must outlive the daemon and must not inherit
/// its sandbox (QEMU's TCG needs writable-executable memory, which the daemon's unit denies):
/// on a systemd host it runs as transient service `unit` started by systemd (`systemd-run`);
/// elsewhere in a session of its own (`setsid -f`). Either way it runs confined (no
/// capabilities, no new privileges; see [`CONFINED_UNIT`]). Returns once it started, not when
/// ready.
pub async fn spawn_detached(
    pidfile: &Path,
    unit: &str,
    program: &Path,
    args: &[&std::ffi::OsStr],
    log: &Path,
    limits: UnitLimits,
    writable: &[&Path],
    jail: &super::jail::Jail,
    fd3: Option<&std::os::fd::OwnedFd>,
) -> crate::Result<()> {
    let groups: Vec<String> = jail.groups.iter().map(|g| g.to_string()).collect();
    let what = program
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    let fail = |e: std::io::Error| crate::Error::failed(format!("Cannot start {what}"), e);
    let out = std::fs::File::create(log).map_err(fail)?;
    let err = out.try_clone().map_err(fail)?;
    // The shell writes its pid (about to become the program's) for live_pid to find.
    let mut script = "echo $$ > \"$0\"; exec \"$@\"".to_owned();
    let mut cmd = if super::scope::systemd_booted() {
        // systemd expands $VAR in ExecStart; $$ is its escape for a literal $.
        script = script.replace('$', "$$");
        let mut c = tokio::process::Command::new("systemd-run");
        c.arg(format!("--unit={unit}"))
            .args(["--quiet", "--collect", "--service-type=exec"])
            .arg(format!("--description=banger {what} ({unit})"))
            .arg(format!(
                "--property=StandardOutput=append:{}",
                log.display()
            ))
            .arg(format!("--property=StandardError=append:{}", log.display()))
            .args(["--property=KillMode=mixed", "--property=TimeoutStopSec=10"])
            .arg(format!("--uid={}", jail.uid))
            .arg(format!("--gid={}", jail.uid))
            .arg(format!(
                "--property=SupplementaryGroups={}",
                groups.join(" ")
            ))
            .args(CONFINED_UNIT)
            .arg(format!(
                "--property=ReadWritePaths={}",
                writable
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(" ")
            ))
            .arg(format!("--property=MemoryMax={}", limits.memory_max))
            .arg(format!("--property=TasksMax={}", limits.tasks_max))
            .arg("--");
        c
    } else {
        // The same confinement by hand: no capabilities in any set, no way to gain one.
        let mut c = tokio::process::Command::new("setsid");
        c.args(["-f", "setpriv"])
            .arg(format!("--reuid={}", jail.uid))
            .arg(format!("--regid={}", jail.uid))
            .arg(format!("--groups={}", groups.join(",")))
            .args(CONFINED_SETPRIV)
            .arg("--");
        c
    };
    if let Some(fd) = fd3 {
        use std::os::fd::AsRawFd;
        let raw = fd.as_raw_fd();
        // SAFETY: between fork and exec only dup2 and fcntl run, both async-signal-safe; the
        // descriptor stays open in the parent across the spawn.
        unsafe {
            cmd.pre_exec(move || {
                if raw == 3 {
                    if libc::fcntl(3, libc::F_SETFD, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::dup2(raw, 3) != 3 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    // status(), not output(): output() would pipe stdout to the detached process too.
    let status = cmd
        .args(["sh", "-c", &script])
        .arg(pidfile)
        .arg(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(err)
        .status()
        .await
        .map_err(fail)?;
    if !status.success() {
        let msg = std::fs::read_to_string(log).unwrap_or_default();
        return Err(fail(std::io::Error::other(format!(
            "{status}: {}",
            msg.trim()
        ))));
    }
    Ok(())
}

/// Waits until `path` exists, up to `limit`.
pub async fn wait_for_path(path: &Path, limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while !path.exists() {
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_the_process_that_names_the_marker_is_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().to_string_lossy().into_owned();
        // The marker is the shell's $0, so it is in the command line.
        let mut child = std::process::Command::new("sh")
            .args(["-c", "while :; do sleep 1; done", &marker])
            .spawn()
            .unwrap();
        let pidfile = dir.path().join("x.pid");
        std::fs::write(&pidfile, child.id().to_string()).unwrap();
        // Until the child has exec'd, its command line is still the test binary's.
        for _ in 0..500 {
            if live_pid(&pidfile, &marker).is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(live_pid(&pidfile, &marker), Some(child.id() as i32));
        assert_eq!(live_pid(&pidfile, "/some/other/vm"), None);
        terminate(&pidfile, "/some/other/vm", Duration::from_millis(10)).await;
        assert!(
            child.try_wait().unwrap().is_none(),
            "a foreign pid was killed"
        );
        std::fs::write(&pidfile, child.id().to_string()).unwrap();
        let waiter = std::thread::spawn(move || child.wait().unwrap());
        terminate(&pidfile, &marker, Duration::from_secs(5)).await;
        assert!(!waiter.join().unwrap().success());
        assert!(!pidfile.exists());
    }
}
