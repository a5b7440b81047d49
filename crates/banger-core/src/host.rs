//! Host programs: finding them (root's sbin directories included) and running them with
//! their error output kept for the message.

use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::Command;

use crate::{Error, Result};

/// Finds a program on PATH, in the sbin directories a non-root PATH often lacks, or in
/// `/usr/lib/banger` (the package's helpers, such as `virtiofsd`).
pub fn find_program(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(
            [
                "/usr/sbin",
                "/sbin",
                "/usr/local/sbin",
                "/root/.cargo/bin",
                "/usr/lib/banger",
            ]
            .map(PathBuf::from),
        )
        .map(|d| d.join(name))
        .find(|p| {
            p.metadata()
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

/// Runs `program` to completion (blocking); a failure carries its stderr.
pub fn run<I, S>(program: &str, args: I) -> Result<()>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run_with_stdin(program, args, None)
}

/// [`run`], with `stdin` as the program's standard input (none: empty).
pub fn run_with_stdin<I, S>(program: &str, args: I, stdin: Option<std::fs::File>) -> Result<()>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let path = find_program(program).ok_or_else(|| {
        Error::failed(
            format!("{program} is not installed"),
            std::io::Error::from(std::io::ErrorKind::NotFound),
        )
    })?;
    let mut cmd = Command::new(&path);
    cmd.args(args)
        .stdin(stdin.map_or_else(std::process::Stdio::null, Into::into))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let out = output(&mut cmd, program)?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        return Err(Error::failed(
            format!("{program} failed ({})", out.status),
            std::io::Error::other(stderr),
        ));
    }
    Ok(())
}

/// [`output`] with no standard input and both outputs captured, as `Command::output` does.
pub fn capture(cmd: &mut Command, what: &str) -> Result<std::process::Output> {
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    output(cmd, what)
}

/// Runs `cmd` to completion (blocking) and returns what it wrote where it was piped. The
/// program runs in a process group of its own and is killed if the daemon dies
/// (`PR_SET_PDEATHSIG`); run from a job's blocking work (`cancel::spawn_blocking`), a cancel of
/// the job kills the whole group (the program and whatever it started) and the result is
/// [`Error::Canceled`] once they are gone.
pub fn output(cmd: &mut Command, what: &str) -> Result<std::process::Output> {
    use std::os::unix::process::CommandExt;
    cmd.process_group(0);
    dies_with_this_thread(cmd);
    let fail = |e| Error::failed(format!("Cannot run {what}"), e);
    let child = cmd.spawn().map_err(fail)?;
    // Recorded until it ends, so a daemon killed meanwhile has its successor stop the group
    // (PR_SET_PDEATHSIG reaches only this program, not what it started).
    let _record = ProgramRecord::new(child.id());
    let Some(job) = crate::cancel::current_blocking() else {
        return child.wait_with_output().map_err(fail);
    };
    let group = child.id() as i32;
    let (tx, rx) = std::sync::mpsc::channel();
    // This thread keeps waiting (PR_SET_PDEATHSIG follows the thread that forked).
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let mut killed = false;
    loop {
        use std::sync::mpsc::RecvTimeoutError;
        match rx.recv_timeout(std::time::Duration::from_millis(50)) {
            Ok(out) if killed => {
                drop(out);
                return Err(Error::Canceled);
            }
            Ok(out) => return out.map_err(fail),
            Err(RecvTimeoutError::Timeout) => {
                if !killed && job.is_canceled() {
                    tracing::info!(program = what, "Job canceled: killing its process group");
                    // SAFETY: killpg only sends a signal; the group is this program's own.
                    unsafe { libc::killpg(group, libc::SIGKILL) };
                    killed = true;
                }
            }
            Err(RecvTimeoutError::Disconnected) => {
                return Err(fail(std::io::Error::other("its waiter is gone")))
            }
        }
    }
}

/// Makes the program `cmd` starts die (SIGKILL) when the thread that starts it ends, as
/// every program the daemon starts must when the daemon dies; a daemon that died before the
/// child could ask for that makes the start fail.
pub fn dies_with_this_thread(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id();
    // SAFETY: the closure runs in the forked child before exec and calls only
    // async-signal-safe functions (prctl, getppid).
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The daemon died before the line above: nothing would kill this program.
            if libc::getppid() as u32 != parent {
                return Err(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
            }
            Ok(())
        });
    }
}

