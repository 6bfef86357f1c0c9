//! Redis RESP2 and RESP3: find where one whole reply ends.
//!
//! Only the extent of a value is computed; nothing is decoded into memory.
//! Streamed strings (`$?` … `;0`) and streamed aggregates (`*?` … `.`) of RESP3
//! are understood, and attributes (`|`) belong to the value that follows them.

use crate::{malformed, Cut, FramingError, Kind};

/// Nesting deeper than this is refused rather than risking the stack.
const MAX_DEPTH: usize = 256;

/// The RESP framer. It remembers the smallest buffer length at which the
/// pending reply can possibly be whole, so a 10 MB bulk string arriving in
/// hundreds of reads is parsed once, not once per read.
#[derive(Debug, Default)]
pub struct Resp {
    need: usize,
}

enum Scan {
    /// The value ends at this offset.
    Done(usize),
    /// More bytes are needed; at least this many in total.
    Need(usize),
}

impl Resp {
    pub(crate) fn next(&mut self, buf: &[u8]) -> Result<Option<Cut>, FramingError> {
        if buf.len() < self.need {
            return Ok(None);
        }
        match value(buf, 0, 0)? {
            Scan::Done(end) => {
                self.need = 0;
                Ok(Some(Cut {
                    start: 0,
                    end,
                    consume: end,
                    kind: Kind::Binary,
                }))
            }
            Scan::Need(n) => {
                self.need = n.max(buf.len() + 1);
                Ok(None)
            }
        }
    }
}

/// Finds the CRLF-terminated line starting at `at`; returns (line, next offset).
fn line(buf: &[u8], at: usize) -> Result<Option<(&[u8], usize)>, FramingError> {
    const MAX_LINE: usize = 64 * 1024;
    let rest = &buf[at..];
    match rest.iter().position(|&b| b == b'\n') {
        Some(p) if p > 0 && rest[p - 1] == b'\r' => Ok(Some((&rest[..p - 1], at + p + 1))),
        Some(_) => Err(malformed("resp", "line not terminated by CRLF")),
        None if rest.len() > MAX_LINE => Err(malformed("resp", "line longer than 64 KiB")),
        None => Ok(None),
    }
}

fn int(s: &[u8]) -> Result<i64, FramingError> {
    std::str::from_utf8(s)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            malformed(
                "resp",
                format!("bad length {:?}", String::from_utf8_lossy(s)),
            )
        })
}

fn value(buf: &[u8], at: usize, depth: usize) -> Result<Scan, FramingError> {
    if depth > MAX_DEPTH {
        return Err(malformed("resp", "nesting too deep"));
    }
    if at >= buf.len() {
        return Ok(Scan::Need(at + 1));
    }
    let Some((head, next)) = line(buf, at + 1)? else {
        return Ok(Scan::Need(buf.len() + 1));
    };
    match buf[at] {
        // Simple string, error, integer, null, double, boolean, big number.
        b'+' | b'-' | b':' | b'_' | b',' | b'#' | b'(' => Ok(Scan::Done(next)),
        // Bulk string, blob error, verbatim string.
        b'$' | b'!' | b'=' => {
            if head == b"?" {
                return streamed_string(buf, next);
            }
            let n = int(head)?;
            if n < 0 {
                return Ok(Scan::Done(next)); // RESP2 null bulk string
            }
            let end = next + n as usize + 2;
            if buf.len() < end {
                return Ok(Scan::Need(end));
            }
            if &buf[end - 2..end] != b"\r\n" {
                return Err(malformed("resp", "bulk string not followed by CRLF"));
            }
            Ok(Scan::Done(end))
        }
        // Array, set, push; map and attribute hold pairs.
        t @ (b'*' | b'~' | b'>' | b'%' | b'|') => {
            let per = if matches!(t, b'%' | b'|') { 2 } else { 1 };
            let mut pos = next;
            if head == b"?" {
                loop {
                    if buf.get(pos) == Some(&b'.') {
                        return match line(buf, pos + 1)? {
                            Some((_, end)) => Ok(Scan::Done(end)),
                            None => Ok(Scan::Need(buf.len() + 1)),
                        };
                    }
                    match value(buf, pos, depth + 1)? {
                        Scan::Done(e) => pos = e,
                        need => return Ok(need),
                    }
                }
            }
            let n = int(head)?;
            if n > 0 {
                for _ in 0..(n as u64).saturating_mul(per) {
                    match value(buf, pos, depth + 1)? {
                        Scan::Done(e) => pos = e,
                        need => return Ok(need),
                    }
                }
            }
            if t == b'|' {
                // An attribute is followed by the value it describes.
                return value(buf, pos, depth + 1);
            }
            Ok(Scan::Done(pos))
        }
        other => Err(malformed(
            "resp",
            format!("unknown type byte {:?}", other as char),
        )),
    }
}

