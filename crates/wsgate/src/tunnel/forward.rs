//! `--forward LISTEN=agent://ID/PEER`: a listener on the gateway whose every
//! TCP connection (or UDP flow, by source address) is one stream to PEER
//! through agent ID.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::proto::{decode_datagram, encode_datagram, MAX_DATAGRAM};
use super::splice::splice_mux;
use super::Tunnel;
use crate::config::Forward;

/// A bound `udp://` forward (TCP forwards are served by the workers, like
/// every TCP listener).
pub struct Bound(UdpSocket);

impl Bound {
    /// Binds `f.listen` for UDP.
    pub async fn bind(f: &Forward) -> std::io::Result<Bound> {
        Ok(Bound(UdpSocket::bind(&f.listen).await?))
    }

    /// `udp://HOST:PORT`, with the real port.
    pub fn url(&self) -> std::io::Result<String> {
        Ok(format!("udp://{}", self.0.local_addr()?))
    }
}

/// Serves a bound UDP forward until `shutdown`.
pub async fn serve(
    bound: Bound,
    f: Forward,
    tunnel: Arc<Tunnel>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    serve_udp(bound.0, f, tunnel, shutdown, tracker).await
}

/// One forwarded TCP connection: a stream through the agent, spliced. A
/// refused or failed open closes the connection (it has nothing to say).
pub(crate) async fn forward_tcp(mut tcp: TcpStream, f: &Forward, tunnel: &Tunnel) {
    let mut stream = match tunnel.open(Some(&f.to.agent), &f.to.dest, "forward").await {
        Ok(s) => s,
        Err(e) => {
            warn!("{e}");
            return;
        }
    };
    let id = stream.id();
    match splice_mux(&mut tcp, &mut stream).await {
        Ok(c) => debug!(
            stream = id,
            up = c.a_to_b,
            down = c.b_to_a,
            "forward closed"
        ),
        Err((_, e, c)) => {
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
