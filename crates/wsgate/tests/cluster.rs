//! Three gateway nodes (the real binary, each its own process) and a real
//! `redis-server` on loopback ports, with agents written here from
//! docs/tunnel.md (registered on a chosen node, so that who holds what is
//! known) and the real `wsgate agent`: a request at any node reaches an
//! agent another node holds, through every way the tunnel serves; stream
//! opens in the steady state make no Redis command; a stale owner entry is
//! corrected on first use; disconnect and revoke act on every node; node
//! links refuse garbage; a cut link fails its streams and the next ones
//! take a new link; SIGTERM leaves the cluster first; SIGKILL is routed
//! around; Redis restarted, the nodes keep serving and register again.
//!
//! No sleep synchronises anything: every wait polls observable state (a
//! key in Redis, `GET /agents`, a metric) in a bounded loop. Skipped, with
//! a message, only where `redis-server` is not installed
//! (scripts/install-test-deps.sh installs it).
//!
//! Run it alone: `cargo test -p wsgate --test cluster`.

mod common;
use common::tunnel::{open, websocket};
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use wsgate::tunnel::proto::{self, Status};

const TOKEN: &str = "secret-site-a";
const SECRET: &str = "cluster-secret-0123456789";
/// The nodes' lease: short, so that expiry is seen within the test.
const LEASE: Duration = Duration::from_secs(2);

