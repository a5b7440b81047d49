use super::*;
use std::os::unix::net::UnixListener;

/// A guest (echo handler) and a host helper joined by a socket pair; returns the client
/// socket's path.
fn pair(dir: &std::path::Path) -> std::path::PathBuf {
    let (guest_end, host_end) = UnixStream::pair().unwrap();
    let port = std::fs::File::from(std::os::fd::OwnedFd::from(guest_end));
    std::thread::spawn(move || {
        serve_guest(
            port,
            |conn: std::fs::File| {
                let mut w = conn.try_clone().unwrap();
                let mut r = conn;
                let _ = std::io::copy(&mut r, &mut w);
            },
            |port| (port == 7).then(|| b"answered at once\n".to_vec()),
        )
    });
    let sock = dir.join("vsock.sock");
    let clients = UnixListener::bind(&sock).unwrap();
    std::thread::spawn(move || serve_host(host_end, clients));
    sock
}

fn connect(sock: &std::path::Path, port: u32) -> std::io::Result<UnixStream> {
    let mut s = UnixStream::connect(sock)?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())?;
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        if s.read(&mut b)? == 0 {
            return Err(std::io::ErrorKind::ConnectionRefused.into());
        }
        if b[0] == b'\n' {
            break;
        }
        line.push(b[0]);
    }
    assert!(line.starts_with(b"OK "), "{line:?}");
    Ok(s)
}

#[test]
fn connections_carry_bytes_both_ways_beyond_the_window() {
    let dir = tempfile::tempdir().unwrap();
    let sock = pair(dir.path());
    let mut s = connect(&sock, super::super::PORT).unwrap();
    let data: Vec<u8> = (0..3 * WINDOW + 12345)
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    let mut w = s.try_clone().unwrap();
    let sent = data.clone();
    let writer = std::thread::spawn(move || {
        w.write_all(&sent).unwrap();
        w.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut back = Vec::new();
    s.read_to_end(&mut back).unwrap();
    writer.join().unwrap();
    assert_eq!(back.len(), data.len());
    assert!(back == data, "the echo differs");
}

#[test]
fn a_port_the_link_answers_gets_its_bytes_and_an_end() {
    let dir = tempfile::tempdir().unwrap();
    let sock = pair(dir.path());
    for _ in 0..3 {
        let mut s = connect(&sock, 7).unwrap();
        let mut got = String::new();
        s.read_to_string(&mut got).unwrap();
        assert_eq!(got, "answered at once\n");
    }
    // The agent's own port is served as before.
    let mut s = connect(&sock, super::super::PORT).unwrap();
    s.write_all(b"ping").unwrap();
    let mut b = [0u8; 4];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"ping");
}

#[test]
fn a_port_nobody_serves_is_closed_without_a_reply() {
    let dir = tempfile::tempdir().unwrap();
    let sock = pair(dir.path());
    let e = connect(&sock, 9).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused);
    // The link still serves the agent's port afterwards.
    let mut s = connect(&sock, super::super::PORT).unwrap();
    s.write_all(b"ping").unwrap();
    let mut b = [0u8; 4];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"ping");
}

/// The race that left a connection open on the host and gone in the guest: the helper decided
/// to send its first RESET, the agent's HELLO(0) (it just started) made the guest up, and a
/// client's OPEN went out before that RESET, which then made the guest drop the connection.
/// The RESET is held here where it is decided; the stream must still carry it before the OPEN.
#[test]
fn every_reset_precedes_the_connections_opened_once_the_guest_is_up() {
    use std::sync::mpsc;
    let dir = tempfile::tempdir().unwrap();
    let (guest_end, host_end) = UnixStream::pair().unwrap();
    let sock = dir.path().join("vsock.sock");
    let clients = UnixListener::bind(&sock).unwrap();
    let (held_tx, held) = mpsc::channel::<()>();
    let (release, go) = mpsc::channel::<()>();
    let go = Mutex::new(Some(go));
    let hook = move || {
        // Only the first RESET is held.
        if let Some(go) = go.lock().unwrap().take() {
            let _ = held_tx.send(());
            let _ = go.recv_timeout(Duration::from_secs(10));
        }
    };
    std::thread::spawn(move || serve_host_with(host_end, clients, Arc::new(hook)));
    held.recv_timeout(Duration::from_secs(10)).unwrap();
    // The guest's side, read as frames.
    let (frames_tx, frames) = mpsc::channel::<u8>();
    let reader = guest_end.try_clone().unwrap();
    std::thread::spawn(move || {
        let mut r = FrameReader::new(reader);
        while let Ok(Got::Frame(f)) = r.read_frame() {
            if frames_tx.send(f.kind).is_err() {
                return;
            }
        }
    });
    // The agent starts, and a client connects at once.
    (&guest_end).write_all(&sync_frame(kind::HELLO, 0)).unwrap();
    std::thread::spawn(move || {
        let mut s = UnixStream::connect(&sock).unwrap();
        s.write_all(format!("CONNECT {}\n", super::super::PORT).as_bytes())
            .unwrap();
        let _ = s.read(&mut [0u8; 16]);
    });
    // What reaches the guest while the RESET is held (an OPEN, before the fix), then the rest.
    let mut seen: Vec<u8> = frames
        .recv_timeout(Duration::from_secs(1))
        .into_iter()
        .collect();
    release.send(()).unwrap();
    while !(seen.contains(&kind::RESET) && seen.contains(&kind::OPEN)) {
        seen.push(frames.recv_timeout(Duration::from_secs(10)).unwrap());
    }
    let at = |k: u8| seen.iter().position(|&x| x == k).unwrap();
    assert!(
        at(kind::RESET) < at(kind::OPEN),
        "frames reaching the guest: {seen:?}"
    );
}

