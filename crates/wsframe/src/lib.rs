//! `wsframe` — a sans-IO WebSocket (RFC 6455) frame codec, and a small
//! message-level WebSocket for clients, tests and tools.
//!
//! Why our own codec rather than a general WebSocket crate: a gateway needs
//! things those crates do not expose together —
//! * payloads streamed on **in pieces as they arrive** (a 16 MiB message is
//!   relayed to a TCP peer with a bounded buffer, never held whole);
//! * a decoder whose whole state lives outside the socket, so a connection
//!   waiting for bytes holds **no read buffer** and a cancelled read loses nothing;
//! * RSV bits **passed through** untouched, so permessage-deflate can be
//!   negotiated end to end between a client and a backend;
//! * permessage-deflate (RFC 7692) for the ends that terminate it
//!   ([`deflate`]): negotiation, and inflation bounded by the message size;
//! * header-only parsing ([`parse_header`]) for relays that only need frame
//!   boundaries.
//!
//! The [`Decoder`] validates everything RFC 6455 asks of a receiver (masking,
//! reserved bits and opcodes, control-frame rules, fragmentation order, close
//! codes, UTF-8 of text, message size) and maps each violation to its close
//! code via [`ProtocolError::close_code`].
//!
//! ```
//! use bytes::BytesMut;
//! use wsframe::{encode_frame, Decoder, DecoderConfig, Frame, OpCode, Role};
//!
//! let mut wire = BytesMut::new();
//! encode_frame(&mut wire, true, OpCode::Text, Some([1, 2, 3, 4]), b"hello");
//! let mut dec = Decoder::new(Role::Server, DecoderConfig::default());
//! match dec.next(&mut wire).unwrap() {
//!     Some(Frame::Data { payload, text: true, first: true, last: true, .. }) => {
//!         assert_eq!(&payload[..], b"hello")
//!     }
//!     other => panic!("{other:?}"),
//! }
//! ```

mod decode;
pub mod deflate;
mod frame;
pub mod handshake;
mod utf8;
#[cfg(feature = "tokio")]
mod ws;

pub use decode::{validate_close, Decoder, DecoderConfig, Frame, Role};
pub use frame::{
    apply_mask, close_code, close_payload, encode_frame, parse_close_payload, parse_header,
    write_header, OpCode, RawHeader, MAX_HEADER_LEN,
};
pub use utf8::{InvalidUtf8, Utf8Validator};
#[cfg(feature = "tokio")]
pub use ws::{Error, Message, WebSocket, WsReader, WsWriter};

/// A violation of RFC 6455 by the remote end, or of a configured limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("reserved bits set without a negotiated extension")]
    ReservedBits,
    #[error("reserved opcode {0:#x}")]
    ReservedOpcode(u8),
    #[error("client frame not masked")]
    UnmaskedFrame,
    #[error("server frame masked")]
    MaskedFrame,
    #[error("fragmented control frame")]
    FragmentedControl,
    #[error("control frame longer than 125 bytes")]
    ControlTooLong,
    #[error("continuation frame without a message to continue")]
    UnexpectedContinuation,
    #[error("new data frame while a fragmented message is open")]
    ExpectedContinuation,
    #[error("64-bit payload length with its top bit set")]
    BadLength,
    #[error("close frame with a 1-byte payload")]
    BadClosePayload,
    #[error("close code {0} may not be sent")]
    BadCloseCode(u16),
    #[error("invalid UTF-8 in a text message or close reason")]
    InvalidUtf8,
    #[error("message larger than the {limit}-byte limit")]
    MessageTooBig { limit: u64 },
    #[error("invalid permessage-deflate data")]
    BadDeflate,
}

impl ProtocolError {
    /// The close code the connection must be failed with.
    pub fn close_code(&self) -> u16 {
        match self {
            ProtocolError::InvalidUtf8 | ProtocolError::BadDeflate => close_code::INVALID_PAYLOAD,
            ProtocolError::MessageTooBig { .. } => close_code::TOO_BIG,
            _ => close_code::PROTOCOL_ERROR,
        }
    }
}
