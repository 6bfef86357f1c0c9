//! Allow patterns: which destinations an agent may be asked to reach
//! (`wsgate agent --allow`), and which a `/mux` client may name
//! (`--mux-allow`). Default deny: an empty list allows nothing.
//!
//! A pattern reads `SCHEME://HOST:PORT`, or `agent://ID/SCHEME://HOST:PORT`
//! for `/mux`:
//!
//! - SCHEME: `tcp`, `udp`, `http` or `*`. A `tcp` pattern also covers `http`
//!   destinations on the same host and port (HTTP rides on TCP); an `http`
//!   pattern covers only `http`.
//! - HOST: a name glob (`*` for any run of characters: `*.internal`,
//!   `db-*.example.com`, `*`), an IP address, or a CIDR block
//!   (`10.0.0.0/8`, `[fd00::/8]`). A name glob matches the destination's
//!   name as written; an address or block matches the address the
//!   destination resolves to (so a name cannot dodge a block).
//! - PORT: a number, a range `8000-8100`, or `*`.
//! - ID (for `agent://`): a glob over agent ids.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use super::proto::{Destination, ProtoError, Scheme, Target};
use crate::IpNet;

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    /// A glob over names (lower case).
    Glob(String),
    /// An address block (a single address is a /32 or /128).
    Block(IpNet),
}

/// One destination pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    text: String,
    /// `None`: any scheme.
    scheme: Option<Scheme>,
    host: HostPattern,
    ports: (u16, u16),
    /// For `agent://ID/...` patterns: the id glob.
    agent: Option<String>,
}

fn bad(input: &str, why: &'static str) -> ProtoError {
    ProtoError::BadPattern {
        input: input.chars().take(80).collect(),
        why,
    }
}

