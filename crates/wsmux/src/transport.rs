//! The message transport a session runs over, an in-memory implementation,
//! and an adapter that turns any transport into an `AsyncRead + AsyncWrite`
//! byte stream.
//!
//! A transport moves whole messages, like a WebSocket: one binary message in
//! is one mux frame. Sending is bounded: `poll_ready` must return `Pending`
//! while the transport cannot take another message.

use bytes::Bytes;
use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A received message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// A binary message: one mux frame.
    Binary(Bytes),
    /// A text message: a protocol error for the mux (GOAWAY TEXT_MESSAGE).
    Text(Bytes),
}

/// A bidirectional, message-oriented, ordered, reliable transport (for example
/// one WebSocket connection). Implementations answer WebSocket pings and
/// close handshakes themselves; the mux only sees binary/text messages.
///
/// The methods mirror `futures::Sink` + `futures::Stream` on `&mut self`, so a
/// single task can read and write concurrently without splitting.
pub trait Transport: Send + Unpin + 'static {
    /// Receive the next message; `Ready(None)` once the peer closed cleanly.
    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<Message>>>;
    /// Ready to take one more message with [`Transport::start_send`].
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    /// Queue one binary message. Only called after `poll_ready` returned
    /// `Ready(Ok(()))`.
    fn start_send(&mut self, msg: Bytes) -> io::Result<()>;
    /// Queue one binary message made of `head` followed by `body` (a mux
    /// frame's header and its payload). Only called after `poll_ready`
    /// returned `Ready(Ok(()))`. The default joins them (a copy) for
    /// [`Transport::start_send`]; a transport that can write the two apart
    /// (a `writev`) overrides it, so the payload is never copied.
    fn start_send_parts(&mut self, head: &[u8], body: Bytes) -> io::Result<()> {
        let mut msg = Vec::with_capacity(head.len() + body.len());
        msg.extend_from_slice(head);
        msg.extend_from_slice(&body);
        self.start_send(msg.into())
    }
    /// Push queued messages out.
    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    /// Flush and close the sending direction (WebSocket close).
    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

impl<T: Transport + ?Sized> Transport for Box<T> {
    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<Message>>> {
        (**self).poll_recv(cx)
    }
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        (**self).poll_ready(cx)
    }
    fn start_send(&mut self, msg: Bytes) -> io::Result<()> {
        (**self).start_send(msg)
    }
    fn start_send_parts(&mut self, head: &[u8], body: Bytes) -> io::Result<()> {
        (**self).start_send_parts(head, body)
    }
    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        (**self).poll_flush(cx)
    }
    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        (**self).poll_close(cx)
    }
}

// ---------------------------------------------------------------------------
// In-memory transport
// ---------------------------------------------------------------------------

struct Pipe {
    queue: VecDeque<Message>,
    cap: usize,
    /// The sending end closed (or was dropped).
    closed: bool,
    /// The receiving end was dropped.
    rx_gone: bool,
    recv_waker: Option<Waker>,
    send_waker: Option<Waker>,
}

impl Pipe {
    fn new(cap: usize) -> Arc<Mutex<Pipe>> {
        Arc::new(Mutex::new(Pipe {
            queue: VecDeque::with_capacity(cap),
            cap,
            closed: false,
            rx_gone: false,
            recv_waker: None,
            send_waker: None,
        }))
    }
}

/// One end of an in-memory message transport, made by [`memory_pair`]. Each
/// direction holds at most `capacity` messages.
pub struct MemoryTransport {
    tx: Arc<Mutex<Pipe>>,
    rx: Arc<Mutex<Pipe>>,
}

/// Two connected in-memory transports; each direction buffers at most
/// `capacity` messages (at least 1).
pub fn memory_pair(capacity: usize) -> (MemoryTransport, MemoryTransport) {
    let a = Pipe::new(capacity.max(1));
    let b = Pipe::new(capacity.max(1));
    (
        MemoryTransport {
            tx: a.clone(),
            rx: b.clone(),
        },
        MemoryTransport { tx: b, rx: a },
    )
}

