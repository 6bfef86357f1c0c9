//! htpasswd files, as Apache's `htpasswd -B` writes them: one `USER:HASH`
//! line per user; blank lines and lines starting with `#` are skipped.
//!
//! Accepted hashes: bcrypt (`$2y$`, `$2b$`, `$2a$`: `htpasswd -B`) and
//! argon2 in the PHC string format (`$argon2id$v=19$m=…,t=…,p=…$SALT$HASH`,
//! as the `argon2` tool and the libraries write it). Apache's other formats —
//! MD5 (`$apr1$`), SHA-1 (`{SHA}`), `crypt` and plain text — are refused
//! with the line that has one: they are fast to brute-force, and a gateway
//! that takes them would hide that.

use std::collections::HashMap;

/// A line of an htpasswd file that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct HtpasswdError {
    pub line: usize,
    pub message: String,
}

/// How a password is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hash {
    Bcrypt(String),
    Argon2(String),
}

/// What [`Htpasswd::verify`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    /// The user is known, the password wrong.
    BadPassword,
    /// No such user (a hash was still computed, so that the answer takes
    /// as long as for a known user).
    UnknownUser,
}

/// The users of one htpasswd file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Htpasswd {
    users: HashMap<String, Hash>,
    /// A hash to spend time on for unknown users (the first entry's).
    decoy: Option<Hash>,
}

/// Longest line taken (a bcrypt line is ~70 bytes, an argon2 one ~120).
const MAX_LINE: usize = 4096;

/// Parses one line (without its newline): `None` for a blank line or a
/// comment.
pub fn parse_line(line: &str) -> Result<Option<(String, Hash)>, String> {
    let line = line.trim_end_matches('\r');
    if line.trim().is_empty() || line.trim_start().starts_with('#') {
        return Ok(None);
    }
    if line.len() > MAX_LINE {
        return Err(format!(
            "a line of {} bytes (at most {MAX_LINE})",
            line.len()
        ));
    }
    let (user, hash) = line
        .split_once(':')
        .ok_or_else(|| "expected `USER:HASH`".to_string())?;
    if user.is_empty() || user.len() > 255 || user.chars().any(|c| c.is_control()) {
        return Err("a user name is 1-255 characters, without control characters".into());
    }
    let hash = hash.trim();
    let kind = if ["$2y$", "$2b$", "$2a$"].iter().any(|p| hash.starts_with(p)) {
        // `$2y$NN$` + 53 characters of salt and hash.
        let cost = hash.get(4..6).and_then(|c| c.parse::<u32>().ok());
        if hash.len() != 60 || hash.as_bytes().get(6) != Some(&b'$') || cost.is_none() {
            return Err("a malformed bcrypt hash".into());
        }
        if !(4..=31).contains(&cost.unwrap_or(0)) {
            return Err("a bcrypt cost outside 4-31".into());
        }
        Hash::Bcrypt(hash.to_string())
    } else if hash.starts_with("$argon2") {
        argon2::PasswordHash::new(hash).map_err(|e| format!("a malformed argon2 hash: {e}"))?;
        let ok = ["$argon2id$", "$argon2i$", "$argon2d$"]
            .iter()
            .any(|p| hash.starts_with(p));
        if !ok {
            return Err("an unknown argon2 variant".into());
        }
        Hash::Argon2(hash.to_string())
    } else {
        let what = if hash.starts_with("$apr1$") {
            "MD5 (`$apr1$`)"
        } else if hash.starts_with("{SHA}") {
            "SHA-1 (`{SHA}`)"
        } else if hash.starts_with('$') {
            "an unknown `$` scheme"
        } else {
            "crypt or plain text"
        };
        return Err(format!(
            "{what} hashes are refused: use bcrypt (`htpasswd -B`) or argon2"
        ));
    };
    Ok(Some((user.to_string(), kind)))
}

impl Htpasswd {
    /// Parses a whole file; the first bad line is the error. A user listed
    /// twice is an error too (which line would win is not obvious).
    pub fn parse(text: &str) -> Result<Htpasswd, HtpasswdError> {
        let mut users = HashMap::new();
        let mut decoy = None;
        for (i, line) in text.lines().enumerate() {
            let err = |message: String| HtpasswdError {
                line: i + 1,
                message,
            };
            let Some((user, hash)) = parse_line(line).map_err(err)? else {
                continue;
            };
            decoy.get_or_insert_with(|| hash.clone());
            if users.insert(user.clone(), hash).is_some() {
                let user: String = user.chars().take(80).collect();
                return Err(err(format!("user `{user}` is listed twice")));
            }
        }
        Ok(Htpasswd { users, decoy })
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Checks `password` for `user`: the slow part of Basic authentication
    /// (bcrypt or argon2 at the cost the file chose).
    pub fn verify(&self, user: &str, password: &[u8]) -> Verdict {
        match self.users.get(user) {
            Some(h) => {
                if check(h, password) {
                    Verdict::Ok
                } else {
                    Verdict::BadPassword
                }
            }
            None => {
                if let Some(d) = &self.decoy {
                    let _ = check(d, password);
                }
                Verdict::UnknownUser
            }
        }
    }
}

fn check(h: &Hash, password: &[u8]) -> bool {
    match h {
        Hash::Bcrypt(s) => bcrypt::verify(password, s).unwrap_or(false),
        Hash::Argon2(s) => {
            use argon2::PasswordVerifier;
            match argon2::PasswordHash::new(s) {
                Ok(ph) => argon2::Argon2::default()
                    .verify_password(password, &ph)
                    .is_ok(),
                Err(_) => false,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bcrypt_and_argon2_lines_verify_and_others_are_refused() {
        let bc = bcrypt::hash("s3cret", 4)
            .unwrap()
            .replacen("$2b$", "$2y$", 1);
        let ar = {
            use argon2::PasswordHasher;
            argon2::Argon2::default()
                .hash_password(b"hunter2")
                .unwrap()
                .to_string()
        };
        let text = format!("# users\n\nada:{bc}\nbob:{ar}\n");
        let h = Htpasswd::parse(&text).unwrap();
        assert_eq!(h.len(), 2);
        assert_eq!(h.verify("ada", b"s3cret"), Verdict::Ok);
        assert_eq!(h.verify("ada", b"nope"), Verdict::BadPassword);
        assert_eq!(h.verify("bob", b"hunter2"), Verdict::Ok);
        assert_eq!(h.verify("bob", b"s3cret"), Verdict::BadPassword);
        assert_eq!(h.verify("eve", b"s3cret"), Verdict::UnknownUser);
        for (line, why) in [
            ("ada:$apr1$abc$def", "MD5"),
            ("ada:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=", "SHA-1"),
            ("ada:plain", "plain text"),
            ("ada", "USER:HASH"),
            (":$2y$05$abc", "user name"),
            ("ada:$2y$05$short", "malformed bcrypt"),
            ("ada:$argon2id$nonsense", "argon2"),
        ] {
            let e = Htpasswd::parse(line).unwrap_err();
            assert_eq!(e.line, 1);
            assert!(e.message.contains(why), "{line}: {e}");
        }
        let e = Htpasswd::parse(&format!("ada:{bc}\n#\nada:{bc}\n")).unwrap_err();
        assert_eq!(e.line, 3);
        assert!(e.message.contains("twice"));
    }
}
