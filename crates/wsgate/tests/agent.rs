//! `wsgate agent` and `wsgate connect`, the real binary, against minimal
//! fake gateways written here: a registration endpoint that checks the
//! headers of `docs/tunnel.md` §1 and runs a wsmux server session (it opens
//! streams with open requests and reads the agent's replies), and a `/mux`
//! endpoint that answers open requests and echoes. Loopback, ephemeral
//! ports; every wait is bounded.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;
use wsgate::tunnel::proto::{self, Reply, Status};
use wsmux::{Session, Stream, WsTransport};

/// The bound for any single wait in these tests.
const WAIT: Duration = Duration::from_secs(15);

async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, f)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

// ---------------------------------------------------------------------------
// The binary.

/// A `wsgate` process: stdout lines on a channel, stderr collected (and
/// echoed for the test log), killed on drop.
struct Proc {
    child: Option<Child>,
    lines: mpsc::UnboundedReceiver<String>,
    stderr: Arc<Mutex<String>>,
    stderr_lines: mpsc::UnboundedReceiver<String>,
    stderr_done: Option<std::thread::JoinHandle<()>>,
}

impl Proc {
    fn start(args: &[&str]) -> Proc {
        Proc::spawn(args, Stdio::null(), true)
    }

    fn spawn(args: &[&str], stdin: Stdio, read_stdout: bool) -> Proc {
        let mut child = Command::new(env!("CARGO_BIN_EXE_wsgate"))
            .args(args)
            .env("WSGATE_LOG", "info")
            .env_remove("RUST_LOG")
            .env_remove("WSGATE_TOKEN")
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start wsgate");
        let (tx, lines) = mpsc::unbounded_channel();
        if read_stdout {
            let out = child.stdout.take().unwrap();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        let stderr = Arc::new(Mutex::new(String::new()));
        let err = child.stderr.take().unwrap();
        let sink = stderr.clone();
        let (err_tx, stderr_lines) = mpsc::unbounded_channel();
        let stderr_done = std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                eprintln!("[wsgate] {line}");
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
                let _ = err_tx.send(line);
            }
        });
        Proc {
            child: Some(child),
            lines,
            stderr,
            stderr_lines,
            stderr_done: Some(stderr_done),
        }
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    async fn line(&mut self) -> String {
        within("a line on stdout", self.lines.recv())
            .await
            .expect("wsgate closed its stdout")
    }

    fn signal(&self, sig: i32) {
        assert_eq!(unsafe { libc::kill(self.pid(), sig) }, 0);
    }

    /// Waits (bounded) for the process to exit; its stderr is complete then.
    async fn exit(&mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        let waiter = tokio::task::spawn_blocking(move || {
            let deadline = Instant::now() + WAIT;
            loop {
                if let Some(st) = child.try_wait().unwrap() {
                    return Ok(st);
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    return Err(child.wait().unwrap());
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        let status = waiter
            .await
            .unwrap()
            .unwrap_or_else(|st| panic!("wsgate did not exit in time (killed: {st})"));
        if let Some(t) = self.stderr_done.take() {
            t.join().unwrap();
        }
        status
    }

    /// Waits (bounded) for a line on stderr that contains `needle`.
    async fn stderr_line(&mut self, needle: &str) -> String {
        within(needle, async {
            loop {
                let line = self.stderr_lines.recv().await.expect("stderr closed");
                if line.contains(needle) {
                    return line;
                }
            }
        })
        .await
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn token_file(dir: &tempfile::TempDir, token: &str) -> String {
    let path = dir.path().join("token.txt");
    std::fs::write(&path, token).unwrap();
    path.to_str().unwrap().to_string()
}

// ---------------------------------------------------------------------------
// The fake gateway.

/// An HTTP request head: the path and the headers.
struct Head {
    path: String,
    headers: Vec<(String, String)>,
}

impl Head {
    fn get(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Reads an upgrade request head; returns it with the bytes past it.
async fn read_head<S: AsyncRead + Unpin>(tcp: &mut S) -> (Head, BytesMut) {
    let mut buf = BytesMut::new();
    loop {
        assert!(
            tcp.read_buf(&mut buf).await.unwrap() > 0,
            "closed in the head"
        );
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        if let httparse::Status::Complete(n) = req.parse(&buf).unwrap() {
            let head = Head {
                path: req.path.unwrap().to_string(),
                headers: req
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_string(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect(),
            };
            return (head, buf.split_off(n));
        }
    }
}

/// Answers 101 with `protocol` and runs a wsmux server session.
async fn upgrade<S>(mut tcp: S, head: &Head, protocol: &str, rest: &[u8]) -> Session
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let key = head.get("sec-websocket-key").unwrap();
    let offered = head.get("sec-websocket-protocol").unwrap_or_default();
    assert!(
        offered.split(',').any(|p| p.trim() == protocol),
        "{protocol} not offered: {offered:?}"
    );
    let resp = wsframe::handshake::server_response(key.as_bytes(), Some(protocol));
    tcp.write_all(&resp).await.unwrap();
    let ws = WsTransport::from_raw(
        tcp,
        wsframe::Role::Server,
        WsTransport::<S>::default_config(),
        rest,
    );
    Session::server(ws, wsmux::Config::default())
}

struct FakeGateway {
    listener: TcpListener,
}

/// One agent connection as the gateway sees it.
struct Registration {
    head: Head,
    session: Session,
}

impl FakeGateway {
    async fn bind() -> FakeGateway {
        FakeGateway {
            listener: TcpListener::bind("127.0.0.1:0").await.unwrap(),
        }
    }

    fn addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap()
    }

    fn url(&self) -> String {
        format!("ws://{}/agent", self.addr())
    }

    /// Accepts the next registration and checks its headers.
    async fn register(&self) -> Registration {
        let (mut tcp, _) = within("a registration", self.listener.accept())
            .await
            .unwrap();
        let (head, rest) = read_head(&mut tcp).await;
        assert_eq!(head.path, "/agent");
        assert_eq!(head.get("authorization"), Some("Bearer secret-token"));
        assert_eq!(head.get(proto::ID_HEADER), Some("site-a"));
        let session = upgrade(tcp, &head, proto::AGENT_PROTOCOL, &rest).await;
        Registration { head, session }
    }
}

/// Opens a stream to `dest` and reads the agent's reply.
async fn open(session: &Session, dest: &str) -> (Stream, Reply) {
    let mut s = session.open().await.unwrap();
    let mut wire = BytesMut::new();
    proto::encode_open(dest, &mut wire);
    s.write_all(&wire).await.unwrap();
    let reply = read_reply(&mut s).await;
    (s, reply)
}

async fn read_reply(s: &mut Stream) -> Reply {
    let mut buf = BytesMut::new();
    within("the reply", async {
        loop {
            if let Some(r) = Reply::decode(&mut buf).unwrap() {
                assert!(buf.is_empty(), "bytes after the reply");
                return r;
            }
            assert!(s.read_buf(&mut buf).await.unwrap() > 0, "no reply");
        }
    })
    .await
}

/// The reset code a stream read fails with.
async fn reset_code(s: &mut Stream) -> u32 {
    let mut buf = [0u8; 64];
    let e = within("the reset", s.read(&mut buf))
        .await
        .expect_err("expected a reset");
    e.get_ref()
        .and_then(|e| e.downcast_ref::<wsmux::StreamReset>())
        .unwrap_or_else(|| panic!("not a reset: {e}"))
        .code
}

/// A TCP server that echoes each connection until its EOF, then closes.
async fn tcp_echo() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut data = Vec::new();
                c.read_to_end(&mut data).await.unwrap();
                c.write_all(&data).await.unwrap();
                c.shutdown().await.unwrap();
            });
        }
    });
    addr
}

