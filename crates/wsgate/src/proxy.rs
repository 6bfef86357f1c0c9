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

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
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

use crate::backend::{BackendIo, Lease, Pool};
use crate::handshake::{self, Body, Upgrade};
use crate::http1;
use crate::metrics::Metrics;

/// `X-Forwarded-*` / `Forwarded` policy.
#[derive(Debug, Clone)]
pub struct Forwarding {
    /// Add the forwarding headers at all.
    pub enabled: bool,
    /// Clients whose own forwarding headers are believed and appended to.
    pub trusted: Vec<IpNet>,
}

impl Default for Forwarding {
    fn default() -> Self {
        Self {
            enabled: true,
            trusted: vec![],
        }
    }
}

/// An address block, `10.0.0.0/8` or a single address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl std::str::FromStr for IpNet {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("invalid address or CIDR block `{s}`");
        let (a, p) = s.split_once('/').unwrap_or((s, ""));
        let addr: IpAddr = a.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = if p.is_empty() {
            max
        } else {
            p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(bad)?
        };
        Ok(IpNet { addr, prefix })
    }
}

impl IpNet {
    pub fn contains(&self, ip: IpAddr) -> bool {
        fn bits(ip: IpAddr) -> (u128, u8) {
            match ip {
                IpAddr::V4(v) => (u32::from(v) as u128, 32),
                IpAddr::V6(v) => (u128::from(v), 128),
            }
        }
        let ip = match ip {
            IpAddr::V6(v) => v.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        let ((net, w1), (x, w2)) = (bits(self.addr), bits(ip));
        if w1 != w2 {
            return false;
        }
        let shift = u32::from(w1 - self.prefix);
        if shift >= 128 {
            return true;
        }
        (net >> shift) == (x >> shift)
    }
}

/// Why a backend could not be used; each maps to its own status.
#[derive(Debug)]
pub enum BackendError {
    /// Every backend of the pool is ejected: 503.
    Unavailable,
    /// Connecting failed: 502.
    Connect(String),
    /// Connecting or answering took too long: 504.
    Timeout(String),
    /// The backend answered, but wrongly: 502.
    Bad(String),
}

impl BackendError {
    pub fn response(&self) -> Response<Body> {
        let (status, text) = match self {
            BackendError::Unavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "no backend available".to_string(),
            ),
            BackendError::Connect(w) | BackendError::Bad(w) => (StatusCode::BAD_GATEWAY, w.clone()),
            BackendError::Timeout(w) => (StatusCode::GATEWAY_TIMEOUT, w.clone()),
        };
        let mut r = handshake::text(status, text);
        if status == StatusCode::SERVICE_UNAVAILABLE {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r
    }

    /// A label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            BackendError::Unavailable => "backend_unavailable",
            BackendError::Connect(_) => "backend_connect",
            BackendError::Timeout(_) => "backend_timeout",
            BackendError::Bad(_) => "backend_bad_answer",
        }
    }
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

/// Forwarding headers for one request. Proto and host borrow from the
/// request unless a trusted client sent its own to append to: on the path of
/// every proxied handshake, two strings are built, not four.
struct ForwardedValues<'a> {
    xff: String,
    proto: Cow<'a, str>,
    host: Option<Cow<'a, str>>,
    forwarded: String,
}

impl ForwardedValues<'_> {
    /// Header names with their values (`None`: the header is left out).
    fn pairs(&self) -> [(&'static str, Option<&str>); 4] {
        [
            ("x-forwarded-for", Some(&self.xff)),
            ("x-forwarded-proto", Some(&self.proto)),
            ("x-forwarded-host", self.host.as_deref()),
            ("forwarded", Some(&self.forwarded)),
        ]
    }
}

/// Whether a header names something the proxy itself sets on a WebSocket
/// request to a backend (or strips): hop-by-hop headers, those `Connection`
/// names, `Host`, the key and version (always regenerated), and — when
/// `forwarding` — the forwarding headers.
fn regenerated(name: &str, connection_named: impl Fn(&str) -> bool, forwarding: bool) -> bool {
    hop_by_hop(name, connection_named)
        || name == "sec-websocket-key"
        || name == "sec-websocket-version"
        || (forwarding
            && matches!(
                name,
                "x-forwarded-for" | "x-forwarded-proto" | "x-forwarded-host" | "forwarded"
            ))
}

