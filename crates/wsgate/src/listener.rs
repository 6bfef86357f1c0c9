//! Listeners and the HTTP side of a connection: worker threads, accept, TLS,
//! the first request head, hyper for everything else, and graceful shutdown.
//!
//! Life of a connection: a worker accepts → (TLS handshake) →
//! [`Gateway::first_request`] reads the first request head within the
//! handshake timeout. An HTTP/1.1 WebSocket handshake is answered there (see
//! [`crate::websocket`]) and the socket goes to the relay in the same task;
//! plain HTTP and HTTP/2 go to hyper, whose [`Gateway::handle`] answers them
//! and opens the WebSockets it is asked for (extended CONNECT, an upgrade
//! after keep-alive requests) through the same [`crate::websocket`] code.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use bytes::{Bytes, BytesMut};
use crossbeam_utils::CachePadded;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::{http1 as hyper_h1, http2 as hyper_h2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn, Instrument};

use crate::config::{Config, Target};
use crate::handshake::{self, Body};
use crate::http1;
use crate::limits::{AdmissionConfig, Gates};
use crate::metrics::{Metrics, RouteSeries};
use crate::proxy::Proxy;
use crate::relay::ClientIo;
use crate::websocket::{Dispatch, Opened};

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

/// `workers` from the config, else one per CPU.
fn worker_count(config: &Config) -> usize {
    config.workers.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    })
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

/// What one worker thread's connections share, touched by that thread
/// alone on a connection's path (so that workers do not pass cache lines
/// back and forth): its load, its shutdown signal, its task tracker.
struct Worker {
    /// Connections the worker serves now (`wsgate_worker_connections`): a
    /// worker well ahead of the least busy one leaves new connections to it
    /// (see [`Gateway::accept_loop`]).
    open: crate::metrics::WorkerGauge,
    /// Wakes the worker's accept loops when it may take connections again.
    resume: Notify,
    /// A child of [`Gateway::shutdown`].
    shutdown: CancellationToken,
    /// The worker's tasks; [`Gateway::shutdown`] waits for every worker's.
    tracker: TaskTracker,
    /// Connections it has accepted (for connection ids).
    next_id: AtomicU64,
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

/// Shared state of the running gateway.
pub struct Gateway {
    pub config: Config,
    pub metrics: Metrics,
    pub(crate) proxy: Proxy,
    /// Admission: the gateway's gate and those of listeners and routes.
    pub(crate) gates: Gates,
    /// Some route matches on headers, cookies or query, or discovers its
    /// peer: handshakes need those tables extracted.
    pub(crate) metadata_maps: bool,
    /// Each route's WebSocket series, by route name.
    pub(crate) series: std::collections::HashMap<String, Arc<RouteSeries>>,
    /// Per worker thread; each in cache lines of its own, as the workers
    /// write them on every connection.
    workers: Vec<CachePadded<Worker>>,
    pub shutdown: CancellationToken,
    pub tracker: TaskTracker,
}

impl Gateway {
    pub fn new(config: Config) -> Arc<Gateway> {
        let metrics = Metrics::new();
        let proxy = Proxy::new(
            config.forwarding.clone(),
            config.limits.connect_timeout,
            config.limits.backend_timeout,
            config.backend_tls.clone(),
            metrics.clone(),
        );
        let gates = Gates::new(
            AdmissionConfig {
                per_ip_rate: config.limits.per_ip_rate,
                per_ip_max_connections: config.limits.per_ip_max_connections,
                max_connections: config.limits.max_connections,
            },
            &config
                .listeners
                .iter()
                .map(|l| l.admission)
                .collect::<Vec<_>>(),
            &config
                .routes
                .iter()
                .map(|r| r.admission)
                .collect::<Vec<_>>(),
        );
        let metadata_maps = config.routes.iter().any(|r| {
            let m = &r.matcher;
            !m.headers.is_empty()
                || !m.cookies.is_empty()
                || !m.query.is_empty()
                || matches!(r.target, Target::Discovery(_))
        });
        let series = config
            .routes
            .iter()
            .map(|r| (r.name.clone(), RouteSeries::new(&metrics, &r.name)))
            .collect();
        let shutdown = CancellationToken::new();
        let workers = (0..worker_count(&config))
            .map(|i| {
                CachePadded::new(Worker {
                    open: metrics.worker_connections(i),
                    resume: Notify::new(),
                    shutdown: shutdown.child_token(),
                    tracker: TaskTracker::new(),
                    next_id: AtomicU64::new(0),
                })
            })
            .collect();
        Arc::new(Gateway {
            metadata_maps,
            series,
            workers,
            config,
            metrics,
            proxy,
            gates,
            shutdown,
            tracker: TaskTracker::new(),
        })
    }

