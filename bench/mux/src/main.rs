//! wsmux benchmark: one WebSocket on loopback carrying N streams, against
//! (i) N separate plain WebSockets and (ii) yamux running on one WebSocket
//! through `wsmux::ByteStream`.
//!
//! `cargo run --release -p wsmux-bench [-- --quick]`
//!
//! * Bulk: N streams (1, 10, 100) each upload `TOTAL / N` bytes in 64 KiB
//!   writes; the server reads to EOF and answers one byte. Aggregate MB/s.
//! * Latency: C concurrent streams (1, 10) each doing sequential 64 B
//!   request/response round trips; p50 / p99 over all round trips.

use bytes::Bytes;
use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_util::compat::{FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};
use wsmux::{ByteStream, Config, Session, WsTransport};

const CHUNK: usize = 64 * 1024;
const MSG: usize = 64;

type BoxIo = Pin<Box<dyn AsyncReadWrite>>;
trait AsyncReadWrite: AsyncRead + AsyncWrite + Send {}
impl<T: AsyncRead + AsyncWrite + Send> AsyncReadWrite for T {}

type Opener = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = BoxIo> + Send>> + Send + Sync>;

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Wsmux,
    SeparateWs,
    Yamux,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Wsmux => "wsmux (1 WebSocket)",
            Kind::SeparateWs => "N separate WebSockets",
            Kind::Yamux => "yamux over 1 WebSocket",
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Work {
    /// Read this many bytes, answer one byte. (A plain WebSocket has no
    /// half-close, so the length is agreed instead of signalled by EOF.)
    Sink(usize),
    /// Echo fixed 64-byte messages until EOF.
    Echo,
}

async fn serve_stream<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, work: Work) {
    match work {
        Work::Sink(mut left) => {
            let mut buf = vec![0u8; CHUNK];
            while left > 0 {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => left -= n,
                }
            }
            let _ = s.write_all(b"k").await;
            let _ = s.flush().await;
            let mut b = [0u8; 1];
            let _ = s.read(&mut b).await; // until the client is done
        }
        Work::Echo => {
            let mut buf = [0u8; MSG];
            while s.read_exact(&mut buf).await.is_ok() {
                if s.write_all(&buf).await.is_err() || s.flush().await.is_err() {
                    break;
                }
            }
            let _ = s.shutdown().await;
        }
    }
}

async fn tcp_pair(listener: &TcpListener, addr: SocketAddr) -> (TcpStream, TcpStream) {
    let (c, s) = tokio::join!(TcpStream::connect(addr), listener.accept());
    let c = c.unwrap();
    let s = s.unwrap().0;
    c.set_nodelay(true).unwrap();
    s.set_nodelay(true).unwrap();
    (c, s)
}

async fn ws_pair(
    listener: &TcpListener,
    addr: SocketAddr,
) -> (WsTransport<TcpStream>, WsTransport<TcpStream>) {
    let (c, s) = tcp_pair(listener, addr).await;
    let host = addr.to_string();
    let (c, s) = tokio::join!(WsTransport::connect(c, &host, "/"), WsTransport::accept(s));
    (c.unwrap(), s.unwrap())
}

