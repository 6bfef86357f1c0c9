//! Configuration: plain data, parsed once and validated up front.
//!
//! [`Config`] holds addresses, paths, limits and rules, and nothing live: no
//! sockets, pools, caches or TLS sessions. The runtime
//! ([`crate::gateway::Gateway`]) is built from it, so a config can be checked
//! (`wsgate check`) without starting anything, and a new one can replace an
//! old one while the runtime keeps what is keyed by address (pools and their
//! health). This module imports no runtime module; it reads the files it
//! names only through [`crate::tls`], to check them.
//!
//! * [`file`]: the TOML shape and its validation (`FILE:LINE:COLUMN: KEY: MESSAGE`);
//! * [`values`]: durations, sizes, rates, peer and backend addresses.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use wsgate_framing::FramingSpec;

pub mod auth;
mod file;
pub mod values;

pub use auth::{AuthKind, AuthMethod, ClientAuth, RouteAuth, TokenSource};
pub use file::{load, parse};
pub use values::{
    parse_duration, parse_size, BackendAddr, Balance, Forwarding, IpNet, PeerAddr, RateSpec,
    RateSpecError, ScopeLimits, ValueError, ValueKind,
};
pub use wsgate_tunnel::proto::AgentDestination;

/// The whole, validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listeners: Vec<ListenerConfig>,
    pub limits: Limits,
    pub routes: Vec<Route>,
    /// Path answered with `200 ok` for health checks.
    pub health_path: String,
    /// `X-Forwarded-*` / `Forwarded` policy of proxy routes.
    pub forwarding: Forwarding,
    /// Where `/metrics` is served, if anywhere.
    pub admin: Option<String>,
    /// Worker threads, each with its own event loop, sharing the listening
    /// sockets; `None`: one per CPU.
    pub workers: Option<usize>,
    /// TLS towards `wss://` and `https://` backends (`[backend_tls]`), its
    /// files checked up front; `None`: the built-in Mozilla roots, no client
    /// certificate.
    pub backend_tls: Option<BackendTlsFiles>,
    /// The reverse tunnel (`[tunnel]`): agents, `/request`, the forward
    /// proxy, `--forward` listeners, `/mux`.
    pub tunnel: Tunnel,
    /// The named authentication methods (`[auth.NAME]`), their files
    /// checked; routes and the tunnel name them.
    pub auth: Vec<AuthMethod>,
    /// `[cluster]`: this node's place among gateway nodes that share their
    /// agents through Redis; `None`: a single node, no Redis.
    pub cluster: Option<Cluster>,
}

/// `[cluster]` (docs/cluster.md): where the directory lives, who this node
/// is, where other nodes reach it, and the secret node links prove.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    /// `redis://HOST:PORT/DB` or `unix:///PATH`.
    pub redis: String,
    /// This node's id: 1–64 of `A-Z a-z 0-9 . _ -`, unique in the cluster.
    pub node_id: String,
    /// `ws://HOST:PORT` or `wss://HOST:PORT`: where other nodes dial this
    /// one (`path` is appended).
    pub advertise: String,
    pub secret: ClusterSecret,
    /// How long this node's entries live in Redis without a renewal (they
    /// are renewed every third of it).
    pub lease: Duration,
    /// Where node links arrive (WebSocket, subprotocol `wsgate-node.v1`).
    pub path: String,
}

/// The shared secret of node links: written in the file, or in a file of
/// its own (its bytes, a final newline cut).
#[derive(Clone, PartialEq, Eq)]
pub enum ClusterSecret {
    Inline(String),
    File(PathBuf),
}

impl fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClusterSecret::Inline(_) => f.write_str("Inline(..)"),
            ClusterSecret::File(p) => f.debug_tuple("File").field(p).finish(),
        }
    }
}

/// The least bytes a cluster secret may have.
pub const MIN_CLUSTER_SECRET: usize = 16;

impl ClusterSecret {
    /// The secret's bytes (a file is read now); `Err` names the problem.
    pub fn load(&self) -> Result<Vec<u8>, String> {
        let bytes = match self {
            ClusterSecret::Inline(s) => s.as_bytes().to_vec(),
            ClusterSecret::File(p) => {
                let mut b =
                    std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()))?;
                if b.last() == Some(&b'\n') {
                    b.pop();
                    if b.last() == Some(&b'\r') {
                        b.pop();
                    }
                }
                b
            }
        };
        if bytes.len() < MIN_CLUSTER_SECRET {
            return Err(format!(
                "the secret has {} bytes: at least {MIN_CLUSTER_SECRET} are needed",
                bytes.len()
            ));
        }
        Ok(bytes)
    }
}

