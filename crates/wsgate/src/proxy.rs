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

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tracing::{debug, warn};

use crate::backend::{Lease, Pool};
use crate::handshake::{self, Body, Upgrade};
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
    pub on_upgrade: OnUpgrade,
    pub lease: Lease,
    /// Connect + handshake time.
    pub latency: Duration,
}

/// The proxy: forwarding rules and the pooled client for plain HTTP.
pub struct Proxy {
    client: Client<HttpConnector, Incoming>,
    metrics: Metrics,
    forwarding: Forwarding,
    connect_timeout: Duration,
    answer_timeout: Duration,
}

const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Copies the end-to-end headers of `src` into `dst`: hop-by-hop headers, the
/// headers `Connection` names, and `Host` (set by the caller) stay behind.
pub fn copy_end_to_end(src: &HeaderMap, dst: &mut HeaderMap) {
    let named: Vec<String> = src
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect();
    for (k, v) in src {
        let name = k.as_str();
        if HOP_BY_HOP.contains(&name)
            || name.starts_with("proxy-")
            || name == "host"
            || named.iter().any(|n| n == name)
        {
            continue;
        }
        dst.append(k.clone(), v.clone());
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

fn quote_if_needed(v: &str) -> String {
    let token = v
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    if token {
        v.to_string()
    } else {
        format!("\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\""))
    }
}

impl Proxy {
    pub fn new(
        forwarding: Forwarding,
        connect_timeout: Duration,
        answer_timeout: Duration,
        metrics: Metrics,
    ) -> Proxy {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(connect_timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(64)
            .build(connector);
        Proxy {
            client,
            metrics,
            forwarding,
            connect_timeout,
            answer_timeout,
        }
    }

    /// Adds `X-Forwarded-For`, `-Proto`, `-Host` and `Forwarded`.
    fn add_forwarded(
        &self,
        h: &mut HeaderMap,
        remote: SocketAddr,
        secure: bool,
        host: Option<&HeaderValue>,
    ) {
        if !self.forwarding.enabled {
            return;
        }
        let trusted = self
            .forwarding
            .trusted
            .iter()
            .any(|n| n.contains(remote.ip()));
        let names = [
            "x-forwarded-for",
            "x-forwarded-proto",
            "x-forwarded-host",
            "forwarded",
        ];
        let prior: Vec<Option<String>> = names
            .iter()
            .map(|n| {
                let joined: Vec<&str> = h
                    .get_all(*n)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .collect();
                (trusted && !joined.is_empty()).then(|| joined.join(", "))
            })
            .collect();
        for n in names {
            h.remove(n);
        }
        let ip = remote.ip().to_canonical();
        let proto = if secure { "https" } else { "http" };
        let host = host.and_then(|v| v.to_str().ok()).unwrap_or("");
        let xff = match &prior[0] {
            Some(p) => format!("{p}, {ip}"),
            None => ip.to_string(),
        };
        let node = match ip {
            IpAddr::V6(v) => format!("\"[{v}]\""),
            v4 => v4.to_string(),
        };
        let mut fwd = format!("for={node};proto={proto}");
        if !host.is_empty() {
            fwd.push_str(&format!(";host={}", quote_if_needed(host)));
        }
        let fwd = match &prior[3] {
            Some(p) => format!("{p}, {fwd}"),
            None => fwd,
        };
        let set = |h: &mut HeaderMap, name: &'static str, v: String| {
            if let Ok(v) = HeaderValue::from_str(&v) {
                h.insert(HeaderName::from_static(name), v);
            }
        };
        set(h, "x-forwarded-for", xff);
        set(
            h,
            "x-forwarded-proto",
            prior[1].clone().unwrap_or_else(|| proto.into()),
        );
        if let Some(hv) = prior[2]
            .clone()
            .or_else(|| (!host.is_empty()).then(|| host.to_string()))
        {
            set(h, "x-forwarded-host", hv);
        }
        set(h, "forwarded", fwd);
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
        let uri: Uri = format!("http://{addr}{path}")
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
                self.metrics.backend_up(&addr.to_string(), false);
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
        self.metrics.backend_up(&addr.to_string(), true);
        // The lease ends with the answer's head; the pooled client owns the
        // connection afterwards.
        drop(lease);
        Ok(relay_response(resp))
    }

    /// Opens a backend WebSocket for a client handshake. On success returns the
    /// answer for the client and the backend's pending upgrade; a backend's
    /// non-101 answer comes back as `Ok(Err(response))` to be relayed as is.
    pub async fn open_websocket(
        &self,
        pool: &Pool,
        parts: &Parts,
        upgrade: &Upgrade,
        remote: SocketAddr,
        secure: bool,
    ) -> Result<Result<(Response<Body>, BackendWebSocket), Response<Body>>, BackendError> {
        let started = Instant::now();
        let lease = pool.pick().ok_or(BackendError::Unavailable)?;
        let addr = lease.backend.addr.clone();
        let tcp = match tokio::time::timeout(
            self.connect_timeout,
            TcpStream::connect((addr.host.as_str(), addr.port)),
        )
        .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                pool.eject(&lease.backend);
                self.metrics.backend_up(&addr.to_string(), false);
                return Err(BackendError::Connect(format!(
                    "backend {addr}: cannot connect: {e}"
                )));
            }
            Err(_) => {
                pool.eject(&lease.backend);
                self.metrics.backend_up(&addr.to_string(), false);
                return Err(BackendError::Timeout(format!(
                    "backend {addr}: connect timed out after {:?}",
                    self.connect_timeout
                )));
            }
        };
        let _ = tcp.set_nodelay(true);
        let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
            .handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| BackendError::Connect(format!("backend {addr}: {e}")))?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                debug!("backend handshake connection: {e}");
            }
        });

        let key = match upgrade {
            Upgrade::H1 { key, .. } => key.clone(),
            Upgrade::H2 => wsframe::handshake::generate_key(),
        };
        let mut headers = HeaderMap::new();
        copy_end_to_end(&parts.headers, &mut headers);
        let host = request_host(parts);
        if let Some(h) = &host {
            headers.insert(header::HOST, h.clone());
        }
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        headers.insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        headers.insert(
            header::SEC_WEBSOCKET_KEY,
            HeaderValue::from_str(&key).expect("base64 is a valid header value"),
        );
        self.add_forwarded(&mut headers, remote, secure, host.as_ref());
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let mut req = Request::new(http_body_util::Empty::<bytes::Bytes>::new());
        *req.method_mut() = Method::GET;
        *req.uri_mut() = path.parse().unwrap_or_else(|_| Uri::from_static("/"));
        *req.headers_mut() = headers;

        let mut resp =
            match tokio::time::timeout(self.answer_timeout, sender.send_request(req)).await {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => {
                    return Err(BackendError::Bad(format!(
                        "backend {addr}: {}",
                        root_cause(&e)
                    )))
                }
                Err(_) => {
                    return Err(BackendError::Timeout(format!(
                        "backend {addr} did not answer the handshake within {:?}",
                        self.answer_timeout
                    )))
                }
            };
        pool.readmit(&lease.backend);
        self.metrics.backend_up(&addr.to_string(), true);
        self.metrics
            .backend_latency(&addr.to_string(), started.elapsed().as_secs_f64());
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            // 401, 403, 404, 5xx...: the client sees the backend's own answer.
            return Ok(Err(relay_response(resp)));
        }
        let expected = wsframe::handshake::accept_key(key.as_bytes());
        let accept_ok = resp
            .headers()
            .get(header::SEC_WEBSOCKET_ACCEPT)
            .is_some_and(|v| v.as_bytes() == expected.as_bytes());
        let upgrade_ok =
            crate::handshake::header_has_token(resp.headers(), header::UPGRADE, "websocket");
        if !accept_ok || !upgrade_ok {
            warn!(backend = %addr, "backend answered 101 with a wrong Sec-WebSocket-Accept or Upgrade");
            return Err(BackendError::Bad(format!(
                "backend {addr} answered the WebSocket handshake wrongly (Sec-WebSocket-Accept or Upgrade)"
            )));
        }
        let on_upgrade = hyper::upgrade::on(&mut resp);
        let protocol = resp
            .headers()
            .get(header::SEC_WEBSOCKET_PROTOCOL)
            .and_then(|v| v.to_str().ok());
        let mut out = handshake::accepted(
            upgrade,
            protocol,
            resp.headers().get(header::SEC_WEBSOCKET_EXTENSIONS),
        );
        // Other end-to-end headers of the backend's answer (cookies...) pass too.
        let mut rest = HeaderMap::new();
        copy_end_to_end(resp.headers(), &mut rest);
        for (k, v) in &rest {
            let n = k.as_str();
            if n.starts_with("sec-websocket-") || n == "content-length" {
                continue;
            }
            out.headers_mut().append(k.clone(), v.clone());
        }
        Ok(Ok((
            out,
            BackendWebSocket {
                on_upgrade,
                lease,
                latency: started.elapsed(),
            },
        )))
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
        src.insert("te", "trailers".parse().unwrap());
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
            Metrics::new(),
        );
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "203.0.113.9".parse().unwrap());
        trusting.add_forwarded(&mut h, remote, false, None);
        assert_eq!(h["x-forwarded-for"], "203.0.113.9, 192.0.2.7");
    }
}
