//! The state machine under a controlled clock: no sockets, no tasks, no
//! sleeps. `Pair` runs two connections through a simulated link with a fixed
//! latency (after quinn-proto's `tests/util.rs`); the single-connection
//! tests play the peer by hand, frame by frame.

use super::*;
use crate::frame::decode;

const KIB: usize = 1024;
const MS: Duration = Duration::from_millis(1);

fn cfg() -> Config {
    Config::default()
}

/// Two connections joined by a link that delivers each message `latency`
/// after it was sent, in order.
struct Pair {
    now: Instant,
    latency: Duration,
    c: Connection,
    s: Connection,
    to_s: VecDeque<(Instant, Bytes)>,
    to_c: VecDeque<(Instant, Bytes)>,
}

impl Pair {
    fn new(ccfg: Config, scfg: Config, latency: Duration) -> Pair {
        let now = Instant::now();
        Pair {
            now,
            latency,
            c: Connection::new(Role::Client, ccfg, now),
            s: Connection::new(Role::Server, scfg, now),
            to_s: VecDeque::new(),
            to_c: VecDeque::new(),
        }
    }

    /// Everything due at `now`: timeouts, transmits, deliveries, until
    /// nothing moves.
    fn run(&mut self) {
        loop {
            let mut moved = false;
            for conn in [&mut self.c, &mut self.s] {
                if conn.poll_timeout().is_some_and(|t| t <= self.now) {
                    conn.handle_timeout(self.now);
                }
            }
            let at = self.now + self.latency;
            while let Some(m) = self.c.poll_transmit(self.now) {
                self.to_s.push_back((at, m));
                moved = true;
            }
            while let Some(m) = self.s.poll_transmit(self.now) {
                self.to_c.push_back((at, m));
                moved = true;
            }
            while self.to_s.front().is_some_and(|(t, _)| *t <= self.now) {
                let (_, m) = self.to_s.pop_front().unwrap();
                self.s.handle_message(self.now, Message::Binary(m));
                moved = true;
            }
            while self.to_c.front().is_some_and(|(t, _)| *t <= self.now) {
                let (_, m) = self.to_c.pop_front().unwrap();
                self.c.handle_message(self.now, Message::Binary(m));
                moved = true;
            }
            if !moved {
                return;
            }
        }
    }

    /// Let `d` pass, running every event (delivery or timeout) on its time.
    fn advance(&mut self, d: Duration) {
        let end = self.now + d;
        loop {
            self.run();
            let next = [
                self.to_s.front().map(|(t, _)| *t),
                self.to_c.front().map(|(t, _)| *t),
                self.c.poll_timeout(),
                self.s.poll_timeout(),
            ]
            .into_iter()
            .flatten()
            .filter(|t| *t > self.now)
            .min();
            match next {
                Some(t) if t <= end => self.now = t,
                _ => {
                    self.now = end;
                    self.run();
                    return;
                }
            }
        }
    }
}

/// What `conn` sends now, decoded.
fn sent(conn: &mut Connection, now: Instant) -> Vec<Frame> {
    std::iter::from_fn(|| conn.poll_transmit(now))
        .map(|m| decode(m).expect("the connection sends valid frames"))
        .collect()
}

fn feed(conn: &mut Connection, now: Instant, f: Frame) {
    conn.handle_message(now, Message::Binary(f.encode()));
}

fn events(conn: &mut Connection) -> Vec<Event> {
    std::iter::from_fn(|| conn.poll_event()).collect()
}

fn data(id: u32, flags: Flags, payload: &[u8]) -> Frame {
    Frame::Data {
        stream_id: id,
        flags,
        rst_code: 0,
        payload: Bytes::copy_from_slice(payload),
    }
}

fn rst(id: u32, code: u32) -> Frame {
    Frame::Data {
        stream_id: id,
        flags: Flags::RST,
        rst_code: code,
        payload: Bytes::new(),
    }
}

fn wu(id: u32, flags: Flags, delta: u32) -> Frame {
    Frame::WindowUpdate {
        stream_id: id,
        flags,
        delta,
    }
}

/// Read up to `max` bytes.
fn read(conn: &mut Connection, id: u32, max: usize) -> Result<Vec<u8>, ReadError> {
    let mut out = Vec::new();
    conn.read(id, max, |b| out.extend_from_slice(b))?;
    Ok(out)
}

/// Write as much of `data` as the connection takes now.
fn write_all_now(conn: &mut Connection, id: u32, data: &[u8]) -> usize {
    let mut off = 0;
    while off < data.len() {
        match conn.write(id, &data[off..]) {
            Ok(n) => off += n,
            Err(WriteError::Blocked) => break,
            Err(e) => panic!("write: {e:?}"),
        }
    }
    off
}

fn goaway_code(frames: &[Frame]) -> Option<GoAwayCode> {
    frames.iter().find_map(|f| match f {
        Frame::GoAway { code, .. } => Some(*code),
        _ => None,
    })
}

