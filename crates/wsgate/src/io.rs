//! Client-side I/O that the bridge relay and the proxy's passthrough share:
//! an upgraded connection ([`ClientIo`]) split into borrowed halves, reads on
//! readiness into buffers taken only when bytes are waiting (so an idle
//! connection holds none), a short per-thread stack of spare read buffers,
//! cancel-safe writes (big payloads written from where they were read, with
//! their frame header, by one `writev`: [`WriteQueue`]), and the helpers of
//! an orderly close.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::time::Duration;

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf, ReadHalf, WriteHalf};
use tokio::net::{tcp, TcpStream};
use tokio_util::sync::CancellationToken;
use wsframe::{write_header, OpCode};

/// Most bytes read from a socket at a time (and the datagram buffer size).
pub(crate) const CHUNK: usize = 64 * 1024;
/// First read size of a connection: reads that fill the buffer double it up to
/// `CHUNK`, so chatty connections stay small and bulk ones get big reads.
pub(crate) const FIRST_CHUNK: usize = 4 * 1024;

/// Most first-size read buffers a worker thread keeps for reuse (64 KiB).
const SPARES: usize = 16;

thread_local! {
    /// Read buffers of `FIRST_CHUNK` bytes that this thread's connections
    /// gave back. A relay frees its read buffer as soon as a chunk is written
    /// on (an idle connection holds none), so a busy worker would otherwise
    /// allocate and free one per chunk; with mimalloc, a block of this size
    /// takes the generic allocation path and its page is retired and set up
    /// again each time it empties: about 490 instructions per relayed echo,
    /// 7 % of the gateway's user-space work for a small message (counted
    /// with `INSTR_TEST=messages bench/proxy/instructions.sh`). Connections
    /// stay on the worker that accepted them, so a buffer is taken and
    /// given back on the same thread; the stack is short and bounded.
    static SPARE: std::cell::RefCell<Vec<BytesMut>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Makes room for the next read according to the adaptive size `hint`.
pub(crate) fn make_room(buf: &mut BytesMut, hint: usize) {
    if buf.capacity() == 0 {
        // The usual case (buffers are given back between chunks): a spare
        // one, else a plain allocation, not `reserve`'s growth path.
        *buf = match hint {
            FIRST_CHUNK => SPARE
                .with(|s| s.borrow_mut().pop())
                .unwrap_or_else(|| BytesMut::with_capacity(FIRST_CHUNK)),
            _ => BytesMut::with_capacity(hint),
        };
    } else if buf.capacity() - buf.len() < hint / 4 {
        buf.reserve(hint);
    }
}

/// Gives an emptied read buffer back (`buf` is left without one): a whole
/// first-size buffer is kept for this thread's next read, any other freed.
/// A buffer whose every byte was written on reports no capacity left but
/// still holds its allocation, so callers test `is_empty()`, not the
/// capacity.
pub(crate) fn release(buf: &mut BytesMut) {
    let mut b = std::mem::take(buf);
    b.clear();
    if b.try_reclaim(FIRST_CHUNK) && b.capacity() == FIRST_CHUNK {
        SPARE.with(|s| {
            let mut s = s.borrow_mut();
            if s.len() < SPARES {
                s.push(b);
            }
        });
    }
}

/// Grows the hint when a read filled all the room it had.
pub(crate) fn grow(hint: &mut usize, read: usize, room: usize) {
    if read == room && *hint < CHUNK {
        *hint *= 2;
    }
}

/// An upgraded client connection.
pub enum ClientIo {
    /// Plain TCP: read on readiness, no idle buffer.
    Tcp(TcpStream),
    /// Anything else (TLS): read through `AsyncRead`.
    Io(Box<dyn Io>),
}

impl ClientIo {
    /// The connection as one `AsyncRead + AsyncWrite` (for a wsmux
    /// transport or a splice).
    pub fn into_io(self) -> Box<dyn Io> {
        match self {
            ClientIo::Tcp(s) => Box::new(s),
            ClientIo::Io(b) => b,
        }
    }
}

/// A bidirectional byte stream.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

// ---------------------------------------------------------------------------
// Readers and writers over the concrete socket types.

/// Reads on readiness: the buffer is grown only when bytes are waiting.
macro_rules! ready_read {
    ($sock:expr, $buf:expr, $hint:expr) => {{
        loop {
            // poll_read_ready (not readable()) so the waker hyper left on
            // the socket during the handshake is replaced and freed.
            std::future::poll_fn(|cx| $sock.as_ref().poll_read_ready(cx)).await?;
            $crate::io::make_room($buf, *$hint);
            let room = $buf.capacity() - $buf.len();
            // A read that did not fill the buffer drained the socket: report
            // "would block" to `try_io` so it clears the readiness it saw
            // before the read (a newer readiness event is kept), saving the
            // extra read that would only return EAGAIN. The bytes are kept.
            let mut short = None;
            let read = $sock.as_ref().try_io(tokio::io::Interest::READABLE, || {
                let n = $sock.try_read_buf($buf)?;
                if n > 0 && n < room {
                    short = Some(n);
                    return Err(std::io::ErrorKind::WouldBlock.into());
                }
                Ok(n)
            });
            match (read, short) {
                (_, Some(n)) | (Ok(n), None) => {
                    $crate::io::grow($hint, n, room);
                    break Ok(n);
                }
                (Err(e), None) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    // Stale readiness: wait again without holding a buffer.
                    if $buf.is_empty() {
                        $crate::io::release($buf);
                    }
                    continue;
                }
                (Err(e), None) => break Err(e),
            }
        }
    }};
}

