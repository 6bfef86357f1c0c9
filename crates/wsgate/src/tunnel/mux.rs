//! `/mux`: a client's WebSocket carrying a wsmux session, on which the
//! client opens streams, each naming its destination with an open request
//! (docs/tunnel.md §6): `tcp://…` or `udp://…` the gateway reaches itself,
//! `agent://ID/…` through an agent. Every open is checked against the
//! `--mux-allow` patterns (default deny), and a direct destination's
//! resolved address too.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, Instrument};

use super::proto::{self, Destination, Reply, Scheme, Status, Target};
use super::splice::splice;
use super::Tunnel;
use crate::error::Kind;
use crate::io::ClientIo;

/// Who opened a `/mux` session: every stream it opens is checked against
/// the identity's rules (`[tunnel] allow`) and counted against its stream
/// cap, at open — not only at the handshake — and paced by its bandwidth.
#[derive(Clone)]
pub struct Who {
    pub identity: Arc<crate::auth::Identity>,
    pub rules: Option<super::allow::AllowList>,
    /// The subject's `per_identity_bandwidth`, which paces every stream of
    /// the session (with the subject's other connections).
    pub bandwidth: Option<Arc<crate::limits::SharedBandwidth>>,
}

/// Time a client has to send a stream's open request.
const OPEN_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves a `/mux` WebSocket until it ends (or, on `shutdown`, until its
/// open streams end after a GOAWAY).
pub async fn serve(
    client: ClientIo,
    leftover: Bytes,
    tunnel: Arc<Tunnel>,
    connect_timeout: Duration,
    who: Who,
    deflate: Option<(wsframe::deflate::Agreed, wsframe::deflate::Config)>,
    shutdown: CancellationToken,
) {
    let transport = wsmux::WsTransport::from_raw_deflate(
        client.into_io(),
        wsframe::Role::Server,
        wsmux::WsTransport::<Box<dyn crate::io::Io>>::default_config(),
        &leftover,
        deflate,
    );
    let session = wsmux::Session::server(transport, super::mux_config(tunnel.config.keepalive));
    let streams = TaskTracker::new();
    loop {
        tokio::select! {
            s = session.accept() => match s {
                Ok(s) => {
                    let tunnel = tunnel.clone();
                    let span = tracing::info_span!("mux", stream = s.id());
                    streams.spawn(handle(s, tunnel, connect_timeout, who.clone()).instrument(span));
                }
                Err(e) => {
                    debug!("mux session ended: {e}");
                    break;
                }
            },
            () = shutdown.cancelled() => {
                session.goaway();
                break;
            }
        }
    }
    streams.close();
    streams.wait().await;
}

/// Reads a stream's open request, checks it, connects, replies, relays.
async fn handle(mut s: wsmux::Stream, tunnel: Arc<Tunnel>, connect_timeout: Duration, who: Who) {
    let mut buf = BytesMut::with_capacity(256);
    let read = async {
        loop {
            if let Some(text) = proto::decode_open(&mut buf)? {
                return Ok(text);
            }
            if s.read_buf(&mut buf)
                .await
                .map_err(|_| proto::ProtoError::BadMagic(0))?
                == 0
            {
                return Err(proto::ProtoError::BadMagic(0));
            }
        }
    };
    let text = match tokio::time::timeout(OPEN_REQUEST_TIMEOUT, read).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            debug!("bad open request: {e}");
            return s.reset(proto::RESET_BAD_OPEN);
        }
        Err(_) => return s.reset(proto::RESET_OPEN_TIMEOUT),
    };
    let target: Target = match text.parse() {
        Ok(t) => t,
        Err(e) => {
            debug!("bad destination: {e}");
            return s.reset(proto::RESET_BAD_OPEN);
        }
    };
    if !tunnel.mux_allow.permits_target(&target) {
        let r = Reply::refuse(Status::NotAllowed, format!("{target} is not allowed"));
        tunnel.metrics.tunnel_stream("mux", "not_allowed");
        return refuse(s, r).await;
    }
    if who
        .rules
        .as_ref()
        .is_some_and(|r| !r.permits_target(&target))
    {
        let r = Reply::refuse(
            Status::NotAllowed,
            format!("{target} is not allowed for this identity"),
        );
        tunnel.metrics.tunnel_stream("mux", "not_allowed");
        return refuse(s, r).await;
    }
    // The subject's stream slot, held while the stream lives.
    let _slot = match &who.identity.subject {
        Some(subject) => match tunnel.identities_admit(subject) {
            Ok(p) => p,
            Err(e) => return refuse(s, Reply::refuse(Status::NotAllowed, e.to_string())).await,
        },
        None => None,
    };
    match target {
        Target::Agent(a) => {
            let mut agent = match tunnel.open(Some(&a.agent), &a.dest, "mux").await {
                Ok(st) => st,
                Err(e) => {
                    let status = match e.kind {
                        Kind::AgentRefused => Status::NotAllowed,
                        Kind::AgentTimeout => Status::Timeout,
                        Kind::AgentUnavailable => Status::NoAgent,
                        _ => Status::Unreachable,
                    };
                    return refuse(s, Reply::refuse(status, e.to_string())).await;
                }
            };
            if reply_ok(&mut s, &buf).await.is_ok() {
                let r = splice(&mut s, &mut agent)
                    .paced(who.bandwidth.as_ref())
                    .await;
                debug!("mux stream to {a} ended: {r:?}");
            }
        }
        Target::Direct(d) => direct(s, buf, d, &tunnel, connect_timeout, &who).await,
    }
}

