//! `banger-init` as the guest's whole init, for images without one (most container images):
//! it stays PID 1, starts the agent and keeps it running, optionally runs the VM's main
//! process (an image's Entrypoint+Cmd), reaps every orphan, and shuts down cleanly on
//! SIGTERM/SIGINT/SIGPWR (the agent's shutdown request; Ctrl-Alt-Del), the ACPI power button
//! (its input device), or the main process's exit: every process gets SIGTERM, then SIGKILL
//! after a grace period, file systems are synced and remounted read-only, and the VM powers
//! off. One thread: signals arrive through a signalfd, the power button through its event
//! device, both in one `poll`.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// The environment banger's own guest processes start with.
pub const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The variable the agent finds in its environment when `banger-init` is PID 1: shutdown is
/// then init's job (the agent signals PID 1 instead of powering off itself).
pub const INIT_ENV: &str = "BANGER_INIT";

/// The console line that reports the main process's exit status (the host reads the last one).
pub const EXIT_LINE: &str = "banger-init: main process exited with status ";

/// How long processes get between SIGTERM and SIGKILL at shutdown.
const GRACE: Duration = Duration::from_secs(5);

/// A process to start: program, arguments, environment, working directory, user.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Spawn {
    /// Program and arguments (the program looked up on `PATH` when it has no `/`).
    pub argv: Vec<String>,
    /// `KEY=VALUE`, the whole environment.
    pub env: Vec<String>,
    /// Working directory.
    pub cwd: String,
    /// uid and gid (and supplementary groups) to run as.
    pub uid: u32,
    /// Primary gid.
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
    /// Where its output goes instead of the console (e.g. `/dev/kmsg`).
    pub output: Option<String>,
}

fn say(msg: &str) {
    console(&format!("banger-init: {msg}"));
}

/// Writes a line to the console (stderr), ignoring failure: PID 1 must never die because its
/// console is busy or gone (`eprintln!` panics on a write error, and a panicking PID 1 takes
/// the whole guest down).
pub(super) fn console(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

fn cstrings(v: &[String]) -> Vec<CString> {
    v.iter()
        .map(|s| CString::new(s.as_bytes()).unwrap_or_default())
        .collect()
}

/// The program's path: as given when it has a `/`, else the first match on `PATH` (from the
/// process's own environment, else the default).
fn resolve(prog: &str, env: &[String]) -> Option<String> {
    let path = env
        .iter()
        .find_map(|kv| kv.strip_prefix("PATH="))
        .unwrap_or(PATH);
    find_program(prog, path)
}

/// `prog` as given when it has a `/`, else the first executable file of that name in the
/// directories of `path` (a `PATH` value).
pub fn find_program(prog: &str, path: &str) -> Option<String> {
    if prog.contains('/') {
        return Some(prog.to_owned());
    }
    use std::os::unix::fs::PermissionsExt;
    path.split(':')
        .filter(|d| !d.is_empty())
        .map(|d| format!("{d}/{prog}"))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Forks and execs `s` in a session of its own with all signals unblocked, standard input
/// from `/dev/null` and output to the console. Returns the child's pid.
fn spawn(s: &Spawn) -> Result<libc::pid_t, String> {
    let prog = s.argv.first().ok_or("no program")?;
    let path = resolve(prog, &s.env).ok_or_else(|| format!("{prog}: not found on PATH"))?;
    let path = CString::new(path).map_err(|e| e.to_string())?;
    let (argv, env) = (cstrings(&s.argv), cstrings(&s.env));
    let mut argv_p: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_p.push(std::ptr::null());
    let mut env_p: Vec<*const libc::c_char> = env.iter().map(|a| a.as_ptr()).collect();
    env_p.push(std::ptr::null());
    let cwd = CString::new(s.cwd.as_bytes()).unwrap_or_default();
    let root = c"/";
    let null = c"/dev/null";
    let output = s
        .output
        .as_ref()
        .map(|o| CString::new(o.as_bytes()).unwrap_or_default());
    let groups: Vec<libc::gid_t> = s.groups.clone();
    // SAFETY: between fork and exec the child only makes async-signal-safe calls on memory
    // prepared before the fork, then execs or exits.
    unsafe {
        let pid = libc::fork();
        if pid < 0 {
            return Err(std::io::Error::last_os_error().to_string());
        }
        if pid > 0 {
            return Ok(pid);
        }
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        libc::setsid();
        let fd = libc::open(null.as_ptr(), libc::O_RDONLY);
        if fd >= 0 {
            libc::dup2(fd, 0);
        }
        if let Some(o) = &output {
            let fd = libc::open(o.as_ptr(), libc::O_WRONLY);
            if fd >= 0 {
                libc::dup2(fd, 1);
                libc::dup2(fd, 2);
            }
        }
        if libc::chdir(cwd.as_ptr()) != 0 {
            libc::chdir(root.as_ptr());
        }
        if (s.uid != 0 || s.gid != 0)
            && (libc::setgroups(groups.len(), groups.as_ptr()) != 0
                || libc::setgid(s.gid) != 0
                || libc::setuid(s.uid) != 0)
        {
            libc::_exit(126);
        }
        libc::execve(path.as_ptr(), argv_p.as_ptr(), env_p.as_ptr());
        libc::_exit(127);
    }
}

/// The exit status as a shell reports it: the code, or 128 + the signal.
fn status_code(status: libc::c_int) -> i32 {
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        0
    }
}

/// Reaps every child that exited; returns `(pid, status)` of each.
fn reap() -> Vec<(libc::pid_t, i32)> {
    let mut out = Vec::new();
    loop {
        let mut status = 0;
        // SAFETY: status is a valid out-pointer.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            return out;
        }
        out.push((pid, status_code(status)));
    }
}