pub(crate) use ready_read;

/// The reading half of an upgraded connection (a client, or a proxied backend).
pub(crate) enum ConnReader<'a> {
    Tcp(tcp::ReadHalf<'a>),
    Io(ReadHalf<Box<dyn Io>>),
}

impl ConnReader<'_> {
    /// Whether the other side's FIN has already arrived with nothing unread
    /// before it: one non-blocking peek, past tokio's readiness (which the
    /// last short read cleared). Always `false` for TLS and other streams.
    pub(crate) fn eof_arrived(&self) -> bool {
        match self {
            ConnReader::Tcp(s) => {
                let mut b = [std::mem::MaybeUninit::<u8>::uninit(); 1];
                matches!(socket2::SockRef::from(s.as_ref()).peek(&mut b), Ok(0))
            }
            ConnReader::Io(_) => false,
        }
    }

    pub(crate) async fn read(&mut self, buf: &mut BytesMut, hint: &mut usize) -> io::Result<usize> {
        match self {
            ConnReader::Tcp(s) => ready_read!(s, buf, hint),
            ConnReader::Io(s) => {
                make_room(buf, *hint);
                let room = buf.capacity() - buf.len();
                let n = s.read_buf(buf).await?;
                grow(hint, n, room);
                Ok(n)
            }
        }
    }
}

/// The writing half of an upgraded connection.
pub(crate) enum ConnWriter<'a> {
    Tcp(tcp::WriteHalf<'a>),
    Io(WriteHalf<Box<dyn Io>>),
}

