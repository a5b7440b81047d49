//! Talking to `banger-agent` from the host: through the VMM's hybrid vsock socket
//! (`CONNECT <port>\n` → `OK …\n`, the protocol of Firecracker's vsock and of banger's agent link), or
//! over a stream the daemon already connected and handed out (`banger vm exec`).

use std::path::Path;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;

use super::{frame, header, parse_header, Health, Reply, Request};
use crate::{Error, Result};

fn io(context: &str) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| Error::failed(context.to_owned(), e)
}

/// Reads one `\n`-terminated line byte by byte, so nothing after it is consumed.
async fn read_line<R: AsyncRead + Unpin>(r: &mut R, limit: usize) -> std::io::Result<String> {
    let mut line = Vec::new();
    loop {
        let b = r.read_u8().await?;
        if b == b'\n' {
            return Ok(String::from_utf8_lossy(&line).into_owned());
        }
        line.push(b);
        if line.len() > limit {
            return Err(std::io::Error::other("line too long"));
        }
    }
}

pub use banger_guest::agent::blocking::request_blocking;

/// Connects to guest `port` through the hybrid vsock socket at `uds`.
pub async fn connect(uds: &Path, port: u32) -> Result<UnixStream> {
    connect_sending(uds, port, &[]).await
}

/// [`connect`], with `first` (a request line, see [`request_line`]) sent right behind the
/// `CONNECT` line instead of after `OK`: the agent link carries it to the guest with the
/// connection's opening, a round trip through the guest less (Firecracker's vsock, too, reads
/// the `CONNECT` line a byte at a time and leaves what follows queued). The reply is the
/// caller's to read.
pub async fn connect_sending(uds: &Path, port: u32, first: &[u8]) -> Result<UnixStream> {
    // The socket is in the VM's own directory: taken as the VM's, never by a path it controls.
    let mut s =
        crate::vmm::jail::connect_async(uds).map_err(io("Cannot reach the VM's vsock socket"))?;
    let mut out = format!("CONNECT {port}\n").into_bytes();
    out.extend_from_slice(first);
    s.write_all(&out)
        .await
        .map_err(io("Cannot reach the VM's vsock socket"))?;
    // Nobody listening on the port closes the socket without a reply.
    let line = read_line(&mut s, 64)
        .await
        .map_err(|e| Error::failed(format!("Nothing listens on guest vsock port {port} yet"), e))?;
    if !line.starts_with("OK ") {
        return Err(Error::failed(
            format!("The vsock proxy refused port {port}"),
            std::io::Error::other(line),
        ));
    }
    Ok(s)
}

/// `req` as the agent reads it: one JSON line.
pub fn request_line(req: &Request) -> Result<Vec<u8>> {
    let mut line = serde_json::to_vec(req).map_err(|e| Error::failed("Cannot encode", e))?;
    line.push(b'\n');
    Ok(line)
}

async fn request<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, req: &Request) -> Result<Reply> {
    let line = request_line(req)?;
    s.write_all(&line)
        .await
        .map_err(io("Cannot talk to the guest agent"))?;
    checked(read_reply(s).await?)
}

/// `reply`, or its error when the agent refused.
fn checked(reply: Reply) -> Result<Reply> {
    if !reply.ok {
        return Err(Error::failed(
            "The guest agent refused",
            std::io::Error::other(reply.error),
        ));
    }
    Ok(reply)
}

/// The health the agent's link answers with on [`super::HEALTH_PORT`] at `uds`; `None` when
/// it refuses that port (an older agent, a vsock device), so the caller asks on the agent's
/// own port instead.
pub async fn health_at_once(uds: &Path) -> Result<Option<Health>> {
    let Ok(mut s) = connect(uds, super::HEALTH_PORT).await else {
        return Ok(None);
    };
    Ok(read_reply(&mut s).await?.health)
}

/// Reads the agent's reply line.
async fn read_reply<S: AsyncRead + Unpin>(s: &mut S) -> Result<Reply> {
    let line = read_line(s, 64 * 1024)
        .await
        .map_err(io("The guest agent hung up"))?;
    serde_json::from_str(&line).map_err(|e| {
        Error::failed(
            "The guest agent answered something unexpected",
            std::io::Error::other(e),
        )
    })
}

/// Asks for the agent's health.
pub async fn health<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> Result<Health> {
    request(s, &Request::Health)
        .await?
        .health
        .ok_or_else(|| Error::failed("The guest agent sent no health", std::io::Error::other("")))
}

/// The answer to an identity request sent already (see [`connect_sending`]): returns once the
/// agent applied it, with the health it answers with (none from an agent older than this
/// banger).
pub async fn identity_reply<S: AsyncRead + Unpin>(s: &mut S) -> Result<Option<Health>> {
    Ok(checked(read_reply(s).await?)?.health)
}

