//! Dialing a WebSocket as a client: `ws://` or `wss://` (rustls, the CAs of
//! `--ca` or the built-in Mozilla roots, an optional client certificate, SNI
//! from the URL's host), `TCP_NODELAY`, the opening handshake with a
//! subprotocol and extra headers, and the checks of the answer (101, the
//! accept key, the selected subprotocol). A refusal is a typed error with the
//! HTTP status and the start of the body, so `wsgate agent` and
//! `wsgate connect` can say why (`registration refused: 403 Forbidden: ...`).
//!
//! Used by the agent (`wsgate-agent.v1`) and by `wsgate connect` (`wsmux.v1`).

use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use wsframe::handshake;
use wsmux::WsTransport;

/// Longest response head we read before giving up.
const MAX_HEAD: usize = 16 * 1024;
/// Most bytes of a refusal's body kept for the error message.
const MAX_BODY: usize = 512;

/// A `ws://` or `wss://` URL, split for dialing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WsUrl {
    pub tls: bool,
    /// The host without brackets (IPv6).
    pub host: String,
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: String,
    /// The `Host` header: the URL's authority as written.
    authority: String,
    text: String,
}

impl std::str::FromStr for WsUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<WsUrl, String> {
        let uri: http::Uri = s.parse().map_err(|e| format!("invalid URL `{s}`: {e}"))?;
        let tls = match uri.scheme_str() {
            Some("ws") => false,
            Some("wss") => true,
            _ => return Err(format!("`{s}` is not a ws:// or wss:// URL")),
        };
        let authority = uri
            .authority()
            .ok_or_else(|| format!("`{s}` has no host"))?;
        if authority.as_str().contains('@') {
            return Err(format!("`{s}`: user info in the URL is not supported"));
        }
        let host = authority.host();
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        if host.is_empty() {
            return Err(format!("`{s}` has no host"));
        }
        let port = authority.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let path = uri
            .path_and_query()
            .map(|p| p.as_str())
            .filter(|p| !p.is_empty())
            .unwrap_or("/");
        Ok(WsUrl {
            tls,
            host: host.to_string(),
            port,
            path: path.to_string(),
            authority: authority.as_str().to_string(),
            text: s.to_string(),
        })
    }
}

impl fmt::Display for WsUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// TLS settings of a client: the CAs the server's certificate must chain to
/// (`None`: the built-in Mozilla roots) and an optional client certificate.
#[derive(Debug, Clone, Default)]
pub struct TlsFiles {
    pub ca: Option<std::path::PathBuf>,
    /// Certificate chain and private key, PEM.
    pub identity: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

impl TlsFiles {
    /// Loads the files into a rustls client configuration (HTTP/1.1 over
    /// ALPN, for servers that pick a protocol by it).
    pub fn client_config(&self) -> anyhow::Result<Arc<rustls::ClientConfig>> {
        let identity = self
            .identity
            .as_ref()
            .map(|(c, k)| (c.as_path(), k.as_path()));
        let config = crate::tls::backend_client_config(self.ca.as_deref(), identity)?;
        let mut config = (*config).clone();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

/// Why a dial failed.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// Name resolution or the TCP connection failed.
    #[error("cannot connect to {addr}: {source}")]
    Connect { addr: String, source: io::Error },
    /// The TLS handshake failed (certificate, protocol).
    #[error("TLS handshake with {addr}: {source}")]
    Tls { addr: String, source: io::Error },
    /// The server answered something that is not a valid WebSocket upgrade
    /// for us (or the connection broke during the handshake).
    #[error("WebSocket handshake: {0}")]
    Handshake(String),
    /// The server answered with an HTTP status other than 101.
    #[error("refused: {status}{}", body_suffix(.body))]
    Refused { status: Status, body: String },
    /// Everything took longer than the dial timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

impl DialError {
    /// The HTTP status of a refusal.
    pub fn status(&self) -> Option<u16> {
        match self {
            DialError::Refused { status, .. } => Some(status.0),
            _ => None,
        }
    }

    /// A refusal that retrying will not change: 400 (a request the server
    /// finds malformed), 401 (no or unknown token), 403 (the token does not
    /// own the id). Anything else (no route, 404, 502, 503, ...) may be
    /// transient: a gateway restarting, a proxy in front of it.
    pub fn is_permanent(&self) -> bool {
        matches!(self.status(), Some(400 | 401 | 403))
    }
}

/// An HTTP status, shown with its reason phrase (`403 Forbidden`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status(pub u16);

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let reason = http::StatusCode::from_u16(self.0)
            .ok()
            .and_then(|s| s.canonical_reason());
        match reason {
            Some(r) => write!(f, "{} {r}", self.0),
            None => write!(f, "{}", self.0),
        }
    }
}

fn body_suffix(body: &str) -> String {
    if body.is_empty() {
        String::new()
    } else {
        format!(": {body}")
    }
}

/// What to dial and how.
#[derive(Clone)]
pub struct Dialer {
    url: WsUrl,
    tls: Option<TlsConnector>,
    protocol: &'static str,
    headers: Vec<(String, String)>,
    timeout: Duration,
}

impl fmt::Debug for Dialer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Headers may carry a token: not shown.
        f.debug_struct("Dialer")
            .field("url", &self.url.text)
            .field("protocol", &self.protocol)
            .finish()
    }
}

