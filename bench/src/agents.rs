//! `wsbench agents`: registers many agents at a gateway (docs/tunnel.md
//! §1), each a WebSocket with its own id and a wsmux session that answers
//! the gateway's keepalive, and holds them idle; for the cluster benchmark
//! (bench/cluster/README.md), which reads the gateway's RSS and Redis's
//! memory per registered agent.

use std::time::Duration;

use anyhow::{bail, Context as _};
use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use wsframe::handshake;

/// Registers agent `id` at `addr` (`HOST:PORT`, `path`) with `token`.
async fn register(addr: &str, path: &str, id: &str, token: &str) -> anyhow::Result<wsmux::Session> {
    let mut s = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect {addr}"))?;
    s.set_nodelay(true)?;
    let key = handshake::generate_key();
    let auth = format!("Bearer {token}");
    let headers = [("Wsgate-Agent-Id", id), ("Authorization", auth.as_str())];
    s.write_all(&handshake::client_request(
        addr,
        path,
        &key,
        &["wsgate-agent.v1"],
        &headers,
    ))
    .await?;
    let mut buf = BytesMut::with_capacity(1024);
    let resp = loop {
        if s.read_buf(&mut buf).await? == 0 {
            bail!("closed during the handshake");
        }
        if let Some(r) = handshake::parse_response(&buf)? {
            break r;
        }
    };
    if resp.status != 101 {
        bail!("agent {id}: registration answered {}", resp.status);
    }
    let leftover = buf.split_off(resp.head_len);
    let t = wsmux::WsTransport::from_raw(
        s,
        wsframe::Role::Client,
        wsmux::WsTransport::<TcpStream>::default_config(),
        &leftover,
    );
    Ok(wsmux::Session::client(t, wsmux::Config::default()))
}

/// Registers `n` agents `PREFIX-0` … (at most `concurrency` at once) and
/// returns their sessions.
pub async fn register_many(
    addr: &str,
    path: &str,
    prefix: &str,
    token: &str,
    n: usize,
    concurrency: usize,
) -> anyhow::Result<Vec<wsmux::Session>> {
    let mut out = Vec::with_capacity(n);
    let mut set: JoinSet<anyhow::Result<wsmux::Session>> = JoinSet::new();
    let mut started = 0;
    while out.len() < n {
        while started < n && set.len() < concurrency {
            let (addr, path, token) = (addr.to_string(), path.to_string(), token.to_string());
            let id = format!("{prefix}-{started}");
            set.spawn(async move { register(&addr, &path, &id, &token).await });
            started += 1;
        }
        match tokio::time::timeout(Duration::from_secs(60), set.join_next()).await {
            Ok(Some(Ok(Ok(s)))) => out.push(s),
            Ok(Some(Ok(Err(e)))) => return Err(e.context(format!("after {} agents", out.len()))),
            Ok(Some(Err(e))) => bail!("register task failed: {e}"),
            Ok(None) => break,
            Err(_) => bail!("timed out with {} of {n} agents", out.len()),
        }
    }
    Ok(out)
}
