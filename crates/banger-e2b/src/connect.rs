//! Connect's protocol (connectrpc.com/docs/protocol), as envd serves it and E2B's SDKs call
//! it: unary calls (`application/json` or `application/proto`, the message as the body),
//! streams (`application/connect+json` or `+proto`: each message in an envelope,
//! `[flags u8][length u32 BE][message]`, ending with an end-of-stream envelope, flag 2, whose
//! JSON carries the error if any). Messages are capped: a bigger one is refused.

use bytes::{Buf, Bytes, BytesMut};
use http::{Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use serde::{de::DeserializeOwned, Serialize};

use crate::http::{self as h, Body, Reply};

/// The largest message taken from a client.
pub const MAX_MESSAGE: usize = 4 << 20;

/// An envelope flag: the end of a stream.
const END_STREAM: u8 = 0x02;
/// An envelope flag: the message is compressed (with the stream's `connect-content-encoding`).
const COMPRESSED: u8 = 0x01;

/// How a client compressed its messages: `content-encoding` (unary) or
/// `connect-content-encoding` (streams); gzip or none. The answers go uncompressed, which
/// every client takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// As they are.
    #[default]
    Identity,
    /// gzip.
    Gzip,
}

impl Compression {
    /// The compression a request's headers name; another than gzip is refused by name.
    pub fn of(headers: &http::HeaderMap, streaming: bool) -> Result<Compression, Error> {
        let name = if streaming {
            "connect-content-encoding"
        } else {
            "content-encoding"
        };
        match headers.get(name).map(|v| v.to_str().unwrap_or("?")) {
            None | Some("identity") => Ok(Compression::Identity),
            Some("gzip") => Ok(Compression::Gzip),
            Some(other) => Err(Error::new(
                "unimplemented",
                format!("{name} {other:?}: messages are taken as they are or gzipped"),
            )),
        }
    }

    /// `data` as it was before compression, at most [`MAX_MESSAGE`] bytes of it.
    pub fn expand(self, data: Bytes) -> Result<Bytes, Error> {
        if self == Compression::Identity {
            return Ok(data);
        }
        use std::io::Read;
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&data[..])
            .take(MAX_MESSAGE as u64 + 1)
            .read_to_end(&mut out)
            .map_err(|e| Error::new("invalid_argument", format!("bad gzip message: {e}")))?;
        if out.len() > MAX_MESSAGE {
            return Err(Error::new(
                "resource_exhausted",
                format!("a message is at most {MAX_MESSAGE} bytes, uncompressed"),
            ));
        }
        Ok(Bytes::from(out))
    }
}

/// How messages are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// proto3's JSON mapping.
    Json,
    /// Protobuf's binary form.
    Proto,
}

/// A call's codec and whether it is a stream, from its `content-type`.
pub fn content_type(ct: &str) -> Option<(Codec, bool)> {
    match ct.split(';').next().unwrap_or("").trim() {
        "application/json" => Some((Codec::Json, false)),
        "application/proto" => Some((Codec::Proto, false)),
        "application/connect+json" => Some((Codec::Json, true)),
        "application/connect+proto" => Some((Codec::Proto, true)),
        _ => None,
    }
}

/// A Connect error: its code (`not_found`, …) and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    /// Connect's code.
    pub code: &'static str,
    /// What went wrong.
    pub message: String,
}

impl Error {
    /// An error of `code`.
    pub fn new(code: &'static str, message: impl Into<String>) -> Error {
        Error {
            code,
            message: message.into(),
        }
    }

    /// The HTTP status a unary call answers it with.
    pub fn status(&self) -> StatusCode {
        match self.code {
            "canceled" => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
            "invalid_argument" | "failed_precondition" | "out_of_range" => StatusCode::BAD_REQUEST,
            "deadline_exceeded" => StatusCode::GATEWAY_TIMEOUT,
            "not_found" => StatusCode::NOT_FOUND,
            "already_exists" | "aborted" => StatusCode::CONFLICT,
            "permission_denied" => StatusCode::FORBIDDEN,
            "resource_exhausted" => StatusCode::TOO_MANY_REQUESTS,
            "unimplemented" => StatusCode::NOT_IMPLEMENTED,
            "unavailable" => StatusCode::SERVICE_UNAVAILABLE,
            "unauthenticated" => StatusCode::UNAUTHORIZED,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({"code": self.code, "message": self.message})
    }
}

/// Decodes a message.
pub fn decode<M>(codec: Codec, data: &[u8]) -> Result<M, Error>
where
    M: prost::Message + DeserializeOwned + Default,
{
    match codec {
        Codec::Proto => M::decode(data)
            .map_err(|e| Error::new("invalid_argument", format!("bad protobuf message: {e}"))),
        Codec::Json => {
            let text = if data.is_empty() { &b"{}"[..] } else { data };
            serde_json::from_slice(text)
                .map_err(|e| Error::new("invalid_argument", format!("bad JSON message: {e}")))
        }
    }
}

/// Encodes a message.
pub fn encode<M: prost::Message + Serialize>(codec: Codec, msg: &M) -> Bytes {
    match codec {
        Codec::Proto => Bytes::from(msg.encode_to_vec()),
        Codec::Json => Bytes::from(serde_json::to_vec(msg).unwrap_or_else(|_| b"{}".to_vec())),
    }
}

fn envelope(flags: u8, data: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + data.len());
    b.extend_from_slice(&[flags]);
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b.freeze()
}

