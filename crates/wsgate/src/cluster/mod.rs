//! Many gateway nodes acting as one (docs/cluster.md): a request for an
//! agent that another node holds is relayed to that node over a node link,
//! and from there into the agent. Redis keeps the directory of who holds
//! what; nothing here is a consensus of its own.
//!
//! A node's life in the cluster:
//!
//! * **Start** ([`Cluster::start`]): three tasks on the main thread. The
//!   *lease* task writes this node's entry (`wsgate:node:{id}`, expiring
//!   after `lease`) every third of the lease and, when Redis had lost it
//!   (restarted, or the lease expired during an outage), writes every agent
//!   it holds again; the same tick reads every node's entry, keeps the live
//!   ones' addresses, and removes the entries of nodes whose lease expired
//!   (announcing `node-down`). The *writer* records in Redis each id whose
//!   connections here changed ([`Directory::changed`]), in order, retrying
//!   what failed. The *listener* follows `wsgate:events` and keeps the
//!   owner cache ([`owners`]), the revocations and disconnections current.
//! * **A stream** for an agent no connection here can take
//!   ([`Directory::open_remote`]): the nodes holding it come from the cache
//!   (no Redis command), or from Redis on a miss; each is tried over its
//!   link ([`link`]) until one opens the stream. A node that answers
//!   `NO_AGENT` leaves the cached entry; a link that dies before the answer
//!   costs nothing but the try (the request reached no agent).
//! * **SIGTERM** ([`Cluster::leave`], before the gateway's own drain): the
//!   node's entries are removed and `node-down` announced, so other nodes
//!   route elsewhere at once; then agents and node links get GOAWAY and
//!   open streams drain.
//! * **SIGKILL**: its links drop at once (peers try other holders); its
//!   lease expires and the first node to notice removes its entries.

pub(crate) mod link;
pub(crate) mod owners;
pub(crate) mod store;
pub mod wire;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::agent::dial::TlsFiles;
use crate::config;
use crate::error::{Error, Kind};
use crate::metrics::Metrics;
use crate::tunnel::allow::AllowList;
use crate::tunnel::proto::{Destination, Status};
use crate::tunnel::registry::{
    open_stream, reply_error, AgentInfo, AgentStream, Directory, NodeHolding, OpenFailure,
    Registry, Revoked,
};
use link::{Link, Links};
use owners::{Catalog, Lookup, Owners};
use store::Store;
use wire::Event;

/// How long a node whose link could not be dialed is passed over while
/// another node holds the agent.
const SUSPECT_FOR: Duration = Duration::from_secs(1);
/// Most nodes (or, without an id, agents) one open tries.
const MAX_TRIES: usize = 8;

/// This node's part in the cluster.
pub(crate) struct Cluster {
    pub config: config::Cluster,
    me: Arc<str>,
    /// Where other nodes dial this one: `advertise` + `path`.
    url: String,
    secret: Arc<[u8]>,
    registry: Arc<Registry>,
    store: Arc<Store>,
    owners: Owners,
    /// Live nodes (their lease current at the last look) and their URLs.
    nodes: RwLock<HashMap<Arc<str>, String>>,
    /// Nodes whose link could not be dialed, until when they are passed over.
    suspect: Mutex<HashMap<Arc<str>, Instant>>,
    links: Links,
    /// Ids whose connections here changed, for the writer.
    dirty: Mutex<HashSet<String>>,
    wake: Notify,
    /// Set when the lease task must write everything again.
    resync: AtomicBool,
    /// The listener must subscribe again (Redis was unreachable).
    resubscribe: Notify,
    open_timeout: Duration,
    keepalive: Duration,
    metrics: Metrics,
    leaving: AtomicBool,
    started: AtomicBool,
    stop: CancellationToken,
    tracker: TaskTracker,
}

/// The registry's view of the cluster: the directory behind it (held
/// weakly: the cluster owns the registry's Arc, not the other way round).
struct DirectoryHandle(Weak<Cluster>);

impl Directory for DirectoryHandle {
    fn changed(&self, id: &str) {
        if let Some(c) = self.0.upgrade() {
            c.changed(id);
        }
    }

