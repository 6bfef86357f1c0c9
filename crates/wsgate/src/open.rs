//! The request path: every request the gateway serves — a WebSocket
//! handshake read by our own HTTP/1.1 parser, one hyper read (HTTP/2 extended
//! CONNECT, an upgrade after keep-alive requests), a plain HTTP request for a
//! proxy route, the health check — goes through [`Gateway::open`], whose
//! phases run in this order (drawn in `docs/phases.md`):
//!
//! 1. **route** ([`Gateway::route`]): the health check, CONNECT screening,
//!    the route and subprotocol, and what the request is (a WebSocket
//!    handshake, checked, or a plain request);
//! 2. **admission** ([`Gateway::admit`]): the per-client rate for every
//!    request, and for a WebSocket the caps on open WebSockets (a permit
//!    held while it lives);
//! 3. **authentication** ([`Gateway::authenticate`]): the route's
//!    [`Authenticator`](crate::auth::Authenticator), or anonymous;
//! 4. **connect** ([`Gateway::connect`]): the bridge peer (found by
//!    discovery where the route discovers), the backend's WebSocket
//!    handshake, or the plain request forwarded to a backend;
//! 5. **answer** ([`Gateway::answer`]): the response — the 101 (or HTTP/2
//!    200) with what runs after it, a backend's own answer, or the refusal
//!    of whichever phase refused;
//! 6. **run** ([`Opened::run`]): the relay (bridge) or passthrough (proxy),
//!    once the server has written the answer and holds the client's socket.
//!
//! Each phase takes what the one before returned, so the order cannot be
//! changed by accident, and a refusal in any phase is answered by the same
//! code for every kind of request: nothing is admitted on one path and
//! refused on another.

use std::sync::Arc;

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderValue, Response, StatusCode};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument, Span};
use wsgate_framing::{AnyFramer, FramingSpec};

use crate::auth::{self, AuthRequest, Identity};
use crate::bridge::{peer, relay};
use crate::config::{PeerAddr, Route};
use crate::error::{Error, Kind};
use crate::gateway::{Conn, Gateway, Live, RouteState};
use crate::http::handshake::{self, Accepted, Upgrade};
use crate::http::{self as h, Body};
use crate::io::ClientIo;
use crate::limits::{PacedBody, Permits, SharedBandwidth};
use crate::metrics::{Direction, HttpVersion, OpenWebSocket};
use crate::proxy::{passthrough, BackendWebSocket, Handshake};
use crate::route::discovery::Discovered;
use crate::route::{self, Metadata, Selection};
use crate::tunnel::agents::Registration;
use crate::tunnel::proto::{Destination, Scheme};
use crate::tunnel::registry::AgentStream;
use crate::tunnel::{self, Tunnel};

/// A request as the path takes it: its head, and its body when hyper read
/// it (our own HTTP/1.1 reader takes only WebSocket handshakes, which have
/// none).
pub struct Request {
    pub head: Parts,
    pub body: Option<Incoming>,
}

/// What the path decided: the server writes it.
#[allow(clippy::large_enum_variant)] // one per request, moved once
pub enum Answer {
    /// An HTTP response, sent as it is: the health check, a refusal, a
    /// backend's answer.
    Respond(Response<Body>),
    /// A WebSocket: the accept (101, or 200 over HTTP/2), then
    /// [`Opened::run`] on the client's socket.
    Upgrade(Accepted, Opened),
    /// A CONNECT tunnel: this 200, then [`Opened::run`] on the socket.
    Tunnel(Response<Body>, Opened),
}

/// Phase 1's result: where the request goes and what it is.
#[allow(clippy::large_enum_variant)] // one per request, moved once
pub(crate) enum Routed<'g> {
    /// The health check: answered without further phases.
    Health,
    To {
        index: usize,
        route: &'g Route,
        state: &'g RouteState,
        protocol: Option<String>,
        meta: Metadata,
        what: What,
        req: Request,
    },
    /// One of the reverse tunnel's endpoints.
    Tunnel {
        tunnel: &'g Arc<Tunnel>,
        what: TunnelWhat,
        req: Request,
    },
}

/// What a request to the reverse tunnel asks for.
pub(crate) enum TunnelWhat {
    /// An agent registers (WebSocket).
    Agent(Upgrade, Registration),
    /// A `/mux` session (WebSocket); whether `wsmux.v1` was offered.
    Mux(Upgrade, bool),
    /// `/request` or an absolute-form request, relayed through an agent.
    Relay(tunnel::http::Target, &'static str),
    /// `CONNECT host:port` through an agent.
    Connect(Destination),
    /// Another cluster node's link (WebSocket, `wsgate-node.v1`).
    Node(Upgrade, crate::cluster::link::Hello),
}

impl TunnelWhat {
    /// Whether it is long-lived (a WebSocket or a tunnel): it holds a
    /// permit of the caps on open connections.
    fn lasts(&self) -> bool {
        !matches!(self, TunnelWhat::Relay(..))
    }