/// A server connection, at `now`, with the opening PING already sent.
fn server(cfg: Config) -> (Connection, Instant) {
    let now = Instant::now();
    let mut s = Connection::new(Role::Server, cfg, now);
    s.handle_timeout(now);
    assert!(matches!(
        &sent(&mut s, now)[..],
        [Frame::Ping { ack: false, .. }]
    ));
    (s, now)
}

// ---------------------------------------------------------------------------
// Window accounting
// ---------------------------------------------------------------------------

#[test]
fn a_writer_stops_at_its_credit_and_resumes_with_the_window_update() {
    let mut p = Pair::new(cfg(), cfg(), Duration::ZERO);
    let id = p.c.open(p.now).unwrap();
    let payload = vec![7u8; 300 * KIB];
    assert_eq!(write_all_now(&mut p.c, id, &payload), 256 * KIB);
    assert_eq!(p.c.stream_send_credit(id), 0);
    p.run();
    assert_eq!(p.s.accept().unwrap(), Some(id));
    assert_eq!(p.s.stream_buffered(id), 256 * KIB);
    // Credit comes back only once half the window has been read.
    assert_eq!(
        read(&mut p.s, id, 128 * KIB - 1).unwrap().len(),
        128 * KIB - 1
    );
    p.run();
    assert_eq!(p.c.stream_send_credit(id), 0);
    assert!(!events(&mut p.c)
        .iter()
        .any(|e| matches!(e, Event::Writable { .. })));
    assert_eq!(read(&mut p.s, id, 1).unwrap().len(), 1);
    p.run();
    assert_eq!(p.c.stream_send_credit(id), 128 * KIB as u64);
    assert!(events(&mut p.c)
        .iter()
        .any(|e| matches!(e, Event::Writable { id: i } if *i == id)));
    // The rest fits now; the receiver never held more than its window.
    assert_eq!(write_all_now(&mut p.c, id, &payload[256 * KIB..]), 44 * KIB);
    p.run();
    assert_eq!(p.s.stream_buffered(id), 128 * KIB + 44 * KIB);
    assert!(p.s.stats().buffered <= p.s.stats().committed);
}

#[test]
fn bytes_are_written_and_read_without_a_copy_and_counted_as_reads_are() {
    let (mut s, now) = server(cfg());
    let id = s.open(now).unwrap();
    assert!(matches!(
        &sent(&mut s, now)[..],
        [Frame::WindowUpdate { .. }]
    ));
    // Written: each frame's payload is a slice of the Bytes written.
    let mut data = Bytes::from(vec![5u8; 40 * KIB]);
    let base = data.as_ptr() as usize;
    assert_eq!(s.write_bytes(id, &mut data).unwrap(), 40 * KIB);
    assert!(data.is_empty());
    let a = s.poll_transmit_frame(now).unwrap();
    let b = s.poll_transmit_frame(now).unwrap();
    assert_eq!((a.payload.len(), b.payload.len()), (32 * KIB, 8 * KIB));
    assert_eq!(a.payload.as_ptr() as usize, base);
    assert_eq!(b.payload.as_ptr() as usize, base + 32 * KIB);
    assert_eq!(
        decode(a.to_bytes()).unwrap(),
        data_frame(id, &[5u8; 32 * KIB])
    );
    assert_eq!(s.stats().send_queue, 0);
    // Read: the received payloads themselves; the window is credited back
    // as with `read`.
    let mut ptr1 = None;
    for (b, n) in [(1u8, 60 * KIB), (2, 60 * KIB), (3, 30 * KIB)] {
        let msg = data_frame(id, &vec![b; n]).encode();
        ptr1.get_or_insert(msg.as_ptr() as usize + frame::HEADER_LEN);
        s.handle_message(now, Message::Binary(msg));
    }
    let ptr1 = ptr1.unwrap();
    let mut out = Vec::new();
    assert_eq!(
        s.read_bytes(id, 140 * KIB, |b| out.push(b)).unwrap(),
        140 * KIB
    );
    assert_eq!(out[0].as_ptr() as usize, ptr1);
    let lens: Vec<usize> = out.iter().map(|b| b.len()).collect();
    assert_eq!(lens, [60 * KIB, 60 * KIB, 20 * KIB]);
    assert_eq!(s.stream_buffered(id), 10 * KIB);
    assert!(matches!(
        &sent(&mut s, now)[..],
        [Frame::WindowUpdate { delta, .. }] if *delta == 140 * KIB as u32
    ));
}

fn data_frame(id: u32, payload: &[u8]) -> Frame {
    data(id, Flags::empty(), payload)
}