/// A UDP server that sends every datagram back.
async fn udp_echo() -> SocketAddr {
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = s.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = s.recv_from(&mut buf).await {
            let _ = s.send_to(&buf[..n], from).await;
        }
    });
    addr
}

/// Starts `wsgate agent` registering at `gw` with `extra` arguments.
fn agent(gw: &FakeGateway, dir: &tempfile::TempDir, extra: &[&str]) -> Proc {
    let token = token_file(dir, "  secret-token\n");
    let url = gw.url();
    let mut args = vec![
        "agent",
        "--server",
        &url,
        "--id",
        "site-a",
        "--token-file",
        &token,
    ];
    args.extend_from_slice(extra);
    Proc::start(&args)
}

async fn echo_through(session: &Session, dest: &str, data: &[u8]) -> Vec<u8> {
    let (mut s, reply) = open(session, dest).await;
    assert_eq!(reply, Reply::ok(), "{dest}");
    s.write_all(data).await.unwrap();
    s.shutdown().await.unwrap(); // half-close: the echo server sees EOF
    let mut back = Vec::new();
    within("the echo", s.read_to_end(&mut back)).await.unwrap();
    back
}

// ---------------------------------------------------------------------------
// The agent.

#[tokio::test]
async fn the_agent_registers_and_relays_tcp_with_half_close() {
    let gw = FakeGateway::bind().await;
    let dir = tempfile::tempdir().unwrap();
    let echo = tcp_echo().await;
    let mut a = agent(
        &gw,
        &dir,
        &[
            "--pool",
            "1",
            "--allow",
            "tcp://127.0.0.0/8:*",
            "--allow",
            "udp://10.0.0.2:53",
        ],
    );
    let reg = gw.register().await;
    assert_eq!(
        a.line().await,
        format!("agent site-a registered at {}", gw.url())
    );
    assert_eq!(
        reg.head.get(proto::ALLOW_HEADER),
        Some("tcp://127.0.0.0/8:*, udp://10.0.0.2:53")
    );
    let data: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
    let back = echo_through(&reg.session, &format!("tcp://{echo}"), &data).await;
    assert_eq!(back, data);
    // http:// destinations are TCP too, and a tcp pattern covers them.
    let back = echo_through(&reg.session, &format!("http://{echo}"), b"GET /").await;
    assert_eq!(back, b"GET /");
}

