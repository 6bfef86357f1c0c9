//! Backend pools for proxy routes: balancing and passive health.
//!
//! A pool picks a backend round-robin or by fewest open connections, and
//! skips backends that recently failed to connect: each failure ejects the
//! backend for the pool's back-off period, and a success readmits it at once.
//! When every backend is ejected, `pick` finds none and the gateway answers 503.
//!
//! A backend's live state (open connections, ejection, reported health) is
//! kept once per address in [`BackendSet`]: routes naming the same address
//! share it, and a set built for a new config takes over the entries of the
//! addresses it still names, so their health and counters survive a reload.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_util::either::Either;

use prometheus_client::metrics::histogram::Histogram;
use std::time::{Duration, Instant};

use crate::config::{self, BackendAddr, Balance};
use crate::io::ClientIo;

/// One backend and its live state. Every worker leases it on each
/// connection: aligned, so that the reference count of its `Arc` is not in
/// a cache line with the fields every handshake reads, and the connection
/// count in one of its own.
#[derive(Debug)]
#[repr(align(128))]
pub struct Backend {
    pub addr: BackendAddr,
    /// `addr` as text, for metrics labels and logs.
    pub label: String,
    /// `addr` as a socket address when its host is an IP address (no
    /// lookup, not even parsing, per connection).
    pub ip_addr: Option<std::net::SocketAddr>,
    active: crossbeam_utils::CachePadded<AtomicUsize>,
    /// Milliseconds since [`epoch`] until which it is ejected (0: not).
    ejected_until: AtomicU64,
    /// Health last put in `wsgate_backend_up`: 0 never, 1 up, 2 down.
    reported: AtomicU8,
    /// Its `wsgate_backend_connect_seconds` series, once looked up.
    pub(crate) latency: OnceLock<Histogram>,
}

impl Backend {
    fn new(addr: BackendAddr) -> Backend {
        Backend {
            label: addr.to_string(),
            ip_addr: addr
                .host
                .parse::<std::net::IpAddr>()
                .ok()
                .map(|ip| std::net::SocketAddr::new(ip, addr.port)),
            addr,
            active: Default::default(),
            ejected_until: AtomicU64::new(0),
            reported: AtomicU8::new(0),
            latency: OnceLock::new(),
        }
    }

    /// Open connections (WebSockets and in-flight requests) to it.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Records `up` as its health; true when that differs from what the
    /// `wsgate_backend_up` gauge shows (so only changes touch the registry).
    pub fn health_changed(&self, up: bool) -> bool {
        let v = if up { 1 } else { 2 };
        // Read first: on every handshake the answer is "no change", and a
        // read keeps the cache line shared between the workers.
        self.reported.load(Ordering::Relaxed) != v && self.reported.swap(v, Ordering::Relaxed) != v
    }
}

/// The instant ejection times count from, one for the whole process (a
/// backend may be in several pools).
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Every backend a config names, one live entry per address.
#[derive(Debug, Default)]
pub struct BackendSet {
    by_addr: HashMap<BackendAddr, Arc<Backend>>,
}

impl BackendSet {
    /// The backends of `config`'s proxy routes; the entries of `previous`
    /// whose address is still named are kept as they are.
    pub fn build(config: &config::Config, previous: Option<&BackendSet>) -> BackendSet {
        let mut by_addr = HashMap::new();
        for r in &config.routes {
            if let config::Target::Proxy(b) = &r.target {
                for a in &b.addrs {
                    by_addr.entry(a.clone()).or_insert_with(|| {
                        previous
                            .and_then(|p| p.by_addr.get(a).cloned())
                            .unwrap_or_else(|| Arc::new(Backend::new(a.clone())))
                    });
                }
            }
        }
        BackendSet { by_addr }
    }

    /// A pool of `backends` (addresses missing from the set get entries of
    /// their own).
    pub fn pool(&self, backends: &config::Backends, eject_for: Duration) -> Pool {
        let list = backends
            .addrs
            .iter()
            .map(|a| match self.by_addr.get(a) {
                Some(b) => b.clone(),
                None => Arc::new(Backend::new(a.clone())),
            })
            .collect();
        Pool::new(list, backends.balance, eject_for)
    }
}

/// A pool of backends.
#[derive(Debug)]
pub struct Pool {
    backends: Vec<Arc<Backend>>,
    balance: Balance,
    eject_for: Duration,
    next: AtomicUsize,
}

