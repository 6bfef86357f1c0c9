//! Reverse proxying to HTTP and WebSocket backends (RFC 7230 §6.7, RFC 6455,
//! RFC 8441, RFC 7239).
//!
//! * **Plain HTTP** requests go through a pooled keep-alive hyper client, with
//!   streaming bodies both ways.
//! * **WebSocket handshakes**, from HTTP/1.1 (`Upgrade`) or HTTP/2 (extended
//!   CONNECT), become an HTTP/1.1 `GET` + `Upgrade` on a **fresh** backend
//!   connection — an upgraded connection never goes back to a pool. HTTP/2
//!   carries no `Sec-WebSocket-Key`, so one is generated; the backend's
//!   `Sec-WebSocket-Accept` is always checked (502 when wrong). Any answer
//!   other than 101 is relayed to the client as it is.
//!
//! Hop-by-hop headers (`Connection` and every header it names, `Keep-Alive`,
//! `Proxy-*`, `TE`, `Trailer`, `Transfer-Encoding`, `Upgrade`) are dropped and
//! regenerated; `Sec-WebSocket-Key`, `-Version`, `-Protocol` and `-Extensions`
//! pass end to end, so subprotocols and permessage-deflate are negotiated
//! between client and backend. `X-Forwarded-For`, `-Proto`, `-Host` and
//! `Forwarded` are added; values a client sent are kept (and appended to)
//! only when the client is a trusted proxy.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};
use tokio_rustls::TlsConnector;
use tracing::warn;

use crate::config::Forwarding;
use crate::error::{Error, Kind};
use crate::http::handshake::{self, Upgrade};
use crate::http::{h1 as http1, Body, BoxError};
use crate::limits::{PacedBody, SharedBandwidth};
use crate::metrics::Metrics;

pub mod backend;
pub mod headers;
pub mod passthrough;

use backend::{BackendIo, Lease, Pool};
use headers::{
    add_forwarded, connection_names, copy_end_to_end, forwarded, hop_by_hop, regenerated,
    request_host,
};

/// How a backend answered a WebSocket handshake.
pub enum Handshake {
    /// With a valid 101: the answer for the client, and the backend's socket.
    Switched(handshake::Accepted, BackendWebSocket),
    /// With anything else (401, 403, 404, 5xx...): relayed to the client as
    /// it is, its body streamed from the backend.
    Answered(Response<Body>),
}

/// A backend WebSocket whose handshake succeeded.
pub struct BackendWebSocket {
    pub io: BackendIo,
    /// Bytes the backend sent right after its answer head.
    pub leftover: Bytes,
    pub lease: Lease,
    /// Connect + handshake time.
    pub latency: Duration,
}

/// The proxy: forwarding rules, the pooled client for plain HTTP and TLS
/// towards `wss://` / `https://` backends.
pub struct Proxy {
    client: Client<HttpsConnector<HttpConnector>, PacedBody<Incoming>>,
    tls: TlsConnector,
    metrics: Metrics,
    forwarding: Forwarding,
    connect_timeout: Duration,
    answer_timeout: Duration,
}

/// The TLS client configuration for backends: `config` from `[backend_tls]`,
/// or the built-in Mozilla roots. No ALPN: the users set their own.
fn backend_tls_base(config: Option<Arc<rustls::ClientConfig>>) -> rustls::ClientConfig {
    match config {
        Some(c) => (*c).clone(),
        None => (*crate::tls::backend_client_config(None, None)
            .expect("a TLS client configuration from the built-in roots"))
        .clone(),
    }
}

/// A [`TlsConnector`] for WebSocket backends and health checks, offering
/// `http/1.1` by ALPN (a WebSocket handshake is HTTP/1.1).
pub fn backend_tls_connector(config: Option<Arc<rustls::ClientConfig>>) -> TlsConnector {
    let mut c = backend_tls_base(config);
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    TlsConnector::from(Arc::new(c))
}

