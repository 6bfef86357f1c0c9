//! The request path's phases, seen from outside with a gateway started
//! in-process (`wsgate::Server`): a refusal in the admission phase applies to
//! a plain HTTP request as well as to a WebSocket handshake on the same
//! route, whichever comes first; and the phases run in their order (a
//! request refused by admission never reaches the connect phase).

use std::path::Path;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A backend that answers any request on a connection with `200 backend`
/// and counts the connections it got.
async fn backend() -> (u16, tokio::sync::mpsc::UnboundedReceiver<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            let _ = tx.send(());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\nConnection: close\r\n\r\nbackend",
                    )
                    .await;
            });
        }
    });
    (port, rx)
}

/// Sends one request on a fresh connection; returns the status and the
/// answer (its head, and its body when it has a length or ends with the
/// connection).
async fn request(addr: &str, head: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    let mut buf = vec![];
    let read = async {
        loop {
            let mut chunk = [0u8; 4096];
            let n = s.read(&mut chunk).await.unwrap_or(0);
            buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&buf).to_ascii_lowercase();
            if n == 0 {
                return;
            }
            if let Some(end) = text.find("\r\n\r\n") {
                let length = text
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok());
                // A 101 has no body; a body with a length ends there.
                if text.starts_with("http/1.1 101")
                    || length.is_some_and(|l| buf.len() >= end + 4 + l)
                {
                    return;
                }
            }
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), read)
        .await
        .expect("an answer within 10 s");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .get(9..12)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    (status, text)
}

fn plain(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
}

fn websocket(path: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admission_refusal_applies_to_plain_http_and_websockets_alike() {
    let (port, mut connections) = backend().await;
    // Two proxy routes, each allowing one request per client per minute:
    // one route is tried plain request first, the other WebSocket first.
    let text = format!(
        r#"
workers = 1
[[listener]]
address = "127.0.0.1:0"
[admin]
address = "127.0.0.1:0"
[[route]]
name = "plain-first"
path_prefix = "/a"
proxy = "http://127.0.0.1:{port}"
[route.limits]
per_ip_rate = "1/m burst 1"
[[route]]
name = "websocket-first"
path_prefix = "/b"
proxy = "http://127.0.0.1:{port}"
[route.limits]
per_ip_rate = "1/m burst 1"
"#
    );
    let config = wsgate::config::parse("phases.toml", &text, Path::new(".")).unwrap();
    let server = wsgate::Server::start(config).await.unwrap();
    let addr = server.urls()[0].trim_start_matches("ws://").to_string();

    // Plain request first: admitted and proxied; the WebSocket after it is
    // refused by the same route's rate, before anything is connected.
    let (status, body) = request(&addr, &plain("/a")).await;
    assert_eq!((status, body.ends_with("backend")), (200, true), "{body}");
    connections.recv().await.unwrap();
    let (status, body) = request(&addr, &websocket("/a/ws")).await;
    assert_eq!(status, 429, "{body}");
    assert!(body.to_ascii_lowercase().contains("retry-after:"), "{body}");

    // WebSocket first: admitted (the backend answers it with a plain 200,
    // which is relayed as it is); the plain request after it is refused.
    let (status, _) = request(&addr, &websocket("/b/ws")).await;
    assert_eq!(status, 200);
    connections.recv().await.unwrap();
    let (status, body) = request(&addr, &plain("/b")).await;
    assert_eq!(status, 429, "{body}");

    // Refused requests never reached the connect phase: the backend saw
    // the two admitted ones only.
    assert!(
        connections.try_recv().is_err(),
        "a refused request reached the backend"
    );

    // Both refusals are counted under the admission phase's label.
    let admin = server.admin().unwrap();
    let (_, metrics) = request(&admin.to_string(), &plain("/metrics")).await;
    assert!(
        metrics.contains("wsgate_handshake_refusals_total{reason=\"rate_limited\"} 2"),
        "{metrics}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_health_check_and_routing_answer_before_admission() {
    // Health checks and routing refusals are answered in the route phase:
    // a client over its rate still gets them.
    let text = r#"
workers = 1
[limits]
per_ip_rate = "1/m burst 1"
[[listener]]
address = "127.0.0.1:0"
[[route]]
path = "/echo"
to = "echo:"
"#;
    let config = wsgate::config::parse("phases.toml", text, Path::new(".")).unwrap();
    let server = wsgate::Server::start(config).await.unwrap();
    let addr = server.urls()[0].trim_start_matches("ws://").to_string();
    // The one WebSocket the rate allows...
    let (status, _) = request(&addr, &websocket("/echo")).await;
    assert_eq!(status, 101);
    // ...then the next is refused by admission,
    assert_eq!(request(&addr, &websocket("/echo")).await.0, 429);
    // while the health check and a request for no route are still answered.
    assert_eq!(request(&addr, &plain("/healthz")).await.0, 200);
    assert_eq!(request(&addr, &websocket("/nowhere")).await.0, 404);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_in_progress_at_shutdown_gets_its_answer_within_the_drain_timeout() {
    // A backend that answers 1.5 s after the request arrived: longer than
    // the second a connection gets to send its first request at shutdown.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let (arrived, mut arrival) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let arrived = arrived.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = arrived.send(());
                tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
                let _ = s
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: close\r\n\r\nslow",
                    )
                    .await;
            });
        }
    });
    let text = format!(
        r#"
workers = 1
[limits]
drain_timeout = "10s"
[[listener]]
address = "127.0.0.1:0"
[[route]]
path_prefix = "/"
proxy = "http://127.0.0.1:{port}"
"#
    );
    let config = wsgate::config::parse("drain.toml", &text, Path::new(".")).unwrap();
    let server = wsgate::Server::start(config).await.unwrap();
    let addr = server.urls()[0].trim_start_matches("ws://").to_string();
    let answer = tokio::spawn(async move { request(&addr, &plain("/slow")).await });
    tokio::time::timeout(std::time::Duration::from_secs(10), arrival.recv())
        .await
        .expect("the request reaches the backend")
        .unwrap();
    let stopped = tokio::spawn(server.stop());
    let (status, body) = tokio::time::timeout(std::time::Duration::from_secs(10), answer)
        .await
        .expect("an answer within the drain timeout")
        .unwrap();
    assert_eq!((status, body.ends_with("slow")), (200, true), "{body}");
    stopped.await.unwrap();
}
