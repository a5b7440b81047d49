//! Workers: hostile input is parsed outside the root daemon.
//!
//! What a registry sends (HTTP, gzip and zstd streams, tar) and what the ext4 writer makes of
//! it are handled by `bangerd worker KIND`, a child of the daemon that becomes a uid of its
//! own before it reads a byte, as systemd-importd runs `systemd-pull`: no capabilities (the
//! uid change drops them all), no supplementary group but [`gid`] (which reads the blob
//! cache), `no_new_privs`, not dumpable (no other worker of the same range can trace or read
//! it), a seccomp filter ([`crate::vmm::nosetid::worker_program`]: no identity change, no
//! namespaces, mounts, traces, keyrings, device nodes or kernel loading), banger's state and
//! runtime directories and the host's homes and temporary places hidden (`jail-mounts`), but
//! for the paths it works in, bound back. It dies with the daemon (`PR_SET_PDEATHSIG`, and its
//! process group is recorded so a successor daemon stops what is left), and with its job when
//! the job is canceled.
//!
//! It reads its request (JSON) from stdin and writes [`Event`]s, one JSON line each, to
//! stdout; the daemon bounds every line, forwards stages, progress and log lines to the job,
//! and trusts nothing the worker made until it has checked it (files reopened without
//! following links, digests recomputed).

use std::io::{BufRead, Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::vmm::jail::{Mounts, VM_ID_BASE};
use crate::{Error, Result};

/// The argument that runs the `bangerd` binary as `worker KIND UID PARENT_PID`.
pub const WORKER_ARG: &str = "worker";

/// The first of the workers' uids, far above every VM's ([`crate::vmm::jail::vm_uid`]: VM
/// uids are the base plus a vsock CID, allocated densely from 3).
pub const UID_BASE: u32 = VM_ID_BASE + 0x0080_0000;
/// How many uids workers cycle through.
const UIDS: u32 = 0x1_0000;

/// The group every worker has, which may read the blob cache (vsock CID 2 is the host's, so
/// no VM has this id).
pub fn gid() -> u32 {
    VM_ID_BASE + 2
}

static NEXT: AtomicU32 = AtomicU32::new(0);

static IN_PROCESS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Does workers' work in this process, as root, instead: only for a program that embeds the
/// service and is not `bangerd` (the benchmarks in `examples/`, with stand-in VMMs and no
/// hostile input). The daemon never calls it.
pub fn run_in_process() {
    IN_PROCESS.store(true, Ordering::Relaxed);
}

/// Whether workers' work runs in this process (see [`run_in_process`]; unit tests, whose
/// binary is not `bangerd`, too).
pub fn in_process() -> bool {
    IN_PROCESS.load(Ordering::Relaxed)
        || (cfg!(test) && crate::vmm::process::bangerd_program().is_err())
}

/// A uid for the next worker: one no running worker has (unless 65,536 run at once).
pub fn next_uid() -> u32 {
    UID_BASE + NEXT.fetch_add(1, Ordering::Relaxed) % UIDS
}

/// Whether `uid` is a worker's.
pub fn is_worker_uid(uid: u32) -> bool {
    (UID_BASE..UID_BASE + UIDS).contains(&uid)
}

/// The largest request a worker reads.
const MAX_REQUEST: u64 = 1 << 20;
/// The longest line the daemon reads from a worker.
const MAX_LINE: usize = 4 << 20;
/// How much of a worker's stderr the daemon keeps (its last bytes) for an error message.
const STDERR_TAIL: usize = 4096;

/// The host places a worker sees empty (as a VM's processes do, `jail::HOST_PRIVATE`, but
/// for `/run`, where the resolver's files may live: a worker resolves registry names).
const HIDDEN: &[&str] = &[
    "/home", "/root", "/tmp", "/var/tmp", "/dev/shm", "/mnt", "/media", "/srv",
];

/// What a worker says, one JSON line each.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    /// The job entered a stage.
    Stage {
        /// Its name.
        name: String,
        /// What it does.
        text: String,
    },
    /// How far the work is, 0 to 1.
    Progress(f64),
    /// A line for the job's log.
    Log {
        /// syslog priority.
        priority: u32,
        /// The line.
        text: String,
    },
    /// The work's result (the last event).
    Done(serde_json::Value),
    /// Why the work failed (the last event): the error's kind and message.
    Failed {
        /// [`crate::error::ErrorKind`], as its name.
        kind: String,
        /// The whole message.
        message: String,
    },
}

