//! Arbitrary request heads through the JWT method's token sources (the
//! `Authorization` header, a query parameter, a cookie, a
//! `Sec-WebSocket-Protocol` entry, plain or base64url): a token or none,
//! never a panic, and a token is never empty.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wsgate::auth::find_token;
use wsgate::config::TokenSource;

fuzz_target!(|data: &[u8]| {
    // The input: a query string, then header values, separated by NUL.
    let mut parts = data.split(|b| *b == 0);
    let query = String::from_utf8_lossy(parts.next().unwrap_or_default());
    let query: String = query.chars().filter(|c| c.is_ascii_graphic()).collect();
    let mut b = http::Request::get(format!("/ws?{query}").as_str());
    if http::Uri::try_from(format!("/ws?{query}")).is_err() {
        b = http::Request::get("/ws");
    }
    let names = ["authorization", "cookie", "sec-websocket-protocol"];
    for (i, v) in parts.enumerate() {
        if let Ok(v) = http::HeaderValue::from_bytes(v) {
            b = b.header(names[i % names.len()], v);
        }
    }
    let Ok(req) = b.body(()) else { return };
    let head = req.into_parts().0;
    let sources: Vec<TokenSource> = [
        "bearer",
        "query:access_token",
        "cookie:session",
        "protocol:bearer.",
        "protocol:wsgate.bearer.",
    ]
    .iter()
    .map(|s| s.parse().unwrap())
    .collect();
    for s in &sources {
        if let Some(t) = find_token(&head, std::slice::from_ref(s)) {
            assert!(!t.is_empty());
        }
    }
    let _ = find_token(&head, &sources);
});
