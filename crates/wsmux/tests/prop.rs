//! Property tests over the in-memory transport with random delays, message
//! sizes, many streams in both directions, and random FIN/RST schedules.
//! Tokio's paused clock makes every case deterministic and fast.

mod common;

use common::{payload, DelayTransport};
use proptest::prelude::*;
use std::io::ErrorKind;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wsmux::transport::memory_pair;
use wsmux::{Config, Session, Stats, StreamReset};

#[derive(Debug, Clone)]
enum WriterEnd {
    /// Write everything, FIN, then read the peer's reply to EOF.
    Fin,
    /// Write this many bytes (capped at the data length), then drop: RST.
    Drop(usize),
}

#[derive(Debug, Clone)]
enum ReaderEnd {
    /// Read to EOF (or the peer's RST), reply, FIN.
    ReadAll,
    /// Reset with code 7 after reading at least this many bytes.
    ResetAfter(usize),
}

#[derive(Debug, Clone)]
struct Spec {
    from_client: bool,
    len: usize,
    write_chunk: usize,
    read_chunk: usize,
    read_pause_us: u64,
    writer: WriterEnd,
    reader: ReaderEnd,
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        any::<bool>(),
        0usize..300_000,
        1usize..70_000,
        1usize..70_000,
        prop_oneof![Just(0u64), 0u64..2000],
        prop_oneof![
            3 => Just(WriterEnd::Fin),
            1 => (0usize..300_000).prop_map(WriterEnd::Drop),
        ],
        prop_oneof![
            3 => Just(ReaderEnd::ReadAll),
            1 => (0usize..300_000).prop_map(ReaderEnd::ResetAfter),
        ],
    )
        .prop_map(
            |(from_client, len, write_chunk, read_chunk, read_pause_us, writer, reader)| Spec {
                from_client,
                len,
                write_chunk,
                read_chunk,
                read_pause_us,
                writer,
                reader,
            },
        )
}

fn reset_code(e: &std::io::Error) -> Option<u32> {
    e.get_ref()
        .and_then(|i| i.downcast_ref::<StreamReset>())
        .map(|r| r.code)
}

fn check_memory(stats: Stats, cfg: &Config) {
    assert!(stats.buffered <= stats.committed, "{stats:?}");
    assert!(stats.committed <= cfg.max_session_memory, "{stats:?}");
    // A writer may add one frame while the queue is below its cap; SYN, ACK,
    // FIN and RST frames (12 bytes, at most a few per stream) come on top.
    let cap = cfg.max_send_queue.max(cfg.max_frame_payload);
    assert!(
        stats.send_queue < cap + cfg.max_frame_payload + 12 + 12 * 4 * 16,
        "{stats:?}"
    );
}

/// Opener side: sends `[index][data]`, then FIN or RST.
async fn opener(session: Arc<Session>, cfg: Config, index: u32, spec: Spec) {
    let mut s = session.open().await.unwrap();
    let data = payload(index as u64, spec.len);
    let limit = match spec.writer {
        WriterEnd::Fin => data.len(),
        WriterEnd::Drop(n) => n.min(data.len()),
    };
    let mut wire = index.to_be_bytes().to_vec();
    wire.extend_from_slice(&data[..limit]);
    for chunk in wire.chunks(spec.write_chunk) {
        if let Err(e) = s.write_all(chunk).await {
            // Only the peer's reset may stop us.
            assert_eq!(reset_code(&e), Some(7), "stream {index}: {e}");
            return;
        }
        check_memory(session.stats(), &cfg);
    }
    match spec.writer {
        WriterEnd::Drop(_) => drop(s), // RST CANCEL
        WriterEnd::Fin => {
            if let Err(e) = s.shutdown().await {
                assert_eq!(reset_code(&e), Some(7), "stream {index}: {e}");
                return;
            }
            let mut reply = Vec::new();
            match s.read_to_end(&mut reply).await {
                Ok(_) => assert_eq!(
                    reply,
                    (data.len() as u64).to_be_bytes(),
                    "stream {index}: reply"
                ),
                Err(e) => assert_eq!(reset_code(&e), Some(7), "stream {index}: {e}"),
            }
        }
    }
}

