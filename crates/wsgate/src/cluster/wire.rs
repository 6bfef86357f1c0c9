//! What nodes say to each other, sans I/O (docs/cluster.md §3, §4): the
//! proof a node link's handshake carries, and the events of the
//! `wsgate:events` channel. Both parsers take text from the network (a
//! peer, or anyone who can publish to Redis) and are fuzzed
//! (`fuzz/fuzz_targets/cluster_wire.rs`).

use std::fmt;
use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::tunnel::proto;
use crate::tunnel::registry::Revoked;

/// The subprotocol of a node link.
pub const NODE_PROTOCOL: &str = "wsgate-node.v1";
/// The header naming the dialing node.
pub const NODE_HEADER: &str = "wsgate-node-id";
/// The `Authorization` scheme of a node link's proof.
pub const AUTH_SCHEME: &str = "Wsgate-Node";
/// How far a proof's time may be from the receiver's clock.
pub const MAX_SKEW: Duration = Duration::from_secs(60);
/// The channel every node publishes events on and listens to.
pub const EVENTS: &str = "wsgate:events";
/// Longest event accepted (an event names at most two ids and a hash).
pub const MAX_EVENT: usize = 256;

/// Why a proof or an event was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("malformed {0}")]
    Malformed(&'static str),
    #[error("invalid node or agent id `{0}`")]
    BadId(String),
    #[error("the proof's time is {0} s away from this node's clock (at most 60 s)")]
    Skew(u64),
    #[error("the proof does not match this cluster's secret and this node")]
    BadMac,
    #[error("unknown event `{0}`")]
    UnknownEvent(String),
}

/// `Authorization: Wsgate-Node ts=UNIX_SECONDS, mac=HEX`: the dialing node's
/// proof that it knows the cluster's secret, for this node and this time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proof {
    pub ts: u64,
    pub mac: [u8; 32],
}

/// The bytes a proof signs: the protocol, who dials, whom, and when.
fn signed(from: &str, to: &str, ts: u64) -> String {
    format!("{NODE_PROTOCOL}\n{from}\n{to}\n{ts}")
}

fn hmac(secret: &[u8]) -> Hmac<Sha256> {
    <Hmac<Sha256> as KeyInit>::new_from_slice(secret).expect("HMAC takes a key of any length")
}

impl Proof {
    /// The proof of node `from` dialing node `to` at `ts`.
    pub fn new(secret: &[u8], from: &str, to: &str, ts: u64) -> Proof {
        let mut m = hmac(secret);
        m.update(signed(from, to, ts).as_bytes());
        let mut mac = [0u8; 32];
        mac.copy_from_slice(&m.finalize().into_bytes());
        Proof { ts, mac }
    }

    /// The `Authorization` header value.
    pub fn header(&self) -> String {
        let hex: String = self.mac.iter().map(|b| format!("{b:02x}")).collect();
        format!("{AUTH_SCHEME} ts={}, mac={hex}", self.ts)
    }

    /// Reads an `Authorization` header value.
    pub fn parse(value: &str) -> Result<Proof, WireError> {
        let bad = || WireError::Malformed("Wsgate-Node proof");
        let (scheme, rest) = value.trim().split_once(' ').ok_or_else(bad)?;
        if !scheme.eq_ignore_ascii_case(AUTH_SCHEME) {
            return Err(bad());
        }
        let (mut ts, mut mac) = (None, None);
        for part in rest.split(',') {
            let (k, v) = part.trim().split_once('=').ok_or_else(bad)?;
            match k.trim() {
                "ts" if ts.is_none() && v.len() <= 20 && v.bytes().all(|b| b.is_ascii_digit()) => {
                    ts = Some(v.parse::<u64>().map_err(|_| bad())?)
                }
                "mac" if mac.is_none() && v.len() == 64 => {
                    let mut out = [0u8; 32];
                    for (i, pair) in v.as_bytes().chunks(2).enumerate() {
                        let hex = std::str::from_utf8(pair).map_err(|_| bad())?;
                        out[i] = u8::from_str_radix(hex, 16).map_err(|_| bad())?;
                    }
                    mac = Some(out)
                }
                _ => return Err(bad()),
            }
        }
        Ok(Proof {
            ts: ts.ok_or_else(bad)?,
            mac: mac.ok_or_else(bad)?,
        })
    }

    /// Checks the proof of `from` dialing `to` (this node) at `now` (Unix
    /// seconds): its time within [`MAX_SKEW`], its MAC compared in constant
    /// time.
    pub fn verify(&self, secret: &[u8], from: &str, to: &str, now: u64) -> Result<(), WireError> {
        let skew = now.abs_diff(self.ts);
        if skew > MAX_SKEW.as_secs() {
            return Err(WireError::Skew(skew));
        }
        let mut m = hmac(secret);
        m.update(signed(from, to, self.ts).as_bytes());
        m.verify_slice(&self.mac).map_err(|_| WireError::BadMac)
    }
}

/// A node id, checked (the agent id grammar).
pub fn node_id(s: &str) -> Result<&str, WireError> {
    if proto::valid_id(s) {
        Ok(s)
    } else {
        Err(WireError::BadId(s.chars().take(80).collect()))
    }
}

