//! The command line: `wsgate serve`, `wsgate check`, `wsgate agent` and
//! `wsgate connect`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use wsgate_framing::FramingSpec;

use crate::config::{
    self, BackendAddr, BackendTlsFiles, Backends, Balance, Config, Limits, ListenerConfig, Matcher,
    Route, Target, TlsFiles,
};

/// WebSocket gateway: bridges WebSocket clients to TCP, UDP and Unix peers.
#[derive(Debug, Parser)]
#[command(name = "wsgate", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway, from a config file or from one route given as flags.
    ///
    /// Once every listener is bound, prints `listening on ws://HOST:PORT`
    /// (or `wss://`) per listener on stdout. SIGINT/SIGTERM: stop accepting,
    /// close every WebSocket with 1001, wait for them (drain timeout), exit 0.
    Serve(Box<ServeArgs>),
    /// Validate a config file: print every error as FILE:LINE:COLUMN: KEY: MESSAGE
    /// and exit non-zero if there is any.
    Check {
        /// The TOML config file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run a tunnel agent: dial out to a gateway, register under an id, and
    /// serve the streams the gateway opens, each checked against --allow.
    ///
    /// Prints `agent ID registered at URL` on stdout once the first connection
    /// is registered. SIGINT/SIGTERM: GOAWAY, wait for open streams (--drain),
    /// exit 0. A registration refused with 400, 401 or 403 exits 1.
    Agent(Box<AgentArgs>),
    /// Reach a destination through a gateway's /mux: listen locally (or use
    /// stdin/stdout) and carry each connection as one stream.
    ///
    /// With --listen, prints `listening on tcp://HOST:PORT` (or udp://) once
    /// bound. With --stdio, stdout carries only the stream's bytes.
    Connect(Box<ConnectArgs>),
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// The TOML config file (see examples/). Not combined with the route flags.
    #[arg(long, short, conflicts_with_all = ["listen", "to", "backend_ca", "agent_tokens", "forward", "mux_allow", "deflate", "deflate_config"])]
    config: Option<PathBuf>,
    /// Address to listen on, HOST:PORT (port 0 picks a free one). Repeatable.
    #[arg(long, value_name = "HOST:PORT")]
    listen: Vec<String>,
    /// The peer: tcp://HOST:PORT, udp://HOST:PORT, unix:/PATH, unix-dgram:/PATH or echo:
    /// (bridge), or ws://HOST:PORT / http://HOST:PORT (reverse proxy to a backend;
    /// wss:// / https:// for a backend spoken to over TLS).
    #[arg(long, value_name = "PEER")]
    to: Option<String>,
    /// Reverse tunnel: the agent token file (`ID TOKEN` lines). Enables agent
    /// registration at /agent, the wsp relay at /request, and the forward
    /// proxy (absolute-form requests, CONNECT) through the agents; these paths
    /// come before --to's route.
    #[arg(long, value_name = "FILE")]
    agent_tokens: Option<PathBuf>,
    /// A listener whose every connection (or `udp://` flow) is one stream to
    /// PEER through agent ID: `[udp://]HOST:PORT=agent://ID/PEER`. Repeatable;
    /// prints `forwarding tcp://HOST:PORT to agent://ID/PEER` once bound.
    #[arg(long, value_name = "LISTEN=agent://ID/PEER")]
    forward: Vec<String>,
    /// Enables /mux (a WebSocket carrying a wsmux session) and allows its
    /// streams to name destinations matching PATTERN, e.g.
    /// `agent://site-a/tcp://*:*` or `tcp://10.0.0.0/8:22` (repeatable; none:
    /// /mux is off).
    #[arg(long, value_name = "PATTERN")]
    mux_allow: Vec<String>,
    /// Keepalive towards agents and /mux clients: a PING this often; a link
    /// silent for twice as long is dead.
    #[arg(long, value_name = "DURATION")]
    keepalive: Option<String>,
    /// How peer bytes become messages: binary, auto, lines, length-prefixed, resp, cql, kafka.
    #[arg(long, default_value = "auto")]
    framing: String,
    /// Configuration for the framing (e.g. `separator=\r\n` for lines, `u16,keep-header`).
    #[arg(long, default_value = "")]
    framing_config: String,
    /// Negotiate permessage-deflate (RFC 7692) on the --to route (a bridge
    /// or echo: peer) and on /mux.
    #[arg(long)]
    deflate: bool,
    /// permessage-deflate settings, comma-separated:
    /// server_no_context_takeover, client_no_context_takeover,
    /// server_max_window_bits=8..15, client_max_window_bits=8..15,
    /// min_size=BYTES (smaller messages go uncompressed; default 64),
    /// level=0..9 (default 6). Implies --deflate.
    #[arg(long, value_name = "KEY[=VALUE],...")]
    deflate_config: Option<String>,
    /// A subprotocol the route speaks (repeatable; `*` accepts any). Clients
    /// offering none of them get 400.
    #[arg(long = "protocol", value_name = "NAME")]
    protocols: Vec<String>,
    /// PEM certificate chain: serve wss://.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// PEM CA certificates a wss:// / https:// backend's certificate must chain
    /// to (default: the built-in Mozilla roots).
    #[arg(long, value_name = "PEM")]
    backend_ca: Option<PathBuf>,
    /// Largest message, e.g. 16MiB (close 1009 past it).
    #[arg(long)]
    max_message_size: Option<String>,
    /// Close a WebSocket idle this long (e.g. 5m); off by default.
    #[arg(long)]
    idle_timeout: Option<String>,
    /// Ping clients this often (e.g. 30s); off by default.
    #[arg(long)]
    ping_interval: Option<String>,
    /// Most WebSockets at once (503 past it).
    #[arg(long)]
    max_connections: Option<usize>,
    /// New connections per client address, e.g. `20/s` or `600/m burst 50` (429 past it).
    #[arg(long)]
    per_ip_rate: Option<String>,
    /// Concurrent WebSockets per client address (429 past it).
    #[arg(long)]
    per_ip_max_connections: Option<usize>,
    /// Serve Prometheus metrics at http://HOST:PORT/metrics (printed as `admin on http://...`).
    #[arg(long, value_name = "HOST:PORT")]
    admin: Option<String>,
    /// Worker threads, each with its own event loop; new connections go to
    /// the least busy (default: one per CPU; overrides `workers` in the config file).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024))]
    workers: Option<u16>,
    /// Log filter (also RUST_LOG), e.g. info, debug, wsgate=trace.
    #[arg(long, env = "WSGATE_LOG", default_value = "info")]
    log: String,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => match config::load(&config) {
            Ok(c) => {
                println!(
                    "{}: ok ({} listener(s), {} route(s))",
                    config.display(),
                    c.listeners.len(),
                    c.routes.len()
                );
                ExitCode::SUCCESS
            }
            Err(errors) => {
                eprintln!("{errors}");
                ExitCode::from(1)
            }
        },
        Command::Agent(args) => agent_main(&args),
        Command::Connect(args) => connect_main(&args),
        Command::Serve(args) => {
            let _log_guard = init_logging(&args.log);
            let config = match build_config(&args) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    return ExitCode::from(2);
                }
            };
            // The main thread runs signals, the admin listener, health checks
            // and housekeeping; connections run on the worker threads.
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime");
            match rt.block_on(serve(config, &args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

/// Logs go to stderr through a background writer, so connection tasks never
/// block on (or pay a system call for) a log line. The returned guard flushes
/// what is queued when dropped at exit.
fn init_logging(filter: &str) -> tracing_appender::non_blocking::WorkerGuard {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| filter.to_string());
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .finish(std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(writer)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
    guard
}

fn build_config(a: &ServeArgs) -> anyhow::Result<Config> {
    let mut config = config_from(a)?;
    if let Some(n) = a.workers {
        config.workers = Some(n.into());
    }
    Ok(config)
}

fn config_from(a: &ServeArgs) -> anyhow::Result<Config> {
    if let Some(path) = &a.config {
        return config::load(path).map_err(|e| anyhow::anyhow!("{e}"));
    }
    let tunnel = tunnel_from(a)?;
    let serves_tunnel = tunnel.agents() || tunnel.mux();
    if a.to.is_none() && !serves_tunnel {
        anyhow::bail!(
            "give --config FILE, or --listen HOST:PORT and --to PEER (or --agent-tokens, --mux-allow)"
        );
    }
    if a.listen.is_empty() {
        anyhow::bail!("--to needs at least one --listen HOST:PORT");
    }
    let target = match a.to.as_deref() {
        None => None,
        Some(to)
            if ["ws://", "wss://", "http://", "https://"]
                .iter()
                .any(|s| to.starts_with(s)) =>
        {
            let addr: BackendAddr = to.parse().map_err(|e| anyhow::anyhow!("--to: {e}"))?;
            Some(Target::Proxy(Backends {
                addrs: vec![addr],
                balance: Balance::RoundRobin,
            }))
        }
        Some(to) => {
            let peer: config::PeerAddr = to.parse().map_err(|e| anyhow::anyhow!("--to: {e}"))?;
            if matches!(peer, config::PeerAddr::Agent(_)) && !tunnel.agents() {
                anyhow::bail!("--to {to}: an agent:// peer needs --agent-tokens");
            }
            Some(Target::Static(peer))
        }
    };
    let framing = FramingSpec::parse(&a.framing, &a.framing_config)
        .map_err(|e| anyhow::anyhow!("--framing: {e}"))?;
    let deflate = deflate_from(a)?;
    if deflate.is_some() && matches!(target, Some(Target::Proxy(_))) {
        anyhow::bail!(
            "--deflate: a proxied route passes permessage-deflate through to its backend; \
             --deflate applies to bridge peers and echo:"
        );
    }
    let tls = match (&a.tls_cert, &a.tls_key) {
        (Some(cert), Some(key)) => Some(TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
        }),
        _ => None,
    };
    let mut limits = Limits::default();
    if let Some(s) = &a.max_message_size {
        limits.max_message_size =
            config::parse_size(s).map_err(|e| anyhow::anyhow!("--max-message-size: {e}"))?;
    }
    if let Some(s) = &a.idle_timeout {
        limits.idle_timeout =
            config::parse_duration(s).map_err(|e| anyhow::anyhow!("--idle-timeout: {e}"))?;
    }
    if let Some(s) = &a.ping_interval {
        limits.ping_interval =
            config::parse_duration(s).map_err(|e| anyhow::anyhow!("--ping-interval: {e}"))?;
    }
    if let Some(n) = a.max_connections {
        limits.max_connections = n;
    }
    if let Some(r) = &a.per_ip_rate {
        limits.per_ip_rate = Some(
            r.parse()
                .map_err(|e| anyhow::anyhow!("--per-ip-rate: {e}"))?,
        );
    }
    limits.per_ip_max_connections = a.per_ip_max_connections;
    Ok(Config {
        listeners: a
            .listen
            .iter()
            .map(|address| ListenerConfig {
                address: address.clone(),
                tls: tls.clone(),
                handshake_timeout: None,
                admission: Default::default(),
                client_auth: None,
            })
            .collect(),
        limits: limits.clone(),
        routes: target
            .map(|target| Route {
                name: "default".into(),
                matcher: Matcher::default(),
                protocols: a.protocols.clone(),
                target,
                framing,
                limits,
                limits_by_listener: vec![],
                admission: Default::default(),
                health_check: None,
                auth: Default::default(),
                deflate,
            })
            .into_iter()
            .collect(),
        health_path: "/healthz".into(),
        forwarding: Default::default(),
        admin: a.admin.clone(),
        workers: None,
        backend_tls: match &a.backend_ca {
            Some(ca) => {
                // Checked now, so a bad file is the flag's error.
                crate::tls::backend_client_config(Some(ca), None).context("--backend-ca")?;
                Some(BackendTlsFiles {
                    ca: Some(ca.clone()),
                    identity: None,
                })
            }
            None => None,
        },
        tunnel,
        auth: vec![],
        cluster: None,
    })
}

/// `--deflate` and `--deflate-config`: the settings, or `None`.
fn deflate_from(a: &ServeArgs) -> anyhow::Result<Option<wsframe::deflate::Config>> {
    match &a.deflate_config {
        Some(s) => wsframe::deflate::Config::parse_list(s)
            .map(Some)
            .map_err(|e| anyhow::anyhow!("--deflate-config: {e}")),
        None => Ok(a.deflate.then(Default::default)),
    }
}

/// `[tunnel]` from the quick-mode flags, checked as the config file's is.
fn tunnel_from(a: &ServeArgs) -> anyhow::Result<config::Tunnel> {
    let mut t = config::Tunnel {
        deflate: deflate_from(a)?,
        ..Default::default()
    };
    if let Some(p) = &a.agent_tokens {
        config::check_tokens(p).map_err(|e| anyhow::anyhow!("--agent-tokens: {e}"))?;
        t.agent_tokens = Some(p.clone());
    }
    config::check_mux_allow(&a.mux_allow).map_err(|e| anyhow::anyhow!("--mux-allow: {e}"))?;
    t.mux_allow = a.mux_allow.clone();
    for f in &a.forward {
        let f: config::Forward = f.parse().map_err(|e| anyhow::anyhow!("--forward: {e}"))?;
        if !t.agents() {
            anyhow::bail!(
                "--forward {}: forwarding through agents needs --agent-tokens",
                f.listen
            );
        }
        t.forwards.push(f);
    }
    if let Some(k) = &a.keepalive {
        t.keepalive = config::parse_duration(k)
            .map_err(|e| anyhow::anyhow!("--keepalive: {e}"))?
            .ok_or_else(|| anyhow::anyhow!("--keepalive: must be more than 0"))?;
    }
    Ok(t)
}

async fn serve(config: Config, args: &ServeArgs) -> anyhow::Result<()> {
    // Signal handlers first: a signal right after the "listening" line must
    // already mean "shut down in order".
    let mut signals = Signals::new()?;
    let mut watch = crate::reload::Watch::new(args.config.as_ref(), &config);
    let server = crate::Server::start(config).await?;
    {
        let mut out = std::io::stdout().lock();
        for url in server.urls() {
            writeln!(out, "listening on {url}")?;
        }
        if let Some(admin) = server.admin() {
            writeln!(out, "admin on http://{admin}")?;
        }
        for (url, to) in server.forwards() {
            writeln!(out, "forwarding {url} to {to}")?;
        }
        out.flush()?;
    }
    let mut poll = tokio::time::interval(crate::reload::POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let why = tokio::select! {
            s = signals.next() => match s {
                Signal::Stop => break,
                Signal::Reload => "SIGHUP",
            },
            _ = poll.tick() => {
                if !watch.poll() {
                    continue;
                }
                "a watched file changed"
            }
        };
        // Read everything again: the file, or the files the flags name.
        match build_config(args) {
            Err(e) => tracing::error!("reload ({why}) refused, running settings kept: {e:#}"),
            Ok(config) => {
                let next_watch = crate::reload::Watch::new(args.config.as_ref(), &config);
                match server.reload(config) {
                    Ok(()) => {
                        watch = next_watch;
                        tracing::info!("reloaded ({why})");
                    }
                    Err(e) => {
                        tracing::error!("reload ({why}) refused, running settings kept: {e:#}")
                    }
                }
            }
        }
    }
    tracing::info!(open = server.gateway().active(), "shutting down");
    server.stop().await;
    Ok(())
}

/// What a signal asks for.
enum Signal {
    Stop,
    Reload,
}

struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            hup: signal(SignalKind::hangup()).context("installing the SIGHUP handler")?,
        })
    }

    /// Until SIGTERM or SIGINT (SIGHUP is ignored).
    async fn wait(mut self) {
        while !matches!(self.next().await, Signal::Stop) {}
    }

    async fn next(&mut self) -> Signal {
        tokio::select! {
            _ = self.term.recv() => Signal::Stop,
            _ = self.int.recv() => Signal::Stop,
            _ = self.hup.recv() => Signal::Reload,
        }
    }
}

