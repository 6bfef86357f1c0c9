//! Copying two byte streams into each other, with half-close, holding no
//! buffer while idle.
//!
//! `tokio::io::copy_bidirectional` keeps a buffer per direction for the
//! whole life of the pair (16 KiB at its default size): over a thousand idle
//! tunnel streams that is most of the memory they hold. Here a direction
//! reads into the worker thread's scratch buffer, writes what it read at
//! once, and only when the writer cannot take all of it keeps the rest in a
//! buffer of its own, freed when written. An idle pair holds nothing but its
//! two streams.
//!
//! A source's EOF becomes a `shutdown` (FIN) of the other side, and the
//! copy goes on the other way (half-close) until both directions ended; an
//! error in either direction ends both.
//!
//! [`Splice::paced`] paces both directions by a subject's shared bandwidth
//! (`per_identity_bandwidth`): each read is at most [`PACED_CHUNK`] bytes
//! and paid for before the next; unpaced, a splice holds no pace at all.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::limits::{SharedBandwidth, Throttle, PACED_CHUNK};

/// Bytes read at once.
const SCRATCH: usize = 64 * 1024;

thread_local! {
    /// The scratch buffer every copy on this thread reads into: used within
    /// one `poll` only, never across a `Pending`.
    static SCRATCH_BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH].into_boxed_slice());
}

/// How a splice ended.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Copied {
    /// Bytes from `a` to `b`.
    pub a_to_b: u64,
    /// Bytes from `b` to `a`.
    pub b_to_a: u64,
}

#[derive(Default)]
struct Direction {
    /// Bytes read but not yet written (only while the writer lags).
    pending: Vec<u8>,
    written: usize,
    /// The source ended; the writer's shutdown is under way or done.
    eof: bool,
    done: bool,
    bytes: u64,
}

impl Direction {
    /// Copies until `src` ends or a side blocks; `pace`, when set, waits
    /// out its debt before each read and takes what was read.
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut src: Pin<&mut R>,
        mut dst: Pin<&mut W>,
        mut pace: Option<&mut Throttle>,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            while self.written < self.pending.len() {
                let n = ready!(dst.as_mut().poll_write(cx, &self.pending[self.written..]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.written += n;
                self.bytes += n as u64;
            }
            if !self.pending.is_empty() {
                // Written: an idle direction holds no buffer.
                self.pending = Vec::new();
                self.written = 0;
                ready!(dst.as_mut().poll_flush(cx))?;
            }
            if self.eof {
                ready!(dst.as_mut().poll_shutdown(cx))?;
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            let max = match pace.as_deref_mut() {
                Some(p) => {
                    ready!(p.poll_ready(cx));
                    PACED_CHUNK
                }
                None => SCRATCH,
            };
            let step = SCRATCH_BUF.with(|s| -> Poll<io::Result<()>> {
                let mut scratch = s.borrow_mut();
                let mut rb = ReadBuf::new(&mut scratch[..max]);
                ready!(src.as_mut().poll_read(cx, &mut rb))?;
                let got = rb.filled().len();
                if let Some(p) = pace.as_deref_mut() {
                    p.charge(got);
                }
                if got == 0 {
                    self.eof = true;
                    return Poll::Ready(Ok(()));
                }
                // Written at once where the writer takes it; the rest kept.
                let mut off = 0;
                while off < got {
                    match dst.as_mut().poll_write(cx, &scratch[off..got]) {
                        Poll::Ready(Ok(0)) => {
                            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()))
                        }
                        Poll::Ready(Ok(n)) => off += n,
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Pending => break,
                    }
                }
                self.bytes += off as u64;
                if off < got {
                    self.pending.extend_from_slice(&scratch[off..got]);
                }
                Poll::Ready(Ok(()))
            });
            ready!(step)?;
        }
    }
}

// ---------------------------------------------------------------------------
// A byte stream and a tunnel stream, without copies

