//! The gateway's own HTTP/1.1 handshake path (a connection's first request is
//! a WebSocket handshake) and its hand-off to hyper for everything else, with
//! the real binary on ephemeral loopback ports: heads in pieces, frames sent
//! with the handshake, keep-alive requests before an upgrade, a backend's
//! refusal with a chunked body, a backend answering garbage, and several
//! worker threads.

use std::process::Command;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

mod common;
use common::Gateway;

const LIMIT: Duration = Duration::from_secs(20);
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

fn ws_request(path: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n\r\n"
    )
}

/// A masked client frame.
fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = bytes::BytesMut::new();
    let op = wsframe::OpCode::from_u8(opcode).unwrap();
    wsframe::encode_frame(&mut out, true, op, Some([9, 8, 7, 6]), payload);
    out.to_vec()
}

/// Reads until `pred` holds for what arrived, or EOF; bounded by LIMIT.
async fn read_until(s: &mut TcpStream, pred: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    let mut buf = vec![];
    let mut chunk = [0u8; 4096];
    while !pred(&buf) {
        let n = tokio::time::timeout(LIMIT, s.read(&mut chunk))
            .await
            .expect("timed out")
            .expect("read");
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    buf
}

fn head_end(b: &[u8]) -> Option<usize> {
    b.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

#[tokio::test]
async fn head_in_pieces_and_a_frame_sent_with_it() {
    let gw = Gateway::start(&["serve", "--listen", "127.0.0.1:0", "--to", "echo:"]);
    let mut s = TcpStream::connect(&gw.addr()).await.unwrap();
    s.set_nodelay(true).unwrap();
    let req = ws_request("/");
    let (a, b) = req.split_at(17);
    s.write_all(a.as_bytes()).await.unwrap();
    s.flush().await.unwrap();
    // The rest of the head and a first frame in one write.
    let mut rest = b.as_bytes().to_vec();
    rest.extend_from_slice(&client_frame(1, b"hello"));
    s.write_all(&rest).await.unwrap();
    let got = read_until(&mut s, |b| head_end(b).is_some_and(|h| b.len() >= h + 7)).await;
    let h = head_end(&got).expect("a whole head");
    let head = String::from_utf8_lossy(&got[..h]).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(
        head.contains(&format!(
            "sec-websocket-accept: {}",
            ACCEPT.to_ascii_lowercase()
        )),
        "{head}"
    );
    // The echo: unmasked text "hello".
    assert_eq!(&got[h..h + 7], b"\x81\x05hello");
}

#[tokio::test]
async fn keep_alive_requests_then_an_upgrade_on_one_connection() {
    let gw = Gateway::start(&["serve", "--listen", "127.0.0.1:0", "--to", "echo:"]);
    let mut s = TcpStream::connect(&gw.addr()).await.unwrap();
    for _ in 0..2 {
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
            .await
            .unwrap();
        let got = read_until(&mut s, |b| b.ends_with(b"ok\n")).await;
        assert!(
            got.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&got)
        );
    }
    s.write_all(ws_request("/").as_bytes()).await.unwrap();
    let got = read_until(&mut s, |b| head_end(b).is_some()).await;
    assert!(
        got.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    s.write_all(&client_frame(2, b"\x01\x02\x03"))
        .await
        .unwrap();
    let got = read_until(&mut s, |b| b.len() >= 5).await;
    assert_eq!(got, b"\x82\x03\x01\x02\x03");
}

#[tokio::test]
async fn garbage_and_odd_first_requests_get_http_answers() {
    let gw = Gateway::start(&["serve", "--listen", "127.0.0.1:0", "--to", "echo:"]);
    for (req, want) in [
        (&b"\x00\x01\x02 garbage\r\n\r\n"[..], "HTTP/1.1 400"),
        (
            b"POST / HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nContent-Length: 0\r\n\r\n",
            "HTTP/1.1 405",
        ),
        (
            b"GET / HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
            "HTTP/1.1 400",
        ),
    ] {
        let mut s = TcpStream::connect(&gw.addr()).await.unwrap();
        s.write_all(req).await.unwrap();
        let got = read_until(&mut s, |b| head_end(b).is_some()).await;
        let text = String::from_utf8_lossy(&got);
        assert!(
            text.starts_with(want),
            "{:?} -> {text}",
            String::from_utf8_lossy(req)
        );
    }
}

/// A backend that answers every request with `answer`, then holds the
/// connection open (as a keep-alive backend would).
async fn backend_answering(answer: &'static [u8]) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = read_until(&mut s, |b| head_end(b).is_some()).await;
                let _ = s.write_all(answer).await;
                let mut sink = [0u8; 1024];
                while matches!(s.read(&mut sink).await, Ok(n) if n > 0) {}
            });
        }
    });
    port
}

