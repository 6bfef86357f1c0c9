//! Proxied WebSockets: after both handshakes, bytes are copied as they are —
//! no unmasking, re-masking or re-framing, so permessage-deflate and any other
//! extension negotiated between client and backend just works — while a
//! header-only [`Tracker`] follows frame boundaries in each direction. That is
//! what lets the gateway inject a Close at a boundary when it shuts down, when
//! a timeout or limit strikes, or when one side vanishes without a Close.
//!
//! Each direction is a [`pump`]: read a chunk, walk its frame headers, write it
//! on. A pump reads only after its write finished, so backpressure is end to
//! end and memory is one read chunk per direction.

use std::borrow::Cow;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use wsframe::{parse_header, ProtocolError};

use crate::error::Kind;
use crate::io::{drain, release, with_halves, ClientIo, ConnReader, ConnWriter, FIRST_CHUNK};
use crate::limits::{Pace, SharedBandwidth};

/// Follows frame boundaries in one direction of a WebSocket byte stream.
#[derive(Debug, Default)]
pub struct Tracker {
    head: [u8; wsframe::MAX_HEADER_LEN],
    head_len: usize,
    remaining: u64,
    /// A Close frame has started in this direction.
    pub close_seen: bool,
}

impl Tracker {
    /// Exactly between two frames.
    pub fn at_boundary(&self) -> bool {
        self.remaining == 0 && self.head_len == 0
    }

    /// Walks `data` and returns how many bytes it covered: all of them, or,
    /// with `stop`, those up to the first frame boundary (0 when at one).
    pub fn advance(&mut self, data: &[u8], stop: bool) -> Result<usize, ProtocolError> {
        let mut i = 0;
        while i < data.len() {
            if self.remaining > 0 {
                let n = (self.remaining.min((data.len() - i) as u64)) as usize;
                i += n;
                self.remaining -= n as u64;
                if self.remaining == 0 && stop {
                    return Ok(i);
                }
                continue;
            }
            if stop && self.head_len == 0 {
                return Ok(i);
            }
            // The usual case: the whole header is in `data`, parsed where it
            // lies instead of being copied to `head` first — about 60
            // instructions less per echoed small message (`INSTR_TEST=messages`
            // and `INSTR_TEST=batched bench/proxy/instructions.sh`).
            let whole = if self.head_len == 0 {
                parse_header(&data[i..])?
            } else {
                None
            };
            let h = match whole {
                Some(h) => {
                    i += h.header_len;
                    h
                }
                None => {
                    // A header split across reads: gather it in `head`.
                    let take = (self.head.len() - self.head_len).min(data.len() - i);
                    self.head[self.head_len..self.head_len + take]
                        .copy_from_slice(&data[i..i + take]);
                    match parse_header(&self.head[..self.head_len + take])? {
                        Some(h) => {
                            i += h.header_len - self.head_len;
                            self.head_len = 0;
                            h
                        }
                        None => {
                            self.head_len += take;
                            i += take;
                            continue;
                        }
                    }
                }
            };
            self.remaining = h.payload_len;
            self.close_seen |= h.opcode == 0x8;
            if self.remaining == 0 && stop {
                return Ok(i);
            }
        }
        Ok(i)
    }
}

/// Timeouts and limits of a proxied WebSocket.
#[derive(Debug, Clone)]
pub struct Settings {
    pub client_idle: Option<Duration>,
    pub backend_idle: Option<Duration>,
    pub max_lifetime: Option<Duration>,
    pub close_timeout: Duration,
    /// Bytes per second each way.
    pub bandwidth: Option<u64>,
    /// The subject's bandwidth, shared with its other connections
    /// (`per_identity_bandwidth`).
    pub shared_bandwidth: Option<std::sync::Arc<SharedBandwidth>>,
}

/// How a proxied WebSocket ended, for logs and metrics.
#[derive(Debug, Default)]
pub struct Outcome {
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// A close code the gateway injected, if it did.
    pub injected: Option<u16>,
    /// Built once, only where it is more than a fixed phrase.
    pub reason: Cow<'static, str>,
}

