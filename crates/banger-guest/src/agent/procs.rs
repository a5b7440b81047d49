//! The agent's process table: commands started with `exec` and `detach` run on when the
//! connection that started them ends, and any number of connections attach to them (their
//! output from then on, their exit), write to their input and signal them, by pid or tag,
//! until they exit. Output that no connection is attached to is read and dropped, so a
//! command never blocks on a full pipe because nobody listens.

use std::io::{BufReader, Write};
use std::os::fd::AsRawFd;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};

use super::server::{self, NotStarted, Spawned};
use super::{frame, ProcInfo, Reply};

/// The most processes the table holds.
pub const MAX_PROCS: usize = 1024;
/// The longest tag.
pub const MAX_TAG: usize = 256;
/// Output chunks queued for one attached connection before the command waits for it.
const QUEUE: usize = 64;

type Frame = (u8, Vec<u8>);

struct State {
    subscribers: Vec<(u64, SyncSender<Frame>)>,
    next: u64,
    exit: Option<i32>,
}

/// A process of the table.
pub struct Proc {
    info: ProcInfo,
    stdin: Mutex<Option<Box<dyn Write + Send>>>,
    pty: Option<std::fs::File>,
    state: Mutex<State>,
}

static TABLE: Mutex<Vec<Arc<Proc>>> = Mutex::new(Vec::new());

fn table() -> std::sync::MutexGuard<'static, Vec<Arc<Proc>>> {
    TABLE.lock().unwrap_or_else(|p| p.into_inner())
}

/// The table's processes.
pub fn list() -> Vec<ProcInfo> {
    table().iter().map(|p| p.info.clone()).collect()
}

/// The process with this pid or tag.
pub fn find(pid: Option<u32>, tag: Option<&str>) -> Result<Arc<Proc>, String> {
    let t = table();
    let found = match (pid, tag) {
        (Some(pid), _) => t.iter().find(|p| p.info.pid == pid),
        (None, Some(tag)) => t.iter().find(|p| p.info.tag.as_deref() == Some(tag)),
        (None, None) => return Err("name a process by pid or tag".into()),
    };
    found.cloned().ok_or_else(|| match (pid, tag) {
        (Some(pid), _) => format!("no process {pid} (it exited, or was not started detached)"),
        (_, tag) => format!("no process tagged {:?}", tag.unwrap_or_default()),
    })
}

impl Proc {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends `data` to every attached connection; one that has gone is dropped.
    fn broadcast(&self, kind: u8, data: &[u8]) {
        let subs: Vec<(u64, SyncSender<Frame>)> = self.lock().subscribers.clone();
        let mut gone = Vec::new();
        for (id, tx) in subs {
            if tx.send((kind, data.to_vec())).is_err() {
                gone.push(id);
            }
        }
        if !gone.is_empty() {
            self.lock().subscribers.retain(|(id, _)| !gone.contains(id));
        }
    }

    /// A new attachment: its id and output, or the exit status when the process has ended.
    fn subscribe(&self) -> Result<(u64, Receiver<Frame>), i32> {
        let mut st = self.lock();
        if let Some(code) = st.exit {
            return Err(code);
        }
        let (tx, rx) = sync_channel(QUEUE);
        st.next += 1;
        let id = st.next;
        st.subscribers.push((id, tx));
        Ok((id, rx))
    }

    fn unsubscribe(&self, id: u64) {
        self.lock().subscribers.retain(|(i, _)| *i != id);
    }

    /// The process ended with `code`: the table forgets the process, then every attached
    /// connection gets the exit (so a client told of the exit never finds it listed after).
    fn finish(self: &Arc<Self>, code: i32) {
        let subs = {
            let mut st = self.lock();
            st.exit = Some(code);
            std::mem::take(&mut st.subscribers)
        };
        table().retain(|p| !Arc::ptr_eq(p, self));
        for (_, tx) in subs {
            let _ = tx.send((frame::EXIT, code.to_be_bytes().to_vec()));
        }
    }

    fn write_input(&self, data: &[u8]) -> bool {
        let mut stdin = self.stdin.lock().unwrap_or_else(|p| p.into_inner());
        server::write_input(&mut stdin, data)
    }

    fn resize(&self, rows: u16, cols: u16) {
        if let Some(t) = &self.pty {
            server::set_size(t, rows, cols);
        }
    }

    /// Signals the process's group: one of the forwarded signals, SIGKILL or SIGTERM.
    pub fn signal(&self, sig: i32) -> Result<(), String> {
        if !(super::FORWARDED_SIGNALS.contains(&sig) || sig == libc::SIGKILL) {
            return Err(format!("signal {sig} is not one a client may send"));
        }
        if self.lock().exit.is_some() {
            return Err(format!("process {} has exited", self.info.pid));
        }
        // SAFETY: kill takes no pointers; the group is the process's own (its pid) while it
        // runs, and it is not reaped before `finish`.
        unsafe { libc::kill(-(self.info.pid as i32), sig) };
        Ok(())
    }
}

