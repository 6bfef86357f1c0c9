//! `wsbench-deflate` — benchmark (b) of issue 26: a JSON message stream
//! echoed through a permessage-deflate WebSocket server (bench/deflate/README.md).
//!
//! Every connection offers `permessage-deflate; client_no_context_takeover;
//! client_max_window_bits`, so each message it sends is compressed on its
//! own: the frames are compressed and masked once, before the clock starts,
//! and written again and again (the client costs next to nothing on the
//! send side). The server inflates every message and compresses every echo
//! with its own settings (context takeover, its level). The first pass over
//! the message set is checked: every echo inflated and compared; measured
//! passes only parse frame headers and count. Prints one JSON line.

use std::io;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::{Bytes, BytesMut};
use clap::Parser;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wsframe::deflate::{self, Deflater, Inflater};
use wsframe::{handshake, Decoder, DecoderConfig, Frame, OpCode, Role};

#[derive(Parser)]
#[command(name = "wsbench-deflate")]
struct Args {
    /// ws://IP:PORT/PATH of the server under test.
    #[arg(long)]
    url: String,
    /// The server's process id (its CPU time is read from /proc).
    #[arg(long)]
    pid: u32,
    #[arg(long, default_value_t = 1)]
    conns: usize,
    /// Messages in flight per connection.
    #[arg(long, default_value_t = 32)]
    inflight: usize,
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Distinct messages in the stream.
    #[arg(long, default_value_t = 1000)]
    messages: usize,
}

/// The message set: JSON events of 150 B to about 2 KiB, the same for
/// every run (seeded).
pub fn json_messages(n: usize) -> Vec<Vec<u8>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(26);
    let symbols = ["BTC-USD", "ETH-USD", "SOL-USD", "EUR-USD", "AAPL", "MSFT"];
    let names = ["alice", "bob", "carol", "dave", "erin", "frank", "grace"];
    (0..n)
        .map(|i| {
            let trades = rng.gen_range(0..12);
            let mut book = String::new();
            for t in 0..trades {
                if t > 0 {
                    book.push(',');
                }
                book.push_str(&format!(
                    "{{\"px\":{:.2},\"qty\":{:.4},\"side\":\"{}\",\"venue\":\"v{}\"}}",
                    rng.gen_range(10.0..70000.0),
                    rng.gen_range(0.001..50.0),
                    if rng.gen_bool(0.5) { "buy" } else { "sell" },
                    rng.gen_range(1..6),
                ));
            }
            format!(
                "{{\"type\":\"update\",\"seq\":{i},\"ts\":{},\"symbol\":\"{}\",\
                 \"user\":{{\"id\":{},\"name\":\"{}\",\"verified\":{}}},\
                 \"bid\":{:.2},\"ask\":{:.2},\"trades\":[{book}]}}",
                1_760_000_000_000u64 + rng.gen_range(0..10_000_000u64),
                symbols[rng.gen_range(0..symbols.len())],
                rng.gen_range(1..100_000),
                names[rng.gen_range(0..names.len())],
                rng.gen_bool(0.3),
                rng.gen_range(10.0..70000.0),
                rng.gen_range(10.0..70000.0),
            )
            .into_bytes()
        })
        .collect()
}

fn offer() -> deflate::Config {
    deflate::Config {
        client_no_context_takeover: true,
        min_size: 0,
        ..deflate::Config::default()
    }
}

struct Conn {
    s: TcpStream,
    buf: BytesMut,
    dec: Decoder,
    /// The server's compressor's parameters, as agreed.
    inflater: Inflater,
    extensions: String,
}

async fn connect(url: &str) -> anyhow::Result<Conn> {
    let rest = url.strip_prefix("ws://").context("ws:// URL")?;
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let mut s = TcpStream::connect(host).await?;
    s.set_nodelay(true)?;
    let key = handshake::generate_key();
    let offer_text = deflate::client_offer(&offer());
    s.write_all(&handshake::client_request(
        host,
        path,
        &key,
        &[],
        &[("Sec-WebSocket-Extensions", &offer_text)],
    ))
    .await?;
    let mut buf = BytesMut::with_capacity(4096);
    let resp = loop {
        if s.read_buf(&mut buf).await? == 0 {
            bail!("closed during the handshake");
        }
        if let Some(r) = handshake::parse_response(&buf)? {
            break r;
        }
    };
    if resp.status != 101 {
        bail!("status {}", resp.status);
    }
    let extensions = resp
        .header("sec-websocket-extensions")
        .unwrap_or("")
        .to_string();
    let agreed = deflate::accept_response([extensions.as_bytes()], &offer())?
        .context("the server did not agree to permessage-deflate")?;
    let rest = buf.split_off(resp.head_len);
    Ok(Conn {
        s,
        buf: rest,
        dec: Decoder::new(
            Role::Client,
            DecoderConfig {
                max_message_size: 0,
                allowed_rsv: deflate::RSV1,
                validate_utf8: false,
            },
        ),
        inflater: agreed.inflater(Role::Client, 0),
        extensions,
    })
}

