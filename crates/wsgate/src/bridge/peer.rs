//! Bridge peers: connecting to one before the handshake is answered (an
//! unreachable peer becomes a 502, not a socket that closes at once).
//! Addresses ([`PeerAddr`]) are config values.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::{TcpStream, UdpSocket, UnixDatagram, UnixStream};
use tokio::sync::mpsc;

use crate::config::PeerAddr;
use crate::error::{Error, Kind};

/// A connected peer.
#[derive(Debug)]
pub enum PeerConn {
    Tcp(TcpStream),
    Unix(UnixStream),
    Udp(UdpSocket),
    UnixDgram(UnixDatagram),
    /// The `echo:` peer: a one-slot loop back to the client.
    Echo(
        mpsc::Sender<(bool, crate::bridge::relay::Message)>,
        mpsc::Receiver<(bool, crate::bridge::relay::Message)>,
    ),
    /// A stream through an agent; `true`: it carries framed datagrams
    /// (a `udp://` destination).
    Agent(Box<crate::tunnel::registry::AgentStream>, bool),
}

/// Connecting failed; the text is sent to the client in the 502 body.
#[derive(Debug, thiserror::Error)]
#[error("cannot reach peer {peer}: {reason}")]
pub struct ConnectError {
    pub peer: String,
    pub reason: String,
}

/// A failed write to a peer, by its kind: a message that does not fit in a
/// datagram (`EMSGSIZE`) is too big (1009); anything else is the peer's
/// failure (1011).
pub fn write_failed(e: io::Error) -> Error {
    #[cfg(unix)]
    let too_big = e.raw_os_error() == Some(libc::EMSGSIZE);
    #[cfg(not(unix))]
    let too_big = false;
    let kind = if too_big {
        Kind::MessageTooBig
    } else {
        Kind::PeerFailed
    };
    Error::upstream(kind, "peer write failed").because(e)
}

/// Connects to `addr` within `timeout`.
pub async fn connect(addr: &PeerAddr, timeout: Duration) -> Result<PeerConn, ConnectError> {
    let fail = |reason: String| ConnectError {
        peer: addr.to_string(),
        reason,
    };
    match tokio::time::timeout(timeout, connect_inner(addr)).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(fail(e.to_string())),
        Err(_) => Err(fail(format!("timed out after {timeout:?}"))),
    }
}

async fn connect_inner(addr: &PeerAddr) -> io::Result<PeerConn> {
    Ok(match addr {
        PeerAddr::Tcp { host, port } => {
            let s = TcpStream::connect((host.as_str(), *port)).await?;
            s.set_nodelay(true)?;
            PeerConn::Tcp(s)
        }
        PeerAddr::Unix(p) => PeerConn::Unix(UnixStream::connect(p).await?),
        PeerAddr::Udp { host, port } => {
            let target = tokio::net::lookup_host((host.as_str(), *port))
                .await?
                .next()
                .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address"))?;
            let local = if target.is_ipv4() {
                "0.0.0.0:0"
            } else {
                "[::]:0"
            };
            let s = UdpSocket::bind(local).await?;
            s.connect(target).await?;
            PeerConn::Udp(s)
        }
        PeerAddr::UnixDgram(p) => PeerConn::UnixDgram(unix_dgram(p)?),
        PeerAddr::Agent(a) => {
            return Err(io::Error::other(format!(
                "{a}: opened through the tunnel, not connected here"
            )))
        }
        PeerAddr::Echo => {
            let (tx, rx) = mpsc::channel(1);
            PeerConn::Echo(tx, rx)
        }
    })
}

/// A datagram socket connected to `path` and bound to a fresh abstract
/// address, so the peer can answer (an unbound socket cannot be replied to),
/// and nothing is left behind in the file system.
fn unix_dgram(path: &std::path::Path) -> io::Result<UnixDatagram> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    #[cfg(target_os = "linux")]
    let sock = {
        use std::os::linux::net::SocketAddrExt;
        let name = format!(
            "wsgate-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
        std::os::unix::net::UnixDatagram::bind_addr(&addr)?
    };
    #[cfg(not(target_os = "linux"))]
    let sock = {
        let _ = &NEXT;
        std::os::unix::net::UnixDatagram::unbound()?
    };
    sock.connect(path)?;
    sock.set_nonblocking(true)?;
    UnixDatagram::from_std(sock)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unreachable_peer_is_an_error_with_reason() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        let addr = PeerAddr::Tcp {
            host: "127.0.0.1".into(),
            port,
        };
        let e = connect(&addr, Duration::from_secs(5)).await.unwrap_err();
        assert!(
            e.to_string().contains("cannot reach peer tcp://127.0.0.1"),
            "{e}"
        );
    }
}
