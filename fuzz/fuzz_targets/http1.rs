//! Arbitrary bytes as the gateway's own HTTP/1.1 heads and chunked bodies:
//! request and response heads parse or fail, never panic, and a parsed head
//! says how long it was (the table-free reading of a response agrees); the
//! chunked decoder, fed in arbitrary pieces, only ever consumes what it was
//! given and yields no more body than it read.
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use wsgate::http::h1::{self as http1, Chunk, ChunkedDecoder};

fuzz_target!(|data: &[u8]| {
    let shared = Bytes::copy_from_slice(data);
    if let Ok(Some((_, len))) = http1::parse_request(&shared) {
        assert!(len <= data.len());
    }
    let full = http1::parse_response(&shared);
    if let Ok(Some((head, len))) = &full {
        assert!(*len <= data.len());
        let _ = http1::response_framing(head.status, &head.headers);
    }
    // The table-free reading of a backend's 101 agrees with the full parse
    // on completeness, status and length, and reads the same header lines.
    match (
        http1::parse_response_lines(data, |s, l| (s, l.len())),
        &full,
    ) {
        (Ok(Some(((status, lines), len))), Ok(Some((head, full_len)))) => {
            assert_eq!((status, len), (head.status, *full_len));
            assert_eq!(lines, head.headers.len());
        }
        (Ok(None), Ok(None)) => {}
        // The table-free parse checks less (no header names or values are validated).
        (Ok(Some(_)), Err(_)) | (Err(_), Err(_)) => {}
        (a, b) => panic!(
            "table-free parse {a:?} but full parse {:?}",
            b.as_ref().map(|o| o.as_ref().map(|(_, l)| *l))
        ),
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
