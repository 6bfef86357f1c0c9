//! The sans-IO core: one session's state machine, without sockets, tasks or
//! clocks (the `quinn-proto` half of a `quinn-proto` / `quinn` split).
//!
//! A [`Connection`] takes what happens to a session and gives back what to
//! do about it. It reads no clock: every call that depends on time takes the
//! current [`Instant`], so tests run it with a controlled clock and it is
//! fully deterministic. [`crate::Session`] drives one on Tokio.
//!
//! A session's life, as the driver sees it:
//!
//! 1. **In**: each message from the transport goes to
//!    [`Connection::handle_message`]; the end of the transport's receive side
//!    to [`Connection::handle_recv_closed`].
//! 2. **Out**: [`Connection::poll_transmit`] gives the next message to send,
//!    by priority (GOAWAY, PING answers, PINGs, refusals, window updates,
//!    then DATA/SYN/ACK/FIN/RST in the order they were queued); a failed send
//!    or a completed transport close goes to [`Connection::handle_send_closed`].
//! 3. **Time**: [`Connection::poll_timeout`] says when
//!    [`Connection::handle_timeout`] is due next (keepalive PING, dead-peer
//!    deadline, close timeout).
//! 4. **Events**: [`Connection::poll_event`] tells the application what
//!    changed ([`Event`]). Drain it after every call.
//! 5. **Application**: [`Connection::open`], [`Connection::accept`],
//!    [`Connection::read`], [`Connection::write`], [`Connection::finish`],
//!    [`Connection::reset`], [`Connection::release`], [`Connection::goaway`]
//!    and [`Connection::close`].
//! 6. **End**: once the session has failed or been closed
//!    ([`Connection::is_closing`]), the driver sends what
//!    [`Connection::poll_transmit`] still gives, closes the transport, and
//!    keeps reading (the core discards what arrives) until the peer's close
//!    or the close timeout: then [`Connection::is_closed`] is true and the
//!    transport can be dropped. This completes the WebSocket close handshake,
//!    so a peer that is still sending reads the GOAWAY instead of a reset.
//!
//! Flow control, stream states, GOAWAY and keepalive follow `docs/mux.md`;
//! each rule there that needs state is enforced here.

use crate::config::Config;
use crate::error::Error;
use crate::frame::{
    self, reset_code, Flags, Frame, FrameType, GoAwayCode, Outgoing, INITIAL_WINDOW,
};
use crate::pool::BufPool;
use crate::transport::Message;
use bytes::{Buf, Bytes};
use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// RSTs for refused streams waiting to be sent; input should pause while this
/// many are queued ([`Connection::accepts_input`]), so a SYN flood cannot grow
/// memory.
const RST_QUEUE_CAP: usize = 64;
/// Frame buffers a session keeps for reuse (at most about 800 KiB with 32 KiB
/// frames, and only as many as were in flight at once).
const POOL_BUFFERS: usize = 24;
/// Frames one [`Connection::write`] queues at most: fewer calls for large
/// writes, and a bounded overshoot of the send queue.
const WRITE_FRAMES: usize = 4;

/// Which end of the WebSocket this side is: the client opens odd stream ids,
/// the server even ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The WebSocket client (odd stream ids).
    Client,
    /// The WebSocket server (even stream ids).
    Server,
}

/// What changed, for the application. Stream events name the stream id.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Event {
    /// The peer opened stream `id`; [`Connection::accept`] returns it.
    Opened {
        /// The new stream.
        id: u32,
    },
    /// A [`Connection::read`] that returned [`ReadError::Blocked`] can go on:
    /// data, the end of the stream or a reset arrived.
    Readable {
        /// The stream.
        id: u32,
    },
    /// A [`Connection::write`] that returned [`WriteError::Blocked`] can go
    /// on: credit or send-queue room, or a reset.
    Writable {
        /// The stream.
        id: u32,
    },
    /// The peer's FIN arrived: reads end once the buffered data is read.
    Finished {
        /// The stream.
        id: u32,
    },
    /// The peer reset stream `id` with `code`.
    Reset {
        /// The stream.
        id: u32,
        /// The reset code.
        code: u32,
    },
    /// The peer sent GOAWAY NORMAL: no new streams either way.
    GoAway,
    /// The session ended (the error says why, and which GOAWAY code went or
    /// came, see [`Error::goaway_code`]). Every stream operation now fails
    /// with it, after the data already received has been read.
    Closed {
        /// Why.
        error: Error,
    },
}

/// Why [`Connection::read`] returned no data.
#[derive(Debug, Clone)]
pub enum ReadError {
    /// Nothing to read yet: an [`Event::Readable`] follows.
    Blocked,
    /// The peer reset the stream with this code (all data received before
    /// the reset has been read).
    Reset(u32),
    /// This side reset the stream.
    LocallyReset,
    /// No such stream (never opened, or released).
    UnknownStream,
    /// The session ended.
    Session(Error),
}

/// Why [`Connection::write`] (or [`Connection::finish`]) did not write.
#[derive(Debug, Clone)]
pub enum WriteError {
    /// No credit or no room in the send queue: an [`Event::Writable`]
    /// follows.
    Blocked,
    /// The peer reset the stream with this code.
    Reset(u32),
    /// This side already sent FIN or RST on the stream.
    Closed,
    /// No such stream (never opened, or released).
    UnknownStream,
    /// The session ended.
    Session(Error),
}

/// A snapshot of a session's resource usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Streams alive (including those waiting in the accept backlog).
    pub streams: usize,
    /// Received bytes buffered by all streams, not yet read.
    pub buffered: usize,
    /// Sum of all streams' receive windows (bounded by
    /// [`Config::max_session_memory`]).
    pub committed: usize,
    /// Bytes of DATA queued for the transport.
    pub send_queue: usize,
}

