//! The guest agent's protocol from a client: a request line, its reply, then frames (see
//! `banger_guest::agent`). Every read is bounded: what comes out of a guest is hostile.

use banger_guest::agent::{frame, header, parse_header, Reply, Request};
use bytes::Bytes;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

/// The longest reply line taken from an agent.
const MAX_REPLY: u64 = 4 << 20;

/// A connection to an agent after its reply.
pub struct Conn {
    frames: Frames,
    input: Input,
}

/// Sends `req` on `stream` and reads the reply line.
pub async fn request(stream: UnixStream, req: &Request) -> std::io::Result<(Reply, Conn)> {
    let (r, mut writer) = stream.into_split();
    let mut line = serde_json::to_vec(req).map_err(std::io::Error::other)?;
    line.push(b'\n');
    writer.write_all(&line).await?;
    let mut reader = BufReader::new(r);
    let mut reply = Vec::new();
    (&mut reader)
        .take(MAX_REPLY)
        .read_until(b'\n', &mut reply)
        .await?;
    if !reply.ends_with(b"\n") {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "the guest agent's reply was cut short or too long",
        ));
    }
    let reply: Reply = serde_json::from_slice(&reply).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("the guest agent's reply is not one: {e}"),
        )
    })?;
    Ok((
        reply,
        Conn {
            frames: Frames { reader },
            input: Input { writer },
        },
    ))
}

impl Conn {
    /// The next frame; `None` when the agent closed the stream.
    pub async fn next(&mut self) -> std::io::Result<Option<(u8, Bytes)>> {
        self.frames.next().await
    }

    /// Sends a frame.
    pub async fn send(&mut self, kind: u8, data: &[u8]) -> std::io::Result<()> {
        self.input.send(kind, data).await
    }

    /// Splits into the frame reader and a writer.
    pub fn split(self) -> (Frames, Input) {
        (self.frames, self.input)
    }

    /// Reads frames to the exit: (standard output, standard error, exit status), output
    /// bounded by `cap` bytes (more is an error).
    pub async fn collect(mut self, cap: usize) -> std::io::Result<(Vec<u8>, Vec<u8>, i32)> {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        while let Some((kind, data)) = self.next().await? {
            match kind {
                frame::STDOUT => out.extend_from_slice(&data),
                frame::STDERR => err.extend_from_slice(&data),
                frame::EXIT => return Ok((out, err, exit_status(&data))),
                _ => {}
            }
            if out.len() + err.len() > cap {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("the guest's answer is over {cap} bytes"),
                ));
            }
        }
        Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the guest agent ended the stream before the exit status",
        ))
    }

    /// The raw stream (after a `connect` request: the guest port's bytes).
    pub fn into_stream(self) -> std::io::Result<UnixStream> {
        // What the reader buffered past the reply line belongs to the guest's port: a port
        // answers nothing before it is spoken to, and `connect` replies before any byte.
        if !self.frames.reader.buffer().is_empty() {
            return Err(std::io::Error::other(
                "the guest sent bytes before the connection was asked anything",
            ));
        }
        self.frames
            .reader
            .into_inner()
            .reunite(self.input.writer)
            .map_err(std::io::Error::other)
    }
}

/// An exit frame's status.
pub fn exit_status(data: &[u8]) -> i32 {
    data.try_into().map(i32::from_be_bytes).unwrap_or(-1)
}

/// The reading half of a connection.
pub struct Frames {
    reader: BufReader<OwnedReadHalf>,
}

impl Frames {
    /// The next frame; `None` when the agent closed the stream.
    pub async fn next(&mut self) -> std::io::Result<Option<(u8, Bytes)>> {
        let mut h = [0u8; 5];
        match self.reader.read_exact(&mut h).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        let Some((kind, len)) = parse_header(h) else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "the guest agent sent a frame over the limit",
            ));
        };
        let mut data = vec![0u8; len];
        self.reader.read_exact(&mut data).await?;
        Ok(Some((kind, Bytes::from(data))))
    }
}

/// The writing half of a connection.
pub struct Input {
    writer: OwnedWriteHalf,
}

impl Input {
    /// Ends what this side sends (the agent sees the end of its input).
    pub async fn finish(&mut self) -> std::io::Result<()> {
        self.writer.shutdown().await
    }

    /// Sends a frame (split at the frame limit; empty data is one empty frame).
    pub async fn send(&mut self, kind: u8, data: &[u8]) -> std::io::Result<()> {
        for chunk in data
            .chunks(frame::MAX)
            .chain(data.is_empty().then_some(&[][..]))
        {
            self.writer.write_all(&header(kind, chunk.len())).await?;
            self.writer.write_all(chunk).await?;
        }
        Ok(())
    }
}