#[derive(Debug, Args)]
struct AgentArgs {
    /// The gateway's agent registration URL, ws:// or wss:// (e.g.
    /// ws://gw.example:8080/agent). Repeatable: the nodes of a cluster; the
    /// pool is spread over them (at least two different ones when given).
    #[arg(long, value_name = "URL", required = true)]
    server: Vec<String>,
    /// The id to register under: 1-64 of A-Z a-z 0-9 . _ -, not starting with a dot.
    #[arg(long)]
    id: String,
    /// A file holding the bearer token the gateway's agent token file lists
    /// for this id, or a JWT of one of its `agent_auth` methods (surrounding
    /// whitespace is ignored). Optional with --client-cert: the certificate
    /// is then the agent's identity.
    #[arg(long, value_name = "FILE", required_unless_present = "client_cert")]
    token_file: Option<PathBuf>,
    /// A destination streams may reach, SCHEME://HOST:PORT: SCHEME tcp, udp,
    /// http or *; HOST a name glob (*.internal), an address or a CIDR block
    /// (10.0.0.0/8, [fd00::/8]); PORT a number, a range (8000-8100) or *.
    /// Repeatable; nothing is allowed without one.
    #[arg(long = "allow", value_name = "PATTERN")]
    allow: Vec<String>,
    /// WebSockets kept registered at once, each with its own reconnect loop.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    pool: u16,
    /// PEM CA certificates the gateway's certificate must chain to (wss://;
    /// default: the built-in Mozilla roots).
    #[arg(long, value_name = "PEM")]
    ca: Option<PathBuf>,
    /// PEM client certificate chain shown to the gateway (mutual TLS).
    #[arg(long, value_name = "PEM", requires = "client_key")]
    client_cert: Option<PathBuf>,
    /// PEM private key for --client-cert.
    #[arg(long, value_name = "PEM", requires = "client_cert")]
    client_key: Option<PathBuf>,
    /// Ping the gateway this often (wsmux PING); a gateway silent for two
    /// intervals is declared dead and the connection dialed again. `off`
    /// disables it.
    #[arg(long, default_value = "15s", value_name = "DURATION")]
    keepalive: String,
    /// On SIGTERM/SIGINT, wait this long for open streams to finish.
    #[arg(long, default_value = "10s", value_name = "DURATION")]
    drain: String,
    /// Resolving and connecting to a destination; past it the stream is
    /// answered TIMEOUT.
    #[arg(long, default_value = "10s", value_name = "DURATION")]
    connect_timeout: String,
    /// Log filter (also RUST_LOG), e.g. info, debug, wsgate=trace. Logs go to stderr.
    #[arg(long, env = "WSGATE_LOG", default_value = "info")]
    log: String,
}