impl Proxy {
    pub fn new(
        forwarding: Forwarding,
        connect_timeout: Duration,
        answer_timeout: Duration,
        backend_tls: Option<Arc<rustls::ClientConfig>>,
        metrics: Metrics,
    ) -> Proxy {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(connect_timeout));
        connector.set_nodelay(true);
        // `https://` URIs reach the TLS layer below.
        connector.enforce_http(false);
        let tls = backend_tls_connector(backend_tls.clone());
        // hyper-rustls sets ALPN itself (`http/1.1`, from `enable_http1`).
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(backend_tls_base(backend_tls))
            .https_or_http()
            .enable_http1()
            .wrap_connector(connector);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(64)
            .build(connector);
        Proxy {
            client,
            tls,
            metrics,
            forwarding,
            connect_timeout,
            answer_timeout,
        }
    }

    /// The TLS client for backends (health checks use it too).
    pub fn tls_connector(&self) -> TlsConnector {
        self.tls.clone()
    }

    /// Forwards a plain HTTP request to a backend of `pool` and streams the
    /// answer back; with `pace` (the subject's `per_identity_bandwidth`),
    /// both bodies are paced by it.
    pub async fn forward(
        &self,
        pool: &Pool,
        parts: Parts,
        body: Incoming,
        pace: Option<&Arc<SharedBandwidth>>,
        remote: SocketAddr,
        secure: bool,
    ) -> Result<Response<Body>, Error> {
        let lease = pool.pick().ok_or_else(unavailable)?;
        let addr = &lease.backend.addr;
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let scheme = if addr.tls { "https" } else { "http" };
        let uri: Uri = format!("{scheme}://{addr}{path}").parse().map_err(|e| {
            Error::upstream(Kind::BackendBadAnswer, "cannot build backend URI").because(e)
        })?;
        let mut headers = HeaderMap::new();
        copy_end_to_end(&parts.headers, &mut headers);
        let host = request_host(&parts);
        if let Some(h) = &host {
            headers.insert(header::HOST, h.clone());
        }
        add_forwarded(
            &self.forwarding,
            &mut headers,
            remote,
            secure,
            host.as_ref(),
        );
        let mut req = Request::new(PacedBody::new(body, pace, true));
        *req.method_mut() = parts.method;
        *req.uri_mut() = uri;
        *req.version_mut() = Version::HTTP_11;
        *req.headers_mut() = headers;
        let resp = match tokio::time::timeout(self.answer_timeout, self.client.request(req)).await {
            Err(_) => {
                return Err(Error::upstream(
                    Kind::BackendTimeout,
                    format!(
                        "backend {addr} did not answer within {:?}",
                        self.answer_timeout
                    ),
                ))
            }
            Ok(Err(e)) if e.is_connect() => {
                pool.eject(&lease.backend);
                if lease.backend.health_changed(false) {
                    self.metrics.backend_up(&lease.backend.label, false);
                }
                return Err(if timed_out(&e) {
                    Error::upstream(
                        Kind::BackendTimeout,
                        format!("backend {addr}: connect timed out"),
                    )
                } else {
                    Error::upstream(
                        Kind::BackendConnect,
                        format!("backend {addr}: cannot connect: {}", root_cause(&e)),
                    )
                });
            }
            Ok(Err(e)) => {
                return Err(Error::upstream(
                    Kind::BackendBadAnswer,
                    format!("backend {addr}: {}", root_cause(&e)),
                ))
            }
            Ok(Ok(r)) => r,
        };
        pool.readmit(&lease.backend);
        if lease.backend.health_changed(true) {
            self.metrics.backend_up(&lease.backend.label, true);
        }
        // The lease ends with the answer's head; the pooled client owns the
        // connection afterwards.
        drop(lease);
        Ok(relay_response(resp, pace))
    }

    /// Opens a backend WebSocket for a client handshake: a fresh connection,
    /// the handshake written and its answer read by [`crate::http::h1`]. A
    /// 101 gives the answer for the client and the backend's socket; any
    /// other answer is relayed as it is ([`Handshake::Answered`]).
    pub async fn open_websocket(
        &self,
        pool: &Pool,
        parts: &Parts,
        upgrade: &Upgrade,
        remote: SocketAddr,
        secure: bool,
    ) -> Result<Handshake, Error> {
        // The client's key goes on as it is, so the accept the backend must
        // answer with is the one already computed for the client; RFC 8441
        // carries no key, so one is made up for an h2 client.
        let made_up;
        let (key, expected) = match upgrade {
            Upgrade::H1 { key, accept } => (key, accept),
            Upgrade::H2 => {
                let key = wsframe::handshake::generate_key();
                let accept = wsframe::handshake::accept_key(key.as_bytes());
                made_up = [key, accept]
                    .map(|v| HeaderValue::try_from(v).expect("base64 is a valid header value"));
                (&made_up[0], &made_up[1])
            }
        };
        // The request head is written straight from the client's headers: on
        // the path of every proxied handshake, no header table is built.
        let host = request_host(parts);
        let forwarded = forwarded(
            &self.forwarding,
            &parts.headers,
            remote,
            secure,
            host.as_ref(),
        );
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        // Room for the request and then the answer head, read into it.
        let mut buf = BytesMut::with_capacity(4096);
        http1::put_request_line(&mut buf, &http::Method::GET, path);
        let mut put = |name: &[u8], value: &[u8]| http1::put_header(&mut buf, name, value);
        if let Some(h) = &host {
            put(b"host", h.as_bytes());
        }
        let named = connection_names(&parts.headers);
        for (k, v) in &parts.headers {
            if !regenerated(k.as_str(), &named, forwarded.is_some()) {
                put(k.as_str().as_bytes(), v.as_bytes());
            }
        }
        put(b"upgrade", b"websocket");
        put(b"connection", b"Upgrade");
        put(b"sec-websocket-version", b"13");
        put(b"sec-websocket-key", key.as_bytes());
        if let Some(f) = &forwarded {
            for (name, v) in f.pairs() {
                // Built from header values (which never hold CR or LF: `http`
                // refuses them) and an address, so written without a scan.
                if let Some(v) = v {
                    debug_assert!(!v.bytes().any(|b| b == b'\r' || b == b'\n'));
                    put(name.as_bytes(), v.as_bytes());
                }
            }
        }
        buf.extend_from_slice(b"\r\n");

        let started = Instant::now();
        let lease = pool.pick().ok_or_else(unavailable)?;
        let addr = &lease.backend.addr;
        // The request goes out with the connect where it can (see
        // `connect_sending`); the rest of it within the answer timeout.
        let (mut conn, sent) = match tokio::time::timeout(
            self.connect_timeout,
            backend::connect_sending(&lease.backend, &self.tls, &buf),
        )
        .await
        {
            Ok(Ok(s)) => s,
            failed => {
                pool.eject(&lease.backend);
                if lease.backend.health_changed(false) {
                    self.metrics.backend_up(&lease.backend.label, false);
                }
                return Err(match failed {
                    Ok(Err(e)) => Error::upstream(
                        Kind::BackendConnect,
                        format!("backend {addr}: cannot connect: {e}"),
                    ),
                    _ => Error::upstream(
                        Kind::BackendTimeout,
                        format!(
                            "backend {addr}: connect timed out after {:?}",
                            self.connect_timeout
                        ),
                    ),
                });
            }
        };

        let answer = tokio::time::timeout(self.answer_timeout, async {
            conn.write_all(&buf[sent..]).await?;
            conn.flush().await?;
            buf.clear();
            read_response_head(&mut conn, &mut buf).await
        })
        .await;
        let answer = match answer {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => {
                return Err(Error::upstream(
                    Kind::BackendBadAnswer,
                    format!("backend {addr}: {e}"),
                ))
            }
            Err(_) => {
                return Err(Error::upstream(
                    Kind::BackendTimeout,
                    format!(
                        "backend {addr} did not answer the handshake within {:?}",
                        self.answer_timeout
                    ),
                ))
            }
        };
        let latency = started.elapsed();
        pool.readmit(&lease.backend);
        if lease.backend.health_changed(true) {
            self.metrics.backend_up(&lease.backend.label, true);
        }
        lease
            .backend
            .latency
            .get_or_init(|| self.metrics.backend_latency_series(&lease.backend.label))
            .observe(latency.as_secs_f64());
        let switched = match answer {
            Answer::Switched(s) => s,
            // 401, 403, 404, 5xx...: the client sees the backend's own answer.
            Answer::Other(head) => {
                return relay_answer(addr, &head, conn, buf).map(Handshake::Answered)
            }
        }
        .map_err(|e| Error::upstream(Kind::BackendBadAnswer, format!("backend {addr}: {e}")))?;
        if !switched.accept_is(expected.as_bytes()) || !switched.upgrade_ok {
            warn!(backend = %addr, "backend answered 101 with a wrong Sec-WebSocket-Accept or Upgrade");
            return Err(Error::upstream(
                Kind::BackendBadAnswer,
                format!(
                    "backend {addr} answered the WebSocket handshake wrongly (Sec-WebSocket-Accept or Upgrade)"
                ),
            ));
        }
        // A subprotocol that is not plain text is left out, as before.
        let protocol = switched.protocol.filter(|v| v.to_str().is_ok());
        let mut out = handshake::Accepted::new(upgrade, protocol, switched.extensions);
        // Other end-to-end headers of the backend's answer (cookies...) pass too.
        out.others = switched.others;
        Ok(Handshake::Switched(
            out,
            BackendWebSocket {
                io: conn,
                // Copied out (rarely anything): the read buffer is freed now.
                leftover: Bytes::copy_from_slice(&buf),
                lease,
                latency,
            },
        ))
    }
}

