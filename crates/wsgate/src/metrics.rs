//! Prometheus metrics, and the admin listener that serves them.
//!
//! [`Metrics`] is a handle (an `Arc`, cheap to clone) on one registry; the
//! gateway makes one at start-up and hands clones to whoever records. There
//! is no process-global instance, so tests and embedders each get their own.
//! [`serve_admin`] answers `GET /metrics` in the OpenMetrics text format
//! (which Prometheus scrapes natively) and `GET /healthz` on a separate,
//! operator-only listener.
//!
//! # Metrics reference
//!
//! | name | type | labels | meaning |
//! | --- | --- | --- | --- |
//! | `wsgate_websockets_open` | gauge | `route`, `http_version` | WebSockets open now |
//! | `wsgate_websockets_opened_total` | counter | `route`, `http_version` | WebSockets opened (after a successful handshake on both sides) |
//! | `wsgate_websocket_closes_total` | counter | `route`, `http_version`, `code` | WebSockets ended, by close code |
//! | `wsgate_http_requests_total` | counter | `route`, `status` | plain HTTP requests proxied, by the status sent to the client |
//! | `wsgate_relayed_bytes_total` | counter | `route`, `direction` | payload bytes relayed |
//! | `wsgate_handshake_refusals_total` | counter | `reason` | handshakes (and requests) refused before any upgrade |
//! | `wsgate_backend_up` | gauge | `backend` | 1 while the backend is considered healthy, 0 while ejected |
//! | `wsgate_backend_connect_seconds` | histogram | `backend` | time to connect to a backend and complete its handshake |
//! | `wsgate_limiter_tracked_clients` | gauge | — | clients the rate limiter remembers (bounded; see `limits`) |
//! | `wsgate_worker_connections` | gauge | `worker` | connections (of any kind) each worker thread serves now |
//! | `wsgate_agent_connections` | gauge | `agent` | WebSockets registered agents hold open now, by agent id |
//! | `wsgate_tunnel_streams_total` | counter | `via`, `outcome` | streams opened through agents, by what asked (`request`, `forward_proxy`, `connect`, `forward`, `mux`, `bridge`) and how it went (`ok`, `agent_unavailable`, `agent_refused`, `agent_unreachable`, `agent_timeout`, `not_allowed`) |
//! | `wsgate_tunnel_bytes_total` | counter | `direction` | payload bytes through agents: `to_agent`, `from_agent` |
//! | `wsgate_cluster_links` | gauge | `direction` | node links open now: `out` (dialed by this node), `in` (dialed by others) |
//! | `wsgate_cluster_streams_total` | counter | `side`, `outcome` | streams across node links: `out` opened through another node (`ok`, `no_agent` (a stale owner entry, corrected), `link_lost`, `link_failed`, or a stream outcome), `in` served here for another node (`ok`, `no_agent`, `refused`, `bad_open`) |
//! | `wsgate_cluster_redis_errors_total` | counter | `op` | Redis commands that failed: `lease`, `nodes`, `lookup`, `hold`, `release`, `cleanup`, `resync`, `catalog`, `view`, `revoked`, `revoke`, `publish`, `subscribe` |
//! | `wsgate_cluster_lookups_total` | counter | `result` | owner look-ups of stream opens: `hit` (cache), `miss` (Redis) |
//! | `wsgate_auth_total` | counter | `method`, `outcome` | authentication outcomes: `method` a configured method's name or `origin`, `outcome` `ok` or the refusal's reason (never the credential) |
//!
//! Label values:
//!
//! - `route`: the route's name as configured (never the request path, which
//!   the client chooses).
//! - `http_version`: `1.1`, or `2` for a WebSocket over an HTTP/2 extended
//!   CONNECT (RFC 8441).
//! - `code`: the close code that ended the WebSocket — `1000` to `1015` as
//!   numbers, `3xxx` and `4xxx` for the registered and private ranges (kept as
//!   classes so that clients cannot mint series), `other` for anything else,
//!   and `none` when the connection dropped without a close frame.
//! - `direction`: `client_to_upstream` or `upstream_to_client`.
//! - `reason`: `rate_limited`, `per_ip_cap`, `global_cap`, `listener_cap`,
//!   `route_cap` (from
//!   `limits::Refusal::reason`), and the gateway's own: `no_route`,
//!   `bad_handshake`, `backend_unavailable`, `backend_error`, … — always a
//!   string from the program, never from the client.
//! - `backend`: the backend's address as configured.
//! - `status`: the numeric HTTP status.
//! - `worker`: the worker thread's index, `0` to `workers - 1`.
//!
//! Every label value comes from the configuration or from a fixed set, so
//! the number of series is bounded whatever clients send.
//!
//! # Hot paths
//!
//! The recording methods of [`Metrics`] look their series up by label (a
//! lock shared by every worker and a `String` for the route). Every proxied
//! or bridged WebSocket instead goes through its route's [`RouteSeries`],
//! which the gateway makes once per route and which keeps each series once
//! looked up: its opening, bytes and close cost atomic adds. Per-chunk
//! recording uses a handle resolved once: [`Metrics::byte_counter`] gives a
//! [`ByteCounter`] whose [`add`](ByteCounter::add) is one atomic add.
//! [`RouteSeries::websocket`] (and [`Metrics::websocket`]) give an
//! [`OpenWebSocket`] guard that records the open and, exactly once, the
//! close — with code `none` if it is dropped without
//! [`OpenWebSocket::close`] — so the gauge cannot drift on early returns.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

