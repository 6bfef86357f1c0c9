//! The server: listeners, worker threads and their accept loops, and
//! graceful shutdown. A connection, once accepted, is served by
//! [`conn`] (TLS, the first request head, our own HTTP/1.1 handshakes) or
//! [`hyper`] (plain HTTP, HTTP/2, anything else); both hand every request to
//! the one request path, [`Gateway::open`](crate::gateway::Gateway::open).
//!
//! Life of a connection: a worker accepts → (TLS handshake) → the first
//! request head is read within the handshake timeout. An HTTP/1.1 WebSocket
//! handshake is answered there and the socket goes to the relay in the same
//! task; plain HTTP and HTTP/2 go to hyper, which answers them and hands
//! over the sockets of the WebSockets it is asked for (extended CONNECT, an
//! upgrade after keep-alive requests).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::unix::AsyncFd;
use tracing::warn;

use crate::config::Config;
use crate::gateway::{release_thread_memory, worker_count, Gateway, Worker};

mod conn;
mod hyper;

/// The gateway new connections take: replaced by a reload, while each
/// established connection keeps the one it started with.
pub struct Current {
    gateway: RwLock<Arc<Gateway>>,
    /// Bumped on every replacement: accept loops compare it (a read of a
    /// line no one writes between reloads) before using their own handle.
    generation: AtomicU64,
}

impl Current {
    pub fn new(gateway: Arc<Gateway>) -> Arc<Current> {
        Arc::new(Current {
            gateway: RwLock::new(gateway),
            generation: AtomicU64::new(0),
        })
    }

    /// The gateway now.
    pub fn load(&self) -> Arc<Gateway> {
        self.gateway
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Makes `next` the gateway of new connections; the one it replaces
    /// stops its background tasks.
    pub fn replace(&self, next: Arc<Gateway>) {
        let old = std::mem::replace(
            &mut *self.gateway.write().unwrap_or_else(|e| e.into_inner()),
            next,
        );
        self.generation.fetch_add(1, Ordering::Release);
        old.retire();
    }
}

/// A bound listener: one listening socket per worker, all on one address.
pub struct Bound {
    /// Non-blocking, listening; each worker takes one.
    pub sockets: Vec<std::net::TcpListener>,
    pub kind: Kind,
    pub local_addr: SocketAddr,
}

/// What a listener serves.
#[derive(Clone)]
pub enum Kind {
    /// HTTP and WebSockets: the config's listener of that index, TLS or not.
    Http { index: usize, tls: bool },
    /// A `--forward` TCP listener: every connection a stream through an agent.
    Forward(Arc<crate::config::Forward>),
}

impl Bound {
    /// `ws://HOST:PORT` or `wss://HOST:PORT`; `tcp://HOST:PORT` for a forward.
    pub fn url(&self) -> String {
        let scheme = match self.kind {
            Kind::Http { tls: true, .. } => "wss",
            Kind::Http { tls: false, .. } => "ws",
            Kind::Forward(_) => "tcp",
        };
        format!("{scheme}://{}", self.local_addr)
    }
}

/// Binds every listener, one socket per worker (`workers`, else one per
/// CPU); nothing is served yet. (TLS material is the gateway's: a reload
/// loads it again.)
pub async fn bind(config: &Config) -> anyhow::Result<Vec<Bound>> {
    let workers = worker_count(config);
    let mut out = vec![];
    for l in &config.listeners {
        let addr = tokio::net::lookup_host(&l.address)
            .await
            .with_context(|| format!("cannot resolve listen address {}", l.address))?
            .next()
            .with_context(|| format!("listen address {} resolves to nothing", l.address))?;
        let sockets = shared_sockets(addr, workers)
            .with_context(|| format!("cannot listen on {}", l.address))?;
        out.push(Bound {
            local_addr: sockets[0].local_addr()?,
            sockets,
            kind: Kind::Http {
                index: out.len(),
                tls: l.tls.is_some(),
            },
        });
    }
    Ok(out)
}

/// Binds the `--forward` TCP listeners like the others (one socket per
/// worker): their connections are served on the workers, beside the
/// agents' own connections.
pub async fn bind_forwards(config: &Config) -> anyhow::Result<Vec<Bound>> {
    let workers = worker_count(config);
    let mut out = vec![];
    for f in config.tunnel.forwards.iter().filter(|f| !f.udp) {
        let addr = tokio::net::lookup_host(&f.listen)
            .await
            .with_context(|| format!("cannot resolve forward address {}", f.listen))?
            .next()
            .with_context(|| format!("forward address {} resolves to nothing", f.listen))?;
        let sockets = shared_sockets(addr, workers)
            .with_context(|| format!("cannot listen on {} (forward)", f.listen))?;
        out.push(Bound {
            local_addr: sockets[0].local_addr()?,
            sockets,
            kind: Kind::Forward(Arc::new(f.clone())),
        });
    }
    Ok(out)
}

/// One listening socket on `addr` (backlog 1024), and a duplicate of it for
/// each of the other `n - 1` workers. Every worker's event loop watches the
/// same queue of new connections and [`Gateway::accept_loop`] balances them:
/// unlike `SO_REUSEPORT`, whose hash may queue a burst on one busy worker
/// while another sits idle, whichever worker is free takes the next one.
fn shared_sockets(addr: SocketAddr, n: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    #[cfg(unix)]
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    // Accepted sockets inherit it on Linux: no setsockopt per connection.
    s.set_tcp_nodelay(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    // Inherited too (set after `listen`, which resets it): accepted
    // connections start with delayed ACKs instead of the kernel's quick-ACK
    // start, so the client's request is ACKed by our answer (the 101, the
    // TLS ServerHello) rather than by a segment of its own — one packet less
    // per connection for both ends (HAProxy's "smart accept"; an HTTP client
    // always speaks first). Bulk transfers are unaffected: the kernel still
    // ACKs every second full segment.
    #[cfg(target_os = "linux")]
    let _ = s.set_tcp_quickack(false);
    let first: std::net::TcpListener = s.into();
    let mut out = Vec::with_capacity(n.max(1));
    for _ in 1..n {
        out.push(first.try_clone()?);
    }
    out.push(first);
    Ok(out)
}

/// A worker accepts while it serves at most this many connections more than
/// the least busy worker.
const ACCEPT_SLACK: i64 = 1;

/// Counts a connection against its worker while it lives.
struct OpenGuard<'a>(&'a Worker);

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        let w = self.0;
        w.open.dec();
        // Same thread: wakes the worker's own deferring accept loops, if any.
        w.resume.notify_waiters();
    }
}

