//! [`Gateway`], the root type: the runtime built from a [`Config`].
//!
//! The config is plain data; what lives is built here: a pool per proxy
//! route over backends kept once per address ([`BackendSet`]), a discovery
//! cache per discovering route, the admission gates, the listeners' TLS,
//! the tunnel, the metrics, and one [`Worker`] per worker thread. The
//! request path ([`crate::open`]) and the server ([`crate::server`]) add
//! `impl Gateway` blocks of their own; this file depends on neither.
//!
//! **Reload.** [`Gateway::reload`] builds the runtime of a new config beside
//! the running one and shares with it what must outlive a config: the
//! workers and their connections, the shutdown signal and task trackers, the
//! metrics, the backends of the addresses still named (their health and
//! counters), the tunnel's registered agents, and the admission gates when
//! their limits are unchanged. New connections take the new gateway;
//! established ones keep the one they started with until they end. What a
//! reload cannot change (the listeners, the worker count, the admin address,
//! `--forward` listeners) makes it fail, and the running settings stay.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_utils::CachePadded;
use tokio::sync::Notify;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::rules::Rules;
use crate::auth::{AuthSet, Authenticator, IdentityHeaders};
use crate::cluster::Cluster;
use crate::config::{Config, PeerAddr, ScopeLimits, Target};
use crate::limits::identity::IdentityGate;
use crate::limits::{AdmissionConfig, Gates};
use crate::metrics::{HttpVersion, Metrics, OpenWebSocket, RouteSeries, WorkerGauge};
use crate::proxy::backend::{BackendSet, Pool};
use crate::proxy::Proxy;
use crate::route::discovery::FileDiscovery;
use crate::tunnel::Tunnel;

/// The running gateway: its config and everything built from it.
pub struct Gateway {
    pub config: Config,
    pub metrics: Metrics,
    /// What each route runs on, by the route's index in `config.routes`.
    pub(crate) routes: Vec<RouteState>,
    /// Every proxy backend, one entry per address: what a new config's
    /// runtime is built over (`BackendSet::build(config, Some(&old))`).
    #[allow(dead_code)] // read by a reload, which comes with its own issue
    pub(crate) backends: BackendSet,
    pub(crate) proxy: Proxy,
    /// Admission: the gateway's gate and those of listeners and routes.
    pub(crate) gates: Arc<Gates>,
    /// The limits the gates were built from (a reload with the same keeps them).
    admission: (AdmissionConfig, Vec<ScopeLimits>, Vec<ScopeLimits>),
    /// Some route matches on headers, cookies or query, or discovers its
    /// peer: requests need those tables extracted.
    pub(crate) metadata_maps: bool,
    /// The reverse tunnel, when configured (`[tunnel]`).
    pub(crate) tunnel: Option<Arc<Tunnel>>,
    /// This node's part in a cluster (`[cluster]`), kept across reloads.
    pub(crate) cluster: Option<Arc<Cluster>>,
    /// The authentication methods (`[auth.NAME]`): what a new config's
    /// runtime is built over (`AuthSet::build(&config.auth, .., Some(&old))`).
    pub(crate) auth: AuthSet,
    /// Per-subject limits (`per_identity_*`).
    pub(crate) identities: Arc<IdentityGate>,
    /// The WebSocket series of the tunnel's endpoints.
    pub(crate) builtin: Builtin,
    /// Each listener's TLS (by its index in the config), loaded from its
    /// files.
    pub(crate) listener_tls: Vec<Option<TlsAcceptor>>,
    /// Per worker thread, shared by every gateway a reload builds; each in
    /// cache lines of its own, as the workers write them on every connection.
    pub(crate) workers: Arc<Vec<CachePadded<Worker>>>,
    pub shutdown: CancellationToken,
    pub tracker: TaskTracker,
    /// This gateway's own background tasks (health checks, housekeeping),
    /// stopped when a reload replaces it.
    pub(crate) background: CancellationToken,
}