#[tokio::test]
async fn the_agent_refuses_what_its_allow_list_does_not_cover() {
    let gw = FakeGateway::bind().await;
    let dir = tempfile::tempdir().unwrap();
    let echo = tcp_echo().await;
    let _a = agent(
        &gw,
        &dir,
        &[
            "--pool",
            "1",
            "--allow",
            &format!("tcp://127.0.0.1:{}", echo.port()),
        ],
    );
    let reg = gw.register().await;
    for dest in [
        format!("tcp://127.0.0.1:{}", echo.port() ^ 1),
        format!("udp://127.0.0.1:{}", echo.port()),
        format!("tcp://127.0.0.2:{}", echo.port()),
    ] {
        let (mut s, reply) = open(&reg.session, &dest).await;
        assert_eq!(reply.status, Status::NotAllowed, "{dest}");
        assert!(reply.message.contains(&dest), "{dest}: {}", reply.message);
        // The agent ends the stream after the refusal.
        let mut rest = Vec::new();
        within("the FIN", s.read_to_end(&mut rest)).await.unwrap();
        assert!(rest.is_empty());
    }
    // An address pattern covers a name by the address it resolves to.
    let back = echo_through(
        &reg.session,
        &format!("tcp://localhost:{}", echo.port()),
        b"by name",
    )
    .await;
    assert_eq!(back, b"by name");
}

#[tokio::test]
async fn an_unreachable_port_is_answered_unreachable() {
    let gw = FakeGateway::bind().await;
    let dir = tempfile::tempdir().unwrap();
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let _a = agent(&gw, &dir, &["--pool", "1", "--allow", "tcp://127.0.0.1:*"]);
    let reg = gw.register().await;
    let (_s, reply) = open(&reg.session, &format!("tcp://{closed}")).await;
    assert_eq!(reply.status, Status::Unreachable);
    assert!(
        reply.message.to_lowercase().contains("refused"),
        "{}",
        reply.message
    );
}

#[tokio::test]
async fn a_garbage_open_request_resets_its_stream_and_the_session_goes_on() {
    let gw = FakeGateway::bind().await;
    let dir = tempfile::tempdir().unwrap();
    let echo = tcp_echo().await;
    let _a = agent(&gw, &dir, &["--pool", "1", "--allow", "tcp://127.0.0.1:*"]);
    let reg = gw.register().await;
    for garbage in [
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        &[0x57, 9, 0, 1, b'x'],
        &[
            0x57, 1, 0, 9, b't', b'c', b'p', b':', b'/', b'/', b'h', b':', b'x',
        ],
        &[0x57, 1, 0, 2, 0xff, 0xfe],
    ] {
        let mut s = reg.session.open().await.unwrap();
        s.write_all(garbage).await.unwrap();
        assert_eq!(
            reset_code(&mut s).await,
            proto::RESET_BAD_OPEN,
            "{garbage:?}"
        );
        // The next stream on the same session works.
        let back = echo_through(&reg.session, &format!("tcp://{echo}"), b"still up").await;
        assert_eq!(back, b"still up");
    }
}

