//! permessage-deflate on `/mux`: wsmux over a compressed WebSocket, the
//! Rust `WsTransport` as the client, against the real binary; and a deflate
//! bomb on `/mux` and `echo:`. Bridge routes and `echo:` are tested against
//! foreign peers in e2e/tests/test_deflate.py.

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

/// A field of `/proc/PID/status`, in KiB.
fn status_kib(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Opens a WebSocket offering permessage-deflate; the bytes read past the
/// 101.
async fn open_deflate(addr: &str, path: &str, protocol: Option<&str>) -> (TcpStream, BytesMut) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let key = wsframe::handshake::generate_key();
    let protocols: Vec<&str> = protocol.into_iter().collect();
    let req = wsframe::handshake::client_request(
        "gw",
        path,
        &key,
        &protocols,
        &[("Sec-WebSocket-Extensions", "permessage-deflate")],
    );
    s.write_all(&req).await.unwrap();
    let mut buf = BytesMut::new();
    let resp = loop {
        assert!(
            s.read_buf(&mut buf).await.unwrap() > 0,
            "closed before the 101"
        );
        if let Some(r) = wsframe::handshake::parse_response(&buf).unwrap() {
            break r;
        }
    };
    assert_eq!(resp.status, 101, "{path}");
    assert_eq!(
        resp.header("sec-websocket-extensions"),
        Some("permessage-deflate"),
        "{path}"
    );
    let rest = buf.split_off(resp.head_len);
    (s, rest)
}

/// Reads frames until the gateway's Close; its code.
async fn close_code(s: &mut TcpStream, mut buf: BytesMut) -> u16 {
    let mut dec = wsframe::Decoder::new(
        wsframe::Role::Client,
        wsframe::DecoderConfig {
            allowed_rsv: wsframe::deflate::RSV1,
            max_message_size: 0,
            ..Default::default()
        },
    );
    loop {
        while let Some(f) = dec.next(&mut buf).unwrap() {
            if let wsframe::Frame::Control {
                opcode: wsframe::OpCode::Close,
                payload,
            } = f
            {
                let (code, reason) = wsframe::parse_close_payload(&payload).unwrap();
                eprintln!("close {code} {reason:?}");
                return code;
            }
        }
        assert!(
            s.read_buf(&mut buf).await.unwrap() > 0,
            "closed without a Close"
        );
    }
}

/// A message of `n` zero bytes would inflate from a frame of about n/1000:
/// on `echo:` and on `/mux` it is closed with 1009 at the limit (4 MiB on
/// `echo:`, wsmux's 1 MiB on `/mux`), and the gateway's peak memory grows
/// by about the limit, not by what the frame inflates to, nor by a buffer
/// grown by doubling (2 × the limit on `echo:` before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deflate_bomb_is_1009_on_echo_and_mux_and_costs_about_the_limit() {
    let gw = common::Gateway::start(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--to",
        "echo:",
        "--deflate",
        "--max-message-size",
        "4MiB",
        "--mux-allow",
        "tcp://127.0.0.1:*",
    ]);
    let pid = gw.pid();
    let mut deflater = wsframe::deflate::Deflater::new(9, 15, true, 0, wsframe::Role::Client);
    let mut bomb = BytesMut::new();
    deflater.encode(&mut bomb, wsframe::OpCode::Binary, &vec![0u8; 64 << 20]);
    assert!(bomb.len() < 300_000, "{}", bomb.len());
    let routes = [
        ("/echo", None, 4u64 << 20),
        ("/mux", Some("wsmux.v1"), 1 << 20),
    ];
    for (path, protocol, limit) in routes {
        let (mut s, rest) = open_deflate(&gw.addr(), path, protocol).await;
        // The peak from here on: writing 5 to clear_refs resets VmHWM to
        // the current RSS (Linux 4.0+); where it cannot, the peak so far.
        let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
        let before = status_kib(pid, "VmRSS").max(status_kib(pid, "VmHWM"));
        s.write_all(&bomb).await.unwrap();
        let code = close_code(&mut s, rest).await;
        let grew = status_kib(pid, "VmHWM").saturating_sub(before);
        eprintln!(
            "{path}: a {} B frame of {} MiB: close {code}, peak RSS +{grew} KiB (limit {} KiB)",
            bomb.len(),
            64,
            limit / 1024
        );
        assert_eq!(code, 1009, "{path}");
        // The limit's worth of output, plus the frame and a few chunks.
        assert!(
            grew * 1024 < limit * 3 / 2 + (1 << 20),
            "{path}: +{grew} KiB"
        );
    }
}
