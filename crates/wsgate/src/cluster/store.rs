//! The directory in Redis (docs/cluster.md §2): the keys, the scripts that
//! change several of them at once, and one connection used from every
//! thread.
//!
//! | key | type | holds |
//! |---|---|---|
//! | `wsgate:node:{node}` | string, expires after the lease | the node's link URL (`advertise` + `path`) |
//! | `wsgate:nodes` | set | every node id with entries |
//! | `wsgate:node:{node}:agents` | set | the ids the node holds |
//! | `wsgate:agent:{id}` | set | the nodes holding the id |
//! | `wsgate:agent:{id}:info` | hash | per node: `CONNECTIONS SINCE ALLOW` |
//! | `wsgate:agents` | set | every id held somewhere |
//! | `wsgate:revoked` | set | `id:ID`, `token:SHA256` |
//!
//! Every command runs on the runtime the store was made on (the main
//! thread's), whichever thread asks, so the connection's task lives in one
//! place. A command that fails for the connection's sake (refused, reset,
//! timed out) drops it; the next one dials again, at most every
//! [`RETRY`]. The first failure after a success is logged as a warning, the
//! first success after failures as information: an outage is two lines.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, FromRedisValue};
use tracing::{info, warn};

use super::wire::{Event, EVENTS};
use crate::error::{Error, Kind};
use crate::metrics::Metrics;

/// After a failed connection, how long commands fail at once before the
/// next dial.
pub const RETRY: Duration = Duration::from_millis(500);

pub fn node_key(node: &str) -> String {
    format!("wsgate:node:{node}")
}
pub fn node_agents_key(node: &str) -> String {
    format!("wsgate:node:{node}:agents")
}
pub fn agent_key(id: &str) -> String {
    format!("wsgate:agent:{id}")
}
pub fn agent_info_key(id: &str) -> String {
    format!("wsgate:agent:{id}:info")
}
pub const NODES: &str = "wsgate:nodes";
pub const AGENTS: &str = "wsgate:agents";
pub const REVOKED: &str = "wsgate:revoked";

