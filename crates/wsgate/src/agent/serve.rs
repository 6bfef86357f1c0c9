//! One stream the gateway opened, in phases (`docs/tunnel.md` §2–§4):
//!
//! 1. read the open request (10 s; malformed: RST `0x100`, late: RST `0x101`;
//!    the session stays up either way);
//! 2. decide: the destination must be covered by `--allow` before anything
//!    is resolved, and the address it resolves to must be covered too (name
//!    globs match the name, blocks the address); only addresses that passed
//!    are connected to;
//! 3. connect (TCP with `TCP_NODELAY`, or a connected UDP socket) within
//!    the connect timeout;
//! 4. reply (OK, NOT_ALLOWED, UNREACHABLE, TIMEOUT); after a refusal, FIN;
//! 5. relay until both directions end; an error on one side aborts the other
//!    (a stream RST becomes a TCP RST and the other way round).

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use super::relay;
use crate::tunnel::allow::AllowList;
use crate::tunnel::proto::{self, Destination, Reply, Scheme, Status};
use crate::tunnel::splice::{splice_mux, Copied, Failed};

/// How a stream ended, for the log line.
#[derive(Debug)]
pub enum Outcome {
    /// The open request was malformed: reset with `0x100`.
    BadOpen(String),
    /// No whole open request in time: reset with `0x101`.
    OpenTimeout,
    /// The stream failed before its open request was read.
    Gone(io::Error),
    /// Refused with this reply.
    Refused(Destination, Reply),
    /// Connected and relayed; `error` says which side failed, if one did.
    Relayed {
        dest: Destination,
        addr: SocketAddr,
        /// Bytes (or datagrams, for udp) from the gateway to the destination.
        sent: u64,
        /// And back.
        received: u64,
        error: Option<String>,
    },
}

/// What the agent needs to serve a stream.
pub struct Rules<'a> {
    pub id: &'a str,
    pub allow: &'a AllowList,
    pub open_timeout: Duration,
    pub connect_timeout: Duration,
    pub udp_idle: Duration,
}

/// Serves one stream from its open request to its end.
pub async fn serve(mut stream: wsmux::Stream, rules: &Rules<'_>) -> Outcome {
    let (text, pending) = match read_open(&mut stream, rules.open_timeout).await {
        Ok(r) => r,
        Err(OpenError::Bad(why)) => {
            stream.reset(proto::RESET_BAD_OPEN);
            return Outcome::BadOpen(why);
        }
        Err(OpenError::Timeout) => {
            stream.reset(proto::RESET_OPEN_TIMEOUT);
            return Outcome::OpenTimeout;
        }
        Err(OpenError::Io(e)) => return Outcome::Gone(e),
    };
    let dest: Destination = match text.parse() {
        Ok(d) => d,
        Err(e) => {
            stream.reset(proto::RESET_BAD_OPEN);
            return Outcome::BadOpen(e.to_string());
        }
    };
    let peer = match tokio::time::timeout(rules.connect_timeout, reach(&dest, rules)).await {
        Ok(Ok(peer)) => peer,
        Ok(Err(reply)) => return refuse(stream, dest, reply).await,
        Err(_) => {
            let reply = Reply::refuse(
                Status::Timeout,
                format!("{dest}: no answer within {:?}", rules.connect_timeout),
            );
            return refuse(stream, dest, reply).await;
        }
    };
    let mut wire = BytesMut::new();
    Reply::ok().encode(&mut wire);
    if let Err(e) = stream.write_all(&wire).await {
        return Outcome::Gone(e);
    }
    match peer {
        Peer::Tcp(tcp, addr) => relay_tcp(stream, tcp, addr, dest, pending).await,
        Peer::Udp(udp, addr) => {
            let r = relay::datagrams(
                &mut stream,
                relay::Udp::Connected(&udp),
                pending,
                rules.udp_idle,
            )
            .await;
            let (moved, error) = match r {
                Ok(m) => {
                    relay::finish(&mut stream).await;
                    (m, None)
                }
                Err(relay::DatagramError::Stream(e)) => {
                    (Default::default(), Some(format!("stream: {e}")))
                }
                Err(relay::DatagramError::Udp(e)) => {
                    stream.reset(wsmux::reset_code::CANCEL);
                    (Default::default(), Some(format!("udp: {e}")))
                }
            };
            Outcome::Relayed {
                dest,
                addr,
                sent: moved.to_udp,
                received: moved.to_stream,
                error,
            }
        }
    }
}