impl FromStr for Pattern {
    type Err = ProtoError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let text = s.trim();
        let (agent, rest) = match text.strip_prefix("agent://") {
            Some(r) => {
                let (id, rest) = r
                    .split_once('/')
                    .ok_or(bad(s, "expected agent://ID/SCHEME://HOST:PORT"))?;
                if id.is_empty()
                    || !id.bytes().all(|b| {
                        b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'*')
                    })
                {
                    return Err(bad(s, "invalid agent id glob"));
                }
                (Some(id.to_string()), rest)
            }
            None => (None, text),
        };
        let (scheme, hp) = rest.split_once("://").ok_or(bad(s, "missing SCHEME://"))?;
        let scheme = match scheme {
            "*" => None,
            "tcp" => Some(Scheme::Tcp),
            "udp" => Some(Scheme::Udp),
            "http" => Some(Scheme::Http),
            _ => return Err(bad(s, "scheme is not tcp, udp, http or *")),
        };
        let hp = hp.strip_suffix('/').unwrap_or(hp);
        let (host, port) = if let Some(r) = hp.strip_prefix('[') {
            let (h, p) = r.split_once(']').ok_or(bad(s, "unclosed `[`"))?;
            (h, p.strip_prefix(':').ok_or(bad(s, "missing :PORT"))?)
        } else {
            hp.rsplit_once(':')
                .ok_or(bad(s, "missing :PORT (use :* for any)"))?
        };
        let ports = match port {
            "*" => (1, u16::MAX),
            p => match p.split_once('-') {
                Some((a, b)) => {
                    let a: u16 = a.parse().map_err(|_| bad(s, "bad port range"))?;
                    let b: u16 = b.parse().map_err(|_| bad(s, "bad port range"))?;
                    if a == 0 || a > b {
                        return Err(bad(s, "bad port range"));
                    }
                    (a, b)
                }
                None => {
                    let p: u16 = p.parse().map_err(|_| bad(s, "bad port"))?;
                    if p == 0 {
                        return Err(bad(s, "port 0"));
                    }
                    (p, p)
                }
            },
        };
        if host.is_empty() {
            return Err(bad(s, "missing host (use * for any)"));
        }
        let host = if host.contains('/') || host.parse::<IpAddr>().is_ok() {
            HostPattern::Block(host.parse().map_err(|_| bad(s, "invalid address block"))?)
        } else if host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'*'))
        {
            HostPattern::Glob(host.to_ascii_lowercase())
        } else {
            return Err(bad(s, "invalid host"));
        };
        Ok(Pattern {
            text: text.to_string(),
            scheme,
            host,
            ports,
            agent,
        })
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// `*` matches any run of characters; everything else literally.
pub fn glob(pattern: &str, s: &str) -> bool {
    let (p, s) = (pattern.as_bytes(), s.as_bytes());
    let (mut pi, mut si) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while si < s.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some(pi);
            mark = si;
            pi += 1;
        } else if pi < p.len() && p[pi] == s[si] {
            pi += 1;
            si += 1;
        } else if let Some(st) = star {
            pi = st + 1;
            mark += 1;
            si = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

impl Pattern {
    fn scheme_covers(&self, dest: Scheme) -> bool {
        match self.scheme {
            None => true,
            Some(Scheme::Tcp) => matches!(dest, Scheme::Tcp | Scheme::Http),
            Some(s) => s == dest,
        }
    }

    /// Whether the pattern covers `dest` reached at `addr` (the address it
    /// resolved to; `None` when not resolved: a block then matches only an
    /// address literal). Agent patterns match no direct destination.
    pub fn permits(&self, dest: &Destination, addr: Option<IpAddr>) -> bool {
        if self.agent.is_some() || !self.scheme_covers(dest.scheme) {
            return false;
        }
        if !(self.ports.0..=self.ports.1).contains(&dest.port) {
            return false;
        }
        match &self.host {
            HostPattern::Glob(g) => glob(g, &dest.host),
            HostPattern::Block(b) => addr
                .or_else(|| dest.host.parse().ok())
                .is_some_and(|ip| b.contains(ip)),
        }
    }

    /// Whether the pattern covers a `/mux` target (its direct part
    /// unresolved; the gateway resolves direct targets before connecting
    /// and checks the address with [`Pattern::permits`]).
    pub fn permits_target(&self, t: &Target) -> bool {
        match (t, &self.agent) {
            (Target::Direct(d), None) => self.permits(d, None) || self.may_permit_name(d),
            (Target::Agent(a), Some(id)) => {
                glob(id, &a.agent) && {
                    let direct = Pattern {
                        agent: None,
                        ..self.clone()
                    };
                    direct.permits(&a.dest, None) || direct.may_permit_name(&a.dest)
                }
            }
            _ => false,
        }
    }

    /// A name destination against a block: only its resolved address can
    /// say; it may be permitted (the final check is [`Pattern::permits`]).
    fn may_permit_name(&self, d: &Destination) -> bool {
        matches!(self.host, HostPattern::Block(_))
            && d.host.parse::<IpAddr>().is_err()
            && self.scheme_covers(d.scheme)
            && (self.ports.0..=self.ports.1).contains(&d.port)
    }
}

/// A list of patterns; empty: nothing is allowed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowList(pub Vec<Pattern>);

impl AllowList {
    pub fn parse<S: AsRef<str>>(items: &[S]) -> Result<AllowList, ProtoError> {
        items
            .iter()
            .map(|s| s.as_ref().parse())
            .collect::<Result<_, _>>()
            .map(AllowList)
    }

    /// Whether some pattern covers `dest` at `addr` (see [`Pattern::permits`]).
    pub fn permits(&self, dest: &Destination, addr: Option<IpAddr>) -> bool {
        self.0.iter().any(|p| p.permits(dest, addr))
    }

    /// Whether some pattern may cover `dest` before it is resolved: a name
    /// against a block counts (the agent decides on the address).
    pub fn may_permit(&self, dest: &Destination) -> bool {
        self.0
            .iter()
            .any(|p| p.permits(dest, None) || p.may_permit_name(dest))
    }

    /// Whether some pattern covers a `/mux` target.
    pub fn permits_target(&self, t: &Target) -> bool {
        self.0.iter().any(|p| p.permits_target(t))
    }

    /// The patterns as their text, comma-separated (the registration header).
    pub fn to_header(&self) -> String {
        self.0
            .iter()
            .map(|p| p.text.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The registration header's patterns; unparsable items are an error.
    pub fn from_header(v: &str) -> Result<AllowList, ProtoError> {
        let items: Vec<&str> = v
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        if items.len() > super::proto::MAX_ALLOW {
            return Err(ProtoError::TooLong {
                what: "allow list",
                len: items.len(),
                max: super::proto::MAX_ALLOW,
            });
        }
        AllowList::parse(&items)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Destination {
        s.parse().unwrap()
    }

    fn allows(patterns: &[&str], dest: &str, addr: Option<&str>) -> bool {
        AllowList::parse(patterns)
            .unwrap()
            .permits(&d(dest), addr.map(|a| a.parse().unwrap()))
    }

    #[test]
    fn schemes_hosts_and_ports() {
        let p = [
            "tcp://10.0.0.0/8:*",
            "http://127.0.0.1:8081",
            "udp://10.0.0.2:53",
        ];
        assert!(allows(&p, "tcp://10.1.2.3:22", None));
        assert!(allows(&p, "http://10.1.2.3:80", None), "tcp covers http");
        assert!(
            !allows(&p, "udp://10.1.2.3:53", None),
            "tcp does not cover udp"
        );
        assert!(allows(&p, "http://127.0.0.1:8081", None));
        assert!(
            !allows(&p, "tcp://127.0.0.1:8081", None),
            "http does not cover tcp"
        );
        assert!(!allows(&p, "http://127.0.0.1:8082", None));
        assert!(allows(&p, "udp://10.0.0.2:53", None));
        assert!(!allows(&p, "tcp://11.0.0.1:22", None));
        // A name is checked against a block by the address it resolved to.
        assert!(!allows(&p, "tcp://db.internal:5432", None));
        assert!(allows(&p, "tcp://db.internal:5432", Some("10.9.9.9")));
        assert!(!allows(&p, "tcp://db.internal:5432", Some("192.168.1.1")));
        // Globs match names as written.
        let g = [
            "tcp://*.internal:5432",
            "tcp://db-*:8000-8100",
            "*://[::1]:*",
        ];
        assert!(allows(&g, "tcp://db.internal:5432", None));
        assert!(!allows(&g, "tcp://db.internal.evil:5432", None));
        assert!(allows(&g, "tcp://db-7:8080", None));
        assert!(!allows(&g, "tcp://db-7:8101", None));
        assert!(allows(&g, "udp://[::1]:9", None));
        assert!(!allows(&[], "tcp://anything:1", None), "default deny");
    }

    #[test]
    fn mux_targets_need_their_kind_of_pattern() {
        let l = AllowList::parse(&["agent://site-*/tcp://*:*", "udp://127.0.0.1:*"]).unwrap();
        let t = |s: &str| s.parse::<Target>().unwrap();
        assert!(l.permits_target(&t("agent://site-a/tcp://10.0.0.5:22")));
        assert!(!l.permits_target(&t("agent://other/tcp://10.0.0.5:22")));
        assert!(!l.permits_target(&t("agent://site-a/udp://10.0.0.5:53")));
        assert!(l.permits_target(&t("udp://127.0.0.1:53")));
        assert!(!l.permits_target(&t("tcp://127.0.0.1:53")));
    }

    #[test]
    fn garbage_patterns_are_errors() {
        for bad in [
            "",
            "tcp://",
            "tcp://h",
            "ftp://h:1",
            "tcp://h:0",
            "tcp://h:9-3",
            "tcp://10.0.0.0/33:*",
            "tcp://a b:1",
            "agent://tcp://h:1",
            "agent://a b/tcp://h:1",
        ] {
            assert!(bad.parse::<Pattern>().is_err(), "{bad:?}");
        }
        let l = AllowList::from_header("tcp://a:1, udp://b:2 ,, ").unwrap();
        assert_eq!(l.to_header(), "tcp://a:1, udp://b:2");
        assert!(AllowList::from_header("tcp://a:1, nope").is_err());
    }
}
