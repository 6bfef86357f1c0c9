//! Arbitrary bytes as the start of a tunnel stream (docs/tunnel.md §2–§4):
//! the open-request decoder, the reply decoder and the datagram decoder
//! must return a value, ask for more, or fail — never panic, never consume
//! what they did not parse — and whatever they accept encodes back to the
//! same bytes. A destination text goes through every destination parser.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use wsgate_tunnel::proto::{self, Destination, Reply, Target};

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    if let Ok(Some(text)) = proto::decode_open(&mut buf) {
        let mut again = BytesMut::new();
        proto::encode_open(&text, &mut again);
        assert_eq!(&again[..], &data[..again.len()]);
        assert_eq!(buf.len(), data.len() - again.len());
        if let Ok(t) = text.parse::<Target>() {
            // What parses prints to something that parses to the same.
            assert_eq!(t.to_string().parse::<Target>().unwrap(), t);
        }
        let _ = text.parse::<Destination>();
    }
    let mut buf = BytesMut::from(data);
    if let Ok(Some(r)) = Reply::decode(&mut buf) {
        let mut again = BytesMut::new();
        r.encode(&mut again);
        assert_eq!(&again[..], &data[..again.len()]);
    }
    let mut buf = BytesMut::from(data);
    let mut seen = 0;
    while let Some(d) = proto::decode_datagram(&mut buf) {
        seen += 2 + d.len();
    }
    assert_eq!(seen + buf.len(), data.len());
});