/// `Content-Type` of `GET /metrics`.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Buckets of `wsgate_backend_connect_seconds`, from 1 ms to 10 s.
const LATENCY_BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Admin connections served at once; more wait in the accept queue.
const MAX_ADMIN_CONNECTIONS: usize = 32;

/// Time an admin connection may take, request and response together.
const ADMIN_CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// The HTTP version a WebSocket arrived over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HttpVersion {
    /// HTTP/1.1 `Upgrade: websocket` (label `1.1`).
    H1,
    /// HTTP/2 extended CONNECT, RFC 8441 (label `2`).
    H2,
}

impl EncodeLabelValue for HttpVersion {
    fn encode(&self, e: &mut LabelValueEncoder) -> std::fmt::Result {
        e.write_str(match self {
            HttpVersion::H1 => "1.1",
            HttpVersion::H2 => "2",
        })
    }
}

/// Which way bytes went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    ClientToUpstream,
    UpstreamToClient,
}

impl EncodeLabelValue for Direction {
    fn encode(&self, e: &mut LabelValueEncoder) -> std::fmt::Result {
        e.write_str(match self {
            Direction::ClientToUpstream => "client_to_upstream",
            Direction::UpstreamToClient => "upstream_to_client",
        })
    }
}

/// A close code reduced to a bounded label value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum CloseCode {
    None,
    Standard(u16),
    Registered,
    Private,
    Other,
}

impl From<Option<u16>> for CloseCode {
    fn from(code: Option<u16>) -> Self {
        match code {
            None => CloseCode::None,
            Some(c @ 1000..=1015) => CloseCode::Standard(c),
            Some(3000..=3999) => CloseCode::Registered,
            Some(4000..=4999) => CloseCode::Private,
            Some(_) => CloseCode::Other,
        }
    }
}

