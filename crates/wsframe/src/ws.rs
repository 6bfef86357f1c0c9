//! A message-level WebSocket over any `AsyncRead + AsyncWrite`: reassembled
//! messages in, whole messages out. For clients, tests, tools and libraries
//! (such as `wsmux`); the gateway's relay drives the [`Decoder`] directly.

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};

use crate::decode::{Decoder, DecoderConfig, Frame, Role};
use crate::frame::{close_payload, encode_frame, parse_close_payload, OpCode};
use crate::handshake;
use crate::ProtocolError;

/// A whole WebSocket message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Text(Bytes),
    Binary(Bytes),
    Ping(Bytes),
    Pong(Bytes),
    /// A Close frame: its code and reason, if it had any.
    Close(Option<(u16, String)>),
}

/// Errors of the message-level WebSocket.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("handshake: {0}")]
    Handshake(String),
    #[error("connection closed without a close frame")]
    Eof,
}

const READ_CHUNK: usize = 16 * 1024;

/// Reading state: decoder, read buffer, the message being reassembled.
#[derive(Debug)]
struct ReadState {
    decoder: Decoder,
    buf: BytesMut,
    partial: Option<(bool, BytesMut)>,
}

impl ReadState {
    async fn recv<R: AsyncRead + Unpin>(&mut self, io: &mut R) -> Result<Message, Error> {
        loop {
            while let Some(frame) = self.decoder.next(&mut self.buf)? {
                match frame {
                    Frame::Data {
                        payload,
                        text,
                        first,
                        last,
                        ..
                    } => {
                        if first && last {
                            let p = payload.freeze();
                            return Ok(if text {
                                Message::Text(p)
                            } else {
                                Message::Binary(p)
                            });
                        }
                        if first {
                            self.partial = Some((text, payload));
                        } else if let Some((_, acc)) = self.partial.as_mut() {
                            acc.extend_from_slice(&payload);
                        }
                        if last {
                            let (text, acc) = self.partial.take().expect("started");
                            let p = acc.freeze();
                            return Ok(if text {
                                Message::Text(p)
                            } else {
                                Message::Binary(p)
                            });
                        }
                    }
                    Frame::Control { opcode, payload } => {
                        let p = payload.freeze();
                        return Ok(match opcode {
                            OpCode::Ping => Message::Ping(p),
                            OpCode::Pong => Message::Pong(p),
                            _ => Message::Close(
                                parse_close_payload(&p).map(|(c, r)| (c, r.to_string())),
                            ),
                        });
                    }
                }
            }
            self.buf.reserve(READ_CHUNK);
            if io.read_buf(&mut self.buf).await? == 0 {
                return Err(Error::Eof);
            }
        }
    }
}

/// Writing state: the role decides masking.
#[derive(Debug)]
struct WriteState {
    role: Role,
    buf: BytesMut,
}

impl WriteState {
    fn feed(&mut self, msg: &Message) {
        let mask = match self.role {
            Role::Client => Some(rand::random::<[u8; 4]>()),
            Role::Server => None,
        };
        let (op, payload): (OpCode, &[u8]) = match msg {
            Message::Text(b) => (OpCode::Text, b),
            Message::Binary(b) => (OpCode::Binary, b),
            Message::Ping(b) => (OpCode::Ping, b),
            Message::Pong(b) => (OpCode::Pong, b),
            Message::Close(c) => {
                let p = c
                    .as_ref()
                    .map(|(code, reason)| close_payload(*code, reason))
                    .unwrap_or_default();
                encode_frame(&mut self.buf, true, OpCode::Close, mask, &p);
                return;
            }
        };
        encode_frame(&mut self.buf, true, op, mask, payload);
    }

    async fn flush<W: AsyncWrite + Unpin>(&mut self, io: &mut W) -> Result<(), Error> {
        if !self.buf.is_empty() {
            io.write_all(&self.buf).await?;
            self.buf.clear();
        }
        io.flush().await?;
        Ok(())
    }
}

