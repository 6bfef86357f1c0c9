//! The reverse tunnel's gateway side, in-process (`wsgate::Server`), with a
//! minimal agent written here from docs/tunnel.md (the real one,
//! `wsgate agent`, has tests of its own and end-to-end ones): registration
//! answers, `/request`, the forward proxy, CONNECT, `--forward`, `/mux`, a
//! bridge route to an agent's peer, `GET /agents`, and failing over to
//! another connection when one dies.

mod common;
use common::tunnel::{mux, open, serve_agent, websocket_protocol};
use std::path::Path;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use wsgate::tunnel::proto::{self, Status};

const TOKEN: &str = "secret-site-a";

/// An HTTP server answering `hello <path>` to any request.
async fn http_server() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let head = String::from_utf8_lossy(&buf[..n]).to_string();
                let path = head.split(' ').nth(1).unwrap_or("?").to_string();
                let host = head
                    .lines()
                    .find_map(|l| {
                        l.strip_prefix("host: ")
                            .or_else(|| l.strip_prefix("Host: "))
                    })
                    .unwrap_or("")
                    .to_string();
                let body = format!("hello {path} via {host}");
                let _ = s
                    .write_all(
                        format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        )
                        .as_bytes(),
                    )
                    .await;
            });
        }
    });
    port
}

/// Opens a WebSocket to `addr` with the registration headers; the status,
/// and the transport once it is 101.
async fn register(
    addr: &str,
    id: &str,
    token: Option<&str>,
    allow: &str,
) -> (u16, Option<wsmux::WsTransport<TcpStream>>) {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("Wsgate-Agent-Id", id), ("Wsgate-Agent-Allow", allow)];
    if let Some(a) = &auth {
        headers.push(("Authorization", a));
    }
    let (status, chosen, t) =
        websocket_protocol(addr, "/agent", proto::AGENT_PROTOCOL, &headers).await;
    if status == 101 {
        assert_eq!(chosen.as_deref(), Some(proto::AGENT_PROTOCOL));
    }
    (status, t)
}

/// Sends raw HTTP and reads the answer to its end; the status and the text.
async fn http(addr: &str, request: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut buf = vec![];
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .expect("an answer within 10 s")
        .unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    (text[9..12].parse().unwrap(), text)
}

