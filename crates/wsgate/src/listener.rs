//! Listeners and the HTTP side of a connection: accept, TLS, hyper, the
//! request handler that routes and upgrades, and graceful shutdown.
//!
//! Life of a connection: accept → (TLS handshake) → hyper reads the request
//! head within the handshake timeout → [`Gateway::handle`] answers plain HTTP
//! (health, 404, 400, 426, 503) or routes the handshake, connects the peer and
//! answers 101 → the upgraded socket and the peer go to [`relay::run`].

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

use crate::config::{Config, Target};
use crate::discovery::Discovered;
use crate::handshake::{self, Body};
use crate::relay::{self, ClientIo};
use crate::route::{self, Metadata, Selection};
use crate::upstream::{self, PeerAddr};

/// A bound listening socket.
pub struct Bound {
    pub listener: TcpListener,
    pub tls: Option<TlsAcceptor>,
    pub local_addr: SocketAddr,
}

impl Bound {
    /// `ws://HOST:PORT` or `wss://HOST:PORT`.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "wss" } else { "ws" };
        format!("{scheme}://{}", self.local_addr)
    }
}

/// Loads TLS material and binds every listener; nothing is served yet.
pub async fn bind(config: &Config) -> anyhow::Result<Vec<Bound>> {
    let mut out = vec![];
    for l in &config.listeners {
        let tls = match &l.tls {
            Some(t) => Some(crate::tls::acceptor(&t.cert, &t.key, &[b"http/1.1"])?),
            None => None,
        };
        let listener = TcpListener::bind(&l.address)
            .await
            .with_context(|| format!("cannot listen on {}", l.address))?;
        let local_addr = listener.local_addr()?;
        out.push(Bound {
            listener,
            tls,
            local_addr,
        });
    }
    Ok(out)
}

/// Shared state of the running gateway.
pub struct Gateway {
    pub config: Config,
    active: AtomicUsize,
    next_id: AtomicU64,
    pub shutdown: CancellationToken,
    pub tracker: TaskTracker,
}