/// A WebSocket handshake to `path` through a gateway in front of a backend
/// that answers `answer`; everything the gateway sends back before it closes
/// the connection.
async fn through_proxy(answer: &'static [u8], path: &str) -> String {
    let port = backend_answering(answer).await;
    let to = format!("ws://127.0.0.1:{port}");
    let gw = Gateway::start(&["serve", "--listen", "127.0.0.1:0", "--to", &to]);
    let mut s = TcpStream::connect(&gw.addr()).await.unwrap();
    s.write_all(ws_request(path).as_bytes()).await.unwrap();
    // The gateway closes the connection after an answer other than 101.
    let got = read_until(&mut s, |_| false).await;
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test]
async fn backend_refusal_with_a_chunked_body_is_relayed() {
    let text = through_proxy(
        b"HTTP/1.1 401 Unauthorized\r\nTransfer-Encoding: chunked\r\nX-Why: no token\r\n\
          Keep-Alive: timeout=5\r\n\r\n5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n",
        "/chat",
    )
    .await;
    let h = head_end(text.as_bytes()).expect("a head");
    let head = text[..h].to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 401"), "{text}");
    assert!(head.contains("x-why: no token"), "{text}");
    assert!(head.contains("connection: close"), "{text}");
    assert!(
        !head.contains("keep-alive"),
        "hop-by-hop header passed: {text}"
    );
    assert!(!head.contains("transfer-encoding"), "{text}");
    assert_eq!(&text[h..], "hello world");
}

