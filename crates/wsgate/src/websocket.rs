//! Opening a WebSocket once its handshake has been routed, and running it.
//!
//! [`Gateway::open_websocket`] is shared by both ways a handshake arrives — a
//! connection's first HTTP/1.1 request read by [`crate::http1`], or any request
//! hyper serves (HTTP/2 extended CONNECT, or an upgrade after keep-alive
//! requests): it checks the handshake, admits it against the limits, then
//! connects the bridge peer or performs the backend handshake, and returns the
//! answer for the client together with an [`Opened`] that runs the relay once
//! the client's socket is ours.

use std::sync::Arc;

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderValue, Response, StatusCode};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument, Span};
use wsgate_framing::{AnyFramer, FramingSpec};

use crate::config::{Route, Target};
use crate::discovery::Discovered;
use crate::handshake::{self, Accepted, Body, Upgrade};
use crate::limits::Permits;
use crate::listener::{Conn, Gateway};
use crate::metrics::{Direction, HttpVersion, OpenWebSocket, RouteSeries};
use crate::passthrough;
use crate::proxy::BackendWebSocket;
use crate::relay::{self, ClientIo};
use crate::route::{self, Metadata, Selection};
use crate::upstream::{self, PeerAddr, PeerConn};

/// Where a request goes, decided from its head alone.
pub enum Dispatch<'a> {
    /// Answer right away (health check, no route, a refused CONNECT).
    Answer(Response<Body>),
    /// A route was selected, with the subprotocol negotiated for it.
    Route {
        route: &'a Route,
        protocol: Option<String>,
        meta: Metadata,
    },
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

enum Relay {
    Bridge {
        peer: PeerConn,
        framer: AnyFramer,
        settings: relay::Settings,
    },
    Proxy {
        backend: BackendWebSocket,
        settings: passthrough::Settings,
    },
}

fn http_version(u: &Upgrade) -> HttpVersion {
    match u {
        Upgrade::H1 { .. } => HttpVersion::H1,
        Upgrade::H2 => HttpVersion::H2,
    }
}