/// Checks a node's `advertise` URL: `ws://HOST:PORT` or `wss://HOST:PORT`,
/// with a port and no path.
pub fn check_advertise(url: &str) -> Result<(), String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("`{url}` is not a URL: {e}"))?;
    if !matches!(uri.scheme_str(), Some("ws" | "wss")) {
        return Err(format!("`{url}` is not a ws:// or wss:// URL"));
    }
    let path = uri.path_and_query().map_or("", |p| p.as_str());
    let Some(authority) = uri.authority() else {
        return Err(format!("`{url}` has no host"));
    };
    if !matches!(path, "" | "/") || authority.as_str().contains('@') {
        return Err(format!(
            "`{url}`: give HOST:PORT only (the cluster path is appended)"
        ));
    }
    match authority.port_u16() {
        Some(p) if p > 0 && !authority.host().is_empty() => Ok(()),
        _ => Err(format!(
            "`{url}` needs HOST:PORT with a port other nodes can dial"
        )),
    }
}

/// Checks a `[cluster] redis` URL: `redis://…` or a Unix socket
/// (`unix:///PATH`, `redis+unix:///PATH`).
pub fn check_redis_url(url: &str) -> Result<(), String> {
    if url.starts_with("rediss://") {
        return Err(format!(
            "`{url}`: TLS to Redis (rediss://) is not built in; use redis:// on a trusted \
             network or a Unix socket"
        ));
    }
    let ok = ["redis://", "unix://", "redis+unix://"]
        .iter()
        .any(|p| url.strip_prefix(p).is_some_and(|r| !r.is_empty()));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{url}` is not a redis:// URL (redis://HOST:PORT/DB, unix:///PATH)"
        ))
    }
}

/// `[tunnel]`: agents behind NAT and what is relayed through them.
#[derive(Debug, Clone)]
pub struct Tunnel {
    /// The agent token file (`ID TOKEN` lines, checked up front). Set, it
    /// enables agent registration, `/request` and the forward proxy.
    pub agent_tokens: Option<PathBuf>,
    /// Where agents register (WebSocket).
    pub agent_path: String,
    /// The wsp-compatible relay (`X-PROXY-DESTINATION`).
    pub request_path: String,
    /// Whether absolute-form requests and CONNECT are served as a forward
    /// proxy through the agents.
    pub forward_proxy: bool,
    /// `/mux`: the path, and what its streams may name (`--mux-allow`;
    /// empty: `/mux` is off).
    pub mux_path: String,
    pub mux_allow: Vec<String>,
    /// Listeners whose connections (or UDP flows) each become a stream to a
    /// destination through an agent (`--forward`).
    pub forwards: Vec<Forward>,
    /// wsmux keepalive towards agents and `/mux` clients: a PING this often,
    /// a link silent for twice this long is dead.
    pub keepalive: Duration,
    /// Time an agent has to answer a stream's open request (504 past it).
    pub open_timeout: Duration,
    /// What `/request`, the forward proxy and `/mux` ask of a request, and
    /// the rules (`allow`) every stream they open is checked against.
    pub auth: RouteAuth,
    /// Methods an agent may register with besides (or instead of) the token
    /// file; `agent_ids` are the ids such an identity may register
    /// (templates, `*` globs).
    pub agent_auth: Vec<String>,
    pub agent_ids: Vec<String>,
    /// permessage-deflate on `/mux` WebSockets (`[tunnel.deflate]`).
    pub deflate: Option<wsframe::deflate::Config>,
}

impl Default for Tunnel {
    fn default() -> Self {
        Tunnel {
            agent_tokens: None,
            agent_path: "/agent".into(),
            request_path: "/request".into(),
            forward_proxy: true,
            mux_path: "/mux".into(),
            mux_allow: vec![],
            forwards: vec![],
            keepalive: Duration::from_secs(15),
            open_timeout: Duration::from_secs(10),
            auth: RouteAuth::default(),
            agent_auth: vec![],
            agent_ids: vec![],
            deflate: None,
        }
    }
}

impl Tunnel {
    /// Whether agents may register (and `/request` and the forward proxy run).
    pub fn agents(&self) -> bool {
        self.agent_tokens.is_some() || !self.agent_auth.is_empty()
    }

    /// Whether `/mux` is served.
    pub fn mux(&self) -> bool {
        !self.mux_allow.is_empty()
    }
}

/// `--forward LISTEN=agent://ID/PEER`: a TCP (or `udp://`) listener on the
/// gateway; each connection (or UDP flow, by source) is one stream to PEER
/// through agent ID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    /// `HOST:PORT`.
    pub listen: String,
    pub udp: bool,
    pub to: AgentDestination,
}