/// Where the programs [`output`] runs are recorded while they run (`<dir>/<pgid>`, holding
/// the leader's start time); set by the daemon, unset in tests and the CLI.
static PROGRAMS: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Records the programs [`output`] starts in `dir` from now on (the daemon's runtime
/// directory: a reboot forgets them with their processes).
pub fn record_programs_in(dir: PathBuf) -> Result<()> {
    std::fs::create_dir_all(&dir)
        .map_err(|e| Error::failed(format!("Cannot create {}", dir.display()), e))?;
    let _ = PROGRAMS.set(dir);
    Ok(())
}

/// A running program's record, removed when it ends.
pub(crate) struct ProgramRecord(Option<PathBuf>);

impl ProgramRecord {
    pub(crate) fn new(pid: u32) -> Self {
        let Some(dir) = PROGRAMS.get() else {
            return ProgramRecord(None);
        };
        let path = dir.join(pid.to_string());
        match start_time(pid) {
            Some(t) if std::fs::write(&path, t.to_string()).is_ok() => ProgramRecord(Some(path)),
            _ => ProgramRecord(None),
        }
    }
}

impl Drop for ProgramRecord {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// A process's start time in clock ticks since boot (`/proc/<pid>/stat`, field 22), and its
/// process group (field 5).
fn stat_of(pid: u32) -> Option<(u64, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold anything: count from its end.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): pgrp is field 5, starttime field 22.
    Some((f.get(19)?.parse().ok()?, f.get(2)?.parse().ok()?))
}

fn start_time(pid: u32) -> Option<u64> {
    stat_of(pid).map(|(t, _)| t)
}

/// Stops what programs a dead daemon started are still running (their whole process groups:
/// every process of a recorded group that started no earlier than its leader), and forgets
/// the records. Run at start, before anything is swept. Returns the groups stopped.
pub fn stop_orphaned_programs(dir: &std::path::Path) -> Vec<i32> {
    let mut stopped = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return stopped;
    };
    for e in entries.flatten() {
        let (Ok(pgid), Ok(since)) = (
            e.file_name().to_string_lossy().parse::<i32>(),
            std::fs::read_to_string(e.path()).map(|t| t.trim().parse::<u64>().unwrap_or(u64::MAX)),
        ) else {
            let _ = std::fs::remove_file(e.path());
            continue;
        };
        let members: Vec<u32> = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|p| p.file_name().to_string_lossy().parse::<u32>().ok())
            .filter(|pid| matches!(stat_of(*pid), Some((t, g)) if g == pgid && t >= since))
            .collect();
        for pid in &members {
            // SAFETY: kill takes no pointers; the pid is a member of the recorded group.
            unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
        }
        if !members.is_empty() {
            stopped.push(pgid);
        }
        let _ = std::fs::remove_file(e.path());
    }
    stopped
}

/// A user's name and primary group, from the password database.
pub fn user_of(uid: u32) -> Option<(String, u32)> {
    let mut buf = vec![0u8; 16384];
    // SAFETY: passwd is plain data; zeroed is valid before getpwuid_r fills it.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut out: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer refers to live memory of the stated size; getpwuid_r writes the
    // entry's strings into `buf` and points `out` at `pw` on success.
    let r = unsafe { libc::getpwuid_r(uid, &mut pw, buf.as_mut_ptr().cast(), buf.len(), &mut out) };
    if r != 0 || out.is_null() {
        return None;
    }
    // SAFETY: on success pw_name points at a NUL-terminated string inside `buf`.
    let name = unsafe { std::ffi::CStr::from_ptr(pw.pw_name) }
        .to_string_lossy()
        .into_owned();
    Some((name, pw.pw_gid))
}

/// A command run with `uid`'s credentials (uid, primary group, supplementary groups), or
/// as is for root.
fn as_user(uid: u32, program: &str) -> Result<Command> {
    if uid == 0 {
        return Ok(Command::new(program));
    }
    let (_, gid) = user_of(uid).ok_or_else(|| {
        Error::InvalidArgument(format!("uid {uid} has no entry in the password database"))
    })?;
    let setpriv = find_program("setpriv").ok_or_else(|| {
        Error::failed(
            "setpriv is not installed",
            std::io::Error::from(std::io::ErrorKind::NotFound),
        )
    })?;
    let mut c = Command::new(setpriv);
    c.args([
        format!("--reuid={uid}"),
        format!("--regid={gid}"),
        "--init-groups".into(),
        "--".into(),
        program.into(),
    ]);
    Ok(c)
}

/// Starts `tar -c` of the directory open as `dirfd`, with `uid`'s own permissions (the
/// descriptor is the child's fd 3, archived through `/proc/self/fd/3`); read the archive from
/// its stdout. Fails (at wait) when the user cannot read everything in it.
pub fn tar_dirfd_as(uid: u32, dirfd: std::os::fd::RawFd) -> Result<std::process::Child> {
    use std::os::unix::process::CommandExt;
    let mut c = as_user(uid, "tar")?;
    c.args(["-C", "/proc/self/fd/3", "--numeric-owner", "-cf", "-", "."])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    // SAFETY: between fork and exec only dup2 and fcntl run (fds_at), both
    // async-signal-safe; dirfd stays open in the parent across the spawn.
    unsafe {
        c.pre_exec(move || fds_at(&[(dirfd, 3)]));
    }
    c.spawn().map_err(|e| Error::failed("Cannot run tar", e))
}