#[derive(Debug, Args)]
struct ConnectArgs {
    /// The gateway's /mux URL, ws:// or wss:// (e.g. ws://gw.example:8080/mux).
    #[arg(value_name = "URL")]
    url: String,
    /// What each stream reaches: agent://ID/SCHEME://HOST:PORT (through an
    /// agent) or tcp://HOST:PORT, udp://HOST:PORT (reached by the gateway).
    #[arg(long, value_name = "TARGET")]
    to: String,
    /// Listen on HOST:PORT (port 0 picks a free one): TCP, or UDP for a
    /// udp:// target; one stream per connection (or client address).
    #[arg(long, value_name = "HOST:PORT", required_unless_present = "stdio")]
    listen: Option<String>,
    /// Use stdin/stdout as the one stream (e.g. an ssh ProxyCommand); EOF on
    /// stdin half-closes it. Logs go to stderr.
    #[arg(long, conflicts_with = "listen")]
    stdio: bool,
    /// PEM CA certificates the gateway's certificate must chain to (wss://;
    /// default: the built-in Mozilla roots).
    #[arg(long, value_name = "PEM")]
    ca: Option<PathBuf>,
    /// PEM client certificate chain shown to the gateway (mutual TLS).
    #[arg(long, value_name = "PEM", requires = "client_key")]
    client_cert: Option<PathBuf>,
    /// PEM private key for --client-cert.
    #[arg(long, value_name = "PEM", requires = "client_cert")]
    client_key: Option<PathBuf>,
    /// Sent as `Authorization: Bearer TOKEN` (also WSGATE_TOKEN).
    #[arg(long, env = "WSGATE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Ping the gateway this often; a gateway silent for two intervals is
    /// declared dead. `off` disables it.
    #[arg(long, default_value = "15s", value_name = "DURATION")]
    keepalive: String,
    /// Log filter (also RUST_LOG); default info, warn with --stdio. Logs go to stderr.
    #[arg(long, env = "WSGATE_LOG")]
    log: Option<String>,
}

