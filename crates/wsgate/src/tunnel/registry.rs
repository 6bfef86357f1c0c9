//! The agents this gateway holds, and opening a stream through one of them.
//!
//! Each registered WebSocket is an [`AgentConn`] (its wsmux session, what
//! the agent announced, its counters) under its id; several may share an id
//! (an agent's pool, or replicas). [`Registry::open`] picks the live
//! connection with the fewest open streams, sends the open request, waits
//! for the agent's reply, and on a connection that died before the agent
//! answered tries the next one, so a killed replica fails only the streams
//! it carried.
//!
//! The registry is this node's. A cluster (`crate::cluster`, docs/cluster.md)
//! sets a [`Directory`] behind it: [`Registry::open`] tries this node's
//! connections first and asks the directory only when none could take the
//! stream; the directory hears of every id whose connections here change
//! ([`Directory::changed`]). Nodes that relay another node's request use
//! [`Registry::open_local`], which never asks the directory (no loops).
//!
//! Control acts here too: [`Registry::disconnect`] drops an id's
//! connections, [`Registry::revoke`] refuses an id or a token from now on
//! (and drops what it covers); a cluster applies both on every node.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_util::sync::CancellationToken;

use super::allow::AllowList;
use super::proto::{self, Destination, Reply, Status};
use crate::error::{Error, Kind};
use crate::metrics::{ByteCounter, Metrics};

/// One registered WebSocket of an agent.
pub struct AgentConn {
    pub id: String,
    pub remote: SocketAddr,
    pub since: SystemTime,
    /// What the agent announced it allows (it checks every open itself).
    pub allow: AllowList,
    pub session: wsmux::Session,
    /// A number unique among this gateway's agent connections.
    pub serial: u64,
    open: AtomicUsize,
    /// Payload bytes towards the agent, and from it.
    pub bytes_to: AtomicU64,
    pub bytes_from: AtomicU64,
    /// The same, in `wsgate_tunnel_bytes_total`.
    counted_to: ByteCounter,
    counted_from: ByteCounter,
    /// The SHA-256 (hex) of the token it registered with, if any: what a
    /// token's revocation matches.
    pub credential: Option<String>,
    /// Cancelled to drop this connection (disconnect, revocation).
    pub kick: CancellationToken,
}

impl AgentConn {
    pub fn new(
        id: String,
        remote: SocketAddr,
        allow: AllowList,
        session: wsmux::Session,
        serial: u64,
        metrics: &Metrics,
        credential: Option<String>,
    ) -> AgentConn {
        AgentConn {
            id,
            remote,
            since: SystemTime::now(),
            allow,
            session,
            serial,
            open: AtomicUsize::new(0),
            bytes_to: AtomicU64::new(0),
            bytes_from: AtomicU64::new(0),
            counted_to: metrics.tunnel_bytes(true),
            counted_from: metrics.tunnel_bytes(false),
            credential,
            kick: CancellationToken::new(),
        }
    }

    fn sent(&self, n: usize) {
        self.bytes_to.fetch_add(n as u64, Ordering::Relaxed);
        self.counted_to.add(n as u64);
    }

    fn received(&self, n: usize) {
        self.bytes_from.fetch_add(n as u64, Ordering::Relaxed);
        self.counted_from.add(n as u64);
    }

    /// Streams open on it now.
    pub fn open_streams(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Whether new streams may go on it: its session is up and neither side
    /// said GOAWAY.
    pub fn live(&self) -> bool {
        self.session.error().is_none() && !self.session.peer_goaway()
    }
}

/// Where the agents other nodes hold are found, and how a stream reaches
/// them: a cluster's directory (`crate::cluster`), set once behind the
/// registry. Without one the registry is this node's alone.
pub trait Directory: Send + Sync {
    /// The connections of `id` on this node changed: one came or went.
    fn changed(&self, id: &str);

    /// Opens a stream to `dest` through agent `id` (or any agent whose
    /// allow list covers `dest`) held by another node, once no connection
    /// of this node could take it.
    fn open_remote<'a>(
        &'a self,
        id: Option<&'a str>,
        dest: &'a Destination,
        timeout: Duration,
    ) -> Pin<Box<dyn Future<Output = Result<AgentStream, Error>> + Send + 'a>>;
}