/// A WebSocket connection after its handshake. [`WebSocket::recv`] answers
/// pings and close frames by itself.
#[derive(Debug)]
pub struct WebSocket<S> {
    io: S,
    read: ReadState,
    write: WriteState,
    close_sent: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> WebSocket<S> {
    /// Wraps a connection whose handshake is done. `leftover` holds any bytes
    /// read past the handshake.
    pub fn from_raw(io: S, role: Role, config: DecoderConfig, leftover: &[u8]) -> Self {
        Self {
            io,
            read: ReadState {
                decoder: Decoder::new(role, config),
                buf: BytesMut::from(leftover),
                partial: None,
            },
            write: WriteState {
                role,
                buf: BytesMut::new(),
            },
            close_sent: false,
        }
    }

    /// Performs the client handshake on `io` and returns the WebSocket and the
    /// server's response. A non-101 answer is an [`Error::Handshake`] carrying
    /// the status.
    pub async fn connect(
        mut io: S,
        host: &str,
        path: &str,
        protocols: &[&str],
        config: DecoderConfig,
    ) -> Result<(Self, handshake::Response), Error> {
        let key = handshake::generate_key();
        io.write_all(&handshake::client_request(host, path, &key, protocols, &[]))
            .await?;
        let mut buf = BytesMut::with_capacity(1024);
        let resp = loop {
            if io.read_buf(&mut buf).await? == 0 {
                return Err(Error::Handshake(
                    "connection closed during handshake".into(),
                ));
            }
            match handshake::parse_response(&buf) {
                Ok(Some(r)) => break r,
                Ok(None) if buf.len() < 64 * 1024 => continue,
                Ok(None) => return Err(Error::Handshake("response head too large".into())),
                Err(e) => return Err(Error::Handshake(format!("bad response: {e}"))),
            }
        };
        if resp.status != 101 {
            return Err(Error::Handshake(format!("status {}", resp.status)));
        }
        let expected = handshake::accept_key(key.as_bytes());
        if resp.header("sec-websocket-accept") != Some(expected.as_str()) {
            return Err(Error::Handshake("wrong Sec-WebSocket-Accept".into()));
        }
        let leftover = buf.split_off(resp.head_len);
        Ok((Self::from_raw(io, Role::Client, config, &leftover), resp))
    }

    /// The next data message, pong, or close. Pings are answered and not returned.
    /// A received Close is answered (unless we sent one first) and returned.
    pub async fn recv(&mut self) -> Result<Message, Error> {
        loop {
            let msg = self.read.recv(&mut self.io).await?;
            match &msg {
                Message::Ping(p) if !self.close_sent => {
                    self.write.feed(&Message::Pong(p.clone()));
                    self.write.flush(&mut self.io).await?;
                }
                Message::Ping(_) => {}
                Message::Close(c) => {
                    if !self.close_sent {
                        let echo = c.as_ref().map(|(code, _)| (*code, String::new()));
                        self.write.feed(&Message::Close(echo));
                        self.close_sent = true;
                        self.write.flush(&mut self.io).await?;
                    }
                    return Ok(msg);
                }
                _ => return Ok(msg),
            }
        }
    }

    /// Queues a message without writing it; see [`WebSocket::flush`].
    pub fn feed(&mut self, msg: &Message) {
        if matches!(msg, Message::Close(_)) {
            self.close_sent = true;
        }
        self.write.feed(msg);
    }

    /// Writes everything queued.
    pub async fn flush(&mut self) -> Result<(), Error> {
        self.write.flush(&mut self.io).await
    }

    /// Sends one message.
    pub async fn send(&mut self, msg: Message) -> Result<(), Error> {
        self.feed(&msg);
        self.flush().await
    }

    /// Sends a Close frame; keep calling [`WebSocket::recv`] to read the answer.
    pub async fn close(&mut self, code: u16, reason: &str) -> Result<(), Error> {
        self.send(Message::Close(Some((code, reason.to_string()))))
            .await
    }

    /// The underlying connection.
    pub fn get_ref(&self) -> &S {
        &self.io
    }

    /// Takes the WebSocket apart: the connection, the bytes read but not yet
    /// decoded, and the decoder (mid-message state included), for callers that
    /// drive the codec themselves.
    pub fn into_parts(self) -> (S, BytesMut, Decoder) {
        (self.io, self.read.buf, self.read.decoder)
    }

    /// Splits into a reader and a writer that can be used from two tasks.
    /// The reader returns pings and closes to its caller, which answers them
    /// through the writer.
    pub fn split(self) -> (WsReader<ReadHalf<S>>, WsWriter<WriteHalf<S>>) {
        let (r, w) = tokio::io::split(self.io);
        (
            WsReader {
                io: r,
                read: self.read,
            },
            WsWriter {
                io: w,
                write: self.write,
            },
        )
    }
}

/// The reading half of a split [`WebSocket`].
#[derive(Debug)]
pub struct WsReader<R> {
    io: R,
    read: ReadState,
}

impl<R: AsyncRead + Unpin> WsReader<R> {
    /// The next message of any kind, pings and closes included.
    pub async fn recv(&mut self) -> Result<Message, Error> {
        self.read.recv(&mut self.io).await
    }
}

/// The writing half of a split [`WebSocket`].
#[derive(Debug)]
pub struct WsWriter<W> {
    io: W,
    write: WriteState,
}

impl<W: AsyncWrite + Unpin> WsWriter<W> {
    /// Queues a message without writing it.
    pub fn feed(&mut self, msg: &Message) {
        self.write.feed(msg);
    }
    /// Writes everything queued.
    pub async fn flush(&mut self) -> Result<(), Error> {
        self.write.flush(&mut self.io).await
    }
    /// Sends one message.
    pub async fn send(&mut self, msg: Message) -> Result<(), Error> {
        self.write.feed(&msg);
        self.flush().await
    }
    /// Shuts the underlying connection's write side down.
    pub async fn shutdown(&mut self) -> Result<(), Error> {
        self.io.shutdown().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn client_server_round_trip_over_duplex() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let mut client = WebSocket::from_raw(a, Role::Client, DecoderConfig::default(), &[]);
        let mut server = WebSocket::from_raw(b, Role::Server, DecoderConfig::default(), &[]);
        let big = Bytes::from(vec![7u8; 200_000]);
        let srv = tokio::spawn(async move {
            loop {
                match server.recv().await.unwrap() {
                    Message::Close(_) => break,
                    m => server.send(m).await.unwrap(),
                }
            }
        });
        client.send(Message::Text("héllo".into())).await.unwrap();
        assert_eq!(client.recv().await.unwrap(), Message::Text("héllo".into()));
        client.send(Message::Binary(big.clone())).await.unwrap();
        assert_eq!(client.recv().await.unwrap(), Message::Binary(big));
        client.close(1000, "bye").await.unwrap();
        assert_eq!(
            client.recv().await.unwrap(),
            Message::Close(Some((1000, String::new())))
        );
        srv.await.unwrap();
    }
}
