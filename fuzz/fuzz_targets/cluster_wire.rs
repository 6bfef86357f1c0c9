//! Arbitrary text as what cluster nodes read from each other
//! (docs/cluster.md §3, §4): a node link's `Authorization: Wsgate-Node`
//! proof and an event of the `wsgate:events` channel (anyone who can
//! publish to Redis can send one). Each parser accepts or refuses with an
//! error, never panics; an accepted proof prints back to itself and is
//! checked in constant time without panicking; an accepted event prints
//! back to one that parses the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wsgate::cluster::wire::{node_id, Event, Proof};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(p) = Proof::parse(text) {
        assert_eq!(Proof::parse(&p.header()).unwrap(), p);
        let _ = p.verify(b"0123456789abcdef", "node-b", "node-a", p.ts);
    }
    if let Ok(e) = Event::parse(text) {
        assert_eq!(Event::parse(&e.to_string()).unwrap(), e);
    }
    let _ = node_id(text);
});
