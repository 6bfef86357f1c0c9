//! Errors with a kind, a side and a cause (after pingora's `pingora-error`).
//!
//! Every way a request or a WebSocket can fail is an [`Error`]: its [`Kind`]
//! says what happened, its [`Side`] who caused it (the client, the upstream
//! peer or backend, or the gateway itself), its context the words a person
//! reads (the body of a refusal, the reason in a log line), and its cause the
//! underlying error, if any. [`Kind::meaning`] is the one place that maps a
//! kind to its HTTP status (before the upgrade), its close code (after it) and
//! its metric label: nothing else chooses a status or a close code, and none
//! is chosen from a message's text or an errno's number.

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

use http::StatusCode;
use wsframe::close_code;

/// Who caused an error (pingora's `ErrorSource`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The client (downstream): a bad request, a protocol violation, a client
    /// that went away or asks too much.
    Client,
    /// The bridge peer or proxy backend (upstream).
    Upstream,
    /// The gateway itself: its limits, its shutdown, its configuration.
    Gateway,
}

/// Whose cap was full: each has its own label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Gateway,
    Listener,
    Route,
}

/// What went wrong. Before the upgrade a kind is answered with its HTTP
/// status; after it, the WebSocket is closed with its close code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    // --- Refused before the upgrade.
    /// No route matches the request (404).
    NoRoute,
    /// A route matched, but the client offered none of its subprotocols (400).
    NoSubprotocol,
    /// A WebSocket handshake with a missing or malformed header, or a plain
    /// request on a WebSocket-only route (400).
    BadHandshake,
    /// A handshake with a method other than GET (405, `Allow: GET`), or a
    /// plain CONNECT (405).
    MethodNotAllowed,
    /// A `Sec-WebSocket-Version` other than 13 (426, `Sec-WebSocket-Version: 13`).
    UnsupportedVersion,
    /// An extended CONNECT for a `:protocol` other than `websocket` (501).
    UnsupportedProtocol,
    /// The client opens connections faster than its rate (429, `Retry-After`).
    RateLimited,
    /// The client has its share of open WebSockets (429, `Retry-After`).
    TooManyFromClient,
    /// A cap on open WebSockets is reached (503, `Retry-After`).
    Full(Scope),
    /// The authentication phase found no acceptable credential (401).
    Unauthenticated,
    /// The identity is not allowed here (403).
    Forbidden,
    /// An authentication hook failed, timed out or answered other than
    /// 2xx/401/403, or a key set could not be had (503).
    AuthUnavailable,
    /// The authenticated subject opens connections faster than its rate (429).
    IdentityRateLimited,
    /// The authenticated subject has its share of open WebSockets or
    /// tunnel streams (429).
    TooManyFromIdentity,
    /// Discovery found a peer that is not on the route's allow list (403).
    PeerNotAllowed,
    /// Discovery found no peer for the request (404).
    PeerNotFound,
    /// The bridge peer cannot be reached (502).
    PeerUnreachable,
    /// Every backend of the pool is ejected (503, `Retry-After: 1`).
    BackendUnavailable,
    /// Connecting to a backend failed (502).
    BackendConnect,
    /// A backend took too long to connect or to answer (504).
    BackendTimeout,
    /// A backend answered wrongly (502).
    BackendBadAnswer,
    /// A tunnel request without a usable destination (a missing or
    /// unparsable `X-PROXY-DESTINATION`, an absolute-form URI or CONNECT
    /// target that is not HOST:PORT) (400).
    BadDestination,
    /// No agent that could take the stream is connected (503).
    AgentUnavailable,
    /// The agent refused the destination (403).
    AgentRefused,
    /// The agent cannot reach the destination (502).
    AgentUnreachable,
    /// The agent did not answer, or the destination did not, in time (504).
    AgentTimeout,
    /// A cluster node needed its directory (Redis) to find an agent, and
    /// Redis could not be reached (503).
    DirectoryUnavailable,

    // --- After the upgrade.
    /// The peer ended its stream (1000, after everything it sent).
    PeerClosed,
    /// The peer failed: a read or write error (1011).
    PeerFailed,
    /// The peer sent bytes its framing function cannot cut (1011).
    PeerMalformed,
    /// A message over the size limit, either way (1009).
    MessageTooBig,
    /// A text message that is not UTF-8 (1007).
    InvalidPayload,
    /// Any other violation of RFC 6455 (1002).
    ProtocolViolation,
    /// Nothing moved for the idle timeout (1001).
    IdleTimeout,
    /// A proxied WebSocket outlived a limit: idle client or backend, its
    /// lifetime (1008).
    PolicyLimit,
    /// The gateway is shutting down (1001).
    ShuttingDown,
    /// Pings went unanswered: the connection is dropped without a Close.
    PongTimeout,
    /// The client closed or lost its connection without a Close; a proxied
    /// backend is sent 1001 on its behalf.
    ClientGone,
    /// A proxied backend closed or lost its connection without a Close; the
    /// client is sent 1014.
    BackendGone,
}