type Closing = Option<(u16, &'static str)>;

/// The Closes the gateway injects, by cause.
const SHUTTING_DOWN: usize = 0;
const LIFETIME: usize = 1;
const CLIENT_IDLE: usize = 2;
const BACKEND_IDLE: usize = 3;
const CLOSES: [(u16, &str); 4] = [
    (code(Kind::ShuttingDown), "gateway shutting down"),
    (code(Kind::PolicyLimit), "connection lifetime exceeded"),
    (code(Kind::PolicyLimit), "client inactivity timeout"),
    (code(Kind::PolicyLimit), "backend inactivity timeout"),
];

/// The close code of a kind that closes (checked at compile time).
const fn code(kind: Kind) -> u16 {
    match kind.close_code() {
        Some(c) => c,
        None => panic!("a kind without a close code"),
    }
}

/// Whether (and why) the connection is closing, read by both pumps. The pumps
/// run in the caller's task and are polled on its every wake-up, so setting
/// this is all it takes for them to see it: no channel, no waker.
#[derive(Default)]
struct ClosingFlag(AtomicU8);

impl ClosingFlag {
    fn set(&self, cause: usize) {
        self.0.store(cause as u8 + 1, Ordering::Relaxed);
    }

    fn get(&self) -> Closing {
        match self.0.load(Ordering::Relaxed) {
            0 => None,
            n => Some(CLOSES[usize::from(n) - 1]),
        }
    }
}

/// Which directions have passed a whole Close frame on; when both have, the
/// closing handshake is complete and the first EOF ends the connection.
#[derive(Default)]
struct ClosesPassed {
    up: AtomicBool,
    down: AtomicBool,
}

impl ClosesPassed {
    fn set(&self, up: bool) {
        let f = if up { &self.up } else { &self.down };
        f.store(true, Ordering::Relaxed);
    }

    /// Whether the direction opposite to `up` has passed its Close.
    fn other(&self, up: bool) -> bool {
        let f = if up { &self.down } else { &self.up };
        f.load(Ordering::Relaxed)
    }

    fn both(&self) -> bool {
        self.up.load(Ordering::Relaxed) && self.down.load(Ordering::Relaxed)
    }
}

struct Dir {
    buf: BytesMut,
    hint: usize,
    tracker: Tracker,
    bytes: u64,
    bandwidth: Option<Pace>,
}

impl Dir {
    fn new(leftover: bytes::Bytes, bandwidth: Option<Pace>) -> Dir {
        Dir {
            buf: BytesMut::from(&leftover[..]),
            hint: FIRST_CHUNK,
            tracker: Tracker::default(),
            bytes: 0,
            bandwidth,
        }
    }
}

enum PumpEnd {
    /// The source ended (or failed); its FIN was passed on.
    Eof(Option<io::Error>),
    Garbage(ProtocolError),
    WriteFailed(io::Error),
    /// We injected our Close because the connection is closing.
    Injected,
}

async fn inject(dst: &mut ConnWriter<'_>, code: u16, reason: &str, masked: bool) {
    let mut out = BytesMut::new();
    let mask = masked.then(rand_mask);
    wsframe::encode_frame(
        &mut out,
        true,
        wsframe::OpCode::Close,
        mask,
        &wsframe::close_payload(code, reason),
    );
    let _ = dst.write_all(&mut out).await;
}

fn rand_mask() -> [u8; 4] {
    // Masking keys need only be unpredictable to the client's scripts; the
    // gateway sends one frame per closing connection.
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    (n ^ 0x5bd1_e995).to_ne_bytes()
}

/// Copies one direction. `to_backend`: frames going to the backend must be
/// masked when we inject one. `gone`: the Close we send on when the source
/// vanishes without one.
#[allow(clippy::too_many_arguments)]
async fn pump(
    src: &mut ConnReader<'_>,
    dst: &mut ConnWriter<'_>,
    st: &mut Dir,
    closing: &ClosingFlag,
    to_backend: bool,
    gone: (u16, &'static str),
    activity: &AtomicU64,
    track_activity: bool,
    closed: &ClosesPassed,
    epoch: Instant,
) -> PumpEnd {
    loop {
        let close = closing.get();
        if let Some((code, reason)) = close {
            if st.tracker.at_boundary() {
                inject(dst, code, reason, to_backend).await;
                return PumpEnd::Injected;
            }
        }
        // Bytes that came with a handshake are passed on before any read.
        let read = if !st.buf.is_empty() {
            Ok(st.buf.len())
        } else {
            tokio::select! {
                biased;
                () = std::future::poll_fn(|_| {
                    if closing.get().is_some() {
                        std::task::Poll::Ready(())
                    } else {
                        std::task::Poll::Pending
                    }
                }), if close.is_none() => continue,
                r = src.read(&mut st.buf, &mut st.hint) => r,
            }
        };
        match read {
            Ok(0) | Err(_) => {
                let why = read.err();
                if closed.both() {
                    // The closing handshake is over: the caller closes both
                    // sockets at once, no half-close needed.
                    return PumpEnd::Eof(why);
                }
                if !st.tracker.close_seen && st.tracker.at_boundary() {
                    inject(dst, gone.0, gone.1, to_backend).await;
                }
                dst.shutdown().await;
                return PumpEnd::Eof(why);
            }
            Ok(_) if track_activity => {
                activity.store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed)
            }
            Ok(_) => {}
        }
        let stop = close.is_some();
        let n = match st.tracker.advance(&st.buf, stop) {
            Ok(n) => n,
            Err(e) => return PumpEnd::Garbage(e),
        };
        st.bytes += n as u64;
        let close_done = st.tracker.close_seen && st.tracker.at_boundary();
        if close_done && n == st.buf.len() && closed.other(to_backend) && src.eof_arrived() {
            // The closing handshake's last frame, and its sender has already
            // closed its connection: pass the frame on with our FIN behind it
            // (the caller closes both sockets as soon as we return).
            closed.set(to_backend);
            return match dst.write_last(&mut st.buf, n).await {
                Ok(()) => PumpEnd::Eof(None),
                Err(e) => PumpEnd::WriteFailed(e),
            };
        }
        if let Err(e) = dst.write_prefix(&mut st.buf, n).await {
            return PumpEnd::WriteFailed(e);
        }
        if close_done {
            // This direction's Close frame has been passed on whole.
            closed.set(to_backend);
        }
        if let Some(delay) = st
            .bandwidth
            .as_mut()
            .and_then(|b| b.delay_for(n, Instant::now()))
        {
            tokio::time::sleep(delay).await;
        }
        if stop {
            // Past the boundary we are closing at: nothing more goes through.
            st.buf.clear();
        }
        if st.buf.is_empty() {
            release(&mut st.buf);
        }
    }
}

/// One side of a proxied WebSocket: the upgraded connection and the bytes
/// that arrived with its handshake.
pub struct Side {
    pub io: ClientIo,
    pub leftover: bytes::Bytes,
}

/// Runs a proxied WebSocket to its end.
pub async fn run(
    client: Side,
    backend: Side,
    settings: Settings,
    shutdown: CancellationToken,
) -> Outcome {
    let dirs = (
        Dir::new(
            client.leftover,
            Pace::new(settings.bandwidth, settings.shared_bandwidth.as_ref(), true),
        ),
        Dir::new(
            backend.leftover,
            Pace::new(
                settings.bandwidth,
                settings.shared_bandwidth.as_ref(),
                false,
            ),
        ),
    );
    with_halves!(client.io, |cr, cw| {
        with_halves!(backend.io, |br, bw| {
            run_halves(cr, cw, br, bw, dirs, settings, shutdown).await
        })
    })
}

async fn run_halves(
    mut cr: ConnReader<'_>,
    mut cw: ConnWriter<'_>,
    mut br: ConnReader<'_>,
    mut bw: ConnWriter<'_>,
    (mut up, mut down): (Dir, Dir),
    settings: Settings,
    shutdown: CancellationToken,
) -> Outcome {
    let epoch = Instant::now();
    let flag = ClosingFlag::default();
    // Reading the clock per chunk only pays when an idle timeout needs it.
    let track = settings.client_idle.is_some() || settings.backend_idle.is_some();
    let (client_seen, backend_seen) = (AtomicU64::new(0), AtomicU64::new(0));
    let closed = ClosesPassed::default();
    let mut outcome = Outcome::default();
    let mut closing: Option<usize> = None;
    {
        let c2b = pump(
            &mut cr,
            &mut bw,
            &mut up,
            &flag,
            true,
            (code(Kind::ClientGone), "client went away"),
            &client_seen,
            track,
            &closed,
            epoch,
        );
        let b2c = pump(
            &mut br,
            &mut cw,
            &mut down,
            &flag,
            false,
            (code(Kind::BackendGone), "backend went away"),
            &backend_seen,
            track,
            &closed,
            epoch,
        );
        tokio::pin!(c2b, b2c);
        let (mut c2b_done, mut b2c_done) = (false, false);
        let mut finish_by: Option<Instant> = None;
        let lifetime_end = settings.max_lifetime.map(|l| epoch + l);
        // Registered once, not on every turn of the loop.
        let stop = crate::io::cancelled(&shutdown);
        tokio::pin!(stop);
        while !(c2b_done && b2c_done) {
            let ms = |a: &AtomicU64| epoch + Duration::from_millis(a.load(Ordering::Relaxed));
            let mut deadline = finish_by;
            let mut consider = |t: Option<Instant>| {
                if let Some(t) = t {
                    deadline = Some(deadline.map_or(t, |d: Instant| d.min(t)));
                }
            };
            if closing.is_none() {
                consider(lifetime_end);
                consider(settings.client_idle.map(|i| ms(&client_seen) + i));
                consider(settings.backend_idle.map(|i| ms(&backend_seen) + i));
            }
            let timer = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                end = &mut c2b, if !c2b_done => {
                    c2b_done = true;
                    note(&mut outcome, "client", end);
                    finish_by.get_or_insert(Instant::now() + settings.close_timeout);
                }
                end = &mut b2c, if !b2c_done => {
                    b2c_done = true;
                    note(&mut outcome, "backend", end);
                    finish_by.get_or_insert(Instant::now() + settings.close_timeout);
                }
                () = &mut stop, if closing.is_none() => {
                    closing = Some(SHUTTING_DOWN);
                }
                _ = timer => {
                    let now = Instant::now();
                    if finish_by.is_some_and(|f| now >= f) {
                        break;
                    }
                    if lifetime_end.is_some_and(|l| now >= l) {
                        closing = Some(LIFETIME);
                    } else if settings.client_idle.is_some_and(|i| now >= ms(&client_seen) + i) {
                        closing = Some(CLIENT_IDLE);
                    } else if settings.backend_idle.is_some_and(|i| now >= ms(&backend_seen) + i) {
                        closing = Some(BACKEND_IDLE);
                    }
                }
            }
            if (c2b_done || b2c_done) && closed.both() {
                // Both Close frames went through and one side has closed its
                // connection: dropping both sockets ends the other one too.
                break;
            }
            if let (Some(cause), None) = (closing, outcome.injected) {
                // Both pumps inject our Close at their next frame boundary.
                let (code, why) = CLOSES[cause];
                outcome.injected = Some(code);
                outcome.reason = Cow::Borrowed(why);
                flag.set(cause);
                finish_by = Some(Instant::now() + settings.close_timeout);
            }
        }
    }
    if closing.is_some() {
        // Both sides have our Close (or are gone): give them a moment to answer.
        cw.shutdown().await;
        bw.shutdown().await;
        let t = settings.close_timeout;
        tokio::join!(drain(&mut cr, t), drain(&mut br, t));
    }
    outcome.bytes_up = up.bytes;
    outcome.bytes_down = down.bytes;
    outcome
}