/// Makes each `(fd, at)` this process's descriptor `at`, open across exec: first all moved
/// above the targets (so one's target never closes another's source), then put in place.
/// Async-signal-safe (fcntl and dup2 only): for a child between fork and exec.
pub fn fds_at(fds: &[(std::os::fd::RawFd, std::os::fd::RawFd)]) -> std::io::Result<()> {
    // A fixed array: nothing may be allocated between fork and exec.
    let mut high = [0; 8];
    if fds.len() > high.len() {
        return Err(std::io::Error::from_raw_os_error(libc::EMFILE));
    }
    for (i, (fd, _)) in fds.iter().enumerate() {
        // SAFETY: fcntl on a descriptor of this process.
        high[i] = unsafe { libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 100) };
        if high[i] < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    for (i, (_, at)) in fds.iter().enumerate() {
        // SAFETY: dup2 between descriptors of this process; the copy at `at` is not
        // close-on-exec.
        if unsafe { libc::dup2(high[i], *at) } != *at {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The uid of the process at the other end of Unix socket `sock` (`SO_PEERCRED`).
pub fn peer_uid(sock: std::os::fd::BorrowedFd<'_>) -> std::io::Result<u32> {
    use std::os::fd::AsRawFd;
    // SAFETY: a zeroed ucred is a valid out-buffer of the size passed.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cred.uid)
}

/// Receives one descriptor sent beside a message's first byte (`SCM_RIGHTS`) on Unix socket
/// `sock`: what [`send_with_fd`] sends.
pub fn recv_fd(sock: std::os::fd::BorrowedFd<'_>) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd, FromRawFd};
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let mut control = fd_control();
    let mut hdr = fd_msghdr(&mut iov, &mut control);
    // SAFETY: hdr points at live buffers of the sizes it states.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut hdr, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the control buffer was filled by recvmsg; the header is checked before its
    // data is read.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&hdr);
        if c.is_null() || (*c).cmsg_level != libc::SOL_SOCKET || (*c).cmsg_type != libc::SCM_RIGHTS
        {
            return Err(std::io::Error::other("no descriptor came"));
        }
        let fd = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
        Ok(std::os::fd::OwnedFd::from_raw_fd(fd))
    }
}

/// The size in bytes of the filesystem holding `path` (statvfs).
pub fn filesystem_size(path: &std::path::Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: a zeroed statvfs is a valid out-buffer; the path is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for the call.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(st.f_blocks.saturating_mul(st.f_frsize))
}

/// The host TSC frequency in kHz (`cpu MHz` of /proc/cpuinfo × 1000): TCG guests need it as
/// `tsc_early_khz=` or about half their boots hang calibrating.
pub fn tsc_khz() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = info
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    Some((mhz * 1000.0).round() as u64)
}

/// `openat(2)` of `name` below `dirfd` (`libc::AT_FDCWD` for the working directory), always
/// close-on-exec.
pub fn openat(
    dirfd: std::os::fd::RawFd,
    name: &std::path::Path,
    flags: i32,
) -> std::io::Result<std::os::fd::OwnedFd> {
    openat_mode(dirfd, name, flags, 0)
}

/// [`openat`] with the `mode` a created file gets.
pub fn openat_mode(
    dirfd: std::os::fd::RawFd,
    name: &std::path::Path,
    flags: i32,
    mode: u32,
) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(name.as_os_str().as_bytes())
        .map_err(|_| std::io::ErrorKind::InvalidInput)?;
    // SAFETY: `c` is NUL-terminated and outlives the call.
    let fd = unsafe { libc::openat(dirfd, c.as_ptr(), flags | libc::O_CLOEXEC, mode) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd to us; nobody else owns it.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

pub use banger_guest::sys::openat2;

/// `fstat(2)` of an open descriptor.
pub fn fstat(fd: &std::os::fd::OwnedFd) -> std::io::Result<libc::stat> {
    use std::os::fd::AsRawFd;
    // SAFETY: stat is plain data; fstat fills it for a valid descriptor.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fd is open; st is a valid out pointer.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st)
}

/// Listens on a Unix socket at `path` for group `gid`'s processes (root:`gid`, 0660): a
/// stale socket of that name goes first. `path`'s directory must be one only root writes,
/// so the name cannot be swapped between the steps.
pub fn listen_unix(path: &std::path::Path, gid: u32) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) => {
            std::fs::remove_file(path)?
        }
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ))
        }
        Err(_) => {}
    }
    let l = std::os::unix::net::UnixListener::bind(path)?;
    std::os::unix::fs::chown(path, Some(0), Some(gid))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    Ok(l.into())
}

