//! Wire-level HTTP that the server and the proxy share: our own HTTP/1.1
//! heads ([`h1`]), the WebSocket handshake's checks and answers
//! ([`handshake`]), and the response bodies and refusals the gateway writes.

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full};

use crate::error::{Error, Kind};

pub mod h1;
pub mod handshake;

/// Errors a response body may carry (a proxied body's read error).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The response body type: our own answers, or a backend's streamed body.
pub type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// A body from bytes.
pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// An empty body.
pub fn empty() -> Body {
    full(Bytes::new())
}

/// A plain-text answer.
pub fn text(status: StatusCode, body: impl Into<String>) -> Response<Body> {
    let mut body = body.into();
    if !body.ends_with('\n') {
        body.push('\n');
    }
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(full(body))
        .expect("valid response")
}

/// The answer to a request refused with `e`: its kind's status, its context
/// as the body, and the headers the status calls for (`Retry-After`,
/// `Allow`, `Sec-WebSocket-Version`).
pub fn refusal(e: &Error) -> Response<Body> {
    let mut resp = text(e.kind.status(), e.context.as_ref());
    let h = resp.headers_mut();
    if let Some(secs) = e.retry_after_secs() {
        h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    if let Some(c) = e
        .challenge
        .as_deref()
        .and_then(|c| HeaderValue::from_str(c).ok())
    {
        h.insert(header::WWW_AUTHENTICATE, c);
    }
    match e.kind {
        Kind::MethodNotAllowed => {
            h.insert(header::ALLOW, HeaderValue::from_static("GET"));
        }
        Kind::UnsupportedVersion => {
            h.insert(
                header::SEC_WEBSOCKET_VERSION,
                HeaderValue::from_static("13"),
            );
        }
        _ => {}
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn refusals_carry_the_headers_their_status_calls_for() {
        let r = refusal(&Error::client(Kind::UnsupportedVersion, "speak 13"));
        assert_eq!(r.status(), StatusCode::UPGRADE_REQUIRED);
        assert_eq!(r.headers()["sec-websocket-version"], "13");
        let r = refusal(&Error::client(Kind::MethodNotAllowed, "GET only"));
        assert_eq!(
            (r.status().as_u16(), r.headers()["allow"].as_bytes()),
            (405, &b"GET"[..])
        );
        let r = refusal(
            &Error::gateway(Kind::RateLimited, "slow down")
                .retry_after(Duration::from_millis(1500)),
        );
        assert_eq!(
            (r.status().as_u16(), r.headers()["retry-after"].as_bytes()),
            (429, &b"2"[..])
        );
        let r = refusal(&Error::upstream(Kind::BackendTimeout, "late"));
        assert_eq!(r.status(), StatusCode::GATEWAY_TIMEOUT);
        assert!(r.headers().get("retry-after").is_none());
    }
}