impl ConnWriter<'_> {
    /// One write: cancel-safe.
    async fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        match self {
            ConnWriter::Tcp(s) => s.write(data).await,
            ConnWriter::Io(s) => {
                let n = s.write(data).await?;
                if n == data.len() {
                    s.flush().await?;
                }
                Ok(n)
            }
        }
    }

    /// One write of the front of `q` (a `writev` when it has segments).
    /// The slices live only during the poll, not in the future's state.
    fn poll_write_queue(
        &mut self,
        cx: &mut Context<'_>,
        q: &WriteQueue,
    ) -> Poll<io::Result<usize>> {
        if let Some(tail) = q.only_tail() {
            return match self {
                ConnWriter::Tcp(s) => Pin::new(s).poll_write(cx, tail),
                ConnWriter::Io(s) => Pin::new(s).poll_write(cx, tail),
            };
        }
        let mut iov = [IoSlice::new(&[]); IOV];
        let k = q.slices(&mut iov);
        match self {
            ConnWriter::Tcp(s) => Pin::new(s).poll_write_vectored(cx, &iov[..k]),
            ConnWriter::Io(s) => Pin::new(s).poll_write_vectored(cx, &iov[..k]),
        }
    }

    /// Writes and consumes all of `q`; cancel-safe (what was written is gone from `q`).
    pub(crate) async fn write_queue(&mut self, q: &mut WriteQueue) -> io::Result<()> {
        while !q.is_empty() {
            let n = std::future::poll_fn(|cx| self.poll_write_queue(cx, q)).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            q.advance(n);
        }
        if let ConnWriter::Io(s) = self {
            s.flush().await?;
        }
        Ok(())
    }

    /// [`ConnWriter::write_queue`] for the last bytes before our FIN: the
    /// copied tail goes with [`ConnWriter::write_last`].
    pub(crate) async fn write_queue_last(&mut self, q: &mut WriteQueue) -> io::Result<()> {
        while !q.segments.is_empty() {
            let n = std::future::poll_fn(|cx| self.poll_write_queue(cx, q)).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            q.advance(n);
        }
        q.tail.advance(std::mem::take(&mut q.written));
        let n = q.tail.len();
        self.write_last(&mut q.tail, n).await
    }

    /// Writes and consumes all of `buf`; cancel-safe (what was written is gone from `buf`).
    pub(crate) async fn write_all(&mut self, buf: &mut BytesMut) -> io::Result<()> {
        while !buf.is_empty() {
            let n = self.write(buf).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            buf.advance(n);
        }
        Ok(())
    }

    /// Like [`ConnWriter::write_prefix`], for the last bytes before our FIN
    /// (`shutdown`, or closing the socket): on TCP they are first offered with
    /// `MSG_MORE`, so the kernel holds them a moment and the FIN that follows
    /// at once rides in the same segment — one packet less for both ends of
    /// every closing handshake. The caller must end the connection right after.
    #[cfg_attr(not(all(target_os = "linux", target_env = "gnu")), allow(unused_mut))]
    pub(crate) async fn write_last(&mut self, buf: &mut BytesMut, mut n: usize) -> io::Result<()> {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        if let ConnWriter::Tcp(s) = self {
            let sock = s.as_ref();
            if let Ok(w) = sock.try_io(tokio::io::Interest::WRITABLE, || {
                socket2::SockRef::from(sock).send_with_flags(&buf[..n], libc::MSG_MORE)
            }) {
                buf.advance(w);
                n -= w;
            }
        }
        self.write_prefix(buf, n).await
    }

    /// Writes the first `n` bytes of `buf` and consumes them; cancel-safe.
    pub(crate) async fn write_prefix(
        &mut self,
        buf: &mut BytesMut,
        mut n: usize,
    ) -> io::Result<()> {
        while n > 0 {
            let w = self.write(&buf[..n]).await?;
            if w == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            buf.advance(w);
            n -= w;
        }
        Ok(())
    }

    pub(crate) async fn shutdown(&mut self) {
        let _ = match self {
            ConnWriter::Tcp(s) => s.shutdown().await,
            ConnWriter::Io(s) => s.shutdown().await,
        };
    }
}

/// Most slices given to one `writev`.
pub(crate) const IOV: usize = 16;
/// Payloads this big or bigger are written from the buffer they were read
/// into (`writev` of the frame header and the payload) instead of being
/// copied: copying 64 KiB payloads twice per echo (into the batch going up,
/// into the framed output going down) was 83 % of the gateway's instructions
/// in the 64 KiB echo test. Smaller ones are still copied, so that many
/// small messages go out in one contiguous write.
pub(crate) const NO_COPY: usize = 4096;

/// Bytes waiting to be written, in order: whole segments (big payloads, kept
/// in the read buffer they came in, no copy), then `tail` (frame headers,
/// small payloads and control frames, copied). Written with
/// [`ConnWriter::write_queue`] (or a stream peer's writer, through
/// [`WriteQueue::slices`]): one `write` while there are no segments, else one
/// `writev` per up to [`IOV`] of them.
#[derive(Default)]
pub(crate) struct WriteQueue {
    segments: VecDeque<Bytes>,
    /// Bytes in `segments`.
    in_segments: usize,
    tail: BytesMut,
    /// Bytes at the front of `tail` already written: the tail is cleared, not
    /// advanced, once written whole, so it is reused from its start.
    written: usize,
}

impl WriteQueue {
    pub(crate) fn is_empty(&self) -> bool {
        self.in_segments == 0 && self.written == self.tail.len()
    }

    pub(crate) fn len(&self) -> usize {
        self.in_segments + self.tail.len() - self.written
    }