/// The proxy: forwarding rules, the pooled client for plain HTTP and TLS
/// towards `wss://` / `https://` backends.
pub struct Proxy {
    client: Client<HttpsConnector<HttpConnector>, Incoming>,
    tls: TlsConnector,
    metrics: Metrics,
    forwarding: Forwarding,
    connect_timeout: Duration,
    answer_timeout: Duration,
}

/// Copies the end-to-end headers of `src` into `dst`: hop-by-hop headers, the
/// headers `Connection` names, and `Host` (set by the caller) stay behind.
pub fn copy_end_to_end(src: &HeaderMap, dst: &mut HeaderMap) {
    let named = connection_names(src);
    for (k, v) in src {
        if !hop_by_hop(k.as_str(), &named) {
            dst.append(k.clone(), v.clone());
        }
    }
}

/// Whether header `name` stays behind at a hop: the hop-by-hop headers,
/// `Proxy-*`, those `Connection` names (`named`), and `Host` (set anew).
fn hop_by_hop(name: &str, named: impl Fn(&str) -> bool) -> bool {
    // One `match` (dispatched on the length first), not a scan of a list:
    // it runs for every header of every proxied request.
    matches!(
        name,
        "connection" | "keep-alive" | "te" | "trailer" | "transfer-encoding" | "upgrade" | "host"
    ) || name.starts_with("proxy-")
        || named(name)
}

/// Whether `Connection` in `h` names a header (RFC 9110 §7.6.1: that header
/// is hop-by-hop too).
fn connection_names(h: &HeaderMap) -> impl Fn(&str) -> bool + '_ {
    // Looked up once, not once per header asked about.
    let values = h.get_all(header::CONNECTION);
    move |name: &str| {
        values
            .iter()
            .any(|v| handshake::list_has_token(v.as_bytes(), name))
    }
}

/// The host the client asked for: `Host`, or HTTP/2's `:authority`.
fn request_host(parts: &Parts) -> Option<HeaderValue> {
    parts.headers.get(header::HOST).cloned().or_else(|| {
        parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    })
}

/// Appends `ip` as text. An IPv4 address is written digit by digit: on the
/// path of every proxied handshake (twice), `fmt` costs several times more.
fn push_ip(out: &mut String, ip: IpAddr) {
    use std::fmt::Write as _;
    match ip {
        IpAddr::V4(v4) => {
            for (i, o) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                if o >= 100 {
                    out.push(char::from(b'0' + o / 100));
                }
                if o >= 10 {
                    out.push(char::from(b'0' + o / 10 % 10));
                }
                out.push(char::from(b'0' + o % 10));
            }
        }
        IpAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}

/// Appends `v` as an RFC 7239 value: a token as it is, anything else quoted.
fn push_quoted_if_needed(out: &mut String, v: &str) {
    let tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if !v.is_empty() && v.bytes().all(tchar) {
        out.push_str(v);
        return;
    }
    out.push('"');
    // Runs without a backslash or a quote are copied whole (a host is one).
    let mut rest = v;
    while let Some(i) = rest.find(['\\', '"']) {
        out.push_str(&rest[..i]);
        out.push('\\');
        out.push_str(&rest[i..=i]);
        rest = &rest[i + 1..];
    }
    out.push_str(rest);
    out.push('"');
}