/// RESP3 streamed string: `;<len>\r\n<data>\r\n` chunks ending with `;0\r\n`.
fn streamed_string(buf: &[u8], mut pos: usize) -> Result<Scan, FramingError> {
    loop {
        if pos >= buf.len() {
            return Ok(Scan::Need(pos + 1));
        }
        if buf[pos] != b';' {
            return Err(malformed("resp", "streamed string chunk without `;`"));
        }
        let Some((head, next)) = line(buf, pos + 1)? else {
            return Ok(Scan::Need(buf.len() + 1));
        };
        let n = int(head)?;
        if n < 0 {
            return Err(malformed("resp", "negative chunk length"));
        }
        if n == 0 {
            return Ok(Scan::Done(next));
        }
        let end = next + n as usize + 2;
        if buf.len() < end {
            return Ok(Scan::Need(end));
        }
        pos = end;
    }
}

#[cfg(test)]
mod tests {
    use crate::tests::run;
    use crate::{FramingSpec, Kind};

    fn frames(data: &[u8], chunks: &[usize]) -> Vec<Vec<u8>> {
        run(&FramingSpec::Resp, data, chunks)
            .into_iter()
            .map(|(k, b)| {
                assert_eq!(k, Kind::Binary);
                b
            })
            .collect()
    }

    #[test]
    fn resp2_values_one_message_each() {
        let replies: Vec<&[u8]> = vec![
            b"+OK\r\n",
            b"-ERR bad\r\n",
            b":42\r\n",
            b"$5\r\nhello\r\n",
            b"$-1\r\n",
            b"*-1\r\n",
            b"$0\r\n\r\n",
            b"*3\r\n$3\r\nfoo\r\n:1\r\n*1\r\n+x\r\n",
        ];
        let wire: Vec<u8> = replies.concat();
        for chunk in [1, 2, 3, 7, 1000] {
            assert_eq!(
                frames(&wire, &vec![chunk; wire.len()]),
                replies,
                "chunk {chunk}"
            );
        }
    }

    #[test]
    fn resp3_values() {
        let replies: Vec<&[u8]> = vec![
            b"_\r\n",
            b",3.14\r\n",
            b"#t\r\n",
            b"(3492890328409238509324850943850943825024385\r\n",
            b"!21\r\nSYNTAX invalid syntax\r\n",
            b"=15\r\ntxt:Some string\r\n",
            b"%2\r\n+first\r\n:1\r\n+second\r\n:2\r\n",
            b"~2\r\n+a\r\n+b\r\n",
            b">2\r\n+message\r\n+hi\r\n",
            b"|1\r\n+key-popularity\r\n%1\r\n$1\r\na\r\n,0.19\r\n*1\r\n:2\r\n",
            b"$?\r\n;4\r\nHell\r\n;2\r\no!\r\n;0\r\n",
            b"*?\r\n:1\r\n:2\r\n.\r\n",
        ];
        let wire: Vec<u8> = replies.concat();
        for chunk in [1, 5, 64] {
            assert_eq!(
                frames(&wire, &vec![chunk; wire.len()]),
                replies,
                "chunk {chunk}"
            );
        }
    }

    #[test]
    fn huge_bulk_string_in_many_reads_is_one_message() {
        let value = vec![b'v'; 10_000_000];
        let mut wire = format!("${}\r\n", value.len()).into_bytes();
        wire.extend_from_slice(&value);
        wire.extend_from_slice(b"\r\n");
        let got = frames(&wire, &vec![50_001; 400]);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].len(), wire.len());
    }

    #[test]
    fn malformed_input_is_an_error() {
        let mut f = FramingSpec::Resp.new_framer();
        use crate::Framer;
        assert!(f.next(b"?what\r\n", false).is_err());
        assert!(f.next(b"$3\r\nabcde", false).is_err());
        assert!(f.next(b"$x\r\n", false).is_err());
        assert!(f.next(b"+OK\n", false).is_err());
        let deep = "*1\r\n".repeat(1000);
        assert!(f.next(deep.as_bytes(), false).is_err());
    }
}