impl Gateway {
    /// Accepts on every listener until shutdown (the worker threads; each
    /// connection taken by the gateway `current` holds then), and starts the
    /// health checks and housekeeping on the caller's runtime.
    pub fn serve(self: &Arc<Self>, bound: Vec<Bound>, current: &Arc<Current>) {
        self.spawn_background();
        self.spawn_workers(bound, current);
    }

    /// Serves one connection of a `--forward` listener: a stream through
    /// the agent, spliced until both sides end.
    async fn forward(
        &self,
        stream: std::net::TcpStream,
        remote: SocketAddr,
        f: &crate::config::Forward,
    ) {
        use tracing::Instrument as _;
        let (Some(tunnel), Ok(tcp)) = (&self.tunnel, tokio::net::TcpStream::from_std(stream))
        else {
            return;
        };
        let span = tracing::info_span!("forward", from = %remote, to = %f.to);
        // Admission as for any connection: the gateway's rate, caps and
        // per-client caps (a forward listener has no listener or route
        // limits of its own). A refused connection is closed at once: TCP
        // has no way to say why.
        let _permit = match self.gates.admit_gateway(remote.ip()) {
            Ok(p) => p,
            Err(r) => {
                let e = crate::error::Error::from(r);
                if let Some(label) = e.kind.label() {
                    self.metrics.refused(label);
                }
                span.in_scope(|| tracing::debug!("refused: {e}"));
                return;
            }
        };
        tokio::select! {
            () = crate::tunnel::forward::forward_tcp(tcp, f, tunnel).instrument(span) => {}
            () = self.shutdown.cancelled() => {}
        }
    }

