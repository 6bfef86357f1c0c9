//! `wsbench handshakes`: the handshake rate of an endpoint that asks for
//! credentials (bench/auth.sh). Like test (e) of `load`, each of `--conns`
//! workers loops: connect, (TLS handshake, with a client certificate when
//! given), WebSocket handshake with the `--header`s, one 64 B echo, Close
//! handshake, wait for the server's EOF. TLS sessions are never resumed:
//! every connection pays a full handshake.
//!
//! With `--pid`, the CPU time (user + system, all threads) of those
//! processes and their children is read from `/proc` at the start and end of
//! the measured window: printed as µs per completed handshake.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::ServerName;
use wsframe::handshake;

use crate::proto::{close_frame, messages, Got, Rx};

#[derive(clap::Args)]
pub struct Args {
    /// ws://IP:PORT/path or wss://IP:PORT/path.
    #[arg(long)]
    target: String,
    /// Concurrent workers.
    #[arg(long, default_value_t = 8)]
    conns: usize,
    /// A request header, `NAME: VALUE` (repeatable).
    #[arg(long = "header", value_name = "NAME: VALUE")]
    headers: Vec<String>,
    /// wss://: PEM CA certificates the server's certificate chains to.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// wss://: the server name to verify (default: the target's IP).
    #[arg(long)]
    server_name: Option<String>,
    /// wss://: a PEM client certificate chain (mutual TLS).
    #[arg(long, requires = "key")]
    cert: Option<PathBuf>,
    /// wss://: the client certificate's PEM private key.
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// Process whose CPU time (with its children's) is divided by the
    /// handshakes; repeatable (the times are added).
    #[arg(long = "pid")]
    pids: Vec<u32>,
    /// Seconds measured after the warm-up.
    #[arg(long, default_value_t = 2.0)]
    duration: f64,
    #[arg(long, default_value_t = 0.5)]
    warmup: f64,
}

struct Dest {
    addr: SocketAddr,
    host: String,
    path: String,
    headers: Vec<(String, String)>,
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
}

fn pem_certs(
    p: &std::path::Path,
) -> anyhow::Result<Vec<rustls::pki_types::CertificateDer<'static>>> {
    let pem = std::fs::read(p).with_context(|| format!("read {}", p.display()))?;
    rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{}: bad PEM", p.display()))
}

fn dest(a: &Args) -> anyhow::Result<Dest> {
    let (tls, rest) = if let Some(r) = a.target.strip_prefix("wss://") {
        (true, r)
    } else if let Some(r) = a.target.strip_prefix("ws://") {
        (false, r)
    } else {
        bail!("{}: want ws://IP:PORT/path or wss://IP:PORT/path", a.target);
    };
    let (hostport, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let addr: SocketAddr = hostport
        .parse()
        .with_context(|| format!("{hostport}: want IP:PORT"))?;
    let headers = a
        .headers
        .iter()
        .map(|h| {
            let (k, v) = h
                .split_once(':')
                .ok_or_else(|| anyhow!("header `{h}`: want NAME: VALUE"))?;
            Ok((k.trim().to_string(), v.trim().to_string()))
        })
        .collect::<anyhow::Result<_>>()?;
    let tls = if tls {
        let mut roots = rustls::RootCertStore::empty();
        let ca = a.ca.as_ref().ok_or_else(|| anyhow!("wss:// needs --ca"))?;
        for c in pem_certs(ca)? {
            roots.add(c)?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let b = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots);
        let mut config = match (&a.cert, &a.key) {
            (Some(c), Some(k)) => {
                let pem = std::fs::read(k).with_context(|| format!("read {}", k.display()))?;
                let key = rustls_pemfile::private_key(&mut &pem[..])?
                    .ok_or_else(|| anyhow!("{}: no private key", k.display()))?;
                b.with_client_auth_cert(pem_certs(c)?, key)?
            }
            _ => b.with_no_client_auth(),
        };
        config.resumption = rustls::client::Resumption::disabled();
        let name = a
            .server_name
            .clone()
            .unwrap_or_else(|| addr.ip().to_string());
        let name = ServerName::try_from(name).context("--server-name")?;
        Some((tokio_rustls::TlsConnector::from(Arc::new(config)), name))
    } else {
        None
    };
    Ok(Dest {
        addr,
        host: hostport.to_string(),
        path: if path.is_empty() { "/" } else { path }.to_string(),
        headers,
        tls,
    })
}

async fn session<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    d: &Dest,
    msg: &[u8],
    size: usize,
    close: &[u8],
) -> anyhow::Result<()> {
    let key = handshake::generate_key();
    let extra: Vec<(&str, &str)> = d
        .headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    s.write_all(&handshake::client_request(
        &d.host,
        &d.path,
        &key,
        &[],
        &extra,
    ))
    .await?;
    let mut buf = BytesMut::with_capacity(1024);
    let resp = loop {
        if s.read_buf(&mut buf).await? == 0 {
            bail!("connection closed during the handshake");
        }
        match handshake::parse_response(&buf) {
            Ok(Some(r)) => break r,
            Ok(None) if buf.len() < 16 * 1024 => {}
            Ok(None) => bail!("handshake response head too large"),
            Err(e) => bail!("bad handshake response: {e}"),
        }
    };
    if resp.status != 101 {
        bail!("handshake answered with status {}", resp.status);
    }
    let leftover = buf.split_off(resp.head_len);
    let mut rx = Rx::new(true, leftover);
    s.write_all(msg).await?;
    let mut got = 0u64;
    while got < size as u64 {
        match rx.recv(&mut s).await? {
            Got::Data(n) => got += n,
            Got::Closed => bail!("closed before the echo"),
        }
    }
    s.write_all(close).await?;
    loop {
        match rx.recv(&mut s).await {
            Ok(Got::Closed) => break,
            Ok(Got::Data(_)) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e.into()),
        }
    }
    // The server closes first; over TLS, with or without close_notify.
    let mut b = [0u8; 64];
    while let Ok(n) = s.read(&mut b).await {
        if n == 0 {
            break;
        }
    }
    Ok(())
}