#[tokio::test]
async fn udp_datagrams_go_through_a_stream_framed() {
    let gw = FakeGateway::bind().await;
    let dir = tempfile::tempdir().unwrap();
    let echo = udp_echo().await;
    let _a = agent(&gw, &dir, &["--pool", "1", "--allow", "udp://127.0.0.1:*"]);
    let reg = gw.register().await;
    let (mut s, reply) = open(&reg.session, &format!("udp://{echo}")).await;
    assert_eq!(reply, Reply::ok());
    let mut wire = BytesMut::new();
    for d in [&b"query one"[..], b"", &[7u8; 1200]] {
        proto::encode_datagram(d, &mut wire).unwrap();
    }
    s.write_all(&wire).await.unwrap();
    let mut buf = BytesMut::new();
    let mut got = vec![];
    within("three echoed datagrams", async {
        while got.len() < 3 {
            while let Some(d) = proto::decode_datagram(&mut buf) {
                got.push(d.to_vec());
            }
            if got.len() < 3 {
                assert!(s.read_buf(&mut buf).await.unwrap() > 0);
            }
        }
    })
    .await;
    assert_eq!(got, [b"query one".to_vec(), vec![], vec![7u8; 1200]]);
    // FIN ends the flow: the agent answers with its own.
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    within("the agent's FIN", s.read_to_end(&mut rest))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_pool_of_two_registers_twice() {
    let gw = FakeGateway::bind().await;
    let dir = tempfile::tempdir().unwrap();
    let echo = tcp_echo().await;
    let mut a = agent(&gw, &dir, &["--pool", "2", "--allow", "tcp://127.0.0.1:*"]);
    let r1 = gw.register().await;
    let r2 = gw.register().await;
    assert!(a.line().await.starts_with("agent site-a registered at "));
    for r in [&r1, &r2] {
        let back = echo_through(&r.session, &format!("tcp://{echo}"), b"each").await;
        assert_eq!(back, b"each");
    }
}

#[tokio::test]
async fn with_several_servers_the_pool_spreads_moves_at_once_and_spreads_again() {
    let (ga, gb) = (FakeGateway::bind().await, FakeGateway::bind().await);
    let dir = tempfile::tempdir().unwrap();
    let echo = tcp_echo().await;
    let token = token_file(&dir, "secret-token");
    let (ua, ub) = (ga.url(), gb.url());
    let _a = Proc::start(&[
        "agent",
        "--server",
        &ua,
        "--server",
        &ub,
        "--id",
        "site-a",
        "--token-file",
        &token,
        "--pool",
        "2",
        "--allow",
        "tcp://127.0.0.1:*",
    ]);
    // One connection at each server.
    let ra = ga.register().await;
    let rb = gb.register().await;
    // Server a goes away: its slot registers at b at once (no backoff,
    // whose first delay is at least 1 s).
    let lost = std::time::Instant::now();
    drop(ra);
    let rb2 = gb.register().await;
    assert!(
        lost.elapsed() < Duration::from_millis(900),
        "moved after {:?}",
        lost.elapsed()
    );
    for r in [&rb, &rb2] {
        let back = echo_through(&r.session, &format!("tcp://{echo}"), b"both").await;
        assert_eq!(back, b"both");
    }
    // Server a accepts again: within the rebalancing period one of the two
    // connections at b moves back to a (GOAWAY on the one it leaves).
    let back_at_a = ga.register().await;
    let back = echo_through(&back_at_a.session, &format!("tcp://{echo}"), b"spread").await;
    assert_eq!(back, b"spread");
}

#[tokio::test]
async fn the_agent_dials_again_when_the_gateway_closes_the_websocket() {
    let gw = FakeGateway::bind().await;
    let dir = tempfile::tempdir().unwrap();
    let echo = tcp_echo().await;
    let _a = agent(&gw, &dir, &["--pool", "1", "--allow", "tcp://127.0.0.1:*"]);
    let first = gw.register().await;
    drop(first); // GOAWAY and close, as a gateway going away does
    let second = gw.register().await;
    let back = echo_through(&second.session, &format!("tcp://{echo}"), b"again").await;
    assert_eq!(back, b"again");
}

#[tokio::test]
async fn a_silent_gateway_is_declared_dead_and_the_agent_dials_again() {
    let gw = FakeGateway::bind().await;
    let dir = tempfile::tempdir().unwrap();
    let mut a = agent(
        &gw,
        &dir,
        &[
            "--pool",
            "1",
            "--keepalive",
            "300ms",
            "--allow",
            "tcp://127.0.0.1:*",
        ],
    );
    // Answer the upgrade, then never read or write again: a frozen path.
    let (mut tcp, _) = within("a registration", gw.listener.accept())
        .await
        .unwrap();
    let (head, _) = read_head(&mut tcp).await;
    let key = head.get("sec-websocket-key").unwrap();
    tcp.write_all(&wsframe::handshake::server_response(
        key.as_bytes(),
        Some(proto::AGENT_PROTOCOL),
    ))
    .await
    .unwrap();
    let frozen_at = Instant::now();
    // Two intervals to notice (the session fails: the connection is lost),
    // then the first backoff delay (1 to 1.5 s).
    a.stderr_line("connection 1/1 lost").await;
    let again = gw.register().await;
    let took = frozen_at.elapsed();
    assert!(took >= Duration::from_millis(600), "{took:?}");
    assert!(took < Duration::from_secs(8), "{took:?}");
    drop((tcp, again));
}

#[tokio::test]
async fn sigterm_sends_goaway_lets_open_streams_finish_and_exits_0() {
    let gw = FakeGateway::bind().await;
    let dir = tempfile::tempdir().unwrap();
    let echo = tcp_echo().await;
    let mut a = agent(&gw, &dir, &["--pool", "1", "--allow", "tcp://127.0.0.1:*"]);
    let reg = gw.register().await;
    a.line().await;
    let (mut s, reply) = open(&reg.session, &format!("tcp://{echo}")).await;
    assert_eq!(reply, Reply::ok());
    s.write_all(b"before").await.unwrap();
    a.signal(libc::SIGTERM);
    // The agent's GOAWAY: the gateway may open no more streams here.
    let e = within("the GOAWAY", reg.session.accept())
        .await
        .expect_err("no stream expected");
    assert!(matches!(e, wsmux::Error::PeerGoAway), "{e}");
    assert!(matches!(
        reg.session.open().await,
        Err(wsmux::Error::PeerGoAway)
    ));
    // The open stream still works to its end.
    s.write_all(b" and after").await.unwrap();
    s.shutdown().await.unwrap();
    let mut back = Vec::new();
    within("the echo", s.read_to_end(&mut back)).await.unwrap();
    assert_eq!(back, b"before and after");
    let status = a.exit().await;
    assert_eq!(status.code(), Some(0), "{}", a.stderr());
}

#[tokio::test]
async fn the_drain_is_bounded_a_stream_that_never_ends_fails_and_the_agent_exits_0() {
    let gw = FakeGateway::bind().await;
    let dir = tempfile::tempdir().unwrap();
    let echo = tcp_echo().await;
    let mut a = agent(
        &gw,
        &dir,
        &[
            "--pool",
            "1",
            "--drain",
            "300ms",
            "--allow",
            "tcp://127.0.0.1:*",
        ],
    );
    let reg = gw.register().await;
    let (mut s, reply) = open(&reg.session, &format!("tcp://{echo}")).await;
    assert_eq!(reply, Reply::ok());
    s.write_all(b"never finished").await.unwrap();
    let t = Instant::now();
    a.signal(libc::SIGTERM);
    let status = a.exit().await;
    assert_eq!(status.code(), Some(0), "{}", a.stderr());
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "{:?}",
        t.elapsed()
    );
    // The stream did not end cleanly: it fails instead of reading EOF.
    let mut rest = Vec::new();
    let r = within("the stream's end", s.read_to_end(&mut rest)).await;
    assert!(r.is_err(), "{r:?}");
}