/// A chosen backend; counts as one open connection until dropped.
#[derive(Debug)]
pub struct Lease {
    pub backend: Arc<Backend>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.backend.active.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Pool {
    pub fn new(backends: Vec<Arc<Backend>>, balance: Balance, eject_for: Duration) -> Pool {
        Pool {
            backends,
            balance,
            eject_for,
            next: AtomicUsize::new(0),
        }
    }

    pub fn backends(&self) -> &[Arc<Backend>] {
        &self.backends
    }

    fn now_ms(&self) -> u64 {
        epoch().elapsed().as_millis() as u64 + 1
    }

    /// Whether the backend is in service now.
    #[cfg(test)]
    pub fn is_up(&self, b: &Backend) -> bool {
        b.ejected_until.load(Ordering::Relaxed) <= self.now_ms()
    }

    /// Picks a backend; `None` when every backend is ejected.
    pub fn pick(&self) -> Option<Lease> {
        let now = self.now_ms();
        let up = |b: &&Arc<Backend>| b.ejected_until.load(Ordering::Relaxed) <= now;
        let n = self.backends.len();
        let chosen = match self.balance {
            // One backend: no shared counter to bump.
            _ if n == 1 => self.backends.first().filter(up),
            Balance::RoundRobin => {
                let start = self.next.fetch_add(1, Ordering::Relaxed);
                (0..n)
                    .map(|i| &self.backends[(start + i) % n])
                    .find(|b| up(b))
            }
            Balance::LeastConnections => {
                let start = self.next.fetch_add(1, Ordering::Relaxed);
                (0..n)
                    .map(|i| &self.backends[(start + i) % n])
                    .filter(up)
                    .min_by_key(|b| b.active())
            }
        };
        let backend = chosen?.clone();
        backend.active.fetch_add(1, Ordering::Relaxed);
        Some(Lease { backend })
    }

    /// A connect failure: out of rotation for the back-off period.
    pub fn eject(&self, b: &Backend) {
        let until = self.now_ms() + self.eject_for.as_millis() as u64;
        b.ejected_until.store(until, Ordering::Relaxed);
    }

    /// A success: back in rotation.
    pub fn readmit(&self, b: &Backend) {
        // Written only when ejected: see `Backend::health_changed`.
        if b.ejected_until.load(Ordering::Relaxed) != 0 {
            b.ejected_until.store(0, Ordering::Relaxed);
        }
    }
}

/// Active health checks: every `every`, `GET path` on each backend; an answer
/// below 400 readmits it, anything else (or no answer within `timeout`) ejects it.
pub async fn health_checks(
    pool: Arc<Pool>,
    path: String,
    every: Duration,
    timeout: Duration,
    metrics: crate::metrics::Metrics,
    tls: TlsConnector,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        for b in pool.backends() {
            let ok = tokio::time::timeout(timeout, probe(&b.addr, &path, &tls))
                .await
                .is_ok_and(|r| r.is_ok_and(|status| status < 400));
            if ok {
                pool.readmit(b);
            } else {
                pool.eject(b);
            }
            if b.health_changed(ok) {
                metrics.backend_up(&b.label, ok);
            }
        }
    }
}

/// One `GET` on a fresh connection (over TLS for a TLS backend); returns the
/// status code.
async fn probe(addr: &BackendAddr, path: &str, tls: &TlsConnector) -> std::io::Result<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = connect(addr, tls).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: wsgate-health\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await?;
    s.flush().await?;
    let mut buf = [0u8; 32];
    let mut n = 0;
    while n < 12 {
        let m = s.read(&mut buf[n..]).await?;
        if m == 0 {
            break;
        }
        n += m;
    }
    std::str::from_utf8(&buf[..n])
        .ok()
        .and_then(|l| l.strip_prefix("HTTP/1."))
        .and_then(|l| l.get(2..5))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP answer"))
}

/// A connection to a backend: plain TCP, or TLS over it (`Either` reads and
/// writes through whichever it holds).
pub type BackendIo = Either<TcpStream, Box<tokio_rustls::client::TlsStream<TcpStream>>>;

/// The connection as the relays take it: plain TCP is read on readiness.
pub fn into_relay_io(io: BackendIo) -> ClientIo {
    match io {
        Either::Left(s) => ClientIo::Tcp(s),
        Either::Right(s) => ClientIo::Io(s),
    }
}