async fn one_shot(d: &Dest, msg: &[u8], size: usize, close: &[u8]) -> anyhow::Result<()> {
    let tcp = TcpStream::connect(d.addr)
        .await
        .with_context(|| format!("connect {}", d.addr))?;
    tcp.set_nodelay(true)?;
    match &d.tls {
        None => session(tcp, d, msg, size, close).await,
        Some((c, name)) => {
            let s = c.connect(name.clone(), tcp).await?;
            session(s, d, msg, size, close).await
        }
    }
}

/// CPU ticks (user + system) of `pid` and its children, as in bench/proxy.sh.
fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let mut pids = vec![pid.to_string()];
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Ok(c) = std::fs::read_to_string(t.path().join("children")) {
                pids.extend(c.split_whitespace().map(str::to_string));
            }
        }
    }
    let mut total = 0;
    for p in pids {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        let after = stat
            .rsplit_once(") ")
            .ok_or_else(|| anyhow!("/proc/{p}/stat: no `) `"))?
            .1;
        let f: Vec<&str> = after.split_whitespace().collect();
        // Fields 14 and 15 of stat(5), counted from the state (field 3).
        total += f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    }
    Ok(total)
}

pub async fn main(a: Args) -> anyhow::Result<()> {
    let d = Arc::new(dest(&a)?);
    let size = 64;
    let (msg, _) = messages(true, size, 1);
    let close = close_frame();
    // One checked run first: a refusal is an error, not a slow rate.
    tokio::time::timeout(Duration::from_secs(10), one_shot(&d, &msg, size, &close))
        .await
        .context("the first handshake timed out")??;
    let (done, errors) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let last_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let mut tasks = JoinSet::new();
    for _ in 0..a.conns {
        let (d, msg, close) = (d.clone(), msg.clone(), close.clone());
        let (done, errors, last) = (done.clone(), errors.clone(), last_error.clone());
        tasks.spawn(async move {
            loop {
                let r =
                    tokio::time::timeout(Duration::from_secs(5), one_shot(&d, &msg, size, &close))
                        .await;
                match r {
                    Ok(Ok(())) => {
                        done.fetch_add(1, Relaxed);
                    }
                    Ok(Err(e)) => {
                        errors.fetch_add(1, Relaxed);
                        *last.lock().unwrap() = Some(format!("{e:#}"));
                    }
                    Err(_) => {
                        errors.fetch_add(1, Relaxed);
                    }
                }
            }
        });
    }
    tokio::time::sleep(Duration::from_secs_f64(a.warmup)).await;
    let ticks = |p: &[u32]| -> anyhow::Result<Option<u64>> {
        if p.is_empty() {
            return Ok(None);
        }
        p.iter()
            .map(|&p| cpu_ticks(p))
            .sum::<anyhow::Result<u64>>()
            .map(Some)
    };
    let (c0, e0, cpu0, t0) = (
        done.load(Relaxed),
        errors.load(Relaxed),
        ticks(&a.pids)?,
        Instant::now(),
    );
    tokio::time::sleep(Duration::from_secs_f64(a.duration)).await;
    let (c1, e1, cpu1, t1) = (
        done.load(Relaxed),
        errors.load(Relaxed),
        ticks(&a.pids)?,
        Instant::now(),
    );
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    let n = c1 - c0;
    let rate = n as f64 / (t1 - t0).as_secs_f64();
    let mut line = format!("{rate:.0} connections/s ({} errors)", e1 - e0);
    if let (Some(a), Some(b)) = (cpu0, cpu1) {
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let us = (b - a) as f64 * 1e6 / hz / n.max(1) as f64;
        line.push_str(&format!(", {us:.0} us CPU per handshake"));
    }
    println!("{line}");
    if e1 > e0 {
        if let Some(e) = last_error.lock().unwrap().as_ref() {
            eprintln!("wsbench: last error: {e}");
        }
    }
    Ok(())
}
