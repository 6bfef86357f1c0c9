//! The authentication phase of the request path (see `docs/phases.md`): it
//! runs after admission and before anything is connected, for every request
//! a route serves — WebSocket handshakes of both HTTP versions and plain
//! HTTP requests alike — and for the tunnel's endpoints (`/request`, the
//! forward proxy, `/mux`, `/agent`).
//!
//! An [`Authenticator`] receives the request head, the client's address and
//! its TLS client certificate (if it showed one), and returns an
//! [`Identity`] or a refusal (an [`Error`] of kind `Unauthenticated` (401),
//! `Forbidden` (403) or `AuthUnavailable` (503)). A route without one admits
//! everyone as [`Identity::anonymous`] at no cost: nothing is called, nothing
//! allocated.
//!
//! The methods, one file each, are built from the config's `[auth.NAME]`
//! tables into an [`AuthSet`]; a route's [`Chain`] runs the Origin check,
//! then its methods in order (the first that yields an identity wins), then
//! its `subjects` rule. See `docs/security.md` for what each guarantees.
//!
//! Every file a method reads is read when the set is built: building a new
//! set from a new config reloads them, and [`AuthSet::build`] takes the old
//! set to carry over what is still valid (verified Basic credentials while
//! the htpasswd file is unchanged, the last good JWKS of a URL).

use std::borrow::Cow;
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use rustls::pki_types::CertificateDer;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

use crate::config::{AuthKind, AuthMethod, RouteAuth, TokenSource};
use crate::error::{Error, Kind, Side};
use crate::metrics::Metrics;

mod basic;
pub mod cache;
mod client;
mod hook;
mod jwt;
pub(crate) mod mtls;
pub mod rules;

pub use jwt::find_token;

/// What an authenticator sees of a request.
#[derive(Debug, Clone, Copy)]
pub struct AuthRequest<'a> {
    pub head: &'a Parts,
    pub remote: SocketAddr,
    /// The client's TLS certificate (end entity), when it showed one.
    pub client_cert: Option<&'a CertificateDer<'static>>,
}

/// Who made a request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    /// The subject (a token's `sub`, a user name, a certificate's CN);
    /// `None`: anonymous.
    pub subject: Option<Arc<str>>,
    /// Further attributes the method vouches for: `claim:NAME`,
    /// `cert:FIELD`, `header:NAME` (a hook's answer).
    pub attributes: Vec<(String, String)>,
    /// The method that admitted it (its configured name).
    pub method: Option<Arc<str>>,
    /// Headers for the backend request (an auth hook's `copy_headers`).
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

impl Identity {
    /// Nobody in particular: what a route without authentication admits.
    pub fn anonymous() -> Identity {
        Identity::default()
    }

    /// A known subject.
    pub fn subject(subject: impl Into<Arc<str>>) -> Identity {
        Identity {
            subject: Some(subject.into()),
            ..Identity::default()
        }
    }

    pub fn is_anonymous(&self) -> bool {
        self.subject.is_none()
    }

    /// A field by the name configs use: `subject` (or `sub`), `method`,
    /// `claim:NAME`, `cert:FIELD`, `header:NAME`.
    pub fn field(&self, name: &str) -> Option<&str> {
        match name {
            "subject" | "sub" => self.subject.as_deref(),
            "method" => self.method.as_deref(),
            _ => self
                .attributes
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str()),
        }
    }

    /// Fills an identity template (`{claim:tenant}`, `{cert:cn}`…).
    pub fn expand(&self, template: &str) -> Option<String> {
        wsgate_auth::template::expand(template, |ph| self.field(ph).map(str::to_string))
    }
}

/// The future an authenticator returns.
pub type AuthFuture<'a> = Pin<Box<dyn Future<Output = Result<Identity, Error>> + Send + 'a>>;

/// One authentication method.
pub trait Authenticator: Send + Sync + 'static {
    /// Decides who made `req`, or refuses it.
    fn authenticate<'a>(&'a self, req: AuthRequest<'a>) -> AuthFuture<'a>;
}

