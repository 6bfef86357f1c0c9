//! HTTP/2 extended CONNECT (RFC 8441) against the real binary, with hyper's
//! own HTTP/2 client: to a bridge route (`echo:`) and through the reverse
//! proxy to an HTTP/1.1 WebSocket backend.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use wsframe::{DecoderConfig, Message, Role, WebSocket};

mod common;
use common::Gateway;

/// Opens a WebSocket over an HTTP/2 stream with extended CONNECT.
async fn h2_websocket(
    addr: &str,
    path: &str,
    protocol: Option<&str>,
) -> (
    http::response::Parts,
    Option<WebSocket<TokioIo<hyper::upgrade::Upgraded>>>,
) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    // The server's SETTINGS (with ENABLE_CONNECT_PROTOCOL) must arrive first.
    let mut attempt = 0;
    let resp = loop {
        sender.ready().await.unwrap();
        let mut b = Request::builder()
            .method(Method::CONNECT)
            .uri(format!("http://{addr}{path}"))
            .header("sec-websocket-version", "13")
            .extension(hyper::ext::Protocol::from_static("websocket"));
        if let Some(p) = protocol {
            b = b.header("sec-websocket-protocol", p);
        }
        match sender
            .send_request(b.body(http_body_util::Empty::<Bytes>::new()).unwrap())
            .await
        {
            Ok(r) => break r,
            Err(e) if attempt < 50 => {
                attempt += 1;
                let _ = e;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("extended CONNECT failed: {e}"),
        }
    };
    if resp.status() != StatusCode::OK {
        return (resp.into_parts().0, None);
    }
    let (parts, body) = resp.into_parts();
    let upgraded = hyper::upgrade::on(http::Response::from_parts(parts.clone(), body))
        .await
        .unwrap();
    let ws = WebSocket::from_raw(
        TokioIo::new(upgraded),
        Role::Client,
        DecoderConfig::default(),
        &[],
    );
    (parts, Some(ws))
}

#[tokio::test]
async fn extended_connect_to_an_echo_bridge_route() {
    let gw = Gateway::start(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--to",
        "echo:",
        "--protocol",
        "redis",
        "--admin",
        "127.0.0.1:0",
    ]);
    let (parts, ws) = h2_websocket(&gw.addr(), "/", Some("redis")).await;
    assert_eq!(parts.headers["sec-websocket-protocol"], "redis");
    let mut ws = ws.unwrap();
    ws.send(Message::Text("over h2".into())).await.unwrap();
    assert_eq!(ws.recv().await.unwrap(), Message::Text("over h2".into()));
    let big = Bytes::from(vec![9u8; 1 << 20]);
    ws.send(Message::Binary(big.clone())).await.unwrap();
    assert_eq!(ws.recv().await.unwrap(), Message::Binary(big));

    // The metrics say it came over HTTP/2.
    let text = gw.metrics().await;
    assert!(
        text.contains("wsgate_websockets_open{route=\"default\",http_version=\"2\"} 1"),
        "{text}"
    );

    // Another :protocol is refused with a clear status, not a hang.
    let tcp = TcpStream::connect(&gw.addr()).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut status = None;
    for _ in 0..50 {
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri(format!("http://{}/", gw.addr()))
            .extension(hyper::ext::Protocol::from_static("connect-udp"))
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        sender.ready().await.unwrap();
        if let Ok(r) = sender.send_request(req).await {
            status = Some(r.status());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status, Some(StatusCode::NOT_IMPLEMENTED));
}

#[tokio::test]
async fn extended_connect_through_the_proxy_to_an_h1_backend() {
    // A minimal HTTP/1.1 WebSocket echo backend built on wsframe.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if s.read(&mut b).await.unwrap() == 0 {
                        return;
                    }
                    head.push(b[0]);
                }
                let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
                let key = text
                    .lines()
                    .find_map(|l| l.strip_prefix("sec-websocket-key: "))
                    .unwrap()
                    .trim()
                    .to_string();
                // The gateway made up a key: HTTP/2 carries none. Answer case-preserved.
                let orig = String::from_utf8_lossy(&head).to_string();
                let key = orig
                    .lines()
                    .find(|l| l.to_ascii_lowercase().starts_with("sec-websocket-key:"))
                    .map(|l| l.split_once(':').unwrap().1.trim().to_string())
                    .unwrap_or(key);
                let accept = wsframe::handshake::accept_key(key.as_bytes());
                let xff = text.contains("x-forwarded-for: 127.0.0.1");
                s.write_all(
                    format!(
                        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                         Sec-WebSocket-Accept: {accept}\r\nX-Saw-Xff: {xff}\r\n\r\n"
                    )
                    .as_bytes(),
                )
                .await
                .unwrap();
                let mut ws = WebSocket::from_raw(s, Role::Server, DecoderConfig::default(), &[]);
                while let Ok(m) = ws.recv().await {
                    match m {
                        Message::Close(_) => break,
                        m => ws.send(m).await.unwrap(),
                    }
                }
            });
        }
    });
    let to = format!("ws://{backend}");
    let gw = Gateway::start(&["serve", "--listen", "127.0.0.1:0", "--to", &to]);
    let (parts, ws) = h2_websocket(&gw.addr(), "/chat?room=1", None).await;
    assert_eq!(parts.headers["x-saw-xff"], "true");
    let mut ws = ws.expect("200 to the extended CONNECT");
    for i in 0..20 {
        let m = Message::Binary(Bytes::from(vec![i as u8; 1000 * i]));
        ws.send(m.clone()).await.unwrap();
        assert_eq!(ws.recv().await.unwrap(), m);
    }
    ws.close(1000, "bye").await.unwrap();
    match tokio::time::timeout(Duration::from_secs(10), ws.recv())
        .await
        .unwrap()
        .unwrap()
    {
        Message::Close(Some((code, _))) => assert_eq!(code, 1000),
        other => panic!("{other:?}"),
    }
}
