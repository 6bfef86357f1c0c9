//! `type = "basic"`: `Authorization: Basic` against an htpasswd file
//! (bcrypt or argon2 entries, `wsgate_auth::htpasswd`).
//!
//! A hash costs milliseconds of CPU by design, so it runs on the blocking
//! pool (never on a worker's event loop), and a user and password that
//! verified are remembered for `cache_ttl`: keyed by a salted SHA-256 of the
//! pair (the password is not kept), at most `cache_size` entries. A cached
//! credential does not pay its hash again. The cache is carried over to the
//! method of a new config while its htpasswd file is byte for byte the same
//! (a changed password must be checked again).

use std::sync::Arc;

use base64::Engine as _;
use wsgate_auth::htpasswd::{Htpasswd, Verdict as Check};

use super::cache::{digest, salt, TtlCache};
use super::{AuthRequest, Identity, Verdict};
use crate::config::auth::Basic as Config;

pub struct Basic {
    file: Arc<Htpasswd>,
    challenge: String,
    cache: Arc<TtlCache<[u8; 32], Arc<str>>>,
    salt: [u8; 32],
}

impl Basic {
    pub fn new(c: &Config, old: Option<&Basic>) -> anyhow::Result<Basic> {
        use anyhow::Context as _;
        let text = std::fs::read_to_string(&c.htpasswd)
            .with_context(|| format!("cannot read {}", c.htpasswd.display()))?;
        let file = Htpasswd::parse(&text)
            .map_err(|e| anyhow::anyhow!("{}:{}: {}", c.htpasswd.display(), e.line, e.message))?;
        let (cache, salt) = match old {
            Some(o) if *o.file == file => (o.cache.clone(), o.salt),
            _ => (Arc::new(TtlCache::new(c.cache_ttl, c.cache_size)), salt()),
        };
        Ok(Basic {
            file: Arc::new(file),
            challenge: format!(
                "Basic realm=\"{}\", charset=\"UTF-8\"",
                c.realm.replace('"', "")
            ),
            cache,
            salt,
        })
    }

    pub fn challenge(&self) -> &str {
        &self.challenge
    }

    pub async fn check(&self, req: AuthRequest<'_>) -> Verdict {
        let Some(v) = req
            .head
            .headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
        else {
            return Verdict::Absent;
        };
        let Some((scheme, b64)) = v.trim().split_once(' ') else {
            return Verdict::Absent;
        };
        if !scheme.eq_ignore_ascii_case("basic") {
            return Verdict::Absent;
        }
        let decoded = match base64::engine::general_purpose::STANDARD.decode(b64.trim()) {
            Ok(d) if d.len() <= 1024 => d,
            _ => return Verdict::refuse("malformed"),
        };
        let Some(colon) = decoded.iter().position(|&b| b == b':') else {
            return Verdict::refuse("malformed");
        };
        let (user, password) = (&decoded[..colon], &decoded[colon + 1..]);
        let Ok(user) = std::str::from_utf8(user) else {
            return Verdict::refuse("malformed");
        };
        let key = digest(&self.salt, &[user.as_bytes(), password]);
        if let Some(u) = self.cache.get(&key) {
            return Verdict::Admit(Identity::subject(u));
        }
        let (file, u, p) = (self.file.clone(), user.to_string(), password.to_vec());
        let verdict = tokio::task::spawn_blocking(move || file.verify(&u, &p))
            .await
            .unwrap_or(Check::BadPassword);
        match verdict {
            Check::Ok => {
                let u: Arc<str> = user.into();
                self.cache.insert(key, u.clone());
                Verdict::Admit(Identity::subject(u))
            }
            Check::BadPassword => Verdict::refuse("bad_password"),
            Check::UnknownUser => Verdict::refuse("unknown_user"),
        }
    }
}
