//! The gates every request passes before the upgrade (see the module docs
//! of [`crate::limits`]).

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::fmt;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use http::StatusCode;
use tokio::time::Instant;

use crate::config::{RateSpec, ScopeLimits};
pub use crate::error::Scope;
use crate::error::{Error, Kind, Side};

/// Default cap on the number of clients the rate limiter remembers at once
/// (about 3 MiB of table at most).
pub const DEFAULT_MAX_TRACKED_IPS: usize = 100_000;

/// `Retry-After` suggested for refusals that are not rate-based (caps).
const CAP_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Most shards per table; a table gets one shard per 4096 tracked clients.
const MAX_SHARDS: usize = 16;

/// Each shard forgets recovered clients at most this often (on access).
const SWEEP_EVERY_NS: u64 = 1_000_000_000;

/// What a full cap of `scope` says.
fn full(scope: Scope) -> &'static str {
    match scope {
        Scope::Gateway => "too many open WebSockets",
        Scope::Listener => "too many open WebSockets on this listener",
        Scope::Route => "too many open WebSockets on this route",
    }
}

/// What [`Admission`] enforces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdmissionConfig {
    /// New WebSocket handshakes and plain HTTP requests per client.
    pub per_ip_rate: Option<RateSpec>,
    /// Concurrent WebSockets per client.
    pub per_ip_max_connections: Option<usize>,
    /// Concurrent WebSockets in all.
    pub max_connections: usize,
}

impl Default for AdmissionConfig {
    /// No per-client limits; 10,000 WebSockets in all.
    fn default() -> Self {
        Self {
            per_ip_rate: None,
            per_ip_max_connections: None,
            max_connections: 10_000,
        }
    }
}

/// Why a handshake (or request) was refused before the upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The client opens connections faster than its [`RateSpec`] allows.
    #[error("too many new connections from this client; retry in {retry_after:?}")]
    RateLimited { retry_after: Duration },
    /// The client already has its share of open WebSockets.
    #[error("too many open WebSockets from this client")]
    TooManyFromIp,
    /// The gateway, or a listener or route with a cap of its own, has as
    /// many open WebSockets as its `max_connections` allows.
    #[error("{}", full(*scope))]
    Full { scope: Scope },
}

impl Refusal {
    /// Its error kind, which says its status and label (see [`crate::error`]).
    pub fn kind(&self) -> Kind {
        match self {
            Refusal::RateLimited { .. } => Kind::RateLimited,
            Refusal::TooManyFromIp => Kind::TooManyFromClient,
            Refusal::Full { scope } => Kind::Full(*scope),
        }
    }

    /// 429 Too Many Requests for a client's own excess, 503 for a full cap.
    pub fn status(&self) -> StatusCode {
        self.kind().status()
    }

    /// Label for `wsgate_handshake_refusals_total{reason=...}`.
    pub fn reason(&self) -> &'static str {
        self.kind().label().unwrap_or("refused")
    }

    /// When trying again may succeed: exact for the rate, a 1 s hint for caps.
    pub fn retry_after(&self) -> Duration {
        match self {
            Refusal::RateLimited { retry_after } => *retry_after,
            Refusal::TooManyFromIp | Refusal::Full { .. } => CAP_RETRY_AFTER,
        }
    }

    /// [`retry_after`](Self::retry_after) in whole seconds, rounded up and at
    /// least 1: the value of the `Retry-After` header.
    pub fn retry_after_secs(&self) -> u64 {
        Error::from(*self).retry_after_secs().unwrap_or(1)
    }
}

impl From<Refusal> for Error {
    fn from(r: Refusal) -> Error {
        let side = match r {
            Refusal::Full { .. } => Side::Gateway,
            _ => Side::Client,
        };
        Error::new(r.kind(), side, r.to_string()).retry_after(r.retry_after())
    }
}

/// The key a client is limited by: an IPv4 address or an IPv6 /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum ClientKey {
    V4(u32),
    V6(u64),
}