    /// Appends a copy of `data`.
    pub(crate) fn copy(&mut self, data: &[u8]) {
        self.tail.extend_from_slice(data);
    }

    /// Appends `data` without copying it.
    pub(crate) fn push(&mut self, data: Bytes) {
        if data.is_empty() {
            return;
        }
        if self.written < self.tail.len() {
            let mut t = self.tail.split();
            t.advance(std::mem::take(&mut self.written));
            self.in_segments += t.len();
            self.segments.push_back(t.freeze());
        }
        self.in_segments += data.len();
        self.segments.push_back(data);
    }

    /// Appends `data`, copied if small (see [`NO_COPY`]).
    pub(crate) fn append(&mut self, data: BytesMut) {
        if data.len() >= NO_COPY {
            self.push(data.freeze());
        } else {
            self.copy(&data);
        }
    }

    /// Appends one unmasked server frame carrying a whole message, whose
    /// payload is not copied.
    pub(crate) fn push_message(&mut self, opcode: OpCode, payload: Bytes) {
        write_header(&mut self.tail, true, 0, opcode, None, payload.len());
        self.push(payload);
    }

    /// Appends one unmasked server frame carrying a whole message of `len`
    /// bytes held in `parts`, which are not copied (but small ones).
    pub(crate) fn push_message_parts(&mut self, opcode: OpCode, parts: Vec<Bytes>, len: usize) {
        debug_assert_eq!(parts.iter().map(Bytes::len).sum::<usize>(), len);
        write_header(&mut self.tail, true, 0, opcode, None, len);
        for p in parts {
            if p.len() >= NO_COPY {
                self.push(p);
            } else {
                self.copy(&p);
            }
        }
    }

    /// Appends one unmasked server frame carrying a whole message, copied.
    pub(crate) fn copy_message(&mut self, opcode: OpCode, payload: &[u8]) {
        self.tail.reserve(wsframe::MAX_HEADER_LEN + payload.len());
        write_header(&mut self.tail, true, 0, opcode, None, payload.len());
        self.tail.extend_from_slice(payload);
    }

    /// Where frames encoded in place are appended (after every segment).
    pub(crate) fn tail_mut(&mut self) -> &mut BytesMut {
        &mut self.tail
    }

    /// Appends already encoded frames.
    pub(crate) fn unsplit(&mut self, encoded: BytesMut) {
        if self.tail.is_empty() {
            self.tail = encoded;
        } else {
            self.tail.extend_from_slice(&encoded);
        }
    }

    /// The unwritten part of `tail`, when no segment comes before it.
    pub(crate) fn only_tail(&self) -> Option<&[u8]> {
        (self.in_segments == 0).then(|| &self.tail[self.written..])
    }

    /// The queue's first bytes, as up to `iov.len()` slices; returns how many.
    pub(crate) fn slices<'a>(&'a self, iov: &mut [IoSlice<'a>]) -> usize {
        let tail = &self.tail[self.written..];
        let tail = (!tail.is_empty()).then_some(tail);
        let all = self.segments.iter().map(|s| &s[..]).chain(tail);
        let mut k = 0;
        for (slot, s) in iov.iter_mut().zip(all) {
            *slot = IoSlice::new(s);
            k += 1;
        }
        k
    }

    /// Drops the first `n` bytes (written).
    pub(crate) fn advance(&mut self, mut n: usize) {
        let from_segments = n.min(self.in_segments);
        self.in_segments -= from_segments;
        while n > 0 {
            match self.segments.front_mut() {
                Some(s) if s.len() <= n => {
                    n -= s.len();
                    self.segments.pop_front();
                }
                Some(s) => {
                    s.advance(n);
                    return;
                }
                None => {
                    self.written += n;
                    break;
                }
            }
        }
        if self.written == self.tail.len() {
            self.tail.clear();
            self.written = 0;
        }
    }

    /// Lets go of all the memory of an emptied queue.
    pub(crate) fn free(&mut self) {
        debug_assert!(self.is_empty());
        if self.segments.capacity() > 0 {
            self.segments = VecDeque::new();
        }
        if self.tail.capacity() > 0 {
            self.tail = BytesMut::new();
        }
    }

