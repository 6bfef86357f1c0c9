//! Framing functions: how the bytes a stream peer (TCP, Unix) sends become
//! WebSocket messages.
//!
//! A byte stream has no message boundaries; a WebSocket does. A [`Framer`]
//! looks at the bytes buffered from the peer and says where the next message
//! is and whether it is text or binary. The relay calls it after every read
//! until it asks for more bytes, and bounds the buffer by the route's maximum
//! message size (a framer that needs more than that fails the connection with
//! close 1009).
//!
//! | name | one message is |
//! |---|---|
//! | `binary` | whatever one read returned, binary |
//! | `auto` | whatever one read returned; text if valid UTF-8 (a character split across reads is held back until whole) |
//! | `lines` | one line without its separator (default `\n`), text (binary if not UTF-8) |
//! | `length-prefixed` | one big-endian u16/u32 length-prefixed record, header kept or stripped |
//! | `resp` | one whole Redis RESP2/RESP3 reply |
//! | `cql` | one whole Cassandra native-protocol (v3–v5) frame |
//! | `kafka` | one whole Kafka size-prefixed response |
//!
//! ```
//! use wsgate_framing::{FramingSpec, Framer, Kind};
//!
//! let spec = FramingSpec::parse("resp", "").unwrap();
//! let mut framer = spec.new_framer();
//! let buf = b"+OK\r\n$5\r\nhel";
//! let cut = framer.next(buf, false).unwrap().unwrap();
//! assert_eq!(&buf[cut.start..cut.end], b"+OK\r\n");
//! assert_eq!(cut.kind, Kind::Binary);
//! // The bulk string is not whole yet.
//! assert_eq!(framer.next(&buf[cut.consume..], false).unwrap(), None);
//! ```

mod resp;

use std::fmt;

/// The WebSocket message type of a cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Text,
    Binary,
}

/// One message found at the front of the buffer: the message is
/// `buf[start..end]`, and `consume` bytes (≥ `end`, > 0) leave the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cut {
    pub start: usize,
    pub end: usize,
    pub consume: usize,
    pub kind: Kind,
}

impl Cut {
    fn whole(len: usize, kind: Kind) -> Cut {
        Cut {
            start: 0,
            end: len,
            consume: len,
            kind,
        }
    }
}

/// The peer sent bytes that cannot be framed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    #[error("malformed {protocol} data: {reason}")]
    Malformed {
        protocol: &'static str,
        reason: String,
    },
    /// A frame whose header announces more than the protocol allows.
    #[error("malformed {protocol} data: {what} {len} exceeds {limit}")]
    TooBig {
        protocol: &'static str,
        what: &'static str,
        len: u64,
        limit: &'static str,
    },
}

fn malformed(protocol: &'static str, reason: impl Into<String>) -> FramingError {
    FramingError::Malformed {
        protocol,
        reason: reason.into(),
    }
}

/// A framing function. See the crate documentation.
pub trait Framer: Send {
    /// Finds the next message at the front of `buf`; `Ok(None)` asks for more
    /// bytes. `eof` says the peer will send nothing more: a framer must then
    /// not hold back bytes it would otherwise wait on, except a truly partial
    /// protocol frame (the relay delivers that as a final binary message).
    fn next(&mut self, buf: &[u8], eof: bool) -> Result<Option<Cut>, FramingError>;
}

/// A validated framing choice from configuration; makes one framer per connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FramingSpec {
    Binary,
    Auto,
    Lines { separator: Vec<u8> },
    LengthPrefixed { width: u8, keep_header: bool },
    Resp,
    Cql,
    Kafka,
}

/// A framing name or its configuration was not understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SpecError(String);

/// Every framing name, for help texts and error messages.
pub const NAMES: &[&str] = &[
    "binary",
    "auto",
    "lines",
    "length-prefixed",
    "resp",
    "cql",
    "kafka",
];