/// Where a piece of work reports: the job itself in the daemon, stdout in a worker.
pub trait Report: Sync {
    /// A stage begins.
    fn stage(&self, name: &str, text: String);
    /// Progress, 0 to 1.
    fn progress(&self, progress: f64);
    /// A log line.
    fn log(&self, priority: u32, text: String);
}

impl Report for crate::jobs::JobContext {
    fn stage(&self, name: &str, text: String) {
        crate::jobs::JobContext::stage(self, name, text)
    }
    fn progress(&self, progress: f64) {
        crate::jobs::JobContext::progress(self, progress)
    }
    fn log(&self, priority: u32, text: String) {
        crate::jobs::JobContext::log(self, priority, text)
    }
}

/// Reports that go nowhere (work outside a job's stages).
pub struct Quiet;

impl Report for Quiet {
    fn stage(&self, _: &str, _: String) {}
    fn progress(&self, _: f64) {}
    fn log(&self, priority: u32, text: String) {
        if priority <= 4 {
            tracing::warn!("{text}");
        }
    }
}

/// A worker's reports, as [`Event`] lines on its stdout.
pub struct Lines(std::sync::Mutex<std::io::Stdout>);

/// What a worker of one kind does with its request (JSON), reporting on the way; its
/// answer. The services name theirs ([`crate::service::WORKS`]), so this module needs none
/// of them.
pub type Work = fn(&[u8], &dyn Report) -> Result<serde_json::Value>;

impl Lines {
    fn send(&self, e: &Event) {
        let Ok(mut line) = serde_json::to_vec(e) else {
            return;
        };
        line.push(b'\n');
        let mut out = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let _ = out.write_all(&line).and_then(|_| out.flush());
    }
}

impl Report for Lines {
    fn stage(&self, name: &str, text: String) {
        self.send(&Event::Stage {
            name: name.into(),
            text,
        })
    }
    fn progress(&self, progress: f64) {
        self.send(&Event::Progress(progress))
    }
    fn log(&self, priority: u32, text: String) {
        self.send(&Event::Log { priority, text })
    }
}

/// A worker to run.
pub struct Spec<'a> {
    /// What it does (`pull`).
    pub kind: &'a str,
    /// Its uid ([`next_uid`]).
    pub uid: u32,
    /// Its request.
    pub request: &'a serde_json::Value,
    /// banger's roots it sees empty (state, runtime) where banger builds its namespace.
    pub hide: Vec<PathBuf>,
    /// What it works on, opened by the daemon: they become its fds 3, 4, …, which it names
    /// `/proc/self/fd/N` (the kernel checks only the object's own permissions there, so a
    /// worker reaches its staging directory without traversing banger's closed directories,
    /// and nothing else of banger's).
    pub fds: Vec<std::os::fd::OwnedFd>,
}

/// The name a worker uses for the `i`th of [`Spec::fds`].
pub fn fd_path(i: usize) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", 3 + i))
}

/// The error a worker reported, as the daemon's.
fn rebuild(kind: &str, message: String) -> Error {
    match kind {
        "InvalidArgument" => Error::InvalidArgument(message),
        "LimitExceeded" => Error::LimitExceeded(message),
        "NotFound" => Error::NotFound(message),
        "AlreadyExists" => Error::AlreadyExists(message),
        _ => Error::Failed {
            context: message,
            source: "reported by the worker".into(),
        },
    }
}

