//! `--forward LISTEN=agent://ID/PEER`: a listener on the gateway whose every
//! TCP connection (or UDP flow, by source address) is one stream to PEER
//! through agent ID.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

use super::proto::{decode_datagram, encode_datagram, MAX_DATAGRAM};
use super::splice::splice;
use super::Tunnel;
use crate::config::Forward;

/// A bound forward listener.
pub enum Bound {
    Tcp(TcpListener),
    Udp(UdpSocket),
}

impl Bound {
    /// Binds `f.listen` (TCP, or UDP for `udp://`). A TCP forward listens
    /// with a backlog of 1024, as the gateway's own listeners do: with
    /// tokio's default (128), a burst of a thousand clients overflowed the
    /// accept queue and the connections past it sat half-open for seconds.
    pub async fn bind(f: &Forward) -> std::io::Result<Bound> {
        Ok(if f.udp {
            Bound::Udp(UdpSocket::bind(&f.listen).await?)
        } else {
            use socket2::{Domain, Socket, Type};
            let addr = tokio::net::lookup_host(&f.listen)
                .await?
                .next()
                .ok_or_else(|| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        format!("{}: no address", f.listen),
                    )
                })?;
            let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
            #[cfg(unix)]
            s.set_reuse_address(true)?;
            s.set_nonblocking(true)?;
            s.bind(&addr.into())?;
            s.listen(1024)?;
            Bound::Tcp(TcpListener::from_std(s.into())?)
        })
    }

    /// `tcp://HOST:PORT` or `udp://HOST:PORT`, with the real port.
    pub fn url(&self) -> std::io::Result<String> {
        Ok(match self {
            Bound::Tcp(l) => format!("tcp://{}", l.local_addr()?),
            Bound::Udp(s) => format!("udp://{}", s.local_addr()?),
        })
    }
}

/// Serves a bound forward until `shutdown`.
pub async fn serve(
    bound: Bound,
    f: Forward,
    tunnel: Arc<Tunnel>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    match bound {
        Bound::Tcp(l) => serve_tcp(l, f, tunnel, shutdown, tracker).await,
        Bound::Udp(s) => serve_udp(s, f, tunnel, shutdown, tracker).await,
    }
}

async fn serve_tcp(
    l: TcpListener,
    f: Forward,
    tunnel: Arc<Tunnel>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let f = Arc::new(f);
    loop {
        let (tcp, from) = tokio::select! {
            () = shutdown.cancelled() => return,
            r = l.accept() => match r {
                Ok(a) => a,
                Err(e) => {
                    warn!("forward {}: accept failed: {e}", f.listen);
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let (f, tunnel, stop) = (f.clone(), tunnel.clone(), shutdown.clone());
        let span = tracing::info_span!("forward", %from, to = %f.to);
        tracker.spawn(
            async move {
                tokio::select! {
                    () = forward_tcp(tcp, &f, &tunnel) => {}
                    () = stop.cancelled() => debug!("gateway shutting down"),
                }
            }
            .instrument(span),
        );
    }
}

/// One forwarded TCP connection: a stream through the agent, spliced. A
/// refused or failed open closes the connection (it has nothing to say).
async fn forward_tcp(mut tcp: TcpStream, f: &Forward, tunnel: &Tunnel) {
    let mut stream = match tunnel.open(Some(&f.to.agent), &f.to.dest, "forward").await {
        Ok(s) => s,
        Err(e) => {
            warn!("{e}");
            return;
        }
    };
    let id = stream.id();
    match splice(&mut tcp, &mut stream).await {
        Ok(c) => debug!(
            stream = id,
            up = c.a_to_b,
            down = c.b_to_a,
            "forward closed"
        ),
        Err((e, c)) => {
            info!(
                stream = id,
                up = c.a_to_b,
                down = c.b_to_a,
                "forward failed: {e}"
            );
            // Reset, not FIN: the client must see it did not end cleanly.
            let _ = socket2::SockRef::from(&tcp).set_linger(Some(std::time::Duration::ZERO));
        }
    }
}

/// UDP flows by source address, each a stream through the agent.
async fn serve_udp(
    socket: UdpSocket,
    f: Forward,
    tunnel: Arc<Tunnel>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let socket = Arc::new(socket);
    let flows: Arc<Mutex<HashMap<SocketAddr, mpsc::Sender<Bytes>>>> = Arc::default();
    let f = Arc::new(f);
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let (n, from) = tokio::select! {
            () = shutdown.cancelled() => return,
            r = socket.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(e) => {
                    debug!("forward {}: {e}", f.listen);
                    continue;
                }
            },
        };
        let datagram = Bytes::copy_from_slice(&buf[..n]);
        let existing = flows
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&from)
            .cloned();
        let tx = match existing {
            Some(tx) => tx,
            None => {
                // Bounded: a flow whose stream lags drops datagrams, as UDP may.
                let (tx, rx) = mpsc::channel(256);
                flows
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(from, tx.clone());
                let (f, tunnel, socket, flows, stop) = (
                    f.clone(),
                    tunnel.clone(),
                    socket.clone(),
                    flows.clone(),
                    shutdown.clone(),
                );
                tracker.spawn(async move {
                    tokio::select! {
                        () = udp_flow(rx, from, &f, &tunnel, &socket) => {}
                        () = stop.cancelled() => {}
                    }
                    flows
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&from);
                });
                tx
            }
        };
        let _ = tx.try_send(datagram);
    }
}

/// One UDP flow: datagrams from `from` go up the stream, framed; the
/// stream's datagrams go back to `from`. Ends after [`super::datagram::IDLE`]
/// without a datagram, or with the stream.
async fn udp_flow(
    mut rx: mpsc::Receiver<Bytes>,
    from: SocketAddr,
    f: &Forward,
    tunnel: &Tunnel,
    socket: &UdpSocket,
) {
    let stream = match tunnel.open(Some(&f.to.agent), &f.to.dest, "forward").await {
        Ok(s) => s,
        Err(e) => return warn!(%from, "{e}"),
    };
    let (mut rd, mut wr) = tokio::io::split(stream);
    let (mut inbuf, mut out) = (BytesMut::new(), BytesMut::new());
    loop {
        tokio::select! {
            d = rx.recv() => {
                let Some(d) = d else { return };
                if encode_datagram(&d, &mut out).is_err() { continue }
                if wr.write_all(&out).await.is_err() { return }
                out.clear();
            }
            r = rd.read_buf(&mut inbuf) => {
                match r {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                while let Some(d) = decode_datagram(&mut inbuf) {
                    let _ = socket.send_to(&d, from).await;
                }
            }
            () = tokio::time::sleep(super::datagram::IDLE) => {
                let _ = wr.shutdown().await;
                return;
            }
        }
    }
}
