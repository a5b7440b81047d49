//! `fs watch`: changes under a directory through inotify, one JSON line ([`FsEvent`]) each,
//! until standard input ends. With `recursive`, directories made later are watched too.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::fsop::{status, FsEvent};

/// The most directories one watch follows.
const MAX_WATCHES: usize = 8192;

const MASK: u32 = libc::IN_CREATE
    | libc::IN_MODIFY
    | libc::IN_CLOSE_WRITE
    | libc::IN_DELETE
    | libc::IN_MOVED_FROM
    | libc::IN_MOVED_TO
    | libc::IN_ATTRIB
    | libc::IN_DONT_FOLLOW
    | libc::IN_ONLYDIR;

struct Watcher {
    fd: std::os::fd::OwnedFd,
    root: PathBuf,
    dirs: HashMap<i32, PathBuf>,
}

impl Watcher {
    fn add(&mut self, dir: &Path, recursive: bool) -> Result<(), (i32, String)> {
        if self.dirs.len() >= MAX_WATCHES {
            return Err((
                status::INVALID,
                format!("more than {MAX_WATCHES} directories to watch"),
            ));
        }
        let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
            .map_err(|e| (status::INVALID, e.to_string()))?;
        use std::os::fd::AsRawFd;
        // SAFETY: a valid descriptor and a NUL-terminated path.
        let wd = unsafe { libc::inotify_add_watch(self.fd.as_raw_fd(), c.as_ptr(), MASK) };
        if wd < 0 {
            let e = std::io::Error::last_os_error();
            return Err(super::fsop::fail_of(dir, e));
        }
        self.dirs.insert(wd, dir.to_owned());
        if recursive {
            if let Ok(rd) = std::fs::read_dir(dir) {
                for e in rd.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        // A subdirectory that went or may not be read is skipped.
                        if let Err((status::INVALID, m)) = self.add(&e.path(), true) {
                            return Err((status::INVALID, m));
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// Watches `dir` until standard input ends, writing events to `out`.
pub fn run(dir: &Path, recursive: bool, out: &mut dyn Write) -> Result<(), (i32, String)> {
    let m = std::fs::metadata(dir).map_err(|e| super::fsop::fail_of(dir, e))?;
    if !m.is_dir() {
        return Err((
            status::INVALID,
            format!("{}: not a directory", dir.display()),
        ));
    }
    // SAFETY: no pointers.
    let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
    if fd < 0 {
        return Err((status::FAILED, std::io::Error::last_os_error().to_string()));
    }
    // SAFETY: fd is a new descriptor of ours.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let mut w = Watcher {
        fd,
        root: dir.to_owned(),
        dirs: HashMap::new(),
    };
    w.add(dir, recursive)?;
    // The start: the client knows events from here on are reported.
    out.write_all(b"{}\n")
        .and_then(|_| out.flush())
        .map_err(|e| (status::FAILED, e.to_string()))?;
    let mut buf = vec![0u8; 64 * 1024];
    use std::os::fd::AsRawFd;
    loop {
        let mut fds = [
            libc::pollfd {
                fd: 0,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: w.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfd entries.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err((status::FAILED, std::io::Error::last_os_error().to_string()));
        }
        if fds[0].revents != 0 {
            // Input ended (or came, which a watch does not take): the client is done.
            let mut b = [0u8; 512];
            // SAFETY: reading into a buffer of ours.
            let r = unsafe { libc::read(0, b.as_mut_ptr().cast(), b.len()) };
            if r <= 0 {
                return Ok(());
            }
        }
        if fds[1].revents == 0 {
            continue;
        }
        // SAFETY: reading into a buffer of ours.
        let len = unsafe { libc::read(w.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if len <= 0 {
            continue;
        }
        let mut at = 0usize;
        let header = std::mem::size_of::<libc::inotify_event>();
        while at + header <= len as usize {
            // SAFETY: the kernel wrote whole events; read_unaligned copes with the buffer's
            // alignment.
            let ev: libc::inotify_event =
                unsafe { std::ptr::read_unaligned(buf[at..].as_ptr().cast()) };
            let name_bytes = &buf[at + header..at + header + ev.len as usize];
            at += header + ev.len as usize;
            let name = name_bytes.split(|&b| b == 0).next().unwrap_or_default();
            let Some(dir) = w.dirs.get(&ev.wd).cloned() else {
                continue;
            };
            if ev.mask & libc::IN_IGNORED != 0 {
                w.dirs.remove(&ev.wd);
                continue;
            }
            if name.is_empty() {
                continue;
            }
            let path = dir.join(std::ffi::OsStr::from_bytes(name));
            let kind = if ev.mask & libc::IN_CREATE != 0 || ev.mask & libc::IN_MOVED_TO != 0 {
                if ev.mask & libc::IN_MOVED_TO != 0 {
                    "rename"
                } else {
                    "create"
                }
            } else if ev.mask & (libc::IN_MODIFY | libc::IN_CLOSE_WRITE) != 0 {
                "write"
            } else if ev.mask & libc::IN_DELETE != 0 {
                "remove"
            } else if ev.mask & libc::IN_MOVED_FROM != 0 {
                "rename"
            } else if ev.mask & libc::IN_ATTRIB != 0 {
                "chmod"
            } else {
                continue;
            };
            if recursive
                && ev.mask & libc::IN_ISDIR != 0
                && ev.mask & (libc::IN_CREATE | libc::IN_MOVED_TO) != 0
            {
                if let Err((status::INVALID, m)) = w.add(&path, true) {
                    return Err((status::INVALID, m));
                }
            }
            let rel = path
                .strip_prefix(&w.root)
                .unwrap_or(&path)
                .to_string_lossy()
                .into_owned();
            let mut line = serde_json::to_vec(&FsEvent {
                name: rel,
                kind: kind.into(),
            })
            .map_err(|e| (status::FAILED, e.to_string()))?;
            line.push(b'\n');
            out.write_all(&line)
                .and_then(|_| out.flush())
                .map_err(|e| (status::FAILED, e.to_string()))?;
        }
    }
}
