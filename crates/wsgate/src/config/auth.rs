//! Authentication as plain data: the named methods of `[auth.NAME]`, what a
//! route (or the tunnel) asks of a request (`auth`, `origins`, `subjects`,
//! `identity_headers`, `allow`), and a listener's client certificates
//! (`client_ca`, `client_auth`, `crl`). Every file named here is read and
//! checked by `wsgate check` (through [`check_files`]) and read again by the
//! runtime (`crate::auth`), so a new config with the same keys picks up a
//! changed file.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// One named method (`[auth.NAME]`).
#[derive(Debug, Clone, PartialEq)]
pub struct AuthMethod {
    pub name: String,
    pub kind: AuthKind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum AuthKind {
    Jwt(Jwt),
    Basic(Basic),
    Hook(Hook),
    Mtls(Mtls),
}

impl AuthKind {
    pub fn type_name(&self) -> &'static str {
        match self {
            AuthKind::Jwt(_) => "jwt",
            AuthKind::Basic(_) => "basic",
            AuthKind::Hook(_) => "hook",
            AuthKind::Mtls(_) => "mtls",
        }
    }
}

/// `type = "jwt"`.
#[derive(Debug, Clone, PartialEq)]
pub struct Jwt {
    pub keys: JwtKeys,
    /// Algorithm names; empty: all of the keys' families.
    pub algorithms: Vec<String>,
    pub issuers: Vec<String>,
    pub audiences: Vec<String>,
    pub leeway: Duration,
    pub require_exp: bool,
    pub max_token_bytes: usize,
    /// Where the token is looked for, in order.
    pub sources: Vec<TokenSource>,
    /// The claim that is the subject.
    pub subject_claim: String,
    /// How often a JWKS file or URL is read again (the last good set is kept
    /// when a read fails).
    pub refresh: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwtKeys {
    /// Public keys, PEM (`public_key`).
    Pem(PathBuf),
    /// An HMAC secret (`secret_file`: the file's bytes, a final newline cut).
    Secret(PathBuf),
    /// A JWKS document on disk (`jwks`).
    JwksFile(PathBuf),
    /// A JWKS document fetched over HTTP(S) (`jwks_url`).
    JwksUrl(String),
}

/// Where a token may come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// `Authorization: Bearer TOKEN`.
    Bearer,
    /// `?NAME=TOKEN`.
    Query(String),
    /// `Cookie: NAME=TOKEN`.
    Cookie(String),
    /// A `Sec-WebSocket-Protocol` entry `PREFIX` + TOKEN: never echoed, and
    /// taken out before the subprotocol is chosen or the handshake forwarded.
    Protocol(String),
}

impl std::str::FromStr for TokenSource {
    type Err = String;

    /// `bearer`, `query:NAME`, `cookie:NAME`, `protocol:PREFIX`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let name_ok = |n: &str| {
            !n.is_empty()
                && n.len() <= 64
                && n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        };
        match s.split_once(':') {
            None if s == "bearer" => Ok(TokenSource::Bearer),
            Some(("query", n)) if name_ok(n) => Ok(TokenSource::Query(n.into())),
            Some(("cookie", n)) if name_ok(n) => Ok(TokenSource::Cookie(n.into())),
            Some(("protocol", n)) if name_ok(n) => Ok(TokenSource::Protocol(n.into())),
            _ => Err(format!(
                "invalid token source `{s}` (expected bearer, query:NAME, cookie:NAME or \
                 protocol:PREFIX)"
            )),
        }
    }
}

/// `type = "basic"`.
#[derive(Debug, Clone, PartialEq)]
pub struct Basic {
    pub htpasswd: PathBuf,
    pub realm: String,
    /// How long a verified user and password are taken without hashing again.
    pub cache_ttl: Duration,
    pub cache_size: usize,
}

/// `type = "hook"`: an `auth_request`-like HTTP endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Hook {
    /// `http://` or `https://`.
    pub url: String,
    /// Request headers sent to the hook (lower case), beside
    /// `X-Original-Method` and `X-Original-URI`; their values key the cache.
    pub send_headers: Vec<String>,
    /// Headers of the hook's 2xx answer copied to the backend request.
    pub copy_headers: Vec<String>,
    /// The answer header that names the subject.
    pub subject_header: Option<String>,
    pub timeout: Duration,
    /// How long a 2xx is remembered for the same credential headers; 0: not.
    pub cache_ttl: Duration,
    pub cache_size: usize,
}