    /// Lets go of the memory of an emptied queue but a small `tail` (reused
    /// by the next small writes).
    pub(crate) fn shrink(&mut self) {
        debug_assert!(self.is_empty());
        if self.segments.capacity() > 0 {
            self.segments = VecDeque::new();
        }
        if self.tail.capacity() > 4096 {
            self.tail = BytesMut::new();
        }
    }

    /// Everything the queue would write, in order, taken `step` bytes at a
    /// time (as partial writes would); empties it.
    #[cfg(test)]
    pub(crate) fn drain_for_test(&mut self, step: usize) -> Vec<u8> {
        let mut out = vec![];
        while !self.is_empty() {
            let mut iov = [IoSlice::new(&[]); IOV];
            let k = self.slices(&mut iov);
            let all: Vec<u8> = iov[..k].iter().flat_map(|s| s.iter().copied()).collect();
            let n = all.len().min(step);
            out.extend_from_slice(&all[..n]);
            self.advance(n);
        }
        out
    }
}

/// Splits an upgraded connection into borrowed reader and writer halves and
/// runs `$body` with them.
macro_rules! with_halves {
    ($io:expr, |$r:ident, $w:ident| $body:expr) => {
        match $io {
            $crate::io::ClientIo::Tcp(mut s) => {
                let (r, w) = s.split();
                let ($r, $w) = (
                    $crate::io::ConnReader::Tcp(r),
                    $crate::io::ConnWriter::Tcp(w),
                );
                $body
            }
            $crate::io::ClientIo::Io(b) => {
                let (r, w) = tokio::io::split(b);
                let ($r, $w) = ($crate::io::ConnReader::Io(r), $crate::io::ConnWriter::Io(w));
                $body
            }
        }
    };
}
pub(crate) use with_halves;

/// `token.cancelled()` for a `select!` that polls it on every wake-up of its
/// task: the waiter is registered on the first poll only, and later polls
/// read the token's flag (one atomic load) instead of taking the waiter
/// list's lock to compare wakers — the task's own, which does not change.
pub(crate) async fn cancelled(token: &CancellationToken) {
    let mut wait = std::pin::pin!(token.cancelled());
    let mut registered = false;
    std::future::poll_fn(|cx| {
        if registered {
            return if token.is_cancelled() {
                std::task::Poll::Ready(())
            } else {
                std::task::Poll::Pending
            };
        }
        registered = true;
        std::future::Future::poll(wait.as_mut(), cx)
    })
    .await
}

