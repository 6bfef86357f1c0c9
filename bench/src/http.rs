//! HTTP/1.1 request rate over keep-alive connections: test (e) of the
//! tunnel benchmark (`bench/tunnel.sh`), where the same small request goes
//! to an HTTP server directly, through wsgate's `/request` (with
//! `X-PROXY-DESTINATION`) and through its forward proxy (absolute form).
//!
//! Each connection sends one request, reads the whole answer (its head,
//! then a `Content-Length` or chunked body), and sends the next. A server
//! that closes the connection is dialed again; answers other than 200 and
//! broken connections are counted as errors.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use crate::load::{sample, Timing};

/// `GET TARGET HTTP/1.1` with `Host` and the extra headers.
pub fn request(target: &str, host: &str, headers: &[String]) -> Bytes {
    let mut r = format!("GET {target} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: wsbench\r\n");
    for h in headers {
        r.push_str(h);
        r.push_str("\r\n");
    }
    r.push_str("\r\n");
    Bytes::from(r)
}

/// One answer: its status, whether the server keeps the connection, the body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub keep_alive: bool,
    pub body: Vec<u8>,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Reads one answer from `s` (bytes past it stay in `buf`).
async fn read_answer(s: &mut TcpStream, buf: &mut BytesMut) -> anyhow::Result<Answer> {
    let head_end = loop {
        if let Some(i) = find(buf, b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 64 * 1024 {
            bail!("answer head over 64 KiB");
        }
        if s.read_buf(buf).await? == 0 {
            bail!("connection closed before an answer");
        }
    };
    let head = std::str::from_utf8(&buf[..head_end]).context("answer head is not text")?;
    let status: u16 = head
        .get(9..12)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("bad status line: {:?}", head.lines().next()))?;
    let (mut length, mut chunked, mut keep_alive) = (None, false, head.starts_with("HTTP/1.1"));
    for line in head.lines().skip(1) {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_ascii_lowercase());
        match k.as_str() {
            "content-length" => length = Some(v.parse::<usize>().context("content-length")?),
            "transfer-encoding" => chunked = v.contains("chunked"),
            "connection" if v.contains("close") => keep_alive = false,
            "connection" if v.contains("keep-alive") => keep_alive = true,
            _ => {}
        }
    }
    buf.advance(head_end);
    let mut body = Vec::new();
    if chunked {
        loop {
            let line_end = loop {
                if let Some(i) = find(buf, b"\r\n") {
                    break i;
                }
                if s.read_buf(buf).await? == 0 {
                    bail!("closed inside a chunked body");
                }
            };
            let size_text = std::str::from_utf8(&buf[..line_end])?;
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                .context("chunk size")?;
            // The chunk, its CRLF (for the last chunk: the trailer's end).
            let need = line_end + 2 + size + 2;
            while buf.len() < need {
                if s.read_buf(buf).await? == 0 {
                    bail!("closed inside a chunk");
                }
            }
            body.extend_from_slice(&buf[line_end + 2..line_end + 2 + size]);
            buf.advance(need);
            if size == 0 {
                break;
            }
        }
    } else if let Some(n) = length {
        while buf.len() < n {
            if s.read_buf(buf).await? == 0 {
                bail!("closed inside the body");
            }
        }
        body.extend_from_slice(&buf[..n]);
        buf.advance(n);
    } else if status != 204 && status != 304 {
        // Delimited by the end of the connection.
        while s.read_buf(buf).await? > 0 {}
        body.extend_from_slice(buf);
        buf.clear();
        keep_alive = false;
    }
    Ok(Answer {
        status,
        keep_alive,
        body,
    })
}

async fn dial(addr: SocketAddr) -> anyhow::Result<TcpStream> {
    let s = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect {addr}"))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// One request on a fresh connection: the answer (for checking a contender
/// before it is measured).
pub async fn once(addr: SocketAddr, req: &Bytes) -> anyhow::Result<Answer> {
    let mut s = dial(addr).await?;
    s.write_all(req).await?;
    let mut buf = BytesMut::with_capacity(16 * 1024);
    tokio::time::timeout(Duration::from_secs(10), read_answer(&mut s, &mut buf))
        .await
        .context("no answer within 10 s")?
}

/// Requests per second and errors.
#[derive(Debug, Clone, Copy)]
pub struct Rate {
    pub per_sec: f64,
    pub errors: u64,
}

/// `conns` keep-alive connections, each sending `req` as soon as the last
/// answer is read: completed 200 answers per second.
pub async fn rate(
    addr: SocketAddr,
    req: Bytes,
    conns: usize,
    timing: Timing,
) -> anyhow::Result<Rate> {
    let counter = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks: JoinSet<anyhow::Result<()>> = JoinSet::new();
    for _ in 0..conns {
        let (req, counter, errors) = (req.clone(), counter.clone(), errors.clone());
        tasks.spawn(async move {
            let mut buf = BytesMut::with_capacity(16 * 1024);
            let mut conn: Option<TcpStream> = None;
            loop {
                let s = match conn.as_mut() {
                    Some(s) => s,
                    None => {
                        buf.clear();
                        conn.insert(dial(addr).await?)
                    }
                };
                let r = async {
                    s.write_all(&req).await?;
                    read_answer(s, &mut buf).await
                };
                match tokio::time::timeout(Duration::from_secs(10), r).await {
                    Ok(Ok(a)) => {
                        if a.status == 200 {
                            counter.fetch_add(1, Relaxed);
                        } else {
                            errors.fetch_add(1, Relaxed);
                        }
                        if !a.keep_alive {
                            conn = None;
                        }
                    }
                    _ => {
                        errors.fetch_add(1, Relaxed);
                        conn = None;
                    }
                }
            }
        });
    }
    let per_sec = sample(&counter, timing, &mut tasks).await?;
    Ok(Rate {
        per_sec,
        errors: errors.load(Relaxed),
    })
}