    /// Open WebSockets right now.
    pub fn active(&self) -> usize {
        self.gates.gateway().open()
    }

    /// Keeps the limiter's state small and its gauge current.
    pub fn spawn_housekeeping(self: &Arc<Self>) {
        let gw = self.clone();
        self.tracker.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(2));
            // Ticks since the number of open WebSockets last fell.
            let (mut last_open, mut since_drop) = (0, u32::MAX);
            loop {
                tokio::select! {
                    _ = gw.shutdown.cancelled() => return,
                    _ = tick.tick() => {
                        gw.gates.purge();
                        gw.metrics.limiter_tracked_clients(gw.gates.tracked_ips());
                        // Trim while connections go away and for a few ticks
                        // after (closing handshakes and backend sockets free
                        // their memory late).
                        let open = gw.active();
                        since_drop = if open < last_open { 0 } else { since_drop.saturating_add(1) };
                        if since_drop < 4 {
                            give_memory_back();
                        }
                        last_open = open;
                    }
                }
            }
        });
    }

    pub(crate) fn refuse(&self, reason: &'static str, resp: Response<Body>) -> Response<Body> {
        self.metrics.refused(reason);
        resp
    }

    /// Accepts on every listener until shutdown, and runs the active health
    /// checks of proxy routes.
    pub fn serve(self: &Arc<Self>, bound: Vec<Bound>) {
        for route in &self.config.routes {
            if let (Target::Proxy(pool), Some((path, every))) = (&route.target, &route.health_check)
            {
                let (pool, path, every) = (pool.clone(), path.clone(), *every);
                let (metrics, shutdown) = (self.metrics.clone(), self.shutdown.clone());
                let timeout = self.config.limits.connect_timeout;
                let tls = self.proxy.tls_connector();
                self.tracker.spawn(async move {
                    crate::backend::health_checks(
                        pool, path, every, timeout, metrics, tls, shutdown,
                    )
                    .await
                });
            }
        }
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

    /// The shutdown signal as the connections of `worker` watch it.
    pub(crate) fn worker_shutdown(&self, worker: usize) -> CancellationToken {
        self.workers[worker].shutdown.clone()
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
        let stop = crate::relay::cancelled(&w.shutdown);
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

    async fn connection(
        self: &Arc<Self>,
        worker: usize,
        listener: usize,
        stream: std::net::TcpStream,
        remote: SocketAddr,
        tls: Option<TlsAcceptor>,
        limit: Duration,
    ) {
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
            handshake_timeout: limit,
            worker,
            listener,
        };
        async move {
            match tls {
                None => self.first_request(stream, true, c, first).await,
                // Boxed, as every large branch is: the task's own future stays
                // small, and spawning it copies little.
                Some(acceptor) => {
                    Box::pin(async move {
                        match tokio::time::timeout(limit, acceptor.accept(stream)).await {
                            Ok(Ok(s)) => {
                                c.secure = true;
                                if s.get_ref().1.alpn_protocol() == Some(b"h2") {
                                    self.serve_http(s, true, c).await
                                } else {
                                    self.first_request(s, false, c, BytesMut::new()).await
                                }
                            }
                            Ok(Err(e)) => debug!("TLS handshake failed: {e}"),
                            Err(_) => debug!("TLS handshake timed out"),
                        }
                    })
                    .await
                }
            }
        }
        .instrument(span)
        .await
    }

    /// Reads the head of a connection's first request (within the handshake
    /// timeout). An HTTP/1.1 WebSocket handshake is answered here and its
    /// socket goes straight to the relay; anything else — plain HTTP, HTTP/2
    /// with prior knowledge (`cleartext`), a head we cannot parse — is served
    /// by hyper, which reads the same bytes again.
    async fn first_request<I: Accepted>(
        self: &Arc<Self>,
        mut io: I,
        cleartext: bool,
        c: Conn,
        mut buf: BytesMut,
    ) {
        let first = match tokio::time::timeout(
            c.handshake_timeout,
            read_first(&mut io, &mut buf, cleartext),
        )
        .await
        {
            Ok(f) => f,
            Err(_) => return debug!("no request head within the handshake timeout"),
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
                // Boxed and finished before the WebSocket runs, so nothing of
                // the handshake (its head, routing metadata) is held while it does.
                let opened = Box::pin(self.websocket_first(&mut io, parts, c)).await;
                if let Some(opened) = opened {
                    Box::pin(opened.run(io.into_client_io(), leftover)).await
                }
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
    }

    /// Answers an HTTP/1.1 WebSocket handshake read by [`Self::first_request`]:
    /// writes the 101 and returns the WebSocket to run, or writes the refusal
    /// (the connection then closes).
    async fn websocket_first<I: Accepted>(
        self: &Arc<Self>,
        io: &mut I,
        parts: http::request::Parts,
        c: Conn,
    ) -> Option<Opened> {
        let answer = match self.dispatch(&parts) {
            Dispatch::Answer(r) => r,
            Dispatch::Route {
                route,
                protocol,
                meta,
            } => match self.open_websocket(&parts, &meta, route, protocol, c).await {
                Ok((accepted, opened)) => {
                    let mut head = BytesMut::with_capacity(256);
                    accepted.encode_h1(&mut head);
                    if let Err(e) = write_flush(io, &head).await {
                        debug!("writing the 101 failed: {e}");
                        return None;
                    }
                    return Some(opened);
                }
                Err(r) => r,
            },
        };
        if let Err(e) = write_answer(io, answer).await {
            debug!("writing the answer failed: {e}");
        }
        None
    }

    /// Serves one connection with HTTP/1.1 or HTTP/2 until it ends; on
    /// shutdown, asks it to finish gracefully (bounded).
    async fn serve_http<I>(self: &Arc<Self>, io: I, h2: bool, c: Conn)
    where
        I: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let gw = self.clone();
        let svc = service_fn(move |req| {
            let gw = gw.clone();
            async move { Ok::<_, Infallible>(gw.handle(req, c).await) }
        });
        // The two connection types share no trait for graceful shutdown.
        macro_rules! until_shutdown {
            ($conn:expr, $grace:expr) => {{
                let conn = $conn;
                tokio::pin!(conn);
                tokio::select! {
                    r = &mut conn => {
                        if let Err(e) = r {
                            debug!("http connection ended: {e}");
                        }
                    }
                    _ = self.workers[c.worker].shutdown.cancelled() => {
                        conn.as_mut().graceful_shutdown();
                        let _ = tokio::time::timeout($grace, conn).await;
                    }
                }
            }};
        }
        let io = TokioIo::new(io);
        if h2 {
            until_shutdown!(
                hyper_h2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .enable_connect_protocol()
                    .keep_alive_interval(Some(Duration::from_secs(30)))
                    .serve_connection(io, svc),
                self.config.limits.drain_timeout
            )
        } else {
            until_shutdown!(
                hyper_h1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(c.handshake_timeout)
                    .serve_connection(io, svc)
                    .with_upgrades(),
                Duration::from_secs(1)
            )
        }
    }

    /// Answers one HTTP request hyper read: health check, refusal, proxying,
    /// or a WebSocket handshake (HTTP/2 extended CONNECT, or HTTP/1.1 after
    /// other requests on the connection), whose relay starts once hyper hands
    /// over the socket.
    pub async fn handle(self: &Arc<Self>, req: Request<Incoming>, c: Conn) -> Response<Body> {
        let (parts, body) = req.into_parts();
        let (route, protocol, meta) = match self.dispatch(&parts) {
            Dispatch::Answer(r) => return r,
            Dispatch::Route {
                route,
                protocol,
                meta,
            } => (route, protocol, meta),
        };
        if let Target::Proxy(pool) = &route.target {
            if !handshake::is_websocket_request(&parts) {
                if let Err(r) =
                    self.gates
                        .check_rate(c.remote.ip(), c.listener, self.route_index(route))
                {
                    return self.refuse(r.reason(), refusal_response(&r));
                }
                let resp = match self
                    .proxy
                    .forward(pool, parts, body, c.remote, c.secure)
                    .await
                {
                    Ok(r) => r,
                    Err(e) => {
                        warn!(route = %route.name, "{e:?}");
                        self.metrics.refused(e.reason());
                        e.response()
                    }
                };
                self.metrics
                    .http_request(&route.name, resp.status().as_u16());
                return resp;
            }
        }
        let mut req = Request::from_parts(parts, body);
        let on_upgrade = hyper::upgrade::on(&mut req);
        let (parts, _) = req.into_parts();
        match self.open_websocket(&parts, &meta, route, protocol, c).await {
            Ok((accepted, opened)) => {
                self.workers[c.worker]
                    .tracker
                    .spawn(opened.run_after(on_upgrade));
                accepted.into_response()
            }
            Err(r) => r,
        }
    }
}

