//! Errors.

use crate::frame::{FrameError, GoAwayCode};
use std::io;
use std::sync::Arc;
use std::time::Duration;

/// Everything that can go wrong with a [`crate::Session`] or a
/// [`crate::Stream`]. Session-wide errors are shared by every stream of the
/// session, hence `Clone` (I/O errors are kept behind an `Arc`).
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The local [`crate::Session`] was dropped.
    #[error("session closed: the Session handle was dropped")]
    SessionClosed,
    /// The transport ended (WebSocket closed) without a GOAWAY.
    #[error("transport closed by the peer")]
    TransportClosed,
    /// The transport failed.
    #[error("transport error: {0}")]
    Transport(Arc<io::Error>),
    /// The peer sent a malformed frame; a GOAWAY with the matching code was sent.
    #[error("protocol error (GOAWAY {code} sent): {reason}")]
    Protocol {
        /// The GOAWAY code sent to the peer.
        code: GoAwayCode,
        /// What the peer did wrong.
        reason: String,
    },
    /// The peer ended the session with a GOAWAY carrying an error code.
    #[error("peer sent GOAWAY {code}: {reason}")]
    RemoteGoAway {
        /// Code from the peer.
        code: GoAwayCode,
        /// Reason text from the peer.
        reason: String,
    },
    /// A keepalive PING went unanswered and the peer sent nothing at all for
    /// the keepalive timeout: the peer is declared dead.
    #[error("keepalive timeout: PING unanswered and peer silent for {0:?}; peer declared dead")]
    KeepaliveTimeout(Duration),
    /// `open()` after this side sent GOAWAY, or `accept()` once the backlog is
    /// drained after GOAWAY.
    #[error("session is going away (GOAWAY sent): no new streams")]
    LocalGoAway,
    /// `open()` / `accept()` after the peer's GOAWAY.
    #[error("peer sent GOAWAY: no new streams")]
    PeerGoAway,
    /// Opening a stream would exceed [`crate::Config::max_streams`].
    #[error("stream limit reached: {0} streams open")]
    TooManyStreams(usize),
    /// Opening a stream would exceed [`crate::Config::max_session_memory`].
    #[error("session memory limit reached: {limit} bytes of receive windows committed")]
    MemoryLimit {
        /// The configured limit.
        limit: usize,
    },
    /// All stream ids of this side are used up.
    #[error("stream ids exhausted")]
    StreamIdsExhausted,
}

impl Error {
    /// The GOAWAY code that ended the session, sent or received: the code
    /// this side sent for a protocol error ([`Error::Protocol`]) or a dead
    /// peer ([`Error::KeepaliveTimeout`]), the peer's error code
    /// ([`Error::RemoteGoAway`]), or NORMAL when the local `Session` was
    /// dropped ([`Error::SessionClosed`]). `None` when the transport ended
    /// without one of these, and for errors that do not end the session.
    pub fn goaway_code(&self) -> Option<GoAwayCode> {
        match self {
            Error::Protocol { code, .. } | Error::RemoteGoAway { code, .. } => Some(*code),
            Error::KeepaliveTimeout(_) => Some(GoAwayCode::KeepaliveTimeout),
            Error::SessionClosed => Some(GoAwayCode::Normal),
            _ => None,
        }
    }

    pub(crate) fn protocol(e: &FrameError) -> Self {
        Error::Protocol {
            code: e.goaway_code(),
            reason: e.to_string(),
        }
    }

    pub(crate) fn to_io(&self) -> io::Error {
        let kind = match self {
            Error::KeepaliveTimeout(_) => io::ErrorKind::TimedOut,
            Error::SessionClosed | Error::LocalGoAway | Error::PeerGoAway => {
                io::ErrorKind::NotConnected
            }
            Error::TransportClosed | Error::RemoteGoAway { .. } => io::ErrorKind::ConnectionAborted,
            Error::Protocol { .. } => io::ErrorKind::InvalidData,
            Error::Transport(e) => e.kind(),
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, self.clone())
    }
}

/// The error a stream read/write returns after the peer reset the stream;
/// found inside the `io::Error` (kind `ConnectionReset`) with `get_ref`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("stream reset by peer with code {code}")]
pub struct StreamReset {
    /// The reset code (see [`crate::reset_code`]).
    pub code: u32,
}

/// A `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
