//! `per_identity_bandwidth` beyond WebSockets: a subject's `/mux` streams,
//! CONNECT tunnels, `/request`s and proxied HTTP requests are paced by the
//! one budget its connections share, each way. Each check moves the same bytes through
//! a gateway with the limit and through its twin without it (in-process,
//! loopback, ephemeral ports): the first cannot go faster than the cap
//! allows (a lower bound on the time, which load cannot break), the second
//! is not held back.
//!
//! Run it alone: `cargo test -p wsgate --test identity_pace`.

mod common;

use std::time::{Duration, Instant};

use bytes::BytesMut;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use wsgate::tunnel::proto::Status;

const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";
const AGENT_TOKEN: &str = "agent-secret";
/// `per_identity_bandwidth`: 64 KiB/s each way, as much again as burst.
const RATE: &str = "64KiB";
/// What each of a subject's two connections echoes: 256 KiB each way in
/// all.
const EACH: usize = 128 * 1024;
/// The least time the pair can take at the cap: each way, 256 KiB less the
/// burst (64 KiB) and the last chunk each connection may move before it
/// waits (16 KiB each), at 64 KiB/s, is 2.5 s; a little less for timer
/// rounding.
const PACED_AT_LEAST: Duration = Duration::from_millis(2400);
/// Without the limit the same bytes take milliseconds; this bound is only
/// there to show nothing paces them.
const FREE_WITHIN: Duration = Duration::from_secs(2);
/// The bound for any single wait.
const WAIT: Duration = Duration::from_secs(30);

fn token(subject: &str) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 300;
    encode(
        &Header::new(Algorithm::HS256),
        &serde_json::json!({"sub": subject, "exp": exp}),
        &EncodingKey::from_secret(SECRET).unwrap(),
    )
    .unwrap()
}

/// An HTTP backend that answers each request with its body, streamed back
/// as it comes (one request per connection).
async fn http_echo() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = BytesMut::new();
                let end = loop {
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                    if s.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                        return;
                    }
                };
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map_or(0, |v| v.trim().parse().unwrap());
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
                );
                let early = buf.split_off(end);
                if s.write_all(answer.as_bytes()).await.is_err()
                    || s.write_all(&early).await.is_err()
                {
                    return;
                }
                let (mut rd, mut wr) = s.split();
                let rest = (len - early.len()) as u64;
                let _ = tokio::io::copy(&mut (&mut rd).take(rest), &mut wr).await;
                let _ = wr.shutdown().await;
            });
        }
    });
    port
}

/// A gateway with (`paced`) or without `per_identity_bandwidth`: JWT
/// identities, `/mux` to the echo server, the forward proxy through one
/// agent, and `/api` proxied to `backend`.
struct Gw {
    server: wsgate::Server,
    addr: String,
    admin: String,
    dir: tempfile::TempDir,
}

async fn gateway(paced: bool, echo: u16, backend: u16) -> Gw {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret"), SECRET).unwrap();
    std::fs::write(dir.path().join("agents"), format!("site-a {AGENT_TOKEN}\n")).unwrap();
    let limit = if paced {
        format!("per_identity_bandwidth = \"{RATE}\"")
    } else {
        String::new()
    };
    let text = format!(
        r#"
workers = 1
[[listener]]
address = "127.0.0.1:0"
[admin]
address = "127.0.0.1:0"
[limits]
{limit}
[auth.token]
type = "jwt"
secret_file = "secret"
[tunnel]
agent_tokens = "agents"
mux_allow = ["tcp://127.0.0.1:{echo}"]
auth = ["token"]
[[route]]
path_prefix = "/api"
proxy = "http://127.0.0.1:{backend}"
auth = ["token"]
"#
    );
    let config = wsgate::config::parse("pace.toml", &text, dir.path()).unwrap();
    let server = wsgate::Server::start(config).await.unwrap();
    let addr = server.urls()[0].trim_start_matches("ws://").to_string();
    let admin = server.admin().unwrap().to_string();
    Gw {
        server,
        addr,
        admin,
        dir,
    }
}