impl FramingSpec {
    /// Parses a framing name and its configuration string.
    ///
    /// * `lines`: `separator=<escaped>` (`\n`, `\r\n`, `\0`, `\t` or literal text)
    /// * `length-prefixed`: comma-separated `u16` or `u32` (default) and
    ///   `keep-header` or `strip-header` (default)
    /// * the others take no configuration.
    pub fn parse(name: &str, config: &str) -> Result<FramingSpec, SpecError> {
        let config = config.trim();
        let no_config = |spec: FramingSpec| {
            if config.is_empty() {
                Ok(spec)
            } else {
                Err(SpecError(format!(
                    "framing `{name}` takes no configuration, got `{config}`"
                )))
            }
        };
        match name {
            "binary" => no_config(FramingSpec::Binary),
            "auto" => no_config(FramingSpec::Auto),
            "resp" => no_config(FramingSpec::Resp),
            "cql" => no_config(FramingSpec::Cql),
            "kafka" => no_config(FramingSpec::Kafka),
            "lines" => {
                let mut separator = b"\n".to_vec();
                for item in config.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                    match item.split_once('=') {
                        Some(("separator", v)) => separator = unescape(v)?,
                        _ => {
                            return Err(SpecError(format!(
                                "framing `lines`: unknown option `{item}` (expected separator=...)"
                            )))
                        }
                    }
                }
                if separator.is_empty() {
                    return Err(SpecError("framing `lines`: empty separator".into()));
                }
                Ok(FramingSpec::Lines { separator })
            }
            "length-prefixed" => {
                let (mut width, mut keep_header) = (4, false);
                for item in config.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                    match item {
                        "u16" => width = 2,
                        "u32" => width = 4,
                        "keep-header" => keep_header = true,
                        "strip-header" => keep_header = false,
                        _ => {
                            return Err(SpecError(format!(
                                "framing `length-prefixed`: unknown option `{item}` \
                                 (expected u16, u32, keep-header, strip-header)"
                            )))
                        }
                    }
                }
                Ok(FramingSpec::LengthPrefixed { width, keep_header })
            }
            _ => Err(SpecError(format!(
                "unknown framing `{name}` (expected one of: {})",
                NAMES.join(", ")
            ))),
        }
    }

    /// A fresh framer for one connection.
    pub fn new_framer(&self) -> AnyFramer {
        match self {
            FramingSpec::Binary => AnyFramer::Binary,
            FramingSpec::Auto => AnyFramer::Auto,
            FramingSpec::Lines { separator } => AnyFramer::Lines(Lines {
                separator: separator.clone(),
                scanned: 0,
            }),
            FramingSpec::LengthPrefixed { width, keep_header } => AnyFramer::LengthPrefixed {
                width: *width,
                keep_header: *keep_header,
            },
            FramingSpec::Resp => AnyFramer::Resp(resp::Resp::default()),
            FramingSpec::Cql => AnyFramer::Cql,
            FramingSpec::Kafka => AnyFramer::Kafka,
        }
    }

    /// The name this spec was parsed from.
    pub fn name(&self) -> &'static str {
        match self {
            FramingSpec::Binary => "binary",
            FramingSpec::Auto => "auto",
            FramingSpec::Lines { .. } => "lines",
            FramingSpec::LengthPrefixed { .. } => "length-prefixed",
            FramingSpec::Resp => "resp",
            FramingSpec::Cql => "cql",
            FramingSpec::Kafka => "kafka",
        }
    }
}

impl fmt::Display for FramingSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

fn unescape(v: &str) -> Result<Vec<u8>, SpecError> {
    let mut out = Vec::new();
    let mut chars = v.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            let mut b = [0; 4];
            out.extend_from_slice(c.encode_utf8(&mut b).as_bytes());
            continue;
        }
        match chars.next() {
            Some('n') => out.push(b'\n'),
            Some('r') => out.push(b'\r'),
            Some('t') => out.push(b'\t'),
            Some('0') => out.push(0),
            Some('\\') => out.push(b'\\'),
            other => {
                return Err(SpecError(format!(
                    "bad escape `\\{}` in separator",
                    other.map(String::from).unwrap_or_default()
                )))
            }
        }
    }
    Ok(out)
}

