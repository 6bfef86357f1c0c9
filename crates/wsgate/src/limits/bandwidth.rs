//! Bandwidth caps: one connection's ([`Bandwidth`]), and one shared by
//! every connection of a subject ([`SharedBandwidth`]); [`Pace`] is what one
//! direction of a connection obeys (both, when both are set).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

/// A per-connection bandwidth cap: a token bucket of `burst` bytes refilled
/// at `bytes_per_second`, kept as the time the link is paid up to (GCRA on
/// bytes). Owned by one relay task: no locks, no allocation.
#[derive(Debug, Clone)]
pub struct Bandwidth {
    bytes_per_second: u64,
    burst_ns: u64,
    /// Until when the bytes accepted so far are paid for; `None` when fresh.
    paid_until: Option<Instant>,
}

impl Bandwidth {
    /// `bytes_per_second` on average, with one second's worth as the burst.
    ///
    /// # Panics
    /// If `bytes_per_second` is 0.
    pub fn new(bytes_per_second: u64) -> Self {
        Self::with_burst(bytes_per_second, bytes_per_second)
    }

    /// `bytes_per_second` on average, up to `burst_bytes` at once after idling.
    ///
    /// # Panics
    /// If `bytes_per_second` is 0.
    pub fn with_burst(bytes_per_second: u64, burst_bytes: u64) -> Self {
        assert!(bytes_per_second > 0, "a bandwidth cap of 0 bytes/s");
        let mut bw = Self {
            bytes_per_second,
            burst_ns: 0,
            paid_until: None,
        };
        bw.burst_ns = bw.cost_ns(burst_bytes);
        bw
    }

    #[cfg(test)]
    pub fn bytes_per_second(&self) -> u64 {
        self.bytes_per_second
    }

    /// Takes `n` more bytes at `now` and says how long to wait before sending
    /// them: `None` when they may go at once. The bytes are accounted for
    /// either way, so call this once per chunk, then wait the delay, then send.
    /// A chunk larger than the burst is allowed; its excess is paid by the
    /// wait.
    pub fn delay_for(&mut self, n: usize, now: Instant) -> Option<Duration> {
        if n == 0 {
            return None;
        }
        let base = match self.paid_until {
            Some(t) if t > now => t,
            _ => now,
        };
        let cost = Duration::from_nanos(self.cost_ns(n as u64));
        // At most 584 years on: no platform's clock overflows there.
        let paid_until = base.checked_add(cost).unwrap_or(base);
        self.paid_until = Some(paid_until);
        let ahead = paid_until.saturating_duration_since(now);
        let burst = Duration::from_nanos(self.burst_ns);
        (ahead > burst).then(|| ahead - burst)
    }

    /// Time to send `n` bytes at the average rate, rounded up.
    fn cost_ns(&self, n: u64) -> u64 {
        let ns = (u128::from(n) * 1_000_000_000).div_ceil(u128::from(self.bytes_per_second));
        u64::try_from(ns).unwrap_or(u64::MAX)
    }
}

/// A cap shared by several connections (a subject's `per_identity_bandwidth`):
/// one bucket per direction, each connection paying its bytes into it. The
/// connections together get `bytes_per_second` each way, plus one second's
/// worth as burst; a connection waits for what the others sent too.
#[derive(Debug)]
pub struct SharedBandwidth {
    /// Client to upstream, upstream to client.
    dirs: [Mutex<Bandwidth>; 2],
    bytes_per_second: u64,
}

impl SharedBandwidth {
    /// # Panics
    /// If `bytes_per_second` is 0.
    pub fn new(bytes_per_second: u64) -> Self {
        SharedBandwidth {
            dirs: [
                Mutex::new(Bandwidth::new(bytes_per_second)),
                Mutex::new(Bandwidth::new(bytes_per_second)),
            ],
            bytes_per_second,
        }
    }

    pub fn bytes_per_second(&self) -> u64 {
        self.bytes_per_second
    }

    fn delay_for(&self, up: bool, n: usize, now: Instant) -> Option<Duration> {
        let mut b = self.dirs[usize::from(!up)]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        b.delay_for(n, now)
    }
}

/// What paces one direction of one connection: its own cap, its subject's
/// shared one, or both (it waits for the longer).
#[derive(Debug, Clone)]
pub struct Pace {
    own: Option<Bandwidth>,
    shared: Option<Arc<SharedBandwidth>>,
    /// Which of the shared buckets: client to upstream (`true`) or back.
    up: bool,
}

impl Pace {
    /// The pace of direction `up` (client to upstream) of a connection
    /// capped at `own` bytes per second and sharing `shared`; `None` when
    /// neither is set.
    pub fn new(own: Option<u64>, shared: Option<&Arc<SharedBandwidth>>, up: bool) -> Option<Pace> {
        let own = own.filter(|b| *b > 0).map(Bandwidth::new);
        if own.is_none() && shared.is_none() {
            return None;
        }
        Some(Pace {
            own,
            shared: shared.cloned(),
            up,
        })
    }