struct StreamState {
    // --- receive side ---
    recv_buf: VecDeque<Bytes>,
    /// Bytes in `recv_buf`.
    buffered: usize,
    /// Credit the peer still has (bytes it may send before a WINDOW_UPDATE).
    recv_credit: u32,
    /// Current receive window (committed memory for this stream).
    window: u32,
    /// When the last WINDOW_UPDATE was sent (auto-tuning).
    last_update: Instant,
    wu_pending: bool,
    fin_recv: bool,
    rst_recv: Option<u32>,
    /// A read found nothing: owe an [`Event::Readable`].
    read_blocked: bool,
    // --- send side ---
    send_credit: u64,
    fin_sent: bool,
    rst_sent: bool,
    /// A write found no credit: owe an [`Event::Writable`].
    write_blocked: bool,
    /// In `queue_waiters`: a write found the send queue full.
    waiting_queue: bool,
}

impl StreamState {
    fn new(window: u32, recv_credit: u32, send_credit: u64, now: Instant) -> Self {
        StreamState {
            recv_buf: VecDeque::new(),
            buffered: 0,
            recv_credit,
            window,
            last_update: now,
            wu_pending: false,
            fin_recv: false,
            rst_recv: None,
            read_blocked: false,
            send_credit,
            fin_sent: false,
            rst_sent: false,
            write_blocked: false,
            waiting_queue: false,
        }
    }

    /// Closed (docs/mux.md §3.5): FIN both ways, or RST either way. Every
    /// frame for a closed stream is ignored.
    fn closed(&self) -> bool {
        self.rst_sent || self.rst_recv.is_some() || (self.fin_sent && self.fin_recv)
    }

    /// Bytes the application has read but the peer has not been credited for.
    fn uncredited(&self) -> u32 {
        self.window
            .saturating_sub(self.recv_credit)
            .saturating_sub(self.buffered as u32)
    }
}

struct PingState {
    /// The keepalive/RTT PING in flight: its value and when it was sent.
    outstanding: Option<(u32, Instant)>,
    /// When the next PING is due (none while one is outstanding).
    next: Option<Instant>,
    counter: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Streams work.
    Open,
    /// The session has ended; its last frames go out, the transport is
    /// closed, input is discarded until the peer's close or the deadline.
    Closing { deadline: Instant },
    /// Nothing more to do: drop the transport.
    Closed,
}

/// One session's protocol state. See the [module docs](self).
pub struct Connection {
    cfg: Config,
    role: Role,
    /// Reusable buffers for outgoing DATA frames.
    pool: Arc<BufPool>,
    streams: HashMap<u32, StreamState>,
    next_id: u64,
    last_peer_id: u32,
    accept_q: VecDeque<u32>,

    // --- outgoing ---
    /// Ordered per stream: SYN, ACK, DATA, FIN, RST.
    data_q: VecDeque<Outgoing>,
    data_q_bytes: usize,
    queue_waiters: VecDeque<u32>,
    wu_q: VecDeque<u32>,
    rst_q: VecDeque<(u32, u32)>,
    pong: Option<u32>,
    ping_out: Option<u32>,
    goaway_out: Option<Outgoing>,
    /// `poll_transmit` last returned `None`: the next queued frame needs the
    /// driver's attention (see [`Connection::take_wakeup`]).
    transmit_idle: bool,
    wakeup: bool,
    events: VecDeque<Event>,
    /// `open_streams()` or `accepts_new_streams()` may have changed.
    counts_changed: bool,

    // --- session state ---
    goaway_sent: bool,
    peer_goaway: bool,
    error: Option<Error>,
    phase: Phase,
    recv_closed: bool,
    send_closed: bool,
    /// A send failed; judged at the deadline, or earlier by what reading
    /// learns (see [`Connection::handle_send_closed`]).
    send_error: Option<(io::Error, Instant)>,
    ping: PingState,
    last_rx: Instant,
    rtt: Option<Duration>,

    // --- memory ---
    conn_buffered: usize,
    conn_committed: usize,
    /// The part of `conn_committed` due to auto-tuning (windows above
    /// `initial_window`); kept at or under half of `max_session_memory`, so
    /// grown windows never take the other half: new streams always have room
    /// for `max_session_memory / 2 / initial_window` initial windows.
    conn_grown: usize,
}

fn proto(reason: &str) -> Error {
    Error::Protocol {
        code: GoAwayCode::ProtocolError,
        reason: reason.to_string(),
    }
}

fn rst_frame(id: u32, code: u32) -> Outgoing {
    Outgoing::new(
        frame::header(FrameType::Data, Flags::RST, id, code),
        Bytes::new(),
    )
}

fn control_frame(id: u32, flags: Flags, delta: u32) -> Outgoing {
    Outgoing::new(
        frame::header(FrameType::WindowUpdate, flags, id, delta),
        Bytes::new(),
    )
}

impl Connection {
    /// A new session for `role`, started at `now`. The first PING (to
    /// measure the RTT) is due at once.
    pub fn new(role: Role, config: Config, now: Instant) -> Connection {
        let cfg = config.normalized();
        Connection {
            pool: BufPool::new(cfg.max_frame_payload, POOL_BUFFERS),
            cfg,
            role,
            streams: HashMap::new(),
            next_id: if role == Role::Client { 1 } else { 2 },
            last_peer_id: 0,
            accept_q: VecDeque::new(),
            data_q: VecDeque::new(),
            data_q_bytes: 0,
            queue_waiters: VecDeque::new(),
            wu_q: VecDeque::new(),
            rst_q: VecDeque::new(),
            pong: None,
            ping_out: None,
            goaway_out: None,
            transmit_idle: true,
            wakeup: false,
            events: VecDeque::new(),
            counts_changed: false,
            goaway_sent: false,
            peer_goaway: false,
            error: None,
            phase: Phase::Open,
            recv_closed: false,
            send_closed: false,
            send_error: None,
            ping: PingState {
                outstanding: None,
                next: Some(now),
                counter: 0,
            },
            last_rx: now,
            rtt: None,
            conn_buffered: 0,
            conn_committed: 0,
            conn_grown: 0,
        }
    }