/// A client may send its request right behind its `CONNECT` line: the helper carries it to
/// the guest behind the OPEN, before the guest has accepted (a round trip less), and the
/// client still reads `OK` before anything the guest sends.
#[test]
fn a_request_sent_with_the_connect_line_reaches_the_guest_before_it_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let (guest_end, host_end) = UnixStream::pair().unwrap();
    let sock = dir.path().join("vsock.sock");
    let clients = UnixListener::bind(&sock).unwrap();
    std::thread::spawn(move || serve_host(host_end, clients));
    // The guest's side, by hand: the agent is up, and nothing is accepted yet.
    (&guest_end).write_all(&sync_frame(kind::HELLO, 0)).unwrap();
    let client = std::thread::spawn(move || {
        let mut s = UnixStream::connect(&sock).unwrap();
        s.write_all(format!("CONNECT {}\nping", super::super::PORT).as_bytes())
            .unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        got
    });
    guest_end
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut r = FrameReader::new(guest_end.try_clone().unwrap());
    let mut next = || match r.read_frame().unwrap() {
        Got::Frame(f) => f,
        other => panic!("{other:?}"),
    };
    let open = loop {
        let f = next();
        if f.kind == kind::OPEN {
            break f;
        }
        assert_eq!(f.kind, kind::RESET, "{f:?}");
    };
    let data = next();
    assert_eq!(
        (data.kind, data.conn, &data.data[..]),
        (kind::DATA, open.conn, &b"ping"[..]),
        "the request waited for the guest to accept"
    );
    for f in [
        encode(kind::ACCEPT, open.conn, &[]),
        encode(kind::DATA, open.conn, b"pong"),
        encode(kind::EOF, open.conn, &[]),
    ] {
        (&guest_end).write_all(&f).unwrap();
    }
    let got = client.join().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&got),
        format!("OK {}\npong", open.conn)
    );
}

/// The same through a real guest side: an echo, and a refused port that drops the request
/// with the connection (no reply), the link serving on afterwards.
#[test]
fn requests_sent_with_the_connect_line_are_answered_or_dropped_with_a_refusal() {
    let dir = tempfile::tempdir().unwrap();
    let sock = pair(dir.path());
    for _ in 0..3 {
        let mut s = UnixStream::connect(&sock).unwrap();
        s.write_all(format!("CONNECT {}\nping", super::super::PORT).as_bytes())
            .unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut got = String::new();
        s.read_to_string(&mut got).unwrap();
        assert!(got.starts_with("OK ") && got.ends_with("\nping"), "{got:?}");
        let mut refused = UnixStream::connect(&sock).unwrap();
        refused.write_all(b"CONNECT 9\nping").unwrap();
        // No reply: an end, or a reset where the helper closed it with the request unread.
        let mut got = Vec::new();
        match refused.read_to_end(&mut got) {
            Ok(_) => assert!(got.is_empty(), "{got:?}"),
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
        }
    }
}

#[test]
fn a_stalled_connection_does_not_stall_another() {
    let dir = tempfile::tempdir().unwrap();
    let sock = pair(dir.path());
    // The first client sends far more than its window and never reads the echo.
    let mut stalled = connect(&sock, super::super::PORT).unwrap();
    stalled.set_nonblocking(true).unwrap();
    let chunk = vec![1u8; 64 * 1024];
    for _ in 0..32 {
        let _ = stalled.write(&chunk);
    }
    let mut s = connect(&sock, super::super::PORT).unwrap();
    s.write_all(b"still here").unwrap();
    let mut b = [0u8; 10];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"still here");
}