/// A tunnel stream that reads and writes [`Bytes`] without copying them
/// (`wsmux::Stream`, and the gateway's stream through an agent).
pub trait MuxIo: AsyncWrite + Unpin {
    /// Appends up to `max` received bytes to `out`, as they came; `0` is
    /// the end of the stream.
    fn poll_read_bytes(
        &mut self,
        cx: &mut Context<'_>,
        max: usize,
        out: &mut VecDeque<Bytes>,
    ) -> Poll<io::Result<usize>>;
    /// Takes bytes from the front of `data` (sent as slices of it).
    fn poll_write_bytes(
        &mut self,
        cx: &mut Context<'_>,
        data: &mut Bytes,
    ) -> Poll<io::Result<usize>>;
}

impl MuxIo for wsmux::Stream {
    fn poll_read_bytes(
        &mut self,
        cx: &mut Context<'_>,
        max: usize,
        out: &mut VecDeque<Bytes>,
    ) -> Poll<io::Result<usize>> {
        wsmux::Stream::poll_read_bytes(self, cx, max, out)
    }

    fn poll_write_bytes(
        &mut self,
        cx: &mut Context<'_>,
        data: &mut Bytes,
    ) -> Poll<io::Result<usize>> {
        wsmux::Stream::poll_write_bytes(self, cx, data)
    }
}

/// Most bytes read from the byte stream at once, and taken from the tunnel
/// stream at once (what one direction holds while its writer lags).
const MUX_CHUNK: usize = 64 * 1024;
/// The thread's read arena: reads land in it and are split off as
/// [`Bytes`] that the tunnel stream's frames carry to the socket uncopied;
/// a new arena is taken when less than [`MUX_CHUNK`] is left.
const ARENA: usize = 256 * 1024;

thread_local! {
    /// Used within one `poll` only; holds no bytes between polls.
    static READ_ARENA: RefCell<BytesMut> = RefCell::new(BytesMut::new());
}

/// One read of at most [`MUX_CHUNK`] bytes into the thread's arena (an
/// idle direction holds no buffer); empty at the end of the stream.
fn poll_read_arena<R: AsyncRead + ?Sized>(
    cx: &mut Context<'_>,
    src: Pin<&mut R>,
) -> Poll<io::Result<Bytes>> {
    READ_ARENA.with(|a| {
        let mut a = a.borrow_mut();
        if a.capacity() - a.len() < MUX_CHUNK {
            *a = BytesMut::with_capacity(ARENA);
        }
        ready!(tokio_util::io::poll_read_buf(
            src,
            cx,
            &mut (&mut *a).limit(MUX_CHUNK)
        ))?;
        Poll::Ready(Ok(a.split().freeze()))
    })
}

/// Which side of [`splice_mux`] failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failed {
    /// The byte stream.
    Io,
    /// The tunnel stream.
    Mux,
}

/// The byte stream into the tunnel stream: reads go out as frames that
/// carry them, uncopied.
#[derive(Default)]
struct IntoMux {
    /// Read but not yet taken by the tunnel stream (only while it lags).
    pending: Bytes,
    eof: bool,
    done: bool,
    bytes: u64,
}

impl IntoMux {
    fn poll_copy<R, M>(
        &mut self,
        cx: &mut Context<'_>,
        mut src: Pin<&mut R>,
        dst: &mut M,
    ) -> Poll<Result<(), (Failed, io::Error)>>
    where
        R: AsyncRead + ?Sized,
        M: MuxIo + ?Sized,
    {
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            while !self.pending.is_empty() {
                let n = ready!(dst.poll_write_bytes(cx, &mut self.pending))
                    .map_err(|e| (Failed::Mux, e))?;
                if n == 0 {
                    return Poll::Ready(Err((Failed::Mux, io::ErrorKind::WriteZero.into())));
                }
                self.bytes += n as u64;
            }
            if self.eof {
                ready!(Pin::new(&mut *dst).poll_shutdown(cx)).map_err(|e| (Failed::Mux, e))?;
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            let b = ready!(poll_read_arena(cx, src.as_mut())).map_err(|e| (Failed::Io, e))?;
            if b.is_empty() {
                self.eof = true;
            } else {
                self.pending = b;
            }
        }
    }
}

/// The tunnel stream into the byte stream: received payloads are written
/// as they came (a `writev` of several).
#[derive(Default)]
struct FromMux {
    /// Taken from the tunnel stream, not yet written.
    pending: VecDeque<Bytes>,
    eof: bool,
    done: bool,
    /// Written since the writer's last flush: a writer that buffers is
    /// flushed before this direction waits for more input.
    unflushed: bool,
    bytes: u64,
}

