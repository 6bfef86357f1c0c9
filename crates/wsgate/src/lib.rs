//! wsgate — a WebSocket gateway.
//!
//! The modules follow a connection's life: [`listener`] accepts and speaks
//! HTTP, [`handshake`] checks the upgrade request, [`route`] picks a route and
//! subprotocol, [`discovery`] finds a peer from handshake metadata,
//! [`upstream`] connects it, and [`relay`] moves the data with the framing
//! functions of the `wsgate-framing` crate. [`config`] is the one typed
//! configuration, parsed and validated before anything starts.

pub mod backend;
pub mod cli;
pub mod config;
pub mod discovery;
pub mod handshake;
pub mod http1;
pub mod limits;
pub mod listener;
pub mod metrics;
pub mod passthrough;
pub mod proxy;
pub mod relay;
pub mod route;
pub mod tls;
pub mod upstream;
pub mod websocket;