impl From<IpAddr> for ClientKey {
    fn from(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => ClientKey::V4(v4.into()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => ClientKey::V4(v4.into()),
                None => ClientKey::V6((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

/// GCRA parameters, in nanoseconds: emission interval and burst tolerance.
#[derive(Debug, Clone, Copy)]
struct Gcra {
    interval: u64,
    tolerance: u64,
}

impl Gcra {
    fn new(spec: &RateSpec) -> Self {
        let interval = spec.interval_ns();
        Self {
            interval,
            tolerance: interval.saturating_mul(u64::from(spec.burst() - 1)),
        }
    }

    /// One event at `now` against theoretical arrival time `tat`: conforming
    /// events push `tat` one interval on; others leave it and say how long
    /// until one would conform.
    fn update(&self, tat: &mut u64, now: u64) -> Result<(), u64> {
        let base = (*tat).max(now);
        let earliest = base.saturating_sub(self.tolerance);
        if earliest > now {
            return Err(earliest - now);
        }
        *tat = base.saturating_add(self.interval);
        Ok(())
    }
}

/// One shard of the rate table.
#[derive(Default)]
struct RateShard {
    /// Theoretical arrival time per client, in ns since `Inner::origin`.
    /// An entry at or before now has recovered its burst.
    tats: HashMap<ClientKey, u64>,
    last_sweep: u64,
    /// Reused when choosing what to evict; never longer than the shard's cap.
    scratch: Vec<u64>,
}

impl RateShard {
    fn check(&mut self, key: ClientKey, now: u64, gcra: &Gcra, cap: usize) -> Result<(), u64> {
        if now.saturating_sub(self.last_sweep) >= SWEEP_EVERY_NS {
            self.forget_recovered(now);
        }
        if let Some(tat) = self.tats.get_mut(&key) {
            return gcra.update(tat, now);
        }
        let mut tat = now;
        gcra.update(&mut tat, now)?;
        if self.tats.len() >= cap {
            self.make_room(now, cap);
        }
        self.tats.insert(key, tat);
        Ok(())
    }

    fn forget_recovered(&mut self, now: u64) {
        self.last_sweep = now;
        self.tats.retain(|_, tat| *tat > now);
        shrink_if_sparse(&mut self.tats);
    }

    /// Brings the shard to 7/8 of `cap`: recovered entries first, then those
    /// closest to recovering (smallest arrival time).
    fn make_room(&mut self, now: u64, cap: usize) {
        self.forget_recovered(now);
        let target = cap - (cap / 8).max(1);
        let Some(excess) = self.tats.len().checked_sub(target).filter(|&n| n > 0) else {
            return;
        };
        self.scratch.clear();
        self.scratch.extend(self.tats.values().copied());
        let (_, &mut threshold, _) = self.scratch.select_nth_unstable(excess - 1);
        let below = self.scratch.iter().filter(|&&t| t < threshold).count();
        let mut equal_to_drop = excess - below;
        self.tats.retain(|_, &mut tat| {
            if tat < threshold {
                false
            } else if tat == threshold && equal_to_drop > 0 {
                equal_to_drop -= 1;
                false
            } else {
                true
            }
        });
        self.scratch.clear();
    }
}

/// Gives memory back after a flood: a table at a quarter of its capacity or
/// less is halved.
fn shrink_if_sparse<V>(map: &mut HashMap<ClientKey, V>) {
    let len = map.len();
    if map.capacity() > 1024 && map.capacity() > len.saturating_mul(4) {
        map.shrink_to(len.saturating_mul(2));
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while holding these locks; if something did, the maps
    // are still consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Aligned, and with `open` padded: every admitted WebSocket, on any worker,
/// bumps the `Arc`'s count and `open`; the rest is read on every handshake.
#[repr(align(128))]
struct Inner {
    origin: Instant,
    gcra: Option<Gcra>,
    shard_of: RandomState,
    rate_shards: Box<[Mutex<RateShard>]>,
    per_shard_cap: usize,
    per_ip_max: Option<usize>,
    conn_shards: Box<[Mutex<HashMap<ClientKey, usize>>]>,
    max_connections: usize,
    open: crossbeam_utils::CachePadded<AtomicUsize>,
    config: AdmissionConfig,
    #[cfg_attr(not(test), allow(dead_code))] // reported to tests
    max_tracked: usize,
    scope: Scope,
}

impl Inner {
    fn shard(&self, key: &ClientKey) -> usize {
        // Both tables have the same number of shards.
        (self.shard_of.hash_one(key) % self.rate_shards.len() as u64) as usize
    }

    fn nanos(&self, now: Instant) -> u64 {
        let ns = now.saturating_duration_since(self.origin).as_nanos();
        u64::try_from(ns).unwrap_or(u64::MAX)
    }

    fn check_rate(&self, key: ClientKey, now: Instant) -> Result<(), Refusal> {
        let Some(gcra) = &self.gcra else {
            return Ok(());
        };
        let now = self.nanos(now);
        let mut shard = lock(&self.rate_shards[self.shard(&key)]);
        shard
            .check(key, now, gcra, self.per_shard_cap)
            .map_err(|ns| Refusal::RateLimited {
                retry_after: Duration::from_nanos(ns),
            })
    }

    fn release(&self, key: Option<ClientKey>) {
        if let Some(key) = key {
            let mut conns = lock(&self.conn_shards[self.shard(&key)]);
            if let Some(n) = conns.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    conns.remove(&key);
                    shrink_if_sparse(&mut conns);
                }
            }
        }
        self.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The admission gate, shared by every connection (cheap to clone).
#[derive(Clone)]
pub struct Admission {
    inner: Arc<Inner>,
}

impl fmt::Debug for Admission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admission")
            .field("config", &self.inner.config)
            .field("open", &self.open())
            .finish_non_exhaustive()
    }
}

impl Admission {
    /// A gate remembering at most [`DEFAULT_MAX_TRACKED_IPS`] clients.
    pub fn new(cfg: AdmissionConfig) -> Self {
        Self::with_max_tracked_ips(cfg, DEFAULT_MAX_TRACKED_IPS)
    }

    /// A gate whose rate limiter remembers at most `max_tracked_ips` clients
    /// (at least 1).
    pub fn with_max_tracked_ips(cfg: AdmissionConfig, max_tracked_ips: usize) -> Self {
        Self::build(cfg, max_tracked_ips, Scope::Gateway)
    }

    /// The gate of one listener or route: its own per-client limits, and a cap
    /// on what it lets in (none when `max_connections` is unset).
    pub fn scoped(scope: Scope, limits: &ScopeLimits) -> Self {
        let cfg = AdmissionConfig {
            per_ip_rate: limits.per_ip_rate,
            per_ip_max_connections: limits.per_ip_max_connections,
            max_connections: limits.max_connections.unwrap_or(usize::MAX),
        };
        Self::build(cfg, DEFAULT_MAX_TRACKED_IPS, scope)
    }

    fn build(cfg: AdmissionConfig, max_tracked_ips: usize, scope: Scope) -> Self {
        let max_tracked = max_tracked_ips.max(1);
        let shards = (max_tracked / 4096).clamp(1, MAX_SHARDS);
        Self {
            inner: Arc::new(Inner {
                origin: Instant::now(),
                gcra: cfg.per_ip_rate.as_ref().map(Gcra::new),
                shard_of: RandomState::new(),
                rate_shards: (0..shards).map(|_| Mutex::default()).collect(),
                per_shard_cap: max_tracked / shards,
                per_ip_max: cfg.per_ip_max_connections,
                conn_shards: (0..shards).map(|_| Mutex::default()).collect(),
                max_connections: cfg.max_connections,
                open: Default::default(),
                config: cfg,
                max_tracked,
                scope,
            }),
        }
    }

    /// Admits a new WebSocket handshake from `ip`, before any backend is
    /// connected. Keep the [`Permit`] for as long as the WebSocket is open.
    #[cfg(test)]
    pub fn admit(&self, ip: IpAddr) -> Result<Permit, Refusal> {
        self.admit_at(ip, Instant::now())
    }

    /// [`admit`](Self::admit) at an explicit instant.
    #[cfg(test)]
    pub fn admit_at(&self, ip: IpAddr, now: Instant) -> Result<Permit, Refusal> {
        self.admit_checking(ClientKey::from(ip), now, true, true)
    }

    /// Checks the cap, the rate when `rate`, and the per-client cap when
    /// `per_ip`; see [`Gates`] for who checks what.
    fn admit_checking(
        &self,
        key: ClientKey,
        now: Instant,
        rate: bool,
        per_ip: bool,
    ) -> Result<Permit, Refusal> {
        let inner = &self.inner;
        if rate {
            inner.check_rate(key, now)?;
        }
        inner
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < inner.max_connections).then_some(n + 1)
            })
            .map_err(|_| Refusal::Full { scope: inner.scope })?;
        // From here on, dropping `permit` gives the slot back.
        let mut permit = Permit {
            inner: Arc::clone(inner),
            key: None,
        };
        if let (Some(max), true) = (inner.per_ip_max, per_ip) {
            let mut conns = lock(&inner.conn_shards[inner.shard(&key)]);
            let n = conns.get(&key).copied().unwrap_or(0);
            if n >= max {
                return Err(Refusal::TooManyFromIp);
            }
            conns.insert(key, n + 1);
            permit.key = Some(key);
        }
        Ok(permit)
    }

    /// The rate check alone at an explicit instant: no concurrency slot
    /// (plain HTTP requests pass [`Gates::check_rate`]).
    #[cfg(test)]
    pub fn check_rate_at(&self, ip: IpAddr, now: Instant) -> Result<(), Refusal> {
        self.inner.check_rate(ClientKey::from(ip), now)
    }

    /// WebSockets open now (permits alive).
    pub fn open(&self) -> usize {
        self.inner.open.load(Ordering::Acquire)
    }

    /// Clients the rate limiter remembers now; never more than
    /// [`max_tracked_ips`](Self::max_tracked_ips).
    pub fn tracked_ips(&self) -> usize {
        self.inner
            .rate_shards
            .iter()
            .map(|s| lock(s).tats.len())
            .sum()
    }

    /// The cap on [`tracked_ips`](Self::tracked_ips).
    #[cfg(test)]
    pub fn max_tracked_ips(&self) -> usize {
        self.inner.max_tracked
    }

    /// What this gate enforces.
    pub fn config(&self) -> &AdmissionConfig {
        &self.inner.config
    }

    /// Forgets every client that has recovered its burst. Not needed for the
    /// bound (the tables sweep themselves as they are used); a periodic call
    /// gives memory back sooner after a flood when traffic stops.
    pub fn purge(&self) {
        let now = self.inner.nanos(Instant::now());
        for shard in self.inner.rate_shards.iter() {
            lock(shard).forget_recovered(now);
        }
    }

    /// Clients with an open WebSocket counted against the per-client cap.
    #[cfg(test)]
    fn clients_with_connections(&self) -> usize {
        self.inner.conn_shards.iter().map(|s| lock(s).len()).sum()
    }
}

/// One admitted WebSocket: holds a global slot and, when a per-client cap is
/// set, one of the client's slots; dropping it releases both.
pub struct Permit {
    inner: Arc<Inner>,
    key: Option<ClientKey>,
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit").field("key", &self.key).finish()
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.inner.release(self.key.take());
    }
}

/// The gateway's gate and those of the listeners and routes that set
/// admission limits of their own (see the module docs for who checks what).
#[derive(Debug)]
pub struct Gates {
    gateway: Admission,
    /// By listener index; `None` where a listener sets no admission limit.
    listeners: Vec<Option<Admission>>,
    /// By route index, likewise.
    routes: Vec<Option<Admission>>,
}

/// What one admitted WebSocket holds: a [`Permit`] of every gate it passed.
#[derive(Debug)]
pub struct Permits {
    _gateway: Permit,
    /// Empty (and not allocated) unless a listener or route has a gate.
    _scoped: Vec<Permit>,
    /// The authenticated subject's slot (`per_identity_*`), if counted.
    _identity: Option<super::identity::IdentityPermit>,
}

impl Permits {
    /// The same permits, holding `slot` too.
    pub fn hold(mut self, slot: Option<super::identity::IdentityPermit>) -> Permits {
        if slot.is_some() {
            self._identity = slot;
        }
        self
    }
}

impl Gates {
    /// `listeners` and `routes` are the limits each sets, by index.
    pub fn new(
        gateway: AdmissionConfig,
        listeners: &[ScopeLimits],
        routes: &[ScopeLimits],
    ) -> Self {
        let scoped = |scope, all: &[ScopeLimits]| -> Vec<Option<Admission>> {
            if !all.iter().any(ScopeLimits::sets_any) {
                return vec![];
            }
            all.iter()
                .map(|l| l.sets_any().then(|| Admission::scoped(scope, l)))
                .collect()
        };
        Self {
            gateway: Admission::new(gateway),
            listeners: scoped(Scope::Listener, listeners),
            routes: scoped(Scope::Route, routes),
        }
    }