/// What a kind means on the wire and in the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meaning {
    /// The HTTP status of a refusal before the upgrade.
    pub status: StatusCode,
    /// The close code after the upgrade; `None`: no Close is sent.
    pub close_code: Option<u16>,
    /// The `reason` label of `wsgate_handshake_refusals_total`; `None`: not
    /// counted there (an answer about the request itself, not a refusal).
    pub label: Option<&'static str>,
}

impl Kind {
    /// The one mapping of a kind to its status, close code and label.
    pub const fn meaning(self) -> Meaning {
        use StatusCode as S;
        let (status, close_code, label) = match self {
            Kind::NoRoute => (S::NOT_FOUND, None, None),
            Kind::NoSubprotocol => (S::BAD_REQUEST, None, None),
            Kind::BadHandshake => (S::BAD_REQUEST, None, Some("bad_handshake")),
            Kind::MethodNotAllowed => (S::METHOD_NOT_ALLOWED, None, Some("bad_handshake")),
            Kind::UnsupportedVersion => (S::UPGRADE_REQUIRED, None, Some("bad_handshake")),
            Kind::UnsupportedProtocol => (S::NOT_IMPLEMENTED, None, Some("bad_handshake")),
            Kind::RateLimited => (S::TOO_MANY_REQUESTS, None, Some("rate_limited")),
            Kind::TooManyFromClient => (S::TOO_MANY_REQUESTS, None, Some("per_ip_cap")),
            Kind::Full(Scope::Gateway) => (S::SERVICE_UNAVAILABLE, None, Some("global_cap")),
            Kind::Full(Scope::Listener) => (S::SERVICE_UNAVAILABLE, None, Some("listener_cap")),
            Kind::Full(Scope::Route) => (S::SERVICE_UNAVAILABLE, None, Some("route_cap")),
            Kind::Unauthenticated => (S::UNAUTHORIZED, None, Some("unauthenticated")),
            Kind::Forbidden => (S::FORBIDDEN, None, Some("forbidden")),
            Kind::AuthUnavailable => (S::SERVICE_UNAVAILABLE, None, Some("auth_unavailable")),
            Kind::IdentityRateLimited => (S::TOO_MANY_REQUESTS, None, Some("per_identity_rate")),
            Kind::TooManyFromIdentity => (S::TOO_MANY_REQUESTS, None, Some("per_identity_cap")),
            Kind::PeerNotAllowed => (S::FORBIDDEN, None, Some("peer_not_allowed")),
            Kind::PeerNotFound => (S::NOT_FOUND, None, None),
            Kind::PeerUnreachable => (S::BAD_GATEWAY, None, Some("peer_unreachable")),
            Kind::BackendUnavailable => (S::SERVICE_UNAVAILABLE, None, Some("backend_unavailable")),
            Kind::BackendConnect => (S::BAD_GATEWAY, None, Some("backend_connect")),
            Kind::BackendTimeout => (S::GATEWAY_TIMEOUT, None, Some("backend_timeout")),
            Kind::BackendBadAnswer => (S::BAD_GATEWAY, None, Some("backend_bad_answer")),
            Kind::BadDestination => (S::BAD_REQUEST, None, Some("bad_destination")),
            Kind::AgentUnavailable => (S::SERVICE_UNAVAILABLE, None, Some("agent_unavailable")),
            Kind::AgentRefused => (S::FORBIDDEN, None, Some("agent_refused")),
            Kind::AgentUnreachable => (S::BAD_GATEWAY, None, Some("agent_unreachable")),
            Kind::AgentTimeout => (S::GATEWAY_TIMEOUT, None, Some("agent_timeout")),
            Kind::DirectoryUnavailable => {
                (S::SERVICE_UNAVAILABLE, None, Some("directory_unavailable"))
            }
            Kind::PeerClosed => (S::BAD_GATEWAY, Some(close_code::NORMAL), None),
            Kind::PeerFailed => (S::BAD_GATEWAY, Some(close_code::INTERNAL_ERROR), None),
            Kind::PeerMalformed => (S::BAD_GATEWAY, Some(close_code::INTERNAL_ERROR), None),
            Kind::MessageTooBig => (S::PAYLOAD_TOO_LARGE, Some(close_code::TOO_BIG), None),
            Kind::InvalidPayload => (S::BAD_REQUEST, Some(close_code::INVALID_PAYLOAD), None),
            Kind::ProtocolViolation => (S::BAD_REQUEST, Some(close_code::PROTOCOL_ERROR), None),
            Kind::IdleTimeout => (S::REQUEST_TIMEOUT, Some(close_code::GOING_AWAY), None),
            Kind::PolicyLimit => (S::REQUEST_TIMEOUT, Some(close_code::POLICY), None),
            Kind::ShuttingDown => (S::SERVICE_UNAVAILABLE, Some(close_code::GOING_AWAY), None),
            Kind::PongTimeout => (S::REQUEST_TIMEOUT, None, None),
            Kind::ClientGone => (S::BAD_REQUEST, Some(close_code::GOING_AWAY), None),
            Kind::BackendGone => (S::BAD_GATEWAY, Some(close_code::BAD_GATEWAY), None),
        };
        Meaning {
            status,
            close_code,
            label,
        }
    }

