//! The relay: moves one upgraded WebSocket's data to and from its peer.
//!
//! One task per connection runs two loops side by side:
//! * **up** (client → peer) reads client bytes, decodes frames and writes
//!   payloads to the peer as they arrive (stream peers) or whole messages
//!   (datagram peers, `echo:`);
//! * **down** (peer → client) reads the peer, cuts its bytes into messages
//!   with the route's framing function and writes frames to the client. It
//!   alone writes to the client, so up hands it pongs through [`Shared`].
//!
//! Each loop reads only after its previous write finished, so a slow reader
//! slows its own direction and nothing else, and memory stays bounded: one read
//! chunk per direction, plus (for protocol framers and message peers) at most
//! one message of `max_message_size`. Plain-TCP clients and all stream peers
//! are read on readiness into buffers taken only when bytes are there, so an
//! idle connection holds no buffers at all. Big payloads are not copied on
//! their way: unmasked in the read buffer, they are written from there, with
//! their frame header, by one `writev` ([`WriteQueue`]).
//!
//! All state lives outside the loops' futures, and every await in `down` is
//! cancel-safe, so `down` can be dropped at any point (shutdown, the client
//! closing) and the frames it had half-written are finished before the Close.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::{tcp, unix, UdpSocket, UnixDatagram};
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use wsframe::deflate::{Deflater, InflatingDecoder};
use wsframe::{close_code, write_header, DecoderConfig, Frame, OpCode, ProtocolError, Role};
use wsgate_framing::{AnyFramer, Framer, Kind};

use crate::bridge::peer::PeerConn;
use crate::error::{self, Error};
use crate::io::{
    drain, grow, make_room, ready_read, release, with_halves, ClientIo, ConnReader, ConnWriter,
    WriteQueue, CHUNK, FIRST_CHUNK, IOV, NO_COPY,
};
use crate::limits::{Pace, SharedBandwidth};
use crate::tunnel::proto::{decode_datagram, encode_datagram};
use crate::tunnel::registry::AgentStream;

/// Encoded pongs owed before older ones are dropped.
const MAX_PONGS: usize = 2048;
/// Client payload bytes gathered before they are written to a stream peer.
const BATCH: usize = 64 * 1024;
/// permessage-deflate: a direction that moved nothing this long lets go of
/// its zlib state ([`wsframe::deflate`]; docs/deflate.md).
const DEFLATE_IDLE: Duration = Duration::from_secs(2);

/// Zlib states let go of by idle connections, ever. The freed memory goes
/// back to mimalloc's per-thread heap, which returns it to the system only
/// when that thread collects: each worker's 1 s tick does so when this
/// moved (`server`), so an idle connection's RSS really falls.
static HIBERNATED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many zlib states idle connections have let go of (see [`HIBERNATED`]).
pub fn hibernations() -> u64 {
    HIBERNATED.load(std::sync::atomic::Ordering::Relaxed)
}

fn hibernated() {
    HIBERNATED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// Per-connection settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub max_message_size: u64,
    pub idle_timeout: Option<Duration>,
    pub ping_interval: Option<Duration>,
    pub pong_timeout: Duration,
    pub close_timeout: Duration,
    /// Datagram peers and `echo:`: text messages for valid UTF-8 datagrams.
    pub datagram_text: bool,
    /// The subject's bandwidth, shared with its other connections
    /// (`per_identity_bandwidth`): each loop waits out its debt before its
    /// next read.
    pub shared_bandwidth: Option<std::sync::Arc<SharedBandwidth>>,
    /// permessage-deflate, when the handshake agreed on it.
    pub deflate: Option<(wsframe::deflate::Agreed, wsframe::deflate::Config)>,
}

/// How a relay ended, for logs.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Payload bytes client → peer.
    pub bytes_up: u64,
    /// Payload bytes peer → client.
    pub bytes_down: u64,
    /// Close code we sent, if we sent one.
    pub close_sent: Option<u16>,
    /// Close code the client sent, if it sent one.
    pub close_received: Option<u16>,
    pub reason: String,
}

/// Control frames up asks down to send, and liveness bookkeeping.
#[derive(Default)]
struct Ctrl {
    /// Pongs owed to the client, encoded. Bounded: past `MAX_PONGS` bytes only
    /// the latest is kept (RFC 6455 §5.5.3 allows answering just the latest).
    pongs: BytesMut,
    ping: bool,
    awaiting_pong: Option<Instant>,
    last_activity: Option<Instant>,
}

/// State shared by the two loops of one connection (same task: never contended).
struct Shared {
    ctrl: Mutex<Ctrl>,
    wake_down: Notify,
    track_activity: bool,
}

