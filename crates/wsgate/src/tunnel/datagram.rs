//! Datagrams over a stream (docs/tunnel.md §4: each one a u16 length and
//! its bytes), to and from a UDP socket.

use std::io;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UdpSocket;

use super::proto::{decode_datagram, encode_datagram, MAX_DATAGRAM};

/// A UDP flow ends after this long without a datagram either way.
pub const IDLE: Duration = Duration::from_secs(60);

/// Relays between a framed stream and a connected UDP socket until either
/// ends, fails, or the flow is idle for [`IDLE`]; the bytes each way.
pub async fn bridge<S>(stream: S, socket: &UdpSocket, idle: Duration) -> io::Result<(u64, u64)>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let (mut up, mut down) = (0u64, 0u64);
    let mut inbuf = BytesMut::new();
    let mut dgram = vec![0u8; MAX_DATAGRAM];
    let mut out = BytesMut::new();
    loop {
        tokio::select! {
            r = rd.read_buf(&mut inbuf) => {
                if r? == 0 {
                    return Ok((up, down));
                }
                while let Some(d) = decode_datagram(&mut inbuf) {
                    up += d.len() as u64;
                    socket.send(&d).await?;
                }
                if inbuf.is_empty() {
                    inbuf = BytesMut::new();
                }
            }
            r = socket.recv(&mut dgram) => {
                let n = r?;
                down += n as u64;
                encode_datagram(&dgram[..n], &mut out).map_err(io::Error::other)?;
                wr.write_all(&out).await?;
                out.clear();
            }
            () = tokio::time::sleep(idle) => {
                let _ = wr.shutdown().await;
                return Ok((up, down));
            }
        }
    }
}