    /// The gateway-wide gate.
    pub fn gateway(&self) -> &Admission {
        &self.gateway
    }

    /// Whether some route has a gate: only then does [`admit`](Self::admit)
    /// need to know the route.
    pub fn per_route(&self) -> bool {
        !self.routes.is_empty()
    }

    /// The gates a connection on `listener` to `route` passes, the gateway's
    /// first.
    fn chain(&self, listener: usize, route: Option<usize>) -> [Option<&Admission>; 3] {
        [
            Some(&self.gateway),
            self.listeners.get(listener).and_then(Option::as_ref),
            route.and_then(|r| self.routes.get(r)?.as_ref()),
        ]
    }

    /// Which gate of `chain` owns a per-client limit: the most specific one
    /// that sets it (the gateway's when none does).
    fn owner(chain: &[Option<&Admission>; 3], sets: fn(&AdmissionConfig) -> bool) -> usize {
        chain
            .iter()
            .rposition(|g| g.is_some_and(|g| sets(g.config())))
            .unwrap_or(0)
    }

    /// Admits a WebSocket handshake from `ip` that came in on `listener` and
    /// was routed to `route` (indexes; `route` may be `None` when
    /// [`per_route`](Self::per_route) is false).
    pub fn admit(
        &self,
        ip: IpAddr,
        listener: usize,
        route: Option<usize>,
    ) -> Result<Permits, Refusal> {
        let now = Instant::now();
        let key = ClientKey::from(ip);
        let chain = self.chain(listener, route);
        let rate_owner = Self::owner(&chain, |c| c.per_ip_rate.is_some());
        let per_ip_owner = Self::owner(&chain, |c| c.per_ip_max_connections.is_some());
        let pass = |i: usize, gate: &Admission| {
            gate.admit_checking(key, now, i == rate_owner, i == per_ip_owner)
        };
        let gateway = pass(0, &self.gateway)?;
        let mut scoped = Vec::new();
        for (i, gate) in chain.iter().enumerate().skip(1) {
            if let Some(gate) = gate {
                scoped.push(pass(i, gate)?);
            }
        }
        Ok(Permits {
            _gateway: gateway,
            _scoped: scoped,
            _identity: None,
        })
    }

