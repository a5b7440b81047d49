//! Published ports (`CreateVM` option `publish`, CLI `--publish [ADDR:]HOSTPORT:GUESTPORT[/udp]`):
//! a host TCP port whose connections reach a guest port through the VM's agent (vsock, the
//! agent's `connect` to the guest's own loopback), so they work whatever the guest listens on
//! and whatever walls its network has. A UDP port works the same way per client: each host
//! peer gets a stream to the agent (`connectudp`) carrying its datagrams, length-prefixed,
//! to and from a guest socket connected to the guest's port; a peer silent for
//! [`UDP_IDLE`] loses its stream, as a NAT forgets a flow. The listener is a detached helper of
//! the VM's, `banger-vm-helper port-forward`, running as the VM's uid like its other helpers:
//! it outlives the daemon's idle exit or restart and goes with the VM. Anyone who reaches a
//! published port can connect: each port serves at most [`MAX_TCP_CONNECTIONS`] connections (or
//! [`MAX_UDP_PEERS`] peers) at once, and closes the ones beyond at once.

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

pub use banger_guest::splice::{read_datagram, splice, write_datagram, TryCloneStream};

use super::error::invalid;
use crate::logging::helper_line;
use crate::Result;

/// The argument that runs the `bangerd` binary as `port-forward VSOCK SPEC…`.
pub const FORWARD_ARG: &str = "port-forward";

/// The lowest host port a VM may publish (lower ones are the host's services').
pub const MIN_HOST_PORT: u16 = 1024;

/// A UDP peer silent this long loses its stream to the guest.
pub const UDP_IDLE: Duration = Duration::from_secs(120);

/// The most UDP peers one published port serves at once (each holds a stream to the agent).
pub const MAX_UDP_PEERS: usize = 256;

/// The most TCP connections one published port serves at once (each holds two threads here
/// and a stream to the agent); more are closed as they come.
pub const MAX_TCP_CONNECTIONS: usize = 256;

/// One published port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Publish {
    /// Where the host listens.
    pub host: SocketAddr,
    /// The guest's port (on its loopback).
    pub guest: u16,
    /// UDP instead of TCP.
    pub udp: bool,
}

impl Publish {
    /// Parses `[ADDR:]HOSTPORT:GUESTPORT[/tcp|/udp]` (ADDR an IPv4 address, 127.0.0.1 by
    /// default; TCP by default).
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |why: &str| {
            invalid(format!(
                "publish {s:?}: {why}; write [ADDR:]HOSTPORT:GUESTPORT[/udp], e.g. 8080:80, \
                 0.0.0.0:8080:80 or 5353:53/udp"
            ))
        };
        let (s2, udp) = match s.strip_suffix("/udp") {
            Some(r) => (r, true),
            None => (s.strip_suffix("/tcp").unwrap_or(s), false),
        };
        let parts: Vec<&str> = s2.split(':').collect();
        let (addr, host, guest) = match parts.as_slice() {
            [h, g] => ("127.0.0.1", *h, *g),
            [a, h, g] => (*a, *h, *g),
            _ => return Err(bad("not two or three parts")),
        };
        let addr: std::net::Ipv4Addr = addr.parse().map_err(|_| bad("not an IPv4 address"))?;
        let port = |p: &str| p.parse::<u16>().ok().filter(|p| *p > 0);
        let (Some(host), Some(guest)) = (port(host), port(guest)) else {
            return Err(bad("ports are 1 to 65535"));
        };
        if host < MIN_HOST_PORT {
            return Err(bad(&format!(
                "host ports below {MIN_HOST_PORT} are the host's own"
            )));
        }
        Ok(Publish {
            host: SocketAddr::from((addr, host)),
            guest,
            udp,
        })
    }

    /// As written: `ADDR:HOSTPORT:GUESTPORT`, `/udp` for UDP.
    pub fn spec(&self) -> String {
        format!(
            "{}:{}:{}{}",
            self.host.ip(),
            self.host.port(),
            self.guest,
            if self.udp { "/udp" } else { "" }
        )
    }

    /// Whether `other` takes the same host port (of the same protocol).
    pub fn clashes(&self, other: &Publish) -> bool {
        self.host.port() == other.host.port() && self.udp == other.udp
    }

    /// `HOSTPORT[/udp]`, for messages.
    pub fn host_port(&self) -> String {
        format!("{}{}", self.host.port(), if self.udp { "/udp" } else { "" })
    }
}

/// Checks a VM's publish list: each well formed, no host port twice, and each free now.
pub fn check(list: &[String]) -> Result<Vec<Publish>> {
    let mut out: Vec<Publish> = Vec::new();
    for s in list {
        let p = Publish::parse(s)?;
        if out.iter().any(|o| o.clashes(&p)) {
            return Err(invalid(format!(
                "publish: host port {} is given twice",
                p.host_port()
            )));
        }
        out.push(p);
    }
    Ok(out)
}