    /// The (normalized) configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// This side's role.
    pub fn role(&self) -> Role {
        self.role
    }

    // -----------------------------------------------------------------------
    // Input
    // -----------------------------------------------------------------------

    /// A message arrived from the transport at `now`. After the session has
    /// ended, messages are discarded (the driver keeps reading only to
    /// complete the close handshake).
    pub fn handle_message(&mut self, now: Instant, msg: Message) {
        if self.phase != Phase::Open {
            return;
        }
        self.last_rx = now;
        let res = match msg {
            Message::Text(_) => Err(Error::Protocol {
                code: GoAwayCode::TextMessage,
                reason: "WebSocket text message received; only binary messages carry frames"
                    .to_string(),
            }),
            Message::Binary(b) => match frame::decode(b) {
                Err(e) => Err(Error::protocol(&e)),
                Ok(f) => self.handle_frame(f, now),
            },
        };
        if let Err(e) = res {
            self.fail(e, now);
        }
    }

    /// The transport's receive side ended: `None` for a clean end (the peer's
    /// WebSocket Close, or EOF), `Some(e)` for an error. While the session is
    /// open this ends it (`TransportClosed`, or the error); while closing it
    /// completes the close handshake's receiving half.
    pub fn handle_recv_closed(&mut self, now: Instant, err: Option<io::Error>) {
        self.recv_closed = true;
        if self.phase == Phase::Open {
            let e = match err {
                None => Error::TransportClosed,
                Some(e) => self.transport_error(e),
            };
            self.fail(e, now);
        }
        self.check_closed();
    }

    /// The transport's send side ended: `None` once the driver has closed it
    /// (after [`Connection::poll_transmit`] ran dry while closing), `Some(e)`
    /// when a send failed.
    ///
    /// A failed send while the session is open is judged later: a peer that
    /// closes its transport right after its GOAWAY and WebSocket close makes
    /// a send of ours fail (EPIPE) while those messages may still wait to be
    /// read. So nothing more is sent, reading goes on, and the session ends
    /// as `TransportClosed` when reading reaches the close; otherwise, after
    /// [`Config::close_timeout`], with the error (see
    /// [`Connection::handle_timeout`]).
    pub fn handle_send_closed(&mut self, now: Instant, err: Option<io::Error>) {
        match self.phase {
            Phase::Open => {
                if let Some(e) = err {
                    if self.send_error.is_none() {
                        self.send_error = Some((e, now + self.cfg.close_timeout));
                        self.wakeup = true;
                    }
                }
            }
            Phase::Closing { .. } => {
                self.send_closed = true;
                self.check_closed();
            }
            Phase::Closed => {}
        }
    }