/// Returns what the calling thread's mimalloc heap freed to the system at
/// once (mimalloc otherwise purges only on the thread's next allocations,
/// and an idle worker makes none: RSS stayed at its peak after 5,000
/// proxied connections closed).
fn release_thread_memory() {
    // SAFETY: mi_collect only frees memory the thread's heap no longer uses.
    unsafe { libmimalloc_sys::mi_collect(true) };
}

/// Returns freed heap memory to the system after connections went away.
/// glibc keeps what its per-thread arenas freed (RSS stayed ~70 MiB after
/// 5,000 proxied connections closed); `malloc_trim` hands it back (to ~10 MiB).
/// (The binary allocates with mimalloc; what glibc still serves — the C
/// parts, other threads — is trimmed here, the workers' heaps by each worker.)
fn give_memory_back() {
    release_thread_memory();
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory held by the allocator.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// 429 or 503 with `Retry-After`.
pub(crate) fn refusal_response(r: &crate::limits::Refusal) -> Response<Body> {
    let mut resp = handshake::text(r.status(), r.to_string());
    if let Ok(v) = http::HeaderValue::from_str(&r.retry_after_secs().to_string()) {
        resp.headers_mut().insert(http::header::RETRY_AFTER, v);
    }
    resp
}

/// What a request handler knows about its connection.
#[derive(Debug, Clone, Copy)]
pub struct Conn {
    pub remote: SocketAddr,
    pub id: u64,
    /// Came over TLS.
    pub secure: bool,
    /// The listener's time for a request head.
    pub handshake_timeout: Duration,
    /// The worker thread serving it.
    pub worker: usize,
    /// The listener it came in on (its index in the config's listeners).
    pub listener: usize,
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

/// A connection whose first bytes were already read: they are read again
/// first. How hyper gets a connection whose request head we looked at.
pub struct Rewind<T> {
    prefix: Bytes,
    inner: T,
}

impl<T> Rewind<T> {
    fn new(prefix: Bytes, inner: T) -> Self {
        Rewind { prefix, inner }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Recovers the concrete socket from hyper's upgraded HTTP/1.1 connection
/// (always a [`Rewind`]: hyper only gets connections whose first head we
/// read), so plain TCP clients can be read on readiness (no idle buffer).
pub(crate) fn into_client(up: hyper::upgrade::Upgraded) -> (ClientIo, Bytes) {
    fn joined(prefix: Bytes, read_buf: Bytes) -> Bytes {
        match (prefix.is_empty(), read_buf.is_empty()) {
            (true, _) => read_buf,
            (false, true) => prefix,
            (false, false) => [prefix, read_buf].concat().into(),
        }
    }
    let up = match up.downcast::<TokioIo<Rewind<TcpStream>>>() {
        Ok(p) => {
            let r = p.io.into_inner();
            return (ClientIo::Tcp(r.inner), joined(r.prefix, p.read_buf));
        }
        Err(up) => up,
    };
    let up = match up.downcast::<TokioIo<Rewind<TlsStream<TcpStream>>>>() {
        Ok(p) => {
            let r = p.io.into_inner();
            return (
                ClientIo::Io(Box::new(r.inner)),
                joined(r.prefix, p.read_buf),
            );
        }
        Err(up) => up,
    };
    // HTTP/2 streams: nothing to recover.
    (ClientIo::Io(Box::new(TokioIo::new(up))), Bytes::new())
}
