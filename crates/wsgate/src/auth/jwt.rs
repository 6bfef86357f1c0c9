//! `type = "jwt"`: a bearer token (RFC 7519) from `Authorization: Bearer`,
//! a query parameter, a cookie or a `Sec-WebSocket-Protocol` entry, checked
//! by `wsgate_auth::jwt` (signature by a key of the algorithm's family,
//! `exp`/`nbf` with leeway, `iss`, `aud`).
//!
//! Keys: a PEM file or an HMAC secret (read when the method is built), or a
//! JWKS file or URL, read again every `refresh` by a background task; a
//! read that fails keeps the last good set. A JWKS file is also read again
//! (at most once a second) when a token names a key id the set lacks, so a
//! rotated key is picked up at its first use.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use http::request::Parts;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};
use wsgate_auth::jwt::{KeySet, Refusal, Rules};

use super::{AuthRequest, Identity, Verdict};
use crate::config::auth::{secret, Jwt as Config, JwtKeys};
use crate::config::TokenSource;
use crate::error::Kind;

/// Where the keys come from.
#[derive(Clone)]
enum Source {
    Fixed,
    File(PathBuf),
    Url(http::Uri),
}

pub struct Jwt {
    keys: Arc<RwLock<Arc<KeySet>>>,
    rules: Rules,
    sources: Vec<TokenSource>,
    subject_claim: String,
    source: Source,
    refresh: Duration,
    /// When a JWKS file was last read on demand.
    last_read: Arc<Mutex<Option<Instant>>>,
}

/// Most claims kept as an identity's attributes, and the longest value.
const MAX_CLAIMS: usize = 64;
const MAX_CLAIM_LEN: usize = 1024;

fn read_set(keys: &JwtKeys) -> anyhow::Result<KeySet> {
    use anyhow::Context as _;
    let read =
        |p: &PathBuf| std::fs::read(p).with_context(|| format!("cannot read {}", p.display()));
    let set = match keys {
        JwtKeys::Pem(p) => KeySet::from_pem(&read(p)?),
        JwtKeys::Secret(p) => KeySet::from_secret(&secret(&read(p)?)),
        JwtKeys::JwksFile(p) => KeySet::from_jwks(&read(p)?),
        JwtKeys::JwksUrl(_) => return Ok(KeySet::default()),
    };
    set.map_err(|e| anyhow::anyhow!("{e}"))
}

impl Jwt {
    pub fn new(c: &Config, old: Option<&Jwt>) -> anyhow::Result<Jwt> {
        let mut algorithms = vec![];
        for a in &c.algorithms {
            algorithms.push(wsgate_auth::jwt::parse_algorithm(a)?);
        }
        let source = match &c.keys {
            JwtKeys::JwksFile(p) => Source::File(p.clone()),
            JwtKeys::JwksUrl(u) => Source::Url(u.parse()?),
            _ => Source::Fixed,
        };
        // A URL's keys come from the network: the last good set of the
        // method this one replaces is kept until the first fetch.
        let keys = match (&source, old) {
            (Source::Url(_), Some(o)) => o.keys.read().unwrap_or_else(|e| e.into_inner()).clone(),
            _ => Arc::new(read_set(&c.keys)?),
        };
        Ok(Jwt {
            keys: Arc::new(RwLock::new(keys)),
            rules: Rules {
                algorithms,
                issuers: c.issuers.clone(),
                audiences: c.audiences.clone(),
                leeway: c.leeway.as_secs(),
                require_exp: c.require_exp,
                max_len: c.max_token_bytes,
            },
            sources: c.sources.clone(),
            subject_claim: c.subject_claim.clone(),
            source,
            refresh: c.refresh,
            last_read: Arc::default(),
        })
    }