/// What the gateway takes from a backend's `101`, read from the lines of its
/// head as sent: on the path of every proxied handshake no header table is
/// built for it (the client's answer is built anyway). Header values are
/// slices of the head's buffer.
#[derive(Default)]
struct Switched {
    /// The first `Sec-WebSocket-Accept` value.
    accept: Option<HeaderValue>,
    /// `Upgrade` names `websocket`.
    upgrade_ok: bool,
    /// The first `Sec-WebSocket-Protocol` and `-Extensions` values.
    protocol: Option<HeaderValue>,
    extensions: Option<HeaderValue>,
    /// Other end-to-end headers (cookies...): rarely any.
    others: Vec<(HeaderName, HeaderValue)>,
}

impl Switched {
    fn read(lines: &[httparse::Header<'_>], head: &Bytes) -> Result<Switched, http1::HeadError> {
        let value = |raw: &[u8]| {
            HeaderValue::from_maybe_shared(head.slice_ref(raw))
                .map_err(|_| http1::HeadError::Invalid("value"))
        };
        // Headers the `Connection` header names are hop-by-hop too.
        let named = |name: &str| {
            lines
                .iter()
                .filter(|l| l.name.eq_ignore_ascii_case("connection"))
                .any(|l| handshake::list_has_token(l.value, name))
        };
        let mut s = Switched::default();
        for l in lines {
            let n = l.name;
            if n.eq_ignore_ascii_case("sec-websocket-accept") {
                if s.accept.is_none() {
                    s.accept = Some(value(l.value)?);
                }
            } else if n.eq_ignore_ascii_case("upgrade") {
                s.upgrade_ok |= handshake::list_has_token(l.value, "websocket");
            } else if n.eq_ignore_ascii_case("sec-websocket-protocol") {
                if s.protocol.is_none() {
                    s.protocol = Some(value(l.value)?);
                }
            } else if n.eq_ignore_ascii_case("sec-websocket-extensions") {
                if s.extensions.is_none() {
                    s.extensions = Some(value(l.value)?);
                }
            } else if !n.eq_ignore_ascii_case("connection") {
                let name = HeaderName::from_bytes(n.as_bytes())
                    .map_err(|_| http1::HeadError::Invalid("name"))?;
                let k = name.as_str();
                if !(hop_by_hop(k, named)
                    || k.starts_with("sec-websocket-")
                    || k == "content-length")
                {
                    s.others.push((name, value(l.value)?));
                }
            }
        }
        Ok(s)
    }

    /// Whether the backend's (first) accept is `expected`.
    fn accept_is(&self, expected: &[u8]) -> bool {
        self.accept
            .as_ref()
            .is_some_and(|a| a.as_bytes() == expected)
    }
}

/// A backend's answer to a WebSocket handshake.
enum Answer {
    /// A 101, read from its lines as it was parsed.
    Switched(Result<Switched, http1::HeadError>),
    /// Anything else: the head's bytes, parsed again in full to be relayed.
    Other(Bytes),
}

/// The client's copy of a backend's answer other than 101 (401, 403, 404,
/// 5xx...): its status, end-to-end headers and body, the body read from the
/// backend's socket as the client takes it.
fn relay_answer(
    addr: &crate::config::BackendAddr,
    head: &Bytes,
    conn: BackendIo,
    buf: BytesMut,
) -> Result<Response<Body>, Error> {
    let bad = |e: &dyn std::fmt::Display| {
        Error::upstream(Kind::BackendBadAnswer, format!("backend {addr}: {e}"))
    };
    let head = match http1::parse_response(head) {
        Ok(Some((head, _))) => head,
        Ok(None) => unreachable!("a complete head parses again"),
        Err(e) => return Err(bad(&e)),
    };
    let framing = http1::response_framing(head.status, &head.headers).map_err(|e| bad(&e))?;
    let mut out = Response::new(
        RelayedBody {
            io: conn,
            buf,
            framing,
            chunked: http1::ChunkedDecoder::default(),
        }
        .boxed_unsync(),
    );
    *out.status_mut() = head.status;
    copy_end_to_end(&head.headers, out.headers_mut());
    if !matches!(framing, http1::Framing::Length(_)) {
        out.headers_mut().remove(header::CONTENT_LENGTH);
    }
    Ok(out)
}

/// Reads a backend's answer head into `buf` (informational answers other
/// than 101 are skipped); on return `buf` holds what followed the head.
async fn read_response_head(conn: &mut BackendIo, buf: &mut BytesMut) -> std::io::Result<Answer> {
    use std::io::{Error, ErrorKind};
    loop {
        if !buf.is_empty() {
            // Frozen so that header values can share it.
            let read = std::mem::take(buf).freeze();
            let parsed = http1::parse_response_lines(&read, |status, lines| {
                let switched = (status == StatusCode::SWITCHING_PROTOCOLS)
                    .then(|| Switched::read(lines, &read));
                (status, switched)
            });
            match parsed {
                Ok(Some(((status, switched), len))) => {
                    // What follows the head (rarely anything) is copied out.
                    *buf = BytesMut::from(&read[len..]);
                    if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
                        continue;
                    }
                    return Ok(match switched {
                        Some(s) => Answer::Switched(s),
                        None => Answer::Other(read.slice(..len)),
                    });
                }
                Ok(None) => *buf = http1::unfreeze(read),
                Err(e) => return Err(Error::new(ErrorKind::InvalidData, e)),
            }
        }
        buf.reserve(4096);
        if conn.read_buf(buf).await? == 0 {
            return Err(Error::new(
                ErrorKind::UnexpectedEof,
                "closed the connection before answering the handshake",
            ));
        }
    }
}