#[test]
fn one_window_update_credits_everything_read_since_the_last() {
    let (mut s, now) = server(cfg());
    feed(&mut s, now, wu(1, Flags::SYN, 0));
    assert_eq!(s.accept().unwrap(), Some(1));
    assert!(
        matches!(&sent(&mut s, now)[..], [Frame::WindowUpdate { flags, .. }] if flags.contains(Flags::ACK))
    );
    for _ in 0..4 {
        feed(&mut s, now, data(1, Flags::empty(), &[1u8; 64 * KIB]));
    }
    // Reading in small pieces queues a single update, once, for all of it.
    for _ in 0..(192 * KIB / 1000) {
        read(&mut s, 1, 1000).unwrap();
    }
    let frames = sent(&mut s, now);
    let [Frame::WindowUpdate {
        stream_id: 1,
        flags,
        delta,
    }] = &frames[..]
    else {
        panic!("{frames:?}")
    };
    assert_eq!(*flags, Flags::empty());
    assert_eq!(*delta as usize, 192 * KIB / 1000 * 1000);
}

#[test]
fn data_beyond_the_credit_is_a_flow_control_error() {
    let (mut s, now) = server(cfg());
    feed(&mut s, now, wu(1, Flags::SYN, 0));
    for _ in 0..4 {
        feed(&mut s, now, data(1, Flags::empty(), &[1u8; 64 * KIB]));
    }
    assert!(s.error().is_none());
    feed(&mut s, now, data(1, Flags::empty(), b"x"));
    assert_eq!(
        goaway_code(&sent(&mut s, now)),
        Some(GoAwayCode::FlowControlError)
    );
    assert_eq!(
        s.error().and_then(Error::goaway_code),
        Some(GoAwayCode::FlowControlError)
    );
    // Credit above 2^32-1 is the same error.
    let (mut s, now) = server(cfg());
    feed(&mut s, now, wu(2, Flags::empty(), 0)); // never opened: protocol error
    assert_eq!(
        goaway_code(&sent(&mut s, now)),
        Some(GoAwayCode::ProtocolError)
    );
    let (mut s, now) = server(cfg());
    let id = s.open(now).unwrap();
    feed(&mut s, now, wu(id, Flags::ACK, u32::MAX - 256 * KIB as u32));
    assert!(s.error().is_none());
    feed(&mut s, now, wu(id, Flags::empty(), 1));
    assert_eq!(
        goaway_code(&sent(&mut s, now)),
        Some(GoAwayCode::FlowControlError)
    );
}

#[test]
fn the_window_doubles_only_when_read_within_two_round_trips() {
    let lat = 10 * MS;
    let mut p = Pair::new(cfg(), cfg(), lat);
    p.advance(100 * MS); // the opening PINGs measure the RTT
    assert_eq!(p.s.rtt(), Some(2 * lat));
    let id = p.c.open(p.now).unwrap();
    write_all_now(&mut p.c, id, &vec![0u8; 256 * KIB]);
    p.advance(lat);
    assert_eq!(p.s.accept().unwrap(), Some(id));
    // Read half at once: within 2 x RTT of the stream's start.
    read(&mut p.s, id, 128 * KIB).unwrap();
    // (Window updates go ahead of the ACK, which is queued with the DATA.)
    let frames = sent(&mut p.s, p.now);
    assert!(
        matches!(
            &frames[..],
            [Frame::WindowUpdate { flags: f1, delta, .. }, Frame::WindowUpdate { flags: f2, .. }]
                if *f1 == Flags::empty() && *delta as usize == 512 * KIB - 128 * KIB
                    && *f2 == Flags::ACK
        ),
        "{frames:?}"
    );
    assert_eq!(p.s.stream_window(id), 512 * KIB as u32);
    assert_eq!(p.s.stats().committed, 512 * KIB);
    // The next half-window read slowly: the window stays, and the update
    // credits exactly what was read.
    for f in frames {
        feed(&mut p.c, p.now, f);
    }
    assert_eq!(
        write_all_now(&mut p.c, id, &vec![0u8; 512 * KIB]),
        384 * KIB
    );
    p.advance(lat);
    assert_eq!(p.s.stream_buffered(id), 512 * KIB);
    p.advance(Duration::from_secs(1));
    read(&mut p.s, id, 256 * KIB).unwrap();
    let frames = sent(&mut p.s, p.now);
    assert!(
        matches!(&frames[..], [Frame::WindowUpdate { delta, .. }] if *delta as usize == 256 * KIB),
        "{frames:?}"
    );
    assert_eq!(p.s.stream_window(id), 512 * KIB as u32);
    // Bounded by max_window.
    let small = Config {
        max_window: 300 * KIB as u32,
        ..cfg()
    };
    let mut p = Pair::new(cfg(), small, lat);
    p.advance(100 * MS);
    let id = p.c.open(p.now).unwrap();
    write_all_now(&mut p.c, id, &vec![0u8; 256 * KIB]);
    p.advance(lat);
    p.s.accept().unwrap();
    read(&mut p.s, id, 128 * KIB).unwrap();
    p.run();
    assert_eq!(p.s.stream_window(id), 300 * KIB as u32);
}