#[tokio::test]
async fn backend_refusal_with_a_length_and_garbage_answers() {
    let text = through_proxy(
        b"HTTP/1.1 403 Forbidden\r\nContent-Length: 4\r\n\r\nnope",
        "/",
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 403"), "{text}");
    assert!(
        text.to_ascii_lowercase().contains("content-length: 4"),
        "{text}"
    );
    assert!(text.ends_with("\r\n\r\nnope"), "{text}");

    for garbage in [
        &b"SSH-2.0-OpenSSH_9.2\r\n\r\n"[..],
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nx",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Accept: d3JvbmcK\r\n\r\n",
    ] {
        let text = through_proxy(garbage, "/").await;
        assert!(
            text.starts_with("HTTP/1.1 502"),
            "{:?} -> {text}",
            String::from_utf8_lossy(garbage)
        );
    }
}

#[tokio::test]
async fn several_workers_share_the_listener() {
    let gw = Gateway::start(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--to",
        "echo:",
        "--workers",
        "3",
    ]);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..24u8 {
        let addr = gw.addr();
        tasks.spawn(async move {
            let mut s = TcpStream::connect(&addr).await.unwrap();
            let mut req = ws_request("/").into_bytes();
            req.extend_from_slice(&client_frame(2, &[i; 3]));
            s.write_all(&req).await.unwrap();
            let got = read_until(&mut s, |b| head_end(b).is_some_and(|h| b.len() >= h + 5)).await;
            let h = head_end(&got).unwrap();
            assert_eq!(&got[h..], &[0x82, 3, i, i, i]);
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    // Out-of-range counts are refused before anything starts.
    let out = Command::new(env!("CARGO_BIN_EXE_wsgate"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--to",
            "echo:",
            "--workers",
            "0",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--workers"));
}

/// A burst of connections is spread over the workers by their load (each
/// within a connection or two of the least busy), not queued on one of them,
/// and `wsgate_worker_connections` shows it.
#[tokio::test]
async fn a_burst_of_connections_is_balanced_over_the_workers() {
    let gw = Gateway::start(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--to",
        "echo:",
        "--workers",
        "2",
        "--admin",
        "127.0.0.1:0",
    ]);
    const N: usize = 40;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..N {
        let addr = gw.addr();
        tasks.spawn(async move {
            let mut s = TcpStream::connect(&addr).await.unwrap();
            let mut req = ws_request("/").into_bytes();
            req.extend_from_slice(&client_frame(2, &[i as u8]));
            s.write_all(&req).await.unwrap();
            let got = read_until(&mut s, |b| head_end(b).is_some_and(|h| b.len() >= h + 3)).await;
            assert_eq!(&got[head_end(&got).unwrap()..], &[0x82, 1, i as u8]);
            s // held open
        });
    }
    let mut open = vec![];
    while let Some(r) = tasks.join_next().await {
        open.push(r.unwrap());
    }
    let text = gw.metrics().await;
    let count = |w: u32| -> i64 {
        let prefix = format!("wsgate_worker_connections{{worker=\"{w}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("no worker {w} gauge in {text}"))
            .parse()
            .unwrap()
    };
    let (a, b) = (count(0), count(1));
    assert_eq!(a + b, N as i64, "{text}");
    assert!(
        (a - b).abs() <= 4,
        "worker 0 serves {a}, worker 1 serves {b}"
    );
    drop(open);
}

/// Proxies one WebSocket handshake to `backend` (with `connect_timeout`)
/// and returns the gateway's whole answer (it closes the connection after).
async fn handshake_to_backend(backend: &str, connect_timeout: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("gw.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[listener]]\naddress = \"127.0.0.1:0\"\n\n[limits]\nconnect_timeout = \"{connect_timeout}\"\n\n\
             [[route]]\nproxy = \"ws://{backend}\"\n"
        ),
    )
    .unwrap();
    let gw = Gateway::start(&["serve", "--config", cfg.to_str().unwrap()]);
    let mut s = TcpStream::connect(&gw.addr()).await.unwrap();
    s.write_all(ws_request("/").as_bytes()).await.unwrap();
    let answer = read_until(&mut s, |_| false).await;
    String::from_utf8_lossy(&answer).into_owned()
}

/// The backend's request is sent along with the connect where the connection
/// is already up (loopback); where it is not, the gateway waits for it, and a
/// connection that never comes up is a 504 after the connect timeout. A
/// backend that refuses is a 502.
#[tokio::test]
async fn backend_that_never_connects_or_refuses() {
    use socket2::{Domain, Socket, Type};
    // Backlog 0 and never accepting: once the queue holds a connection, the
    // kernel drops further SYNs, and a connect stays pending.
    let full = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    full.bind(
        &"127.0.0.1:0"
            .parse::<std::net::SocketAddr>()
            .unwrap()
            .into(),
    )
    .unwrap();
    full.listen(0).unwrap();
    let addr = full.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = vec![];
    for _ in 0..2 {
        let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        s.set_nonblocking(true).unwrap();
        let _ = s.connect(&addr.into());
        fillers.push(s);
    }
    let started = std::time::Instant::now();
    let head = handshake_to_backend(&addr.to_string(), "400ms").await;
    assert!(head.starts_with("HTTP/1.1 504"), "{head}");
    assert!(head.contains("connect timed out"), "{head}");
    assert!(started.elapsed() >= Duration::from_millis(400), "{head}");

    // A port nobody listens on: refused at once.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let head = handshake_to_backend(&format!("127.0.0.1:{port}"), "5s").await;
    assert!(head.starts_with("HTTP/1.1 502"), "{head}");
    assert!(head.contains("cannot connect"), "{head}");
    drop(fillers);
}