impl Gateway {
    /// Health check, CONNECT screening and route selection.
    pub fn dispatch(&self, parts: &Parts) -> Dispatch<'_> {
        if parts.uri.path() == self.config.health_path {
            return Dispatch::Answer(handshake::text(StatusCode::OK, "ok"));
        }
        if parts.method == http::Method::CONNECT {
            // CONNECT is only served as RFC 8441 WebSocket: anything else is
            // refused before routing.
            if let Err(resp) = handshake::validate(parts) {
                return Dispatch::Answer(self.refuse("bad_handshake", *resp));
            }
        }
        let meta = Metadata::extract(parts, self.metadata_maps);
        match route::select(&self.config.routes, &meta) {
            Selection::Route { route, protocol } => Dispatch::Route {
                route,
                protocol,
                meta,
            },
            Selection::NotFound => Dispatch::Answer(handshake::text(
                StatusCode::NOT_FOUND,
                format!("no route for {}", meta.path),
            )),
            Selection::NoProtocol { supported } => Dispatch::Answer(handshake::text(
                StatusCode::BAD_REQUEST,
                format!(
                    "none of the offered subprotocols is supported; this endpoint speaks: {}",
                    supported.join(", ")
                ),
            )),
        }
    }

    /// `route`'s index in the config, when some route has a gate of its own
    /// (`None` otherwise: no gate needs it).
    pub(crate) fn route_index(&self, route: &Route) -> Option<usize> {
        if !self.gates.per_route() {
            return None;
        }
        self.config
            .routes
            .iter()
            .position(|r| std::ptr::eq(r, route))
    }

    /// Checks and admits a WebSocket handshake routed to `route`, then connects
    /// its peer (bridge) or performs the backend handshake (proxy). Returns
    /// the answer for the client (`101` over HTTP/1.1, `200` over HTTP/2) and
    /// what runs after it; `Err` is the answer to send instead: a refusal, or
    /// a backend's own non-101 answer.
    pub async fn open_websocket(
        self: &Arc<Self>,
        parts: &Parts,
        meta: &Metadata,
        route: &Route,
        protocol: Option<String>,
        c: Conn,
    ) -> Result<(Accepted, Opened), Response<Body>> {
        let upgrade = handshake::validate(parts).map_err(|r| self.refuse("bad_handshake", *r))?;
        // Admission before connecting anything, so a flood cannot open peers
        // or backends past the limits.
        let permit = self
            .gates
            .admit(c.remote.ip(), c.listener, self.route_index(route))
            .map_err(|r| self.refuse(r.reason(), crate::listener::refusal_response(&r)))?;
        let limits = route.limits_for(c.listener);
        let span = tracing::info_span!("ws", id = c.id, remote = %c.remote);
        let (response, relay) = match &route.target {
            Target::Proxy(pool) => {
                let (response, backend) = match self
                    .proxy
                    .open_websocket(pool, parts, &upgrade, c.remote, c.secure)
                    .await
                {
                    Ok(Ok(pair)) => pair,
                    Ok(Err(relayed)) => return Err(relayed),
                    Err(e) => {
                        warn!(route = %route.name, "{e:?}");
                        return Err(self.refuse(e.reason(), e.response()));
                    }
                };
                info!(parent: &span, route = %route.name, backend = %backend.lease.backend.addr, latency_ms = backend.latency.as_millis() as u64, h2 = matches!(upgrade, Upgrade::H2), "websocket proxied");
                let settings = passthrough::Settings {
                    client_idle: limits.idle_timeout,
                    backend_idle: limits.backend_idle_timeout,
                    max_lifetime: limits.max_lifetime,
                    close_timeout: limits.close_timeout,
                    bandwidth: limits.bandwidth,
                };
                (response, Relay::Proxy { backend, settings })
            }
            Target::Static(_) | Target::Discovery(_) => {
                let (peer, protocol, framing) = self.find_peer(route, meta, protocol)?;
                let conn = match upstream::connect(&peer, limits.connect_timeout).await {
                    Ok(c) => c,
                    Err(e) => {
                        warn!(route = %route.name, "{e}");
                        return Err(self.refuse(
                            "peer_unreachable",
                            handshake::text(StatusCode::BAD_GATEWAY, e.to_string()),
                        ));
                    }
                };
                info!(parent: &span, route = %route.name, %peer, protocol = protocol.as_deref().unwrap_or("-"), framing = %framing, "websocket open");
                let settings = relay::Settings {
                    max_message_size: limits.max_message_size,
                    idle_timeout: limits.idle_timeout,
                    ping_interval: limits.ping_interval,
                    pong_timeout: limits.pong_timeout,
                    close_timeout: limits.close_timeout,
                    datagram_text: matches!(framing, FramingSpec::Auto)
                        || matches!(peer, PeerAddr::Echo),
                };
                let protocol = protocol.and_then(|p| HeaderValue::try_from(p).ok());
                let response = Accepted::new(&upgrade, protocol, None);
                let relay = Relay::Bridge {
                    peer: conn,
                    framer: framing.new_framer(),
                    settings,
                };
                (response, relay)
            }
        };
        let open = match self.series.get(&route.name) {
            Some(s) => s.websocket(http_version(&upgrade)),
            None => RouteSeries::new(&self.metrics, &route.name).websocket(http_version(&upgrade)),
        };
        let opened = Opened {
            relay,
            open,
            shutdown: self.worker_shutdown(c.worker),
            span,
            _permit: permit,
        };
        Ok((response, opened))
    }

    /// The peer of a bridge route: its static peer, or the one discovery finds.
    #[allow(clippy::result_large_err)]
    fn find_peer(
        &self,
        route: &Route,
        meta: &Metadata,
        protocol: Option<String>,
    ) -> Result<(PeerAddr, Option<String>, FramingSpec), Response<Body>> {
        match &route.target {
            Target::Static(p) => Ok((p.clone(), protocol, route.framing.clone())),
            Target::Discovery(d) => match d.lookup(meta) {
                Discovered::Peer { entry, protocol } => {
                    let framing = entry.framing.unwrap_or_else(|| route.framing.clone());
                    Ok((entry.peer, protocol, framing))
                }
                Discovered::Denied(p) => {
                    warn!(route = %route.name, peer = %p, "discovered peer is not on the allow list");
                    Err(self.refuse(
                        "peer_not_allowed",
                        handshake::text(StatusCode::FORBIDDEN, "peer not allowed"),
                    ))
                }
                Discovered::NotFound => Err(handshake::text(
                    StatusCode::NOT_FOUND,
                    "no peer found for this request",
                )),
            },
            Target::Proxy(_) => unreachable!("proxy routes have no bridge peer"),
        }
    }
}

impl Opened {
    /// Runs the WebSocket to its end over the client's upgraded socket and the
    /// bytes that came after its handshake.
    pub async fn run(self, client: ClientIo, leftover: Bytes) {
        let Opened {
            relay,
            open,
            shutdown,
            span,
            _permit,
        } = self;
        async move {
            // (bytes up, bytes down, the close code we sent)
            let (up, down, close) = match relay {
                Relay::Bridge {
                    peer,
                    framer,
                    settings,
                } => {
                    let o = relay::run(client, leftover, peer, framer, settings, shutdown).await;
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
                    let o = passthrough::run(
                        passthrough::Side {
                            io: client,
                            leftover,
                        },
                        passthrough::Side {
                            io: crate::backend::into_relay_io(backend.io),
                            leftover: backend.leftover,
                        },
                        settings,
                        shutdown,
                    )
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
            };
            open.bytes(Direction::ClientToUpstream, up);
            open.bytes(Direction::UpstreamToClient, down);
            open.close(close);
        }
        .instrument(span)
        .await
    }

    /// Runs the WebSocket once hyper hands over the client's socket.
    pub async fn run_after(self, on_upgrade: hyper::upgrade::OnUpgrade) {
        match on_upgrade.await {
            Ok(up) => {
                let (client, leftover) = crate::listener::into_client(up);
                self.run(client, leftover).await
            }
            Err(e) => debug!(parent: &self.span, "upgrade failed: {e}"),
        }
    }
}