/// Opens a connection to a backend: TCP with `TCP_NODELAY` set and the
/// handshake's last ACK left to ride on the request that follows at once
/// (`TCP_QUICKACK` off before `connect`, HAProxy's "smart connect": one
/// packet less each way), then, for a TLS backend, the TLS handshake — its
/// certificate verified for the host of the backend URL. ALPN offers
/// `http/1.1` only (`tls` is built that way by the proxy).
pub async fn connect(addr: &BackendAddr, tls: &TlsConnector) -> std::io::Result<BackendIo> {
    let (tcp, _) = connect_tcp(addr, None, &[]).await?;
    if !addr.tls {
        return Ok(Either::Left(tcp));
    }
    let name = rustls::pki_types::ServerName::try_from(addr.host.clone()).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("`{}` is not a valid TLS server name", addr.host),
        )
    })?;
    let s = tls
        .connect(name, tcp)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("TLS handshake failed: {e}")))?;
    Ok(Either::Right(Box::new(s)))
}

/// [`connect`] for a backend that is sent `first` at once (a handshake's
/// request head). To a plain TCP backend, the send is tried as soon as
/// `connect(2)` returns, before waiting for the connection to be writable:
/// where the connection is already established by then (loopback, whose
/// handshake completes within the call), the request leaves without a trip
/// through the event loop and without the `SO_ERROR` check; elsewhere the
/// send would block and this waits as [`connect`] does. Returns the
/// connection and how much of `first` went out (TLS: none).
pub async fn connect_sending(
    backend: &Backend,
    tls: &TlsConnector,
    first: &[u8],
) -> std::io::Result<(BackendIo, usize)> {
    if backend.addr.tls {
        // Boxed: the TLS handshake's future is large, and inline it would
        // make every proxied handshake's future (moved, boxed) that large too.
        return Ok((Box::pin(connect(&backend.addr, tls)).await?, 0));
    }
    let (tcp, sent) = connect_tcp(&backend.addr, backend.ip_addr, first).await?;
    Ok((Either::Left(tcp), sent))
}

/// A TCP connection to `addr` (to `known` when its host is an IP address,
/// else to each address it resolves to in turn), with `first` sent along as
/// [`connect_sending`] describes. Returns how much of `first` went out.
async fn connect_tcp(
    addr: &BackendAddr,
    known: Option<std::net::SocketAddr>,
    first: &[u8],
) -> std::io::Result<(TcpStream, usize)> {
    if let Some(sa) = known {
        return connect_one(sa, first).await;
    }
    let mut last = None;
    for sa in tokio::net::lookup_host((addr.host.as_str(), addr.port)).await? {
        match connect_one(sa, first).await {
            Ok(r) => return Ok(r),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{} resolves to no address", addr.host),
        )
    }))
}