/// A route's live part.
pub(crate) struct RouteState {
    pub target: Live,
    /// The route's WebSocket and request series.
    pub series: Arc<RouteSeries>,
    /// The authentication phase's method; `None`: anyone (the default).
    pub auth: Option<Arc<dyn Authenticator>>,
    /// Headers set from the identity on backend requests (client copies
    /// stripped).
    pub identity_headers: IdentityHeaders,
    /// The route's identity rules (`allow`): globs a bridge peer must match.
    pub rules: Rules,
}

/// Where a route's requests go, live.
pub(crate) enum Live {
    /// Bridge to one peer.
    Peer(PeerAddr),
    /// Bridge to a peer found per request.
    Discovery(FileDiscovery),
    /// Reverse proxy to a pool of backends.
    Proxy(Arc<Pool>),
    /// Files from a directory.
    Files(std::path::PathBuf),
}

/// The WebSocket series of the tunnel's endpoints, named like routes.
pub(crate) struct Builtin {
    agent: Arc<RouteSeries>,
    mux: Arc<RouteSeries>,
    connect: Arc<RouteSeries>,
    node: Arc<RouteSeries>,
}

impl Builtin {
    fn new(metrics: &Metrics) -> Builtin {
        Builtin {
            agent: RouteSeries::new(metrics, "agent"),
            mux: RouteSeries::new(metrics, "mux"),
            connect: RouteSeries::new(metrics, "connect"),
            node: RouteSeries::new(metrics, "node"),
        }
    }

    /// An open WebSocket (or tunnel) of endpoint `name`.
    pub fn websocket(&self, name: &str, version: HttpVersion) -> OpenWebSocket {
        match name {
            "agent" => &self.agent,
            "mux" => &self.mux,
            "node" => &self.node,
            _ => &self.connect,
        }
        .websocket(version)
    }
}

/// What one worker thread's connections share, touched by that thread alone
/// on a connection's path (so that workers do not pass cache lines back and
/// forth): its load, its shutdown signal, its task tracker.
pub(crate) struct Worker {
    /// Connections the worker serves now (`wsgate_worker_connections`): a
    /// worker well ahead of the least busy one leaves new connections to it.
    pub open: WorkerGauge,
    /// Wakes the worker's accept loops when it may take connections again.
    pub resume: Notify,
    /// A child of [`Gateway::shutdown`].
    pub shutdown: CancellationToken,
    /// The worker's tasks; shutting down waits for every worker's.
    pub tracker: TaskTracker,
    /// Connections it has accepted (for connection ids).
    pub next_id: AtomicU64,
}

impl Gateway {
    /// Builds the runtime of `config` (nothing is bound or started yet).
    /// Fails only when a file the config named cannot be loaded any more.
    pub fn new(config: Config) -> anyhow::Result<Arc<Gateway>> {
        Self::build(config, None)
    }

    /// The runtime of a new `config`, sharing with this one what outlives a
    /// config (see the module docs). `Err` when the config changes what a
    /// reload cannot, or a file it names cannot be loaded.
    pub fn reload(&self, config: Config) -> anyhow::Result<Arc<Gateway>> {
        let (old, new) = (&self.config, &config);
        let listeners = |c: &Config| {
            c.listeners
                .iter()
                .map(|l| (l.address.clone(), l.tls.is_some()))
                .collect::<Vec<_>>()
        };
        if listeners(old) != listeners(new) {
            anyhow::bail!("the listeners (addresses, TLS or not) cannot change on reload: restart");
        }
        if worker_count(old) != worker_count(new) {
            anyhow::bail!("`workers` cannot change on reload: restart");
        }
        if old.admin != new.admin {
            anyhow::bail!("[admin] address cannot change on reload: restart");
        }
        if old.tunnel.forwards != new.tunnel.forwards {
            anyhow::bail!("[[tunnel.forward]] listeners cannot change on reload: restart");
        }
        if old.cluster != new.cluster {
            anyhow::bail!("[cluster] cannot change on reload: restart");
        }
        Self::build(config, Some(self))
    }

    /// Stops this gateway's background tasks: a reload replaced it.
    pub(crate) fn retire(&self) {
        self.background.cancel();
    }

