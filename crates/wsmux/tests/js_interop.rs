//! A second implementation of the protocol, written in JavaScript from
//! docs/mux.md (`js/wsmux.mjs`), talks to this crate over a real loopback
//! WebSocket. Skipped (with a message) when no Node.js with a WebSocket
//! client is installed.

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use wsmux::{Config, Session, WsTransport};

/// `node` plus the flags that give it a global `WebSocket`, if any.
fn node_with_websocket() -> Option<Vec<&'static str>> {
    for flags in [&[][..], &["--experimental-websocket"][..]] {
        let ok = std::process::Command::new("node")
            .args(flags)
            .args([
                "-e",
                "process.exit(typeof WebSocket === 'function' ? 0 : 1)",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Some(flags.to_vec());
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn javascript_implementation_interoperates() {
    let Some(flags) = node_with_websocket() else {
        eprintln!("SKIPPED: no Node.js with a WebSocket client on PATH");
        return;
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let session = Arc::new(Session::server(
            WsTransport::accept(tcp).await.unwrap(),
            Config::default(),
        ));
        // A stream opened by the Rust side.
        let mut ours = session.open().await.unwrap();
        ours.write_all(b"hello from rust").await.unwrap();
        ours.shutdown().await.unwrap();
        let srv = session.clone();
        let echo = tokio::spawn(async move {
            let mut echoed = 0;
            while let Ok(mut s) = srv.accept().await {
                echoed += 1;
                tokio::spawn(async move {
                    let (mut r, mut w) = tokio::io::split(&mut s);
                    tokio::io::copy(&mut r, &mut w).await.unwrap();
                    w.shutdown().await.unwrap();
                });
            }
            echoed
        });
        let mut back = Vec::new();
        ours.read_to_end(&mut back).await.unwrap();
        (back, echo, session)
    });
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/js/interop.mjs");
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new("node")
            .args(&flags)
            .arg(script)
            .arg(format!("ws://{addr}/"))
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("node timed out")
    .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "node failed: {stdout}\n{stderr}");
    assert!(stdout.contains("interop: ok"), "{stdout}\n{stderr}");
    let (back, echo, session) = server.await.unwrap();
    assert_eq!(back, b"hello from rust");
    drop(session);
    assert_eq!(echo.await.unwrap(), 5, "streams the JS client opened");
}
