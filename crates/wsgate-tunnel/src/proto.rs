//! The reverse tunnel's wire format, version 1 (`docs/tunnel.md`): the
//! agent's registration headers, the destination grammar, the open request
//! that starts every stream and the agent's reply, and the datagram framing
//! of `udp://` streams. Sans-IO: bytes in, values out; every decoder checks
//! that a whole message is there before it parses (`Ok(None)`: read more),
//! and refuses anything malformed with a [`ProtoError`], never a panic.

use std::fmt;
use std::str::FromStr;

use bytes::{Buf, BufMut, BytesMut};

/// The WebSocket subprotocol of an agent's registration.
pub const AGENT_PROTOCOL: &str = "wsgate-agent.v1";
/// The WebSocket subprotocol of `/mux` (a wsmux session, `docs/mux.md`).
pub const MUX_PROTOCOL: &str = "wsmux.v1";
/// Registration header: the id the agent registers under.
pub const ID_HEADER: &str = "wsgate-agent-id";
/// Registration header: the destinations the agent allows (informational
/// for the gateway, which picks agents by it; the agent checks every open).
pub const ALLOW_HEADER: &str = "wsgate-agent-allow";
/// The version byte of open requests and replies.
pub const VERSION: u8 = 1;
/// The first byte of an open request (`W`).
pub const OPEN_MAGIC: u8 = 0x57;
/// Longest destination in an open request, and longest reply message.
pub const MAX_TEXT: usize = 1024;
/// Longest agent id.
pub const MAX_ID: usize = 64;
/// Most allow patterns a registration may announce.
pub const MAX_ALLOW: usize = 256;
/// Largest datagram on a `udp://` stream (the u16 length prefix's range).
pub const MAX_DATAGRAM: usize = u16::MAX as usize;

/// The wsmux reset code for a stream whose open request is malformed.
pub const RESET_BAD_OPEN: u32 = 0x100;
/// The wsmux reset code for a stream whose open request came too late.
pub const RESET_OPEN_TIMEOUT: u32 = 0x101;

/// Why bytes are not a valid message of this protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("not an open request (first byte {0:#04x})")]
    BadMagic(u8),
    #[error("unsupported version {0}")]
    BadVersion(u8),
    #[error("{what} of {len} bytes is over the {max}-byte limit")]
    TooLong {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{0} is not UTF-8")]
    NotUtf8(&'static str),
    #[error("unknown reply status {0}")]
    BadStatus(u8),
    #[error("invalid destination `{input}`: {why}")]
    BadDestination { input: String, why: &'static str },
    #[error("invalid agent id `{0}` (1-64 of A-Z a-z 0-9 . _ -, not starting with a dot)")]
    BadId(String),
    #[error("invalid allow pattern `{input}`: {why}")]
    BadPattern { input: String, why: &'static str },
}

// ---------------------------------------------------------------------------
// Agent ids.

/// Whether `id` is a valid agent id: 1 to 64 of `A-Z a-z 0-9 . _ -`, not
/// starting with a dot.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Checks an agent id.
pub fn parse_id(id: &str) -> Result<&str, ProtoError> {
    if valid_id(id) {
        Ok(id)
    } else {
        Err(ProtoError::BadId(id.chars().take(80).collect()))
    }
}

// ---------------------------------------------------------------------------
// Destinations.

/// What a stream carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    /// A TCP connection's bytes.
    Tcp,
    /// Datagrams, each framed with a u16 length.
    Udp,
    /// A TCP connection over which the gateway speaks HTTP/1.1.
    Http,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Tcp => "tcp",
            Scheme::Udp => "udp",
            Scheme::Http => "http",
        }
    }

    fn parse(s: &str) -> Option<Scheme> {
        match s {
            "tcp" => Some(Scheme::Tcp),
            "udp" => Some(Scheme::Udp),
            "http" => Some(Scheme::Http),
            _ => None,
        }
    }
}

/// A destination behind an agent: `tcp://HOST:PORT`, `udp://HOST:PORT` or
/// `http://HOST:PORT`. HOST is a DNS name, an IPv4 address or a bracketed
/// IPv6 address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Destination {
    pub scheme: Scheme,
    /// Without brackets for IPv6.
    pub host: String,
    pub port: u16,
}