impl EncodeLabelValue for CloseCode {
    fn encode(&self, e: &mut LabelValueEncoder) -> std::fmt::Result {
        match self {
            CloseCode::None => e.write_str("none"),
            CloseCode::Standard(c) => write!(e, "{c}"),
            CloseCode::Registered => e.write_str("3xxx"),
            CloseCode::Private => e.write_str("4xxx"),
            CloseCode::Other => e.write_str("other"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct WsLabels {
    route: String,
    http_version: HttpVersion,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct CloseLabels {
    route: String,
    http_version: HttpVersion,
    code: CloseCode,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct HttpLabels {
    route: String,
    status: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct BytesLabels {
    route: String,
    direction: Direction,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct BackendLabels {
    backend: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct AgentLabels {
    agent: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct StreamLabels {
    via: &'static str,
    outcome: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DirectionLabels {
    direction: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ClusterStreamLabels {
    side: &'static str,
    outcome: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OpLabels {
    op: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct AuthLabels {
    method: String,
    outcome: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TunnelBytesLabels {
    direction: &'static str,
}

type LatencyFamily = Family<BackendLabels, Histogram, fn() -> Histogram>;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct WorkerLabels {
    worker: u32,
}

#[derive(Debug)]
struct Inner {
    registry: Registry,
    ws_open: Family<WsLabels, Gauge>,
    ws_opened: Family<WsLabels, Counter>,
    ws_closes: Family<CloseLabels, Counter>,
    http_requests: Family<HttpLabels, Counter>,
    bytes: Family<BytesLabels, Counter>,
    refusals: Family<ReasonLabels, Counter>,
    backend_up: Family<BackendLabels, Gauge>,
    backend_latency: LatencyFamily,
    tracked_clients: Gauge,
    worker_connections: Family<WorkerLabels, WorkerGauge>,
    agent_connections: Family<AgentLabels, Gauge>,
    tunnel_streams: Family<StreamLabels, Counter>,
    tunnel_bytes: Family<TunnelBytesLabels, Counter>,
    auth: Family<AuthLabels, Counter>,
    cluster_links: Family<DirectionLabels, Gauge>,
    cluster_streams: Family<ClusterStreamLabels, Counter>,
    cluster_redis_errors: Family<OpLabels, Counter>,
    cluster_lookups: Family<ResultLabels, Counter>,
}

/// The gateway's metrics: a cheap-to-clone handle on one registry.
#[derive(Debug, Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every `wsgate_*` metric registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("wsgate");
        let ws_open = Family::default();
        let ws_opened = Family::default();
        let ws_closes = Family::default();
        let http_requests = Family::default();
        let bytes = Family::default();
        let refusals = Family::default();
        let backend_up = Family::default();
        let backend_latency: LatencyFamily =
            Family::new_with_constructor(|| Histogram::new(LATENCY_BUCKETS));
        let tracked_clients = Gauge::default();
        let worker_connections = Family::default();
        let agent_connections = Family::default();
        let tunnel_streams = Family::default();
        let tunnel_bytes = Family::default();
        let auth = Family::default();
        let cluster_links = Family::default();
        let cluster_streams = Family::default();
        let cluster_redis_errors = Family::default();
        let cluster_lookups = Family::default();
        registry.register(
            "cluster_links",
            "Node links open now: out (dialed by this node), in (dialed by others)",
            cluster_links.clone(),
        );
        registry.register(
            "cluster_streams",
            "Streams across node links: out (opened through another node), in (served here for another node), by outcome",
            cluster_streams.clone(),
        );
        registry.register(
            "cluster_redis_errors",
            "Redis commands of the cluster directory that failed, by operation",
            cluster_redis_errors.clone(),
        );
        registry.register(
            "cluster_lookups",
            "Owner look-ups of stream opens: hit (cached) or miss (read from Redis)",
            cluster_lookups.clone(),
        );
        registry.register(
            "agent_connections",
            "WebSockets registered agents hold open now, by agent id",
            agent_connections.clone(),
        );
        registry.register(
            "tunnel_streams",
            "Streams opened through agents, by what asked and how it went",
            tunnel_streams.clone(),
        );
        registry.register(
            "tunnel_bytes",
            "Payload bytes through agents",
            tunnel_bytes.clone(),
        );
        registry.register("websockets_open", "WebSockets open now", ws_open.clone());
        registry.register(
            "websockets_opened",
            "WebSockets opened after both handshakes",
            ws_opened.clone(),
        );
        registry.register(
            "websocket_closes",
            "WebSockets ended, by close code (none: dropped without a close frame)",
            ws_closes.clone(),
        );
        registry.register(
            "http_requests",
            "Plain HTTP requests proxied, by status sent to the client",
            http_requests.clone(),
        );
        registry.register("relayed_bytes", "Payload bytes relayed", bytes.clone());
        registry.register(
            "auth",
            "Authentication outcomes by method (its configured name, or origin) and outcome (ok, or the refusal's reason)",
            auth.clone(),
        );
        registry.register(
            "handshake_refusals",
            "Handshakes and requests refused before any upgrade, by reason",
            refusals.clone(),
        );
        registry.register(
            "backend_up",
            "1 while the backend is considered healthy, 0 while ejected",
            backend_up.clone(),
        );
        registry.register(
            "backend_connect_seconds",
            "Time to connect to a backend and complete its handshake",
            backend_latency.clone(),
        );
        registry.register(
            "limiter_tracked_clients",
            "Clients the rate limiter remembers",
            tracked_clients.clone(),
        );
        registry.register(
            "worker_connections",
            "Connections each worker thread serves now",
            worker_connections.clone(),
        );
        Self {
            inner: Arc::new(Inner {
                registry,
                ws_open,
                ws_opened,
                ws_closes,
                http_requests,
                bytes,
                refusals,
                backend_up,
                backend_latency,
                tracked_clients,
                worker_connections,
                agent_connections,
                tunnel_streams,
                tunnel_bytes,
                auth,
                cluster_links,
                cluster_streams,
                cluster_redis_errors,
                cluster_lookups,
            }),
        }
    }

    /// The `wsgate_worker_connections` gauge of worker `worker`, for the
    /// worker to count its connections on (and to balance by).
    pub fn worker_connections(&self, worker: usize) -> WorkerGauge {
        let labels = WorkerLabels {
            worker: u32::try_from(worker).unwrap_or(u32::MAX),
        };
        self.inner.worker_connections.get_or_create(&labels).clone()
    }

    /// A WebSocket on `route` has completed both handshakes.
    pub fn ws_opened(&self, route: &str, http_version: HttpVersion) {
        let labels = ws_labels(route, http_version);
        self.inner.ws_open.get_or_create(&labels).inc();
        self.inner.ws_opened.get_or_create(&labels).inc();
    }

    /// A WebSocket counted by [`ws_opened`](Self::ws_opened) has ended, with
    /// `close_code` (`None` when the connection dropped without a close frame).
    pub fn ws_closed(&self, route: &str, http_version: HttpVersion, close_code: Option<u16>) {
        let labels = ws_labels(route, http_version);
        self.inner.ws_open.get_or_create(&labels).dec();
        self.record_close(labels, close_code);
    }

    fn record_close(&self, labels: WsLabels, close_code: Option<u16>) {
        self.close_counter(labels, close_code).inc();
    }

    /// The `wsgate_websocket_closes_total` series of `labels` and `close_code`.
    fn close_counter(&self, labels: WsLabels, close_code: Option<u16>) -> Counter {
        let close = CloseLabels {
            route: labels.route,
            http_version: labels.http_version,
            code: close_code.into(),
        };
        self.inner.ws_closes.get_or_create(&close).clone()
    }

    /// Records the opening of a WebSocket and returns the guard that records
    /// its close; see [`OpenWebSocket`].
    /// (The gateway keeps a [`RouteSeries`] per route instead.)
    pub fn websocket(&self, route: &str, http_version: HttpVersion) -> OpenWebSocket {
        RouteSeries::new(self, route).websocket(http_version)
    }

    /// A plain HTTP request on `route` was answered with `status`.
    pub fn http_request(&self, route: &str, status: u16) {
        let labels = HttpLabels {
            route: route.to_owned(),
            status,
        };
        self.inner.http_requests.get_or_create(&labels).inc();
    }

    /// `n` payload bytes went `direction` on `route`.
    pub fn bytes(&self, route: &str, direction: Direction, n: u64) {
        self.byte_counter(route, direction).add(n);
    }

    /// The counter behind [`bytes`](Self::bytes) for one route and direction,
    /// to keep for a connection's life and bump per chunk without lookups.
    pub fn byte_counter(&self, route: &str, direction: Direction) -> ByteCounter {
        let labels = BytesLabels {
            route: route.to_owned(),
            direction,
        };
        ByteCounter(self.inner.bytes.get_or_create(&labels).clone())
    }

    /// A handshake or request was refused before any upgrade. `reason` is a
    /// fixed string such as [`crate::limits::Refusal::reason`] or
    /// `"no_route"`; it is `'static` so that no client-chosen text becomes a
    /// label.
    pub fn refused(&self, reason: &'static str) {
        self.inner
            .refusals
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// An authentication method (named in the config, or `origin`) decided:
    /// `outcome` is `ok` or a refusal's reason, a fixed string of the
    /// program (never the credential).
    pub fn auth(&self, method: &str, outcome: &'static str) {
        self.inner
            .auth
            .get_or_create(&AuthLabels {
                method: method.to_string(),
                outcome,
            })
            .inc();
    }

    /// Marks `backend` healthy (`true`) or ejected (`false`).
    pub fn backend_up(&self, backend: &str, up: bool) {
        let labels = backend_labels(backend);
        self.inner
            .backend_up
            .get_or_create(&labels)
            .set(i64::from(up));
    }

    /// One connect-and-handshake to `backend` took `seconds`.
    pub fn backend_latency(&self, backend: &str, seconds: f64) {
        self.backend_latency_series(backend).observe(seconds);
    }

    /// The `wsgate_backend_connect_seconds` series of `backend`, to keep and
    /// observe on without a registry lookup each time.
    pub fn backend_latency_series(&self, backend: &str) -> Histogram {
        let labels = backend_labels(backend);
        self.inner.backend_latency.get_or_create(&labels).clone()
    }

    /// Sets `wsgate_limiter_tracked_clients`, e.g. from
    /// [`crate::limits::Admission::tracked_ips`] before each render.
    pub fn limiter_tracked_clients(&self, n: usize) {
        self.inner
            .tracked_clients
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// An agent `agent`'s registered WebSockets went up (`1`) or down (`-1`).
    pub fn agent_connections(&self, agent: &str, delta: i64) {
        let labels = AgentLabels {
            agent: agent.to_owned(),
        };
        self.inner
            .agent_connections
            .get_or_create(&labels)
            .inc_by(delta);
    }

    /// A stream through an agent asked for by `via` ended its opening with
    /// `outcome` (both fixed strings of the program).
    pub fn tunnel_stream(&self, via: &'static str, outcome: &'static str) {
        self.inner
            .tunnel_streams
            .get_or_create(&StreamLabels { via, outcome })
            .inc();
    }

    /// The `wsgate_tunnel_bytes_total` counter towards the agents (`true`)
    /// or from them, to keep and add to.
    pub fn tunnel_bytes(&self, to_agent: bool) -> ByteCounter {
        let direction = if to_agent { "to_agent" } else { "from_agent" };
        ByteCounter(
            self.inner
                .tunnel_bytes
                .get_or_create(&TunnelBytesLabels { direction })
                .clone(),
        )
    }

    /// A node link opened (`1`) or ended (`-1`); `direction` `out` or `in`.
    pub fn cluster_links(&self, direction: &'static str, delta: i64) {
        self.inner
            .cluster_links
            .get_or_create(&DirectionLabels { direction })
            .inc_by(delta);
    }

    /// A stream across a node link: `side` `out` or `in`, `outcome` a fixed
    /// string of the program.
    pub fn cluster_stream(&self, side: &'static str, outcome: &'static str) {
        self.inner
            .cluster_streams
            .get_or_create(&ClusterStreamLabels { side, outcome })
            .inc();
    }

    /// A Redis command of operation `op` failed.
    pub fn cluster_redis_error(&self, op: &'static str) {
        self.inner
            .cluster_redis_errors
            .get_or_create(&OpLabels { op })
            .inc();
    }

    /// An owner look-up: answered by the cache (`hit`), or not.
    pub fn cluster_lookup(&self, hit: bool) {
        let result = if hit { "hit" } else { "miss" };
        self.inner
            .cluster_lookups
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    /// Everything, in the OpenMetrics text format (ends with `# EOF`).
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.inner.registry) {
            warn!(error = %e, "encoding metrics");
        }
        out
    }
}

fn ws_labels(route: &str, http_version: HttpVersion) -> WsLabels {
    WsLabels {
        route: route.to_owned(),
        http_version,
    }
}

fn backend_labels(backend: &str) -> BackendLabels {
    BackendLabels {
        backend: backend.to_owned(),
    }
}

/// The byte counter of one route and direction; [`add`](Self::add) is one
/// atomic add.
#[derive(Debug, Clone)]
pub struct ByteCounter(Counter);

impl ByteCounter {
    pub fn add(&self, n: u64) {
        self.0.inc_by(n);
    }
}

/// An `i64` in cache lines of its own. Each worker writes its gauge on
/// every connection and reads the others' when it accepts; as separate
/// small allocations they would sit side by side, and every write by one
/// worker would evict the line another worker reads.
#[derive(Debug, Default)]
pub struct PaddedI64(crossbeam_utils::CachePadded<std::sync::atomic::AtomicI64>);

impl prometheus_client::metrics::gauge::Atomic<i64> for PaddedI64 {
    fn inc(&self) -> i64 {
        self.inc_by(1)
    }
    fn inc_by(&self, v: i64) -> i64 {
        self.0.fetch_add(v, std::sync::atomic::Ordering::Relaxed)
    }
    fn dec(&self) -> i64 {
        self.dec_by(1)
    }
    fn dec_by(&self, v: i64) -> i64 {
        self.0.fetch_sub(v, std::sync::atomic::Ordering::Relaxed)
    }
    fn set(&self, v: i64) -> i64 {
        self.0.swap(v, std::sync::atomic::Ordering::Relaxed)
    }
    fn get(&self) -> i64 {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// The `wsgate_worker_connections` gauge of one worker.
pub type WorkerGauge = Gauge<i64, PaddedI64>;

/// Close codes whose series a [`RouteSeries`] keeps: `none`, then 1000–1015.
const KEPT_CLOSES: usize = 17;

/// One route's WebSocket series, each looked up in the registry at most once
/// and then kept: opening a WebSocket, counting its bytes and recording its
/// close cost a few atomic adds instead of label lookups (a `String` and a
/// lock shared by every worker, five times per WebSocket). A series is made
/// on first use, so the exposition lists exactly the series that were used.
/// Aligned so that the reference count, which every WebSocket's guard bumps,
/// is not in a cache line with the slots that every handshake reads.
#[derive(Debug)]
#[repr(align(128))]
pub struct RouteSeries {
    metrics: Metrics,
    route: String,
    /// By HTTP version: the `open` gauge and the `opened` counter.
    open: [OnceLock<(Gauge, Counter)>; 2],
    /// By direction.
    bytes: [OnceLock<Counter>; 2],
    /// By HTTP version, then [`KEPT_CLOSES`] codes; others are looked up.
    closes: [[OnceLock<Counter>; KEPT_CLOSES]; 2],
}

impl RouteSeries {
    /// The series of `route`, none made yet.
    pub fn new(metrics: &Metrics, route: &str) -> Arc<RouteSeries> {
        Arc::new(RouteSeries {
            metrics: metrics.clone(),
            route: route.to_owned(),
            open: Default::default(),
            bytes: Default::default(),
            closes: Default::default(),
        })
    }

    fn open_pair(&self, v: HttpVersion) -> &(Gauge, Counter) {
        self.open[v as usize].get_or_init(|| {
            let labels = ws_labels(&self.route, v);
            let m = &self.metrics.inner;
            (
                m.ws_open.get_or_create(&labels).clone(),
                m.ws_opened.get_or_create(&labels).clone(),
            )
        })
    }

    /// Records a WebSocket's opening; the guard records its close.
    pub fn websocket(self: &Arc<Self>, http_version: HttpVersion) -> OpenWebSocket {
        let (open, opened) = self.open_pair(http_version);
        open.inc();
        opened.inc();
        OpenWebSocket {
            series: Some(self.clone()),
            http_version,
        }
    }

    /// `n` payload bytes went `direction`.
    pub fn bytes(&self, direction: Direction, n: u64) {
        self.bytes[direction as usize]
            .get_or_init(|| self.metrics.byte_counter(&self.route, direction).0)
            .inc_by(n);
    }

    fn closed(&self, v: HttpVersion, close_code: Option<u16>) {
        self.open_pair(v).0.dec();
        let kept = match close_code {
            None => 0,
            Some(c @ 1000..=1015) => usize::from(c - 999),
            Some(_) => {
                self.metrics
                    .close_counter(ws_labels(&self.route, v), close_code)
                    .inc();
                return;
            }
        };
        self.closes[v as usize][kept]
            .get_or_init(|| {
                self.metrics
                    .close_counter(ws_labels(&self.route, v), close_code)
            })
            .inc();
    }
}

/// One open WebSocket as the metrics see it: counted open when made, closed
/// exactly once — by [`close`](Self::close) with its code, or on drop with
/// code `none`.
#[derive(Debug)]
pub struct OpenWebSocket {
    series: Option<Arc<RouteSeries>>,
    http_version: HttpVersion,
}

impl OpenWebSocket {
    /// `n` payload bytes of this WebSocket went `direction`.
    pub fn bytes(&self, direction: Direction, n: u64) {
        if let Some(s) = &self.series {
            s.bytes(direction, n);
        }
    }

    /// The WebSocket ended with `close_code` (`None`: no close frame).
    pub fn close(mut self, close_code: Option<u16>) {
        self.finish(close_code);
    }

    fn finish(&mut self, close_code: Option<u16>) {
        if let Some(series) = self.series.take() {
            series.closed(self.http_version, close_code);
        }
    }
}

impl Drop for OpenWebSocket {
    fn drop(&mut self) {
        self.finish(None);
    }
}

/// A request to the admin listener's other pages (`/agents`, control).
#[derive(Debug)]
pub struct AdminRequest {
    pub method: Method,
    pub path: String,
    /// The body of a `POST` (at most [`MAX_ADMIN_BODY`] bytes).
    pub body: Bytes,
}

/// The answer of such a page: a status and a JSON body.
#[derive(Debug)]
pub struct AdminAnswer {
    pub status: StatusCode,
    pub json: String,
}

/// Largest admin request body read.
pub const MAX_ADMIN_BODY: usize = 64 * 1024;

/// More pages of the admin listener: `None` for a path they do not serve,
/// else the answer to come.
pub type Pages = Arc<
    dyn Fn(
            AdminRequest,
        )
            -> Option<std::pin::Pin<Box<dyn std::future::Future<Output = AdminAnswer> + Send>>>
        + Send
        + Sync,
>;

/// Serves `GET /metrics` and `GET /healthz` (HEAD too) on `listener` until
/// `shutdown`; the `pages` first (`/agents`, control); anything else is 404 (405 for another method on those paths).
///
/// HTTP/1.1 without keep-alive: a scraper connects once per scrape. At most
/// 32 connections are served at once, each within 30 s; on shutdown the
/// answers in flight are finished, then this returns. Accept errors (such as
/// running out of file descriptors) are logged and retried after 100 ms.
pub async fn serve_admin(
    listener: TcpListener,
    metrics: Metrics,
    pages: Option<Pages>,
    shutdown: CancellationToken,
) {
    let tracker = TaskTracker::new();
    let slots = Arc::new(Semaphore::new(MAX_ADMIN_CONNECTIONS));
    loop {
        let slot = tokio::select! {
            _ = shutdown.cancelled() => break,
            slot = Arc::clone(&slots).acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "admin listener: accept failed");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                    }
                }
            },
        };
        let (metrics, pages) = (metrics.clone(), pages.clone());
        tracker.spawn(async move {
            let _slot = slot;
            let service = service_fn(move |req| {
                let (metrics, pages) = (metrics.clone(), pages.clone());
                async move { Ok::<_, Infallible>(answer(&metrics, pages.as_ref(), req).await) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(ADMIN_CONNECTION_TIMEOUT)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(ADMIN_CONNECTION_TIMEOUT, conn).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!(%peer, error = %e, "admin connection"),
                Err(_) => debug!(%peer, "admin connection timed out"),
            }
        });
    }
    tracker.close();
    tracker.wait().await;
}

async fn answer(
    metrics: &Metrics,
    pages: Option<&Pages>,
    req: Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    use http_body_util::BodyExt as _;
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    let body = if parts.method == Method::POST {
        match http_body_util::Limited::new(body, MAX_ADMIN_BODY)
            .collect()
            .await
        {
            Ok(b) => b.to_bytes(),
            Err(_) => Bytes::new(),
        }
    } else {
        Bytes::new()
    };
    let page = match pages {
        Some(p) => match p(AdminRequest {
            method: parts.method.clone(),
            path: path.clone(),
            body,
        }) {
            Some(f) => Some(f.await),
            None => None,
        },
        None => None,
    };
    let (status, content_type, body) = match (&parts.method, path.as_str()) {
        _ if page.is_some() => {
            let p = page.expect("checked");
            (p.status, "application/json", p.json)
        }
        (&Method::GET | &Method::HEAD, "/metrics") => {
            (StatusCode::OK, CONTENT_TYPE, metrics.render())
        }
        (&Method::GET | &Method::HEAD, "/healthz") => {
            (StatusCode::OK, "text/plain; charset=utf-8", "ok\n".into())
        }
        (_, "/metrics" | "/healthz") => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "method not allowed\n".into(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found\n".into(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    if status == StatusCode::METHOD_NOT_ALLOWED {
        headers.insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    fn has_line(text: &str, line: &str) -> bool {
        text.lines().any(|l| l == line)
    }

    #[track_caller]
    fn assert_line(text: &str, line: &str) {
        assert!(has_line(text, line), "no line {line:?} in:\n{text}");
    }

    #[test]
    fn websocket_label_sets_render_as_documented() {
        let m = Metrics::new();
        m.ws_opened("chat", HttpVersion::H2);
        m.ws_opened("chat", HttpVersion::H2);
        m.ws_opened("chat", HttpVersion::H1);
        m.ws_closed("chat", HttpVersion::H2, Some(1000));
        m.ws_closed("chat", HttpVersion::H1, None);
        let text = m.render();
        assert_line(&text, "# TYPE wsgate_websockets_open gauge");
        assert_line(
            &text,
            r#"wsgate_websockets_open{route="chat",http_version="2"} 1"#,
        );
        assert_line(
            &text,
            r#"wsgate_websockets_open{route="chat",http_version="1.1"} 0"#,
        );
        assert_line(&text, "# TYPE wsgate_websockets_opened counter");
        assert_line(
            &text,
            r#"wsgate_websockets_opened_total{route="chat",http_version="2"} 2"#,
        );
        assert_line(
            &text,
            r#"wsgate_websocket_closes_total{route="chat",http_version="2",code="1000"} 1"#,
        );
        assert_line(
            &text,
            r#"wsgate_websocket_closes_total{route="chat",http_version="1.1",code="none"} 1"#,
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn close_codes_are_bounded_classes() {
        let m = Metrics::new();
        for code in [
            1001, 1008, 1013, 3000, 3999, 4000, 4321, 4999, 5000, 999, 2000,
        ] {
            m.ws_opened("r", HttpVersion::H1);
            m.ws_closed("r", HttpVersion::H1, Some(code));
        }
        let text = m.render();
        let series = |code: &str| {
            format!(
                r#"wsgate_websocket_closes_total{{route="r",http_version="1.1",code="{code}"}}"#
            )
        };
        for (code, n) in [
            ("1001", 1),
            ("1008", 1),
            ("1013", 1),
            ("3xxx", 2),
            ("4xxx", 3),
            ("other", 3),
        ] {
            assert_line(&text, &format!("{} {n}", series(code)));
        }
        let closes = text
            .lines()
            .filter(|l| l.starts_with("wsgate_websocket_closes_total{"))
            .count();
        assert_eq!(closes, 6, "{text}");
    }

    #[test]
    fn the_guard_closes_exactly_once() {
        let m = Metrics::new();
        let a = m.websocket("echo", HttpVersion::H2);
        let b = m.websocket("echo", HttpVersion::H2);
        let text = m.render();
        assert_line(
            &text,
            r#"wsgate_websockets_open{route="echo",http_version="2"} 2"#,
        );
        a.close(Some(1001));
        drop(b);
        let text = m.render();
        assert_line(
            &text,
            r#"wsgate_websockets_open{route="echo",http_version="2"} 0"#,
        );
        assert_line(
            &text,
            r#"wsgate_websocket_closes_total{route="echo",http_version="2",code="1001"} 1"#,
        );
        assert_line(
            &text,
            r#"wsgate_websocket_closes_total{route="echo",http_version="2",code="none"} 1"#,
        );
    }

    #[test]
    fn http_bytes_refusals_and_backends_render() {
        let m = Metrics::new();
        m.ws_opened("chat", HttpVersion::H1);
        m.ws_closed("chat", HttpVersion::H1, Some(1000));
        m.http_request("app", 200);
        m.http_request("app", 200);
        m.http_request("app", 502);
        m.bytes("chat", Direction::ClientToUpstream, 10);
        let down = m.byte_counter("chat", Direction::UpstreamToClient);
        down.add(5);
        down.add(7);
        m.bytes("chat", Direction::ClientToUpstream, 1);
        m.refused(
            crate::limits::Refusal::Full {
                scope: crate::limits::Scope::Gateway,
            }
            .reason(),
        );
        m.refused("no_route");
        m.refused("no_route");
        m.backend_up("ws://10.0.0.5:9000", true);
        m.backend_up("ws://10.0.0.6:9000", true);
        m.backend_up("ws://10.0.0.6:9000", false);
        m.backend_latency("ws://10.0.0.5:9000", 0.003);
        m.backend_latency("ws://10.0.0.5:9000", 0.2);
        m.limiter_tracked_clients(42);
        let text = m.render();
        assert_line(
            &text,
            r#"wsgate_http_requests_total{route="app",status="200"} 2"#,
        );
        assert_line(
            &text,
            r#"wsgate_http_requests_total{route="app",status="502"} 1"#,
        );
        assert_line(
            &text,
            r#"wsgate_relayed_bytes_total{route="chat",direction="client_to_upstream"} 11"#,
        );
        assert_line(
            &text,
            r#"wsgate_relayed_bytes_total{route="chat",direction="upstream_to_client"} 12"#,
        );
        assert_line(
            &text,
            r#"wsgate_handshake_refusals_total{reason="global_cap"} 1"#,
        );
        assert_line(
            &text,
            r#"wsgate_handshake_refusals_total{reason="no_route"} 2"#,
        );
        assert_line(
            &text,
            r#"wsgate_backend_up{backend="ws://10.0.0.5:9000"} 1"#,
        );
        assert_line(
            &text,
            r#"wsgate_backend_up{backend="ws://10.0.0.6:9000"} 0"#,
        );
        assert_line(&text, "# TYPE wsgate_backend_connect_seconds histogram");
        assert_line(
            &text,
            r#"wsgate_backend_connect_seconds_count{backend="ws://10.0.0.5:9000"} 2"#,
        );
        assert_line(
            &text,
            r#"wsgate_backend_connect_seconds_bucket{le="0.005",backend="ws://10.0.0.5:9000"} 1"#,
        );
        assert_line(
            &text,
            r#"wsgate_backend_connect_seconds_bucket{le="+Inf",backend="ws://10.0.0.5:9000"} 2"#,
        );
        assert_line(&text, "wsgate_limiter_tracked_clients 42");
        let w = m.worker_connections(1);
        w.inc();
        w.inc();
        m.worker_connections(1).dec();
        assert_line(&m.render(), r#"wsgate_worker_connections{worker="1"} 1"#);
        // Every documented metric is there (once it has a series), with its
        // help text.
        for name in [
            "websockets_open",
            "websockets_opened",
            "websocket_closes",
            "http_requests",
            "relayed_bytes",
            "handshake_refusals",
            "backend_up",
            "backend_connect_seconds",
            "limiter_tracked_clients",
        ] {
            assert!(
                text.contains(&format!("# HELP wsgate_{name} ")),
                "{name}: {text}"
            );
        }
    }

    #[test]
    fn label_values_are_escaped() {
        let m = Metrics::new();
        m.http_request("we\"ird\\route", 404);
        let text = m.render();
        assert_line(
            &text,
            r#"wsgate_http_requests_total{route="we\"ird\\route",status="404"} 1"#,
        );
    }

    async fn get(addr: std::net::SocketAddr, request: &str) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn admin_listener_serves_metrics_health_and_404() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = Metrics::new();
        metrics.ws_opened("chat", HttpVersion::H2);
        metrics.refused("rate_limited");
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve_admin(
            listener,
            metrics.clone(),
            None,
            shutdown.clone(),
        ));

        let r = get(addr, "GET /metrics HTTP/1.1\r\nHost: admin\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(
            r.to_ascii_lowercase()
                .contains(&format!("\r\ncontent-type: {CONTENT_TYPE}\r\n")),
            "{r}"
        );
        let (_, body) = r.split_once("\r\n\r\n").unwrap();
        assert_line(
            body,
            r#"wsgate_websockets_open{route="chat",http_version="2"} 1"#,
        );
        assert_line(
            body,
            r#"wsgate_handshake_refusals_total{reason="rate_limited"} 1"#,
        );
        assert!(body.ends_with("# EOF\n"), "{body}");

        // Recorded after the first scrape: the next one sees it.
        metrics.ws_closed("chat", HttpVersion::H2, Some(1000));
        let r = get(addr, "GET /metrics HTTP/1.1\r\nHost: admin\r\n\r\n").await;
        assert_line(
            &r,
            r#"wsgate_websockets_open{route="chat",http_version="2"} 0"#,
        );

        let r = get(addr, "GET /healthz HTTP/1.1\r\nHost: admin\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(r.ends_with("\r\n\r\nok\n"), "{r}");

        let r = get(addr, "GET /nope HTTP/1.1\r\nHost: admin\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 404 Not Found\r\n"), "{r}");

        let r = get(
            addr,
            "POST /metrics HTTP/1.1\r\nHost: admin\r\nContent-Length: 0\r\n\r\n",
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"), "{r}");
        assert!(
            r.to_ascii_lowercase().contains("\r\nallow: get, head\r\n"),
            "{r}"
        );

        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("serve_admin returns on shutdown")
            .unwrap();
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "the listener is closed"
        );
    }
}
