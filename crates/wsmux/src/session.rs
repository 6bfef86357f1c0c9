//! The Tokio driver and the public `Session` API over the sans-IO
//! [`Connection`](crate::proto::Connection).
//!
//! The connection lives behind one mutex together with the wakers of the
//! tasks waiting on it (the `quinn` / `quinn-proto` arrangement). Stream
//! handles call into it directly (a write copies into a frame buffer and
//! queues it, a read copies out of the buffered frames; their `Bytes`
//! variants queue slices and hand out the received payloads, no copy); the
//! driver task moves frames between it and the transport (header and
//! payload apart, [`Transport::start_send_parts`]) and runs its timer.
//! After every call, the connection's events say whom to wake.

use crate::config::Config;
use crate::error::{Error, Result};
use crate::proto::{Connection, Event, Role, Stats};
use crate::stream::Stream;
use crate::transport::Transport;
use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Sleep;

/// Messages handled per driver poll before yielding.
const READ_BUDGET: usize = 128;
/// Messages written per driver poll before yielding.
const WRITE_BUDGET: usize = 256;

/// The clock the driver passes to the connection: Tokio's (so that a paused
/// test clock applies), as a `std` instant.
pub(crate) fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

#[derive(Default)]
struct StreamWakers {
    read: Option<Waker>,
    write: Option<Waker>,
}

/// The connection and who waits on it.
pub(crate) struct State {
    pub(crate) conn: Connection,
    wakers: HashMap<u32, StreamWakers>,
    driver: Option<Waker>,
}

impl State {
    /// After a call into the connection: wake the driver if it has work, wake
    /// the tasks the events concern. Returns whether `accept()` / `closed()`
    /// waiters should be told.
    #[inline(never)]
    fn after(&mut self, shared: &Shared) -> bool {
        if self.conn.take_counts_changed() {
            shared
                .open_streams
                .store(self.conn.open_streams(), Ordering::Relaxed);
            shared
                .accepting
                .store(self.conn.accepts_new_streams(), Ordering::Relaxed);
        }
        if self.conn.take_wakeup() {
            if let Some(w) = &self.driver {
                w.wake_by_ref();
            }
        }
        let mut notify = false;
        while let Some(ev) = self.conn.poll_event() {
            match ev {
                Event::Readable { id } => {
                    if let Some(w) = self.wakers.get_mut(&id).and_then(|w| w.read.take()) {
                        w.wake();
                    }
                }
                Event::Writable { id } => {
                    if let Some(w) = self.wakers.get_mut(&id).and_then(|w| w.write.take()) {
                        w.wake();
                    }
                }
                Event::Opened { .. } | Event::GoAway => notify = true,
                Event::Closed { .. } => {
                    for w in self.wakers.values_mut() {
                        if let Some(w) = w.read.take() {
                            w.wake();
                        }
                        if let Some(w) = w.write.take() {
                            w.wake();
                        }
                    }
                    notify = true;
                }
                // Readable/Writable cover whoever waits on these.
                Event::Finished { .. } | Event::Reset { .. } => {}
            }
        }
        notify
    }

    pub(crate) fn wait_read(&mut self, id: u32, waker: &Waker) {
        self.wakers.entry(id).or_default().read = Some(waker.clone());
    }

    pub(crate) fn wait_write(&mut self, id: u32, waker: &Waker) {
        self.wakers.entry(id).or_default().write = Some(waker.clone());
    }

    pub(crate) fn forget(&mut self, id: u32) {
        self.wakers.remove(&id);
    }
}

pub(crate) struct Shared {
    state: Mutex<State>,
    accept_notify: Notify,
    /// `Connection::open_streams`, readable without the lock.
    open_streams: AtomicUsize,
    /// `Connection::accepts_new_streams`, readable without the lock.
    accepting: AtomicBool,
}

