//! Stream and session life cycle over the in-memory transport.

mod common;

use bytes::{BufMut, Bytes, BytesMut};
use common::*;
use std::io::ErrorKind;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use wsmux::frame::{Flags, Frame};
use wsmux::{reset_code, Config, Error, GoAwayCode, StreamReset};

fn reset_code_of(e: &std::io::Error) -> Option<u32> {
    e.get_ref()
        .and_then(|i| i.downcast_ref::<StreamReset>())
        .map(|r| r.code)
}

#[tokio::test(start_paused = true)]
async fn echo_many_streams_both_directions() {
    let (client, server) = pair(Config::default(), Config::default());
    let server = Arc::new(server);
    let srv = server.clone();
    let echo = tokio::spawn(async move {
        let mut tasks = Vec::new();
        for _ in 0..20 {
            let mut s = srv.accept().await.unwrap();
            tasks.push(tokio::spawn(async move {
                let (mut r, mut w) = tokio::io::split(&mut s);
                tokio::io::copy(&mut r, &mut w).await.unwrap();
                w.shutdown().await.unwrap();
                drop((r, w));
                s
            }));
        }
        let mut streams = Vec::new();
        for t in tasks {
            streams.push(t.await.unwrap());
        }
        streams
    });
    let mut tasks = Vec::new();
    for i in 0..20u64 {
        let mut s = client.open().await.unwrap();
        assert_eq!(s.id() % 2, 1);
        tasks.push(tokio::spawn(async move {
            let data = payload(i, 300_000 + i as usize * 1000);
            let (mut r, mut w) = tokio::io::split(&mut s);
            let expected = data.clone();
            let writer = async move {
                w.write_all(&data).await.unwrap();
                w.shutdown().await.unwrap();
            };
            let reader = async move {
                let mut got = Vec::new();
                r.read_to_end(&mut got).await.unwrap();
                got
            };
            let ((), got) = tokio::join!(writer, reader);
            assert_eq!(got, expected);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let server_streams = echo.await.unwrap();
    assert!(server_streams
        .iter()
        .all(|s| s.id() % 2 == 0 || s.id() % 2 == 1));
    drop(server_streams);
    assert_eq!(client.stats().buffered, 0);
    assert!(client.rtt().is_some());
}

#[tokio::test(start_paused = true)]
async fn half_close_each_direction_independently() {
    let (client, server) = pair(Config::default(), Config::default());
    let mut c = client.open().await.unwrap();
    c.write_all(b"request").await.unwrap();
    c.shutdown().await.unwrap();
    // Writing after our FIN fails, reading still works.
    assert_eq!(
        c.write_all(b"x").await.unwrap_err().kind(),
        ErrorKind::BrokenPipe
    );

    let mut s = server.accept().await.unwrap();
    let srv = tokio::spawn(async move {
        let mut req = Vec::new();
        s.read_to_end(&mut req).await.unwrap();
        assert_eq!(req, b"request");
        // The server can keep writing after the client's FIN.
        for _ in 0..10 {
            s.write_all(&[7u8; 100_000]).await.unwrap();
        }
        s.shutdown().await.unwrap();
        s
    });
    let mut resp = Vec::new();
    c.read_to_end(&mut resp).await.unwrap();
    assert_eq!(resp.len(), 1_000_000);
    assert!(resp.iter().all(|&b| b == 7));
    let s = srv.await.unwrap();
    // Both closed cleanly: dropping sends no RST, state is released.
    drop(c);
    drop(s);
    tokio::task::yield_now().await;
    assert_eq!(client.stats().streams, 0);
    assert_eq!(server.stats().streams, 0);
}

#[tokio::test(start_paused = true)]
async fn dropping_a_stream_without_shutdown_sends_rst() {
    let (client, server) = pair(Config::default(), Config::default());
    let mut c = client.open().await.unwrap();
    c.write_all(b"partial").await.unwrap();
    let mut s = server.accept().await.unwrap();
    drop(c);
    let mut buf = Vec::new();
    let err = s.read_to_end(&mut buf).await.unwrap_err();
    assert_eq!(buf, b"partial", "data sent before the RST stays readable");
    assert_eq!(err.kind(), ErrorKind::ConnectionReset);
    assert_eq!(reset_code_of(&err), Some(reset_code::CANCEL));
    let err = s.write_all(b"x").await.unwrap_err();
    assert_eq!(reset_code_of(&err), Some(reset_code::CANCEL));
}

#[tokio::test(start_paused = true)]
async fn reset_carries_the_application_code() {
    let (client, server) = pair(Config::default(), Config::default());
    let mut c = client.open().await.unwrap();
    c.write_all(b"x").await.unwrap();
    let mut s = server.accept().await.unwrap();
    s.reset(42);
    let err = c.read_u8().await.unwrap_err();
    assert_eq!(reset_code_of(&err), Some(42));
    let mut b = [0u8; 1];
    assert!(s.read(&mut b).await.is_err());
}

#[tokio::test(start_paused = true)]
async fn dropping_the_session_fails_every_stream() {
    let (client, server) = pair(Config::default(), Config::default());
    let mut c1 = client.open().await.unwrap();
    let mut c2 = client.open().await.unwrap();
    c1.write_all(b"a").await.unwrap();
    c2.write_all(b"b").await.unwrap();
    let mut s1 = server.accept().await.unwrap();
    let _s2 = server.accept().await.unwrap();
    assert_eq!(s1.read_u8().await.unwrap(), b'a');
    let reader = tokio::spawn(async move {
        let mut b = [0u8; 1];
        c1.read(&mut b).await
    });
    tokio::task::yield_now().await;
    drop(client);
    let err = reader.await.unwrap().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotConnected);
    assert!(err.to_string().contains("session closed"), "{err}");
    assert!(c2.write_all(b"more").await.is_err());
    // The peer sees the session end too.
    let e = server.closed().await;
    assert!(
        matches!(e, Error::TransportClosed),
        "server saw {e:?} after the client's GOAWAY + close"
    );
    assert!(server.peer_goaway());
    assert!(s1.read_u8().await.is_err());
}

#[tokio::test(start_paused = true)]
async fn goaway_refuses_new_streams_and_lets_existing_ones_finish() {
    let (client, server) = pair(Config::default(), Config::default());
    let mut c = client.open().await.unwrap();
    c.write_all(b"before").await.unwrap();
    let mut s = server.accept().await.unwrap();
    server.goaway();
    assert!(matches!(server.open().await, Err(Error::LocalGoAway)));
    assert!(matches!(server.accept().await, Err(Error::LocalGoAway)));
    // GOAWAY is sent ahead of this data, so once it is read the client knows.
    s.write_all(b"after goaway").await.unwrap();
    let mut buf = [0u8; 12];
    c.read_exact(&mut buf).await.unwrap();
    assert!(client.peer_goaway());
    assert!(matches!(client.open().await, Err(Error::PeerGoAway)));
    // The existing stream still works both ways and finishes cleanly.
    c.write_all(b" more").await.unwrap();
    c.shutdown().await.unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"before more");
    s.shutdown().await.unwrap();
    assert_eq!(c.read(&mut buf).await.unwrap(), 0);
    assert!(client.error().is_none());
}

#[tokio::test(start_paused = true)]
async fn syn_after_goaway_is_refused() {
    let (session, mut raw) = raw_client(Config::default());
    session.goaway();
    assert_eq!(raw.expect_goaway().await, GoAwayCode::Normal);
    raw.send(
        Frame::WindowUpdate {
            stream_id: 1,
            flags: Flags::SYN,
            delta: 0,
        }
        .encode(),
    )
    .await;
    match raw.recv_frame().await.unwrap() {
        Frame::Data {
            stream_id: 1,
            flags,
            rst_code,
            ..
        } => {
            assert!(flags.contains(Flags::RST));
            assert_eq!(rst_code, reset_code::REFUSED);
        }
        f => panic!("{f:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn dead_peer_is_detected_by_the_keepalive_deadline() {
    let cfg = Config {
        keepalive_interval: Some(Duration::from_secs(10)),
        keepalive_timeout: Duration::from_secs(5),
        ..Config::default()
    };
    // The other end exists but nobody answers: a silent peer.
    let (session, _silent) = raw_server(cfg);
    let mut s = session.open().await.unwrap();
    let start = Instant::now();
    let err = s.read_u8().await.unwrap_err();
    let elapsed = start.elapsed();
    assert_eq!(err.kind(), ErrorKind::TimedOut);
    assert!(err.to_string().contains("keepalive"), "{err}");
    assert!(matches!(session.error(), Some(Error::KeepaliveTimeout(_))));
    // The first PING goes out at once; its deadline is 5 s later.
    assert!(elapsed >= Duration::from_secs(5) && elapsed < Duration::from_secs(6));
    assert!(matches!(
        session.open().await,
        Err(Error::KeepaliveTimeout(_))
    ));
}

#[tokio::test(start_paused = true)]
async fn live_peer_survives_many_keepalive_rounds() {
    let cfg = Config {
        keepalive_interval: Some(Duration::from_secs(1)),
        keepalive_timeout: Duration::from_secs(1),
        ..Config::default()
    };
    let (client, server) = delayed_pair(
        1,
        Duration::from_millis(10),
        Duration::from_millis(200),
        cfg.clone(),
        cfg,
    );
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(client.error().is_none());
    assert!(server.error().is_none());
    let rtt = client.rtt().unwrap();
    assert!(rtt >= Duration::from_millis(20) && rtt <= Duration::from_millis(400));
}

#[tokio::test(start_paused = true)]
async fn text_message_is_a_protocol_error_with_goaway_text_message() {
    let (session, mut raw) = raw_client(Config::default());
    raw.t.send_text_now("hello").unwrap();
    assert_eq!(raw.expect_goaway().await, GoAwayCode::TextMessage);
    match session.closed().await {
        Error::Protocol { code, .. } => assert_eq!(code, GoAwayCode::TextMessage),
        e => panic!("{e:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn unknown_version_is_a_protocol_error_with_goaway_unsupported_version() {
    let (session, mut raw) = raw_client(Config::default());
    raw.send(Bytes::from_static(&[2, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0]))
        .await;
    assert_eq!(raw.expect_goaway().await, GoAwayCode::UnsupportedVersion);
    assert!(matches!(
        session.closed().await,
        Error::Protocol {
            code: GoAwayCode::UnsupportedVersion,
            ..
        }
    ));
}

#[tokio::test(start_paused = true)]
async fn sending_past_the_window_is_a_flow_control_error() {
    let (session, mut raw) = raw_client(Config::default());
    raw.send(
        Frame::WindowUpdate {
            stream_id: 1,
            flags: Flags::SYN,
            delta: 0,
        }
        .encode(),
    )
    .await;
    let chunk = Bytes::from(vec![1u8; 64 * 1024]);
    for _ in 0..4 {
        raw.send(data(1, &chunk)).await;
    }
    // Exactly the window: fine so far.
    tokio::task::yield_now().await;
    assert!(session.error().is_none());
    assert_eq!(session.stats().buffered, 256 * 1024);
    raw.send(data(1, b"x")).await;
    assert_eq!(raw.expect_goaway().await, GoAwayCode::FlowControlError);
    assert!(matches!(
        session.closed().await,
        Error::Protocol {
            code: GoAwayCode::FlowControlError,
            ..
        }
    ));
}

fn data(id: u32, payload: &[u8]) -> Bytes {
    let mut b = BytesMut::new();
    b.put_slice(&[1, 0, 0, 0]);
    b.put_u32(id);
    b.put_u32(0);
    b.put_slice(payload);
    b.freeze()
}

#[tokio::test(start_paused = true)]
async fn data_for_a_never_opened_stream_is_a_protocol_error() {
    let (session, mut raw) = raw_client(Config::default());
    raw.send(data(5, b"x")).await;
    assert_eq!(raw.expect_goaway().await, GoAwayCode::ProtocolError);
    assert!(session.error().is_some());
}

#[tokio::test(start_paused = true)]
async fn accept_backlog_overflow_is_refused_with_rst() {
    let scfg = Config {
        accept_backlog: 2,
        ..Config::default()
    };
    let (client, server) = pair(Config::default(), scfg);
    let mut streams = Vec::new();
    for _ in 0..3 {
        let mut s = client.open().await.unwrap();
        s.write_all(b"hi").await.unwrap();
        streams.push(s);
    }
    let mut third = streams.pop().unwrap();
    let err = third.read_u8().await.unwrap_err();
    assert_eq!(reset_code_of(&err), Some(reset_code::REFUSED));
    for mut c in streams {
        let mut s = server.accept().await.unwrap();
        let mut b = [0u8; 2];
        s.read_exact(&mut b).await.unwrap();
        s.write_all(b"ok").await.unwrap();
        c.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"ok");
    }
}

#[tokio::test(start_paused = true)]
async fn stream_and_memory_limits_are_clear_errors() {
    let cfg = Config {
        max_streams: 2,
        ..Config::default()
    };
    let (client, _server) = pair(cfg, Config::default());
    let _a = client.open().await.unwrap();
    let _b = client.open().await.unwrap();
    assert!(matches!(client.open().await, Err(Error::TooManyStreams(2))));
    drop(_a);
    let _c = client.open().await.unwrap();

    let cfg = Config {
        max_session_memory: 600 * 1024,
        ..Config::default()
    };
    let (client, _server) = pair(cfg, Config::default());
    let _a = client.open().await.unwrap();
    let _b = client.open().await.unwrap();
    let e = client.open().await.unwrap_err();
    assert!(matches!(e, Error::MemoryLimit { limit: 614400 }), "{e}");
    assert_eq!(client.stats().committed, 512 * 1024);
}

#[tokio::test(start_paused = true)]
async fn peer_refuses_streams_beyond_its_limits() {
    let scfg = Config {
        max_streams: 1,
        ..Config::default()
    };
    let (client, server) = pair(Config::default(), scfg);
    let mut a = client.open().await.unwrap();
    let mut b = client.open().await.unwrap();
    a.write_all(b"a").await.unwrap();
    b.write_all(b"b").await.unwrap();
    let err = b.read_u8().await.unwrap_err();
    assert_eq!(reset_code_of(&err), Some(reset_code::REFUSED));
    let mut s = server.accept().await.unwrap();
    assert_eq!(s.read_u8().await.unwrap(), b'a');
}

/// Transfer `total` bytes on a fresh stream; returns the virtual time taken.
async fn timed_transfer(
    client: &wsmux::Session,
    server: &wsmux::Session,
    total: usize,
) -> Duration {
    let start = Instant::now();
    let mut c = client.open().await.unwrap();
    let writer = async move {
        let chunk = vec![9u8; 64 * 1024];
        let mut left = total;
        while left > 0 {
            let n = left.min(chunk.len());
            c.write_all(&chunk[..n]).await.unwrap();
            left -= n;
        }
        c.shutdown().await.unwrap();
        c
    };
    let reader = async {
        let mut s = server.accept().await.unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        let mut got = 0;
        loop {
            let n = s.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            got += n;
        }
        assert_eq!(got, total);
    };
    let (_c, ()) = tokio::join!(writer, reader);
    start.elapsed()
}

#[tokio::test(start_paused = true)]
async fn a_stalled_reader_stalls_only_its_own_stream() {
    let lat = Duration::from_millis(5);
    let total = 8 * 1024 * 1024;

    // Baseline: the transfer alone.
    let (client, server) = delayed_pair(7, lat, lat, Config::default(), Config::default());
    let alone = timed_transfer(&client, &server, total).await;
    drop((client, server));

    // Same transfer while another stream's reader has stopped reading.
    let (client, server) = delayed_pair(7, lat, lat, Config::default(), Config::default());
    let mut stalled_w = client.open().await.unwrap();
    let stalled_r = server.accept().await.unwrap();
    let flood = tokio::spawn(async move {
        // Tries to send 4 MiB; the reader never reads, so it blocks at the window.
        let chunk = vec![1u8; 64 * 1024];
        for _ in 0..64 {
            stalled_w.write_all(&chunk).await.unwrap();
        }
    });
    // Let the flood fill the stalled stream's window.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let window = stalled_r.recv_window() as usize;
    assert_eq!(stalled_r.recv_buffered(), window, "stalled stream is full");
    let with_stall = timed_transfer(&client, &server, total).await;
    // The stalled stream never held more than its window, and still does not.
    assert_eq!(window, 256 * 1024);
    assert!(stalled_r.recv_buffered() <= window);
    assert!(server.stats().buffered <= window + 256 * 1024);
    assert!(
        !flood.is_finished(),
        "the flooding writer is blocked on credit"
    );
    eprintln!("8 MiB alone: {alone:?}; next to a stalled stream: {with_stall:?}");
    // The other stream kept its full speed (virtual time: deterministic).
    assert!(
        with_stall.as_secs_f64() <= alone.as_secs_f64() * 1.05,
        "alone {alone:?}, next to a stalled stream {with_stall:?}"
    );
    flood.abort();
}

#[tokio::test(start_paused = true)]
async fn window_grows_when_the_rtt_demands_it_and_stays_bounded() {
    let lat = Duration::from_millis(20);
    let cfg = Config {
        max_window: 2 * 1024 * 1024,
        ..Config::default()
    };
    let (client, server) = delayed_pair(3, lat, lat, cfg.clone(), cfg);
    // Let the first PING measure the RTT.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(server.rtt().is_some());
    let mut c = client.open().await.unwrap();
    let writer = tokio::spawn(async move {
        let chunk = vec![3u8; 64 * 1024];
        for _ in 0..256 {
            c.write_all(&chunk).await.unwrap();
        }
        c.shutdown().await.unwrap();
        c
    });
    let mut s = server.accept().await.unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let mut max_window = 0;
    let mut got = 0;
    loop {
        let n = s.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        got += n;
        max_window = max_window.max(s.recv_window());
        assert!(s.recv_buffered() <= s.recv_window() as usize);
        assert!(server.stats().buffered <= server.stats().committed);
    }
    assert_eq!(got, 16 * 1024 * 1024);
    assert!(max_window > 256 * 1024, "window grew: {max_window}");
    assert!(max_window <= 2 * 1024 * 1024);
    writer.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn syn_fin_and_extra_window_in_one_frame() {
    let (session, mut raw) = raw_client(Config::default());
    raw.send(
        Frame::WindowUpdate {
            stream_id: 1,
            flags: Flags::SYN.with(Flags::FIN),
            delta: 1 << 20,
        }
        .encode(),
    )
    .await;
    let mut s = session.accept().await.unwrap();
    // The peer half-closed in its SYN: EOF at once, writing still works,
    // with the extra credit the SYN granted (256 KiB + 1 MiB).
    assert_eq!(s.read(&mut [0u8; 8]).await.unwrap(), 0);
    s.write_all(&vec![5u8; 1280 * 1024]).await.unwrap();
    s.shutdown().await.unwrap();
    let mut got = 0;
    let mut acked = false;
    loop {
        match raw.recv_frame().await.unwrap() {
            Frame::WindowUpdate {
                stream_id: 1,
                flags,
                ..
            } if flags.contains(Flags::ACK) => acked = true,
            Frame::Data {
                stream_id: 1,
                flags,
                payload,
                ..
            } => {
                got += payload.len();
                if flags.contains(Flags::FIN) {
                    break;
                }
            }
            f => panic!("{f:?}"),
        }
    }
    assert!(acked);
    assert_eq!(got, 1280 * 1024);
}

#[tokio::test(start_paused = true)]
async fn a_syn_flood_is_refused_without_unbounded_queues() {
    let cfg = Config {
        accept_backlog: 4,
        ..Config::default()
    };
    let (session, mut raw) = raw_client(cfg);
    // 300 SYNs, more than the RST queue holds: reading pauses while RSTs
    // drain, and every refused stream gets its RST.
    for i in 0..300u32 {
        raw.send(
            Frame::WindowUpdate {
                stream_id: 2 * i + 1,
                flags: Flags::SYN,
                delta: 0,
            }
            .encode(),
        )
        .await;
    }
    let mut refused = 0;
    while refused < 296 {
        match raw.recv_frame().await.unwrap() {
            Frame::Data {
                flags, rst_code, ..
            } if flags.contains(Flags::RST) => {
                assert_eq!(rst_code, reset_code::REFUSED);
                refused += 1;
            }
            f => panic!("{f:?}"),
        }
    }
    assert_eq!(session.stats().streams, 4);
    assert!(session.error().is_none());
}

#[tokio::test(start_paused = true)]
async fn data_written_before_the_session_is_dropped_is_still_delivered() {
    let (client, server) = pair(Config::default(), Config::default());
    let mut c = client.open().await.unwrap();
    let data = payload(5, 400_000);
    let srv = tokio::spawn(async move {
        let mut s = server.accept().await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        (server, got)
    });
    c.write_all(&data).await.unwrap();
    c.shutdown().await.unwrap();
    // Drop everything at once: what was written and the FIN still arrive.
    drop(c);
    drop(client);
    let (server, got) = srv.await.unwrap();
    assert!(got == data);
    assert!(server.peer_goaway());
}

#[tokio::test(start_paused = true)]
async fn a_peer_that_keeps_talking_is_not_declared_dead() {
    let cfg = Config {
        keepalive_interval: Some(Duration::from_secs(10)),
        keepalive_timeout: Duration::from_secs(5),
        ..Config::default()
    };
    // The raw peer never answers our PINGs (as if the answers were stuck
    // behind data on a slow link) but keeps sending frames of its own.
    let (session, mut raw) = raw_server(cfg);
    let start = Instant::now();
    for i in 0..20 {
        tokio::time::sleep(Duration::from_secs(3)).await;
        raw.send(
            Frame::Ping {
                ack: false,
                opaque: i,
            }
            .encode(),
        )
        .await;
    }
    assert!(session.error().is_none(), "{:?}", session.error());
    // Then it falls silent: dead within the timeout.
    let e = session.closed().await;
    assert!(matches!(e, Error::KeepaliveTimeout(_)), "{e:?}");
    let silent_for = start.elapsed() - Duration::from_secs(60);
    assert!(silent_for <= Duration::from_secs(5), "{silent_for:?}");
}

#[tokio::test(start_paused = true)]
async fn grown_windows_never_crowd_out_new_streams() {
    let lat = Duration::from_millis(20);
    let cfg = Config {
        max_window: 4 * 1024 * 1024,
        max_session_memory: 4 * 1024 * 1024,
        ..Config::default()
    };
    let (client, server) = delayed_pair(9, lat, lat, cfg.clone(), cfg);
    tokio::time::sleep(Duration::from_millis(100)).await; // RTT measured
    let mut c = client.open().await.unwrap();
    let writer = tokio::spawn(async move {
        let chunk = vec![1u8; 64 * 1024];
        for _ in 0..512 {
            c.write_all(&chunk).await.unwrap();
        }
        c
    });
    let mut s = server.accept().await.unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0;
    while got < 32 * 1024 * 1024 {
        got += s.read(&mut buf).await.unwrap();
    }
    let _c = writer.await.unwrap();
    // The window grew, but by at most half the session memory.
    let grown = s.recv_window() as usize;
    assert!(
        grown > 256 * 1024 && grown <= 256 * 1024 + 2 * 1024 * 1024,
        "{grown}"
    );
    // So the other half still takes 8 more streams at their initial window.
    let mut more = Vec::new();
    for _ in 0..8 {
        let mut c = client.open().await.unwrap();
        c.write_all(b"x").await.unwrap();
        let mut s = server.accept().await.unwrap();
        assert_eq!(s.read_u8().await.unwrap(), b'x');
        more.push((c, s));
    }
    assert!(server.stats().committed <= 4 * 1024 * 1024);
}

#[tokio::test(start_paused = true)]
async fn open_streams_and_accepts_new_streams_are_readable_at_once() {
    let (client, server) = pair(Config::default(), Config::default());
    assert_eq!(client.open_streams(), 0);
    assert!(client.accepts_new_streams() && server.accepts_new_streams());
    let a = client.open().await.unwrap();
    let _b = client.open().await.unwrap();
    assert_eq!(client.open_streams(), 2);
    let sa = server.accept().await.unwrap();
    assert_eq!(sa.id(), a.id(), "the application learns the stream id");
    assert_eq!(server.open_streams(), 2, "the backlog counts");
    drop(a);
    assert_eq!(client.open_streams(), 1);
    server.goaway();
    assert!(!server.accepts_new_streams());
    while !client.peer_goaway() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(!client.accepts_new_streams());
    assert!(matches!(client.open().await, Err(Error::PeerGoAway)));
}

#[tokio::test(start_paused = true)]
async fn closed_tells_the_goaway_code_that_ended_the_session() {
    let (session, mut raw) = raw_client(Config::default());
    raw.send(data(7, b"x")).await; // never opened
    let e = session.closed().await;
    assert_eq!(e.goaway_code(), Some(GoAwayCode::ProtocolError), "{e:?}");
    assert_eq!(raw.expect_goaway().await, GoAwayCode::ProtocolError);
    assert!(!session.accepts_new_streams());

    let (session, mut raw) = raw_client(Config::default());
    raw.send(
        Frame::GoAway {
            code: GoAwayCode::InternalError,
            reason: "bye".into(),
        }
        .encode(),
    )
    .await;
    let e = session.closed().await;
    assert_eq!(e.goaway_code(), Some(GoAwayCode::InternalError), "{e:?}");
    assert!(matches!(e, Error::RemoteGoAway { .. }));
}

/// After a protocol error the session keeps its transport until the peer
/// closes it (the close handshake), and no longer than `close_timeout`.
#[tokio::test(start_paused = true)]
async fn after_a_protocol_error_the_transport_closes_after_the_peers_close_or_the_timeout() {
    let cfg = Config {
        close_timeout: Duration::from_secs(3),
        ..Config::default()
    };
    let (session, mut raw) = raw_client(cfg);
    raw.send(data(7, b"x")).await;
    assert_eq!(raw.expect_goaway().await, GoAwayCode::ProtocolError);
    let start = Instant::now();
    // Our side of the transport closes (WebSocket Close) after the GOAWAY;
    // the peer may go on sending, which is read and discarded.
    assert!(raw.recv().await.is_none());
    for _ in 0..20 {
        assert!(raw.try_send(data(7, &[0u8; 1024])).await);
    }
    // The peer never closes: the session gives up after close_timeout.
    while raw.try_send(data(7, b"x")).await {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_secs(3) && waited < Duration::from_secs(4),
        "{waited:?}"
    );
    drop(session);
}