    /// The handshake timeout of listener `index`.
    pub(crate) fn handshake_timeout(&self, index: usize) -> Duration {
        self.config.listeners[index]
            .handshake_timeout
            .unwrap_or(self.config.limits.handshake_timeout)
    }

    /// Starts the worker threads. Each runs its own single-threaded event
    /// loop watching every listener (see [`Gateway::accept_loop`] for who
    /// takes a new connection), and serves the connections it accepts start
    /// to end: no task crosses threads, no thread wakes another (the "no-steal" runtime of pingora; nginx's
    /// worker processes). Workers run until shutdown and until every task
    /// has finished (or the process exits at the drain timeout).
    fn spawn_workers(self: &Arc<Self>, bound: Vec<Bound>, current: &Arc<Current>) {
        let workers = bound.first().map_or(0, |b| b.sockets.len());
        // Worker i takes socket i of every listener.
        let mut per_worker: Vec<Vec<_>> = (0..workers).map(|_| vec![]).collect();
        for b in bound {
            for (i, s) in b.sockets.into_iter().enumerate() {
                per_worker[i].push((s, b.kind.clone()));
            }
        }
        for (i, listeners) in per_worker.into_iter().enumerate() {
            let gw = self.clone();
            let current = current.clone();
            // I/O and timers only: signals are the main thread's, and a
            // worker with the process driver would take a process-wide lock
            // (tokio's orphan queue) every time it goes idle.
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .enable_time()
                .build()
                .expect("building a worker runtime");
            std::thread::Builder::new()
                .name(format!("wsgate-worker-{i}"))
                .spawn(move || rt.block_on(gw.worker(i, listeners, current)))
                .expect("starting a worker thread");
        }
    }

    /// One worker's event loop: accepts on its sockets until shutdown, then
    /// runs until every task has finished.
    async fn worker(
        self: Arc<Self>,
        i: usize,
        listeners: Vec<(std::net::TcpListener, Kind)>,
        current: Arc<Current>,
    ) {
        let w = &self.workers[i];
        for (s, kind) in listeners {
            let l = mio::net::TcpListener::from_std(s);
            // SAFETY: the listener owns its descriptor, which stays open as
            // long as the `AsyncFd` holds it.
            match unsafe { AsyncFd::register_with_interest(l, tokio::io::Interest::READABLE) } {
                Ok(l) => {
                    let current = current.clone();
                    w.tracker.spawn(accept_loop(current, i, kind, l));
                }
                Err(e) => warn!("worker {i}: cannot use its listening socket: {e}"),
            }
        }
        // tokio's timer wakes its own event loop (an eventfd write, an extra
        // epoll_wait) whenever a new timer is due before every timer it knew
        // of when it last slept — with none pending, that is the first timeout
        // of nearly every handshake. A 1 s tick keeps one pending, so
        // connection timeouts (seconds) are never the earliest. The tick also
        // hands the memory of connections that ended back to the system:
        // mimalloc's heaps are per thread, so each worker trims its own.
        let gw = self.clone();
        w.tracker.spawn(async move {
            let w = &gw.workers[i];
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            // Ticks since this worker's number of connections last fell.
            let (mut last_open, mut since_drop) = (0, u32::MAX);
            // Idle deflate connections free their zlib states: trim then too.
            let mut last_hibernations = crate::bridge::relay::hibernations();
            loop {
                tokio::select! {
                    _ = w.shutdown.cancelled() => return,
                    _ = tick.tick() => {
                        let open = w.open.get();
                        since_drop = if open < last_open { 0 } else { since_drop.saturating_add(1) };
                        let hibernations = crate::bridge::relay::hibernations();
                        if since_drop < 4 || hibernations != last_hibernations {
                            release_thread_memory();
                        }
                        last_open = open;
                        last_hibernations = hibernations;
                    }
                }
            }
        });
        w.shutdown.cancelled().await;
        w.tracker.close();
        w.tracker.wait().await;
    }

