//! The wire codec: one WebSocket binary message is exactly one mux frame.
//!
//! The layout is specified in `docs/mux.md` (protocol version 1). Every frame
//! starts with a fixed 12-byte header in network byte order:
//!
//! ```text
//!  0        1        2        3        4                8               12
//! +--------+--------+--------+--------+----------------+----------------+-----------
//! |version |  type  |     flags       |   stream id    |     value      | payload...
//! +--------+--------+--------+--------+----------------+----------------+-----------
//! ```
//!
//! The payload length is not encoded: the WebSocket message boundary gives it.
//! Decoding is stateless and never panics; every malformed input is a
//! [`FrameError`], which maps to a [`GoAwayCode`] for the GOAWAY that ends the
//! session.

use bytes::{BufMut, Bytes, BytesMut};
use std::fmt;

/// The protocol version this crate speaks.
pub const VERSION: u8 = 1;
/// Size of the fixed frame header in bytes.
pub const HEADER_LEN: usize = 12;
/// The largest DATA payload a peer may send in one frame (64 KiB).
pub const MAX_DATA_PAYLOAD: usize = 64 * 1024;
/// The largest GOAWAY reason a peer may send.
pub const MAX_GOAWAY_REASON: usize = 1024;
/// The receive window every stream starts with, in each direction, before any
/// WINDOW_UPDATE (256 KiB). Both peers assume it without negotiation.
pub const INITIAL_WINDOW: u32 = 256 * 1024;

/// Frame type (header byte 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameType {
    /// Stream payload; may carry SYN, ACK, FIN or RST.
    Data = 0,
    /// Grants send credit; may carry SYN, ACK or FIN.
    WindowUpdate = 1,
    /// Keepalive and RTT probe on stream 0 (SYN = request, ACK = response).
    Ping = 2,
    /// Session shutdown on stream 0 with a code.
    GoAway = 3,
}

impl FrameType {
    fn from_u8(b: u8) -> Option<Self> {
        match b {
            0 => Some(Self::Data),
            1 => Some(Self::WindowUpdate),
            2 => Some(Self::Ping),
            3 => Some(Self::GoAway),
            _ => None,
        }
    }
}

/// Frame flags (header bytes 2..4).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Flags(pub u16);

impl Flags {
    /// Opens a stream (or: PING request).
    pub const SYN: Flags = Flags(0x1);
    /// Acknowledges a stream open (or: PING response).
    pub const ACK: Flags = Flags(0x2);
    /// The sender will send no more data on this stream (half-close).
    pub const FIN: Flags = Flags(0x4);
    /// Abort the stream in both directions; `value` carries the reset code.
    pub const RST: Flags = Flags(0x8);
    const ALL: u16 = 0xf;

    /// No flag set.
    pub const fn empty() -> Self {
        Flags(0)
    }
    /// Whether every flag in `other` is set.
    pub const fn contains(self, other: Flags) -> bool {
        self.0 & other.0 == other.0
    }
    /// Union of two flag sets.
    pub const fn with(self, other: Flags) -> Flags {
        Flags(self.0 | other.0)
    }
}

impl fmt::Debug for Flags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        for (flag, name) in [
            (Self::SYN, "SYN"),
            (Self::ACK, "ACK"),
            (Self::FIN, "FIN"),
            (Self::RST, "RST"),
        ] {
            if self.contains(flag) {
                parts.push(name);
            }
        }
        write!(f, "Flags({})", parts.join("|"))
    }
}

/// Codes carried by GOAWAY (`value` field).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GoAwayCode {
    /// Graceful: no new streams; existing streams finish.
    Normal,
    /// The peer violated the protocol.
    ProtocolError,
    /// A frame carried a version this implementation does not speak.
    UnsupportedVersion,
    /// A WebSocket text message arrived; only binary messages are allowed.
    TextMessage,
    /// The peer sent more than its credit on some stream.
    FlowControlError,
    /// The peer did not answer a keepalive PING before the deadline.
    KeepaliveTimeout,
    /// Local failure unrelated to the peer.
    InternalError,
    /// A code this implementation does not know.
    Other(u32),
}

