//! The session: shared state, the driver task, and the public `Session` API.

use crate::config::Config;
use crate::error::{Error, Result};
use crate::frame::{self, reset_code, Flags, Frame, FrameType, GoAwayCode, INITIAL_WINDOW};
use crate::pool::BufPool;
use crate::stream::Stream;
use crate::transport::{Message, Transport};
use bytes::{Bytes, BytesMut};
use std::collections::{HashMap, VecDeque};
use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};

/// RSTs for refused streams waiting to be sent; the driver stops reading
/// while this many are queued, so a SYN flood cannot grow memory.
const RST_QUEUE_CAP: usize = 64;
/// Frame buffers a session keeps for reuse (at most about 800 KiB with 32 KiB
/// frames, and only as many as were in flight at once).
const POOL_BUFFERS: usize = 24;
/// Messages handled per driver poll before yielding.
const READ_BUDGET: usize = 128;
/// Messages written per driver poll before yielding.
const WRITE_BUDGET: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    Client,
    Server,
}

pub(crate) struct StreamState {
    // --- receive side ---
    pub(crate) recv_buf: VecDeque<Bytes>,
    /// Bytes in `recv_buf`.
    pub(crate) buffered: usize,
    /// Credit the peer still has (bytes it may send before a WINDOW_UPDATE).
    pub(crate) recv_credit: u32,
    /// Current receive window (committed memory for this stream).
    pub(crate) window: u32,
    /// When the last WINDOW_UPDATE was sent (auto-tuning).
    last_update: Instant,
    pub(crate) wu_pending: bool,
    pub(crate) fin_recv: bool,
    pub(crate) rst_recv: Option<u32>,
    pub(crate) read_waker: Option<Waker>,
    // --- send side ---
    pub(crate) send_credit: u64,
    pub(crate) fin_sent: bool,
    pub(crate) rst_sent: bool,
    pub(crate) write_waker: Option<Waker>,
    pub(crate) waiting_queue: bool,
}

impl StreamState {
    fn new(window: u32, recv_credit: u32, send_credit: u64) -> Self {
        StreamState {
            recv_buf: VecDeque::new(),
            buffered: 0,
            recv_credit,
            window,
            last_update: Instant::now(),
            wu_pending: false,
            fin_recv: false,
            rst_recv: None,
            read_waker: None,
            send_credit,
            fin_sent: false,
            rst_sent: false,
            write_waker: None,
            waiting_queue: false,
        }
    }

    pub(crate) fn wake_all(&mut self) {
        if let Some(w) = self.read_waker.take() {
            w.wake();
        }
        if let Some(w) = self.write_waker.take() {
            w.wake();
        }
    }

    /// Bytes the application has read but the peer has not been credited for.
    fn uncredited(&self) -> u32 {
        self.window
            .saturating_sub(self.recv_credit)
            .saturating_sub(self.buffered as u32)
    }
}

pub(crate) struct Inner {
    pub(crate) cfg: Config,
    /// Reusable buffers for outgoing DATA frames.
    pub(crate) pool: Arc<BufPool>,
    role: Role,
    pub(crate) streams: HashMap<u32, StreamState>,
    next_id: u64,
    last_peer_id: u32,
    accept_q: VecDeque<u32>,

    // outgoing
    /// Ordered per stream: SYN, ACK, DATA, FIN, RST.
    data_q: VecDeque<Bytes>,
    pub(crate) data_q_bytes: usize,
    queue_waiters: VecDeque<u32>,
    wu_q: VecDeque<u32>,
    rst_q: VecDeque<(u32, u32)>,
    pong: Option<u32>,
    ping_out: Option<u32>,
    goaway_out: Option<Bytes>,

    goaway_sent: bool,
    peer_goaway: bool,
    pub(crate) error: Option<Error>,
    driver_waker: Option<Waker>,

    pub(crate) conn_buffered: usize,
    conn_committed: usize,
    /// The part of `conn_committed` due to auto-tuning (windows above
    /// `initial_window`); kept at or under half of `max_session_memory`, so
    /// grown windows never take the other half: new streams always have room
    /// for `max_session_memory / 2 / initial_window` initial windows.
    conn_grown: usize,
    rtt: Option<Duration>,
}