/// The signals init handles, blocked and read from a signalfd.
fn signalfd() -> Result<OwnedFd, String> {
    // SAFETY: sigset operations on a local set; signalfd returns a new descriptor.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [
            libc::SIGCHLD,
            libc::SIGTERM,
            libc::SIGINT,
            libc::SIGPWR,
            libc::SIGUSR1,
            libc::SIGUSR2,
            libc::SIGHUP,
        ] {
            libc::sigaddset(&mut set, s);
        }
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK);
        if fd < 0 {
            return Err(format!("signalfd: {}", std::io::Error::last_os_error()));
        }
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

/// The input devices that report a power button (`KEY_POWER` in their capabilities).
fn power_buttons() -> Vec<OwnedFd> {
    const KEY_POWER: usize = 116;
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/sys/class/input") else {
        return out;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("event") {
            continue;
        }
        // The key bitmap, most significant word first, words of the kernel's long size.
        let caps =
            std::fs::read_to_string(e.path().join("device/capabilities/key")).unwrap_or_default();
        let words: Vec<u64> = caps
            .split_whitespace()
            .rev()
            .map(|w| u64::from_str_radix(w, 16).unwrap_or(0))
            .collect();
        let has = words
            .get(KEY_POWER / 64)
            .is_some_and(|w| w & (1 << (KEY_POWER % 64)) != 0);
        if !has {
            continue;
        }
        let dev = CString::new(format!("/dev/input/{name}")).unwrap_or_default();
        // SAFETY: a NUL-terminated path; the result is checked.
        let fd = unsafe {
            libc::open(
                dev.as_ptr(),
                libc::O_RDONLY | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if fd >= 0 {
            // SAFETY: a new descriptor this function owns.
            out.push(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }
    out
}

/// Whether the power button was pressed among the events waiting on `fd`.
fn power_pressed(fd: &OwnedFd) -> bool {
    // struct input_event on 64-bit: timeval (16), type u16, code u16, value i32.
    let mut buf = [0u8; 24 * 16];
    let mut pressed = false;
    loop {
        // SAFETY: buf is valid for its length.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            return pressed;
        }
        for ev in buf[..n as usize].chunks_exact(24) {
            let ty = u16::from_ne_bytes([ev[16], ev[17]]);
            let code = u16::from_ne_bytes([ev[18], ev[19]]);
            let value = i32::from_ne_bytes([ev[20], ev[21], ev[22], ev[23]]);
            if ty == 1 && code == 116 && value == 1 {
                pressed = true;
            }
        }
    }
}

/// Powers off: every other process gets SIGTERM, then SIGKILL after [`GRACE`], everything
/// is synced and remounted read-only.
fn shut_down(sigfd: &OwnedFd) -> ! {
    say("shutting down");
    // SAFETY: kill(-1) signals every process but init; it takes no pointers.
    unsafe { libc::kill(-1, libc::SIGTERM) };
    let deadline = Instant::now() + GRACE;
    loop {
        reap();
        // ECHILD: nothing left.
        // SAFETY: a null status pointer is allowed.
        let r = unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) };
        if r < 0 || Instant::now() > deadline {
            break;
        }
        wait_readable(&[sigfd.as_raw_fd()], Duration::from_millis(100));
        drain(sigfd);
    }
    // SAFETY: as above.
    unsafe { libc::kill(-1, libc::SIGKILL) };
    std::thread::sleep(Duration::from_millis(50));
    reap();
    // SAFETY: sync, umount and mount take NUL-terminated strings or nothing.
    unsafe {
        libc::sync();
        libc::umount2(c"/root".as_ptr(), libc::MNT_DETACH);
        libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REMOUNT | libc::MS_RDONLY,
            std::ptr::null(),
        );
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Syncs and powers off at once (nothing else runs yet).
pub fn power_off_now() -> ! {
    // SAFETY: sync and reboot take no pointers; reboot only returns on failure.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn drain(sigfd: &OwnedFd) -> Vec<i32> {
    let mut sigs = Vec::new();
    loop {
        // SAFETY: signalfd_siginfo is plain data; read fills at most its size.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        // SAFETY: info is valid for its size; the fd is the open signalfd.
        let n = unsafe {
            libc::read(
                sigfd.as_raw_fd(),
                (&mut info as *mut libc::signalfd_siginfo).cast(),
                std::mem::size_of::<libc::signalfd_siginfo>(),
            )
        };
        if n <= 0 {
            return sigs;
        }
        sigs.push(info.ssi_signo as i32);
    }
}

/// Waits until one of `fds` is readable or `timeout` passes; returns the readable ones.
pub(crate) fn wait_readable(fds: &[i32], timeout: Duration) -> Vec<i32> {
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: p is a valid array of pollfd for its length.
    let n = unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, ms) };
    if n <= 0 {
        return Vec::new();
    }
    p.iter().filter(|x| x.revents != 0).map(|x| x.fd).collect()
}

