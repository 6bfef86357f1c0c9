//! The client side of the load generator: targets, connecting (with the
//! WebSocket handshake from `wsframe::handshake`), pre-encoded frames and a
//! receive counter over `wsframe::Decoder`.
//!
//! Frames are encoded once, with a random masking key each, and the same bytes
//! are written again and again: a bridge unmasks into its own buffer, so the
//! source stays valid, and the load generator spends no CPU per message on
//! encoding or masking.

use std::io;
use std::net::SocketAddr;
use std::str::FromStr;

use anyhow::{anyhow, bail, Context};
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wsframe::{
    close_payload, encode_frame, handshake, Decoder, DecoderConfig, Frame, OpCode, Role,
};

/// Bytes read from a socket at a time.
const READ: usize = 64 * 1024;

/// Where the load goes: a WebSocket endpoint, or a raw TCP one.
#[derive(Debug, Clone)]
pub enum Target {
    Ws {
        addr: SocketAddr,
        host: String,
        path: String,
    },
    Tcp {
        addr: SocketAddr,
    },
}

impl Target {
    pub fn ws(addr: SocketAddr) -> Self {
        Target::Ws {
            addr,
            host: addr.to_string(),
            path: "/".into(),
        }
    }

    pub fn tcp(addr: SocketAddr) -> Self {
        Target::Tcp { addr }
    }

    pub fn is_ws(&self) -> bool {
        matches!(self, Target::Ws { .. })
    }

    pub fn addr(&self) -> SocketAddr {
        match self {
            Target::Ws { addr, .. } | Target::Tcp { addr } => *addr,
        }
    }
}

impl FromStr for Target {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        if let Some(rest) = s.strip_prefix("ws://") {
            let (hostport, path) = match rest.find('/') {
                Some(i) => (&rest[..i], &rest[i..]),
                None => (rest, "/"),
            };
            let addr: SocketAddr = hostport
                .parse()
                .with_context(|| format!("{hostport}: want IP:PORT"))?;
            Ok(Target::Ws {
                addr,
                host: hostport.to_string(),
                path: path.to_string(),
            })
        } else if let Some(rest) = s.strip_prefix("tcp://") {
            Ok(Target::Tcp {
                addr: rest
                    .parse()
                    .with_context(|| format!("{rest}: want IP:PORT"))?,
            })
        } else {
            bail!("{s}: want ws://IP:PORT[/path] or tcp://IP:PORT")
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Ws { host, path, .. } => write!(f, "ws://{host}{path}"),
            Target::Tcp { addr } => write!(f, "tcp://{addr}"),
        }
    }
}

/// Connects (TCP_NODELAY) and, for a WebSocket target, runs the opening
/// handshake. Returns the stream and a receiver holding any bytes that
/// arrived with the handshake response.
pub async fn connect(target: &Target) -> anyhow::Result<(TcpStream, Rx)> {
    let mut s = TcpStream::connect(target.addr())
        .await
        .with_context(|| format!("connect {}", target.addr()))?;
    s.set_nodelay(true)?;
    match target {
        Target::Tcp { .. } => Ok((s, Rx::new(false, BytesMut::new()))),
        Target::Ws { host, path, .. } => {
            let key = handshake::generate_key();
            s.write_all(&handshake::client_request(host, path, &key, &[], &[]))
                .await?;
            let mut buf = BytesMut::with_capacity(1024);
            let resp = loop {
                if s.read_buf(&mut buf).await? == 0 {
                    bail!("connection closed during the handshake");
                }
                match handshake::parse_response(&buf) {
                    Ok(Some(r)) => break r,
                    Ok(None) if buf.len() < 16 * 1024 => {}
                    Ok(None) => bail!("handshake response head too large"),
                    Err(e) => bail!("bad handshake response: {e}"),
                }
            };
            if resp.status != 101 {
                bail!("handshake answered with status {}", resp.status);
            }
            if resp.header("sec-websocket-accept")
                != Some(handshake::accept_key(key.as_bytes()).as_str())
            {
                bail!("wrong Sec-WebSocket-Accept");
            }
            let leftover = buf.split_off(resp.head_len);
            Ok((s, Rx::new(true, leftover)))
        }
    }
}

/// The payload pattern: byte `i` of a message is `i * 7 mod 251`.
pub fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| ((i * 7) % 251) as u8).collect()
}