fn note(outcome: &mut Outcome, side: &'static str, end: PumpEnd) {
    if !outcome.reason.is_empty() {
        return;
    }
    outcome.reason = match end {
        PumpEnd::Eof(None) if side == "client" => Cow::Borrowed("client closed"),
        PumpEnd::Eof(None) => Cow::Borrowed("backend closed"),
        PumpEnd::Eof(Some(e)) => Cow::Owned(format!("{side} read failed: {e}")),
        PumpEnd::Garbage(e) => Cow::Owned(format!("{side} sent a malformed frame header: {e}")),
        PumpEnd::WriteFailed(e) => Cow::Owned(format!(
            "write towards the other side of {side} failed: {e}"
        )),
        PumpEnd::Injected => return,
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use wsframe::{encode_frame, OpCode};

    fn frames() -> BytesMut {
        let mut b = BytesMut::new();
        encode_frame(&mut b, true, OpCode::Binary, Some([1, 2, 3, 4]), &[7; 300]);
        encode_frame(&mut b, true, OpCode::Text, None, b"");
        encode_frame(&mut b, true, OpCode::Binary, None, &[1; 70_000]);
        encode_frame(&mut b, true, OpCode::Close, None, &[3, 232]);
        b
    }

    #[test]
    fn tracks_boundaries_in_any_chunking() {
        let wire = frames();
        for chunk in [1, 2, 3, 13, 100, 4096, 1 << 20] {
            let mut t = Tracker::default();
            let mut covered = 0;
            for c in wire.chunks(chunk) {
                covered += t.advance(c, false).unwrap();
            }
            assert_eq!(covered, wire.len());
            assert!(t.at_boundary());
            assert!(t.close_seen);
        }
    }

    #[test]
    fn stop_lands_exactly_on_boundaries() {
        let wire = frames();
        let mut t = Tracker::default();
        let mut at = 0;
        let mut boundaries = vec![];
        loop {
            let n = t.advance(&wire[at..], true).unwrap();
            if n == 0 {
                if at == wire.len() {
                    break;
                }
                // At a boundary: step into the next frame.
                let m = t.advance(&wire[at..at + 1], false).unwrap();
                at += m;
                continue;
            }
            at += n;
            if t.at_boundary() {
                boundaries.push(at);
            }
        }
        // 8-byte header + 300; 2-byte empty frame; 10-byte header + 70,000; close.
        assert_eq!(boundaries, vec![308, 310, 310 + 10 + 70_000, wire.len()]);
    }

    /// Headers whole in one read and headers split across reads take two
    /// paths through `advance`; both must find every boundary, with `stop`
    /// and without, whatever the lengths' encodings (7, 16, 64 bits).
    #[test]
    fn every_boundary_of_mixed_frames_in_any_chunking() {
        let mut wire = BytesMut::new();
        let mut ends = vec![];
        let mut seed = 0x2545_f491_u32;
        for k in 0..200 {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            let len = [0, 1, 64, 125, 126, 127, 65_535, 65_536][(seed >> 8) as usize % 8];
            let mask = (k % 3 == 0).then_some([9, 8, 7, 6]);
            encode_frame(&mut wire, true, OpCode::Binary, mask, &vec![5; len]);
            ends.push(wire.len());
        }
        for chunk in [1, 2, 5, 14, 64, 1000, 70_000, 1 << 24] {
            let (mut t, mut u) = (Tracker::default(), Tracker::default());
            let (mut at, mut covered) = (0, 0);
            let mut found = vec![];
            for c in wire.chunks(chunk) {
                covered += u.advance(c, false).unwrap();
                let mut i = 0;
                while i < c.len() {
                    let n = t.advance(&c[i..], true).unwrap();
                    // At a boundary with bytes left: step into the next frame.
                    let n = if n == 0 {
                        t.advance(&c[i..i + 1], false).unwrap()
                    } else {
                        n
                    };
                    i += n;
                    at += n;
                    if t.at_boundary() {
                        found.push(at);
                    }
                }
            }
            assert_eq!(covered, wire.len(), "chunk {chunk}");
            assert!(u.at_boundary(), "chunk {chunk}");
            assert_eq!(found, ends, "chunk {chunk}");
        }
    }

    #[test]
    fn garbage_length_is_an_error() {
        let mut b = vec![0x82, 127];
        b.extend_from_slice(&u64::MAX.to_be_bytes());
        assert!(Tracker::default().advance(&b, false).is_err());
    }
}