impl FromMux {
    fn poll_copy<M, W>(
        &mut self,
        cx: &mut Context<'_>,
        src: &mut M,
        mut dst: Pin<&mut W>,
    ) -> Poll<Result<(), (Failed, io::Error)>>
    where
        M: MuxIo + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        let wr = |e| (Failed::Io, e);
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            while !self.pending.is_empty() {
                let n = if self.pending.len() == 1 {
                    ready!(dst.as_mut().poll_write(cx, &self.pending[0])).map_err(wr)?
                } else {
                    let mut iov = [IoSlice::new(&[]); 16];
                    let mut k = 0;
                    for (slot, b) in iov.iter_mut().zip(self.pending.iter()) {
                        *slot = IoSlice::new(b);
                        k += 1;
                    }
                    ready!(dst.as_mut().poll_write_vectored(cx, &iov[..k])).map_err(wr)?
                };
                if n == 0 {
                    return Poll::Ready(Err((Failed::Io, io::ErrorKind::WriteZero.into())));
                }
                self.bytes += n as u64;
                self.unflushed = true;
                let mut n = n;
                while n > 0 {
                    let front = self.pending.front_mut().expect("written from it");
                    if front.len() <= n {
                        n -= front.len();
                        self.pending.pop_front();
                    } else {
                        front.advance(n);
                        n = 0;
                    }
                }
            }
            if self.eof {
                ready!(dst.as_mut().poll_flush(cx)).map_err(wr)?;
                ready!(dst.as_mut().poll_shutdown(cx)).map_err(wr)?;
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            match src.poll_read_bytes(cx, MUX_CHUNK, &mut self.pending) {
                Poll::Ready(Ok(0)) => self.eof = true,
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err((Failed::Mux, e))),
                Poll::Pending => {
                    if self.unflushed {
                        ready!(dst.as_mut().poll_flush(cx)).map_err(wr)?;
                        self.unflushed = false;
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

/// [`splice`] of a byte stream `io` and a tunnel stream `mux`, without a
/// copy in user space: what `io` gives is read into the thread's arena and
/// framed from there, what `mux` received is written from the frames it
/// came in. `a_to_b` counts `io` to `mux`. On failure, says which side's
/// I/O failed, so the caller can abort the other one.
pub async fn splice_mux<A, M>(
    io: &mut A,
    mux: &mut M,
) -> Result<Copied, (Failed, io::Error, Copied)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    M: MuxIo + ?Sized,
{
    let (mut up, mut down) = (IntoMux::default(), FromMux::default());
    let r = std::future::poll_fn(|cx| {
        let x = up.poll_copy(cx, Pin::new(&mut *io), &mut *mux);
        if let Poll::Ready(Err(e)) = x {
            return Poll::Ready(Err(e));
        }
        let y = down.poll_copy(cx, &mut *mux, Pin::new(&mut *io));
        if let Poll::Ready(Err(e)) = y {
            return Poll::Ready(Err(e));
        }
        if x.is_ready() && y.is_ready() {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    })
    .await;
    let copied = Copied {
        a_to_b: up.bytes,
        b_to_a: down.bytes,
    };
    match r {
        Ok(()) => Ok(copied),
        Err((side, e)) => Err((side, e, copied)),
    }
}

/// Copies `a` into `b` and `b` into `a` until both directions have ended
/// (see the module docs); the bytes each way, or the first error.
pub fn splice<'a, A, B>(a: &'a mut A, b: &'a mut B) -> Splice<'a, A, B>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    Splice {
        a,
        b,
        ab: Direction::default(),
        ba: Direction::default(),
        pace: None,
    }
}

/// The future of [`splice`].
pub struct Splice<'a, A: ?Sized, B: ?Sized> {
    a: &'a mut A,
    b: &'a mut B,
    ab: Direction,
    ba: Direction,
    /// `a` to `b`, `b` to `a`; boxed, so an unpaced splice holds a pointer.
    pace: Option<Box<[Throttle; 2]>>,
}

impl<A: ?Sized, B: ?Sized> Splice<'_, A, B> {
    /// Paces both directions by `shared` (a subject's
    /// `per_identity_bandwidth`), `a` being the client's side: `a` to `b`
    /// pays into the subject's upstream bucket, `b` to `a` into the other.
    /// `None` leaves the splice unpaced.
    pub fn paced(mut self, shared: Option<&Arc<SharedBandwidth>>) -> Self {
        self.pace =
            shared.map(|s| Box::new([Throttle::shared(s, true), Throttle::shared(s, false)]));
        self
    }
}

impl<A, B> Future for Splice<'_, A, B>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    type Output = Result<Copied, (io::Error, Copied)>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let copied = |t: &Self| Copied {
            a_to_b: t.ab.bytes,
            b_to_a: t.ba.bytes,
        };
        let (pab, pba) = match this.pace.as_deref_mut() {
            Some([ab, ba]) => (Some(ab), Some(ba)),
            None => (None, None),
        };
        let ab = this
            .ab
            .poll_copy(cx, Pin::new(&mut *this.a), Pin::new(&mut *this.b), pab);
        if let Poll::Ready(Err(e)) = ab {
            return Poll::Ready(Err((e, copied(this))));
        }
        let ba = this
            .ba
            .poll_copy(cx, Pin::new(&mut *this.b), Pin::new(&mut *this.a), pba);
        if let Poll::Ready(Err(e)) = ba {
            return Poll::Ready(Err((e, copied(this))));
        }
        if this.ab.done && this.ba.done {
            Poll::Ready(Ok(copied(this)))
        } else {
            Poll::Pending
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn both_ways_with_half_close_and_a_slow_writer() {
        // a <-> (ax | bx) <-> b, with small pipes so writers lag.
        let (mut a, mut ax) = duplex(1024);
        let (mut bx, mut b) = duplex(1024);
        let relay = tokio::spawn(async move { splice(&mut ax, &mut bx).await });
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let sent = big.clone();
        let writer = tokio::spawn(async move {
            a.write_all(&sent).await.unwrap();
            a.shutdown().await.unwrap(); // half-close: the reply still comes
            let mut back = vec![];
            a.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = vec![];
        b.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, big);
        b.write_all(b"reply after the FIN").await.unwrap();
        b.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"reply after the FIN");
        let copied = relay.await.unwrap().unwrap();
        assert_eq!(
            copied,
            Copied {
                a_to_b: 300_000,
                b_to_a: 19
            }
        );
    }

    #[tokio::test]
    async fn splice_mux_moves_both_ways_with_half_close_and_a_slow_writer() {
        let (ta, tb) = wsmux::transport::memory_pair(4);
        let client = wsmux::Session::client(ta, wsmux::Config::default());
        let server = wsmux::Session::server(tb, wsmux::Config::default());
        let mut near = client.open().await.unwrap();
        let mut far = server.accept().await.unwrap();
        // A small pipe on the byte-stream side, so its writer lags.
        let (mut a, mut ax) = duplex(1024);
        let relay = tokio::spawn(async move {
            splice_mux(&mut ax, &mut near)
                .await
                .map_err(|(side, e, _)| (side, e.to_string()))
        });
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let sent = big.clone();
        let writer = tokio::spawn(async move {
            a.write_all(&sent).await.unwrap();
            a.shutdown().await.unwrap();
            let mut back = vec![];
            a.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = vec![];
        far.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, big);
        let reply: Vec<u8> = (0..200_000u32).map(|i| (i % 13) as u8).collect();
        far.write_all(&reply).await.unwrap();
        far.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), reply);
        let copied = relay.await.unwrap().unwrap();
        assert_eq!(
            copied,
            Copied {
                a_to_b: 300_000,
                b_to_a: 200_000
            }
        );
        drop((client, server));
    }