pub(crate) struct Shared {
    pub(crate) inner: Mutex<Inner>,
    accept_notify: Notify,
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock would be a bug; keep going with the
        // state as it is rather than cascading panics into every stream.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Inner {
    pub(crate) fn wake_driver(&self) {
        if let Some(w) = &self.driver_waker {
            w.wake_by_ref();
        }
    }

    pub(crate) fn push_data(&mut self, frame: Bytes) {
        // The driver drains the queue until it is empty (or the transport
        // or its budget stops it, and then those wake it), so only the
        // empty -> non-empty transition needs a wake-up.
        let was_empty = self.data_q.is_empty();
        self.data_q_bytes += frame.len();
        self.data_q.push_back(frame);
        if was_empty {
            self.wake_driver();
        }
    }

    pub(crate) fn send_queue_full(&self) -> bool {
        self.data_q_bytes >= self.cfg.max_send_queue
    }

    pub(crate) fn wait_for_queue(&mut self, id: u32, waker: &Waker) {
        if let Some(st) = self.streams.get_mut(&id) {
            st.write_waker = Some(waker.clone());
            if !st.waiting_queue {
                st.waiting_queue = true;
                self.queue_waiters.push_back(id);
            }
        }
    }

    /// After the application consumed bytes of stream `id`: schedule a
    /// WINDOW_UPDATE once half the window is uncredited.
    pub(crate) fn maybe_schedule_update(&mut self, id: u32) {
        let Some(st) = self.streams.get_mut(&id) else {
            return;
        };
        if st.wu_pending || st.fin_recv || st.rst_recv.is_some() || st.rst_sent {
            return;
        }
        if st.uncredited() >= st.window / 2 {
            st.wu_pending = true;
            self.wu_q.push_back(id);
            self.wake_driver();
        }
    }

    /// Remove a stream whose handle was dropped; RST it if it was not closed
    /// cleanly in both directions.
    pub(crate) fn remove_stream(&mut self, id: u32) {
        let Some(st) = self.streams.remove(&id) else {
            return;
        };
        self.conn_buffered -= st.buffered;
        self.conn_committed -= st.window as usize;
        self.conn_grown -= (st.window - self.cfg.initial_window) as usize;
        let clean = st.fin_sent && st.fin_recv;
        if self.error.is_none() && !clean && !st.rst_sent && st.rst_recv.is_none() {
            self.push_data(rst_frame(id, reset_code::CANCEL));
        }
    }

    pub(crate) fn reset_stream(&mut self, id: u32, code: u32) {
        let Some(st) = self.streams.get_mut(&id) else {
            return;
        };
        if st.rst_sent || st.rst_recv.is_some() || (st.fin_sent && st.fin_recv) {
            return;
        }
        st.rst_sent = true;
        // Drop what was received: nobody will read it.
        self.conn_buffered -= st.buffered;
        st.buffered = 0;
        st.recv_buf.clear();
        st.wake_all();
        if self.error.is_none() {
            self.push_data(rst_frame(id, code));
        }
    }

    fn is_local_id(&self, id: u32) -> bool {
        match self.role {
            Role::Client => id & 1 == 1,
            Role::Server => id & 1 == 0,
        }
    }

