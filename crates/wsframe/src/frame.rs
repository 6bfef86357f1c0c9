//! Frame headers, opcodes, masking and close payloads (RFC 6455 §5).

use bytes::BufMut;

/// The largest header a frame can have: 2 bytes, 8 bytes of extended length, 4 of mask.
pub const MAX_HEADER_LEN: usize = 14;

/// A frame opcode (RFC 6455 §5.2). Reserved opcodes are rejected by the decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpCode {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

impl OpCode {
    /// The four-bit wire value.
    pub fn as_u8(self) -> u8 {
        match self {
            OpCode::Continuation => 0x0,
            OpCode::Text => 0x1,
            OpCode::Binary => 0x2,
            OpCode::Close => 0x8,
            OpCode::Ping => 0x9,
            OpCode::Pong => 0xA,
        }
    }

    /// Parses a wire value; `None` for the reserved opcodes 3–7 and 11–15.
    pub fn from_u8(v: u8) -> Option<OpCode> {
        Some(match v {
            0x0 => OpCode::Continuation,
            0x1 => OpCode::Text,
            0x2 => OpCode::Binary,
            0x8 => OpCode::Close,
            0x9 => OpCode::Ping,
            0xA => OpCode::Pong,
            _ => return None,
        })
    }

    /// Close, Ping and Pong are control frames: never fragmented, at most 125 bytes.
    pub fn is_control(self) -> bool {
        matches!(self, OpCode::Close | OpCode::Ping | OpCode::Pong)
    }
}

/// A frame header exactly as it appeared on the wire, before any validation of
/// its meaning. Used by the decoder and, on its own, by relays that only track
/// frame boundaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawHeader {
    pub fin: bool,
    /// The three RSV bits, in place (`0x40` is RSV1).
    pub rsv: u8,
    /// The raw four-bit opcode, reserved values included.
    pub opcode: u8,
    pub mask: Option<[u8; 4]>,
    pub payload_len: u64,
    /// How many bytes the header itself occupies.
    pub header_len: usize,
}

/// Parses one frame header from the start of `buf`.
///
/// Returns `Ok(None)` when more bytes are needed, and an error only for a
/// 64-bit length with its most significant bit set, which RFC 6455 forbids.
pub fn parse_header(buf: &[u8]) -> Result<Option<RawHeader>, crate::ProtocolError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let b0 = buf[0];
    let b1 = buf[1];
    let masked = b1 & 0x80 != 0;
    let len7 = b1 & 0x7f;
    let ext = match len7 {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let header_len = 2 + ext + if masked { 4 } else { 0 };
    if buf.len() < header_len {
        return Ok(None);
    }
    let payload_len = match ext {
        0 => u64::from(len7),
        2 => u64::from(u16::from_be_bytes([buf[2], buf[3]])),
        _ => {
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            let len = u64::from_be_bytes(b);
            if len >> 63 != 0 {
                return Err(crate::ProtocolError::BadLength);
            }
            len
        }
    };
    let mask = if masked {
        let at = 2 + ext;
        Some([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]])
    } else {
        None
    };
    Ok(Some(RawHeader {
        fin: b0 & 0x80 != 0,
        rsv: b0 & 0x70,
        opcode: b0 & 0x0f,
        mask,
        payload_len,
        header_len,
    }))
}

/// Appends a frame header to `out`.
pub fn write_header<B: BufMut>(
    out: &mut B,
    fin: bool,
    rsv: u8,
    opcode: OpCode,
    mask: Option<[u8; 4]>,
    payload_len: usize,
) {
    out.put_u8(if fin { 0x80 } else { 0 } | (rsv & 0x70) | opcode.as_u8());
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    if payload_len < 126 {
        out.put_u8(mask_bit | payload_len as u8);
    } else if payload_len <= u16::MAX as usize {
        out.put_u8(mask_bit | 126);
        out.put_u16(payload_len as u16);
    } else {
        out.put_u8(mask_bit | 127);
        out.put_u64(payload_len as u64);
    }
    if let Some(m) = mask {
        out.put_slice(&m);
    }
}

/// Appends a whole frame (header and payload, masked when `mask` is given) to `out`.
pub fn encode_frame(
    out: &mut bytes::BytesMut,
    fin: bool,
    opcode: OpCode,
    mask: Option<[u8; 4]>,
    payload: &[u8],
) {
    out.reserve(MAX_HEADER_LEN + payload.len());
    write_header(out, fin, 0, opcode, mask, payload.len());
    let start = out.len();
    out.extend_from_slice(payload);
    if let Some(m) = mask {
        apply_mask(&mut out[start..], m, 0);
    }
}