/// Sets up the transport under test and returns a function that opens one
/// client-side stream (server side runs `work` on each).
async fn setup(kind: Kind, work: Work, listener: Arc<TcpListener>) -> (Opener, Box<dyn Send>) {
    let addr = listener.local_addr().unwrap();
    match kind {
        Kind::Wsmux => {
            let (c, s) = ws_pair(&listener, addr).await;
            let server = Session::server(s, mux_config());
            let client = Arc::new(Session::client(c, mux_config()));
            let srv = tokio::spawn(async move {
                while let Ok(st) = server.accept().await {
                    tokio::spawn(serve_stream(st, work));
                }
            });
            let keep = client.clone();
            let opener: Opener = Arc::new(move || {
                let client = client.clone();
                Box::pin(async move { Box::pin(client.open().await.unwrap()) as BoxIo })
            });
            (opener, Box::new((keep, AbortOnDrop(srv))))
        }
        Kind::SeparateWs => {
            let opener: Opener = Arc::new(move || {
                let listener = listener.clone();
                Box::pin(async move {
                    let (c, s) = ws_pair(&listener, addr).await;
                    tokio::spawn(serve_stream(ByteStream::new(s), work));
                    Box::pin(ByteStream::new(c)) as BoxIo
                })
            });
            (opener, Box::new(()))
        }
        Kind::Yamux => {
            let (c, s) = ws_pair(&listener, addr).await;
            let mut server = yamux::Connection::new(
                ByteStream::new(s).compat(),
                yamux::Config::default(),
                yamux::Mode::Server,
            );
            let srv = tokio::spawn(async move {
                while let Some(Ok(st)) = poll_fn(|cx| server.poll_next_inbound(cx)).await {
                    tokio::spawn(serve_stream(st.compat(), work));
                }
            });
            let mut client = yamux::Connection::new(
                ByteStream::new(c).compat(),
                yamux::Config::default(),
                yamux::Mode::Client,
            );
            let (tx, mut rx) = mpsc::channel::<oneshot::Sender<yamux::Stream>>(128);
            // yamux wants one task to drive the connection and open streams.
            let drv = tokio::spawn(async move {
                let mut pending: Option<oneshot::Sender<yamux::Stream>> = None;
                poll_fn(|cx| loop {
                    if pending.is_none() {
                        if let Poll::Ready(Some(r)) = rx.poll_recv(cx) {
                            pending = Some(r);
                        }
                    }
                    if pending.is_some() {
                        match client.poll_new_outbound(cx) {
                            Poll::Ready(Ok(s)) => {
                                let _ = pending.take().unwrap().send(s);
                                continue;
                            }
                            Poll::Ready(Err(_)) => return Poll::Ready(()),
                            Poll::Pending => {}
                        }
                    }
                    match client.poll_next_inbound(cx) {
                        Poll::Ready(Some(Ok(_))) => continue,
                        Poll::Ready(_) => return Poll::Ready(()),
                        Poll::Pending => return Poll::Pending,
                    }
                })
                .await
            });
            let opener: Opener = Arc::new(move || {
                let tx = tx.clone();
                Box::pin(async move {
                    let (otx, orx) = oneshot::channel();
                    tx.send(otx).await.unwrap();
                    Box::pin(orx.await.unwrap().compat()) as BoxIo
                })
            });
            (opener, Box::new((AbortOnDrop(srv), AbortOnDrop(drv))))
        }
    }
}

/// `Config::default()`, with optional overrides from the environment for
/// experiments: `WSMUX_FRAME`, `WSMUX_WINDOW`, `WSMUX_QUEUE` (bytes).
fn mux_config() -> Config {
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<usize>().ok());
    let mut cfg = Config::default();
    if let Some(v) = env("WSMUX_FRAME") {
        cfg.max_frame_payload = v;
    }
    if let Some(v) = env("WSMUX_WINDOW") {
        cfg.initial_window = v as u32;
    }
    if let Some(v) = env("WSMUX_QUEUE") {
        cfg.max_send_queue = v;
    }
    cfg
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn bulk(kind: Kind, n: usize, total: usize, listener: Arc<TcpListener>) -> f64 {
    let per = total / n;
    let (open, keep) = setup(kind, Work::Sink(per), listener).await;
    let mut streams = Vec::new();
    for _ in 0..n {
        streams.push(open().await);
    }
    let data = Bytes::from(vec![0x5au8; CHUNK]);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for mut s in streams {
        let data = data.clone();
        tasks.push(tokio::spawn(async move {
            let mut left = per;
            while left > 0 {
                let k = left.min(CHUNK);
                s.write_all(&data[..k]).await.unwrap();
                left -= k;
            }
            s.flush().await.unwrap();
            let mut b = [0u8; 1];
            s.read_exact(&mut b).await.unwrap();
            s
        }));
    }
    let mut done = Vec::new();
    for t in tasks {
        done.push(t.await.unwrap());
    }
    let secs = start.elapsed().as_secs_f64();
    for mut s in done {
        let _ = s.shutdown().await;
    }
    drop(keep);
    (per * n) as f64 / secs / 1e6
}