/// Sets the guest's wall clock to the host's now (stepped, or with `slew` corrected without moving
/// back); returns once the agent did.
pub async fn set_clock<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, slew: bool) -> Result<()> {
    let time_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    request(s, &Request::SetClock { time_ns, slew })
        .await
        .map(|_| ())
}

/// Asks a parked guest to mount its root and go on booting; returns once it has (the
/// caller then hangs up, which lets the parked agent end; the root's own follows).
pub async fn unpark<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> Result<()> {
    request(s, &Request::Unpark).await.map(|_| ())
}

/// Asks the guest to power off; returns once the agent accepted.
pub async fn shutdown<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> Result<()> {
    request(s, &Request::Shutdown).await.map(|_| ())
}

/// Runs `what` in the guest with these streams; returns its exit status.
pub async fn exec<S, I, O, E>(
    s: S,
    what: super::ExecRequest,
    stdin: I,
    stdout: O,
    stderr: E,
) -> Result<i32>
where
    S: AsyncRead + AsyncWrite + Unpin,
    I: AsyncRead + Unpin,
    O: AsyncWrite + Unpin,
    E: AsyncWrite + Unpin,
{
    exec_with(s, what, stdin, stdout, stderr, None).await
}

/// Sends an `exec` request and reads the agent's answer: once this returns, the stream
/// carries the command's frames (`VM1.OpenShell` hands such a stream out).
pub async fn start<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    what: super::ExecRequest,
) -> Result<()> {
    request(s, &what.into()).await.map(|_| ())
}

/// [`exec`], with controls as they come: the terminal's new sizes, for a command on a
/// terminal (`what.tty`), and signals for the command.
pub async fn exec_with<S, I, O, E>(
    s: S,
    what: super::ExecRequest,
    mut stdin: I,
    mut stdout: O,
    mut stderr: E,
    mut controls: Option<tokio::sync::mpsc::UnboundedReceiver<super::Control>>,
) -> Result<i32>
where
    S: AsyncRead + AsyncWrite + Unpin,
    I: AsyncRead + Unpin,
    O: AsyncWrite + Unpin,
    E: AsyncWrite + Unpin,
{
    let mut s = s;
    start(&mut s, what).await?;
    let (mut r, mut w) = tokio::io::split(s);
    let input = async {
        let mut buf = vec![0u8; frame::MAX];
        let mut open = true;
        loop {
            let control = async {
                match controls.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                n = stdin.read(&mut buf), if open => {
                    let n: usize = n.unwrap_or_default();
                    if w.write_all(&header(frame::STDIN, n)).await.is_err()
                        || w.write_all(&buf[..n]).await.is_err()
                    {
                        break;
                    }
                    open = n > 0;
                }
                c = control => {
                    let f = match c {
                        Some(super::Control::Resize(rows, cols)) => {
                            let mut f = header(frame::RESIZE, 4).to_vec();
                            f.extend(rows.to_be_bytes());
                            f.extend(cols.to_be_bytes());
                            f
                        }
                        Some(super::Control::Signal(sig)) => {
                            let mut f = header(frame::SIGNAL, 4).to_vec();
                            f.extend(sig.to_be_bytes());
                            f
                        }
                        None => {
                            controls = None;
                            continue;
                        }
                    };
                    if w.write_all(&f).await.is_err() {
                        break;
                    }
                }
                else => break,
            }
        }
        // Keep the write half open: closing it may end the connection before the exit frame.
        std::future::pending::<()>().await
    };
    let output = async {
        let mut buf = vec![0u8; frame::MAX];
        loop {
            let mut h = [0u8; 5];
            r.read_exact(&mut h)
                .await
                .map_err(io("The guest agent hung up before the command ended"))?;
            let (kind, len) = parse_header(h).ok_or_else(|| {
                Error::failed(
                    "The guest agent sent an oversized frame",
                    std::io::Error::other(""),
                )
            })?;
            r.read_exact(&mut buf[..len])
                .await
                .map_err(io("The guest agent hung up mid-frame"))?;
            let data = &buf[..len];
            match kind {
                frame::STDOUT => {
                    stdout.write_all(data).await.map_err(io("stdout"))?;
                    stdout.flush().await.map_err(io("stdout"))?;
                }
                frame::STDERR => {
                    stderr.write_all(data).await.map_err(io("stderr"))?;
                    stderr.flush().await.map_err(io("stderr"))?;
                }
                frame::EXIT if len == 4 => {
                    return Ok(i32::from_be_bytes([data[0], data[1], data[2], data[3]]));
                }
                _ => {}
            }
        }
    };
    tokio::select! {
        r = output => r,
        _ = input => unreachable!("the input side never finishes"),
    }
}
