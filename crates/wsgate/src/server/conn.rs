//! A connection from accept to its first request: TLS, the first request
//! head read by our own HTTP/1.1 parser, and the WebSocket handshakes
//! answered there (the socket then goes to the relay in the same task, once
//! the handshake's state is freed); anything else goes to [`super::hyper`].

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http::Response;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tracing::{debug, warn, Instrument};

use crate::gateway::{Conn, Gateway};
use crate::http::handshake;
use crate::http::{h1 as http1, Body};
use crate::io::{ClientIo, Rewind};
use crate::open::{Answer, Opened, Request};

impl Gateway {
    /// Serves one accepted connection to its end.
    pub(super) async fn connection(
        self: &Arc<Self>,
        worker: usize,
        listener: usize,
        stream: std::net::TcpStream,
        remote: SocketAddr,
    ) {
        let tls = self.listener_tls[listener].clone();
        let limit = self.handshake_timeout(listener);
        // Inherited from the listening socket on Linux.
        #[cfg(not(target_os = "linux"))]
        let _ = stream.set_nodelay(true);
        // A cleartext client has most often sent its request by now: read
        // it before the socket joins the event loop (see `read_now`).
        let mut first = BytesMut::new();
        if tls.is_none() {
            read_now(&stream, &mut first);
        }
        let stream = match TcpStream::from_std(stream) {
            Ok(s) => s,
            Err(e) => return warn!("cannot register an accepted connection: {e}"),
        };
        // Unique over the workers, each counting on its own.
        let n = self.workers[worker].next_id.fetch_add(1, Ordering::Relaxed);
        let id = n * self.workers.len() as u64 + worker as u64 + 1;
        let span = tracing::info_span!("conn", id, %remote);
        let mut c = Conn {
            remote,
            id,
            secure: false,
            client_cert: None,
            handshake_timeout: limit,
            worker,
            listener,
        };
        async move {
            // The handshake is boxed, and its box freed before the WebSocket
            // runs: the task's own future holds little more than the box of
            // the running WebSocket. (Inline, the handshake's state — request
            // head, timeouts, routing — made the task 1.6 KiB, held for as long
            // as the WebSocket lived.)
            let websocket = match tls {
                None => Box::pin(self.first_request(stream, true, c, first)).await,
                Some(acceptor) => {
                    Box::pin(async move {
                        match tokio::time::timeout(limit, acceptor.accept(stream)).await {
                            Ok(Ok(s)) => {
                                c.secure = true;
                                c.client_cert = s
                                    .get_ref()
                                    .1
                                    .peer_certificates()
                                    .and_then(|chain| chain.first())
                                    .map(|cert| Arc::new(cert.clone().into_owned()));
                                if s.get_ref().1.alpn_protocol() == Some(b"h2") {
                                    self.serve_http(s, true, c).await;
                                    None
                                } else {
                                    self.first_request(s, false, c, BytesMut::new()).await
                                }
                            }
                            Ok(Err(e)) => {
                                if let Some(reason) = crate::auth::mtls::tls_refusal(&e) {
                                    self.metrics.refused(reason);
                                }
                                debug!("TLS handshake failed: {e}");
                                None
                            }
                            Err(_) => {
                                debug!("TLS handshake timed out");
                                None
                            }
                        }
                    })
                    .await
                }
            };
            // (`map`, so that nothing but the box is held while it runs.)
            let run =
                websocket.map(|(opened, client, leftover)| Box::pin(opened.run(client, leftover)));
            if let Some(run) = run {
                run.await
            }
        }
        .instrument(span)
        .await
    }

    /// Reads the head of a connection's first request (within the handshake
    /// timeout). An HTTP/1.1 WebSocket handshake is answered here and its
    /// socket returned, with the bytes after the head, for the relay to run;
    /// anything else — plain HTTP, HTTP/2 with prior knowledge (`cleartext`),
    /// a head we cannot parse — is served by hyper, which reads the same bytes
    /// again.
    async fn first_request<I: Accepted>(
        self: &Arc<Self>,
        mut io: I,
        cleartext: bool,
        c: Conn,
        mut buf: BytesMut,
    ) -> Option<(Opened, ClientIo, Bytes)> {
        let first = match tokio::time::timeout(
            c.handshake_timeout,
            read_first(&mut io, &mut buf, cleartext),
        )
        .await
        {
            Ok(f) => f,
            Err(_) => {
                debug!("no request head within the handshake timeout");
                return None;
            }
        };
        match first {
            First::Gone => {}
            First::Head(parts, read, len)
                if parts.method == http::Method::GET && handshake::wants_websocket(&parts) =>
            {
                // Bytes after the head (a first frame) are copied out, so the
                // read buffer is freed with the head.
                let leftover = Bytes::copy_from_slice(&read[len..]);
                drop(read);
                // Finished before the WebSocket runs (the caller runs it), so
                // nothing of the handshake (its head, routing metadata) is
                // held while it does.
                let opened = self.websocket_first(&mut io, parts, &c).await?;
                return Some((opened, io.into_client_io(), leftover));
            }
            First::H2 => Box::pin(self.serve_http(Rewind::new(buf.freeze(), io), true, c)).await,
            First::Head(parts, read, _) => {
                drop(parts);
                Box::pin(self.serve_http(Rewind::new(read, io), false, c)).await
            }
            First::Other => {
                Box::pin(self.serve_http(Rewind::new(buf.freeze(), io), false, c)).await
            }
        }
        None
    }

