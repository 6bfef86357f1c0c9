//! Session configuration.

use crate::frame::{INITIAL_WINDOW, MAX_DATA_PAYLOAD};
use std::time::Duration;

/// Tunables of a [`crate::Session`]. Every queue and buffer is bounded by one
/// of these. Build with `Config { field: value, ..Config::default() }`.
#[derive(Debug, Clone)]
pub struct Config {
    /// Receive window every stream starts with (at least 256 KiB, the
    /// protocol's implicit initial window; more is granted with the SYN/ACK).
    pub initial_window: u32,
    /// Upper bound for a stream's receive window under auto-tuning.
    pub max_window: u32,
    /// Upper bound on the sum of all streams' receive windows, i.e. on the
    /// bytes all streams of this session can hold in memory at once.
    /// Opening or accepting a stream that would exceed it fails
    /// ([`crate::Error::MemoryLimit`] / RST REFUSED); windows only grow while
    /// they fit.
    pub max_session_memory: usize,
    /// Maximum number of streams alive at once (both directions, including
    /// streams waiting in the accept backlog).
    pub max_streams: usize,
    /// Maximum number of inbound streams waiting for `accept()`; further SYNs
    /// are answered with RST REFUSED.
    pub accept_backlog: usize,
    /// Largest DATA payload this side sends in one frame (≤ 64 KiB).
    pub max_frame_payload: usize,
    /// Bytes of outgoing DATA queued for the transport before writers wait.
    pub max_send_queue: usize,
    /// Send a PING this often (`None`: no keepalive; one PING is still sent at
    /// start to measure the RTT).
    pub keepalive_interval: Option<Duration>,
    /// While a PING is unanswered, this long without any message from the
    /// peer declares it dead and fails every stream with
    /// [`crate::Error::KeepaliveTimeout`].
    pub keepalive_timeout: Duration,
    /// After the session has ended (failed, or the `Session` dropped), how
    /// long the driver keeps delivering its last frames (DATA queued before
    /// the drop, the GOAWAY) and then reading and discarding until the peer's
    /// WebSocket Close (the close handshake), before it drops the transport.
    /// Also how long a failed send waits for reading to explain it (see
    /// [`crate::proto::Connection::handle_send_closed`]).
    pub close_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            initial_window: INITIAL_WINDOW,
            max_window: 16 * 1024 * 1024,
            max_session_memory: 64 * 1024 * 1024,
            max_streams: 256,
            accept_backlog: 256,
            max_frame_payload: 32 * 1024,
            max_send_queue: 512 * 1024,
            keepalive_interval: Some(Duration::from_secs(15)),
            keepalive_timeout: Duration::from_secs(20),
            close_timeout: Duration::from_secs(5),
        }
    }
}

impl Config {
    pub(crate) fn normalized(mut self) -> Self {
        self.initial_window = self.initial_window.max(INITIAL_WINDOW);
        self.max_window = self.max_window.max(self.initial_window);
        self.max_frame_payload = self.max_frame_payload.clamp(1, MAX_DATA_PAYLOAD);
        self.max_send_queue = self.max_send_queue.max(self.max_frame_payload);
        self.max_streams = self.max_streams.max(1);
        self
    }
}