    /// Sends `n` bytes into `io` and reads `m` back, concurrently, then
    /// half-closes; when the last byte came back.
    async fn pump(mut io: tokio::io::DuplexStream, n: usize, m: usize) -> tokio::time::Instant {
        let (mut rd, mut wr) = tokio::io::split(&mut io);
        let send = async {
            wr.write_all(&vec![1u8; n]).await.unwrap();
            wr.shutdown().await.unwrap();
        };
        let recv = async {
            let mut got = vec![0u8; m];
            rd.read_exact(&mut got).await.unwrap();
            tokio::time::Instant::now()
        };
        tokio::join!(send, recv).1
    }

    /// An echo of everything read, with half-close.
    fn echo(mut io: tokio::io::DuplexStream) {
        tokio::spawn(async move {
            let (mut rd, mut wr) = tokio::io::split(&mut io);
            let _ = tokio::io::copy(&mut rd, &mut wr).await;
            let _ = wr.shutdown().await;
        });
    }

    #[tokio::test(start_paused = true)]
    async fn a_paced_splice_shares_the_subjects_cap_each_way() {
        use crate::limits::SharedBandwidth;
        let rate = PACED_CHUNK as u64;
        let shared = Arc::new(SharedBandwidth::new(rate));
        // Two connections of one subject, echoed: 4 chunks each way apiece,
        // 8 in all at one chunk a second, one of them the burst; each chunk
        // is paid before the next read, so the last two go at about 5 s
        // (alone, one connection's 4 would take 3 s). The two directions
        // run at the same time, each on its own bucket.
        let t0 = tokio::time::Instant::now();
        let mut ends = vec![];
        for _ in 0..2 {
            let (client, mut ax) = duplex(1 << 20);
            let (mut bx, far) = duplex(1 << 20);
            echo(far);
            let shared = shared.clone();
            tokio::spawn(async move {
                splice(&mut ax, &mut bx).paced(Some(&shared)).await.unwrap();
            });
            ends.push(tokio::spawn(pump(client, 4 * PACED_CHUNK, 4 * PACED_CHUNK)));
        }
        let mut last = t0;
        for e in ends {
            last = last.max(e.await.unwrap());
        }
        let took = last - t0;
        assert!(
            took >= std::time::Duration::from_secs(5) && took < std::time::Duration::from_secs(9),
            "{took:?}"
        );
        // Unpaced, the same takes no time at all.
        let (client, mut ax) = duplex(1 << 20);
        let (mut bx, far) = duplex(1 << 20);
        echo(far);
        tokio::spawn(async move { splice(&mut ax, &mut bx).paced(None).await });
        let t1 = tokio::time::Instant::now();
        assert_eq!(pump(client, 4 * PACED_CHUNK, 4 * PACED_CHUNK).await, t1);
    }