    /// Answers an HTTP/1.1 WebSocket handshake read by [`Self::first_request`]
    /// through the request path: writes the 101 and returns the WebSocket to
    /// run, or writes the answer given instead (the connection then closes).
    async fn websocket_first<I: Accepted>(
        self: &Arc<Self>,
        io: &mut I,
        head: http::request::Parts,
        c: &Conn,
    ) -> Option<Opened> {
        let answer = match self.open(Request { head, body: None }, c).await {
            Answer::Upgrade(accepted, opened) => {
                let mut head = BytesMut::with_capacity(256);
                accepted.encode_h1(&mut head);
                if let Err(e) = write_flush(io, &head).await {
                    debug!("writing the 101 failed: {e}");
                    return None;
                }
                return Some(opened);
            }
            Answer::Respond(r) => r,
            // A CONNECT is read by hyper, never by this reader.
            Answer::Tunnel(r, _) => r,
        };
        if let Err(e) = write_answer(io, answer).await {
            debug!("writing the answer failed: {e}");
        }
        None
    }
}

/// A connection accepted on a listener: cleartext or TLS.
trait Accepted: AsyncRead + AsyncWrite + Send + Unpin + 'static {
    /// The socket as the relay takes it.
    fn into_client_io(self) -> ClientIo;
}

impl Accepted for TcpStream {
    fn into_client_io(self) -> ClientIo {
        ClientIo::Tcp(self)
    }
}

impl Accepted for TlsStream<TcpStream> {
    fn into_client_io(self) -> ClientIo {
        ClientIo::Io(Box::new(self))
    }
}

/// How a connection opened.
#[allow(clippy::large_enum_variant)] // one per connection, moved once
enum First {
    /// Closed (or failed) before sending anything.
    Gone,
    /// The HTTP/2 connection preface (cleartext, prior knowledge).
    H2,
    /// A complete HTTP/1.x request head, the bytes read (its header values
    /// refer to them) and the head's length.
    Head(http::request::Parts, Bytes, usize),
    /// Anything else: left to hyper to answer.
    Other,
}

/// Reads what a just-accepted connection has already sent, before the
/// socket is registered with the event loop. Clients send their request
/// right after connecting, so it is usually there: the handshake then
/// starts at once instead of after a trip through the event loop (and its
/// timer is never armed); and as the socket joins the loop only after the
/// read, its readiness is not left stale by it. Nothing there, or an error:
/// `buf` stays empty and the request is read the usual way.
fn read_now(stream: &std::net::TcpStream, buf: &mut BytesMut) {
    use std::io::Read;
    // Zeroed by the allocator (fresh memory usually is): no separate fill.
    *buf = BytesMut::zeroed(1024);
    match (&*stream).read(&mut buf[..]) {
        Ok(n) => buf.truncate(n),
        Err(_) => buf.clear(),
    }
}

/// Reads until the first request head is complete, or the connection shows
/// itself to be something else.
async fn read_first<I: AsyncRead + Unpin>(
    io: &mut I,
    buf: &mut BytesMut,
    cleartext: bool,
) -> First {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    loop {
        let n = buf.len().min(PREFACE.len());
        if cleartext && n > 0 && buf[..n] == PREFACE[..n] {
            if n == PREFACE.len() {
                return First::H2;
            }
        } else if !buf.is_empty() {
            // Frozen so that the header values can share it.
            let head = std::mem::take(buf).freeze();
            match http1::parse_request(&head) {
                Ok(Some((parts, len))) => return First::Head(parts, head, len),
                Ok(None) => *buf = http1::unfreeze(head),
                Err(_) => {
                    *buf = http1::unfreeze(head);
                    return First::Other;
                }
            }
        }
        buf.reserve(1024);
        match io.read_buf(buf).await {
            Ok(0) | Err(_) if buf.is_empty() => return First::Gone,
            Ok(0) | Err(_) => return First::Other,
            Ok(_) => {}
        }
    }
}

async fn write_flush<I: AsyncWrite + Unpin>(io: &mut I, data: &[u8]) -> std::io::Result<()> {
    io.write_all(data).await?;
    io.flush().await
}

/// Writes a whole answer (head and body) and ends the connection: the
/// answers given in place of a 101 close it (`Connection: close`).
async fn write_answer<I: AsyncWrite + Unpin>(
    io: &mut I,
    resp: Response<Body>,
) -> std::io::Result<()> {
    use http::header::{HeaderValue, CONNECTION, CONTENT_LENGTH};
    use http_body::Body as _;
    use http_body_util::BodyExt;
    let (mut parts, mut body) = resp.into_parts();
    if let (false, Some(n)) = (
        parts.headers.contains_key(CONTENT_LENGTH),
        body.size_hint().exact(),
    ) {
        parts.headers.insert(CONTENT_LENGTH, HeaderValue::from(n));
    }
    // Without a length the body runs until the connection closes.
    parts
        .headers
        .insert(CONNECTION, HeaderValue::from_static("close"));
    let mut out = BytesMut::with_capacity(512);
    http1::encode_response_head(&mut out, parts.status, &parts.headers);
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame
            .map_err(|e| std::io::Error::other(e.to_string()))?
            .into_data()
        else {
            continue;
        };
        out.extend_from_slice(&data);
        if out.len() >= 16 * 1024 {
            io.write_all(&out).await?;
            out.clear();
        }
    }
    write_flush(io, &out).await?;
    io.shutdown().await
}
