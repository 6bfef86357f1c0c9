//! Moving bytes between a tunnel stream and its destination, for the agent
//! and for `wsgate connect`:
//!
//! * [`splice`]: a byte stream both ways (`tcp://`, `http://`), through one
//!   bounded buffer per direction; an end of input in one direction becomes a
//!   half-close of the other side's writer (FIN ↔ `shutdown(SHUT_WR)`), and an
//!   error says which side failed, so the caller aborts the other one;
//! * [`datagrams`]: `udp://` streams, each datagram framed with a u16
//!   length (`docs/tunnel.md` §4), ended after an idle time.

use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::mpsc;

use crate::tunnel::proto;

/// Bytes buffered per direction of a spliced stream.
const SPLICE_BUF: usize = 64 * 1024;
/// A UDP receive buffer: the largest datagram.
const DATAGRAM_BUF: usize = proto::MAX_DATAGRAM;
/// How long a side that has sent its FIN waits for the peer's before it
/// drops the stream (which resets it).
pub const FIN_WAIT: Duration = Duration::from_secs(5);
/// A `udp://` stream without a datagram either way for this long ends.
pub const UDP_IDLE: Duration = Duration::from_secs(60);

/// One of the two sides of a splice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The first argument of [`splice`].
    A,
    /// The second.
    B,
}

/// Bytes moved by a splice, per direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Moved {
    pub a_to_b: u64,
    pub b_to_a: u64,
}

/// A splice that failed: which side's I/O failed, how, and what had moved.
#[derive(Debug)]
pub struct SpliceError {
    pub side: Side,
    pub error: io::Error,
    pub moved: Moved,
}

struct Copy {
    buf: Box<[u8]>,
    pos: usize,
    end: usize,
    eof: bool,
    done: bool,
    moved: u64,
    /// Written since the writer's last flush: a writer that buffers
    /// (stdout) is flushed before this direction waits for more input.
    unflushed: bool,
}

/// Which end of one direction failed.
enum Failed {
    Reader(io::Error),
    Writer(io::Error),
}

impl Copy {
    fn new() -> Copy {
        Copy {
            buf: vec![0; SPLICE_BUF].into_boxed_slice(),
            pos: 0,
            end: 0,
            eof: false,
            done: false,
            moved: 0,
            unflushed: false,
        }
    }

    fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut r: Pin<&mut R>,
        mut w: Pin<&mut W>,
    ) -> Poll<Result<(), Failed>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        if self.done {
            return Poll::Ready(Ok(()));
        }
        loop {
            if self.pos == self.end && !self.eof {
                let mut rb = ReadBuf::new(&mut self.buf);
                match r.as_mut().poll_read(cx, &mut rb) {
                    Poll::Ready(read) => read.map_err(Failed::Reader)?,
                    Poll::Pending => {
                        // Nothing more to read for now: what was written
                        // must not sit in the writer's buffer meanwhile
                        // (`wsgate connect --stdio` writes to a line-buffered
                        // stdout; an ssh key exchange waits on packets that
                        // end without a newline).
                        if self.unflushed {
                            ready!(w.as_mut().poll_flush(cx)).map_err(Failed::Writer)?;
                            self.unflushed = false;
                        }
                        return Poll::Pending;
                    }
                }
                let n = rb.filled().len();
                if n == 0 {
                    self.eof = true;
                } else {
                    (self.pos, self.end) = (0, n);
                }
            }
            while self.pos < self.end {
                let n = ready!(w.as_mut().poll_write(cx, &self.buf[self.pos..self.end]))
                    .map_err(Failed::Writer)?;
                if n == 0 {
                    return Poll::Ready(Err(Failed::Writer(io::ErrorKind::WriteZero.into())));
                }
                self.pos += n;
                self.moved += n as u64;
                self.unflushed = true;
            }
            if self.eof {
                ready!(w.as_mut().poll_flush(cx)).map_err(Failed::Writer)?;
                ready!(w.as_mut().poll_shutdown(cx)).map_err(Failed::Writer)?;
                self.done = true;
                return Poll::Ready(Ok(()));
            }
        }
    }
}