/// The locked state; dropping it runs [`State::after`] and publishes the
/// lock-free counters, then notifies `accept()`/`closed()` waiters if needed.
pub(crate) struct Guard<'a> {
    guard: Option<MutexGuard<'a, State>>,
    shared: &'a Shared,
    /// Held by the driver, which needs no wake-up for work it queued itself.
    by_driver: bool,
}

impl std::ops::Deref for Guard<'_> {
    type Target = State;
    fn deref(&self) -> &State {
        self.guard.as_ref().expect("held until drop")
    }
}

impl std::ops::DerefMut for Guard<'_> {
    fn deref_mut(&mut self) -> &mut State {
        self.guard.as_mut().expect("held until drop")
    }
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        let Some(mut g) = self.guard.take() else {
            return;
        };
        if self.by_driver {
            // The driver goes on to transmit (or is closing) anyway; a
            // wake-up left by another caller was consumed by its own guard.
            g.conn.take_wakeup();
        }
        // Most calls change nothing that anyone waits on: keep that path short.
        let notify = g.conn.has_news() && g.after(self.shared);
        drop(g);
        if notify {
            self.shared.accept_notify.notify_waiters();
            self.shared.accept_notify.notify_one();
        }
    }
}

impl Shared {
    /// Lock the state. When the guard is dropped, the connection's events
    /// are dispatched (see [`Guard`]).
    pub(crate) fn lock(&self) -> Guard<'_> {
        self.lock_as(false)
    }

    /// Lock the state from the driver task.
    fn lock_driver(&self) -> Guard<'_> {
        self.lock_as(true)
    }

    fn lock_as(&self, by_driver: bool) -> Guard<'_> {
        // A panic while holding the lock would be a bug; keep going with the
        // state as it is rather than cascading panics into every stream.
        let g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        Guard {
            guard: Some(g),
            shared: self,
            by_driver,
        }
    }
}

// ---------------------------------------------------------------------------
// Driver
// ---------------------------------------------------------------------------

struct Driver<T> {
    shared: Arc<Shared>,
    transport: T,
    timer: Pin<Box<Sleep>>,
    timer_at: tokio::time::Instant,
    need_flush: bool,
    /// Closing: the transport's `poll_close` completed (or failed).
    send_done: bool,
    /// The transport's receive side ended.
    recv_done: bool,
}

impl<T: Transport> Driver<T> {
    /// Run the connection's timer: handle what is due, arm the timer for the
    /// next deadline. Re-arms only to wake earlier, or once the timer has
    /// fired: a deadline pushed back by incoming traffic is checked lazily.
    fn poll_timer(&mut self, cx: &mut Context<'_>) {
        let mut handled = 0;
        loop {
            let now = now();
            let Some(deadline) = self.shared.lock_driver().conn.poll_timeout() else {
                return;
            };
            if deadline <= now {
                if handled == 8 {
                    // A zero timeout keeps the deadline at `now`: come back.
                    cx.waker().wake_by_ref();
                    return;
                }
                handled += 1;
                self.shared.lock_driver().conn.handle_timeout(now);
                continue;
            }
            let deadline = tokio::time::Instant::from_std(deadline);
            if deadline < self.timer_at || self.timer.is_elapsed() {
                self.timer_at = deadline;
                self.timer.as_mut().reset(deadline);
            }
            if self.timer.as_mut().poll(cx).is_pending() {
                return;
            }
        }
    }

