//! permessage-deflate on `/mux`: wsmux over a compressed WebSocket, the
//! Rust `WsTransport` as the client, against the real binary. Bridge routes
//! and `echo:` are tested against foreign peers in e2e/tests/test_deflate.py.

mod common;

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use wsgate::tunnel::proto::{self, Reply, Status};

/// A TCP stream that counts the bytes it reads (the compressed wire).
struct Counted(TcpStream, Arc<AtomicU64>);

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.0).poll_read(cx, buf);
        self.1
            .fetch_add((buf.filled().len() - before) as u64, Ordering::Relaxed);
        r
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        b: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, b)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// A TCP server that writes `payload` to each connection, then closes.
async fn blaster(payload: Arc<Vec<u8>>) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let p = payload.clone();
            tokio::spawn(async move {
                let _ = s.write_all(&p).await;
                let _ = s.shutdown().await;
            });
        }
    });
    port
}

async fn mux_session(
    addr: &str,
    deflate: Option<&wsframe::deflate::Config>,
) -> (wsmux::Session, Arc<AtomicU64>) {
    let wire = Arc::new(AtomicU64::new(0));
    let s = Counted(TcpStream::connect(addr).await.unwrap(), wire.clone());
    let t = wsmux::WsTransport::connect_deflate(s, "gw", "/mux", deflate)
        .await
        .unwrap();
    (wsmux::Session::client(t, wsmux::Config::default()), wire)
}

/// Opens a stream to `dest`, reads everything it sends.
async fn fetch(mux: &wsmux::Session, dest: &str) -> Vec<u8> {
    let mut st = mux.open().await.unwrap();
    let mut req = BytesMut::new();
    proto::encode_open(dest, &mut req);
    st.write_all(&req).await.unwrap();
    let mut buf = BytesMut::new();
    let reply = loop {
        if let Some(r) = Reply::decode(&mut buf).unwrap() {
            break r;
        }
        assert!(st.read_buf(&mut buf).await.unwrap() > 0);
    };
    assert_eq!(reply.status, Status::Ok);
    let mut all = buf.to_vec();
    st.read_to_end(&mut all).await.unwrap();
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mux_sessions_are_compressed_when_both_ends_agree() {
    let json: Vec<u8> = (0..20_000)
        .flat_map(|i| {
            format!("{{\"id\":{i},\"user\":\"user{}\",\"ok\":true}}\n", i % 17).into_bytes()
        })
        .collect();
    let payload = Arc::new(json);
    let port = blaster(payload.clone()).await;
    let gw = common::Gateway::start(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--mux-allow",
        "tcp://127.0.0.1:*",
        "--deflate-config",
        "server_max_window_bits=12,min_size=32",
    ]);
    let dest = format!("tcp://127.0.0.1:{port}");
    let offer = wsframe::deflate::Config::default();

    let (mux, wire) = mux_session(&gw.addr(), Some(&offer)).await;
    assert_eq!(fetch(&mux, &dest).await, *payload);
    let compressed = wire.load(Ordering::Relaxed);

    let (plain_mux, plain_wire) = mux_session(&gw.addr(), None).await;
    assert_eq!(fetch(&plain_mux, &dest).await, *payload);
    let plain = plain_wire.load(Ordering::Relaxed);
    assert!(plain > payload.len() as u64);
    // JSON lines compress several times over, even in 4 KiB windows.
    assert!(
        compressed * 4 < plain,
        "{compressed} bytes read compressed, {plain} plain, {} payload",
        payload.len()
    );
}