/// Refuses host ports already in use (a listener elsewhere, another VM's).
pub fn check_free(list: &[Publish]) -> Result<()> {
    for p in list {
        let bound = if p.udp {
            UdpSocket::bind(p.host).map(drop)
        } else {
            TcpListener::bind(p.host).map(drop)
        };
        if let Err(e) = bound {
            return Err(invalid(format!(
                "publish: host port {} on {} is not free ({e}); pick another",
                p.host_port(),
                p.host.ip()
            )));
        }
    }
    Ok(())
}

/// Opens a connection to guest `port` through the agent at vsock socket `uds` (UDP: a
/// stream of length-prefixed datagrams to and from it).
fn open_guest(uds: &Path, port: u16, udp: bool) -> std::io::Result<std::os::unix::net::UnixStream> {
    let req = || match udp {
        true => crate::agent::Request::ConnectUdp { port },
        false => crate::agent::Request::Connect { port },
    };
    crate::agent::client::request_blocking(crate::vmm::jail::connect(uds)?, req)
}

/// `banger-vm-helper port-forward VSOCK SPEC…`: listens on each published host port and
/// forwards every connection to its guest port. Returns only when it cannot listen.
pub fn run_forwarder(args: &[std::ffi::OsString]) -> std::io::Error {
    let Some((uds, specs)) = args.split_first() else {
        return std::io::Error::other(
            "usage: banger-vm-helper port-forward VSOCK ADDR:HOSTPORT:GUESTPORT…",
        );
    };
    let uds = std::path::PathBuf::from(uds);
    // A TCP connection holds four descriptors here (each end and its clone), a UDP peer two.
    raise_fd_limit(specs.len() * (4 * MAX_TCP_CONNECTIONS + 2 * MAX_UDP_PEERS) + 64);
    let mut threads = Vec::new();
    for spec in specs {
        let p = match Publish::parse(&spec.to_string_lossy()) {
            Ok(p) => p,
            Err(e) => return std::io::Error::other(e.to_string()),
        };
        if p.udp {
            let sock = match UdpSocket::bind(p.host) {
                Ok(s) => s,
                Err(e) => return std::io::Error::new(e.kind(), format!("{}/udp: {e}", p.host)),
            };
            let uds = uds.clone();
            threads.push(std::thread::spawn(move || {
                forward_udp(sock, p.guest, helper_line, |port| {
                    open_guest(&uds, port, true)
                })
            }));
            continue;
        }
        let listener = match TcpListener::bind(p.host) {
            Ok(l) => l,
            Err(e) => return std::io::Error::new(e.kind(), format!("{}: {e}", p.host)),
        };
        let uds = uds.clone();
        threads.push(std::thread::spawn(move || {
            forward_tcp(
                listener,
                p.guest,
                MAX_TCP_CONNECTIONS,
                helper_line,
                move |port| open_guest(&uds, port, false),
            )
        }));
    }
    helper_line("port-forward: listening");
    for t in threads {
        let _ = t.join();
    }
    std::io::Error::other("every listener stopped")
}