/// Counts one open WebSocket until dropped.
struct ActiveGuard(Arc<Gateway>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Gateway {
    pub fn new(config: Config) -> Arc<Gateway> {
        Arc::new(Gateway {
            config,
            active: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
        })
    }

    /// Open WebSockets right now.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// Accepts on every listener until shutdown.
    pub fn serve(self: &Arc<Self>, bound: Vec<Bound>) {
        for b in bound {
            let gw = self.clone();
            self.tracker.spawn(async move { gw.accept_loop(b).await });
        }
    }

    /// Stops accepting, closes every WebSocket with 1001 and waits (bounded by
    /// the drain timeout) for them to finish.
    pub async fn shutdown(&self) {
        self.shutdown.cancel();
        self.tracker.close();
        if tokio::time::timeout(self.config.limits.drain_timeout, self.tracker.wait())
            .await
            .is_err()
        {
            warn!(
                open = self.active(),
                "drain timeout reached; dropping remaining connections"
            );
        }
    }

    async fn accept_loop(self: Arc<Self>, b: Bound) {
        loop {
            let accepted = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                r = b.listener.accept() => r,
            };
            match accepted {
                Ok((stream, remote)) => {
                    let gw = self.clone();
                    let tls = b.tls.clone();
                    self.tracker
                        .spawn(async move { gw.connection(stream, remote, tls).await });
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off briefly
                    // instead of spinning.
                    warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    async fn connection(
        self: Arc<Self>,
        stream: TcpStream,
        remote: SocketAddr,
        tls: Option<TlsAcceptor>,
    ) {
        let _ = stream.set_nodelay(true);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let span = tracing::info_span!("conn", id, %remote);
        async move {
            match tls {
                None => self.serve_http(TokioIo::new(stream), remote, id).await,
                Some(acceptor) => {
                    let limit = self.config.limits.handshake_timeout;
                    match tokio::time::timeout(limit, acceptor.accept(stream)).await {
                        Ok(Ok(s)) => self.serve_http(TokioIo::new(s), remote, id).await,
                        Ok(Err(e)) => debug!("TLS handshake failed: {e}"),
                        Err(_) => debug!("TLS handshake timed out"),
                    }
                }
            }
        }
        .instrument(span)
        .await
    }

    async fn serve_http<I>(self: &Arc<Self>, io: TokioIo<I>, remote: SocketAddr, id: u64)
    where
        I: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let gw = self.clone();
        let svc = service_fn(move |req| {
            let gw = gw.clone();
            async move { Ok::<_, Infallible>(gw.handle(req, remote, id).await) }
        });
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(self.config.limits.handshake_timeout)
            .serve_connection(io, svc)
            .with_upgrades();
        tokio::pin!(conn);
        tokio::select! {
            r = &mut conn => {
                if let Err(e) = r {
                    debug!("http connection ended: {e}");
                }
            }
            _ = self.shutdown.cancelled() => {
                conn.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(Duration::from_secs(1), conn).await;
            }
        }
    }

    /// Answers one HTTP request: health check, refusal, or upgrade.
    pub async fn handle(
        self: &Arc<Self>,
        req: Request<Incoming>,
        remote: SocketAddr,
        id: u64,
    ) -> Response<Body> {
        let (parts, body) = req.into_parts();
        if parts.uri.path() == self.config.health_path {
            return handshake::text(StatusCode::OK, "ok");
        }
        let meta = Metadata::from_parts(&parts);
        let (route, protocol) = match route::select(&self.config.routes, &meta) {
            Selection::Route { route, protocol } => (route, protocol),
            Selection::NotFound => {
                return handshake::text(
                    StatusCode::NOT_FOUND,
                    format!("no route for {}", meta.path),
                )
            }
            Selection::NoProtocol { supported } => {
                return handshake::text(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "none of the offered subprotocols is supported; this endpoint speaks: {}",
                        supported.join(", ")
                    ),
                )
            }
        };
        let accept = match handshake::validate(&parts) {
            Ok(a) => a,
            Err(resp) => return *resp,
        };
        // Reserve a slot before connecting, so a flood cannot open peers past the cap.
        let max = self.config.limits.max_connections;
        if self.active.fetch_add(1, Ordering::AcqRel) >= max {
            self.active.fetch_sub(1, Ordering::AcqRel);
            let mut r = handshake::text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("too many connections (limit {max})"),
            );
            r.headers_mut().insert(
                http::header::RETRY_AFTER,
                http::HeaderValue::from_static("1"),
            );
            return r;
        }
        let guard = ActiveGuard(self.clone());

        let (peer, protocol, framing) = match &route.target {
            Target::Static(p) => (p.clone(), protocol, route.framing.clone()),
            Target::Discovery(d) => match d.lookup(&meta) {
                Discovered::Peer { entry, protocol } => {
                    let framing = entry.framing.unwrap_or_else(|| route.framing.clone());
                    (entry.peer, protocol, framing)
                }
                Discovered::Denied(p) => {
                    warn!(route = %route.name, peer = %p, "discovered peer is not on the allow list");
                    return handshake::text(StatusCode::FORBIDDEN, "peer not allowed");
                }
                Discovered::NotFound => {
                    return handshake::text(StatusCode::NOT_FOUND, "no peer found for this request")
                }
            },
        };
        let conn = match upstream::connect(&peer, self.config.limits.connect_timeout).await {
            Ok(c) => c,
            Err(e) => {
                warn!(route = %route.name, "{e}");
                return handshake::text(StatusCode::BAD_GATEWAY, e.to_string());
            }
        };
        info!(route = %route.name, %peer, protocol = protocol.as_deref().unwrap_or("-"), framing = %framing, "websocket open");

        let mut req = Request::from_parts(parts, body);
        let on_upgrade = hyper::upgrade::on(&mut req);
        let limits = &self.config.limits;
        let settings = relay::Settings {
            max_message_size: limits.max_message_size,
            idle_timeout: limits.idle_timeout,
            ping_interval: limits.ping_interval,
            pong_timeout: limits.pong_timeout,
            close_timeout: limits.close_timeout,
            datagram_text: matches!(framing, wsgate_framing::FramingSpec::Auto)
                || matches!(peer, PeerAddr::Echo),
        };
        let shutdown = self.shutdown.clone();
        let span = tracing::info_span!("ws", id, %remote);
        let fut = async move {
            let upgraded = match on_upgrade.await {
                Ok(u) => u,
                Err(e) => {
                    debug!("upgrade failed: {e}");
                    return;
                }
            };
            let (client, leftover) = into_client(upgraded);
            let o = relay::run(
                client,
                leftover,
                conn,
                framing.new_framer(),
                settings,
                shutdown,
            )
            .await;
            info!(
                bytes_up = o.bytes_up,
                bytes_down = o.bytes_down,
                close_sent = ?o.close_sent,
                close_received = ?o.close_received,
                reason = %o.reason,
                "websocket closed"
            );
            drop(guard);
        };
        self.tracker.spawn(fut.instrument(span));
        handshake::switching_protocols(&accept, protocol.as_deref())
    }
}

/// Recovers the concrete socket from hyper's upgraded connection, so plain
/// TCP clients can be read on readiness (no idle buffer).
fn into_client(up: hyper::upgrade::Upgraded) -> (ClientIo, Bytes) {
    let up = match up.downcast::<TokioIo<TcpStream>>() {
        Ok(p) => return (ClientIo::Tcp(p.io.into_inner()), p.read_buf),
        Err(up) => up,
    };
    match up.downcast::<TokioIo<TlsStream<TcpStream>>>() {
        Ok(p) => (ClientIo::Io(Box::new(p.io.into_inner())), p.read_buf),
        Err(up) => (ClientIo::Io(Box::new(TokioIo::new(up))), Bytes::new()),
    }
}