impl GoAwayCode {
    /// The numeric value on the wire.
    pub fn to_u32(self) -> u32 {
        match self {
            Self::Normal => 0,
            Self::ProtocolError => 1,
            Self::UnsupportedVersion => 2,
            Self::TextMessage => 3,
            Self::FlowControlError => 4,
            Self::KeepaliveTimeout => 5,
            Self::InternalError => 6,
            Self::Other(v) => v,
        }
    }
    /// Parse a wire value (unknown values become [`GoAwayCode::Other`]).
    pub fn from_u32(v: u32) -> Self {
        match v {
            0 => Self::Normal,
            1 => Self::ProtocolError,
            2 => Self::UnsupportedVersion,
            3 => Self::TextMessage,
            4 => Self::FlowControlError,
            5 => Self::KeepaliveTimeout,
            6 => Self::InternalError,
            v => Self::Other(v),
        }
    }
}

impl fmt::Display for GoAwayCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Normal => write!(f, "NORMAL(0)"),
            Self::ProtocolError => write!(f, "PROTOCOL_ERROR(1)"),
            Self::UnsupportedVersion => write!(f, "UNSUPPORTED_VERSION(2)"),
            Self::TextMessage => write!(f, "TEXT_MESSAGE(3)"),
            Self::FlowControlError => write!(f, "FLOW_CONTROL_ERROR(4)"),
            Self::KeepaliveTimeout => write!(f, "KEEPALIVE_TIMEOUT(5)"),
            Self::InternalError => write!(f, "INTERNAL_ERROR(6)"),
            Self::Other(v) => write!(f, "UNKNOWN({v})"),
        }
    }
}

/// Well-known reset codes carried by a DATA frame with the RST flag.
/// Applications may use any other value with [`crate::Stream::reset`].
pub mod reset_code {
    /// The stream was dropped or cancelled without a FIN.
    pub const CANCEL: u32 = 0;
    /// The receiver refused the stream (accept backlog full, stream limit,
    /// connection memory limit, or GOAWAY sent).
    pub const REFUSED: u32 = 1;
    /// The receiver hit an internal error.
    pub const INTERNAL: u32 = 2;
}

/// A decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// DATA: `payload` for `stream_id`; with RST, `rst_code` is the reset code.
    Data {
        /// Stream id (never 0).
        stream_id: u32,
        /// SYN/ACK/FIN/RST.
        flags: Flags,
        /// Reset code when `flags` has RST, otherwise 0.
        rst_code: u32,
        /// Payload (empty with RST).
        payload: Bytes,
    },
    /// WINDOW_UPDATE: `delta` more bytes of credit for `stream_id`.
    WindowUpdate {
        /// Stream id (never 0).
        stream_id: u32,
        /// SYN/ACK/FIN (never RST).
        flags: Flags,
        /// Credit increment.
        delta: u32,
    },
    /// PING request (`ack == false`) or response (`ack == true`).
    Ping {
        /// Response?
        ack: bool,
        /// Opaque value echoed by the response.
        opaque: u32,
    },
    /// GOAWAY with a code and an optional human-readable reason.
    GoAway {
        /// Why.
        code: GoAwayCode,
        /// UTF-8 reason (lossy-decoded), at most 1024 bytes on the wire.
        reason: String,
    },
}

/// Why a message is not a valid frame. Each maps to a GOAWAY code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Shorter than the 12-byte header.
    #[error("frame of {0} bytes is shorter than the 12-byte header")]
    Truncated(usize),
    /// Version byte is not [`VERSION`].
    #[error("unsupported protocol version {0} (this implementation speaks {VERSION})")]
    UnsupportedVersion(u8),
    /// Type byte unknown.
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    /// Reserved flag bits set.
    #[error("unknown flag bits {0:#06x}")]
    UnknownFlags(u16),
    /// A flag combination or field that the type forbids.
    #[error("invalid {typ:?} frame: {what}")]
    Invalid {
        /// The frame type.
        typ: FrameType,
        /// What is wrong.
        what: &'static str,
    },
    /// A DATA payload above [`MAX_DATA_PAYLOAD`].
    #[error("DATA payload of {0} bytes exceeds the 65536-byte maximum")]
    PayloadTooLarge(usize),
}

impl FrameError {
    /// The GOAWAY code a receiver sends for this error.
    pub fn goaway_code(&self) -> GoAwayCode {
        match self {
            Self::UnsupportedVersion(_) => GoAwayCode::UnsupportedVersion,
            _ => GoAwayCode::ProtocolError,
        }
    }
}

fn invalid(typ: FrameType, what: &'static str) -> FrameError {
    FrameError::Invalid { typ, what }
}

