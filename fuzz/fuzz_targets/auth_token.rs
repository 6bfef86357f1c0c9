//! Arbitrary text as a JWT against an HMAC key set and an Ed25519-less
//! JWKS: a refusal or claims, never a panic; anything over the length limit
//! is refused as too long before it is decoded.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wsgate_auth::jwt::{KeySet, Refusal, Rules};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let keys = KeySet::from_secret(b"0123456789abcdef0123456789abcdef").unwrap();
    let rules = Rules {
        max_len: 512,
        ..Rules::default()
    };
    let r = keys.verify(&text, &rules);
    if text.len() > 512 {
        assert_eq!(r, Err(Refusal::TooLong));
    }
    let _ = keys.verify(&text, &Rules::default());
});