#[tokio::test]
async fn a_killed_agent_fails_its_streams_at_once() {
    let gw = FakeGateway::bind().await;
    let dir = tempfile::tempdir().unwrap();
    let echo = tcp_echo().await;
    let mut a = agent(&gw, &dir, &["--pool", "1", "--allow", "tcp://127.0.0.1:*"]);
    let reg = gw.register().await;
    let (mut s, reply) = open(&reg.session, &format!("tcp://{echo}")).await;
    assert_eq!(reply, Reply::ok());
    s.write_all(b"mid-transfer").await.unwrap();
    let killed = Instant::now();
    a.signal(libc::SIGKILL);
    let mut buf = [0u8; 16];
    let r = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf))
        .await
        .expect("the stream hangs after the agent died");
    assert!(r.is_err(), "expected an error, got {r:?}");
    assert!(killed.elapsed() < Duration::from_secs(2));
    a.exit().await;
}

/// A test CA with a server certificate for `localhost` and a client
/// certificate, as PEM files.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair};
        let dir = tempfile::tempdir().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_key = KeyPair::generate().unwrap();
        let ca = params.self_signed(&ca_key).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        for (name, purpose) in [
            ("server", ExtendedKeyUsagePurpose::ServerAuth),
            ("client", ExtendedKeyUsagePurpose::ClientAuth),
        ] {
            let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
            params.extended_key_usages = vec![purpose];
            let key = KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
            std::fs::write(dir.path().join(format!("{name}.pem")), cert.pem()).unwrap();
            std::fs::write(
                dir.path().join(format!("{name}-key.pem")),
                key.serialize_pem(),
            )
            .unwrap();
        }
        Pki { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_str().unwrap().to_string()
    }

    fn pem(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.path(name)).unwrap()
    }

    /// A rustls server with the server certificate that requires a client
    /// certificate from the CA.
    fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certs = rustls_pemfile::certs(&mut &self.pem("server.pem")[..])
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = rustls_pemfile::private_key(&mut &self.pem("server-key.pem")[..])
            .unwrap()
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pemfile::certs(&mut &self.pem("ca.pem")[..]) {
            roots.add(c.unwrap()).unwrap();
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()
        .unwrap();
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)
            .unwrap();
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    }
}

