//! # wsmux: many byte streams over one WebSocket
//!
//! `wsmux` multiplexes independent, flow-controlled, half-closable byte
//! streams over a single message transport such as one WebSocket connection.
//! One binary WebSocket message carries exactly one mux frame; the wire
//! protocol (version 1) is specified in `docs/mux.md` of this repository.
//!
//! * [`Session::client`] / [`Session::server`] start a session over any
//!   [`Transport`]; [`Session::open`] and [`Session::accept`] give
//!   [`Stream`]s, which are `tokio::io::AsyncRead + AsyncWrite + Send + Unpin`.
//! * Per-stream flow control: each stream has its own receive window (256 KiB
//!   to start, auto-tuned up to [`Config::max_window`] when the RTT demands
//!   it), so a reader that stops reading one stream stalls only that stream.
//! * Everything is bounded: streams ([`Config::max_streams`]), the accept
//!   backlog, the total receive memory ([`Config::max_session_memory`]) and
//!   the send queue ([`Config::max_send_queue`]).
//! * `shutdown()` half-closes (FIN); dropping a stream without closing it
//!   resets it (RST); dropping the [`Session`] fails every stream.
//! * A keepalive PING with a deadline detects a dead peer.
//!
//! The core is transport-agnostic: [`transport::memory_pair`] gives an
//! in-memory transport, and [`transport::ByteStream`] turns any transport into
//! a plain `AsyncRead + AsyncWrite` byte stream.
//!
//! ## Example
//!
//! ```
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//! use wsmux::{transport::memory_pair, Config, Session};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let (a, b) = memory_pair(64);
//! let client = Session::client(a, Config::default());
//! let server = Session::server(b, Config::default());
//!
//! // Server: echo every stream back, then half-close.
//! tokio::spawn(async move {
//!     while let Ok(mut stream) = server.accept().await {
//!         tokio::spawn(async move {
//!             let mut buf = Vec::new();
//!             stream.read_to_end(&mut buf).await?; // until the client's FIN
//!             stream.write_all(&buf).await?;
//!             stream.shutdown().await // FIN
//!         });
//!     }
//! });
//!
//! let mut stream = client.open().await?;
//! stream.write_all(b"GET / HTTP/1.1\r\n\r\n").await?;
//! stream.shutdown().await?; // half-close: reading still works
//! let mut reply = Vec::new();
//! stream.read_to_end(&mut reply).await?;
//! assert_eq!(reply, b"GET / HTTP/1.1\r\n\r\n");
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

mod config;
mod error;
pub mod frame;
mod pool;
pub mod proto;
mod session;
mod stream;
pub mod transport;

pub use config::Config;
pub use error::{Error, Result, StreamReset};
pub use frame::{reset_code, GoAwayCode};
pub use proto::Stats;
pub use session::Session;
pub use stream::Stream;
pub use transport::{ByteStream, Message, Transport};
#[cfg(feature = "wsframe")]
pub mod ws;
#[cfg(feature = "wsframe")]
pub use ws::WsTransport;

#[cfg(test)]
mod api_tests {
    fn stream_like<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static>() {}
    fn shareable<T: Send + Sync + 'static>() {}

    #[test]
    fn public_types_have_the_promised_traits() {
        stream_like::<crate::Stream>();
        shareable::<crate::Session>();
        shareable::<crate::Error>();
        stream_like::<crate::ByteStream<crate::transport::MemoryTransport>>();
    }
}