/// The TLS client configuration for backends: `config` from `[backend_tls]`,
/// or the built-in Mozilla roots. No ALPN: the users set their own.
fn backend_tls_base(config: Option<Arc<rustls::ClientConfig>>) -> rustls::ClientConfig {
    match config {
        Some(c) => (*c).clone(),
        None => (*crate::tls::backend_client_config(&Default::default())
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

    /// The `X-Forwarded-For`, `-Proto`, `-Host` and `Forwarded` values for a
    /// request with headers `h` (None when forwarding headers are off).
    fn forwarded<'a>(
        &self,
        h: &HeaderMap,
        remote: SocketAddr,
        secure: bool,
        host: Option<&'a HeaderValue>,
    ) -> Option<ForwardedValues<'a>> {
        use std::fmt::Write as _;
        if !self.forwarding.enabled {
            return None;
        }
        let trusted = !self.forwarding.trusted.is_empty()
            && self
                .forwarding
                .trusted
                .iter()
                .any(|n| n.contains(remote.ip()));
        // What a trusted client sent is kept and appended to; anything else
        // a client sent is replaced.
        let prior = |name: &'static str| -> Option<String> {
            let mut joined: Option<String> = None;
            if trusted {
                for v in h.get_all(name).iter().filter_map(|v| v.to_str().ok()) {
                    match &mut joined {
                        Some(j) => {
                            j.push_str(", ");
                            j.push_str(v);
                        }
                        None => joined = Some(v.to_string()),
                    }
                }
            }
            joined
        };
        let ip = remote.ip().to_canonical();
        let proto = if secure { "https" } else { "http" };
        let host = host.and_then(|v| v.to_str().ok()).unwrap_or("");

        let mut xff = String::with_capacity(48);
        if let Some(p) = prior("x-forwarded-for") {
            let _ = write!(xff, "{p}, ");
        }
        push_ip(&mut xff, ip);
        let proto_value = prior("x-forwarded-proto").map_or(Cow::Borrowed(proto), Cow::Owned);
        let host_value = match prior("x-forwarded-host") {
            Some(p) => Some(Cow::Owned(p)),
            None if !host.is_empty() => Some(Cow::Borrowed(host)),
            None => None,
        };
        let mut fwd = String::with_capacity(64);
        if let Some(p) = prior("forwarded") {
            let _ = write!(fwd, "{p}, ");
        }
        if ip.is_ipv6() {
            fwd.push_str("for=\"[");
            push_ip(&mut fwd, ip);
            fwd.push_str("]\"");
        } else {
            fwd.push_str("for=");
            push_ip(&mut fwd, ip);
        }
        fwd.push_str(";proto=");
        fwd.push_str(proto);
        if !host.is_empty() {
            fwd.push_str(";host=");
            push_quoted_if_needed(&mut fwd, host);
        }
        Some(ForwardedValues {
            xff,
            proto: proto_value,
            host: host_value,
            forwarded: fwd,
        })
    }

    /// Replaces the forwarding headers of `h` with ours.
    fn add_forwarded(
        &self,
        h: &mut HeaderMap,
        remote: SocketAddr,
        secure: bool,
        host: Option<&HeaderValue>,
    ) {
        let Some(f) = self.forwarded(h, remote, secure, host) else {
            return;
        };
        for (name, v) in f.pairs() {
            h.remove(name);
            if let Some(v) = v.and_then(|v| HeaderValue::from_str(v).ok()) {
                h.insert(HeaderName::from_static(name), v);
            }
        }
    }

    /// Forwards a plain HTTP request to a backend of `pool` and streams the answer back.
    pub async fn forward(
        &self,
        pool: &Pool,
        parts: Parts,
        body: Incoming,
        remote: SocketAddr,
        secure: bool,
    ) -> Result<Response<Body>, BackendError> {
        let lease = pool.pick().ok_or(BackendError::Unavailable)?;
        let addr = &lease.backend.addr;
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let scheme = if addr.tls { "https" } else { "http" };
        let uri: Uri = format!("{scheme}://{addr}{path}")
            .parse()
            .map_err(|e| BackendError::Bad(format!("cannot build backend URI: {e}")))?;
        let mut headers = HeaderMap::new();
        copy_end_to_end(&parts.headers, &mut headers);
        let host = request_host(&parts);
        if let Some(h) = &host {
            headers.insert(header::HOST, h.clone());
        }
        self.add_forwarded(&mut headers, remote, secure, host.as_ref());
        let mut req = Request::new(body);
        *req.method_mut() = parts.method;
        *req.uri_mut() = uri;
        *req.version_mut() = Version::HTTP_11;
        *req.headers_mut() = headers;
        let resp = match tokio::time::timeout(self.answer_timeout, self.client.request(req)).await {
            Err(_) => {
                return Err(BackendError::Timeout(format!(
                    "backend {addr} did not answer within {:?}",
                    self.answer_timeout
                )))
            }
            Ok(Err(e)) if e.is_connect() => {
                pool.eject(&lease.backend);
                if lease.backend.health_changed(false) {
                    self.metrics.backend_up(&lease.backend.label, false);
                }
                let text = format!("{e:?}");
                return Err(if text.contains("timed out") || text.contains("Timeout") {
                    BackendError::Timeout(format!("backend {addr}: connect timed out"))
                } else {
                    BackendError::Connect(format!(
                        "backend {addr}: cannot connect: {}",
                        root_cause(&e)
                    ))
                });
            }
            Ok(Err(e)) => {
                return Err(BackendError::Bad(format!(
                    "backend {addr}: {}",
                    root_cause(&e)
                )))
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
        Ok(relay_response(resp))
    }

    /// Opens a backend WebSocket for a client handshake: a fresh connection,
    /// the handshake written and its answer read by [`crate::http1`]. On
    /// success returns the answer for the client and the backend's socket; a
    /// backend's non-101 answer comes back as `Ok(Err(response))`, its body
    /// streamed, to be relayed as is.
    pub async fn open_websocket(
        &self,
        pool: &Pool,
        parts: &Parts,
        upgrade: &Upgrade,
        remote: SocketAddr,
        secure: bool,
    ) -> Result<Result<(handshake::Accepted, BackendWebSocket), Response<Body>>, BackendError> {
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
        let forwarded = self.forwarded(&parts.headers, remote, secure, host.as_ref());
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
        let lease = pool.pick().ok_or(BackendError::Unavailable)?;
        let addr = &lease.backend.addr;
        // The request goes out with the connect where it can (see
        // `connect_sending`); the rest of it within the answer timeout.
        let (mut conn, sent) = match tokio::time::timeout(
            self.connect_timeout,
            crate::backend::connect_sending(&lease.backend, &self.tls, &buf),
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
                    Ok(Err(e)) => {
                        BackendError::Connect(format!("backend {addr}: cannot connect: {e}"))
                    }
                    _ => BackendError::Timeout(format!(
                        "backend {addr}: connect timed out after {:?}",
                        self.connect_timeout
                    )),
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
            Ok(Err(e)) => return Err(BackendError::Bad(format!("backend {addr}: {e}"))),
            Err(_) => {
                return Err(BackendError::Timeout(format!(
                    "backend {addr} did not answer the handshake within {:?}",
                    self.answer_timeout
                )))
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
            Answer::Other(head) => return relay_answer(addr, &head, conn, buf).map(Err),
        }
        .map_err(|e| BackendError::Bad(format!("backend {addr}: {e}")))?;
        if !switched.accept_is(expected.as_bytes()) || !switched.upgrade_ok {
            warn!(backend = %addr, "backend answered 101 with a wrong Sec-WebSocket-Accept or Upgrade");
            return Err(BackendError::Bad(format!(
                "backend {addr} answered the WebSocket handshake wrongly (Sec-WebSocket-Accept or Upgrade)"
            )));
        }
        // A subprotocol that is not plain text is left out, as before.
        let protocol = switched.protocol.filter(|v| v.to_str().is_ok());
        let mut out = handshake::Accepted::new(upgrade, protocol, switched.extensions);
        // Other end-to-end headers of the backend's answer (cookies...) pass too.
        out.others = switched.others;
        Ok(Ok((
            out,
            BackendWebSocket {
                io: conn,
                // Copied out (rarely anything): the read buffer is freed now.
                leftover: Bytes::copy_from_slice(&buf),
                lease,
                latency,
            },
        )))
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
    addr: &crate::backend::BackendAddr,
    head: &Bytes,
    conn: BackendIo,
    buf: BytesMut,
) -> Result<Response<Body>, BackendError> {
    let bad = |e: &dyn std::fmt::Display| BackendError::Bad(format!("backend {addr}: {e}"));
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
    type Error = handshake::BoxError;

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
/// streamed body.
fn relay_response(resp: Response<Incoming>) -> Response<Body> {
    let (parts, body) = resp.into_parts();
    let mut out = Response::new(
        body.map_err(|e| Box::new(e) as handshake::BoxError)
            .boxed_unsync(),
    );
    *out.status_mut() = parts.status;
    copy_end_to_end(&parts.headers, out.headers_mut());
    out
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

    #[test]
    fn addresses_are_written_as_fmt_writes_them() {
        for ip in [
            "0.0.0.0",
            "9.10.99.100",
            "127.0.0.1",
            "255.255.255.255",
            "192.0.2.7",
            "::1",
            "2001:db8::7",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            let mut s = String::new();
            push_ip(&mut s, ip);
            assert_eq!(s, ip.to_string());
        }
    }

    #[test]
    fn hop_by_hop_headers_stay_behind() {
        let mut src = HeaderMap::new();
        src.insert(
            "connection",
            "keep-alive, X-Secret, Upgrade".parse().unwrap(),
        );
        src.insert("x-secret", "1".parse().unwrap());
        src.insert("keep-alive", "timeout=5".parse().unwrap());
        src.insert("proxy-authorization", "Basic x".parse().unwrap());
        src.insert("proxy-connection", "keep-alive".parse().unwrap());
        src.insert("te", "trailers".parse().unwrap());
        src.insert("trailer", "x-checksum".parse().unwrap());
        src.insert("transfer-encoding", "chunked".parse().unwrap());
        src.insert("upgrade", "websocket".parse().unwrap());
        src.insert("host", "a".parse().unwrap());
        src.insert("sec-websocket-protocol", "chat".parse().unwrap());
        src.insert(
            "sec-websocket-extensions",
            "permessage-deflate".parse().unwrap(),
        );
        src.insert("cookie", "a=b".parse().unwrap());
        let mut dst = HeaderMap::new();
        copy_end_to_end(&src, &mut dst);
        let mut names: Vec<&str> = dst.keys().map(|k| k.as_str()).collect();
        names.sort();
        assert_eq!(
            names,
            vec![
                "cookie",
                "sec-websocket-extensions",
                "sec-websocket-protocol"
            ]
        );
    }

    #[test]
    fn forwarded_values_are_tokens_or_quoted_strings() {
        for (v, want) in [
            ("example.com", "example.com"),
            ("example.com:8080", "\"example.com:8080\""),
            ("[::1]:80", "\"[::1]:80\""),
            ("a\"b\\c", "\"a\\\"b\\\\c\""),
            ("\"", "\"\\\"\""),
            ("", "\"\""),
        ] {
            let mut s = String::from(";host=");
            push_quoted_if_needed(&mut s, v);
            assert_eq!(s, format!(";host={want}"), "{v:?}");
        }
    }

    #[test]
    fn cidr_blocks() {
        let n: IpNet = "10.0.0.0/8".parse().unwrap();
        assert!(n.contains("10.1.2.3".parse().unwrap()));
        assert!(!n.contains("11.0.0.1".parse().unwrap()));
        assert!(n.contains("::ffff:10.0.0.1".parse().unwrap()));
        let one: IpNet = "127.0.0.1".parse().unwrap();
        assert!(one.contains("127.0.0.1".parse().unwrap()));
        assert!(!one.contains("127.0.0.2".parse().unwrap()));
        let v6: IpNet = "fd00::/8".parse().unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()));
        let all: IpNet = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("1.2.3.4".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<IpNet>().is_err());
        assert!("nope".parse::<IpNet>().is_err());
    }

    #[test]
    fn forwarded_headers_replace_untrusted_and_append_trusted() {
        let remote: SocketAddr = "192.0.2.7:5000".parse().unwrap();
        let host = HeaderValue::from_static("example.com:8080");
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "6.6.6.6".parse().unwrap());
        let p = Proxy::new(
            Forwarding::default(),
            Duration::from_secs(1),
            Duration::from_secs(1),
            None,
            Metrics::new(),
        );
        p.add_forwarded(&mut h, remote, true, Some(&host));
        assert_eq!(h["x-forwarded-for"], "192.0.2.7");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "example.com:8080");
        assert_eq!(
            h["forwarded"],
            "for=192.0.2.7;proto=https;host=\"example.com:8080\""
        );

        let trusting = Proxy::new(
            Forwarding {
                enabled: true,
                trusted: vec!["192.0.2.0/24".parse().unwrap()],
            },
            Duration::from_secs(1),
            Duration::from_secs(1),
            None,
            Metrics::new(),
        );
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "203.0.113.9".parse().unwrap());
        trusting.add_forwarded(&mut h, remote, false, None);
        assert_eq!(h["x-forwarded-for"], "203.0.113.9, 192.0.2.7");
    }
}