    fn name(&self) -> &'static str {
        match self {
            TunnelWhat::Agent(..) => "agent",
            TunnelWhat::Mux(..) => "mux",
            TunnelWhat::Relay(_, via) => via,
            TunnelWhat::Connect(_) => "connect",
            TunnelWhat::Node(..) => "node",
        }
    }
}

/// What a routed request asks for.
pub(crate) enum What {
    /// A WebSocket handshake, checked.
    WebSocket(Upgrade),
    /// A plain HTTP request (proxy routes only).
    Http,
}

/// Phase 2's result: a routed request, and for a WebSocket its permit.
pub(crate) struct Admitted<'g> {
    routed: Routed<'g>,
    permit: Option<Permits>,
}

/// Phase 4's result.
pub(crate) enum Connected {
    Health,
    /// A WebSocket whose peer, backend or session is ready: the accept, and
    /// what runs after it.
    Upgraded {
        accepted: Accepted,
        run: Ready,
    },
    /// A CONNECT tunnel whose stream is open: 200, then the splice.
    Tunnel {
        run: Ready,
    },
    /// A response (a backend's or a destination's), relayed as it is.
    Relayed(Response<Body>),
}

/// What runs once the answer is written.
pub(crate) struct Ready {
    relay: Relay,
    open: OpenWebSocket,
    permit: Permits,
    span: Span,
}

/// A WebSocket whose peer or backend is connected, waiting for the client's
/// socket.
pub struct Opened {
    relay: Relay,
    open: OpenWebSocket,
    shutdown: CancellationToken,
    span: Span,
    /// Held until the WebSocket ends: it counts against the limits.
    _permit: Permits,
}

pub(crate) enum Relay {
    Bridge {
        /// Taken when the relay starts.
        peer: Option<peer::PeerConn>,
        framer: AnyFramer,
        settings: relay::Settings,
    },
    Proxy {
        /// Taken when the relay starts.
        backend: Option<BackendWebSocket>,
        settings: passthrough::Settings,
    },
    /// A registered agent's session.
    Agent {
        tunnel: Arc<Tunnel>,
        registration: Registration,
        remote: std::net::SocketAddr,
    },
    /// A `/mux` session.
    Mux {
        tunnel: Arc<Tunnel>,
        connect_timeout: std::time::Duration,
        /// Who opened the session, and what its streams may reach.
        identity: Arc<Identity>,
        rules: Option<tunnel::allow::AllowList>,
        /// The subject's `per_identity_bandwidth`, pacing every stream.
        bandwidth: Option<Arc<SharedBandwidth>>,
        /// permessage-deflate, when the handshake agreed on it.
        deflate: Option<(wsframe::deflate::Agreed, wsframe::deflate::Config)>,
    },
    /// A CONNECT tunnel's stream, paced by the subject's
    /// `per_identity_bandwidth` when it has one.
    Splice(AgentStream, Option<Arc<SharedBandwidth>>),
    /// Another cluster node's link.
    Node {
        serving: crate::cluster::link::Serving,
        from: String,
    },
}

fn http_version(u: &Upgrade) -> HttpVersion {
    match u {
        Upgrade::H1 { .. } => HttpVersion::H1,
        Upgrade::H2 => HttpVersion::H2,
    }
}

impl Gateway {
    /// The request path: runs the phases in order and returns the answer.
    pub async fn open(self: &Arc<Self>, req: Request, c: &Conn) -> Answer {
        let routed = match self.route(req) {
            Ok(r) => r,
            Err(e) => return self.refuse(e, None),
        };
        let admitted = match self.admit(routed, c) {
            Ok(a) => a,
            Err((e, route)) => return self.refuse(e, route),
        };
        let identity = match self.authenticate(&admitted, c).await {
            Ok(id) => id,
            Err((e, route)) => return self.refuse(e, route),
        };
        match self.connect(admitted, identity, c).await {
            Ok(connected) => self.answer(connected, c),
            Err((e, route)) => self.refuse(e, route),
        }
    }