/// Raises this process's soft limit on open descriptors to `need` (as far as its hard limit
/// allows): a unit's default soft limit (1024) is below what full ports hold.
fn raise_fd_limit(need: usize) {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes only `r`, setrlimit reads only `r`.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < need as u64 {
            r.rlim_cur = (need as u64).min(r.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

/// Serves one published TCP port: each connection gets a stream to the guest's port (opened
/// by `open`) and the two are spliced; beyond `max` at once, a new connection is closed as
/// it comes. What goes wrong is a line to `log` (the forwarder's: [`helper_line`], which
/// starts its standard error over when full, so never a test's).
pub fn forward_tcp<S, F>(listener: TcpListener, guest: u16, max: usize, log: fn(&str), open: F)
where
    S: std::io::Read + std::io::Write + TryCloneStream + Send + 'static,
    F: Fn(u16) -> std::io::Result<S> + Send + Sync + 'static,
{
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    /// One connection's place, given back when its splice ends (or its open fails).
    struct Slot(Arc<AtomicUsize>);
    impl Drop for Slot {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::AcqRel);
        }
    }
    let (open, open_now) = (Arc::new(open), Arc::new(AtomicUsize::new(0)));
    let host = listener.local_addr().ok();
    loop {
        let conn = match listener.accept() {
            Ok((c, _)) => c,
            // Out of descriptors (or memory): the connection waits in the backlog; retrying
            // at once would spin.
            Err(_) => {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if open_now.fetch_add(1, Ordering::AcqRel) >= max {
            open_now.fetch_sub(1, Ordering::AcqRel);
            let peer = conn.peer_addr().map(|a| a.to_string()).unwrap_or_default();
            drop(conn);
            log(&format!(
                "port-forward: {peer} → guest {guest}: closed, {max} connections are open"
            ));
            continue;
        }
        let (slot, open) = (Slot(open_now.clone()), open.clone());
        std::thread::spawn(move || {
            let _slot = slot;
            match open(guest) {
                Ok(g) => splice(conn, g),
                Err(e) => log(&format!(
                    "port-forward: {} → guest {guest}: {e}",
                    host.map(|h| h.to_string()).unwrap_or_default()
                )),
            }
        });
    }
}

/// Serves one published UDP port: each peer's datagrams go over a stream of its own (opened
/// by `open`) and what comes back goes to that peer; idle peers are dropped, and beyond
/// [`MAX_UDP_PEERS`] new peers wait for one to go. A peer it cannot serve is a line to `log`.
pub fn forward_udp<S, F>(sock: UdpSocket, guest: u16, log: fn(&str), open: F)
where
    S: std::io::Read + std::io::Write + TryCloneStream + Send + 'static,
    F: Fn(u16) -> std::io::Result<S>,
{
    use std::collections::HashMap;
    let _ = sock.set_read_timeout(Some(Duration::from_secs(5)));
    let mut peers: HashMap<SocketAddr, (S, Instant)> = HashMap::new();
    let mut buf = vec![0u8; 65536];
    loop {
        let got = sock.recv_from(&mut buf);
        let now = Instant::now();
        peers.retain(|_, (s, seen)| {
            let keep = now.duration_since(*seen) < UDP_IDLE;
            if !keep {
                s.shut_all();
            }
            keep
        });
        let Ok((n, peer)) = got else {
            continue;
        };
        if !peers.contains_key(&peer) {
            if peers.len() >= MAX_UDP_PEERS {
                continue;
            }
            let stream = match open(guest) {
                Ok(s) => s,
                Err(e) => {
                    log(&format!("port-forward: {peer} → guest {guest}/udp: {e}"));
                    continue;
                }
            };
            let (Ok(mut back), Ok(out)) = (stream.try_clone_stream(), sock.try_clone()) else {
                continue;
            };
            std::thread::spawn(move || {
                let mut b = [0u8; 65536];
                while let Ok(Some(d)) = read_datagram(&mut back, &mut b) {
                    let _ = out.send_to(d, peer);
                }
            });
            peers.insert(peer, (stream, now));
        }
        if let Some((s, seen)) = peers.get_mut(&peer) {
            *seen = now;
            if write_datagram(s, &buf[..n]).is_err() {
                s.shut_all();
                peers.remove(&peer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpStream;

    /// What the forwarders under test said (the test's own standard error is no log to start
    /// over).
    static SAID: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    fn test_log(line: &str) {
        SAID.lock().unwrap().push(line.to_owned());
    }

    #[test]
    fn publish_specs_parse_as_docker_users_write_them() {
        let p = Publish::parse("8080:80").unwrap();
        assert_eq!((p.host.to_string(), p.guest), ("127.0.0.1:8080".into(), 80));
        assert_eq!(
            Publish::parse("0.0.0.0:9000:90/tcp").unwrap().spec(),
            "0.0.0.0:9000:90"
        );
        for bad in [
            "80:80",
            "8080",
            "x:8080:80",
            "8080:0",
            "8080:80/sctp",
            "1:2:3:4",
        ] {
            assert!(Publish::parse(bad).is_err(), "{bad}");
        }
        assert!(check(&["8080:80".into(), "8080:81".into()]).is_err());
        let u = Publish::parse("5353:53/udp").unwrap();
        assert!(u.udp && u.spec() == "127.0.0.1:5353:53/udp");
        // One host port may be published once a protocol.
        assert!(check(&["5353:53/udp".into(), "5353:53".into()]).is_ok());
        assert!(check(&["5353:53/udp".into(), "5353:54/udp".into()]).is_err());
    }

    #[test]
    fn udp_peers_each_get_a_stream_and_their_own_answers() {
        // The "agent": each stream it is given echoes datagrams upper-cased, prefixed with
        // which stream it is, so two peers can tell they were kept apart.
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = sock.local_addr().unwrap();
        let opened = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let o = opened.clone();
        std::thread::spawn(move || {
            forward_udp(sock, 53, test_log, move |port| {
                assert_eq!(port, 53);
                let n = o.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let (ours, mut theirs) = std::os::unix::net::UnixStream::pair()?;
                std::thread::spawn(move || {
                    let mut b = [0u8; 65536];
                    let mut w = theirs.try_clone().unwrap();
                    while let Ok(Some(d)) = read_datagram(&mut theirs, &mut b) {
                        let reply = format!("{n}:{}", String::from_utf8_lossy(d).to_uppercase());
                        write_datagram(&mut w, reply.as_bytes()).unwrap();
                    }
                });
                Ok(ours)
            })
        });
        let ask = |c: &UdpSocket, what: &str| {
            c.send_to(what.as_bytes(), addr).unwrap();
            let mut b = [0u8; 100];
            let n = c.recv(&mut b).unwrap();
            String::from_utf8_lossy(&b[..n]).into_owned()
        };
        let (a, b) = (
            UdpSocket::bind("127.0.0.1:0").unwrap(),
            UdpSocket::bind("127.0.0.1:0").unwrap(),
        );
        for c in [&a, &b] {
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        }
        assert_eq!(ask(&a, "one"), "0:ONE");
        assert_eq!(ask(&b, "two"), "1:TWO");
        assert_eq!(ask(&a, "again"), "0:AGAIN", "a peer keeps its stream");
        assert_eq!(opened.load(std::sync::atomic::Ordering::SeqCst), 2);
        let big = vec![b'x'; 60000];
        a.send_to(&big, addr).unwrap();
        let mut back = vec![0u8; 65536];
        let n = a.recv(&mut back).unwrap();
        assert_eq!(n, 60002, "a large datagram goes whole");
    }

    #[test]
    fn a_client_half_close_reaches_the_server_and_the_servers_close_ends_all() {
        use std::io::{Read, Write};
        // A server that reads to the end, answers, and closes; another that answers at once
        // and closes while the client still could write.
        let serve = |wait_eof: bool| {
            let backend = TcpListener::bind("127.0.0.1:0").unwrap();
            let baddr = backend.local_addr().unwrap();
            std::thread::spawn(move || {
                let (mut c, _) = backend.accept().unwrap();
                let mut got = Vec::new();
                if wait_eof {
                    c.read_to_end(&mut got).unwrap();
                }
                c.write_all(format!("got {}", got.len()).as_bytes())
                    .unwrap();
            });
            let front = TcpListener::bind("127.0.0.1:0").unwrap();
            let faddr = front.local_addr().unwrap();
            std::thread::spawn(move || {
                let (c, _) = front.accept().unwrap();
                splice(c, TcpStream::connect(baddr).unwrap());
            });
            faddr
        };
        let mut c = TcpStream::connect(serve(true)).unwrap();
        c.write_all(b"hello").unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        let mut answer = String::new();
        c.read_to_string(&mut answer).unwrap();
        assert_eq!(answer, "got 5");
        let mut c = TcpStream::connect(serve(false)).unwrap();
        let mut answer = String::new();
        c.read_to_string(&mut answer).unwrap();
        assert_eq!(answer, "got 0");
    }

    #[test]
    fn a_tcp_port_serves_its_most_connections_and_closes_the_ones_beyond() {
        use std::io::{Read, Write};
        // The "guest" echoes each stream until its end.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            forward_tcp(listener, 80, 3, test_log, |_| {
                let (ours, mut theirs) = std::os::unix::net::UnixStream::pair()?;
                std::thread::spawn(move || {
                    let mut w = theirs.try_clone().unwrap();
                    let _ = std::io::copy(&mut theirs, &mut w);
                });
                Ok(ours)
            })
        });
        // Served: what it sends comes back. Closed: its read ends (or fails) at once.
        let served = |c: &mut TcpStream| {
            c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut b = [0u8; 4];
            c.write_all(b"ping").is_ok() && c.read_exact(&mut b).is_ok() && &b == b"ping"
        };
        let mut held: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(addr).unwrap()).collect();
        for c in &mut held {
            assert!(served(c), "the first three are served");
        }
        for _ in 0..5 {
            let mut c = TcpStream::connect(addr).unwrap();
            assert!(!served(&mut c), "a fourth at once is closed");
        }
        let said = SAID.lock().unwrap().clone();
        assert!(
            said.iter()
                .any(|l| l.ends_with("→ guest 80: closed, 3 connections are open")),
            "{said:?}"
        );
        // One ends: its place is given back (once its splice has seen both ends).
        drop(held.remove(0));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut c = TcpStream::connect(addr).unwrap();
            if served(&mut c) {
                held.push(c);
                break;
            }
            assert!(Instant::now() < deadline, "a place given back serves again");
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut c = TcpStream::connect(addr).unwrap();
        assert!(!served(&mut c), "and the port is full again");
    }
}