    /// Record the session's failure, wake everybody, and queue the GOAWAY the
    /// peer should get (if any).
    fn fail(&mut self, err: Error) {
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
            self.goaway_out = Some(Frame::GoAway { code, reason }.encode());
            self.goaway_sent = true;
        }
        if !matches!(err, Error::SessionClosed) {
            // The session is broken: drop what was queued. (When the Session
            // is merely dropped, data already written is still delivered,
            // within `close_timeout`, ahead of the GOAWAY.)
            self.data_q.clear();
            self.data_q_bytes = 0;
        }
        self.error = Some(err);
        for st in self.streams.values_mut() {
            st.wake_all();
        }
        self.wake_driver();
    }

    fn on_syn(&mut self, id: u32, window_delta: u32) -> Result<()> {
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
        let refuse = self.goaway_sent
            || self.streams.len() >= self.cfg.max_streams
            || self.accept_q.len() >= self.cfg.accept_backlog
            || self.conn_committed + self.cfg.initial_window as usize > self.cfg.max_session_memory;
        if refuse {
            self.rst_q.push_back((id, reset_code::REFUSED));
            return Ok(());
        }
        let st = StreamState::new(
            self.cfg.initial_window,
            INITIAL_WINDOW,
            INITIAL_WINDOW as u64 + window_delta as u64,
        );
        self.conn_committed += st.window as usize;
        self.streams.insert(id, st);
        self.accept_q.push_back(id);
        Ok(())
    }

    /// A frame for an id that is not in the map: fine if the stream existed
    /// and is closed (or was refused), a protocol error otherwise.
    fn check_closed_id(&self, id: u32) -> Result<()> {
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

    fn handle_frame(&mut self, frame: Frame, now: Instant, ping: &mut PingState) -> Result<()> {
        match frame {
            Frame::Data {
                stream_id,
                flags,
                rst_code,
                payload,
            } => {
                if flags.contains(Flags::SYN) {
                    self.on_syn(stream_id, 0)?;
                }
                let Some(st) = self.streams.get_mut(&stream_id) else {
                    return self.check_closed_id(stream_id);
                };
                if !payload.is_empty() {
                    if st.fin_recv {
                        return Err(proto("DATA after FIN"));
                    }
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
                    if !st.rst_sent {
                        st.buffered += len;
                        st.recv_buf.push_back(payload);
                        self.conn_buffered += len;
                        debug_assert!(st.buffered <= st.window as usize);
                        debug_assert!(self.conn_buffered <= self.cfg.max_session_memory);
                        if let Some(w) = st.read_waker.take() {
                            w.wake();
                        }
                    }
                }
                if flags.contains(Flags::FIN) {
                    st.fin_recv = true;
                    if let Some(w) = st.read_waker.take() {
                        w.wake();
                    }
                }
                if flags.contains(Flags::RST) {
                    st.rst_recv = Some(rst_code);
                    st.send_credit = 0;
                    st.wake_all();
                }
                Ok(())
            }
            Frame::WindowUpdate {
                stream_id,
                flags,
                delta,
            } => {
                let syn = flags.contains(Flags::SYN);
                if syn {
                    // The delta is the opener's extra window: part of the
                    // new stream's initial send credit.
                    self.on_syn(stream_id, delta)?;
                }
                let Some(st) = self.streams.get_mut(&stream_id) else {
                    return self.check_closed_id(stream_id);
                };
                if !syn && st.rst_recv.is_none() {
                    st.send_credit += delta as u64;
                    if st.send_credit > u32::MAX as u64 {
                        return Err(Error::Protocol {
                            code: GoAwayCode::FlowControlError,
                            reason: format!("stream {stream_id}: send credit above 2^32-1"),
                        });
                    }
                    if let Some(w) = st.write_waker.take() {
                        w.wake();
                    }
                }
                if flags.contains(Flags::FIN) {
                    st.fin_recv = true;
                    if let Some(w) = st.read_waker.take() {
                        w.wake();
                    }
                }
                Ok(())
            }
            Frame::Ping { ack: false, opaque } => {
                self.pong = Some(opaque);
                Ok(())
            }
            Frame::Ping { ack: true, opaque } => {
                if let Some((o, sent)) = ping.outstanding {
                    if o == opaque {
                        self.rtt = Some(now.saturating_duration_since(sent));
                        ping.outstanding = None;
                        ping.next = self.cfg.keepalive_interval.map(|i| now + i);
                    }
                }
                Ok(())
            }
            Frame::GoAway { code, reason } => {
                self.peer_goaway = true;
                if code != GoAwayCode::Normal {
                    // The peer is gone; do not answer with a GOAWAY of ours.
                    self.goaway_sent = true;
                    return Err(Error::RemoteGoAway { code, reason });
                }
                Ok(())
            }
        }
    }

    /// The next message to hand to the transport, by priority.
    fn next_frame(&mut self, now: Instant) -> Option<Bytes> {
        if let Some(g) = self.goaway_out.take() {
            return Some(g);
        }
        if let Some(o) = self.pong.take() {
            return Some(
                Frame::Ping {
                    ack: true,
                    opaque: o,
                }
                .encode(),
            );
        }
        if let Some(o) = self.ping_out.take() {
            return Some(
                Frame::Ping {
                    ack: false,
                    opaque: o,
                }
                .encode(),
            );
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
        self.data_q_bytes -= f.len();
        if !self.send_queue_full() {
            while let Some(id) = self.queue_waiters.pop_front() {
                if let Some(st) = self.streams.get_mut(&id) {
                    st.waiting_queue = false;
                    if let Some(w) = st.write_waker.take() {
                        w.wake();
                    }
                }
            }
        }
        Some(f)
    }

    /// Build the WINDOW_UPDATE for `id`, growing its window when the last
    /// half-window was consumed within two round trips.
    fn window_update(&mut self, id: u32, now: Instant) -> Option<Bytes> {
        let st = self.streams.get_mut(&id)?;
        st.wu_pending = false;
        if st.fin_recv || st.rst_recv.is_some() || st.rst_sent {
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
        Some(
            Frame::WindowUpdate {
                stream_id: id,
                flags: Flags::empty(),
                delta,
            }
            .encode(),
        )
    }
}

fn proto(reason: &str) -> Error {
    Error::Protocol {
        code: GoAwayCode::ProtocolError,
        reason: reason.to_string(),
    }
}

pub(crate) fn rst_frame(id: u32, code: u32) -> Bytes {
    let mut b = BytesMut::with_capacity(frame::HEADER_LEN);
    frame::put_header(&mut b, FrameType::Data, Flags::RST, id, code);
    b.freeze()
}

fn control_frame(id: u32, flags: Flags, delta: u32) -> Bytes {
    Frame::WindowUpdate {
        stream_id: id,
        flags,
        delta,
    }
    .encode()
}

// ---------------------------------------------------------------------------
// Driver
// ---------------------------------------------------------------------------

struct PingState {
    outstanding: Option<(u32, Instant)>,
    next: Option<Instant>,
    counter: u32,
}

struct Driver<T> {
    shared: Arc<Shared>,
    transport: T,
    ping: PingState,
    timer: Pin<Box<Sleep>>,
    timer_at: Instant,
    /// When the last message arrived from the peer.
    last_rx: Instant,
    need_flush: bool,
    /// A send that failed, judged once reading has caught up or by the
    /// deadline (see [`Driver::send_failed`]).
    send_error: Option<(io::Error, Pin<Box<Sleep>>)>,
}

impl<T: Transport> Driver<T> {
    fn fail(&self, err: Error) {
        self.shared.lock().fail(err);
        self.shared.accept_notify.notify_waiters();
    }

    fn poll_run(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        {
            let mut inner = self.shared.lock();
            if inner.error.is_some() {
                return Poll::Ready(());
            }
            match &inner.driver_waker {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => inner.driver_waker = Some(cx.waker().clone()),
            }
        }

        // 1. Incoming messages.
        let mut handled = 0;
        let mut accepted_any = false;
        let mut read_blocked = false;
        loop {
            if handled == READ_BUDGET {
                cx.waker().wake_by_ref();
                break;
            }
            if self.shared.lock().rst_q.len() >= RST_QUEUE_CAP {
                read_blocked = true; // resumes after the writer drained the RSTs
                break;
            }
            match self.transport.poll_recv(cx) {
                Poll::Pending => break,
                Poll::Ready(None) => {
                    self.fail(Error::TransportClosed);
                    return Poll::Ready(());
                }
                Poll::Ready(Some(Err(e))) => {
                    let err = self.transport_error(e);
                    self.fail(err);
                    return Poll::Ready(());
                }
                Poll::Ready(Some(Ok(msg))) => {
                    handled += 1;
                    self.last_rx = Instant::now();
                    let res = match msg {
                        Message::Text(_) => Err(Error::Protocol {
                            code: GoAwayCode::TextMessage,
                            reason:
                                "WebSocket text message received; only binary messages carry frames"
                                    .to_string(),
                        }),
                        Message::Binary(b) => match frame::decode(b) {
                            Err(e) => Err(Error::protocol(&e)),
                            Ok(f) => {
                                let now = Instant::now();
                                let mut inner = self.shared.lock();
                                let before = inner.accept_q.len();
                                let r = inner.handle_frame(f, now, &mut self.ping);
                                accepted_any |= inner.accept_q.len() != before || inner.peer_goaway;
                                r
                            }
                        },
                    };
                    if let Err(e) = res {
                        self.fail(e);
                        return Poll::Ready(());
                    }
                }
            }
        }
        if accepted_any {
            self.shared.accept_notify.notify_waiters();
            self.shared.accept_notify.notify_one();
        }

        // 2. Keepalive.
        if let Err(e) = self.poll_keepalive(cx) {
            self.fail(e);
            return Poll::Ready(());
        }

        // 3. Outgoing messages.
        if let Some((_, deadline)) = &mut self.send_error {
            // Sending failed: nothing more is sent; reading goes on until it
            // ends the session, or until the deadline.
            if deadline.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let (e, _) = self.send_error.take().expect("checked above");
            let err = self.transport_error(e);
            self.fail(err);
            return Poll::Ready(());
        }
        let mut sent = 0;
        loop {
            if sent == WRITE_BUDGET {
                cx.waker().wake_by_ref();
                break;
            }
            match self.transport.poll_ready(cx) {
                Poll::Pending => break,
                Poll::Ready(Err(e)) => return self.send_failed(cx, e),
                Poll::Ready(Ok(())) => {}
            }
            let next = self.shared.lock().next_frame(Instant::now());
            let Some(msg) = next else { break };
            if let Err(e) = self.transport.start_send(msg) {
                return self.send_failed(cx, e);
            }
            sent += 1;
        }
        if sent > 0 || self.need_flush {
            match self.transport.poll_flush(cx) {
                Poll::Ready(Ok(())) => self.need_flush = false,
                Poll::Ready(Err(e)) => return self.send_failed(cx, e),
                Poll::Pending => self.need_flush = true,
            }
        }
        let inner = self.shared.lock();
        if inner.error.is_some() {
            return Poll::Ready(());
        }
        if read_blocked && inner.rst_q.len() < RST_QUEUE_CAP {
            // Reading stopped for a full RST queue that has drained since:
            // nothing else would wake us for messages already received.
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    }

    /// A send failed. A peer that closes its transport right after its GOAWAY
    /// and WebSocket close makes a send of ours fail (EPIPE) while those
    /// messages may still wait to be read. So the failure is judged later:
    /// reading goes on (for at most `close_timeout`), and ends the session as
    /// `TransportClosed` when it reaches the close; otherwise the error is
    /// judged with what reading learnt (see [`Driver::transport_error`]).
    fn send_failed(&mut self, cx: &mut Context<'_>, e: io::Error) -> Poll<()> {
        let limit = self.shared.lock().cfg.close_timeout;
        self.send_error = Some((e, Box::pin(tokio::time::sleep(limit))));
        cx.waker().wake_by_ref();
        Poll::Pending
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
        if gone && self.shared.lock().peer_goaway {
            Error::TransportClosed
        } else {
            Error::Transport(Arc::new(e))
        }
    }

    fn poll_keepalive(&mut self, cx: &mut Context<'_>) -> Result<()> {
        let (interval, timeout) = {
            let inner = self.shared.lock();
            (inner.cfg.keepalive_interval, inner.cfg.keepalive_timeout)
        };
        loop {
            let now = Instant::now();
            // Dead = silent: no PING answer and nothing else received for
            // `timeout`. (A busy peer whose answer is stuck behind data on a
            // slow link keeps talking, so it is not declared dead.)
            let dead_at = match (self.ping.outstanding, interval) {
                (Some((_, sent)), Some(_)) => Some(sent.max(self.last_rx) + timeout),
                _ => None,
            };
            if dead_at.is_some_and(|d| now >= d) {
                return Err(Error::KeepaliveTimeout(timeout));
            }
            if self.ping.outstanding.is_none() && self.ping.next.is_some_and(|t| now >= t) {
                self.ping.counter = self.ping.counter.wrapping_add(1);
                let opaque = self.ping.counter;
                self.shared.lock().ping_out = Some(opaque);
                self.ping.outstanding = Some((opaque, now));
                self.ping.next = None;
                continue;
            }
            let deadline = match self.ping.outstanding {
                Some(_) => dead_at,
                None => self.ping.next,
            };
            let Some(deadline) = deadline else {
                return Ok(());
            };
            // Re-arm only to wake earlier, or once the timer has fired: a
            // deadline pushed back by incoming traffic is checked lazily.
            if deadline < self.timer_at || self.timer.is_elapsed() {
                self.timer_at = deadline;
                self.timer.as_mut().reset(deadline);
            }
            if self.timer.as_mut().poll(cx).is_pending() {
                return Ok(());
            }
        }
    }

    /// After failure: deliver what is left to deliver (queued DATA when the
    /// Session was dropped, then the GOAWAY), flush and close.
    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            match self.transport.poll_ready(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(_)) => return Poll::Ready(()),
                Poll::Ready(Ok(())) => {}
            }
            let next = {
                let mut inner = self.shared.lock();
                match inner.data_q.pop_front() {
                    Some(f) => {
                        inner.data_q_bytes -= f.len();
                        Some(f)
                    }
                    None => inner.goaway_out.take(),
                }
            };
            let Some(msg) = next else { break };
            if self.transport.start_send(msg).is_err() {
                return Poll::Ready(());
            }
        }
        self.transport.poll_close(cx).map(|_| ())
    }
}

