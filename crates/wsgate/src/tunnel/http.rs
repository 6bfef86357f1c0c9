//! HTTP through the agents: `/request` (wsp's relay: the destination in
//! `X-PROXY-DESTINATION`, the agent optionally in `X-PROXY-AGENT`) and the
//! forward proxy (absolute-form requests, `curl -x`). The gateway opens an
//! `http://HOST:PORT` stream through an agent and speaks HTTP/1.1 over it
//! (hyper's client connection), streaming both bodies. It never connects to
//! a destination itself on these paths: it is not an open proxy.
//!
//! `CONNECT host:port` is served as a `tcp://` stream, spliced once the
//! agent is connected (TLS end to end).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::request::Parts;
use http::{Request, Response, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tracing::debug;

use super::proto::Destination;
use super::Tunnel;
use crate::config::Forwarding;
use crate::error::{Error, Kind};
use crate::http::{Body, BoxError};
use crate::limits::{PacedBody, SharedBandwidth};

/// `X-PROXY-DESTINATION`: the URL `/request` relays to.
pub const DESTINATION_HEADER: &str = "x-proxy-destination";
/// `X-PROXY-AGENT`: the agent `/request` goes through.
pub const AGENT_HEADER: &str = "x-proxy-agent";

/// Where a relayed request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The agent to use; `None`: any whose allow list covers `dest`.
    pub agent: Option<String>,
    /// `http://HOST:PORT`.
    pub dest: Destination,
    /// The request target at the destination (origin form).
    pub path: String,
    /// The `Host` the destination sees.
    pub host: String,
}

fn bad(m: String) -> Error {
    Error::client(Kind::BadDestination, m)
}

/// An `http://` URL as a target (an `https://` one is refused: TLS to the
/// destination goes through CONNECT).
fn url_target(url: &Uri, agent: Option<String>) -> Result<Target, Error> {
    match url.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(bad(format!(
                "`{url}`: an https:// destination is reached with CONNECT (curl -x), \
                 TLS end to end"
            )))
        }
        _ => return Err(bad(format!("`{url}` is not an http:// URL"))),
    }
    let auth = url
        .authority()
        .ok_or_else(|| bad(format!("`{url}` has no host")))?;
    let port = auth.port_u16().unwrap_or(80);
    let host = auth.host().trim_start_matches('[').trim_end_matches(']');
    let dest = format!(
        "http://{}:{port}",
        if host.contains(':') {
            format!("[{host}]")
        } else {
            host.to_string()
        }
    )
    .parse::<Destination>()
    .map_err(|e| bad(e.to_string()))?;
    Ok(Target {
        agent,
        dest,
        path: url
            .path_and_query()
            .map_or_else(|| "/".to_string(), |p| p.as_str().to_string()),
        host: auth.as_str().to_string(),
    })
}

/// The target of a `/request` request (400 for a missing or unparsable
/// `X-PROXY-DESTINATION`).
pub fn request_target(head: &Parts) -> Result<Target, Error> {
    let text = head
        .headers
        .get(DESTINATION_HEADER)
        .ok_or_else(|| bad("missing X-PROXY-DESTINATION header".into()))?
        .to_str()
        .map_err(|_| bad("X-PROXY-DESTINATION is not text".into()))?;
    let url: Uri = text
        .trim()
        .parse()
        .map_err(|_| bad(format!("unparsable X-PROXY-DESTINATION `{text}`")))?;
    let agent = match head.headers.get(AGENT_HEADER).map(|v| v.to_str()) {
        None => None,
        Some(Ok(id)) => Some(
            super::proto::parse_id(id.trim())
                .map_err(|e| bad(format!("X-PROXY-AGENT: {e}")))?
                .to_string(),
        ),
        Some(Err(_)) => return Err(bad("X-PROXY-AGENT is not text".into())),
    };
    url_target(&url, agent)
}

/// Whether a request is for the forward proxy: absolute-form over HTTP/1.x.
pub fn is_absolute_form(head: &Parts) -> bool {
    head.version < Version::HTTP_2 && head.uri.scheme().is_some()
}

/// The target of an absolute-form request.
pub fn absolute_target(head: &Parts) -> Result<Target, Error> {
    url_target(&head.uri, None)
}

/// The destination of `CONNECT host:port`: a `tcp://` stream.
pub fn connect_target(head: &Parts) -> Result<Destination, Error> {
    let auth = head
        .uri
        .authority()
        .ok_or_else(|| bad("CONNECT needs HOST:PORT".into()))?;
    let port = auth
        .port_u16()
        .ok_or_else(|| bad(format!("CONNECT `{auth}`: missing :PORT")))?;
    let host = auth.host();
    format!("tcp://{host}:{port}")
        .parse()
        .map_err(|e: super::proto::ProtoError| bad(e.to_string()))
}

