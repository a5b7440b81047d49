//! The agent's channel over one byte stream: on QEMU, a virtio-serial port (named
//! [`PORT_NAME`]) that, unlike a vhost-user vsock device, is saved with the VM, so a VM can be
//! snapshotted and restored. Many connections share the stream, each with its own flow
//! control, so one slow reader never stalls another.
//!
//! The host side is a small helper (`banger-vm-helper agent-link`, one per VM, beside the VMM)
//! that serves the same hybrid socket as Firecracker's vsock (`CONNECT <port>\n` → `OK <n>\n`),
//! so every client of the agent is the same for both VMMs; the guest side is in `banger-agent`,
//! which bridges each connection to its ordinary handler through a socket pair.
//!
//! Frames: `magic[4] kind[1] conn[4 BE] len[4 BE] data[len]`. A receiver that meets a frame it
//! cannot parse drops every connection and scans for the next synchronisation frame, whose
//! data is [`SYNC`] and an 8-byte instance: the host sends `RESET(instance)` when the guest
//! side joins, and again each second until the guest answers `HELLO(instance)`; the agent
//! sends `HELLO(0)` when it starts. A restored VM therefore meets a new helper, is told to
//! drop the connections it had, and is ready the moment it says `HELLO` (which is also how
//! the host learns that a booting guest is ready: a `CONNECT` waits for it, no polling).

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// The virtio-serial port's name (`/sys/class/virtio-ports/*/name`).
pub const PORT_NAME: &str = "org.banger.agent";

const MAGIC: [u8; 4] = *b"BgL1";
const HEADER: usize = 13;
/// Most data in one frame.
pub const MAX_DATA: usize = 64 * 1024;
/// Bytes a sender may have in flight per connection before the receiver grants more.
pub const WINDOW: usize = 256 * 1024;
/// The data that starts every synchronisation frame.
pub const SYNC: [u8; 16] = *b"banger-link-sync";
/// How long a `CONNECT` waits for the guest to be there and to accept.
pub const CONNECT_WAIT: Duration = Duration::from_secs(10);

/// Frame kinds.
pub mod kind {
    /// Guest → host: the agent is here; `SYNC` + the instance of the `RESET` it answers (0
    /// when it just started).
    pub const HELLO: u8 = 1;
    /// Host → guest: drop every connection and say `HELLO`; `SYNC` + the helper's instance.
    pub const RESET: u8 = 2;
    /// Host → guest: a new connection to the guest port in the data (`u32` BE).
    pub const OPEN: u8 = 3;
    /// Guest → host: the connection is open.
    pub const ACCEPT: u8 = 4;
    /// Bytes of a connection.
    pub const DATA: u8 = 5;
    /// The receiver consumed this many (`u32` BE) more bytes: the sender may send them.
    pub const CREDIT: u8 = 6;
    /// The sender will send no more (its half of the connection is closed).
    pub const EOF: u8 = 7;
    /// The connection is gone, or refused.
    pub const CLOSE: u8 = 8;
}

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// See [`kind`].
    pub kind: u8,
    /// The connection (0 for synchronisation frames).
    pub conn: u32,
    /// Its data.
    pub data: Vec<u8>,
}

/// A frame as bytes.
pub fn encode(kind: u8, conn: u32, data: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(HEADER + data.len());
    f.extend(MAGIC);
    f.push(kind);
    f.extend(conn.to_be_bytes());
    f.extend((data.len() as u32).to_be_bytes());
    f.extend(data);
    f
}

fn sync_frame(kind: u8, instance: u64) -> Vec<u8> {
    let mut d = SYNC.to_vec();
    d.extend(instance.to_be_bytes());
    encode(kind, 0, &d)
}

fn sync_instance(f: &Frame) -> Option<u64> {
    (f.data.len() == 24 && f.data[..16] == SYNC)
        .then(|| u64::from_be_bytes(f.data[16..].try_into().unwrap_or_default()))
}

/// What reading the link gave.
#[derive(Debug)]
pub enum Got {
    /// A frame.
    Frame(Frame),
    /// Bytes that are not a frame: the reader lost its place.
    Garbage,
    /// The other side is gone (end of stream).
    End,
}

