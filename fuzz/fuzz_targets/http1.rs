//! Arbitrary bytes as the gateway's own HTTP/1.1 heads and chunked bodies:
//! request and response heads parse or fail, never panic, and a parsed head
//! says how long it was; the chunked decoder, fed in arbitrary pieces, only
//! ever consumes what it was given and yields no more body than it read.
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use wsgate::http1::{self, Chunk, ChunkedDecoder};

fuzz_target!(|data: &[u8]| {
    let shared = Bytes::copy_from_slice(data);
    if let Ok(Some((_, len))) = http1::parse_request(&shared) {
        assert!(len <= data.len());
    }
    if let Ok(Some((head, len))) = http1::parse_response(&shared) {
        assert!(len <= data.len());
        let _ = http1::response_framing(head.status, &head.headers);
    }
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let step = usize::from(first % 61) + 1;
    let mut d = ChunkedDecoder::default();
    let mut buf = BytesMut::new();
    let mut body = 0usize;
    for piece in rest.chunks(step) {
        buf.extend_from_slice(piece);
        loop {
            match d.decode(&mut buf) {
                Ok(Chunk::Data(b)) => {
                    assert!(!b.is_empty());
                    body += b.len();
                }
                Ok(Chunk::NeedMore) | Ok(Chunk::Done) => break,
                Err(_) => return,
            }
        }
    }
    assert!(body <= rest.len());
});