    #[tokio::test]
    async fn an_error_on_one_side_ends_both() {
        let (a, mut ax) = duplex(64);
        let (mut bx, b) = duplex(64);
        drop(b); // writes towards b fail
        let mut a = a;
        a.write_all(b"x").await.unwrap();
        let r = splice(&mut ax, &mut bx).await;
        assert!(r.is_err());
    }

    #[tokio::test]
    async fn a_lagging_writer_is_buffered_then_the_buffer_is_freed() {
        let (mut src_w, mut src) = duplex(1 << 20);
        let (mut dst, mut dst_r) = duplex(100);
        src_w.write_all(&[7u8; 1000]).await.unwrap();
        let mut d = Direction::default();
        // The writer takes 100 of 1,000 bytes: the rest waits in a buffer.
        let p = std::future::poll_fn(|cx| {
            Poll::Ready(d.poll_copy(cx, Pin::new(&mut src), Pin::new(&mut dst), None))
        })
        .await;
        assert!(p.is_pending());
        assert_eq!((d.pending.len(), d.written, d.bytes), (900, 0, 100));
        // The reader drains it; once all is written no buffer is held.
        let mut got = vec![0u8; 1000];
        let drain = tokio::spawn(async move {
            dst_r.read_exact(&mut got).await.unwrap();
            got
        });
        std::future::poll_fn(|cx| {
            match d.poll_copy(cx, Pin::new(&mut src), Pin::new(&mut dst), None) {
                Poll::Pending if d.pending.is_empty() => Poll::Ready(()),
                Poll::Pending => Poll::Pending,
                Poll::Ready(r) => panic!("ended: {r:?}"),
            }
        })
        .await;
        assert_eq!(drain.await.unwrap(), vec![7u8; 1000]);
        assert_eq!((d.pending.capacity(), d.bytes), (0, 1000));
    }
}