/// Decode one frame from one binary message. Never panics.
pub fn decode(msg: Bytes) -> Result<Frame, FrameError> {
    if msg.len() < HEADER_LEN {
        // Still report a wrong version if we can see it: a peer from the
        // future may legitimately send shorter headers.
        if let Some(&v) = msg.first() {
            if v != VERSION {
                return Err(FrameError::UnsupportedVersion(v));
            }
        }
        return Err(FrameError::Truncated(msg.len()));
    }
    let version = msg[0];
    if version != VERSION {
        return Err(FrameError::UnsupportedVersion(version));
    }
    let typ = FrameType::from_u8(msg[1]).ok_or(FrameError::UnknownType(msg[1]))?;
    let flags = u16::from_be_bytes([msg[2], msg[3]]);
    if flags & !Flags::ALL != 0 {
        return Err(FrameError::UnknownFlags(flags));
    }
    let flags = Flags(flags);
    let stream_id = u32::from_be_bytes([msg[4], msg[5], msg[6], msg[7]]);
    let value = u32::from_be_bytes([msg[8], msg[9], msg[10], msg[11]]);
    let payload_len = msg.len() - HEADER_LEN;

    match typ {
        FrameType::Data | FrameType::WindowUpdate => {
            if stream_id == 0 {
                return Err(invalid(typ, "stream id 0"));
            }
            if flags.contains(Flags::SYN) && flags.contains(Flags::ACK) {
                return Err(invalid(typ, "SYN and ACK together"));
            }
            if typ == FrameType::WindowUpdate {
                if flags.contains(Flags::RST) {
                    return Err(invalid(typ, "RST is only valid on DATA"));
                }
                if payload_len != 0 {
                    return Err(invalid(typ, "non-empty payload"));
                }
                return Ok(Frame::WindowUpdate {
                    stream_id,
                    flags,
                    delta: value,
                });
            }
            if flags.contains(Flags::RST) {
                if payload_len != 0 {
                    return Err(invalid(typ, "RST with payload"));
                }
            } else if value != 0 {
                return Err(invalid(typ, "non-zero value without RST"));
            }
            if payload_len > MAX_DATA_PAYLOAD {
                return Err(FrameError::PayloadTooLarge(payload_len));
            }
            let rst_code = if flags.contains(Flags::RST) { value } else { 0 };
            Ok(Frame::Data {
                stream_id,
                flags,
                rst_code,
                payload: msg.slice(HEADER_LEN..),
            })
        }
        FrameType::Ping => {
            if stream_id != 0 {
                return Err(invalid(typ, "stream id not 0"));
            }
            if payload_len != 0 {
                return Err(invalid(typ, "non-empty payload"));
            }
            let ack = if flags == Flags::SYN {
                false
            } else if flags == Flags::ACK {
                true
            } else {
                return Err(invalid(typ, "flags must be exactly SYN or ACK"));
            };
            Ok(Frame::Ping { ack, opaque: value })
        }
        FrameType::GoAway => {
            if stream_id != 0 {
                return Err(invalid(typ, "stream id not 0"));
            }
            if flags != Flags::empty() {
                return Err(invalid(typ, "flags set"));
            }
            if payload_len > MAX_GOAWAY_REASON {
                return Err(invalid(typ, "reason longer than 1024 bytes"));
            }
            Ok(Frame::GoAway {
                code: GoAwayCode::from_u32(value),
                reason: String::from_utf8_lossy(&msg[HEADER_LEN..]).into_owned(),
            })
        }
    }
}

/// Write a header into `buf`.
pub(crate) fn put_header(
    buf: &mut BytesMut,
    typ: FrameType,
    flags: Flags,
    stream_id: u32,
    value: u32,
) {
    buf.put_u8(VERSION);
    buf.put_u8(typ as u8);
    buf.put_u16(flags.0);
    buf.put_u32(stream_id);
    buf.put_u32(value);
}

/// The 12 header bytes of a frame.
pub(crate) fn header(typ: FrameType, flags: Flags, stream_id: u32, value: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0] = VERSION;
    h[1] = typ as u8;
    h[2..4].copy_from_slice(&flags.0.to_be_bytes());
    h[4..8].copy_from_slice(&stream_id.to_be_bytes());
    h[8..12].copy_from_slice(&value.to_be_bytes());
    h
}

/// One outgoing frame with its header apart from its payload, so that a
/// payload (a slice of what the application wrote) reaches the transport
/// without being copied: see [`crate::Transport::start_send_parts`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// The 12 header bytes.
    pub header: [u8; HEADER_LEN],
    /// The payload (empty for most control frames).
    pub payload: Bytes,
}

impl Outgoing {
    /// A frame of `header` and `payload`.
    pub fn new(header: [u8; HEADER_LEN], payload: Bytes) -> Outgoing {
        Outgoing { header, payload }
    }