/// The body of a backend's non-101 answer to a WebSocket handshake, read from
/// the backend's socket as the client takes it (at most one read ahead).
struct RelayedBody {
    io: BackendIo,
    buf: BytesMut,
    framing: http1::Framing,
    chunked: http1::ChunkedDecoder,
}

impl http_body::Body for RelayedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        use http1::Framing;
        let this = &mut *self;
        loop {
            match this.framing {
                Framing::Empty | Framing::Length(0) => return Poll::Ready(None),
                Framing::Length(left) if !this.buf.is_empty() => {
                    let n = left.min(this.buf.len() as u64) as usize;
                    this.framing = Framing::Length(left - n as u64);
                    let data = this.buf.split_to(n).freeze();
                    return Poll::Ready(Some(Ok(http_body::Frame::data(data))));
                }
                Framing::Eof if !this.buf.is_empty() => {
                    let data = this.buf.split().freeze();
                    return Poll::Ready(Some(Ok(http_body::Frame::data(data))));
                }
                Framing::Chunked => match this.chunked.decode(&mut this.buf) {
                    Ok(http1::Chunk::Data(d)) => {
                        return Poll::Ready(Some(Ok(http_body::Frame::data(d))))
                    }
                    Ok(http1::Chunk::Done) => {
                        this.framing = Framing::Empty;
                        continue;
                    }
                    Ok(http1::Chunk::NeedMore) => {}
                    Err(e) => return Poll::Ready(Some(Err(Box::new(e)))),
                },
                _ => {}
            }
            let mut chunk = [0u8; 8192];
            let mut rb = ReadBuf::new(&mut chunk);
            if let Err(e) = ready!(Pin::new(&mut this.io).poll_read(cx, &mut rb)) {
                return Poll::Ready(Some(Err(Box::new(e))));
            }
            if rb.filled().is_empty() {
                if this.framing == Framing::Eof {
                    this.framing = Framing::Empty;
                    continue;
                }
                let e = std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "backend closed the connection in the middle of its answer",
                );
                return Poll::Ready(Some(Err(Box::new(e))));
            }
            this.buf.extend_from_slice(rb.filled());
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(
            self.framing,
            http1::Framing::Empty | http1::Framing::Length(0)
        )
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self.framing {
            http1::Framing::Empty => http_body::SizeHint::with_exact(0),
            http1::Framing::Length(n) => http_body::SizeHint::with_exact(n),
            _ => http_body::SizeHint::default(),
        }
    }
}