/// `type = "mtls"`: the listener's verified client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mtls {
    /// The field that is the subject: `cn`, `dns`, `uri` or `email`.
    pub subject: String,
}

/// What a route or the tunnel asks of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteAuth {
    /// Method names, tried in order; empty: everyone, anonymously.
    pub methods: Vec<String>,
    /// Allowed `Origin`s of WebSocket handshakes; empty: any.
    pub origins: Vec<String>,
    pub allow_missing_origin: bool,
    /// Globs over the subject; empty: any identity the methods admit.
    pub subjects: Vec<String>,
    /// Backend request header → identity field (`subject`, `claim:NAME`,
    /// `cert:FIELD`, `method`).
    pub identity_headers: Vec<(String, String)>,
    /// Identity rules: peer globs (bridge routes) or destination patterns
    /// (the tunnel's streams), templated; empty: no rule of their own.
    pub allow: Vec<String>,
}

impl Default for RouteAuth {
    fn default() -> Self {
        RouteAuth {
            methods: vec![],
            origins: vec![],
            allow_missing_origin: true,
            subjects: vec![],
            identity_headers: vec![],
            allow: vec![],
        }
    }
}

impl RouteAuth {
    /// Whether anything is asked at all.
    pub fn is_open(&self) -> bool {
        self.methods.is_empty() && self.origins.is_empty() && self.subjects.is_empty()
    }
}

/// A listener's client certificates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientAuth {
    /// CA certificates (PEM) client certificates must chain to.
    pub ca: PathBuf,
    /// `client_auth = "required"`: no certificate, no TLS session.
    pub required: bool,
    /// Certificate revocation lists (PEM).
    pub crls: Vec<PathBuf>,
}

/// Reads and checks the files a method names; the message names the file.
pub fn check_method_files(kind: &AuthKind) -> Result<(), String> {
    let read = |p: &Path| std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()));
    match kind {
        AuthKind::Jwt(j) => {
            let set = match &j.keys {
                JwtKeys::Pem(p) => wsgate_auth::jwt::KeySet::from_pem(&read(p)?),
                JwtKeys::Secret(p) => wsgate_auth::jwt::KeySet::from_secret(&secret(&read(p)?)),
                JwtKeys::JwksFile(p) => wsgate_auth::jwt::KeySet::from_jwks(&read(p)?),
                JwtKeys::JwksUrl(_) => return Ok(()),
            };
            let path = match &j.keys {
                JwtKeys::Pem(p) | JwtKeys::Secret(p) | JwtKeys::JwksFile(p) => p.display(),
                JwtKeys::JwksUrl(_) => unreachable!(),
            };
            set.map(|_| ()).map_err(|e| format!("{path}: {e}"))
        }
        AuthKind::Basic(b) => {
            let text = String::from_utf8(read(&b.htpasswd)?)
                .map_err(|_| format!("{}: not UTF-8 text", b.htpasswd.display()))?;
            wsgate_auth::htpasswd::Htpasswd::parse(&text)
                .map(|_| ())
                .map_err(|e| format!("{}:{}: {}", b.htpasswd.display(), e.line, e.message))
        }
        AuthKind::Hook(_) | AuthKind::Mtls(_) => Ok(()),
    }
}

/// An HMAC secret file's bytes, without a final newline.
pub fn secret(bytes: &[u8]) -> Vec<u8> {
    let mut v = bytes.to_vec();
    while v.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        v.pop();
    }
    v
}

/// Checks CRL files (PEM).
pub fn check_crl(path: &Path) -> Result<(), String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    wsgate_auth::cert::check_crls(&pem)
        .map(|_| ())
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// An identity field as `identity_headers` names it.
pub fn check_identity_field(f: &str) -> Result<(), String> {
    let ok = matches!(f, "subject" | "sub" | "method")
        || f.strip_prefix("claim:").is_some_and(|n| !n.is_empty())
        || f.strip_prefix("cert:")
            .is_some_and(|n| wsgate_auth::cert::FIELDS.contains(&n))
        || f.strip_prefix("header:").is_some_and(|n| !n.is_empty());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "unknown identity field `{f}` (expected subject, method, claim:NAME, \
             cert:cn|dns|uri|email or header:NAME)"
        ))
    }
}
