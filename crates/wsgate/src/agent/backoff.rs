//! Reconnect delays: exponential, with jitter, between 1 s and 30 s
//! (`docs/tunnel.md` §7).
//!
//! The base doubles per failed attempt, 1 s, 2 s, 4 s, 8 s, 16 s, and stops at
//! 20 s; each delay is the base times a random factor in [1, 1.5), so every
//! delay lies in [1 s, 30 s) and agents that lost the same gateway at the
//! same moment do not come back in lockstep. A connection that stayed up for
//! [`STABLE`] resets the base: a gateway restart after a long uptime is
//! retried after about a second.

use std::time::Duration;

/// The first delay's base.
pub const MIN: Duration = Duration::from_secs(1);
/// No delay is this long or longer.
pub const MAX: Duration = Duration::from_secs(30);
/// The largest base: with the jitter factor below 1.5, delays stay under MAX.
const MAX_BASE: Duration = Duration::from_secs(20);
/// A connection up at least this long resets the backoff.
pub const STABLE: Duration = Duration::from_secs(10);

/// The delays of one reconnect loop.
#[derive(Debug, Clone)]
pub struct Backoff {
    attempt: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new()
    }
}

impl Backoff {
    pub fn new() -> Backoff {
        Backoff { attempt: 0 }
    }

    /// The base of the next delay (before jitter).
    pub fn base(&self) -> Duration {
        MIN.saturating_mul(1 << self.attempt.min(16)).min(MAX_BASE)
    }

    /// The delay before the next attempt, with `jitter` in [0, 1) (a random
    /// number in production, fixed in tests).
    pub fn next_with(&mut self, jitter: f64) -> Duration {
        let d = self.base().mul_f64(1.0 + 0.5 * jitter.clamp(0.0, 0.999));
        self.attempt = self.attempt.saturating_add(1);
        d.clamp(MIN, MAX - Duration::from_millis(1))
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        self.next_with(rand::random::<f64>())
    }

    /// Starts over from the first delay (after a connection that stayed up).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_from_one_second_and_stay_under_thirty() {
        let mut b = Backoff::new();
        let lows: Vec<u64> = (0..8).map(|_| b.next_with(0.0).as_secs()).collect();
        assert_eq!(lows, [1, 2, 4, 8, 16, 20, 20, 20]);
        let mut b = Backoff::new();
        let highs: Vec<u128> = (0..8).map(|_| b.next_with(0.9999).as_millis()).collect();
        assert_eq!(highs[0], 1499);
        assert!(highs.iter().all(|&ms| (1000..30_000).contains(&ms)));
        // Many random draws, many attempts: always within the bounds.
        let mut b = Backoff::new();
        for _ in 0..1000 {
            let d = b.next_delay();
            assert!(d >= MIN && d < MAX, "{d:?}");
        }
        b.reset();
        assert_eq!(b.next_with(0.0), MIN);
    }
}
