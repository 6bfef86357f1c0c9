//! Limits per authenticated subject, beside the per-client-address ones: a
//! rate of new connections and requests, a cap on open WebSockets and one
//! on open tunnel streams. Anonymous requests are not counted here (the
//! per-address limits hold them).
//!
//! Bounded like the address limiter: a subject has an entry only while it
//! holds something open or its rate has not recovered, and the table never
//! holds more than [`MAX_SUBJECTS`]; when full, entries that recovered are
//! dropped first, then (a flood of distinct subjects inside one burst
//! period) the table starts over — a subject may then get a fresh burst
//! early, never be locked out by others.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

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
}