/// Runs a worker to its end as a job's blocking work (a cancel of the job kills it), passing
/// what it reports to `report`; returns its result, or its error, or how it died (with the
/// end of what it wrote to stderr).
pub fn run(spec: &Spec<'_>, report: &dyn Report) -> Result<serde_json::Value> {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::{CommandExt, ExitStatusExt};
    use std::process::Stdio;
    let program = crate::vmm::process::bangerd_program()?;
    let parent = std::process::id();
    let mut cmd = std::process::Command::new(&program);
    // Where systemd runs the daemon, its unit's namespace hides the host's homes and
    // temporary places already, and its system call filter keeps mounts out of reach; else
    // banger builds a namespace of the worker's own.
    if !crate::vmm::scope::systemd_booted() {
        let mut hide = spec.hide.clone();
        hide.extend(HIDDEN.iter().map(PathBuf::from));
        let jail = crate::vmm::jail::Jail {
            uid: spec.uid,
            gid: spec.uid,
            groups: vec![gid()],
            hide,
            read_only: Vec::new(),
            private: false,
            offline: false,
        };
        // The worker is this program: bound back where a hidden root holds it (a build
        // under /tmp), as every VM process's program is.
        let mounts = Mounts::of(&jail, &[], &[&program]);
        cmd.arg(crate::vmm::jail::MOUNTS_ARG)
            .args(mounts.args())
            .arg(&program);
    }
    cmd.arg(WORKER_ARG)
        .arg(spec.kind)
        .arg(spec.uid.to_string())
        .arg(parent.to_string())
        .arg(spec.fds.len().to_string())
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    crate::host::dies_with_this_thread(&mut cmd);
    let fds: Vec<i32> = spec.fds.iter().map(|f| f.as_raw_fd()).collect();
    // SAFETY: the closure runs in the forked child before exec and calls only
    // async-signal-safe functions (fcntl, dup2, close); `fds` was built before the fork and
    // is only read.
    unsafe {
        cmd.pre_exec(move || {
            // Out of the way first (one may sit at 3, 4, …), then into place, open across
            // exec.
            let mut high = [0i32; 8];
            for (i, fd) in fds.iter().enumerate().take(8) {
                high[i] = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 64);
                if high[i] < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for (i, h) in high.iter().enumerate().take(fds.len().min(8)) {
                if libc::dup2(*h, 3 + i as i32) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(*h);
            }
            Ok(())
        });
    }
    let request =
        serde_json::to_vec(spec.request).map_err(|e| Error::failed("Cannot encode", e))?;
    let what = format!("the {} worker", spec.kind);
    let mut child = cmd
        .spawn()
        .map_err(|e| Error::failed(format!("Cannot start {what}"), e))?;
    let _record = crate::host::ProgramRecord::new(child.id());
    let group = child.id() as i32;
    let kill = || {
        // SAFETY: killpg only sends a signal; the group is the worker's own.
        unsafe { libc::killpg(group, libc::SIGKILL) };
    };
    if let Some(mut stdin) = child.stdin.take() {
        // A worker that died at once shows below; its broken pipe says nothing more.
        let _ = stdin.write_all(&request);
    }
    let stderr = child.stderr.take().expect("piped");
    let errors = std::thread::spawn(move || {
        let mut tail = Vec::new();
        let mut buf = [0u8; 4096];
        let mut r = stderr;
        while let Ok(n) = r.read(&mut buf) {
            if n == 0 {
                break;
            }
            tail.extend_from_slice(&buf[..n]);
            if tail.len() > STDERR_TAIL {
                tail.drain(..tail.len() - STDERR_TAIL);
            }
        }
        String::from_utf8_lossy(&tail).trim().to_owned()
    });
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel::<std::result::Result<Event, String>>();
    std::thread::spawn(move || {
        let mut r = std::io::BufReader::new(stdout);
        loop {
            let mut line = Vec::new();
            match (&mut r)
                .take(MAX_LINE as u64 + 1)
                .read_until(b'\n', &mut line)
            {
                Ok(0) | Err(_) => return,
                Ok(_) if line.len() > MAX_LINE => {
                    let _ = tx.send(Err(format!("a line of over {MAX_LINE} bytes")));
                    return;
                }
                Ok(_) => {
                    let e = serde_json::from_slice::<Event>(&line)
                        .map_err(|e| format!("a line that is not a report ({e})"));
                    if tx.send(e).is_err() {
                        return;
                    }
                }
            }
        }
    });
    let job = crate::jobs::current_blocking();
    let (mut done, mut failure, mut broken, mut canceled) = (None, None, None, false);
    loop {
        use std::sync::mpsc::RecvTimeoutError;
        match rx.recv_timeout(std::time::Duration::from_millis(50)) {
            Ok(Ok(event)) if done.is_none() && failure.is_none() => match event {
                Event::Stage { name, text } => report.stage(&name, text),
                Event::Progress(p) => report.progress(p.clamp(0.0, 1.0)),
                Event::Log { priority, text } => report.log(priority.clamp(3, 7), text),
                Event::Done(v) => done = Some(v),
                Event::Failed { kind, message } => failure = Some(rebuild(&kind, message)),
            },
            Ok(Ok(_)) => {
                broken = Some("went on after its last report".to_owned());
                kill();
            }
            Ok(Err(why)) => {
                broken = Some(format!("wrote {why}"));
                kill();
            }
            Err(RecvTimeoutError::Timeout) => {
                if !canceled && job.as_ref().is_some_and(|j| j.is_canceled()) {
                    tracing::info!("Job canceled: killing {what}");
                    kill();
                    canceled = true;
                }
            }
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    let status = child
        .wait()
        .map_err(|e| Error::failed(format!("Cannot wait for {what}"), e))?;
    let errors = errors.join().unwrap_or_default();
    if canceled {
        return Err(Error::Canceled);
    }
    if let Some(e) = failure {
        return Err(e);
    }
    let how = if let Some(b) = broken {
        b
    } else if let Some(sig) = status.signal() {
        format!("was killed by signal {sig}")
    } else if !status.success() {
        format!("exited with status {}", status.code().unwrap_or(-1))
    } else {
        match done {
            Some(v) => return Ok(v),
            None => "ended without a result".to_owned(),
        }
    };
    let why = if errors.is_empty() {
        "it wrote nothing to stderr".to_owned()
    } else {
        errors
    };
    Err(Error::failed(
        format!("The {} worker {how}; nothing it made was kept", spec.kind),
        std::io::Error::other(why),
    ))
}

/// `program` with `args`, run as a worker of its own (uid, no capabilities, the filter; no
/// namespace: it reads stdin and writes stdout only): for filters such as the decompressor of
/// a caller's kernel image. The caller sets its stdio and waits for it; it dies with the
/// thread that starts it.
pub fn filter_command(program: &std::path::Path, args: &[&str]) -> Result<std::process::Command> {
    if in_process() {
        let mut cmd = std::process::Command::new(program);
        cmd.args(args);
        return Ok(cmd);
    }
    let bangerd = crate::vmm::process::bangerd_program()?;
    let parent = std::process::id();
    let mut cmd = std::process::Command::new(bangerd);
    cmd.arg(WORKER_ARG)
        .arg("exec")
        .arg(next_uid().to_string())
        .arg(parent.to_string())
        .arg("0")
        .arg("--")
        .arg(program)
        .args(args)
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        );
    crate::host::dies_with_this_thread(&mut cmd);
    Ok(cmd)
}

/// `bangerd worker KIND UID PARENT_PID FDS [-- PROGRAM ARGS…]`: becomes `UID` (see the module), keeping its
/// fds 3 to 3 + FDS - 1, and does `KIND`'s work on the request on stdin.
pub fn main(args: &[std::ffi::OsString], works: &[(&str, Work)]) -> std::process::ExitCode {
    let usage = || {
        eprintln!(
            "usage: bangerd worker KIND UID PARENT_PID FDS [-- PROGRAM ARGS…] (started by bangerd only)"
        );
        std::process::ExitCode::from(2)
    };
    let (head, program) = match args.iter().position(|a| a == "--") {
        Some(i) => (&args[..i], &args[i + 1..]),
        None => (args, &[][..]),
    };
    let [kind, uid, parent, fds] = head else {
        return usage();
    };
    let (Some(kind), Some(uid), Some(parent), Some(fds)) = (
        kind.to_str(),
        uid.to_str().and_then(|u| u.parse::<u32>().ok()),
        parent.to_str().and_then(|p| p.parse::<i32>().ok()),
        fds.to_str()
            .and_then(|n| n.parse::<u32>().ok())
            .filter(|n| *n <= 8),
    ) else {
        return usage();
    };
    if !is_worker_uid(uid) {
        return usage();
    }
    if let Err(e) = confine(uid, parent, fds) {
        eprintln!("bangerd worker: cannot confine itself: {e}");
        return std::process::ExitCode::FAILURE;
    }
    if kind == "exec" {
        // A filter (a decompressor on a caller's kernel): becomes the program, confined.
        use std::os::unix::process::CommandExt;
        let Some((p, rest)) = program.split_first() else {
            return usage();
        };
        let e = std::process::Command::new(p).args(rest).exec();
        eprintln!("bangerd worker: cannot run {}: {e}", p.to_string_lossy());
        return std::process::ExitCode::FAILURE;
    }
    let mut request = Vec::new();
    if let Err(e) = std::io::stdin().take(MAX_REQUEST).read_to_end(&mut request) {
        eprintln!("bangerd worker: cannot read its request: {e}");
        return std::process::ExitCode::FAILURE;
    }
    let out = Lines(std::sync::Mutex::new(std::io::stdout()));
    let result = match works.iter().find(|(k, _)| *k == kind) {
        Some((_, work)) => work(&request, &out),
        None => Err(Error::InvalidArgument(format!("no worker does {kind:?}"))),
    };
    match result {
        Ok(v) => {
            out.send(&Event::Done(v));
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            out.send(&Event::Failed {
                kind: format!("{:?}", e.kind()),
                message: e.full_message(),
            });
            std::process::ExitCode::FAILURE
        }
    }
}

/// Becomes `uid` (with [`gid`] its only other group) and gives up what it could still do as
/// root's child: runs before any thread exists and before any input is read.
fn confine(uid: u32, parent: i32, fds: u32) -> std::io::Result<()> {
    let last = std::io::Error::last_os_error;
    let groups = [gid()];
    // SAFETY: plain system calls; `groups` outlives setgroups.
    unsafe {
        if libc::setgroups(groups.len(), groups.as_ptr()) != 0
            || libc::setresgid(uid, uid, uid) != 0
            || libc::setresuid(uid, uid, uid) != 0
        {
            return Err(last());
        }
        if libc::getuid() != uid || libc::geteuid() != uid || libc::getegid() != uid {
            return Err(std::io::Error::other("the uid did not change"));
        }
        // The uid change cleared the death signal the daemon set.
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
            return Err(last());
        }
        if libc::getppid() != parent {
            return Err(std::io::Error::other("the daemon is gone"));
        }
        if libc::prctl(libc::PR_SET_DUMPABLE, 0) != 0 {
            return Err(last());
        }
        let none = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::setrlimit(libc::RLIMIT_CORE, &none) != 0 {
            return Err(last());
        }
        // Only stdin, stdout, stderr and what it was given: nothing else the daemon held
        // open comes along.
        if libc::syscall(libc::SYS_close_range, 3 + fds, u32::MAX, 0u32) != 0 {
            return Err(last());
        }
    }
    if !cfg!(target_arch = "x86_64") {
        return Err(std::io::Error::other("only x86-64 system calls are known"));
    }
    crate::vmm::nosetid::install(&crate::vmm::nosetid::worker_program())
}