/// Runs the phase: `auth` decides, or everyone is anonymous.
pub async fn authenticate(
    auth: Option<&dyn Authenticator>,
    req: AuthRequest<'_>,
) -> Result<Identity, Error> {
    match auth {
        None => Ok(Identity::anonymous()),
        Some(a) => a.authenticate(req).await,
    }
}

/// What one method made of a request.
#[derive(Debug)]
pub(crate) enum Verdict {
    /// It vouches for this identity.
    Admit(Identity),
    /// No credential of its kind was there.
    Absent,
    /// A credential was there and is refused (`reason`: the metric label).
    Refuse {
        kind: Kind,
        reason: &'static str,
        challenge: Option<String>,
    },
}

impl Verdict {
    fn refuse(reason: &'static str) -> Verdict {
        Verdict::Refuse {
            kind: Kind::Unauthenticated,
            reason,
            challenge: None,
        }
    }
}

/// A built method.
pub(crate) enum Method {
    Jwt(jwt::Jwt),
    Basic(basic::Basic),
    /// Boxed: its client and cache make it several times the others' size.
    Hook(Box<hook::Hook>),
    Mtls(mtls::Mtls),
}

/// A named method and its configuration (to carry it over when unchanged).
pub(crate) struct Named {
    name: Arc<str>,
    config: AuthKind,
    method: Method,
}

impl Named {
    async fn check(&self, req: AuthRequest<'_>) -> Verdict {
        let mut v = match &self.method {
            Method::Jwt(m) => m.check(req),
            Method::Basic(m) => m.check(req).await,
            Method::Hook(m) => m.check(req, &self.name).await,
            Method::Mtls(m) => m.check(req),
        };
        if let Verdict::Admit(id) = &mut v {
            id.method = Some(self.name.clone());
        }
        v
    }

    /// The `WWW-Authenticate` challenge of a method that defines one.
    fn challenge(&self) -> Option<&str> {
        match &self.method {
            Method::Jwt(m) => Some(m.challenge()),
            Method::Basic(m) => Some(m.challenge()),
            Method::Hook(_) | Method::Mtls(_) => None,
        }
    }
}

/// Every configured method, by name.
#[derive(Default)]
pub struct AuthSet {
    methods: HashMap<String, Arc<Named>>,
    /// `Sec-WebSocket-Protocol` prefixes that carry a token.
    token_protocols: Vec<String>,
    metrics: Metrics,
}

impl AuthSet {
    /// Builds every method of `methods`, reading the files they name. From
    /// `previous` (the set of the config this one replaces) it carries over
    /// what is still valid: a method whose configuration and files did not
    /// change keeps its caches and its key set.
    pub fn build(
        methods: &[AuthMethod],
        metrics: &Metrics,
        previous: Option<&AuthSet>,
    ) -> anyhow::Result<AuthSet> {
        let mut out = AuthSet {
            metrics: metrics.clone(),
            ..AuthSet::default()
        };
        for m in methods {
            let old = previous
                .and_then(|p| p.methods.get(&m.name))
                .filter(|o| o.config == m.kind);
            let method = match &m.kind {
                AuthKind::Jwt(j) => {
                    for s in &j.sources {
                        if let TokenSource::Protocol(p) = s {
                            out.token_protocols.push(p.clone());
                        }
                    }
                    let old = old.and_then(|o| match &o.method {
                        Method::Jwt(j) => Some(j),
                        _ => None,
                    });
                    Method::Jwt(jwt::Jwt::new(j, old)?)
                }
                AuthKind::Basic(b) => {
                    let old = old.and_then(|o| match &o.method {
                        Method::Basic(b) => Some(b),
                        _ => None,
                    });
                    Method::Basic(basic::Basic::new(b, old)?)
                }
                AuthKind::Hook(h) => Method::Hook(Box::new(hook::Hook::new(h)?)),
                AuthKind::Mtls(t) => Method::Mtls(mtls::Mtls::new(t)),
            };
            out.methods.insert(
                m.name.clone(),
                Arc::new(Named {
                    name: m.name.as_str().into(),
                    config: m.kind.clone(),
                    method,
                }),
            );
        }
        Ok(out)
    }

