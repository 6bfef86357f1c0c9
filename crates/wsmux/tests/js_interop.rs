//! The TypeScript implementation of the protocol, the `wsgate-client`
//! package (`clients/ts`, built to `clients/ts/dist`), talks to this crate
//! over a real loopback WebSocket, each side opening streams:
//! `clients/ts/test/interop-rust.mjs` opens 5 echo streams (200–510 KB,
//! flow control both ways, FIN each way) and one it resets with code 7,
//! and accepts the streams this side opens, echoing them back. Skipped,
//! with a message, only when Node.js with a WebSocket client or the built
//! package is missing (`scripts/install-test-deps.sh` builds it).

use std::io::ErrorKind;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use wsmux::{Config, Session, StreamReset, WsTransport};

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

fn package_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../clients/ts")
}

fn pattern(seed: u32, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2654435761);
    (0..len)
        .map(|_| {
            x = x.wrapping_mul(1103515245).wrapping_add(12345);
            (x >> 24) as u8
        })
        .collect()
}

/// Streams this side opens: their sizes (the first is 15 bytes of text).
const RUST_STREAMS: [usize; 3] = [15, 300_000, 1_000_000];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typescript_package_interoperates_both_ways() {
    let Some(flags) = node_with_websocket() else {
        eprintln!("SKIPPED: no Node.js with a WebSocket client on PATH (install Node >= 20)");
        return;
    };
    let pkg = package_dir();
    if !pkg.join("dist/index.js").is_file() {
        eprintln!(
            "SKIPPED: {} is not built: run scripts/install-test-deps.sh (or `npm ci && npm run build` there)",
            pkg.display()
        );
        return;
    }
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let session = Arc::new(Session::server(
            WsTransport::accept(tcp).await.unwrap(),
            Config::default(),
        ));
        // Streams opened by the Rust side, written before the JS side accepts.
        let mut ours = Vec::new();
        for (i, &len) in RUST_STREAMS.iter().enumerate() {
            let data = if i == 0 {
                b"hello from rust".to_vec()
            } else {
                pattern(100 + i as u32, len)
            };
            let mut s = session.open().await.unwrap();
            ours.push(tokio::spawn(async move {
                let (mut r, mut w) = tokio::io::split(&mut s);
                let write = async {
                    w.write_all(&data).await.unwrap();
                    w.shutdown().await.unwrap();
                };
                let mut back = Vec::new();
                let read = r.read_to_end(&mut back);
                let ((), n) = tokio::join!(write, read);
                n.unwrap();
                assert!(
                    back == data,
                    "stream {}: echo of {} bytes differs",
                    i,
                    data.len()
                );
                back.len()
            }));
        }
        // Echo every stream the JS side opens; note the reset codes seen.
        let srv = session.clone();
        let echo = tokio::spawn(async move {
            let mut tasks = Vec::new();
            while let Ok(mut s) = srv.accept().await {
                tasks.push(tokio::spawn(async move {
                    let (mut r, mut w) = tokio::io::split(&mut s);
                    match tokio::io::copy(&mut r, &mut w).await {
                        Ok(_) => {
                            w.shutdown().await.unwrap();
                            None
                        }
                        Err(e) => {
                            assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}");
                            Some(
                                e.get_ref()
                                    .unwrap()
                                    .downcast_ref::<StreamReset>()
                                    .unwrap()
                                    .code,
                            )
                        }
                    }
                }));
            }
            let mut resets = Vec::new();
            for t in tasks {
                resets.push(t.await.unwrap());
            }
            resets
        });
        let mut sizes = Vec::new();
        for t in ours {
            sizes.push(t.await.unwrap());
        }
        (sizes, echo, session)
    });
    let script = pkg.join("test/interop-rust.mjs");
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new("node")
            .args(&flags)
            .arg(&script)
            .arg(format!("ws://{addr}/"))
            .arg(RUST_STREAMS.len().to_string())
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
    let (sizes, echo, session) = server.await.unwrap();
    assert_eq!(
        sizes, RUST_STREAMS,
        "streams the Rust side opened came back whole"
    );
    // The JS side sent GOAWAY and closed: accept() ends, the echo tasks finish.
    let mut resets = echo.await.unwrap();
    drop(session);
    resets.sort();
    assert_eq!(
        resets,
        [None, None, None, None, None, Some(7)],
        "streams the JS client opened: 5 echoed, 1 reset with code 7"
    );
}
