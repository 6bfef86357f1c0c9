//! `wsgate agent`: the other end of the reverse tunnel (`docs/tunnel.md`,
//! `docs/agent.md`). It runs inside a private network, dials out to the
//! gateway and serves the streams the gateway opens, each checked against
//! the agent's own `--allow` list.
//!
//! A connection's life: [`Agent::run`] starts `--pool` connection loops,
//! each on a thread of its own (a single-threaded runtime: the session and
//! its streams never wake each other across threads). Each dials (`dial.rs`: WebSocket client, TLS, the registration headers of
//! §1), runs a wsmux client session over the WebSocket with a keepalive
//! deadline, and accepts streams; every stream is served on its own task
//! (`serve.rs`: open request → allow → connect → reply → relay, with
//! `relay.rs`). When the session ends (the gateway went away, the keepalive
//! deadline passed, the gateway sent GOAWAY), the loop dials again after a
//! delay from `backoff.rs` (1 s to 30 s, with jitter). A refusal that
//! retrying cannot fix (400, 401, 403) ends the agent with exit 1.
//!
//! With several `--server`s (the nodes of a cluster, docs/cluster.md §6),
//! each dial goes to the server holding the fewest of this agent's live
//! connections (slot `k` prefers server `k` at first), so a pool of two or
//! more keeps connections to at least two servers. A connection lost, or
//! ended by the server's GOAWAY, is dialed again at once to another server;
//! only when every server failed in a row does the backoff delay apply.
//! Every 5 s a slot sharing its server with another of the agent's
//! connections moves to a server that has none (after a rolling restart
//! the pool is spread again): it sends GOAWAY on its session (its streams
//! finish) and dials the empty server.
//!
//! Shutdown (SIGTERM, SIGINT): GOAWAY on every session (the gateway opens no
//! more streams there; streams already in the accept backlog are still
//! served), wait for the open streams to finish (at most `--drain`), drop the
//! sessions (each sends GOAWAY and closes its WebSocket), and return.

pub mod backoff;
pub mod dial;
pub mod relay;
mod serve;

use std::future::Future;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::tunnel::allow::AllowList;
use crate::tunnel::proto;
use backoff::Backoff;
use dial::{DialError, Dialer, TlsFiles, WsUrl};
use serve::{Outcome, Rules};

/// How long to wait for a WebSocket connection and its handshake.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the gateway has to send a whole open request (§3).
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// After the drain, how long dropped sessions get to deliver their GOAWAY
/// and close their WebSockets.
const CLOSE_WAIT: Duration = Duration::from_secs(2);
/// How often a slot looks whether it should move to a server with none of
/// the agent's connections.
const REBALANCE_EVERY: Duration = Duration::from_secs(5);
/// A server that failed a dial this recently is not picked while another is.
const FAILED_FOR: Duration = Duration::from_secs(5);

/// What an agent is told on its command line; plain data.
#[derive(Debug, Clone)]
pub struct Config {
    /// The gateways' registration URLs, `ws://` or `wss://` (at least one;
    /// the nodes of a cluster).
    pub servers: Vec<WsUrl>,
    /// The id to register under (checked with [`proto::parse_id`]).
    pub id: String,
    /// The bearer token (trimmed, checked to be a header value); `None`
    /// when the client certificate is the agent's identity.
    pub token: Option<String>,
    /// What streams may reach (default deny).
    pub allow: AllowList,
    pub tls: TlsFiles,
    /// WebSockets kept registered at once.
    pub pool: usize,
    /// wsmux PING interval (`None`: no keepalive). A silent gateway is
    /// declared dead at most two intervals after its last frame.
    pub keepalive: Option<Duration>,
    /// How long SIGTERM waits for open streams.
    pub drain: Duration,
    /// Resolving and connecting to a destination (status TIMEOUT past it).
    pub connect_timeout: Duration,
}

