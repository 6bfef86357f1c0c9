//! The wsgate reverse tunnel's wire format, version 1 (`docs/tunnel.md` of
//! this repository), sans-IO: bytes in, values out, no runtime.
//!
//! * [`proto`]: the agent's registration headers, destinations, the open
//!   request that starts every stream and its reply, datagram framing;
//! * [`allow`]: allow patterns (an agent's `--allow`, the gateway's
//!   `--mux-allow`);
//! * [`IpNet`]: address blocks, which the patterns (and the gateway's
//!   trusted proxies) use.

pub mod allow;
mod net;
pub mod proto;
pub mod tokens;

pub use net::IpNet;