    fn open_remote<'a>(
        &'a self,
        id: Option<&'a str>,
        dest: &'a Destination,
        timeout: Duration,
    ) -> Pin<Box<dyn Future<Output = Result<AgentStream, Error>> + Send + 'a>> {
        Box::pin(async move {
            let Some(c) = self.0.upgrade() else {
                return Err(Error::gateway(Kind::AgentUnavailable, "shutting down"));
            };
            let r = match id {
                Some(id) => c.open_by_id(id, dest, timeout).await,
                None => c.open_any(dest, timeout).await,
            };
            let outcome = match &r {
                Ok(_) => "ok",
                Err(e) => e.kind.label().unwrap_or("failed"),
            };
            c.metrics.cluster_stream("out", outcome);
            r
        })
    }
}

/// The info a node records for an id it holds: `CONNECTIONS SINCE ALLOW`.
fn info_text(h: &crate::tunnel::registry::Holding) -> String {
    format!("{} {} {}", h.connections, h.since, h.allow)
}

/// Reads `CONNECTIONS SINCE ALLOW`.
fn parse_info(s: &str) -> (usize, u64, String) {
    let mut it = s.splitn(3, ' ');
    let conns = it.next().and_then(|v| v.parse().ok()).unwrap_or(0);
    let since = it.next().and_then(|v| v.parse().ok()).unwrap_or(0);
    (conns, since, it.next().unwrap_or("").to_string())
}

impl Cluster {
    /// This node's cluster runtime for `config`, its directory set behind
    /// `registry`. Nothing is dialed until [`Cluster::start`].
    pub fn new(
        config: &config::Cluster,
        tunnel: &config::Tunnel,
        backend_tls: Option<&config::BackendTlsFiles>,
        registry: Arc<Registry>,
        metrics: Metrics,
    ) -> anyhow::Result<Arc<Cluster>> {
        let secret: Arc<[u8]> = config
            .secret
            .load()
            .map_err(|e| anyhow::anyhow!("[cluster] secret: {e}"))?
            .into();
        // Redis answers within a millisecond on a LAN; a second without an
        // answer is an outage, not a slow command.
        let store = Store::new(&config.redis, Duration::from_secs(1), metrics.clone())?;
        let tls = TlsFiles {
            ca: backend_tls.and_then(|t| t.ca.clone()),
            identity: backend_tls.and_then(|t| t.identity.clone()),
        };
        let keepalive = config.lease;
        let links = Links::new(
            &config.node_id,
            secret.clone(),
            tls,
            keepalive,
            config.lease.min(Duration::from_secs(3)),
            metrics.clone(),
        );
        let url = format!("{}{}", config.advertise.trim_end_matches('/'), config.path);
        let c = Arc::new(Cluster {
            config: config.clone(),
            me: Arc::from(config.node_id.as_str()),
            url,
            secret,
            registry: registry.clone(),
            store,
            owners: Owners::default(),
            nodes: RwLock::default(),
            suspect: Mutex::default(),
            links,
            dirty: Mutex::default(),
            wake: Notify::new(),
            resync: AtomicBool::new(true),
            resubscribe: Notify::new(),
            open_timeout: tunnel.open_timeout,
            keepalive,
            metrics,
            leaving: AtomicBool::new(false),
            started: AtomicBool::new(false),
            stop: CancellationToken::new(),
            tracker: TaskTracker::new(),
        });
        if !registry.set_directory(Arc::new(DirectoryHandle(Arc::downgrade(&c)))) {
            anyhow::bail!("the agent registry already has a directory");
        }
        Ok(c)
    }

    /// Whether `config`'s secret is the one in use (a reload cannot change
    /// it: the running links were proven with it).
    pub fn same_secret(&self, config: &config::Cluster) -> bool {
        config.secret.load().is_ok_and(|s| *s == *self.secret)
    }

    /// Where node links arrive.
    pub fn path(&self) -> &str {
        &self.config.path
    }

    /// What serving a node link needs.
    pub fn serving(&self) -> link::Serving {
        link::Serving {
            registry: self.registry.clone(),
            open_timeout: self.open_timeout,
            keepalive: self.keepalive,
            metrics: self.metrics.clone(),
        }
    }