impl Config {
    /// The headers of the registration request (§1), besides the WebSocket
    /// ones: the token when there is one, the id, and the allow patterns
    /// when there are any.
    pub fn registration_headers(&self) -> Vec<(String, String)> {
        let mut h = vec![];
        if let Some(t) = &self.token {
            h.push(("Authorization".to_string(), format!("Bearer {t}")));
        }
        h.push(("Wsgate-Agent-Id".to_string(), self.id.clone()));
        if !self.allow.is_empty() {
            h.push(("Wsgate-Agent-Allow".to_string(), self.allow.to_header()));
        }
        h
    }

    /// The wsmux settings: PINGs every `keepalive`, and a peer silent for
    /// one more interval with a PING unanswered is dead. wsmux sends the
    /// next PING one interval after the previous answer and declares the
    /// peer dead `keepalive_timeout` after the later of that PING and the
    /// last frame received, so a link that stops answering is detected
    /// within two intervals.
    pub fn session_config(&self) -> wsmux::Config {
        mux_config(self.keepalive)
    }
}

/// wsmux settings for a keepalive interval (see [`Config::session_config`]);
/// shared with `wsgate connect`. The stream limits are the gateway's
/// (`tunnel::mux_config`): up to 4,096 streams on one WebSocket, 1,024
/// waiting to be accepted, receive windows of at most 1 GiB in all, so a
/// gateway can run thousands of streams over one agent connection (wsmux's
/// defaults, 256 streams and 64 MiB, refused the 257th).
pub fn mux_config(keepalive: Option<Duration>) -> wsmux::Config {
    let default = wsmux::Config::default();
    wsmux::Config {
        keepalive_interval: keepalive,
        keepalive_timeout: keepalive.unwrap_or(default.keepalive_timeout),
        max_streams: 4096,
        accept_backlog: 1024,
        max_session_memory: 1 << 30,
        ..default
    }
}

/// Checks a bearer token: non-empty visible ASCII without spaces (RFC 6750's
/// token68 and then some), so it is a valid header value.
pub fn check_token(token: &str) -> Result<(), String> {
    if token.is_empty() {
        return Err("the token is empty".into());
    }
    if let Some(c) = token.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(format!(
            "the token contains {c:?}: expected visible ASCII without spaces"
        ));
    }
    Ok(())
}

/// Counts open streams and wakes waiters when none are left.
#[derive(Clone, Default)]
struct Gauge(Arc<(AtomicUsize, Notify)>);

struct GaugeGuard(Gauge);

impl Gauge {
    fn enter(&self) -> GaugeGuard {
        self.0 .0.fetch_add(1, Ordering::SeqCst);
        GaugeGuard(self.clone())
    }

    fn get(&self) -> usize {
        self.0 .0.load(Ordering::SeqCst)
    }

    async fn zero(&self) {
        loop {
            let notified = self.0 .1.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.get() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        if self.0 .0 .0.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0 .0 .1.notify_waiters();
        }
    }
}

/// A running agent, built from a [`Config`].
pub struct Agent {
    config: Config,
    /// One per server.
    dialers: Vec<Dialer>,
    /// Live connections per server (taking new streams).
    load: Vec<AtomicUsize>,
    /// When each server last failed a dial.
    failed: Mutex<Vec<Option<Instant>>>,
    /// SIGTERM: stop taking streams, stop dialing.
    stop: CancellationToken,
    /// After the drain: drop every session.
    release: CancellationToken,
    /// Open streams, all connections together.
    streams: Gauge,
    /// Whether the `registered` line was printed.
    announced: AtomicBool,
}

/// How a session's accept loop ended.
enum End {
    /// The agent is stopping (GOAWAY sent, backlog served).
    Stopped,
    /// The gateway sent GOAWAY: no new streams here; open ones go on.
    PeerGoAway,
    /// The session failed.
    Failed(wsmux::Error),
    /// This slot moves to a server with none of the agent's connections
    /// (GOAWAY sent on this one; its load already given back).
    Rebalance,
}