async fn refuse(mut stream: wsmux::Stream, dest: Destination, reply: Reply) -> Outcome {
    let mut wire = BytesMut::new();
    reply.encode(&mut wire);
    if stream.write_all(&wire).await.is_ok() {
        relay::finish(&mut stream).await;
    }
    Outcome::Refused(dest, reply)
}

async fn relay_tcp(
    mut stream: wsmux::Stream,
    mut tcp: TcpStream,
    addr: SocketAddr,
    dest: Destination,
    pending: BytesMut,
) -> Outcome {
    // The opener should send nothing before the reply; what it sent anyway
    // goes to the destination first.
    if !pending.is_empty() {
        if let Err(e) = tcp.write_all(&pending).await {
            stream.reset(wsmux::reset_code::CANCEL);
            return Outcome::Relayed {
                dest,
                addr,
                sent: 0,
                received: 0,
                error: Some(format!("destination: {e}")),
            };
        }
    }
    let moved = |c: Copied| relay::Moved {
        a_to_b: c.b_to_a,
        b_to_a: c.a_to_b,
    };
    let (moved, error) = match splice_mux(&mut tcp, &mut stream).await {
        Ok(c) => (moved(c), None),
        Err((side, e, c)) => {
            let error = match side {
                Failed::Mux => {
                    relay::abort_tcp(tcp);
                    format!("stream: {e}")
                }
                Failed::Io => {
                    stream.reset(wsmux::reset_code::CANCEL);
                    format!("destination: {e}")
                }
            };
            (moved(c), Some(error))
        }
    };
    Outcome::Relayed {
        dest,
        addr,
        sent: moved.a_to_b + pending.len() as u64,
        received: moved.b_to_a,
        error,
    }
}

enum OpenError {
    Bad(String),
    Timeout,
    Io(io::Error),
}

