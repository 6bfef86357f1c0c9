//! Arbitrary bytes as one WebSocket message: the decoder must return a frame
//! or an error, never panic; a decoded frame re-encodes to the same bytes
//! (GOAWAY reasons are decoded lossily, so those only need to decode again).
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use wsmux::frame::{decode, Frame};

fuzz_target!(|data: &[u8]| {
    let msg = Bytes::copy_from_slice(data);
    if let Ok(frame) = decode(msg.clone()) {
        let again = frame.encode();
        if matches!(frame, Frame::GoAway { .. }) {
            assert!(decode(again).is_ok());
        } else {
            assert_eq!(again, msg);
        }
    }
});