/// Records that `ARGV[1]` (a node) holds `ARGV[2]` (an id) with info
/// `ARGV[3]`; announces it when it is new. KEYS: the id's set, its info,
/// the node's set, the set of all ids.
const HOLD: &str = r"
local new = redis.call('SADD', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('SADD', KEYS[3], ARGV[2])
redis.call('SADD', KEYS[4], ARGV[2])
if new == 1 then
  redis.call('PUBLISH', ARGV[4], 'v1 up ' .. ARGV[1] .. ' ' .. ARGV[2])
end
return new
";

/// Records that `ARGV[1]` no longer holds `ARGV[2]`; the id leaves the set
/// of all ids with its last node. Same KEYS as [`HOLD`].
const RELEASE: &str = r"
local gone = redis.call('SREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('SREM', KEYS[3], ARGV[2])
if redis.call('SCARD', KEYS[1]) == 0 then
  redis.call('SREM', KEYS[4], ARGV[2])
  redis.call('DEL', KEYS[2])
end
if gone == 1 then
  redis.call('PUBLISH', ARGV[3], 'v1 down ' .. ARGV[1] .. ' ' .. ARGV[2])
end
return gone
";

/// Removes up to `ARGV[4]` ids of node `ARGV[1]`, and once none is left
/// the node itself, announcing `node-down`: when it leaves (`ARGV[2]` =
/// `leave`), or when its lease expired (`expired`: then only while its key
/// is still absent; announced by whoever finishes it). KEYS:
/// its key, its set of ids, the set of nodes. Answers `{removed, more}`
/// (`{-1, 0}`: the node is alive). In batches because a script blocks
/// Redis while it runs: 100,000 ids at once took 1.45 s (docs/cluster.md).
const CLEANUP: &str = r"
if ARGV[2] == 'expired' and redis.call('EXISTS', KEYS[1]) == 1 then
  return {-1, 0}
end
local ids = redis.call('SPOP', KEYS[2], tonumber(ARGV[4]))
for _, id in ipairs(ids) do
  local k = 'wsgate:agent:' .. id
  redis.call('SREM', k, ARGV[1])
  redis.call('HDEL', k .. ':info', ARGV[1])
  if redis.call('SCARD', k) == 0 then
    redis.call('SREM', 'wsgate:agents', id)
    redis.call('DEL', k .. ':info')
  end
end
if redis.call('SCARD', KEYS[2]) > 0 then
  return {#ids, 1}
end
if ARGV[2] == 'leave' then
  redis.call('DEL', KEYS[1])
end
local was = redis.call('SREM', KEYS[3], ARGV[1])
if was == 1 or #ids > 0 then
  redis.call('PUBLISH', ARGV[3], 'v1 node-down ' .. ARGV[1])
end
return {#ids, 0}
";

/// Ids one cleanup script removes: about 15 ms of Redis's time.
const CLEANUP_BATCH: u64 = 1000;

/// A request: one command or a pipeline.
pub enum Req {
    Cmd(redis::Cmd),
    Pipe(redis::Pipeline),
}

/// The connection to Redis, shared by every thread.
pub struct Store {
    url: String,
    client: redis::Client,
    conn: tokio::sync::Mutex<Option<MultiplexedConnection>>,
    /// When the last dial failed: none is tried again within [`RETRY`].
    failed_at: Mutex<Option<Instant>>,
    handle: tokio::runtime::Handle,
    healthy: AtomicBool,
    timeout: Duration,
    metrics: Metrics,
}

impl Store {
    /// A store for `url` whose commands run on the current runtime (the
    /// connection is dialed at the first command).
    pub fn new(url: &str, timeout: Duration, metrics: Metrics) -> anyhow::Result<Arc<Store>> {
        let client = redis::Client::open(url)
            .map_err(|e| anyhow::anyhow!("[cluster] redis `{url}`: {e}"))?;
        Ok(Arc::new(Store {
            url: url.to_string(),
            client,
            conn: tokio::sync::Mutex::new(None),
            failed_at: Mutex::new(None),
            handle: tokio::runtime::Handle::current(),
            healthy: AtomicBool::new(true),
            timeout,
            metrics,
        }))
    }

    /// The client, for the events' subscription.
    pub fn client(&self) -> &redis::Client {
        &self.client
    }

    /// Runs `req` (on the store's runtime) and reads its answer; `op` names
    /// it in logs and in `wsgate_cluster_redis_errors_total`.
    pub async fn query<T: FromRedisValue + Send + 'static>(
        self: &Arc<Self>,
        op: &'static str,
        req: Req,
    ) -> Result<T, Error> {
        let this = self.clone();
        let task = self.handle.spawn(async move { this.run(req).await });
        let r = match task.await {
            Ok(r) => r,
            Err(e) => Err(format!("task failed: {e}")),
        };
        match r {
            Ok(v) => {
                if !self.healthy.swap(true, Ordering::Relaxed) {
                    info!(redis = %self.url, "redis reachable again");
                }
                Ok(v)
            }
            Err(e) => {
                self.metrics.cluster_redis_error(op);
                if self.healthy.swap(false, Ordering::Relaxed) {
                    warn!(
                        redis = %self.url,
                        "redis unreachable ({op}: {e}): serving the agents held here and the owners cached"
                    );
                }
                Err(Error::gateway(
                    Kind::DirectoryUnavailable,
                    format!("the cluster directory (redis) is unavailable: {e}"),
                ))
            }
        }
    }

    async fn run<T: FromRedisValue>(&self, req: Req) -> Result<T, String> {
        let mut conn = self.connection().await?;
        let r = tokio::time::timeout(self.timeout, async {
            match &req {
                Req::Cmd(c) => c.query_async::<T>(&mut conn).await,
                Req::Pipe(p) => p.query_async::<T>(&mut conn).await,
            }
        })
        .await;
        match r {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() {
                    *self.conn.lock().await = None;
                }
                Err(e.to_string())
            }
            Err(_) => {
                *self.conn.lock().await = None;
                Err(format!("no answer within {:?}", self.timeout))
            }
        }
    }

    async fn connection(&self) -> Result<MultiplexedConnection, String> {
        let mut g = self.conn.lock().await;
        if let Some(c) = &*g {
            return Ok(c.clone());
        }
        let recent = self
            .failed_at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|t| t.elapsed() < RETRY);
        if recent {
            return Err("not connected (retrying shortly)".into());
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(self.timeout)
            .set_response_timeout(self.timeout);
        let dialed = tokio::time::timeout(
            self.timeout,
            self.client
                .get_multiplexed_async_connection_with_config(&config),
        )
        .await;
        let e = match dialed {
            Ok(Ok(c)) => {
                *g = Some(c.clone());
                *self.failed_at.lock().unwrap_or_else(|e| e.into_inner()) = None;
                return Ok(c);
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no connection within {:?}", self.timeout),
        };
        *self.failed_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        Err(e)
    }

    /// `node` holds `id` (`info`: `CONNECTIONS SINCE ALLOW`); whether it is
    /// new there.
    pub async fn hold(self: &Arc<Self>, node: &str, id: &str, info: &str) -> Result<bool, Error> {
        let mut c = redis::cmd("EVAL");
        c.arg(HOLD)
            .arg(4)
            .arg(agent_key(id))
            .arg(agent_info_key(id))
            .arg(node_agents_key(node))
            .arg(AGENTS)
            .arg(node)
            .arg(id)
            .arg(info)
            .arg(EVENTS);
        self.query::<i64>("hold", Req::Cmd(c)).await.map(|n| n == 1)
    }

    /// `node` no longer holds `id`.
    pub async fn release(self: &Arc<Self>, node: &str, id: &str) -> Result<(), Error> {
        let mut c = redis::cmd("EVAL");
        c.arg(RELEASE)
            .arg(4)
            .arg(agent_key(id))
            .arg(agent_info_key(id))
            .arg(node_agents_key(node))
            .arg(AGENTS)
            .arg(node)
            .arg(id)
            .arg(EVENTS);
        self.query::<i64>("release", Req::Cmd(c)).await.map(|_| ())
    }

    /// Removes node `node`'s entries: it `leave`s, or its lease `expired`
    /// (then only if it still is). The ids it held, or `None` when the
    /// node turned out alive.
    /// A script per [`CLEANUP_BATCH`] ids, so that Redis serves others
    /// between them.
    pub async fn cleanup(self: &Arc<Self>, node: &str, leave: bool) -> Result<Option<u64>, Error> {
        let mut total = 0;
        loop {
            let mut c = redis::cmd("EVAL");
            c.arg(CLEANUP)
                .arg(3)
                .arg(node_key(node))
                .arg(node_agents_key(node))
                .arg(NODES)
                .arg(node)
                .arg(if leave { "leave" } else { "expired" })
                .arg(EVENTS)
                .arg(CLEANUP_BATCH);
            let (n, more): (i64, i64) = self.query("cleanup", Req::Cmd(c)).await?;
            let Ok(n) = u64::try_from(n) else {
                return Ok(None);
            };
            total += n;
            if more == 0 {
                return Ok(Some(total));
            }
        }
    }

    /// Renews this node's lease; its URL before (none: the entry had
    /// expired or Redis lost it, and everything must be written again).
    pub async fn renew(
        self: &Arc<Self>,
        node: &str,
        url: &str,
        lease: Duration,
    ) -> Result<Option<String>, Error> {
        let mut p = redis::pipe();
        p.cmd("SET")
            .arg(node_key(node))
            .arg(url)
            .arg("PX")
            .arg(lease.as_millis() as u64)
            .arg("GET")
            .cmd("SADD")
            .arg(NODES)
            .arg(node)
            .ignore();
        let (old,): (Option<String>,) = self.query("lease", Req::Pipe(p)).await?;
        Ok(old)
    }

    /// Every node with entries, and its URL if its lease is current.
    pub async fn nodes(self: &Arc<Self>) -> Result<Vec<(String, Option<String>)>, Error> {
        let mut c = redis::cmd("SMEMBERS");
        c.arg(NODES);
        let nodes: Vec<String> = self.query("nodes", Req::Cmd(c)).await?;
        if nodes.is_empty() {
            return Ok(vec![]);
        }
        let mut c = redis::cmd("MGET");
        for n in &nodes {
            c.arg(node_key(n));
        }
        let urls: Vec<Option<String>> = self.query("nodes", Req::Cmd(c)).await?;
        Ok(nodes.into_iter().zip(urls).collect())
    }

    /// The URL of node `node`, if its lease is current.
    pub async fn node_url(self: &Arc<Self>, node: &str) -> Result<Option<String>, Error> {
        let mut c = redis::cmd("GET");
        c.arg(node_key(node));
        self.query("lookup", Req::Cmd(c)).await
    }

    /// The nodes recorded as holding `id`.
    pub async fn owners(self: &Arc<Self>, id: &str) -> Result<Vec<String>, Error> {
        let mut c = redis::cmd("SMEMBERS");
        c.arg(agent_key(id));
        self.query("lookup", Req::Cmd(c)).await
    }

    /// The ids `node` is recorded as holding.
    pub async fn node_agents(self: &Arc<Self>, node: &str) -> Result<Vec<String>, Error> {
        let mut c = redis::cmd("SMEMBERS");
        c.arg(node_agents_key(node));
        self.query("resync", Req::Cmd(c)).await
    }

    /// Every id held somewhere, with each node's info (`CONNECTIONS SINCE
    /// ALLOW`).
    pub async fn catalog(
        self: &Arc<Self>,
        op: &'static str,
    ) -> Result<Vec<(String, Vec<(String, String)>)>, Error> {
        let mut c = redis::cmd("SMEMBERS");
        c.arg(AGENTS);
        let mut ids: Vec<String> = self.query(op, Req::Cmd(c)).await?;
        ids.sort();
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(512) {
            let mut p = redis::pipe();
            for id in chunk {
                p.cmd("HGETALL").arg(agent_info_key(id));
            }
            let infos: Vec<Vec<(String, String)>> = self.query(op, Req::Pipe(p)).await?;
            out.extend(chunk.iter().cloned().zip(infos));
        }
        Ok(out)
    }

    /// Everything revoked (`id:ID`, `token:HEX`).
    pub async fn revoked(self: &Arc<Self>) -> Result<Vec<String>, Error> {
        let mut c = redis::cmd("SMEMBERS");
        c.arg(REVOKED);
        self.query("revoked", Req::Cmd(c)).await
    }

    /// Adds (or removes) a revocation and announces it.
    pub async fn set_revoked(self: &Arc<Self>, e: &Event) -> Result<(), Error> {
        let (cmd, key) = match e {
            Event::Revoke(r) => ("SADD", r.key()),
            Event::Unrevoke(r) => ("SREM", r.key()),
            _ => return self.publish(e).await,
        };
        let mut p = redis::pipe();
        p.atomic()
            .cmd(cmd)
            .arg(REVOKED)
            .arg(key)
            .ignore()
            .cmd("PUBLISH")
            .arg(EVENTS)
            .arg(e.to_string())
            .ignore();
        self.query::<()>("revoke", Req::Pipe(p)).await
    }

    /// Publishes an event.
    pub async fn publish(self: &Arc<Self>, e: &Event) -> Result<(), Error> {
        let mut c = redis::cmd("PUBLISH");
        c.arg(EVENTS).arg(e.to_string());
        self.query::<i64>("publish", Req::Cmd(c)).await.map(|_| ())
    }
}
