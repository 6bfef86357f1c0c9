//! Routing: pick a route from the request's metadata and negotiate the
//! subprotocol; [`discovery`] finds a bridge peer from the same metadata.

use std::collections::BTreeMap;

use http::request::Parts;

use crate::config::{Matcher, Route};

pub mod discovery;

/// What a handshake says about itself, extracted once.
#[derive(Debug, Default, Clone)]
pub struct Metadata {
    pub path: String,
    /// Host without port, lower case.
    pub host: String,
    /// Header name (lower case) → first value.
    pub headers: BTreeMap<String, String>,
    pub cookies: BTreeMap<String, String>,
    pub query: BTreeMap<String, String>,
    /// Subprotocols offered, in the client's order.
    pub protocols: Vec<String>,
}

impl Metadata {
    /// Extracts what routing reads from a request head. Without `maps`, the
    /// header, cookie and query tables stay empty (for configs where no route
    /// or discovery lookup reads them), which saves a string per header on
    /// every handshake.
    pub fn extract(parts: &Parts, maps: bool) -> Metadata {
        let mut headers = BTreeMap::new();
        let mut cookies = BTreeMap::new();
        let mut protocols = vec![];
        for (name, value) in &parts.headers {
            if !maps && name != http::header::SEC_WEBSOCKET_PROTOCOL {
                continue;
            }
            let Ok(v) = value.to_str() else { continue };
            match name.as_str() {
                "cookie" => {
                    for pair in v.split(';') {
                        if let Some((k, val)) = pair.split_once('=') {
                            cookies
                                .entry(k.trim().to_string())
                                .or_insert_with(|| val.trim().to_string());
                        }
                    }
                }
                "sec-websocket-protocol" => protocols.extend(
                    v.split(',')
                        .map(str::trim)
                        .filter(|p| !p.is_empty())
                        .map(String::from),
                ),
                _ => {}
            }
            if maps {
                headers
                    .entry(name.as_str().to_string())
                    .or_insert_with(|| v.to_string());
            }
        }
        let authority = parts
            .uri
            .authority()
            .map(|a| a.as_str())
            .or_else(|| {
                parts
                    .headers
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok())
            })
            .unwrap_or_default();
        let query = parts
            .uri
            .query()
            .filter(|_| maps)
            .map(|q| {
                let mut m = BTreeMap::new();
                for pair in q.split('&').filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    m.entry(percent_decode(k))
                        .or_insert_with(|| percent_decode(v));
                }
                m
            })
            .unwrap_or_default();
        Metadata {
            path: parts.uri.path().to_string(),
            host: strip_port(authority).to_ascii_lowercase(),
            headers,
            cookies,
            query,
            protocols,
        }
    }
}

fn strip_port(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    authority.split(':').next().unwrap_or(authority)
}

/// Decodes `%XX` escapes and `+`; invalid escapes are kept as they are.
pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn map_matches(want: &BTreeMap<String, String>, have: &BTreeMap<String, String>) -> bool {
    want.iter()
        .all(|(k, v)| have.get(k).is_some_and(|h| v == "*" || h == v))
}

impl Matcher {
    /// Whether everything but the subprotocol matches.
    pub fn matches(&self, m: &Metadata) -> bool {
        if let Some(p) = &self.path {
            if &m.path != p {
                return false;
            }
        }
        if let Some(p) = &self.path_prefix {
            if !m.path.starts_with(p.as_str()) {
                return false;
            }
        }
        if let Some(h) = &self.host {
            if &m.host != h {
                return false;
            }
        }
        map_matches(&self.headers, &m.headers)
            && map_matches(&self.cookies, &m.cookies)
            && map_matches(&self.query, &m.query)
    }
}

/// The negotiated subprotocol: the first one the client offered that the
/// route supports; `*` takes the client's first. `Err` when the route lists
/// protocols and the client offered none of them.
pub fn negotiate(
    supported: &[String],
    offered: &[String],
) -> Result<Option<String>, NoCommonProtocol> {
    if supported.is_empty() {
        return Ok(None);
    }
    if supported.iter().any(|s| s == "*") {
        return Ok(offered.first().cloned());
    }
    offered
        .iter()
        .find(|o| supported.iter().any(|s| s == *o))
        .cloned()
        .map(Some)
        .ok_or(NoCommonProtocol)
}

/// The client offered none of the route's subprotocols.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoCommonProtocol;

/// The routing decision.
#[derive(Debug)]
pub enum Selection<'a> {
    Route {
        /// The route's index in the config.
        index: usize,
        route: &'a Route,
        protocol: Option<String>,
    },
    /// No route's matchers fit: 404.
    NotFound,
    /// A route fit but the client offered none of its subprotocols: 400.
    NoProtocol { supported: Vec<String> },
}