/// Acceptor side: checks that the bytes are exactly the expected prefix, in
/// order, and that the end (EOF / RST) matches the writer's schedule.
async fn acceptor(session: Arc<Session>, cfg: Config, specs: Arc<Vec<Spec>>) {
    let mut s = session.accept().await.unwrap();
    let index = s.read_u32().await.unwrap();
    let spec = specs[index as usize].clone();
    let data = payload(index as u64, spec.len);
    let mut got = Vec::new();
    let mut buf = vec![0u8; spec.read_chunk];
    let end = loop {
        if let ReaderEnd::ResetAfter(k) = spec.reader {
            if got.len() >= k {
                s.reset(7);
                break None;
            }
        }
        let r = s.read(&mut buf).await;
        check_memory(session.stats(), &cfg);
        assert!(s.recv_buffered() <= s.recv_window() as usize);
        match r {
            Ok(0) => break Some(Ok(())),
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                assert!(
                    got.len() <= data.len() && got[..] == data[..got.len()],
                    "stream {index}: bytes corrupted or out of order at {}",
                    got.len()
                );
                if spec.read_pause_us > 0 {
                    tokio::time::sleep(Duration::from_micros(spec.read_pause_us)).await;
                }
            }
            Err(e) => break Some(Err(e)),
        }
    };
    match (end, &spec.writer) {
        (None, _) => {} // we reset it
        (Some(Ok(())), WriterEnd::Fin) => {
            assert_eq!(got.len(), data.len(), "stream {index}: FIN before all data");
            s.write_all(&(got.len() as u64).to_be_bytes())
                .await
                .unwrap();
            s.shutdown().await.unwrap();
        }
        (Some(Ok(())), WriterEnd::Drop(_)) => panic!("stream {index}: EOF after RST"),
        (Some(Err(e)), WriterEnd::Drop(n)) => {
            assert_eq!(reset_code(&e), Some(wsmux::reset_code::CANCEL), "{e}");
            assert_eq!(e.kind(), ErrorKind::ConnectionReset);
            // Everything written before the RST arrived, then the RST.
            assert_eq!(got.len(), (*n).min(data.len()), "stream {index}");
        }
        (Some(Err(e)), WriterEnd::Fin) => panic!("stream {index}: unexpected error {e}"),
    }
}

fn run_case(
    seed: u64,
    max_delay_us: u64,
    frame: usize,
    queue: usize,
    extra_mem: usize,
    specs: Vec<Spec>,
) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async move {
        let cfg = Config {
            max_frame_payload: frame,
            max_send_queue: queue,
            // Room for every stream's initial window even when grown windows
            // hold their whole share (half the session memory): otherwise a
            // SYN may be refused (RST REFUSED), which this test does not model.
            max_session_memory: 2 * specs.len() * 256 * 1024 + extra_mem,
            ..Config::default()
        };
        let (a, b) = memory_pair(1 + (seed % 64) as usize);
        let d = Duration::from_micros(max_delay_us);
        let client = Arc::new(Session::client(
            DelayTransport::new(a, seed, Duration::ZERO, d),
            cfg.clone(),
        ));
        let server = Arc::new(Session::server(
            DelayTransport::new(b, !seed, Duration::ZERO, d),
            cfg.clone(),
        ));
        let specs = Arc::new(specs);
        let mut tasks = Vec::new();
        for (i, spec) in specs.iter().enumerate() {
            let (open_side, accept_side) = if spec.from_client {
                (client.clone(), server.clone())
            } else {
                (server.clone(), client.clone())
            };
            tasks.push(tokio::spawn(opener(
                open_side,
                cfg.clone(),
                i as u32,
                spec.clone(),
            )));
            tasks.push(tokio::spawn(acceptor(
                accept_side,
                cfg.clone(),
                specs.clone(),
            )));
        }
        let all = async {
            for t in tasks {
                t.await.unwrap();
            }
        };
        // Virtual time: a generous bound that only a hang would reach.
        tokio::time::timeout(Duration::from_secs(3600), all)
            .await
            .expect("case hung");
        assert!(client.error().is_none(), "{:?}", client.error());
        assert!(server.error().is_none(), "{:?}", server.error());
        // Every stream is gone and its memory released.
        tokio::task::yield_now().await;
        for s in [&client, &server] {
            let st = s.stats();
            assert_eq!((st.streams, st.buffered, st.committed), (0, 0, 0), "{st:?}");
        }
    });
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn streams_deliver_in_order_and_fin_rst_behave(
        seed in any::<u64>(),
        max_delay_us in prop_oneof![Just(0u64), 1u64..5_000],
        frame in prop_oneof![Just(65536usize), 1usize..65536],
        queue in 1usize..1_000_000,
        extra_mem in 0usize..2_000_000,
        specs in proptest::collection::vec(spec(), 1..16),
    ) {
        run_case(seed, max_delay_us, frame, queue, extra_mem, specs);
    }
}

/// A case the property test found "hanging" with a fresh random seed: with
/// room for just four initial windows, the first streams' grown windows took
/// the fourth stream's, its SYN was refused (as documented), and its acceptor
/// waited for a stream that never came. Kept as a fixed case.
#[test]
fn regression_session_memory_nearly_full_with_a_dropped_writer() {
    let s = |from_client, len, write_chunk, read_chunk, read_pause_us, writer| Spec {
        from_client,
        len,
        write_chunk,
        read_chunk,
        read_pause_us,
        writer,
        reader: ReaderEnd::ReadAll,
    };
    run_case(
        0,
        1,
        65536,
        195_597,
        1,
        vec![
            s(false, 65_218, 42_407, 23_332, 0, WriterEnd::Fin),
            s(true, 275_685, 244, 7_924, 0, WriterEnd::Fin),
            s(false, 66_689, 61_990, 42_357, 0, WriterEnd::Fin),
            s(
                true,
                63_260,
                54_912,
                64_641,
                1_830,
                WriterEnd::Drop(224_448),
            ),
        ],
    );
}