fn content(codec: Codec, streaming: bool) -> &'static str {
    match (codec, streaming) {
        (Codec::Json, false) => "application/json",
        (Codec::Proto, false) => "application/proto",
        (Codec::Json, true) => "application/connect+json",
        (Codec::Proto, true) => "application/connect+proto",
    }
}

/// A unary call's answer.
pub fn unary<M: prost::Message + Serialize>(codec: Codec, msg: &M) -> Reply {
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", content(codec, false))
        .body(h::full(encode(codec, msg)))
        .expect("a valid reply")
}

/// A call's error: for a unary call its status and JSON body; for a stream, 200 and an
/// end-of-stream envelope carrying it.
pub fn error(codec: Codec, streaming: bool, e: &Error) -> Reply {
    if streaming {
        let end = serde_json::json!({ "error": e.json() }).to_string();
        return Response::builder()
            .status(StatusCode::OK)
            .header("content-type", content(codec, true))
            .body(h::full(envelope(END_STREAM, end.as_bytes())))
            .expect("a valid reply");
    }
    Response::builder()
        .status(e.status())
        .header("content-type", "application/json")
        .body(h::full(e.json().to_string()))
        .expect("a valid reply")
}

/// The request's one message: the body of a unary call, the one envelope of a server
/// stream, expanded when the client compressed it.
pub async fn one_message(
    body: Incoming,
    streaming: bool,
    compression: Compression,
) -> Result<Bytes, Error> {
    let whole = h::read(body, MAX_MESSAGE + 5).await.map_err(|_| {
        Error::new(
            "resource_exhausted",
            format!("a message is at most {MAX_MESSAGE} bytes"),
        )
    })?;
    if !streaming {
        return compression.expand(whole);
    }
    let mut r = Envelopes {
        compression,
        ..Default::default()
    };
    r.buf.extend_from_slice(&whole);
    match r.take()? {
        Some((_, m)) => Ok(m),
        None => Err(Error::new(
            "invalid_argument",
            "a stream call needs one message",
        )),
    }
}

/// Envelopes parsed out of a stream of bytes.
#[derive(Default)]
pub struct Envelopes {
    buf: BytesMut,
    /// How compressed envelopes' messages were compressed.
    compression: Compression,
}

impl Envelopes {
    /// The next whole envelope in what was fed: `(flags, message)`.
    pub fn take(&mut self) -> Result<Option<(u8, Bytes)>, Error> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        let flags = self.buf[0];
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if len > MAX_MESSAGE {
            return Err(Error::new(
                "resource_exhausted",
                format!("a message is at most {MAX_MESSAGE} bytes, not {len}"),
            ));
        }
        let compressed = flags & COMPRESSED != 0;
        if compressed && self.compression == Compression::Identity {
            return Err(Error::new(
                "invalid_argument",
                "a compressed message in a stream that named no connect-content-encoding",
            ));
        }
        if self.buf.len() < 5 + len {
            return Ok(None);
        }
        self.buf.advance(5);
        let m = self.buf.split_to(len).freeze();
        let m = if compressed && flags & END_STREAM == 0 {
            self.compression.expand(m)?
        } else {
            m
        };
        Ok(Some((flags, m)))
    }
}

/// A client stream's messages, read as they come.
pub struct ClientStream {
    body: Incoming,
    envelopes: Envelopes,
    done: bool,
}

impl ClientStream {
    /// Reads `body`'s envelopes, compressed as `compression` says.
    pub fn new(body: Incoming, compression: Compression) -> Self {
        ClientStream {
            body,
            envelopes: Envelopes {
                compression,
                ..Default::default()
            },
            done: false,
        }
    }