/// Reads frames from the link, and finds its place again after garbage.
pub struct FrameReader<R> {
    r: std::io::BufReader<R>,
}

impl<R: Read> FrameReader<R> {
    /// Frames from `r`.
    pub fn new(r: R) -> Self {
        FrameReader {
            r: std::io::BufReader::with_capacity(MAX_DATA + HEADER, r),
        }
    }

    fn fill(&mut self, buf: &mut [u8]) -> std::io::Result<bool> {
        match self.r.read_exact(buf) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The next frame.
    pub fn read_frame(&mut self) -> std::io::Result<Got> {
        let mut h = [0u8; HEADER];
        if !self.fill(&mut h)? {
            return Ok(Got::End);
        }
        let len = u32::from_be_bytes([h[9], h[10], h[11], h[12]]) as usize;
        if h[..4] != MAGIC || len > MAX_DATA || !(kind::HELLO..=kind::CLOSE).contains(&h[4]) {
            return Ok(Got::Garbage);
        }
        let mut data = vec![0u8; len];
        if !self.fill(&mut data)? {
            return Ok(Got::End);
        }
        Ok(Got::Frame(Frame {
            kind: h[4],
            conn: u32::from_be_bytes([h[5], h[6], h[7], h[8]]),
            data,
        }))
    }

    /// Skips to just after the next synchronisation frame of `kind`; returns its instance,
    /// or `None` at the end of the stream.
    pub fn scan(&mut self, kind: u8) -> std::io::Result<Option<u64>> {
        let mut pattern = encode(kind, 0, &[0u8; 24]);
        pattern.truncate(HEADER);
        pattern.extend(SYNC);
        let mut window: VecDeque<u8> = VecDeque::with_capacity(pattern.len());
        let mut b = [0u8; 1];
        loop {
            if !self.fill(&mut b)? {
                return Ok(None);
            }
            if window.len() == pattern.len() {
                window.pop_front();
            }
            window.push_back(b[0]);
            if window.len() == pattern.len() && window.iter().eq(pattern.iter()) {
                let mut i = [0u8; 8];
                if !self.fill(&mut i)? {
                    return Ok(None);
                }
                return Ok(Some(u64::from_be_bytes(i)));
            }
        }
    }
}

#[derive(Default)]
struct ConnState {
    /// Bytes this side may still send.
    credit: usize,
    /// Data received, not yet written to the local stream.
    inbox: VecDeque<Vec<u8>>,
    queued: usize,
    /// The peer sent EOF.
    eof: bool,
    /// The connection is gone (peer's CLOSE, an error, a reset).
    closed: bool,
    /// The guest's answer to OPEN (host side).
    accepted: Option<bool>,
    /// Local threads that finished (two: one per direction).
    done: u8,
}

struct Conn {
    id: u32,
    st: Mutex<ConnState>,
    cv: Condvar,
    alive: AtomicBool,
    /// The local end, to shut down when the connection goes.
    local: Mutex<Option<UnixStream>>,
}

impl Conn {
    fn new(id: u32) -> Arc<Self> {
        Arc::new(Conn {
            id,
            st: Mutex::new(ConnState {
                credit: WINDOW,
                ..Default::default()
            }),
            cv: Condvar::new(),
            alive: AtomicBool::new(true),
            local: Mutex::new(None),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, ConnState> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn close(&self) {
        self.alive.store(false, Ordering::SeqCst);
        self.state().closed = true;
        self.cv.notify_all();
        if let Some(s) = self
            .local
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// One side of the link: its writer and its connections.
pub struct Link {
    out: Mutex<Box<dyn Write + Send>>,
    conns: Mutex<HashMap<u32, Arc<Conn>>>,
    next_id: AtomicU32,
}

impl Link {
    /// A link writing to `out`.
    pub fn new(out: Box<dyn Write + Send>) -> Arc<Self> {
        Arc::new(Link {
            out: Mutex::new(out),
            conns: Mutex::new(HashMap::new()),
            next_id: AtomicU32::new(1),
        })
    }

    fn conns(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Arc<Conn>>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes a frame whole; for a connection's frame, only while the connection lives (a
    /// reset marks it dead under the same lock, so nothing of it follows a `HELLO`).
    fn send(&self, conn: Option<&Conn>, frame: &[u8]) -> std::io::Result<()> {
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        if conn.is_some_and(|c| !c.alive.load(Ordering::SeqCst)) {
            return Err(std::io::ErrorKind::BrokenPipe.into());
        }
        out.write_all(frame)?;
        out.flush()
    }

    /// Writes `frame` (a connection-less one) unless `stop` says not to, deciding under the
    /// writer's lock: what `stop` saw still holds when the frame enters the stream, so no
    /// frame another thread sends after seeing it change can precede this one. Returns
    /// whether it was written.
    fn send_unless(&self, stop: impl FnOnce() -> bool, frame: &[u8]) -> std::io::Result<bool> {
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        if stop() {
            return Ok(false);
        }
        out.write_all(frame)?;
        out.flush()?;
        Ok(true)
    }

    /// Drops every connection; then sends `then` (a synchronisation frame), under the
    /// writer's lock so no frame of an old connection can follow it.
    fn reset(&self, then: Option<Vec<u8>>) -> std::io::Result<()> {
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        let old: Vec<Arc<Conn>> = self.conns().drain().map(|(_, c)| c).collect();
        for c in old {
            c.close();
        }
        if let Some(f) = then {
            out.write_all(&f)?;
            out.flush()?;
        }
        Ok(())
    }

    /// Ends connection `c` here and tells the peer: CLOSE, the local end shut down, and
    /// forgotten.
    fn abandon(&self, c: &Arc<Conn>) {
        let _ = self.send(Some(c), &encode(kind::CLOSE, c.id, &[]));
        c.close();
        self.remove(c);
    }

    fn remove(&self, c: &Arc<Conn>) {
        let mut conns = self.conns();
        if conns.get(&c.id).is_some_and(|x| Arc::ptr_eq(x, c)) {
            conns.remove(&c.id);
        }
    }

    /// Handles a connection's frame (DATA, CREDIT, EOF, CLOSE, ACCEPT); frames of unknown
    /// connections are dropped. A peer that overruns its window loses the connection.
    fn dispatch(&self, f: Frame) {
        let Some(c) = self.conns().get(&f.conn).cloned() else {
            return;
        };
        match f.kind {
            kind::DATA => {
                let mut st = c.state();
                if st.queued + f.data.len() > WINDOW || st.eof {
                    drop(st);
                    self.abandon(&c);
                    return;
                }
                st.queued += f.data.len();
                st.inbox.push_back(f.data);
            }
            kind::CREDIT if f.data.len() == 4 => {
                let n = u32::from_be_bytes([f.data[0], f.data[1], f.data[2], f.data[3]]);
                let mut st = c.state();
                st.credit = (st.credit + n as usize).min(WINDOW);
            }
            kind::EOF => c.state().eof = true,
            kind::ACCEPT => c.state().accepted = Some(true),
            kind::CLOSE => {
                c.state().accepted.get_or_insert(false);
                c.close();
                self.remove(&c);
            }
            _ => return,
        }
        c.cv.notify_all();
    }

    fn add(&self, id: u32) -> Arc<Conn> {
        let c = Conn::new(id);
        if let Some(old) = self.conns().insert(id, c.clone()) {
            old.close();
        }
        c
    }

    /// Carries `conn` to and from `local` (one thread each way) until both directions end.
    fn bridge(self: &Arc<Self>, c: Arc<Conn>, local: UnixStream) -> std::io::Result<()> {
        self.bridge_out(&c, &local)?;
        let link = self.clone();
        run(move || link.inbound(c, local));
        Ok(())
    }

    /// The half of [`Self::bridge`] that carries what `local` sends to `conn` (started alone
    /// while the other waits, see [`client`]); `local` is shut down when the connection goes.
    fn bridge_out(self: &Arc<Self>, c: &Arc<Conn>, local: &UnixStream) -> std::io::Result<()> {
        let reader = local.try_clone()?;
        *c.local.lock().unwrap_or_else(|p| p.into_inner()) = Some(local.try_clone()?);
        if !c.alive.load(Ordering::SeqCst) {
            let _ = local.shutdown(std::net::Shutdown::Both);
        }
        let (link, conn) = (self.clone(), c.clone());
        run(move || link.outbound(conn, reader));
        Ok(())
    }

    fn finish(&self, c: &Arc<Conn>) {
        let mut st = c.state();
        st.done += 1;
        if st.done == 2 {
            drop(st);
            c.alive.store(false, Ordering::SeqCst);
            self.remove(c);
        }
    }

    /// Local → link, within the credit the peer granted.
    fn outbound(&self, c: Arc<Conn>, mut local: UnixStream) {
        let mut buf = vec![0u8; MAX_DATA];
        loop {
            let allowed = {
                let mut st = c.state();
                while st.credit == 0 && !st.closed {
                    st = c.cv.wait(st).unwrap_or_else(|p| p.into_inner());
                }
                if st.closed {
                    break;
                }
                st.credit.min(MAX_DATA)
            };
            match local.read(&mut buf[..allowed]) {
                Ok(0) => {
                    let _ = self.send(Some(&c), &encode(kind::EOF, c.id, &[]));
                    break;
                }
                Ok(n) => {
                    c.state().credit -= n;
                    if self
                        .send(Some(&c), &encode(kind::DATA, c.id, &buf[..n]))
                        .is_err()
                    {
                        c.close();
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => {
                    let _ = self.send(Some(&c), &encode(kind::CLOSE, c.id, &[]));
                    c.close();
                    break;
                }
            }
        }
        self.finish(&c);
    }

    /// Link → local, granting credit as the local side takes the bytes.
    fn inbound(&self, c: Arc<Conn>, mut local: UnixStream) {
        loop {
            let chunk = {
                let mut st = c.state();
                while st.inbox.is_empty() && !st.eof && !st.closed {
                    st = c.cv.wait(st).unwrap_or_else(|p| p.into_inner());
                }
                match st.inbox.pop_front() {
                    Some(d) => {
                        st.queued -= d.len();
                        d
                    }
                    None if st.closed => break,
                    None => {
                        let _ = local.shutdown(std::net::Shutdown::Write);
                        break;
                    }
                }
            };
            if local.write_all(&chunk).is_err() {
                let _ = self.send(Some(&c), &encode(kind::CLOSE, c.id, &[]));
                c.close();
                break;
            }
            let credit = (chunk.len() as u32).to_be_bytes();
            let _ = self.send(Some(&c), &encode(kind::CREDIT, c.id, &credit));
        }
        self.finish(&c);
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// Threads that finished a connection's work and wait for the next (see [`run`]).
struct Pool {
    /// The jobs no thread took yet, and how many threads wait for one.
    jobs: Mutex<(VecDeque<Job>, usize)>,
    cv: Condvar,
}

/// Most threads kept waiting; one more ends when it is done.
const IDLE_THREADS: usize = 8;

static POOL: Pool = Pool::new();

/// Runs `f` on a thread of the agent's [`Pool`].
fn run(f: impl FnOnce() + Send + 'static) {
    POOL.run(f)
}

impl Pool {
    const fn new() -> Pool {
        Pool {
            jobs: Mutex::new((VecDeque::new(), 0)),
            cv: Condvar::new(),
        }
    }

    /// Runs `f` on a thread of its own: one that ran an earlier connection's work and
    /// waits, or a new one. Never queued behind a busy thread (a connection's work may last
    /// as long as a shell does). A guest restored from a snapshot thus serves its first
    /// connections on threads its source made: under TCG, creating one (and its exit) runs
    /// kernel paths nothing has run since the restore, several ms each.
    fn run(&'static self, f: impl FnOnce() + Send + 'static) {
        let mut q = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        if q.1 > q.0.len() {
            q.0.push_back(Box::new(f));
            drop(q);
            self.cv.notify_one();
            return;
        }
        drop(q);
        let first: Job = Box::new(f);
        let spawned = std::thread::Builder::new().spawn(move || {
            first();
            loop {
                let mut q = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
                if q.0.is_empty() && q.1 >= IDLE_THREADS {
                    return;
                }
                q.1 += 1;
                let job = loop {
                    if let Some(job) = q.0.pop_front() {
                        break job;
                    }
                    q = self.cv.wait(q).unwrap_or_else(|p| p.into_inner());
                };
                q.1 -= 1;
                drop(q);
                job();
            }
        });
        if let Err(e) = spawned {
            eprintln!("banger-agent: cannot start a thread: {e}");
        }
    }

    /// How many threads wait for a job.
    #[cfg(test)]
    fn idle(&self) -> usize {
        self.jobs.lock().unwrap().1
    }
}

/// The guest side: serves the link on `port` (the opened virtio-serial port), handing each
/// connection to `port` [`super::PORT`] to `handle` as a stream; a connection to a port
/// `answers` has bytes for gets them at once from the link itself (accepted, the bytes, end:
/// no thread, no stream, one round trip). Returns when the port fails.
pub fn serve_guest<H, A>(port: std::fs::File, handle: H, answers: A) -> std::io::Result<()>
where
    H: Fn(std::fs::File) + Send + Sync + Clone + 'static,
    A: Fn(u32) -> Option<Vec<u8>>,
{
    let link = Link::new(Box::new(port.try_clone()?));
    let mut frames = FrameReader::new(port);
    // The instance of the helper this agent answered last (a RESET resent while the first
    // was on its way is not a new one).
    let mut answered = 0u64;
    link.reset(Some(sync_frame(kind::HELLO, 0)))?;
    loop {
        match frames.read_frame()? {
            Got::Frame(f) if f.kind == kind::RESET => {
                let Some(instance) = sync_instance(&f) else {
                    continue;
                };
                if instance != answered {
                    answered = instance;
                    link.reset(Some(sync_frame(kind::HELLO, instance)))?;
                }
            }
            Got::Frame(f) if f.kind == kind::OPEN => {
                let port = <[u8; 4]>::try_from(f.data.as_slice())
                    .ok()
                    .map(u32::from_be_bytes);
                if let Some(bytes) = port.and_then(&answers) {
                    // Never listed: what the host sends on it later is dropped. Within
                    // the window a new connection has, so no credit is waited for.
                    let _ = link.send(None, &encode(kind::ACCEPT, f.conn, &[]));
                    for d in bytes[..bytes.len().min(WINDOW)].chunks(MAX_DATA) {
                        let _ = link.send(None, &encode(kind::DATA, f.conn, d));
                    }
                    let _ = link.send(None, &encode(kind::EOF, f.conn, &[]));
                    continue;
                }
                let c = link.add(f.conn);
                if port != Some(super::PORT) {
                    link.abandon(&c);
                    continue;
                }
                let (ours, theirs) = UnixStream::pair()?;
                let h = handle.clone();
                let stream = std::fs::File::from(std::os::fd::OwnedFd::from(theirs));
                run(move || h(stream));
                link.bridge(c.clone(), ours)?;
                let _ = link.send(Some(&c), &encode(kind::ACCEPT, f.conn, &[]));
            }
            Got::Frame(f) => link.dispatch(f),
            Got::Garbage => {
                link.reset(None)?;
                match frames.scan(kind::RESET)? {
                    Some(instance) => {
                        answered = instance;
                        link.reset(Some(sync_frame(kind::HELLO, instance)))?;
                    }
                    None => std::thread::sleep(Duration::from_millis(100)),
                }
            }
            // No host on the other end (a port reads as ended then): what was open is gone;
            // a new host says RESET.
            Got::End => {
                link.reset(None)?;
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// The host side's view of the guest.
struct Guest {
    /// Whether the agent said HELLO since the last reset.
    up: Mutex<bool>,
    cv: Condvar,
}

/// The host side: the VMM's end of the port is `vmm` (one connection), clients connect to
/// `clients` with the hybrid protocol. Returns when the VMM hangs up.
pub fn serve_host(
    vmm: UnixStream,
    clients: std::os::unix::net::UnixListener,
) -> std::io::Result<()> {
    serve_host_with(vmm, clients, Arc::new(|| {}))
}

/// [`serve_host`], with `before_reset` called just before each `RESET` is written (tests hold
/// it there to order the stream as a race would).
fn serve_host_with(
    vmm: UnixStream,
    clients: std::os::unix::net::UnixListener,
    before_reset: Arc<dyn Fn() + Send + Sync>,
) -> std::io::Result<()> {
    let instance = instance_id();
    let link = Link::new(Box::new(vmm.try_clone()?));
    let guest = Arc::new(Guest {
        up: Mutex::new(false),
        cv: Condvar::new(),
    });
    {
        let (link, guest) = (link.clone(), guest.clone());
        std::thread::spawn(move || {
            for c in clients.incoming().flatten() {
                let (link, guest) = (link.clone(), guest.clone());
                std::thread::spawn(move || client(&link, &guest, c));
            }
        });
    }
    // RESET until the guest answers: the first one may reach a guest that had lost its
    // place (a restored VM in the middle of a frame), and a booting guest reads it late.
    // Whether the guest is up is read under the writer's lock: a client opens a connection
    // only once it is, so every OPEN follows every RESET in the stream. (Read before the
    // lock, a RESET could follow the OPEN of a client that came in between: the guest then
    // dropped that connection and the host, already up, never learned it.)
    let resend = {
        let (link, guest) = (link.clone(), guest.clone());
        move || {
            for _ in 0..600 {
                let up = || {
                    let up = *guest.up.lock().unwrap_or_else(|p| p.into_inner());
                    if !up {
                        before_reset();
                    }
                    up
                };
                match link.send_unless(up, &sync_frame(kind::RESET, instance)) {
                    Ok(true) => {}
                    Ok(false) | Err(_) => return,
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    };
    std::thread::spawn(resend.clone());
    let set_up = |up: bool| {
        *guest.up.lock().unwrap_or_else(|p| p.into_inner()) = up;
        guest.cv.notify_all();
    };
    let mut frames = FrameReader::new(vmm);
    loop {
        let up = *guest.up.lock().unwrap_or_else(|p| p.into_inner());
        if !up {
            match frames.scan(kind::HELLO)? {
                Some(i) if i == 0 || i == instance => {
                    link.reset(None)?;
                    set_up(true);
                }
                Some(_) => {}
                None => return Ok(()),
            }
            continue;
        }
        match frames.read_frame()? {
            Got::Frame(f) if f.kind == kind::HELLO => {
                // HELLO(0): the agent started again; its connections are gone. An answer to
                // this helper's RESET follows it, and every RESET precedes every OPEN (see
                // `resend`), so the guest dropped nothing that is open here.
                if sync_instance(&f) == Some(0) {
                    link.reset(None)?;
                }
            }
            Got::Frame(f) => link.dispatch(f),
            Got::Garbage => {
                link.reset(None)?;
                set_up(false);
                std::thread::spawn(resend.clone());
            }
            Got::End => return Ok(()),
        }
    }
}

/// One client of the hybrid socket: `CONNECT <port>\n`, then, once the guest accepted,
/// `OK <conn>\n` and the connection's bytes. A guest that is not there within
/// [`CONNECT_WAIT`], or refuses the port, closes the socket with no reply, as a vsock
/// device does. The client's own bytes may follow its `CONNECT` line at once: they go to
/// the guest behind the OPEN (Firecracker's vsock, too, leaves what follows the line queued).
fn client(link: &Arc<Link>, guest: &Guest, mut s: UnixStream) {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.len() < 64 {
        match s.read(&mut b) {
            Ok(1) if b[0] == b'\n' => break,
            Ok(1) => line.push(b[0]),
            _ => return,
        }
    }
    let Some(port) = std::str::from_utf8(&line)
        .ok()
        .and_then(|l| l.strip_prefix("CONNECT "))
        .and_then(|p| p.trim().parse::<u32>().ok())
    else {
        return;
    };
    let deadline = Instant::now() + CONNECT_WAIT;
    {
        let mut up = guest.up.lock().unwrap_or_else(|p| p.into_inner());
        while !*up {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            up = guest
                .cv
                .wait_timeout(up, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
    let id = link.next_id.fetch_add(1, Ordering::SeqCst);
    let c = link.add(id);
    if link
        .send(Some(&c), &encode(kind::OPEN, id, &port.to_be_bytes()))
        .is_err()
    {
        return;
    }
    // What the client sends from now on follows the OPEN at once, within the window a new
    // connection has: a client that sends its request without waiting for `OK` saves a
    // round trip through the guest (under TCG, a restored guest's cold one costs tens of
    // ms), and the guest queues it for the connection it opens (or drops it with a refused
    // one). What the guest sends reaches the client only after `OK` (below).
    if link.bridge_out(&c, &s).is_err() {
        link.abandon(&c);
        return;
    }
    let accepted = {
        let mut st = c.state();
        while st.accepted.is_none() && !st.closed {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            st =
                c.cv.wait_timeout(st, left)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
        }
        st.accepted == Some(true) && !st.closed
    };
    if !accepted || s.write_all(format!("OK {id}\n").as_bytes()).is_err() {
        link.abandon(&c);
        return;
    }
    let link = link.clone();
    run(move || link.inbound(c, s));
}

/// The argument that runs the helpers' program as a VM's link helper:
/// `banger-vm-helper agent-link VMM_SOCKET CLIENT_SOCKET`.
pub const HELPER_ARG: &str = "agent-link";

/// Listens on `path` once it is ready: bound and listening under a temporary name, then
/// renamed, so a socket at `path` always accepts.
fn listen_at(path: &std::path::Path) -> std::io::Result<std::os::unix::net::UnixListener> {
    let tmp = path.with_extension("binding");
    let _ = std::fs::remove_file(&tmp);
    let l = std::os::unix::net::UnixListener::bind(&tmp)?;
    std::fs::rename(&tmp, path)?;
    Ok(l)
}

/// The link helper: serves `clients` (hybrid protocol) over the one connection the VMM
/// makes to `vmm` (its end of the agent's port); returns when the VMM hangs up.
pub fn run_helper(vmm: &std::path::Path, clients: &std::path::Path) -> std::io::Result<()> {
    let path = clients.to_owned();
    let clients = listen_at(clients)?;
    let vmm_listener = listen_at(vmm)?;
    let (conn, _) = vmm_listener.accept()?;
    drop(vmm_listener);
    let _ = std::fs::remove_file(vmm);
    std::thread::spawn(move || keep_clock(&path));
    serve_host(conn, clients)
}

/// How often the link corrects the guest's clock.
pub const CLOCK_EVERY: Duration = Duration::from_secs(10);

/// Keeps the guest's wall clock on the host's for as long as the VM runs, daemon or not: every
/// [`CLOCK_EVERY`] it asks the agent, through this link's own socket, to slew to the host's
/// time (a guest under TCG drifts; one that just booted is up to a second off its RTC). A
/// paused or busy guest that does not answer within a few seconds is asked again next time.
fn keep_clock(clients: &std::path::Path) {
    loop {
        std::thread::sleep(CLOCK_EVERY);
        let _ = slew_once(clients);
    }
}

fn slew_once(clients: &std::path::Path) -> std::io::Result<()> {
    let s = UnixStream::connect(clients)?;
    s.set_read_timeout(Some(CONNECT_WAIT + Duration::from_secs(5)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    let req = || super::Request::SetClock {
        time_ns: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
        slew: true,
    };
    super::blocking::request_blocking(s, req).map(drop)
}

/// A number that tells this helper from the one before it.
fn instance_id() -> u64 {
    let mut b = [0u8; 8];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .is_err()
    {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        b = (t.as_nanos() as u64 ^ u64::from(std::process::id())).to_be_bytes();
    }
    u64::from_be_bytes(b).max(1)
}

/// Finds the agent's virtio-serial port (`/dev/vportNpM` named [`PORT_NAME`]) under
/// `sys` (`/sys/class/virtio-ports`), if the VM has one.
pub fn find_port(sys: &std::path::Path) -> Option<std::path::PathBuf> {
    std::fs::read_dir(sys).ok()?.flatten().find_map(|e| {
        let name = std::fs::read_to_string(e.path().join("name")).ok()?;
        (name.trim() == PORT_NAME).then(|| std::path::Path::new("/dev").join(e.file_name()))
    })
}

#[cfg(test)]
mod tests;
