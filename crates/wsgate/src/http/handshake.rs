//! The WebSocket opening handshake on the server side (RFC 6455 §4.2):
//! checking the request and building the answers.

use bytes::BytesMut;
use http::header::{self, HeaderValue};
use http::{request::Parts, Method, Response, StatusCode, Version};

use super::{empty, Body};
use crate::error::{Error, Kind};

/// Which kind of WebSocket handshake a request is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upgrade {
    /// HTTP/1.1 `GET` + `Upgrade: websocket`; answered with 101. The key is
    /// the client's own header value (shared, not copied); the accept is
    /// computed once, and a proxy that forwards the key expects it back.
    H1 {
        key: HeaderValue,
        accept: HeaderValue,
    },
    /// HTTP/2 extended CONNECT with `:protocol = websocket` (RFC 8441); answered with 200.
    H2,
}

/// Whether the request is an HTTP/2 extended CONNECT (any `:protocol`).
pub fn is_extended_connect(parts: &Parts) -> bool {
    parts.method == Method::CONNECT && parts.extensions.get::<hyper::ext::Protocol>().is_some()
}

/// Whether the request asks for a WebSocket in either HTTP version.
pub fn is_websocket_request(parts: &Parts) -> bool {
    wants_websocket(parts) || is_extended_connect(parts)
}

/// Whether a comma-separated header contains `token` (case-insensitive),
/// looking at every instance of the header.
pub fn has_token(parts: &Parts, name: header::HeaderName, token: &str) -> bool {
    header_has_token(&parts.headers, name, token)
}

/// permessage-deflate for a handshake the gateway terminates: the
/// parameters agreed from the request's `Sec-WebSocket-Extensions` under
/// `config` (docs/deflate.md), and the answer's header value; `None`: the
/// WebSocket goes uncompressed (no offer, or none acceptable).
pub fn deflate(
    parts: &Parts,
    config: Option<&wsframe::deflate::Config>,
) -> Option<(wsframe::deflate::Agreed, HeaderValue)> {
    let config = config?;
    let values = parts.headers.get_all(header::SEC_WEBSOCKET_EXTENSIONS);
    let agreed = wsframe::deflate::negotiate(values.iter().map(HeaderValue::as_bytes), config)?;
    let answer = HeaderValue::try_from(agreed.response()).expect("tokens are a valid header value");
    Some((agreed, answer))
}

/// Whether a comma-separated header of `headers` contains `token`.
pub fn header_has_token(headers: &http::HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .any(|v| list_has_token(v.as_bytes(), token))
}

