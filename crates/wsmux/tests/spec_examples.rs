//! The example frames in docs/mux.md decode to what the document says.

use bytes::Bytes;
use wsmux::frame::{decode, Flags, Frame};

const SPEC: &str = include_str!("../../../docs/mux.md");

#[test]
fn example_bytes_in_the_spec_decode_as_described() {
    let block = SPEC
        .split("### Example bytes")
        .nth(1)
        .and_then(|s| s.split("```text").nth(1))
        .and_then(|s| s.split("```").next())
        .expect("example block in docs/mux.md");
    let mut checked = 0;
    for line in block.lines().filter(|l| !l.trim().is_empty()) {
        let mut bytes = Vec::new();
        let mut rest = Vec::new();
        for tok in line.split_whitespace() {
            let is_hex = rest.is_empty()
                && tok.len() % 2 == 0
                && tok
                    .chars()
                    .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase());
            if is_hex {
                for i in (0..tok.len()).step_by(2) {
                    bytes.push(u8::from_str_radix(&tok[i..i + 2], 16).unwrap());
                }
            } else {
                rest.push(tok);
            }
        }
        let desc = rest.join(" ");
        let frame = decode(Bytes::from(bytes)).unwrap_or_else(|e| panic!("{line}: {e}"));
        let (name, flags) = match &frame {
            Frame::Data { flags, .. } => ("DATA", *flags),
            Frame::WindowUpdate { flags, .. } => ("WINDOW_UPDATE", *flags),
            Frame::Ping { .. } => ("PING", Flags::empty()),
            Frame::GoAway { .. } => ("GOAWAY", Flags::empty()),
        };
        assert!(desc.starts_with(name), "{line}: decoded as {frame:?}");
        for (flag, fname) in [
            (Flags::SYN, "SYN"),
            (Flags::ACK, "ACK"),
            (Flags::FIN, "FIN"),
            (Flags::RST, "RST"),
        ] {
            let first_words: String = desc.split(',').next().unwrap().to_string();
            assert_eq!(
                flags.contains(flag),
                first_words.split_whitespace().any(|w| w == fname),
                "{line}: flag {fname} in {frame:?}"
            );
        }
        checked += 1;
    }
    assert_eq!(checked, 9);
}