/// One received message: its wire payload length, and (when `check`) the
/// inflated bytes.
async fn recv(c: &mut Conn, check: bool) -> anyhow::Result<(usize, Option<Vec<u8>>)> {
    let mut wire = 0;
    let mut msg: Option<Vec<u8>> = None;
    let mut compressed = false;
    loop {
        while let Some(f) = c.dec.next(&mut c.buf)? {
            let Frame::Data {
                payload,
                first,
                last,
                rsv,
                ..
            } = f
            else {
                bail!("unexpected control frame");
            };
            wire += payload.len();
            if first {
                compressed = rsv & deflate::RSV1 != 0;
                if compressed {
                    c.inflater.begin(false);
                }
            }
            if compressed && check {
                // The server's window goes on from message to message; the
                // checked pass inflates its stream from the start (measured
                // passes come after it and only count).
                let mut at = 0;
                loop {
                    let mut out = BytesMut::new();
                    let step = c
                        .inflater
                        .inflate(&payload[at..], last, &mut out, 1 << 16)?;
                    at += step.consumed;
                    if check {
                        msg.get_or_insert_with(Vec::new).extend_from_slice(&out);
                    }
                    if step.done || (at == payload.len() && !last) {
                        break;
                    }
                }
            } else if check && !compressed {
                msg.get_or_insert_with(Vec::new).extend_from_slice(&payload);
            }
            if last {
                return Ok((wire, msg.or(check.then(Vec::new))));
            }
        }
        c.buf.reserve(64 * 1024);
        if c.s.read_buf(&mut c.buf).await? == 0 {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
        }
    }
}

fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command (which may hold spaces): state is field 3.
    let after = &stat[stat.rfind(')').context("stat")? + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    Ok(f[11].parse::<u64>()? + f[12].parse::<u64>()?)
}

struct Counts {
    msgs: u64,
    raw: u64,
    wire: u64,
}

/// The masked frames, each message's span in them, and the messages.
type Frames = (Bytes, Vec<(usize, usize)>, Vec<Vec<u8>>);

async fn run_conn(
    url: String,
    frames: std::sync::Arc<Frames>,
    inflight: usize,
    start: Instant,
    warmup: Duration,
    end: Instant,
) -> anyhow::Result<(Counts, String)> {
    let mut c = connect(&url).await?;
    let (wire_frames, spans, msgs) = &*frames;
    let n = spans.len();
    // The checked pass: every message once, each echo inflated and compared.
    for (i, (a, b)) in spans.iter().enumerate() {
        c.s.write_all(&wire_frames[*a..*b]).await?;
        let (_, got) = recv(&mut c, true).await?;
        if got.as_deref() != Some(&msgs[i][..]) {
            bail!("echo {i} differs from what was sent");
        }
    }
    let mut counts = Counts {
        msgs: 0,
        raw: 0,
        wire: 0,
    };
    let (mut sent, mut got) = (0usize, 0usize);
    let mut out = Vec::with_capacity(inflight * 2048);
    while sent < inflight {
        let (a, b) = spans[sent % n];
        out.extend_from_slice(&wire_frames[a..b]);
        sent += 1;
    }
    c.s.write_all(&out).await?;
    loop {
        let (wire, _) = recv(&mut c, false).await?;
        let now = Instant::now();
        if now >= start + warmup && now < end {
            counts.msgs += 1;
            counts.raw += msgs[got % n].len() as u64;
            counts.wire += wire as u64;
        }
        got += 1;
        if now >= end {
            break;
        }
        let (a, b) = spans[sent % n];
        c.s.write_all(&wire_frames[a..b]).await?;
        sent += 1;
    }
    Ok((counts, c.extensions))
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let msgs = json_messages(a.messages);
        // Each message compressed on its own (client_no_context_takeover),
        // masked, once.
        let mut d = Deflater::new(6, 15, true, 0, Role::Client);
        let mut wire = BytesMut::new();
        let mut spans = vec![];
        for m in &msgs {
            let at = wire.len();
            d.encode(&mut wire, OpCode::Text, m);
            spans.push((at, wire.len()));
        }
        let raw_up: usize = msgs.iter().map(Vec::len).sum();
        let wire_up: usize = spans.iter().map(|(a, b)| b - a).sum();
        let frames = std::sync::Arc::new((wire.freeze(), spans, msgs));
        let warmup = Duration::from_secs_f64(a.warmup);
        // Connections start (and check) first; the clock starts after.
        let start = Instant::now() + Duration::from_millis(200 + 20 * a.conns as u64);
        let end = start + warmup + Duration::from_secs_f64(a.seconds);
        let mut tasks = vec![];
        for _ in 0..a.conns {
            tasks.push(tokio::spawn(run_conn(
                a.url.clone(),
                frames.clone(),
                a.inflight,
                start,
                warmup,
                end,
            )));
        }
        tokio::time::sleep_until((start + warmup).into()).await;
        let cpu0 = cpu_ticks(a.pid)?;
        tokio::time::sleep_until(end.into()).await;
        let cpu1 = cpu_ticks(a.pid)?;
        let mut total = Counts {
            msgs: 0,
            raw: 0,
            wire: 0,
        };
        let mut ext = String::new();
        for t in tasks {
            let (c, e) = t.await??;
            total.msgs += c.msgs;
            total.raw += c.raw;
            total.wire += c.wire;
            ext = e;
        }
        let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        let cpu_s = (cpu1 - cpu0) as f64 / tick;
        let secs = a.seconds;
        println!(
            "{{\"conns\":{},\"inflight\":{},\"msgs_per_s\":{:.0},\"server_cpu_us_per_msg\":{:.2},\
             \"server_cpu_share\":{:.3},\"ratio_down\":{:.3},\"ratio_up\":{:.3},\"mean_msg_bytes\":{:.0},\
             \"extensions\":\"{}\"}}",
            a.conns,
            a.inflight,
            total.msgs as f64 / secs,
            cpu_s * 1e6 / total.msgs.max(1) as f64,
            cpu_s / secs,
            total.raw as f64 / total.wire.max(1) as f64,
            raw_up as f64 / wire_up as f64,
            total.raw as f64 / total.msgs.max(1) as f64,
            ext.replace('"', "'"),
        );
        Ok(())
    })
}