/// Runs one pooled connection on a thread of its own, with a single-threaded
/// runtime: the connection's session, the streams it accepts, their
/// connects and relays all stay on that thread. On a multi-threaded runtime
/// a stream's task and its session's driver woke each other across threads
/// for every frame (about 2 futex calls per tunnelled connection): the
/// agent spent 95 µs of CPU per connection of `bench/tunnel.sh` (b) there,
/// 68–85 µs with one connection's session and streams on one thread (2-core
/// VM, under load). With `--pool N` the agent still uses up to N cores,
/// since the gateway spreads streams over the pool's connections.
fn spawn_link_thread(
    slot: usize,
    link: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name(format!("wsgate-agent-{slot}"))
        .spawn(move || {
            rt.block_on(link);
            // Name lookups run on blocking threads that cannot be cancelled.
            rt.shutdown_timeout(Duration::from_millis(500));
        })?;
    Ok(())
}

/// Cancels the agent's stop and release tokens when dropped.
struct StopOnDrop(CancellationToken, CancellationToken);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
        self.1.cancel();
    }
}

impl Agent {
    /// Builds the runtime: loads the TLS files, prepares the registration.
    /// Errors here are argument errors (nothing was dialed).
    pub fn new(config: Config) -> anyhow::Result<Arc<Agent>> {
        proto::parse_id(&config.id)?;
        if let Some(t) = &config.token {
            check_token(t).map_err(|e| anyhow::anyhow!(e))?;
        } else if config.tls.identity.is_none() {
            anyhow::bail!("an agent needs a token or a client certificate");
        }
        if config.allow.0.len() > proto::MAX_ALLOW {
            anyhow::bail!(
                "{} --allow patterns: at most {} can be registered",
                config.allow.0.len(),
                proto::MAX_ALLOW
            );
        }
        if config.servers.is_empty() {
            anyhow::bail!("at least one --server is needed");
        }
        let dialers = config
            .servers
            .iter()
            .map(|url| {
                Dialer::new(
                    url.clone(),
                    &config.tls,
                    proto::AGENT_PROTOCOL,
                    config.registration_headers(),
                    DIAL_TIMEOUT,
                )
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let n = dialers.len();
        Ok(Arc::new(Agent {
            config,
            dialers,
            load: (0..n).map(|_| AtomicUsize::new(0)).collect(),
            failed: Mutex::new(vec![None; n]),
            stop: CancellationToken::new(),
            release: CancellationToken::new(),
            streams: Gauge::default(),
            announced: AtomicBool::new(false),
        }))
    }

    /// Runs until `shutdown` completes (then drains and returns `Ok`) or a
    /// registration is refused for good (then returns the refusal).
    pub async fn run(self: Arc<Self>, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let id = &self.config.id;
        if self.config.allow.is_empty() {
            tracing::warn!(agent = %id, "no --allow pattern: every stream will be refused");
        }
        let (fatal_tx, mut fatal_rx) = mpsc::channel::<DialError>(1);
        let loops = TaskTracker::new();
        // Whatever ends this future (return or drop) stops the link threads.
        let _stop_links = StopOnDrop(self.stop.clone(), self.release.clone());
        for slot in 1..=self.config.pool {
            let link = loops.track_future(self.clone().connection(slot, fatal_tx.clone()));
            spawn_link_thread(slot, link)?;
        }
        loops.close();
        drop(fatal_tx);
        let fatal = tokio::select! {
            () = shutdown => None,
            e = fatal_rx.recv() => e,
        };
        self.stop.cancel();
        if fatal.is_none() {
            let open = self.streams.get();
            tracing::info!(
                agent = %id,
                open,
                "shutting down: GOAWAY sent, waiting up to {:?} for {open} open stream(s)",
                self.config.drain
            );
            if tokio::time::timeout(self.config.drain, self.streams.zero())
                .await
                .is_err()
            {
                tracing::warn!(
                    agent = %id,
                    open = self.streams.get(),
                    "drain time over: failing the streams still open"
                );
            }
        }
        self.release.cancel();
        let _ = tokio::time::timeout(CLOSE_WAIT * 2, loops.wait()).await;
        match fatal {
            Some(e) => Err(anyhow::anyhow!("agent {id}: registration {e}")),
            None => Ok(()),
        }
    }

    fn recently_failed(&self, server: usize) -> bool {
        let f = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        f[server].is_some_and(|t| t.elapsed() < FAILED_FOR)
    }

    /// The server slot `slot` dials next: the one with the fewest of this
    /// agent's live connections, not `avoid` (the one just lost or failed)
    /// when there is another, nor one that failed recently when another
    /// did not; ties go to the slot's own (slot `k` to server `k`).
    fn pick(&self, slot: usize, avoid: Option<usize>) -> usize {
        let n = self.dialers.len();
        if n == 1 {
            return 0;
        }
        let own = (slot - 1) % n;
        let all: Vec<usize> = (0..n).filter(|&j| Some(j) != avoid).collect();
        let healthy: Vec<usize> = all
            .iter()
            .copied()
            .filter(|&j| !self.recently_failed(j))
            .collect();
        let from = if healthy.is_empty() { &all } else { &healthy };
        from.iter()
            .copied()
            .min_by_key(|&j| (self.load[j].load(Ordering::SeqCst), (j + n - own) % n))
            .unwrap_or(own)
    }

    /// Whether the slot on `server` should move: it shares the server with
    /// another of the agent's connections while a healthy server has none.
    /// Claims the move (gives the load back) when so, so that only one of
    /// the connections sharing a server moves.
    fn should_move(&self, server: usize) -> bool {
        let n = self.dialers.len();
        let empty = (0..n).any(|j| {
            j != server && self.load[j].load(Ordering::SeqCst) == 0 && !self.recently_failed(j)
        });
        if !empty {
            return false;
        }
        let l = &self.load[server];
        let mut cur = l.load(Ordering::SeqCst);
        while cur > 1 {
            match l.compare_exchange(cur, cur - 1, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(_) => return true,
                Err(now) => cur = now,
            }
        }
        false
    }

    /// One pooled connection: dial, serve, and dial again, until stopped.
    async fn connection(self: Arc<Self>, slot: usize, fatal: mpsc::Sender<DialError>) {
        let (id, pool, n) = (&self.config.id, self.config.pool, self.dialers.len());
        let mut backoff = Backoff::new();
        let mut avoid = None;
        // Dials failed in a row: the delay applies once every server failed.
        let mut failures = 0;
        loop {
            let server = self.pick(slot, avoid);
            let url = &self.config.servers[server];
            let dialed = tokio::select! {
                r = self.dialers[server].dial() => r,
                () = self.stop.cancelled() => return,
            };
            let redial_now;
            match dialed {
                Ok((ws, gone)) => {
                    failures = 0;
                    self.failed.lock().unwrap_or_else(|e| e.into_inner())[server] = None;
                    self.load[server].fetch_add(1, Ordering::SeqCst);
                    let up = Instant::now();
                    let session =
                        Arc::new(wsmux::Session::client(ws, self.config.session_config()));
                    tracing::info!(agent = %id, conn = slot, "connection {slot}/{pool} registered at {url}");
                    self.announce(url);
                    let conn_streams = Gauge::default();
                    let end = self
                        .accept_loop(&session, slot, server, &conn_streams)
                        .await;
                    if !matches!(end, End::Rebalance) {
                        self.load[server].fetch_sub(1, Ordering::SeqCst);
                    }
                    match end {
                        End::Stopped => {
                            self.release.cancelled().await;
                            drop(session);
                            let _ = tokio::time::timeout(CLOSE_WAIT, gone).await;
                            return;
                        }
                        End::PeerGoAway | End::Rebalance => {
                            if matches!(end, End::Rebalance) {
                                tracing::info!(
                                    agent = %id,
                                    conn = slot,
                                    "connection {slot}/{pool} moves from {url} to a server with none of this agent's connections"
                                );
                            } else {
                                tracing::info!(
                                    agent = %id,
                                    conn = slot,
                                    open = conn_streams.get(),
                                    "gateway sent GOAWAY: its open streams go on, a new connection takes new ones"
                                );
                            }
                            // Keep the session until its streams are done,
                            // the gateway closes it, or the agent stops.
                            let release = self.release.clone();
                            tokio::spawn(async move {
                                tokio::select! {
                                    () = conn_streams.zero() => {}
                                    _ = session.closed() => {}
                                    () = release.cancelled() => {}
                                }
                                drop(session);
                                let _ = tokio::time::timeout(CLOSE_WAIT, gone).await;
                            });
                            // Another server takes over at once; a lone
                            // server that is going away is dialed after
                            // the delay.
                            redial_now = n > 1;
                            avoid = matches!(end, End::PeerGoAway).then_some(server);
                        }
                        End::Failed(e) => {
                            tracing::warn!(agent = %id, conn = slot, "connection {slot}/{pool} lost: {e}");
                            redial_now = n > 1;
                            avoid = Some(server);
                        }
                    }
                    if up.elapsed() >= backoff::STABLE {
                        backoff.reset();
                    }
                }
                Err(e) if e.is_permanent() => {
                    let _ = fatal.try_send(e);
                    return;
                }
                Err(e) => {
                    tracing::warn!(agent = %id, conn = slot, "cannot register at {url}: {e}");
                    self.failed.lock().unwrap_or_else(|e| e.into_inner())[server] =
                        Some(Instant::now());
                    avoid = Some(server);
                    failures += 1;
                    // Other servers are tried at once; the delay comes once
                    // every one of them failed in a row.
                    redial_now = failures < n;
                    if failures >= n {
                        failures = 0;
                    }
                }
            }
            if redial_now {
                continue;
            }
            let delay = backoff.next_delay();
            tracing::info!(agent = %id, conn = slot, "connection {slot}/{pool}: dialing again in {:.1}s", delay.as_secs_f64());
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = self.stop.cancelled() => return,
            }
        }
    }

    /// Prints `agent ID registered at URL` on stdout, once per process.
    fn announce(&self, url: &WsUrl) {
        if self.announced.swap(true, Ordering::SeqCst) {
            return;
        }
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "agent {} registered at {}", self.config.id, url);
        let _ = out.flush();
    }