/// Enum dispatch over the built-in framers: no allocation per connection.
#[derive(Debug)]
pub enum AnyFramer {
    Binary,
    Auto,
    Lines(Lines),
    LengthPrefixed { width: u8, keep_header: bool },
    Resp(resp::Resp),
    Cql,
    Kafka,
}

impl Framer for AnyFramer {
    fn next(&mut self, buf: &[u8], eof: bool) -> Result<Option<Cut>, FramingError> {
        if buf.is_empty() {
            return Ok(None);
        }
        match self {
            AnyFramer::Binary => Ok(Some(Cut::whole(buf.len(), Kind::Binary))),
            AnyFramer::Auto => Ok(auto(buf, eof)),
            AnyFramer::Lines(l) => Ok(l.next(buf, eof)),
            AnyFramer::LengthPrefixed { width, keep_header } => {
                length_prefixed(buf, *width as usize, *keep_header)
            }
            AnyFramer::Resp(r) => r.next(buf),
            AnyFramer::Cql => cql(buf),
            AnyFramer::Kafka => kafka(buf),
        }
    }
}

/// `auto`: text when valid UTF-8. An unfinished character at the end of a
/// read is held back (at most 3 bytes) so that a text stream split inside a
/// character stays text.
fn auto(buf: &[u8], eof: bool) -> Option<Cut> {
    match std::str::from_utf8(buf) {
        Ok(_) => Some(Cut::whole(buf.len(), Kind::Text)),
        Err(e) if e.error_len().is_none() && !eof => {
            let n = e.valid_up_to();
            (n > 0).then(|| Cut::whole(n, Kind::Text))
        }
        Err(_) => Some(Cut::whole(buf.len(), Kind::Binary)),
    }
}

/// `lines`: remembers how far it has searched so a long line arriving in
/// many reads is scanned once.
#[derive(Debug)]
pub struct Lines {
    separator: Vec<u8>,
    scanned: usize,
}

impl Lines {
    fn next(&mut self, buf: &[u8], eof: bool) -> Option<Cut> {
        let sep = &self.separator;
        let from = self.scanned.saturating_sub(sep.len() - 1).min(buf.len());
        let found = buf[from..]
            .windows(sep.len())
            .position(|w| w == &sep[..])
            .map(|p| p + from);
        let (end, consume) = match found {
            Some(p) => (p, p + sep.len()),
            None if eof => (buf.len(), buf.len()),
            None => {
                self.scanned = buf.len();
                return None;
            }
        };
        self.scanned = 0;
        let kind = if std::str::from_utf8(&buf[..end]).is_ok() {
            Kind::Text
        } else {
            Kind::Binary
        };
        Some(Cut {
            start: 0,
            end,
            consume,
            kind,
        })
    }
}

fn length_prefixed(
    buf: &[u8],
    width: usize,
    keep_header: bool,
) -> Result<Option<Cut>, FramingError> {
    if buf.len() < width {
        return Ok(None);
    }
    let len = if width == 2 {
        u16::from_be_bytes([buf[0], buf[1]]) as usize
    } else {
        u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize
    };
    let total = width + len;
    if buf.len() < total {
        return Ok(None);
    }
    Ok(Some(Cut {
        start: if keep_header { 0 } else { width },
        end: total,
        consume: total,
        kind: Kind::Binary,
    }))
}

