//! The bridge: a WebSocket client on one side, a TCP, UDP or Unix peer (or
//! the built-in `echo:`) on the other, with a framing function cutting the
//! peer's bytes into messages.
//!
//! * [`peer`]: connecting to a peer before the handshake is answered;
//! * [`relay`]: moving one upgraded WebSocket's data to and from its peer.

pub mod peer;
pub mod relay;
