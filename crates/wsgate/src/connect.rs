//! `wsgate connect`: the client side of `/mux` (`docs/tunnel.md` §6,
//! `docs/agent.md`). One WebSocket to the gateway with a wsmux client
//! session; every local connection (or stdin/stdout) is one stream, opened
//! with an open request naming `--to` and relayed once the reply is OK.
//!
//! * `--listen HOST:PORT` with a `tcp://`/`http://` target: a TCP listener,
//!   one stream per accepted connection; with a `udp://` target: a UDP
//!   socket, one stream per client address (datagrams framed as in §4,
//!   ended after 60 s idle). The session is dialed again (with backoff) when
//!   it dies or the gateway sends GOAWAY; a connection that arrives while
//!   there is none waits for one (bounded).
//! * `--stdio`: stdin/stdout is the one stream (an ssh `ProxyCommand`);
//!   stdout carries only the stream's bytes, logs go to stderr; EOF on stdin
//!   half-closes the stream.
//!
//! A refusal (the reply's status and message) is printed on stderr and closes
//! the local connection; with `--stdio` it ends the command with exit 1.

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, watch};

use crate::agent::backoff::{self, Backoff};
use crate::agent::dial::{DialError, Dialer, TlsFiles, WsUrl};
use crate::agent::relay::{self, Side};
use crate::agent::{check_token, mux_config, DIAL_TIMEOUT};
use crate::tunnel::proto::{self, Reply, Scheme, Status, Target};

/// How long a stream waits for the gateway's reply to its open request
/// (the gateway may be connecting through an agent, itself bounded by 10 s).
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a new local connection waits for a live session.
const SESSION_WAIT: Duration = Duration::from_secs(10);
/// Client addresses with a `udp://` flow at once (`--listen`).
const MAX_UDP_FLOWS: usize = 1024;
/// Datagrams queued per flow while its stream is busy; more are dropped.
const FLOW_QUEUE: usize = 64;

/// Where local traffic comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Listen on `HOST:PORT` (TCP, or UDP for a `udp://` target).
    Listen(String),
    /// stdin/stdout.
    Stdio,
}

/// `wsgate connect`'s command line as plain data.
#[derive(Debug, Clone)]
pub struct Config {
    /// The gateway's `/mux` URL.
    pub url: WsUrl,
    pub target: Target,
    pub mode: Mode,
    pub tls: TlsFiles,
    /// Sent as `Authorization: Bearer TOKEN`.
    pub token: Option<String>,
    pub keepalive: Option<Duration>,
}

impl Config {
    /// What the target carries.
    pub fn scheme(&self) -> Scheme {
        match &self.target {
            Target::Direct(d) => d.scheme,
            Target::Agent(a) => a.dest.scheme,
        }
    }
}

/// A running client.
pub struct Client {
    config: Config,
    target: String,
    dialer: Dialer,
    /// The live session, if any.
    current: watch::Sender<Option<Arc<wsmux::Session>>>,
}

/// The name of a reply status, as `docs/tunnel.md` §3 writes it.
pub fn status_name(s: Status) -> &'static str {
    match s {
        Status::Ok => "OK",
        Status::NotAllowed => "NOT_ALLOWED",
        Status::Unreachable => "UNREACHABLE",
        Status::Timeout => "TIMEOUT",
        Status::NoAgent => "NO_AGENT",
    }
}

/// Why a stream could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("refused: {}{}", status_name(.0.status), if .0.message.is_empty() { String::new() } else { format!(": {}", .0.message) })]
    Refused(Reply),
    #[error("{0}")]
    Failed(String),
}

impl Client {
    /// Checks the arguments and loads the TLS files (errors here are
    /// argument errors: nothing was dialed).
    pub fn new(config: Config) -> anyhow::Result<Arc<Client>> {
        let mut headers = vec![];
        if let Some(t) = &config.token {
            check_token(t).map_err(|e| anyhow::anyhow!("--token: {e}"))?;
            headers.push(("Authorization".to_string(), format!("Bearer {t}")));
        }
        if config.mode == Mode::Stdio && config.scheme() == Scheme::Udp {
            anyhow::bail!("--stdio carries a byte stream: give a tcp:// or http:// target (udp:// needs --listen)");
        }
        let dialer = Dialer::new(
            config.url.clone(),
            &config.tls,
            proto::MUX_PROTOCOL,
            headers,
            DIAL_TIMEOUT,
        )?;
        Ok(Arc::new(Client {
            target: config.target.to_string(),
            config,
            dialer,
            current: watch::Sender::new(None),
        }))
    }