#[test]
fn memory_cap_refuses_streams_whose_window_does_not_fit() {
    let small = Config {
        max_session_memory: 600 * KIB,
        ..cfg()
    };
    let (mut s, now) = server(small);
    feed(&mut s, now, wu(1, Flags::SYN, 0));
    feed(&mut s, now, wu(3, Flags::SYN, 0));
    feed(&mut s, now, wu(5, Flags::SYN, 0));
    let frames = sent(&mut s, now);
    assert!(
        matches!(&frames[..], [Frame::Data { stream_id: 5, flags, rst_code: 1, .. }] if *flags == Flags::RST),
        "{frames:?}"
    );
    assert_eq!(s.stats().committed, 512 * KIB);
    assert!(matches!(s.open(now), Err(Error::MemoryLimit { limit }) if limit == 600 * KIB));
}

// ---------------------------------------------------------------------------
// FIN / RST ordering
// ---------------------------------------------------------------------------

#[test]
fn fin_and_rst_are_ordered_after_the_data_before_them() {
    let mut p = Pair::new(cfg(), cfg(), Duration::ZERO);
    let a = p.c.open(p.now).unwrap();
    let b = p.c.open(p.now).unwrap();
    p.c.write(a, b"first").unwrap();
    p.c.finish(a).unwrap();
    p.c.write(b, b"second").unwrap();
    p.c.reset(b, 42);
    let frames = sent(&mut p.c, p.now);
    let kinds: Vec<_> = frames
        .iter()
        .map(|f| match f {
            Frame::WindowUpdate {
                stream_id, flags, ..
            } => (*stream_id, *flags, 0),
            Frame::Data {
                stream_id,
                flags,
                payload,
                ..
            } => (*stream_id, *flags, payload.len()),
            f => panic!("{f:?}"),
        })
        .collect();
    assert_eq!(
        kinds,
        [
            (a, Flags::SYN, 0),
            (b, Flags::SYN, 0),
            (a, Flags::empty(), 5),
            (a, Flags::FIN, 0),
            (b, Flags::empty(), 6),
            (b, Flags::RST, 0),
        ]
    );
    for f in frames {
        feed(&mut p.s, p.now, f);
    }
    p.s.accept().unwrap();
    p.s.accept().unwrap();
    // FIN: the data, then end of stream.
    assert_eq!(read(&mut p.s, a, 100).unwrap(), b"first");
    assert_eq!(read(&mut p.s, a, 100).unwrap(), b"");
    // RST: the data, then the reset.
    assert_eq!(read(&mut p.s, b, 100).unwrap(), b"second");
    assert!(matches!(read(&mut p.s, b, 100), Err(ReadError::Reset(42))));
    assert!(matches!(p.s.write(b, b"x"), Err(WriteError::Reset(42))));
    let ev = events(&mut p.s);
    assert!(ev
        .iter()
        .any(|e| matches!(e, Event::Finished { id } if *id == a)));
    assert!(ev
        .iter()
        .any(|e| matches!(e, Event::Reset { id, code: 42 } if *id == b)));
    // Neither stream is answered with a frame of its own besides the ACKs.
    assert!(sent(&mut p.s, p.now)
        .iter()
        .all(|f| matches!(f, Frame::WindowUpdate { flags, .. } if flags.contains(Flags::ACK))));
}

#[test]
fn a_blocked_reader_is_told_once_data_fin_or_rst_arrives() {
    let (mut s, now) = server(cfg());
    feed(&mut s, now, wu(1, Flags::SYN, 0));
    feed(&mut s, now, wu(3, Flags::SYN, 0));
    feed(&mut s, now, wu(5, Flags::SYN, 0));
    events(&mut s);
    for id in [1, 3, 5] {
        assert!(matches!(read(&mut s, id, 10), Err(ReadError::Blocked)));
    }
    feed(&mut s, now, data(1, Flags::empty(), b"x"));
    feed(&mut s, now, data(1, Flags::empty(), b"y")); // no second event
    feed(&mut s, now, data(3, Flags::FIN, b""));
    feed(&mut s, now, rst(5, 9));
    let readable: Vec<u32> = events(&mut s)
        .into_iter()
        .filter_map(|e| match e {
            Event::Readable { id } => Some(id),
            _ => None,
        })
        .collect();
    assert_eq!(readable, [1, 3, 5]);
}

#[test]
fn dropping_a_stream_resets_it_unless_it_closed_cleanly() {
    let mut p = Pair::new(cfg(), cfg(), Duration::ZERO);
    let a = p.c.open(p.now).unwrap();
    let b = p.c.open(p.now).unwrap();
    p.run();
    p.s.accept().unwrap();
    p.s.accept().unwrap();
    p.c.finish(a).unwrap();
    p.s.finish(a).unwrap();
    p.run();
    assert_eq!(read(&mut p.c, a, 1).unwrap(), b"");
    p.c.release(a); // closed cleanly: nothing sent
    p.c.release(b); // still open: RST CANCEL
    let frames = sent(&mut p.c, p.now);
    assert!(
        matches!(&frames[..], [Frame::Data { stream_id, flags, rst_code: 0, .. }] if *stream_id == b && *flags == Flags::RST),
        "{frames:?}"
    );
    assert_eq!(p.c.stats().streams, 0);
    assert_eq!(p.c.stats().committed, 0);
}