/// Waits until the gateway lists `n` connections of the agent (bounded).
async fn until_registered(admin: &str, n: usize) -> String {
    for _ in 0..200 {
        let (_, text) = http(admin, "GET /agents HTTP/1.1\r\nHost: x\r\n\r\n").await;
        if text.contains(&format!("\"connections\": {n}")) {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the agent did not register {n} connection(s)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_register_and_everything_goes_through_them() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("agents.txt");
    std::fs::write(&tokens, format!("site-a {TOKEN}\nsite-b other-token\n")).unwrap();
    let (echo_port, web_port) = (common::tcp_echo().await, http_server().await);
    let text = format!(
        r#"
workers = 1
[[listener]]
address = "127.0.0.1:0"
[admin]
address = "127.0.0.1:0"
[tunnel]
agent_tokens = "{}"
mux_allow = ["agent://site-a/tcp://*:*"]
keepalive = "1s"
[[tunnel.forward]]
listen = "127.0.0.1:0"
to = "agent://site-a/tcp://127.0.0.1:{echo_port}"
[[route]]
path = "/redis"
to = "agent://site-a/tcp://127.0.0.1:{echo_port}"
framing = "binary"
"#,
        tokens.display()
    );
    let config = wsgate::config::parse("t.toml", &text, Path::new(".")).unwrap();
    let server = wsgate::Server::start(config).await.unwrap();
    let addr = server.urls()[0].trim_start_matches("ws://").to_string();
    let admin = server.admin().unwrap().to_string();
    let allow = format!("tcp://127.0.0.1:{echo_port}, http://127.0.0.1:{web_port}");

    // Registration answers.
    assert_eq!(register(&addr, "site-a", None, &allow).await.0, 401);
    assert_eq!(
        register(&addr, "site-a", Some("wrong-token"), &allow)
            .await
            .0,
        401
    );
    assert_eq!(register(&addr, "site-b", Some(TOKEN), &allow).await.0, 403);
    assert_eq!(register(&addr, "../x", Some(TOKEN), &allow).await.0, 400);
    // Before any agent: 503, naming what is missing.
    let req = format!(
        "GET /request HTTP/1.1\r\nHost: gw\r\nX-PROXY-DESTINATION: http://127.0.0.1:{web_port}/hello\r\nConnection: close\r\n\r\n"
    );
    let (status, body) = http(&addr, &req).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("no agent whose allow list covers http://127.0.0.1:"),
        "{body}"
    );

    let (status, t) = register(&addr, "site-a", Some(TOKEN), &allow).await;
    assert_eq!(status, 101);
    let first = serve_agent(t.unwrap(), &allow);
    let (_, t) = register(&addr, "site-a", Some(TOKEN), &allow).await;
    let _second = serve_agent(t.unwrap(), &allow);
    let agents = until_registered(&admin, 2).await;
    assert!(agents.contains("\"id\": \"site-a\""), "{agents}");

    // /request, with and without X-PROXY-AGENT.
    let (status, body) = http(&addr, &req).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.ends_with(&format!("hello /hello via 127.0.0.1:{web_port}")),
        "{body}"
    );
    let picked = req.replace("\r\n\r\n", "\r\nX-PROXY-AGENT: site-a\r\n\r\n");
    assert_eq!(http(&addr, &picked).await.0, 200);
    let nobody = req.replace("\r\n\r\n", "\r\nX-PROXY-AGENT: site-z\r\n\r\n");
    assert_eq!(http(&addr, &nobody).await.0, 503);
    // Missing or unparsable destination: 400.
    let (status, _) = http(
        &addr,
        "GET /request HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 400);
    // The agent refuses what it does not allow: 403 with its reason.
    let refused = req.replace("X-PROXY-AGENT", "X-Other").replace(
        &format!("http://127.0.0.1:{web_port}/hello"),
        "http://127.0.0.1:9/x",
    );
    let refused = refused.replace("\r\n\r\n", "\r\nX-PROXY-AGENT: site-a\r\n\r\n");
    let (status, body) = http(&addr, &refused).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("not allowed"), "{body}");

    // The forward proxy: absolute form.
    let fwd = format!(
        "GET http://127.0.0.1:{web_port}/fp HTTP/1.1\r\nHost: 127.0.0.1:{web_port}\r\nConnection: close\r\n\r\n"
    );
    let (status, body) = http(&addr, &fwd).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.ends_with(&format!("hello /fp via 127.0.0.1:{web_port}")),
        "{body}"
    );

    // CONNECT: a tunnel to the echo server.
    let mut s = TcpStream::connect(&addr).await.unwrap();
    s.write_all(format!("CONNECT 127.0.0.1:{echo_port} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = vec![0u8; 512];
    let n = s.read(&mut head).await.unwrap();
    assert!(
        String::from_utf8_lossy(&head[..n]).starts_with("HTTP/1.1 200"),
        "{:?}",
        &head[..n]
    );
    s.write_all(b"through the tunnel").await.unwrap();
    let mut got = [0u8; 18];
    s.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"through the tunnel");
    drop(s);

    // --forward: a TCP listener, one stream per connection.
    let (url, to) = &server.forwards()[0];
    assert_eq!(to, &format!("agent://site-a/tcp://127.0.0.1:{echo_port}"));
    let mut f = TcpStream::connect(url.trim_start_matches("tcp://"))
        .await
        .unwrap();
    f.write_all(b"forwarded").await.unwrap();
    f.shutdown().await.unwrap();
    let mut back = vec![];
    f.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"forwarded");

    // /mux: a client's own streams, checked against --mux-allow.
    let mux = mux(&addr, &[]).await;
    let open = |dest: String| {
        let mux = &mux;
        async move { open(mux, &dest).await }
    };
    let (mut st, reply) = open(format!("agent://site-a/tcp://127.0.0.1:{echo_port}")).await;
    assert_eq!(reply.status, Status::Ok);
    st.write_all(b"muxed").await.unwrap();
    st.shutdown().await.unwrap();
    let mut back = vec![];
    st.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"muxed");
    let (_, reply) = open(format!("tcp://127.0.0.1:{echo_port}")).await;
    assert_eq!(
        reply.status,
        Status::NotAllowed,
        "direct targets are not in --mux-allow"
    );
    let (_, reply) = open(format!("agent://site-b/tcp://127.0.0.1:{echo_port}")).await;
    assert_eq!(reply.status, Status::NotAllowed);

    // A bridge route to the agent's peer.
    let mut ws = TcpStream::connect(&addr).await.unwrap();
    let key = wsframe::handshake::generate_key();
    ws.write_all(&wsframe::handshake::client_request(
        "gw",
        "/redis",
        &key,
        &[],
        &[],
    ))
    .await
    .unwrap();
    let mut buf = BytesMut::new();
    let resp = loop {
        ws.read_buf(&mut buf).await.unwrap();
        if let Some(r) = wsframe::handshake::parse_response(&buf).unwrap() {
            break r;
        }
    };
    assert_eq!(resp.status, 101);
    let mut out = BytesMut::new();
    wsframe::encode_frame(
        &mut out,
        true,
        wsframe::OpCode::Binary,
        Some([1, 2, 3, 4]),
        b"PING",
    );
    ws.write_all(&out).await.unwrap();
    let mut frame = vec![0u8; 6];
    ws.read_exact(&mut frame).await.unwrap();
    assert_eq!(&frame[2..], b"PING");
    drop(ws);

    // One connection dies: the next requests go through the other.
    first.abort();
    until_registered(&admin, 1).await;
    for _ in 0..5 {
        assert_eq!(http(&addr, &req).await.0, 200);
    }
    let (_, metrics) = http(&admin, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(
        metrics.contains("wsgate_tunnel_streams_total{via=\"request\",outcome=\"ok\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("wsgate_agent_connections{agent=\"site-a\"} 1"),
        "{metrics}"
    );
    server.stop().await;
}

/// A `--forward` listener's connections pass the gateway's admission like
/// any other: over `max_connections` one is closed at once, unserved, and
/// counted as a refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_connections_are_admitted_like_any_other() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("agents.txt");
    std::fs::write(&tokens, format!("site-a {TOKEN}\n")).unwrap();
    let echo_port = common::tcp_echo().await;
    // The agent's WebSocket holds one of the two slots.
    let text = format!(
        r#"
workers = 1
[limits]
max_connections = 2
[[listener]]
address = "127.0.0.1:0"
[admin]
address = "127.0.0.1:0"
[tunnel]
agent_tokens = "{}"
[[tunnel.forward]]
listen = "127.0.0.1:0"
to = "agent://site-a/tcp://127.0.0.1:{echo_port}"
"#,
        tokens.display()
    );
    let config = wsgate::config::parse("t.toml", &text, Path::new(".")).unwrap();
    let server = wsgate::Server::start(config).await.unwrap();
    let addr = server.urls()[0].trim_start_matches("ws://").to_string();
    let admin = server.admin().unwrap().to_string();
    let allow = format!("tcp://127.0.0.1:{echo_port}");
    let (status, t) = register(&addr, "site-a", Some(TOKEN), &allow).await;
    assert_eq!(status, 101);
    let _agent = serve_agent(t.unwrap(), &allow);
    until_registered(&admin, 1).await;

    let forward = server.forwards()[0]
        .0
        .trim_start_matches("tcp://")
        .to_string();
    let mut first = TcpStream::connect(&forward).await.unwrap();
    first.write_all(b"one").await.unwrap();
    let mut got = [0u8; 3];
    first.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"one");

    // The third connection: refused, closed without a byte.
    let mut second = TcpStream::connect(&forward).await.unwrap();
    let _ = second.write_all(b"two").await;
    let mut rest = vec![];
    let n = tokio::time::timeout(Duration::from_secs(10), second.read_to_end(&mut rest))
        .await
        .expect("the refused connection is closed");
    assert!(n.is_err() || rest.is_empty(), "served: {rest:?}");
    let (_, metrics) = http(&admin, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(
        metrics.contains("wsgate_handshake_refusals_total{reason=\"global_cap\"} 1"),
        "{metrics}"
    );

    // The first is still served; once it ends, its slot is free again.
    first.write_all(b"uno").await.unwrap();
    first.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"uno");
    drop(first);
    let mut third = None;
    for _ in 0..200 {
        let mut s = TcpStream::connect(&forward).await.unwrap();
        s.write_all(b"tre").await.unwrap();
        let mut b = [0u8; 3];
        if tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut b))
            .await
            .is_ok_and(|r| r.is_ok())
        {
            third = Some(b);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(third.as_ref().map(|b| &b[..]), Some(&b"tre"[..]));
    server.stop().await;
}
