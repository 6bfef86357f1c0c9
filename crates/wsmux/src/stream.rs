//! A multiplexed stream: `AsyncRead + AsyncWrite`.

use crate::error::StreamReset;
use crate::proto::{ReadError, WriteError};
use crate::session::Shared;
use bytes::Bytes;
use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

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

fn write_error(e: WriteError) -> io::Error {
    match e {
        WriteError::Reset(code) => reset_error(code),
        WriteError::Closed => {
            io::Error::new(io::ErrorKind::BrokenPipe, "write after shutdown or reset")
        }
        WriteError::Session(e) => e.to_io(),
        WriteError::UnknownStream | WriteError::Blocked => io::ErrorKind::NotConnected.into(),
    }
}

impl Stream {
    pub(crate) fn new(id: u32, shared: Arc<Shared>) -> Self {
        Stream { id, shared }
    }

    /// The stream id (odd: opened by the client, even: by the server). Ids
    /// are unique within a session and never reused.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Abort the stream in both directions with an application `code`
    /// (sends RST). Further reads and writes fail.
    pub fn reset(&mut self, code: u32) {
        self.shared.lock().conn.reset(self.id, code);
    }

    /// Bytes received on this stream and not yet read.
    pub fn recv_buffered(&self) -> usize {
        self.shared.lock().conn.stream_buffered(self.id)
    }

    /// This stream's current receive window (the most it can hold).
    pub fn recv_window(&self) -> u32 {
        self.shared.lock().conn.stream_window(self.id)
    }

    /// Read without a copy: up to `max` bytes, as the received payloads
    /// themselves (or the first part of one), appended to `out`. Returns how
    /// many bytes; `0` with `max > 0` is the end of the stream. Fails as
    /// [`AsyncRead::poll_read`] does.
    pub fn poll_read_bytes(
        &mut self,
        cx: &mut Context<'_>,
        max: usize,
        out: &mut VecDeque<Bytes>,
    ) -> Poll<io::Result<usize>> {
        let id = self.id;
        let mut st = self.shared.lock();
        let r = st.conn.read_bytes(id, max, |b| out.push_back(b));
        read_result(r, || st.wait_read(id, cx.waker()))
    }

    /// Write without a copy: the frames carry slices of `data`; what was
    /// taken (at least one byte unless `data` is empty) is removed from its
    /// front, and the count returned. Waits and fails as
    /// [`AsyncWrite::poll_write`] does.
    pub fn poll_write_bytes(
        &mut self,
        cx: &mut Context<'_>,
        data: &mut Bytes,
    ) -> Poll<io::Result<usize>> {
        let id = self.id;
        let mut st = self.shared.lock();
        match st.conn.write_bytes(id, data) {
            Ok(n) => Poll::Ready(Ok(n)),
            Err(WriteError::Blocked) => {
                st.wait_write(id, cx.waker());
                Poll::Pending
            }
            Err(e) => Poll::Ready(Err(write_error(e))),
        }
    }
}

/// The outcome of a read; `wait` registers the waker when it must wait.
fn read_result<T>(r: Result<T, ReadError>, wait: impl FnOnce()) -> Poll<io::Result<T>> {
    match r {
        Ok(n) => Poll::Ready(Ok(n)),
        Err(ReadError::Blocked) => {
            wait();
            Poll::Pending
        }
        Err(ReadError::Reset(code)) => Poll::Ready(Err(reset_error(code))),
        Err(ReadError::LocallyReset) => Poll::Ready(Err(io::Error::new(
            io::ErrorKind::NotConnected,
            "stream was reset locally",
        ))),
        Err(ReadError::UnknownStream) => Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
        Err(ReadError::Session(e)) => Poll::Ready(Err(e.to_io())),
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
        let mut st = self.shared.lock();
        let r = st.conn.read(id, buf.remaining(), |b| buf.put_slice(b));
        read_result(r, || st.wait_read(id, cx.waker())).map_ok(|_| ())
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let id = self.id;
        let mut st = self.shared.lock();
        match st.conn.write(id, buf) {
            Ok(n) => Poll::Ready(Ok(n)),
            Err(WriteError::Blocked) => {
                st.wait_write(id, cx.waker());
                Poll::Pending
            }
            Err(e) => Poll::Ready(Err(write_error(e))),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Written data is queued for the session's driver, which flushes the
        // transport as soon as its queue runs empty.
        match self.shared.lock().conn.error() {
            Some(e) => Poll::Ready(Err(e.to_io())),
            None => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let id = self.id;
        match self.shared.lock().conn.finish(id) {
            Ok(()) => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(write_error(e))),
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        st.conn.release(self.id);
        st.forget(self.id);
    }
}
