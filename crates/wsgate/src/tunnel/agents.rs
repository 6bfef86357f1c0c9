//! A registered agent's WebSocket: its registration checked, then its
//! wsmux session held in the registry until it ends.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::request::Parts;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::allow::AllowList;
use super::proto;
use super::registry::{AgentConn, Registry};
use crate::error::{Error, Kind};
use crate::http::handshake;
use crate::io::ClientIo;
use crate::metrics::Metrics;

/// What an agent's registration asks for, checked.
#[derive(Debug, Clone)]
pub struct Registration {
    pub id: String,
    pub allow: AllowList,
    /// The SHA-256 (hex) of its Bearer token, if it sent one: what a
    /// token's revocation matches.
    pub credential: Option<String>,
}

/// Checks a registration request's shape (docs/tunnel.md §1): the
/// `wsgate-agent.v1` subprotocol, a valid id, a parsable allow header
/// (400 otherwise). Its token is the authentication phase's.
pub fn registration(head: &Parts) -> Result<Registration, Error> {
    let bad = |m: String| Error::client(Kind::BadHandshake, m);
    let offered = head
        .headers
        .get_all(::http::header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .any(|v| handshake::list_has_token(v.as_bytes(), proto::AGENT_PROTOCOL));
    if !offered {
        return Err(bad(format!(
            "an agent registers with Sec-WebSocket-Protocol: {}",
            proto::AGENT_PROTOCOL
        )));
    }
    let id = match head.headers.get(proto::ID_HEADER).map(|v| v.to_str()) {
        Some(Ok(id)) => proto::parse_id(id.trim()).map_err(|e| bad(e.to_string()))?,
        _ => return Err(bad(format!("missing {} header", proto::ID_HEADER))),
    };
    let allow = match head.headers.get(proto::ALLOW_HEADER) {
        None => AllowList::default(),
        Some(v) => {
            let v = v
                .to_str()
                .map_err(|_| bad(format!("{} is not text", proto::ALLOW_HEADER)))?;
            AllowList::from_header(v).map_err(|e| bad(format!("{}: {e}", proto::ALLOW_HEADER)))?
        }
    };
    let credential = super::bearer(head).map(super::registry::token_fingerprint);
    Ok(Registration {
        id: id.to_string(),
        allow,
        credential,
    })
}

/// Serves a registered agent's WebSocket until it ends: its wsmux session
/// is in the registry meanwhile. On `shutdown` it gets GOAWAY and its open
/// streams may finish.
#[allow(clippy::too_many_arguments)]
pub async fn serve(
    client: ClientIo,
    leftover: Bytes,
    reg: Registration,
    remote: SocketAddr,
    registry: Arc<Registry>,
    keepalive: std::time::Duration,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> (u64, u64) {
    let transport = wsmux::WsTransport::from_raw(
        client.into_io(),
        wsframe::Role::Server,
        wsmux::WsTransport::<Box<dyn crate::io::Io>>::default_config(),
        &leftover,
    );
    let session = wsmux::Session::server(transport, super::mux_config(keepalive));
    let conn = Arc::new(AgentConn::new(
        reg.id,
        remote,
        reg.allow,
        session,
        registry.next_serial(),
        &metrics,
        reg.credential,
    ));
    registry.register(conn.clone());
    metrics.agent_connections(&conn.id, 1);
    info!(agent = %conn.id, %remote, allow = %conn.allow.to_header(), "agent registered");
    let why = loop {
        tokio::select! {
            e = conn.session.closed() => break e.to_string(),
            s = conn.session.accept() => match s {
                // Version 1: only the gateway opens streams.
                Ok(mut s) => s.reset(wsmux::reset_code::REFUSED),
                Err(e) => break e.to_string(),
            },
            () = shutdown.cancelled() => {
                conn.session.goaway();
                break "gateway shutting down".into();
            }
            // Disconnected or revoked by an operator: dropping the session
            // ends the WebSocket (GOAWAY, then Close).
            () = conn.kick.cancelled() => break "dropped by an operator (disconnect or revoke)".into(),
        }
    };
    if shutdown.is_cancelled() {
        // Open streams may finish; the worker's drain bounds the wait.
        let _ = conn.session.closed().await;
    }
    registry.unregister(&conn);
    metrics.agent_connections(&conn.id, -1);
    let (to, from) = (
        conn.bytes_to.load(std::sync::atomic::Ordering::Relaxed),
        conn.bytes_from.load(std::sync::atomic::Ordering::Relaxed),
    );
    if conn
        .session
        .error()
        .is_some_and(|e| matches!(e, wsmux::Error::KeepaliveTimeout(_)))
    {
        warn!(agent = %conn.id, %remote, "agent connection dead (keepalive): {why}");
    } else {
        info!(agent = %conn.id, %remote, bytes_to_agent = to, bytes_from_agent = from, "agent connection ended: {why}");
    }
    (to, from)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(headers: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::get("/agent");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn registrations_are_checked_for_shape() {
        let ok = head(&[
            ("sec-websocket-protocol", "x, wsgate-agent.v1"),
            ("wsgate-agent-id", "site-a"),
            (
                "wsgate-agent-allow",
                "tcp://10.0.0.0/8:*, http://127.0.0.1:8081",
            ),
        ]);
        let r = registration(&ok).unwrap();
        assert_eq!((r.id.as_str(), r.allow.0.len()), ("site-a", 2));
        for (headers, what) in [
            (
                vec![("wsgate-agent-id", "site-a")],
                "Sec-WebSocket-Protocol",
            ),
            (
                vec![("sec-websocket-protocol", "wsgate-agent.v1")],
                "missing",
            ),
            (
                vec![
                    ("sec-websocket-protocol", "wsgate-agent.v1"),
                    ("wsgate-agent-id", "../x"),
                ],
                "invalid agent id",
            ),
            (
                vec![
                    ("sec-websocket-protocol", "wsgate-agent.v1"),
                    ("wsgate-agent-id", "a"),
                    ("wsgate-agent-allow", "tcp://x"),
                ],
                "invalid allow pattern",
            ),
        ] {
            let e = registration(&head(&headers)).unwrap_err();
            assert_eq!(e.kind, Kind::BadHandshake);
            assert!(e.context.contains(what), "{e}");
        }
    }
}