#[tokio::test]
async fn the_agent_dials_wss_with_a_client_certificate() {
    let pki = Pki::new();
    let acceptor = pki.acceptor();
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("wss://localhost:{}/agent", l.local_addr().unwrap().port());
    let dir = tempfile::tempdir().unwrap();
    let token = token_file(&dir, "secret-token");
    let echo = tcp_echo().await;
    let (ca, cert, key) = (
        pki.path("ca.pem"),
        pki.path("client.pem"),
        pki.path("client-key.pem"),
    );
    let mut a = Proc::start(&[
        "agent",
        "--server",
        &url,
        "--id",
        "site-a",
        "--token-file",
        &token,
        "--pool",
        "1",
        "--allow",
        "tcp://127.0.0.1:*",
        "--ca",
        &ca,
        "--client-cert",
        &cert,
        "--client-key",
        &key,
    ]);
    let (tcp, _) = within("a TLS connection", l.accept()).await.unwrap();
    let mut tls = within("the TLS handshake", acceptor.accept(tcp))
        .await
        .expect("TLS with a client certificate");
    let (head, rest) = read_head(&mut tls).await;
    assert_eq!(head.get("authorization"), Some("Bearer secret-token"));
    let session = upgrade(tls, &head, proto::AGENT_PROTOCOL, &rest).await;
    assert_eq!(a.line().await, format!("agent site-a registered at {url}"));
    let back = echo_through(&session, &format!("tcp://{echo}"), b"over tls").await;
    assert_eq!(back, b"over tls");
}

