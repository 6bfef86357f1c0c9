//! Arbitrary bytes, fed in arbitrary pieces, into the validating decoder of
//! both roles: it must return frames or an error, never panic, and every
//! payload piece it hands out must come from the input.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use wsframe::{Decoder, DecoderConfig, Frame, Role};

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(first % 64) + 1;
    for role in [Role::Server, Role::Client] {
        let mut d = Decoder::new(
            role,
            DecoderConfig {
                max_message_size: 1 << 16,
                allowed_rsv: if first & 0x80 != 0 { 0x40 } else { 0 },
                validate_utf8: true,
            },
        );
        let mut buf = BytesMut::new();
        let mut total = 0usize;
        'feed: for piece in rest.chunks(chunk) {
            buf.extend_from_slice(piece);
            loop {
                match d.next(&mut buf) {
                    Ok(Some(Frame::Data { payload, .. })) => total += payload.len(),
                    Ok(Some(Frame::Control { payload, .. })) => assert!(payload.len() <= 125),
                    Ok(None) => break,
                    Err(e) => {
                        assert!(matches!(e.close_code(), 1002 | 1007 | 1009));
                        break 'feed;
                    }
                }
            }
        }
        assert!(total <= rest.len());
    }
});
