//! A parked guest: booted as far as it goes without its root (`banger.park=1`), to be
//! snapshotted there and restored with a root folder of its own. A warm start of a VM whose
//! root is a folder (virtio-fs) restores such a template: the folder's server is new, so the
//! guest must not have mounted the one it was booted with.
//!
//! `banger-init` starts the agent from the initrd ([`INITRD_AGENT`]) with [`PARKED_ENV`] set
//! and one end of a socket pair as its fd 3, and waits on the other end. The agent's
//! `unpark` request writes `go`; init mounts the root and prepares it as it would at boot,
//! then answers `ok` (or `error: WHY` before it powers off). The agent replies to the host,
//! waits until the host closed that connection (so its reply left the guest) and exits; init
//! then switches root and starts the root's agent, which the host meets as a restarted one.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::Mutex;
use std::time::Duration;

/// The variable a parked agent finds in its environment.
pub const PARKED_ENV: &str = "BANGER_PARKED";
/// The agent's fd that reaches init.
const INIT_FD: i32 = 3;
/// The agent the host put in the initrd.
const INITRD_AGENT: &str = "/banger-agent";

/// Init's end of the parked agent's socket pair, while parked: [`super::fail`] says why
/// there, so the host's `unpark` request gets the reason.
static TOLD: Mutex<Option<UnixStream>> = Mutex::new(None);

/// The parked agent, once `unpark` arrived.
pub struct Parked {
    child: std::process::Child,
}

/// Runs the initrd's agent parked and returns once the host asked to unpark (the agent is
/// started again whenever it ends before that).
pub fn wait() -> Parked {
    loop {
        let (ours, theirs) = match UnixStream::pair() {
            Ok(p) => p,
            Err(e) => super::fail(&format!("cannot park: {e}")),
        };
        let mut cmd = std::process::Command::new(INITRD_AGENT);
        cmd.env_clear()
            .env("PATH", super::supervise::PATH)
            .env("HOME", "/")
            .env(super::supervise::INIT_ENV, "1")
            .env(PARKED_ENV, "1")
            .current_dir("/")
            .stdin(std::process::Stdio::null());
        let fd = theirs.as_raw_fd();
        // SAFETY: between fork and exec the child only calls fcntl or dup2, and setsid, both
        // async-signal-safe, on a descriptor opened before the fork.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(move || {
                // dup2 clears close-on-exec on the copy; a socket that is fd 3 already keeps
                // its flag unless told.
                let r = if fd == INIT_FD {
                    libc::fcntl(fd, libc::F_SETFD, 0)
                } else {
                    libc::dup2(fd, INIT_FD)
                };
                if r < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::setsid();
                Ok(())
            });
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => super::fail(&format!("cannot start the parked agent: {e}")),
        };
        drop(theirs);
        super::say("parked: the root is mounted when the host asks");
        let mut line = String::new();
        let asked = BufReader::new(&ours).read_line(&mut line).is_ok() && line.trim() == "go";
        if asked {
            *TOLD.lock().unwrap_or_else(|p| p.into_inner()) = Some(ours);
            return Parked { child };
        }
        // It ended (or spoke out of turn): start it again, after a pause so a broken one
        // does not spin.
        let _ = child.kill();
        let _ = child.wait();
        super::say("the parked agent ended; starting it again");
        std::thread::sleep(Duration::from_secs(1));
    }
}

impl Parked {
    /// Tells the agent the root is ready and waits (a bounded time) until it ended.
    pub fn release(mut self) {
        if let Some(mut s) = TOLD.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = s.write_all(b"ok\n");
        }
        for _ in 0..200 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        super::say("the parked agent did not end; stopping it");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Tells a parked agent waiting on `unpark` why the root could not be mounted.
pub(super) fn tell_failure(msg: &str) {
    if let Some(mut s) = TOLD.lock().unwrap_or_else(|p| p.into_inner()).take() {
        let _ = writeln!(s, "error: {}", msg.replace('\n', " "));
    }
}

/// The agent's side of `unpark`: asks init to mount the root and waits for its answer.
pub fn unpark() -> Result<(), String> {
    if std::env::var_os(PARKED_ENV).is_none() {
        return Err("this guest is not parked: its root is mounted already".into());
    }
    static CHANNEL: Mutex<bool> = Mutex::new(false);
    let mut taken = CHANNEL.lock().unwrap_or_else(|p| p.into_inner());
    if *taken {
        return Err("unpark was asked already".into());
    }
    *taken = true;
    // SAFETY: fd 3 is the socket init gave this process; it is taken once (above).
    let mut s = unsafe { <UnixStream as std::os::fd::FromRawFd>::from_raw_fd(INIT_FD) };
    s.write_all(b"go\n")
        .map_err(|e| format!("cannot reach init: {e}"))?;
    let mut line = String::new();
    BufReader::new(&s)
        .read_line(&mut line)
        .map_err(|e| format!("no answer from init: {e}"))?;
    match line.trim() {
        "ok" => Ok(()),
        "" => Err("init ended without an answer".into()),
        other => Err(other.strip_prefix("error: ").unwrap_or(other).to_owned()),
    }
}

/// Whether this agent runs parked.
pub fn parked() -> bool {
    std::env::var_os(PARKED_ENV).is_some()
}
