//! `wsbench` — the load generator, TCP echo server and comparison driver of
//! the wsgate benchmark. See bench/README.md.

mod agents;
mod auth;
mod compare;
mod echo;
mod http;
mod load;
mod procs;
mod proto;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use crate::load::Timing;
use crate::proto::Target;

#[derive(Parser)]
#[command(
    name = "wsbench",
    version,
    about = "wsgate benchmark: load generator, echo server, comparison"
)]
struct Cli {
    /// Tokio worker threads of this process.
    #[arg(long, global = true, default_value_t = 2)]
    threads: usize,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// TCP echo server; prints `listening on IP:PORT` once bound.
    Echo {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: String,
    },
    /// Run one test against one target and print its result.
    Load(LoadArgs),
    /// Start every contender, run every test for several rounds, print the table.
    Compare(compare::Args),
    /// Handshakes per second of one endpoint with credentials (headers, a TLS
    /// client certificate), and the CPU a process spent per handshake.
    Handshakes(auth::Args),
    /// Register many agents at a gateway (ids PREFIX-0..N-1) and hold them:
    /// prints `registered N agents: RSS A KiB -> B KiB, X KiB per agent`
    /// (RSS of --pid), then holds them until killed.
    Agents {
        /// HOST:PORT of the gateway's listener.
        #[arg(long)]
        addr: String,
        #[arg(long, default_value = "/agent")]
        path: String,
        #[arg(long, default_value_t = 1000)]
        count: usize,
        #[arg(long, default_value = "bench")]
        prefix: String,
        /// The token every id is registered with.
        #[arg(long)]
        token: String,
        /// The gateway's process id (its RSS is read before and after).
        #[arg(long)]
        pid: u32,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
    },
    /// (c) for several targets at once, interleaved (20 ms slices, round-robin):
    /// one `TARGET p50 X us, p99 Y us (N samples)` line per target.
    LatencyMulti(LatencyMultiArgs),
}

#[derive(clap::Args)]
struct LatencyMultiArgs {
    /// ws://IP:PORT[/path] or tcp://IP:PORT; repeatable.
    #[arg(long, required = true)]
    target: Vec<Target>,
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Seconds measured per target (after the warm-up, also per target).
    #[arg(long, default_value_t = 1.5)]
    duration: f64,
    #[arg(long, default_value_t = 0.2)]
    warmup: f64,
    /// Milliseconds of ping-pong on one target before moving to the next.
    #[arg(long, default_value_t = 20)]
    slice_ms: u64,
}

#[derive(Clone, Copy, ValueEnum)]
enum Test {
    /// (a) 1 connection, big messages, windowed: MB/s.
    Throughput,
    /// (b) small messages, N in flight per connection: msgs/s.
    Messages,
    /// (c) strict ping-pong: p50/p99.
    Latency,
    /// (d) open N idle connections, report RSS growth of --pid.
    Idle,
    /// (e) connect + handshake + one echo + close, from N workers: per second.
    Handshakes,
    /// HTTP/1.1 GET over N keep-alive connections (tcp:// target): 200 answers
    /// per second; `--path` is the request target, `--header` adds headers.
    Http,
}

#[derive(clap::Args)]
struct LoadArgs {
    /// ws://IP:PORT[/path] or tcp://IP:PORT.
    #[arg(long)]
    target: Target,
    #[arg(long, value_enum)]
    test: Test,
    /// Connections (messages, idle) or workers (handshakes).
    #[arg(long, default_value_t = 1)]
    conns: usize,
    /// Message size in bytes (default: 65536 for throughput, 64 otherwise;
    /// 0 for the idle test: handshake only, no echo).
    #[arg(long)]
    size: Option<usize>,
    /// Messages in flight per connection (messages test).
    #[arg(long, default_value_t = 16)]
    inflight: usize,
    /// Messages in flight (throughput test).
    #[arg(long, default_value_t = 4)]
    window: usize,
    /// Seconds measured after the warm-up.
    #[arg(long, default_value_t = 2.0)]
    duration: f64,
    #[arg(long, default_value_t = 0.5)]
    warmup: f64,
    /// Connections being opened at once (idle test).
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,
    /// Process whose RSS the idle test reads.
    #[arg(long)]
    pid: Option<u32>,
    /// HTTP test: the request target (`/x`, or `http://HOST:PORT/x` for a
    /// forward proxy).
    #[arg(long, default_value = "/")]
    path: String,
    /// HTTP test: the Host header (default: the target's address, or the
    /// authority of an absolute-form --path).
    #[arg(long)]
    host: Option<String>,
    /// HTTP test: an extra header, `Name: value` (repeatable).
    #[arg(long)]
    header: Vec<String>,
    /// HTTP test: send one request, print the status and body, exit.
    #[arg(long)]
    check: bool,
}