    pub fn challenge(&self) -> &'static str {
        "Bearer realm=\"wsgate\""
    }

    fn keys(&self) -> Arc<KeySet> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn check(&self, req: AuthRequest<'_>) -> Verdict {
        let Some(token) = find_token(req.head, &self.sources) else {
            return Verdict::Absent;
        };
        let keys = self.keys();
        if keys.is_empty() {
            return Verdict::Refuse {
                kind: Kind::AuthUnavailable,
                reason: "no_keys",
                challenge: None,
            };
        }
        let mut r = keys.verify(&token, &self.rules);
        if matches!(r, Err(Refusal::UnknownKey)) && self.reread_file() {
            r = self.keys().verify(&token, &self.rules);
        }
        let claims = match r {
            Ok(c) => c,
            Err(e) => {
                return Verdict::Refuse {
                    kind: Kind::Unauthenticated,
                    reason: e.label(),
                    challenge: Some(format!(
                    "Bearer realm=\"wsgate\", error=\"invalid_token\", error_description=\"{e}\""
                )),
                }
            }
        };
        let Some(subject) = claims.get(&self.subject_claim).and_then(claim_text) else {
            return Verdict::refuse("missing_claim");
        };
        let mut id = Identity::subject(subject);
        for (k, v) in claims.iter().take(MAX_CLAIMS) {
            if let Some(t) = claim_text(v).filter(|t| t.len() <= MAX_CLAIM_LEN) {
                id.attributes.push((format!("claim:{k}"), t));
            }
        }
        Verdict::Admit(id)
    }

    /// Reads a JWKS file again on demand (at most once a second); whether
    /// the set changed.
    fn reread_file(&self) -> bool {
        let Source::File(p) = &self.source else {
            return false;
        };
        {
            let mut last = self.last_read.lock().unwrap_or_else(|e| e.into_inner());
            if last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
                return false;
            }
            *last = Some(Instant::now());
        }
        match std::fs::read(p).map(|b| KeySet::from_jwks(&b)) {
            Ok(Ok(set)) => {
                *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(set);
                true
            }
            _ => false,
        }
    }

    /// Reads a JWKS file or URL every `refresh` (a URL at once, and every
    /// 5 s until its first success), keeping the last good set.
    pub fn spawn_refresh(&self, name: &str, tracker: &TaskTracker, shutdown: &CancellationToken) {
        let source = self.source.clone();
        if matches!(source, Source::Fixed) {
            return;
        }
        let (keys, refresh, name) = (self.keys.clone(), self.refresh, name.to_string());
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            let client = match &source {
                Source::Url(_) => match super::client::new(Duration::from_secs(5)) {
                    Ok(c) => Some(c),
                    Err(e) => return warn!(method = %name, "JWKS client: {e:#}"),
                },
                _ => None,
            };
            let mut first = matches!(source, Source::Url(_));
            loop {
                if !first {
                    let empty = keys.read().unwrap_or_else(|e| e.into_inner()).is_empty();
                    let wait = if empty {
                        refresh.min(Duration::from_secs(5))
                    } else {
                        refresh
                    };
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(wait) => {}
                    }
                }
                first = false;
                let got: Result<KeySet, String> = match (&source, &client) {
                    (Source::File(p), _) => std::fs::read(p)
                        .map_err(|e| e.to_string())
                        .and_then(|b| KeySet::from_jwks(&b).map_err(|e| e.to_string())),
                    (Source::Url(u), Some(c)) => fetch(c, u).await,
                    _ => return,
                };
                match got {
                    Ok(set) => {
                        let n = set.len();
                        *keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(set);
                        info!(method = %name, keys = n, "JWKS loaded");
                    }
                    Err(e) => {
                        warn!(method = %name, "JWKS refresh failed, keeping the last good set: {e}")
                    }
                }
            }
        });
    }
}