async fn within<T>(what: &str, limit: Duration, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(limit, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: not within {limit:?}"))
}

/// Polls `check` until it holds (bounded by `limit`), 20 ms apart.
async fn until<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

// ------------------------------------------------------------------ redis

struct Redis {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl Redis {
    /// A `redis-server` on a free loopback port, without persistence; `None`
    /// when it is not installed.
    async fn start(dir: &Path) -> Option<Redis> {
        if Command::new("redis-server")
            .arg("--version")
            .output()
            .is_err()
        {
            eprintln!("SKIPPED: redis-server is not installed (scripts/install-test-deps.sh)");
            return None;
        }
        for _ in 0..3 {
            let mut r = Redis {
                port: free_port(),
                dir: dir.to_path_buf(),
                child: None,
            };
            if r.run().await {
                return Some(r);
            }
        }
        panic!("redis-server did not start");
    }

    async fn run(&mut self) -> bool {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if self.try_cmd(&["PING"]).await.is_some() {
                return true;
            }
            if let Some(c) = &mut self.child {
                if c.try_wait().unwrap().is_some() {
                    return false;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    async fn try_cmd(&self, args: &[&str]) -> Option<redis::Value> {
        let client = redis::Client::open(self.url()).ok()?;
        let mut c = tokio::time::timeout(
            Duration::from_secs(2),
            client.get_multiplexed_async_connection(),
        )
        .await
        .ok()?
        .ok()?;
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query_async(&mut c).await.ok()
    }

    async fn members(&self, key: &str) -> Vec<String> {
        match self.try_cmd(&["SMEMBERS", key]).await {
            Some(v) => redis::from_redis_value(&v).unwrap(),
            None => vec![],
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Records every command Redis runs (MONITOR) from now on.
struct Monitor {
    lines: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Monitor {
    async fn start(port: u16) -> Monitor {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        s.write_all(b"MONITOR\r\n").await.unwrap();
        let mut ok = [0u8; 5];
        s.read_exact(&mut ok).await.unwrap();
        assert_eq!(&ok, b"+OK\r\n");
        let lines = Arc::new(Mutex::new(vec![]));
        let keep = lines.clone();
        let task = tokio::spawn(async move {
            let mut buf = vec![];
            let mut chunk = [0u8; 4096];
            while let Ok(n) = s.read(&mut chunk).await {
                if n == 0 {
                    return;
                }
                buf.extend_from_slice(&chunk[..n]);
                while let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                    let line = String::from_utf8_lossy(&buf[..i]).into_owned();
                    keep.lock().unwrap().push(line);
                    buf.drain(..i + 2);
                }
            }
        });
        Monitor { lines, task }
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ------------------------------------------------------------------ nodes

/// A gateway node: the real binary, with its config file.
struct Node {
    id: String,
    config: PathBuf,
    child: Option<Child>,
    addr: String,
    admin: String,
    /// `--forward` listeners: `to` → `HOST:PORT`.
    forwards: HashMap<String, String>,
}

struct NodeSpec<'a> {
    id: &'a str,
    port: u16,
    /// What other nodes dial (default: its own listener).
    advertise: Option<String>,
    forwards: &'a [String],
}

impl Node {
    fn write_config(dir: &Path, redis: &str, spec: &NodeSpec, echo: u16) -> PathBuf {
        let tokens = dir.join("agents.txt");
        std::fs::write(
            &tokens,
            format!("site-a {TOKEN}\nsite-b {TOKEN}\nsite-c {TOKEN}\n"),
        )
        .unwrap();
        let advertise = spec
            .advertise
            .clone()
            .unwrap_or_else(|| format!("ws://127.0.0.1:{}", spec.port));
        let mut text = format!(
            r#"
workers = 1
[[listener]]
address = "127.0.0.1:{port}"
[admin]
address = "127.0.0.1:0"
[limits]
drain_timeout = "5s"
[tunnel]
agent_tokens = "{tokens}"
mux_allow = ["agent://*/tcp://*:*"]
keepalive = "1s"
open_timeout = "5s"
[[route]]
path = "/echo"
to = "agent://site-a/tcp://127.0.0.1:{echo}"
framing = "binary"
[cluster]
redis = "{redis}"
node_id = "{id}"
advertise = "{advertise}"
secret = "{SECRET}"
lease = "{lease}s"
"#,
            port = spec.port,
            tokens = tokens.display(),
            id = spec.id,
            lease = LEASE.as_secs(),
        );
        for to in spec.forwards {
            text.push_str(&format!(
                "[[tunnel.forward]]\nlisten = \"127.0.0.1:0\"\nto = \"{to}\"\n"
            ));
        }
        let p = dir.join(format!("{}.toml", spec.id));
        std::fs::write(&p, text).unwrap();
        p
    }

    fn start(id: &str, config: PathBuf) -> Node {
        let mut n = Node {
            id: id.to_string(),
            config,
            child: None,
            addr: String::new(),
            admin: String::new(),
            forwards: HashMap::new(),
        };
        n.run();
        n
    }

    /// Starts the binary and reads its `listening on`, `admin on` and
    /// `forwarding` lines.
    fn run(&mut self) {
        let mut child = Command::new(env!("CARGO_BIN_EXE_wsgate"))
            .args(["serve", "--config"])
            .arg(&self.config)
            .env("WSGATE_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start wsgate");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let text = std::fs::read_to_string(&self.config).unwrap();
        let forwards = text.matches("[[tunnel.forward]]").count();
        for _ in 0..2 + forwards {
            let line = lines
                .next()
                .expect("wsgate exited before listening")
                .unwrap();
            if let Some(u) = line.strip_prefix("listening on ws://") {
                self.addr = u.to_string();
            } else if let Some(a) = line.strip_prefix("admin on http://") {
                self.admin = a.to_string();
            } else if let Some(f) = line.strip_prefix("forwarding tcp://") {
                let (listen, to) = f.split_once(" to ").unwrap();
                self.forwards.insert(to.to_string(), listen.to_string());
            } else {
                panic!("unexpected line {line:?}");
            }
        }
        // The rest of stdout is drained so the node never blocks on it.
        std::thread::spawn(move || for _ in lines {});
        self.child = Some(child);
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.pid(), sig) };
    }

    /// Waits (bounded) for the process to exit; its status code.
    async fn exited(&mut self, limit: Duration) -> Option<i32> {
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return s.code();
            }
            assert!(start.elapsed() < limit, "node {} did not exit", self.id);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn get(&self, path: &str) -> (u16, String) {
        http(
            &self.admin,
            &format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        )
        .await
    }

    async fn post(&self, path: &str, body: &str) -> (u16, String) {
        http(
            &self.admin,
            &format!(
                "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            ),
        )
        .await
    }

    async fn metrics(&self) -> String {
        self.get("/metrics").await.1
    }

    /// The value of the metric line that starts with `series` (0 if absent).
    async fn metric(&self, series: &str) -> f64 {
        metric_value(&self.metrics().await, series)
    }

    /// `GET /request` for `dest` (through `agent`, if given).
    async fn request(&self, dest: &str, agent: Option<&str>) -> (u16, String) {
        let agent = agent.map_or(String::new(), |a| format!("X-PROXY-AGENT: {a}\r\n"));
        http(
            &self.addr,
            &format!(
                "GET /request HTTP/1.1\r\nHost: gw\r\nX-PROXY-DESTINATION: {dest}\r\n{agent}Connection: close\r\n\r\n"
            ),
        )
        .await
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn metric_value(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Sends raw HTTP and reads the answer to its end: the status and the text.
async fn http(addr: &str, request: &str) -> (u16, String) {
    within("an HTTP answer", Duration::from_secs(15), async {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut buf = vec![];
        let _ = s.read_to_end(&mut buf).await;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
        (status, text)
    })
    .await
}

// ----------------------------------------------------------------- agents

/// An HTTP server answering `hello PATH`.
async fn web() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let head = String::from_utf8_lossy(&buf[..n]).to_string();
                let path = head.split(' ').nth(1).unwrap_or("?").to_string();
                let body = format!("hello {path}");
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

/// Registers agent `id` at `node`: the status, and the serving task once
/// registered (aborting it drops the connection, as a killed agent would).
async fn register(node: &Node, id: &str, allow: &str) -> (u16, Option<Agent>) {
    let auth = format!("Bearer {TOKEN}");
    let (status, t) = websocket(
        &node.addr,
        "/agent",
        proto::AGENT_PROTOCOL,
        &[
            ("Wsgate-Agent-Id", id),
            ("Wsgate-Agent-Allow", allow),
            ("Authorization", &auth),
        ],
    )
    .await;
    (status, t.map(|t| serve_agent(t, allow)))
}

/// A registered agent connection, served in the background.
struct Agent {
    task: tokio::task::JoinHandle<()>,
}

impl Agent {
    fn ended(&self) -> bool {
        self.task.is_finished()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves one registered WebSocket's streams ([`common::tunnel::serve_agent`]).
fn serve_agent(t: wsmux::WsTransport<TcpStream>, allow: &str) -> Agent {
    Agent {
        task: common::tunnel::serve_agent(t, allow),
    }
}

/// Echoes `data` through a TCP listener (a `--forward`).
async fn echo_via(addr: &str, data: &[u8]) -> Vec<u8> {
    within("an echo", Duration::from_secs(10), async {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(data).await.unwrap();
        s.shutdown().await.unwrap();
        let mut back = vec![];
        let _ = s.read_to_end(&mut back).await;
        back
    })
    .await
}

// ---------------------------------------------------------------- fixture

/// Redis, three nodes (`node-a`, `node-b`, `node-c`), an echo and a web
/// server; every node forwards to the echo server through `site-a`.
struct Three {
    dir: tempfile::TempDir,
    redis: Redis,
    nodes: Vec<Node>,
    echo: u16,
    web: u16,
    allow: String,
}

impl Three {
    async fn start() -> Option<Three> {
        Three::start_with(|_| None).await
    }

    /// `advertise(i)`: what node `i` advertises instead of its listener.
    async fn start_with(advertise: impl Fn(usize) -> Option<String>) -> Option<Three> {
        let dir = tempfile::tempdir().unwrap();
        let redis = Redis::start(dir.path()).await?;
        let (echo, web) = (common::tcp_echo().await, web().await);
        let forwards = [format!("agent://site-a/tcp://127.0.0.1:{echo}")];
        let mut nodes = vec![];
        for (i, id) in ["node-a", "node-b", "node-c"].iter().enumerate() {
            let spec = NodeSpec {
                id,
                port: free_port(),
                advertise: advertise(i),
                forwards: &forwards,
            };
            let config = Node::write_config(dir.path(), &redis.url(), &spec, echo);
            nodes.push(Node::start(id, config));
        }
        let t = Three {
            dir,
            redis,
            nodes,
            echo,
            web,
            allow: format!("tcp://127.0.0.1:{echo}, http://127.0.0.1:{web}"),
        };
        // Every node has its lease entry.
        for n in &t.nodes {
            let key = format!("wsgate:node:{}", n.id);
            let r = &t.redis;
            until("a node's lease entry", Duration::from_secs(10), || async {
                r.try_cmd(&["EXISTS", &key]).await == Some(redis::Value::Int(1))
            })
            .await;
        }
        Some(t)
    }

    fn node(&self, id: &str) -> &Node {
        self.nodes.iter().find(|n| n.id == id).unwrap()
    }

    fn node_mut(&mut self, id: &str) -> &mut Node {
        self.nodes.iter_mut().find(|n| n.id == id).unwrap()
    }

    fn forward(&self, node: &str) -> String {
        let to = format!("agent://site-a/tcp://127.0.0.1:{}", self.echo);
        self.node(node).forwards[&to].clone()
    }

    fn web_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.web)
    }

    /// Registers `id` at `node` and waits until Redis records it there.
    async fn agent_at(&self, node: &str, id: &str) -> Agent {
        let (status, a) = register(self.node(node), id, &self.allow).await;
        assert_eq!(status, 101);
        self.until_recorded(id, node, true).await;
        a.unwrap()
    }

    /// Waits until Redis records (or no longer records) `node` holding `id`.
    async fn until_recorded(&self, id: &str, node: &str, held: bool) {
        let key = format!("wsgate:agent:{id}");
        let r = &self.redis;
        until(
            &format!(
                "{node} {} {id} in redis",
                if held { "holding" } else { "not holding" }
            ),
            Duration::from_secs(10),
            || async { r.members(&key).await.iter().any(|n| n == node) == held },
        )
        .await;
    }
}

// ------------------------------------------------------------------ tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_at_any_node_reaches_an_agent_another_node_holds() {
    let Some(c) = Three::start().await else {
        return;
    };
    let _agent = c.agent_at("node-a", "site-a").await;
    let (b, cc) = (c.node("node-b"), c.node("node-c"));

    // /request with and without X-PROXY-AGENT, at the nodes without it.
    for n in [b, cc] {
        let (status, body) = n.request(&c.web_url("/hello"), Some("site-a")).await;
        assert_eq!(status, 200, "{body}");
        assert!(body.ends_with("hello /hello"), "{body}");
        let (status, body) = n.request(&c.web_url("/any"), None).await;
        assert_eq!(status, 200, "{body}");
    }
    // The forward proxy (no agent named: found in the catalog).
    let (status, body) = http(
        &b.addr,
        &format!(
            "GET {} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\n\r\n",
            c.web_url("/fp"),
            c.web
        ),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.ends_with("hello /fp"), "{body}");
    // CONNECT.
    let mut s = TcpStream::connect(&cc.addr).await.unwrap();
    s.write_all(format!("CONNECT 127.0.0.1:{} HTTP/1.1\r\nHost: x\r\n\r\n", c.echo).as_bytes())
        .await
        .unwrap();
    let mut head = vec![0u8; 256];
    let n = within(
        "CONNECT's answer",
        Duration::from_secs(10),
        s.read(&mut head),
    )
    .await
    .unwrap();
    assert!(head[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &head[..n]);
    s.write_all(b"connected").await.unwrap();
    let mut got = [0u8; 9];
    s.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"connected");
    drop(s);
    // --forward on a node that does not hold the agent.
    assert_eq!(
        echo_via(&c.forward("node-b"), b"forwarded").await,
        b"forwarded"
    );
    // A bridge route to an agent:// peer.
    let (status, ws) = websocket(&cc.addr, "/echo", "x", &[]).await;
    assert_eq!(status, 101);
    drop(ws);
    // /mux.
    let (status, t) = websocket(&b.addr, "/mux", proto::MUX_PROTOCOL, &[]).await;
    assert_eq!(status, 101);
    let mux = wsmux::Session::client(t.unwrap(), wsmux::Config::default());
    let dest = format!("agent://site-a/tcp://127.0.0.1:{}", c.echo);
    let (mut st, reply) = open(&mux, &dest).await;
    assert_eq!(reply.status, Status::Ok, "{}", reply.message);
    st.write_all(b"muxed").await.unwrap();
    st.shutdown().await.unwrap();
    let mut back = vec![];
    st.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"muxed");
    let (_, reply) = open(&mux, &format!("agent://site-z/tcp://127.0.0.1:{}", c.echo)).await;
    assert_eq!(reply.status, Status::NoAgent, "{}", reply.message);
    // The agent's refusal comes back through both nodes.
    let (status, body) = b.request("http://127.0.0.1:9/x", Some("site-a")).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("not allowed"), "{body}");

    // GET /agents at any node: the cluster's view, with the holding node.
    let (status, view) = cc.get("/agents").await;
    assert_eq!(status, 200);
    let json: serde_json::Value =
        serde_json::from_str(&view[view.find("\r\n\r\n").unwrap() + 4..]).unwrap();
    let a = json
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["id"] == "site-a")
        .unwrap_or_else(|| panic!("{view}"));
    assert_eq!(a["nodes"][0]["node"], "node-a", "{view}");
    assert_eq!(a["nodes"][0]["connections"], 1, "{view}");
    assert_eq!(a["connections"], 0, "node-c's own: {view}");
    let m = b.metrics().await;
    assert!(
        metric_value(
            &m,
            "wsgate_cluster_streams_total{side=\"out\",outcome=\"ok\"}"
        ) >= 4.0,
        "{m}"
    );
    assert_eq!(
        metric_value(&m, "wsgate_cluster_links{direction=\"out\"}"),
        1.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_state_stream_opens_make_no_redis_command() {
    let Some(c) = Three::start().await else {
        return;
    };
    let _agent = c.agent_at("node-a", "site-a").await;
    let b = c.node("node-b");
    let fwd = c.forward("node-b");
    // The first open looks the owner up; the link is dialed.
    assert_eq!(echo_via(&fwd, b"first").await, b"first");
    let monitor = Monitor::start(c.redis.port).await;
    let lookups = |m: &str| metric_value(m, "wsgate_cluster_lookups_total{result=\"miss\"}");
    let misses = lookups(&b.metrics().await);
    for i in 0..50 {
        let msg = format!("open {i}");
        assert_eq!(echo_via(&fwd, msg.as_bytes()).await, msg.as_bytes());
    }
    let m = b.metrics().await;
    assert_eq!(lookups(&m), misses, "no look-up missed the cache: {m}");
    assert!(
        metric_value(&m, "wsgate_cluster_lookups_total{result=\"hit\"}") >= 50.0,
        "{m}"
    );
    // What Redis saw meanwhile: lease renewals only, nothing about agents.
    let seen = monitor.lines.lock().unwrap().clone();
    let about_agents: Vec<&String> = seen.iter().filter(|l| l.contains("wsgate:agent")).collect();
    assert!(about_agents.is_empty(), "{about_agents:?}");
    assert!(
        seen.iter().all(|l| l.contains("wsgate:node")),
        "only lease renewals and looks at the nodes: {seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_owner_entry_is_corrected_on_first_use() {
    let Some(c) = Three::start().await else {
        return;
    };
    let b = c.node("node-b");
    // site-b is held by node-a, but Redis also names node-c, to which
    // node-b has a link already and node-a none (so node-c is asked first).
    let _c = c.agent_at("node-c", "site-c").await;
    let (status, body) = b.request(&c.web_url("/to-c"), Some("site-c")).await;
    assert_eq!(status, 200, "{body}");
    let _sb = c.agent_at("node-a", "site-b").await;
    c.redis
        .try_cmd(&["SADD", "wsgate:agent:site-b", "node-c"])
        .await
        .unwrap();
    let no_agent = "wsgate_cluster_streams_total{side=\"out\",outcome=\"no_agent\"}";
    for i in 0..10 {
        let (status, body) = b
            .request(&c.web_url(&format!("/b{i}")), Some("site-b"))
            .await;
        assert_eq!(status, 200, "{body}");
    }
    // node-c answered NO_AGENT once: node-b's cache dropped it, and node-c
    // corrected its entry in Redis (everyone's caches follow).
    assert_eq!(b.metric(no_agent).await, 1.0, "corrected on first use");
    c.until_recorded("site-b", "node-c", false).await;
    let cc = c.node("node-c");
    let m = cc.metrics().await;
    assert_eq!(
        metric_value(
            &m,
            "wsgate_cluster_streams_total{side=\"in\",outcome=\"no_agent\"}"
        ),
        1.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_and_revoke_at_one_node_act_on_every_node() {
    let Some(c) = Three::start().await else {
        return;
    };
    let agent = c.agent_at("node-a", "site-a").await;
    let cc = c.node("node-c");
    // Disconnect at node-c: node-a drops the connection.
    let (status, body) = cc.post("/agents/site-a/disconnect", "").await;
    assert_eq!(status, 200, "{body}");
    until("the agent dropped", Duration::from_secs(10), || async {
        agent.ended()
    })
    .await;
    c.until_recorded("site-a", "node-a", false).await;
    // Revoke the id at node-b: node-a refuses its registration.
    let b = c.node("node-b");
    let (status, body) = b.post("/revoke", r#"{"id": "site-a"}"#).await;
    assert_eq!(status, 200, "{body}");
    let a = c.node("node-a");
    until(
        "the revocation at node-a",
        Duration::from_secs(10),
        || async { register(a, "site-a", &c.allow).await.0 == 403 },
    )
    .await;
    let (_, list) = a.get("/revoked").await;
    assert!(list.contains("id:site-a"), "{list}");
    // A bad body is refused.
    assert_eq!(b.post("/revoke", "{}").await.0, 400);
    assert_eq!(b.post("/revoke", "not json").await.0, 400);
    // Lifted at node-c: node-a accepts it again.
    assert_eq!(cc.post("/unrevoke", r#"{"id": "site-a"}"#).await.0, 200);
    until("the revocation lifted", Duration::from_secs(10), || async {
        register(a, "site-a", &c.allow).await.0 == 101
    })
    .await;
    // A token is revoked by its SHA-256.
    let sha = {
        use sha2::Digest as _;
        let d = sha2::Sha256::digest(TOKEN.as_bytes());
        d.iter().map(|b| format!("{b:02x}")).collect::<String>()
    };
    let (status, body) = b
        .post("/revoke", &format!(r#"{{"token_sha256": "{sha}"}}"#))
        .await;
    assert_eq!(status, 200, "{body}");
    until(
        "the token's revocation",
        Duration::from_secs(10),
        || async { register(c.node("node-c"), "site-b", &c.allow).await.0 == 403 },
    )
    .await;
}

/// The reset code a stream's read fails with.
async fn reset_code(st: &mut wsmux::Stream) -> u32 {
    let mut buf = [0u8; 16];
    let e = within("a reset", Duration::from_secs(15), st.read(&mut buf))
        .await
        .unwrap_err();
    e.get_ref()
        .and_then(|i| i.downcast_ref::<wsmux::StreamReset>())
        .unwrap_or_else(|| panic!("not a reset: {e}"))
        .code
}

fn proof(from: &str, to: &str, secret: &str, skew: i64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    wsgate::cluster::wire::Proof::new(secret.as_bytes(), from, to, (now + skew) as u64).header()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_links_refuse_garbage_and_serve_only_their_own_agents() {
    let Some(c) = Three::start().await else {
        return;
    };
    let _agent = c.agent_at("node-a", "site-a").await;
    let a = &c.node("node-a").addr;
    let node = wsgate::cluster::wire::NODE_PROTOCOL;
    let good = proof("node-x", "node-a", SECRET, 0);
    let status =
        |h: &'static [(&str, &str)]| async move { websocket(a, "/cluster", node, h).await.0 };
    // Shape: the node id (400), then the proof (401, 403).
    assert_eq!(status(&[]).await, 400);
    assert_eq!(status(&[("Wsgate-Node-Id", "../x")]).await, 400);
    assert_eq!(status(&[("Wsgate-Node-Id", "node-x")]).await, 401);
    for bad in [
        "Bearer x".to_string(),
        "Wsgate-Node ts=1".to_string(),
        good.replace("mac=", "mac=zz"),
    ] {
        let h = [
            ("Wsgate-Node-Id", "node-x"),
            ("Authorization", bad.as_str()),
        ];
        assert_eq!(websocket(a, "/cluster", node, &h).await.0, 401, "{bad}");
    }
    for bad in [
        proof("node-x", "node-a", "another-secret-0123456", 0),
        proof("node-x", "node-b", SECRET, 0),
        proof("node-x", "node-a", SECRET, -600),
        proof("node-y", "node-a", SECRET, 0),
    ] {
        let h = [
            ("Wsgate-Node-Id", "node-x"),
            ("Authorization", bad.as_str()),
        ];
        assert_eq!(websocket(a, "/cluster", node, &h).await.0, 403, "{bad}");
    }
    // Its own id is not a peer's.
    let own = proof("node-a", "node-a", SECRET, 0);
    let h = [
        ("Wsgate-Node-Id", "node-a"),
        ("Authorization", own.as_str()),
    ];
    assert_eq!(websocket(a, "/cluster", node, &h).await.0, 403);
    // Without the subprotocol it is no node link.
    let h = [
        ("Wsgate-Node-Id", "node-x"),
        ("Authorization", good.as_str()),
    ];
    assert_eq!(websocket(a, "/cluster", "other", &h).await.0, 400);

    // A link: garbage open requests reset their stream, the session goes on.
    let (status, t) = websocket(a, "/cluster", node, &h).await;
    assert_eq!(status, 101);
    let link = wsmux::Session::client(t.unwrap(), wsmux::Config::default());
    for garbage in [
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        &[0x57, 9, 0, 1, b'x'],
        &[0x57, 1, 0xff, 0xff],
    ] {
        let mut st = link.open().await.unwrap();
        st.write_all(garbage).await.unwrap();
        assert_eq!(
            reset_code(&mut st).await,
            proto::RESET_BAD_OPEN,
            "{garbage:?}"
        );
    }
    let mut st = link.open().await.unwrap();
    let mut req = BytesMut::new();
    proto::encode_open("not a destination", &mut req);
    st.write_all(&req).await.unwrap();
    assert_eq!(reset_code(&mut st).await, proto::RESET_BAD_OPEN);
    // An agent this node does not hold: NO_AGENT (never asked elsewhere).
    let _elsewhere = c.agent_at("node-b", "site-b").await;
    let (_, reply) = open(&link, &format!("agent://site-b/tcp://127.0.0.1:{}", c.echo)).await;
    assert_eq!(reply.status, Status::NoAgent, "{}", reply.message);
    // Its own agent: served.
    let (mut st, reply) = open(&link, &format!("agent://site-a/tcp://127.0.0.1:{}", c.echo)).await;
    assert_eq!(reply.status, Status::Ok, "{}", reply.message);
    st.write_all(b"over the link").await.unwrap();
    st.shutdown().await.unwrap();
    let mut back = vec![];
    st.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"over the link");
    // Any agent covering a destination (no id).
    let (_, reply) = open(&link, &format!("tcp://127.0.0.1:{}", c.echo)).await;
    assert_eq!(reply.status, Status::Ok, "{}", reply.message);
    let m = c.node("node-a").metrics().await;
    assert_eq!(
        metric_value(
            &m,
            "wsgate_cluster_streams_total{side=\"in\",outcome=\"bad_open\"}"
        ),
        4.0,
        "{m}"
    );
}

/// A TCP relay whose connections can all be cut at once.
struct Cuttable {
    addr: String,
    conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    accepted: Arc<std::sync::atomic::AtomicUsize>,
}

impl Cuttable {
    async fn start(port: u16, to: Arc<Mutex<String>>) -> Cuttable {
        let l = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (keep, count) = (conns.clone(), accepted.clone());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let target = to.lock().unwrap().clone();
                keep.lock().unwrap().push(tokio::spawn(async move {
                    if let Ok(mut t) = TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut s, &mut t).await;
                    }
                }));
            }
        });
        Cuttable {
            addr,
            conns,
            accepted,
        }
    }

    fn cut(&self) {
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_link_fails_its_streams_and_the_next_ones_take_a_new_link() {
    // node-a is dialed through a relay the test can cut.
    let relay_port = free_port();
    let target = Arc::new(Mutex::new(String::new()));
    let relay = Cuttable::start(relay_port, target.clone()).await;
    let Some(c) = Three::start_with(|i| (i == 0).then(|| format!("ws://{}", relay.addr))).await
    else {
        return;
    };
    *target.lock().unwrap() = c.node("node-a").addr.clone();
    let _agent = c.agent_at("node-a", "site-a").await;
    let fwd = c.forward("node-b");
    assert_eq!(echo_via(&fwd, b"warm").await, b"warm");
    assert_eq!(relay.accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    // A stream in flight on the link.
    let mut s = TcpStream::connect(&fwd).await.unwrap();
    s.write_all(b"before").await.unwrap();
    let mut got = [0u8; 6];
    within("the echo", Duration::from_secs(10), s.read_exact(&mut got))
        .await
        .unwrap();
    relay.cut();
    // It fails cleanly: closed or reset, promptly, nothing more echoed.
    let r = within("the cut stream's end", Duration::from_secs(10), async {
        let _ = s.write_all(b"after").await;
        let mut rest = vec![];
        s.read_to_end(&mut rest).await.map(|_| rest)
    })
    .await;
    assert!(
        r.map_or(true, |rest| rest.is_empty()),
        "nothing after the cut"
    );
    // The next streams take a new link.
    for i in 0..5 {
        let msg = format!("next {i}");
        assert_eq!(echo_via(&fwd, msg.as_bytes()).await, msg.as_bytes());
    }
    assert_eq!(
        relay.accepted.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "one new link"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_leaves_the_cluster_before_draining_and_sigkill_is_routed_around() {
    let Some(mut c) = Three::start().await else {
        return;
    };
    // site-a held by node-a and node-b (replicas); site-b by node-a alone.
    let _a1 = c.agent_at("node-a", "site-a").await;
    let _a2 = c.agent_at("node-b", "site-a").await;
    let fwd = c.forward("node-c");
    assert_eq!(echo_via(&fwd, b"warm").await, b"warm");

    // SIGTERM node-a: its entries go before it exits; node-c keeps serving.
    c.node("node-a").signal(libc::SIGTERM);
    c.until_recorded("site-a", "node-a", false).await;
    for i in 0..10 {
        let msg = format!("during {i}");
        assert_eq!(echo_via(&fwd, msg.as_bytes()).await, msg.as_bytes());
    }
    assert_eq!(
        c.node_mut("node-a").exited(Duration::from_secs(15)).await,
        Some(0)
    );
    let nodes = c.redis.members("wsgate:nodes").await;
    assert!(!nodes.contains(&"node-a".to_string()), "{nodes:?}");

    // node-a comes back (same address, same id) and holds nothing.
    c.node_mut("node-a").run();
    let r = &c.redis;
    until("node-a's lease again", Duration::from_secs(10), || async {
        r.members("wsgate:nodes")
            .await
            .contains(&"node-a".to_string())
    })
    .await;

    // SIGKILL node-b, which holds site-a; the agent is also at node-c (as
    // a real one keeps a second connection, or reconnects elsewhere).
    let _a3 = c.agent_at("node-c", "site-a").await;
    c.node("node-b").signal(libc::SIGKILL);
    let killed = Instant::now();
    c.node_mut("node-b").exited(Duration::from_secs(5)).await;
    // node-a, which holds nothing, routes around the dead node at once.
    let fwd_a = c.forward("node-a");
    for i in 0..5 {
        let msg = format!("after kill {i}");
        assert_eq!(echo_via(&fwd_a, msg.as_bytes()).await, msg.as_bytes());
    }
    // node-b's entries are removed once its lease expired and a node
    // noticed: within the lease and one renewal period (plus slack).
    c.until_recorded("site-a", "node-b", false).await;
    let took = killed.elapsed();
    assert!(
        took <= LEASE + LEASE / 3 + Duration::from_secs(2),
        "node-b's entries removed after {took:?}"
    );
    let nodes = c.redis.members("wsgate:nodes").await;
    assert!(!nodes.contains(&"node-b".to_string()), "{nodes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_node_with_many_ids_is_removed_in_batches() {
    let Some(c) = Three::start().await else {
        return;
    };
    let _a = c.agent_at("node-a", "site-a").await;
    let monitor = Monitor::start(c.redis.port).await;
    // node-x: listed in wsgate:nodes, no lease key (it died), 2,500 ids
    // (more than one cleanup script takes), one of them site-a, which
    // node-a also holds.
    c.redis
        .try_cmd(&[
            "EVAL",
            "for i = 1, 2499 do \
               local id = 'ghost-' .. i \
               redis.call('SADD', 'wsgate:node:node-x:agents', id) \
               redis.call('SADD', 'wsgate:agent:' .. id, 'node-x') \
               redis.call('HSET', 'wsgate:agent:' .. id .. ':info', 'node-x', '1 0 tcp://*:*') \
               redis.call('SADD', 'wsgate:agents', id) \
             end \
             redis.call('SADD', 'wsgate:node:node-x:agents', 'site-a') \
             redis.call('SADD', 'wsgate:agent:site-a', 'node-x') \
             redis.call('SADD', 'wsgate:nodes', 'node-x') \
             return 1",
            "0",
        ])
        .await
        .unwrap();
    let r = &c.redis;
    until("node-x removed", Duration::from_secs(10), || async {
        !r.members("wsgate:nodes")
            .await
            .contains(&"node-x".to_string())
    })
    .await;
    let agents = r.members("wsgate:agents").await;
    assert_eq!(agents, vec!["site-a".to_string()], "only site-a is left");
    assert_eq!(r.members("wsgate:agent:site-a").await, vec!["node-a"]);
    assert!(r.members("wsgate:node:node-x:agents").await.is_empty());
    assert!(r.members("wsgate:agent:ghost-2499").await.is_empty());
    // In scripts of at most 1,000 ids each (MONITOR shows the commands a
    // script runs, a little after they ran): 3 batches, or more where two
    // nodes shared the work.
    let spops = || {
        monitor
            .lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains("\"SPOP\" \"wsgate:node:node-x:agents\" \"1000\""))
            .count()
    };
    until("3 cleanup batches seen", Duration::from_secs(5), || async {
        spops() >= 3
    })
    .await;
    // Everyone still reaches site-a.
    let (status, body) = c
        .node("node-b")
        .request(&c.web_url("/after"), Some("site-a"))
        .await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_restarted_nodes_keep_serving_and_register_again() {
    let Some(mut c) = Three::start().await else {
        return;
    };
    let _a = c.agent_at("node-a", "site-a").await;
    let _b = c.agent_at("node-a", "site-b").await;
    assert_eq!(
        c.node("node-b")
            .request(&c.web_url("/warm"), Some("site-a"))
            .await
            .0,
        200
    );
    c.redis.stop();
    // Cached owners and the link keep serving.
    for _ in 0..5 {
        let (status, body) = c
            .node("node-b")
            .request(&c.web_url("/cached"), Some("site-a"))
            .await;
        assert_eq!(status, 200, "{body}");
    }
    // An owner never looked up cannot be found: 503, said so.
    let (status, body) = c
        .node("node-b")
        .request(&c.web_url("/x"), Some("site-b"))
        .await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("directory"), "{body}");
    // The agents held locally are served as ever.
    assert_eq!(
        c.node("node-a")
            .request(&c.web_url("/local"), Some("site-b"))
            .await
            .0,
        200
    );
    // Redis back (empty): every node writes its entries again.
    assert!(c.redis.run().await, "redis-server restarted");
    c.until_recorded("site-a", "node-a", true).await;
    c.until_recorded("site-b", "node-a", true).await;
    let r = &c.redis;
    until(
        "every node's lease again",
        Duration::from_secs(10),
        || async { r.members("wsgate:nodes").await.len() == 3 },
    )
    .await;
    until(
        "site-b found through node-b",
        Duration::from_secs(10),
        || async {
            c.node("node-b")
                .request(&c.web_url("/back"), Some("site-b"))
                .await
                .0
                == 200
        },
    )
    .await;
    let m = c.node("node-b").metrics().await;
    assert!(
        metric_value(&m, "wsgate_cluster_redis_errors_total{op=\"lookup\"}") >= 1.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_agent_spreads_its_pool_over_two_nodes() {
    let Some(c) = Three::start().await else {
        return;
    };
    let token = c.dir.path().join("token.txt");
    std::fs::write(&token, TOKEN).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wsgate"));
    cmd.args([
        "agent",
        "--id",
        "site-a",
        "--pool",
        "2",
        "--keepalive",
        "1s",
    ])
    .arg("--token-file")
    .arg(&token)
    .args(["--allow", &format!("tcp://127.0.0.1:{}", c.echo)]);
    for n in &c.nodes {
        cmd.args(["--server", &format!("ws://{}/agent", n.addr)]);
    }
    let mut agent = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let r = &c.redis;
    until(
        "two nodes holding site-a",
        Duration::from_secs(15),
        || async { r.members("wsgate:agent:site-a").await.len() == 2 },
    )
    .await;
    // node-c holds none or one; it serves either way.
    assert_eq!(echo_via(&c.forward("node-c"), b"spread").await, b"spread");
    let _ = agent.kill();
    let _ = agent.wait();
}