    /// Admits a connection that has no listener or route limits of its own
    /// (a `--forward` listener's): the gateway's gate alone.
    pub fn admit_gateway(&self, ip: IpAddr) -> Result<Permits, Refusal> {
        self.admit(ip, usize::MAX, None)
    }

    /// The rate check alone, for a plain HTTP request on `listener` routed to
    /// `route`: the most specific rate set applies.
    pub fn check_rate(
        &self,
        ip: IpAddr,
        listener: usize,
        route: Option<usize>,
    ) -> Result<(), Refusal> {
        let chain = self.chain(listener, route);
        let owner =
            chain[Self::owner(&chain, |c| c.per_ip_rate.is_some())].unwrap_or(&self.gateway);
        owner.inner.check_rate(ClientKey::from(ip), Instant::now())
    }

    fn all(&self) -> impl Iterator<Item = &Admission> {
        std::iter::once(&self.gateway).chain(self.listeners.iter().chain(&self.routes).flatten())
    }

    /// Forgets recovered clients in every gate ([`Admission::purge`]).
    pub fn purge(&self) {
        self.all().for_each(Admission::purge);
    }

    /// Clients the rate limiters remember now, over every gate.
    pub fn tracked_ips(&self) -> usize {
        self.all().map(Admission::tracked_ips).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn v4(n: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(n))
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn rate(s: &str) -> AdmissionConfig {
        AdmissionConfig {
            per_ip_rate: Some(s.parse().unwrap()),
            ..AdmissionConfig::default()
        }
    }

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn gcra_allows_the_burst_then_refuses_with_retry_after() {
        let a = Admission::new(rate("5/s burst 10"));
        let t0 = Instant::now();
        let c = v4(1);
        for i in 0..10 {
            assert!(a.check_rate_at(c, t0).is_ok(), "request {i}");
        }
        let r = a.check_rate_at(c, t0).unwrap_err();
        assert_eq!(
            r,
            Refusal::RateLimited {
                retry_after: 200 * MS
            }
        );
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.retry_after_secs(), 1);
        // 150 ms later: still 50 ms to go.
        assert_eq!(
            a.check_rate_at(c, t0 + 150 * MS).unwrap_err().retry_after(),
            50 * MS
        );
        // One interval on: exactly one more.
        assert!(a.check_rate_at(c, t0 + 200 * MS).is_ok());
        assert!(a.check_rate_at(c, t0 + 200 * MS).is_err());
        // Average rate holds: one per 200 ms.
        for k in 2..20u32 {
            assert!(a.check_rate_at(c, t0 + 200 * MS * k).is_ok(), "tick {k}");
            assert!(a.check_rate_at(c, t0 + 200 * MS * k).is_err(), "tick {k}");
        }
        // Idle past the last arrival time: the whole burst is back.
        let later = t0 + Duration::from_secs(6);
        for _ in 0..10 {
            assert!(a.check_rate_at(c, later).is_ok());
        }
        assert!(a.check_rate_at(c, later).is_err());
    }