/// A destination the gateway reaches itself: its resolved address must be
/// allowed too (a name cannot dodge an address block).
async fn direct(
    mut s: wsmux::Stream,
    buf: BytesMut,
    d: Destination,
    tunnel: &Tunnel,
    connect_timeout: Duration,
    who: &Who,
) {
    let addrs: Vec<_> = match tokio::net::lookup_host((d.host.as_str(), d.port)).await {
        Ok(a) => a.collect(),
        Err(e) => {
            let r = Reply::refuse(Status::Unreachable, format!("{d}: {e}"));
            return refuse(s, r).await;
        }
    };
    let Some(addr) = addrs.into_iter().find(|a| {
        allowed_at(tunnel, &d, a.ip())
            && who
                .rules
                .as_ref()
                .is_none_or(|r| r.permits(&d, Some(a.ip())))
    }) else {
        let r = Reply::refuse(Status::NotAllowed, format!("{d} is not allowed"));
        return refuse(s, r).await;
    };
    tunnel.metrics.tunnel_stream("mux", "ok");
    match d.scheme {
        Scheme::Tcp | Scheme::Http => {
            let tcp = tokio::time::timeout(connect_timeout, TcpStream::connect(addr)).await;
            let mut tcp = match tcp {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    return refuse(s, Reply::refuse(Status::Unreachable, format!("{d}: {e}"))).await
                }
                Err(_) => return refuse(s, Reply::refuse(Status::Timeout, d.to_string())).await,
            };
            let _ = tcp.set_nodelay(true);
            if reply_ok(&mut s, &buf).await.is_ok() {
                let r = splice(&mut s, &mut tcp).paced(who.bandwidth.as_ref()).await;
                debug!("mux stream to {d} ended: {r:?}");
            }
        }
        Scheme::Udp => {
            let bind = if addr.is_ipv4() {
                "0.0.0.0:0"
            } else {
                "[::]:0"
            };
            let sock = match UdpSocket::bind(bind).await {
                Ok(u) if u.connect(addr).await.is_ok() => u,
                _ => return refuse(s, Reply::refuse(Status::Unreachable, d.to_string())).await,
            };
            if reply_ok(&mut s, &buf).await.is_ok() {
                let pace = who.bandwidth.as_ref();
                let r = super::datagram::bridge(s, &sock, super::datagram::IDLE, pace).await;
                debug!("mux flow to {d} ended: {r:?}");
            }
        }
    }
}

/// Whether some `--mux-allow` pattern covers `d` reached at `ip`.
fn allowed_at(tunnel: &Tunnel, d: &Destination, ip: std::net::IpAddr) -> bool {
    tunnel.mux_allow.permits(d, Some(ip))
}

/// Sends OK; bytes the client sent after its open request are not lost:
/// they are read again by the relay (the stream keeps them).
pub(crate) async fn reply_ok(s: &mut wsmux::Stream, early: &BytesMut) -> std::io::Result<()> {
    let mut out = BytesMut::new();
    Reply::ok().encode(&mut out);
    s.write_all(&out).await?;
    if !early.is_empty() {
        // The opener must wait for the reply (docs/tunnel.md §2): data sent
        // before it is a protocol error of the client's.
        info!("client sent data before the reply; resetting the stream");
        s.reset(proto::RESET_BAD_OPEN);
        return Err(std::io::ErrorKind::InvalidData.into());
    }
    Ok(())
}

/// Answers a refusal and ends the stream.
pub(crate) async fn refuse(mut s: wsmux::Stream, r: Reply) {
    let mut out = BytesMut::new();
    r.encode(&mut out);
    if s.write_all(&out).await.is_ok() {
        let _ = s.shutdown().await;
        // Let the reply out before the stream is dropped (a drop without
        // the peer's FIN would reset it).
        let mut sink = [0u8; 512];
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while matches!(s.read(&mut sink).await, Ok(n) if n > 0) {}
        })
        .await;
    }
}
