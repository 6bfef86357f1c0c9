//! Integration tests: the real `wsgate` binary on ephemeral loopback ports,
//! driven by the workspace's own WebSocket client (`wsframe`).

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use wsframe::{DecoderConfig, Message, WebSocket};

mod common;
use common::{tcp_echo, Gateway};

const LIMIT: Duration = Duration::from_secs(20);

async fn connect(
    addr: &str,
    path: &str,
    protocols: &[&str],
) -> Result<WebSocket<TcpStream>, wsframe::Error> {
    let tcp = TcpStream::connect(addr).await?;
    let cfg = DecoderConfig {
        max_message_size: 0,
        ..Default::default()
    };
    WebSocket::connect(tcp, addr, path, protocols, cfg)
        .await
        .map(|(ws, _)| ws)
}

/// Sends a raw HTTP request and returns the status line's code and the whole answer.
async fn raw_http(addr: &str, request: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(LIMIT, s.read(&mut chunk))
            .await
            .unwrap()
            .unwrap();
        buf.extend_from_slice(&chunk[..n]);
        if n == 0 || buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.ends_with(b"\n") {
            break;
        }
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code = text.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, text)
}

/// Receives data messages until `n` bytes arrived; returns them.
async fn recv_bytes<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocket<S>, n: usize) -> Vec<u8> {
    let mut got = Vec::with_capacity(n);
    while got.len() < n {
        match tokio::time::timeout(LIMIT, ws.recv())
            .await
            .unwrap()
            .unwrap()
        {
            Message::Binary(b) | Message::Text(b) => got.extend_from_slice(&b),
            other => panic!("unexpected {other:?} after {} bytes", got.len()),
        }
    }
    got
}

async fn expect_close<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocket<S>) -> u16 {
    loop {
        match tokio::time::timeout(LIMIT, ws.recv()).await.unwrap() {
            Ok(Message::Close(c)) => return c.map_or(1005, |(code, _)| code),
            Ok(Message::Pong(_)) => continue,
            other => panic!("expected close, got {other:?}"),
        }
    }
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 31 % 251) as u8).collect()
}

#[tokio::test]
async fn echo_peer_keeps_text_and_binary() {
    let gw = Gateway::start(&["serve", "--listen", "127.0.0.1:0", "--to", "echo:"]);
    let mut ws = connect(&gw.addr(), "/", &[]).await.unwrap();
    ws.send(Message::Text("héllo".into())).await.unwrap();
    assert_eq!(ws.recv().await.unwrap(), Message::Text("héllo".into()));
    let big = Bytes::from(pattern(3 << 20));
    ws.send(Message::Binary(big.clone())).await.unwrap();
    assert_eq!(ws.recv().await.unwrap(), Message::Binary(big));
    ws.close(1000, "").await.unwrap();
    assert_eq!(expect_close(&mut ws).await, 1000);
}

#[tokio::test]
async fn tcp_peer_round_trip_and_client_close() {
    let port = tcp_echo().await;
    let to = format!("tcp://127.0.0.1:{port}");
    let gw = Gateway::start(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--to",
        &to,
        "--framing",
        "binary",
    ]);
    let mut ws = connect(&gw.addr(), "/any/path", &[]).await.unwrap();
    let data = pattern(2 << 20);
    ws.send(Message::Binary(data.clone().into())).await.unwrap();
    assert_eq!(recv_bytes(&mut ws, data.len()).await, data);
    ws.close(4000, "done").await.unwrap();
    assert_eq!(expect_close(&mut ws).await, 4000, "close code is echoed");
}

#[tokio::test]
async fn peer_eof_delivers_everything_then_1000() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let data = pattern(4 << 20);
    let sent = data.clone();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        s.write_all(&sent).await.unwrap();
        // Closes at once.
    });
    let to = format!("tcp://127.0.0.1:{port}");
    let gw = Gateway::start(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--to",
        &to,
        "--framing",
        "binary",
    ]);
    let mut ws = connect(&gw.addr(), "/", &[]).await.unwrap();
    assert_eq!(recv_bytes(&mut ws, data.len()).await, data);
    assert_eq!(expect_close(&mut ws).await, 1000);
}