    /// The authentication phase of a node link.
    pub fn authenticate(&self, head: &http::request::Parts, from: &str) -> Result<(), Error> {
        if from == &*self.me {
            return Err(Error::client(
                Kind::Forbidden,
                format!("node id `{from}` is this node's own"),
            ));
        }
        link::authenticate(head, from, &self.me, &self.secret)
    }

    /// Starts the lease, writer and listener tasks on the current runtime
    /// (once), and waits until the listener follows the events (at most
    /// 3 s: a Redis that cannot be reached does not hold the node back), so
    /// that no owner is cached before it can be kept current.
    pub async fn start(self: &Arc<Self>) {
        if self.started.swap(true, Ordering::SeqCst) {
            return;
        }
        info!(node = %self.me, url = %self.url, redis = %self.config.redis, "joining the cluster");
        let (ready, following) = tokio::sync::oneshot::channel();
        self.tracker.spawn(self.clone().lease_task());
        self.tracker.spawn(self.clone().writer_task());
        self.tracker.spawn(self.clone().listener_task(ready));
        if tokio::time::timeout(Duration::from_secs(3), following)
            .await
            .is_err()
        {
            warn!(node = %self.me, "serving before following cluster events (redis unreachable)");
        }
    }

    /// Leaves the cluster (SIGTERM): removes this node's entries and
    /// announces `node-down`, so that other nodes stop routing here; GOAWAY
    /// on this node's links. Bounded: a Redis that does not answer leaves
    /// the entries to expire with the lease.
    pub async fn leave(&self) {
        if self.leaving.swap(true, Ordering::SeqCst) || !self.started.load(Ordering::SeqCst) {
            return;
        }
        match tokio::time::timeout(Duration::from_secs(2), self.store.cleanup(&self.me, true)).await
        {
            Ok(Ok(n)) => info!(
                node = %self.me,
                "left the cluster: {} agent entries removed, node-down announced",
                n.unwrap_or(0)
            ),
            Ok(Err(e)) => {
                warn!(node = %self.me, "leaving the cluster: {e}; the entries expire with the lease")
            }
            Err(_) => {
                warn!(node = %self.me, "leaving the cluster: redis did not answer; the entries expire with the lease")
            }
        }
        self.links.goaway_all();
    }