fn tls_files(
    ca: &Option<PathBuf>,
    cert: &Option<PathBuf>,
    key: &Option<PathBuf>,
) -> crate::agent::dial::TlsFiles {
    crate::agent::dial::TlsFiles {
        ca: ca.clone(),
        identity: cert.clone().zip(key.clone()),
    }
}

fn duration_arg(flag: &str, s: &str) -> anyhow::Result<Option<std::time::Duration>> {
    config::parse_duration(s).map_err(|e| anyhow::anyhow!("{flag}: {e}"))
}

fn agent_config(a: &AgentArgs) -> anyhow::Result<crate::agent::Config> {
    use crate::tunnel::allow::AllowList;
    let servers = a
        .server
        .iter()
        .map(|s| s.parse().map_err(|e| anyhow::anyhow!("--server: {e}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    crate::tunnel::proto::parse_id(&a.id).map_err(|e| anyhow::anyhow!("--id: {e}"))?;
    let token = match &a.token_file {
        Some(f) => {
            let token = std::fs::read_to_string(f)
                .with_context(|| format!("--token-file: cannot read {}", f.display()))?
                .trim()
                .to_string();
            crate::agent::check_token(&token)
                .map_err(|e| anyhow::anyhow!("--token-file {}: {e}", f.display()))?;
            Some(token)
        }
        None => None,
    };
    let allow = AllowList::parse(&a.allow).map_err(|e| anyhow::anyhow!("--allow: {e}"))?;
    Ok(crate::agent::Config {
        servers,
        id: a.id.clone(),
        token,
        allow,
        tls: tls_files(&a.ca, &a.client_cert, &a.client_key),
        pool: a.pool.into(),
        keepalive: duration_arg("--keepalive", &a.keepalive)?,
        drain: duration_arg("--drain", &a.drain)?.unwrap_or_default(),
        connect_timeout: duration_arg("--connect-timeout", &a.connect_timeout)?
            .context("--connect-timeout: must be more than 0")?,
    })
}

fn agent_main(a: &AgentArgs) -> ExitCode {
    let _log_guard = init_logging(&a.log);
    let agent = match agent_config(a).and_then(crate::agent::Agent::new) {
        Ok(agent) => agent,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    // This thread only waits for signals; each pooled connection runs on a
    // thread of its own (agent::spawn_link_thread). Name lookups run on
    // blocking threads that cannot be cancelled: wait for them a little.
    until_signal(
        |signal| agent.run(signal),
        |rt| rt.shutdown_timeout(std::time::Duration::from_millis(500)),
    )
}

/// Runs `main` on a single-threaded runtime until it returns (it is given
/// the future of the first SIGTERM or SIGINT), shuts the runtime down with
/// `shutdown`, and turns the result into the exit status (1 on error).
fn until_signal<F, Fut>(main: F, shutdown: impl FnOnce(tokio::runtime::Runtime)) -> ExitCode
where
    F: FnOnce(std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = rt.block_on(async {
        let signals = Signals::new()?;
        main(Box::pin(signals.wait())).await
    });
    shutdown(rt);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn connect_config(a: &ConnectArgs) -> anyhow::Result<crate::connect::Config> {
    use crate::connect::Mode;
    let url = a.url.parse().map_err(|e| anyhow::anyhow!("URL: {e}"))?;
    let target = a.to.parse().map_err(|e| anyhow::anyhow!("--to: {e}"))?;
    let mode = match &a.listen {
        Some(l) => Mode::Listen(l.clone()),
        None => Mode::Stdio,
    };
    Ok(crate::connect::Config {
        url,
        target,
        mode,
        tls: tls_files(&a.ca, &a.client_cert, &a.client_key),
        token: a.token.as_ref().map(|t| t.trim().to_string()),
        keepalive: duration_arg("--keepalive", &a.keepalive)?,
    })
}

fn connect_main(a: &ConnectArgs) -> ExitCode {
    let default_log = if a.stdio { "warn" } else { "info" };
    let _log_guard = init_logging(a.log.as_deref().unwrap_or(default_log));
    let client = match connect_config(a).and_then(crate::connect::Client::new) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    // A read of stdin may be blocked on its thread for good.
    until_signal(|signal| client.run(signal), |rt| rt.shutdown_background())
}
