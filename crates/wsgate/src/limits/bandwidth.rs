//! Bandwidth caps: one connection's ([`Bandwidth`]), and one shared by
//! every connection of a subject ([`SharedBandwidth`]); [`Pace`] is what one
//! direction of a connection obeys (both, when both are set). [`Throttle`]
//! is a pace for poll-based copies (the tunnel's splices), [`PacedBody`] one
//! for HTTP bodies.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

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

/// Most bytes a paced copy moves at once: a paced read, or a paced body's
/// frame, is at most this long and paid for before the next one, so a
/// subject's traffic flows evenly and never gets more than this ahead of
/// its cap.
pub const PACED_CHUNK: usize = 16 * 1024;

/// A [`Pace`] for a poll-based copy: [`Throttle::charge`] the bytes moved,
/// then [`Throttle::poll_ready`] before the next read, which waits out the
/// debt (a timer allocated at the first debt, then reset).
#[derive(Debug)]
pub struct Throttle {
    pace: Pace,
    sleep: Option<Pin<Box<Sleep>>>,
    /// `sleep` holds a debt not yet waited out.
    owing: bool,
}

impl Throttle {
    pub fn new(pace: Pace) -> Throttle {
        Throttle {
            pace,
            sleep: None,
            owing: false,
        }
    }

    /// Direction `up` (client to upstream) of a connection sharing `shared`.
    pub fn shared(shared: &Arc<SharedBandwidth>, up: bool) -> Throttle {
        Throttle::new(Pace::new(None, Some(shared), up).expect("a shared cap paces"))
    }

    /// Takes `n` bytes just moved; the next [`Throttle::poll_ready`] waits
    /// for them when they are over the cap.
    pub fn charge(&mut self, n: usize) {
        let now = Instant::now();
        let Some(d) = self.pace.delay_for(n, now) else {
            return;
        };
        let deadline = now + d;
        match &mut self.sleep {
            Some(s) => s.as_mut().reset(deadline),
            None => self.sleep = Some(Box::pin(tokio::time::sleep_until(deadline))),
        }
        self.owing = true;
    }

    /// Ready once what was charged is paid for.
    pub fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.owing {
            if let Some(s) = &mut self.sleep {
                ready!(s.as_mut().poll(cx));
            }
            self.owing = false;
        }
        Poll::Ready(())
    }
}

/// An HTTP body paced by a subject's shared bandwidth: its data goes on in
/// frames of at most [`PACED_CHUNK`] bytes, each paid for before the next
/// is taken. Without a cap it is the body itself (one branch per frame, no
/// allocation).
#[derive(Debug)]
pub struct PacedBody<B> {
    inner: B,
    pace: Option<Box<BodyPace>>,
}

#[derive(Debug)]
struct BodyPace {
    throttle: Throttle,
    /// The rest of the frame being passed on.
    rest: Bytes,
}

impl<B> PacedBody<B> {
    /// `inner`, paced as direction `up` (client to upstream) of `shared`.
    pub fn new(inner: B, shared: Option<&Arc<SharedBandwidth>>, up: bool) -> PacedBody<B> {
        PacedBody {
            inner,
            pace: shared.map(|s| {
                Box::new(BodyPace {
                    throttle: Throttle::shared(s, up),
                    rest: Bytes::new(),
                })
            }),
        }
    }
}

impl<B> Body for PacedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        let Some(p) = this.pace.as_deref_mut() else {
            return Pin::new(&mut this.inner).poll_frame(cx);
        };
        ready!(p.throttle.poll_ready(cx));
        if p.rest.is_empty() {
            match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(f)) => match f.into_data() {
                    Ok(d) => p.rest = d,
                    Err(f) => return Poll::Ready(Some(Ok(f))),
                },
                end => return Poll::Ready(end),
            }
        }
        let n = p.rest.len().min(PACED_CHUNK);
        let data = p.rest.split_to(n);
        p.throttle.charge(n);
        Poll::Ready(Some(Ok(Frame::data(data))))
    }

    fn is_end_stream(&self) -> bool {
        self.pace.as_ref().is_none_or(|p| p.rest.is_empty()) && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let hint = self.inner.size_hint();
        let held = self.pace.as_ref().map_or(0, |p| p.rest.len() as u64);
        if held == 0 {
            return hint;
        }
        let mut h = SizeHint::new();
        h.set_lower(hint.lower() + held);
        if let Some(u) = hint.upper() {
            h.set_upper(u + held);
        }
        h
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

    /// The data frames of `body` and when each came, since the start.
    async fn frames<B>(mut body: B) -> Vec<(usize, Duration)>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: std::fmt::Debug,
    {
        use http_body_util::BodyExt;
        let t0 = Instant::now();
        let mut out = vec![];
        while let Some(f) = body.frame().await {
            let d = f.unwrap().into_data().unwrap();
            out.push((d.len(), t0.elapsed()));
        }
        out
    }

    #[tokio::test(start_paused = true)]
    async fn a_paced_body_goes_in_chunks_each_paid_before_the_next() {
        let shared = Arc::new(SharedBandwidth::new(PACED_CHUNK as u64));
        let big = Bytes::from(vec![7u8; 4 * PACED_CHUNK]);
        let body = PacedBody::new(http_body_util::Full::new(big.clone()), Some(&shared), false);
        assert_eq!(body.size_hint().exact(), Some(big.len() as u64));
        let got = frames(body).await;
        // One second's worth at once (the burst), then one chunk a second.
        let sizes: Vec<_> = got.iter().map(|(n, _)| *n).collect();
        assert_eq!(sizes, [PACED_CHUNK; 4]);
        let at: Vec<_> = got.iter().map(|(_, t)| t.as_secs_f64().round()).collect();
        assert_eq!(at, [0.0, 0.0, 1.0, 2.0], "{got:?}");
        // A body after it, of the same subject: no burst left, one chunk a
        // second from the start.
        let again = PacedBody::new(http_body_util::Full::new(big.clone()), Some(&shared), false);
        let got = frames(again).await;
        let at: Vec<_> = got.iter().map(|(_, t)| t.as_secs_f64().round()).collect();
        assert_eq!(at, [0.0, 1.0, 2.0, 3.0], "{got:?}");
        // The other direction has a bucket of its own, full.
        let up = PacedBody::new(http_body_util::Full::new(big.clone()), Some(&shared), true);
        let got = frames(up).await;
        let at: Vec<_> = got.iter().map(|(_, t)| t.as_secs_f64().round()).collect();
        assert_eq!(at, [0.0, 0.0, 1.0, 2.0], "{got:?}");
        // Unpaced: the body as it is, one frame at once.
        let free = frames(PacedBody::new(http_body_util::Full::new(big), None, false)).await;
        assert_eq!(free, [(4 * PACED_CHUNK, Duration::ZERO)]);
    }

    #[test]
    #[should_panic(expected = "0 bytes/s")]
    fn bandwidth_of_zero_is_a_bug() {
        Bandwidth::new(0);
    }
}