/// A control buffer with room for one descriptor (`CMSG_SPACE(int)` bytes).
fn fd_control() -> Vec<u8> {
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) } as usize;
    vec![0u8; space]
}

/// A message header over one buffer, `iov`, and `control` (see [`fd_control`]).
fn fd_msghdr(iov: &mut libc::iovec, control: &mut [u8]) -> libc::msghdr {
    // SAFETY: msghdr is plain data; zeroed is valid before the fields are set.
    let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
    hdr.msg_iov = iov;
    hdr.msg_iovlen = 1;
    hdr.msg_control = control.as_mut_ptr().cast();
    hdr.msg_controllen = control.len() as _;
    hdr
}

/// Writes `data` on the Unix stream socket `sock` with `fd` beside it (`SCM_RIGHTS`, with the
/// first byte), then the rest of `data` if one write did not take it all.
pub fn send_with_fd(
    sock: std::os::fd::BorrowedFd<'_>,
    data: &[u8],
    fd: std::os::fd::BorrowedFd<'_>,
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let mut control = fd_control();
    let hdr = fd_msghdr(&mut iov, &mut control);
    // SAFETY: hdr's control buffer is CMSG_SPACE(int) bytes, room for one header and one
    // descriptor; the pointers written stay inside it; iov points into `data`, which outlives
    // the call.
    let sent = unsafe {
        let c = libc::CMSG_FIRSTHDR(&hdr);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::c_int>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>(), fd.as_raw_fd());
        libc::sendmsg(sock.as_raw_fd(), &hdr, libc::MSG_NOSIGNAL)
    };
    if sent < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut rest = &data[sent as usize..];
    while !rest.is_empty() {
        // SAFETY: writes from `rest`, a live slice, on a descriptor the caller keeps open.
        let n = unsafe {
            libc::send(
                sock.as_raw_fd(),
                rest.as_ptr().cast(),
                rest.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        rest = &rest[n as usize..];
    }
    Ok(())
}

/// Whether an ELF executable is static (has no PT_INTERP program header).
pub fn is_static_elf(b: &[u8]) -> bool {
    let rd16 = |o: usize| {
        b.get(o..o + 2)
            .map(|s| u16::from_le_bytes([s[0], s[1]]) as usize)
    };
    let rd64 = |o: usize| {
        b.get(o..o + 8)
            .map(|s| u64::from_le_bytes(s.try_into().unwrap_or([0; 8])) as usize)
    };
    if !b.starts_with(b"\x7fELF") || b.get(4) != Some(&2) {
        return false;
    }
    let (Some(phoff), Some(phent), Some(phnum)) = (rd64(0x20), rd16(0x36), rd16(0x38)) else {
        return false;
    };
    (0..phnum)
        .all(|i| b.get(phoff + i * phent..phoff + i * phent + 4) != Some(&3u32.to_le_bytes()[..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_daemons_programs_are_stopped_group_and_all() {
        use std::os::unix::process::CommandExt;
        let dir = tempfile::tempdir().unwrap();
        let marker = format!("banger-orphan-test-{}", std::process::id());
        // A program that started programs of its own, as debootstrap starts dpkg.
        let mut leader = std::process::Command::new("sh")
            .args(["-c", &format!("sleep 300 & sleep 300 & wait # {marker}")])
            .process_group(0)
            .spawn()
            .unwrap();
        let pid = leader.id();
        while std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|p| p.file_name().to_string_lossy().parse::<u32>().ok())
            .filter(|p| matches!(stat_of(*p), Some((_, g)) if g == pid as i32))
            .count()
            < 3
        {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        std::fs::write(
            dir.path().join(pid.to_string()),
            start_time(pid).unwrap().to_string(),
        )
        .unwrap();
        // A record of a program long gone stops nothing.
        std::fs::write(dir.path().join("999999999"), "1").unwrap();
        assert_eq!(stop_orphaned_programs(dir.path()), vec![pid as i32]);
        assert!(!leader.wait().unwrap().success());
        // SIGKILL lands at once; their exits are reaped a moment later.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let left = std::process::Command::new("pgrep")
                .args(["-g", &pid.to_string()])
                .output()
                .unwrap();
            if left.stdout.is_empty() {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "left: {}",
                String::from_utf8_lossy(&left.stdout)
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "records stayed"
        );
    }
}