async fn run_driver<T: Transport>(mut driver: Driver<T>) {
    poll_fn(|cx| driver.poll_run(cx)).await;
    let close_timeout = driver.shared.lock().cfg.close_timeout;
    let _ = tokio::time::timeout(close_timeout, poll_fn(|cx| driver.poll_close(cx))).await;
    // Release the transport before the shared state.
    drop(driver);
}

// ---------------------------------------------------------------------------
// Public API
// ---------------------------------------------------------------------------

/// A multiplexed session over one message transport (one WebSocket).
///
/// Creating a session spawns its driver task on the current Tokio runtime, so
/// [`Session::client`] and [`Session::server`] must be called from within a
/// runtime. The client opens odd stream ids, the server even ones; apart from
/// that both sides are symmetric: either may [`open`](Session::open) and
/// [`accept`](Session::accept).
///
/// Dropping the `Session` ends the session: every [`Stream`] fails with
/// [`Error::SessionClosed`] (data already received stays readable); data
/// already written (and FINs/RSTs) is still delivered, then a GOAWAY NORMAL,
/// and the transport is closed, all within [`Config::close_timeout`]. Share a
/// session between tasks with an `Arc`.
pub struct Session {
    shared: Arc<Shared>,
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

impl Session {
    /// Start the client side of a session (opens odd stream ids).
    pub fn client<T: Transport>(transport: T, config: Config) -> Session {
        Session::new(transport, config, Role::Client)
    }