    /// The HTTP status of a refusal with this kind.
    pub const fn status(self) -> StatusCode {
        self.meaning().status
    }

    /// The close code of a WebSocket ended by this kind (`None`: no Close).
    pub const fn close_code(self) -> Option<u16> {
        self.meaning().close_code
    }

    /// The refusal metric's label, if refusals of this kind are counted.
    pub const fn label(self) -> Option<&'static str> {
        self.meaning().label
    }
}

impl From<&wsframe::ProtocolError> for Kind {
    /// A violation of RFC 6455: too big (1009), bad UTF-8 or corrupt
    /// permessage-deflate data (1007), or any other (1002).
    fn from(e: &wsframe::ProtocolError) -> Kind {
        use wsframe::ProtocolError as P;
        match e {
            P::MessageTooBig { .. } => Kind::MessageTooBig,
            P::InvalidUtf8 | P::BadDeflate => Kind::InvalidPayload,
            _ => Kind::ProtocolViolation,
        }
    }
}

impl From<&wsgate_framing::FramingError> for Kind {
    /// A peer's bytes a framing function refused: a frame announced as too
    /// big for its protocol (1009), or malformed (1011).
    fn from(e: &wsgate_framing::FramingError) -> Kind {
        use wsgate_framing::FramingError as F;
        match e {
            F::TooBig { .. } => Kind::MessageTooBig,
            F::Malformed { .. } => Kind::PeerMalformed,
        }
    }
}

/// The underlying error of an [`Error`].
pub type Cause = Box<dyn std::error::Error + Send + Sync>;

/// An error with a kind, a side, a context and an optional cause.
#[derive(Debug)]
pub struct Error {
    pub kind: Kind,
    pub side: Side,
    /// What a person reads: a refusal's body, a log line's reason.
    pub context: Cow<'static, str>,
    pub cause: Option<Cause>,
    /// When trying again may succeed (`Retry-After`), for rate limits and caps.
    pub retry_after: Option<Duration>,
    /// The `WWW-Authenticate` challenge of a 401.
    pub challenge: Option<Cow<'static, str>>,
}