/// Splits `host:port` (IPv6 in brackets); the host comes back without them.
fn split_host_port(rest: &str) -> Result<(&str, u16), &'static str> {
    let (host, port) = if let Some(r) = rest.strip_prefix('[') {
        let (h, p) = r.split_once(']').ok_or("unclosed `[`")?;
        (h, p.strip_prefix(':').ok_or("missing :PORT")?)
    } else {
        rest.rsplit_once(':').ok_or("missing :PORT")?
    };
    if host.is_empty() {
        return Err("missing host");
    }
    let port: u16 = port.parse().map_err(|_| "bad port")?;
    if port == 0 {
        return Err("port 0");
    }
    Ok((host, port))
}

fn valid_host(h: &str) -> bool {
    h.len() <= 253
        && (h.parse::<std::net::IpAddr>().is_ok()
            || h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_')))
}

impl FromStr for Destination {
    type Err = ProtoError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why| ProtoError::BadDestination {
            input: s.chars().take(80).collect(),
            why,
        };
        let (scheme, rest) = s.split_once("://").ok_or(bad("missing SCHEME://"))?;
        let scheme = Scheme::parse(scheme).ok_or(bad("scheme is not tcp, udp or http"))?;
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let (host, port) = split_host_port(rest).map_err(bad)?;
        if !valid_host(host) {
            return Err(bad("invalid host"));
        }
        Ok(Destination {
            scheme,
            host: host.to_ascii_lowercase(),
            port,
        })
    }
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(
                f,
                "{}://[{}]:{}",
                self.scheme.as_str(),
                self.host,
                self.port
            )
        } else {
            write!(f, "{}://{}:{}", self.scheme.as_str(), self.host, self.port)
        }
    }
}

/// A destination reached through an agent: `agent://ID/DESTINATION`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AgentDestination {
    pub agent: String,
    pub dest: Destination,
}

impl FromStr for AgentDestination {
    type Err = ProtoError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s
            .strip_prefix("agent://")
            .ok_or(ProtoError::BadDestination {
                input: s.chars().take(80).collect(),
                why: "missing agent://",
            })?;
        let (id, dest) = rest.split_once('/').ok_or(ProtoError::BadDestination {
            input: s.chars().take(80).collect(),
            why: "expected agent://ID/SCHEME://HOST:PORT",
        })?;
        Ok(AgentDestination {
            agent: parse_id(id)?.to_string(),
            dest: dest.parse()?,
        })
    }
}

impl fmt::Display for AgentDestination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "agent://{}/{}", self.agent, self.dest)
    }
}

/// What a `/mux` stream may name: a destination the gateway reaches itself,
/// or one behind an agent.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    Direct(Destination),
    Agent(AgentDestination),
}

impl FromStr for Target {
    type Err = ProtoError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.starts_with("agent://") {
            s.parse().map(Target::Agent)
        } else {
            s.parse().map(Target::Direct)
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Direct(d) => d.fmt(f),
            Target::Agent(a) => a.fmt(f),
        }
    }
}

// ---------------------------------------------------------------------------
// Open requests and replies.

/// The first bytes of every stream the opener sends: `W`, version, u16
/// length, the destination's text.
pub fn encode_open(dest: &str, out: &mut BytesMut) {
    let text = &dest.as_bytes()[..dest.len().min(MAX_TEXT)];
    out.reserve(4 + text.len());
    out.put_u8(OPEN_MAGIC);
    out.put_u8(VERSION);
    out.put_u16(text.len() as u16);
    out.put_slice(text);
}

/// Reads an open request from the front of `buf`: `Ok(None)` until it is
/// whole; its destination's text, consumed from `buf`, once it is.
pub fn decode_open(buf: &mut BytesMut) -> Result<Option<String>, ProtoError> {
    if let Some(&m) = buf.first() {
        if m != OPEN_MAGIC {
            return Err(ProtoError::BadMagic(m));
        }
    }
    if let Some(&v) = buf.get(1) {
        if v != VERSION {
            return Err(ProtoError::BadVersion(v));
        }
    }
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = usize::from(u16::from_be_bytes([buf[2], buf[3]]));
    if len > MAX_TEXT {
        return Err(ProtoError::TooLong {
            what: "destination",
            len,
            max: MAX_TEXT,
        });
    }
    if buf.len() < 4 + len {
        return Ok(None);
    }
    let text = std::str::from_utf8(&buf[4..4 + len])
        .map_err(|_| ProtoError::NotUtf8("destination"))?
        .to_string();
    buf.advance(4 + len);
    Ok(Some(text))
}

