//! Datagrams over a stream (docs/tunnel.md §4: each one a u16 length and
//! its bytes), to and from a UDP socket.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UdpSocket;
use tokio::time::Instant;

use super::proto::{decode_datagram, encode_datagram, MAX_DATAGRAM};
use crate::limits::{Pace, SharedBandwidth};

/// A UDP flow ends after this long without a datagram either way.
pub const IDLE: Duration = Duration::from_secs(60);

/// Relays between a framed stream and a connected UDP socket until either
/// ends, fails, or the flow is idle for [`IDLE`]; the bytes each way. With
/// `pace` (a subject's `per_identity_bandwidth`), each direction waits out
/// its debt before it takes the next datagram.
pub async fn bridge<S>(
    stream: S,
    socket: &UdpSocket,
    idle: Duration,
    pace: Option<&Arc<SharedBandwidth>>,
) -> io::Result<(u64, u64)>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let (mut up, mut down) = (0u64, 0u64);
    let mut inbuf = BytesMut::new();
    let mut dgram = vec![0u8; MAX_DATAGRAM];
    let mut out = BytesMut::new();
    let mut pace = pace.map(|s| {
        let p = |up| Pace::new(None, Some(s), up).expect("a shared cap paces");
        [p(true), p(false)]
    });
    // Until when each direction waits (its debt), client to socket first.
    let mut until: [Option<Instant>; 2] = [None, None];
    let mut charge = |dir: usize, n: u64| -> Option<Instant> {
        let now = Instant::now();
        let p = pace.as_mut()?;
        p[dir].delay_for(n as usize, now).map(|d| now + d)
    };
    loop {
        tokio::select! {
            r = rd.read_buf(&mut inbuf), if until[0].is_none() => {
                if r? == 0 {
                    return Ok((up, down));
                }
                let mut sent = 0;
                while let Some(d) = decode_datagram(&mut inbuf) {
                    sent += d.len() as u64;
                    socket.send(&d).await?;
                }
                up += sent;
                until[0] = charge(0, sent);
                if inbuf.is_empty() {
                    inbuf = BytesMut::new();
                }
            }
            r = socket.recv(&mut dgram), if until[1].is_none() => {
                let n = r?;
                down += n as u64;
                encode_datagram(&dgram[..n], &mut out).map_err(io::Error::other)?;
                wr.write_all(&out).await?;
                out.clear();
                until[1] = charge(1, n as u64);
            }
            () = sleep_until(until[0]), if until[0].is_some() => until[0] = None,
            () = sleep_until(until[1]), if until[1].is_some() => until[1] = None,
            () = tokio::time::sleep(idle) => {
                let _ = wr.shutdown().await;
                return Ok((up, down));
            }
        }
    }
}

/// Sleeps until `t` (never returns for `None`: its branch is disabled).
async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}