/// Copies `a` to `b` and `b` to `a` until both directions have ended: each
/// direction's end of input shuts down (half-closes) the other side's
/// writer. The first error ends the splice and names the side it came from.
pub async fn splice<A, B>(a: &mut A, b: &mut B) -> Result<Moved, SpliceError>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let (mut ab, mut ba) = (Copy::new(), Copy::new());
    let result = poll_fn(|cx| {
        let x = ab.poll(cx, Pin::new(&mut *a), Pin::new(&mut *b));
        if let Poll::Ready(Err(f)) = x {
            return Poll::Ready(Err(match f {
                Failed::Reader(e) => (Side::A, e),
                Failed::Writer(e) => (Side::B, e),
            }));
        }
        let y = ba.poll(cx, Pin::new(&mut *b), Pin::new(&mut *a));
        if let Poll::Ready(Err(f)) = y {
            return Poll::Ready(Err(match f {
                Failed::Reader(e) => (Side::B, e),
                Failed::Writer(e) => (Side::A, e),
            }));
        }
        if x.is_ready() && y.is_ready() {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    })
    .await;
    let moved = Moved {
        a_to_b: ab.moved,
        b_to_a: ba.moved,
    };
    match result {
        Ok(()) => Ok(moved),
        Err((side, error)) => Err(SpliceError { side, error, moved }),
    }
}

/// Aborts a TCP connection: the peer sees a reset, not an orderly end (how
/// a stream's RST reaches a TCP peer).
pub fn abort_tcp(tcp: TcpStream) {
    let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
    drop(tcp);
}

/// Ends a stream cleanly after the peer is done or we are: sends FIN, then
/// waits (at most [`FIN_WAIT`]) for the peer's FIN, discarding what comes,
/// so the stream closes in both directions instead of being reset.
pub async fn finish<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S) {
    let _ = stream.shutdown().await;
    let _ = tokio::time::timeout(FIN_WAIT, async {
        let mut sink = [0u8; 4096];
        while let Ok(n) = stream.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

/// The UDP side of a `udp://` stream.
pub enum Udp<'a> {
    /// A socket connected to the destination (the agent's side).
    Connected(&'a UdpSocket),
    /// One client's flow on a shared listening socket (`wsgate connect
    /// --listen` with a `udp://` target): its datagrams arrive through `rx`,
    /// answers go to `peer`.
    Flow {
        socket: &'a UdpSocket,
        peer: SocketAddr,
        rx: &'a mut mpsc::Receiver<Bytes>,
    },
}

impl Udp<'_> {
    /// The next datagram into `buf`; `None` when the flow is gone.
    async fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        match self {
            Udp::Connected(s) => loop {
                match s.recv(buf).await {
                    Ok(n) => return Ok(Some(n)),
                    // An ICMP port unreachable for an earlier datagram: UDP
                    // is lossy, the flow goes on.
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
                    Err(e) => return Err(e),
                }
            },
            Udp::Flow { rx, .. } => Ok(rx.recv().await.map(|d| {
                let n = d.len().min(buf.len());
                buf[..n].copy_from_slice(&d[..n]);
                n
            })),
        }
    }

    async fn send(&self, d: &[u8]) -> io::Result<()> {
        let r = match self {
            Udp::Connected(s) => s.send(d).await.map(drop),
            Udp::Flow { socket, peer, .. } => socket.send_to(d, *peer).await.map(drop),
        };
        match r {
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Ok(()),
            r => r,
        }
    }
}

/// Datagrams moved by [`datagrams`], and how it ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DatagramsMoved {
    /// Datagrams from the stream sent on UDP.
    pub to_udp: u64,
    /// Datagrams from UDP written to the stream.
    pub to_stream: u64,
    /// Ended by the idle time (otherwise by the stream's FIN or the flow's end).
    pub idle: bool,
}

/// Which side of a datagram relay failed.
#[derive(Debug)]
pub enum DatagramError {
    Stream(io::Error),
    Udp(io::Error),
}