    /// While the session is open: move messages both ways, run the timer.
    /// `Ready` once the session has ended.
    fn poll_run(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let mut input = {
            let mut st = self.shared.lock_driver();
            if st.conn.is_closing() {
                return Poll::Ready(());
            }
            match &st.driver {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => st.driver = Some(cx.waker().clone()),
            }
            st.conn.accepts_input()
        };

        // 1. Incoming messages.
        let mut handled = 0;
        let read_blocked = !input;
        while input {
            if handled == READ_BUDGET {
                cx.waker().wake_by_ref();
                break;
            }
            let Poll::Ready(r) = self.transport.poll_recv(cx) else {
                break;
            };
            handled += 1;
            let now = now();
            let mut st = self.shared.lock_driver();
            match r {
                Some(Ok(msg)) => st.conn.handle_message(now, msg),
                None => {
                    self.recv_done = true;
                    st.conn.handle_recv_closed(now, None);
                }
                Some(Err(e)) => {
                    self.recv_done = true;
                    st.conn.handle_recv_closed(now, Some(e));
                }
            }
            if st.conn.is_closing() {
                return Poll::Ready(());
            }
            input = st.conn.accepts_input();
        }
        let read_blocked = read_blocked || !input;

        // 2. Timer (a PING due goes out in this pass).
        self.poll_timer(cx);

        // 3. Outgoing messages.
        let mut sent = 0;
        let mut send_failed = false;
        loop {
            if sent == WRITE_BUDGET {
                cx.waker().wake_by_ref();
                break;
            }
            match self.transport.poll_ready(cx) {
                Poll::Pending => break,
                Poll::Ready(Err(e)) => {
                    self.shared
                        .lock_driver()
                        .conn
                        .handle_send_closed(now(), Some(e));
                    send_failed = true;
                    break;
                }
                Poll::Ready(Ok(())) => {}
            }
            let Some(f) = self.shared.lock_driver().conn.poll_transmit_frame(now()) else {
                break;
            };
            if let Err(e) = self.transport.start_send_parts(&f.header, f.payload) {
                self.shared
                    .lock_driver()
                    .conn
                    .handle_send_closed(now(), Some(e));
                send_failed = true;
                break;
            }
            sent += 1;
        }
        if !send_failed && (sent > 0 || self.need_flush) {
            match self.transport.poll_flush(cx) {
                Poll::Ready(Ok(())) => self.need_flush = false,
                Poll::Ready(Err(e)) => {
                    self.shared
                        .lock_driver()
                        .conn
                        .handle_send_closed(now(), Some(e));
                    send_failed = true;
                }
                Poll::Pending => self.need_flush = true,
            }
        }
        if send_failed {
            // The failure is judged by a deadline of the connection's: time it.
            self.poll_timer(cx);
        }
        let st = self.shared.lock_driver();
        if st.conn.is_closing() {
            return Poll::Ready(());
        }
        if read_blocked && st.conn.accepts_input() {
            // Reading stopped for a full RST queue that has drained since:
            // nothing else would wake us for messages already received.
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    }

    /// After the session ended: send what is left (DATA queued before the
    /// Session was dropped, then the GOAWAY), close the transport, and read
    /// and discard until the peer's close (the close handshake), all bounded
    /// by the connection's close deadline. `Ready` when done.
    fn poll_closing(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        // Send the last frames, then close our direction.
        while !self.send_done {
            match self.transport.poll_ready(cx) {
                Poll::Pending => break,
                // Cannot send (e.g. the peer's close was answered already):
                // go on to closing, which also flushes.
                Poll::Ready(Err(_)) => {}
                Poll::Ready(Ok(())) => {
                    let next = self.shared.lock_driver().conn.poll_transmit_frame(now());
                    if let Some(f) = next {
                        if self
                            .transport
                            .start_send_parts(&f.header, f.payload)
                            .is_ok()
                        {
                            continue;
                        }
                    }
                }
            }
            if let Poll::Ready(r) = self.transport.poll_close(cx) {
                self.send_done = true;
                self.shared
                    .lock_driver()
                    .conn
                    .handle_send_closed(now(), r.err());
            }
            break;
        }
        // Read and discard until the peer's close.
        let mut handled = 0;
        while !self.recv_done {
            if handled == READ_BUDGET {
                cx.waker().wake_by_ref();
                break;
            }
            let Poll::Ready(r) = self.transport.poll_recv(cx) else {
                break;
            };
            handled += 1;
            let now = now();
            let mut st = self.shared.lock_driver();
            match r {
                Some(Ok(msg)) => st.conn.handle_message(now, msg),
                None => {
                    self.recv_done = true;
                    st.conn.handle_recv_closed(now, None);
                }
                Some(Err(e)) => {
                    self.recv_done = true;
                    st.conn.handle_recv_closed(now, Some(e));
                }
            }
        }
        self.poll_timer(cx);
        if self.shared.lock_driver().conn.is_closed() {
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

async fn run_driver<T: Transport>(mut driver: Driver<T>) {
    poll_fn(|cx| driver.poll_run(cx)).await;
    poll_fn(|cx| driver.poll_closing(cx)).await;
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
        let start = tokio::time::Instant::now();
        let conn = Connection::new(role, config, start.into_std());
        let shared = Arc::new(Shared {
            open_streams: AtomicUsize::new(conn.open_streams()),
            accepting: AtomicBool::new(conn.accepts_new_streams()),
            state: Mutex::new(State {
                conn,
                wakers: HashMap::new(),
                driver: None,
            }),
            accept_notify: Notify::new(),
        });
        let driver = Driver {
            shared: shared.clone(),
            transport,
            timer: Box::pin(tokio::time::sleep_until(start)),
            timer_at: start,
            need_flush: false,
            send_done: false,
            recv_done: false,
        };
        tokio::spawn(run_driver(driver));
        Session { shared }
    }

    /// Open a new stream. Returns at once (the SYN is queued; data may be
    /// written immediately, up to the 256 KiB initial window). If the peer
    /// refuses the stream, its reads and writes fail with a reset
    /// ([`crate::StreamReset`] with code [`crate::reset_code::REFUSED`]).
    pub async fn open(&self) -> Result<Stream> {
        let id = self.shared.lock().conn.open(now())?;
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
            if let Some(id) = self.shared.lock().conn.accept()? {
                return Ok(Stream::new(id, self.shared.clone()));
            }
            notified.await;
        }
    }

    /// Send GOAWAY NORMAL: neither side opens new streams (the peer's SYNs
    /// are refused), existing streams run to completion. Idempotent.
    pub fn goaway(&self) {
        self.shared.lock().conn.goaway();
        self.shared.accept_notify.notify_waiters();
    }

    /// Round-trip time measured by the latest PING, if any.
    pub fn rtt(&self) -> Option<Duration> {
        self.shared.lock().conn.rtt()
    }

    /// The error that ended the session, if it has ended.
    pub fn error(&self) -> Option<Error> {
        self.shared.lock().conn.error().cloned()
    }

    /// Whether the peer sent GOAWAY.
    pub fn peer_goaway(&self) -> bool {
        self.shared.lock().conn.peer_goaway()
    }

    /// Current resource usage.
    pub fn stats(&self) -> Stats {
        self.shared.lock().conn.stats()
    }

    /// Streams alive (both directions, including those waiting for
    /// `accept()`). Lock-free (a relaxed atomic, updated by every operation
    /// on the session), for picking the least loaded of many sessions.
    pub fn open_streams(&self) -> usize {
        self.shared.open_streams.load(Ordering::Relaxed)
    }

    /// Whether new streams can still come about on this session: `false`
    /// once either side sent GOAWAY or the session ended, when
    /// [`Session::open`] fails whatever the load. Limits are not included:
    /// compare [`Session::open_streams`] with [`Config::max_streams`].
    /// Lock-free, like [`Session::open_streams`].
    pub fn accepts_new_streams(&self) -> bool {
        self.shared.accepting.load(Ordering::Relaxed)
    }

    /// Wait until the session has ended (failed, closed by the peer, or
    /// keepalive deadline passed) and return why; [`Error::goaway_code`]
    /// gives the GOAWAY code that went or came, if any.
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
        self.shared.lock().conn.close(now());
    }
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("stats", &self.stats())
            .finish()
    }
}