impl std::str::FromStr for Forward {
    type Err = ValueError;

    /// `[udp://|tcp://]HOST:PORT=agent://ID/SCHEME://HOST:PORT`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (listen, to) = s.split_once('=').ok_or_else(|| {
            ValueError::new(
                ValueKind::Forward,
                format!(
                    "invalid forward `{s}`: missing `=` \
                     (expected [udp://]HOST:PORT=agent://ID/SCHEME://HOST:PORT)"
                ),
            )
        })?;
        Forward::new(listen, to)
    }
}

impl Forward {
    /// A forward from `listen` (`[udp://|tcp://]HOST:PORT`) to `to`
    /// (`agent://ID/SCHEME://HOST:PORT`); the listener's kind must match the
    /// destination's (`udp` with `udp`).
    pub fn new(listen: &str, to: &str) -> Result<Forward, ValueError> {
        let bad = |why: String| {
            ValueError::new(
                ValueKind::Forward,
                format!(
                    "invalid forward `{listen}={to}`: {why} \
                     (expected [udp://]HOST:PORT=agent://ID/SCHEME://HOST:PORT)"
                ),
            )
        };
        let (udp, listen) = match listen.strip_prefix("udp://") {
            Some(l) => (true, l),
            None => (false, listen.strip_prefix("tcp://").unwrap_or(listen)),
        };
        if !listen.contains(':') {
            return Err(bad(format!("`{listen}` is not HOST:PORT")));
        }
        let to: AgentDestination = to.parse().map_err(|e| bad(format!("{e}")))?;
        let dest_udp = to.dest.scheme == wsgate_tunnel::proto::Scheme::Udp;
        if udp != dest_udp {
            return Err(bad(
                "a udp:// listener forwards to udp:// and a TCP one to tcp:// or http://".into(),
            ));
        }
        Ok(Forward {
            listen: listen.to_string(),
            udp,
            to,
        })
    }
}

impl Config {
    /// Every file the settings are read from beside the config file itself
    /// (certificates, keys, CA bundles, the agent token file): a change to
    /// one reloads a running gateway.
    pub fn files(&self) -> Vec<PathBuf> {
        let mut out = vec![];
        for l in &self.listeners {
            if let Some(t) = &l.tls {
                out.push(t.cert.clone());
                out.push(t.key.clone());
            }
        }
        if let Some(t) = &self.backend_tls {
            out.extend(t.ca.clone());
            if let Some((c, k)) = &t.identity {
                out.push(c.clone());
                out.push(k.clone());
            }
        }
        out.extend(self.tunnel.agent_tokens.clone());
        if let Some(ClusterSecret::File(p)) = self.cluster.as_ref().map(|c| &c.secret) {
            out.push(p.clone());
        }
        for l in &self.listeners {
            if let Some(c) = &l.client_auth {
                out.push(c.ca.clone());
                out.extend(c.crls.iter().cloned());
            }
        }
        for m in &self.auth {
            match &m.kind {
                auth::AuthKind::Jwt(j) => match &j.keys {
                    auth::JwtKeys::Pem(p)
                    | auth::JwtKeys::Secret(p)
                    | auth::JwtKeys::JwksFile(p) => out.push(p.clone()),
                    auth::JwtKeys::JwksUrl(_) => {}
                },
                auth::AuthKind::Basic(b) => out.push(b.htpasswd.clone()),
                auth::AuthKind::Hook(_) | auth::AuthKind::Mtls(_) => {}
            }
        }
        out
    }
}

/// The most worker threads `workers` may ask for.
pub const MAX_WORKERS: usize = 1024;