    /// Stops the background tasks (after the drain).
    pub async fn stop(&self) {
        self.stop.cancel();
        self.tracker.close();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.tracker.wait()).await;
    }

    fn changed(&self, id: &str) {
        self.dirty
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_string());
        self.wake.notify_one();
    }

    /// Writes in Redis what this node holds of `id` now.
    async fn sync(&self, id: &str) -> Result<(), Error> {
        match self.registry.holding(id) {
            Some(h) => self
                .store
                .hold(&self.me, id, &info_text(&h))
                .await
                .map(|_| ()),
            None => self.store.release(&self.me, id).await,
        }
    }

    async fn writer_task(self: Arc<Self>) {
        let mut failing = false;
        loop {
            let retry = tokio::time::sleep(Duration::from_millis(500));
            tokio::select! {
                () = self.stop.cancelled() => return,
                () = self.wake.notified() => {}
                () = retry, if failing => {}
            }
            if self.leaving.load(Ordering::SeqCst) {
                continue;
            }
            let ids: Vec<String> =
                std::mem::take(&mut *self.dirty.lock().unwrap_or_else(|e| e.into_inner()))
                    .into_iter()
                    .collect();
            failing = false;
            for (i, id) in ids.iter().enumerate() {
                if let Err(e) = self.sync(id).await {
                    debug!("directory write for {id} failed: {e}");
                    // Kept, with every id not yet written, for the retry.
                    let mut d = self.dirty.lock().unwrap_or_else(|e| e.into_inner());
                    d.extend(ids[i..].iter().cloned());
                    failing = true;
                    break;
                }
            }
        }
    }

    /// Every third of the lease: renew this node's entry (writing
    /// everything again when Redis had lost it), then look at every node's.
    async fn lease_task(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.config.lease / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut first = true;
        loop {
            tokio::select! {
                () = self.stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            if self.leaving.load(Ordering::SeqCst) {
                continue;
            }
            match self
                .store
                .renew(&self.me, &self.url, self.config.lease)
                .await
            {
                Ok(old) => {
                    let asked = self.resync.swap(false, Ordering::SeqCst);
                    if old.is_none() || asked {
                        if !first {
                            warn!(node = %self.me, "this node's entries were lost in redis (restarted, or the lease expired): writing them again");
                        }
                        if let Err(e) = self.resync_all().await {
                            debug!("resync: {e}");
                            self.resync.store(true, Ordering::SeqCst);
                        }
                    } else if old.as_deref() != Some(self.url.as_str()) {
                        warn!(node = %self.me, other = ?old, "another process uses this node id");
                    }
                    first = false;
                }
                Err(_) => {
                    self.resync.store(true, Ordering::SeqCst);
                    self.resubscribe.notify_one();
                    continue;
                }
            }
            self.look_at_nodes().await;
        }
    }

    /// Writes every id held here, and removes the entries of ids this node
    /// no longer holds (left over from before a restart or an outage).
    async fn resync_all(&self) -> Result<(), Error> {
        let held: HashSet<String> = self.registry.ids().into_iter().collect();
        let recorded = self.store.node_agents(&self.me).await?;
        for id in recorded.iter().filter(|id| !held.contains(*id)) {
            self.store.release(&self.me, id).await?;
        }
        for id in &held {
            self.sync(id).await?;
        }
        if !held.is_empty() {
            info!(node = %self.me, agents = held.len(), "agent entries written to redis");
        }
        Ok(())
    }

    /// Reads every node's entry: the live ones' URLs are kept; a node whose
    /// lease expired has its entries removed (`node-down`).
    async fn look_at_nodes(&self) {
        let Ok(all) = self.store.nodes().await else {
            return;
        };
        let mut live = HashMap::new();
        for (node, url) in all {
            match url {
                Some(u) => {
                    live.insert(Arc::from(node.as_str()), u);
                }
                None if node != *self.me => self.node_expired(&node).await,
                None => {}
            }
        }
        *self.nodes.write().unwrap_or_else(|e| e.into_inner()) = live;
    }

    /// `node`'s lease expired: its entries go, and every cache forgets it.
    async fn node_expired(&self, node: &str) {
        match self.store.cleanup(node, false).await {
            Ok(Some(n)) => info!(
                node = %self.me,
                dead = %node,
                "node {node}'s lease expired: removed its {n} agent entries, node-down announced"
            ),
            Ok(None) => return,
            Err(_) => return,
        }
        self.apply(&Event::NodeDown {
            node: node.to_string(),
        });
    }

    /// Follows `wsgate:events`; every (re)subscription starts from a clean
    /// cache and the current revocations, as events may have been missed.
    async fn listener_task(self: Arc<Self>, ready: tokio::sync::oneshot::Sender<()>) {
        let mut ready = Some(ready);
        let mut delay = Duration::from_millis(250);
        // Whether the outage was logged: once per outage.
        let mut logged = false;
        loop {
            match self.subscribe().await {
                Ok(mut pubsub) => {
                    self.owners.clear();
                    if let Ok(list) = self.store.revoked().await {
                        self.registry
                            .set_revoked(list.iter().filter_map(|s| Revoked::parse(s)).collect());
                    }
                    if logged {
                        info!(node = %self.me, "following cluster events again");
                    }
                    if let Some(r) = ready.take() {
                        let _ = r.send(());
                    }
                    logged = false;
                    delay = Duration::from_millis(250);
                    let mut messages = pubsub.on_message();
                    loop {
                        tokio::select! {
                            () = self.stop.cancelled() => return,
                            () = self.resubscribe.notified() => break,
                            m = messages.next() => match m {
                                Some(m) => {
                                    let text: String = m.get_payload().unwrap_or_default();
                                    match Event::parse(&text) {
                                        Ok(e) => self.apply(&e),
                                        Err(e) => debug!("ignored event {text:?}: {e}"),
                                    }
                                }
                                None => break,
                            },
                        }
                    }
                }
                Err(e) => {
                    self.metrics.cluster_redis_error("subscribe");
                    if !logged {
                        warn!(node = %self.me, "cannot follow cluster events: {e}");
                        logged = true;
                    }
                }
            }
            // The cache is kept meanwhile (cached owners keep serving while
            // Redis is away) and cleared once subscribed again.
            tokio::select! {
                () = self.stop.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }

    async fn subscribe(&self) -> Result<redis::aio::PubSub, String> {
        let connect = async {
            let mut p = self.store.client().get_async_pubsub().await?;
            p.subscribe(wire::EVENTS).await?;
            Ok::<_, redis::RedisError>(p)
        };
        match tokio::time::timeout(Duration::from_secs(2), connect).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err("no answer within 2s".into()),
        }
    }

    /// Acts on an event.
    fn apply(&self, e: &Event) {
        self.owners.apply(e);
        match e {
            Event::Up { node, .. } => {
                self.suspect
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(node.as_str());
            }
            Event::NodeDown { node } if node.as_str() == &*self.me => {
                // Declared gone while alive (an outage longer than the
                // lease): everything is written again at the next renewal.
                if !self.leaving.load(Ordering::SeqCst) {
                    self.resync.store(true, Ordering::SeqCst);
                }
            }
            Event::NodeDown { node } => {
                self.nodes
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(node.as_str());
            }
            Event::Disconnect { id } => {
                let n = self.registry.disconnect(id);
                if n > 0 {
                    info!(agent = %id, "disconnected {n} connection(s) (cluster event)");
                }
            }
            Event::Revoke(r) => {
                let n = self.registry.revoke(r);
                info!(what = %r.key(), "revoked (cluster event): {n} connection(s) dropped");
            }
            Event::Unrevoke(r) => {
                self.registry.unrevoke(r);
                info!(what = %r.key(), "revocation lifted (cluster event)");
            }
            Event::Down { .. } => {}
        }
    }

    /// The URL of a live node: from the last look, else its entry now.
    async fn node_url(&self, node: &Arc<str>) -> Option<String> {
        if let Some(u) = self
            .nodes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(node)
        {
            return Some(u.clone());
        }
        match self.store.node_url(node).await {
            Ok(Some(u)) => {
                self.nodes
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(node.clone(), u.clone());
                Some(u)
            }
            Ok(None) => {
                // Its lease expired: ignored, and cleaned up.
                self.node_expired(node).await;
                None
            }
            Err(_) => None,
        }
    }

    fn is_suspect(&self, node: &str) -> bool {
        let mut s = self.suspect.lock().unwrap_or_else(|e| e.into_inner());
        match s.get(node) {
            Some(t) if t.elapsed() < SUSPECT_FOR => true,
            Some(_) => {
                s.remove(node);
                false
            }
            None => false,
        }
    }

    /// The nodes recorded as holding `id`: cached, else read from Redis.
    async fn owners_of(&self, id: &str) -> Result<(Vec<Arc<str>>, bool), Error> {
        if let Lookup::Hit(n) = self.owners.get(id) {
            self.metrics.cluster_lookup(true);
            return Ok((n, true));
        }
        self.metrics.cluster_lookup(false);
        match self.store.owners(id).await {
            Ok(list) => {
                let nodes: Vec<Arc<str>> = list.iter().map(|n| Arc::from(n.as_str())).collect();
                self.owners.fetched(id, &nodes);
                Ok((nodes, false))
            }
            Err(e) => {
                self.owners.fetch_failed(id);
                Err(e)
            }
        }
    }

    /// Opens a stream through agent `id` held by another node.
    async fn open_by_id(
        &self,
        id: &str,
        dest: &Destination,
        timeout: Duration,
    ) -> Result<AgentStream, Error> {
        let (nodes, cached) = self.owners_of(id).await?;
        let request = format!("agent://{id}/{dest}");
        let tried = match self.try_nodes(id, &nodes, &request, timeout).await {
            Ok(s) => return Ok(s),
            Err(Tried::Final(e)) => return Err(e),
            Err(Tried::Nothing(last, _)) if !cached => {
                return Err(last.unwrap_or_else(|| unavailable(id)))
            }
            Err(Tried::Nothing(_, tried)) => tried,
        };
        // The cached entry led nowhere: Redis may know better (an `up` not
        // heard yet). One look, in a failure path only.
        self.metrics.cluster_lookup(false);
        let fresh: Vec<Arc<str>> = self
            .store
            .owners(id)
            .await?
            .iter()
            .map(|n| Arc::from(n.as_str()))
            .filter(|n| !tried.contains(n))
            .collect();
        match self.try_nodes(id, &fresh, &request, timeout).await {
            Ok(s) => Ok(s),
            Err(Tried::Final(e)) => Err(e),
            Err(Tried::Nothing(last, _)) => Err(last.unwrap_or_else(|| unavailable(id))),
        }
    }

    /// Tries `nodes` in turn (those with a live link first, the least busy
    /// first) with the open request `request`.
    async fn try_nodes(
        &self,
        id: &str,
        nodes: &[Arc<str>],
        request: &str,
        timeout: Duration,
    ) -> Result<AgentStream, Tried> {
        let mut order: Vec<(Arc<str>, Option<Arc<Link>>)> = nodes
            .iter()
            .filter(|n| ***n != *self.me)
            .map(|n| (n.clone(), self.links.current(n)))
            .collect();
        let suspects: Vec<bool> = order.iter().map(|(n, _)| self.is_suspect(n)).collect();
        if suspects.iter().any(|s| !s) {
            let mut i = 0;
            order.retain(|_| {
                i += 1;
                !suspects[i - 1]
            });
        }
        order.sort_by_key(|(_, l)| match l {
            Some(l) => (0, l.counters.open_streams()),
            None => (1, 0),
        });
        let mut last = None;
        let mut tried = vec![];
        for (node, _) in order.into_iter().take(MAX_TRIES) {
            tried.push(node.clone());
            let Some(url) = self.node_url(&node).await else {
                self.owners.not_at(id, &node);
                continue;
            };
            let link = match self.links.get(&node, &url).await {
                Ok(l) => l,
                Err(e) => {
                    self.suspect
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(node.clone(), Instant::now());
                    last = Some(e);
                    continue;
                }
            };
            let who = format!("agent {id} via node {node}");
            match open_stream(&link.session, request, timeout, &who, || link.live()).await {
                Ok((stream, reply, rest)) => match reply.status {
                    Status::Ok => {
                        return Ok(AgentStream::remote(
                            stream,
                            rest,
                            id,
                            node.clone(),
                            link.counters.clone(),
                        ))
                    }
                    Status::NoAgent => {
                        // A stale entry: corrected here, the next node tried.
                        self.metrics.cluster_stream("out", "no_agent");
                        self.owners.not_at(id, &node);
                        last = Some(reply_error(&who, &reply));
                    }
                    _ => return Err(Tried::Final(reply_error(&who, &reply))),
                },
                Err(OpenFailure::Retry(e)) => {
                    self.metrics.cluster_stream("out", "link_lost");
                    last = Some(e);
                }
                Err(OpenFailure::Final(e)) => return Err(Tried::Final(e)),
            }
        }
        Err(Tried::Nothing(last, tried))
    }

    /// Opens a stream through any agent of another node whose allow list
    /// covers `dest` (from the catalog).
    async fn open_any(&self, dest: &Destination, timeout: Duration) -> Result<AgentStream, Error> {
        let catalog = self.catalog().await?;
        let mut last = None;
        let mut tries = 0;
        for (id, holders) in catalog.iter() {
            let nodes: Vec<Arc<str>> = holders
                .iter()
                .filter(|(n, allow)| **n != *self.me && allow.may_permit(dest))
                .map(|(n, _)| n.clone())
                .collect();
            if nodes.is_empty() {
                continue;
            }
            tries += 1;
            match self
                .try_nodes(id, &nodes, &format!("agent://{id}/{dest}"), timeout)
                .await
            {
                Ok(s) => return Ok(s),
                Err(Tried::Final(e)) => return Err(e),
                Err(Tried::Nothing(e, _)) => last = e,
            }
            if tries >= MAX_TRIES {
                break;
            }
        }
        Err(last.unwrap_or_else(|| {
            Error::upstream(
                Kind::AgentUnavailable,
                format!("no agent whose allow list covers {dest} is connected to any node"),
            )
        }))
    }

    /// Every id of the cluster with its nodes and their allow patterns.
    async fn catalog(&self) -> Result<Arc<Catalog>, Error> {
        let epoch = match self.owners.catalog() {
            Ok(c) => return Ok(c),
            Err(epoch) => epoch,
        };
        let raw = self.store.catalog("catalog").await?;
        let c: Catalog = raw
            .into_iter()
            .map(|(id, holders)| {
                let holders = holders
                    .into_iter()
                    .map(|(node, info)| {
                        let (_, _, allow) = parse_info(&info);
                        let allow = AllowList::from_header(&allow).unwrap_or_default();
                        (Arc::from(node.as_str()), allow)
                    })
                    .collect();
                (id, holders)
            })
            .collect();
        let c = Arc::new(c);
        self.owners.set_catalog(epoch, c.clone());
        Ok(c)
    }

    /// `GET /agents` on a cluster node: every id of the cluster, each with
    /// the nodes holding it; this node's own figures where it holds it.
    pub async fn view(&self) -> Result<Vec<AgentInfo>, Error> {
        let raw = self.store.catalog("view").await?;
        let mut local: HashMap<String, AgentInfo> = self
            .registry
            .snapshot()
            .into_iter()
            .map(|a| (a.id.clone(), a))
            .collect();
        let mut out = vec![];
        for (id, holders) in raw {
            let mut info = local.remove(&id).unwrap_or_else(|| AgentInfo::empty(&id));
            let mut nodes: Vec<NodeHolding> = holders
                .into_iter()
                .map(|(node, text)| {
                    let (connections, since, allow) = parse_info(&text);
                    NodeHolding {
                        this_node: node == *self.me,
                        node,
                        connections,
                        connected_since: since,
                        allow: allow
                            .split(", ")
                            .filter(|s| !s.is_empty())
                            .map(str::to_string)
                            .collect(),
                    }
                })
                .collect();
            nodes.sort_by(|a, b| a.node.cmp(&b.node));
            if info.allow.is_empty() {
                let mut allow: Vec<String> =
                    nodes.iter().flat_map(|n| n.allow.iter().cloned()).collect();
                allow.sort();
                allow.dedup();
                info.allow = allow;
            }
            info.nodes = Some(nodes);
            out.push(info);
        }
        // Held here but not (yet) written to Redis.
        for (_, mut info) in local {
            info.nodes = Some(vec![NodeHolding {
                node: self.me.to_string(),
                connections: info.connections,
                connected_since: info.connected_since,
                allow: info.allow.clone(),
                this_node: true,
            }]);
            out.push(info);
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// Drops `id`'s connections on every node; how many here.
    pub async fn disconnect(&self, id: &str) -> Result<usize, Error> {
        let n = self.registry.disconnect(id);
        self.store
            .publish(&Event::Disconnect { id: id.to_string() })
            .await?;
        Ok(n)
    }

    /// Revokes (or accepts again) on every node; connections dropped here.
    pub async fn revoke(&self, what: &Revoked, revoke: bool) -> Result<usize, Error> {
        let n = if revoke {
            self.registry.revoke(what)
        } else {
            self.registry.unrevoke(what);
            0
        };
        let e = if revoke {
            Event::Revoke(what.clone())
        } else {
            Event::Unrevoke(what.clone())
        };
        self.store.set_revoked(&e).await?;
        Ok(n)
    }
}

/// How trying a list of nodes ended without a stream.
enum Tried {
    /// A refusal that another node would repeat (the agent's own).
    Final(Error),
    /// No node could take it; the last reason, and the nodes tried.
    Nothing(Option<Error>, Vec<Arc<str>>),
}

fn unavailable(id: &str) -> Error {
    Error::upstream(
        Kind::AgentUnavailable,
        format!("no agent {id} is connected to any node"),
    )
}