#[tokio::test]
async fn a_refused_registration_is_reported_and_exits_1() {
    let gw = FakeGateway::bind().await;
    let dir = tempfile::tempdir().unwrap();
    let mut a = agent(&gw, &dir, &["--pool", "1", "--allow", "tcp://127.0.0.1:*"]);
    let (mut tcp, _) = within("a registration", gw.listener.accept())
        .await
        .unwrap();
    read_head(&mut tcp).await;
    let body = "token does not own agent id site-a\n";
    tcp.write_all(
        format!(
            "HTTP/1.1 403 Forbidden\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let status = a.exit().await;
    assert_eq!(status.code(), Some(1));
    let err = a.stderr();
    assert!(
        err.contains(
            "agent site-a: registration refused: 403 Forbidden: token does not own agent id site-a"
        ),
        "{err}"
    );
}

#[tokio::test]
async fn argument_errors_exit_2_before_anything_is_dialed() {
    let gw = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    gw.set_nonblocking(true).unwrap();
    let url = format!("ws://{}/agent", gw.local_addr().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let token = token_file(&dir, "t0k3n");
    let missing = dir.path().join("nope.txt");
    let missing = missing.to_str().unwrap();
    let base = |server: &str, token: &str, allow: &str| {
        vec![
            "agent".to_string(),
            "--server".into(),
            server.into(),
            "--id".into(),
            "site-a".into(),
            "--token-file".into(),
            token.into(),
            "--allow".into(),
            allow.into(),
        ]
    };
    for (args, says) in [
        (
            base(&url, &token, "tcp://10.0.0.0/33:*"),
            "tcp://10.0.0.0/33:*",
        ),
        (base(&url, missing, "tcp://*:*"), "--token-file"),
        (
            base("http://gw:8080/agent", &token, "tcp://*:*"),
            "--server",
        ),
        (
            {
                let mut a = base(&url, &token, "tcp://*:*");
                a[4] = ".bad".into();
                a
            },
            "--id",
        ),
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut p = Proc::start(&args);
        let status = p.exit().await;
        assert_eq!(status.code(), Some(2), "{args:?}");
        assert!(p.stderr().contains(says), "{args:?}: {}", p.stderr());
    }
    let mut p = Proc::start(&["connect", &url, "--to", "ftp://x:1", "--stdio"]);
    assert_eq!(p.exit().await.code(), Some(2));
    assert!(p.stderr().contains("--to"), "{}", p.stderr());
    assert!(gw.accept().is_err(), "something was dialed");
}

// ---------------------------------------------------------------------------
// `wsgate connect` against a fake `/mux`.

/// A `/mux` endpoint: checks the token, answers each open request for
/// `expect` with OK and echoes the stream (or its datagrams); anything
/// else is answered NOT_ALLOWED.
async fn fake_mux(expect: &'static str) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = l.accept().await {
            let (head, rest) = read_head(&mut tcp).await;
            assert_eq!(head.path, "/mux");
            assert_eq!(head.get("authorization"), Some("Bearer mux-token"));
            let session = Arc::new(upgrade(tcp, &head, proto::MUX_PROTOCOL, &rest).await);
            tokio::spawn(async move {
                while let Ok(s) = session.accept().await {
                    tokio::spawn(mux_stream(s, expect));
                }
            });
        }
    });
    addr
}

async fn mux_stream(mut s: Stream, expect: &str) {
    let mut buf = BytesMut::new();
    let text = loop {
        if let Some(t) = proto::decode_open(&mut buf).unwrap() {
            break t;
        }
        if s.read_buf(&mut buf).await.unwrap() == 0 {
            return;
        }
    };
    let mut wire = BytesMut::new();
    if text != expect {
        Reply::refuse(Status::NotAllowed, format!("{text} is not allowed here")).encode(&mut wire);
        s.write_all(&wire).await.unwrap();
        let _ = s.shutdown().await;
        let _ = s.read_to_end(&mut Vec::new()).await;
        return;
    }
    Reply::ok().encode(&mut wire);
    s.write_all(&wire).await.unwrap();
    if text.contains("udp://") {
        // Echo framed datagrams as they are, until FIN.
        let mut chunk = [0u8; 4096];
        loop {
            let n = s.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            s.write_all(&chunk[..n]).await.unwrap();
        }
    } else {
        let mut data = Vec::new();
        s.read_to_end(&mut data).await.unwrap();
        s.write_all(&data).await.unwrap();
    }
    let _ = s.shutdown().await;
    let _ = s.read_to_end(&mut Vec::new()).await;
}