async fn connect_one(
    sa: std::net::SocketAddr,
    first: &[u8],
) -> std::io::Result<(TcpStream, usize)> {
    use socket2::{Domain, Protocol, Socket, Type};
    use std::io::ErrorKind;
    let socket = Socket::new(
        Domain::for_address(sa),
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )?;
    socket.set_tcp_nodelay(true)?;
    #[cfg(target_os = "linux")]
    let _ = socket.set_tcp_quickack(false);
    match socket.connect(&sa.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    // Still connecting: EAGAIN. Refused or unreachable: that error.
    let sent = match first {
        [] => None,
        _ => match socket.send_with_flags(first, libc::MSG_NOSIGNAL) {
            Ok(n) => Some(n),
            Err(e) if e.kind() == ErrorKind::WouldBlock => None,
            Err(e) => return Err(e),
        },
    };
    let stream = TcpStream::from_std(socket.into())?;
    if let Some(n) = sent {
        return Ok((stream, n));
    }
    stream.writable().await?;
    match stream.take_error()? {
        Some(e) => Err(e),
        None => Ok((stream, 0)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(n: u16) -> Vec<BackendAddr> {
        (1..=n)
            .map(|p| BackendAddr {
                host: "127.0.0.1".into(),
                port: p,
                tls: false,
            })
            .collect()
    }

    fn pool(n: u16, balance: Balance) -> Pool {
        let backends = addrs(n).into_iter().map(|a| Arc::new(Backend::new(a)));
        Pool::new(backends.collect(), balance, Duration::from_secs(60))
    }

    #[test]
    fn a_new_set_keeps_the_health_of_the_addresses_it_still_names() {
        let config = |text: &str| {
            config::parse(
                "t.toml",
                &format!("[[listener]]\naddress = \"127.0.0.1:0\"\n{text}"),
                std::path::Path::new("."),
            )
            .unwrap()
        };
        let old = config(
            "[[route]]\npath = \"/a\"\nproxy = [\"ws://127.0.0.1:1\", \"ws://127.0.0.1:2\"]\n\
             [[route]]\npath = \"/b\"\nproxy = \"ws://127.0.0.1:2\"\n",
        );
        let set = BackendSet::build(&old, None);
        let (a, b) = match (&old.routes[0].target, &old.routes[1].target) {
            (config::Target::Proxy(a), config::Target::Proxy(b)) => (a, b),
            _ => unreachable!(),
        };
        let eject_for = Duration::from_secs(60);
        let (pa, pb) = (set.pool(a, eject_for), set.pool(b, eject_for));
        // One entry per address: both routes see port 2 ejected.
        pa.eject(&pa.backends()[1]);
        assert!(!pb.is_up(&pb.backends()[0]));
        assert!(
            pb.pick().is_none(),
            "port 2 is out of rotation for route b too"
        );
        let held = pa.pick().unwrap();
        assert_eq!(held.backend.addr.port, 1);
        // A new config naming ports 1 and 3: port 1's entry (one open
        // connection) is the same; port 3 is new, port 2 forgotten.
        let new = config(
            "[[route]]\npath = \"/c\"\nproxy = [\"ws://127.0.0.1:1\", \"ws://127.0.0.1:3\"]\n",
        );
        let next = BackendSet::build(&new, Some(&set));
        let one = &next.by_addr[&addrs(1)[0]];
        assert!(Arc::ptr_eq(one, &held.backend));
        assert_eq!(one.active(), 1);
        assert_eq!(next.by_addr.len(), 2);
    }

    #[test]
    fn health_is_reported_on_change_only() {
        let p = pool(1, Balance::RoundRobin);
        let b = &p.backends()[0];
        // The first report always counts (the gauge has no series yet).
        assert!(b.health_changed(true));
        assert!(!b.health_changed(true));
        assert!(b.health_changed(false));
        assert!(!b.health_changed(false));
        assert!(b.health_changed(true));
    }

    #[test]
    fn round_robin_skips_ejected() {
        let p = pool(3, Balance::RoundRobin);
        let ports: Vec<u16> = (0..6)
            .map(|_| p.pick().unwrap().backend.addr.port)
            .collect();
        assert_eq!(ports, vec![1, 2, 3, 1, 2, 3]);
        let second = p.backends()[1].clone();
        p.eject(&second);
        assert!(!p.is_up(&second));
        let ports: Vec<u16> = (0..4)
            .map(|_| p.pick().unwrap().backend.addr.port)
            .collect();
        assert!(!ports.contains(&2), "{ports:?}");
        p.readmit(&second);
        assert!(p.is_up(&second));
    }

    #[test]
    fn least_connections_prefers_idle() {
        let p = pool(2, Balance::LeastConnections);
        let a = p.pick().unwrap();
        let b = p.pick().unwrap();
        assert_ne!(a.backend.addr.port, b.backend.addr.port);
        let (keep, other) = if a.backend.addr.port == 1 {
            (a, b)
        } else {
            (b, a)
        };
        drop(other);
        // Port 1 holds one lease; the other was dropped: new picks go to port 2.
        assert_eq!(keep.backend.active(), 1);
        for _ in 0..3 {
            let l = p.pick().unwrap();
            assert_eq!(l.backend.addr.port, 2);
        }
    }

    #[tokio::test]
    async fn probe_reads_the_status() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            for status in ["200 OK", "503 Service Unavailable"] {
                let (mut s, _) = l.accept().await.unwrap();
                let mut b = [0u8; 256];
                let _ = s.read(&mut b).await;
                let _ = s
                    .write_all(format!("HTTP/1.1 {status}\r\n\r\n").as_bytes())
                    .await;
            }
        });
        let addr = BackendAddr {
            host: "127.0.0.1".into(),
            port,
            tls: false,
        };
        let tls = crate::proxy::backend_tls_connector(None);
        assert_eq!(probe(&addr, "/health", &tls).await.unwrap(), 200);
        assert_eq!(probe(&addr, "/health", &tls).await.unwrap(), 503);
    }

    #[test]
    fn all_ejected_is_none() {
        let p = pool(2, Balance::RoundRobin);
        for b in p.backends().to_vec() {
            p.eject(&b);
        }
        assert!(p.pick().is_none());
        p.readmit(&p.backends()[0].clone());
        assert!(p.pick().is_some());
    }
}
