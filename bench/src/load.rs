//! The five measurements. Multi-connection tests run on the tokio runtime;
//! the strict ping-pong latency test runs on one blocking thread so that no
//! scheduler sits between the socket and the clock.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::proto::{close_frame, connect, messages, pattern, Got, Target};

/// How long each sampled test warms up and then measures.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub warmup: Duration,
    pub duration: Duration,
}

/// Runs until the warm-up is over, samples `counter` over `duration`, and
/// returns its rate per second. A task that ends early is an error (a load
/// task only ends by failing). All tasks are aborted afterwards.
pub(crate) async fn sample(
    counter: &AtomicU64,
    timing: Timing,
    tasks: &mut JoinSet<anyhow::Result<()>>,
) -> anyhow::Result<f64> {
    let measure = async {
        tokio::time::sleep(timing.warmup).await;
        let (c0, t0) = (counter.load(Relaxed), Instant::now());
        tokio::time::sleep(timing.duration).await;
        let (c1, t1) = (counter.load(Relaxed), Instant::now());
        (c1 - c0) as f64 / (t1 - t0).as_secs_f64()
    };
    let out = tokio::select! {
        rate = measure => Ok(rate),
        Some(r) = tasks.join_next() => Err(match r {
            Ok(Ok(())) => anyhow!("a load task ended early"),
            Ok(Err(e)) => e.context("a load task failed"),
            Err(e) => anyhow!("a load task panicked: {e}"),
        }),
    };
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    out
}

/// Sends one message and checks that the same bytes come back: run once per
/// contender before measuring.
pub async fn verify(target: &Target, len: usize) -> anyhow::Result<()> {
    let (mut s, mut rx) = connect(target).await?;
    let (msg, _) = messages(target.is_ws(), len, 1);
    s.write_all(&msg).await?;
    let back = tokio::time::timeout(Duration::from_secs(10), rx.recv_bytes(&mut s, len))
        .await
        .context("echo timed out")??;
    if back != pattern(len) {
        bail!("echoed {len} bytes differ from what was sent");
    }
    Ok(())
}

/// (a) One connection, `size`-byte binary messages, at most `window` of them
/// unanswered. Returns echoed payload bytes per second.
pub async fn throughput(
    target: &Target,
    size: usize,
    window: usize,
    timing: Timing,
) -> anyhow::Result<f64> {
    let (s, mut rx) = connect(target).await?;
    let (mut r, mut w) = s.into_split();
    let (msg, _) = messages(target.is_ws(), size, 1);
    let credits = Arc::new(Semaphore::new(window));
    let counter = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    {
        let credits = credits.clone();
        tasks.spawn(async move {
            loop {
                credits.acquire().await?.forget();
                w.write_all(&msg).await?;
            }
        });
    }
    {
        let counter = counter.clone();
        tasks.spawn(async move {
            let (mut total, mut done) = (0u64, 0u64);
            loop {
                match rx.recv(&mut r).await? {
                    Got::Data(n) => {
                        total += n;
                        counter.fetch_add(n, Relaxed);
                        let whole = total / size as u64;
                        if whole > done {
                            credits.add_permits((whole - done) as usize);
                            done = whole;
                        }
                    }
                    Got::Closed => bail!("closed by the server"),
                }
            }
        });
    }
    sample(&counter, timing, &mut tasks).await
}

/// (b) `conns` connections, each keeping `inflight` messages of `size` bytes
/// unanswered. Returns echoed messages per second (echoed payload bytes /
/// `size`: a bridge may merge several echoed messages into one).
pub async fn messages_rate(
    target: &Target,
    conns: usize,
    size: usize,
    inflight: usize,
    timing: Timing,
) -> anyhow::Result<f64> {
    let (batch, one) = messages(target.is_ws(), size, inflight);
    let counter = Arc::new(AtomicU64::new(0));
    let mut opened = Vec::with_capacity(conns);
    for _ in 0..conns {
        opened.push(connect(target).await?);
    }
    let mut tasks = JoinSet::new();
    for (mut s, mut rx) in opened {
        let batch = batch.clone();
        let counter = counter.clone();
        tasks.spawn(async move {
            s.write_all(&batch).await?;
            let (mut total, mut done) = (0u64, 0u64);
            loop {
                match rx.recv(&mut s).await? {
                    Got::Data(n) => total += n,
                    Got::Closed => bail!("closed by the server"),
                }
                let whole = total / size as u64;
                if whole > done {
                    let k = (whole - done) as usize;
                    done = whole;
                    counter.fetch_add(k as u64, Relaxed);
                    s.write_all(&batch[..k * one]).await?;
                }
            }
        });
    }
    sample(&counter, timing, &mut tasks).await
}