impl Shared {
    fn with<R>(&self, f: impl FnOnce(&mut Ctrl) -> R) -> R {
        f(&mut self.ctrl.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn touch(&self) {
        if self.track_activity {
            self.with(|c| c.last_activity = Some(Instant::now()));
        }
    }
}

/// What the peer produced.
enum PeerData {
    /// More bytes of the stream are in the buffer.
    Stream,
    /// One datagram is in the buffer.
    Datagram,
    /// One message from `echo:`.
    Message(bool, Message),
    Eof,
}

enum PeerReader<'a> {
    Tcp(tcp::ReadHalf<'a>),
    Unix(unix::ReadHalf<'a>),
    Udp(&'a UdpSocket),
    UnixDgram(&'a UnixDatagram),
    Echo(&'a mut mpsc::Receiver<(bool, Message)>),
    /// A stream through an agent.
    Agent(ReadHalf<Box<AgentStream>>),
    /// A stream of framed datagrams through an agent, and the bytes read
    /// past the last whole datagram.
    AgentDatagrams(ReadHalf<Box<AgentStream>>, BytesMut),
}

impl PeerReader<'_> {
    /// Cancel-safe. (Readiness is awaited through `poll_*` functions: the
    /// futures of `readable()`, `recv()` and the like are several times
    /// bigger, and would be part of every connection's future.)
    async fn read(&mut self, buf: &mut BytesMut, hint: &mut usize) -> io::Result<PeerData> {
        let n = match self {
            PeerReader::Tcp(s) => ready_read!(s, buf, hint)?,
            PeerReader::Unix(s) => ready_read!(s, buf, hint)?,
            PeerReader::Udp(s) => {
                buf.clear();
                ready_read_dgram(s, buf).await?;
                return Ok(PeerData::Datagram);
            }
            PeerReader::UnixDgram(s) => {
                buf.clear();
                loop {
                    std::future::poll_fn(|cx| s.poll_recv_ready(cx)).await?;
                    buf.reserve(CHUNK);
                    match s.try_recv_buf(buf) {
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                        r => break r.map(|_| ())?,
                    };
                }
                return Ok(PeerData::Datagram);
            }
            PeerReader::Echo(rx) => {
                return Ok(match std::future::poll_fn(|cx| rx.poll_recv(cx)).await {
                    Some((text, b)) => PeerData::Message(text, b),
                    None => PeerData::Eof,
                })
            }
            PeerReader::Agent(s) => {
                make_room(buf, *hint);
                let room = buf.capacity() - buf.len();
                let n = s.read_buf(buf).await?;
                grow(hint, n, room);
                n
            }
            PeerReader::AgentDatagrams(s, staging) => loop {
                if let Some(d) = decode_datagram(staging) {
                    buf.clear();
                    buf.extend_from_slice(&d);
                    return Ok(PeerData::Datagram);
                }
                staging.reserve(4096);
                if s.read_buf(staging).await? == 0 {
                    return Ok(PeerData::Eof);
                }
            },
        };
        Ok(if n == 0 {
            PeerData::Eof
        } else {
            PeerData::Stream
        })
    }
}

async fn ready_read_dgram(s: &UdpSocket, buf: &mut BytesMut) -> io::Result<()> {
    loop {
        std::future::poll_fn(|cx| s.poll_recv_ready(cx)).await?;
        buf.reserve(CHUNK);
        match s.try_recv_buf(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            r => return r.map(|_| ()),
        }
    }
}

enum PeerWriter<'a> {
    Tcp(tcp::WriteHalf<'a>),
    Unix(unix::WriteHalf<'a>),
    Udp(&'a UdpSocket),
    UnixDgram(&'a UnixDatagram),
    Echo(Option<mpsc::Sender<(bool, Message)>>),
    /// A stream through an agent; `true`: framed datagrams.
    Agent(WriteHalf<Box<AgentStream>>, bool),
}

impl PeerWriter<'_> {
    fn is_stream(&self) -> bool {
        matches!(
            self,
            PeerWriter::Tcp(_) | PeerWriter::Unix(_) | PeerWriter::Agent(_, false)
        )
    }

    /// One write of the front of `q` to a stream peer (a `writev` when it
    /// has segments); the slices live only during the poll.
    fn poll_write_queue(
        &mut self,
        cx: &mut Context<'_>,
        q: &WriteQueue,
    ) -> Poll<io::Result<usize>> {
        if let Some(tail) = q.only_tail() {
            return match self {
                PeerWriter::Tcp(s) => Pin::new(s).poll_write(cx, tail),
                PeerWriter::Unix(s) => Pin::new(s).poll_write(cx, tail),
                PeerWriter::Agent(s, false) => Pin::new(s).poll_write(cx, tail),
                _ => unreachable!("message peers get whole messages"),
            };
        }
        let mut iov = [IoSlice::new(&[]); IOV];
        let k = q.slices(&mut iov);
        match self {
            PeerWriter::Tcp(s) => Pin::new(s).poll_write_vectored(cx, &iov[..k]),
            PeerWriter::Unix(s) => Pin::new(s).poll_write_vectored(cx, &iov[..k]),
            PeerWriter::Agent(s, false) => Pin::new(s).poll_write_vectored(cx, &iov[..k]),
            _ => unreachable!("message peers get whole messages"),
        }
    }

    /// Writes and consumes all of `q` (stream peers); cancel-safe.
    async fn write_queue(&mut self, q: &mut WriteQueue) -> io::Result<()> {
        while !q.is_empty() {
            let n = std::future::poll_fn(|cx| self.poll_write_queue(cx, q)).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            q.advance(n);
        }
        Ok(())
    }

    /// (Through `poll_send` and `try_send`, for the reason given at
    /// [`PeerReader::read`].)
    async fn send_message(&mut self, text: bool, msg: Message) -> io::Result<()> {
        use tokio::sync::mpsc::error::TrySendError;
        if let PeerWriter::Echo(Some(tx)) = self {
            return match tx.try_send((text, msg)) {
                Ok(()) => Ok(()),
                // The loop's one slot is taken: wait for it (boxed, so that
                // only an echo that waits holds the sender's big future).
                Err(TrySendError::Full(m)) => Box::pin(tx.send(m))
                    .await
                    .map_err(|_| io::ErrorKind::BrokenPipe.into()),
                Err(TrySendError::Closed(_)) => Err(io::ErrorKind::BrokenPipe.into()),
            };
        }
        // A datagram is one buffer.
        let msg = msg.contiguous();
        match self {
            PeerWriter::Udp(s) => std::future::poll_fn(|cx| s.poll_send(cx, &msg))
                .await
                .map(|_| ()),
            PeerWriter::UnixDgram(s) => std::future::poll_fn(|cx| s.poll_send(cx, &msg))
                .await
                .map(|_| ()),
            PeerWriter::Echo(_) => Err(io::ErrorKind::BrokenPipe.into()),
            PeerWriter::Agent(s, true) => {
                let mut framed = BytesMut::with_capacity(2 + msg.len());
                // Too big for a datagram: the same answer as a UDP peer's.
                encode_datagram(&msg, &mut framed)
                    .map_err(|_| io::Error::from_raw_os_error(libc::EMSGSIZE))?;
                s.write_all(&framed).await
            }
            _ => unreachable!("stream peers get bytes"),
        }
    }

    /// Half-close: the peer sees EOF, and may still answer.
    async fn shutdown(&mut self) {
        match self {
            PeerWriter::Tcp(s) => {
                let _ = s.shutdown().await;
            }
            PeerWriter::Unix(s) => {
                let _ = s.shutdown().await;
            }
            PeerWriter::Echo(tx) => *tx = None,
            PeerWriter::Agent(s, _) => {
                let _ = s.shutdown().await;
            }
            PeerWriter::Udp(_) | PeerWriter::UnixDgram(_) => {}
        }
    }
}

// ---------------------------------------------------------------------------
// Up: client → peer.

enum UpEnd {
    /// The client sent Close (code, if any). Everything before it reached the
    /// peer, and the peer's write side is shut down.
    Close(Option<u16>),
    /// The client's TCP connection ended without a Close.
    ClientGone(String),
    Protocol(ProtocolError),
    PeerWrite(io::Error),
}

struct Up {
    decoder: InflatingDecoder,
    buf: BytesMut,
    hint: usize,
    /// Payloads on their way to a stream peer.
    batch: WriteQueue,
    /// A message for a message peer, while its pieces come in.
    message: Option<Gathering>,
    /// `max_message_size`: a gathered message's chunks never hold more.
    max_message: usize,
    bytes: u64,
    pace: Option<Pace>,
}

/// A whole message for a message peer (`echo:`, datagram peers).
#[derive(Debug)]
pub enum Message {
    /// It came in one piece, which is passed on as it is.
    One(Bytes),
    /// It came in several, copied into chunks ([`Gathering`]); its length.
    Chunks(Vec<Bytes>, usize),
}

impl Message {
    fn len(&self) -> usize {
        match self {
            Message::One(b) => b.len(),
            Message::Chunks(_, len) => *len,
        }
    }

    fn parts(&self) -> &[Bytes] {
        match self {
            Message::One(b) => std::slice::from_ref(b),
            Message::Chunks(c, _) => c,
        }
    }

    /// The message in one buffer (a copy when it is in chunks).
    fn contiguous(self) -> Bytes {
        match self {
            Message::One(b) => b,
            Message::Chunks(c, len) => {
                let mut all = BytesMut::with_capacity(len);
                for part in c {
                    all.extend_from_slice(&part);
                }
                all.freeze()
            }
        }
    }
}

/// A message for a message peer being gathered from the pieces the decoder
/// hands out (frames' payloads, a compressed message's inflated output):
/// copied into chunks of at most [`CHUNK`] bytes, each allocated at its
/// size, never past what `max_message_size` leaves, and filled before the
/// next one is made. A message of n bytes thus holds n bytes (rounded up to
/// a chunk, never more than the limit) where one buffer grown by doubling
/// held every step of its growth, which the allocator keeps mapped: an
/// inflation bomb on `echo:` cost twice the limit before its 1009.
#[derive(Debug)]
struct Gathering {
    text: bool,
    chunks: Vec<Bytes>,
    filling: BytesMut,
    len: usize,
}

impl Gathering {
    fn new(text: bool) -> Self {
        Gathering {
            text,
            chunks: Vec::new(),
            filling: BytesMut::new(),
            len: 0,
        }
    }

    /// Appends a piece; `limit` is `max_message_size` (the decoder has
    /// already refused a message past it; 0 or none: no limit).
    fn push(&mut self, mut piece: &[u8], limit: usize) {
        while !piece.is_empty() {
            if self.filling.len() == self.filling.capacity() {
                if !self.filling.is_empty() {
                    let full = std::mem::take(&mut self.filling).freeze();
                    self.chunks.push(full);
                }
                let left = if limit == 0 {
                    usize::MAX
                } else {
                    limit.saturating_sub(self.len)
                };
                // At least what the piece needs: the limit is the
                // decoder's to enforce, not a reason to lose bytes.
                let size = CHUNK.min(left).max(piece.len().min(CHUNK));
                self.filling = BytesMut::with_capacity(size);
            }
            let n = piece
                .len()
                .min(self.filling.capacity() - self.filling.len());
            self.filling.extend_from_slice(&piece[..n]);
            self.len += n;
            piece = &piece[n..];
        }
    }

    fn finish(mut self) -> (bool, Message) {
        let msg = if self.chunks.is_empty() {
            Message::One(self.filling.freeze())
        } else {
            if !self.filling.is_empty() {
                self.chunks.push(self.filling.freeze());
            }
            Message::Chunks(self.chunks, self.len)
        };
        (self.text, msg)
    }
}

async fn up_loop(
    cr: &mut ConnReader<'_>,
    pw: &mut PeerWriter<'_>,
    st: &mut Up,
    shared: &Shared,
) -> UpEnd {
    let stream = pw.is_stream();
    loop {
        loop {
            let frame = match st.decoder.next(&mut st.buf) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => return UpEnd::Protocol(e),
            };
            match frame {
                Frame::Data {
                    payload,
                    text,
                    first,
                    last,
                    ..
                } => {
                    st.bytes += payload.len() as u64;
                    if stream {
                        st.batch.append(payload);
                        if st.batch.len() >= BATCH {
                            if let Err(e) = pw.write_queue(&mut st.batch).await {
                                return UpEnd::PeerWrite(e);
                            }
                        }
                        continue;
                    }
                    let whole = if first && last {
                        Some((text, Message::One(payload.freeze())))
                    } else {
                        let g = st.message.get_or_insert_with(|| Gathering::new(text));
                        g.push(&payload, st.max_message);
                        drop(payload);
                        last.then(|| st.message.take().expect("started above").finish())
                    };
                    if let Some((text, m)) = whole {
                        if let Err(e) = pw.send_message(text, m).await {
                            return UpEnd::PeerWrite(e);
                        }
                    }
                }
                Frame::Control { opcode, payload } => match opcode {
                    OpCode::Ping => {
                        shared.with(|c| {
                            if c.pongs.len() > MAX_PONGS {
                                c.pongs.clear();
                            }
                            push_message(&mut c.pongs, OpCode::Pong, &payload);
                        });
                        shared.wake_down.notify_one();
                    }
                    OpCode::Pong => shared.with(|c| c.awaiting_pong = None),
                    _ => {
                        let code = wsframe::parse_close_payload(&payload).map(|(c, _)| c);
                        if !st.batch.is_empty() {
                            if let Err(e) = pw.write_queue(&mut st.batch).await {
                                return UpEnd::PeerWrite(e);
                            }
                        }
                        pw.shutdown().await;
                        return UpEnd::Close(code);
                    }
                },
            }
        }
        if !st.batch.is_empty() {
            if let Err(e) = pw.write_queue(&mut st.batch).await {
                return UpEnd::PeerWrite(e);
            }
        }
        // Written out above; an idle connection keeps no batch buffer.
        st.batch.shrink();
        if st.buf.is_empty() && matches!(cr, ConnReader::Tcp(_)) {
            // Idle connections hold no read buffer.
            release(&mut st.buf);
        }
        let read = if st.decoder.holds_state() {
            tokio::select! {
                r = cr.read(&mut st.buf, &mut st.hint) => r,
                () = tokio::time::sleep(DEFLATE_IDLE) => {
                    st.decoder.hibernate();
                    hibernated();
                    continue;
                }
            }
        } else {
            cr.read(&mut st.buf, &mut st.hint).await
        };
        match read {
            Ok(0) => {
                pw.shutdown().await;
                return UpEnd::ClientGone(
                    "client closed the connection without a close frame".into(),
                );
            }
            Ok(n) => {
                shared.touch();
                if let Some(d) = st
                    .pace
                    .as_mut()
                    .and_then(|p| p.delay_for(n, Instant::now()))
                {
                    tokio::time::sleep(d).await;
                }
            }
            Err(e) => {
                pw.shutdown().await;
                return UpEnd::ClientGone(format!("client read failed: {e}"));
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Down: peer → client.

enum DownEnd {
    /// The peer ended its stream; everything it sent is written to the client.
    PeerEof,
    /// The peer failed, or its next message would exceed the size limit or
    /// is malformed.
    Peer(Error),
    ClientWrite(io::Error),
}

struct Down<'a> {
    framer: &'a mut AnyFramer,
    buf: BytesMut,
    hint: usize,
    /// Frames for the client; big payloads stay in `buf`'s allocation.
    out: WriteQueue,
    bytes: u64,
    pace: Option<Pace>,
    /// No peer read before this (the pace's debt).
    paced_until: Option<Instant>,
    deflater: Option<Deflater>,
}

/// Appends one data message: compressed when permessage-deflate was agreed
/// and it is big enough, else copied as [`WriteQueue::copy_message`] does.
fn push_data(
    out: &mut WriteQueue,
    deflater: &mut Option<Deflater>,
    opcode: OpCode,
    payload: &[u8],
) {
    match deflater {
        Some(d) => d.encode(out.tail_mut(), opcode, payload),
        None => out.copy_message(opcode, payload),
    }
}

/// Waits out [`DEFLATE_IDLE`] when a compressor holds its zlib state.
async fn deflate_idle(d: &Option<Deflater>) {
    match d {
        Some(d) if d.holds_state() => tokio::time::sleep(DEFLATE_IDLE).await,
        _ => std::future::pending().await,
    }
}

/// Appends one unmasked server frame carrying a whole message.
pub(crate) fn push_message(out: &mut BytesMut, opcode: OpCode, payload: &[u8]) {
    out.reserve(wsframe::MAX_HEADER_LEN + payload.len());
    write_header(out, true, 0, opcode, None, payload.len());
    out.extend_from_slice(payload);
}

fn kind_opcode(k: Kind) -> OpCode {
    match k {
        Kind::Text => OpCode::Text,
        Kind::Binary => OpCode::Binary,
    }
}

impl Down<'_> {
    /// Cuts buffered peer bytes into messages; at EOF whatever is left goes out
    /// as a final binary message, so nothing read is lost.
    fn frame(&mut self, eof: bool, max: u64) -> Result<(), DownEnd> {
        loop {
            match self.framer.next(&self.buf, eof) {
                Ok(Some(cut)) => {
                    let len = cut.end - cut.start;
                    self.bytes += len as u64;
                    if len >= NO_COPY && self.deflater.is_none() {
                        self.buf.advance(cut.start);
                        let msg = self.buf.split_to(len).freeze();
                        self.out.push_message(kind_opcode(cut.kind), msg);
                        self.buf.advance(cut.consume - cut.end);
                    } else {
                        let msg = &self.buf[cut.start..cut.end];
                        push_data(
                            &mut self.out,
                            &mut self.deflater,
                            kind_opcode(cut.kind),
                            msg,
                        );
                        self.buf.advance(cut.consume);
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    let kind = error::Kind::from(&e);
                    return Err(DownEnd::Peer(Error::upstream(kind, e.to_string())));
                }
            }
        }
        if eof && !self.buf.is_empty() {
            self.bytes += self.buf.len() as u64;
            if self.deflater.is_none() {
                let rest = self.buf.split().freeze();
                self.out.push_message(OpCode::Binary, rest);
            } else {
                push_data(&mut self.out, &mut self.deflater, OpCode::Binary, &self.buf);
                self.buf.clear();
            }
        }
        if self.buf.len() as u64 > max {
            return Err(DownEnd::Peer(Error::upstream(
                error::Kind::MessageTooBig,
                format!("peer message exceeds the {max}-byte limit"),
            )));
        }
        Ok(())
    }
}

async fn down_loop(
    pr: &mut PeerReader<'_>,
    cw: &mut ConnWriter<'_>,
    st: &mut Down<'_>,
    shared: &Shared,
    settings: &Settings,
) -> DownEnd {
    let mut eof = false;
    loop {
        if !st.out.is_empty() {
            if let Err(e) = cw.write_queue(&mut st.out).await {
                return DownEnd::ClientWrite(e);
            }
            st.out.free();
        }
        if eof {
            return DownEnd::PeerEof;
        }
        let (pongs, ping) = shared.with(|c| (c.pongs.split(), std::mem::take(&mut c.ping)));
        st.out.unsplit(pongs);
        if ping {
            st.out.copy_message(OpCode::Ping, b"wsgate");
        }
        if !st.out.is_empty() {
            continue;
        }
        if st.buf.is_empty() {
            release(&mut st.buf);
        }
        if let Some(t) = st.paced_until {
            // Cancel-safe: the deadline stays until it has passed.
            tokio::time::sleep_until(t).await;
            st.paced_until = None;
        }
        let before = st.bytes;
        tokio::select! {
            biased;
            _ = shared.wake_down.notified() => {}
            r = pr.read(&mut st.buf, &mut st.hint) => {
                match r {
                    Ok(PeerData::Stream) => {
                        shared.touch();
                        if let Err(end) = st.frame(false, settings.max_message_size) {
                            return end;
                        }
                    }
                    Ok(PeerData::Datagram) => {
                        shared.touch();
                        let text = settings.datagram_text && std::str::from_utf8(&st.buf).is_ok();
                        st.bytes += st.buf.len() as u64;
                        push_data(&mut st.out, &mut st.deflater, if text { OpCode::Text } else { OpCode::Binary }, &st.buf);
                        st.buf.clear();
                    }
                    Ok(PeerData::Message(text, m)) => {
                        st.bytes += m.len() as u64;
                        let opcode = if text { OpCode::Text } else { OpCode::Binary };
                        match (&mut st.deflater, m) {
                            (Some(d), m) => d.encode_parts(st.out.tail_mut(), opcode, m.parts()),
                            (None, Message::One(b)) => st.out.copy_message(opcode, &b),
                            // Chunks are the message's own: written as they are.
                            (None, Message::Chunks(c, len)) => st.out.push_message_parts(opcode, c, len),
                        }
                    }
                    Ok(PeerData::Eof) => {
                        eof = true;
                        if let Err(end) = st.frame(true, settings.max_message_size) {
                            return end;
                        }
                    }
                    Err(e) => return DownEnd::Peer(Error::upstream(error::Kind::PeerFailed, "peer error").because(e)),
                }
            }
            () = deflate_idle(&st.deflater) => {
                if let Some(d) = &mut st.deflater {
                    d.hibernate();
                    hibernated();
                }
            }
        }
        if let Some(p) = st.pace.as_mut() {
            let now = Instant::now();
            st.paced_until = p
                .delay_for((st.bytes - before) as usize, now)
                .map(|d| now + d);
        }
    }
}

// ---------------------------------------------------------------------------
// The connection's life cycle.

enum First {
    Up(UpEnd),
    Down(DownEnd),
    Shutdown,
    Idle,
    PongTimeout,
}

/// When the keepalive/idle timer should fire next, and what it means then.
fn next_deadline(shared: &Shared, s: &Settings, last_ping: Instant) -> Option<Instant> {
    let (awaiting, activity) = shared.with(|c| (c.awaiting_pong, c.last_activity));
    let mut d: Option<Instant> = None;
    let mut consider = |t: Instant| d = Some(d.map_or(t, |x: Instant| x.min(t)));
    if let (Some(idle), Some(a)) = (s.idle_timeout, activity) {
        consider(a + idle);
    }
    if let Some(p) = s.ping_interval {
        match awaiting {
            Some(sent) => consider(sent + s.pong_timeout),
            None => consider(last_ping + p),
        }
    }
    d
}

/// Runs a bridged connection to its end. The framer, settings and shutdown
/// token are borrowed from the caller, whose future holds them anyway: each
/// layer of async functions keeps its own copy of what it is passed by value
/// for as long as it runs, and the relay's future is what an idle
/// connection holds.
pub async fn run(
    client: ClientIo,
    leftover: Bytes,
    peer: PeerConn,
    framer: &mut AnyFramer,
    settings: &Settings,
    shutdown: &CancellationToken,
) -> Outcome {
    with_halves!(client, |r, w| {
        with_peer(r, w, peer, leftover, framer, settings, shutdown).await
    })
}

async fn with_peer(
    mut cr: ConnReader<'_>,
    mut cw: ConnWriter<'_>,
    peer: PeerConn,
    leftover: Bytes,
    framer: &mut AnyFramer,
    settings: &Settings,
    shutdown: &CancellationToken,
) -> Outcome {
    let (cr, cw) = (&mut cr, &mut cw);
    let a = (leftover, framer, settings, shutdown);
    match peer {
        PeerConn::Tcp(mut s) => {
            let (r, w) = s.split();
            run_inner(cr, cw, &mut PeerReader::Tcp(r), &mut PeerWriter::Tcp(w), a).await
        }
        PeerConn::Unix(mut s) => {
            let (r, w) = s.split();
            run_inner(
                cr,
                cw,
                &mut PeerReader::Unix(r),
                &mut PeerWriter::Unix(w),
                a,
            )
            .await
        }
        PeerConn::Udp(s) => {
            run_inner(
                cr,
                cw,
                &mut PeerReader::Udp(&s),
                &mut PeerWriter::Udp(&s),
                a,
            )
            .await
        }
        PeerConn::UnixDgram(s) => {
            run_inner(
                cr,
                cw,
                &mut PeerReader::UnixDgram(&s),
                &mut PeerWriter::UnixDgram(&s),
                a,
            )
            .await
        }
        PeerConn::Agent(s, datagrams) => {
            let (r, w) = tokio::io::split(s);
            let mut pr = if datagrams {
                PeerReader::AgentDatagrams(r, BytesMut::new())
            } else {
                PeerReader::Agent(r)
            };
            run_inner(cr, cw, &mut pr, &mut PeerWriter::Agent(w, datagrams), a).await
        }
        PeerConn::Echo(tx, mut rx) => {
            run_inner(
                cr,
                cw,
                &mut PeerReader::Echo(&mut rx),
                &mut PeerWriter::Echo(Some(tx)),
                a,
            )
            .await
        }
    }
}

async fn run_inner(
    cr: &mut ConnReader<'_>,
    cw: &mut ConnWriter<'_>,
    pr: &mut PeerReader<'_>,
    pw: &mut PeerWriter<'_>,
    (leftover, framer, settings, shutdown): (Bytes, &mut AnyFramer, &Settings, &CancellationToken),
) -> Outcome {
    let shared = Shared {
        ctrl: Mutex::new(Ctrl {
            last_activity: Some(Instant::now()),
            ..Default::default()
        }),
        wake_down: Notify::new(),
        track_activity: settings.idle_timeout.is_some(),
    };
    let deflate = settings.deflate;
    let mut up = Up {
        decoder: InflatingDecoder::new(
            Role::Server,
            DecoderConfig {
                max_message_size: settings.max_message_size,
                ..Default::default()
            },
            deflate.map(|(a, _)| a.inflater(Role::Server, settings.max_message_size)),
            CHUNK,
        ),
        // Copy what hyper read past the request head, and let go of hyper's
        // read buffer, which `leftover` would otherwise keep alive.
        buf: if leftover.is_empty() {
            BytesMut::new()
        } else {
            BytesMut::from(&leftover[..])
        },
        hint: FIRST_CHUNK,
        batch: WriteQueue::default(),
        message: None,
        max_message: usize::try_from(settings.max_message_size).unwrap_or(usize::MAX),
        bytes: 0,
        pace: Pace::new(None, settings.shared_bandwidth.as_ref(), true),
    };
    drop(leftover);
    let mut down = Down {
        framer,
        buf: BytesMut::new(),
        hint: FIRST_CHUNK,
        out: WriteQueue::default(),
        bytes: 0,
        pace: Pace::new(None, settings.shared_bandwidth.as_ref(), false),
        paced_until: None,
        deflater: deflate.map(|(a, c)| a.deflater(Role::Server, &c)),
    };
    let mut outcome = Outcome::default();

    let close_timeout = settings.close_timeout;
    let up_end = {
        let up_fut = up_loop(cr, pw, &mut up, &shared);
        tokio::pin!(up_fut);
        let first = {
            let down_fut = down_loop(pr, cw, &mut down, &shared, settings);
            tokio::pin!(down_fut);
            let mut last_ping = Instant::now();
            loop {
                let deadline = next_deadline(&shared, settings, last_ping);
                let timer = async {
                    match deadline {
                        Some(d) => tokio::time::sleep_until(d).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    r = &mut up_fut => break First::Up(r),
                    r = &mut down_fut => break First::Down(r),
                    _ = shutdown.cancelled() => break First::Shutdown,
                    _ = timer => {
                        let now = Instant::now();
                        let (awaiting, activity) = shared.with(|c| (c.awaiting_pong, c.last_activity));
                        if let (Some(sent), Some(_)) = (awaiting, settings.ping_interval) {
                            if now >= sent + settings.pong_timeout {
                                break First::PongTimeout;
                            }
                        }
                        if let (Some(idle), Some(a)) = (settings.idle_timeout, activity) {
                            if now >= a + idle {
                                break First::Idle;
                            }
                        }
                        if let Some(p) = settings.ping_interval {
                            if awaiting.is_none() && now >= last_ping + p {
                                last_ping = now;
                                shared.with(|c| { c.ping = true; c.awaiting_pong = Some(now); });
                                shared.wake_down.notify_one();
                            }
                        }
                    }
                }
            }
        };
        // `down` is gone here; frames it had half-written are still in `down.out`.
        match first {
            First::Up(end) => Some(end),
            First::Down(DownEnd::ClientWrite(e)) => {
                outcome.reason = format!("client write failed: {e}");
                None
            }
            First::PongTimeout => {
                outcome.reason = "no pong within the deadline".into();
                None
            }
            other => {
                let end = match other {
                    First::Down(DownEnd::PeerEof) => {
                        Error::upstream(error::Kind::PeerClosed, "peer closed")
                    }
                    First::Down(DownEnd::Peer(e)) => e,
                    First::Idle => Error::gateway(error::Kind::IdleTimeout, "idle timeout"),
                    _ => Error::gateway(error::Kind::ShuttingDown, "gateway shutting down"),
                };
                let code = end.kind.close_code().unwrap_or(close_code::GOING_AWAY);
                let reason = end.to_string();
                // Keep forwarding the client's data until its Close comes back.
                close_then_drain_up(
                    cw,
                    &mut up_fut,
                    &mut down.out,
                    code,
                    &reason,
                    close_timeout,
                    &mut outcome,
                )
                .await;
                outcome.reason = reason;
                None
            }
        }
    };

    match up_end {
        Some(UpEnd::Close(code)) => {
            outcome.close_received = Some(code.unwrap_or(close_code::NO_STATUS));
            // Answer with the same code (RFC 6455 §5.5.1); none if none was given.
            let reply = code.map(|c| (c, ""));
            finish(cw, cr, &mut down.out, reply, close_timeout, &mut outcome).await;
            outcome.reason = "client closed".into();
            drain_peer(pr, close_timeout).await;
        }
        Some(UpEnd::ClientGone(why)) => {
            outcome.reason = why;
            drain_peer(pr, close_timeout).await;
        }
        Some(UpEnd::Protocol(e)) => {
            outcome.reason = format!("protocol error: {e}");
            let reason = e.to_string();
            let code = error::Kind::from(&e).close_code();
            finish(
                cw,
                cr,
                &mut down.out,
                Some((code.unwrap_or(close_code::PROTOCOL_ERROR), &reason)),
                close_timeout,
                &mut outcome,
            )
            .await;
        }
        Some(UpEnd::PeerWrite(e)) => {
            let e = crate::bridge::peer::write_failed(e);
            outcome.reason = e.to_string();
            let code = e.kind.close_code().unwrap_or(close_code::INTERNAL_ERROR);
            finish(
                cw,
                cr,
                &mut down.out,
                Some((code, &e.context)),
                close_timeout,
                &mut outcome,
            )
            .await;
        }
        None => {}
    }
    done(outcome, &up, &down)
}

/// Reads the peer until it closes (bounded), so that closing our socket with
/// unread bytes in it does not reset the connection and destroy data still on
/// its way to the peer.
async fn drain_peer(pr: &mut PeerReader<'_>, timeout: Duration) {
    if !matches!(
        pr,
        PeerReader::Tcp(_) | PeerReader::Unix(_) | PeerReader::Agent(_)
    ) {
        return;
    }
    let _ = tokio::time::timeout(timeout, async {
        let (mut scratch, mut hint) = (BytesMut::new(), CHUNK);
        loop {
            scratch.clear();
            match pr.read(&mut scratch, &mut hint).await {
                Ok(PeerData::Stream) => {}
                _ => break,
            }
        }
    })
    .await;
}

fn done(mut outcome: Outcome, up: &Up, down: &Down<'_>) -> Outcome {
    outcome.bytes_up = up.bytes;
    outcome.bytes_down = down.bytes;
    outcome
}

/// Sends our Close after any half-written frames, then keeps the up loop
/// running (client data still reaches the peer) until the client's Close,
/// its disconnect, or the timeout.
#[allow(clippy::too_many_arguments)]
async fn close_then_drain_up<F: std::future::Future<Output = UpEnd> + Unpin>(
    cw: &mut ConnWriter<'_>,
    up: &mut F,
    out: &mut WriteQueue,
    code: u16,
    reason: &str,
    timeout: Duration,
    outcome: &mut Outcome,
) {
    out.copy_message(OpCode::Close, &wsframe::close_payload(code, reason));
    let sent = tokio::time::timeout(timeout, cw.write_queue(out)).await;
    if !matches!(sent, Ok(Ok(()))) {
        return;
    }
    outcome.close_sent = Some(code);
    if let Ok(UpEnd::Close(c)) = tokio::time::timeout(timeout, up).await {
        outcome.close_received = Some(c.unwrap_or(close_code::NO_STATUS));
    }
    cw.shutdown().await;
}

/// Finishes half-written frames, sends a Close (if `close` is given, or an
/// empty one when `None` answers a codeless Close), shuts our side down and
/// reads until the client closes or the timeout, so nothing we sent is lost
/// to a reset.
async fn finish(
    cw: &mut ConnWriter<'_>,
    cr: &mut ConnReader<'_>,
    out: &mut WriteQueue,
    close: Option<(u16, &str)>,
    timeout: Duration,
    outcome: &mut Outcome,
) {
    let payload = close.map_or_else(Vec::new, |(c, r)| wsframe::close_payload(c, r));
    out.copy_message(OpCode::Close, &payload);
    let sent = tokio::time::timeout(timeout, cw.write_queue_last(out)).await;
    if !matches!(sent, Ok(Ok(()))) {
        return;
    }
    outcome.close_sent = Some(close.map_or(close_code::NO_STATUS, |(c, _)| c));
    cw.shutdown().await;
    drain(cr, timeout).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpStream;

    #[test]
    fn big_peer_messages_are_framed_without_copying_and_small_ones_copied() {
        let spec = wsgate_framing::FramingSpec::parse("lines", "").unwrap();
        let mut framer = spec.new_framer();
        let mut down = Down {
            framer: &mut framer,
            buf: BytesMut::new(),
            hint: FIRST_CHUNK,
            out: WriteQueue::default(),
            bytes: 0,
            pace: None,
            paced_until: None,
            deflater: None,
        };
        let long = "x".repeat(NO_COPY + 10);
        down.buf
            .extend_from_slice(format!("hi\n{long}\nyo\npartial").as_bytes());
        down.frame(false, 1 << 20).ok().unwrap();
        assert_eq!(&down.buf[..], b"partial", "an unfinished line waits");
        assert_eq!(down.bytes, (2 + long.len() + 2) as u64);
        let wire = down.out.drain_for_test(usize::MAX);
        let mut dec = wsframe::Decoder::new(Role::Client, wsframe::DecoderConfig::default());
        let mut wire = BytesMut::from(&wire[..]);
        let mut got = vec![];
        while let Some(Frame::Data { payload, text, .. }) = dec.next(&mut wire).unwrap() {
            assert!(text);
            got.push(String::from_utf8(payload.to_vec()).unwrap());
        }
        assert_eq!(got, ["hi", long.as_str(), "yo"]);
        // At EOF the rest goes out as a final binary message.
        down.frame(true, 1 << 20).ok().unwrap();
        assert!(down.buf.is_empty());
        assert_eq!(down.out.drain_for_test(5)[2..], b"partial"[..]);
    }

    #[test]
    fn a_gathered_message_holds_its_bytes_in_chunks_never_past_the_limit() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        for limit in [0usize, 1000, 200_000, 300_000, 1 << 20] {
            for piece in [1usize, 999, 4096, CHUNK, CHUNK + 3, 200_000] {
                let want = if limit == 0 {
                    &data[..]
                } else {
                    &data[..limit.min(data.len())]
                };
                let mut g = Gathering::new(true);
                for p in want.chunks(piece) {
                    g.push(p, limit);
                }
                let held: usize =
                    g.chunks.iter().map(Bytes::len).sum::<usize>() + g.filling.capacity();
                assert!(g.chunks.iter().all(|c| c.len() <= CHUNK));
                assert!(
                    held <= want.len().next_multiple_of(CHUNK),
                    "{limit} {piece}: {held}"
                );
                if limit != 0 {
                    assert!(held <= limit, "{limit} {piece}: {held}");
                }
                let (text, m) = g.finish();
                assert!(text);
                assert_eq!(m.len(), want.len());
                assert!(matches!(m, Message::One(_)) == (want.len() <= CHUNK));
                let mut q = WriteQueue::default();
                q.push_message_parts(OpCode::Text, m.parts().to_vec(), m.len());
                let wire = q.drain_for_test(usize::MAX);
                assert_eq!(&wire[wire.len() - want.len()..], want);
                assert_eq!(&m.contiguous()[..], want);
            }
        }
        // A piece past the limit (the decoder's to refuse) is not lost.
        let mut g = Gathering::new(false);
        g.push(&data[..10], 4);
        assert_eq!(&g.finish().1.contiguous()[..], &data[..10]);
    }

    #[tokio::test]
    async fn a_queue_reaches_a_slow_stream_peer_whole_and_in_order() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut s = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (mut peer, _) = l.accept().await.unwrap();
        let mut q = WriteQueue::default();
        let mut want = vec![];
        for i in 0..64u32 {
            // Big pieces (more than the socket buffers hold at once) and small ones.
            let piece = vec![
                i as u8;
                if i % 2 == 0 {
                    64 * 1024 + i as usize
                } else {
                    5
                }
            ];
            want.extend_from_slice(&piece);
            q.append(BytesMut::from(&piece[..]));
        }
        let reader = tokio::spawn(async move {
            let mut got = vec![];
            let mut chunk = vec![0u8; 7000];
            loop {
                tokio::time::sleep(Duration::from_micros(50)).await;
                match peer.read(&mut chunk).await.unwrap() {
                    0 => return got,
                    n => got.extend_from_slice(&chunk[..n]),
                }
            }
        });
        let (_r, w) = s.split();
        let mut pw = PeerWriter::Tcp(w);
        pw.write_queue(&mut q).await.unwrap();
        assert!(q.is_empty());
        pw.shutdown().await;
        assert_eq!(reader.await.unwrap(), want);
    }
}
