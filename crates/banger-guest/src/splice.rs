//! Byte streams both sides forward: a connection spliced to another (the agent's `connect`,
//! the host's published ports) and datagrams framed on a stream (`connectudp`).

/// Copies both ways between a client `a` and a server `b`: the client's end of input is
/// passed on as a half-close (the server may still answer); the server's close ends both.
pub fn splice<A, B>(a: A, b: B)
where
    A: std::io::Read + std::io::Write + TryCloneStream + Send + 'static,
    B: std::io::Read + std::io::Write + TryCloneStream + Send + 'static,
{
    let (a2, b2) = match (a.try_clone_stream(), b.try_clone_stream()) {
        (Ok(a2), Ok(b2)) => (a2, b2),
        _ => return,
    };
    let (mut ar, mut bw) = (a, b2);
    let t = std::thread::spawn(move || {
        let _ = std::io::copy(&mut ar, &mut bw);
        bw.shut_write();
    });
    let (mut br, mut aw) = (b, a2);
    let _ = std::io::copy(&mut br, &mut aw);
    aw.shut_all();
    br.shut_all();
    let _ = t.join();
}

/// Streams that can be cloned and half-closed (TCP, Unix, a vsock connection as a file).
pub trait TryCloneStream: Sized + std::os::fd::AsRawFd {
    /// Another handle on the same stream.
    fn try_clone_stream(&self) -> std::io::Result<Self>;
    /// Ends the writing half.
    fn shut_write(&self) {
        // SAFETY: shutdown takes no pointers; the descriptor is open.
        unsafe { libc::shutdown(self.as_raw_fd(), libc::SHUT_WR) };
    }
    /// Ends both halves (a reader of it returns).
    fn shut_all(&self) {
        // SAFETY: as above.
        unsafe { libc::shutdown(self.as_raw_fd(), libc::SHUT_RDWR) };
    }
}

impl TryCloneStream for std::net::TcpStream {
    fn try_clone_stream(&self) -> std::io::Result<Self> {
        self.try_clone()
    }
}

impl TryCloneStream for std::fs::File {
    fn try_clone_stream(&self) -> std::io::Result<Self> {
        self.try_clone()
    }
}

impl TryCloneStream for std::os::unix::net::UnixStream {
    fn try_clone_stream(&self) -> std::io::Result<Self> {
        self.try_clone()
    }
}

/// Writes one datagram as a frame: its length (u16, big-endian), then its bytes.
pub fn write_datagram(w: &mut impl std::io::Write, d: &[u8]) -> std::io::Result<()> {
    let len = u16::try_from(d.len()).map_err(|_| std::io::Error::other("datagram too large"))?;
    let mut frame = Vec::with_capacity(d.len() + 2);
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(d);
    w.write_all(&frame)
}

/// Reads one datagram frame into `buf`; `None` at the stream's end.
pub fn read_datagram<'a>(
    r: &mut impl std::io::Read,
    buf: &'a mut [u8; 65536],
) -> std::io::Result<Option<&'a [u8]>> {
    let mut len = [0u8; 2];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let n = u16::from_be_bytes(len) as usize;
    r.read_exact(&mut buf[..n])?;
    Ok(Some(&buf[..n]))
}
