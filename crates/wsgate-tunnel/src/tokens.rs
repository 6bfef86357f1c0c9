//! The agent token file: one `ID TOKEN` line per id an agent may register
//! under; `#` starts a comment. A token may own several ids; an id has one
//! token.

use std::collections::HashMap;

use crate::proto::valid_id;

/// A line of the token file that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct TokenError {
    pub line: usize,
    pub message: String,
}

/// Who owns which id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tokens {
    /// id → token.
    owner: HashMap<String, String>,
}

/// What a token may do, as [`Tokens::check`] says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The token owns the id.
    Owns,
    /// The token is valid, but the id is another token's or nobody's.
    NotOwner,
    /// No id has this token.
    UnknownToken,
}

/// Compares without leaking where two tokens first differ.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

impl Tokens {
    /// Parses the file's text; the first bad line is the error.
    pub fn parse(text: &str) -> Result<Tokens, TokenError> {
        let mut owner = HashMap::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let err = |message: String| TokenError {
                line: i + 1,
                message,
            };
            let mut fields = line.split_whitespace();
            let (Some(id), Some(token), None) = (fields.next(), fields.next(), fields.next())
            else {
                return Err(err("expected `ID TOKEN`".into()));
            };
            if !valid_id(id) {
                return Err(err(format!(
                    "invalid agent id `{}` (1-64 of A-Z a-z 0-9 . _ -, not starting with a dot)",
                    id.chars().take(80).collect::<String>()
                )));
            }
            if token.len() < 8 || !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(err(
                    "a token is at least 8 printable characters, without spaces".into(),
                ));
            }
            if let Some(prev) = owner.insert(id.to_string(), token.to_string()) {
                if prev != token {
                    return Err(err(format!("id `{id}` is given two different tokens")));
                }
            }
        }
        Ok(Tokens { owner })
    }

    /// Whether `token` may register `id`.
    pub fn check(&self, token: &str, id: &str) -> Verdict {
        let mut known = false;
        for (owned, t) in &self.owner {
            if same(t, token) {
                known = true;
                if owned == id {
                    return Verdict::Owns;
                }
            }
        }
        if known {
            Verdict::NotOwner
        } else {
            Verdict::UnknownToken
        }
    }

    /// Whether some id has `token`.
    pub fn knows(&self, token: &str) -> bool {
        self.owner.values().any(|t| same(t, token))
    }

    /// How many ids the file lists.
    pub fn len(&self) -> usize {
        self.owner.len()
    }

    pub fn is_empty(&self) -> bool {
        self.owner.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_own_their_ids() {
        let t = Tokens::parse(
            "# agents\nsite-a  s3cret-aaaa\nsite-b s3cret-aaaa # same owner\n\nsite-c other-token\n",
        )
        .unwrap();
        assert_eq!(t.len(), 3);
        assert_eq!(t.check("s3cret-aaaa", "site-a"), Verdict::Owns);
        assert_eq!(t.check("s3cret-aaaa", "site-b"), Verdict::Owns);
        assert_eq!(t.check("s3cret-aaaa", "site-c"), Verdict::NotOwner);
        assert_eq!(t.check("s3cret-aaaa", "nobody"), Verdict::NotOwner);
        assert_eq!(t.check("wrong-token", "site-a"), Verdict::UnknownToken);
        assert_eq!(t.check("", "site-a"), Verdict::UnknownToken);
        assert!(t.knows("other-token"));
    }

    #[test]
    fn bad_lines_name_their_number() {
        for (text, line, what) in [
            ("site-a\n", 1, "expected"),
            ("ok tokentoken\nsite-a a b\n", 2, "expected"),
            (".x tokentoken\n", 1, "invalid agent id"),
            ("x short\n", 1, "at least 8"),
            ("x tokentoken\nx different1\n", 2, "two different tokens"),
        ] {
            let e = Tokens::parse(text).unwrap_err();
            assert_eq!(e.line, line, "{text:?}: {e}");
            assert!(e.message.contains(what), "{text:?}: {e}");
        }
        // The same line twice is harmless.
        assert!(Tokens::parse("x tokentoken\nx tokentoken\n").is_ok());
    }
}