/// Every agent connection of this gateway, by id.
#[derive(Default)]
pub struct Registry {
    by_id: Mutex<HashMap<String, Vec<Arc<AgentConn>>>>,
    serial: AtomicU64,
    /// The cluster's directory, when this node is part of one.
    directory: OnceLock<Arc<dyn Directory>>,
    /// Revoked ids (`id:ID`) and tokens (`token:SHA256HEX`).
    revoked: RwLock<HashSet<String>>,
}

/// What a revocation names.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Revoked {
    /// An agent id: its registrations are refused.
    Id(String),
    /// A token, by the SHA-256 of its bytes (hex): registrations with it are
    /// refused, whatever id they name.
    Token(String),
}

impl Revoked {
    /// The entry as stored: `id:ID` or `token:HEX`.
    pub fn key(&self) -> String {
        match self {
            Revoked::Id(id) => format!("id:{id}"),
            Revoked::Token(h) => format!("token:{h}"),
        }
    }

    /// Reads `id:ID` or `token:HEX` (64 lower-case hex digits).
    pub fn parse(s: &str) -> Option<Revoked> {
        if let Some(id) = s.strip_prefix("id:") {
            return super::proto::valid_id(id).then(|| Revoked::Id(id.to_string()));
        }
        let h = s.strip_prefix("token:")?;
        (h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
        .then(|| Revoked::Token(h.to_string()))
    }
}

/// The SHA-256 of a token, hex: how a token's revocation names it.
pub fn token_fingerprint(token: &str) -> String {
    use sha2::Digest as _;
    let d = sha2::Sha256::digest(token.as_bytes());
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// What this node holds of one id, for the directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holding {
    pub connections: usize,
    /// The union of its connections' allow patterns, as a header.
    pub allow: String,
    /// Seconds since the Unix epoch of its oldest connection here.
    pub since: u64,
}

/// What `GET /agents` shows of one id.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AgentInfo {
    pub id: String,
    pub connections: usize,
    pub open_streams: usize,
    pub bytes_to_agent: u64,
    pub bytes_from_agent: u64,
    pub allow: Vec<String>,
    pub remote_addresses: Vec<String>,
    /// Seconds since the Unix epoch at which its oldest connection came.
    pub connected_since: u64,
    pub links: Vec<LinkInfo>,
    /// In a cluster: every node holding the id (the fields above are this
    /// node's own).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nodes: Option<Vec<NodeHolding>>,
}

impl AgentInfo {
    /// An id this node holds no connection of.
    pub fn empty(id: &str) -> AgentInfo {
        AgentInfo {
            id: id.to_string(),
            connections: 0,
            open_streams: 0,
            bytes_to_agent: 0,
            bytes_from_agent: 0,
            allow: vec![],
            remote_addresses: vec![],
            connected_since: 0,
            links: vec![],
            nodes: None,
        }
    }
}

/// One node holding an id, in a cluster's `GET /agents`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NodeHolding {
    pub node: String,
    pub connections: usize,
    pub connected_since: u64,
    pub allow: Vec<String>,
    /// Whether it is the node answering.
    pub this_node: bool,
}

/// One WebSocket of an agent in `GET /agents`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LinkInfo {
    pub remote_address: String,
    pub connected_since: u64,
    pub open_streams: usize,
    pub bytes_to_agent: u64,
    pub bytes_from_agent: u64,
}

