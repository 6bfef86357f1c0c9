//! hyper for everything our own reader does not take: plain HTTP/1.1
//! (keep-alive included), HTTP/2 (ALPN or prior knowledge) with RFC 8441
//! extended CONNECT, and heads our parser refuses. Every request goes
//! through the request path; WebSockets run once hyper hands over the socket.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Response;
use hyper::body::Incoming;
use hyper::server::conn::{http1 as hyper_h1, http2 as hyper_h2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tracing::debug;

use crate::gateway::{Conn, Gateway};
use crate::http::Body;
use crate::io::{ClientIo, Rewind};
use crate::open::{Answer, Opened, Request};

/// How long a connection that has sent no request yet may take to send one
/// once the gateway is shutting down.
const FIRST_REQUEST_GRACE: Duration = Duration::from_secs(1);

impl Gateway {
    /// Serves one connection with HTTP/1.1 or HTTP/2 until it ends; on
    /// shutdown, asks it to finish gracefully (bounded).
    pub(super) async fn serve_http<I>(self: &Arc<Self>, io: I, h2: bool, c: Conn)
    where
        I: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let gw = self.clone();
        let worker = c.worker;
        let handshake_timeout = c.handshake_timeout;
        // A permit once a request reached the service: see the shutdown below.
        let served = Arc::new(tokio::sync::Notify::new());
        let first = served.clone();
        let svc = service_fn(move |req| {
            first.notify_one();
            let (gw, c) = (gw.clone(), c.clone());
            async move { Ok::<_, Infallible>(gw.handle(req, &c).await) }
        });
        // The two connection types share no trait for graceful shutdown.
        macro_rules! until_shutdown {
            ($conn:expr) => {{
                let conn = $conn;
                tokio::pin!(conn);
                tokio::select! {
                    r = &mut conn => {
                        if let Err(e) = r {
                            debug!("http connection ended: {e}");
                        }
                    }
                    _ = self.workers[worker].shutdown.cancelled() => {
                        // hyper ends a connection that has not started a
                        // request at once, even when its request is read
                        // already (our reader took the head; it waits in
                        // the rewind buffer): a connection accepted just
                        // before the shutdown gets its first request served
                        // (waiting at most FIRST_REQUEST_GRACE for it).
                        let done = tokio::select! {
                            r = &mut conn => {
                                if let Err(e) = r {
                                    debug!("http connection ended: {e}");
                                }
                                true
                            }
                            () = served.notified() => false,
                            () = tokio::time::sleep(FIRST_REQUEST_GRACE) => false,
                        };
                        if !done {
                            // Requests in progress finish, within the drain
                            // timeout (HTTP/1.1 as HTTP/2: a proxied answer
                            // may take longer than a second).
                            conn.as_mut().graceful_shutdown();
                            let _ = tokio::time::timeout(self.config.limits.drain_timeout, conn).await;
                        }
                    }
                }
            }};
        }
        let io = TokioIo::new(io);
        if h2 {
            until_shutdown!(hyper_h2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .enable_connect_protocol()
                .keep_alive_interval(Some(Duration::from_secs(30)))
                .serve_connection(io, svc))
        } else {
            until_shutdown!(hyper_h1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(handshake_timeout)
                .serve_connection(io, svc)
                .with_upgrades())
        }
    }

    /// Answers one HTTP request hyper read, through the request path: the
    /// health check, a refusal, a proxied request, or a WebSocket handshake
    /// (HTTP/2 extended CONNECT, or HTTP/1.1 after other requests on the
    /// connection), whose relay starts once hyper hands over the socket.
    pub async fn handle(
        self: &Arc<Self>,
        mut req: http::Request<Incoming>,
        c: &Conn,
    ) -> Response<Body> {
        let on_upgrade = hyper::upgrade::on(&mut req);
        let (head, body) = req.into_parts();
        match self
            .open(
                Request {
                    head,
                    body: Some(body),
                },
                c,
            )
            .await
        {
            Answer::Respond(r) => r,
            Answer::Upgrade(accepted, opened) => {
                self.workers[c.worker]
                    .tracker
                    .spawn(run_after(opened, on_upgrade));
                accepted.into_response()
            }
            Answer::Tunnel(response, opened) => {
                self.workers[c.worker]
                    .tracker
                    .spawn(run_after(opened, on_upgrade));
                response
            }
        }
    }
}

/// Runs a WebSocket hyper answered once hyper hands over the client's socket.
async fn run_after(opened: Opened, on_upgrade: hyper::upgrade::OnUpgrade) {
    match on_upgrade.await {
        Ok(up) => {
            let (client, leftover) = into_client(up);
            opened.run(client, leftover).await
        }
        Err(e) => debug!(parent: opened.span(), "upgrade failed: {e}"),
    }
}

/// Recovers the concrete socket from hyper's upgraded HTTP/1.1 connection
/// (always a [`Rewind`]: hyper only gets connections whose first head we
/// read), so plain TCP clients can be read on readiness (no idle buffer).
pub(crate) fn into_client(up: hyper::upgrade::Upgraded) -> (ClientIo, Bytes) {
    fn joined(prefix: Bytes, read_buf: Bytes) -> Bytes {
        match (prefix.is_empty(), read_buf.is_empty()) {
            (true, _) => read_buf,
            (false, true) => prefix,
            (false, false) => [prefix, read_buf].concat().into(),
        }
    }
    let up = match up.downcast::<TokioIo<Rewind<TcpStream>>>() {
        Ok(p) => {
            let r = p.io.into_inner();
            return (ClientIo::Tcp(r.inner), joined(r.prefix, p.read_buf));
        }
        Err(up) => up,
    };
    let up = match up.downcast::<TokioIo<Rewind<TlsStream<TcpStream>>>>() {
        Ok(p) => {
            let r = p.io.into_inner();
            return (
                ClientIo::Io(Box::new(r.inner)),
                joined(r.prefix, p.read_buf),
            );
        }
        Err(up) => up,
    };
    // HTTP/2 streams: nothing to recover.
    (ClientIo::Io(Box::new(TokioIo::new(up))), Bytes::new())
}