#[test]
fn a_reader_finds_its_place_after_garbage() {
    let mut bytes = b"half a frame from before".to_vec();
    bytes.extend(encode(kind::DATA, 3, b"x"));
    bytes.truncate(30);
    bytes.extend(sync_frame(kind::RESET, 42));
    bytes.extend(encode(kind::OPEN, 1, &1024u32.to_be_bytes()));
    let mut r = FrameReader::new(&bytes[..]);
    assert!(matches!(r.read_frame().unwrap(), Got::Garbage));
    assert_eq!(r.scan(kind::RESET).unwrap(), Some(42));
    match r.read_frame().unwrap() {
        Got::Frame(f) => assert_eq!((f.kind, f.conn), (kind::OPEN, 1)),
        other => panic!("{other:?}"),
    }
    assert!(matches!(r.read_frame().unwrap(), Got::End));
}

#[test]
fn the_pool_reuses_waiting_threads_and_never_queues_behind_a_busy_one() {
    static POOL: Pool = Pool::new();
    let tid = || std::thread::current().id();
    // A job that waits for the next one: the next runs on another thread, not after it.
    let (tx, rx) = std::sync::mpsc::channel();
    let (done_tx, done) = std::sync::mpsc::channel();
    {
        let done_tx = done_tx.clone();
        POOL.run(move || {
            let waited = rx.recv_timeout(Duration::from_secs(10));
            done_tx.send((tid(), waited.is_ok())).unwrap();
        });
    }
    {
        let done_tx = done_tx.clone();
        POOL.run(move || {
            tx.send(()).unwrap();
            done_tx.send((tid(), true)).unwrap();
        });
    }
    let mut both: Vec<_> = (0..2)
        .map(|_| done.recv_timeout(Duration::from_secs(20)).unwrap())
        .collect();
    assert!(
        both.iter().all(|b| b.1),
        "the second job waited behind the first"
    );
    let both: std::collections::HashSet<_> = both.drain(..).map(|b| b.0).collect();
    assert_eq!(both.len(), 2);
    // Both threads wait now; twenty jobs one after another run on them, no new thread.
    let deadline = Instant::now() + Duration::from_secs(10);
    while POOL.idle() < 2 {
        assert!(
            Instant::now() < deadline,
            "the threads did not wait for more"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut seen = std::collections::HashSet::new();
    for _ in 0..20 {
        let done_tx = done_tx.clone();
        POOL.run(move || done_tx.send((tid(), true)).unwrap());
        seen.insert(done.recv_timeout(Duration::from_secs(10)).unwrap().0);
        while POOL.idle() < 2 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    assert!(
        seen.is_subset(&both),
        "20 jobs ran on {} threads, not only on the two that waited",
        seen.len()
    );
    // Many at once: each gets a thread; no more than IDLE_THREADS wait afterwards. The gate
    // opens once every job runs: a job queued behind another would never start.
    let gate = Arc::new((Mutex::new(false), Condvar::new()));
    let n = IDLE_THREADS + 4;
    let (started_tx, started) = std::sync::mpsc::channel();
    for _ in 0..n {
        let (gate, done_tx, started_tx) = (gate.clone(), done_tx.clone(), started_tx.clone());
        POOL.run(move || {
            started_tx.send(()).unwrap();
            let (open, cv) = &*gate;
            let mut o = open.lock().unwrap();
            while !*o {
                o = cv.wait(o).unwrap();
            }
            drop(o);
            done_tx.send((tid(), true)).unwrap();
        });
    }
    for i in 0..n {
        started
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("{i} of {n} jobs started: the others wait behind them"));
    }
    *gate.0.lock().unwrap() = true;
    gate.1.notify_all();
    let ran: std::collections::HashSet<_> = (0..n)
        .map(|_| done.recv_timeout(Duration::from_secs(10)).unwrap().0)
        .collect();
    assert_eq!(ran.len(), n, "jobs shared a thread while they all waited");
    let deadline = Instant::now() + Duration::from_secs(10);
    while POOL.idle() < IDLE_THREADS {
        assert!(Instant::now() < deadline, "{} wait", POOL.idle());
        std::thread::sleep(Duration::from_millis(5));
    }
    // No more wait than that (the others ended).
    assert_eq!(POOL.idle(), IDLE_THREADS);
}