/// Picks the first route whose matchers and subprotocols fit, in order.
pub fn select<'a>(routes: &'a [Route], m: &Metadata) -> Selection<'a> {
    let mut mismatch: Option<Vec<String>> = None;
    for (index, route) in routes.iter().enumerate() {
        if !route.matcher.matches(m) {
            continue;
        }
        match negotiate(&route.protocols, &m.protocols) {
            Ok(protocol) => {
                return Selection::Route {
                    index,
                    route,
                    protocol,
                }
            }
            Err(NoCommonProtocol) => {
                mismatch.get_or_insert_with(|| route.protocols.clone());
            }
        }
    }
    match mismatch {
        Some(supported) => Selection::NoProtocol { supported },
        None => Selection::NotFound,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{PeerAddr, Target};
    use wsgate_framing::FramingSpec;

    fn meta(uri: &str, headers: &[(&str, &str)]) -> Metadata {
        let mut b = http::Request::builder().uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let (parts, ()) = b.body(()).unwrap().into_parts();
        Metadata::extract(&parts, true)
    }

    fn route(name: &str, matcher: Matcher, protocols: &[&str]) -> Route {
        Route {
            name: name.into(),
            matcher,
            protocols: protocols.iter().map(|s| s.to_string()).collect(),
            target: Target::Static(PeerAddr::Echo),
            framing: FramingSpec::Binary,
            limits: Default::default(),
            limits_by_listener: vec![],
            admission: Default::default(),
            health_check: None,
            auth: Default::default(),
            deflate: None,
        }
    }

    #[test]
    fn metadata_extraction() {
        let m = meta(
            "/db/x?tenant=a%20b&flag",
            &[
                ("Host", "Example.COM:8080"),
                ("Cookie", "sid=42; theme=dark"),
                ("Sec-WebSocket-Protocol", "redis, cql"),
                ("Sec-WebSocket-Protocol", "kafka"),
            ],
        );
        assert_eq!(m.path, "/db/x");
        assert_eq!(m.host, "example.com");
        assert_eq!(m.cookies["sid"], "42");
        assert_eq!(m.query["tenant"], "a b");
        assert_eq!(m.query["flag"], "");
        assert_eq!(m.protocols, vec!["redis", "cql", "kafka"]);

        // Without the tables: path, host and protocols still, nothing else.
        let (parts, ()) = http::Request::builder()
            .uri("/p?q=1")
            .header("Host", "H:1")
            .header("Cookie", "a=b")
            .header("Sec-WebSocket-Protocol", "redis")
            .body(())
            .unwrap()
            .into_parts();
        let lean = Metadata::extract(&parts, false);
        assert_eq!((lean.path.as_str(), lean.host.as_str()), ("/p", "h"));
        assert_eq!(lean.protocols, vec!["redis"]);
        assert!(lean.headers.is_empty() && lean.cookies.is_empty() && lean.query.is_empty());
    }

    #[test]
    fn negotiation_rules() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            negotiate(&s(&["cql", "redis"]), &s(&["redis", "cql"])),
            Ok(Some("redis".into()))
        );
        assert_eq!(negotiate(&s(&["redis"]), &s(&["x"])), Err(NoCommonProtocol));
        assert_eq!(negotiate(&s(&["redis"]), &s(&[])), Err(NoCommonProtocol));
        assert_eq!(negotiate(&s(&["*"]), &s(&["x", "y"])), Ok(Some("x".into())));
        assert_eq!(negotiate(&s(&["*"]), &s(&[])), Ok(None));
        assert_eq!(negotiate(&s(&[]), &s(&["x"])), Ok(None));
    }

    #[test]
    fn selection_in_order_with_protocol_fallthrough() {
        let routes = vec![
            route(
                "redis",
                Matcher {
                    path: Some("/db".into()),
                    ..Default::default()
                },
                &["redis"],
            ),
            route(
                "cql",
                Matcher {
                    path: Some("/db".into()),
                    ..Default::default()
                },
                &["cql"],
            ),
            route(
                "tenant",
                Matcher {
                    path_prefix: Some("/t/".into()),
                    headers: [("x-tenant".to_string(), "*".to_string())].into(),
                    ..Default::default()
                },
                &[],
            ),
        ];
        let pick = |m: &Metadata| match select(&routes, m) {
            Selection::Route {
                route, protocol, ..
            } => format!("{}:{:?}", route.name, protocol),
            Selection::NotFound => "404".into(),
            Selection::NoProtocol { supported } => format!("400:{supported:?}"),
        };
        assert_eq!(
            pick(&meta("/db", &[("Sec-WebSocket-Protocol", "cql")])),
            "cql:Some(\"cql\")"
        );
        assert_eq!(
            pick(&meta("/db", &[("Sec-WebSocket-Protocol", "redis")])),
            "redis:Some(\"redis\")"
        );
        assert_eq!(pick(&meta("/db", &[])), "400:[\"redis\"]");
        assert_eq!(pick(&meta("/t/1", &[("X-Tenant", "a")])), "tenant:None");
        assert_eq!(pick(&meta("/t/1", &[])), "404");
        assert_eq!(pick(&meta("/nope", &[])), "404");
    }

    #[test]
    fn percent_decoding_is_total() {
        assert_eq!(percent_decode("a%2Fb+c"), "a/b c");
        assert_eq!(percent_decode("%"), "%");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
        assert_eq!(percent_decode("%e2%82%ac"), "€");
    }
}
