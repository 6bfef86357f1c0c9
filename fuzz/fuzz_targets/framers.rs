//! Arbitrary peer bytes, in arbitrary reads, through every framing function:
//! cuts stay inside the buffer and always make progress; errors are fine,
//! panics are not.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wsgate_framing::{Framer, FramingSpec, NAMES};

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(first % 97) + 1;
    for name in NAMES {
        let mut framer = FramingSpec::parse(name, "").unwrap().new_framer();
        let mut buf: Vec<u8> = Vec::new();
        let mut pieces = rest.chunks(chunk).peekable();
        'feed: while let Some(piece) = pieces.next() {
            buf.extend_from_slice(piece);
            let eof = pieces.peek().is_none();
            loop {
                match framer.next(&buf, eof) {
                    Ok(Some(cut)) => {
                        assert!(cut.start <= cut.end && cut.end <= cut.consume);
                        assert!(cut.consume > 0 && cut.consume <= buf.len());
                        buf.drain(..cut.consume);
                    }
                    Ok(None) => break,
                    Err(_) => break 'feed,
                }
            }
        }
    }
});