// ---------------------------------------------------------------------------
// The rules docs/mux.md now states
// ---------------------------------------------------------------------------

/// §3.3: after a clean close (FIN both ways) every frame for the stream is
/// ignored, DATA included, whether or not the application still holds it;
/// DATA after the peer's FIN while our side is open is a protocol error.
#[test]
fn data_after_a_clean_close_is_ignored_whether_or_not_the_stream_was_released() {
    for release in [false, true] {
        let (mut s, now) = server(cfg());
        feed(&mut s, now, data(1, Flags::SYN.with(Flags::FIN), b"req"));
        s.accept().unwrap();
        assert_eq!(read(&mut s, 1, 10).unwrap(), b"req");
        s.finish(1).unwrap();
        if release {
            s.release(1);
        }
        sent(&mut s, now);
        feed(&mut s, now, data(1, Flags::empty(), b"late"));
        feed(&mut s, now, data(1, Flags::FIN, b""));
        feed(&mut s, now, wu(1, Flags::empty(), 5));
        assert!(s.error().is_none(), "release {release}: {:?}", s.error());
        assert!(sent(&mut s, now).is_empty());
        assert_eq!(s.stats().buffered, 0);
    }
    // Half-closed (the peer's FIN in, ours not out): DATA is an error.
    let (mut s, now) = server(cfg());
    feed(&mut s, now, data(1, Flags::SYN.with(Flags::FIN), b"req"));
    feed(&mut s, now, data(1, Flags::empty(), b"late"));
    assert_eq!(
        goaway_code(&sent(&mut s, now)),
        Some(GoAwayCode::ProtocolError)
    );
}

/// §3.3: a second FIN (empty DATA, or on a WINDOW_UPDATE) is a protocol
/// error while the stream is open on the receiver's side; WINDOW_UPDATEs
/// after the peer's FIN are fine (credit for the other direction).
#[test]
fn a_second_fin_is_a_protocol_error() {
    for second in [data(1, Flags::FIN, b""), wu(1, Flags::FIN, 0)] {
        let (mut s, now) = server(cfg());
        feed(&mut s, now, data(1, Flags::SYN.with(Flags::FIN), b""));
        feed(&mut s, now, wu(1, Flags::empty(), 100));
        assert!(s.error().is_none());
        feed(&mut s, now, second);
        assert_eq!(
            goaway_code(&sent(&mut s, now)),
            Some(GoAwayCode::ProtocolError)
        );
    }
    // An empty DATA without FIN after FIN is DATA after FIN too.
    let (mut s, now) = server(cfg());
    feed(&mut s, now, data(1, Flags::SYN.with(Flags::FIN), b""));
    feed(&mut s, now, data(1, Flags::empty(), b""));
    assert_eq!(
        goaway_code(&sent(&mut s, now)),
        Some(GoAwayCode::ProtocolError)
    );
    // RST after FIN is allowed.
    let (mut s, now) = server(cfg());
    feed(&mut s, now, data(1, Flags::SYN.with(Flags::FIN), b""));
    feed(&mut s, now, rst(1, 3));
    assert!(s.error().is_none());
}

/// §3.2: DATA with SYN|RST uses up the id and opens nothing: no stream to
/// accept, nothing sent back; later frames for the id are ignored.
#[test]
fn syn_with_rst_uses_up_the_id_and_opens_nothing() {
    let (mut s, now) = server(cfg());
    feed(
        &mut s,
        now,
        Frame::Data {
            stream_id: 1,
            flags: Flags::SYN.with(Flags::RST),
            rst_code: 0,
            payload: Bytes::new(),
        },
    );
    assert!(s.error().is_none());
    assert_eq!(s.accept().unwrap(), None);
    assert_eq!(s.stats().streams, 0);
    assert!(sent(&mut s, now).is_empty());
    assert!(events(&mut s).is_empty());
    feed(&mut s, now, data(1, Flags::empty(), b"x"));
    assert!(s.error().is_none());
    // The id is used: a SYN for it again is a protocol error.
    feed(&mut s, now, wu(1, Flags::SYN, 0));
    assert_eq!(
        goaway_code(&sent(&mut s, now)),
        Some(GoAwayCode::ProtocolError)
    );
}

/// §3.2: ACK is the acceptor's; an ACK from the stream's opener is a
/// protocol error, whatever the stream's state.
#[test]
fn an_ack_from_the_opener_is_a_protocol_error() {
    for ack in [wu(1, Flags::ACK, 0), data(1, Flags::ACK, b"x")] {
        let (mut s, now) = server(cfg());
        feed(&mut s, now, wu(1, Flags::SYN, 0));
        feed(&mut s, now, ack);
        assert_eq!(
            goaway_code(&sent(&mut s, now)),
            Some(GoAwayCode::ProtocolError)
        );
    }
    // The acceptor's ACK is fine, and its value is credit.
    let (mut s, now) = server(cfg());
    let id = s.open(now).unwrap();
    feed(&mut s, now, wu(id, Flags::ACK, 1000));
    assert!(s.error().is_none());
    assert_eq!(s.stream_send_credit(id), 256 * KIB as u64 + 1000);
}