/// The agent's (or `/mux`'s) answer to an open request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Connected: the destination's bytes follow.
    Ok = 0,
    /// The destination is not allowed (403).
    NotAllowed = 1,
    /// The destination cannot be reached (502).
    Unreachable = 2,
    /// Connecting took too long (504).
    Timeout = 3,
    /// No agent for the destination is connected (503), from `/mux`.
    NoAgent = 4,
}

impl Status {
    fn from_u8(b: u8) -> Result<Status, ProtoError> {
        Ok(match b {
            0 => Status::Ok,
            1 => Status::NotAllowed,
            2 => Status::Unreachable,
            3 => Status::Timeout,
            4 => Status::NoAgent,
            b => return Err(ProtoError::BadStatus(b)),
        })
    }
}

/// An answer to an open request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: Status,
    /// Why, for a refusal (empty for `Ok`).
    pub message: String,
}

impl Reply {
    pub fn ok() -> Reply {
        Reply {
            status: Status::Ok,
            message: String::new(),
        }
    }

    pub fn refuse(status: Status, message: impl Into<String>) -> Reply {
        Reply {
            status,
            message: message.into(),
        }
    }

    /// version, status, u16 length, the message's text.
    pub fn encode(&self, out: &mut BytesMut) {
        let mut end = self.message.len().min(MAX_TEXT);
        while !self.message.is_char_boundary(end) {
            end -= 1;
        }
        let text = &self.message.as_bytes()[..end];
        out.reserve(4 + text.len());
        out.put_u8(VERSION);
        out.put_u8(self.status as u8);
        out.put_u16(text.len() as u16);
        out.put_slice(text);
    }

    /// Reads a reply from the front of `buf` (`Ok(None)`: not whole yet).
    pub fn decode(buf: &mut BytesMut) -> Result<Option<Reply>, ProtoError> {
        if let Some(&v) = buf.first() {
            if v != VERSION {
                return Err(ProtoError::BadVersion(v));
            }
        }
        if buf.len() < 4 {
            return Ok(None);
        }
        let status = Status::from_u8(buf[1])?;
        let len = usize::from(u16::from_be_bytes([buf[2], buf[3]]));
        if len > MAX_TEXT {
            return Err(ProtoError::TooLong {
                what: "reply message",
                len,
                max: MAX_TEXT,
            });
        }
        if buf.len() < 4 + len {
            return Ok(None);
        }
        let message = std::str::from_utf8(&buf[4..4 + len])
            .map_err(|_| ProtoError::NotUtf8("reply message"))?
            .to_string();
        buf.advance(4 + len);
        Ok(Some(Reply { status, message }))
    }
}

// ---------------------------------------------------------------------------
// Datagrams on udp:// streams.

/// Appends one datagram, framed: u16 big-endian length, payload.
pub fn encode_datagram(payload: &[u8], out: &mut BytesMut) -> Result<(), ProtoError> {
    if payload.len() > MAX_DATAGRAM {
        return Err(ProtoError::TooLong {
            what: "datagram",
            len: payload.len(),
            max: MAX_DATAGRAM,
        });
    }
    out.reserve(2 + payload.len());
    out.put_u16(payload.len() as u16);
    out.put_slice(payload);
    Ok(())
}