    fn build(config: Config, previous: Option<&Gateway>) -> anyhow::Result<Arc<Gateway>> {
        let metrics = previous.map_or_else(Metrics::new, |p| p.metrics.clone());
        let mut listener_tls = vec![];
        for l in &config.listeners {
            listener_tls.push(match &l.tls {
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
            });
        }
        let backend_tls = match &config.backend_tls {
            Some(t) => {
                let identity = t.identity.as_ref().map(|(c, k)| (c.as_path(), k.as_path()));
                Some(crate::tls::backend_client_config(
                    t.ca.as_deref(),
                    identity,
                )?)
            }
            None => None,
        };
        let proxy = Proxy::new(
            config.forwarding.clone(),
            config.limits.connect_timeout,
            config.limits.backend_timeout,
            backend_tls,
            metrics.clone(),
        );
        let admission = (
            AdmissionConfig {
                per_ip_rate: config.limits.per_ip_rate,
                per_ip_max_connections: config.limits.per_ip_max_connections,
                max_connections: config.limits.max_connections,
            },
            config
                .listeners
                .iter()
                .map(|l| l.admission)
                .collect::<Vec<_>>(),
            config
                .routes
                .iter()
                .map(|r| r.admission)
                .collect::<Vec<_>>(),
        );
        // The same limits keep their gates, and so their counts: a reload
        // admits no more than the caps allow.
        let gates = match previous {
            Some(p) if p.admission == admission => p.gates.clone(),
            _ => Arc::new(Gates::new(admission.0.clone(), &admission.1, &admission.2)),
        };
        let metadata_maps = config.routes.iter().any(|r| {
            let m = &r.matcher;
            !m.headers.is_empty()
                || !m.cookies.is_empty()
                || !m.query.is_empty()
                || matches!(r.target, Target::Discovery(_))
        });
        let backends = BackendSet::build(&config, previous.map(|p| &p.backends));
        let auth = AuthSet::build(&config.auth, &metrics, previous.map(|p| &p.auth))?;
        // Per-subject counts outlive a reload, like the per-client ones.
        let identities = previous.map_or_else(
            || Arc::new(IdentityGate::default()),
            |p| p.identities.clone(),
        );
        let tunnel = if config.tunnel.agents() || config.tunnel.mux() {
            let registry = previous
                .and_then(|p| p.tunnel.as_ref())
                .map(|t| t.registry.clone());
            Some(Arc::new(Tunnel::new(
                &config.tunnel,
                metrics.clone(),
                &auth,
                identities.clone(),
                config.limits.per_identity_max_streams,
                registry,
            )?))
        } else {
            None
        };
        let cluster = match (&config.cluster, &tunnel) {
            (Some(c), Some(t)) => Some(match previous.and_then(|p| p.cluster.clone()) {
                Some(kept) => {
                    if !kept.same_secret(c) {
                        anyhow::bail!("[cluster] secret changed: restart to use it");
                    }
                    kept
                }
                None => Cluster::new(
                    c,
                    &config.tunnel,
                    config.backend_tls.as_ref(),
                    t.registry.clone(),
                    metrics.clone(),
                )?,
            }),
            _ => None,
        };
        let routes = config
            .routes
            .iter()
            .map(|r| RouteState {
                target: match &r.target {
                    Target::Static(p) => Live::Peer(p.clone()),
                    Target::Discovery(d) => Live::Discovery(FileDiscovery::new(d)),
                    Target::Proxy(b) => {
                        Live::Proxy(Arc::new(backends.pool(b, config.limits.eject_for)))
                    }
                    Target::Files(dir) => Live::Files(dir.clone()),
                },
                series: RouteSeries::new(&metrics, &r.name),
                auth: auth.chain(&r.auth).map(|c| c as Arc<dyn Authenticator>),
                identity_headers: IdentityHeaders::new(&r.auth, &auth),
                rules: Rules(r.auth.allow.clone()),
            })
            .collect();
        let shutdown = previous.map_or_else(CancellationToken::new, |p| p.shutdown.clone());
        let workers = match previous {
            Some(p) => p.workers.clone(),
            None => Arc::new(
                (0..worker_count(&config))
                    .map(|i| {
                        CachePadded::new(Worker {
                            open: metrics.worker_connections(i),
                            resume: Notify::new(),
                            shutdown: shutdown.child_token(),
                            tracker: TaskTracker::new(),
                            next_id: AtomicU64::new(0),
                        })
                    })
                    .collect(),
            ),
        };
        Ok(Arc::new(Gateway {
            listener_tls,
            admission,
            background: shutdown.child_token(),
            metadata_maps,
            routes,
            backends,
            tunnel,
            cluster,
            auth,
            identities,
            builtin: Builtin::new(&metrics),
            workers,
            config,
            metrics,
            proxy,
            gates,
            tracker: previous.map_or_else(TaskTracker::new, |p| p.tracker.clone()),
            shutdown,
        }))
    }

