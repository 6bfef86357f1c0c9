//! Arbitrary text as htpasswd lines and as a whole file: an entry, a blank
//! or an error naming a line inside the text, never a panic. Only bcrypt and
//! argon2 entries are ever accepted.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wsgate_auth::htpasswd::{parse_line, Hash, Htpasswd};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    for line in text.lines() {
        if let Ok(Some((user, hash))) = parse_line(line) {
            assert!(!user.is_empty() && !user.contains(':'));
            match hash {
                Hash::Bcrypt(h) => assert!(h.starts_with("$2")),
                Hash::Argon2(h) => assert!(h.starts_with("$argon2")),
            }
        }
    }
    match Htpasswd::parse(&text) {
        Ok(h) => {
            // Verifying never panics (cheap: no entry or a low cost).
            if h.len() <= 1 && !text.contains("$2y$1") && !text.contains("$2b$1") && !text.contains("$2a$1") && !text.contains("$argon") {
                let _ = h.verify("u", b"p");
            }
        }
        Err(e) => assert!(e.line >= 1 && e.line <= text.lines().count()),
    }
});