impl MemoryTransport {
    /// Send a text message (tests: the mux must reject it).
    pub fn send_text_now(&mut self, text: &str) -> io::Result<()> {
        self.push(Message::Text(Bytes::copy_from_slice(text.as_bytes())))
    }

    fn push(&mut self, msg: Message) -> io::Result<()> {
        let mut p = self.tx.lock().unwrap();
        if p.closed || p.rx_gone {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        p.queue.push_back(msg);
        if let Some(w) = p.recv_waker.take() {
            w.wake();
        }
        Ok(())
    }
}

impl Transport for MemoryTransport {
    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<Message>>> {
        let mut p = self.rx.lock().unwrap();
        if let Some(m) = p.queue.pop_front() {
            if let Some(w) = p.send_waker.take() {
                w.wake();
            }
            return Poll::Ready(Some(Ok(m)));
        }
        if p.closed {
            return Poll::Ready(None);
        }
        p.recv_waker = Some(cx.waker().clone());
        Poll::Pending
    }

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut p = self.tx.lock().unwrap();
        if p.closed || p.rx_gone {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if p.queue.len() < p.cap {
            return Poll::Ready(Ok(()));
        }
        p.send_waker = Some(cx.waker().clone());
        Poll::Pending
    }

    fn start_send(&mut self, msg: Bytes) -> io::Result<()> {
        self.push(Message::Binary(msg))
    }

    fn poll_flush(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_close(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut p = self.tx.lock().unwrap();
        p.closed = true;
        if let Some(w) = p.recv_waker.take() {
            w.wake();
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for MemoryTransport {
    fn drop(&mut self) {
        if let Ok(mut p) = self.tx.lock() {
            p.closed = true;
            if let Some(w) = p.recv_waker.take() {
                w.wake();
            }
        }
        if let Ok(mut p) = self.rx.lock() {
            p.rx_gone = true;
            p.queue.clear();
            if let Some(w) = p.send_waker.take() {
                w.wake();
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Byte-stream adapter
// ---------------------------------------------------------------------------

/// Turns a message transport (one WebSocket) into a plain `AsyncRead +
/// AsyncWrite` byte stream: each write becomes one binary message (at most
/// `max_message` bytes), reads return message payloads in order, message
/// boundaries are not preserved. `shutdown` closes the transport (WebSocket
/// close); a clean close from the peer reads as EOF. A text message reads as an
/// `InvalidData` error.
///
/// Useful for code that wants a socket-shaped WebSocket (and for running
/// another multiplexer, such as yamux, over a WebSocket).
pub struct ByteStream<T> {
    inner: T,
    read_buf: Bytes,
    max_message: usize,
    eof: bool,
}

impl<T: Transport> ByteStream<T> {
    /// Wrap `inner`; writes larger than 64 KiB are split.
    pub fn new(inner: T) -> Self {
        Self::with_max_message(inner, 64 * 1024)
    }
    /// Wrap `inner` with a custom largest message size.
    pub fn with_max_message(inner: T, max_message: usize) -> Self {
        ByteStream {
            inner,
            read_buf: Bytes::new(),
            max_message: max_message.max(1),
            eof: false,
        }
    }
    /// The wrapped transport.
    pub fn into_inner(self) -> T {
        self.inner
    }
}

impl<T: Transport> AsyncRead for ByteStream<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        while this.read_buf.is_empty() {
            if this.eof || buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            match this.inner.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => this.eof = true,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                Poll::Ready(Some(Ok(Message::Binary(b)))) => this.read_buf = b,
                Poll::Ready(Some(Ok(Message::Text(_)))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "text message on a binary byte stream",
                    )))
                }
            }
        }
        let n = buf.remaining().min(this.read_buf.len());
        buf.put_slice(&this.read_buf.split_to(n));
        Poll::Ready(Ok(()))
    }
}

impl<T: Transport> AsyncWrite for ByteStream<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        match this.inner.poll_ready(cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        }
        let n = buf.len().min(this.max_message);
        this.inner.start_send(Bytes::copy_from_slice(&buf[..n]))?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().inner.poll_close(cx)
    }
}