/// §3.2 / §4.2: the ACK goes out on accept even after the opener's FIN
/// (SYN|FIN): "no updates after FIN" is about credit. A stream the opener
/// reset before it was accepted gets no ACK.
#[test]
fn accept_acks_a_syn_fin_stream_but_not_a_reset_one() {
    let big = Config {
        initial_window: 512 * KIB as u32,
        ..cfg()
    };
    let (mut s, now) = server(big);
    feed(&mut s, now, data(1, Flags::SYN.with(Flags::FIN), b"all"));
    feed(&mut s, now, wu(3, Flags::SYN, 0));
    feed(&mut s, now, rst(3, 0));
    assert_eq!(s.accept().unwrap(), Some(1));
    assert_eq!(s.accept().unwrap(), Some(3));
    let frames = sent(&mut s, now);
    assert!(
        matches!(&frames[..], [Frame::WindowUpdate { stream_id: 1, flags, delta }] if *flags == Flags::ACK && *delta == 256 * KIB as u32),
        "{frames:?}"
    );
    // Reading to the end sends no credit update.
    assert_eq!(read(&mut s, 1, 10).unwrap(), b"all");
    assert_eq!(read(&mut s, 1, 10).unwrap(), b"");
    assert!(sent(&mut s, now).is_empty());
    assert!(matches!(read(&mut s, 3, 10), Err(ReadError::Reset(0))));
}

/// §3.2: 256 streams by default; a refused stream gets one DATA|RST with
/// REFUSED and nothing else; what follows for it is ignored.
#[test]
fn the_257th_stream_is_refused_with_rst_refused_only() {
    assert_eq!(cfg().max_streams, 256);
    let (mut s, now) = server(Config {
        max_session_memory: 1 << 30,
        ..cfg()
    });
    for i in 0..256u32 {
        feed(&mut s, now, wu(2 * i + 1, Flags::SYN, 0));
    }
    assert!(sent(&mut s, now).is_empty());
    let refused = 2 * 256 + 1;
    feed(&mut s, now, data(refused, Flags::SYN, b"hello"));
    feed(&mut s, now, data(refused, Flags::FIN, b""));
    feed(&mut s, now, wu(refused, Flags::empty(), 7));
    assert!(s.error().is_none());
    let frames = sent(&mut s, now);
    assert_eq!(frames, [rst(refused, reset_code::REFUSED)]);
    assert_eq!(s.stats().streams, 256);
    assert_eq!(s.stats().buffered, 0);
    // Locally, the 257th open fails.
    assert!(matches!(s.open(now), Err(Error::TooManyStreams(256))));
}

/// §5: answers are coalesced (the latest request's value answers all
/// pending ones), and an answer settles the outstanding PING; one that
/// matches no outstanding request is ignored.
#[test]
fn ping_answers_are_coalesced_and_settle_the_outstanding_ping() {
    let (mut s, now) = server(cfg());
    for v in [7, 8, 9] {
        feed(
            &mut s,
            now,
            Frame::Ping {
                ack: false,
                opaque: v,
            },
        );
    }
    assert_eq!(
        sent(&mut s, now),
        [Frame::Ping {
            ack: true,
            opaque: 9
        }]
    );
    // Our opening PING (value 1) is outstanding: a stale or foreign answer
    // settles nothing, the right one does.
    feed(
        &mut s,
        now + 5 * MS,
        Frame::Ping {
            ack: true,
            opaque: 77,
        },
    );
    assert_eq!(s.rtt(), None);
    feed(
        &mut s,
        now + 5 * MS,
        Frame::Ping {
            ack: true,
            opaque: 1,
        },
    );
    assert_eq!(s.rtt(), Some(5 * MS));
    assert_eq!(
        s.poll_timeout(),
        Some(now + 5 * MS + Duration::from_secs(15))
    );
}

// ---------------------------------------------------------------------------
// Keepalive deadlines
// ---------------------------------------------------------------------------

#[test]
fn keepalive_pings_every_interval_counted_from_the_answer() {
    let mut p = Pair::new(cfg(), cfg(), 10 * MS);
    let start = p.now;
    assert_eq!(
        p.c.poll_timeout(),
        Some(start),
        "the first PING is due at once"
    );
    p.advance(100 * MS);
    assert_eq!(p.c.rtt(), Some(20 * MS));
    assert_eq!(
        p.c.poll_timeout(),
        Some(start + 20 * MS + Duration::from_secs(15))
    );
    // An hour of quiet link: both stay up, RTT measured each round.
    p.advance(Duration::from_secs(3600));
    assert!(p.c.error().is_none() && p.s.error().is_none());
    assert_eq!(p.s.rtt(), Some(20 * MS));
}

