//! Limits per authenticated subject, beside the per-client-address ones: a
//! rate of new connections and requests, a cap on open WebSockets, one on
//! open tunnel streams, and a bandwidth shared by all of the subject's
//! traffic (WebSockets, HTTP bodies, tunnel streams).
//! Anonymous requests are not counted here (the per-address limits hold
//! them).
//!
//! Bounded like the address limiter: a subject has an entry only while it
//! holds something open or its rate has not recovered, and the table never
//! holds more than [`MAX_SUBJECTS`]; when full, entries that recovered are
//! dropped first, then (a flood of distinct subjects inside one burst
//! period) the table starts over — a subject may then get a fresh burst
//! early, never be locked out by others.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::time::Instant;

use super::SharedBandwidth;
use crate::config::RateSpec;
use crate::error::{Error, Kind};

/// Most subjects remembered at once.
pub const MAX_SUBJECTS: usize = 100_000;

#[derive(Default)]
struct Entry {
    open: usize,
    streams: usize,
    /// GCRA theoretical arrival time, ns since the gate's origin.
    tat: u64,
}

/// The per-subject table.
pub struct IdentityGate {
    inner: Arc<Inner>,
}

struct Inner {
    origin: Instant,
    table: Mutex<HashMap<Arc<str>, Entry>>,
    /// Each subject's shared bandwidth, alive while a connection holds it.
    bandwidth: Mutex<Buckets>,
}

#[derive(Default)]
struct Buckets {
    map: HashMap<Arc<str>, Weak<SharedBandwidth>>,
    /// Entries after the last sweep of dead ones (a sweep runs when the map
    /// has doubled since: amortised O(1) per connection).
    swept: usize,
}

/// What a subject holds open; dropping it gives the slot back.
pub struct IdentityPermit {
    inner: Arc<Inner>,
    subject: Arc<str>,
    stream: bool,
}

impl Default for IdentityGate {
    fn default() -> Self {
        IdentityGate {
            inner: Arc::new(Inner {
                origin: Instant::now(),
                table: Mutex::new(HashMap::new()),
                bandwidth: Mutex::default(),
            }),
        }
    }
}

impl IdentityGate {
    fn now(&self) -> u64 {
        self.inner.origin.elapsed().as_nanos() as u64
    }

    /// Subjects remembered now.
    pub fn tracked(&self) -> usize {
        self.inner
            .table
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Admits one more connection (`stream`: a tunnel stream) of `subject`
    /// under `rate` and `cap`; the permit holds the slot.
    pub fn admit(
        &self,
        subject: &Arc<str>,
        rate: Option<&RateSpec>,
        cap: Option<usize>,
        stream: bool,
    ) -> Result<Option<IdentityPermit>, Error> {
        if rate.is_none() && cap.is_none() {
            return Ok(None);
        }
        let now = self.now();
        let mut t = self.inner.table.lock().unwrap_or_else(|e| e.into_inner());
        if t.len() >= MAX_SUBJECTS && !t.contains_key(subject) {
            t.retain(|_, e| e.open > 0 || e.streams > 0 || e.tat > now);
            if t.len() >= MAX_SUBJECTS {
                t.retain(|_, e| e.open > 0 || e.streams > 0);
            }
        }
        let e = t.entry(subject.clone()).or_default();
        if let Some(r) = rate {
            let interval = r.interval().as_nanos() as u64;
            let tolerance = interval.saturating_mul(u64::from(r.burst().saturating_sub(1)));
            let base = e.tat.max(now);
            let earliest = base.saturating_sub(tolerance);
            if earliest > now {
                let wait = Duration::from_nanos(earliest - now);
                return Err(Error::client(
                    Kind::IdentityRateLimited,
                    "too many new connections for this identity",
                )
                .retry_after(wait));
            }
            e.tat = base.saturating_add(interval);
        }
        let held = if stream { &mut e.streams } else { &mut e.open };
        if cap.is_some_and(|c| *held >= c) {
            let what = if stream {
                "tunnel streams"
            } else {
                "WebSockets"
            };
            return Err(Error::client(
                Kind::TooManyFromIdentity,
                format!("too many open {what} for this identity"),
            )
            .retry_after(Duration::from_secs(1)));
        }
        if cap.is_none() {
            return Ok(None);
        }
        *held += 1;
        Ok(Some(IdentityPermit {
            inner: self.inner.clone(),
            subject: subject.clone(),
            stream,
        }))
    }
}

impl IdentityGate {
    /// The bandwidth `subject`'s connections share (`per_identity_bandwidth`
    /// of `bytes_per_second`): the one its open connections hold, or a new
    /// one when it holds none (or one of another rate, after a reload).
    pub fn bandwidth(&self, subject: &Arc<str>, bytes_per_second: u64) -> Arc<SharedBandwidth> {
        let mut b = self
            .inner
            .bandwidth
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(s) = b.map.get(subject).and_then(Weak::upgrade) {
            if s.bytes_per_second() == bytes_per_second {
                return s;
            }
        }
        let s = Arc::new(SharedBandwidth::new(bytes_per_second));
        b.map.insert(subject.clone(), Arc::downgrade(&s));
        if b.map.len() > 2 * b.swept.max(64) {
            b.map.retain(|_, w| w.strong_count() > 0);
            b.swept = b.map.len();
        }
        s
    }
}

impl std::fmt::Debug for IdentityPermit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityPermit")
            .field("subject", &self.subject)
            .field("stream", &self.stream)
            .finish()
    }
}

