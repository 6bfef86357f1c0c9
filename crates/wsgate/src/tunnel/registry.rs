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
//! The registry is this node's; a cluster adds a directory of other nodes'
//! agents behind [`Registry::open`] (the one place that decides where a
//! stream goes).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

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
}

impl AgentConn {
    pub fn new(
        id: String,
        remote: SocketAddr,
        allow: AllowList,
        session: wsmux::Session,
        serial: u64,
        metrics: &Metrics,
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

/// Every agent connection of this gateway, by id.
#[derive(Default)]
pub struct Registry {
    by_id: Mutex<HashMap<String, Vec<Arc<AgentConn>>>>,
    serial: AtomicU64,
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

    pub fn register(&self, conn: Arc<AgentConn>) {
        let mut m = self.by_id.lock().unwrap_or_else(|e| e.into_inner());
        m.entry(conn.id.clone()).or_default().push(conn);
    }

    pub fn unregister(&self, conn: &AgentConn) {
        let mut m = self.by_id.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(list) = m.get_mut(&conn.id) {
            list.retain(|c| c.serial != conn.serial);
            if list.is_empty() {
                m.remove(&conn.id);
            }
        }
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
                }
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// Opens a stream to `dest` through agent `id` (or, without one, any
    /// agent whose allow list covers it), and waits for the agent's reply.
    /// A connection that dies before its agent answered is left for the
    /// next one; the agent's refusal is final.
    pub async fn open(
        &self,
        id: Option<&str>,
        dest: &Destination,
        timeout: Duration,
    ) -> Result<AgentStream, Error> {
        let candidates = self.candidates(id, dest);
        let who = || match id {
            Some(id) => format!("agent {id}"),
            None => format!("agent whose allow list covers {dest}"),
        };
        if candidates.is_empty() {
            return Err(Error::upstream(
                Kind::AgentUnavailable,
                format!("no {} is connected", who()),
            ));
        }
        let text = dest.to_string();
        let mut last = None;
        for conn in candidates {
            match open_on(&conn, &text, timeout).await {
                Ok(s) => return Ok(s),
                Err(Failed::Retry(e)) => last = Some(e),
                Err(Failed::Final(e)) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| {
            Error::upstream(
                Kind::AgentUnavailable,
                format!("no {} could take the stream", who()),
            )
        }))
    }
}

/// Why an open failed: on this connection only, or for good.
enum Failed {
    Retry(Error),
    Final(Error),
}

/// Opens one stream on `conn` and reads the reply.
async fn open_on(
    conn: &Arc<AgentConn>,
    dest: &str,
    timeout: Duration,
) -> Result<AgentStream, Failed> {
    let gone = |e: &dyn std::fmt::Display| {
        Failed::Retry(Error::upstream(
            Kind::AgentUnavailable,
            format!("agent {}: connection lost before it answered: {e}", conn.id),
        ))
    };
    let mut stream = conn.session.open().await.map_err(|e| gone(&e))?;
    let mut counted = AgentStream::new(conn.clone(), BytesMut::new());
    let mut req = BytesMut::new();
    proto::encode_open(dest, &mut req);
    stream.write_all(&req).await.map_err(|e| gone(&e))?;
    let mut buf = BytesMut::with_capacity(256);
    let read_reply = async {
        loop {
            if let Some(r) = Reply::decode(&mut buf).map_err(|e| {
                Failed::Final(Error::upstream(
                    Kind::AgentUnreachable,
                    format!("agent {}: bad reply: {e}", conn.id),
                ))
            })? {
                return Ok(r);
            }
            match stream.read_buf(&mut buf).await {
                Ok(0) => {
                    return Err(Failed::Final(Error::upstream(
                        Kind::AgentUnreachable,
                        format!("agent {} ended the stream without an answer", conn.id),
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
                    if refused || !conn.live() {
                        return Err(gone(&e));
                    }
                    return Err(Failed::Final(Error::upstream(
                        Kind::AgentUnreachable,
                        format!("agent {}: stream failed: {e}", conn.id),
                    )));
                }
            }
        }
    };
    let reply = match tokio::time::timeout(timeout, read_reply).await {
        Ok(r) => r?,
        Err(_) => {
            return Err(Failed::Final(Error::upstream(
                Kind::AgentTimeout,
                format!("agent {} did not answer within {timeout:?}", conn.id),
            )))
        }
    };
    let refused = |kind| {
        Failed::Final(Error::upstream(
            kind,
            format!("agent {}: {}", conn.id, reply.message),
        ))
    };
    match reply.status {
        Status::Ok => {
            counted.stream = Some(stream);
            counted.prefix = buf;
            Ok(counted)
        }
        Status::NotAllowed => Err(refused(Kind::AgentRefused)),
        Status::Unreachable => Err(refused(Kind::AgentUnreachable)),
        Status::Timeout => Err(refused(Kind::AgentTimeout)),
        Status::NoAgent => Err(refused(Kind::AgentUnavailable)),
    }
}

/// A stream through an agent, past its reply: bytes that came with the reply
/// are read first; it counts as open on its connection, and counts the bytes
/// each way, until dropped.
pub struct AgentStream {
    stream: Option<wsmux::Stream>,
    prefix: BytesMut,
    conn: Arc<AgentConn>,
}

impl AgentStream {
    fn new(conn: Arc<AgentConn>, prefix: BytesMut) -> AgentStream {
        conn.open.fetch_add(1, Ordering::Relaxed);
        AgentStream {
            stream: None,
            prefix,
            conn,
        }
    }

    /// The agent this stream goes through.
    pub fn agent(&self) -> &AgentConn {
        &self.conn
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
            .field("agent", &self.conn.id)
            .field("stream", &self.id())
            .finish()
    }
}

impl Drop for AgentStream {
    fn drop(&mut self) {
        self.conn.open.fetch_sub(1, Ordering::Relaxed);
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
            self.conn.received(n);
            return Poll::Ready(Ok(n));
        }
        let r = self.inner()?.poll_read_bytes(cx, max, out);
        if let Poll::Ready(Ok(n)) = &r {
            self.conn.received(*n);
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
            self.conn.sent(*n);
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
            this.conn.received(n);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let r = Pin::new(this.inner()?).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            this.conn.received(n);
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
            this.conn.sent(*n);
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