    /// The chain a route (or the tunnel) runs; `None` when it asks nothing.
    pub fn chain(&self, a: &RouteAuth) -> Option<Arc<Chain>> {
        if a.is_open() {
            return None;
        }
        let methods = a
            .methods
            .iter()
            .filter_map(|n| self.methods.get(n).cloned())
            .collect();
        Some(Arc::new(Chain {
            methods,
            origins: wsgate_auth::origin::Origins::parse(&a.origins).unwrap_or_default(),
            check_origin: !a.origins.is_empty(),
            allow_missing_origin: a.allow_missing_origin,
            subjects: a.subjects.clone(),
            metrics: self.metrics.clone(),
        }))
    }

    /// Whether a `Sec-WebSocket-Protocol` entry carries a token: such
    /// entries are never a subprotocol (not chosen, not echoed, not
    /// forwarded).
    pub fn is_token_protocol(&self, entry: &str) -> bool {
        self.token_protocols
            .iter()
            .any(|p| entry.starts_with(p.as_str()))
    }

    /// Whether any method takes tokens from `Sec-WebSocket-Protocol`.
    pub fn has_token_protocols(&self) -> bool {
        !self.token_protocols.is_empty()
    }

    /// Names of the headers the hooks of `a` copy to the backend.
    pub fn copied_headers(&self, a: &RouteAuth) -> Vec<HeaderName> {
        let mut out = vec![];
        for n in &a.methods {
            if let Some(m) = self.methods.get(n) {
                if let Method::Hook(h) = &m.method {
                    out.extend(h.copy_headers().iter().cloned());
                }
            }
        }
        out
    }

    /// Starts what runs beside the connections: JWKS refreshes.
    pub fn spawn_background(&self, tracker: &TaskTracker, shutdown: &CancellationToken) {
        for m in self.methods.values() {
            if let Method::Jwt(j) = &m.method {
                j.spawn_refresh(&m.name, tracker, shutdown);
            }
        }
    }
}

/// A route's (or the tunnel's) authentication: the Origin check, its methods
/// in order, its `subjects` rule.
pub struct Chain {
    methods: Vec<Arc<Named>>,
    origins: wsgate_auth::origin::Origins,
    check_origin: bool,
    allow_missing_origin: bool,
    subjects: Vec<String>,
    metrics: Metrics,
}

impl Chain {
    /// The Origin rule, for WebSocket handshakes (what a browser opens
    /// cross-site with the user's cookies and certificate).
    fn origin(&self, head: &Parts) -> Result<(), Error> {
        if !self.check_origin || !crate::http::handshake::is_websocket_request(head) {
            return Ok(());
        }
        let refuse = |reason: &'static str, why: &'static str| {
            self.metrics.auth("origin", reason);
            debug!(reason, "origin refused");
            Err(Error::client(Kind::Forbidden, why))
        };
        match head.headers.get(http::header::ORIGIN).map(|v| v.to_str()) {
            None if self.allow_missing_origin => Ok(()),
            None => refuse("origin_missing", "this endpoint needs an Origin header"),
            Some(Ok(o)) if self.origins.allows(o) => Ok(()),
            Some(_) => refuse("origin_not_allowed", "this Origin is not allowed here"),
        }
    }

    /// Runs the chain.
    pub async fn run(&self, req: AuthRequest<'_>) -> Result<Identity, Error> {
        self.origin(req.head)?;
        let identity = if self.methods.is_empty() {
            Identity::anonymous()
        } else {
            self.methods(req).await?
        };
        if !self.subjects.is_empty() {
            let ok = identity.subject.as_deref().is_some_and(|s| {
                self.subjects
                    .iter()
                    .any(|g| wsgate_tunnel::allow::glob(g, s))
            });
            if !ok {
                let method = identity.method.as_deref().unwrap_or("-");
                self.metrics.auth(method, "subject_not_allowed");
                debug!(method, "subject not allowed on this route");
                return Err(Error::client(
                    Kind::Forbidden,
                    "this identity may not use this endpoint",
                ));
            }
        }
        Ok(identity)
    }