    /// Runs until `shutdown` completes, the stdio stream ends, or the
    /// gateway refuses the WebSocket for good (400, 401, 403).
    pub async fn run(
        self: Arc<Self>,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<()> {
        match self.config.mode.clone() {
            Mode::Stdio => tokio::select! {
                r = self.clone().stdio() => r,
                () = shutdown => Ok(()),
            },
            Mode::Listen(addr) => {
                let (fatal_tx, mut fatal_rx) = mpsc::channel::<DialError>(1);
                let serve = async {
                    if self.config.scheme() == Scheme::Udp {
                        let socket = UdpSocket::bind(&addr)
                            .await
                            .with_context(|| format!("cannot listen on udp {addr}"))?;
                        announce("udp", socket.local_addr()?)?;
                        tokio::spawn(self.clone().maintain(fatal_tx));
                        self.clone().serve_udp(Arc::new(socket)).await
                    } else {
                        let listener = TcpListener::bind(&addr)
                            .await
                            .with_context(|| format!("cannot listen on tcp {addr}"))?;
                        announce("tcp", listener.local_addr()?)?;
                        tokio::spawn(self.clone().maintain(fatal_tx));
                        self.clone().serve_tcp(listener).await
                    }
                };
                tokio::select! {
                    r = serve => r,
                    Some(e) = fatal_rx.recv() => Err(anyhow::anyhow!("{}: {e}", self.config.url)),
                    () = shutdown => Ok(()),
                }
            }
        }
    }

    /// Keeps a session up: dials, waits for its end (or its retirement
    /// after a GOAWAY), dials again after a backoff delay.
    async fn maintain(self: Arc<Self>, fatal: mpsc::Sender<DialError>) {
        let url = &self.config.url;
        let mut backoff = Backoff::new();
        let mut current = self.current.subscribe();
        loop {
            match self.dialer.dial().await {
                Ok((ws, _gone)) => {
                    let up = Instant::now();
                    let s = Arc::new(wsmux::Session::client(
                        ws,
                        mux_config(self.config.keepalive),
                    ));
                    tracing::info!("connected to {url}");
                    self.current.send_replace(Some(s.clone()));
                    tokio::select! {
                        e = s.closed() => tracing::warn!("connection to {url} lost: {e}"),
                        _ = current.wait_for(|c| !same(c, &s)) => {
                            tracing::info!("gateway sent GOAWAY: dialing a new connection");
                        }
                    }
                    self.current.send_if_modified(|c| {
                        let mine = same(c, &s);
                        if mine {
                            *c = None;
                        }
                        mine
                    });
                    // Streams still running keep the old session alive.
                    drop(s);
                    if up.elapsed() >= backoff::STABLE {
                        backoff.reset();
                    }
                }
                Err(e) if e.is_permanent() => {
                    let _ = fatal.send(e).await;
                    return;
                }
                Err(e) => tracing::warn!("cannot connect to {url}: {e}"),
            }
            let delay = backoff.next_delay();
            tracing::info!("dialing {url} again in {:.1}s", delay.as_secs_f64());
            tokio::time::sleep(delay).await;
        }
    }

    /// A live session: the current one, or the next within [`SESSION_WAIT`].
    async fn session(&self) -> Result<Arc<wsmux::Session>, OpenError> {
        let mut rx = self.current.subscribe();
        let wait = rx.wait_for(|c| c.as_ref().is_some_and(|s| s.error().is_none()));
        let found = match tokio::time::timeout(SESSION_WAIT, wait).await {
            Ok(Ok(s)) => s.clone(),
            _ => None,
        };
        found.ok_or_else(|| {
            OpenError::Failed(format!(
                "no connection to {} within {SESSION_WAIT:?}",
                self.config.url
            ))
        })
    }

    /// Opens a stream on a live session, sends the open request and waits
    /// for the reply. Returns the session (keep it while the stream runs),
    /// the stream, and bytes read past the reply.
    async fn open(&self) -> Result<(Arc<wsmux::Session>, wsmux::Stream, BytesMut), OpenError> {
        let mut tries = 0;
        let (session, mut stream) = loop {
            let session = self.session().await?;
            match session.open().await {
                Ok(stream) => break (session, stream),
                Err(e) => {
                    // GOAWAY from the gateway: retire the session so that
                    // maintain() dials a new one, and try that one.
                    if matches!(e, wsmux::Error::PeerGoAway) {
                        self.current.send_if_modified(|c| {
                            let mine = same(c, &session);
                            if mine {
                                *c = None;
                            }
                            mine
                        });
                    }
                    tries += 1;
                    if tries >= 3 {
                        return Err(OpenError::Failed(format!("cannot open a stream: {e}")));
                    }
                }
            }
        };
        let (reply, rest) = request(&mut stream, &self.target).await?;
        if reply.status != Status::Ok {
            relay::finish(&mut stream).await;
            return Err(OpenError::Refused(reply));
        }
        Ok((session, stream, rest))
    }

    async fn serve_tcp(self: Arc<Self>, listener: TcpListener) -> anyhow::Result<()> {
        loop {
            match listener.accept().await {
                Ok((tcp, peer)) => {
                    let _ = tcp.set_nodelay(true);
                    tokio::spawn(self.clone().tcp_connection(tcp, peer));
                }
                Err(e) => {
                    // Out of descriptors and the like: pause instead of
                    // spinning on the error.
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    async fn tcp_connection(self: Arc<Self>, mut tcp: TcpStream, peer: SocketAddr) {
        let target = &self.target;
        let (session, mut stream, rest) = match self.open().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("{peer} → {target}: {e}");
                relay::abort_tcp(tcp);
                return;
            }
        };
        let sid = stream.id();
        tracing::info!(stream = sid, "{peer} → {target}: stream {sid} open");
        if !rest.is_empty() && tcp.write_all(&rest).await.is_err() {
            stream.reset(wsmux::reset_code::CANCEL);
            return;
        }
        match relay::splice(&mut stream, &mut tcp).await {
            Ok(m) => tracing::info!(
                stream = sid,
                sent = m.b_to_a,
                received = m.a_to_b,
                "{peer} → {target}: stream {sid} closed, {} bytes sent, {} received",
                m.b_to_a,
                m.a_to_b
            ),
            Err(e) => {
                let side = match e.side {
                    Side::A => {
                        relay::abort_tcp(tcp);
                        "stream"
                    }
                    Side::B => {
                        stream.reset(wsmux::reset_code::CANCEL);
                        "local connection"
                    }
                };
                tracing::warn!(
                    stream = sid,
                    "{peer} → {target}: stream {sid} aborted ({side}: {}), {} bytes sent, {} received",
                    e.error,
                    e.moved.b_to_a,
                    e.moved.a_to_b
                );
            }
        }
        drop(session);
    }

    async fn serve_udp(self: Arc<Self>, socket: Arc<UdpSocket>) -> anyhow::Result<()> {
        let mut flows: HashMap<SocketAddr, (u64, mpsc::Sender<Bytes>)> = HashMap::new();
        let (done_tx, mut done_rx) = mpsc::channel::<(SocketAddr, u64)>(MAX_UDP_FLOWS);
        let mut next_flow = 0u64;
        let mut buf = vec![0u8; proto::MAX_DATAGRAM];
        loop {
            tokio::select! {
                r = socket.recv_from(&mut buf) => {
                    let (n, src) = match r {
                        Ok(x) => x,
                        Err(e) => {
                            tracing::debug!("udp recv: {e}");
                            continue;
                        }
                    };
                    let d = Bytes::copy_from_slice(&buf[..n]);
                    let d = match flows.get(&src) {
                        Some((_, tx)) => match tx.try_send(d) {
                            Ok(()) => continue,
                            Err(mpsc::error::TrySendError::Full(_)) => continue,
                            Err(mpsc::error::TrySendError::Closed(d)) => {
                                flows.remove(&src);
                                d
                            }
                        },
                        None => d,
                    };
                    if flows.len() >= MAX_UDP_FLOWS {
                        tracing::warn!("{src}: {MAX_UDP_FLOWS} udp flows open, datagram dropped");
                        continue;
                    }
                    let (tx, rx) = mpsc::channel(FLOW_QUEUE);
                    let _ = tx.try_send(d);
                    next_flow += 1;
                    flows.insert(src, (next_flow, tx));
                    let done = done_tx.clone();
                    let (me, socket, flow) = (self.clone(), socket.clone(), next_flow);
                    tokio::spawn(async move {
                        me.udp_flow(socket, src, rx).await;
                        let _ = done.send((src, flow)).await;
                    });
                }
                Some((src, flow)) = done_rx.recv() => {
                    if flows.get(&src).is_some_and(|(f, _)| *f == flow) {
                        flows.remove(&src);
                    }
                }
            }
        }
    }

    async fn udp_flow(
        &self,
        socket: Arc<UdpSocket>,
        peer: SocketAddr,
        mut rx: mpsc::Receiver<Bytes>,
    ) {
        let target = &self.target;
        let (session, mut stream, rest) = match self.open().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("{peer} → {target}: {e}");
                return;
            }
        };
        let sid = stream.id();
        let udp = relay::Udp::Flow {
            socket: &socket,
            peer,
            rx: &mut rx,
        };
        match relay::datagrams(&mut stream, udp, rest, relay::UDP_IDLE).await {
            Ok(m) => {
                relay::finish(&mut stream).await;
                tracing::info!(
                    stream = sid,
                    "{peer} → {target}: stream {sid} closed{}, {} datagrams sent, {} received",
                    if m.idle { " (idle)" } else { "" },
                    m.to_stream,
                    m.to_udp
                );
            }
            Err(e) => {
                stream.reset(wsmux::reset_code::CANCEL);
                tracing::warn!(
                    stream = sid,
                    "{peer} → {target}: stream {sid} aborted: {e:?}"
                );
            }
        }
        drop(session);
    }

    /// `--stdio`: one session, one stream, stdin/stdout.
    async fn stdio(self: Arc<Self>) -> anyhow::Result<()> {
        let url = &self.config.url;
        let target = &self.target;
        let (ws, _gone) = self
            .dialer
            .dial()
            .await
            .map_err(|e| anyhow::anyhow!("{url}: {e}"))?;
        let session = Arc::new(wsmux::Session::client(
            ws,
            mux_config(self.config.keepalive),
        ));
        self.current.send_replace(Some(session.clone()));
        let (_session, mut stream, rest) = self
            .open()
            .await
            .map_err(|e| anyhow::anyhow!("{target}: {e}"))?;
        let mut io = tokio::io::join(tokio::io::stdin(), tokio::io::stdout());
        if !rest.is_empty() {
            io.write_all(&rest).await?;
            io.flush().await?;
        }
        match relay::splice(&mut stream, &mut io).await {
            Ok(m) => {
                tracing::info!(
                    "{target}: stream closed, {} bytes sent, {} received",
                    m.b_to_a,
                    m.a_to_b
                );
                Ok(())
            }
            Err(e) => {
                if e.side == Side::B {
                    stream.reset(wsmux::reset_code::CANCEL);
                }
                let side = if e.side == Side::A { "stream" } else { "stdio" };
                Err(anyhow::anyhow!("{target}: {side} failed: {}", e.error))
            }
        }
    }
}

fn same(c: &Option<Arc<wsmux::Session>>, s: &Arc<wsmux::Session>) -> bool {
    c.as_ref().is_some_and(|c| Arc::ptr_eq(c, s))
}

fn announce(kind: &str, addr: SocketAddr) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "listening on {kind}://{addr}")?;
    out.flush()?;
    Ok(())
}