/// Reads and discards until the other side closes or the timeout, so closing
/// our socket with unread bytes in it does not reset the connection.
pub(crate) async fn drain(src: &mut ConnReader<'_>, timeout: Duration) {
    let _ = tokio::time::timeout(timeout, async {
        let (mut scratch, mut hint) = (BytesMut::new(), FIRST_CHUNK);
        loop {
            scratch.clear();
            match src.read(&mut scratch, &mut hint).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
}

/// A connection whose first bytes were already read: they are read again
/// first. How hyper gets a connection whose request head we looked at.
pub struct Rewind<T> {
    pub(crate) prefix: Bytes,
    pub(crate) inner: T,
}

impl<T> Rewind<T> {
    pub fn new(prefix: Bytes, inner: T) -> Self {
        Rewind { prefix, inner }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::task::{Context, Poll, Waker};

    #[test]
    fn read_buffers_are_reused_on_their_thread_and_the_spares_stay_few() {
        // Run on a thread of its own: the spares are per thread.
        std::thread::spawn(|| {
            let mut buf = BytesMut::new();
            make_room(&mut buf, FIRST_CHUNK);
            let first = buf.as_ptr();
            buf.extend_from_slice(b"a chunk");
            buf.advance(7); // written on: empty, its start moved
            release(&mut buf);
            assert_eq!(buf.capacity(), 0, "an idle connection holds no buffer");
            make_room(&mut buf, FIRST_CHUNK);
            assert_eq!(buf.as_ptr(), first, "the same allocation, whole again");
            assert_eq!(buf.capacity(), FIRST_CHUNK);
            // Filled to the last byte and written on whole: no capacity left
            // in its view, yet the allocation comes back.
            buf.resize(FIRST_CHUNK, b'x');
            buf.advance(FIRST_CHUNK);
            assert_eq!(buf.capacity(), 0);
            release(&mut buf);
            make_room(&mut buf, FIRST_CHUNK);
            assert_eq!(buf.as_ptr(), first, "a full chunk's buffer is kept too");
            release(&mut buf);
            SPARE.with(|s| s.borrow_mut().clear());
            // Bigger buffers (bulk connections) and ones still shared are
            // freed, not kept.
            let mut big = BytesMut::with_capacity(CHUNK);
            release(&mut big);
            let mut shared = BytesMut::with_capacity(FIRST_CHUNK);
            let _other = shared.split_off(FIRST_CHUNK / 2);
            release(&mut shared);
            assert_eq!(SPARE.with(|s| s.borrow().len()), 0);
            // Many connections giving buffers back at once: a bounded stack.
            for _ in 0..SPARES * 3 {
                let mut b = BytesMut::new();
                make_room(&mut b, FIRST_CHUNK);
                release(&mut b);
                let mut held: Vec<BytesMut> = (0..SPARES * 2)
                    .map(|_| BytesMut::with_capacity(FIRST_CHUNK))
                    .collect();
                held.iter_mut().for_each(release);
            }
            assert_eq!(SPARE.with(|s| s.borrow().len()), SPARES);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn the_write_queue_keeps_order_copies_small_pieces_and_not_big_ones() {
        let big = BytesMut::from(&[7u8; NO_COPY][..]);
        let big_at = big.as_ptr();
        let mut q = WriteQueue::default();
        q.append(BytesMut::from(&b"ab"[..]));
        q.append(big);
        q.append(BytesMut::from(&b"cd"[..]));
        q.copy(b"ef");
        assert_eq!(q.len(), NO_COPY + 6);
        // The small pieces around the big one share a buffer; the big one is
        // written from where it was read.
        assert_eq!(q.segments.len(), 2);
        assert_eq!(q.segments[1].as_ptr(), big_at, "not copied");
        let mut want = b"ab".to_vec();
        want.extend_from_slice(&[7u8; NO_COPY]);
        want.extend_from_slice(b"cdef");
        for step in [1, 3, 1000, usize::MAX] {
            let mut again = WriteQueue::default();
            again.copy(b"ab");
            again.push(Bytes::from(vec![7u8; NO_COPY]));
            again.copy(b"cdef");
            assert_eq!(
                again.drain_for_test(step),
                want,
                "written {step} bytes at a time"
            );
        }
        assert_eq!(q.drain_for_test(7), want);
        // Emptied: nothing is held but a small tail.
        q.shrink();
        assert_eq!(q.segments.capacity(), 0);
        assert!(q.tail.capacity() <= 4096);
        q.free();
        assert_eq!(q.tail.capacity(), 0);
    }

    #[test]
    fn a_write_queue_with_many_segments_goes_out_a_bounded_batch_at_a_time() {
        let mut q = WriteQueue::default();
        let mut want = vec![];
        for i in 0..IOV * 3 {
            let piece = vec![i as u8; NO_COPY + i];
            want.extend_from_slice(&piece);
            q.push(Bytes::from(piece));
            q.copy(&[b'.'; 3]);
            want.extend_from_slice(b"...");
        }
        let mut iov = [IoSlice::new(&[]); IOV];
        assert_eq!(q.slices(&mut iov), IOV);
        assert_eq!(q.drain_for_test(usize::MAX), want);
    }

    #[test]
    fn cancelled_registers_once_and_still_completes() {
        let token = CancellationToken::new();
        let mut wait = std::pin::pin!(cancelled(&token));
        let waker = Waker::noop();
        let mut cx = Context::from_waker(waker);
        // Polled again and again while not cancelled: pending every time.
        for _ in 0..3 {
            assert!(wait.as_mut().poll(&mut cx).is_pending());
        }
        token.cancel();
        assert_eq!(wait.as_mut().poll(&mut cx), Poll::Ready(()));
    }

    #[tokio::test]
    async fn cancelling_wakes_a_task_waiting_on_it() {
        let token = CancellationToken::new();
        let t = token.clone();
        let waiter = tokio::spawn(async move { cancelled(&t).await });
        // Let the waiter register, then cancel: it must be woken and finish.
        tokio::task::yield_now().await;
        token.cancel();
        tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .expect("woken by the cancel")
            .unwrap();
    }
}