    /// The admin listener's pages beside `/metrics`: `GET /agents` (in a
    /// cluster, the cluster's view) and the control endpoints
    /// (docs/cluster.md §7), which act on every node of a cluster and on
    /// this one alone otherwise.
    pub(crate) fn admin_pages(&self) -> Option<crate::metrics::Pages> {
        let tunnel = self.tunnel.clone()?;
        let cluster = self.cluster.clone();
        Some(Arc::new(move |req: crate::metrics::AdminRequest| {
            let known = req.path == "/agents"
                || req.path == "/revoked"
                || req.path == "/revoke"
                || req.path == "/unrevoke"
                || (req.path.starts_with("/agents/") && req.path.ends_with("/disconnect"));
            if !known {
                return None;
            }
            let (tunnel, cluster) = (tunnel.clone(), cluster.clone());
            Some(
                Box::pin(async move { admin_answer(&tunnel, cluster.as_deref(), req).await })
                    as std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>>,
            )
        }))
    }

    /// Open WebSockets right now.
    pub fn active(&self) -> usize {
        self.gates.gateway().open()
    }

    /// The shutdown signal as the connections of `worker` watch it.
    pub(crate) fn worker_shutdown(&self, worker: usize) -> CancellationToken {
        self.workers[worker].shutdown.clone()
    }