    /// Stops accepting, closes every WebSocket with 1001 and waits (bounded by
    /// the drain timeout) for them to finish.
    pub async fn shutdown(&self) {
        // A cluster node first leaves (other nodes stop routing here), then
        // sends GOAWAY to its agents and node links like any gateway.
        if let Some(c) = &self.cluster {
            c.leave().await;
        }
        self.shutdown.cancel();
        self.tracker.close();
        for w in self.workers.iter() {
            w.tracker.close();
        }
        let all_done = async {
            self.tracker.wait().await;
            for w in self.workers.iter() {
                w.tracker.wait().await;
            }
        };
        if tokio::time::timeout(self.config.limits.drain_timeout, all_done)
            .await
            .is_err()
        {
            warn!(
                open = self.active(),
                "drain timeout reached; dropping remaining connections"
            );
        }
        if let Some(c) = &self.cluster {
            c.stop().await;
        }
    }

    /// Whether `worker` serves more than [`ACCEPT_SLACK`] connections more
    /// than the least busy other worker, and should leave new ones to it.
    fn must_defer(&self, worker: usize) -> bool {
        let mine = self.workers[worker].open.get();
        self.workers
            .iter()
            .enumerate()
            .filter(|&(j, _)| j != worker)
            .map(|(_, l)| l.open.get())
            .min()
            .is_some_and(|least| mine > least + ACCEPT_SLACK)
    }
}

/// Accepts for one worker until shutdown. All workers watch the same
/// listening socket; one well ahead of the least busy worker stops taking
/// connections (they go to the others, whose event loops see them too)
/// until one of its own ends, or until another worker gets as busy and stops
/// in turn (it wakes the deferring ones then): the least busy worker always
/// accepts, so no connection waits on a deferring one. Each connection is
/// served by the gateway `current` holds when it is accepted.
async fn accept_loop(
    current: Arc<Current>,
    worker: usize,
    kind: Kind,
    listener: AsyncFd<mio::net::TcpListener>,
) {
    let gw = current.load();
    let workers = gw.workers.clone();
    let w = &workers[worker];
    // Registered once, not per connection.
    let stop = crate::io::cancelled(&w.shutdown);
    tokio::pin!(stop);
    // What each connection's task holds of the gateway: a handle of this
    // worker's own, so that a connection's start and end touch a reference
    // count no other worker writes (a clone of the gateway's own `Arc` would
    // pass its cache line between the workers' CPUs, twice per connection);
    // made again only when a reload replaced the gateway.
    let (mut generation, mut handle) = (current.generation(), Arc::new(gw));
    loop {
        if handle.must_defer(worker) {
            let resume = w.resume.notified();
            tokio::pin!(resume);
            resume.as_mut().enable();
            if handle.must_defer(worker) {
                for (j, other) in workers.iter().enumerate() {
                    if j != worker {
                        other.resume.notify_waiters();
                    }
                }
                tokio::select! {
                    () = &mut stop => return,
                    () = resume => {}
                }
            }
            continue;
        }
        let accepted = tokio::select! {
            () = &mut stop => return,
            r = accept(&listener) => r,
        };
        match accepted {
            Ok((stream, remote)) => {
                if current.generation() != generation {
                    generation = current.generation();
                    handle = Arc::new(current.load());
                }
                w.open.inc();
                let gw = handle.clone();
                match &kind {
                    Kind::Http { index, .. } => {
                        let index = *index;
                        w.tracker.spawn(async move {
                            let _open = OpenGuard(&gw.workers[worker]);
                            gw.connection(worker, index, stream, remote).await
                        });
                    }
                    Kind::Forward(f) => {
                        let f = f.clone();
                        w.tracker.spawn(async move {
                            let _open = OpenGuard(&gw.workers[worker]);
                            gw.forward(stream, remote, &f).await
                        });
                    }
                }
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

/// Accepts one connection when the listener has one. mio's accept is
/// `accept4` with `SOCK_NONBLOCK | SOCK_CLOEXEC` and, unlike tokio's, leaves
/// the socket unregistered: [`read_now`] may read it before it joins the
/// event loop.
async fn accept(
    listener: &AsyncFd<mio::net::TcpListener>,
) -> std::io::Result<(std::net::TcpStream, SocketAddr)> {
    loop {
        let mut ready = listener.readable().await?;
        // `try_io` clears the readiness on "would block": the next round waits.
        if let Ok(r) = ready.try_io(|l| l.get_ref().accept()) {
            return r.map(|(s, remote)| (s.into(), remote));
        }
    }
}
