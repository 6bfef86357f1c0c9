//! Peer discovery: the `file` backend.
//!
//! A route lists lookups — file names templated from the handshake's metadata
//! (`{path}`, `{host}`, `{header:NAME}`, `{cookie:NAME}`, `{query:NAME}`). They
//! are tried in order; the first file that exists and has a line for one of
//! the client's subprotocols decides. Each line reads
//! `PEER SUBPROTOCOL [FRAMING [FRAMING-CONFIG]]` (`*` as the subprotocol
//! matches whatever the client offered first, or nothing; `#` starts a comment).
//!
//! Files are re-read when their modification time or size changes, checked on
//! every lookup: no restart, and open connections are untouched.
//!
//! Because the lookup keys come from the client, a discovered peer must match
//! the route's `allow` list (globs with `*`, e.g. `tcp://127.0.0.1:*`); an empty
//! list denies everything, so the gateway never becomes an open proxy.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use wsgate_framing::FramingSpec;

use crate::config::{Discovery, PeerAddr};
use crate::route::Metadata;

/// Most cached files per route; past it the cache starts over.
const MAX_CACHED_FILES: usize = 4096;

/// One usable line of a peers file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerEntry {
    pub peer: PeerAddr,
    /// `None` for `*`.
    pub protocol: Option<String>,
    pub framing: Option<FramingSpec>,
}

#[derive(Debug)]
struct Cached {
    modified: Option<SystemTime>,
    len: u64,
    entries: Arc<Vec<PeerEntry>>,
}

/// The `file` discovery backend of one route.
#[derive(Debug)]
pub struct FileDiscovery {
    lookups: Vec<String>,
    allow: Vec<String>,
    base: PathBuf,
    cache: Arc<Mutex<HashMap<PathBuf, Cached>>>,
}

/// What discovery decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Discovered {
    Peer {
        entry: PeerEntry,
        /// The subprotocol to echo (from the client's offer).
        protocol: Option<String>,
    },
    /// The peer found is not on the allow list.
    Denied(PeerAddr),
    NotFound,
}

impl FileDiscovery {
    /// The runtime of a route's `[route.discovery]` (its templates were
    /// checked with the config).
    pub fn new(config: &Discovery) -> Self {
        Self {
            lookups: config.lookups.clone(),
            allow: config.allow.clone(),
            base: config.base.clone(),
            cache: Arc::default(),
        }
    }

    /// Finds the peer for a handshake; `identity` fills the identity
    /// placeholders (`{subject}`, `{claim:NAME}`, `{cert:FIELD}`).
    pub fn lookup(&self, m: &Metadata, identity: &dyn Fn(&str) -> Option<String>) -> Discovered {
        for template in &self.lookups {
            let Some(name) = expand(template, m, identity) else {
                continue;
            };
            let path = self.base.join(name);
            let Some(entries) = self.read(&path) else {
                continue;
            };
            for e in entries.iter() {
                let protocol = match &e.protocol {
                    None => Some(m.protocols.first().cloned()),
                    Some(p) => m.protocols.iter().any(|o| o == p).then(|| Some(p.clone())),
                };
                let Some(protocol) = protocol else { continue };
                if !self.allowed(&e.peer) {
                    return Discovered::Denied(e.peer.clone());
                }
                return Discovered::Peer {
                    entry: e.clone(),
                    protocol,
                };
            }
        }
        Discovered::NotFound
    }

    fn allowed(&self, peer: &PeerAddr) -> bool {
        let s = peer.to_string();
        self.allow.iter().any(|pat| glob(pat, &s))
    }

    fn read(&self, path: &Path) -> Option<Arc<Vec<PeerEntry>>> {
        let meta = std::fs::metadata(path).ok()?;
        if !meta.is_file() {
            return None;
        }
        let modified = meta.modified().ok();
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = cache.get(path) {
            if c.modified == modified && c.len == meta.len() {
                return Some(c.entries.clone());
            }
        }
        let text = std::fs::read_to_string(path).ok()?;
        let entries = Arc::new(parse_peers_file(path, &text));
        if cache.len() >= MAX_CACHED_FILES {
            cache.clear();
        }
        cache.insert(
            path.to_path_buf(),
            Cached {
                modified,
                len: meta.len(),
                entries: entries.clone(),
            },
        );
        Some(entries)
    }
}

/// Parses a peers file; bad lines are logged with file and line and skipped.
pub fn parse_peers_file(path: &Path, text: &str) -> Vec<PeerEntry> {
    let mut out = vec![];
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        match parse_line(line) {
            Ok(e) => out.push(e),
            Err(why) => {
                tracing::warn!(file = %path.display(), line = i + 1, "skipping peer line: {why}")
            }
        }
    }
    out
}

