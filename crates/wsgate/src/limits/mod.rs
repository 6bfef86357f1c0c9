//! Admission control before the upgrade, and a bandwidth cap after it.
//!
//! WebSocket endpoints are a favourite flood target: a handshake is cheap for
//! the client and costs the gateway a backend connection. [`Admission`] is the
//! one gate every handshake passes before any backend is touched. It applies,
//! in this order:
//!
//! 1. a per-client new-connection **rate** ([`RateSpec`], a GCRA limiter), also
//!    applied to plain HTTP requests through [`Admission::check_rate`];
//! 2. a **global cap** on open WebSockets;
//! 3. a per-client cap on **concurrent** WebSockets.
//!
//! A passed handshake holds a [`Permit`]; dropping it gives both slots back. A
//! refused one gets a [`Refusal`], which knows its HTTP status (429 with
//! `Retry-After`, or 503) and its metrics label.
//!
//! # Gates per listener and per route
//!
//! [`Gates`] puts the gateway's [`Admission`] together with one of its own for
//! every listener and route that sets admission limits ([`ScopeLimits`]:
//! `[listener.limits]`, `[route.limits]`). Each gate counts only what it
//! admitted. For a handshake on route R that came in on listener L:
//!
//! - the gateway's cap, L's cap and R's cap all apply (caps only add up);
//! - the per-client rate is the most specific one set — R's, else L's, else the
//!   gateway's — like every other per-connection limit; likewise, and on its
//!   own, the per-client cap. So a route can be stricter *or* more generous
//!   than the default, and counts its own clients in a table of its own.
//!
//! # Who is a client
//!
//! An IPv4 client is its address; an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`,
//! as dual-stack sockets report IPv4 peers) is that IPv4 address. An IPv6
//! client is its **/64**: one subscriber usually gets a whole /64 (or more) and
//! can pick any address in it, so keying on the full address would let a single
//! host walk past every per-client limit.
//!
//! # Bounded state
//!
//! Nothing here grows with the number of addresses that ever knocked:
//!
//! - The rate limiter remembers one theoretical arrival time (8 bytes) per
//!   client, in a table capped at [`DEFAULT_MAX_TRACKED_IPS`] entries (see
//!   [`Admission::with_max_tracked_ips`]). An entry whose arrival time has
//!   passed has recovered its whole burst: it says nothing a fresh entry would
//!   not, so it is forgotten — on a sweep at most once a second per shard, and
//!   whenever the table is full. If the table is still nearly full after that
//!   (a flood of distinct addresses within one burst period), the entries
//!   closest to recovery are evicted, an eighth of the table at a time, so the
//!   cost stays amortised O(1) per handshake. Evicting the entries nearest to
//!   recovery keeps the heavy hitters, which have the furthest arrival times:
//!   a flooding client stays limited while a spray of one-shot addresses
//!   passes through. The price is that an evicted client may get a fresh
//!   burst early; that is the right failure (the global cap still holds),
//!   where refusing unknown clients would let an attacker lock everyone out.
//! - Per-client connection counters exist only while the client has an open
//!   WebSocket, so there are at most as many as the global cap.
//!
//! The tables are sharded mutexes over `std`'s SipHash `HashMap`, whose random
//! keys keep attacker-chosen addresses from colliding on purpose.
//!
//! Why not `governor`: its keyed store can forget recovered keys
//! (`retain_recent`), but cannot cap how many keys it holds. A flood of
//! distinct addresses inside one burst period has nothing recovered to forget,
//! and the map would grow by one entry per address. The GCRA itself is a few
//! lines, so it lives here with the eviction policy it needs.
//!
//! # Time
//!
//! Time is [`tokio::time::Instant`], so tests that pause tokio's clock control
//! the limiter too. [`Admission::admit_at`] and [`Admission::check_rate_at`]
//! take the instant explicitly; the plain methods read the clock.
//!
//! # Bandwidth
//!
//! [`Bandwidth`] is a per-connection token bucket owned by one relay task: no
//! locks, no allocation. It answers how long to wait before sending the next
//! chunk, so the relay stops reading from the fast side and TCP back-pressure
//! does the rest. [`SharedBandwidth`] is one cap for several connections (a
//! subject's `per_identity_bandwidth`); [`Pace`] is what one direction of a
//! connection obeys: its own cap, its subject's, or both. [`Throttle`] puts
//! a pace on a poll-based copy (the tunnel's splices) and [`PacedBody`] on
//! an HTTP body, each moving at most [`PACED_CHUNK`] bytes before paying.

mod admission;
mod bandwidth;
pub mod identity;

#[allow(unused_imports)] // the rest of the limiter's API, for tests and docs
pub use admission::{Admission, Permit, Refusal, Scope, DEFAULT_MAX_TRACKED_IPS};
pub use admission::{AdmissionConfig, Gates, Permits};
#[allow(unused_imports)] // the per-connection cap, used through `Pace`
pub use bandwidth::Bandwidth;
pub use bandwidth::{Pace, PacedBody, SharedBandwidth, Throttle, PACED_CHUNK};