/// One listening socket.
#[derive(Debug, Clone)]
pub struct ListenerConfig {
    /// `HOST:PORT`, resolved when binding.
    pub address: String,
    pub tls: Option<TlsFiles>,
    /// Overrides `[limits] handshake_timeout` on this listener.
    pub handshake_timeout: Option<Duration>,
    /// This listener's own admission limits (`[listener.limits]`): a cap on
    /// its WebSockets and per-client limits over the gateway's.
    pub admission: ScopeLimits,
    /// Client certificates (`client_ca`, `client_auth`, `crl`): TLS only.
    pub client_auth: Option<ClientAuth>,
}

/// A listener's certificate chain and key (PEM).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Limits and timeouts that apply to every connection.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest WebSocket message accepted from a client, and largest message a
    /// framer may build from a peer's bytes (close 1009 past it).
    pub max_message_size: u64,
    /// Time allowed for the HTTP request head (slowloris protection).
    pub handshake_timeout: Duration,
    /// Close a WebSocket when nothing moved either way for this long.
    pub idle_timeout: Option<Duration>,
    /// Send a ping this often...
    pub ping_interval: Option<Duration>,
    /// ...and drop the connection when its pong has not come back by then.
    pub pong_timeout: Duration,
    /// Most WebSockets open at once; more are refused with 503.
    pub max_connections: usize,
    /// Time allowed to connect to a peer (502 past it).
    pub connect_timeout: Duration,
    /// Time allowed for the closing handshake.
    pub close_timeout: Duration,
    /// On SIGINT/SIGTERM, time allowed for open connections to close in order.
    pub drain_timeout: Duration,
    /// Proxy routes: time a backend has to answer a request or handshake (504 past it).
    pub backend_timeout: Duration,
    /// Proxy routes: close (1008) a WebSocket whose backend sent nothing this long.
    pub backend_idle_timeout: Option<Duration>,
    /// Proxy routes: close (1008) a WebSocket older than this.
    pub max_lifetime: Option<Duration>,
    /// Proxy routes: how long a backend that failed to connect is left out.
    pub eject_for: Duration,
    /// New WebSockets (and proxied requests) per client address (IPv6: per /64); 429 past it.
    pub per_ip_rate: Option<RateSpec>,
    /// Concurrent WebSockets per client address; 429 past it.
    pub per_ip_max_connections: Option<usize>,
    /// Proxy routes: bytes per second each way for one WebSocket.
    pub bandwidth: Option<u64>,
    /// New WebSockets (and requests) per authenticated subject; 429 past it.
    pub per_identity_rate: Option<RateSpec>,
    /// Concurrent WebSockets per authenticated subject; 429 past it.
    pub per_identity_max_connections: Option<usize>,
    /// Concurrent tunnel streams (`/mux` streams, `/request`, CONNECT) per
    /// authenticated subject; refused past it.
    pub per_identity_max_streams: Option<usize>,
    /// Bytes per second each way for all of a subject's traffic together:
    /// WebSockets and plain HTTP bodies (a route's value), `/request`, the
    /// forward proxy and `/mux` streams (`[limits]`'s).
    pub per_identity_bandwidth: Option<u64>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_size: 16 << 20,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: None,
            ping_interval: None,
            pong_timeout: Duration::from_secs(10),
            max_connections: 10_000,
            connect_timeout: Duration::from_secs(5),
            close_timeout: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(10),
            backend_timeout: Duration::from_secs(30),
            backend_idle_timeout: None,
            max_lifetime: None,
            eject_for: Duration::from_secs(10),
            per_ip_rate: None,
            per_ip_max_connections: None,
            bandwidth: None,
            per_identity_rate: None,
            per_identity_max_connections: None,
            per_identity_max_streams: None,
            per_identity_bandwidth: None,
        }
    }
}

/// One route: which handshakes it takes, and where they go.
#[derive(Debug, Clone)]
pub struct Route {
    pub name: String,
    pub matcher: Matcher,
    /// Subprotocols this route speaks; `*` accepts whatever the client offers first.
    pub protocols: Vec<String>,
    pub target: Target,
    pub framing: FramingSpec,
    /// The gateway's limits with this route's `[route.limits]` applied.
    pub limits: Limits,
    /// By listener, when a listener has `[listener.limits]`: the gateway's
    /// limits, then the listener's, then the route's (empty otherwise).
    pub limits_by_listener: Vec<Limits>,
    /// This route's own admission limits (`[route.limits]`): a cap on its
    /// WebSockets and per-client limits over the listener's and gateway's.
    pub admission: ScopeLimits,
    /// Proxy routes: active health check (path, interval).
    pub health_check: Option<(String, Duration)>,
    /// Authentication and rules (`auth`, `origins`, `subjects`,
    /// `identity_headers`, `allow`).
    pub auth: RouteAuth,
    /// permessage-deflate, negotiated on bridge routes (`deflate`,
    /// `[route.deflate]`); `None`: never compressed by the gateway.
    pub deflate: Option<wsframe::deflate::Config>,
}