fn epoch_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Registry {
    /// A number for the next connection.
    pub fn next_serial(&self) -> u64 {
        self.serial.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Puts a directory behind this registry (once; `false` if one was).
    pub fn set_directory(&self, d: Arc<dyn Directory>) -> bool {
        self.directory.set(d).is_ok()
    }

    pub fn register(&self, conn: Arc<AgentConn>) {
        let id = conn.id.clone();
        {
            let mut m = self.by_id.lock().unwrap_or_else(|e| e.into_inner());
            m.entry(id.clone()).or_default().push(conn);
        }
        if let Some(d) = self.directory.get() {
            d.changed(&id);
        }
    }

    pub fn unregister(&self, conn: &AgentConn) {
        {
            let mut m = self.by_id.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(list) = m.get_mut(&conn.id) {
                list.retain(|c| c.serial != conn.serial);
                if list.is_empty() {
                    m.remove(&conn.id);
                }
            }
        }
        if let Some(d) = self.directory.get() {
            d.changed(&conn.id);
        }
    }

    /// Has the directory write again what this node holds of `id`: another
    /// node asked for it here, believing this node holds it, and it does
    /// not (a stale entry, corrected at its source).
    pub fn recheck(&self, id: &str) {
        if let Some(d) = self.directory.get() {
            d.changed(id);
        }
    }

    /// What this node holds of `id`, if anything.
    pub fn holding(&self, id: &str) -> Option<Holding> {
        let m = self.by_id.lock().unwrap_or_else(|e| e.into_inner());
        let conns = m.get(id).filter(|l| !l.is_empty())?;
        let mut allow: Vec<String> = conns
            .iter()
            .flat_map(|c| c.allow.0.iter().map(|p| p.to_string()))
            .collect();
        allow.sort();
        allow.dedup();
        Some(Holding {
            connections: conns.len(),
            allow: allow.join(", "),
            since: conns.iter().map(|c| epoch_secs(c.since)).min().unwrap_or(0),
        })
    }

    /// The ids with a connection here.
    pub fn ids(&self) -> Vec<String> {
        let m = self.by_id.lock().unwrap_or_else(|e| e.into_inner());
        m.keys().cloned().collect()
    }

    /// Drops every connection of `id` here (the agent may dial again);
    /// how many.
    pub fn disconnect(&self, id: &str) -> usize {
        let m = self.by_id.lock().unwrap_or_else(|e| e.into_inner());
        let conns = m.get(id).map_or(&[][..], Vec::as_slice);
        conns.iter().for_each(|c| c.kick.cancel());
        conns.len()
    }

    /// Refuses `what` from now on, and drops the connections it covers
    /// (how many).
    pub fn revoke(&self, what: &Revoked) -> usize {
        self.revoked
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(what.key());
        let m = self.by_id.lock().unwrap_or_else(|e| e.into_inner());
        let mut n = 0;
        for c in m.values().flatten() {
            let covered = match what {
                Revoked::Id(id) => &c.id == id,
                Revoked::Token(h) => c.credential.as_deref() == Some(h.as_str()),
            };
            if covered {
                c.kick.cancel();
                n += 1;
            }
        }
        n
    }

    /// Accepts `what` again; whether it was revoked.
    pub fn unrevoke(&self, what: &Revoked) -> bool {
        self.revoked
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&what.key())
    }

    /// Replaces the revoked set (a cluster's, read from Redis); drops the
    /// connections it covers.
    pub fn set_revoked(&self, all: Vec<Revoked>) {
        let keys: HashSet<String> = all.iter().map(Revoked::key).collect();
        *self.revoked.write().unwrap_or_else(|e| e.into_inner()) = keys;
        for r in &all {
            self.revoke(r);
        }
    }

    /// Everything revoked, sorted.
    pub fn revoked(&self) -> Vec<String> {
        let r = self.revoked.read().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<String> = r.iter().cloned().collect();
        v.sort();
        v
    }

    /// Whether a registration of `id` with a token of fingerprint
    /// `credential` is refused by a revocation.
    pub fn is_revoked(&self, id: &str, credential: Option<&str>) -> bool {
        let r = self.revoked.read().unwrap_or_else(|e| e.into_inner());
        if r.is_empty() {
            return false;
        }
        r.contains(&format!("id:{id}"))
            || credential.is_some_and(|h| r.contains(&format!("token:{h}")))
    }

    /// Agent connections now, in total.
    pub fn connections(&self) -> usize {
        let m = self.by_id.lock().unwrap_or_else(|e| e.into_inner());
        m.values().map(Vec::len).sum()
    }

    /// The live connections a stream to `dest` may take: those of agent
    /// `id`, or (without an id) of every agent whose announced allow list
    /// may cover `dest`; fewest open streams first.
    fn candidates(&self, id: Option<&str>, dest: &Destination) -> Vec<Arc<AgentConn>> {
        let m = self.by_id.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<Arc<AgentConn>> = match id {
            Some(id) => m.get(id).into_iter().flatten().cloned().collect(),
            None => m
                .values()
                .flatten()
                .filter(|c| c.allow.may_permit(dest))
                .cloned()
                .collect(),
        };
        drop(m);
        out.retain(|c| c.live());
        out.sort_by_key(|c| c.open_streams());
        out
    }

    /// What `GET /agents` shows, by id.
    pub fn snapshot(&self) -> Vec<AgentInfo> {
        let m = self.by_id.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<AgentInfo> = m
            .iter()
            .map(|(id, conns)| {
                let links: Vec<LinkInfo> = conns
                    .iter()
                    .map(|c| LinkInfo {
                        remote_address: c.remote.to_string(),
                        connected_since: epoch_secs(c.since),
                        open_streams: c.open_streams(),
                        bytes_to_agent: c.bytes_to.load(Ordering::Relaxed),
                        bytes_from_agent: c.bytes_from.load(Ordering::Relaxed),
                    })
                    .collect();
                let mut allow: Vec<String> = conns
                    .iter()
                    .flat_map(|c| c.allow.0.iter().map(|p| p.to_string()))
                    .collect();
                allow.sort();
                allow.dedup();
                let mut remotes: Vec<String> =
                    links.iter().map(|l| l.remote_address.clone()).collect();
                remotes.sort();
                remotes.dedup();
                AgentInfo {
                    id: id.clone(),
                    connections: conns.len(),
                    open_streams: links.iter().map(|l| l.open_streams).sum(),
                    bytes_to_agent: links.iter().map(|l| l.bytes_to_agent).sum(),
                    bytes_from_agent: links.iter().map(|l| l.bytes_from_agent).sum(),
                    allow,
                    remote_addresses: remotes,
                    connected_since: links.iter().map(|l| l.connected_since).min().unwrap_or(0),
                    links,
                    nodes: None,
                }
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// Opens a stream to `dest` through agent `id` (or, without one, any
    /// agent whose allow list covers it), and waits for the agent's reply:
    /// through a connection of this node if one can take it, else through
    /// another node (the directory's), if this node is part of a cluster.
    pub async fn open(
        &self,
        id: Option<&str>,
        dest: &Destination,
        timeout: Duration,
    ) -> Result<AgentStream, Error> {
        let (local, tried) = self.open_here(id, dest, timeout).await;
        let Some(directory) = self.directory.get() else {
            return local;
        };
        match local {
            Err(e) if e.kind == Kind::AgentUnavailable => {
                match directory.open_remote(id, dest, timeout).await {
                    // Nothing elsewhere either: the reason of this node's
                    // connections that failed, if any, says more.
                    Err(r) if r.kind == Kind::AgentUnavailable && tried => Err(e),
                    r => r,
                }
            }
            r => r,
        }
    }

    /// [`Registry::open`] through this node's connections only (what a
    /// node serves another node's request with: it never goes further).
    /// A connection that dies before its agent answered is left for the
    /// next one; the agent's refusal is final.
    pub async fn open_local(
        &self,
        id: Option<&str>,
        dest: &Destination,
        timeout: Duration,
    ) -> Result<AgentStream, Error> {
        self.open_here(id, dest, timeout).await.0
    }

    /// [`Registry::open_local`], and whether there was a connection to try.
    async fn open_here(
        &self,
        id: Option<&str>,
        dest: &Destination,
        timeout: Duration,
    ) -> (Result<AgentStream, Error>, bool) {
        let candidates = self.candidates(id, dest);
        let who = || match id {
            Some(id) => format!("agent {id}"),
            None => format!("agent whose allow list covers {dest}"),
        };
        if candidates.is_empty() {
            let e = Error::upstream(Kind::AgentUnavailable, format!("no {} is connected", who()));
            return (Err(e), false);
        }
        let text = dest.to_string();
        let mut last = None;
        for conn in candidates {
            match open_on(&conn, &text, timeout).await {
                Ok(s) => return (Ok(s), true),
                Err(OpenFailure::Retry(e)) => last = Some(e),
                Err(OpenFailure::Final(e)) => return (Err(e), true),
            }
        }
        let e = last.unwrap_or_else(|| {
            Error::upstream(
                Kind::AgentUnavailable,
                format!("no {} could take the stream", who()),
            )
        });
        (Err(e), true)
    }
}

/// Why an open failed: on this connection only (another may take the
/// stream: the request never reached an agent), or for good.
#[derive(Debug)]
pub enum OpenFailure {
    Retry(Error),
    Final(Error),
}

/// Opens one stream on `conn` and reads the reply.
async fn open_on(
    conn: &Arc<AgentConn>,
    dest: &str,
    timeout: Duration,
) -> Result<AgentStream, OpenFailure> {
    let who = format!("agent {}", conn.id);
    let (stream, reply, rest) =
        open_stream(&conn.session, dest, timeout, &who, || conn.live()).await?;
    if reply.status != Status::Ok {
        return Err(OpenFailure::Final(reply_error(&who, &reply)));
    }
    let mut counted = AgentStream::new(Via::Local(conn.clone()), rest);
    counted.stream = Some(stream);
    Ok(counted)
}

/// The error a refusal stands for.
pub fn reply_error(who: &str, reply: &Reply) -> Error {
    let kind = match reply.status {
        Status::Ok | Status::Unreachable => Kind::AgentUnreachable,
        Status::NotAllowed => Kind::AgentRefused,
        Status::Timeout => Kind::AgentTimeout,
        Status::NoAgent => Kind::AgentUnavailable,
    };
    Error::upstream(kind, format!("{who}: {}", reply.message))
}

/// Opens a stream on `session`, sends the open request for `dest`, and
/// reads the reply: the stream, the reply, and bytes that came after it.
/// A stream refused by the peer (GOAWAY, limits) or lost with its session
/// (`live` says whether it still is) before the reply is
/// [`OpenFailure::Retry`]: the request reached no agent.
pub async fn open_stream(
    session: &wsmux::Session,
    dest: &str,
    timeout: Duration,
    who: &str,
    live: impl Fn() -> bool,
) -> Result<(wsmux::Stream, Reply, BytesMut), OpenFailure> {
    let gone = |e: &dyn std::fmt::Display| {
        OpenFailure::Retry(Error::upstream(
            Kind::AgentUnavailable,
            format!("{who}: connection lost before it answered: {e}"),
        ))
    };
    let mut stream = session.open().await.map_err(|e| gone(&e))?;
    let mut req = BytesMut::new();
    proto::encode_open(dest, &mut req);
    stream.write_all(&req).await.map_err(|e| gone(&e))?;
    let mut buf = BytesMut::with_capacity(256);
    let read_reply = async {
        loop {
            if let Some(r) = Reply::decode(&mut buf).map_err(|e| {
                OpenFailure::Final(Error::upstream(
                    Kind::AgentUnreachable,
                    format!("{who}: bad reply: {e}"),
                ))
            })? {
                return Ok(r);
            }
            match stream.read_buf(&mut buf).await {
                Ok(0) => {
                    return Err(OpenFailure::Final(Error::upstream(
                        Kind::AgentUnreachable,
                        format!("{who} ended the stream without an answer"),
                    )))
                }
                Ok(_) => {}
                Err(e) => {
                    let refused = e
                        .get_ref()
                        .and_then(|i| i.downcast_ref::<wsmux::StreamReset>())
                        .is_some_and(|r| r.code == wsmux::reset_code::REFUSED);
                    // A refused stream (GOAWAY, limits) or a dead session:
                    // another connection may take it.
                    if refused || !live() {
                        return Err(gone(&e));
                    }
                    return Err(OpenFailure::Final(Error::upstream(
                        Kind::AgentUnreachable,
                        format!("{who}: stream failed: {e}"),
                    )));
                }
            }
        }
    };
    let reply = match tokio::time::timeout(timeout, read_reply).await {
        Ok(r) => r?,
        Err(_) => {
            return Err(OpenFailure::Final(Error::upstream(
                Kind::AgentTimeout,
                format!("{who} did not answer within {timeout:?}"),
            )))
        }
    };
    Ok((stream, reply, buf))
}

/// Open streams and bytes of a path to agents that is not one of this
/// node's connections: a node link (`crate::cluster`).
#[derive(Debug, Default)]
pub struct StreamCounters {
    open: AtomicUsize,
    pub bytes_to: AtomicU64,
    pub bytes_from: AtomicU64,
}

impl StreamCounters {
    /// Streams open on it now.
    pub fn open_streams(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }
}

/// What a stream goes through: one of this node's agent connections, or a
/// link to the node holding the agent.
enum Via {
    Local(Arc<AgentConn>),
    Remote {
        agent: String,
        node: Arc<str>,
        counters: Arc<StreamCounters>,
    },
}

impl Via {
    fn opened(&self) {
        match self {
            Via::Local(c) => c.open.fetch_add(1, Ordering::Relaxed),
            Via::Remote { counters, .. } => counters.open.fetch_add(1, Ordering::Relaxed),
        };
    }

    fn closed(&self) {
        match self {
            Via::Local(c) => c.open.fetch_sub(1, Ordering::Relaxed),
            Via::Remote { counters, .. } => counters.open.fetch_sub(1, Ordering::Relaxed),
        };
    }

    fn sent(&self, n: usize) {
        match self {
            Via::Local(c) => c.sent(n),
            Via::Remote { counters, .. } => {
                counters.bytes_to.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
    }

    fn received(&self, n: usize) {
        match self {
            Via::Local(c) => c.received(n),
            Via::Remote { counters, .. } => {
                counters.bytes_from.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
    }
}

/// A stream through an agent, past its reply: bytes that came with the reply
/// are read first; it counts as open on its connection, and counts the bytes
/// each way, until dropped.
pub struct AgentStream {
    stream: Option<wsmux::Stream>,
    prefix: BytesMut,
    via: Via,
}

impl AgentStream {
    fn new(via: Via, prefix: BytesMut) -> AgentStream {
        via.opened();
        AgentStream {
            stream: None,
            prefix,
            via,
        }
    }

    /// A stream through agent `agent` held by node `node`, opened on a
    /// node link whose counters are `counters`; `prefix` came with the
    /// reply.
    pub fn remote(
        stream: wsmux::Stream,
        prefix: BytesMut,
        agent: &str,
        node: Arc<str>,
        counters: Arc<StreamCounters>,
    ) -> AgentStream {
        let mut s = AgentStream::new(
            Via::Remote {
                agent: agent.to_string(),
                node,
                counters,
            },
            prefix,
        );
        s.stream = Some(stream);
        s
    }

    /// The id of the agent this stream goes through.
    pub fn agent_id(&self) -> &str {
        match &self.via {
            Via::Local(c) => &c.id,
            Via::Remote { agent, .. } => agent,
        }
    }

    /// The node holding the agent, when it is not this one.
    pub fn node(&self) -> Option<&str> {
        match &self.via {
            Via::Local(_) => None,
            Via::Remote { node, .. } => Some(node),
        }
    }

    /// The wsmux stream id.
    pub fn id(&self) -> u32 {
        self.stream.as_ref().map_or(0, wsmux::Stream::id)
    }

    fn inner(&mut self) -> io::Result<&mut wsmux::Stream> {
        self.stream
            .as_mut()
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))
    }
}

impl std::fmt::Debug for AgentStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentStream")
            .field("agent", &self.agent_id())
            .field("node", &self.node())
            .field("stream", &self.id())
            .finish()
    }
}

impl Drop for AgentStream {
    fn drop(&mut self) {
        self.via.closed();
    }
}

impl super::splice::MuxIo for AgentStream {
    fn poll_read_bytes(
        &mut self,
        cx: &mut Context<'_>,
        max: usize,
        out: &mut std::collections::VecDeque<bytes::Bytes>,
    ) -> Poll<io::Result<usize>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(max);
            out.push_back(self.prefix.split_to(n).freeze());
            self.via.received(n);
            return Poll::Ready(Ok(n));
        }
        let r = self.inner()?.poll_read_bytes(cx, max, out);
        if let Poll::Ready(Ok(n)) = &r {
            self.via.received(*n);
        }
        r
    }

    fn poll_write_bytes(
        &mut self,
        cx: &mut Context<'_>,
        data: &mut bytes::Bytes,
    ) -> Poll<io::Result<usize>> {
        let r = self.inner()?.poll_write_bytes(cx, data);
        if let Poll::Ready(Ok(n)) = &r {
            self.via.sent(*n);
        }
        r
    }
}

impl AsyncRead for AgentStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            this.via.received(n);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let r = Pin::new(this.inner()?).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            this.via.received(n);
        }
        r
    }
}

impl AsyncWrite for AgentStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let r = Pin::new(this.inner()?).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = &r {
            this.via.sent(*n);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.inner()?).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.inner()?).poll_shutdown(cx)
    }
}