async fn fetch(client: &super::client::HttpClient, url: &http::Uri) -> Result<KeySet, String> {
    let req = http::Request::get(url.clone())
        .header(http::header::ACCEPT, "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .map_err(|e| e.to_string())?;
    let resp = super::client::send(client, req, Duration::from_secs(10), 1 << 20).await?;
    if !resp.status().is_success() {
        return Err(format!("{url} answered {}", resp.status()));
    }
    KeySet::from_jwks(resp.body()).map_err(|e| e.to_string())
}

/// A claim's value as text: strings, numbers and booleans as they are,
/// arrays of them joined with `,`.
fn claim_text(v: &serde_json::Value) -> Option<String> {
    use serde_json::Value as V;
    match v {
        V::String(s) => Some(s.clone()),
        V::Number(n) => Some(n.to_string()),
        V::Bool(b) => Some(b.to_string()),
        V::Array(a) => {
            let parts: Option<Vec<String>> = a
                .iter()
                .map(|x| match x {
                    V::Array(_) | V::Object(_) | V::Null => None,
                    x => claim_text(x),
                })
                .collect();
            parts.map(|p| p.join(","))
        }
        _ => None,
    }
}

/// The token of a request, from the first source that has one.
pub fn find_token(head: &Parts, sources: &[TokenSource]) -> Option<String> {
    for s in sources {
        let found = match s {
            TokenSource::Bearer => head
                .headers
                .get(http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| {
                    let (scheme, rest) = v.trim().split_once(' ')?;
                    scheme
                        .eq_ignore_ascii_case("bearer")
                        .then(|| rest.trim().to_string())
                }),
            TokenSource::Query(name) => head.uri.query().and_then(|q| {
                q.split('&').find_map(|pair| {
                    let (k, v) = pair.split_once('=')?;
                    (k == name).then(|| crate::route::percent_decode(v))
                })
            }),
            TokenSource::Cookie(name) => head
                .headers
                .get_all(http::header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .find_map(|pair| {
                    let (k, v) = pair.split_once('=')?;
                    (k.trim() == name).then(|| v.trim().to_string())
                }),
            TokenSource::Protocol(prefix) => head
                .headers
                .get_all(http::header::SEC_WEBSOCKET_PROTOCOL)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .find_map(|p| p.trim().strip_prefix(prefix.as_str()).map(protocol_token)),
        };
        if let Some(t) = found.filter(|t| !t.is_empty()) {
            return Some(t);
        }
    }
    None
}

/// The token of a `Sec-WebSocket-Protocol` entry past its prefix: a JWT as
/// it is (it has dots), or base64url of one (no dots; what wsgate-client
/// sends as `wsgate.bearer.…`).
fn protocol_token(rest: &str) -> String {
    use base64::Engine as _;
    if rest.contains('.') {
        return rest.to_string();
    }
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(rest.trim_end_matches('='))
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .unwrap_or_else(|| rest.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_found_where_the_config_says() {
        let head = http::Request::get("/ws?x=1&access_token=q.q.q")
            .header("cookie", "a=b; session=c.c.c")
            .header("sec-websocket-protocol", "chat, bearer.p.p.p")
            .header("authorization", "Bearer h.h.h")
            .body(())
            .unwrap()
            .into_parts()
            .0;
        let f = |s: &[&str]| {
            let s: Vec<TokenSource> = s.iter().map(|x| x.parse().unwrap()).collect();
            find_token(&head, &s)
        };
        assert_eq!(f(&["bearer"]).as_deref(), Some("h.h.h"));
        assert_eq!(f(&["query:access_token"]).as_deref(), Some("q.q.q"));
        assert_eq!(f(&["cookie:session"]).as_deref(), Some("c.c.c"));
        assert_eq!(f(&["protocol:bearer."]).as_deref(), Some("p.p.p"));
        assert_eq!(
            f(&["cookie:none", "query:access_token"]).as_deref(),
            Some("q.q.q")
        );
        assert_eq!(f(&["cookie:none"]), None);
        // wsgate-client's form: base64url of the token.
        let head = http::Request::get("/mux")
            .header("sec-websocket-protocol", "wsmux.v1, wsgate.bearer.YS5iLmM")
            .body(())
            .unwrap()
            .into_parts()
            .0;
        let s = vec!["protocol:wsgate.bearer.".parse().unwrap()];
        assert_eq!(find_token(&head, &s).as_deref(), Some("a.b.c"));
    }
}
