//! Arbitrary bytes as a JWKS document and as a PEM key file, then a fixed
//! token checked against whatever loaded: a key set or an error, a verdict,
//! never a panic. Also the Origin and identity-template parsers.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wsgate_auth::jwt::{KeySet, Rules};

const TOKEN: &str = "eyJhbGciOiJIUzI1NiIsImtpZCI6ImsxIn0.eyJzdWIiOiJ4IiwiZXhwIjo0MTAyNDQ0ODAwfQ.2d0mXDnU7gQxaGNY1zDS0gZ2SsmNh8V8L8s5Pb-9rZI";

fuzz_target!(|data: &[u8]| {
    if let Ok(set) = KeySet::from_jwks(data) {
        assert!(!set.is_empty());
        let _ = set.verify(TOKEN, &Rules::default());
    }
    if let Ok(set) = KeySet::from_pem(data) {
        let _ = set.verify(TOKEN, &Rules::default());
    }
    let text = String::from_utf8_lossy(data);
    if let Ok(o) = text.parse::<wsgate_auth::origin::OriginPattern>() {
        let _ = o.matches(&text);
    }
    if wsgate_auth::template::check(&text).is_ok() {
        if let Some(s) = wsgate_auth::template::expand(&text, |_| Some("v".into())) {
            assert!(!s.contains('{') || text.matches('{').count() > text.matches('}').count() || s.len() <= text.len() * 2);
        }
    }
    let _ = wsgate_auth::cert::check_crls(data);
    let _ = wsgate_auth::cert::CertFields::from_der(data);
});
