//! permessage-deflate: arbitrary bytes as `Sec-WebSocket-Extensions`
//! values (the offer parser, the server's answer, the client's reading of
//! an answer), and as a compressed message fed in arbitrary pieces to the
//! inflater with a small limit. Nothing may panic; the inflater may return
//! an error, and never more output than the limit allows.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use wsframe::deflate::{self, Config, Inflater};

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    // Header values: the input cut at newlines.
    let values: Vec<&[u8]> = rest.split(|&b| b == b'\n').collect();
    let config = Config {
        server_no_context_takeover: first & 1 != 0,
        client_no_context_takeover: first & 2 != 0,
        server_max_window_bits: 8 + (first >> 2) % 8,
        client_max_window_bits: 8 + (first >> 5),
        ..Config::default()
    };
    if let Some(a) = deflate::negotiate(values.iter().copied(), &config) {
        // The answer the server writes is one the client accepts.
        let answer = a.response();
        let offer = Config::default();
        let _ = deflate::accept_response([answer.as_bytes()], &offer);
    }
    let _ = deflate::accept_response(values.iter().copied(), &config);

    // The inflater: the input as one message, in pieces.
    let limit = 1 << 16;
    let chunk = usize::from(first % 61) + 1;
    let mut inf = Inflater::new(8 + (first >> 4) % 8, first & 1 != 0, limit);
    for _message in 0..2 {
        inf.begin(first & 2 != 0);
        let pieces: Vec<&[u8]> = rest.chunks(chunk).collect();
        let mut produced = 0u64;
        'message: for (i, piece) in pieces.iter().enumerate() {
            let last = i + 1 == pieces.len();
            let mut at = 0;
            for _ in 0..100_000 {
                let mut out = BytesMut::new();
                match inf.inflate(&piece[at..], last, &mut out, 4096) {
                    Ok(step) => {
                        produced += out.len() as u64;
                        assert!(produced <= limit);
                        at += step.consumed;
                        if step.done || (at == piece.len() && !last) {
                            continue 'message;
                        }
                    }
                    Err(_) => return,
                }
            }
            panic!("the inflater made no progress");
        }
        inf.hibernate();
    }
});
