//! `type = "hook"`: an HTTP endpoint decides, like nginx's `auth_request`.
//! The gateway sends `GET URL` with `X-Original-Method`, `X-Original-URI`,
//! `X-Forwarded-For` and the request headers named in `send_headers`; a
//! 2xx admits (the subject from `subject_header`, else the method's name;
//! the headers named in `copy_headers` go to the backend request), 401 and
//! 403 are relayed (a 401's `WWW-Authenticate` too), anything else, a
//! failure or a timeout is 503. A 2xx is remembered for `cache_ttl` per
//! credential: the values of `send_headers`, salted and hashed.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http_body_util::Full;
use tracing::warn;

use super::cache::{digest, salt, TtlCache};
use super::client::{self, HttpClient};
use super::{AuthRequest, Identity, Verdict};
use crate::config::auth::Hook as Config;
use crate::error::Kind;

pub struct Hook {
    url: http::Uri,
    send: Vec<HeaderName>,
    copy: Vec<HeaderName>,
    subject_header: Option<HeaderName>,
    timeout: std::time::Duration,
    client: HttpClient,
    cache: TtlCache<[u8; 32], Arc<Identity>>,
    salt: [u8; 32],
}

fn names(v: &[String]) -> anyhow::Result<Vec<HeaderName>> {
    v.iter()
        .map(|h| HeaderName::from_bytes(h.as_bytes()).map_err(Into::into))
        .collect()
}

impl Hook {
    pub fn new(c: &Config) -> anyhow::Result<Hook> {
        Ok(Hook {
            url: c.url.parse()?,
            send: names(&c.send_headers)?,
            copy: names(&c.copy_headers)?,
            subject_header: c
                .subject_header
                .as_deref()
                .map(|h| HeaderName::from_bytes(h.as_bytes()))
                .transpose()?,
            timeout: c.timeout,
            client: client::new(c.timeout)?,
            cache: TtlCache::new(c.cache_ttl, c.cache_size),
            salt: salt(),
        })
    }

    pub fn copy_headers(&self) -> &[HeaderName] {
        &self.copy
    }

    pub async fn check(&self, req: AuthRequest<'_>, name: &str) -> Verdict {
        let head = req.head;
        let mut parts: Vec<&[u8]> = vec![];
        for h in &self.send {
            for v in head.headers.get_all(h) {
                parts.push(h.as_str().as_bytes());
                parts.push(v.as_bytes());
            }
        }
        let key = digest(&self.salt, &parts);
        if let Some(id) = self.cache.get(&key) {
            return Verdict::Admit((*id).clone());
        }
        let mut b = http::Request::get(self.url.clone())
            .header("x-original-method", head.method.as_str())
            .header(
                "x-original-uri",
                head.uri.path_and_query().map_or("/", |p| p.as_str()),
            )
            .header("x-forwarded-for", req.remote.ip().to_string());
        for h in &self.send {
            for v in head.headers.get_all(h) {
                b = b.header(h, v);
            }
        }
        let unavailable = |why: String| {
            warn!(method = name, "auth hook unavailable: {why}");
            Verdict::Refuse {
                kind: Kind::AuthUnavailable,
                reason: "hook_unavailable",
                challenge: None,
            }
        };
        let Ok(r) = b.body(Full::new(Bytes::new())) else {
            return unavailable("cannot build the request".into());
        };
        let resp = match client::send(&self.client, r, self.timeout, 64 * 1024).await {
            Ok(r) => r,
            Err(e) => return unavailable(e),
        };
        let status = resp.status();
        if status.is_success() {
            let h = resp.headers();
            let subject = self
                .subject_header
                .as_ref()
                .and_then(|s| h.get(s))
                .and_then(|v| v.to_str().ok())
                .filter(|v| !v.is_empty())
                .unwrap_or(name);
            let mut id = Identity::subject(subject);
            for c in &self.copy {
                for v in h.get_all(c) {
                    id.headers.push((c.clone(), v.clone()));
                    if let Ok(t) = v.to_str() {
                        id.attributes.push((format!("header:{c}"), t.to_string()));
                    }
                }
            }
            self.cache.insert(key, Arc::new(id.clone()));
            return Verdict::Admit(id);
        }
        match status.as_u16() {
            401 => Verdict::Refuse {
                kind: Kind::Unauthenticated,
                reason: "hook_denied",
                challenge: resp
                    .headers()
                    .get(http::header::WWW_AUTHENTICATE)
                    .and_then(|v: &HeaderValue| v.to_str().ok())
                    .map(str::to_string),
            },
            403 => Verdict::Refuse {
                kind: Kind::Forbidden,
                reason: "hook_denied",
                challenge: None,
            },
            _ => unavailable(format!("it answered {status}")),
        }
    }
}
