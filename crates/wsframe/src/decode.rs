//! The streaming, validating frame decoder.
//!
//! The decoder is sans-IO: the caller reads bytes into a [`BytesMut`] and calls
//! [`Decoder::decode`] until it returns `Ok(None)`. Data frames are handed out
//! in pieces as soon as their bytes arrive (unmasked, split off the buffer
//! without copying), so a 16 MiB message never has to be held whole by a relay
//! that streams it on; control frames are handed out whole. Because all state
//! lives in the decoder and the buffer, a read that is cancelled loses nothing.

use bytes::BytesMut;

use crate::frame::{apply_mask, parse_header, OpCode, RawHeader};
use crate::utf8::Utf8Validator;
use crate::ProtocolError;

/// Which end of the connection the decoder sits at. A server requires masked
/// frames from its client; a client requires unmasked frames from its server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Server,
    Client,
}

/// Decoder settings.
#[derive(Debug, Clone)]
pub struct DecoderConfig {
    /// Largest message (sum of its frames' payloads) accepted; 0 means no limit.
    pub max_message_size: u64,
    /// RSV bits an extension negotiated for use (e.g. `0x40` for
    /// permessage-deflate passed through untouched). Others are errors.
    pub allowed_rsv: u8,
    /// Validate text messages as UTF-8 (fail fast). Turn off only when the
    /// payload is compressed and passed through.
    pub validate_utf8: bool,
}

impl Default for DecoderConfig {
    fn default() -> Self {
        Self {
            max_message_size: 16 << 20,
            allowed_rsv: 0,
            validate_utf8: true,
        }
    }
}

/// What the decoder produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// A piece of a data message's payload.
    Data {
        payload: BytesMut,
        /// `true` for a text message (the opcode of its first frame).
        text: bool,
        /// First piece of the message: the opcode frame's first bytes.
        first: bool,
        /// Last piece of the message: the end of its FIN frame.
        last: bool,
        /// RSV bits of the message's first frame.
        rsv: u8,
    },
    /// A whole control frame (Close payloads are validated).
    Control { opcode: OpCode, payload: BytesMut },
}

#[derive(Debug, Clone, Copy)]
struct Payload {
    remaining: u64,
    mask: Option<[u8; 4]>,
    offset: usize,
    fin: bool,
    /// This frame opened its message (the next piece is the message's first).
    first_pending: bool,
}

#[derive(Debug)]
struct Message {
    text: bool,
    rsv: u8,
    size: u64,
}

/// Streaming frame decoder; see the module documentation.
#[derive(Debug)]
pub struct Decoder {
    role: Role,
    config: DecoderConfig,
    payload: Option<Payload>,
    message: Option<Message>,
    utf8: Utf8Validator,
}

impl Decoder {
    pub fn new(role: Role, config: DecoderConfig) -> Self {
        Self {
            role,
            config,
            payload: None,
            message: None,
            utf8: Utf8Validator::new(),
        }
    }

    /// Whether text messages are checked as UTF-8.
    pub fn validates_utf8(&self) -> bool {
        self.config.validate_utf8
    }

    /// Whether a data message has started and not yet ended.
    pub fn in_message(&self) -> bool {
        self.message.is_some()
    }

    /// Whether the decoder stands exactly between two frames (nothing partial).
    pub fn at_frame_boundary(&self) -> bool {
        self.payload.is_none()
    }

