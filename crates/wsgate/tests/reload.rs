//! Reload, in-process (`wsgate::Server::reload`): new handshakes take the
//! new settings at once, established WebSockets keep running on the old
//! ones, and a reload that changes what cannot change is refused with the
//! running settings kept. (The signal and file-watch triggers, and a reload
//! under 2,000 open WebSockets, are end-to-end tests: e2e/tests/test_reload.py.)

use std::path::Path;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn config(routes: &str) -> wsgate::config::Config {
    let text = format!("workers = 1\n[[listener]]\naddress = \"127.0.0.1:0\"\n{routes}");
    wsgate::config::parse("r.toml", &text, Path::new(".")).unwrap()
}

/// Opens a WebSocket on `path`; the status, and the stream once it is 101.
async fn open(addr: &str, path: &str) -> (u16, TcpStream) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let key = wsframe::handshake::generate_key();
    s.write_all(&wsframe::handshake::client_request(
        "x",
        path,
        &key,
        &[],
        &[],
    ))
    .await
    .unwrap();
    let mut buf = BytesMut::new();
    loop {
        assert!(s.read_buf(&mut buf).await.unwrap() > 0);
        if let Some(r) = wsframe::handshake::parse_response(&buf).unwrap() {
            return (r.status, s);
        }
    }
}

/// One echo round trip on an open WebSocket to `echo:`.
async fn echo(s: &mut TcpStream, text: &[u8]) {
    let mut out = BytesMut::new();
    wsframe::encode_frame(
        &mut out,
        true,
        wsframe::OpCode::Binary,
        Some([9, 8, 7, 6]),
        text,
    );
    s.write_all(&out).await.unwrap();
    let mut back = vec![0u8; 2 + text.len()];
    s.read_exact(&mut back).await.unwrap();
    assert_eq!(&back[2..], text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_changes_new_handshakes_and_keeps_open_ones() {
    let server = wsgate::Server::start(config("[[route]]\npath = \"/a\"\nto = \"echo:\"\n"))
        .await
        .unwrap();
    let addr = server.urls()[0].trim_start_matches("ws://").to_string();
    let (status, mut old) = open(&addr, "/a").await;
    assert_eq!(status, 101);
    echo(&mut old, b"before").await;
    assert_eq!(open(&addr, "/b").await.0, 404);

    server
        .reload(config("[[route]]\npath = \"/b\"\nto = \"echo:\"\n"))
        .unwrap();
    // New handshakes: the new routes.
    assert_eq!(open(&addr, "/a").await.0, 404);
    let (status, mut new) = open(&addr, "/b").await;
    assert_eq!(status, 101);
    echo(&mut new, b"new").await;
    // The WebSocket opened before the reload still runs.
    echo(&mut old, b"after").await;

    // What a reload cannot change is refused; the running settings stay.
    let mut other = config("[[route]]\npath = \"/c\"\nto = \"echo:\"\n");
    other.listeners[0].address = "127.0.0.1:1".into();
    let e = server.reload(other).unwrap_err();
    assert!(e.to_string().contains("listeners"), "{e}");
    let mut more = config("[[route]]\npath = \"/c\"\nto = \"echo:\"\n");
    more.workers = Some(3);
    assert!(server
        .reload(more)
        .unwrap_err()
        .to_string()
        .contains("workers"));
    assert_eq!(open(&addr, "/b").await.0, 101);
    assert_eq!(open(&addr, "/c").await.0, 404);
    echo(&mut old, b"still").await;
    drop((old, new));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_limits_keep_their_counts_across_a_reload() {
    // A cap of one WebSocket: the one open before the reload still counts.
    let routes = "[limits]\nmax_connections = 1\n[[route]]\npath_prefix = \"/\"\nto = \"echo:\"\n";
    let server = wsgate::Server::start(config(routes)).await.unwrap();
    let addr = server.urls()[0].trim_start_matches("ws://").to_string();
    let (status, mut held) = open(&addr, "/x").await;
    assert_eq!(status, 101);
    server.reload(config(routes)).unwrap();
    assert_eq!(
        open(&addr, "/y").await.0,
        503,
        "the cap still counts the open one"
    );
    echo(&mut held, b"held").await;
    // A new cap is a new count.
    let wider = "[limits]\nmax_connections = 2\n[[route]]\npath_prefix = \"/\"\nto = \"echo:\"\n";
    server.reload(config(wider)).unwrap();
    assert_eq!(open(&addr, "/z").await.0, 101);
    drop(held);
    server.stop().await;
}