    /// The frame's size on the wire (one message): header and payload.
    pub fn wire_len(&self) -> usize {
        HEADER_LEN + self.payload.len()
    }

    /// The whole frame as one message (a copy).
    pub fn to_bytes(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(self.wire_len());
        b.extend_from_slice(&self.header);
        b.extend_from_slice(&self.payload);
        b.freeze()
    }

    /// Split an encoded frame (at least a header) into its two parts.
    pub(crate) fn from_encoded(mut b: Bytes) -> Outgoing {
        let payload = b.split_off(HEADER_LEN);
        let mut header = [0u8; HEADER_LEN];
        header.copy_from_slice(&b);
        Outgoing { header, payload }
    }
}

/// Encode a DATA frame whose payload is copied from `data`.
#[cfg(test)]
pub(crate) fn encode_data(stream_id: u32, flags: Flags, data: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(HEADER_LEN + data.len());
    put_header(&mut buf, FrameType::Data, flags, stream_id, 0);
    buf.extend_from_slice(data);
    buf.freeze()
}

fn header_only(typ: FrameType, flags: Flags, stream_id: u32, value: u32) -> Bytes {
    let mut buf = BytesMut::with_capacity(HEADER_LEN);
    put_header(&mut buf, typ, flags, stream_id, value);
    buf.freeze()
}