/// What nodes tell each other through `wsgate:events`
/// (`v1 KIND ARGS`, one line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// `node` holds `id` now (its first connection there).
    Up { node: String, id: String },
    /// `node` no longer holds `id`.
    Down { node: String, id: String },
    /// `node` is gone: it left, or its lease expired and another node
    /// cleaned its entries up.
    NodeDown { node: String },
    /// Drop every connection of `id` (it may dial again).
    Disconnect { id: String },
    /// Refuse `what` from now on and drop what it covers.
    Revoke(Revoked),
    /// Accept `what` again.
    Unrevoke(Revoked),
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Event::Up { node, id } => write!(f, "v1 up {node} {id}"),
            Event::Down { node, id } => write!(f, "v1 down {node} {id}"),
            Event::NodeDown { node } => write!(f, "v1 node-down {node}"),
            Event::Disconnect { id } => write!(f, "v1 disconnect {id}"),
            Event::Revoke(r) => write!(f, "v1 revoke {}", r.key()),
            Event::Unrevoke(r) => write!(f, "v1 unrevoke {}", r.key()),
        }
    }
}

impl Event {
    /// Reads one event; anything else is an error (and is ignored by the
    /// listener, which logs it).
    pub fn parse(text: &str) -> Result<Event, WireError> {
        if text.len() > MAX_EVENT {
            return Err(WireError::Malformed("event (too long)"));
        }
        let mut words = text.split(' ');
        if words.next() != Some("v1") {
            return Err(WireError::Malformed("event (no `v1`)"));
        }
        let kind = words.next().ok_or(WireError::Malformed("event"))?;
        let args: Vec<&str> = words.collect();
        let id = |s: &str| node_id(s).map(str::to_string);
        let revoked = |s: &str| Revoked::parse(s).ok_or(WireError::Malformed("revocation"));
        let e = match (kind, args.as_slice()) {
            ("up", [n, i]) => Event::Up {
                node: id(n)?,
                id: id(i)?,
            },
            ("down", [n, i]) => Event::Down {
                node: id(n)?,
                id: id(i)?,
            },
            ("node-down", [n]) => Event::NodeDown { node: id(n)? },
            ("disconnect", [i]) => Event::Disconnect { id: id(i)? },
            ("revoke", [r]) => Event::Revoke(revoked(r)?),
            ("unrevoke", [r]) => Event::Unrevoke(revoked(r)?),
            ("up" | "down" | "node-down" | "disconnect" | "revoke" | "unrevoke", _) => {
                return Err(WireError::Malformed("event arguments"))
            }
            (k, _) => return Err(WireError::UnknownEvent(k.chars().take(40).collect())),
        };
        Ok(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef";

    #[test]
    fn a_proof_verifies_only_for_its_secret_nodes_and_time() {
        let p = Proof::new(SECRET, "node-b", "node-a", 1_000);
        let again = Proof::parse(&p.header()).unwrap();
        assert_eq!(again, p);
        assert!(again.verify(SECRET, "node-b", "node-a", 1_030).is_ok());
        assert_eq!(
            again.verify(b"another-secret-16", "node-b", "node-a", 1_000),
            Err(WireError::BadMac)
        );
        assert_eq!(
            again.verify(SECRET, "node-c", "node-a", 1_000),
            Err(WireError::BadMac)
        );
        assert_eq!(
            again.verify(SECRET, "node-b", "node-c", 1_000),
            Err(WireError::BadMac)
        );
        assert_eq!(
            again.verify(SECRET, "node-b", "node-a", 1_061),
            Err(WireError::Skew(61))
        );
        assert_eq!(
            again.verify(SECRET, "node-b", "node-a", 939),
            Err(WireError::Skew(61))
        );
    }

    #[test]
    fn malformed_proofs_are_refused() {
        let good = Proof::new(SECRET, "b", "a", 7).header();
        assert!(Proof::parse(&good.to_lowercase()).is_ok());
        for bad in [
            "",
            "Bearer x",
            "Wsgate-Node",
            "Wsgate-Node ts=1",
            "Wsgate-Node mac=00",
            &good.replace("ts=7", "ts=-7"),
            &good.replace("ts=7", "ts=7, ts=8"),
            &good.replace("mac=", "mac=zz"),
            &good.replace("mac=", "mac=0"),
            &(good.clone() + ", x=1"),
            &good.replace("ts=7", "ts=99999999999999999999999"),
        ] {
            assert!(Proof::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn events_print_and_read_back() {
        let all = [
            Event::Up {
                node: "node-a".into(),
                id: "site-a".into(),
            },
            Event::Down {
                node: "node-a".into(),
                id: "site-a".into(),
            },
            Event::NodeDown {
                node: "node-b".into(),
            },
            Event::Disconnect { id: "x.y_z".into() },
            Event::Revoke(Revoked::Id("site-a".into())),
            Event::Unrevoke(Revoked::Token("ab".repeat(32))),
        ];
        for e in all {
            assert_eq!(Event::parse(&e.to_string()).unwrap(), e);
        }
        for bad in [
            "",
            "v2 up a b",
            "v1",
            "v1 up a",
            "v1 up a b c",
            "v1 up ../a b",
            "v1 up a  b",
            "v1 shout a",
            "v1 revoke id:../x",
            "v1 revoke token:XYZ",
            "v1 node-down",
            &format!("v1 disconnect {}", "a".repeat(300)),
        ] {
            assert!(Event::parse(bad).is_err(), "{bad:?}");
        }
    }
}