    /// Accepts streams until the session ends or the agent stops; each
    /// stream is served on its own task, so accepting never waits for one.
    async fn accept_loop(
        self: &Arc<Self>,
        session: &Arc<wsmux::Session>,
        slot: usize,
        server: usize,
        conn_streams: &Gauge,
    ) -> End {
        let mut stopping = false;
        let spread = self.dialers.len() > 1;
        let mut look = tokio::time::interval_at(
            tokio::time::Instant::now() + REBALANCE_EVERY,
            REBALANCE_EVERY,
        );
        loop {
            let accepted = tokio::select! {
                biased;
                () = self.stop.cancelled(), if !stopping => {
                    stopping = true;
                    session.goaway();
                    continue;
                }
                _ = look.tick(), if spread && !stopping => {
                    if self.should_move(server) {
                        session.goaway();
                        return End::Rebalance;
                    }
                    continue;
                }
                r = session.accept() => r,
            };
            match accepted {
                Ok(stream) => {
                    let guards = (self.streams.enter(), conn_streams.enter());
                    let agent = self.clone();
                    tokio::spawn(async move {
                        agent.serve_stream(stream, slot).await;
                        drop(guards);
                    });
                }
                Err(_) if stopping => return End::Stopped,
                Err(wsmux::Error::PeerGoAway) => return End::PeerGoAway,
                Err(e) => return End::Failed(e),
            }
        }
    }