impl Route {
    /// The limits of this route's connections that came in on `listener`
    /// (its index in [`Config::listeners`]).
    pub fn limits_for(&self, listener: usize) -> &Limits {
        self.limits_by_listener
            .get(listener)
            .unwrap_or(&self.limits)
    }
}

/// Where a route's connections go.
#[derive(Debug, Clone)]
pub enum Target {
    /// Bridge to one peer.
    Static(PeerAddr),
    /// Bridge to a peer found per connection.
    Discovery(Discovery),
    /// Reverse proxy to HTTP/WebSocket backends.
    Proxy(Backends),
    /// Files served from a directory (`static = "dir"`).
    Files(PathBuf),
}

/// A proxy route's backends: the pool the runtime builds is keyed by them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Backends {
    pub addrs: Vec<BackendAddr>,
    pub balance: Balance,
}

/// The `file` discovery backend of a route: lookups (file names templated
/// from the handshake, checked: see [`check_lookup`]), the allow globs every
/// discovered peer must match, and the folder relative names start from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discovery {
    pub lookups: Vec<String>,
    pub allow: Vec<String>,
    pub base: PathBuf,
}

/// Checks one discovery lookup template: every `{…}` must be `{path}`,
/// `{host}`, `{header:NAME}`, `{cookie:NAME}`, `{query:NAME}`, or an
/// identity's `{subject}`, `{claim:NAME}`, `{cert:FIELD}`.
pub fn check_lookup(template: &str) -> Result<(), String> {
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let close = rest[open..]
            .find('}')
            .ok_or_else(|| format!("unclosed `{{` in `{template}`"))?;
        let ph = &rest[open + 1..open + close];
        let ok = matches!(ph, "path" | "host")
            || ["header:", "cookie:", "query:"]
                .iter()
                .any(|p| ph.strip_prefix(p).is_some_and(|n| !n.is_empty()))
            || wsgate_auth::template::placeholder_ok(ph);
        if !ok {
            return Err(format!(
                "unknown placeholder `{{{ph}}}` in `{template}` (expected {{path}}, {{host}}, \
                 {{header:NAME}}, {{cookie:NAME}}, {{query:NAME}}, {{subject}}, {{claim:NAME}} or \
                 {{cert:FIELD}})"
            ));
        }
        rest = &rest[open + close + 1..];
    }
    Ok(())
}

/// Reads and parses an agent token file: `Err` names the file and the line.
pub fn check_tokens(path: &std::path::Path) -> Result<(), String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    wsgate_tunnel::tokens::Tokens::parse(&text)
        .map(|_| ())
        .map_err(|e| format!("{}:{}: {}", path.display(), e.line, e.message))
}

/// Parses `/mux` allow patterns: `Err` names the first bad one.
pub fn check_mux_allow(patterns: &[String]) -> Result<(), String> {
    wsgate_tunnel::allow::AllowList::parse(patterns)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// `[backend_tls]`: the CA bundle backends' certificates must chain to
/// (default: the built-in Mozilla roots) and the gateway's own client
/// certificate and key, for backends that require mutual TLS.
#[derive(Debug, Clone, Default)]
pub struct BackendTlsFiles {
    pub ca: Option<PathBuf>,
    pub identity: Option<(PathBuf, PathBuf)>,
}

/// Conditions on the handshake; all given ones must hold.
#[derive(Debug, Clone, Default)]
pub struct Matcher {
    pub path: Option<String>,
    pub path_prefix: Option<String>,
    pub host: Option<String>,
    /// Header name (lower case) → value, `*` for "present".
    pub headers: BTreeMap<String, String>,
    pub cookies: BTreeMap<String, String>,
    pub query: BTreeMap<String, String>,
}

impl Matcher {
    /// Whether this matcher constrains the path (for telling 404 from 400).
    pub fn has_path(&self) -> bool {
        self.path.is_some() || self.path_prefix.is_some()
    }
}

/// A configuration error with its position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file, self.line, self.column)?;
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        f.write_str(&self.message)
    }
}

/// All errors found in one file.
#[derive(Debug, Clone)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}