/// Relays one HTTP request through an agent and returns the destination's
/// answer (its body streamed); the request's body, if any, is streamed too.
/// With `pace` (the subject's `per_identity_bandwidth`) both bodies are
/// paced by it.
#[allow(clippy::too_many_arguments)]
pub async fn relay(
    tunnel: &Tunnel,
    target: Target,
    head: Parts,
    body: Option<Incoming>,
    remote: SocketAddr,
    secure: bool,
    forwarding: &Forwarding,
    answer_timeout: Duration,
    pace: Option<&Arc<SharedBandwidth>>,
    via: &'static str,
) -> Result<Response<Body>, Error> {
    let stream = tunnel
        .open(target.agent.as_deref(), &target.dest, via)
        .await?;
    let agent = stream.agent_id().to_string();
    let unreachable = |e: hyper::Error| {
        Error::upstream(
            Kind::AgentUnreachable,
            format!("agent {agent}: {}: {e}", target.dest),
        )
    };
    let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
        .handshake::<_, http_body_util::combinators::BoxBody<Bytes, BoxError>>(TokioIo::new(stream))
        .await
        .map_err(unreachable)?;
    // The connection runs until the answer's body is read out; its task
    // ends with it.
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            debug!("relayed connection ended: {e}");
        }
    });
    let mut headers = HeaderMap::new();
    crate::proxy::headers::copy_end_to_end(&head.headers, &mut headers);
    headers.remove(DESTINATION_HEADER);
    headers.remove(AGENT_HEADER);
    if let Ok(h) = HeaderValue::from_str(&target.host) {
        headers.insert(header::HOST, h);
    }
    let host = headers.get(header::HOST).cloned();
    crate::proxy::headers::add_forwarded(forwarding, &mut headers, remote, secure, host.as_ref());
    let body = match (body, pace) {
        (Some(b), None) => b.map_err(|e| Box::new(e) as BoxError).boxed(),
        (Some(b), Some(_)) => PacedBody::new(b, pace, true)
            .map_err(|e| Box::new(e) as BoxError)
            .boxed(),
        (None, _) => http_body_util::Empty::new()
            .map_err(|never| match never {})
            .boxed(),
    };
    let mut req = Request::new(body);
    *req.method_mut() = head.method;
    *req.uri_mut() = target
        .path
        .parse()
        .map_err(|_| bad(format!("bad request target `{}`", target.path)))?;
    *req.version_mut() = Version::HTTP_11;
    *req.headers_mut() = headers;
    let resp = match tokio::time::timeout(answer_timeout, sender.send_request(req)).await {
        Ok(r) => r.map_err(unreachable)?,
        Err(_) => {
            return Err(Error::upstream(
                Kind::AgentTimeout,
                format!(
                    "{} did not answer within {answer_timeout:?} (through agent {agent})",
                    target.dest
                ),
            ))
        }
    };
    Ok(crate::proxy::relay_response(resp, pace))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::get(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn request_targets_come_from_the_wsp_headers() {
        let t = request_target(&head(
            "/request",
            &[
                ("X-PROXY-DESTINATION", "http://127.0.0.1:8081/hello?x=1"),
                ("X-PROXY-AGENT", "site-a"),
            ],
        ))
        .unwrap();
        assert_eq!(t.dest.to_string(), "http://127.0.0.1:8081");
        assert_eq!(
            (t.path.as_str(), t.host.as_str()),
            ("/hello?x=1", "127.0.0.1:8081")
        );
        assert_eq!(t.agent.as_deref(), Some("site-a"));
        let t =
            request_target(&head("/request", &[("X-PROXY-DESTINATION", "http://app")])).unwrap();
        assert_eq!((t.dest.port, t.path.as_str()), (80, "/"));
        for h in [
            vec![],
            vec![("X-PROXY-DESTINATION", "not a url")],
            vec![("X-PROXY-DESTINATION", "ftp://h/x")],
            vec![("X-PROXY-DESTINATION", "https://h/x")],
            vec![("X-PROXY-DESTINATION", "/relative")],
            vec![
                ("X-PROXY-DESTINATION", "http://h/"),
                ("X-PROXY-AGENT", "../x"),
            ],
        ] {
            let e = request_target(&head("/request", &h)).unwrap_err();
            assert_eq!(e.kind.status(), http::StatusCode::BAD_REQUEST, "{h:?}");
        }
    }

    #[test]
    fn forward_proxy_targets() {
        let h = head("http://127.0.0.1:8081/hello", &[]);
        assert!(is_absolute_form(&h));
        assert_eq!(absolute_target(&h).unwrap().path, "/hello");
        assert!(!is_absolute_form(&head("/hello", &[])));
        let c = http::Request::connect("127.0.0.1:8443")
            .body(())
            .unwrap()
            .into_parts()
            .0;
        assert_eq!(
            connect_target(&c).unwrap().to_string(),
            "tcp://127.0.0.1:8443"
        );
        let c = http::Request::connect("host")
            .body(())
            .unwrap()
            .into_parts()
            .0;
        assert!(connect_target(&c).is_err());
        assert_eq!(
            url_target(&"http://[::1]:81/".parse().unwrap(), None)
                .unwrap()
                .dest
                .to_string(),
            "http://[::1]:81"
        );
    }
}
