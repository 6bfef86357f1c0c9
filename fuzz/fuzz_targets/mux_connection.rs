//! Arbitrary messages, timestamps and application calls driven straight into
//! wsmux's sans-IO state machine (`wsmux::proto::Connection`): no runtime, no
//! transport, every run deterministic. Whatever happens, the connection never
//! panics, sends only valid frames, keeps its memory and stream bounds, and
//! once it has ended stays ended.
//!
//! Input: a role byte, then operations, each an opcode byte and its operands
//! (missing bytes read as 0).
#![no_main]

use bytes::{BufMut, Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use std::io;
use std::time::Duration;
use wsmux::frame::decode;
use wsmux::proto::{Connection, Role};
use wsmux::{Config, Message};

struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn byte(&mut self) -> u8 {
        let (b, rest) = self.0.split_first().map_or((0, &[][..]), |(b, r)| (*b, r));
        self.0 = rest;
        b
    }
    fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.byte(), self.byte()])
    }
    fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (a, b) = self.0.split_at(n.min(self.0.len()));
        self.0 = b;
        a
    }
    /// A credit/code value: often 0 or small, sometimes anything.
    fn value(&mut self) -> u32 {
        match self.byte() % 4 {
            0 => 0,
            1 => self.u16() as u32,
            2 => (self.u16() as u32) << 8,
            _ => u32::from_be_bytes([self.byte(), self.byte(), self.byte(), self.byte()]),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let role = if input.byte() & 1 == 1 {
        Role::Client
    } else {
        Role::Server
    };
    let cfg = Config {
        max_streams: 8,
        accept_backlog: 4,
        max_session_memory: 2 << 20,
        max_window: 1 << 20,
        max_send_queue: 64 << 10,
        max_frame_payload: 16 << 10,
        keepalive_interval: Some(Duration::from_secs(15)),
        keepalive_timeout: Duration::from_secs(20),
        close_timeout: Duration::from_secs(5),
        ..Config::default()
    };
    let mut now = std::time::Instant::now();
    let mut conn = Connection::new(role, cfg.clone(), now);
    let mut ids: Vec<u32> = Vec::new();
    let mut ended = false;
    let payload = vec![0xabu8; 70_000];
    while !input.0.is_empty() {
        let pick = |ids: &[u32], b: u8| {
            ids.get(b as usize % ids.len().max(1))
                .copied()
                .unwrap_or(b as u32)
        };
        match input.byte() % 13 {
            // A raw message.
            0 => {
                let len = input.byte() as usize;
                let msg = Bytes::copy_from_slice(input.bytes(len));
                conn.handle_message(now, Message::Binary(msg));
            }
            // A well-formed header with chosen fields: reaches stream states.
            1 => {
                let typ = input.byte() % 4;
                let flags = (input.byte() & 0x0f) as u16;
                let id = match input.byte() {
                    b if b < 0xf0 => (b % 24) as u32,
                    b => pick(&ids, b),
                };
                let value = input.value();
                let len = match input.byte() {
                    0..=200 => 0,
                    201..=250 => input.byte() as usize,
                    _ => input.u16() as usize,
                };
                let mut m = BytesMut::with_capacity(12 + len);
                m.put_u8(1);
                m.put_u8(typ);
                m.put_u16(flags);
                m.put_u32(id);
                m.put_u32(value);
                m.put_slice(&payload[..len.min(payload.len())]);
                conn.handle_message(now, Message::Binary(m.freeze()));
            }
            2 => {
                let len = input.byte() as usize;
                let text = Bytes::copy_from_slice(input.bytes(len));
                conn.handle_message(now, Message::Text(text));
            }
            // Time passes (up to about 65 s).
            3 => now += Duration::from_millis(input.u16() as u64),
            4 => conn.handle_timeout(now),
            5 => {
                if let Some(t) = conn.poll_timeout() {
                    now = now.max(t);
                    conn.handle_timeout(now);
                }
            }
            6 => {
                if let Ok(id) = conn.open(now) {
                    ids.push(id);
                }
            }
            7 => {
                if let Ok(Some(id)) = conn.accept() {
                    ids.push(id);
                }
            }
            8 => {
                let id = pick(&ids, input.byte());
                let len = input.u16() as usize;
                let _ = conn.write(id, &payload[..len]);
            }
            9 => {
                let id = pick(&ids, input.byte());
                let max = input.u16() as usize;
                let mut got = 0;
                let r = conn.read(id, max, |b| got += b.len());
                if let Ok(n) = r {
                    assert_eq!(n, got);
                    assert!(n <= max);
                }
            }
            10 => {
                let id = pick(&ids, input.byte());
                match input.byte() % 3 {
                    0 => {
                        let _ = conn.finish(id);
                    }
                    1 => conn.reset(id, input.value()),
                    _ => conn.release(id),
                }
            }
            11 => match input.byte() % 5 {
                0 => conn.goaway(),
                1 => conn.close(now),
                2 => conn.handle_recv_closed(now, None),
                3 => conn.handle_send_closed(now, None),
                _ => conn.handle_send_closed(now, Some(io::ErrorKind::BrokenPipe.into())),
            },
            // Send everything queued: only valid frames go out.
            _ => {
                while let Some(m) = conn.poll_transmit(now) {
                    if let Err(e) = decode(m) {
                        panic!("sent an invalid frame: {e}");
                    }
                }
            }
        }
        while conn.poll_event().is_some() {}
        let st = conn.stats();
        assert!(st.buffered <= st.committed, "{st:?}");
        assert!(st.committed <= cfg.max_session_memory, "{st:?}");
        assert!(st.streams <= cfg.max_streams, "{st:?}");
        if ended {
            assert!(conn.is_closing(), "a session that ended started again");
        }
        if conn.is_closing() {
            ended = true;
            assert!(conn.error().is_some());
            assert!(!conn.accepts_new_streams());
        }
        if conn.is_closed() {
            assert_eq!(conn.poll_timeout(), None);
        }
    }
});