#[tokio::test]
async fn connect_stdio_is_one_stream_with_half_close() {
    let target = "agent://site-a/tcp://10.0.0.5:22";
    let mux = fake_mux(target).await;
    let url = format!("ws://{mux}/mux");
    let mut p = Proc::spawn(
        &[
            "connect",
            &url,
            "--to",
            target,
            "--stdio",
            "--token",
            "mux-token",
        ],
        Stdio::piped(),
        false,
    );
    let child = p.child.as_mut().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7) as u8).collect();
    let sent = data.clone();
    let writer = std::thread::spawn(move || {
        stdin.write_all(&sent).unwrap();
        // Dropping stdin is the EOF: the stream is half-closed and the
        // echo comes back.
    });
    let reader = tokio::task::spawn_blocking(move || {
        let mut back = Vec::new();
        stdout.read_to_end(&mut back).unwrap();
        back
    });
    let back = within("the echo on stdout", reader).await.unwrap();
    writer.join().unwrap();
    assert_eq!(back.len(), data.len());
    assert!(back == data, "stdout carries only the stream's bytes");
    assert_eq!(p.exit().await.code(), Some(0), "{}", p.stderr());
}

#[tokio::test]
async fn connect_listen_opens_a_stream_per_connection() {
    let target = "tcp://127.0.0.1:7";
    let mux = fake_mux(target).await;
    let url = format!("ws://{mux}/mux");
    let mut p = Proc::start(&[
        "connect",
        &url,
        "--to",
        target,
        "--listen",
        "127.0.0.1:0",
        "--token",
        "mux-token",
    ]);
    let line = p.line().await;
    let addr = line
        .strip_prefix("listening on tcp://")
        .unwrap_or_else(|| panic!("{line}"))
        .to_string();
    assert!(!addr.ends_with(":0"), "{addr}");
    for i in 0..3 {
        let mut c = TcpStream::connect(&addr).await.unwrap();
        let msg = format!("connection {i}");
        c.write_all(msg.as_bytes()).await.unwrap();
        c.shutdown().await.unwrap();
        let mut back = String::new();
        within("the echo", c.read_to_string(&mut back))
            .await
            .unwrap();
        assert_eq!(back, msg);
    }
}

#[tokio::test]
async fn connect_listen_reports_a_refusal_and_closes_the_connection() {
    let mux = fake_mux("tcp://127.0.0.1:7").await;
    let url = format!("ws://{mux}/mux");
    let mut p = Proc::start(&[
        "connect",
        &url,
        "--to",
        "agent://site-a/tcp://10.0.0.5:23",
        "--listen",
        "127.0.0.1:0",
        "--token",
        "mux-token",
    ]);
    let line = p.line().await;
    let addr = line
        .strip_prefix("listening on tcp://")
        .unwrap()
        .to_string();
    let mut c = TcpStream::connect(&addr).await.unwrap();
    let mut back = Vec::new();
    // Closed (reset) without a byte.
    let r = within("the close", c.read_to_end(&mut back)).await;
    assert!(back.is_empty(), "{r:?}");
    p.stderr_line("refused: NOT_ALLOWED: agent://site-a/tcp://10.0.0.5:23 is not allowed here")
        .await;
}

#[tokio::test]
async fn connect_listen_udp_is_one_stream_per_client_address() {
    let target = "agent://site-a/udp://10.0.0.2:53";
    let mux = fake_mux(target).await;
    let url = format!("ws://{mux}/mux");
    let mut p = Proc::start(&[
        "connect",
        &url,
        "--to",
        target,
        "--listen",
        "127.0.0.1:0",
        "--token",
        "mux-token",
    ]);
    let line = p.line().await;
    let addr = line
        .strip_prefix("listening on udp://")
        .unwrap_or_else(|| panic!("{line}"))
        .to_string();
    for client in 0..2 {
        let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        c.connect(&addr).await.unwrap();
        for i in 0..3 {
            let msg = format!("client {client} datagram {i}");
            c.send(msg.as_bytes()).await.unwrap();
            let mut buf = [0u8; 100];
            let n = within("the echoed datagram", c.recv(&mut buf))
                .await
                .unwrap();
            assert_eq!(&buf[..n], msg.as_bytes());
        }
    }
}