impl Dialer {
    /// A dialer for `url` offering `protocol` and sending `headers` with the
    /// upgrade request; `tls` is loaded now (a bad file is an error here, not
    /// at the first dial) and used for `wss://` only.
    pub fn new(
        url: WsUrl,
        tls: &TlsFiles,
        protocol: &'static str,
        headers: Vec<(String, String)>,
        timeout: Duration,
    ) -> anyhow::Result<Dialer> {
        let tls = if url.tls {
            Some(TlsConnector::from(tls.client_config()?))
        } else {
            None
        };
        Ok(Dialer {
            url,
            tls,
            protocol,
            headers,
            timeout,
        })
    }

    /// Dials, upgrades and wraps the connection as a mux transport (client
    /// role). The receiver resolves once the connection is dropped, that is
    /// once the mux session that owns it has finished (its GOAWAY and close
    /// delivered, or given up on).
    pub async fn dial(&self) -> Result<(WsTransport<Conn>, oneshot::Receiver<()>), DialError> {
        tokio::time::timeout(self.timeout, self.dial_inner())
            .await
            .unwrap_or(Err(DialError::Timeout(self.timeout)))
    }

    async fn dial_inner(&self) -> Result<(WsTransport<Conn>, oneshot::Receiver<()>), DialError> {
        let addr = format!("{}:{}", self.url.host, self.url.port);
        let tcp = TcpStream::connect((self.url.host.as_str(), self.url.port))
            .await
            .map_err(|source| DialError::Connect {
                addr: addr.clone(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        let io = match &self.tls {
            None => Io::Plain(tcp),
            Some(connector) => {
                let name =
                    ServerName::try_from(self.url.host.clone()).map_err(|e| DialError::Tls {
                        addr: addr.clone(),
                        source: io::Error::new(io::ErrorKind::InvalidInput, e),
                    })?;
                let tls = connector
                    .connect(name, tcp)
                    .await
                    .map_err(|source| DialError::Tls { addr, source })?;
                Io::Tls(Box::new(tls))
            }
        };
        let (gone_tx, gone_rx) = oneshot::channel();
        let mut conn = Conn { io, _gone: gone_tx };
        let leftover = self.handshake(&mut conn).await?;
        let ws = WsTransport::from_raw(
            conn,
            wsframe::Role::Client,
            WsTransport::<Conn>::default_config(),
            &leftover,
        );
        Ok((ws, gone_rx))
    }

    /// Sends the upgrade request and checks the answer; returns the bytes
    /// read past the response head (the first frames).
    async fn handshake(&self, conn: &mut Conn) -> Result<BytesMut, DialError> {
        let key = handshake::generate_key();
        let headers: Vec<(&str, &str)> = self
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let request = handshake::client_request(
            &self.url.authority,
            &self.url.path,
            &key,
            &[self.protocol],
            &headers,
        );
        let broken = |e: io::Error| DialError::Handshake(format!("connection failed: {e}"));
        conn.write_all(&request).await.map_err(broken)?;
        conn.flush().await.map_err(broken)?;
        let mut buf = BytesMut::with_capacity(1024);
        let resp = loop {
            if conn.read_buf(&mut buf).await.map_err(broken)? == 0 {
                return Err(DialError::Handshake(
                    "connection closed before the response".into(),
                ));
            }
            match handshake::parse_response(&buf) {
                Ok(Some(r)) => break r,
                Ok(None) if buf.len() < MAX_HEAD => continue,
                Ok(None) => return Err(DialError::Handshake("response head too large".into())),
                Err(e) => return Err(DialError::Handshake(format!("bad response: {e}"))),
            }
        };
        let mut rest = buf.split_off(resp.head_len);
        if resp.status != 101 {
            let want = resp
                .header("content-length")
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(MAX_BODY)
                .min(MAX_BODY);
            // The body says why; read it briefly, never wait long for it.
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                while rest.len() < want {
                    match conn.read_buf(&mut rest).await {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
            })
            .await;
            rest.truncate(want);
            return Err(DialError::Refused {
                status: Status(resp.status),
                body: one_line(&rest),
            });
        }
        let expected = handshake::accept_key(key.as_bytes());
        if resp.header("sec-websocket-accept").map(str::trim) != Some(expected.as_str()) {
            return Err(DialError::Handshake(
                "wrong or missing Sec-WebSocket-Accept".into(),
            ));
        }
        match resp.header("sec-websocket-protocol").map(str::trim) {
            Some(p) if p == self.protocol => {}
            Some(p) => {
                return Err(DialError::Handshake(format!(
                    "server selected subprotocol `{p}`, not {}",
                    self.protocol
                )))
            }
            None => {
                return Err(DialError::Handshake(format!(
                    "server did not select subprotocol {} (is {} the right path?)",
                    self.protocol, self.url.path
                )))
            }
        }
        Ok(rest)
    }
}

/// A body as one short line of text, for an error message.
fn one_line(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let mut line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.len() > 200 {
        let mut end = 200;
        while !line.is_char_boundary(end) {
            end -= 1;
        }
        line.truncate(end);
        line.push('…');
    }
    line
}

/// The dialed connection: plain TCP or TLS over TCP. Dropping it signals the
/// receiver [`Dialer::dial`] returned.
pub struct Conn {
    io: Io,
    _gone: oneshot::Sender<()>,
}

enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_what_a_dial_needs() {
        let u: WsUrl = "ws://gw.example:8080/agent".parse().unwrap();
        assert_eq!(
            (u.tls, u.host.as_str(), u.port, u.path.as_str()),
            (false, "gw.example", 8080, "/agent")
        );
        assert_eq!(u.authority, "gw.example:8080");
        assert_eq!(u.to_string(), "ws://gw.example:8080/agent");
        let u: WsUrl = "wss://gw.example/mux?x=1".parse().unwrap();
        assert_eq!((u.tls, u.port, u.path.as_str()), (true, 443, "/mux?x=1"));
        let u: WsUrl = "ws://[::1]:9/".parse().unwrap();
        assert_eq!((u.host.as_str(), u.authority.as_str()), ("::1", "[::1]:9"));
        let u: WsUrl = "ws://h".parse().unwrap();
        assert_eq!((u.port, u.path.as_str()), (80, "/"));
        for bad in [
            "http://h/agent",
            "gw:8080/agent",
            "ws://",
            "ws://u:p@h/",
            "nonsense",
        ] {
            assert!(bad.parse::<WsUrl>().is_err(), "{bad}");
        }
    }

    #[test]
    fn refusals_name_their_status_and_body() {
        let e = DialError::Refused {
            status: Status(403),
            body: one_line(b"token does not own\r\n id `site-a`\n"),
        };
        assert_eq!(
            e.to_string(),
            "refused: 403 Forbidden: token does not own id `site-a`"
        );
        assert!(e.is_permanent());
        let e = DialError::Refused {
            status: Status(503),
            body: String::new(),
        };
        assert_eq!(e.to_string(), "refused: 503 Service Unavailable");
        assert!(!e.is_permanent());
        assert_eq!(Status(599).to_string(), "599");
    }
}