#[test]
fn a_silent_peer_is_dead_at_the_keepalive_timeout_after_the_ping() {
    let c = Config {
        keepalive_interval: Some(Duration::from_secs(10)),
        keepalive_timeout: Duration::from_secs(5),
        ..cfg()
    };
    let (mut s, start) = server(c); // PING sent at `start`
    assert_eq!(s.poll_timeout(), Some(start + Duration::from_secs(5)));
    s.handle_timeout(start + Duration::from_secs(5) - Duration::from_nanos(1));
    assert!(s.error().is_none());
    // Any message from the peer is a sign of life: the deadline moves.
    let t = start + Duration::from_secs(3);
    feed(
        &mut s,
        t,
        Frame::Ping {
            ack: false,
            opaque: 1,
        },
    );
    assert_eq!(s.poll_timeout(), Some(t + Duration::from_secs(5)));
    s.handle_timeout(start + Duration::from_secs(5));
    assert!(s.error().is_none());
    let dead = t + Duration::from_secs(5);
    s.handle_timeout(dead);
    assert!(matches!(s.error(), Some(Error::KeepaliveTimeout(_))));
    let frames = sent(&mut s, dead);
    assert_eq!(goaway_code(&frames), Some(GoAwayCode::KeepaliveTimeout));
    assert!(events(&mut s).iter().any(|e| matches!(
        e,
        Event::Closed {
            error: Error::KeepaliveTimeout(_)
        }
    )));
}

#[test]
fn without_keepalive_only_the_opening_ping_is_sent_and_nobody_dies() {
    let c = Config {
        keepalive_interval: None,
        ..cfg()
    };
    let (mut s, start) = server(c);
    assert_eq!(s.poll_timeout(), None);
    s.handle_timeout(start + Duration::from_secs(3600));
    assert!(s.error().is_none());
    assert!(sent(&mut s, start).is_empty());
}

// ---------------------------------------------------------------------------
// GOAWAY and the end of a session
// ---------------------------------------------------------------------------

#[test]
fn goaway_normal_refuses_new_streams_and_lets_open_ones_finish() {
    let mut p = Pair::new(cfg(), cfg(), Duration::ZERO);
    let id = p.c.open(p.now).unwrap();
    p.run();
    p.s.accept().unwrap();
    p.s.goaway();
    p.run();
    assert!(p.c.peer_goaway());
    assert!(!p.c.accepts_new_streams() && !p.s.accepts_new_streams());
    assert!(events(&mut p.c).iter().any(|e| matches!(e, Event::GoAway)));
    assert!(matches!(p.c.open(p.now), Err(Error::PeerGoAway)));
    assert!(matches!(p.s.open(p.now), Err(Error::LocalGoAway)));
    assert!(matches!(p.s.accept(), Err(Error::LocalGoAway)));
    // A SYN that crossed the GOAWAY is refused.
    feed(&mut p.s, p.now, wu(id + 2, Flags::SYN, 0));
    assert_eq!(sent(&mut p.s, p.now), [rst(id + 2, reset_code::REFUSED)]);
    // The open stream still works both ways.
    p.c.write(id, b"ping").unwrap();
    p.c.finish(id).unwrap();
    p.run();
    assert_eq!(read(&mut p.s, id, 10).unwrap(), b"ping");
    p.s.write(id, b"pong").unwrap();
    p.s.finish(id).unwrap();
    p.run();
    assert_eq!(read(&mut p.c, id, 10).unwrap(), b"pong");
    assert_eq!(read(&mut p.c, id, 10).unwrap(), b"");
    assert!(p.c.error().is_none() && p.s.error().is_none());
}

#[test]
fn an_error_goaway_from_the_peer_is_not_answered() {
    let (mut s, now) = server(cfg());
    feed(
        &mut s,
        now,
        Frame::GoAway {
            code: GoAwayCode::InternalError,
            reason: "oops".into(),
        },
    );
    assert!(
        matches!(s.error(), Some(Error::RemoteGoAway { code: GoAwayCode::InternalError, reason }) if reason == "oops")
    );
    assert!(sent(&mut s, now).is_empty());
    assert!(s.is_closing());
}

/// The defect fix, on the state machine: after a protocol error the GOAWAY
/// goes out, then the transport is closed, and input is discarded until the
/// peer's close, or until the close timeout.
#[test]
fn after_a_protocol_error_input_is_discarded_until_the_peer_closes() {
    let (mut s, now) = server(cfg());
    feed(&mut s, now, data(9, Flags::empty(), b"never opened"));
    assert!(s.is_closing() && !s.is_closed());
    assert_eq!(
        goaway_code(&sent(&mut s, now)),
        Some(GoAwayCode::ProtocolError)
    );
    assert_eq!(s.poll_transmit(now), None); // now close the transport
    s.handle_send_closed(now, None);
    assert!(!s.is_closed(), "waits for the peer's close");
    for i in 0..20 {
        feed(&mut s, now + i * MS, data(9, Flags::empty(), &[0u8; KIB]));
    }
    assert!(sent(&mut s, now).is_empty());
    assert_eq!(s.stats().buffered, 0);
    s.handle_recv_closed(now + 30 * MS, None);
    assert!(s.is_closed());
    assert_eq!(s.poll_timeout(), None);

    // A peer that never closes: the close timeout ends the wait.
    let (mut s, now) = server(cfg());
    s.handle_message(now, Message::Text(Bytes::from_static(&[0xff, 0xfe])));
    assert_eq!(
        goaway_code(&sent(&mut s, now)),
        Some(GoAwayCode::TextMessage)
    );
    s.handle_send_closed(now, None);
    let deadline = now + cfg().close_timeout;
    assert_eq!(s.poll_timeout(), Some(deadline));
    s.handle_timeout(deadline - MS);
    assert!(!s.is_closed());
    s.handle_timeout(deadline);
    assert!(s.is_closed());
}