    #[test]
    fn flood_from_one_address_is_refused_while_another_is_admitted() {
        let a = Admission::new(rate("20/s burst 40"));
        let t0 = Instant::now();
        let (flooder, other) = (ip("192.0.2.1"), ip("198.51.100.7"));
        let mut admitted = 0;
        let mut permits = vec![];
        for i in 0..10_000u32 {
            // 10,000 handshakes over one second.
            let now = t0 + Duration::from_micros(u64::from(i) * 100);
            match a.admit_at(flooder, now) {
                Ok(p) => {
                    admitted += 1;
                    permits.push(p);
                }
                Err(r) => assert_eq!(r.reason(), "rate_limited"),
            }
            if i % 1000 == 0 {
                permits.push(a.admit_at(other, now).expect("the other client is served"));
            }
        }
        // Burst of 40, plus 20 more over the second.
        assert!((40..=61).contains(&admitted), "{admitted}");
        assert_eq!(a.open(), admitted + 10);
        drop(permits);
        assert_eq!(a.open(), 0);
    }

    #[test]
    fn a_million_distinct_addresses_stay_under_the_cap() {
        let a = Admission::new(rate("1/s burst 2"));
        let cap = a.max_tracked_ips();
        assert_eq!(cap, DEFAULT_MAX_TRACKED_IPS);
        let t0 = Instant::now();
        let heavy = ip("203.0.113.9");
        assert!(a.check_rate_at(heavy, t0).is_ok());
        assert!(a.check_rate_at(heavy, t0).is_ok());
        let mut max_seen = 0;
        for i in 0..1_000_000u32 {
            // All within one burst period: nothing recovers, eviction must.
            let now = t0 + Duration::from_nanos(u64::from(i));
            // Every distinct address is admitted once.
            assert!(a.check_rate_at(v4(0x0a00_0000 + i), now).is_ok());
            if i % 10_000 == 0 {
                max_seen = max_seen.max(a.tracked_ips());
                // The heavy hitter is never the one evicted.
                assert!(a.check_rate_at(heavy, now).is_err(), "at {i}");
            }
        }
        max_seen = max_seen.max(a.tracked_ips());
        assert!(max_seen <= cap, "{max_seen} > {cap}");
        assert!(max_seen > cap / 2, "the table is used: {max_seen}");
        // Once everyone has recovered, a sweep forgets them all.
        let recovered = t0 + Duration::from_secs(10);
        assert!(a.inner.rate_shards.len() > 1, "sharded");
        for s in a.inner.rate_shards.iter() {
            lock(s).forget_recovered(a.inner.nanos(recovered));
        }
        assert_eq!(a.tracked_ips(), 0);
    }