    /// The next message; `None` at the end of the stream.
    pub async fn next(&mut self) -> Result<Option<Bytes>, Error> {
        loop {
            if let Some((flags, m)) = self.envelopes.take()? {
                if flags & END_STREAM != 0 {
                    self.done = true;
                    return Ok(None);
                }
                return Ok(Some(m));
            }
            if self.done {
                return Ok(None);
            }
            match self.body.frame().await {
                None => {
                    self.done = true;
                    if !self.envelopes.buf.is_empty() {
                        return Err(Error::new("invalid_argument", "a message was cut short"));
                    }
                }
                Some(Err(e)) => {
                    return Err(Error::new("canceled", format!("the client went: {e}")))
                }
                Some(Ok(f)) => {
                    if let Ok(d) = f.into_data() {
                        self.envelopes.buf.extend_from_slice(&d);
                    }
                }
            }
        }
    }
}

/// A server stream being answered.
pub struct Stream {
    tx: tokio::sync::mpsc::Sender<Result<Frame<Bytes>, std::io::Error>>,
    codec: Codec,
}

impl Stream {
    /// A stream's sender and the reply that carries it.
    pub fn open(codec: Codec) -> (Stream, Reply) {
        let (tx, body): (_, Body) = h::channel();
        let reply = Response::builder()
            .status(StatusCode::OK)
            .header("content-type", content(codec, true))
            .body(body)
            .expect("a valid reply");
        (Stream { tx, codec }, reply)
    }

    /// Sends a message; false when the client has gone.
    pub async fn send<M: prost::Message + Serialize>(&self, msg: &M) -> bool {
        self.send_raw(encode(self.codec, msg)).await
    }

    /// Sends a message already encoded with [`Self::codec`].
    pub async fn send_raw(&self, data: Bytes) -> bool {
        self.tx
            .send(Ok(Frame::data(envelope(0, &data))))
            .await
            .is_ok()
    }

    /// The stream's codec.
    pub fn codec(&self) -> Codec {
        self.codec
    }

    /// Ends the stream, with an error if any.
    pub async fn end(self, e: Option<Error>) {
        let end = match e {
            Some(e) => serde_json::json!({ "error": e.json() }),
            None => serde_json::json!({}),
        };
        let _ = self
            .tx
            .send(Ok(Frame::data(envelope(
                END_STREAM,
                end.to_string().as_bytes(),
            ))))
            .await;
    }

    /// Resolves when the client has gone.
    pub async fn closed(&self) {
        self.tx.closed().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_split_and_refuse_what_is_too_big_or_compressed() {
        let mut e = Envelopes::default();
        e.buf.extend_from_slice(&envelope(0, b"one"));
        let two = envelope(END_STREAM, b"{}");
        e.buf.extend_from_slice(&two[..3]);
        assert_eq!(e.take().unwrap(), Some((0, Bytes::from_static(b"one"))));
        assert_eq!(e.take().unwrap(), None, "half an envelope waits");
        e.buf.extend_from_slice(&two[3..]);
        assert_eq!(
            e.take().unwrap(),
            Some((END_STREAM, Bytes::from_static(b"{}")))
        );
        let mut big = Envelopes::default();
        big.buf.extend_from_slice(&[0, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(big.take().unwrap_err().code, "resource_exhausted");
        let mut z = Envelopes::default();
        z.buf.extend_from_slice(&envelope(COMPRESSED, b"x"));
        assert_eq!(z.take().unwrap_err().code, "invalid_argument");
        // gzipped, as the stream said: expanded; a bomb past the cap is refused.
        use std::io::Write;
        let gz = |data: &[u8]| {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(data).unwrap();
            e.finish().unwrap()
        };
        let mut g = Envelopes {
            compression: Compression::Gzip,
            ..Default::default()
        };
        g.buf
            .extend_from_slice(&envelope(COMPRESSED, &gz(b"hello")));
        assert_eq!(
            g.take().unwrap(),
            Some((COMPRESSED, Bytes::from_static(b"hello")))
        );
        let bomb = gz(&vec![0u8; MAX_MESSAGE + 1]);
        assert!(bomb.len() < MAX_MESSAGE);
        g.buf.extend_from_slice(&envelope(COMPRESSED, &bomb));
        assert_eq!(g.take().unwrap_err().code, "resource_exhausted");
        let mut hdrs = http::HeaderMap::new();
        hdrs.insert("content-encoding", "br".parse().unwrap());
        assert_eq!(
            Compression::of(&hdrs, false).unwrap_err().code,
            "unimplemented"
        );
    }

    #[test]
    fn content_types_name_codec_and_kind() {
        assert_eq!(content_type("application/json"), Some((Codec::Json, false)));
        assert_eq!(
            content_type("application/connect+proto; charset=x"),
            Some((Codec::Proto, true))
        );
        assert_eq!(content_type("text/plain"), None);
    }
}