/// `count` copies of one message of `len` payload bytes, encoded back to back
/// (masked binary frames for WebSocket targets, the bare payload for TCP).
/// Returns the bytes and the length of one encoded message.
pub fn messages(ws: bool, len: usize, count: usize) -> (Bytes, usize) {
    let payload = pattern(len);
    let mut out = BytesMut::new();
    for _ in 0..count {
        if ws {
            encode_frame(
                &mut out,
                true,
                OpCode::Binary,
                Some(rand::random()),
                &payload,
            );
        } else {
            out.extend_from_slice(&payload);
        }
    }
    let one = out.len() / count.max(1);
    (out.freeze(), one)
}

/// A masked Close frame with code 1000.
pub fn close_frame() -> Bytes {
    let mut out = BytesMut::new();
    encode_frame(
        &mut out,
        true,
        OpCode::Close,
        Some(rand::random()),
        &close_payload(1000, ""),
    );
    out.freeze()
}

/// What one receive produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Got {
    /// This many payload bytes (TCP: bytes).
    Data(u64),
    /// A Close frame arrived (WebSocket only).
    Closed,
}

/// Counts received payload bytes. For WebSocket targets every frame goes
/// through `wsframe::Decoder` (so the server's framing is validated); the
/// payload itself is only counted, never copied.
pub struct Rx {
    dec: Option<Decoder>,
    buf: BytesMut,
    close_seen: bool,
    /// Keep payload bytes for `recv_exact`-style checks.
    keep: Option<Vec<u8>>,
}

fn proto_err(e: wsframe::ProtocolError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

impl Rx {
    pub fn new(ws: bool, leftover: BytesMut) -> Self {
        let mut buf = leftover;
        buf.reserve(READ);
        Self {
            dec: ws.then(|| Decoder::new(Role::Client, DecoderConfig::default())),
            buf,
            close_seen: false,
            keep: None,
        }
    }

    /// Decodes what is buffered: `None` when more bytes are needed.
    fn decode(&mut self) -> io::Result<Option<Got>> {
        let Some(dec) = self.dec.as_mut() else {
            if self.buf.is_empty() {
                return Ok(None);
            }
            let n = self.buf.len();
            if let Some(k) = self.keep.as_mut() {
                k.extend_from_slice(&self.buf);
            }
            self.buf.clear();
            return Ok(Some(Got::Data(n as u64)));
        };
        if self.close_seen {
            return Ok(Some(Got::Closed));
        }
        let mut got = 0u64;
        while let Some(frame) = dec.next(&mut self.buf).map_err(proto_err)? {
            match frame {
                Frame::Data { payload, .. } => {
                    got += payload.len() as u64;
                    if let Some(k) = self.keep.as_mut() {
                        k.extend_from_slice(&payload);
                    }
                }
                Frame::Control {
                    opcode: OpCode::Close,
                    ..
                } => {
                    self.close_seen = true;
                    break;
                }
                Frame::Control { .. } => {}
            }
        }
        if got > 0 {
            Ok(Some(Got::Data(got)))
        } else if self.close_seen {
            Ok(Some(Got::Closed))
        } else {
            Ok(None)
        }
    }

    /// Reads until something is there. EOF is an error.
    pub async fn recv<R: AsyncRead + Unpin>(&mut self, r: &mut R) -> io::Result<Got> {
        loop {
            if let Some(g) = self.decode()? {
                return Ok(g);
            }
            self.buf.reserve(READ);
            if r.read_buf(&mut self.buf).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    /// Blocking variant of [`Rx::recv`] for the latency test; `scratch` is
    /// the read buffer.
    pub fn recv_blocking<R: io::Read>(&mut self, r: &mut R, scratch: &mut [u8]) -> io::Result<Got> {
        loop {
            if let Some(g) = self.decode()? {
                return Ok(g);
            }
            let n = r.read(scratch)?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            self.buf.extend_from_slice(&scratch[..n]);
        }
    }

    /// Receives exactly `n` payload bytes and returns them (for checks).
    pub async fn recv_bytes<R: AsyncRead + Unpin>(
        &mut self,
        r: &mut R,
        n: usize,
    ) -> anyhow::Result<Vec<u8>> {
        self.keep = Some(Vec::with_capacity(n));
        let mut total = 0u64;
        while total < n as u64 {
            match self.recv(r).await? {
                Got::Data(k) => total += k,
                Got::Closed => return Err(anyhow!("closed after {total} of {n} bytes")),
            }
        }
        Ok(self.keep.take().unwrap_or_default())
    }
}