/// A backend's answer for the client: its status, end-to-end headers and
/// streamed body (paced by `pace`, the subject's bandwidth, when set).
pub(crate) fn relay_response(
    resp: Response<Incoming>,
    pace: Option<&Arc<SharedBandwidth>>,
) -> Response<Body> {
    let (parts, body) = resp.into_parts();
    let body = match pace {
        None => body.map_err(|e| Box::new(e) as BoxError).boxed_unsync(),
        Some(_) => PacedBody::new(body, pace, false)
            .map_err(|e| Box::new(e) as BoxError)
            .boxed_unsync(),
    };
    let mut out = Response::new(body);
    *out.status_mut() = parts.status;
    copy_end_to_end(&parts.headers, out.headers_mut());
    out
}

/// 503 when every backend of a pool is ejected.
fn unavailable() -> Error {
    Error::upstream(Kind::BackendUnavailable, "no backend available")
        .retry_after(Duration::from_secs(1))
}

/// Whether a hyper client error was caused by a connect timeout (the
/// connector reports an `io::Error` of kind `TimedOut`).
fn timed_out(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(e) = cur {
        if e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
        {
            return true;
        }
        cur = e.source();
    }
    false
}

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn switched(head: &str) -> Result<Switched, http1::HeadError> {
        let head = Bytes::copy_from_slice(head.as_bytes());
        let ((status, s), len) =
            http1::parse_response_lines(&head, |status, l| (status, Switched::read(l, &head)))
                .unwrap()
                .unwrap();
        assert_eq!((status, len), (StatusCode::SWITCHING_PROTOCOLS, head.len()));
        s
    }

    #[test]
    fn a_backends_101_is_read_from_its_lines() {
        let s = switched(
            "HTTP/1.1 101 Switching Protocols\r\nUPGRADE: WebSocket\r\nConnection: Upgrade, X-Hop\r\n\
             Sec-WebSocket-Accept: abc=\r\nsec-websocket-accept: second\r\n\
             Sec-WebSocket-Protocol: chat\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\
             X-Hop: 1\r\nKeep-Alive: timeout=5\r\nContent-Length: 0\r\nSet-Cookie: a=b\r\n\r\n",
        )
        .unwrap();
        assert!(s.upgrade_ok);
        assert!(s.accept_is(b"abc="));
        assert!(!s.accept_is(b"second"));
        assert_eq!(s.protocol.unwrap(), "chat");
        assert_eq!(s.extensions.unwrap(), "permessage-deflate");
        // Only the end-to-end header passes, its name in lower case.
        let others: Vec<_> = s
            .others
            .iter()
            .map(|(k, v)| (k.as_str(), v.to_str().unwrap()))
            .collect();
        assert_eq!(others, [("set-cookie", "a=b")]);
    }

    #[test]
    fn a_backends_101_without_websocket_or_accept_is_caught() {
        let s = switched("HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n").unwrap();
        assert!(!s.upgrade_ok);
        assert!(!s.accept_is(b""));
        // A value with a control character is refused before any line is read.
        let bad = b"HTTP/1.1 101 OK\r\nSet-Cookie: a\x7fb\r\n\r\n";
        assert!(http1::parse_response_lines(bad, |_, _| ()).is_err());
    }
}
