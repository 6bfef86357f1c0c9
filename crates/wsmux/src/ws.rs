//! [`Transport`] over a real WebSocket, using the `wsframe` codec.
//!
//! [`WsTransport`] drives `wsframe`'s sans-IO [`wsframe::Decoder`] and
//! [`wsframe::encode_frame`] directly over any `AsyncRead + AsyncWrite`
//! connection whose opening handshake is done (or does a minimal handshake
//! itself with [`WsTransport::connect`] / [`WsTransport::accept`]). It answers
//! WebSocket pings, answers and sends Close frames, and reassembles
//! fragmented messages; the mux only sees binary and text messages.

use crate::pool::BufPool;
use crate::transport::{Message, Transport};
use bytes::{Buf, Bytes, BytesMut};
use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use wsframe::deflate::{self, Deflater, InflatingDecoder};
use wsframe::{
    apply_mask, close_code, encode_frame, write_header, DecoderConfig, Frame, OpCode, Role,
};

/// The WebSocket subprotocol name of mux protocol version 1.
pub const SUBPROTOCOL: &str = "wsmux.v1";

/// Bytes of encoded frames buffered before `poll_ready` waits for the socket.
const WRITE_HIGH_WATER: usize = 256 * 1024;
const READ_CHUNK: usize = 256 * 1024;
/// Message buffers kept for reuse: up to about 8 MiB, only as much as the
/// traffic has actually had in flight at once.
const RECV_POOL_BUFFERS: usize = 128;
/// Capacity of the pooled message buffers: a default-sized mux frame (12 +
/// 32 KiB). Larger messages get exact allocations; messages under half this
/// size are copied into exact allocations too, so a buffered message never
/// occupies more than twice its length.
const RECV_BUF_CAPACITY: usize = 12 + 32 * 1024 + 64;

/// Payloads this big or bigger are written from where they are, after their
/// headers, by one `writev` (unmasked frames: the server's); smaller ones
/// are copied behind their header, so many small frames go out in one
/// contiguous write.
const NO_COPY: usize = 4096;
/// Most slices given to one `writev`.
const IOV: usize = 16;

/// Encoded frames waiting to be written, in order: whole segments (frame
/// headers and the payloads they precede, not copied), then `tail` (copied
/// frames and the headers written since the last segment).
#[derive(Default)]
struct WriteQueue {
    segments: VecDeque<Bytes>,
    /// Bytes in `segments`.
    in_segments: usize,
    tail: BytesMut,
}

impl WriteQueue {
    fn len(&self) -> usize {
        self.in_segments + self.tail.len()
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends `data` without copying it.
    fn push(&mut self, data: Bytes) {
        if !self.tail.is_empty() {
            let t = self.tail.split().freeze();
            self.in_segments += t.len();
            self.segments.push_back(t);
        }
        self.in_segments += data.len();
        self.segments.push_back(data);
    }

    /// The queue's first bytes, as up to `iov.len()` slices; returns how many.
    fn slices<'a>(&'a self, iov: &mut [IoSlice<'a>]) -> usize {
        let tail = (!self.tail.is_empty()).then_some(&self.tail[..]);
        let all = self.segments.iter().map(|s| &s[..]).chain(tail);
        let mut k = 0;
        for (slot, s) in iov.iter_mut().zip(all) {
            *slot = IoSlice::new(s);
            k += 1;
        }
        k
    }

    /// Drops the first `n` bytes (written).
    fn advance(&mut self, mut n: usize) {
        while n > 0 {
            match self.segments.front_mut() {
                Some(s) if s.len() <= n => {
                    n -= s.len();
                    self.in_segments -= s.len();
                    self.segments.pop_front();
                }
                Some(s) => {
                    s.advance(n);
                    self.in_segments -= n;
                    return;
                }
                None => {
                    self.tail.advance(n);
                    break;
                }
            }
        }
        if self.tail.is_empty() {
            self.tail.clear();
        }
    }
}

/// Largest message a mux peer needs: the 12-byte header plus a 64 KiB
/// payload; the default limit leaves room for other uses (byte streams).
const DEFAULT_MAX_MESSAGE: u64 = 1 << 20;

/// A WebSocket connection as a mux [`Transport`]. See the module docs.
pub struct WsTransport<S> {
    io: S,
    role: Role,
    decoder: InflatingDecoder,
    /// permessage-deflate, when the handshake agreed on it.
    deflater: Option<Deflater>,
    rbuf: BytesMut,
    /// A fragmented (or compressed) message being reassembled.
    partial: Option<Partial>,
    /// The decoder's `max_message_size` (0: none).
    max_message: u64,
    /// The Close our side owes for a protocol violation of the peer's
    /// (1009 for a message past the limit, 1007, 1002), sent by
    /// `poll_close` in place of 1000.
    failed: Option<(u16, String)>,
    wbuf: WriteQueue,
    close_sent: bool,
    close_received: bool,
    read_eof: bool,
    pool: Arc<BufPool>,
}

/// A message being reassembled from its pieces (frames' payloads, a
/// compressed message's inflated output): in buffers of the pool's size
/// (the first from the pool), each filled before the next is made and none
/// past what the message size limit leaves. A message past the limit (an
/// inflation bomb) thus costs the limit, not the steps of a buffer grown by
/// doubling, which the allocator keeps mapped; a whole message of several
/// buffers is copied into one at its end.
struct Partial {
    text: bool,
    full: Vec<Vec<u8>>,
    acc: Vec<u8>,
    len: usize,
}

impl Partial {
    fn new(text: bool, first: Vec<u8>) -> Self {
        Partial {
            text,
            full: Vec::new(),
            acc: first,
            len: 0,
        }
    }