    /// Starts what runs beside the connections on the caller's runtime: the
    /// active health checks of proxy routes, and housekeeping (the limiter's
    /// state kept small, its gauge current, freed memory given back).
    pub(crate) fn spawn_background(self: &Arc<Self>) {
        self.auth.spawn_background(&self.tracker, &self.background);
        for (route, state) in self.config.routes.iter().zip(&self.routes) {
            if let (Live::Proxy(pool), Some((path, every))) = (&state.target, &route.health_check) {
                let (pool, path, every) = (pool.clone(), path.clone(), *every);
                let (metrics, shutdown) = (self.metrics.clone(), self.background.clone());
                let timeout = self.config.limits.connect_timeout;
                let tls = self.proxy.tls_connector();
                self.tracker.spawn(async move {
                    crate::proxy::backend::health_checks(
                        pool, path, every, timeout, metrics, tls, shutdown,
                    )
                    .await
                });
            }
        }
        let gw = self.clone();
        self.tracker.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(2));
            // Ticks since the number of open WebSockets last fell.
            let (mut last_open, mut since_drop) = (0, u32::MAX);
            loop {
                tokio::select! {
                    _ = gw.background.cancelled() => return,
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
}

/// Answers one admin page (see [`Gateway::admin_pages`]).
async fn admin_answer(
    tunnel: &Tunnel,
    cluster: Option<&Cluster>,
    req: crate::metrics::AdminRequest,
) -> crate::metrics::AdminAnswer {
    use crate::metrics::AdminAnswer;
    use crate::tunnel::registry::Revoked;
    use http::{Method, StatusCode};
    let json = |status, v: serde_json::Value| AdminAnswer {
        status,
        json: serde_json::to_string_pretty(&v).unwrap_or_default(),
    };
    let failed = |e: crate::error::Error| {
        json(
            e.kind.status(),
            serde_json::json!({ "error": e.to_string() }),
        )
    };
    let get = req.method == Method::GET || req.method == Method::HEAD;
    let post = req.method == Method::POST;
    let not_allowed = || {
        json(
            StatusCode::METHOD_NOT_ALLOWED,
            serde_json::json!({ "error": "method not allowed" }),
        )
    };
    let registry = &tunnel.registry;
    match req.path.as_str() {
        "/agents" if get => match cluster {
            None => json(StatusCode::OK, serde_json::json!(registry.snapshot())),
            Some(c) => match c.view().await {
                Ok(v) => json(StatusCode::OK, serde_json::json!(v)),
                Err(e) => failed(e),
            },
        },
        "/revoked" if get => json(StatusCode::OK, serde_json::json!(registry.revoked())),
        "/revoke" | "/unrevoke" if post => {
            let revoke = req.path == "/revoke";
            let body: serde_json::Value = match serde_json::from_slice(&req.body) {
                Ok(v) => v,
                Err(e) => {
                    return json(
                        StatusCode::BAD_REQUEST,
                        serde_json::json!({ "error": format!("a JSON body: {{\"id\": \"ID\"}} or {{\"token_sha256\": \"HEX\"}}: {e}") }),
                    )
                }
            };
            let what = match (
                body.get("id").and_then(|v| v.as_str()),
                body.get("token_sha256").and_then(|v| v.as_str()),
            ) {
                (Some(id), None) => Revoked::parse(&format!("id:{id}")),
                (None, Some(h)) => Revoked::parse(&format!("token:{}", h.to_ascii_lowercase())),
                _ => None,
            };
            let Some(what) = what else {
                return json(
                    StatusCode::BAD_REQUEST,
                    serde_json::json!({ "error": "give one of `id` (an agent id) and `token_sha256` (64 hex digits)" }),
                );
            };
            let dropped = match cluster {
                Some(c) => match c.revoke(&what, revoke).await {
                    Ok(n) => n,
                    Err(e) => return failed(e),
                },
                None if revoke => registry.revoke(&what),
                None => {
                    registry.unrevoke(&what);
                    0
                }
            };
            tracing::info!(what = %what.key(), revoke, dropped, "admin: revocation changed");
            json(
                StatusCode::OK,
                serde_json::json!({ "revoked": revoke, "what": what.key(), "dropped_here": dropped, "cluster": cluster.is_some() }),
            )
        }
        p if p.starts_with("/agents/") && post => {
            let id = &p["/agents/".len()..p.len() - "/disconnect".len()];
            if !crate::tunnel::proto::valid_id(id) {
                return json(
                    StatusCode::BAD_REQUEST,
                    serde_json::json!({ "error": format!("invalid agent id `{id}`") }),
                );
            }
            let dropped = match cluster {
                Some(c) => match c.disconnect(id).await {
                    Ok(n) => n,
                    Err(e) => return failed(e),
                },
                None => registry.disconnect(id),
            };
            tracing::info!(agent = %id, dropped, "admin: disconnect");
            json(
                StatusCode::OK,
                serde_json::json!({ "disconnected": id, "dropped_here": dropped, "cluster": cluster.is_some() }),
            )
        }
        _ => not_allowed(),
    }
}

/// `workers` from the config, else one per CPU.
pub(crate) fn worker_count(config: &Config) -> usize {
    config.workers.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    })
}

/// What a request handler knows about its connection.
#[derive(Debug, Clone)]
pub struct Conn {
    pub remote: SocketAddr,
    pub id: u64,
    /// Came over TLS.
    pub secure: bool,
    /// The client's TLS certificate (end entity), when it showed one.
    pub client_cert: Option<Arc<rustls::pki_types::CertificateDer<'static>>>,
    /// The listener's time for a request head.
    pub handshake_timeout: Duration,
    /// The worker thread serving it.
    pub worker: usize,
    /// The listener it came in on (its index in the config's listeners).
    pub listener: usize,
}

/// Returns what the calling thread's mimalloc heap freed to the system at
/// once (mimalloc otherwise purges only on the thread's next allocations,
/// and an idle worker makes none: RSS stayed at its peak after 5,000
/// proxied connections closed).
pub(crate) fn release_thread_memory() {
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