    /// Phase 1: route. The health check, CONNECT screening, the route and
    /// subprotocol, and what the request asks for, its handshake checked.
    pub(crate) fn route(&self, req: Request) -> Result<Routed<'_>, Error> {
        let head = &req.head;
        if head.uri.path() == self.config.health_path {
            return Ok(Routed::Health);
        }
        if let (Some(tunnel), Some(cluster)) = (&self.tunnel, &self.cluster) {
            if head.uri.path() == cluster.path() && handshake::is_websocket_request(head) {
                let upgrade = handshake::validate(head)?;
                let hello = crate::cluster::link::hello(head)?;
                let what = TunnelWhat::Node(upgrade, hello);
                return Ok(Routed::Tunnel { tunnel, what, req });
            }
        }
        if let Some(tunnel) = &self.tunnel {
            if let Some(what) = tunnel_request(tunnel, head)? {
                return Ok(Routed::Tunnel { tunnel, what, req });
            }
        }
        if head.method == http::Method::CONNECT {
            // CONNECT is only served as RFC 8441 WebSocket: anything else is
            // refused before routing.
            handshake::check_connect(head)?;
        }
        let mut meta = Metadata::extract(head, self.metadata_maps);
        if self.auth.has_token_protocols() {
            // A token carried in Sec-WebSocket-Protocol is no subprotocol:
            // never chosen, never echoed.
            meta.protocols.retain(|p| !self.auth.is_token_protocol(p));
        }
        let (index, route, protocol) = match route::select(&self.config.routes, &meta) {
            Selection::Route {
                index,
                route,
                protocol,
            } => (index, route, protocol),
            Selection::NotFound => {
                return Err(Error::client(
                    Kind::NoRoute,
                    format!("no route for {}", meta.path),
                ))
            }
            Selection::NoProtocol { supported } => {
                return Err(Error::client(
                    Kind::NoSubprotocol,
                    format!(
                        "none of the offered subprotocols is supported; this endpoint speaks: {}",
                        supported.join(", ")
                    ),
                ))
            }
        };
        let state = &self.routes[index];
        // A proxy route takes plain requests too; a bridge route only
        // WebSockets, so anything else is a bad handshake there; a static
        // route only plain requests.
        let websocket = handshake::is_websocket_request(head);
        let what = match &state.target {
            Live::Proxy(_) if !websocket => What::Http,
            Live::Files(_) if websocket => {
                return Err(Error::client(
                    Kind::BadHandshake,
                    format!("{} serves files, not WebSockets", meta.path),
                ))
            }
            Live::Files(_) => What::Http,
            _ => What::WebSocket(handshake::validate(head)?),
        };
        Ok(Routed::To {
            index,
            route,
            state,
            protocol,
            meta,
            what,
            req,
        })
    }

    /// Phase 2: admission. Every request passes the per-client rate; a
    /// WebSocket also the caps on open WebSockets, holding a permit of each
    /// gate while it lives. Before anything is connected, so a flood cannot
    /// open peers or backends past the limits.
    pub(crate) fn admit<'g>(
        &'g self,
        routed: Routed<'g>,
        c: &Conn,
    ) -> Result<Admitted<'g>, (Error, Option<&'g str>)> {
        let permit = match &routed {
            Routed::Health => None,
            Routed::Tunnel { what, .. } => {
                let name = Some(what.name());
                let ip = c.remote.ip();
                if what.lasts() {
                    Some(
                        self.gates
                            .admit(ip, c.listener, None)
                            .map_err(|r| (Error::from(r), name))?,
                    )
                } else {
                    self.gates
                        .check_rate(ip, c.listener, None)
                        .map_err(|r| (Error::from(r), name))?;
                    None
                }
            }
            Routed::To {
                index, route, what, ..
            } => {
                let gate = self.gates.per_route().then_some(*index);
                let ip = c.remote.ip();
                let name = Some(route.name.as_str());
                match what {
                    What::Http => {
                        self.gates
                            .check_rate(ip, c.listener, gate)
                            .map_err(|r| (Error::from(r), name))?;
                        None
                    }
                    What::WebSocket(_) => Some(
                        self.gates
                            .admit(ip, c.listener, gate)
                            .map_err(|r| (Error::from(r), name))?,
                    ),
                }
            }
        };
        Ok(Admitted { routed, permit })
    }

    /// Phase 3: authentication, by the route's chain (anyone without one),
    /// the tunnel's, or an agent's token.
    pub(crate) async fn authenticate<'g>(
        &'g self,
        a: &Admitted<'g>,
        c: &Conn,
    ) -> Result<Identity, (Error, Option<&'g str>)> {
        let (route, state, req) = match &a.routed {
            Routed::To {
                route, state, req, ..
            } => (route, state, req),
            Routed::Tunnel { tunnel, what, req } => {
                let request = AuthRequest {
                    head: &req.head,
                    remote: c.remote,
                    client_cert: c.client_cert.as_deref(),
                };
                return match what {
                    // An agent must own the id it registers: by its token,
                    // or by an identity of `agent_auth`.
                    TunnelWhat::Agent(..) => tunnel
                        .authenticate_agent(request)
                        .await
                        .map_err(|e| (e, Some("agent"))),
                    // A node proves the cluster's secret.
                    TunnelWhat::Node(_, hello) => match &self.cluster {
                        Some(c) => c
                            .authenticate(&req.head, &hello.from)
                            .map(|()| Identity::anonymous())
                            .map_err(|e| (e, Some("node"))),
                        None => unreachable!("node links are routed only in a cluster"),
                    },
                    _ => tunnel
                        .authenticate(request)
                        .await
                        .map_err(|e| (e, Some(what.name()))),
                };
            }
            Routed::Health => return Ok(Identity::anonymous()),
        };
        let request = AuthRequest {
            head: &req.head,
            remote: c.remote,
            client_cert: c.client_cert.as_deref(),
        };
        auth::authenticate(state.auth.as_deref(), request)
            .await
            .map_err(|e| (e, Some(route.name.as_str())))
    }

    /// Phase 4: connect. The bridge peer, the backend's WebSocket handshake,
    /// or the plain request forwarded to a backend.
    pub(crate) async fn connect<'g>(
        self: &'g Arc<Self>,
        a: Admitted<'g>,
        identity: Identity,
        c: &Conn,
    ) -> Result<Connected, (Error, Option<&'g str>)> {
        let Admitted { routed, permit } = a;
        let (route, state, protocol, meta, what, mut req) = match routed {
            Routed::Health => return Ok(Connected::Health),
            Routed::Tunnel { tunnel, what, req } => {
                let long = what.lasts() && !matches!(what, TunnelWhat::Connect(_));
                let permit = self
                    .admit_identity(&identity, &self.config.limits, long, permit)
                    .map_err(|e| (e, Some(what.name())))?;
                return self
                    .connect_tunnel(tunnel, what, req, permit, identity, c)
                    .await;
            }
            Routed::To {
                route,
                state,
                protocol,
                meta,
                what,
                req,
                ..
            } => (route, state, protocol, meta, what, req),
        };
        let name = Some(route.name.as_str());
        let limits = route.limits_for(c.listener);
        let websocket = matches!(what, What::WebSocket(_));
        let permit = self
            .admit_identity(&identity, limits, websocket, permit)
            .map_err(|e| (e, name))?;
        if matches!(state.target, Live::Proxy(_)) && !state.identity_headers.is_empty() {
            state
                .identity_headers
                .apply(&mut req.head.headers, &identity);
        }
        // The bandwidth the subject's connections and requests share.
        let shared_bandwidth = self.shared_bandwidth(&identity, limits);
        let upgrade = match what {
            What::Http => {
                let paced = shared_bandwidth.as_ref();
                let resp = match &state.target {
                    Live::Proxy(pool) => {
                        let body = req.body.expect("hyper reads plain requests");
                        self.proxy
                            .forward(pool, req.head, body, paced, c.remote, c.secure)
                            .await
                    }
                    Live::Files(dir) => {
                        let prefix = route.matcher.path_prefix.as_deref();
                        let prefix = prefix.or(route.matcher.path.as_deref()).unwrap_or("");
                        let resp =
                            crate::files::serve(dir, prefix.trim_end_matches('/'), &req.head).await;
                        match paced {
                            Some(p) => resp.map(|r| {
                                r.map(|b| PacedBody::new(b, Some(p), false).boxed_unsync())
                            }),
                            None => resp,
                        }
                    }
                    _ => unreachable!("plain requests are routed to proxy and static routes"),
                };
                let status = resp
                    .as_ref()
                    .map_or_else(|e| e.kind.status(), |r| r.status());
                self.metrics.http_request(&route.name, status.as_u16());
                return resp.map(Connected::Relayed).map_err(|e| (e, name));
            }
            What::WebSocket(u) => u,
        };
        let permit = permit.expect("WebSockets hold a permit");
        // The connection's span (`conn`, with the same id and address) where
        // the handshake runs inside it: a span of its own held about 2.4 KiB
        // per idle WebSocket with mimalloc (its registry slot, formatted
        // fields and extension map), a quarter of what one held in all.
        // HTTP/2 streams run in tasks of their own, outside it: a `ws` span.
        let current = Span::current();
        let span = if current.is_none() {
            tracing::info_span!("ws", id = c.id, remote = %c.remote)
        } else {
            current
        };
        let version = http_version(&upgrade);
        // Counted open once the peer or backend is there.
        let open = || state.series.websocket(version);
        match &state.target {
            Live::Proxy(pool) => {
                let (accepted, backend) = match self
                    .proxy
                    .open_websocket(pool, &req.head, &upgrade, c.remote, c.secure)
                    .await
                {
                    Ok(Handshake::Switched(accepted, backend)) => (accepted, backend),
                    Ok(Handshake::Answered(resp)) => return Ok(Connected::Relayed(resp)),
                    Err(e) => return Err((e, name)),
                };
                info!(parent: &span, route = %route.name, backend = %backend.lease.backend.addr, latency_ms = backend.latency.as_millis() as u64, h2 = matches!(upgrade, Upgrade::H2), "websocket proxied");
                let settings = passthrough::Settings {
                    client_idle: limits.idle_timeout,
                    backend_idle: limits.backend_idle_timeout,
                    max_lifetime: limits.max_lifetime,
                    close_timeout: limits.close_timeout,
                    bandwidth: limits.bandwidth,
                    shared_bandwidth,
                };
                Ok(Connected::Upgraded {
                    accepted,
                    run: Ready {
                        relay: Relay::Proxy {
                            backend: Some(backend),
                            settings,
                        },
                        open: open(),
                        permit,
                        span,
                    },
                })
            }
            Live::Files(_) => unreachable!("static routes take no WebSockets"),
            Live::Peer(_) | Live::Discovery(_) => {
                let (peer, protocol, framing) = self
                    .find_peer(route, state, &meta, protocol, &identity)
                    .map_err(|e| (e, name))?;
                let conn = match &peer {
                    PeerAddr::Agent(a) => {
                        let Some(tunnel) = &self.tunnel else {
                            unreachable!("agent:// peers need the tunnel (config checks it)");
                        };
                        let s = tunnel
                            .open(Some(&a.agent), &a.dest, "bridge")
                            .await
                            .map_err(|e| (e, name))?;
                        let datagrams = a.dest.scheme == Scheme::Udp;
                        peer::PeerConn::Agent(Box::new(s), datagrams)
                    }
                    _ => peer::connect(&peer, limits.connect_timeout)
                        .await
                        .map_err(|e| {
                            let e = Error::upstream(Kind::PeerUnreachable, e.to_string());
                            (e, name)
                        })?,
                };
                let deflate = handshake::deflate(&req.head, route.deflate.as_ref());
                info!(parent: &span, route = %route.name, %peer, protocol = protocol.as_deref().unwrap_or("-"), framing = %framing, deflate = deflate.is_some(), "websocket open");
                let settings = relay::Settings {
                    max_message_size: limits.max_message_size,
                    idle_timeout: limits.idle_timeout,
                    ping_interval: limits.ping_interval,
                    pong_timeout: limits.pong_timeout,
                    close_timeout: limits.close_timeout,
                    datagram_text: matches!(framing, FramingSpec::Auto)
                        || matches!(peer, PeerAddr::Echo),
                    shared_bandwidth,
                    deflate: deflate
                        .as_ref()
                        .zip(route.deflate)
                        .map(|((agreed, _), config)| (*agreed, config)),
                };
                let protocol = protocol.and_then(|p| HeaderValue::try_from(p).ok());
                Ok(Connected::Upgraded {
                    accepted: Accepted::new(&upgrade, protocol, deflate.map(|(_, answer)| answer)),
                    run: Ready {
                        relay: Relay::Bridge {
                            peer: Some(conn),
                            framer: framing.new_framer(),
                            settings,
                        },
                        open: open(),
                        permit,
                        span,
                    },
                })
            }
        }
    }

    /// Phase 4 for the reverse tunnel's endpoints.
    async fn connect_tunnel<'g>(
        self: &'g Arc<Self>,
        tunnel: &'g Arc<Tunnel>,
        what: TunnelWhat,
        req: Request,
        permit: Option<Permits>,
        identity: Identity,
        c: &Conn,
    ) -> Result<Connected, (Error, Option<&'g str>)> {
        let name = what.name();
        let rules = tunnel.stream_rules(&identity);
        // The bandwidth the subject's streams share (`[limits]`'s).
        let bandwidth = self.shared_bandwidth(&identity, &self.config.limits);
        // A CONNECT tunnel is one stream: its slot is held with its permit.
        let permit = match &what {
            TunnelWhat::Connect(dest) => {
                let slot = tunnel
                    .admit_stream(&identity, rules.as_ref(), dest, "connect")
                    .map_err(|e| (e, Some(name)))?;
                permit.map(|p| p.hold(slot))
            }
            _ => permit,
        };
        let span = || tracing::info_span!("tunnel", id = c.id, remote = %c.remote, kind = name);
        let ready = |relay, version| Ready {
            relay,
            open: self.builtin.websocket(name, version),
            permit: permit.expect("long-lived tunnel requests hold a permit"),
            span: span(),
        };
        match what {
            TunnelWhat::Agent(upgrade, registration) => {
                let protocol = HeaderValue::from_static(tunnel::proto::AGENT_PROTOCOL);
                let accepted = Accepted::new(&upgrade, Some(protocol), None);
                let relay = Relay::Agent {
                    tunnel: tunnel.clone(),
                    registration,
                    remote: c.remote,
                };
                Ok(Connected::Upgraded {
                    accepted,
                    run: ready(relay, http_version(&upgrade)),
                })
            }
            TunnelWhat::Mux(upgrade, offered) => {
                let protocol =
                    offered.then(|| HeaderValue::from_static(tunnel::proto::MUX_PROTOCOL));
                let config = tunnel.config.deflate;
                let deflate = handshake::deflate(&req.head, config.as_ref());
                let agreed = deflate.as_ref().zip(config).map(|((a, _), c)| (*a, c));
                let accepted = Accepted::new(&upgrade, protocol, deflate.map(|(_, answer)| answer));
                let relay = Relay::Mux {
                    tunnel: tunnel.clone(),
                    connect_timeout: self.config.limits.connect_timeout,
                    identity: Arc::new(identity),
                    rules,
                    bandwidth,
                    deflate: agreed,
                };
                Ok(Connected::Upgraded {
                    accepted,
                    run: ready(relay, http_version(&upgrade)),
                })
            }
            TunnelWhat::Relay(target, via) => {
                let _stream = tunnel
                    .admit_stream(&identity, rules.as_ref(), &target.dest, via)
                    .map_err(|e| (e, Some(via)))?;
                let mut req = req;
                if !tunnel.identity_headers.is_empty() {
                    tunnel
                        .identity_headers
                        .apply(&mut req.head.headers, &identity);
                }
                let resp = tunnel::http::relay(
                    tunnel,
                    target,
                    req.head,
                    req.body,
                    c.remote,
                    c.secure,
                    &self.config.forwarding,
                    self.config.limits.backend_timeout,
                    bandwidth.as_ref(),
                    via,
                )
                .await;
                let status = resp
                    .as_ref()
                    .map_or_else(|e| e.kind.status(), |r| r.status());
                self.metrics.http_request(via, status.as_u16());
                resp.map(Connected::Relayed).map_err(|e| (e, Some(via)))
            }
            TunnelWhat::Node(upgrade, hello) => {
                let protocol = HeaderValue::from_static(crate::cluster::wire::NODE_PROTOCOL);
                let accepted = Accepted::new(&upgrade, Some(protocol), None);
                let Some(cluster) = &self.cluster else {
                    unreachable!("node links are routed only in a cluster");
                };
                let relay = Relay::Node {
                    serving: cluster.serving(),
                    from: hello.from,
                };
                Ok(Connected::Upgraded {
                    accepted,
                    run: ready(relay, http_version(&upgrade)),
                })
            }
            TunnelWhat::Connect(dest) => {
                let stream = tunnel
                    .open(None, &dest, "connect")
                    .await
                    .map_err(|e| (e, Some(name)))?;
                Ok(Connected::Tunnel {
                    run: ready(Relay::Splice(stream, bandwidth), HttpVersion::H1),
                })
            }
        }
    }

    /// The bandwidth an authenticated subject's traffic shares under
    /// `limits` (`per_identity_bandwidth`); `None` for anonymous requests
    /// and without the limit (nothing is paced then).
    fn shared_bandwidth(
        &self,
        identity: &Identity,
        limits: &crate::config::Limits,
    ) -> Option<Arc<SharedBandwidth>> {
        let subject = identity.subject.as_ref()?;
        let rate = limits.per_identity_bandwidth?;
        Some(self.identities.bandwidth(subject, rate))
    }

    /// The per-subject limits of an authenticated request (the rate for
    /// every request, the cap for a WebSocket, `long`), its slot held with
    /// the request's permit.
    fn admit_identity(
        &self,
        identity: &Identity,
        limits: &crate::config::Limits,
        long: bool,
        permit: Option<Permits>,
    ) -> Result<Option<Permits>, Error> {
        let Some(subject) = &identity.subject else {
            return Ok(permit);
        };
        let cap = if long {
            limits.per_identity_max_connections
        } else {
            None
        };
        let slot = self
            .identities
            .admit(subject, limits.per_identity_rate.as_ref(), cap, false)?;
        Ok(permit.map(|p| p.hold(slot)))
    }

    /// Phase 5: answer. The accept and what runs after it, or a response.
    pub(crate) fn answer(&self, connected: Connected, c: &Conn) -> Answer {
        let opened = |r: Ready| Opened {
            relay: r.relay,
            open: r.open,
            shutdown: self.worker_shutdown(c.worker),
            span: r.span,
            _permit: r.permit,
        };
        match connected {
            Connected::Health => Answer::Respond(h::text(StatusCode::OK, "ok")),
            Connected::Relayed(resp) => Answer::Respond(resp),
            Connected::Upgraded { accepted, run } => Answer::Upgrade(accepted, opened(run)),
            Connected::Tunnel { run } => {
                let ok = Response::builder()
                    .status(StatusCode::OK)
                    .body(h::empty())
                    .expect("valid response");
                Answer::Tunnel(ok, opened(run))
            }
        }
    }

    /// The answer to a request a phase refused: counted by its kind's label,
    /// logged when it is the upstream's doing, answered with its status.
    fn refuse(&self, e: Error, route: Option<&str>) -> Answer {
        if let Some(label) = e.kind.label() {
            self.metrics.refused(label);
        }
        if e.side == crate::error::Side::Upstream {
            warn!(route = route.unwrap_or("-"), "{e}");
        } else {
            debug!(route = route.unwrap_or("-"), "refused: {e}");
        }
        Answer::Respond(h::refusal(&e))
    }

    /// The peer of a bridge route: its static peer, or the one discovery finds.
    fn find_peer(
        &self,
        route: &Route,
        state: &RouteState,
        meta: &Metadata,
        protocol: Option<String>,
        identity: &Identity,
    ) -> Result<(PeerAddr, Option<String>, FramingSpec), Error> {
        let found = self.find_peer_of(route, state, meta, protocol, identity)?;
        // The route's identity rules: the peer must match one, filled.
        if !state.rules.is_empty() && !state.rules.permits_glob(identity, &found.0.to_string()) {
            warn!(route = %route.name, peer = %found.0, "peer not allowed for this identity");
            return Err(Error::client(
                Kind::PeerNotAllowed,
                "peer not allowed for this identity",
            ));
        }
        Ok(found)
    }

    fn find_peer_of(
        &self,
        route: &Route,
        state: &RouteState,
        meta: &Metadata,
        protocol: Option<String>,
        identity: &Identity,
    ) -> Result<(PeerAddr, Option<String>, FramingSpec), Error> {
        match &state.target {
            Live::Peer(p) => Ok((p.clone(), protocol, route.framing.clone())),
            Live::Discovery(d) => {
                match d.lookup(meta, &|ph| identity.field(ph).map(String::from)) {
                    Discovered::Peer { entry, protocol } => {
                        let framing = entry.framing.unwrap_or_else(|| route.framing.clone());
                        Ok((entry.peer, protocol, framing))
                    }
                    Discovered::Denied(p) => {
                        warn!(route = %route.name, peer = %p, "discovered peer is not on the allow list");
                        Err(Error::gateway(Kind::PeerNotAllowed, "peer not allowed"))
                    }
                    Discovered::NotFound => Err(Error::client(
                        Kind::PeerNotFound,
                        "no peer found for this request",
                    )),
                }
            }
            Live::Proxy(_) | Live::Files(_) => unreachable!("only bridge routes have a peer"),
        }
    }
}