/// Latency percentiles, in microseconds.
#[derive(Debug, Clone, Copy)]
pub struct Latency {
    pub p50_us: f64,
    pub p99_us: f64,
    pub samples: usize,
}

/// (c) One connection, strict request/response with `size`-byte messages.
pub async fn latency(target: &Target, size: usize, timing: Timing) -> anyhow::Result<Latency> {
    let (s, mut rx) = connect(target).await?;
    let mut s = s.into_std()?;
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let (msg, _) = messages(target.is_ws(), size, 1);
    tokio::task::spawn_blocking(move || -> anyhow::Result<Latency> {
        let mut scratch = vec![0u8; 64 * 1024];
        let start = Instant::now();
        let (warm_end, end) = (
            start + timing.warmup,
            start + timing.warmup + timing.duration,
        );
        let mut samples: Vec<u32> = Vec::with_capacity(1 << 20);
        loop {
            let t0 = Instant::now();
            if t0 >= end || samples.len() == samples.capacity() {
                break;
            }
            s.write_all(&msg)?;
            let mut got = 0u64;
            while got < size as u64 {
                match rx.recv_blocking(&mut s, &mut scratch)? {
                    Got::Data(n) => got += n,
                    Got::Closed => bail!("closed by the server"),
                }
            }
            if t0 >= warm_end {
                samples.push(t0.elapsed().as_nanos().min(u32::MAX as u128) as u32);
            }
        }
        percentiles(samples)
    })
    .await?
}

/// (c) for several targets at once, on one blocking thread: each target gets
/// `slice` of strict request/response in turn, round-robin, so that a burst
/// of background load on a shared machine hits every target alike rather than
/// whichever happened to be measured then. Each target is measured for
/// `timing.duration` in total (after `timing.warmup`, also shared).
pub async fn latency_interleaved(
    targets: &[Target],
    size: usize,
    slice: Duration,
    timing: Timing,
) -> anyhow::Result<Vec<Latency>> {
    let mut conns = Vec::with_capacity(targets.len());
    for t in targets {
        let (s, rx) = connect(t).await?;
        let s = s.into_std()?;
        s.set_nonblocking(false)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        conns.push((s, rx, messages(t.is_ws(), size, 1).0));
    }
    let n = targets.len() as u32;
    tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<Latency>> {
        let mut scratch = vec![0u8; 64 * 1024];
        let start = Instant::now();
        let warm_end = start + timing.warmup * n;
        let end = warm_end + timing.duration * n;
        let mut samples: Vec<Vec<u32>> = (0..n).map(|_| Vec::with_capacity(1 << 18)).collect();
        'outer: loop {
            for (i, (s, rx, msg)) in conns.iter_mut().enumerate() {
                let slice_end = Instant::now() + slice;
                loop {
                    let t0 = Instant::now();
                    if t0 >= end {
                        break 'outer;
                    }
                    if t0 >= slice_end {
                        break;
                    }
                    s.write_all(msg)?;
                    let mut got = 0u64;
                    while got < size as u64 {
                        match rx.recv_blocking(s, &mut scratch)? {
                            Got::Data(k) => got += k,
                            Got::Closed => bail!("closed by the server"),
                        }
                    }
                    if t0 >= warm_end && samples[i].len() < 1 << 22 {
                        samples[i].push(t0.elapsed().as_nanos().min(u32::MAX as u128) as u32);
                    }
                }
            }
        }
        samples.into_iter().map(percentiles).collect()
    })
    .await?
}

fn percentiles(mut samples: Vec<u32>) -> anyhow::Result<Latency> {
    if samples.is_empty() {
        bail!("no samples");
    }
    samples.sort_unstable();
    let pct = |p: f64| {
        let i = ((samples.len() - 1) as f64 * p).round() as usize;
        samples[i] as f64 / 1000.0
    };
    Ok(Latency {
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        samples: samples.len(),
    })
}