/// `wsgate agent` (the binary) registered at `gw`, allowed to reach the
/// echo server; killed on drop.
struct Agent(std::process::Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the agent and waits (bounded) until the gateway lists it.
async fn agent(gw: &Gw, echo: u16, backend: u16) -> Agent {
    let token = gw.dir.path().join("agent-token");
    std::fs::write(&token, AGENT_TOKEN).unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_wsgate"))
        .args(["agent", "--server", &format!("ws://{}/agent", gw.addr)])
        .args([
            "--id",
            "site-a",
            "--allow",
            &format!("tcp://127.0.0.1:{echo}"),
        ])
        .args(["--allow", &format!("http://127.0.0.1:{backend}")])
        .args(["--pool", "1", "--token-file"])
        .arg(&token)
        .env("WSGATE_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("start wsgate agent");
    let agent = Agent(child);
    for _ in 0..500 {
        let (_, text) = request(&gw.admin, "GET /agents HTTP/1.1\r\nHost: x\r\n\r\n").await;
        if text.contains("\"connections\": 1") {
            return agent;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the agent did not register");
}

/// One request on a fresh connection, read to its end: status and text.
async fn request(addr: &str, head: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    let mut buf = vec![];
    tokio::time::timeout(WAIT, s.read_to_end(&mut buf))
        .await
        .expect("an answer in time")
        .unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    (text[9..12].parse().unwrap(), text)
}

/// Writes `n` bytes into `io` (then half-closes) while reading `n` back.
async fn echo_through<S: AsyncRead + AsyncWrite + Unpin>(io: S, n: usize) {
    let (mut rd, mut wr) = tokio::io::split(io);
    let send = async {
        wr.write_all(&vec![0x5a; n]).await.unwrap();
        wr.shutdown().await.unwrap();
    };
    let recv = async {
        let mut got = vec![0u8; n];
        rd.read_exact(&mut got).await.unwrap();
        assert!(got.iter().all(|b| *b == 0x5a));
    };
    tokio::time::timeout(WAIT, async { tokio::join!(send, recv) })
        .await
        .expect("the echo within the bound");
}

/// Runs two of `one` at once; how long the pair took.
async fn pair<F: std::future::Future<Output = ()>>(one: impl Fn() -> F) -> Duration {
    let t0 = Instant::now();
    tokio::join!(one(), one());
    t0.elapsed()
}

/// A `/mux` session of `subject`, and one stream of it to `dest`, open.
async fn mux_stream(addr: &str, subject: &str, dest: &str) -> (wsmux::Session, wsmux::Stream) {
    let auth = format!("Bearer {}", token(subject));
    let session = common::tunnel::mux(addr, &[("Authorization", &auth)]).await;
    let (st, reply) = common::tunnel::open(&session, dest).await;
    assert_eq!(reply.status, Status::Ok, "{reply:?}");
    (session, st)
}

/// Asserts that what `paced` moved took at least the cap's time, and that
/// its unpaced twin was not held back.
fn assert_paced(paced: bool, took: Duration, what: &str) {
    if paced {
        assert!(took >= PACED_AT_LEAST, "paced {what} took {took:?}");
    } else {
        assert!(took < FREE_WITHIN, "unpaced {what} took {took:?}");
    }
}

/// A CONNECT tunnel of `subject` to `dest`, its 200 read.
async fn connect(addr: &str, subject: &str, dest: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "CONNECT {dest} HTTP/1.1\r\nHost: {dest}\r\nAuthorization: Bearer {}\r\n\r\n",
        token(subject)
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut got = vec![];
    while !got.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        assert_eq!(s.read(&mut b).await.unwrap(), 1, "closed: {got:?}");
        got.push(b[0]);
    }
    assert!(
        got.starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
    s
}

/// POSTs `n` bytes to the echo backend as `subject` (at `target`, with
/// `extra` headers), reading the echo as it comes back.
async fn post_echo(addr: &str, subject: &str, target: &str, extra: &str, n: usize) {
    let s = TcpStream::connect(addr).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    let head = format!(
        "POST {target} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n{extra}\
         Content-Length: {n}\r\nConnection: close\r\n\r\n",
        token(subject)
    );
    let send = async {
        wr.write_all(head.as_bytes()).await.unwrap();
        wr.write_all(&vec![0x5a; n]).await.unwrap();
    };
    let recv = async {
        let mut got = vec![];
        rd.read_to_end(&mut got).await.unwrap();
        got
    };
    let (_, got) = tokio::time::timeout(WAIT, async { tokio::join!(send, recv) })
        .await
        .expect("the echo within the bound");
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.starts_with("HTTP/1.1 200"),
        "{}",
        &text[..text.len().min(200)]
    );
    let body = got.len() - text.find("\r\n\r\n").unwrap() - 4;
    assert_eq!(body, n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mux_streams_of_a_subject_share_its_bandwidth() {
    let (echo, backend) = (common::tcp_echo().await, http_echo().await);
    let dest = format!("tcp://127.0.0.1:{echo}");
    for paced in [false, true] {
        let gw = gateway(paced, echo, backend).await;
        // Two sessions (two WebSockets) of ada, one stream each.
        let took = pair(|| async {
            let (_session, st) = mux_stream(&gw.addr, "ada", &dest).await;
            echo_through(st, EACH).await;
        })
        .await;
        assert_paced(paced, took, "/mux streams");
        gw.server.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_tunnels_and_relayed_requests_of_a_subject_share_its_bandwidth() {
    let (echo, backend) = (common::tcp_echo().await, http_echo().await);
    let dest = format!("127.0.0.1:{echo}");
    for paced in [false, true] {
        let gw = gateway(paced, echo, backend).await;
        let _agent = agent(&gw, echo, backend).await;
        let took = pair(|| async {
            let s = connect(&gw.addr, "ada", &dest).await;
            echo_through(s, EACH).await;
        })
        .await;
        assert_paced(paced, took, "CONNECT tunnels");
        // `/request` (wsp's relay) through the same agent: both bodies.
        let relayed = format!("X-PROXY-DESTINATION: http://127.0.0.1:{backend}/echo\r\n");
        let took = pair(|| post_echo(&gw.addr, "ada", "/request", &relayed, EACH)).await;
        assert_paced(paced, took, "/request");
        gw.server.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxied_requests_of_a_subject_share_its_bandwidth() {
    let (echo, backend) = (common::tcp_echo().await, http_echo().await);
    for paced in [false, true] {
        let gw = gateway(paced, echo, backend).await;
        let took = pair(|| post_echo(&gw.addr, "ada", "/api/echo", "", EACH)).await;
        assert_paced(paced, took, "requests");
        gw.server.stop().await;
    }
}