async fn latency(kind: Kind, c: usize, iters: usize, listener: Arc<TcpListener>) -> (f64, f64) {
    let (open, keep) = setup(kind, Work::Echo, listener).await;
    let mut streams = Vec::new();
    for _ in 0..c {
        streams.push(open().await);
    }
    let mut tasks = Vec::new();
    for mut s in streams {
        tasks.push(tokio::spawn(async move {
            let msg = [7u8; MSG];
            let mut buf = [0u8; MSG];
            // Warm-up.
            for _ in 0..100 {
                s.write_all(&msg).await.unwrap();
                s.flush().await.unwrap();
                s.read_exact(&mut buf).await.unwrap();
            }
            let mut lat = Vec::with_capacity(iters);
            for _ in 0..iters {
                let t = Instant::now();
                s.write_all(&msg).await.unwrap();
                s.flush().await.unwrap();
                s.read_exact(&mut buf).await.unwrap();
                lat.push(t.elapsed());
            }
            s.shutdown().await.unwrap();
            lat
        }));
    }
    let mut all: Vec<Duration> = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    drop(keep);
    all.sort();
    let pct =
        |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)].as_secs_f64() * 1e6;
    (pct(0.50), pct(0.99))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    // `--threads N`: worker threads (default: one per core).
    let threads: Option<usize> = std::env::args()
        .skip_while(|a| a != "--threads")
        .nth(1)
        .and_then(|v| v.parse().ok());
    let rt = match threads {
        Some(0) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap(),
        Some(n) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build()
            .unwrap(),
        None => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap(),
    };
    rt.block_on(async move {
        let listener = Arc::new(TcpListener::bind("127.0.0.1:0").await.unwrap());
        let total = if quick { 32 << 20 } else { 256 << 20 };
        let reps = if quick { 1 } else { 5 };
        let iters = if quick { 500 } else { 10_000 };
        let kinds = [Kind::Wsmux, Kind::SeparateWs, Kind::Yamux];
        let only: Option<usize> = std::env::args()
            .skip_while(|a| a != "--bulk")
            .nth(1)
            .and_then(|v| v.parse().ok());
        if let Some(n) = only {
            let pick = std::env::var("BENCH_KIND").unwrap_or_default();
            for k in kinds {
                if !pick.is_empty() && !k.name().starts_with(pick.as_str()) {
                    continue;
                }
                let mut v = Vec::new();
                for _ in 0..reps {
                    v.push(bulk(k, n, total, listener.clone()).await);
                }
                println!("{}: {:.0} MB/s", k.name(), median(v));
            }
            return;
        }
        println!(
            "| workload | {} | {} | {} |",
            kinds[0].name(),
            kinds[1].name(),
            kinds[2].name()
        );
        println!("|---|---|---|---|");
        for n in [1usize, 10, 100] {
            // Kinds take turns within each repetition, so that background
            // load hits them alike; the median of the repetitions is shown.
            let mut results = vec![Vec::new(); kinds.len()];
            for _ in 0..reps {
                for (i, k) in kinds.iter().enumerate() {
                    results[i].push(bulk(*k, n, total, listener.clone()).await);
                }
            }
            let mut row = format!(
                "| bulk, {n} stream(s), {} MiB total (MB/s, median of {reps}) |",
                total >> 20
            );
            for r in results {
                row.push_str(&format!(" {:.0} |", median(r)));
            }
            println!("{row}");
        }
        for c in [1usize, 10] {
            let mut row = format!("| 64 B req/resp, {c} concurrent, p50 / p99 (µs) |");
            for k in kinds {
                let (p50, p99) = latency(k, c, iters, listener.clone()).await;
                row.push_str(&format!(" {p50:.0} / {p99:.0} |"));
            }
            println!("{row}");
        }
    });
}
