//! A sandbox's other ports: an HTTP request for port P of sandbox S (E2B's headers, or a host
//! `P-S.DOMAIN`) goes to the guest's own `127.0.0.1:P` through the agent (`connect`), and its
//! answer comes back. It needs the sandbox's traffic token (`e2b-traffic-access-token`) or
//! the user's key: other local users reach the facade's address too.

use http::StatusCode;
use hyper::body::Incoming;
use hyper::Request;

use crate::http::{self as h, Reply};
use crate::Facade;

/// Whether the request may reach sandbox `id`'s ports.
fn authorized<B>(f: &Facade, id: &str, req: &Request<B>) -> bool {
    let token = req
        .headers()
        .get("e2b-traffic-access-token")
        .and_then(|v| v.to_str().ok());
    match token {
        Some(t) => crate::key::same(t.as_bytes(), f.key.traffic_token(id).as_bytes()),
        None => crate::api::authorized(f, req),
    }
}

/// Answers a request for sandbox `id`'s port `port`.
pub async fn handle(f: &Facade, id: &str, port: u16, mut req: Request<Incoming>) -> Reply {
    use http_body_util::BodyExt;
    if !authorized(f, id, &req) {
        return h::error(
            StatusCode::UNAUTHORIZED,
            "missing or wrong traffic token: send the sandbox's trafficAccessToken as \
             e2b-traffic-access-token",
        );
    }
    if let Err(r) = f.sandbox(id).await {
        return r;
    }
    let stream = match f.open_agent(id).await {
        Ok(s) => s,
        Err(e) => return crate::api::fault(&e),
    };
    let req_line = banger_guest::agent::Request::Connect { port };
    let conn = match crate::agent::request(stream, &req_line).await {
        Ok((r, c)) if r.ok => c,
        Ok((r, _)) => return h::error(StatusCode::BAD_GATEWAY, r.error),
        Err(e) => return h::error(StatusCode::BAD_GATEWAY, e),
    };
    let stream = match conn.into_stream() {
        Ok(s) => s,
        Err(e) => return h::error(StatusCode::BAD_GATEWAY, e),
    };
    let (mut sender, connection) =
        match hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await {
            Ok(x) => x,
            Err(e) => return h::error(StatusCode::BAD_GATEWAY, e),
        };
    tokio::spawn(async move {
        let _ = connection.await;
    });
    // The guest sees the request as a plain HTTP/1.1 one for its own port.
    for hop in [
        "e2b-sandbox-id",
        "e2b-sandbox-port",
        "e2b-traffic-access-token",
        "x-api-key",
        "connection",
        "keep-alive",
        "te",
        "upgrade",
        "proxy-authorization",
    ] {
        req.headers_mut().remove(hop);
    }
    *req.version_mut() = http::Version::HTTP_11;
    if let Ok(v) = http::HeaderValue::from_str(&format!("127.0.0.1:{port}")) {
        req.headers_mut().insert("host", v);
    }
    match sender.send_request(req).await {
        Ok(resp) => resp.map(|b| b.map_err(std::io::Error::other).boxed()),
        Err(e) => h::error(
            StatusCode::BAD_GATEWAY,
            format!("the sandbox's port {port} did not answer: {e}"),
        ),
    }
}
