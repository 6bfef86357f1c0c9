//! Node links (docs/cluster.md §3): a WebSocket from the node that has a
//! request to the node that holds the agent, subprotocol `wsgate-node.v1`,
//! carrying one wsmux session whose streams are opened by the dialing node
//! only. Each stream starts with the tunnel's open request
//! (docs/tunnel.md §2) naming `agent://ID/SCHEME://HOST:PORT`, or a bare
//! `SCHEME://HOST:PORT` for any agent whose allow list covers it; the
//! receiving node serves it from its own agent connections only (never
//! through a third node, so requests cannot loop) and answers with the
//! tunnel's reply: `NO_AGENT` when it holds no such agent.
//!
//! [`Links`] keeps one link per peer node, dialed on first use and kept
//! (its wsmux keepalive detects a dead peer); [`serve`] runs the receiving
//! side.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

use super::wire::{self, Proof, NODE_HEADER, NODE_PROTOCOL};
use crate::agent::dial::{Dialer, TlsFiles, WsUrl};
use crate::error::{Error, Kind};
use crate::io::ClientIo;
use crate::metrics::Metrics;
use crate::tunnel::mux::{refuse, reply_ok};
use crate::tunnel::proto::{self, Reply, Status, Target};
use crate::tunnel::registry::{Registry, StreamCounters};
use crate::tunnel::splice::splice;

/// Time a dialing node has to send a stream's open request.
const OPEN_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A link to another node.
pub struct Link {
    pub node: Arc<str>,
    pub url: String,
    pub session: wsmux::Session,
    pub counters: Arc<StreamCounters>,
}

impl Link {
    /// Whether new streams may go on it: its session is up and neither
    /// side said GOAWAY.
    pub fn live(&self) -> bool {
        self.session.accepts_new_streams() && self.session.error().is_none()
    }
}

/// This node's links to the others, by node id.
pub struct Links {
    me: String,
    secret: Arc<[u8]>,
    tls: TlsFiles,
    keepalive: Duration,
    dial_timeout: Duration,
    metrics: Metrics,
    map: Mutex<HashMap<Arc<str>, Arc<Link>>>,
    /// One dial at a time per node: concurrent opens wait for it.
    dialing: Mutex<HashMap<Arc<str>, Arc<tokio::sync::Mutex<()>>>>,
}

impl Links {
    pub fn new(
        me: &str,
        secret: Arc<[u8]>,
        tls: TlsFiles,
        keepalive: Duration,
        dial_timeout: Duration,
        metrics: Metrics,
    ) -> Links {
        Links {
            me: me.to_string(),
            secret,
            tls,
            keepalive,
            dial_timeout,
            metrics,
            map: Mutex::default(),
            dialing: Mutex::default(),
        }
    }

    /// The live link to `node`, if there is one (nothing is dialed).
    pub fn current(&self, node: &str) -> Option<Arc<Link>> {
        let m = self.map.lock().unwrap_or_else(|e| e.into_inner());
        m.get(node).filter(|l| l.live()).cloned()
    }

    /// The link to `node` at `url`: the one kept, or a new one.
    pub async fn get(&self, node: &Arc<str>, url: &str) -> Result<Arc<Link>, Error> {
        if let Some(l) = self.current(node).filter(|l| l.url == url) {
            return Ok(l);
        }
        let gate = {
            let mut d = self.dialing.lock().unwrap_or_else(|e| e.into_inner());
            d.entry(node.clone()).or_default().clone()
        };
        let _turn = gate.lock().await;
        // Another open may have dialed it while this one waited.
        if let Some(l) = self.current(node).filter(|l| l.url == url) {
            return Ok(l);
        }
        let link = Arc::new(self.dial(node, url).await.map_err(|e| {
            self.metrics.cluster_stream("out", "link_failed");
            Error::upstream(
                Kind::AgentUnavailable,
                format!("node {node} ({url}): cannot open a link: {e}"),
            )
        })?);
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(node.clone(), link.clone());
        self.metrics.cluster_links("out", 1);
        info!(node = %node, %url, "node link up");
        let (watched, metrics) = (link.clone(), self.metrics.clone());
        tokio::spawn(async move {
            let why = watched.session.closed().await;
            metrics.cluster_links("out", -1);
            info!(node = %watched.node, "node link ended: {why}");
        });
        Ok(link)
    }

    async fn dial(&self, node: &str, url: &str) -> anyhow::Result<Link> {
        let ws: WsUrl = url.parse().map_err(|e: String| anyhow::anyhow!(e))?;
        let proof = Proof::new(&self.secret, &self.me, node, now_secs());
        let headers = vec![
            ("Wsgate-Node-Id".to_string(), self.me.clone()),
            ("Authorization".to_string(), proof.header()),
        ];
        let dialer = Dialer::new(ws, &self.tls, NODE_PROTOCOL, headers, self.dial_timeout)?;
        let (transport, _gone) = dialer.dial().await?;
        let session = wsmux::Session::client(transport, crate::tunnel::mux_config(self.keepalive));
        Ok(Link {
            node: Arc::from(node),
            url: url.to_string(),
            session,
            counters: Arc::default(),
        })
    }

    /// GOAWAY on every link: this node opens no more streams through them
    /// (those open go on).
    pub fn goaway_all(&self) {
        let m = self.map.lock().unwrap_or_else(|e| e.into_inner());
        m.values().for_each(|l| l.session.goaway());
    }
}

/// Who dials, from a link's handshake: its `Wsgate-Node-Id` and proof,
/// checked for shape (400) before authentication.
#[derive(Debug, Clone)]
pub struct Hello {
    pub from: String,
}