/// XORs `buf` with the masking key, as if `buf` started `offset` bytes into the
/// frame's payload (so a payload may be unmasked in pieces).
pub fn apply_mask(buf: &mut [u8], mask: [u8; 4], offset: usize) {
    let mut key = [0u8; 4];
    for (i, k) in key.iter_mut().enumerate() {
        *k = mask[(offset + i) % 4];
    }
    // Eight bytes at a time; the compiler vectorises this loop.
    let wide = u64::from_ne_bytes([
        key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3],
    ]);
    let mut chunks = buf.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(chunk);
        let v = u64::from_ne_bytes(w) ^ wide;
        chunk.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= key[i % 4];
    }
}

/// Close status codes used by the gateway (RFC 6455 §7.4.1).
pub mod close_code {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const UNSUPPORTED: u16 = 1003;
    pub const NO_STATUS: u16 = 1005;
    pub const ABNORMAL: u16 = 1006;
    pub const INVALID_PAYLOAD: u16 = 1007;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const INTERNAL_ERROR: u16 = 1011;
    pub const TRY_AGAIN_LATER: u16 = 1013;
    /// A gateway's upstream went away or answered wrongly.
    pub const BAD_GATEWAY: u16 = 1014;

    /// Whether `code` may appear in a Close frame on the wire.
    pub fn is_sendable(code: u16) -> bool {
        matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
    }
}

/// Builds a Close frame payload. The reason is cut at a character boundary so
/// the payload stays within the 125-byte control-frame limit.
pub fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut p = Vec::with_capacity(2 + end);
    p.extend_from_slice(&code.to_be_bytes());
    p.extend_from_slice(&reason.as_bytes()[..end]);
    p
}

/// Splits a (validated) Close payload into its code and reason.
pub fn parse_close_payload(payload: &[u8]) -> Option<(u16, &str)> {
    if payload.len() < 2 {
        return None;
    }
    let code = u16::from_be_bytes([payload[0], payload[1]]);
    let reason = std::str::from_utf8(&payload[2..]).unwrap_or("");
    Some((code, reason))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;

    #[test]
    fn header_round_trip_all_length_forms() {
        for len in [0usize, 1, 125, 126, 127, 65535, 65536, 1 << 24] {
            for mask in [None, Some([1, 2, 3, 4])] {
                let mut out = BytesMut::new();
                write_header(&mut out, true, 0x40, OpCode::Binary, mask, len);
                let h = parse_header(&out).unwrap().unwrap();
                assert_eq!(h.payload_len, len as u64);
                assert_eq!(h.mask, mask);
                assert_eq!(h.rsv, 0x40);
                assert_eq!(h.opcode, 2);
                assert!(h.fin);
                assert_eq!(h.header_len, out.len());
                // Every strict prefix asks for more bytes.
                for cut in 0..out.len() {
                    assert_eq!(parse_header(&out[..cut]).unwrap(), None);
                }
            }
        }
    }

    #[test]
    fn rejects_length_with_msb_set() {
        let mut b = vec![0x82, 127];
        b.extend_from_slice(&(1u64 << 63).to_be_bytes());
        assert!(parse_header(&b).is_err());
    }

    #[test]
    fn mask_in_pieces_equals_mask_whole() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        let key = [0xde, 0xad, 0xbe, 0xef];
        let mut whole = data.clone();
        apply_mask(&mut whole, key, 0);
        for split in [0, 1, 3, 7, 8, 13, 999] {
            let mut parts = data.clone();
            let (a, b) = parts.split_at_mut(split);
            apply_mask(a, key, 0);
            apply_mask(b, key, split);
            assert_eq!(parts, whole, "split at {split}");
        }
        let mut back = whole.clone();
        apply_mask(&mut back, key, 0);
        assert_eq!(back, data);
    }

    #[test]
    fn close_payload_truncates_on_char_boundary() {
        let reason = "é".repeat(100);
        let p = close_payload(1000, &reason);
        assert!(p.len() <= 125);
        assert!(std::str::from_utf8(&p[2..]).is_ok());
        assert_eq!(parse_close_payload(&p).unwrap().0, 1000);
    }
}
