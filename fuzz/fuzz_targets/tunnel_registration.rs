//! Arbitrary text as what an agent registers with and what the gateway
//! reads from its files (docs/tunnel.md §1, §5): an allow-pattern header,
//! a single pattern, an agent id, and the agent token file. Each parser
//! accepts or refuses with an error, never panics; an accepted header
//! prints back to one that parses the same; a token file that parses
//! answers ownership questions.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wsgate_tunnel::allow::{AllowList, Pattern};
use wsgate_tunnel::proto::{self, Destination};
use wsgate_tunnel::tokens::Tokens;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(list) = AllowList::from_header(text) {
        let again = AllowList::from_header(&list.to_header()).unwrap();
        assert_eq!(again, list);
        let d: Destination = "tcp://10.1.2.3:22".parse().unwrap();
        let _ = list.permits(&d, Some("10.1.2.3".parse().unwrap()));
        let _ = list.may_permit(&d);
    }
    let _ = text.parse::<Pattern>();
    if proto::valid_id(text) {
        assert!(proto::parse_id(text).is_ok());
    }
    if let Ok(t) = Tokens::parse(text) {
        let _ = t.check("some-token", "site-a");
        let _ = t.knows("");
    }
});