impl Error {
    pub fn new(kind: Kind, side: Side, context: impl Into<Cow<'static, str>>) -> Error {
        Error {
            kind,
            side,
            context: context.into(),
            cause: None,
            retry_after: None,
            challenge: None,
        }
    }

    /// An error the client caused.
    pub fn client(kind: Kind, context: impl Into<Cow<'static, str>>) -> Error {
        Error::new(kind, Side::Client, context)
    }

    /// An error of the peer or backend.
    pub fn upstream(kind: Kind, context: impl Into<Cow<'static, str>>) -> Error {
        Error::new(kind, Side::Upstream, context)
    }

    /// An error of the gateway's own making (its limits, its shutdown).
    pub fn gateway(kind: Kind, context: impl Into<Cow<'static, str>>) -> Error {
        Error::new(kind, Side::Gateway, context)
    }

    /// The same error, caused by `cause`.
    pub fn because(mut self, cause: impl Into<Cause>) -> Error {
        self.cause = Some(cause.into());
        self
    }

    /// The same error, with a `Retry-After`.
    pub fn retry_after(mut self, after: Duration) -> Error {
        self.retry_after = Some(after);
        self
    }

    /// The same error, with a `WWW-Authenticate` challenge.
    pub fn challenge(mut self, challenge: impl Into<Cow<'static, str>>) -> Error {
        self.challenge = Some(challenge.into());
        self
    }

    /// `retry_after` in whole seconds, rounded up and at least 1: the value
    /// of the `Retry-After` header.
    pub fn retry_after_secs(&self) -> Option<u64> {
        self.retry_after.map(|d| {
            let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
            secs.max(1)
        })
    }