    #[test]
    fn a_flood_of_distinct_ipv6_prefixes_stays_under_a_small_cap() {
        let a = Admission::with_max_tracked_ips(rate("10/s"), 1000);
        let t0 = Instant::now();
        for i in 0..200_000u64 {
            let addr = Ipv6Addr::from((u128::from(0x2001_0db8_0000_0000 + i)) << 64 | 1);
            assert!(a.check_rate_at(IpAddr::V6(addr), t0).is_ok());
            assert!(a.tracked_ips() <= 1000);
        }
        assert!(a.tracked_ips() > 500);
    }

    #[test]
    fn recovered_clients_are_forgotten_as_the_table_is_used() {
        let a = Admission::with_max_tracked_ips(rate("10/s burst 5"), 1000);
        let t0 = Instant::now();
        for i in 0..500 {
            a.check_rate_at(v4(i), t0).unwrap();
        }
        assert_eq!(a.tracked_ips(), 500);
        // 100 ms: each has recovered (one request, one 100 ms interval), but
        // the next sweep is due only a second after the last one.
        a.check_rate_at(v4(9999), t0 + 100 * MS).unwrap();
        assert_eq!(a.tracked_ips(), 501);
        a.check_rate_at(v4(9999), t0 + Duration::from_secs(2))
            .unwrap();
        assert_eq!(a.tracked_ips(), 1, "only the one just seen");
    }

