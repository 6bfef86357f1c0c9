//! The gateway's own HTTP/1.1 for WebSocket handshakes: request and response
//! heads (parsed with `httparse`, written in one buffer) and the body of a
//! backend's refusal.
//!
//! hyper serves plain HTTP and HTTP/2. A connection whose **first** request is
//! an HTTP/1.1 WebSocket handshake is answered with what is here instead, and
//! the backend side of a proxied handshake is always spoken with it. Why by
//! hand: through hyper, a proxied handshake cost a server connection, a client
//! connection with its own task, two upgrade hand-offs between tasks and their
//! buffers; profiling put the gateway's user-space time per handshake at three
//! times nginx's. A WebSocket handshake is one head each way, then the socket
//! is the relay's: reading and writing those heads is all it needs.

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{request, response, Method, Request, Response, StatusCode, Uri, Version};

/// The largest request or response head read here (hyper's default limit is
/// larger; a head past this one is handed to hyper, which answers it).
pub const MAX_HEAD: usize = 64 * 1024;

/// Header lines per head.
pub const MAX_HEADERS: usize = 128;

/// A head that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    #[error("malformed HTTP head: {0}")]
    Syntax(#[from] httparse::Error),
    #[error("HTTP head larger than {MAX_HEAD} bytes")]
    TooLarge,
    #[error("invalid {0} in HTTP head")]
    Invalid(&'static str),
}

fn version(minor: Option<u8>) -> Version {
    match minor {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    }
}

/// The header table of a head parsed from `buf`: each value is a slice of
/// `buf` (shared, not copied: one allocation per head instead of one per
/// value, on the path of every handshake).
fn headers_from(raw: &[httparse::Header<'_>], buf: &Bytes) -> Result<HeaderMap, HeadError> {
    let mut map = HeaderMap::with_capacity(raw.len());
    for h in raw {
        let name =
            HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| HeadError::Invalid("name"))?;
        let value = HeaderValue::from_maybe_shared(buf.slice_ref(h.value))
            .map_err(|_| HeadError::Invalid("value"))?;
        map.append(name, value);
    }
    Ok(map)
}

/// A buffer frozen to parse a head from (see [`parse_request`]) back as a
/// `BytesMut` to read more into: no copy while nothing else refers to it.
pub fn unfreeze(buf: Bytes) -> BytesMut {
    buf.try_into_mut()
        .unwrap_or_else(|shared| BytesMut::from(&shared[..]))
}

/// The length of a complete head; `None` while incomplete. A head longer
/// than [`MAX_HEAD`], complete or not, is an error.
fn head_len(status: httparse::Status<usize>, buffered: usize) -> Result<Option<usize>, HeadError> {
    match status {
        httparse::Status::Complete(n) if n <= MAX_HEAD => Ok(Some(n)),
        httparse::Status::Partial if buffered < MAX_HEAD => Ok(None),
        _ => Err(HeadError::TooLarge),
    }
}

/// Parses a request head at the start of `buf`: `Ok(None)` while incomplete,
/// else the head and its length in bytes. Header values refer to `buf`.
pub fn parse_request(buf: &Bytes) -> Result<Option<(request::Parts, usize)>, HeadError> {
    // Uninitialised: the 4 KiB of empty headers need no writing per parse.
    let mut raw = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let Some(len) = head_len(req.parse_with_uninit_headers(buf, &mut raw)?, buf.len())? else {
        return Ok(None);
    };
    let (mut parts, ()) = Request::new(()).into_parts();
    parts.method = Method::from_bytes(req.method.unwrap_or_default().as_bytes())
        .map_err(|_| HeadError::Invalid("method"))?;
    parts.uri = req
        .path
        .unwrap_or_default()
        .parse::<Uri>()
        .map_err(|_| HeadError::Invalid("request target"))?;
    parts.version = version(req.version);
    parts.headers = headers_from(req.headers, buf)?;
    Ok(Some((parts, len)))
}

/// The one parse of a response head both readings share: `Ok(None)` while
/// incomplete, else what `f` makes of the status and the parsed head, and
/// the head's length.
fn parse_response_with<R>(
    buf: &[u8],
    f: impl FnOnce(StatusCode, &httparse::Response<'_, '_>) -> Result<R, HeadError>,
) -> Result<Option<(R, usize)>, HeadError> {
    let mut raw = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let status = httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut resp, buf, &mut raw)?;
    let Some(len) = head_len(status, buf.len())? else {
        return Ok(None);
    };
    let code = StatusCode::from_u16(resp.code.unwrap_or_default())
        .map_err(|_| HeadError::Invalid("status"))?;
    Ok(Some((f(code, &resp)?, len)))
}