/// Checks a node link's handshake for shape: the subprotocol offered and a
/// valid `Wsgate-Node-Id` (400 otherwise).
pub fn hello(head: &http::request::Parts) -> Result<Hello, Error> {
    let bad = |m: String| Error::client(Kind::BadHandshake, m);
    let offered = head
        .headers
        .get_all(http::header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .any(|v| crate::http::handshake::list_has_token(v.as_bytes(), NODE_PROTOCOL));
    if !offered {
        return Err(bad(format!(
            "a node link opens with Sec-WebSocket-Protocol: {NODE_PROTOCOL}"
        )));
    }
    let from = match head.headers.get(NODE_HEADER).map(|v| v.to_str()) {
        Some(Ok(v)) => wire::node_id(v.trim()).map_err(|e| bad(e.to_string()))?,
        _ => return Err(bad("missing Wsgate-Node-Id header".into())),
    };
    Ok(Hello {
        from: from.to_string(),
    })
}

/// The authentication of a node link: a proof of the shared secret for
/// `from` dialing `me`, now (401 without one, 403 for a wrong one).
pub fn authenticate(
    head: &http::request::Parts,
    from: &str,
    me: &str,
    secret: &[u8],
) -> Result<(), Error> {
    let value = head
        .headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            Error::client(
                Kind::Unauthenticated,
                "a node link proves the cluster's secret: Authorization: Wsgate-Node ts=..., mac=...",
            )
        })?;
    let proof =
        Proof::parse(value).map_err(|e| Error::client(Kind::Unauthenticated, e.to_string()))?;
    proof
        .verify(secret, from, me, now_secs())
        .map_err(|e| Error::client(Kind::Forbidden, format!("node {from}: {e}")))
}

/// What serving a link needs of the node.
#[derive(Clone)]
pub struct Serving {
    pub registry: Arc<Registry>,
    pub open_timeout: Duration,
    pub keepalive: Duration,
    pub metrics: Metrics,
}

/// Serves a node link until it ends (or, on `shutdown`, until its open
/// streams end after a GOAWAY): each stream an open request answered from
/// this node's own agent connections.
pub async fn serve(
    client: ClientIo,
    leftover: Bytes,
    from: String,
    s: Serving,
    shutdown: CancellationToken,
) {
    let transport = wsmux::WsTransport::from_raw(
        client.into_io(),
        wsframe::Role::Server,
        wsmux::WsTransport::<Box<dyn crate::io::Io>>::default_config(),
        &leftover,
    );
    let session = wsmux::Session::server(transport, crate::tunnel::mux_config(s.keepalive));
    s.metrics.cluster_links("in", 1);
    info!(node = %from, "node link accepted");
    let streams = TaskTracker::new();
    let why = loop {
        tokio::select! {
            st = session.accept() => match st {
                Ok(st) => {
                    let span = tracing::info_span!("node", from = %from, stream = st.id());
                    streams.spawn(handle(st, s.clone()).instrument(span));
                }
                Err(e) => break e.to_string(),
            },
            () = shutdown.cancelled() => {
                session.goaway();
                break "this node is shutting down".into();
            }
        }
    };
    streams.close();
    streams.wait().await;
    s.metrics.cluster_links("in", -1);
    info!(node = %from, "node link ended: {why}");
}

/// One stream of a link: read the open request, open it through a local
/// agent, answer, relay.
async fn handle(mut st: wsmux::Stream, s: Serving) {
    let mut buf = BytesMut::with_capacity(256);
    let read = async {
        loop {
            if let Some(text) = proto::decode_open(&mut buf)? {
                return Ok(text);
            }
            match st.read_buf(&mut buf).await {
                Ok(n) if n > 0 => {}
                _ => return Err(proto::ProtoError::BadMagic(0)),
            }
        }
    };
    let text = match tokio::time::timeout(OPEN_REQUEST_TIMEOUT, read).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            debug!("bad open request: {e}");
            s.metrics.cluster_stream("in", "bad_open");
            return st.reset(proto::RESET_BAD_OPEN);
        }
        Err(_) => {
            s.metrics.cluster_stream("in", "bad_open");
            return st.reset(proto::RESET_OPEN_TIMEOUT);
        }
    };
    let (id, dest) = match text.parse::<Target>() {
        Ok(Target::Agent(a)) => (Some(a.agent), a.dest),
        Ok(Target::Direct(d)) => (None, d),
        Err(e) => {
            debug!("bad destination: {e}");
            s.metrics.cluster_stream("in", "bad_open");
            return st.reset(proto::RESET_BAD_OPEN);
        }
    };
    match s
        .registry
        .open_local(id.as_deref(), &dest, s.open_timeout)
        .await
    {
        Ok(mut agent) => {
            s.metrics.cluster_stream("in", "ok");
            if reply_ok(&mut st, &buf).await.is_ok() {
                let r = splice(&mut st, &mut agent).await;
                debug!("node stream to {text} ended: {r:?}");
            }
        }
        Err(e) => {
            let status = match e.kind {
                Kind::AgentRefused => Status::NotAllowed,
                Kind::AgentTimeout => Status::Timeout,
                Kind::AgentUnavailable => Status::NoAgent,
                _ => Status::Unreachable,
            };
            s.metrics.cluster_stream(
                "in",
                if status == Status::NoAgent {
                    "no_agent"
                } else {
                    "refused"
                },
            );
            if status == Status::NoAgent {
                debug!("{e}");
                // The asking node believed this one holds it: the entry in
                // Redis is corrected here, where the truth is.
                if let Some(id) = &id {
                    s.registry.recheck(id);
                }
            } else {
                warn!("{e}");
            }
            refuse(st, Reply::refuse(status, e.to_string())).await;
        }
    }
}
