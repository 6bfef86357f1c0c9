//! The WebSocket opening handshake on the server side (RFC 6455 §4.2):
//! checking the request and building the answers.

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{request::Parts, Method, Response, StatusCode, Version};
use http_body_util::Full;

/// The response body type of every answer the gateway makes itself.
pub type Body = Full<Bytes>;

/// A plain-text answer.
pub fn text(status: StatusCode, body: impl Into<String>) -> Response<Body> {
    let mut body = body.into();
    if !body.ends_with('\n') {
        body.push('\n');
    }
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from(body)))
        .expect("valid response")
}

/// Whether a comma-separated header contains `token` (case-insensitive),
/// looking at every instance of the header.
pub fn has_token(parts: &Parts, name: header::HeaderName, token: &str) -> bool {
    parts.headers.get_all(name).iter().any(|v| {
        v.to_str()
            .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
            .unwrap_or(false)
    })
}

/// Whether the request asks for a WebSocket at all (`Upgrade: websocket`).
pub fn wants_websocket(parts: &Parts) -> bool {
    has_token(parts, header::UPGRADE, "websocket")
}

/// Checks a WebSocket handshake request; returns the `Sec-WebSocket-Accept`
/// value, or the error response to send.
pub fn validate(parts: &Parts) -> Result<String, Box<Response<Body>>> {
    let bad = |why: &str| Box::new(text(StatusCode::BAD_REQUEST, why));
    if parts.method != Method::GET {
        let mut r = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "a WebSocket handshake must use GET",
        );
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET"));
        return Err(Box::new(r));
    }
    if parts.version < Version::HTTP_11 {
        return Err(bad("a WebSocket handshake needs HTTP/1.1"));
    }
    if !wants_websocket(parts) {
        return Err(bad(
            "not a WebSocket handshake: missing `Upgrade: websocket`",
        ));
    }
    if !has_token(parts, header::CONNECTION, "upgrade") {
        return Err(bad(
            "not a WebSocket handshake: missing `Connection: Upgrade`",
        ));
    }
    match parts.headers.get(header::SEC_WEBSOCKET_VERSION) {
        None => return Err(bad("missing Sec-WebSocket-Version")),
        Some(v) if v.as_bytes() != b"13" => {
            let mut r = text(
                StatusCode::UPGRADE_REQUIRED,
                "unsupported Sec-WebSocket-Version; this server speaks 13",
            );
            r.headers_mut().insert(
                header::SEC_WEBSOCKET_VERSION,
                HeaderValue::from_static("13"),
            );
            return Err(Box::new(r));
        }
        Some(_) => {}
    }
    let key = parts
        .headers
        .get(header::SEC_WEBSOCKET_KEY)
        .ok_or_else(|| bad("missing Sec-WebSocket-Key"))?;
    if !wsframe::handshake::is_valid_key(key.as_bytes()) {
        return Err(bad(
            "invalid Sec-WebSocket-Key (must be base64 of 16 bytes)",
        ));
    }
    Ok(wsframe::handshake::accept_key(key.as_bytes()))
}

/// The `101 Switching Protocols` answer.
pub fn switching_protocols(accept: &str, protocol: Option<&str>) -> Response<Body> {
    let mut b = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::UPGRADE, "websocket")
        .header(header::CONNECTION, "Upgrade")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept);
    if let Some(p) = protocol {
        b = b.header(header::SEC_WEBSOCKET_PROTOCOL, p);
    }
    b.body(Full::new(Bytes::new())).expect("valid response")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(headers: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::builder().uri("/");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    const GOOD: &[(&str, &str)] = &[
        ("Upgrade", "WebSocket"),
        ("Connection", "keep-alive, Upgrade"),
        ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ];

    #[test]
    fn accepts_a_good_handshake() {
        assert_eq!(
            validate(&parts(GOOD)).unwrap(),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn status_for_each_defect() {
        let without = |name: &str| -> Vec<(&str, &str)> {
            GOOD.iter().copied().filter(|(k, _)| *k != name).collect()
        };
        let status = |h: &[(&str, &str)]| validate(&parts(h)).unwrap_err().status();
        assert_eq!(status(&without("Upgrade")), StatusCode::BAD_REQUEST);
        assert_eq!(status(&without("Connection")), StatusCode::BAD_REQUEST);
        assert_eq!(
            status(&without("Sec-WebSocket-Key")),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            status(&without("Sec-WebSocket-Version")),
            StatusCode::BAD_REQUEST
        );
        let mut v8 = without("Sec-WebSocket-Version");
        v8.push(("Sec-WebSocket-Version", "8"));
        let r = validate(&parts(&v8)).unwrap_err();
        assert_eq!(r.status(), StatusCode::UPGRADE_REQUIRED);
        assert_eq!(r.headers()["sec-websocket-version"], "13");
        let mut badkey = without("Sec-WebSocket-Key");
        badkey.push(("Sec-WebSocket-Key", "abc"));
        assert_eq!(status(&badkey), StatusCode::BAD_REQUEST);
    }
}
