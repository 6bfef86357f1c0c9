//! A multiplexed stream: `AsyncRead + AsyncWrite`.

use crate::error::StreamReset;
use crate::frame::{encode_data, header, Flags, FrameType};
use crate::session::Shared;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Frames one `poll_write` may queue at most.
const WRITE_FRAMES: usize = 4;

/// One bidirectional byte stream of a [`crate::Session`].
///
/// * Reads return the peer's bytes in order, then EOF (`Ok(0)`) after the
///   peer's FIN. After the peer's RST they fail with
///   `io::ErrorKind::ConnectionReset` (wrapping [`StreamReset`]) once the
///   bytes received before the RST have been read.
/// * Writes wait for send credit (the peer's receive window): a slow reader
///   on the other side stalls this stream only.
/// * `shutdown()` sends FIN (half-close): no more writes, reading continues
///   until the peer's FIN.
/// * `flush()` returns at once: written data is already queued for the
///   session's driver task, which writes and flushes the transport as soon as
///   its queue runs empty.
/// * Dropping the stream without a clean close in both directions sends RST
///   (code [`crate::reset_code::CANCEL`]).
pub struct Stream {
    id: u32,
    shared: Arc<Shared>,
}

fn reset_error(code: u32) -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionReset, StreamReset { code })
}

impl Stream {
    pub(crate) fn new(id: u32, shared: Arc<Shared>) -> Self {
        Stream { id, shared }
    }

    /// The stream id (odd: opened by the client, even: by the server).
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Abort the stream in both directions with an application `code`
    /// (sends RST). Further reads and writes fail.
    pub fn reset(&mut self, code: u32) {
        self.shared.lock().reset_stream(self.id, code);
    }

    /// Bytes received on this stream and not yet read.
    pub fn recv_buffered(&self) -> usize {
        let inner = self.shared.lock();
        inner.streams.get(&self.id).map_or(0, |s| s.buffered)
    }

    /// This stream's current receive window (the most it can hold).
    pub fn recv_window(&self) -> u32 {
        let inner = self.shared.lock();
        inner.streams.get(&self.id).map_or(0, |s| s.window)
    }
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream").field("id", &self.id).finish()
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let id = self.id;
        let mut guard = self.shared.lock();
        let inner = &mut *guard;
        let Some(st) = inner.streams.get_mut(&id) else {
            return Poll::Ready(Err(io::ErrorKind::NotConnected.into()));
        };
        if st.rst_sent {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "stream was reset locally",
            )));
        }
        if !st.recv_buf.is_empty() {
            if buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            let mut n = 0;
            while buf.remaining() > 0 {
                let Some(front) = st.recv_buf.front_mut() else {
                    break;
                };
                let k = front.len().min(buf.remaining());
                buf.put_slice(&front[..k]);
                n += k;
                if k == front.len() {
                    st.recv_buf.pop_front();
                } else {
                    let _ = front.split_to(k);
                }
            }
            st.buffered -= n;
            inner.conn_buffered -= n;
            if inner.error.is_none() {
                inner.maybe_schedule_update(id);
            }
            return Poll::Ready(Ok(()));
        }
        if st.fin_recv {
            return Poll::Ready(Ok(()));
        }
        if let Some(code) = st.rst_recv {
            return Poll::Ready(Err(reset_error(code)));
        }
        if let Some(e) = &inner.error {
            return Poll::Ready(Err(e.to_io()));
        }
        st.read_waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let id = self.id;
        let mut guard = self.shared.lock();
        let inner = &mut *guard;
        if let Some(e) = &inner.error {
            return Poll::Ready(Err(e.to_io()));
        }
        let max_payload = inner.cfg.max_frame_payload;
        let queue_full = inner.send_queue_full();
        let Some(st) = inner.streams.get_mut(&id) else {
            return Poll::Ready(Err(io::ErrorKind::NotConnected.into()));
        };
        if let Some(code) = st.rst_recv {
            return Poll::Ready(Err(reset_error(code)));
        }
        if st.fin_sent || st.rst_sent {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "write after shutdown or reset",
            )));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if st.send_credit == 0 {
            st.write_waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        if queue_full {
            inner.wait_for_queue(id, cx.waker());
            return Poll::Pending;
        }
        // Queue up to WRITE_FRAMES frames per call: fewer lock round trips
        // for large writes.
        let mut written = 0;
        for _ in 0..WRITE_FRAMES {
            let Some(st) = inner.streams.get_mut(&id) else {
                break;
            };
            let rest = &buf[written..];
            let n = rest
                .len()
                .min(max_payload)
                .min(st.send_credit.min(u32::MAX as u64) as usize);
            if n == 0 {
                break;
            }
            st.send_credit -= n as u64;
            let hdr = header(FrameType::Data, Flags::empty(), id, 0);
            let frame = inner.pool.bytes(&[&hdr, &rest[..n]]);
            inner.push_data(frame);
            written += n;
            if written == buf.len() || inner.send_queue_full() {
                break;
            }
        }
        Poll::Ready(Ok(written))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Written data is queued for the session's driver, which flushes the
        // transport as soon as its queue runs empty.
        let inner = self.shared.lock();
        match &inner.error {
            Some(e) => Poll::Ready(Err(e.to_io())),
            None => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let id = self.id;
        let mut inner = self.shared.lock();
        if let Some(e) = &inner.error {
            return Poll::Ready(Err(e.to_io()));
        }
        let Some(st) = inner.streams.get_mut(&id) else {
            return Poll::Ready(Err(io::ErrorKind::NotConnected.into()));
        };
        if let Some(code) = st.rst_recv {
            return Poll::Ready(Err(reset_error(code)));
        }
        if st.fin_sent || st.rst_sent {
            return Poll::Ready(Ok(()));
        }
        st.fin_sent = true;
        inner.push_data(encode_data(id, Flags::FIN, &[]));
        Poll::Ready(Ok(()))
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.shared.lock().remove_stream(self.id);
    }
}