#[test]
fn closing_the_session_sends_queued_data_then_goaway_normal() {
    let mut p = Pair::new(cfg(), cfg(), Duration::ZERO);
    p.run();
    let id = p.c.open(p.now).unwrap();
    p.c.write(id, b"last words").unwrap();
    p.c.finish(id).unwrap();
    p.c.close(p.now);
    assert!(matches!(
        p.c.write(id, b"x"),
        Err(WriteError::Session(Error::SessionClosed))
    ));
    let frames = sent(&mut p.c, p.now);
    assert_eq!(frames.len(), 4, "{frames:?}");
    assert!(matches!(
        &frames[3],
        Frame::GoAway {
            code: GoAwayCode::Normal,
            ..
        }
    ));
    for f in frames {
        feed(&mut p.s, p.now, f);
    }
    let sid = p.s.accept().unwrap().unwrap();
    assert_eq!(read(&mut p.s, sid, 100).unwrap(), b"last words");
    assert!(p.s.peer_goaway());
    // Then the transport closes: the peer's session ends cleanly.
    p.s.handle_recv_closed(p.now, None);
    assert!(matches!(p.s.error(), Some(Error::TransportClosed)));
    assert_eq!(
        read(&mut p.s, sid, 100).unwrap(),
        b"",
        "the FIN still reads as EOF"
    );
}

#[test]
fn a_failed_send_is_judged_by_what_reading_finds_or_after_the_close_timeout() {
    // The peer's GOAWAY and close are still waiting to be read: EOF follows.
    let (mut s, now) = server(cfg());
    s.handle_send_closed(now, Some(io::ErrorKind::BrokenPipe.into()));
    assert!(s.error().is_none());
    assert_eq!(s.poll_transmit(now), None);
    feed(
        &mut s,
        now + MS,
        Frame::GoAway {
            code: GoAwayCode::Normal,
            reason: String::new(),
        },
    );
    s.handle_recv_closed(now + MS, None);
    assert!(matches!(s.error(), Some(Error::TransportClosed)));
    assert!(s.is_closed());
    // Nothing arrives: the error stands after the close timeout.
    let (mut s, now) = server(cfg());
    s.handle_send_closed(now, Some(io::ErrorKind::ConnectionReset.into()));
    assert_eq!(s.poll_timeout(), Some(now + cfg().close_timeout));
    s.handle_timeout(now + cfg().close_timeout);
    assert!(
        matches!(s.error(), Some(Error::Transport(e)) if e.kind() == io::ErrorKind::ConnectionReset)
    );
    assert!(s.is_closed());
}

#[test]
fn the_send_queue_is_bounded_and_wakes_its_writers() {
    let c = Config {
        max_send_queue: 64 * KIB,
        ..cfg()
    };
    let mut p = Pair::new(c.clone(), c, Duration::ZERO);
    let a = p.c.open(p.now).unwrap();
    let b = p.c.open(p.now).unwrap();
    assert_eq!(write_all_now(&mut p.c, a, &[0u8; 100 * KIB]), 64 * KIB);
    assert!(matches!(p.c.write(b, b"x"), Err(WriteError::Blocked)));
    assert!(p.c.stats().send_queue >= 64 * KIB);
    p.c.poll_transmit(p.now); // SYN a
    p.c.poll_transmit(p.now); // SYN b
    p.c.poll_transmit(p.now); // 32 KiB of DATA
    let woken: Vec<u32> = events(&mut p.c)
        .into_iter()
        .filter_map(|e| match e {
            Event::Writable { id } => Some(id),
            _ => None,
        })
        .collect();
    assert_eq!(woken, [a, b]);
}

#[test]
fn the_driver_is_woken_only_when_it_ran_dry() {
    let mut p = Pair::new(cfg(), cfg(), Duration::ZERO);
    p.run();
    assert!(!p.c.take_wakeup());
    let id = p.c.open(p.now).unwrap();
    assert!(p.c.take_wakeup(), "first frame after running dry");
    p.c.write(id, b"x").unwrap();
    assert!(!p.c.take_wakeup(), "the driver has not run dry since");
    p.run();
    p.c.write(id, b"y").unwrap();
    assert!(p.c.take_wakeup());
}