impl Opened {
    /// Phase 6: runs the WebSocket to its end over the client's upgraded
    /// socket and the bytes that came after its handshake.
    pub async fn run(mut self, client: ClientIo, leftover: Bytes) {
        // The span instruments the run; everything else stays in `self`, and
        // the relay borrows it: each async function keeps its own copy of
        // what it is given by value for as long as it runs, so moving the
        // parts from one to the next held them two or three times over, in
        // the future an idle connection keeps.
        let span = std::mem::replace(&mut self.span, Span::none());
        let (up, down, close) = self.relay(client, leftover).instrument(span).await;
        self.open.bytes(Direction::ClientToUpstream, up);
        self.open.bytes(Direction::UpstreamToClient, down);
        self.open.close(close);
    }

    /// Returns the bytes up, the bytes down and the close code we sent.
    async fn relay(&mut self, client: ClientIo, leftover: Bytes) -> (u64, u64, Option<u16>) {
        let shutdown = &self.shutdown;
        match &mut self.relay {
            Relay::Bridge {
                peer,
                framer,
                settings,
            } => {
                let peer = peer.take().expect("a WebSocket runs once");
                // Boxed like every other arm: this future is then as small
                // as the arms' state, and a proxied WebSocket does not hold
                // room for the bridge's relay beside its own (1.9 KiB more
                // per idle proxied WebSocket when only the proxy's was boxed).
                let o = Box::pin(relay::run(
                    client, leftover, peer, framer, settings, shutdown,
                ))
                .await;
                info!(
                    bytes_up = o.bytes_up,
                    bytes_down = o.bytes_down,
                    close_sent = ?o.close_sent,
                    close_received = ?o.close_received,
                    reason = %o.reason,
                    "websocket closed"
                );
                (o.bytes_up, o.bytes_down, o.close_sent)
            }
            Relay::Proxy { backend, settings } => {
                let backend = backend.take().expect("a WebSocket runs once");
                // Boxed: its future is bigger than the bridge's, which would
                // otherwise be as big.
                let o = Box::pin(passthrough::run(
                    passthrough::Side {
                        io: client,
                        leftover,
                    },
                    passthrough::Side {
                        io: crate::proxy::backend::into_relay_io(backend.io),
                        leftover: backend.leftover,
                    },
                    settings.clone(),
                    shutdown.clone(),
                ))
                .await;
                // The backend counts as busy until here (least-connections).
                drop(backend.lease);
                info!(
                    bytes_up = o.bytes_up,
                    bytes_down = o.bytes_down,
                    injected = ?o.injected,
                    reason = %o.reason,
                    "websocket closed"
                );
                (o.bytes_up, o.bytes_down, o.injected)
            }
            // The tunnel's sessions and streams are boxed too, for the same
            // reason: few, and their futures bigger than the bridge's.
            Relay::Agent {
                tunnel,
                registration,
                remote,
            } => {
                let (to, from) = Box::pin(tunnel::agents::serve(
                    client,
                    leftover,
                    registration.clone(),
                    *remote,
                    tunnel.registry.clone(),
                    tunnel.config.keepalive,
                    tunnel.metrics.clone(),
                    shutdown.clone(),
                ))
                .await;
                (from, to, None)
            }
            Relay::Mux {
                tunnel,
                connect_timeout,
                identity,
                rules,
                bandwidth,
                deflate,
            } => {
                let who = tunnel::mux::Who {
                    identity: identity.clone(),
                    rules: rules.clone(),
                    bandwidth: bandwidth.clone(),
                };
                let (tunnel, timeout) = (tunnel.clone(), *connect_timeout);
                let shutdown = shutdown.clone();
                Box::pin(tunnel::mux::serve(
                    client, leftover, tunnel, timeout, who, *deflate, shutdown,
                ))
                .await;
                (0, 0, None)
            }
            Relay::Node { serving, from } => {
                let (from, serving) = (std::mem::take(from), serving.clone());
                Box::pin(crate::cluster::link::serve(
                    client,
                    leftover,
                    from,
                    serving,
                    shutdown.clone(),
                ))
                .await;
                (0, 0, None)
            }
            Relay::Splice(stream, bandwidth) => {
                let r = Box::pin(async {
                    let mut client = crate::io::Rewind::new(leftover, client.into_io());
                    let splice = tunnel::splice::splice(&mut client, stream);
                    tokio::select! {
                        r = splice.paced(bandwidth.as_ref()) => r,
                        () = shutdown.cancelled() => Ok(Default::default()),
                    }
                })
                .await;
                let copied = match r {
                    Ok(c) => c,
                    Err((e, c)) => {
                        debug!("tunnel ended: {e}");
                        c
                    }
                };
                info!(up = copied.a_to_b, down = copied.b_to_a, "tunnel closed");
                (copied.a_to_b, copied.b_to_a, None)
            }
        }
    }