/// Relays framed datagrams between `stream` and `udp` until the stream's
/// FIN, the flow's end, or `idle` without a datagram either way. `pending`:
/// stream bytes already read (after the open request or reply). The caller
/// ends the stream afterwards ([`finish`]).
pub async fn datagrams<S>(
    stream: &mut S,
    mut udp: Udp<'_>,
    mut pending: BytesMut,
    idle: Duration,
) -> Result<DatagramsMoved, DatagramError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut moved = DatagramsMoved::default();
    let mut dbuf = vec![0u8; DATAGRAM_BUF];
    let mut out = BytesMut::new();
    let timer = tokio::time::sleep(idle);
    tokio::pin!(timer);
    loop {
        while let Some(d) = proto::decode_datagram(&mut pending) {
            udp.send(&d).await.map_err(DatagramError::Udp)?;
            moved.to_udp += 1;
            timer.as_mut().reset(tokio::time::Instant::now() + idle);
        }
        // Whole datagrams are taken off above, so what stays is at most one
        // partial datagram: the buffer stays under 64 KiB plus one read.
        pending.reserve(16 * 1024);
        tokio::select! {
            r = stream.read_buf(&mut pending) => {
                if r.map_err(DatagramError::Stream)? == 0 {
                    return Ok(moved);
                }
            }
            r = udp.recv(&mut dbuf) => {
                let Some(n) = r.map_err(DatagramError::Udp)? else {
                    return Ok(moved);
                };
                out.clear();
                proto::encode_datagram(&dbuf[..n], &mut out).map_err(|e| {
                    DatagramError::Udp(io::Error::new(io::ErrorKind::InvalidData, e))
                })?;
                stream.write_all(&out).await.map_err(DatagramError::Stream)?;
                moved.to_stream += 1;
                timer.as_mut().reset(tokio::time::Instant::now() + idle);
            }
            () = &mut timer => {
                moved.idle = true;
                return Ok(moved);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn splice_flushes_a_buffering_writer_while_the_reader_waits() {
        // `wsgate connect --stdio` splices into stdout, which buffers: the
        // bytes must come out while the stream is still open (an ssh
        // ProxyCommand hung at its key exchange without this).
        let (mut a, mut a_peer) = tokio::io::duplex(1024);
        let (b, mut b_peer) = tokio::io::duplex(1024);
        let mut b = tokio::io::BufWriter::new(b);
        let task = tokio::spawn(async move { splice(&mut a, &mut b).await.map(|_| ()) });
        a_peer.write_all(b"no newline, no EOF").await.unwrap();
        let mut got = [0u8; 18];
        tokio::time::timeout(Duration::from_secs(5), b_peer.read_exact(&mut got))
            .await
            .expect("the bytes reach the writer's peer before any EOF")
            .unwrap();
        assert_eq!(&got, b"no newline, no EOF");
        drop(a_peer);
        drop(b_peer);
        let _ = task.await;
    }

    #[tokio::test]
    async fn splice_half_closes_each_way_and_counts() {
        let (mut a, mut a_peer) = tokio::io::duplex(1024);
        let (mut b, mut b_peer) = tokio::io::duplex(1024);
        let task = tokio::spawn(async move { splice(&mut a, &mut b).await.map_err(|e| e.error) });
        a_peer.write_all(b"hello").await.unwrap();
        a_peer.shutdown().await.unwrap();
        let mut got = Vec::new();
        // b's peer sees the bytes, then EOF: a's end of input half-closed b.
        b_peer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello");
        // The other direction still works after the half-close.
        b_peer.write_all(b"back!!").await.unwrap();
        b_peer.shutdown().await.unwrap();
        let mut got = Vec::new();
        a_peer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"back!!");
        let moved = task.await.unwrap().unwrap();
        assert_eq!(
            moved,
            Moved {
                a_to_b: 5,
                b_to_a: 6
            }
        );
    }

    #[tokio::test]
    async fn datagrams_keep_boundaries_both_ways() {
        let dest = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        sock.connect(dest.local_addr().unwrap()).await.unwrap();
        let (mut s, mut peer) = tokio::io::duplex(1 << 17);
        let mut first = BytesMut::new();
        proto::encode_datagram(b"one", &mut first).unwrap();
        let relay = tokio::spawn(async move {
            datagrams(&mut s, Udp::Connected(&sock), first, UDP_IDLE)
                .await
                .map_err(|_| ())
        });
        let mut buf = [0u8; 100];
        let (n, from) = dest.recv_from(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"one");
        let mut wire = BytesMut::new();
        proto::encode_datagram(b"", &mut wire).unwrap();
        proto::encode_datagram(b"three", &mut wire).unwrap();
        peer.write_all(&wire).await.unwrap();
        for want in [&b""[..], b"three"] {
            let (n, _) = dest.recv_from(&mut buf).await.unwrap();
            assert_eq!(&buf[..n], want);
        }
        dest.send_to(b"answer", from).await.unwrap();
        let mut got = [0u8; 8];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"\x00\x06answer");
        peer.shutdown().await.unwrap();
        let moved = relay.await.unwrap().unwrap();
        assert_eq!((moved.to_udp, moved.to_stream, moved.idle), (3, 1, false));
    }

    #[tokio::test]
    async fn an_idle_datagram_stream_ends() {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        sock.connect("127.0.0.1:9").await.unwrap();
        let (mut s, _peer) = tokio::io::duplex(1024);
        let idle = Duration::from_millis(50);
        let moved = datagrams(&mut s, Udp::Connected(&sock), BytesMut::new(), idle)
            .await
            .map_err(|_| ())
            .unwrap();
        assert!(moved.idle);
    }
}