    #[test]
    fn ipv6_clients_are_keyed_on_their_64() {
        let a = Admission::new(rate("1/m burst 2"));
        let t0 = Instant::now();
        assert!(a.check_rate_at(ip("2001:db8:1:2::1"), t0).is_ok());
        assert!(a
            .check_rate_at(ip("2001:db8:1:2:ffff:ffff:ffff:ffff"), t0)
            .is_ok());
        assert!(a.check_rate_at(ip("2001:db8:1:2:abcd::9"), t0).is_err());
        // The neighbouring /64 is someone else.
        assert!(a.check_rate_at(ip("2001:db8:1:3::1"), t0).is_ok());
        // IPv4-mapped addresses are the IPv4 client.
        assert!(a.check_rate_at(ip("192.0.2.1"), t0).is_ok());
        assert!(a.check_rate_at(ip("::ffff:192.0.2.1"), t0).is_ok());
        assert!(a.check_rate_at(ip("192.0.2.1"), t0).is_err());
        assert_eq!(a.tracked_ips(), 3);
    }

    #[test]
    fn per_ip_cap_releases_on_drop_and_forgets_idle_clients() {
        let a = Admission::new(AdmissionConfig {
            per_ip_max_connections: Some(2),
            ..AdmissionConfig::default()
        });
        let (x, y) = (ip("192.0.2.1"), ip("2001:db8::1"));
        let p1 = a.admit(x).unwrap();
        let p2 = a.admit(x).unwrap();
        let r = a.admit(x).unwrap_err();
        assert_eq!(r, Refusal::TooManyFromIp);
        assert_eq!(
            (r.status(), r.reason()),
            (StatusCode::TOO_MANY_REQUESTS, "per_ip_cap")
        );
        assert_eq!(a.open(), 2, "a refusal holds no global slot");
        let q1 = a.admit(y).unwrap();
        let q2 = a.admit(ip("2001:db8::2")).unwrap();
        assert!(a.admit(y).is_err(), "same /64");
        assert_eq!(a.clients_with_connections(), 2);
        drop(p1);
        let p3 = a.admit(x).unwrap();
        drop((p2, p3, q1));
        assert_eq!(a.clients_with_connections(), 1);
        drop(q2);
        assert_eq!(a.clients_with_connections(), 0);
        assert_eq!(a.open(), 0);
        assert_eq!(a.tracked_ips(), 0, "no rate configured, nothing tracked");
    }

    #[test]
    fn global_cap_is_503_and_frees_on_drop() {
        let a = Admission::new(AdmissionConfig {
            max_connections: 3,
            per_ip_max_connections: Some(10),
            ..AdmissionConfig::default()
        });
        let permits: Vec<_> = (0..3).map(|i| a.admit(v4(i)).unwrap()).collect();
        let r = a.admit(v4(7)).unwrap_err();
        assert_eq!(
            r,
            Refusal::Full {
                scope: Scope::Gateway
            }
        );
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!((r.reason(), r.retry_after_secs()), ("global_cap", 1));
        assert_eq!(
            a.clients_with_connections(),
            3,
            "the refused client left no counter"
        );
        drop(permits);
        assert_eq!(a.open(), 0);
        assert!(a.admit(v4(7)).is_ok());
    }

    #[test]
    fn concurrent_admissions_balance_out() {
        let a = Admission::new(AdmissionConfig {
            per_ip_rate: None,
            per_ip_max_connections: Some(3),
            max_connections: 50,
        });
        std::thread::scope(|s| {
            for t in 0..4u32 {
                let a = &a;
                s.spawn(move || {
                    let mut held = vec![];
                    for i in 0..5_000u32 {
                        if let Ok(p) = a.admit(v4(i % 17 + t)) {
                            held.push(p);
                        }
                        assert!(a.open() <= 50);
                        if i % 3 == 0 {
                            held.clear();
                        }
                    }
                });
            }
        });
        assert_eq!(a.open(), 0);
        assert_eq!(a.clients_with_connections(), 0);
    }

    #[test]
    fn admission_and_permits_are_shareable() {
        fn send_sync_static<T: Send + Sync + 'static>() {}
        send_sync_static::<Admission>();
        send_sync_static::<Permit>();
        send_sync_static::<Refusal>();
    }

    fn scope(rate: Option<&str>, per_ip: Option<usize>, cap: Option<usize>) -> ScopeLimits {
        ScopeLimits {
            per_ip_rate: rate.map(|r| r.parse().unwrap()),
            per_ip_max_connections: per_ip,
            max_connections: cap,
        }
    }