impl Frame {
    /// Encode into one message. (The session encodes DATA frames directly
    /// from the writer's buffer; this is used for control frames and tests.)
    pub fn encode(&self) -> Bytes {
        match self {
            Frame::Data {
                stream_id,
                flags,
                rst_code,
                payload,
            } => {
                let mut buf = BytesMut::with_capacity(HEADER_LEN + payload.len());
                let value = if flags.contains(Flags::RST) {
                    *rst_code
                } else {
                    0
                };
                put_header(&mut buf, FrameType::Data, *flags, *stream_id, value);
                buf.extend_from_slice(payload);
                buf.freeze()
            }
            Frame::WindowUpdate {
                stream_id,
                flags,
                delta,
            } => header_only(FrameType::WindowUpdate, *flags, *stream_id, *delta),
            Frame::Ping { ack, opaque } => header_only(
                FrameType::Ping,
                if *ack { Flags::ACK } else { Flags::SYN },
                0,
                *opaque,
            ),
            Frame::GoAway { code, reason } => {
                let r = reason.as_bytes();
                let r = &r[..r.len().min(MAX_GOAWAY_REASON)];
                let mut buf = BytesMut::with_capacity(HEADER_LEN + r.len());
                put_header(
                    &mut buf,
                    FrameType::GoAway,
                    Flags::empty(),
                    0,
                    code.to_u32(),
                );
                buf.extend_from_slice(r);
                buf.freeze()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(f: Frame) {
        let enc = f.encode();
        assert_eq!(decode(enc).unwrap(), f);
    }

    #[test]
    fn roundtrips() {
        roundtrip(Frame::Data {
            stream_id: 1,
            flags: Flags::SYN,
            rst_code: 0,
            payload: Bytes::from_static(b"hello"),
        });
        roundtrip(Frame::Data {
            stream_id: 2,
            flags: Flags::FIN.with(Flags::ACK),
            rst_code: 0,
            payload: Bytes::new(),
        });
        roundtrip(Frame::Data {
            stream_id: 7,
            flags: Flags::RST,
            rst_code: 99,
            payload: Bytes::new(),
        });
        roundtrip(Frame::WindowUpdate {
            stream_id: u32::MAX,
            flags: Flags::SYN,
            delta: 12345,
        });
        roundtrip(Frame::Ping {
            ack: false,
            opaque: 7,
        });
        roundtrip(Frame::Ping {
            ack: true,
            opaque: u32::MAX,
        });
        roundtrip(Frame::GoAway {
            code: GoAwayCode::ProtocolError,
            reason: "bad".into(),
        });
        roundtrip(Frame::GoAway {
            code: GoAwayCode::Other(77),
            reason: String::new(),
        });
    }

    #[test]
    fn exact_layout() {
        let f = Frame::WindowUpdate {
            stream_id: 0x01020304,
            flags: Flags::ACK,
            delta: 0x0a0b0c0d,
        };
        assert_eq!(
            &f.encode()[..],
            &[1, 1, 0, 2, 1, 2, 3, 4, 0x0a, 0x0b, 0x0c, 0x0d]
        );
        let d = encode_data(3, Flags::FIN, b"xy");
        assert_eq!(&d[..], &[1, 0, 0, 4, 0, 0, 0, 3, 0, 0, 0, 0, b'x', b'y']);
    }

    fn raw(v: u8, t: u8, flags: u16, id: u32, value: u32, payload: &[u8]) -> Bytes {
        let mut b = BytesMut::new();
        b.put_u8(v);
        b.put_u8(t);
        b.put_u16(flags);
        b.put_u32(id);
        b.put_u32(value);
        b.extend_from_slice(payload);
        b.freeze()
    }

    #[test]
    fn rejects() {
        assert_eq!(decode(Bytes::new()), Err(FrameError::Truncated(0)));
        assert_eq!(
            decode(Bytes::from_static(&[1, 0, 0])),
            Err(FrameError::Truncated(3))
        );
        assert_eq!(
            decode(Bytes::from_static(&[2])),
            Err(FrameError::UnsupportedVersion(2))
        );
        let e = decode(raw(9, 0, 0, 1, 0, b"")).unwrap_err();
        assert_eq!(e, FrameError::UnsupportedVersion(9));
        assert_eq!(e.goaway_code(), GoAwayCode::UnsupportedVersion);
        assert_eq!(
            decode(raw(1, 4, 0, 1, 0, b"")),
            Err(FrameError::UnknownType(4))
        );
        assert_eq!(
            decode(raw(1, 0, 0x10, 1, 0, b"")),
            Err(FrameError::UnknownFlags(0x10))
        );
        // stream 0 for DATA / WINDOW_UPDATE
        assert!(decode(raw(1, 0, 0, 0, 0, b"x")).is_err());
        assert!(decode(raw(1, 1, 0, 0, 5, b"")).is_err());
        // SYN|ACK
        assert!(decode(raw(1, 1, 3, 1, 0, b"")).is_err());
        // RST on WINDOW_UPDATE
        assert!(decode(raw(1, 1, 8, 1, 0, b"")).is_err());
        // WINDOW_UPDATE with payload
        assert!(decode(raw(1, 1, 0, 1, 0, b"x")).is_err());
        // RST with payload / value without RST
        assert!(decode(raw(1, 0, 8, 1, 3, b"x")).is_err());
        assert!(decode(raw(1, 0, 0, 1, 3, b"x")).is_err());
        // PING rules
        assert!(decode(raw(1, 2, 1, 1, 0, b"")).is_err());
        assert!(decode(raw(1, 2, 0, 0, 0, b"")).is_err());
        assert!(decode(raw(1, 2, 3, 0, 0, b"")).is_err());
        assert!(decode(raw(1, 2, 1, 0, 0, b"x")).is_err());
        // GOAWAY rules
        assert!(decode(raw(1, 3, 0, 1, 0, b"")).is_err());
        assert!(decode(raw(1, 3, 1, 0, 0, b"")).is_err());
        assert!(decode(raw(1, 3, 0, 0, 0, &[b'a'; 1025])).is_err());
        // oversize DATA
        let big = vec![0u8; MAX_DATA_PAYLOAD + 1];
        assert_eq!(
            decode(raw(1, 0, 0, 1, 0, &big)),
            Err(FrameError::PayloadTooLarge(MAX_DATA_PAYLOAD + 1))
        );
        assert!(decode(raw(1, 0, 0, 1, 0, &big[1..])).is_ok());
    }

    #[test]
    fn goaway_codes_roundtrip() {
        for v in 0..10 {
            assert_eq!(GoAwayCode::from_u32(v).to_u32(), v);
        }
    }

    #[test]
    fn data_payload_is_zero_copy_slice() {
        let msg = encode_data(5, Flags::empty(), b"abcdef");
        let ptr = msg.as_ptr();
        match decode(msg).unwrap() {
            Frame::Data { payload, .. } => {
                assert_eq!(payload.as_ptr() as usize, ptr as usize + HEADER_LEN);
            }
            f => panic!("{f:?}"),
        }
    }

    proptest::proptest! {
        #[test]
        fn decode_never_panics(data in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let _ = decode(Bytes::from(data));
        }

        #[test]
        fn decode_valid_header_then_encode_is_identity(
            t in 0u8..4, flags in 0u16..16, id in proptest::num::u32::ANY,
            value in proptest::num::u32::ANY, payload in "[a-z]{0,64}"
        ) {
            let msg = raw(1, t, flags, id, value, payload.as_bytes());
            if let Ok(f) = decode(msg.clone()) {
                proptest::prop_assert_eq!(f.encode(), msg);
            }
        }
    }
}