/// Parses a response head at the start of `buf` without building a header
/// table (a backend's `101`, on the path of every proxied handshake, is read
/// from its lines): `Ok(None)` while incomplete, else what `f` makes of the
/// status and the header lines (names as sent, in any case), and the head's
/// length.
pub fn parse_response_lines<R>(
    buf: &[u8],
    f: impl FnOnce(StatusCode, &[httparse::Header<'_>]) -> R,
) -> Result<Option<(R, usize)>, HeadError> {
    parse_response_with(buf, |code, resp| Ok(f(code, resp.headers)))
}

/// Parses a response head at the start of `buf`, like [`parse_request`].
pub fn parse_response(buf: &Bytes) -> Result<Option<(response::Parts, usize)>, HeadError> {
    parse_response_with(buf, |code, resp| {
        let (mut parts, ()) = Response::new(()).into_parts();
        parts.status = code;
        parts.version = version(resp.version);
        parts.headers = headers_from(resp.headers, buf)?;
        Ok(parts)
    })
}

/// Appends one header line, `name: value`.
pub fn put_header(out: &mut BytesMut, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

fn put_headers(out: &mut BytesMut, headers: &HeaderMap) {
    for (k, v) in headers {
        put_header(out, k.as_str().as_bytes(), v.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
}

/// Appends an HTTP/1.1 status line.
pub fn put_status_line(out: &mut BytesMut, status: StatusCode) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.extend_from_slice(b" ");
    out.extend_from_slice(status.canonical_reason().unwrap_or("Unknown").as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Appends an HTTP/1.1 request head.
pub fn encode_request_head(out: &mut BytesMut, method: &Method, target: &str, headers: &HeaderMap) {
    put_request_line(out, method, target);
    put_headers(out, headers);
}

/// Appends an HTTP/1.1 request line.
pub fn put_request_line(out: &mut BytesMut, method: &Method, target: &str) {
    out.extend_from_slice(method.as_str().as_bytes());
    out.extend_from_slice(b" ");
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
}

/// Appends an HTTP/1.1 response head.
pub fn encode_response_head(out: &mut BytesMut, status: StatusCode, headers: &HeaderMap) {
    put_status_line(out, status);
    put_headers(out, headers);
}

/// How the body of a response is delimited (RFC 9112 §6.3), for a response
/// to a `GET`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body: 1xx, 204, 304.
    Empty,
    /// `Content-Length`.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Until the connection closes.
    Eof,
}

/// The framing of a response's body, or an error for one that cannot be
/// delimited safely (conflicting lengths, an unknown final coding).
pub fn response_framing(status: StatusCode, headers: &HeaderMap) -> Result<Framing, HeadError> {
    if status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok(Framing::Empty);
    }
    let codings: Vec<&[u8]> = headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(|t| t.trim_ascii())
        .filter(|t| !t.is_empty())
        .collect();
    if let Some(last) = codings.last() {
        return if last.eq_ignore_ascii_case(b"chunked") {
            Ok(Framing::Chunked)
        } else {
            // A response whose final coding is not chunked runs to EOF.
            Ok(Framing::Eof)
        };
    }
    let mut length = None;
    for v in headers.get_all(header::CONTENT_LENGTH) {
        for t in v.as_bytes().split(|b| *b == b',') {
            let t = std::str::from_utf8(t.trim_ascii())
                .map_err(|_| HeadError::Invalid("Content-Length"))?;
            let n: u64 = t
                .parse()
                .map_err(|_| HeadError::Invalid("Content-Length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(HeadError::Invalid("Content-Length"));
            }
            length = Some(n);
        }
    }
    Ok(length.map_or(Framing::Eof, Framing::Length))
}

/// A chunked body that cannot be decoded.
#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    #[error("malformed chunk size line")]
    Size,
    #[error("chunk data not followed by CRLF")]
    Crlf,
    #[error("chunk extension or trailer line longer than {MAX_LINE} bytes")]
    LineTooLong,
}

/// Longest chunk-size line (with extensions) or trailer line accepted.
pub const MAX_LINE: usize = 8 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
    Done,
}

/// What [`ChunkedDecoder::decode`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Chunk {
    /// Body bytes.
    Data(Bytes),
    /// `buf` holds no complete piece: read more, then call again.
    NeedMore,
    /// The last chunk and the trailers are consumed; what follows the body is
    /// left in `buf`.
    Done,
}

/// Decodes `Transfer-Encoding: chunked` (RFC 9112 §7.1) from a buffer that
/// fills up as bytes arrive; sans I/O. Extensions and trailers are dropped.
#[derive(Debug)]
pub struct ChunkedDecoder {
    state: ChunkState,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        ChunkedDecoder {
            state: ChunkState::Size,
        }
    }
}

impl ChunkedDecoder {
    /// Consumes from `buf` what it can and returns the next piece of body.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Chunk, ChunkError> {
        loop {
            match self.state {
                ChunkState::Size => match httparse::parse_chunk_size(buf) {
                    Ok(httparse::Status::Complete((used, size))) => {
                        buf.advance(used);
                        self.state = if size == 0 {
                            ChunkState::Trailers
                        } else {
                            ChunkState::Data(size)
                        };
                    }
                    Ok(httparse::Status::Partial) if buf.len() > MAX_LINE => {
                        return Err(ChunkError::LineTooLong)
                    }
                    Ok(httparse::Status::Partial) => return Ok(Chunk::NeedMore),
                    Err(_) => return Err(ChunkError::Size),
                },
                ChunkState::Data(left) => {
                    if buf.is_empty() {
                        return Ok(Chunk::NeedMore);
                    }
                    let n = left.min(buf.len() as u64) as usize;
                    let data = buf.split_to(n).freeze();
                    self.state = if left == n as u64 {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(left - n as u64)
                    };
                    return Ok(Chunk::Data(data));
                }
                ChunkState::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(Chunk::NeedMore);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(ChunkError::Crlf);
                    }
                    buf.advance(2);
                    self.state = ChunkState::Size;
                }
                ChunkState::Trailers => match buf.windows(2).position(|w| w == b"\r\n") {
                    Some(0) => {
                        buf.advance(2);
                        self.state = ChunkState::Done;
                    }
                    Some(i) if i <= MAX_LINE => buf.advance(i + 2),
                    Some(_) => return Err(ChunkError::LineTooLong),
                    None if buf.len() > MAX_LINE => return Err(ChunkError::LineTooLong),
                    None => return Ok(Chunk::NeedMore),
                },
                ChunkState::Done => return Ok(Chunk::Done),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_request(b: &[u8]) -> Result<Option<(request::Parts, usize)>, HeadError> {
        super::parse_request(&Bytes::copy_from_slice(b))
    }

    fn parse_response(b: &[u8]) -> Result<Option<(response::Parts, usize)>, HeadError> {
        super::parse_response(&Bytes::copy_from_slice(b))
    }

    #[test]
    fn request_heads() {
        let raw = b"GET /chat?x=1 HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nX-A: 1\r\nX-A: 2\r\n\r\nrest";
        for cut in 0..raw.len() - 4 {
            assert!(
                parse_request(&raw[..cut]).unwrap().is_none(),
                "cut at {cut}"
            );
        }
        let (p, len) = parse_request(raw).unwrap().unwrap();
        assert_eq!(&raw[len..], b"rest");
        assert_eq!(p.method, Method::GET);
        assert_eq!(p.uri.path(), "/chat");
        assert_eq!(p.uri.query(), Some("x=1"));
        assert_eq!(p.version, Version::HTTP_11);
        assert_eq!(p.headers.get_all("x-a").iter().count(), 2);
        assert!(parse_request(b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n").is_err());
        assert!(parse_request(b"\x00\x01garbage\r\n\r\n").is_err());
        let big = vec![b'a'; MAX_HEAD];
        assert!(parse_request(&big).is_err());
        let mut long = b"GET / HTTP/1.1\r\nX: ".to_vec();
        long.resize(MAX_HEAD, b'a');
        assert!(matches!(parse_request(&long), Err(HeadError::TooLarge)));
    }

    #[test]
    fn response_heads_and_framing() {
        let raw = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 5\r\n\r\nnope!";
        let (p, len) = parse_response(raw).unwrap().unwrap();
        assert_eq!(p.status, StatusCode::FORBIDDEN);
        assert_eq!(&raw[len..], b"nope!");
        assert_eq!(
            response_framing(p.status, &p.headers).unwrap(),
            Framing::Length(5)
        );

        let framing = |status: u16, h: &[(&str, &str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in h {
                m.append(
                    HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    v.parse().unwrap(),
                );
            }
            response_framing(StatusCode::from_u16(status).unwrap(), &m)
        };
        assert_eq!(
            framing(204, &[("content-length", "9")]).unwrap(),
            Framing::Empty
        );
        assert_eq!(framing(200, &[]).unwrap(), Framing::Eof);
        assert_eq!(
            framing(
                200,
                &[
                    ("transfer-encoding", "gzip, chunked"),
                    ("content-length", "3")
                ]
            )
            .unwrap(),
            Framing::Chunked
        );
        assert_eq!(
            framing(200, &[("transfer-encoding", "gzip")]).unwrap(),
            Framing::Eof
        );
        assert_eq!(
            framing(200, &[("content-length", "3, 3")]).unwrap(),
            Framing::Length(3)
        );
        assert!(framing(200, &[("content-length", "3"), ("content-length", "4")]).is_err());
        assert!(framing(200, &[("content-length", "-1")]).is_err());
    }

    #[test]
    fn heads_are_written_as_parsed() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, "example".parse().unwrap());
        h.append("x-a", "1".parse().unwrap());
        let mut out = BytesMut::new();
        encode_request_head(&mut out, &Method::GET, "/p?q", &h);
        let (p, len) = parse_request(&out).unwrap().unwrap();
        assert_eq!(len, out.len());
        assert_eq!(p.uri, "/p?q");
        assert_eq!(p.headers, h);

        let mut out = BytesMut::new();
        encode_response_head(&mut out, StatusCode::SWITCHING_PROTOCOLS, &h);
        assert!(out.starts_with(b"HTTP/1.1 101 Switching Protocols\r\n"));
        let (p, _) = parse_response(&out).unwrap().unwrap();
        assert_eq!(p.headers, h);
    }

    fn decode_all(wire: &[u8], step: usize) -> Result<(Vec<u8>, Vec<u8>), ChunkError> {
        let mut d = ChunkedDecoder::default();
        let mut buf = BytesMut::new();
        let mut body = vec![];
        let mut fed = 0;
        loop {
            match d.decode(&mut buf)? {
                Chunk::Data(b) => body.extend_from_slice(&b),
                Chunk::Done => return Ok((body, buf.to_vec())),
                Chunk::NeedMore => {
                    if fed == wire.len() {
                        return Err(ChunkError::Size);
                    }
                    let n = step.min(wire.len() - fed);
                    buf.extend_from_slice(&wire[fed..fed + n]);
                    fed += n;
                }
            }
        }
    }

    #[test]
    fn chunked_bodies_in_any_split() {
        let wire =
            b"5;ext=1\r\nhello\r\n1A\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nTrailer: x\r\n\r\nNEXT";
        for step in 1..wire.len() {
            let (body, rest) = decode_all(wire, step).unwrap();
            assert_eq!(body, b"helloabcdefghijklmnopqrstuvwxyz");
            // Whatever was fed past the body stays in the buffer.
            assert!(b"NEXT".starts_with(&rest), "step {step}: {rest:?}");
        }
        assert!(matches!(decode_all(b"zz\r\n", 64), Err(ChunkError::Size)));
        assert!(matches!(
            decode_all(b"2\r\nabX\r\n", 64),
            Err(ChunkError::Crlf)
        ));
        let mut endless = b"0\r\n".to_vec();
        endless.resize(MAX_LINE * 2, b'a');
        assert!(matches!(
            decode_all(&endless, 1024),
            Err(ChunkError::LineTooLong)
        ));
    }
}