#[tokio::test]
async fn resp_framing_gives_one_message_per_reply() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut buf = [0u8; 64];
        let _ = s.read(&mut buf).await.unwrap();
        // Three replies in dribbles that split them anywhere.
        let wire = b"+PONG\r\n$5\r\nhello\r\n*2\r\n:1\r\n$-1\r\n";
        for chunk in wire.chunks(3) {
            s.write_all(chunk).await.unwrap();
            s.flush().await.unwrap();
            tokio::task::yield_now().await;
        }
        let _ = s.read(&mut buf).await;
    });
    let to = format!("tcp://127.0.0.1:{port}");
    let gw = Gateway::start(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--to",
        &to,
        "--framing",
        "resp",
        "--protocol",
        "redis",
    ]);
    let tcp = TcpStream::connect(gw.addr()).await.unwrap();
    let (mut ws, resp) = WebSocket::connect(
        tcp,
        &gw.addr(),
        "/",
        &["x", "redis"],
        DecoderConfig::default(),
    )
    .await
    .unwrap();
    assert_eq!(resp.header("sec-websocket-protocol"), Some("redis"));
    ws.send(Message::Binary(Bytes::from_static(b"*1\r\n$4\r\nPING\r\n")))
        .await
        .unwrap();
    let mut got = vec![];
    for _ in 0..3 {
        match ws.recv().await.unwrap() {
            Message::Binary(b) => got.push(b),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        got,
        vec![
            &b"+PONG\r\n"[..],
            b"$5\r\nhello\r\n",
            b"*2\r\n:1\r\n$-1\r\n"
        ]
    );
}

#[tokio::test]
async fn http_answers() {
    let gw = Gateway::start(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--to",
        "echo:",
        "--protocol",
        "redis",
    ]);
    let a = gw.addr();
    let (code, _) = raw_http(&a, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(code, 200);
    let ws_req = |extra: &str| {
        format!(
            "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
        )
    };
    let (code, _) = raw_http(
        &a,
        "GET / HTTP/1.1\r\nHost: x\r\nSec-WebSocket-Protocol: redis\r\n\r\n",
    )
    .await;
    assert_eq!(code, 400, "plain GET on a WebSocket route");
    let (code, text) = raw_http(
        &a,
        &ws_req("Sec-WebSocket-Version: 8\r\nSec-WebSocket-Protocol: redis\r\n"),
    )
    .await;
    assert_eq!(code, 426);
    assert!(
        text.to_ascii_lowercase()
            .contains("sec-websocket-version: 13"),
        "{text}"
    );
    let (code, text) = raw_http(
        &a,
        &ws_req("Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: cql\r\n"),
    )
    .await;
    assert_eq!(code, 400);
    assert!(text.contains("redis"), "supported list in the body: {text}");
    let (code, text) = raw_http(
        &a,
        &ws_req("Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: cql, redis\r\n"),
    )
    .await;
    assert_eq!(code, 101);
    assert!(
        text.to_ascii_lowercase()
            .contains("sec-websocket-protocol: redis"),
        "{text}"
    );
}

#[tokio::test]
async fn unknown_path_404_and_unreachable_peer_502() {
    let dir = tempfile::tempdir().unwrap();
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_port = dead.local_addr().unwrap().port();
    drop(dead);
    let cfg = dir.path().join("gw.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[listener]]\naddress = \"127.0.0.1:0\"\n\
             [[route]]\npath = \"/dead\"\nto = \"tcp://127.0.0.1:{dead_port}\"\n\
             [[route]]\npath = \"/echo\"\nto = \"echo:\"\n"
        ),
    )
    .unwrap();
    let gw = Gateway::start(&["serve", "--config", cfg.to_str().unwrap()]);
    match connect(&gw.addr(), "/nope", &[]).await {
        Err(wsframe::Error::Handshake(h)) => assert!(h.contains("404"), "{h}"),
        other => panic!("{other:?}"),
    }
    match connect(&gw.addr(), "/dead", &[]).await {
        Err(wsframe::Error::Handshake(h)) => assert!(h.contains("502"), "{h}"),
        other => panic!("{other:?}"),
    }
    // The gateway still serves.
    let mut ws = connect(&gw.addr(), "/echo", &[]).await.unwrap();
    ws.send(Message::Text("ok".into())).await.unwrap();
    assert_eq!(ws.recv().await.unwrap(), Message::Text("ok".into()));
}

