//! Replies and request bodies: JSON answers, E2B's error body, bounded reads and streamed
//! bodies.

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};

/// What every reply's body is.
pub type Body = BoxBody<Bytes, std::io::Error>;
/// A reply.
pub type Reply = Response<Body>;

/// A whole body.
pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

/// An empty body.
pub fn empty() -> Body {
    full(Bytes::new())
}

/// `value` as JSON with `status`.
pub fn json(status: StatusCode, value: &serde_json::Value) -> Reply {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(full(value.to_string()))
        .expect("a valid reply")
}

/// A reply with no body.
pub fn status(status: StatusCode) -> Reply {
    Response::builder()
        .status(status)
        .body(empty())
        .expect("a valid reply")
}

/// E2B's error body, `{code, message}`.
pub fn error(status: StatusCode, message: impl std::fmt::Display) -> Reply {
    json(
        status,
        &serde_json::json!({"code": status.as_u16(), "message": message.to_string()}),
    )
}

/// A body fed through a channel: the sender and the body.
pub fn channel() -> (
    tokio::sync::mpsc::Sender<Result<Frame<Bytes>, std::io::Error>>,
    Body,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    (tx, StreamBody::new(stream).boxed())
}

/// Reads a whole request body of at most `cap` bytes; over it is 413.
pub async fn read(body: Incoming, cap: usize) -> Result<Bytes, Reply> {
    let limited = http_body_util::Limited::new(body, cap);
    match limited.collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is over {cap} bytes"),
        )),
        Err(e) => Err(error(
            StatusCode::BAD_REQUEST,
            format!("cannot read the request body: {e}"),
        )),
    }
}

/// A query string's parameters, percent-decoded.
pub fn query(q: Option<&str>) -> Vec<(String, String)> {
    q.unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

/// `%XX` and `+` decoded (invalid escapes kept as they are).
pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16)
                {
                    Ok(v) => {
                        out.push(v);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_decode() {
        assert_eq!(
            query(Some("path=%2Fhome%2Fuser%2Fa+b.txt&username=user&x")),
            vec![
                ("path".into(), "/home/user/a b.txt".into()),
                ("username".into(), "user".into()),
                ("x".into(), String::new())
            ]
        );
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%41"), "%zzA");
        assert_eq!(percent_decode("a%3"), "a%3");
    }
}
