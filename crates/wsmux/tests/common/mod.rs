//! Test helpers: a delaying transport and a raw frame-level peer.
#![allow(dead_code)]

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::VecDeque;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::{Instant, Sleep};
use wsmux::frame::{self, Frame};
use wsmux::transport::{memory_pair, MemoryTransport};
use wsmux::{Config, Message, Session, Transport};

/// Delivers every received message after a random delay in
/// `[min_delay, max_delay]`, keeping order (pipelined: up to `cap` in flight).
pub struct DelayTransport<T> {
    inner: T,
    rng: StdRng,
    min_delay: Duration,
    max_delay: Duration,
    queue: VecDeque<(Instant, io::Result<Message>)>,
    cap: usize,
    last: Instant,
    timer: Pin<Box<Sleep>>,
    inner_done: bool,
}

impl<T: Transport> DelayTransport<T> {
    pub fn new(inner: T, seed: u64, min_delay: Duration, max_delay: Duration) -> Self {
        DelayTransport {
            inner,
            rng: StdRng::seed_from_u64(seed),
            min_delay,
            max_delay,
            queue: VecDeque::new(),
            cap: 256,
            last: Instant::now(),
            timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
            inner_done: false,
        }
    }
}

impl<T: Transport> Transport for DelayTransport<T> {
    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<Message>>> {
        while !self.inner_done && self.queue.len() < self.cap {
            match self.inner.poll_recv(cx) {
                Poll::Pending => break,
                Poll::Ready(None) => self.inner_done = true,
                Poll::Ready(Some(m)) => {
                    let d = if self.max_delay > self.min_delay {
                        self.rng.gen_range(self.min_delay..=self.max_delay)
                    } else {
                        self.min_delay
                    };
                    let at = (Instant::now() + d).max(self.last);
                    self.last = at;
                    self.queue.push_back((at, m));
                }
            }
        }
        if let Some((at, _)) = self.queue.front() {
            let at = *at;
            if at > Instant::now() {
                self.timer.as_mut().reset(at);
                if self.timer.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
            }
            let (_, m) = self.queue.pop_front().unwrap();
            return Poll::Ready(Some(m));
        }
        if self.inner_done {
            return Poll::Ready(None);
        }
        Poll::Pending
    }
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.inner.poll_ready(cx)
    }
    fn start_send(&mut self, msg: Bytes) -> io::Result<()> {
        self.inner.start_send(msg)
    }
    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.inner.poll_flush(cx)
    }
    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.inner.poll_close(cx)
    }
}

use std::future::Future;

/// Client and server sessions over an in-memory transport.
pub fn pair(client: Config, server: Config) -> (Session, Session) {
    let (a, b) = memory_pair(64);
    (Session::client(a, client), Session::server(b, server))
}

/// Client and server over in-memory transports with a delay in each direction.
pub fn delayed_pair(
    seed: u64,
    min: Duration,
    max: Duration,
    client: Config,
    server: Config,
) -> (Session, Session) {
    let (a, b) = memory_pair(256);
    (
        Session::client(DelayTransport::new(a, seed, min, max), client),
        Session::server(DelayTransport::new(b, seed ^ 0x5555, min, max), server),
    )
}

/// A peer that speaks raw frames (to test protocol violations).
pub struct RawPeer {
    pub t: MemoryTransport,
}

impl RawPeer {
    pub async fn recv(&mut self) -> Option<Message> {
        poll_fn(|cx| self.t.poll_recv(cx)).await.map(|r| r.unwrap())
    }
    /// Next decoded frame, skipping PINGs (answered) .
    pub async fn recv_frame(&mut self) -> Option<Frame> {
        loop {
            match self.recv().await? {
                Message::Binary(b) => match frame::decode(b).unwrap() {
                    Frame::Ping { ack: false, opaque } => {
                        self.try_send(Frame::Ping { ack: true, opaque }.encode())
                            .await;
                    }
                    f => return Some(f),
                },
                Message::Text(_) => panic!("text from session"),
            }
        }
    }
    /// Send unless the session has closed the transport.
    pub async fn try_send(&mut self, msg: Bytes) -> bool {
        if poll_fn(|cx| self.t.poll_ready(cx)).await.is_err() {
            return false;
        }
        self.t.start_send(msg).is_ok()
    }
    pub async fn send(&mut self, msg: Bytes) {
        poll_fn(|cx| self.t.poll_ready(cx)).await.unwrap();
        self.t.start_send(msg).unwrap();
    }
    /// Wait for a GOAWAY and return its code.
    pub async fn expect_goaway(&mut self) -> wsmux::GoAwayCode {
        loop {
            match self.recv_frame().await {
                Some(Frame::GoAway { code, .. }) => return code,
                Some(_) => continue,
                None => panic!("transport closed without GOAWAY"),
            }
        }
    }
}

/// A session (client role) and a raw peer standing in for the server.
pub fn raw_server(cfg: Config) -> (Session, RawPeer) {
    let (a, b) = memory_pair(1024);
    (Session::client(a, cfg), RawPeer { t: b })
}

/// A session (server role) and a raw peer standing in for the client.
pub fn raw_client(cfg: Config) -> (Session, RawPeer) {
    let (a, b) = memory_pair(1024);
    (Session::server(b, cfg), RawPeer { t: a })
}

/// Deterministic pseudo-random payload for stream `id`.
pub fn payload(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..len).map(|_| rng.gen()).collect()
}