#[tokio::test]
async fn connection_cap_is_503() {
    let gw = Gateway::start(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--to",
        "echo:",
        "--max-connections",
        "1",
    ]);
    let mut first = connect(&gw.addr(), "/", &[]).await.unwrap();
    match connect(&gw.addr(), "/", &[]).await {
        Err(wsframe::Error::Handshake(h)) => assert!(h.contains("503"), "{h}"),
        other => panic!("{other:?}"),
    }
    first.close(1000, "").await.unwrap();
    expect_close(&mut first).await;
    drop(first);
    // The slot comes back once the first connection is gone.
    let mut ok = None;
    for _ in 0..200 {
        if let Ok(ws) = connect(&gw.addr(), "/", &[]).await {
            ok = Some(ws);
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(ok.is_some(), "slot released after close");
}

#[tokio::test]
async fn idle_timeout_closes_with_1001_and_unanswered_pings_drop() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("gw.toml");
    std::fs::write(
        &cfg,
        "[[listener]]\naddress = \"127.0.0.1:0\"\n[limits]\nidle_timeout = \"300ms\"\n\
         [[route]]\npath = \"/idle\"\nto = \"echo:\"\n",
    )
    .unwrap();
    let gw = Gateway::start(&["serve", "--config", cfg.to_str().unwrap()]);
    let mut ws = connect(&gw.addr(), "/idle", &[]).await.unwrap();
    assert_eq!(expect_close(&mut ws).await, 1001);

    let cfg2 = dir.path().join("gw2.toml");
    std::fs::write(
        &cfg2,
        "[[listener]]\naddress = \"127.0.0.1:0\"\n[limits]\nping_interval = \"100ms\"\npong_timeout = \"200ms\"\n\
         [[route]]\nto = \"echo:\"\n",
    )
    .unwrap();
    let gw2 = Gateway::start(&["serve", "--config", cfg2.to_str().unwrap()]);
    let ws = connect(&gw2.addr(), "/", &[]).await.unwrap();
    // A reader that never answers pings: the gateway must drop it.
    let (mut r, _w) = ws.split();
    let mut pings = 0;
    loop {
        match tokio::time::timeout(LIMIT, r.recv()).await.unwrap() {
            Ok(Message::Ping(_)) => pings += 1,
            Err(_) => break,
            Ok(other) => panic!("{other:?}"),
        }
    }
    assert!(pings >= 1);
}

#[test]
fn check_reports_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(
        &cfg,
        "[[listener]]\naddress = \"127.0.0.1:0\"\n[[route]]\npath = \"/x\"\nto = \"tcp://nowhere\"\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_wsgate"))
        .args(["check", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.toml:5:6: route[0].to: invalid peer"),
        "{err}"
    );
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        "[[listener]]\naddress = \"127.0.0.1:0\"\n[[route]]\nto = \"echo:\"\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_wsgate"))
        .args(["check", "--config", good.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
}

fn self_signed(dir: &std::path::Path) -> (String, String, rcgen::CertifiedKey) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
    (
        cert.to_str().unwrap().into(),
        key.to_str().unwrap().into(),
        ck,
    )
}

#[tokio::test]
async fn wss_echo_and_mismatched_key_error() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, ck) = self_signed(dir.path());
    let gw = Gateway::tls_echo(&cert, &key);
    assert!(gw.urls[0].starts_with("wss://"), "{:?}", gw.urls);
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ck.cert.der().clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(gw.addr()).await.unwrap();
    let tls = connector
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let (mut ws, _) = WebSocket::connect(tls, "localhost", "/", &[], DecoderConfig::default())
        .await
        .unwrap();
    ws.send(Message::Binary(Bytes::from(pattern(300_000))))
        .await
        .unwrap();
    assert_eq!(
        ws.recv().await.unwrap(),
        Message::Binary(Bytes::from(pattern(300_000)))
    );

    // A key from another pair: refused with a clear message, before listening.
    let other = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let wrong = dir.path().join("wrong.pem");
    std::fs::write(&wrong, other.key_pair.serialize_pem()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_wsgate"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--to",
            "echo:",
            "--tls-cert",
            &cert,
            "--tls-key",
        ])
        .arg(&wrong)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not match certificate"), "{err}");
    assert!(out.stdout.is_empty(), "nothing announced");
}