/// Cassandra native protocol v3–v5 frame: a 9-byte header (version with the
/// direction bit, flags, 2-byte stream, opcode, 4-byte body length) and the body.
fn cql(buf: &[u8]) -> Result<Option<Cut>, FramingError> {
    let version = buf[0] & 0x7f;
    if !(3..=5).contains(&version) {
        return Err(malformed(
            "cql",
            format!("unsupported protocol version {version}"),
        ));
    }
    if buf.len() < 9 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]);
    if len > 256 << 20 {
        return Err(FramingError::TooBig {
            protocol: "cql",
            what: "body length",
            len: len.into(),
            limit: "256 MiB",
        });
    }
    let total = 9 + len as usize;
    Ok((buf.len() >= total).then(|| Cut::whole(total, Kind::Binary)))
}

/// Kafka: a signed 32-bit big-endian size, then that many bytes.
fn kafka(buf: &[u8]) -> Result<Option<Cut>, FramingError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let size = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if size < 0 {
        return Err(malformed("kafka", format!("negative size {size}")));
    }
    let total = 4 + size as usize;
    Ok((buf.len() >= total).then(|| Cut::whole(total, Kind::Binary)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Feeds `data` in the given chunk sizes the way the relay does and
    /// returns the messages (kind, bytes).
    pub(crate) fn run(spec: &FramingSpec, data: &[u8], chunks: &[usize]) -> Vec<(Kind, Vec<u8>)> {
        let mut f = spec.new_framer();
        let mut buf = Vec::new();
        let mut out = vec![];
        let mut rest = data;
        let mut i = 0;
        loop {
            let eof = rest.is_empty();
            while let Some(cut) = f.next(&buf, eof).unwrap() {
                assert!(cut.start <= cut.end && cut.end <= cut.consume && cut.consume <= buf.len());
                assert!(cut.consume > 0);
                out.push((cut.kind, buf[cut.start..cut.end].to_vec()));
                buf.drain(..cut.consume);
            }
            if eof {
                if !buf.is_empty() {
                    out.push((Kind::Binary, std::mem::take(&mut buf)));
                }
                return out;
            }
            let n = chunks
                .get(i)
                .copied()
                .unwrap_or(rest.len())
                .clamp(1, rest.len());
            i += 1;
            buf.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
        }
    }

    fn spec(name: &str, cfg: &str) -> FramingSpec {
        FramingSpec::parse(name, cfg).unwrap()
    }

    #[test]
    fn auto_keeps_split_character_text() {
        let s = "naïve € 𝄞".as_bytes();
        for cut in 1..s.len() {
            let msgs = run(&spec("auto", ""), s, &[cut]);
            assert!(
                msgs.iter().all(|(k, _)| *k == Kind::Text),
                "cut {cut}: {msgs:?}"
            );
            let joined: Vec<u8> = msgs.into_iter().flat_map(|(_, b)| b).collect();
            assert_eq!(joined, s);
        }
    }

    #[test]
    fn auto_binary_for_invalid_utf8() {
        let msgs = run(&spec("auto", ""), &[0xff, 0xfe, b'a'], &[]);
        assert_eq!(msgs, vec![(Kind::Binary, vec![0xff, 0xfe, b'a'])]);
    }

    #[test]
    fn lines_with_custom_separator_and_partial_tail() {
        let msgs = run(
            &spec("lines", "separator=\\r\\n"),
            b"a\r\nbb\r\nccc",
            &[2, 1, 1],
        );
        let texts: Vec<&[u8]> = msgs.iter().map(|(_, b)| &b[..]).collect();
        assert_eq!(texts, vec![&b"a"[..], b"bb", b"ccc"]);
        assert!(msgs.iter().all(|(k, _)| *k == Kind::Text));
    }

    #[test]
    fn length_prefixed_forms() {
        let data = [0, 3, b'a', b'b', b'c', 0, 0];
        let m = run(&spec("length-prefixed", "u16"), &data, &[1, 1, 1]);
        assert_eq!(m[0].1, b"abc");
        assert_eq!(m[1].1, b"");
        let m = run(&spec("length-prefixed", "u16,keep-header"), &data, &[]);
        assert_eq!(m[0].1, &data[..5]);
        let m = run(&spec("length-prefixed", ""), &[0, 0, 0, 1, 9], &[]);
        assert_eq!(m[0].1, vec![9]);
    }

    #[test]
    fn cql_frames() {
        let mut f = vec![0x84, 0, 0, 1, 0x08, 0, 0, 0, 2, 0xaa, 0xbb];
        f.extend_from_slice(&[0x85, 0, 0, 2, 0x02, 0, 0, 0, 0]);
        let m = run(&spec("cql", ""), &f, &[3, 5, 2]);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].1.len(), 11);
        assert_eq!(m[1].1.len(), 9);
        assert!(spec("cql", "")
            .new_framer()
            .next(&[0x02; 9], false)
            .is_err());
    }

    #[test]
    fn kafka_frames() {
        let m = run(
            &spec("kafka", ""),
            &[0, 0, 0, 2, 1, 2, 0, 0, 0, 0],
            &[1, 1, 1, 1],
        );
        assert_eq!(
            m,
            vec![
                (Kind::Binary, vec![0, 0, 0, 2, 1, 2]),
                (Kind::Binary, vec![0, 0, 0, 0])
            ]
        );
        assert!(spec("kafka", "")
            .new_framer()
            .next(&[0xff, 0, 0, 0], false)
            .is_err());
    }

    #[test]
    fn spec_errors_are_clear() {
        let e = FramingSpec::parse("nope", "").unwrap_err();
        assert!(e.to_string().contains("unknown framing `nope`"));
        assert!(FramingSpec::parse("binary", "x").is_err());
        assert!(FramingSpec::parse("lines", "separator=").is_err());
        assert!(FramingSpec::parse("length-prefixed", "u8").is_err());
    }

    proptest! {
        /// Garbage in any chunking: framers never panic, cuts stay in bounds,
        /// and every byte is accounted for when framing succeeds.
        #[test]
        fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..400),
                                chunks in proptest::collection::vec(1usize..50, 0..20)) {
            for name in NAMES {
                let s = spec(name, "");
                let mut f = s.new_framer();
                let mut buf = Vec::new();
                let mut rest = &data[..];
                let mut i = 0;
                'feed: while !rest.is_empty() {
                    let n = chunks.get(i).copied().unwrap_or(rest.len()).min(rest.len());
                    i += 1;
                    buf.extend_from_slice(&rest[..n]);
                    rest = &rest[n..];
                    loop {
                        match f.next(&buf, rest.is_empty()) {
                            Ok(Some(cut)) => {
                                prop_assert!(cut.start <= cut.end && cut.end <= cut.consume && cut.consume <= buf.len() && cut.consume > 0);
                                buf.drain(..cut.consume);
                            }
                            Ok(None) => break,
                            Err(_) => break 'feed,
                        }
                    }
                }
            }
        }

        #[test]
        fn binary_and_auto_lose_nothing(data in proptest::collection::vec(any::<u8>(), 0..400),
                                        chunks in proptest::collection::vec(1usize..50, 0..20)) {
            for name in ["binary", "auto"] {
                let joined: Vec<u8> = run(&spec(name, ""), &data, &chunks).into_iter().flat_map(|(_, b)| b).collect();
                prop_assert_eq!(&joined, &data);
            }
        }

        #[test]
        fn length_prefixed_round_trip(records in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..10),
                                      chunks in proptest::collection::vec(1usize..50, 0..30)) {
            let mut wire = vec![];
            for r in &records {
                wire.extend_from_slice(&(r.len() as u32).to_be_bytes());
                wire.extend_from_slice(r);
            }
            let got: Vec<Vec<u8>> = run(&spec("length-prefixed", ""), &wire, &chunks).into_iter().map(|(_, b)| b).collect();
            prop_assert_eq!(got, records);
        }
    }
}