fn parse_line(line: &str) -> Result<PeerEntry, String> {
    let mut parts = line.split_whitespace();
    let peer: PeerAddr = parts
        .next()
        .ok_or("empty line")?
        .parse()
        .map_err(|e: crate::config::ValueError| e.to_string())?;
    let protocol = match parts.next().ok_or("missing subprotocol (use * for any)")? {
        "*" => None,
        p => Some(p.to_string()),
    };
    let framing = match parts.next() {
        None => None,
        Some(name) => {
            let config: Vec<&str> = parts.collect();
            Some(FramingSpec::parse(name, &config.join(" ")).map_err(|e| e.to_string())?)
        }
    };
    Ok(PeerEntry {
        peer,
        protocol,
        framing,
    })
}

/// Client-supplied values become file names only if they are plain names:
/// letters, digits, `.`, `_`, `-`, not starting with `.`. `{path}` may hold
/// several such segments.
fn safe_segment(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with('.')
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn expand(
    template: &str,
    m: &Metadata,
    identity: &dyn Fn(&str) -> Option<String>,
) -> Option<String> {
    let mut out = String::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let close = open + rest[open..].find('}')?;
        let ph = &rest[open + 1..close];
        let value = match ph {
            "path" => {
                let p = m.path.trim_matches('/');
                if !p.split('/').all(safe_segment) {
                    return None;
                }
                p.to_string()
            }
            "host" => m.host.clone(),
            _ if ph == "subject" || ph.starts_with("claim:") || ph.starts_with("cert:") => {
                identity(ph)?
            }
            _ => {
                let (kind, name) = ph.split_once(':')?;
                let v = match kind {
                    "header" => m.headers.get(&name.to_ascii_lowercase()),
                    "cookie" => m.cookies.get(name),
                    "query" => m.query.get(name),
                    _ => None,
                }?;
                v.clone()
            }
        };
        if ph != "path" && !safe_segment(&value) {
            return None;
        }
        out.push_str(&value);
        rest = &rest[close + 1..];
    }
    out.push_str(rest);
    Some(out)
}

/// `*` matches any run of characters; everything else literally.
fn glob(pattern: &str, s: &str) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(path: &str, protocols: &[&str], header: Option<(&str, &str)>) -> Metadata {
        let mut m = Metadata {
            path: path.into(),
            protocols: protocols.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        if let Some((k, v)) = header {
            m.headers.insert(k.into(), v.into());
        }
        m
    }

    #[test]
    fn globbing() {
        assert!(glob("tcp://127.0.0.1:*", "tcp://127.0.0.1:6379"));
        assert!(glob("*", "anything"));
        assert!(glob("unix:/run/*.sock", "unix:/run/a.sock"));
        assert!(!glob("tcp://127.0.0.1:*", "tcp://127.0.0.10:1"));
        assert!(!glob("tcp://10.*", "tcp://127.0.0.1:1"));
    }

    #[test]
    fn lookups_in_order_with_allowlist_and_reload() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("acme.peers"),
            "# tenant acme\ntcp://127.0.0.1:6379 redis resp\nbogus line here\ntcp://127.0.0.1:9042 cql cql\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("default.peers"), "tcp://10.0.0.1:1 *\n").unwrap();
        let d = FileDiscovery::new(&Discovery {
            lookups: vec!["{header:x-tenant}.peers".into(), "default.peers".into()],
            allow: vec!["tcp://127.0.0.1:*".into()],
            base: dir.path().to_path_buf(),
        });
        let got = d.lookup(&meta("/", &["cql"], Some(("x-tenant", "acme"))), &|_| None);
        match got {
            Discovered::Peer { entry, protocol } => {
                assert_eq!(entry.peer.to_string(), "tcp://127.0.0.1:9042");
                assert_eq!(protocol.as_deref(), Some("cql"));
                assert_eq!(entry.framing, Some(FramingSpec::Cql));
            }
            other => panic!("{other:?}"),
        }
        // Unsafe header value: lookup skipped, default file's peer is not allowed.
        assert!(matches!(
            d.lookup(&meta("/", &[], Some(("x-tenant", "../etc"))), &|_| None),
            Discovered::Denied(_)
        ));
        // The file changes: the next lookup sees it.
        std::fs::write(dir.path().join("acme.peers"), "tcp://127.0.0.1:7000 cql\n").unwrap();
        match d.lookup(&meta("/", &["cql"], Some(("x-tenant", "acme"))), &|_| None) {
            Discovered::Peer { entry, .. } => {
                assert_eq!(entry.peer.to_string(), "tcp://127.0.0.1:7000")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn empty_allow_denies() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("x.peers"), "echo: *\n").unwrap();
        let d = FileDiscovery::new(&Discovery {
            lookups: vec!["{path}.peers".into()],
            allow: vec![],
            base: dir.path().to_path_buf(),
        });
        assert!(matches!(
            d.lookup(&meta("/x", &[], None), &|_| None),
            Discovered::Denied(_)
        ));
        assert_eq!(
            d.lookup(&meta("/../x", &[], None), &|_| None),
            Discovered::NotFound
        );
    }

    #[test]
    fn bad_templates_are_config_errors() {
        assert!(crate::config::check_lookup("{nope}").is_err());
        assert!(crate::config::check_lookup("{path").is_err());
        assert!(crate::config::check_lookup("{header:}").is_err());
        assert!(crate::config::check_lookup("{header:x}/{path}-{query:q}").is_ok());
    }
}