    async fn methods(&self, req: AuthRequest<'_>) -> Result<Identity, Error> {
        // The worst refusal so far: 503 over 403 over 401.
        let mut worst: Option<Kind> = None;
        let mut challenges: Vec<String> = vec![];
        let mut reasons: Vec<(&str, &'static str)> = vec![];
        for m in &self.methods {
            match m.check(req).await {
                Verdict::Admit(id) => {
                    self.metrics.auth(&m.name, "ok");
                    return Ok(id);
                }
                Verdict::Absent => {
                    reasons.push((&m.name, "missing"));
                    if let Some(c) = m.challenge() {
                        challenges.push(c.to_string());
                    }
                }
                Verdict::Refuse {
                    kind,
                    reason,
                    challenge,
                } => {
                    reasons.push((&m.name, reason));
                    let rank = |k: Kind| match k {
                        Kind::AuthUnavailable => 3,
                        Kind::Forbidden => 2,
                        _ => 1,
                    };
                    if worst.is_none_or(|w| rank(kind) > rank(w)) {
                        worst = Some(kind);
                    }
                    match challenge {
                        Some(c) => challenges.push(c),
                        None => {
                            if let Some(c) = m.challenge() {
                                challenges.push(c.to_string());
                            }
                        }
                    }
                }
            }
        }
        for (method, reason) in &reasons {
            self.metrics.auth(method, reason);
        }
        debug!(refusals = ?reasons, remote = %req.remote, "authentication refused");
        let kind = worst.unwrap_or(Kind::Unauthenticated);
        let (side, context): (Side, Cow<'static, str>) = match kind {
            Kind::AuthUnavailable => (Side::Upstream, "authentication is unavailable".into()),
            Kind::Forbidden => (Side::Client, "forbidden".into()),
            _ => (Side::Client, "authentication required".into()),
        };
        let mut e = Error::new(kind, side, context);
        if kind == Kind::Unauthenticated && !challenges.is_empty() {
            challenges.dedup();
            e = e.challenge(challenges.join(", "));
        }
        Err(e)
    }
}

impl Authenticator for Chain {
    fn authenticate<'a>(&'a self, req: AuthRequest<'a>) -> AuthFuture<'a> {
        Box::pin(self.run(req))
    }
}

/// The headers a route sets on its backend requests from the identity, and
/// those it strips from the client's (`identity_headers`, a hook's
/// `copy_headers`): a client cannot send its own `X-User`.
#[derive(Debug, Default, Clone)]
pub struct IdentityHeaders {
    set: Vec<(HeaderName, String)>,
    strip: Vec<HeaderName>,
    /// Take token entries out of `Sec-WebSocket-Protocol`.
    token_protocols: Vec<String>,
}

impl IdentityHeaders {
    pub fn new(a: &RouteAuth, set: &AuthSet) -> IdentityHeaders {
        let pairs: Vec<(HeaderName, String)> = a
            .identity_headers
            .iter()
            .filter_map(|(h, f)| Some((HeaderName::from_bytes(h.as_bytes()).ok()?, f.clone())))
            .collect();
        let mut strip: Vec<HeaderName> = pairs.iter().map(|(h, _)| h.clone()).collect();
        strip.extend(set.copied_headers(a));
        IdentityHeaders {
            set: pairs,
            strip,
            token_protocols: set.token_protocols.clone(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.strip.is_empty() && self.token_protocols.is_empty()
    }

    /// Rewrites a request's headers for its backend.
    pub fn apply(&self, headers: &mut HeaderMap, id: &Identity) {
        for h in &self.strip {
            headers.remove(h);
        }
        for (h, v) in &id.headers {
            if self.strip.contains(h) {
                headers.append(h.clone(), v.clone());
            }
        }
        for (h, field) in &self.set {
            let field = if field == "sub" { "subject" } else { field };
            if let Some(v) = id.field(field).and_then(|v| HeaderValue::from_str(v).ok()) {
                headers.insert(h.clone(), v);
            }
        }
        if !self.token_protocols.is_empty() {
            strip_token_protocols(headers, &self.token_protocols);
        }
    }
}

/// Takes `Sec-WebSocket-Protocol` entries that start with one of
/// `prefixes` out of `headers` (the header goes when nothing is left).
pub fn strip_token_protocols(headers: &mut HeaderMap, prefixes: &[String]) {
    let name = http::header::SEC_WEBSOCKET_PROTOCOL;
    if !headers.contains_key(&name) {
        return;
    }
    let kept: Vec<String> = headers
        .get_all(&name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty() && !prefixes.iter().any(|x| p.starts_with(x.as_str())))
        .map(String::from)
        .collect();
    headers.remove(&name);
    if !kept.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&kept.join(", ")) {
            headers.insert(name, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Kind;

    /// Admits requests that carry `X-Who`, as that subject.
    struct Header;

    impl Authenticator for Header {
        fn authenticate<'a>(&'a self, req: AuthRequest<'a>) -> AuthFuture<'a> {
            Box::pin(async move {
                match req.head.headers.get("x-who").and_then(|v| v.to_str().ok()) {
                    Some(who) => Ok(Identity::subject(who)),
                    None => Err(Error::client(Kind::Unauthenticated, "who are you?")),
                }
            })
        }
    }

    #[tokio::test]
    async fn the_slot_admits_anyone_until_a_method_fills_it() {
        let (with, without) = (
            http::Request::get("/")
                .header("x-who", "ada")
                .body(())
                .unwrap(),
            http::Request::get("/").body(()).unwrap(),
        );
        let (with, without) = (with.into_parts().0, without.into_parts().0);
        let req = |head| AuthRequest {
            head,
            remote: "127.0.0.1:1".parse().unwrap(),
            client_cert: None,
        };
        let id = authenticate(None, req(&without)).await.unwrap();
        assert!(id.is_anonymous());
        let id = authenticate(Some(&Header), req(&with)).await.unwrap();
        assert_eq!(id.subject.as_deref(), Some("ada"));
        let e = authenticate(Some(&Header), req(&without))
            .await
            .unwrap_err();
        assert_eq!(e.kind.status(), http::StatusCode::UNAUTHORIZED);
    }

    #[test]
    fn token_entries_leave_the_protocol_header_and_identity_headers_replace_the_clients() {
        let mut h = HeaderMap::new();
        h.insert(
            "sec-websocket-protocol",
            "chat, bearer.abc.def.ghi".parse().unwrap(),
        );
        h.insert("x-user", "forged".parse().unwrap());
        let ih = IdentityHeaders {
            set: vec![
                ("x-user".parse().unwrap(), "sub".into()),
                ("x-tenant".parse().unwrap(), "claim:tenant".into()),
            ],
            strip: vec!["x-user".parse().unwrap(), "x-tenant".parse().unwrap()],
            token_protocols: vec!["bearer.".into()],
        };
        let mut id = Identity::subject("ada");
        id.attributes.push(("claim:tenant".into(), "t1".into()));
        ih.apply(&mut h, &id);
        assert_eq!(h["x-user"], "ada");
        assert_eq!(h["x-tenant"], "t1");
        assert_eq!(h["sec-websocket-protocol"], "chat");
        // An anonymous request keeps none of the client's copies.
        let mut h = HeaderMap::new();
        h.insert("x-user", "forged".parse().unwrap());
        h.insert("sec-websocket-protocol", "bearer.x".parse().unwrap());
        ih.apply(&mut h, &Identity::anonymous());
        assert!(h.get("x-user").is_none());
        assert!(h.get("sec-websocket-protocol").is_none());
    }
}