/// Reads the open request; returns its text and the bytes read past it.
async fn read_open(
    stream: &mut wsmux::Stream,
    timeout: Duration,
) -> Result<(String, BytesMut), OpenError> {
    let mut buf = BytesMut::with_capacity(256);
    let read = async {
        loop {
            match proto::decode_open(&mut buf) {
                Ok(Some(text)) => return Ok(text),
                Ok(None) => {}
                Err(e) => return Err(OpenError::Bad(e.to_string())),
            }
            // decode_open refuses a length over 1024 once the header is
            // in, so the buffer stays under 4 + 1024 bytes plus one read.
            buf.reserve(4 + proto::MAX_TEXT);
            match stream.read_buf(&mut buf).await {
                Ok(0) => {
                    return Err(OpenError::Bad(
                        "stream ended before a whole open request".into(),
                    ))
                }
                Ok(_) => {}
                Err(e) => return Err(OpenError::Io(e)),
            }
        }
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(Ok(text)) => Ok((text, buf)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(OpenError::Timeout),
    }
}

enum Peer {
    Tcp(TcpStream, SocketAddr),
    Udp(UdpSocket, SocketAddr),
}

/// The allow decision, resolution and connection: `Err` is the refusal.
async fn reach(dest: &Destination, rules: &Rules<'_>) -> Result<Peer, Reply> {
    let addrs = permitted_addrs(dest, rules).await?;
    let mut last: Option<io::Error> = None;
    for addr in addrs {
        let r = match dest.scheme {
            Scheme::Tcp | Scheme::Http => TcpStream::connect(addr).await.map(|t| {
                let _ = t.set_nodelay(true);
                Peer::Tcp(t, addr)
            }),
            Scheme::Udp => udp_connect(addr).await.map(|u| Peer::Udp(u, addr)),
        };
        match r {
            Ok(p) => return Ok(p),
            Err(e) => last = Some(e),
        }
    }
    let e = last.map_or_else(|| "no address".to_string(), |e| e.to_string());
    Err(Reply::refuse(Status::Unreachable, format!("{dest}: {e}")))
}

async fn udp_connect(addr: SocketAddr) -> io::Result<UdpSocket> {
    let any: IpAddr = match addr {
        SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    let s = UdpSocket::bind((any, 0)).await?;
    s.connect(addr).await?;
    Ok(s)
}

/// The addresses of `dest` the allow list covers, in resolver order.
/// Nothing is resolved for a destination no pattern could cover.
async fn permitted_addrs(dest: &Destination, rules: &Rules<'_>) -> Result<Vec<SocketAddr>, Reply> {
    let not_allowed = |why: String| Reply::refuse(Status::NotAllowed, why);
    if !rules.allow.may_permit(dest) {
        return Err(not_allowed(format!(
            "agent {} does not allow {dest} (no --allow pattern covers it)",
            rules.id
        )));
    }
    let resolved: Vec<SocketAddr> = tokio::net::lookup_host((dest.host.as_str(), dest.port))
        .await
        .map_err(|e| {
            Reply::refuse(
                Status::Unreachable,
                format!("{dest}: cannot resolve {}: {e}", dest.host),
            )
        })?
        .collect();
    let (ok, denied): (Vec<SocketAddr>, Vec<SocketAddr>) = resolved
        .into_iter()
        .partition(|a| rules.allow.permits(dest, Some(a.ip())));
    match (ok.is_empty(), denied.first()) {
        (false, _) => Ok(ok),
        (true, Some(a)) => Err(not_allowed(format!(
            "agent {} does not allow {dest}: it resolves to {}, which no --allow pattern covers",
            rules.id,
            a.ip()
        ))),
        (true, None) => Err(Reply::refuse(
            Status::Unreachable,
            format!("{dest}: {} has no address", dest.host),
        )),
    }
}

impl Outcome {
    /// A short word for the log line.
    pub fn word(&self) -> &'static str {
        match self {
            Outcome::BadOpen(_) => "bad-open",
            Outcome::OpenTimeout => "open-timeout",
            Outcome::Gone(_) => "gone",
            Outcome::Refused(_, r) => match r.status {
                Status::NotAllowed => "not-allowed",
                Status::Unreachable => "unreachable",
                Status::Timeout => "timeout",
                Status::Ok | Status::NoAgent => "refused",
            },
            Outcome::Relayed { error: None, .. } => "closed",
            Outcome::Relayed { error: Some(_), .. } => "aborted",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(allow: &AllowList) -> Rules<'_> {
        Rules {
            id: "site-a",
            allow,
            open_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            udp_idle: relay::UDP_IDLE,
        }
    }

    #[tokio::test]
    async fn allow_decisions_check_names_and_resolved_addresses() {
        let allow = AllowList::parse(&[
            "tcp://127.0.0.0/8:1000-2000",
            "tcp://localhost:3000",
            "udp://10.0.0.2:53",
        ])
        .unwrap();
        let r = rules(&allow);
        let d = |s: &str| s.parse::<Destination>().unwrap();
        // An address literal in a block.
        let ok = permitted_addrs(&d("tcp://127.0.0.1:1500"), &r)
            .await
            .unwrap();
        assert_eq!(ok, ["127.0.0.1:1500".parse().unwrap()]);
        // A port outside every pattern: refused before any lookup.
        let no = permitted_addrs(&d("tcp://127.0.0.1:22"), &r)
            .await
            .unwrap_err();
        assert_eq!(no.status, Status::NotAllowed);
        assert!(no.message.contains("tcp://127.0.0.1:22"), "{}", no.message);
        // A name against a block: decided by what it resolves to.
        let ok = permitted_addrs(&d("tcp://localhost:1500"), &r)
            .await
            .unwrap();
        assert!(ok.iter().all(|a| a.ip().is_loopback() && a.ip().is_ipv4()));
        // A glob matches the name as written, whatever it resolves to.
        assert!(permitted_addrs(&d("tcp://localhost:3000"), &r)
            .await
            .is_ok());
        // udp is not covered by tcp patterns, and the other way round.
        let no = permitted_addrs(&d("udp://127.0.0.1:1500"), &r)
            .await
            .unwrap_err();
        assert_eq!(no.status, Status::NotAllowed);
        // A name that resolves outside the block.
        let allow = AllowList::parse(&["tcp://10.0.0.0/8:*"]).unwrap();
        let no = permitted_addrs(&d("tcp://localhost:80"), &rules(&allow))
            .await
            .unwrap_err();
        assert_eq!(no.status, Status::NotAllowed);
        assert!(no.message.contains("resolves to"), "{}", no.message);
        // Default deny.
        let none = AllowList::default();
        let no = permitted_addrs(&d("tcp://127.0.0.1:1"), &rules(&none))
            .await
            .unwrap_err();
        assert_eq!(no.status, Status::NotAllowed);
    }

    /// A gateway-side and an agent-side session over loopback TCP (only
    /// the WebSocket framing, no handshake).
    async fn sessions() -> (wsmux::Session, wsmux::Session) {
        use wsmux::WsTransport;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        let cfg = WsTransport::<TcpStream>::default_config();
        let agent = WsTransport::from_raw(c, wsframe::Role::Client, cfg.clone(), &[]);
        let gateway = WsTransport::from_raw(s, wsframe::Role::Server, cfg, &[]);
        (
            wsmux::Session::server(gateway, wsmux::Config::default()),
            wsmux::Session::client(agent, wsmux::Config::default()),
        )
    }

    async fn reset_code(s: &mut wsmux::Stream) -> u32 {
        let e = s.read(&mut [0u8; 16]).await.expect_err("a reset");
        e.get_ref()
            .and_then(|e| e.downcast_ref::<wsmux::StreamReset>())
            .unwrap_or_else(|| panic!("not a reset: {e}"))
            .code
    }

    #[tokio::test]
    async fn open_requests_that_are_late_cut_or_garbage_reset_the_stream() {
        let (gateway, agent) = sessions().await;
        let allow = AllowList::parse(&["tcp://127.0.0.1:*"]).unwrap();
        let rules = Rules {
            open_timeout: Duration::from_millis(100),
            ..rules(&allow)
        };
        for (first, code, word) in [
            // Nothing at all, then a header without its destination.
            (&b""[..], proto::RESET_OPEN_TIMEOUT, "open-timeout"),
            (
                &[0x57, 1, 0, 20, b't'],
                proto::RESET_OPEN_TIMEOUT,
                "open-timeout",
            ),
            (&[0x57, 1, 0x04, 0x01], proto::RESET_BAD_OPEN, "bad-open"),
            (b"tcp://127.0.0.1:1", proto::RESET_BAD_OPEN, "bad-open"),
        ] {
            let mut s = gateway.open().await.unwrap();
            s.write_all(first).await.unwrap();
            let accepted = agent.accept().await.unwrap();
            let outcome = serve(accepted, &rules).await;
            assert_eq!(outcome.word(), word, "{first:?}");
            assert_eq!(reset_code(&mut s).await, code, "{first:?}");
        }
        // A stream that ends inside its open request is malformed too.
        let mut s = gateway.open().await.unwrap();
        s.write_all(&[0x57, 1, 0, 20]).await.unwrap();
        s.shutdown().await.unwrap();
        let outcome = serve(agent.accept().await.unwrap(), &rules).await;
        assert_eq!(outcome.word(), "bad-open");
        assert_eq!(reset_code(&mut s).await, proto::RESET_BAD_OPEN);
        // A destination that is not one (an agent:// target here).
        let mut s = gateway.open().await.unwrap();
        let mut wire = BytesMut::new();
        proto::encode_open("agent://a/tcp://127.0.0.1:1", &mut wire);
        s.write_all(&wire).await.unwrap();
        let outcome = serve(agent.accept().await.unwrap(), &rules).await;
        assert_eq!(outcome.word(), "bad-open");
        assert_eq!(reset_code(&mut s).await, proto::RESET_BAD_OPEN);
        // The session is still up.
        assert!(agent.error().is_none() && gateway.error().is_none());
    }

    #[tokio::test]
    async fn a_closed_port_is_unreachable_with_the_os_error() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let allow = AllowList::parse(&["tcp://127.0.0.1:*"]).unwrap();
        let dest: Destination = format!("tcp://127.0.0.1:{port}").parse().unwrap();
        let Err(reply) = reach(&dest, &rules(&allow)).await else {
            panic!("connected to a closed port");
        };
        assert_eq!(reply.status, Status::Unreachable);
        assert!(reply.message.contains("refused"), "{}", reply.message);
    }
}
