//! The reverse tunnel's gateway side: agents behind NAT dial out and
//! register under an id; the gateway relays HTTP requests, TCP connections
//! and UDP flows through them, each as one wsmux stream (`docs/tunnel.md`).
//!
//! * [`proto`]: the wire format (registration headers, destinations, open
//!   requests and replies, datagram framing), shared with `wsgate agent`;
//! * [`allow`]: allow patterns (`--allow`, `--mux-allow`).

pub mod allow;
pub mod proto;