    /// Takes `n` more bytes at `now`: how long to wait before the next read
    /// (see [`Bandwidth::delay_for`]); the longer of the two caps' delays.
    pub fn delay_for(&mut self, n: usize, now: Instant) -> Option<Duration> {
        let own = self.own.as_mut().and_then(|b| b.delay_for(n, now));
        let shared = self
            .shared
            .as_ref()
            .and_then(|s| s.delay_for(self.up, n, now));
        own.max(shared)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn bandwidth_allows_the_burst_then_paces() {
        let mut bw = Bandwidth::new(1000);
        let t0 = Instant::now();
        assert_eq!(bw.delay_for(600, t0), None);
        assert_eq!(bw.delay_for(400, t0), None, "the full burst at once");
        assert_eq!(bw.delay_for(100, t0), Some(100 * MS));
        // The caller waited 100 ms and sent; 500 more are 500 ms on top.
        assert_eq!(bw.delay_for(500, t0 + 100 * MS), Some(500 * MS));
        // After the debt is paid off and a full second idle, the burst is back.
        let t1 = t0 + Duration::from_millis(1600) + Duration::from_secs(1);
        assert_eq!(bw.delay_for(1000, t1), None);
        assert_eq!(bw.delay_for(1, t1), Some(Duration::from_millis(1)));
        assert_eq!(bw.delay_for(0, t1), None);
    }

    #[test]
    fn bandwidth_refills_partially_and_paces_large_chunks() {
        let mut bw = Bandwidth::with_burst(1000, 100);
        let t0 = Instant::now();
        // A chunk ten times the burst: 900 bytes over it, 900 ms.
        assert_eq!(bw.delay_for(1000, t0), Some(900 * MS));
        // Long after it went (at t0 + 900 ms) the bucket is full again: 100
        // bytes at once, then 1 ms per byte.
        let t1 = t0 + 1400 * MS;
        assert_eq!(bw.delay_for(100, t1), None);
        assert_eq!(bw.delay_for(50, t1), Some(50 * MS));
        // Rounding: 3 bytes/s, one byte costs 333,333,334 ns.
        let mut slow = Bandwidth::with_burst(3, 0);
        assert_eq!(
            slow.delay_for(1, t0),
            Some(Duration::from_nanos(333_333_334))
        );
        assert_eq!(slow.bytes_per_second(), 3);
    }

    #[test]
    fn bandwidth_sustains_its_rate() {
        let mut bw = Bandwidth::new(64 * 1024);
        let t0 = Instant::now();
        let mut now = t0;
        let mut sent = 0u64;
        // A sender that always waits as told, for ten seconds' worth.
        while sent < 64 * 1024 * 11 {
            if let Some(d) = bw.delay_for(4096, now) {
                now += d;
            }
            sent += 4096;
        }
        // 11 seconds' bytes, one of them free as the burst.
        let elapsed = now - t0;
        assert!(
            elapsed >= Duration::from_secs(10) - MS && elapsed <= Duration::from_secs(10),
            "{elapsed:?}"
        );
    }

    #[test]
    fn connections_sharing_a_cap_split_it_and_a_pace_obeys_the_stricter_cap() {
        let shared = Arc::new(SharedBandwidth::new(1000));
        let mut a = Pace::new(None, Some(&shared), true).unwrap();
        let mut b = Pace::new(None, Some(&shared), true).unwrap();
        let mut down = Pace::new(None, Some(&shared), false).unwrap();
        let t0 = Instant::now();
        // One burst between them: 600 + 400 pass, the next bytes wait.
        assert_eq!(a.delay_for(600, t0), None);
        assert_eq!(b.delay_for(400, t0), None);
        assert_eq!(a.delay_for(100, t0), Some(100 * MS));
        assert_eq!(b.delay_for(100, t0), Some(200 * MS));
        // The other direction has a bucket of its own.
        assert_eq!(down.delay_for(1000, t0), None);
        // A connection's own cap, stricter than the shared one, wins.
        let roomy = Arc::new(SharedBandwidth::new(1_000_000));
        let mut c = Pace::new(Some(100), Some(&roomy), true).unwrap();
        assert_eq!(c.delay_for(200, t0), Some(1000 * MS));
        assert!(Pace::new(None, None, true).is_none());
        assert!(Pace::new(Some(0), None, true).is_none());
        assert_eq!(shared.bytes_per_second(), 1000);
    }

    #[test]
    #[should_panic(expected = "0 bytes/s")]
    fn bandwidth_of_zero_is_a_bug() {
        Bandwidth::new(0);
    }
}