/// Runs as the guest's init until it powers off: `agent` kept running (restarted a second
/// after it exits), `main` (when given) the VM's main process, whose exit shuts the VM down.
pub fn run(agent: Option<Spawn>, main: Option<Spawn>) -> ! {
    let sigfd = match signalfd() {
        Ok(fd) => fd,
        Err(e) => {
            say(&e);
            // Without signals init cannot shut down cleanly; the VM still must not hang.
            loop {
                reap();
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    };
    // Ctrl-Alt-Del becomes SIGINT to init instead of an immediate reboot.
    // SAFETY: reboot with RB_DISABLE_CAD only changes that setting.
    unsafe { libc::reboot(libc::RB_DISABLE_CAD) };
    let buttons = power_buttons();
    let mut agent_pid = None;
    let mut agent_due = agent.as_ref().map(|_| Instant::now());
    let mut main_pid = None;
    if let Some(m) = &main {
        match spawn(m) {
            Ok(pid) => main_pid = Some(pid),
            Err(e) => {
                say(&format!("cannot start the main process: {e}"));
                console(&format!("{EXIT_LINE}127"));
                shut_down(&sigfd);
            }
        }
    }
    let mut fds = vec![sigfd.as_raw_fd()];
    fds.extend(buttons.iter().map(|b| b.as_raw_fd()));
    loop {
        if let (Some(a), Some(due)) = (&agent, agent_due) {
            if Instant::now() >= due {
                agent_due = None;
                match spawn(a) {
                    Ok(pid) => agent_pid = Some(pid),
                    Err(e) => {
                        say(&format!("cannot start the agent: {e}"));
                        agent_due = Some(Instant::now() + Duration::from_secs(5));
                    }
                }
            }
        }
        let timeout = agent_due
            .map(|d| d.saturating_duration_since(Instant::now()))
            .unwrap_or(Duration::from_secs(3600));
        let ready = wait_readable(&fds, timeout);
        let mut stop = false;
        if ready.contains(&sigfd.as_raw_fd()) {
            for sig in drain(&sigfd) {
                if sig != libc::SIGCHLD {
                    stop = true;
                }
            }
        }
        for b in &buttons {
            if ready.contains(&b.as_raw_fd()) && power_pressed(b) {
                say("power button pressed");
                stop = true;
            }
        }
        for (pid, code) in reap() {
            if Some(pid) == agent_pid {
                say(&format!("the agent exited ({code}); restarting it"));
                agent_pid = None;
                agent_due = Some(Instant::now() + Duration::from_secs(1));
            }
            if Some(pid) == main_pid {
                console(&format!("{EXIT_LINE}{code}"));
                shut_down(&sigfd);
            }
        }
        if stop {
            shut_down(&sigfd);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_resolve_on_the_processes_path() {
        let d = tempfile::tempdir().unwrap();
        let bin = d.path().join("tool");
        std::fs::write(&bin, "#!/bin/sh\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        let env = vec![format!("PATH=/nonexistent:{}", d.path().display())];
        assert_eq!(resolve("tool", &env), Some(bin.display().to_string()));
        assert_eq!(resolve("/bin/x", &env).as_deref(), Some("/bin/x"));
        assert_eq!(resolve("missing-tool", &env), None);
    }

    #[test]
    fn exit_codes_read_as_a_shell_reports_them() {
        assert_eq!(status_code(3 << 8), 3);
        assert_eq!(status_code(libc::SIGKILL), 128 + 9);
    }
}
