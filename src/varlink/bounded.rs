//! A Varlink socket whose calls are bounded: zlink's own limit is 100 MB per connection, which
//! a local client could make a root daemon hold once per connection. A call is a few hundred
//! bytes; a connection that sends [`MAX_CALL`] bytes without ending a message is cut.

use std::os::fd::OwnedFd;

use zlink::connection::socket::{self, ReadResult, Socket};
use zlink::tokio::unix::Stream;

/// The most bytes of one message banger reads.
pub const MAX_CALL: usize = 256 * 1024;

/// A [`Stream`] whose reads fail once a message outgrows [`MAX_CALL`].
#[derive(Debug)]
pub struct Bounded(pub Stream);

impl Socket for Bounded {
    type ReadHalf = ReadHalf;
    type WriteHalf = <Stream as Socket>::WriteHalf;

    const CAN_TRANSFER_FDS: bool = true;

    fn split(self) -> (Self::ReadHalf, Self::WriteHalf) {
        let (r, w) = self.0.split();
        (
            ReadHalf {
                inner: r,
                pending: 0,
                fds: 0,
            },
            w,
        )
    }
}

/// The reading half, counting the bytes since the last message ended.
#[derive(Debug)]
pub struct ReadHalf {
    inner: <Stream as Socket>::ReadHalf,
    pending: usize,
    fds: usize,
}

/// The most descriptors a connection may pass with one message.
const MAX_FDS: usize = 16;

impl socket::ReadHalf for ReadHalf {
    async fn read(&mut self, buf: &mut [u8]) -> zlink::Result<ReadResult> {
        let r = socket::ReadHalf::read(&mut self.inner, buf).await?;
        let n = r.bytes_read();
        self.fds += r.fds().len();
        match buf[..n].iter().rposition(|&b| b == 0) {
            Some(last) => {
                self.pending = n - last - 1;
                self.fds = 0;
            }
            None => self.pending += n,
        }
        if self.pending > MAX_CALL || self.fds > MAX_FDS {
            let _: Vec<OwnedFd> = r.into_fds();
            return Err(zlink::Error::Io(std::io::Error::other(format!(
                "a Varlink message over {MAX_CALL} bytes or {MAX_FDS} descriptors"
            ))));
        }
        Ok(r)
    }
}