/// One short-lived connection: connect (+ handshake), one `size`-byte echo,
/// then a clean close (WebSocket Close handshake; TCP: half-close and wait
/// for the server's EOF).
async fn one_shot(target: &Target, msg: &[u8], size: usize, close: &[u8]) -> anyhow::Result<()> {
    let (mut s, mut rx) = connect(target).await?;
    s.write_all(msg).await?;
    let mut got = 0u64;
    while got < size as u64 {
        match rx.recv(&mut s).await? {
            Got::Data(n) => got += n,
            Got::Closed => bail!("closed before the echo"),
        }
    }
    if target.is_ws() {
        s.write_all(close).await?;
        loop {
            match rx.recv(&mut s).await {
                Ok(Got::Closed) => break,
                Ok(Got::Data(_)) => {}
                // A server that closes the TCP connection without a Close frame.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(e.into()),
            }
        }
        // RFC 6455 §7.1.1: the server closes the TCP connection first.
        let mut b = [0u8; 64];
        while s.read(&mut b).await? > 0 {}
    } else {
        s.shutdown().await?;
        let mut b = [0u8; 64];
        while s.read(&mut b).await? > 0 {}
    }
    Ok(())
}

/// Handshake test result.
#[derive(Debug, Clone, Copy)]
pub struct Handshakes {
    pub per_sec: f64,
    pub errors: u64,
}

/// (e) `workers` concurrent loops of [`one_shot`]. Returns completed
/// connections per second and how many failed.
pub async fn handshakes(
    target: &Target,
    workers: usize,
    size: usize,
    timing: Timing,
) -> anyhow::Result<Handshakes> {
    let (msg, _) = messages(target.is_ws(), size, 1);
    let close = close_frame();
    let counter = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    for _ in 0..workers {
        let (target, msg, close) = (target.clone(), msg.clone(), close.clone());
        let (counter, errors) = (counter.clone(), errors.clone());
        // Runs until `sample` aborts it.
        tasks.spawn(async move {
            loop {
                let r = tokio::time::timeout(
                    Duration::from_secs(5),
                    one_shot(&target, &msg, size, &close),
                )
                .await;
                match r {
                    Ok(Ok(())) => counter.fetch_add(1, Relaxed),
                    _ => errors.fetch_add(1, Relaxed),
                };
            }
        });
    }
    let per_sec = sample(&counter, timing, &mut tasks).await?;
    Ok(Handshakes {
        per_sec,
        errors: errors.load(Relaxed),
    })
}

/// (d) Opens `n` connections (at most `concurrency` connecting at once), each
/// doing one `size`-byte echo (none when `size` is 0), and holds them idle.
/// Returns them.
pub async fn open_idle(
    target: &Target,
    n: usize,
    concurrency: usize,
    size: usize,
) -> anyhow::Result<Vec<TcpStream>> {
    let (msg, _) = messages(target.is_ws(), size, 1);
    let mut conns = Vec::with_capacity(n);
    let mut set: JoinSet<anyhow::Result<TcpStream>> = JoinSet::new();
    let mut started = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while conns.len() < n {
        while started < n && set.len() < concurrency {
            let (target, msg) = (target.clone(), msg.clone());
            set.spawn(async move {
                let (mut s, mut rx) = connect(&target).await?;
                if size == 0 {
                    // Handshake only: nothing has gone through the bridge.
                    return Ok(s);
                }
                s.write_all(&msg).await?;
                let mut got = 0u64;
                while got < size as u64 {
                    match rx.recv(&mut s).await? {
                        Got::Data(k) => got += k,
                        Got::Closed => bail!("closed before the echo"),
                    }
                }
                Ok(s)
            });
            started += 1;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, set.join_next()).await {
            Ok(Some(Ok(Ok(s)))) => conns.push(s),
            Ok(Some(Ok(Err(e)))) => {
                return Err(e.context(format!("after {} connections", conns.len())))
            }
            Ok(Some(Err(e))) => bail!("connect task failed: {e}"),
            Ok(None) => break,
            Err(_) => bail!("timed out with {} of {n} connections open", conns.len()),
        }
    }
    Ok(conns)
}

/// Resident set size of a process, in KiB (`VmRSS`).
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("process {pid} is gone"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow!("no VmRSS for {pid}"))
}

/// Flushes stderr progress output.
pub fn progress(msg: std::fmt::Arguments<'_>) {
    let mut e = std::io::stderr().lock();
    let _ = e.write_fmt(msg);
    let _ = e.flush();
}