/// Sends the open request for `target` and reads the reply; returns it with
/// the bytes that came after it.
pub async fn request(
    stream: &mut wsmux::Stream,
    target: &str,
) -> Result<(Reply, BytesMut), OpenError> {
    let mut wire = BytesMut::new();
    proto::encode_open(target, &mut wire);
    stream
        .write_all(&wire)
        .await
        .map_err(|e| OpenError::Failed(format!("cannot send the open request: {e}")))?;
    let mut buf = BytesMut::with_capacity(256);
    let read = async {
        loop {
            match Reply::decode(&mut buf) {
                Ok(Some(r)) => return Ok(r),
                Ok(None) => {}
                Err(e) => return Err(OpenError::Failed(format!("bad reply: {e}"))),
            }
            buf.reserve(4 + proto::MAX_TEXT);
            match stream.read_buf(&mut buf).await {
                Ok(0) => return Err(OpenError::Failed("stream ended before the reply".into())),
                Ok(_) => {}
                Err(e) => return Err(OpenError::Failed(format!("no reply: {e}"))),
            }
        }
    };
    match tokio::time::timeout(REPLY_TIMEOUT, read).await {
        Ok(Ok(reply)) => Ok((reply, buf)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(OpenError::Failed(format!(
            "no reply within {REPLY_TIMEOUT:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_read_like_the_spec() {
        let e = OpenError::Refused(Reply::refuse(
            Status::NotAllowed,
            "agent site-a does not allow tcp://10.0.0.5:23",
        ));
        assert_eq!(
            e.to_string(),
            "refused: NOT_ALLOWED: agent site-a does not allow tcp://10.0.0.5:23"
        );
        assert_eq!(
            OpenError::Refused(Reply::refuse(Status::NoAgent, "")).to_string(),
            "refused: NO_AGENT"
        );
    }

    #[test]
    fn stdio_needs_a_byte_stream_target() {
        let config = |to: &str, mode| Config {
            url: "ws://127.0.0.1:1/mux".parse().unwrap(),
            target: to.parse().unwrap(),
            mode,
            tls: TlsFiles::default(),
            token: Some("t".into()),
            keepalive: None,
        };
        assert!(Client::new(config("udp://127.0.0.1:53", Mode::Stdio)).is_err());
        assert!(Client::new(config("agent://a/tcp://h:22", Mode::Stdio)).is_ok());
        assert!(Client::new(config(
            "udp://127.0.0.1:53",
            Mode::Listen("127.0.0.1:0".into())
        ))
        .is_ok());
        let mut bad = config("tcp://h:1", Mode::Stdio);
        bad.token = Some("a b".into());
        assert!(Client::new(bad).is_err());
    }
}