    fn push(&mut self, mut piece: &[u8], limit: u64, pool: &Arc<BufPool>) {
        while !piece.is_empty() {
            if self.acc.len() == self.acc.capacity() {
                let left = if limit == 0 {
                    usize::MAX
                } else {
                    usize::try_from(limit)
                        .unwrap_or(usize::MAX)
                        .saturating_sub(self.len)
                };
                // The limit is the decoder's to enforce: a piece is never
                // cut short here.
                let size = RECV_BUF_CAPACITY
                    .min(left)
                    .max(piece.len().min(RECV_BUF_CAPACITY));
                let next = if size == RECV_BUF_CAPACITY {
                    pool.take()
                } else {
                    Vec::with_capacity(size)
                };
                self.full.push(std::mem::replace(&mut self.acc, next));
            }
            let n = piece.len().min(self.acc.capacity() - self.acc.len());
            self.acc.extend_from_slice(&piece[..n]);
            self.len += n;
            piece = &piece[n..];
        }
    }

    fn finish(mut self, pool: &Arc<BufPool>) -> (bool, Bytes) {
        if self.full.is_empty() {
            let acc = self.acc;
            let p = if acc.capacity() > 2 * acc.len() + 4096 {
                // A short message in a pooled buffer: copy it out and
                // recycle the buffer.
                let p = Bytes::copy_from_slice(&acc);
                drop(pool.wrap(acc));
                p
            } else {
                pool.wrap(acc)
            };
            return (self.text, p);
        }
        self.full.push(self.acc);
        let parts: Vec<&[u8]> = self.full.iter().map(|v| &v[..]).collect();
        let p = pool.bytes(&parts);
        for v in self.full {
            // Back to the pool (those of its size).
            drop(pool.wrap(v));
        }
        (self.text, p)
    }
}

fn ws_err(e: wsframe::ProtocolError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> WsTransport<S> {
    /// Wrap a connection whose handshake is done. `leftover` holds bytes read
    /// past the handshake (the first frames).
    ///
    /// Text messages are not checked for UTF-8 (`config.validate_utf8` is
    /// ignored): the mux never reads their contents, a text message is a
    /// protocol error (GOAWAY TEXT_MESSAGE) whatever its bytes, and a
    /// failure in the WebSocket layer would close the connection before the
    /// GOAWAY could tell the peer why.
    pub fn from_raw(io: S, role: Role, config: DecoderConfig, leftover: &[u8]) -> Self {
        Self::from_raw_deflate(io, role, config, leftover, None)
    }

    /// [`WsTransport::from_raw`] for a WebSocket whose handshake agreed on
    /// permessage-deflate: messages of at least `min_size` bytes are sent
    /// compressed, compressed messages are inflated (bounded by the
    /// decoder's `max_message_size`).
    pub fn from_raw_deflate(
        io: S,
        role: Role,
        config: DecoderConfig,
        leftover: &[u8],
        deflate: Option<(deflate::Agreed, deflate::Config)>,
    ) -> Self {
        let config = DecoderConfig {
            validate_utf8: false,
            ..config
        };
        let max_message = config.max_message_size;
        let inflater = deflate.map(|(a, _)| a.inflater(role, max_message));
        WsTransport {
            io,
            role,
            decoder: InflatingDecoder::new(role, config, inflater, RECV_BUF_CAPACITY),
            deflater: deflate.map(|(a, c)| a.deflater(role, &c)),
            rbuf: BytesMut::from(leftover),
            partial: None,
            max_message,
            failed: None,
            wbuf: WriteQueue::default(),
            close_sent: false,
            close_received: false,
            read_eof: false,
            pool: BufPool::new(RECV_BUF_CAPACITY, RECV_POOL_BUFFERS),
        }
    }

    /// The decoder settings used by [`WsTransport::connect`] and
    /// [`WsTransport::accept`]: 1 MiB messages, text not checked for UTF-8
    /// (see [`WsTransport::from_raw`]).
    pub fn default_config() -> DecoderConfig {
        DecoderConfig {
            max_message_size: DEFAULT_MAX_MESSAGE,
            validate_utf8: false,
            ..DecoderConfig::default()
        }
    }

    /// Client handshake (RFC 6455 §4.1) on `io`, offering the `wsmux.v1`
    /// subprotocol, then wrap.
    pub async fn connect(io: S, host: &str, path: &str) -> io::Result<Self> {
        Self::connect_deflate(io, host, path, None).await
    }

    /// [`WsTransport::connect`], offering permessage-deflate with `deflate`
    /// when given; the server's answer decides whether it is used.
    pub async fn connect_deflate(
        mut io: S,
        host: &str,
        path: &str,
        deflate: Option<&deflate::Config>,
    ) -> io::Result<Self> {
        let key = wsframe::handshake::generate_key();
        let offer = deflate.map(deflate::client_offer);
        let extra: Vec<(&str, &str)> = offer
            .iter()
            .map(|o| ("Sec-WebSocket-Extensions", o.as_str()))
            .collect();
        io.write_all(&wsframe::handshake::client_request(
            host,
            path,
            &key,
            &[SUBPROTOCOL],
            &extra,
        ))
        .await?;
        let mut buf = BytesMut::with_capacity(1024);
        let resp = loop {
            if io.read_buf(&mut buf).await? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed during the WebSocket handshake",
                ));
            }
            match wsframe::handshake::parse_response(&buf) {
                Ok(Some(r)) => break r,
                Ok(None) if buf.len() < 16 * 1024 => continue,
                Ok(None) => return Err(bad_handshake("response head too large")),
                Err(e) => return Err(bad_handshake(&format!("bad response: {e}"))),
            }
        };
        if resp.status != 101 {
            return Err(bad_handshake(&format!("status {}", resp.status)));
        }
        let expected = wsframe::handshake::accept_key(key.as_bytes());
        if resp.header("sec-websocket-accept") != Some(expected.as_str()) {
            return Err(bad_handshake("wrong Sec-WebSocket-Accept"));
        }
        let agreed = match deflate {
            Some(config) => {
                let answers = resp
                    .headers
                    .iter()
                    .filter(|(k, _)| k.eq_ignore_ascii_case("sec-websocket-extensions"))
                    .map(|(_, v)| v.as_bytes());
                deflate::accept_response(answers, config)
                    .map_err(|e| bad_handshake(&format!("permessage-deflate answer: {e}")))?
                    .map(|a| (a, *config))
            }
            None => None,
        };
        let leftover = buf.split_off(resp.head_len);
        Ok(Self::from_raw_deflate(
            io,
            Role::Client,
            Self::default_config(),
            &leftover,
            agreed,
        ))
    }

    /// Minimal server handshake (RFC 6455 §4.2) on `io`: reads the request
    /// head, checks the key, answers 101 (selecting `wsmux.v1` when offered),
    /// then wraps. For tests, tools and benchmarks; servers with an HTTP stack
    /// do the upgrade there and use [`WsTransport::from_raw`].
    pub async fn accept(mut io: S) -> io::Result<Self> {
        let mut buf = BytesMut::with_capacity(1024);
        let (key, proto, head_len) = loop {
            if io.read_buf(&mut buf).await? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed during the WebSocket handshake",
                ));
            }
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut req = httparse::Request::new(&mut headers);
            match req.parse(&buf) {
                Ok(httparse::Status::Complete(n)) => {
                    let find = |name: &str| {
                        req.headers
                            .iter()
                            .find(|h| h.name.eq_ignore_ascii_case(name))
                            .map(|h| h.value.to_vec())
                    };
                    let key = find("sec-websocket-key")
                        .filter(|k| wsframe::handshake::is_valid_key(k))
                        .ok_or_else(|| bad_handshake("missing or invalid Sec-WebSocket-Key"))?;
                    let proto = find("sec-websocket-protocol").is_some_and(|p| {
                        String::from_utf8_lossy(&p)
                            .split(',')
                            .any(|s| s.trim() == SUBPROTOCOL)
                    });
                    break (key, proto, n);
                }
                Ok(httparse::Status::Partial) if buf.len() < 16 * 1024 => continue,
                Ok(httparse::Status::Partial) => {
                    return Err(bad_handshake("request head too large"))
                }
                Err(e) => return Err(bad_handshake(&format!("bad request: {e}"))),
            }
        };
        let mut resp = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {}\r\n",
            wsframe::handshake::accept_key(&key)
        );
        if proto {
            resp.push_str(&format!("Sec-WebSocket-Protocol: {SUBPROTOCOL}\r\n"));
        }
        resp.push_str("\r\n");
        io.write_all(resp.as_bytes()).await?;
        let leftover = buf.split_off(head_len);
        Ok(Self::from_raw(
            io,
            Role::Server,
            Self::default_config(),
            &leftover,
        ))
    }

    fn mask(&self) -> Option<[u8; 4]> {
        match self.role {
            Role::Client => Some(rand::random()),
            Role::Server => None,
        }
    }

    fn poll_write_buf(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.wbuf.is_empty() {
            let n = if self.wbuf.segments.is_empty() {
                ready!(Pin::new(&mut self.io).poll_write(cx, &self.wbuf.tail))?
            } else {
                let mut iov = [IoSlice::new(&[]); IOV];
                let k = self.wbuf.slices(&mut iov);
                ready!(Pin::new(&mut self.io).poll_write_vectored(cx, &iov[..k]))?
            };
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.wbuf.advance(n);
        }
        Poll::Ready(Ok(()))
    }

    fn send_control(&mut self, op: OpCode, payload: &[u8]) {
        let mask = self.mask();
        encode_frame(&mut self.wbuf.tail, true, op, mask, payload);
    }
}