    async fn serve_stream(&self, stream: wsmux::Stream, slot: usize) {
        let id = &self.config.id;
        let sid = stream.id();
        let rules = Rules {
            id,
            allow: &self.config.allow,
            open_timeout: OPEN_TIMEOUT,
            connect_timeout: self.config.connect_timeout,
            udp_idle: relay::UDP_IDLE,
        };
        let outcome = serve::serve(stream, &rules).await;
        let word = outcome.word();
        match outcome {
            Outcome::BadOpen(why) => tracing::warn!(
                agent = %id, conn = slot, stream = sid, outcome = word,
                "stream {sid}: bad open request, reset with {:#x}: {why}",
                proto::RESET_BAD_OPEN
            ),
            Outcome::OpenTimeout => tracing::warn!(
                agent = %id, conn = slot, stream = sid, outcome = word,
                "stream {sid}: no open request within {OPEN_TIMEOUT:?}, reset with {:#x}",
                proto::RESET_OPEN_TIMEOUT
            ),
            Outcome::Gone(e) => tracing::info!(
                agent = %id, conn = slot, stream = sid, outcome = word,
                "stream {sid}: ended before its open request: {e}"
            ),
            Outcome::Refused(dest, reply) => tracing::info!(
                agent = %id, conn = slot, stream = sid, dest = %dest, outcome = word,
                "stream {sid} {dest}: refused: {}", reply.message
            ),
            Outcome::Relayed {
                dest,
                addr,
                sent,
                received,
                error,
            } => {
                let unit = if dest.scheme == proto::Scheme::Udp {
                    "datagrams"
                } else {
                    "bytes"
                };
                match error {
                    None => tracing::info!(
                        agent = %id, conn = slot, stream = sid, dest = %dest, %addr, outcome = word, sent, received,
                        "stream {sid} {dest} ({addr}): closed, {sent} {unit} sent, {received} received"
                    ),
                    Some(e) => tracing::warn!(
                        agent = %id, conn = slot, stream = sid, dest = %dest, %addr, outcome = word, sent, received,
                        "stream {sid} {dest} ({addr}): aborted ({e}), {sent} {unit} sent, {received} received"
                    ),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(allow: &[&str]) -> Config {
        Config {
            servers: vec!["ws://gw.example:8080/agent".parse().unwrap()],
            id: "site-a".into(),
            token: Some("8f2c".into()),
            allow: AllowList::parse(allow).unwrap(),
            tls: TlsFiles::default(),
            pool: 2,
            keepalive: Some(Duration::from_secs(15)),
            drain: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
        }
    }

    #[test]
    fn registration_headers_follow_the_spec() {
        let c = config(&[
            "tcp://10.0.0.0/8:*",
            "http://127.0.0.1:8081",
            "udp://10.0.0.2:53",
        ]);
        let h = c.registration_headers();
        let get = |n: &str| {
            h.iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(n))
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("authorization"), Some("Bearer 8f2c"));
        assert_eq!(get(proto::ID_HEADER), Some("site-a"));
        let allow = get(proto::ALLOW_HEADER).unwrap();
        assert_eq!(
            allow,
            "tcp://10.0.0.0/8:*, http://127.0.0.1:8081, udp://10.0.0.2:53"
        );
        // The gateway reads back the same list.
        assert_eq!(AllowList::from_header(allow).unwrap(), c.allow);
        // No patterns, no header (it is optional).
        assert_eq!(get_none(&config(&[])), None);
        // A certificate-only agent sends no Authorization.
        let c = Config {
            token: None,
            ..config(&[])
        };
        assert!(c
            .registration_headers()
            .iter()
            .all(|(k, _)| !k.eq_ignore_ascii_case("authorization")));
    }

    fn get_none(c: &Config) -> Option<String> {
        c.registration_headers()
            .into_iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(proto::ALLOW_HEADER))
            .map(|(_, v)| v)
    }

    #[test]
    fn tokens_and_ids_are_checked_before_dialing() {
        assert!(check_token("8f2c-AZ_az.~+/=").is_ok());
        assert!(check_token("").is_err());
        assert!(check_token("a b").is_err());
        assert!(check_token("a\r\nX-Evil: 1").is_err());
        assert!(Agent::new(config(&[])).is_ok());
        let mut c = config(&[]);
        c.id = ".hidden".into();
        assert!(Agent::new(c).is_err());
    }

    #[test]
    fn keepalive_detects_a_dead_link_within_two_intervals() {
        let c = config(&[]).session_config();
        let i = c.keepalive_interval.unwrap();
        assert_eq!(i, Duration::from_secs(15));
        // Next PING at most one interval after the last answer; dead one
        // timeout after that PING: two intervals after the last frame.
        assert!(i + c.keepalive_timeout <= 2 * i);
        assert_eq!(mux_config(None).keepalive_interval, None);
    }

    #[tokio::test]
    async fn the_gauge_wakes_at_zero() {
        let g = Gauge::default();
        let a = g.enter();
        let b = g.enter();
        let waiter = tokio::spawn({
            let g = g.clone();
            async move { g.zero().await }
        });
        drop(a);
        assert_eq!(g.get(), 1);
        drop(b);
        waiter.await.unwrap();
        g.zero().await;
    }
}