    /// The innermost cause's text, or the context when there is no cause.
    pub fn root_cause(&self) -> String {
        let Some(mut cur) = self.cause.as_deref().map(|c| c as &dyn std::error::Error) else {
            return self.context.to_string();
        };
        while let Some(next) = cur.source() {
            cur = next;
        }
        cur.to_string()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.context)?;
        if let Some(c) = &self.cause {
            write!(f, ": {c}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.cause
            .as_deref()
            .map(|c| c as &(dyn std::error::Error + 'static))
    }
}

/// Turns any error into an [`Error`] of a kind and side, with a context
/// (pingora's `OrErr`).
pub trait OrErr<T> {
    fn or_err(self, kind: Kind, side: Side, context: impl Into<Cow<'static, str>>) -> Result<T>;
}

impl<T, E: Into<Cause>> OrErr<T> for std::result::Result<T, E> {
    fn or_err(self, kind: Kind, side: Side, context: impl Into<Cow<'static, str>>) -> Result<T> {
        self.map_err(|e| Error::new(kind, side, context).because(e))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Kind; 41] = [
        Kind::NoRoute,
        Kind::NoSubprotocol,
        Kind::BadHandshake,
        Kind::MethodNotAllowed,
        Kind::UnsupportedVersion,
        Kind::UnsupportedProtocol,
        Kind::RateLimited,
        Kind::TooManyFromClient,
        Kind::Full(Scope::Gateway),
        Kind::Full(Scope::Listener),
        Kind::Full(Scope::Route),
        Kind::Unauthenticated,
        Kind::Forbidden,
        Kind::AuthUnavailable,
        Kind::IdentityRateLimited,
        Kind::TooManyFromIdentity,
        Kind::PeerNotAllowed,
        Kind::PeerNotFound,
        Kind::PeerUnreachable,
        Kind::BackendUnavailable,
        Kind::BackendConnect,
        Kind::BackendTimeout,
        Kind::BackendBadAnswer,
        Kind::BadDestination,
        Kind::AgentUnavailable,
        Kind::AgentRefused,
        Kind::AgentUnreachable,
        Kind::AgentTimeout,
        Kind::DirectoryUnavailable,
        Kind::PeerClosed,
        Kind::PeerFailed,
        Kind::PeerMalformed,
        Kind::MessageTooBig,
        Kind::InvalidPayload,
        Kind::ProtocolViolation,
        Kind::IdleTimeout,
        Kind::PolicyLimit,
        Kind::ShuttingDown,
        Kind::PongTimeout,
        Kind::ClientGone,
        Kind::BackendGone,
    ];

    #[test]
    fn each_kind_has_one_meaning_as_documented() {
        let m = |k: Kind| {
            let m = k.meaning();
            (m.status.as_u16(), m.close_code, m.label)
        };
        assert_eq!(m(Kind::NoRoute), (404, None, None));
        assert_eq!(
            m(Kind::UnsupportedVersion),
            (426, None, Some("bad_handshake"))
        );
        assert_eq!(m(Kind::RateLimited), (429, None, Some("rate_limited")));
        assert_eq!(m(Kind::Full(Scope::Route)), (503, None, Some("route_cap")));
        assert_eq!(
            m(Kind::BackendTimeout),
            (504, None, Some("backend_timeout"))
        );
        assert_eq!(m(Kind::PeerClosed).1, Some(1000));
        assert_eq!(m(Kind::PeerFailed).1, Some(1011));
        assert_eq!(m(Kind::MessageTooBig).1, Some(1009));
        assert_eq!(m(Kind::InvalidPayload).1, Some(1007));
        assert_eq!(m(Kind::ProtocolViolation).1, Some(1002));
        assert_eq!(m(Kind::ShuttingDown).1, Some(1001));
        assert_eq!(m(Kind::PolicyLimit).1, Some(1008));
        assert_eq!(m(Kind::PongTimeout).1, None);
        assert_eq!(m(Kind::BackendGone).1, Some(1014));
        // Every label is a plain metric label value.
        for k in ALL {
            if let Some(l) = k.label() {
                assert!(
                    l.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                    "{l}"
                );
            }
        }
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        let e = |ms| Error::gateway(Kind::RateLimited, "x").retry_after(Duration::from_millis(ms));
        assert_eq!(e(1).retry_after_secs(), Some(1));
        assert_eq!(e(1000).retry_after_secs(), Some(1));
        assert_eq!(e(1001).retry_after_secs(), Some(2));
        assert_eq!(Error::gateway(Kind::NoRoute, "x").retry_after_secs(), None);
    }

    #[test]
    fn causes_are_kept_and_shown() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let r: std::result::Result<(), _> = Err(io);
        let e = r
            .or_err(Kind::PeerUnreachable, Side::Upstream, "cannot reach peer")
            .unwrap_err();
        assert_eq!(e.to_string(), "cannot reach peer: refused");
        assert_eq!(e.root_cause(), "refused");
        assert_eq!((e.kind, e.side), (Kind::PeerUnreachable, Side::Upstream));
        assert!(std::error::Error::source(&e).is_some());
    }

    #[test]
    fn protocol_and_framing_errors_map_to_their_close_codes() {
        use wsframe::ProtocolError as P;
        let code = |k: Kind| k.close_code();
        assert_eq!(code((&P::InvalidUtf8).into()), Some(1007));
        assert_eq!(code((&P::BadDeflate).into()), Some(1007));
        assert_eq!(code((&P::MessageTooBig { limit: 1 }).into()), Some(1009));
        assert_eq!(code((&P::UnmaskedFrame).into()), Some(1002));
        // Each agrees with the codec's own choice.
        for e in [
            P::InvalidUtf8,
            P::BadDeflate,
            P::MessageTooBig { limit: 1 },
            P::ReservedBits,
        ] {
            assert_eq!(code((&e).into()), Some(e.close_code()));
        }
        let too_big = wsgate_framing::FramingError::TooBig {
            protocol: "cql",
            what: "body length",
            len: 1 << 30,
            limit: "256 MiB",
        };
        assert_eq!(code((&too_big).into()), Some(1009));
        let bad = wsgate_framing::FramingError::Malformed {
            protocol: "kafka",
            reason: "negative size -1".into(),
        };
        assert_eq!(code((&bad).into()), Some(1011));
    }
}