impl Drop for IdentityPermit {
    fn drop(&mut self) {
        let mut t = self.inner.table.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = t.get_mut(&self.subject) {
            let held = if self.stream {
                &mut e.streams
            } else {
                &mut e.open
            };
            *held = held.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_and_rates_count_per_subject() {
        let g = IdentityGate::default();
        let (ada, bob): (Arc<str>, Arc<str>) = ("ada".into(), "bob".into());
        let p1 = g.admit(&ada, None, Some(2), false).unwrap();
        let p2 = g.admit(&ada, None, Some(2), false).unwrap();
        let e = g.admit(&ada, None, Some(2), false).err().unwrap();
        assert_eq!(e.kind, Kind::TooManyFromIdentity);
        assert!(g.admit(&bob, None, Some(2), false).unwrap().is_some());
        // Streams are counted apart from WebSockets.
        assert!(g.admit(&ada, None, Some(1), true).unwrap().is_some());
        drop(p1);
        assert!(g.admit(&ada, None, Some(2), false).unwrap().is_some());
        drop(p2);
        let r: RateSpec = "1/m burst 2".parse().unwrap();
        assert!(g.admit(&bob, Some(&r), None, false).is_ok());
        assert!(g.admit(&bob, Some(&r), None, false).is_ok());
        let e = g.admit(&bob, Some(&r), None, false).err().unwrap();
        assert_eq!(e.kind, Kind::IdentityRateLimited);
        assert!(e.retry_after.is_some());
        assert!(g.admit(&ada, Some(&r), None, false).is_ok());
        assert!(g.tracked() <= 2);
    }

    #[test]
    fn a_subjects_connections_share_one_bandwidth_while_they_hold_it() {
        let g = IdentityGate::default();
        let (ada, bob): (Arc<str>, Arc<str>) = ("ada".into(), "bob".into());
        let a1 = g.bandwidth(&ada, 1000);
        let a2 = g.bandwidth(&ada, 1000);
        assert!(Arc::ptr_eq(&a1, &a2));
        assert!(!Arc::ptr_eq(&a1, &g.bandwidth(&bob, 1000)));
        // A new rate (a reload) starts a new bucket for new connections.
        let a3 = g.bandwidth(&ada, 2000);
        assert!(!Arc::ptr_eq(&a1, &a3));
        assert_eq!(a3.bytes_per_second(), 2000);
        drop((a1, a2, a3));
        // Dead entries are swept as the map grows: it stays bounded.
        for i in 0..10_000 {
            drop(g.bandwidth(&Arc::from(format!("s{i}")), 1000));
        }
        let left = g.inner.bandwidth.lock().unwrap().map.len();
        assert!(left <= 256, "{left} entries");
    }
}
