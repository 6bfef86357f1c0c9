//! wsgate — a WebSocket gateway.
//!
//! A [`config::Config`] is plain data; [`Gateway`] is the runtime built from
//! it; every request goes through one path of ordered phases (`open.rs`:
//! route → admission → authentication → connect → answer → run). The
//! folders follow the parts:
//!
//! | module | job |
//! |---|---|
//! | `config/` | plain data: types, the TOML file and its validation, values |
//! | `server/` | listeners and workers, accept and the first read, hyper |
//! | `http/` | our HTTP/1.1 heads, WebSocket handshake checks, answers |
//! | `route/` | route matching and subprotocols, file discovery |
//! | `limits/` | admission gates (rates, caps), bandwidth |
//! | `auth/` | the authentication phase |
//! | `bridge/` | peers and the relay with framing functions |
//! | `proxy/` | forwarding to backends, header rules, pools, passthrough |
//! | `tunnel/` | the reverse tunnel: its wire format, allow patterns, agents |
//! | `cluster/` | many nodes as one: the Redis directory, node links |
//! | `gateway.rs`, `open.rs`, `error.rs`, `io.rs` | the root type, the phases, errors, shared client I/O |
//!
//! For the binary, tests and fuzz targets the crate exposes the CLI
//! ([`cli::main`]), the config, the error kinds, the wire-level HTTP parsers,
//! and [`run`] / [`Server`] to start a gateway in-process.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

mod agent;
pub mod auth;
mod bridge;
pub mod cli;
pub mod cluster;
pub mod config;
mod connect;
pub mod error;
mod files;
mod gateway;
pub mod http;
mod io;
mod limits;
mod metrics;
mod open;
mod proxy;
pub mod reload;
mod route;
mod server;
mod tls;
pub mod tunnel;

pub use gateway::Gateway;

/// A gateway started in-process: its listeners bound, its workers running.
pub struct Server {
    current: Arc<server::Current>,
    urls: Vec<String>,
    admin: Option<SocketAddr>,
    forwards: Vec<(String, String)>,
}

impl Server {
    /// Binds every listener (and the admin listener), then starts serving
    /// on worker threads; health checks, housekeeping and the admin listener
    /// run on the caller's Tokio runtime.
    pub async fn start(config: config::Config) -> anyhow::Result<Server> {
        use anyhow::Context as _;
        let bound = server::bind(&config).await?;
        let urls = bound.iter().map(server::Bound::url).collect();
        let admin = match &config.admin {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen on admin address {addr}"))?,
            ),
            None => None,
        };
        let mut bound = bound;
        let mut forward_urls = vec![];
        for b in server::bind_forwards(&config).await? {
            if let server::Kind::Forward(f) = &b.kind {
                forward_urls.push((b.url(), f.to.to_string()));
            }
            bound.push(b);
        }
        let mut udp = vec![];
        for f in config.tunnel.forwards.iter().filter(|f| f.udp) {
            let b = tunnel::forward::Bound::bind(f)
                .await
                .with_context(|| format!("cannot listen on {} (forward)", f.listen))?;
            forward_urls.push((b.url()?, f.to.to_string()));
            udp.push((b, f.clone()));
        }
        let gateway = Gateway::new(config)?;
        for (b, f) in udp {
            let tunnel = gateway.tunnel.clone().expect("forwards need the tunnel");
            let (stop, tracker) = (gateway.shutdown.clone(), gateway.tracker.clone());
            gateway
                .tracker
                .spawn(tunnel::forward::serve(b, f, tunnel, stop, tracker));
        }
        let admin = match admin {
            Some(l) => {
                let addr = l.local_addr()?;
                let (m, s) = (gateway.metrics.clone(), gateway.shutdown.clone());
                let pages = gateway.admin_pages();
                gateway.tracker.spawn(metrics::serve_admin(l, m, pages, s));
                Some(addr)
            }
            None => None,
        };
        if let Some(c) = &gateway.cluster {
            c.start().await;
        }
        let current = server::Current::new(gateway.clone());
        gateway.serve(bound, &current);
        Ok(Server {
            current,
            urls,
            admin,
            forwards: forward_urls,
        })
    }

    /// `ws://HOST:PORT` (or `wss://`) per listener, with the real ports.
    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    /// Each `--forward` listener's URL (`tcp://HOST:PORT`, `udp://…`, real
    /// ports) and where it goes (`agent://ID/PEER`).
    pub fn forwards(&self) -> &[(String, String)] {
        &self.forwards
    }

    /// The admin listener's address, if there is one.
    pub fn admin(&self) -> Option<SocketAddr> {
        self.admin
    }

    /// The gateway new connections take now.
    pub fn gateway(&self) -> Arc<Gateway> {
        self.current.load()
    }

    /// Replaces the running settings with `config`'s, keeping every
    /// established connection (see `gateway.rs`: what a reload keeps, and
    /// what it cannot change). On `Err` the running settings stay.
    pub fn reload(&self, config: config::Config) -> anyhow::Result<()> {
        let next = self.current.load().reload(config)?;
        next.spawn_background();
        self.current.replace(next);
        Ok(())
    }

    /// Stops accepting, closes every WebSocket with 1001 and waits (bounded
    /// by the drain timeout) for them to finish.
    pub async fn stop(self) {
        self.current.load().shutdown().await
    }
}

/// Runs a gateway until `shutdown` completes, then shuts it down in order
/// (mini-redis's `server::run`).
pub async fn run(config: config::Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let server = Server::start(config).await?;
    shutdown.await;
    tracing::info!(open = server.gateway().active(), "shutting down");
    server.stop().await;
    Ok(())
}