    /// Start the server side of a session (opens even stream ids).
    pub fn server<T: Transport>(transport: T, config: Config) -> Session {
        Session::new(transport, config, Role::Server)
    }

    fn new<T: Transport>(transport: T, config: Config, role: Role) -> Session {
        let cfg = config.normalized();
        let now = Instant::now();
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                pool: BufPool::new(frame::HEADER_LEN + cfg.max_frame_payload, POOL_BUFFERS),
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
                goaway_sent: false,
                peer_goaway: false,
                error: None,
                driver_waker: None,
                conn_buffered: 0,
                conn_committed: 0,
                conn_grown: 0,
                rtt: None,
            }),
            accept_notify: Notify::new(),
        });
        let driver = Driver {
            shared: shared.clone(),
            transport,
            // One PING right away measures the RTT for window auto-tuning.
            ping: PingState {
                outstanding: None,
                next: Some(now),
                counter: 0,
            },
            timer: Box::pin(tokio::time::sleep_until(now)),
            timer_at: now,
            last_rx: now,
            need_flush: false,
            send_error: None,
        };
        tokio::spawn(run_driver(driver));
        Session { shared }
    }

    /// Open a new stream. Returns at once (the SYN is queued; data may be
    /// written immediately, up to the 256 KiB initial window). If the peer
    /// refuses the stream, its reads and writes fail with a reset
    /// ([`crate::StreamReset`] with code [`crate::reset_code::REFUSED`]).
    pub async fn open(&self) -> Result<Stream> {
        let mut inner = self.shared.lock();
        if let Some(e) = &inner.error {
            return Err(e.clone());
        }
        if inner.goaway_sent {
            return Err(Error::LocalGoAway);
        }
        if inner.peer_goaway {
            return Err(Error::PeerGoAway);
        }
        if inner.streams.len() >= inner.cfg.max_streams {
            return Err(Error::TooManyStreams(inner.streams.len()));
        }
        let window = inner.cfg.initial_window;
        if inner.conn_committed + window as usize > inner.cfg.max_session_memory {
            return Err(Error::MemoryLimit {
                limit: inner.cfg.max_session_memory,
            });
        }
        if inner.next_id > u32::MAX as u64 {
            return Err(Error::StreamIdsExhausted);
        }
        let id = inner.next_id as u32;
        inner.next_id += 2;
        inner.conn_committed += window as usize;
        inner
            .streams
            .insert(id, StreamState::new(window, window, INITIAL_WINDOW as u64));
        inner.push_data(control_frame(id, Flags::SYN, window - INITIAL_WINDOW));
        drop(inner);
        Ok(Stream::new(id, self.shared.clone()))
    }

    /// Wait for the next stream opened by the peer. Fails once the session
    /// has failed, or when GOAWAY (either side's) means no stream will come and
    /// the backlog is empty.
    pub async fn accept(&self) -> Result<Stream> {
        loop {
            let notified = self.shared.accept_notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut inner = self.shared.lock();
                if let Some(e) = &inner.error {
                    return Err(e.clone());
                }
                if let Some(id) = inner.accept_q.pop_front() {
                    let extra = inner.cfg.initial_window - INITIAL_WINDOW;
                    if let Some(st) = inner.streams.get_mut(&id) {
                        st.recv_credit += extra;
                    }
                    inner.push_data(control_frame(id, Flags::ACK, extra));
                    drop(inner);
                    return Ok(Stream::new(id, self.shared.clone()));
                }
                if inner.peer_goaway {
                    return Err(Error::PeerGoAway);
                }
                if inner.goaway_sent {
                    return Err(Error::LocalGoAway);
                }
            }
            notified.await;
        }
    }

    /// Send GOAWAY NORMAL: neither side opens new streams (the peer's SYNs
    /// are refused), existing streams run to completion. Idempotent.
    pub fn goaway(&self) {
        let mut inner = self.shared.lock();
        if inner.goaway_sent || inner.error.is_some() {
            return;
        }
        inner.goaway_sent = true;
        inner.goaway_out = Some(
            Frame::GoAway {
                code: GoAwayCode::Normal,
                reason: String::new(),
            }
            .encode(),
        );
        inner.wake_driver();
        drop(inner);
        self.shared.accept_notify.notify_waiters();
    }

    /// Round-trip time measured by the latest PING, if any.
    pub fn rtt(&self) -> Option<Duration> {
        self.shared.lock().rtt
    }

    /// The error that ended the session, if it has ended.
    pub fn error(&self) -> Option<Error> {
        self.shared.lock().error.clone()
    }

    /// Whether the peer sent GOAWAY.
    pub fn peer_goaway(&self) -> bool {
        self.shared.lock().peer_goaway
    }

    /// Current resource usage.
    pub fn stats(&self) -> Stats {
        let inner = self.shared.lock();
        Stats {
            streams: inner.streams.len(),
            buffered: inner.conn_buffered,
            committed: inner.conn_committed,
            send_queue: inner.data_q_bytes,
        }
    }

    /// Wait until the session has ended (failed, peer gone, or keepalive
    /// deadline passed) and return why.
    pub async fn closed(&self) -> Error {
        loop {
            let notified = self.shared.accept_notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(e) = self.error() {
                return e;
            }
            notified.await;
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.shared.lock().fail(Error::SessionClosed);
        self.shared.accept_notify.notify_waiters();
    }
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("stats", &self.stats())
            .finish()
    }
}