    /// The WebSocket's span (its logs' context).
    pub fn span(&self) -> &Span {
        &self.span
    }
}

/// Whether a request is for one of the tunnel's endpoints (they come before
/// the routes), and which; a malformed one is refused here.
fn tunnel_request(tunnel: &Tunnel, head: &Parts) -> Result<Option<TunnelWhat>, Error> {
    let cfg = &tunnel.config;
    let path = head.uri.path();
    let websocket = handshake::is_websocket_request(head);
    if cfg.agents() && path == cfg.agent_path && websocket {
        let upgrade = handshake::validate(head)?;
        let registration = tunnel::agents::registration(head)?;
        return Ok(Some(TunnelWhat::Agent(upgrade, registration)));
    }
    if cfg.mux() && path == cfg.mux_path && websocket {
        let upgrade = handshake::validate(head)?;
        let offered = head
            .headers
            .get_all(http::header::SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .any(|v| handshake::list_has_token(v.as_bytes(), tunnel::proto::MUX_PROTOCOL));
        return Ok(Some(TunnelWhat::Mux(upgrade, offered)));
    }
    if !cfg.agents() {
        return Ok(None);
    }
    if cfg.forward_proxy && tunnel::http::is_absolute_form(head) {
        let target = tunnel::http::absolute_target(head)?;
        return Ok(Some(TunnelWhat::Relay(target, "forward_proxy")));
    }
    if path == cfg.request_path && !tunnel::http::is_absolute_form(head) {
        let target = tunnel::http::request_target(head)?;
        return Ok(Some(TunnelWhat::Relay(target, "request")));
    }
    if cfg.forward_proxy
        && head.method == http::Method::CONNECT
        && head.extensions.get::<hyper::ext::Protocol>().is_none()
    {
        let dest = tunnel::http::connect_target(head)?;
        return Ok(Some(TunnelWhat::Connect(dest)));
    }
    Ok(None)
}