/// Whether the comma-separated list `value` (a header value, bytes as sent)
/// contains `token`, compared case-insensitively, spaces around items
/// ignored. Read as bytes: no UTF-8 check, no `str` searcher, on the path of
/// every handshake (several times).
pub fn list_has_token(value: &[u8], token: &str) -> bool {
    let token = token.as_bytes();
    // The usual values: too short to hold the token, or exactly the token.
    if value.len() < token.len() {
        return false;
    }
    if value.eq_ignore_ascii_case(token) {
        return true;
    }
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// Whether the request asks for a WebSocket at all (`Upgrade: websocket`).
pub fn wants_websocket(parts: &Parts) -> bool {
    has_token(parts, header::UPGRADE, "websocket")
}

fn check_version(parts: &Parts) -> Result<(), Error> {
    match parts.headers.get(header::SEC_WEBSOCKET_VERSION) {
        None => Err(Error::client(
            Kind::BadHandshake,
            "missing Sec-WebSocket-Version",
        )),
        Some(v) if v.as_bytes() != b"13" => Err(Error::client(
            Kind::UnsupportedVersion,
            "unsupported Sec-WebSocket-Version; this server speaks 13",
        )),
        Some(_) => Ok(()),
    }
}

/// Checks a CONNECT request: only an extended CONNECT for a WebSocket
/// (RFC 8441) is served.
pub fn check_connect(parts: &Parts) -> Result<(), Error> {
    match parts.extensions.get::<hyper::ext::Protocol>() {
        Some(p) if p.as_str().eq_ignore_ascii_case("websocket") => Ok(()),
        Some(p) => Err(Error::client(
            Kind::UnsupportedProtocol,
            format!(
                "unsupported :protocol `{}`; only `websocket` is served",
                p.as_str()
            ),
        )),
        None => Err(Error::client(
            Kind::MethodNotAllowed,
            "CONNECT is only served as extended CONNECT with :protocol websocket",
        )),
    }
}

/// Checks a WebSocket handshake of either HTTP version.
pub fn validate(parts: &Parts) -> Result<Upgrade, Error> {
    if parts.method == Method::CONNECT {
        check_connect(parts)?;
        check_version(parts)?;
        return Ok(Upgrade::H2);
    }
    let key = validate_h1(parts)?;
    let accept = HeaderValue::try_from(wsframe::handshake::accept_key(key.as_bytes()))
        .expect("base64 is a valid header value");
    Ok(Upgrade::H1 { key, accept })
}

/// Checks an HTTP/1.1 WebSocket handshake; returns its `Sec-WebSocket-Key`.
fn validate_h1(parts: &Parts) -> Result<HeaderValue, Error> {
    let bad = |why: &'static str| Error::client(Kind::BadHandshake, why);
    if parts.method != Method::GET {
        return Err(Error::client(
            Kind::MethodNotAllowed,
            "a WebSocket handshake must use GET",
        ));
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
    check_version(parts)?;
    let key = parts
        .headers
        .get(header::SEC_WEBSOCKET_KEY)
        .ok_or_else(|| bad("missing Sec-WebSocket-Key"))?;
    if !wsframe::handshake::is_valid_key(key.as_bytes()) {
        return Err(bad(
            "invalid Sec-WebSocket-Key (must be base64 of 16 bytes)",
        ));
    }
    Ok(key.clone())
}

/// The success answer to a WebSocket handshake, before it is written:
/// `101 Switching Protocols` over HTTP/1.1, `200` for an extended CONNECT
/// over HTTP/2; with the selected subprotocol and extensions, and (proxied)
/// the backend's other end-to-end headers. A connection's first request
/// gets it written straight into its buffer ([`Accepted::encode_h1`]), with
/// no header table built; hyper gets a `Response` ([`Accepted::into_response`]).
#[derive(Debug)]
pub struct Accepted {
    /// `Sec-WebSocket-Accept` (HTTP/1.1); `None`: HTTP/2.
    accept: Option<HeaderValue>,
    protocol: Option<HeaderValue>,
    extensions: Option<HeaderValue>,
    /// Other headers, written after those.
    pub others: Vec<(header::HeaderName, HeaderValue)>,
}

impl Accepted {
    pub fn new(
        upgrade: &Upgrade,
        protocol: Option<HeaderValue>,
        extensions: Option<HeaderValue>,
    ) -> Accepted {
        Accepted {
            accept: match upgrade {
                Upgrade::H1 { accept, .. } => Some(accept.clone()),
                Upgrade::H2 => None,
            },
            protocol,
            extensions,
            others: Vec::new(),
        }
    }

    /// The status: 101 over HTTP/1.1, 200 over HTTP/2.
    pub fn status(&self) -> StatusCode {
        if self.accept.is_some() {
            StatusCode::SWITCHING_PROTOCOLS
        } else {
            StatusCode::OK
        }
    }

    /// The headers in the order they are written.
    fn headers(&self) -> impl Iterator<Item = (&str, &[u8])> {
        let h1 = self.accept.as_ref().map(|a| {
            [
                ("upgrade", &b"websocket"[..]),
                ("connection", &b"Upgrade"[..]),
                ("sec-websocket-accept", a.as_bytes()),
            ]
        });
        h1.into_iter()
            .flatten()
            .chain(
                self.protocol
                    .iter()
                    .map(|p| ("sec-websocket-protocol", p.as_bytes())),
            )
            .chain(
                self.extensions
                    .iter()
                    .map(|e| ("sec-websocket-extensions", e.as_bytes())),
            )
            .chain(self.others.iter().map(|(k, v)| (k.as_str(), v.as_bytes())))
    }

    /// Appends the HTTP/1.1 answer head (what `into_response` would give,
    /// written as [`crate::http1::encode_response_head`] writes one).
    pub fn encode_h1(&self, out: &mut BytesMut) {
        super::h1::put_status_line(out, self.status());
        for (k, v) in self.headers() {
            super::h1::put_header(out, k.as_bytes(), v);
        }
        out.extend_from_slice(b"\r\n");
    }

    pub fn into_response(self) -> Response<Body> {
        let mut r = Response::new(empty());
        *r.status_mut() = self.status();
        let h = r.headers_mut();
        h.reserve(5 + self.others.len());
        if let Some(accept) = self.accept {
            h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
            h.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
        }
        if let Some(p) = self.protocol {
            h.insert(header::SEC_WEBSOCKET_PROTOCOL, p);
        }
        if let Some(e) = self.extensions {
            h.insert(header::SEC_WEBSOCKET_EXTENSIONS, e);
        }
        for (k, v) in self.others {
            h.append(k, v);
        }
        r
    }
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
    fn the_written_101_is_the_response_hyper_would_write() {
        let h1 = || Upgrade::H1 {
            key: HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ=="),
            accept: HeaderValue::from_static("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        };
        let plain = Accepted::new(&h1(), None, None);
        let mut full = Accepted::new(
            &h1(),
            Some(HeaderValue::from_static("chat")),
            Some(HeaderValue::from_static("permessage-deflate")),
        );
        full.others
            .push((header::SET_COOKIE, HeaderValue::from_static("a=b")));
        for a in [plain, full] {
            let mut direct = BytesMut::new();
            a.encode_h1(&mut direct);
            let r = a.into_response();
            let mut via = BytesMut::new();
            crate::http::h1::encode_response_head(&mut via, r.status(), r.headers());
            assert_eq!(direct, via);
        }
        let mut out = BytesMut::new();
        Accepted::new(&h1(), Some(HeaderValue::from_static("chat")), None).encode_h1(&mut out);
        assert_eq!(
            &out[..],
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\
              sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nsec-websocket-protocol: chat\r\n\r\n"
        );
        let h2 = Accepted::new(&Upgrade::H2, Some(HeaderValue::from_static("chat")), None)
            .into_response();
        assert_eq!(h2.status(), StatusCode::OK);
        assert_eq!(h2.headers().len(), 1);
        assert_eq!(h2.headers()["sec-websocket-protocol"], "chat");
    }

    #[test]
    fn token_lists() {
        assert!(list_has_token(b"keep-alive, Upgrade", "upgrade"));
        assert!(list_has_token(b"Upgrade", "upgrade"));
        assert!(list_has_token(b" websocket ,h2c", "WebSocket"));
        assert!(!list_has_token(b"upgrade-please", "upgrade"));
        assert!(!list_has_token(b"", "upgrade"));
        assert!(!list_has_token(b"up grade", "upgrade"));
        // Bytes that are not UTF-8 around a token do not hide it.
        assert!(list_has_token(b"\xff\xfe, upgrade", "upgrade"));
    }

    #[test]
    fn token_list_shortcuts_agree_with_the_plain_split() {
        // Every list of up to 4 items drawn from these pieces, joined by
        // "," or ", ", against each token: the early answers (too short,
        // exactly the token) never disagree with splitting and comparing.
        let pieces: [&[u8]; 7] = [
            b"",
            b" ",
            b"Upgrade",
            b"upgrade ",
            b"up",
            b"websocketx",
            b"WebSocket",
        ];
        let plain = |v: &[u8], t: &str| {
            v.split(|&b| b == b',')
                .any(|i| i.trim_ascii().eq_ignore_ascii_case(t.as_bytes()))
        };
        let mut lists: Vec<Vec<u8>> = vec![vec![]];
        for _ in 0..4 {
            let mut next = vec![];
            for l in &lists {
                for p in pieces {
                    for sep in [&b","[..], b", "] {
                        let mut v = l.clone();
                        if !v.is_empty() {
                            v.extend_from_slice(sep);
                        }
                        v.extend_from_slice(p);
                        next.push(v);
                    }
                }
            }
            lists.extend(next);
        }
        for v in &lists {
            for t in ["upgrade", "websocket", "up", "sec-websocket-extensions"] {
                assert_eq!(
                    list_has_token(v, t),
                    plain(v, t),
                    "{:?} {t}",
                    String::from_utf8_lossy(v)
                );
            }
        }
    }

    #[test]
    fn accepts_a_good_handshake() {
        match validate(&parts(GOOD)).unwrap() {
            Upgrade::H1 { accept, key } => {
                assert_eq!(accept, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
                assert_eq!(key, "dGhlIHNhbXBsZSBub25jZQ==");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn status_for_each_defect() {
        let without = |name: &str| -> Vec<(&str, &str)> {
            GOOD.iter().copied().filter(|(k, _)| *k != name).collect()
        };
        let status = |h: &[(&str, &str)]| validate(&parts(h)).unwrap_err().kind.status();
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
        let r = crate::http::refusal(&validate(&parts(&v8)).unwrap_err());
        assert_eq!(r.status(), StatusCode::UPGRADE_REQUIRED);
        assert_eq!(r.headers()["sec-websocket-version"], "13");
        let mut badkey = without("Sec-WebSocket-Key");
        badkey.push(("Sec-WebSocket-Key", "abc"));
        assert_eq!(status(&badkey), StatusCode::BAD_REQUEST);
    }
}
