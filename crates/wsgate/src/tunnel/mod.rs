//! The reverse tunnel's gateway side: agents behind NAT dial out and
//! register under an id; the gateway relays HTTP requests, TCP connections
//! and UDP flows through them, each as one wsmux stream (`docs/tunnel.md`).
//!
//! The wire format and the allow patterns are the `wsgate-tunnel` crate's
//! (sans-IO, shared with `wsgate agent` and the fuzz targets), re-exported
//! here as [`proto`] and [`allow`].

pub use wsgate_tunnel::{allow, proto};
