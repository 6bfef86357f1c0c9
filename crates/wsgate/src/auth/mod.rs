//! The authentication phase of the request path (see `docs/phases.md`): it
//! runs after admission and before anything is connected, for every request
//! a route serves — WebSocket handshakes of both HTTP versions and plain
//! HTTP requests alike.
//!
//! An [`Authenticator`] receives the request head, the client's address and
//! its TLS client certificate (if it showed one), and returns an
//! [`Identity`] or a refusal (an [`Error`] of kind `Unauthenticated` (401) or
//! `Forbidden` (403)). A route without one admits everyone as
//! [`Identity::anonymous`] at no cost: nothing is called, nothing allocated.
//! The methods themselves (JWT, Basic, mTLS, an auth hook) come with their
//! own issue; this is their slot.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use http::request::Parts;
use rustls::pki_types::CertificateDer;

use crate::error::Error;

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
    /// Further attributes the method vouches for (claims, certificate fields).
    pub attributes: Vec<(String, String)>,
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
            attributes: vec![],
        }
    }

    pub fn is_anonymous(&self) -> bool {
        self.subject.is_none()
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
}