    /// Decodes the next frame or piece of payload from the front of `buf`.
    ///
    /// `Ok(None)` means more bytes are needed. After an error the connection
    /// must be failed with [`ProtocolError::close_code`].
    pub fn next(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, ProtocolError> {
        loop {
            if self.payload.is_none() {
                match self.start_frame(buf)? {
                    Start::NeedMore => return Ok(None),
                    Start::Control(f) => return Ok(Some(f)),
                    Start::Data => {}
                }
            }
            let p = self.payload.as_mut().expect("set by start_frame");
            if p.remaining > 0 && buf.is_empty() {
                return Ok(None);
            }
            let n = (buf.len() as u64).min(p.remaining) as usize;
            let mut piece = buf.split_to(n);
            if let Some(mask) = p.mask {
                apply_mask(&mut piece, mask, p.offset);
            }
            p.offset += n;
            p.remaining -= n as u64;
            let first = std::mem::take(&mut p.first_pending);
            let last = p.remaining == 0 && p.fin;
            if p.remaining == 0 {
                self.payload = None;
            }
            let msg = self
                .message
                .as_ref()
                .expect("data payload belongs to a message");
            let (text, rsv) = (msg.text, msg.rsv);
            if text && self.config.validate_utf8 && rsv & 0x40 == 0 {
                self.utf8
                    .feed(&piece)
                    .map_err(|_| ProtocolError::InvalidUtf8)?;
                if last {
                    self.utf8.finish().map_err(|_| ProtocolError::InvalidUtf8)?;
                }
            }
            if last {
                self.message = None;
            }
            if piece.is_empty() && !first && !last {
                // An empty middle piece carries nothing: go on to the next frame.
                continue;
            }
            return Ok(Some(Frame::Data {
                payload: piece,
                text,
                first,
                last,
                rsv,
            }));
        }
    }

    /// Parses and validates the header at the front of `buf`. A data frame's
    /// header is consumed and its payload set up; a control frame is consumed
    /// only once it is whole, and returned.
    fn start_frame(&mut self, buf: &mut BytesMut) -> Result<Start, ProtocolError> {
        let Some(h) = parse_header(buf)? else {
            return Ok(Start::NeedMore);
        };
        if h.rsv & !self.config.allowed_rsv != 0 {
            return Err(ProtocolError::ReservedBits);
        }
        let opcode = OpCode::from_u8(h.opcode).ok_or(ProtocolError::ReservedOpcode(h.opcode))?;
        match (self.role, h.mask.is_some()) {
            (Role::Server, false) => return Err(ProtocolError::UnmaskedFrame),
            (Role::Client, true) => return Err(ProtocolError::MaskedFrame),
            _ => {}
        }
        if opcode.is_control() {
            return self.control_frame(buf, h, opcode);
        }
        let first = match (opcode, &mut self.message) {
            (OpCode::Continuation, None) => return Err(ProtocolError::UnexpectedContinuation),
            (OpCode::Continuation, Some(m)) => {
                if h.rsv != 0 {
                    // permessage-deflate sets RSV1 on a message's first frame only.
                    return Err(ProtocolError::ReservedBits);
                }
                m.size += h.payload_len;
                false
            }
            (_, Some(_)) => return Err(ProtocolError::ExpectedContinuation),
            (op, None) => {
                self.message = Some(Message {
                    text: op == OpCode::Text,
                    rsv: h.rsv,
                    size: h.payload_len,
                });
                self.utf8 = Utf8Validator::new();
                true
            }
        };
        let size = self.message.as_ref().map_or(0, |m| m.size);
        if self.config.max_message_size != 0 && size > self.config.max_message_size {
            return Err(ProtocolError::MessageTooBig {
                limit: self.config.max_message_size,
            });
        }
        let _ = buf.split_to(h.header_len);
        self.payload = Some(Payload {
            remaining: h.payload_len,
            mask: h.mask,
            offset: 0,
            fin: h.fin,
            first_pending: first,
        });
        Ok(Start::Data)
    }

    fn control_frame(
        &mut self,
        buf: &mut BytesMut,
        h: RawHeader,
        opcode: OpCode,
    ) -> Result<Start, ProtocolError> {
        if !h.fin {
            return Err(ProtocolError::FragmentedControl);
        }
        if h.payload_len > 125 {
            return Err(ProtocolError::ControlTooLong);
        }
        if h.rsv != 0 {
            return Err(ProtocolError::ReservedBits);
        }
        let total = h.header_len + h.payload_len as usize;
        if buf.len() < total {
            return Ok(Start::NeedMore);
        }
        let _ = buf.split_to(h.header_len);
        let mut payload = buf.split_to(h.payload_len as usize);
        if let Some(mask) = h.mask {
            apply_mask(&mut payload, mask, 0);
        }
        if opcode == OpCode::Close {
            validate_close(&payload)?;
        }
        Ok(Start::Control(Frame::Control { opcode, payload }))
    }
}

enum Start {
    NeedMore,
    Data,
    Control(Frame),
}

/// Checks a Close payload: empty, or a sendable code plus a UTF-8 reason.
pub fn validate_close(payload: &[u8]) -> Result<(), ProtocolError> {
    match payload.len() {
        0 => Ok(()),
        1 => Err(ProtocolError::BadClosePayload),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            if !crate::close_code::is_sendable(code) {
                return Err(ProtocolError::BadCloseCode(code));
            }
            std::str::from_utf8(&payload[2..]).map_err(|_| ProtocolError::InvalidUtf8)?;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{encode_frame, write_header};
    use bytes::BufMut;
    use proptest::prelude::*;

    const KEY: Option<[u8; 4]> = Some([9, 8, 7, 6]);

    fn server() -> Decoder {
        Decoder::new(Role::Server, DecoderConfig::default())
    }

    fn drain(d: &mut Decoder, buf: &mut BytesMut) -> Result<Vec<Frame>, ProtocolError> {
        let mut out = vec![];
        while let Some(f) = d.next(buf)? {
            out.push(f);
        }
        Ok(out)
    }

    /// Reassembles data pieces into (text, bytes) messages, plus control opcodes.
    fn messages(frames: Vec<Frame>) -> Vec<(String, Vec<u8>)> {
        let mut out = vec![];
        let mut cur: Option<(bool, Vec<u8>)> = None;
        for f in frames {
            match f {
                Frame::Data {
                    payload,
                    text,
                    first,
                    last,
                    ..
                } => {
                    if first {
                        assert!(cur.is_none());
                        cur = Some((text, vec![]));
                    }
                    cur.as_mut().unwrap().1.extend_from_slice(&payload);
                    if last {
                        let (t, b) = cur.take().unwrap();
                        out.push((if t { "text" } else { "binary" }.to_string(), b));
                    }
                }
                Frame::Control { opcode, payload } => {
                    out.push((format!("{opcode:?}"), payload.to_vec()))
                }
            }
        }
        out
    }

    #[test]
    fn fragmented_message_with_interleaved_ping() {
        let mut b = BytesMut::new();
        write_header(&mut b, false, 0, OpCode::Text, KEY, 3);
        let s = b.len();
        b.put_slice(b"Hel");
        apply_mask(&mut b[s..], KEY.unwrap(), 0);
        encode_frame(&mut b, true, OpCode::Ping, KEY, b"p");
        write_header(&mut b, true, 0, OpCode::Continuation, KEY, 2);
        let s = b.len();
        b.put_slice(b"lo");
        apply_mask(&mut b[s..], KEY.unwrap(), 0);
        let mut d = server();
        let msgs = messages(drain(&mut d, &mut b).unwrap());
        assert_eq!(
            msgs,
            vec![
                ("Ping".into(), b"p".to_vec()),
                ("text".into(), b"Hello".to_vec())
            ]
        );
        assert!(b.is_empty());
    }

    #[test]
    fn byte_at_a_time_gives_same_messages() {
        let mut whole = BytesMut::new();
        encode_frame(
            &mut whole,
            true,
            OpCode::Binary,
            KEY,
            &[1, 2, 3, 4, 5, 6, 7],
        );
        encode_frame(&mut whole, true, OpCode::Text, KEY, "é€".as_bytes());
        encode_frame(&mut whole, true, OpCode::Close, KEY, &[3, 232, b'o', b'k']);
        let mut d = server();
        let mut buf = BytesMut::new();
        let mut frames = vec![];
        for &byte in whole.iter() {
            buf.put_u8(byte);
            frames.extend(drain(&mut d, &mut buf).unwrap());
        }
        let msgs = messages(frames);
        assert_eq!(msgs[0], ("binary".into(), vec![1, 2, 3, 4, 5, 6, 7]));
        assert_eq!(msgs[1], ("text".into(), "é€".as_bytes().to_vec()));
        assert_eq!(msgs[2].0, "Close");
    }

    fn expect_err(bytes: &[u8], role: Role, close: u16) {
        let mut d = Decoder::new(role, DecoderConfig::default());
        let mut b = BytesMut::from(bytes);
        let err = drain(&mut d, &mut b).expect_err("must fail");
        assert_eq!(err.close_code(), close, "{err:?}");
    }

    #[test]
    fn protocol_violations_map_to_close_codes() {
        // Unmasked frame to a server.
        expect_err(&[0x82, 0x00], Role::Server, 1002);
        // Masked frame to a client.
        expect_err(&[0x82, 0x80, 0, 0, 0, 0], Role::Client, 1002);
        // RSV1 without an extension.
        expect_err(&[0xc2, 0x80, 0, 0, 0, 0], Role::Server, 1002);
        // Reserved opcode 3.
        expect_err(&[0x83, 0x80, 0, 0, 0, 0], Role::Server, 1002);
        // Fragmented ping.
        expect_err(&[0x09, 0x80, 0, 0, 0, 0], Role::Server, 1002);
        // Ping longer than 125.
        expect_err(&[0x89, 0xfe, 0, 126, 0, 0, 0, 0], Role::Server, 1002);
        // Continuation with nothing to continue.
        expect_err(&[0x80, 0x80, 0, 0, 0, 0], Role::Server, 1002);
        // New message while one is open.
        expect_err(
            &[0x01, 0x80, 0, 0, 0, 0, 0x81, 0x80, 0, 0, 0, 0],
            Role::Server,
            1002,
        );
        // Close with one byte of payload, and with a reserved code.
        expect_err(&[0x88, 0x81, 0, 0, 0, 0, 3], Role::Server, 1002);
        expect_err(&[0x88, 0x82, 0, 0, 0, 0, 0x03, 0xed], Role::Server, 1002);
        // Invalid UTF-8 in a text message and in a close reason.
        expect_err(&[0x81, 0x81, 0, 0, 0, 0, 0xff], Role::Server, 1007);
        expect_err(
            &[0x88, 0x83, 0, 0, 0, 0, 0x03, 0xe8, 0xff],
            Role::Server,
            1007,
        );
    }

    #[test]
    fn oversized_message_is_1009_before_payload_arrives() {
        let mut d = Decoder::new(
            Role::Server,
            DecoderConfig {
                max_message_size: 10,
                ..Default::default()
            },
        );
        let mut b = BytesMut::new();
        write_header(&mut b, false, 0, OpCode::Binary, KEY, 6);
        b.put_slice(&[0; 6]);
        write_header(&mut b, true, 0, OpCode::Continuation, KEY, 6);
        let err = drain(&mut d, &mut b).unwrap_err();
        assert_eq!(err.close_code(), 1009);
    }

    #[test]
    fn allowed_rsv1_passes_and_skips_utf8_check() {
        let mut d = Decoder::new(
            Role::Server,
            DecoderConfig {
                allowed_rsv: 0x40,
                ..Default::default()
            },
        );
        let mut b = BytesMut::from(&[0xc1, 0x81, 0, 0, 0, 0, 0xff][..]);
        let f = drain(&mut d, &mut b).unwrap();
        assert!(matches!(
            &f[0],
            Frame::Data {
                rsv: 0x40,
                text: true,
                ..
            }
        ));
    }

    proptest! {
        #[test]
        fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..512), chunk in 1usize..64) {
            for role in [Role::Server, Role::Client] {
                let mut d = Decoder::new(role, DecoderConfig { max_message_size: 1 << 20, ..Default::default() });
                let mut buf = BytesMut::new();
                'outer: for piece in data.chunks(chunk) {
                    buf.extend_from_slice(piece);
                    loop {
                        match d.next(&mut buf) {
                            Ok(Some(_)) => {}
                            Ok(None) => break,
                            Err(e) => { prop_assert!(matches!(e.close_code(), 1002 | 1007 | 1009)); break 'outer; }
                        }
                    }
                }
            }
        }

        #[test]
        fn any_message_split_anywhere_round_trips(payload in proptest::collection::vec(any::<u8>(), 0..3000),
                                                  frag in 1usize..1000, chunk in 1usize..700) {
            let mut wire = BytesMut::new();
            let pieces: Vec<&[u8]> = if payload.is_empty() { vec![&[][..]] } else { payload.chunks(frag).collect() };
            for (i, p) in pieces.iter().enumerate() {
                let op = if i == 0 { OpCode::Binary } else { OpCode::Continuation };
                encode_frame(&mut wire, i + 1 == pieces.len(), op, KEY, p);
            }
            let mut d = server();
            let mut buf = BytesMut::new();
            let mut frames = vec![];
            for c in wire.chunks(chunk) {
                buf.extend_from_slice(c);
                frames.extend(drain(&mut d, &mut buf).unwrap());
            }
            let msgs = messages(frames);
            prop_assert_eq!(msgs.len(), 1);
            prop_assert_eq!(&msgs[0].1, &payload);
        }
    }
}
