//! `wsbench compare`: starts the echo server and every contender, runs each
//! test on each contender, round after round (the order rotates each round so
//! that no contender always runs first or last), and prints a Markdown table
//! of medians plus the wsgate/websocat ratios against the targets.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Context};

use crate::load::{self, progress, Timing};
use crate::procs::Proc;
use crate::proto::Target;

#[derive(clap::Args)]
pub struct Args {
    /// The wsgate binary.
    #[arg(long, default_value = "target/release/wsgate")]
    wsgate: PathBuf,
    /// An earlier wsgate binary to run beside the current one (a before/after
    /// comparison in one run); its column and a wsgate/baseline table appear.
    #[arg(long)]
    baseline: Option<PathBuf>,
    /// What the baseline is called in the table (e.g. its git commit).
    #[arg(long, default_value = "baseline")]
    baseline_label: String,
    /// The websocat binary.
    #[arg(long, default_value = "websocat")]
    websocat: PathBuf,
    /// The socat binary.
    #[arg(long, default_value = "socat")]
    socat: PathBuf,
    /// Rounds of (a), (b), (c), (e); the table shows medians.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Rounds of (d), each on freshly started bridges.
    #[arg(long, default_value_t = 3)]
    idle_rounds: usize,
    /// Seconds measured per test and contender, after the warm-up.
    #[arg(long, default_value_t = 1.5)]
    duration: f64,
    #[arg(long, default_value_t = 0.5)]
    warmup: f64,
    /// (a): messages in flight.
    #[arg(long, default_value_t = 4)]
    window: usize,
    /// (d): idle connections held.
    #[arg(long, default_value_t = 5000)]
    idle_conns: usize,
    /// (e): concurrent workers.
    #[arg(long, default_value_t = 8)]
    hs_workers: usize,
    /// Folder for results and the contenders' logs.
    #[arg(long, default_value_os_t = crate::default_out())]
    out: PathBuf,
    /// The command line to print with the table (run.sh passes its own).
    #[arg(long)]
    command: Option<String>,
}