fn runtime(threads: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = runtime(cli.threads);
    let r = match cli.cmd {
        Cmd::Echo { listen } => rt.block_on(async {
            let l = tokio::net::TcpListener::bind(&listen).await?;
            println!("listening on {}", l.local_addr()?);
            echo::serve(l).await
        }),
        Cmd::Load(a) => rt.block_on(load_one(a)),
        Cmd::Compare(a) => rt.block_on(compare::main(a)),
        Cmd::LatencyMulti(a) => rt.block_on(latency_multi(a)),
        Cmd::Handshakes(a) => rt.block_on(auth::main(a)),
        Cmd::Agents {
            addr,
            path,
            count,
            prefix,
            token,
            pid,
            concurrency,
        } => rt.block_on(async {
            let before = load::rss_kib(pid)?;
            let sessions =
                agents::register_many(&addr, &path, &prefix, &token, count, concurrency).await?;
            tokio::time::sleep(Duration::from_secs(2)).await;
            let after = load::rss_kib(pid)?;
            println!(
                "registered {} agents: RSS {before} KiB -> {after} KiB, {:.1} KiB per agent",
                sessions.len(),
                (after as f64 - before as f64) / sessions.len() as f64
            );
            use std::io::Write as _;
            std::io::stdout().flush()?;
            std::future::pending::<()>().await;
            Ok(())
        }),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wsbench: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn load_one(a: LoadArgs) -> anyhow::Result<()> {
    let timing = Timing {
        warmup: Duration::from_secs_f64(a.warmup),
        duration: Duration::from_secs_f64(a.duration),
    };
    let t = &a.target;
    match a.test {
        Test::Throughput => {
            let size = a.size.unwrap_or(64 * 1024);
            let r = load::throughput(t, size, a.window, timing).await?;
            println!("{:.1} MB/s", r / 1e6);
        }
        Test::Messages => {
            let size = a.size.unwrap_or(64);
            let r = load::messages_rate(t, a.conns, size, a.inflight, timing).await?;
            println!("{r:.0} msgs/s");
        }
        Test::Latency => {
            let l = load::latency(t, a.size.unwrap_or(64), timing).await?;
            println!(
                "p50 {:.1} us, p99 {:.1} us ({} samples)",
                l.p50_us, l.p99_us, l.samples
            );
        }
        Test::Handshakes => {
            let h = load::handshakes(t, a.conns, a.size.unwrap_or(64), timing).await?;
            println!("{:.0} connections/s ({} errors)", h.per_sec, h.errors);
        }
        Test::Http => {
            let host = a.host.clone().unwrap_or_else(|| {
                a.path
                    .strip_prefix("http://")
                    .map(|r| r.split('/').next().unwrap_or(r).to_string())
                    .unwrap_or_else(|| t.addr().to_string())
            });
            let req = http::request(&a.path, &host, &a.header);
            if a.check {
                let ans = http::once(t.addr(), &req).await?;
                println!(
                    "{} {}",
                    ans.status,
                    String::from_utf8_lossy(&ans.body).trim()
                );
                if ans.status != 200 {
                    anyhow::bail!("answered {}", ans.status);
                }
                return Ok(());
            }
            let r = http::rate(t.addr(), req, a.conns, timing).await?;
            println!("{:.0} requests/s ({} errors)", r.per_sec, r.errors);
        }
        Test::Idle => {
            let pid = a.pid.ok_or_else(|| anyhow::anyhow!("--pid is needed"))?;
            let before = load::rss_kib(pid)?;
            let conns =
                load::open_idle(t, a.conns, a.connect_concurrency, a.size.unwrap_or(64)).await?;
            tokio::time::sleep(Duration::from_secs(1)).await;
            let after = load::rss_kib(pid)?;
            println!(
                "{} connections: RSS {before} KiB -> {after} KiB, {:.1} KiB per connection",
                conns.len(),
                (after as f64 - before as f64) / conns.len() as f64
            );
        }
    }
    Ok(())
}

async fn latency_multi(a: LatencyMultiArgs) -> anyhow::Result<()> {
    let timing = Timing {
        warmup: Duration::from_secs_f64(a.warmup),
        duration: Duration::from_secs_f64(a.duration),
    };
    let ls =
        load::latency_interleaved(&a.target, a.size, Duration::from_millis(a.slice_ms), timing)
            .await?;
    for (t, l) in a.target.iter().zip(ls) {
        println!(
            "{t} p50 {:.1} us, p99 {:.1} us ({} samples)",
            l.p50_us, l.p99_us, l.samples
        );
    }
    Ok(())
}

/// The benchmark's output folder default.
fn default_out() -> PathBuf {
    PathBuf::from("bench/results")
}