    #[test]
    fn scoped_caps_add_up_and_say_whose_cap_refused() {
        let gates = Gates::new(
            AdmissionConfig {
                max_connections: 4,
                ..AdmissionConfig::default()
            },
            &[scope(None, None, Some(3)), ScopeLimits::default()],
            &[scope(None, None, Some(1)), ScopeLimits::default()],
        );
        assert!(gates.per_route());
        let a = v4(1);
        let on_route0 = gates.admit(a, 0, Some(0)).unwrap();
        let e = gates.admit(a, 0, Some(0)).unwrap_err();
        assert_eq!(
            e,
            Refusal::Full {
                scope: Scope::Route
            }
        );
        assert_eq!(
            (e.status(), e.reason()),
            (StatusCode::SERVICE_UNAVAILABLE, "route_cap")
        );
        assert_eq!(e.to_string(), "too many open WebSockets on this route");
        let mut held = vec![
            gates.admit(a, 0, Some(1)).unwrap(),
            gates.admit(a, 0, Some(1)).unwrap(),
        ];
        let e = gates.admit(a, 0, Some(1)).unwrap_err();
        assert_eq!(
            (e.status(), e.reason()),
            (StatusCode::SERVICE_UNAVAILABLE, "listener_cap")
        );
        // Listener 1 has no cap of its own: the gateway's (4) is the last word.
        held.push(gates.admit(a, 1, Some(1)).unwrap());
        assert_eq!(
            gates.admit(a, 1, Some(1)).unwrap_err(),
            Refusal::Full {
                scope: Scope::Gateway
            }
        );
        // A refusal by a later gate gave the earlier gates' slots back.
        assert_eq!(gates.gateway().open(), 4);
        drop(on_route0);
        assert_eq!(gates.gateway().open(), 3);
        gates.admit(a, 1, Some(0)).unwrap();
        drop(held);
        assert_eq!(gates.gateway().open(), 0);
    }

    #[test]
    fn the_most_specific_per_client_limits_win_and_count_on_their_own() {
        let gates = Gates::new(
            AdmissionConfig {
                per_ip_max_connections: Some(1),
                per_ip_rate: Some("1/h burst 100".parse().unwrap()),
                ..AdmissionConfig::default()
            },
            &[scope(Some("1/h burst 2"), None, None)],
            &[scope(None, Some(3), None), ScopeLimits::default()],
        );
        let a = v4(7);
        // Route 0's own per-client cap (3), more generous than the gateway's.
        let held: Vec<_> = (0..2)
            .map(|_| gates.admit(a, 0, Some(0)).unwrap())
            .collect();
        // Listener 0's rate (burst 2) applies to both routes: it is spent.
        let e = gates.admit(a, 0, Some(0)).unwrap_err();
        assert!(matches!(e, Refusal::RateLimited { .. }), "{e:?}");
        let e = gates.admit(a, 0, Some(1)).unwrap_err();
        assert!(matches!(e, Refusal::RateLimited { .. }), "{e:?}");
        // Plain HTTP requests are checked against that same rate.
        assert!(gates.check_rate(a, 0, Some(1)).is_err());
        // Another listener index has no gate: the gateway's rate (burst 100)
        // and the gateway's per-client cap (1), untouched by route 0's two.
        let b = gates.admit(a, 1, Some(1)).unwrap();
        assert_eq!(
            gates.admit(a, 1, Some(1)).unwrap_err(),
            Refusal::TooManyFromIp
        );
        assert!(gates.check_rate(a, 1, Some(1)).is_ok());
        drop((held, b));
        assert_eq!(gates.gateway().open(), 0);
        assert!(gates.tracked_ips() >= 2);
    }

    #[test]
    fn without_scoped_limits_the_gates_are_the_gateways_alone() {
        let gates = Gates::new(
            AdmissionConfig {
                per_ip_max_connections: Some(1),
                ..AdmissionConfig::default()
            },
            &[ScopeLimits::default(); 2],
            &[ScopeLimits::default(); 3],
        );
        assert!(!gates.per_route());
        assert_eq!(gates.all().count(), 1);
        let p = gates.admit(v4(1), 1, None).unwrap();
        assert_eq!(
            gates.admit(v4(1), 0, None).unwrap_err(),
            Refusal::TooManyFromIp
        );
        drop(p);
        gates.admit(v4(1), 0, None).unwrap();
    }
}
