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
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::unix::AsyncFd;
use tokio_rustls::TlsAcceptor;
use tracing::warn;

use crate::config::Config;
use crate::gateway::{release_thread_memory, worker_count, Gateway, Worker};

mod conn;
mod hyper;

/// A bound listener: one listening socket per worker, all on one address.
pub struct Bound {
    /// Non-blocking, listening; each worker takes one.
    pub sockets: Vec<std::net::TcpListener>,
    pub tls: Option<TlsAcceptor>,
    pub local_addr: SocketAddr,
    /// Time for the TLS handshake and the request head.
    pub handshake_timeout: Duration,
}

impl Bound {
    /// `ws://HOST:PORT` or `wss://HOST:PORT`.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "wss" } else { "ws" };
        format!("{scheme}://{}", self.local_addr)
    }
}

/// Loads TLS material and binds every listener, one socket per worker
/// (`workers`, else one per CPU); nothing is served yet.
pub async fn bind(config: &Config) -> anyhow::Result<Vec<Bound>> {
    let workers = worker_count(config);
    let mut out = vec![];
    for l in &config.listeners {
        let tls = match &l.tls {
            Some(t) => Some(crate::tls::acceptor(
                &t.cert,
                &t.key,
                &[b"h2", b"http/1.1"],
                l.client_auth.as_ref().map(|c| crate::tls::ClientCerts {
                    ca: &c.ca,
                    required: c.required,
                    crls: &c.crls,
                }),
            )?),
            None => None,
        };
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
            tls,
            handshake_timeout: l
                .handshake_timeout
                .unwrap_or(config.limits.handshake_timeout),
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
    /// Accepts on every listener until shutdown (the worker threads), and
    /// starts the health checks and housekeeping on the caller's runtime.
    pub fn serve(self: &Arc<Self>, bound: Vec<Bound>) {
        self.spawn_background();
        self.spawn_workers(bound);
    }

    /// Starts the worker threads. Each runs its own single-threaded event
    /// loop watching every listener (see [`Gateway::accept_loop`] for who
    /// takes a new connection), and serves the connections it accepts start
    /// to end: no task crosses threads, no thread wakes another (the "no-steal" runtime of pingora; nginx's
    /// worker processes). Workers run until shutdown and until every task
    /// has finished (or the process exits at the drain timeout).
    fn spawn_workers(self: &Arc<Self>, bound: Vec<Bound>) {
        let workers = bound.first().map_or(0, |b| b.sockets.len());
        // Worker i takes socket i of every listener.
        let mut per_worker: Vec<Vec<_>> = (0..workers).map(|_| vec![]).collect();
        for b in bound {
            for (i, s) in b.sockets.into_iter().enumerate() {
                per_worker[i].push((s, b.tls.clone(), b.handshake_timeout));
            }
        }
        for (i, listeners) in per_worker.into_iter().enumerate() {
            let gw = self.clone();
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
                .spawn(move || rt.block_on(gw.worker(i, listeners)))
                .expect("starting a worker thread");
        }
    }

    /// One worker's event loop: accepts on its sockets until shutdown, then
    /// runs until every task has finished.
    async fn worker(
        self: Arc<Self>,
        i: usize,
        listeners: Vec<(std::net::TcpListener, Option<TlsAcceptor>, Duration)>,
    ) {
        let w = &self.workers[i];
        for (index, (s, tls, handshake_timeout)) in listeners.into_iter().enumerate() {
            let l = mio::net::TcpListener::from_std(s);
            // SAFETY: the listener owns its descriptor, which stays open as
            // long as the `AsyncFd` holds it.
            match unsafe { AsyncFd::register_with_interest(l, tokio::io::Interest::READABLE) } {
                Ok(l) => {
                    let gw = self.clone();
                    w.tracker.spawn(async move {
                        gw.accept_loop(i, index, l, tls, handshake_timeout).await
                    });
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
            loop {
                tokio::select! {
                    _ = w.shutdown.cancelled() => return,
                    _ = tick.tick() => {
                        let open = w.open.get();
                        since_drop = if open < last_open { 0 } else { since_drop.saturating_add(1) };
                        if since_drop < 4 {
                            release_thread_memory();
                        }
                        last_open = open;
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
        self.shutdown.cancel();
        self.tracker.close();
        for w in &self.workers {
            w.tracker.close();
        }
        let all_done = async {
            self.tracker.wait().await;
            for w in &self.workers {
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

    /// Accepts for one worker until shutdown. All workers watch the same
    /// listening socket; one well ahead of the least busy worker stops taking
    /// connections (they go to the others, whose event loops see them too)
    /// until one of its own ends, or until another worker gets as busy and
    /// stops in turn (it wakes the deferring ones then): the least busy worker
    /// always accepts, so no connection waits on a deferring one.
    async fn accept_loop(
        self: Arc<Self>,
        worker: usize,
        index: usize,
        listener: AsyncFd<mio::net::TcpListener>,
        tls: Option<TlsAcceptor>,
        handshake_timeout: Duration,
    ) {
        let w = &self.workers[worker];
        // Registered once, not per connection.
        let stop = crate::io::cancelled(&w.shutdown);
        tokio::pin!(stop);
        // What each connection's task holds of the gateway: a handle of this
        // worker's own, so that a connection's start and end touch a
        // reference count no other worker writes (a clone of the gateway's
        // own `Arc` would pass its cache line between the workers' CPUs,
        // twice per connection).
        let handle = Arc::new(self.clone());
        loop {
            if self.must_defer(worker) {
                let resume = w.resume.notified();
                tokio::pin!(resume);
                resume.as_mut().enable();
                if self.must_defer(worker) {
                    for (j, other) in self.workers.iter().enumerate() {
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
                    w.open.inc();
                    let gw = handle.clone();
                    let tls = tls.clone();
                    w.tracker.spawn(async move {
                        let _open = OpenGuard(&gw.workers[worker]);
                        gw.connection(worker, index, stream, remote, tls, handshake_timeout)
                            .await
                    });
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
