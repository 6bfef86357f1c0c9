//! Peers: their addresses, and connecting to them before the handshake is
//! answered (an unreachable peer becomes a 502, not a socket that closes at once).

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::net::{TcpStream, UdpSocket, UnixDatagram, UnixStream};
use tokio::sync::mpsc;

/// Where a bridged connection goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerAddr {
    Tcp {
        host: String,
        port: u16,
    },
    Udp {
        host: String,
        port: u16,
    },
    Unix(PathBuf),
    UnixDgram(PathBuf),
    /// Built in: every message comes back unchanged.
    Echo,
}

impl PeerAddr {
    /// Stream peers get a framing function; datagram peers and `echo:` keep
    /// message boundaries as they are.
    pub fn is_stream(&self) -> bool {
        matches!(self, PeerAddr::Tcp { .. } | PeerAddr::Unix(_))
    }
}

const PEER_FORMS: &str =
    "expected tcp://HOST:PORT, udp://HOST:PORT, unix:/PATH, unix-dgram:/PATH or echo:";

impl FromStr for PeerAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| format!("invalid peer `{s}`: {why} ({PEER_FORMS})");
        if s == "echo:" || s == "echo" || s == "echo://" {
            return Ok(PeerAddr::Echo);
        }
        let host_port = |rest: &str| -> Result<(String, u16), String> {
            let (host, port) = rest.rsplit_once(':').ok_or_else(|| bad("missing :PORT"))?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            if host.is_empty() || host.contains('/') {
                return Err(bad("missing host"));
            }
            let port = port.parse::<u16>().map_err(|_| bad("bad port"))?;
            if port == 0 {
                return Err(bad("port 0"));
            }
            Ok((host.to_string(), port))
        };
        let path = |rest: &str| -> Result<PathBuf, String> {
            if rest.is_empty() {
                return Err(bad("missing path"));
            }
            Ok(PathBuf::from(rest))
        };
        if let Some(rest) = s.strip_prefix("tcp://") {
            let (host, port) = host_port(rest)?;
            Ok(PeerAddr::Tcp { host, port })
        } else if let Some(rest) = s.strip_prefix("udp://") {
            let (host, port) = host_port(rest)?;
            Ok(PeerAddr::Udp { host, port })
        } else if let Some(rest) = s
            .strip_prefix("unix-dgram://")
            .or_else(|| s.strip_prefix("unix-dgram:"))
        {
            Ok(PeerAddr::UnixDgram(path(rest)?))
        } else if let Some(rest) = s
            .strip_prefix("unix://")
            .or_else(|| s.strip_prefix("unix:"))
        {
            Ok(PeerAddr::Unix(path(rest)?))
        } else {
            Err(bad("unknown scheme"))
        }
    }
}

impl fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = |h: &str| {
            if h.contains(':') {
                format!("[{h}]")
            } else {
                h.to_string()
            }
        };
        match self {
            PeerAddr::Tcp { host: h, port } => write!(f, "tcp://{}:{port}", host(h)),
            PeerAddr::Udp { host: h, port } => write!(f, "udp://{}:{port}", host(h)),
            PeerAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            PeerAddr::UnixDgram(p) => write!(f, "unix-dgram:{}", p.display()),
            PeerAddr::Echo => f.write_str("echo:"),
        }
    }
}

/// A connected peer.
#[derive(Debug)]
pub enum PeerConn {
    Tcp(TcpStream),
    Unix(UnixStream),
    Udp(UdpSocket),
    UnixDgram(UnixDatagram),
    /// The `echo:` peer: a one-slot loop back to the client.
    Echo(mpsc::Sender<(bool, Bytes)>, mpsc::Receiver<(bool, Bytes)>),
}

/// Connecting failed; the text is sent to the client in the 502 body.
#[derive(Debug, thiserror::Error)]
#[error("cannot reach peer {peer}: {reason}")]
pub struct ConnectError {
    pub peer: String,
    pub reason: String,
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

    #[test]
    fn parses_every_form() {
        let cases = [
            ("tcp://127.0.0.1:6379", "tcp://127.0.0.1:6379"),
            ("tcp://[::1]:80", "tcp://[::1]:80"),
            ("udp://localhost:53", "udp://localhost:53"),
            ("unix:/run/x.sock", "unix:/run/x.sock"),
            ("unix:///run/x.sock", "unix:/run/x.sock"),
            ("unix-dgram:/run/d.sock", "unix-dgram:/run/d.sock"),
            ("echo:", "echo:"),
        ];
        for (input, shown) in cases {
            let p: PeerAddr = input.parse().unwrap();
            assert_eq!(p.to_string(), shown);
        }
    }

    #[test]
    fn rejects_garbage_with_the_forms() {
        for bad in [
            "",
            "tcp://",
            "tcp://host",
            "tcp://host:x",
            "tcp://:80",
            "http://a:1",
            "unix:",
            "tcp://h:0",
        ] {
            let e = bad.parse::<PeerAddr>().unwrap_err();
            assert!(e.contains("expected tcp://"), "{bad}: {e}");
        }
    }

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