const MIB64: usize = 64 * 1024;
const SMALL: usize = 64;
const INFLIGHT: usize = 16;
/// (c): each contender's turn in the interleaved latency run.
const LATENCY_SLICE_MS: u64 = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Who {
    Wsgate,
    Baseline,
    Websocat,
    Socat,
    Direct,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Metric {
    A,
    B1,
    B50,
    C50,
    C99,
    D,
    E,
}

struct Contender {
    who: Who,
    label: String,
    target: Target,
    _proc: Option<Proc>,
}

#[derive(Default)]
struct Results {
    values: BTreeMap<(Who, Metric), Vec<f64>>,
    errors: BTreeMap<(Who, Metric), String>,
    notes: Vec<String>,
}

impl Results {
    fn put(&mut self, who: Who, m: Metric, v: f64) {
        self.values.entry((who, m)).or_default().push(v);
    }
    fn median(&self, who: Who, m: Metric) -> Option<f64> {
        let v = self.values.get(&(who, m))?;
        if v.is_empty() {
            return None;
        }
        let mut s = v.clone();
        s.sort_by(|a, b| a.total_cmp(b));
        let n = s.len();
        Some(if n % 2 == 1 {
            s[n / 2]
        } else {
            (s[n / 2 - 1] + s[n / 2]) / 2.0
        })
    }
    fn spread(&self, who: Who, m: Metric) -> Option<(f64, f64)> {
        let v = self.values.get(&(who, m))?;
        let lo = v.iter().cloned().fold(f64::INFINITY, f64::min);
        let hi = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        (!v.is_empty()).then_some((lo, hi))
    }
}

pub async fn main(a: Args) -> anyhow::Result<()> {
    tokio::select! {
        r = run(a) => r,
        _ = shutdown_signal() => Err(anyhow!("interrupted; contenders stopped")),
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// The first line of a program's output containing `needle`.
fn version_line(argv: &[&str], needle: &str) -> String {
    std::process::Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .ok()
        .map(|o| {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .find(|l| l.contains(needle))
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}

fn path_str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

fn start_wsgate(a: &Args, echo: &str, log: &Path) -> anyhow::Result<(Proc, Target)> {
    start_wsgate_bin(&a.wsgate, echo, log)
}

fn start_wsgate_bin(bin: &Path, echo: &str, log: &Path) -> anyhow::Result<(Proc, Target)> {
    let argv: Vec<String> = [
        &path_str(bin),
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--to",
        &format!("tcp://{echo}"),
        "--framing",
        "binary",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let (p, url) = Proc::start("wsgate", &argv, log, Some("listening on "))?;
    let url = url.unwrap_or_default();
    let addr = url
        .strip_prefix("ws://")
        .ok_or_else(|| anyhow!("wsgate printed {url:?}"))?
        .parse()?;
    Ok((p, Target::ws(addr)))
}

fn start_websocat(a: &Args, echo: &str, log: &Path) -> anyhow::Result<(Proc, Target)> {
    // --binary: send binary messages; -E: on EOF of one side, close the other
    // (client Close -> TCP shutdown, peer EOF -> Close), so connections end.
    // ws-l: serves any number of clients, one TCP peer connection each.
    let argv: Vec<String> = [
        &path_str(&a.websocat),
        "--binary",
        "-E",
        "ws-l:127.0.0.1:0",
        &format!("tcp:{echo}"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let (mut p, _) = Proc::start("websocat", &argv, log, None)?;
    let port = p.listening_port()?;
    Ok((p, Target::ws(([127, 0, 0, 1], port).into())))
}

fn start_socat(a: &Args, echo: &str, log: &Path) -> anyhow::Result<(Proc, Target)> {
    // -b 65536: the 64 KiB read size the others use (socat's default is 8 KiB).
    let argv: Vec<String> = [
        &path_str(&a.socat),
        "-b65536",
        "TCP-LISTEN:0,bind=127.0.0.1,fork,reuseaddr,nodelay",
        &format!("TCP:{echo},nodelay"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let (mut p, _) = Proc::start("socat", &argv, log, None)?;
    let port = p.listening_port()?;
    Ok((p, Target::tcp(([127, 0, 0, 1], port).into())))
}

/// UTC date and time, from the system clock.
fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "?".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cores} cores ({cpu}), Linux {}", kernel.trim())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

async fn run(a: Args) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let date = utc_now();
    let stamp: String = date
        .chars()
        .filter(|c| c.is_ascii_digit())
        .take(14)
        .collect();
    let dir = a.out.join(&stamp);
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let timing = Timing {
        warmup: Duration::from_secs_f64(a.warmup),
        duration: Duration::from_secs_f64(a.duration),
    };
    let load_start = loadavg();
    let mut res = Results::default();

    let me = std::env::current_exe()?;
    let (_echo, echo_addr) = Proc::start(
        "echo",
        &[path_str(&me), "echo".into()],
        &dir.join("echo.log"),
        Some("listening on "),
    )?;
    let echo = echo_addr.unwrap_or_default();
    progress(format_args!(
        "echo server on {echo}; logs in {}\n",
        dir.display()
    ));

    let v_wsgate = version_line(&[&path_str(&a.wsgate), "--version"], "wsgate");
    let v_websocat = version_line(&[&path_str(&a.websocat), "--version"], "websocat");
    let v_socat = version_line(&[&path_str(&a.socat), "-V"], "socat version")
        .split(" on ")
        .next()
        .unwrap_or("")
        .to_string();

    let mut cs = Vec::new();
    let (p, t) = start_wsgate(&a, &echo, &dir.join("wsgate.log"))?;
    cs.push(Contender {
        who: Who::Wsgate,
        label: format!("wsgate ({v_wsgate}, `--framing binary`)"),
        target: t,
        _proc: Some(p),
    });
    if let Some(base) = &a.baseline {
        let v = version_line(&[&path_str(base), "--version"], "wsgate");
        let (p, t) = start_wsgate_bin(base, &echo, &dir.join("baseline.log"))?;
        cs.push(Contender {
            who: Who::Baseline,
            label: format!("wsgate {} ({v}, `--framing binary`)", a.baseline_label),
            target: t,
            _proc: Some(p),
        });
    }
    let (p, t) = start_websocat(&a, &echo, &dir.join("websocat.log"))?;
    cs.push(Contender {
        who: Who::Websocat,
        label: format!("websocat ({v_websocat}, `--binary -E`)"),
        target: t,
        _proc: Some(p),
    });
    let (p, t) = start_socat(&a, &echo, &dir.join("socat.log"))?;
    cs.push(Contender {
        who: Who::Socat,
        label: format!("socat TCP relay ({v_socat}, `-b65536 fork`), raw TCP"),
        target: t,
        _proc: Some(p),
    });
    cs.push(Contender {
        who: Who::Direct,
        label: "echo server direct, raw TCP".into(),
        target: Target::tcp(echo.parse()?),
        _proc: None,
    });

    for c in &cs {
        for len in [SMALL, MIB64, 1 << 20] {
            load::verify(&c.target, len)
                .await
                .with_context(|| format!("{}: {len}-byte echo check", c.label))?;
        }
        progress(format_args!("{} at {}: echo verified\n", c.label, c.target));
    }

    let n = cs.len();
    for round in 0..a.rounds {
        progress(format_args!("round {}/{}\n", round + 1, a.rounds));
        for test in [Metric::A, Metric::B1, Metric::B50, Metric::C50, Metric::E] {
            if test == Metric::C50 {
                // All contenders in one interleaved run (see latency_interleaved).
                let order: Vec<&Contender> = (0..n).map(|k| &cs[(k + round) % n]).collect();
                let targets: Vec<Target> = order.iter().map(|c| c.target.clone()).collect();
                let slice = Duration::from_millis(LATENCY_SLICE_MS);
                match load::latency_interleaved(&targets, SMALL, slice, timing).await {
                    Ok(ls) => {
                        for (c, l) in order.iter().zip(ls) {
                            progress(format_args!(
                                "  {:?}: C50={:.1} C99={:.1} ({} samples)\n",
                                c.who, l.p50_us, l.p99_us, l.samples
                            ));
                            res.put(c.who, Metric::C50, l.p50_us);
                            res.put(c.who, Metric::C99, l.p99_us);
                        }
                    }
                    Err(e) => {
                        progress(format_args!("  latency: error: {e:#}\n"));
                        for c in &cs {
                            res.errors.insert((c.who, test), format!("{e:#}"));
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            for k in 0..n {
                let c = &cs[(k + round) % n];
                let r = run_test(c, test, &a, timing).await;
                match r {
                    Ok(vals) => {
                        let shown: Vec<String> = vals
                            .iter()
                            .map(|(m, v)| format!("{m:?}={}", fmt_val(*m, *v)))
                            .collect();
                        progress(format_args!("  {:?}: {}\n", c.who, shown.join(" ")));
                        for (m, v) in vals {
                            res.put(c.who, m, v);
                        }
                    }
                    Err(e) => {
                        progress(format_args!("  {:?} {test:?}: error: {e:#}\n", c.who));
                        res.errors.insert((c.who, test), format!("{e:#}"));
                    }
                }
                // Let the connections of the last test wind down.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    // (d) on fresh processes, so nothing from the traffic tests is counted.
    let (mut rss_before, mut rss_after) = (BTreeMap::new(), BTreeMap::new());
    let idle_who: Vec<Who> = if a.baseline.is_some() {
        vec![Who::Wsgate, Who::Baseline, Who::Websocat]
    } else {
        vec![Who::Wsgate, Who::Websocat]
    };
    for round in 0..a.idle_rounds {
        for &who in &idle_who {
            let log = dir.join(format!("{who:?}-idle.log").to_lowercase());
            let r = async {
                let (p, t) = match who {
                    Who::Wsgate => start_wsgate(&a, &echo, &log)?,
                    Who::Baseline => {
                        start_wsgate_bin(a.baseline.as_deref().unwrap_or(&a.wsgate), &echo, &log)?
                    }
                    _ => start_websocat(&a, &echo, &log)?,
                };
                load::verify(&t, SMALL).await?;
                tokio::time::sleep(Duration::from_millis(300)).await;
                let before = load::rss_kib(p.pid())?;
                let conns = load::open_idle(&t, a.idle_conns, 64, SMALL).await?;
                tokio::time::sleep(Duration::from_secs(1)).await;
                let after = load::rss_kib(p.pid())?;
                let count = conns.len();
                drop(conns);
                tokio::time::sleep(Duration::from_millis(500)).await;
                drop(p);
                anyhow::Ok((before, after, count))
            }
            .await;
            match r {
                Ok((before, after, count)) => {
                    let per = (after as f64 - before as f64) / count as f64;
                    progress(format_args!(
                        "  idle round {}: {who:?}: {count} connections, RSS {before} -> {after} KiB, {per:.1} KiB each\n",
                        round + 1
                    ));
                    res.put(who, Metric::D, per);
                    rss_before.entry(who).or_insert_with(Vec::new).push(before);
                    rss_after.entry(who).or_insert_with(Vec::new).push(after);
                }
                Err(e) => {
                    progress(format_args!("  {who:?} idle: error: {e:#}\n"));
                    res.errors.insert((who, Metric::D), format!("{e:#}"));
                }
            }
        }
    }
    for &who in &idle_who {
        if let (Some(b), Some(af)) = (rss_before.get(&who), rss_after.get(&who)) {
            res.notes.push(format!(
                "(d) {who:?}: RSS before/after per round, KiB: {}",
                b.iter()
                    .zip(af)
                    .map(|(x, y)| format!("{x}→{y}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }

    let command = a
        .command
        .clone()
        .unwrap_or_else(|| std::env::args().collect::<Vec<_>>().join(" "));
    let report = report(
        &a,
        &cs,
        &res,
        &Meta {
            date,
            command,
            machine: machine(),
            load: format!("{load_start} at start, {} at end", loadavg()),
            wall: started.elapsed(),
        },
    );
    println!("{report}");
    std::fs::write(dir.join("results.md"), &report)?;
    let mut csv = String::from("contender,metric,round,value\n");
    for ((who, m), vals) in &res.values {
        for (i, v) in vals.iter().enumerate() {
            let _ = writeln!(csv, "{who:?},{m:?},{},{v}", i + 1);
        }
    }
    std::fs::write(dir.join("rounds.csv"), csv)?;
    progress(format_args!("written to {}\n", dir.display()));
    Ok(())
}

async fn run_test(
    c: &Contender,
    test: Metric,
    a: &Args,
    timing: Timing,
) -> anyhow::Result<Vec<(Metric, f64)>> {
    let t = &c.target;
    Ok(match test {
        Metric::A => vec![(
            Metric::A,
            load::throughput(t, MIB64, a.window, timing).await? / 1e6,
        )],
        Metric::B1 => vec![(
            Metric::B1,
            load::messages_rate(t, 1, SMALL, INFLIGHT, timing).await?,
        )],
        Metric::B50 => vec![(
            Metric::B50,
            load::messages_rate(t, 50, SMALL, INFLIGHT, timing).await?,
        )],
        Metric::C50 | Metric::C99 => {
            let l = load::latency(t, SMALL, timing).await?;
            vec![(Metric::C50, l.p50_us), (Metric::C99, l.p99_us)]
        }
        Metric::E => {
            let h = load::handshakes(t, a.hs_workers, SMALL, timing).await?;
            if h.errors > 0 {
                progress(format_args!("    ({} failed connections)\n", h.errors));
            }
            vec![(Metric::E, h.per_sec)]
        }
        Metric::D => unreachable!("run separately"),
    })
}

struct Meta {
    date: String,
    command: String,
    machine: String,
    load: String,
    wall: Duration,
}

/// Thousands separators.
fn group(v: f64) -> String {
    let s = format!("{:.0}", v);
    let (sign, digits) = s.strip_prefix('-').map_or(("", s.as_str()), |d| ("-", d));
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    format!("{sign}{out}")
}

fn fmt_val(m: Metric, v: f64) -> String {
    match m {
        Metric::A => format!("{v:.0}"),
        Metric::C50 | Metric::C99 | Metric::D => format!("{v:.1}"),
        _ => group(v),
    }
}

fn report(a: &Args, cs: &[Contender], res: &Results, meta: &Meta) -> String {
    let metrics = [
        Metric::A,
        Metric::B1,
        Metric::B50,
        Metric::C50,
        Metric::C99,
        Metric::D,
        Metric::E,
    ];
    let cell = |who: Who, m: Metric| -> String {
        if m == Metric::D && matches!(who, Who::Socat | Who::Direct) {
            return "n/a".into();
        }
        match res.median(who, m) {
            Some(v) => fmt_val(m, v),
            None if res.errors.contains_key(&(who, m)) => "error".into(),
            None => "–".into(),
        }
    };
    let mut s = String::new();
    let _ = writeln!(s, "### wsgate benchmark, {}\n", meta.date);
    let _ = writeln!(s, "Command: `{}`  ", meta.command);
    let _ = writeln!(s, "Machine: {}  ", meta.machine);
    let rev = version_line(&["git", "describe", "--always", "--dirty"], "");
    if !rev.is_empty() {
        let _ = writeln!(
            s,
            "Source: git `{rev}` (`-dirty`: built with uncommitted changes)  "
        );
    }
    let _ = writeln!(
        s,
        "Load average: {}; run took {:.0} s  ",
        meta.load,
        meta.wall.as_secs_f64()
    );
    let _ = writeln!(
        s,
        "Medians of {} rounds ((d): {} rounds on fresh processes); {:.1} s measured after {:.1} s warm-up per cell.\n",
        a.rounds, a.idle_rounds, a.duration, a.warmup
    );
    let _ = writeln!(
        s,
        "| contender | (a) 64 KiB echo, 1 conn, MB/s | (b) 64 B ×16 in flight, 1 conn, msgs/s | (b) 64 B ×16, 50 conns, msgs/s | (c) ping-pong p50, µs | (c) p99, µs | (d) RSS per idle conn ({}), KiB | (e) handshake+echo+close, conns/s |",
        group(a.idle_conns as f64)
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|");
    for c in cs {
        let cells: Vec<String> = metrics.iter().map(|m| cell(c.who, *m)).collect();
        let _ = writeln!(s, "| {} | {} |", c.label, cells.join(" | "));
    }

    let _ = writeln!(s, "\n**wsgate / websocat** (same run):\n");
    let _ = writeln!(
        s,
        "| figure | wsgate | websocat | wsgate/websocat | target | met |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---|---|");
    let rows: [(&str, Metric, &str); 7] = [
        ("(a) 64 KiB echo MB/s", Metric::A, "≥ 1.30×"),
        ("(b) 64 B, 1 conn, msgs/s", Metric::B1, "record"),
        ("(b) 64 B, 50 conns, msgs/s", Metric::B50, "≥ 1.50×"),
        ("(c) p50 µs", Metric::C50, "record"),
        ("(c) p99 µs", Metric::C99, "≤ 1.00×"),
        ("(d) KiB per idle conn", Metric::D, "≤ 16 KiB"),
        ("(e) handshakes/s", Metric::E, "record"),
    ];
    for (name, m, target) in rows {
        let (w, x) = (res.median(Who::Wsgate, m), res.median(Who::Websocat, m));
        let ratio = match (w, x) {
            (Some(w), Some(x)) if x != 0.0 => Some(w / x),
            _ => None,
        };
        let met = match (m, ratio, w) {
            (Metric::A, Some(r), _) => yes(r >= 1.3),
            (Metric::B50, Some(r), _) => yes(r >= 1.5),
            (Metric::C99, Some(r), _) => yes(r <= 1.0),
            (Metric::D, _, Some(w)) => yes(w <= 16.0),
            _ => "–",
        };
        let _ = writeln!(
            s,
            "| {name} | {} | {} | {} | {target} | {met} |",
            w.map_or("–".into(), |v| fmt_val(m, v)),
            x.map_or("–".into(), |v| fmt_val(m, v)),
            ratio.map_or("–".into(), |r| format!("{r:.2}×")),
        );
    }

    if a.baseline.is_some() {
        let _ = writeln!(s, "\n**wsgate / {}** (same run):\n", a.baseline_label);
        let _ = writeln!(
            s,
            "| figure | wsgate | {} | wsgate/{} | target | met |",
            a.baseline_label, a.baseline_label
        );
        let _ = writeln!(s, "|---|---:|---:|---:|---|---|");
        for (name, m) in [
            ("(a) 64 KiB echo MB/s", Metric::A),
            ("(b) 64 B, 1 conn, msgs/s", Metric::B1),
            ("(b) 64 B, 50 conns, msgs/s", Metric::B50),
            ("(c) p50 µs", Metric::C50),
            ("(c) p99 µs", Metric::C99),
            ("(d) KiB per idle conn", Metric::D),
            ("(e) handshakes/s", Metric::E),
        ] {
            let (w, x) = (res.median(Who::Wsgate, m), res.median(Who::Baseline, m));
            let ratio = match (w, x) {
                (Some(w), Some(x)) if x != 0.0 => Some(w / x),
                _ => None,
            };
            let (target, met) = match (m, ratio, w) {
                (Metric::A, Some(r), _) => ("≥ 1.50×", yes(r >= 1.5)),
                (Metric::D, _, Some(w)) => ("≤ 8 KiB", yes(w <= 8.0)),
                _ => ("no loss beyond noise", "–"),
            };
            let _ = writeln!(
                s,
                "| {name} | {} | {} | {} | {target} | {met} |",
                w.map_or("–".into(), |v| fmt_val(m, v)),
                x.map_or("–".into(), |v| fmt_val(m, v)),
                ratio.map_or("–".into(), |r| format!("{r:.2}×")),
            );
        }
    }

    let _ = writeln!(
        s,
        "\n<details><summary>Spread (min – max over rounds)</summary>\n"
    );
    let _ = writeln!(
        s,
        "| contender | (a) | (b) 1 | (b) 50 | (c) p50 | (c) p99 | (d) | (e) |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|");
    for c in cs {
        let cells: Vec<String> = metrics
            .iter()
            .map(|m| match res.spread(c.who, *m) {
                Some((lo, hi)) => format!("{} – {}", fmt_val(*m, lo), fmt_val(*m, hi)),
                None => "–".into(),
            })
            .collect();
        let _ = writeln!(s, "| {:?} | {} |", c.who, cells.join(" | "));
    }
    for n in &res.notes {
        let _ = writeln!(s, "\n{n}");
    }
    for ((who, m), e) in &res.errors {
        let _ = writeln!(s, "\nerror: {who:?} {m:?}: {e}");
    }
    let _ = writeln!(s, "\n</details>");
    s
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "**no**"
    }
}