    /// When [`Connection::handle_timeout`] is due next, if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.phase {
            Phase::Closed => None,
            Phase::Closing { deadline } => Some(deadline),
            Phase::Open => {
                let keepalive = match (self.ping.outstanding, self.cfg.keepalive_interval) {
                    (Some((_, sent)), Some(_)) => {
                        Some(sent.max(self.last_rx) + self.cfg.keepalive_timeout)
                    }
                    (Some(_), None) => None,
                    (None, _) => self.ping.next,
                };
                let judged = self.send_error.as_ref().map(|(_, at)| *at);
                match (keepalive, judged) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            }
        }
    }

    /// Time has come to `now`: send a due PING, declare a silent peer dead
    /// (GOAWAY KEEPALIVE_TIMEOUT), judge a failed send, or give up waiting
    /// for the peer's close. Calling it early does nothing.
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.phase {
            Phase::Closed => {}
            Phase::Closing { deadline } => {
                if now >= deadline {
                    self.phase = Phase::Closed;
                }
            }
            Phase::Open => {
                if self.send_error.as_ref().is_some_and(|(_, at)| now >= *at) {
                    let (e, _) = self.send_error.take().expect("checked above");
                    let err = self.transport_error(e);
                    self.fail(err, now);
                    // Sending is broken: no close handshake to complete.
                    self.phase = Phase::Closed;
                    return;
                }
                // Dead = silent: no PING answer and nothing else received for
                // the timeout. (A busy peer whose answer is stuck behind data
                // on a slow link keeps talking, so it is not declared dead.)
                if let (Some((_, sent)), Some(_)) =
                    (self.ping.outstanding, self.cfg.keepalive_interval)
                {
                    if now >= sent.max(self.last_rx) + self.cfg.keepalive_timeout {
                        self.fail(Error::KeepaliveTimeout(self.cfg.keepalive_timeout), now);
                        return;
                    }
                }
                if self.ping.outstanding.is_none() && self.ping.next.is_some_and(|t| now >= t) {
                    self.ping.counter = self.ping.counter.wrapping_add(1);
                    let opaque = self.ping.counter;
                    self.ping_out = Some(opaque);
                    self.ping.outstanding = Some((opaque, now));
                    self.ping.next = None;
                    self.queued();
                }
            }
        }
    }

    // -----------------------------------------------------------------------
    // Output
    // -----------------------------------------------------------------------

    /// The next message to send, if any, by priority. `now` dates window
    /// updates (window auto-tuning). While the session is closing it gives
    /// the DATA still queued when the session was closed by
    /// [`Connection::close`], then the GOAWAY; then `None`: close the
    /// transport.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Bytes> {
        self.poll_transmit_frame(now).map(|f| f.to_bytes())
    }

    /// [`Connection::poll_transmit`] with the frame's header apart from its
    /// payload, which is a slice of what the application wrote, not a copy
    /// (see [`crate::Transport::start_send_parts`]).
    pub fn poll_transmit_frame(&mut self, now: Instant) -> Option<Outgoing> {
        self.wakeup = false;
        match self.phase {
            Phase::Closed => None,
            Phase::Closing { .. } => {
                if self.send_closed {
                    return None;
                }
                if let Some(f) = self.data_q.pop_front() {
                    self.data_q_bytes -= f.wire_len();
                    return Some(f);
                }
                self.goaway_out.take()
            }
            Phase::Open => {
                if self.send_error.is_some() {
                    return None;
                }
                let f = self.next_frame(now);
                if f.is_none() {
                    self.transmit_idle = true;
                }
                f
            }
        }
    }

    fn next_frame(&mut self, now: Instant) -> Option<Outgoing> {
        if let Some(g) = self.goaway_out.take() {
            return Some(g);
        }
        if let Some(o) = self.pong.take() {
            let h = frame::header(FrameType::Ping, Flags::ACK, 0, o);
            return Some(Outgoing::new(h, Bytes::new()));
        }
        if let Some(o) = self.ping_out.take() {
            let h = frame::header(FrameType::Ping, Flags::SYN, 0, o);
            return Some(Outgoing::new(h, Bytes::new()));
        }
        if let Some((id, code)) = self.rst_q.pop_front() {
            return Some(rst_frame(id, code));
        }
        while let Some(id) = self.wu_q.pop_front() {
            if let Some(f) = self.window_update(id, now) {
                return Some(f);
            }
        }
        let f = self.data_q.pop_front()?;
        self.data_q_bytes -= f.wire_len();
        if !self.send_queue_full() {
            while let Some(id) = self.queue_waiters.pop_front() {
                if let Some(st) = self.streams.get_mut(&id) {
                    st.waiting_queue = false;
                    self.events.push_back(Event::Writable { id });
                }
            }
        }
        Some(f)
    }

    /// Build the WINDOW_UPDATE for `id`, growing its window when the last
    /// half-window was consumed within two round trips.
    fn window_update(&mut self, id: u32, now: Instant) -> Option<Outgoing> {
        let st = self.streams.get_mut(&id)?;
        st.wu_pending = false;
        if st.fin_recv || st.closed() {
            return None;
        }
        if let Some(rtt) = self.rtt {
            let fast = now.saturating_duration_since(st.last_update) < rtt * 2;
            if fast && st.window < self.cfg.max_window {
                let new = (st.window as u64 * 2).min(self.cfg.max_window as u64) as u32;
                let extra = (new - st.window) as usize;
                if self.conn_committed + extra <= self.cfg.max_session_memory
                    && self.conn_grown + extra <= self.cfg.max_session_memory / 2
                {
                    st.window = new;
                    self.conn_committed += extra;
                    self.conn_grown += extra;
                }
            }
        }
        let delta = st.uncredited();
        if delta == 0 {
            return None;
        }
        st.recv_credit += delta;
        st.last_update = now;
        Some(control_frame(id, Flags::empty(), delta))
    }

    /// The next event for the application.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Whether [`Connection::poll_event`] or [`Connection::take_wakeup`]
    /// has something, or [`Connection::open_streams`] /
    /// [`Connection::accepts_new_streams`] may have changed since
    /// [`Connection::take_counts_changed`]: a cheap check after any call.
    #[inline]
    pub fn has_news(&self) -> bool {
        self.wakeup || self.counts_changed || !self.events.is_empty()
    }

    /// Whether [`Connection::open_streams`] or
    /// [`Connection::accepts_new_streams`] may have changed since the last
    /// call. Reading clears it.
    pub fn take_counts_changed(&mut self) -> bool {
        std::mem::take(&mut self.counts_changed)
    }

    /// Whether something was queued for sending (or the session started
    /// closing) since the driver last ran dry: a driver that sleeps until
    /// woken should be woken. Reading clears it.
    pub fn take_wakeup(&mut self) -> bool {
        std::mem::take(&mut self.wakeup)
    }

    /// Whether the driver should go on reading messages: `false` while the
    /// queue of refusals (RST REFUSED) is full; it drains as
    /// [`Connection::poll_transmit`] sends them.
    pub fn accepts_input(&self) -> bool {
        self.rst_q.len() < RST_QUEUE_CAP
    }

    /// Something was queued for sending.
    fn queued(&mut self) {
        if self.transmit_idle {
            self.transmit_idle = false;
            self.wakeup = true;
        }
    }

    fn push_data(&mut self, frame: Outgoing) {
        self.data_q_bytes += frame.wire_len();
        self.data_q.push_back(frame);
        self.queued();
    }

    fn send_queue_full(&self) -> bool {
        self.data_q_bytes >= self.cfg.max_send_queue
    }

    // -----------------------------------------------------------------------
    // Frames
    // -----------------------------------------------------------------------

    fn is_local_id(&self, id: u32) -> bool {
        match self.role {
            Role::Client => id & 1 == 1,
            Role::Server => id & 1 == 0,
        }
    }

    /// Record the session's end, queue the GOAWAY the peer should get (if
    /// any), and start closing.
    fn fail(&mut self, err: Error, now: Instant) {
        if self.error.is_some() {
            return;
        }
        let goaway = match &err {
            Error::Protocol { code, reason } => Some((*code, reason.clone())),
            Error::KeepaliveTimeout(_) => Some((
                GoAwayCode::KeepaliveTimeout,
                "keepalive PING not answered".to_string(),
            )),
            Error::SessionClosed if !self.goaway_sent => {
                Some((GoAwayCode::Normal, "session closed".to_string()))
            }
            _ => None,
        };
        if let Some((code, reason)) = goaway {
            self.goaway_out = Some(Outgoing::from_encoded(
                Frame::GoAway { code, reason }.encode(),
            ));
            self.goaway_sent = true;
        }
        if !matches!(err, Error::SessionClosed) {
            // The session is broken: drop what was queued. (When the session
            // is merely closed, data already written is still delivered,
            // within `close_timeout`, ahead of the GOAWAY.)
            self.data_q.clear();
            self.data_q_bytes = 0;
        }
        self.wu_q.clear();
        self.rst_q.clear();
        self.queue_waiters.clear();
        self.pong = None;
        self.ping_out = None;
        self.error = Some(err.clone());
        self.counts_changed = true;
        self.events.push_back(Event::Closed { error: err });
        self.phase = if self.send_error.is_some() {
            // Sending is broken: no close handshake to complete.
            Phase::Closed
        } else {
            Phase::Closing {
                deadline: now + self.cfg.close_timeout,
            }
        };
        self.wakeup = true;
        self.check_closed();
    }

    fn check_closed(&mut self) {
        if matches!(self.phase, Phase::Closing { .. }) && self.recv_closed && self.send_closed {
            self.phase = Phase::Closed;
        }
    }

    /// The session's error for a failed transport: after the peer's GOAWAY,
    /// the transport going away (broken pipe, reset) is the expected end —
    /// `TransportClosed`, as a clean close would be — not a failure.
    fn transport_error(&self, e: io::Error) -> Error {
        let gone = matches!(
            e.kind(),
            io::ErrorKind::BrokenPipe
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
        );
        if gone && self.peer_goaway {
            Error::TransportClosed
        } else {
            Error::Transport(Arc::new(e))
        }
    }

    /// A SYN for `id`. `Ok(true)`: the stream exists now (in the accept
    /// backlog); `Ok(false)`: the id is used up but no stream was made
    /// (refused, or SYN|RST).
    fn on_syn(
        &mut self,
        id: u32,
        window_delta: u32,
        flags: Flags,
        now: Instant,
    ) -> Result<bool, Error> {
        if self.is_local_id(id) {
            return Err(proto("SYN for a stream id of our parity"));
        }
        if id <= self.last_peer_id {
            return Err(proto("SYN for an already used stream id"));
        }
        self.last_peer_id = id;
        if INITIAL_WINDOW as u64 + window_delta as u64 > u32::MAX as u64 {
            return Err(Error::Protocol {
                code: GoAwayCode::FlowControlError,
                reason: format!("stream {id}: send credit above 2^32-1"),
            });
        }
        if flags.contains(Flags::RST) {
            // Opened and reset at once: nothing to accept, nothing to answer.
            return Ok(false);
        }
        let refuse = self.goaway_sent
            || self.streams.len() >= self.cfg.max_streams
            || self.accept_q.len() >= self.cfg.accept_backlog
            || self.conn_committed + self.cfg.initial_window as usize > self.cfg.max_session_memory;
        if refuse {
            self.rst_q.push_back((id, reset_code::REFUSED));
            self.queued();
            return Ok(false);
        }
        let st = StreamState::new(
            self.cfg.initial_window,
            INITIAL_WINDOW,
            INITIAL_WINDOW as u64 + window_delta as u64,
            now,
        );
        self.conn_committed += st.window as usize;
        self.streams.insert(id, st);
        self.counts_changed = true;
        self.accept_q.push_back(id);
        self.events.push_back(Event::Opened { id });
        Ok(true)
    }

    /// A frame for an id that is not in the map: fine if the stream existed
    /// and is closed (or was refused), a protocol error otherwise.
    fn check_closed_id(&self, id: u32) -> Result<(), Error> {
        let known = if self.is_local_id(id) {
            (id as u64) < self.next_id
        } else {
            id <= self.last_peer_id
        };
        if known {
            Ok(())
        } else {
            Err(proto("frame for a stream that was never opened"))
        }
    }

    fn handle_frame(&mut self, frame: Frame, now: Instant) -> Result<(), Error> {
        match frame {
            Frame::Data {
                stream_id,
                flags,
                rst_code,
                payload,
            } => {
                if flags.contains(Flags::ACK) && !self.is_local_id(stream_id) {
                    return Err(proto("ACK from the stream's opener"));
                }
                if flags.contains(Flags::SYN) && !self.on_syn(stream_id, 0, flags, now)? {
                    return Ok(());
                }
                let Some(st) = self.streams.get_mut(&stream_id) else {
                    return self.check_closed_id(stream_id);
                };
                if st.closed() {
                    return Ok(());
                }
                let rst = flags.contains(Flags::RST);
                if st.fin_recv && !rst {
                    return Err(proto("DATA after FIN"));
                }
                if !payload.is_empty() {
                    let len = payload.len();
                    if len > st.recv_credit as usize {
                        return Err(Error::Protocol {
                            code: GoAwayCode::FlowControlError,
                            reason: format!(
                                "stream {stream_id}: {len} bytes of DATA exceed the {} bytes of credit",
                                st.recv_credit
                            ),
                        });
                    }
                    st.recv_credit -= len as u32;
                    st.buffered += len;
                    st.recv_buf.push_back(payload);
                    self.conn_buffered += len;
                    debug_assert!(st.buffered <= st.window as usize);
                    debug_assert!(self.conn_buffered <= self.cfg.max_session_memory);
                    if std::mem::take(&mut st.read_blocked) {
                        self.events.push_back(Event::Readable { id: stream_id });
                    }
                }
                if flags.contains(Flags::FIN) {
                    self.on_fin(stream_id);
                }
                if rst {
                    self.on_rst(stream_id, rst_code);
                }
                Ok(())
            }
            Frame::WindowUpdate {
                stream_id,
                flags,
                delta,
            } => {
                if flags.contains(Flags::ACK) && !self.is_local_id(stream_id) {
                    return Err(proto("ACK from the stream's opener"));
                }
                let syn = flags.contains(Flags::SYN);
                // The SYN's delta is the opener's extra window: part of the
                // new stream's initial send credit.
                if syn && !self.on_syn(stream_id, delta, flags, now)? {
                    return Ok(());
                }
                let Some(st) = self.streams.get_mut(&stream_id) else {
                    return self.check_closed_id(stream_id);
                };
                if st.closed() {
                    return Ok(());
                }
                let fin = flags.contains(Flags::FIN);
                if fin && st.fin_recv {
                    return Err(proto("second FIN"));
                }
                if !syn {
                    st.send_credit += delta as u64;
                    if st.send_credit > u32::MAX as u64 {
                        return Err(Error::Protocol {
                            code: GoAwayCode::FlowControlError,
                            reason: format!("stream {stream_id}: send credit above 2^32-1"),
                        });
                    }
                    if delta > 0 && std::mem::take(&mut st.write_blocked) {
                        self.events.push_back(Event::Writable { id: stream_id });
                    }
                }
                if fin {
                    self.on_fin(stream_id);
                }
                Ok(())
            }
            Frame::Ping { ack: false, opaque } => {
                // Answers are coalesced: the latest request's value answers
                // every request before it.
                if self.pong.replace(opaque).is_none() {
                    self.queued();
                }
                Ok(())
            }
            Frame::Ping { ack: true, opaque } => {
                if let Some((o, sent)) = self.ping.outstanding {
                    if o == opaque {
                        self.rtt = Some(now.saturating_duration_since(sent));
                        self.ping.outstanding = None;
                        self.ping.next = self.cfg.keepalive_interval.map(|i| now + i);
                    }
                }
                Ok(())
            }
            Frame::GoAway { code, reason } => {
                let first = !self.peer_goaway;
                self.peer_goaway = true;
                self.counts_changed = true;
                if code != GoAwayCode::Normal {
                    // The peer is gone; do not answer with a GOAWAY of ours.
                    self.goaway_sent = true;
                    return Err(Error::RemoteGoAway { code, reason });
                }
                if first {
                    self.events.push_back(Event::GoAway);
                }
                Ok(())
            }
        }
    }

    fn on_fin(&mut self, id: u32) {
        if let Some(st) = self.streams.get_mut(&id) {
            st.fin_recv = true;
            let readable = std::mem::take(&mut st.read_blocked);
            self.events.push_back(Event::Finished { id });
            if readable {
                self.events.push_back(Event::Readable { id });
            }
        }
    }

    fn on_rst(&mut self, id: u32, code: u32) {
        if let Some(st) = self.streams.get_mut(&id) {
            st.rst_recv = Some(code);
            st.send_credit = 0;
            let readable = std::mem::take(&mut st.read_blocked);
            let writable = std::mem::take(&mut st.write_blocked);
            self.events.push_back(Event::Reset { id, code });
            if readable {
                self.events.push_back(Event::Readable { id });
            }
            if writable {
                self.events.push_back(Event::Writable { id });
            }
        }
    }

    // -----------------------------------------------------------------------
    // Application
    // -----------------------------------------------------------------------

    /// Open a new stream at `now` and return its id. The SYN is queued; data
    /// may be written at once, up to the 256 KiB initial credit.
    pub fn open(&mut self, now: Instant) -> Result<u32, Error> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        if self.goaway_sent {
            return Err(Error::LocalGoAway);
        }
        if self.peer_goaway {
            return Err(Error::PeerGoAway);
        }
        if self.streams.len() >= self.cfg.max_streams {
            return Err(Error::TooManyStreams(self.streams.len()));
        }
        let window = self.cfg.initial_window;
        if self.conn_committed + window as usize > self.cfg.max_session_memory {
            return Err(Error::MemoryLimit {
                limit: self.cfg.max_session_memory,
            });
        }
        if self.next_id > u32::MAX as u64 {
            return Err(Error::StreamIdsExhausted);
        }
        let id = self.next_id as u32;
        self.next_id += 2;
        self.conn_committed += window as usize;
        self.counts_changed = true;
        self.streams.insert(
            id,
            StreamState::new(window, window, INITIAL_WINDOW as u64, now),
        );
        self.push_data(control_frame(id, Flags::SYN, window - INITIAL_WINDOW));
        Ok(id)
    }

    /// The next stream the peer opened, if one is waiting (`Ok(None)`: wait
    /// for [`Event::Opened`]). Accepting sends the ACK with the extra window
    /// this side grants — also when the opener's FIN already arrived
    /// (SYN|FIN), but not for a stream the opener has reset already. Fails
    /// once the session has ended, or when a GOAWAY (either side's) means no
    /// stream will come and the backlog is empty.
    pub fn accept(&mut self) -> Result<Option<u32>, Error> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        if let Some(id) = self.accept_q.pop_front() {
            let extra = self.cfg.initial_window - INITIAL_WINDOW;
            if let Some(st) = self.streams.get_mut(&id) {
                if st.rst_recv.is_none() {
                    st.recv_credit += extra;
                    self.push_data(control_frame(id, Flags::ACK, extra));
                }
            }
            return Ok(Some(id));
        }
        if self.peer_goaway {
            return Err(Error::PeerGoAway);
        }
        if self.goaway_sent {
            return Err(Error::LocalGoAway);
        }
        Ok(None)
    }

    /// Read up to `max` bytes of stream `id`, handed to `sink` in order (in
    /// one or more pieces). Returns how many; `Ok(0)` with `max > 0` is the
    /// end of the stream (the peer's FIN, everything read). `max == 0`
    /// returns `Ok(0)` at once. Data received before a reset or the
    /// session's end stays readable; then the reset or the session's error
    /// is returned.
    pub fn read(
        &mut self,
        id: u32,
        max: usize,
        mut sink: impl FnMut(&[u8]),
    ) -> Result<usize, ReadError> {
        self.read_with(id, max, |front, k| {
            sink(&front[..k]);
            if k == front.len() {
                true
            } else {
                front.advance(k);
                false
            }
        })
    }

    /// [`Connection::read`] without a copy: the received payloads (or the
    /// first part of the last one) are handed to `sink` as they are.
    pub fn read_bytes(
        &mut self,
        id: u32,
        max: usize,
        mut sink: impl FnMut(Bytes),
    ) -> Result<usize, ReadError> {
        self.read_with(id, max, |front, k| {
            if k == front.len() {
                sink(std::mem::take(front));
                true
            } else {
                sink(front.split_to(k));
                false
            }
        })
    }

    /// Consumes up to `max` bytes: `take(front, k)` takes the first `k`
    /// bytes of the front payload and says whether it is used up.
    fn read_with(
        &mut self,
        id: u32,
        max: usize,
        mut take: impl FnMut(&mut Bytes, usize) -> bool,
    ) -> Result<usize, ReadError> {
        if max == 0 {
            return Ok(0);
        }
        let Some(st) = self.streams.get_mut(&id) else {
            return Err(ReadError::UnknownStream);
        };
        if st.rst_sent {
            return Err(ReadError::LocallyReset);
        }
        if !st.recv_buf.is_empty() {
            let mut n = 0;
            while n < max {
                let Some(front) = st.recv_buf.front_mut() else {
                    break;
                };
                let k = front.len().min(max - n);
                n += k;
                if take(front, k) {
                    st.recv_buf.pop_front();
                }
            }
            st.buffered -= n;
            self.conn_buffered -= n;
            // After the application consumed bytes: schedule a WINDOW_UPDATE
            // once half the window is uncredited (docs/mux.md §4.2).
            if self.error.is_none()
                && !st.wu_pending
                && !st.fin_recv
                && !st.closed()
                && st.uncredited() >= st.window / 2
            {
                st.wu_pending = true;
                self.wu_q.push_back(id);
                self.queued();
            }
            return Ok(n);
        }
        if st.fin_recv {
            return Ok(0);
        }
        if let Some(code) = st.rst_recv {
            return Err(ReadError::Reset(code));
        }
        if let Some(e) = &self.error {
            return Err(ReadError::Session(e.clone()));
        }
        st.read_blocked = true;
        Err(ReadError::Blocked)
    }

    /// Write from `data` to stream `id`: queues up to a few frames of at most
    /// [`Config::max_frame_payload`] bytes each, within the stream's credit,
    /// and returns how many bytes it took. `Ok(0)` only for empty `data`.
    pub fn write(&mut self, id: u32, data: &[u8]) -> Result<usize, WriteError> {
        let pool = self.pool.clone();
        self.write_with(id, data.len(), |off, n| pool.bytes(&[&data[off..off + n]]))
    }

    /// [`Connection::write`] without a copy: the frames carry slices of
    /// `data`, and what was taken is removed from its front.
    pub fn write_bytes(&mut self, id: u32, data: &mut Bytes) -> Result<usize, WriteError> {
        let whole = data.clone();
        let n = self.write_with(id, whole.len(), |off, n| whole.slice(off..off + n))?;
        data.advance(n);
        Ok(n)
    }

    /// Queues frames for up to `len` bytes; `payload(offset, n)` gives the
    /// `n` bytes at `offset` of the data.
    fn write_with(
        &mut self,
        id: u32,
        len: usize,
        mut payload: impl FnMut(usize, usize) -> Bytes,
    ) -> Result<usize, WriteError> {
        if let Some(e) = &self.error {
            return Err(WriteError::Session(e.clone()));
        }
        let max_payload = self.cfg.max_frame_payload;
        let queue_full = self.send_queue_full();
        let Some(st) = self.streams.get_mut(&id) else {
            return Err(WriteError::UnknownStream);
        };
        if let Some(code) = st.rst_recv {
            return Err(WriteError::Reset(code));
        }
        if st.fin_sent || st.rst_sent {
            return Err(WriteError::Closed);
        }
        if len == 0 {
            return Ok(0);
        }
        if st.send_credit == 0 {
            st.write_blocked = true;
            return Err(WriteError::Blocked);
        }
        if queue_full {
            if !st.waiting_queue {
                st.waiting_queue = true;
                self.queue_waiters.push_back(id);
            }
            return Err(WriteError::Blocked);
        }
        let mut written = 0;
        for _ in 0..WRITE_FRAMES {
            let Some(st) = self.streams.get_mut(&id) else {
                break;
            };
            let n = (len - written)
                .min(max_payload)
                .min(st.send_credit.min(u32::MAX as u64) as usize);
            if n == 0 {
                break;
            }
            st.send_credit -= n as u64;
            let hdr = frame::header(FrameType::Data, Flags::empty(), id, 0);
            self.push_data(Outgoing::new(hdr, payload(written, n)));
            written += n;
            if written == len || self.send_queue_full() {
                break;
            }
        }
        Ok(written)
    }

    /// Half-close stream `id` (FIN): nothing more will be written; reading
    /// goes on until the peer's FIN. Idempotent; `Ok` after a local reset.
    pub fn finish(&mut self, id: u32) -> Result<(), WriteError> {
        if let Some(e) = &self.error {
            return Err(WriteError::Session(e.clone()));
        }
        let Some(st) = self.streams.get_mut(&id) else {
            return Err(WriteError::UnknownStream);
        };
        if let Some(code) = st.rst_recv {
            return Err(WriteError::Reset(code));
        }
        if st.fin_sent || st.rst_sent {
            return Ok(());
        }
        st.fin_sent = true;
        let h = frame::header(FrameType::Data, Flags::FIN, id, 0);
        self.push_data(Outgoing::new(h, Bytes::new()));
        Ok(())
    }

    /// Abort stream `id` in both directions with `code` (RST). Data received
    /// and not read is dropped. Nothing happens if the stream is already
    /// closed (FIN both ways, or reset).
    pub fn reset(&mut self, id: u32, code: u32) {
        let Some(st) = self.streams.get_mut(&id) else {
            return;
        };
        if st.closed() {
            return;
        }
        st.rst_sent = true;
        self.conn_buffered -= st.buffered;
        st.buffered = 0;
        st.recv_buf.clear();
        let readable = std::mem::take(&mut st.read_blocked);
        let writable = std::mem::take(&mut st.write_blocked);
        if readable {
            self.events.push_back(Event::Readable { id });
        }
        if writable {
            self.events.push_back(Event::Writable { id });
        }
        if self.error.is_none() {
            self.push_data(rst_frame(id, code));
        }
    }

    /// The application is done with stream `id` (its handle was dropped):
    /// release its memory; RST CANCEL it if it was not closed cleanly in both
    /// directions.
    pub fn release(&mut self, id: u32) {
        let Some(st) = self.streams.remove(&id) else {
            return;
        };
        self.counts_changed = true;
        self.conn_buffered -= st.buffered;
        self.conn_committed -= st.window as usize;
        self.conn_grown -= (st.window - self.cfg.initial_window) as usize;
        if self.error.is_none() && !st.closed() {
            self.push_data(rst_frame(id, reset_code::CANCEL));
        }
    }

    /// Send GOAWAY NORMAL: neither side opens new streams (the peer's SYNs
    /// are refused), existing streams run to completion. Idempotent.
    pub fn goaway(&mut self) {
        if self.goaway_sent || self.error.is_some() {
            return;
        }
        self.goaway_sent = true;
        self.counts_changed = true;
        self.goaway_out = Some(Outgoing::from_encoded(
            Frame::GoAway {
                code: GoAwayCode::Normal,
                reason: String::new(),
            }
            .encode(),
        ));
        self.queued();
    }

    /// End the session at `now` (the `Session` handle was dropped): every
    /// stream fails with [`Error::SessionClosed`]; the DATA, FINs and RSTs
    /// already queued are still sent, then GOAWAY NORMAL (unless a GOAWAY
    /// went out before), then the transport is closed.
    pub fn close(&mut self, now: Instant) {
        self.fail(Error::SessionClosed, now);
    }

    // -----------------------------------------------------------------------
    // State
    // -----------------------------------------------------------------------

    /// The error that ended the session, if it has ended.
    pub fn error(&self) -> Option<&Error> {
        self.error.as_ref()
    }

    /// Whether the session has ended (failed or closed): the driver should
    /// send what is left, close the transport and read until the peer's
    /// close.
    pub fn is_closing(&self) -> bool {
        self.phase != Phase::Open
    }

    /// Whether nothing is left to do: the close handshake completed (both
    /// directions closed) or timed out. Drop the transport.
    pub fn is_closed(&self) -> bool {
        self.phase == Phase::Closed
    }

    /// Whether the peer sent GOAWAY.
    pub fn peer_goaway(&self) -> bool {
        self.peer_goaway
    }

    /// Whether this side sent (or queued) a GOAWAY.
    pub fn goaway_sent(&self) -> bool {
        self.goaway_sent
    }

    /// Whether new streams can still come about: `false` once either side
    /// sent GOAWAY or the session ended. (Limits are not included: compare
    /// [`Connection::open_streams`] with [`Config::max_streams`].)
    pub fn accepts_new_streams(&self) -> bool {
        self.error.is_none() && !self.goaway_sent && !self.peer_goaway
    }

    /// Streams alive (both directions, including the accept backlog).
    pub fn open_streams(&self) -> usize {
        self.streams.len()
    }

    /// Round-trip time measured by the latest PING, if any.
    pub fn rtt(&self) -> Option<Duration> {
        self.rtt
    }

    /// Current resource usage.
    pub fn stats(&self) -> Stats {
        Stats {
            streams: self.streams.len(),
            buffered: self.conn_buffered,
            committed: self.conn_committed,
            send_queue: self.data_q_bytes,
        }
    }

    /// Bytes received on stream `id` and not yet read.
    pub fn stream_buffered(&self, id: u32) -> usize {
        self.streams.get(&id).map_or(0, |s| s.buffered)
    }

    /// Stream `id`'s current receive window (the most it can hold).
    pub fn stream_window(&self, id: u32) -> u32 {
        self.streams.get(&id).map_or(0, |s| s.window)
    }

    /// Send credit stream `id` has left (what it may write before a
    /// WINDOW_UPDATE).
    pub fn stream_send_credit(&self, id: u32) -> u64 {
        self.streams.get(&id).map_or(0, |s| s.send_credit)
    }
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("role", &self.role)
            .field("phase", &self.phase)
            .field("stats", &self.stats())
            .finish()
    }
}

#[cfg(test)]
mod tests;