fn bad_handshake(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("WebSocket handshake: {what}"),
    )
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Transport for WsTransport<S> {
    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<Message>>> {
        loop {
            if self.close_received || self.read_eof {
                return Poll::Ready(None);
            }
            // Control answers (pongs, close) are queued in the write buffer;
            // do not let a ping flood grow it: push it out first.
            if self.wbuf.len() >= WRITE_HIGH_WATER {
                if let Err(e) = ready!(self.poll_write_buf(cx)) {
                    return Poll::Ready(Some(Err(e)));
                }
            }
            loop {
                let frame = match self.decoder.next(&mut self.rbuf) {
                    Ok(Some(f)) => f,
                    Ok(None) => break,
                    Err(e) => {
                        // Failed with the code the violation calls for.
                        self.failed = Some((e.close_code(), e.to_string()));
                        self.partial = None;
                        return Poll::Ready(Some(Err(ws_err(e))));
                    }
                };
                match frame {
                    Frame::Data {
                        payload,
                        text,
                        first,
                        last,
                        ..
                    } => {
                        // Payload pieces are views into the read buffer. They
                        // are copied out (and dropped at once) so the read
                        // buffer stays uniquely owned and is reused for every
                        // read, and a message kept by a slow stream holds
                        // exactly its own bytes, not a whole read chunk.
                        if first && last {
                            let p = if payload.len() * 2 < RECV_BUF_CAPACITY {
                                Bytes::copy_from_slice(&payload)
                            } else {
                                self.pool.bytes(&[&payload])
                            };
                            return Poll::Ready(Some(Ok(if text {
                                Message::Text(p)
                            } else {
                                Message::Binary(p)
                            })));
                        }
                        if first {
                            self.partial = Some(Partial::new(text, self.pool.take()));
                        }
                        if let Some(p) = self.partial.as_mut() {
                            p.push(&payload, self.max_message, &self.pool);
                        }
                        drop(payload);
                        if last {
                            if let Some(p) = self.partial.take() {
                                let (text, p) = p.finish(&self.pool);
                                return Poll::Ready(Some(Ok(if text {
                                    Message::Text(p)
                                } else {
                                    Message::Binary(p)
                                })));
                            }
                        }
                    }
                    Frame::Control { opcode, payload } => match opcode {
                        OpCode::Ping if !self.close_sent => {
                            self.send_control(OpCode::Pong, &payload);
                        }
                        OpCode::Close => {
                            self.close_received = true;
                            if !self.close_sent {
                                self.close_sent = true;
                                let echo = wsframe::parse_close_payload(&payload)
                                    .map(|(c, _)| wsframe::close_payload(c, ""))
                                    .unwrap_or_default();
                                self.send_control(OpCode::Close, &echo);
                                // Best effort: the driver flushes on its next
                                // write pass; the close echo is in the buffer.
                                let _ = self.poll_write_buf(cx);
                            }
                            return Poll::Ready(None);
                        }
                        _ => {}
                    },
                }
            }
            self.rbuf.reserve(READ_CHUNK);
            match ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut self.io),
                cx,
                &mut self.rbuf
            )) {
                Ok(0) => {
                    self.read_eof = true;
                    return Poll::Ready(None);
                }
                Ok(_) => {}
                Err(e) => return Poll::Ready(Some(Err(e))),
            }
        }
    }

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.close_sent {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "WebSocket close already sent",
            )));
        }
        if self.wbuf.len() >= WRITE_HIGH_WATER {
            ready!(self.poll_write_buf(cx))?;
        }
        Poll::Ready(Ok(()))
    }

    fn start_send(&mut self, msg: Bytes) -> io::Result<()> {
        self.start_send_parts(&[], msg)
    }

    fn start_send_parts(&mut self, head: &[u8], body: Bytes) -> io::Result<()> {
        if let Some(d) = &mut self.deflater {
            // Compressed: header and body as one message, into the output.
            d.encode_parts(&mut self.wbuf.tail, OpCode::Binary, &[head, &body[..]]);
            return Ok(());
        }
        let len = head.len() + body.len();
        let mask = self.mask();
        let tail = &mut self.wbuf.tail;
        match mask {
            // A client masks: one copy, masked in place.
            Some(mask) => {
                tail.reserve(wsframe::MAX_HEADER_LEN + len);
                write_header(tail, true, 0, OpCode::Binary, Some(mask), len);
                let start = tail.len();
                tail.extend_from_slice(head);
                tail.extend_from_slice(&body);
                apply_mask(&mut tail[start..], mask, 0);
            }
            None => {
                tail.reserve(wsframe::MAX_HEADER_LEN + head.len());
                write_header(tail, true, 0, OpCode::Binary, None, len);
                tail.extend_from_slice(head);
                if body.len() >= NO_COPY {
                    self.wbuf.push(body);
                } else {
                    tail.extend_from_slice(&body);
                }
            }
        }
        Ok(())
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_write_buf(cx))?;
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.close_sent {
            self.close_sent = true;
            let payload = match &self.failed {
                Some((code, why)) => wsframe::close_payload(*code, why),
                None => wsframe::close_payload(close_code::NORMAL, ""),
            };
            self.send_control(OpCode::Close, &payload);
        }
        ready!(self.poll_write_buf(cx))?;
        ready!(Pin::new(&mut self.io).poll_flush(cx))?;
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_write_queue_keeps_order_across_segments_and_the_tail() {
        let mut q = WriteQueue::default();
        q.tail.extend_from_slice(b"ab");
        q.push(Bytes::from_static(b"cdef"));
        q.tail.extend_from_slice(b"gh");
        q.push(Bytes::from_static(b"ij"));
        q.tail.extend_from_slice(b"k");
        assert_eq!(q.len(), 11);
        let mut out = Vec::new();
        while !q.is_empty() {
            let mut iov = [IoSlice::new(&[]); IOV];
            let k = q.slices(&mut iov);
            // Partial writes of 3 bytes at a time.
            let all: Vec<u8> = iov[..k].iter().flat_map(|s| s.iter().copied()).collect();
            let n = all.len().min(3);
            out.extend_from_slice(&all[..n]);
            q.advance(n);
        }
        assert_eq!(out, b"abcdefghijk");
        assert_eq!(q.len(), 0);
    }

    #[tokio::test]
    async fn server_frames_carry_big_payloads_uncopied_and_both_roles_decode() {
        for (role, peer) in [(Role::Server, Role::Client), (Role::Client, Role::Server)] {
            let (a, b) = tokio::io::duplex(1 << 20);
            let cfg = WsTransport::<tokio::io::DuplexStream>::default_config();
            let mut tx = WsTransport::from_raw(a, role, cfg.clone(), &[]);
            let mut rx = WsTransport::from_raw(b, peer, cfg, &[]);
            let big = Bytes::from(vec![9u8; 20_000]);
            tx.start_send_parts(b"HEAD", big.clone()).unwrap();
            tx.start_send_parts(b"h", Bytes::from_static(b"small"))
                .unwrap();
            // Unmasked: the big payload is queued as it is, not copied.
            assert_eq!(
                tx.wbuf.segments.len(),
                usize::from(role == Role::Server) * 2
            );
            std::future::poll_fn(|cx| tx.poll_flush(cx)).await.unwrap();
            let mut want = b"HEAD".to_vec();
            want.extend_from_slice(&big);
            for want in [want, b"hsmall".to_vec()] {
                let m = std::future::poll_fn(|cx| rx.poll_recv(cx)).await;
                assert_eq!(m.unwrap().unwrap(), Message::Binary(want.into()));
            }
        }
    }

    #[tokio::test]
    async fn messages_are_reassembled_up_to_the_limit_and_one_past_it_is_1009() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let limit = 100_000u64;
        let config = deflate::Config {
            min_size: 0,
            ..deflate::Config::default()
        };
        let agreed = deflate::negotiate([&b"permessage-deflate"[..]], &config).unwrap();
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let cfg = DecoderConfig {
            max_message_size: limit,
            ..WsTransport::<tokio::io::DuplexStream>::default_config()
        };
        let mut server =
            WsTransport::from_raw_deflate(a, Role::Server, cfg, &[], Some((agreed, config)));
        let mask = Some([1, 2, 3, 4]);
        let mut wire = BytesMut::new();
        // Uncompressed at the limit exactly, in fragments of several pool
        // buffers' worth.
        let at_limit: Vec<u8> = (0..limit).map(|i| (i % 251) as u8).collect();
        let thirds: Vec<&[u8]> = at_limit.chunks(at_limit.len() / 3 + 1).collect();
        for (i, part) in thirds.iter().enumerate() {
            let op = if i == 0 {
                OpCode::Binary
            } else {
                OpCode::Continuation
            };
            encode_frame(&mut wire, i + 1 == thirds.len(), op, mask, part);
        }
        // Compressed, just under the limit, then a bomb: 64 MiB of zeros.
        let mut client = agreed.deflater(Role::Client, &config);
        client.encode(&mut wire, OpCode::Binary, &at_limit[..50_000]);
        client.encode(&mut wire, OpCode::Binary, &vec![0u8; 64 << 20]);
        assert!(wire.len() < 400_000, "{}", wire.len());
        b.write_all(&wire).await.unwrap();
        for want in [&at_limit[..], &at_limit[..50_000]] {
            let m = std::future::poll_fn(|cx| server.poll_recv(cx)).await;
            assert_eq!(m.unwrap().unwrap(), Message::Binary(want.to_vec().into()));
        }
        let m = std::future::poll_fn(|cx| server.poll_recv(cx)).await;
        let e = m.unwrap().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        // Closing says why: 1009.
        std::future::poll_fn(|cx| server.poll_close(cx))
            .await
            .unwrap();
        let mut got = BytesMut::new();
        b.read_buf(&mut got).await.unwrap();
        let mut dec = wsframe::Decoder::new(Role::Client, DecoderConfig::default());
        let Some(Frame::Control {
            opcode: OpCode::Close,
            payload,
        }) = dec.next(&mut got).unwrap()
        else {
            panic!("no close frame")
        };
        let (code, reason) = wsframe::parse_close_payload(&payload).unwrap();
        assert_eq!(code, close_code::TOO_BIG, "{reason}");
    }
}