/// `exec` with `detach`: starts the command into the table and attaches this connection.
pub(super) fn start(
    reader: BufReader<std::fs::File>,
    mut writer: std::fs::File,
    argv: Vec<String>,
    how: server::How,
    tag: Option<String>,
) -> std::io::Result<()> {
    let refuse = |w: &mut std::fs::File, why: String| server::write_line(w, &Reply::error(why));
    if let Some(t) = &tag {
        if t.is_empty() || t.len() > MAX_TAG || t.chars().any(char::is_control) {
            return refuse(
                &mut writer,
                format!("a tag is 1 to {MAX_TAG} characters without control characters"),
            );
        }
        if table().iter().any(|p| p.info.tag.as_ref() == Some(t)) {
            return refuse(&mut writer, format!("a process tagged {t:?} runs already"));
        }
    }
    if table().len() >= MAX_PROCS {
        return refuse(
            &mut writer,
            format!("{MAX_PROCS} processes run already; wait for one or signal it"),
        );
    }
    let shown_argv = argv.clone();
    let Spawned { mut child, pty } = match server::spawn(argv, &how) {
        Ok(s) => s,
        Err(NotStarted::Refused(why)) | Err(NotStarted::Exit(_, why)) => {
            return refuse(&mut writer, why)
        }
    };
    let pid = child.id();
    let stdin: Option<Box<dyn Write + Send>> = match &pty {
        Some(m) => Some(Box::new(m.try_clone()?)),
        None => child.stdin.take().map(|s| Box::new(s) as _),
    };
    let proc = Arc::new(Proc {
        info: ProcInfo {
            pid,
            tag,
            argv: shown_argv,
            env: how.env,
            cwd: how.cwd.unwrap_or_default(),
            tty: pty.is_some(),
        },
        stdin: Mutex::new(stdin),
        pty: pty.as_ref().map(|m| m.try_clone()).transpose()?,
        state: Mutex::new(State {
            subscribers: Vec::new(),
            next: 0,
            exit: None,
        }),
    });
    table().push(proc.clone());
    // This connection is attached before any output can come.
    let first = proc.subscribe().ok();
    let pump = |from: Box<dyn std::io::Read + Send>, kind: u8, p: Arc<Proc>| {
        std::thread::spawn(move || {
            let mut from = from;
            let mut buf = vec![0u8; frame::MAX];
            loop {
                match from.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => p.broadcast(kind, &buf[..n]),
                }
            }
        })
    };
    use std::io::Read as _;
    let mut pumps = Vec::new();
    let mut pty_done = None;
    match pty {
        Some(master) => {
            let (tx, rx) = std::sync::mpsc::channel::<()>();
            let p = proc.clone();
            std::thread::spawn(move || {
                let mut m = master;
                let mut buf = vec![0u8; frame::MAX];
                while let Ok(n) = m.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    p.broadcast(frame::STDOUT, &buf[..n]);
                }
                let _ = tx.send(());
            });
            pty_done = Some(rx);
        }
        None => {
            if let Some(o) = child.stdout.take() {
                pumps.push(pump(Box::new(o), frame::STDOUT, proc.clone()));
            }
            if let Some(e) = child.stderr.take() {
                pumps.push(pump(Box::new(e), frame::STDERR, proc.clone()));
            }
        }
    }
    let p = proc.clone();
    std::thread::spawn(move || {
        let code = child.wait().map(server::exit_code).unwrap_or(-1);
        for t in pumps {
            let _ = t.join();
        }
        if let Some(done) = pty_done {
            let _ = done.recv_timeout(std::time::Duration::from_millis(500));
        }
        p.finish(code);
    });
    follow(reader, writer, proc, first)
}

/// `attach`: this connection follows a process of the table.
pub fn attach(
    reader: BufReader<std::fs::File>,
    writer: std::fs::File,
    proc: Arc<Proc>,
) -> std::io::Result<()> {
    let first = match proc.subscribe() {
        Ok(s) => Some(s),
        Err(code) => {
            // It exited meanwhile: its status is all there is to follow.
            let w = Mutex::new(writer);
            let mut r = Reply::ok();
            r.pid = Some(proc.info.pid);
            server::write_line(&mut *w.lock().unwrap_or_else(|p| p.into_inner()), &r)?;
            return server::send(&w, frame::EXIT, &code.to_be_bytes());
        }
    };
    follow(reader, writer, proc, first)
}

/// `input`: the connection's frames go to the process until the client ends its side; the
/// connection then closes, which tells the client every frame was carried out.
pub fn input(
    reader: BufReader<std::fs::File>,
    mut writer: std::fs::File,
    proc: Arc<Proc>,
) -> std::io::Result<()> {
    let mut r = Reply::ok();
    r.pid = Some(proc.info.pid);
    server::write_line(&mut writer, &r)?;
    feed(reader, &proc);
    Ok(())
}

/// Carries a connection's frames to `proc` until the client ends its side.
fn feed(reader: BufReader<std::fs::File>, proc: &Proc) {
    server::pump_input(
        reader,
        |data| proc.write_input(data),
        |rows, cols| proc.resize(rows, cols),
        |sig| {
            let _ = proc.signal(sig);
        },
    );
}

/// Replies with the pid, then carries the process's output to the connection and the
/// connection's input to the process until the process exits or the client hangs up (which
/// only detaches it).
fn follow(
    reader: BufReader<std::fs::File>,
    mut writer: std::fs::File,
    proc: Arc<Proc>,
    sub: Option<(u64, Receiver<Frame>)>,
) -> std::io::Result<()> {
    let mut r = Reply::ok();
    r.pid = Some(proc.info.pid);
    server::write_line(&mut writer, &r)?;
    let Some((id, rx)) = sub else {
        return Ok(());
    };
    let p = proc.clone();
    std::thread::spawn(move || {
        feed(reader, &p);
        // The client hung up: it no longer follows the process, which runs on.
        p.unsubscribe(id);
    });
    for (kind, data) in rx {
        let sent = writer
            .write_all(&super::header(kind, data.len()))
            .and_then(|_| writer.write_all(&data));
        if sent.is_err() {
            proc.unsubscribe(id);
            return Ok(());
        }
        if kind == frame::EXIT {
            // SAFETY: shutdown takes no pointers; the fd is open.
            unsafe { libc::shutdown(writer.as_raw_fd(), libc::SHUT_WR) };
            return Ok(());
        }
    }
    Ok(())
}