/// Takes one whole datagram off the front of `buf`, if one is there.
pub fn decode_datagram(buf: &mut BytesMut) -> Option<BytesMut> {
    if buf.len() < 2 {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([buf[0], buf[1]]));
    if buf.len() < 2 + len {
        return None;
    }
    buf.advance(2);
    Some(buf.split_to(len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_parse_and_print_back() {
        for (text, shown) in [
            ("tcp://db.internal:5432", "tcp://db.internal:5432"),
            ("udp://10.0.0.2:53", "udp://10.0.0.2:53"),
            ("http://127.0.0.1:8081/", "http://127.0.0.1:8081"),
            ("tcp://[::1]:22", "tcp://[::1]:22"),
            ("tcp://DB.Internal:1", "tcp://db.internal:1"),
        ] {
            let d: Destination = text.parse().unwrap();
            assert_eq!(d.to_string(), shown);
        }
        for bad in [
            "",
            "tcp://",
            "tcp://host",
            "tcp://host:0",
            "tcp://host:x",
            "ftp://host:1",
            "tcp://a b:1",
            "tcp://[::1:22",
            "unix:/x",
            "tcp://h:1/path",
        ] {
            assert!(bad.parse::<Destination>().is_err(), "{bad}");
        }
        let a: AgentDestination = "agent://site-a/tcp://10.0.0.5:22".parse().unwrap();
        assert_eq!((a.agent.as_str(), a.dest.port), ("site-a", 22));
        assert_eq!(a.to_string(), "agent://site-a/tcp://10.0.0.5:22");
        for bad in [
            "agent://",
            "agent://a",
            "agent://../tcp://h:1",
            "agent://a/b",
        ] {
            assert!(bad.parse::<AgentDestination>().is_err(), "{bad}");
        }
        assert!(matches!(
            "agent://x/udp://h:1".parse(),
            Ok(Target::Agent(_))
        ));
        assert!(matches!("tcp://h:1".parse(), Ok(Target::Direct(_))));
    }

    #[test]
    fn ids_are_plain_names() {
        for ok in ["site-a", "A.b_c-9", &"x".repeat(64)] {
            assert!(valid_id(ok), "{ok}");
        }
        for bad in ["", ".hidden", "a/b", "a b", "é", &"x".repeat(65)] {
            assert!(!valid_id(bad), "{bad}");
        }
    }

    #[test]
    fn open_requests_round_trip_in_any_chunking() {
        let mut wire = BytesMut::new();
        encode_open("tcp://10.0.0.5:22", &mut wire);
        wire.extend_from_slice(b"then data");
        for cut in 0..wire.len() {
            let mut buf = BytesMut::from(&wire[..cut]);
            match decode_open(&mut buf).unwrap() {
                None => assert!(cut < 4 + 17),
                Some(d) => {
                    assert_eq!(d, "tcp://10.0.0.5:22");
                    assert_eq!(&buf[..], &wire[21..cut]);
                }
            }
        }
    }

    #[test]
    fn garbage_open_requests_are_errors_not_panics() {
        for bad in [
            &b"GET / HTTP/1.1\r\n"[..],
            &[OPEN_MAGIC, 2, 0, 0][..],
            &[OPEN_MAGIC, 1, 0xff, 0xff][..],
            &[OPEN_MAGIC, 1, 0, 2, 0xff, 0xfe][..],
        ] {
            let mut buf = BytesMut::from(bad);
            assert!(decode_open(&mut buf).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn replies_round_trip_and_refuse_garbage() {
        for r in [
            Reply::ok(),
            Reply::refuse(Status::NotAllowed, "tcp://x:1 is not allowed"),
            Reply::refuse(Status::Unreachable, "connection refused"),
        ] {
            let mut wire = BytesMut::new();
            r.encode(&mut wire);
            let mut part = BytesMut::from(&wire[..wire.len() - 1]);
            if wire.len() > 4 {
                assert_eq!(Reply::decode(&mut part).unwrap(), None);
            }
            assert_eq!(Reply::decode(&mut wire).unwrap(), Some(r));
            assert!(wire.is_empty());
        }
        // A message cut at the limit keeps whole characters.
        let long = Reply::refuse(Status::Unreachable, "é".repeat(MAX_TEXT));
        let mut wire = BytesMut::new();
        long.encode(&mut wire);
        assert!(Reply::decode(&mut wire).unwrap().is_some());
        assert!(Reply::decode(&mut BytesMut::from(&[1, 9, 0, 0][..])).is_err());
        assert!(Reply::decode(&mut BytesMut::from(&[7][..])).is_err());
    }

    #[test]
    fn datagrams_keep_their_boundaries() {
        let mut wire = BytesMut::new();
        for d in [&b""[..], b"a", &[7u8; 1000][..]] {
            encode_datagram(d, &mut wire).unwrap();
        }
        let mut got = vec![];
        while let Some(d) = decode_datagram(&mut wire) {
            got.push(d.len());
        }
        assert_eq!(got, [0, 1, 1000]);
        assert!(encode_datagram(&vec![0; MAX_DATAGRAM + 1], &mut wire).is_err());
    }
}
