//! Integration over real WebSocket connections on loopback (the `wsframe`
//! codec the gateway uses). Ports are chosen by the OS.

mod common;

use common::payload;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use wsmux::frame::{self, Frame};
use wsmux::{ByteStream, Config, Error, GoAwayCode, Session, WsTransport};

async fn ws_pair() -> (WsTransport<TcpStream>, WsTransport<TcpStream>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        tcp.set_nodelay(true).unwrap();
        WsTransport::accept(tcp).await.unwrap()
    });
    let tcp = TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let client = WsTransport::connect(tcp, &addr.to_string(), "/mux")
        .await
        .unwrap();
    (client, server.await.unwrap())
}

async fn session_pair() -> (Session, Session) {
    let (c, s) = ws_pair().await;
    (
        Session::client(c, Config::default()),
        Session::server(s, Config::default()),
    )
}

/// Everything must finish well within this; a hang fails instead of blocking CI.
const LIMIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_streams_echo_over_a_real_websocket() {
    tokio::time::timeout(LIMIT, async {
        let (client, server) = session_pair().await;
        let server = Arc::new(server);
        let srv = server.clone();
        tokio::spawn(async move {
            while let Ok(mut s) = srv.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = tokio::io::split(&mut s);
                    tokio::io::copy(&mut r, &mut w).await.unwrap();
                    w.shutdown().await.unwrap();
                });
            }
        });
        let client = Arc::new(client);
        let mut tasks = Vec::new();
        for i in 0..50u64 {
            let client = client.clone();
            tasks.push(tokio::spawn(async move {
                let s = client.open().await.unwrap();
                let data = payload(i, 100_000 + 7919 * i as usize);
                let (mut r, mut w) = tokio::io::split(s);
                let expected = data.clone();
                let writer = tokio::spawn(async move {
                    // Odd-sized writes.
                    for chunk in data.chunks(3001) {
                        w.write_all(chunk).await.unwrap();
                    }
                    w.shutdown().await.unwrap();
                    w
                });
                let mut got = Vec::new();
                r.read_to_end(&mut got).await.unwrap();
                assert_eq!(got.len(), expected.len());
                assert!(got == expected, "stream {i}: bytes differ");
                drop(writer.await.unwrap());
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert!(client.error().is_none());
        assert!(client.rtt().is_some());
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_transfer_with_half_close_over_a_real_websocket() {
    tokio::time::timeout(LIMIT, async {
        let (client, server) = session_pair().await;
        let total = 32 * 1024 * 1024;
        let srv = tokio::spawn(async move {
            let mut s = server.accept().await.unwrap();
            let mut buf = vec![0u8; 64 * 1024];
            let mut n = 0usize;
            let mut sum = 0u64;
            loop {
                let k = s.read(&mut buf).await.unwrap();
                if k == 0 {
                    break;
                }
                sum += buf[..k].iter().map(|&b| b as u64).sum::<u64>();
                n += k;
            }
            s.write_all(format!("{n} {sum}").as_bytes()).await.unwrap();
            s.shutdown().await.unwrap();
            server
        });
        let mut c = client.open().await.unwrap();
        let chunk: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
        let expect_sum: u64 = chunk.iter().map(|&b| b as u64).sum::<u64>() * 512;
        for _ in 0..total / chunk.len() {
            c.write_all(&chunk).await.unwrap();
        }
        c.shutdown().await.unwrap();
        let mut reply = String::new();
        c.read_to_string(&mut reply).await.unwrap();
        assert_eq!(reply, format!("{total} {expect_sum}"));
        drop(srv.await.unwrap());
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_the_websocket_fails_the_peer_session() {
    tokio::time::timeout(LIMIT, async {
        let (client, server) = session_pair().await;
        let mut c = client.open().await.unwrap();
        c.write_all(b"hello").await.unwrap();
        let mut s = server.accept().await.unwrap();
        let mut b = [0u8; 5];
        s.read_exact(&mut b).await.unwrap();
        drop(client); // GOAWAY NORMAL + WebSocket close
        let err = s.read_u8().await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionAborted, "{err}");
        assert!(server.peer_goaway());
        assert!(matches!(server.error(), Some(Error::TransportClosed)));
        assert!(c.write_all(b"x").await.is_err());
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_text_message_gets_goaway_text_message() {
    tokio::time::timeout(LIMIT, async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let session =
                Session::server(WsTransport::accept(tcp).await.unwrap(), Config::default());
            session.closed().await
        });
        // A plain wsframe client (not a mux session) sends a text message.
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (mut ws, resp) = wsframe::WebSocket::connect(
            tcp,
            &addr.to_string(),
            "/",
            &[wsmux::ws::SUBPROTOCOL],
            wsframe::DecoderConfig::default(),
        )
        .await
        .unwrap();
        assert_eq!(resp.header("sec-websocket-protocol"), Some("wsmux.v1"));
        ws.send(wsframe::Message::Text("hello".into()))
            .await
            .unwrap();
        let code = loop {
            match ws.recv().await.unwrap() {
                wsframe::Message::Binary(b) => match frame::decode(b).unwrap() {
                    Frame::GoAway { code, reason } => {
                        assert!(reason.contains("text"), "{reason}");
                        break code;
                    }
                    _ => continue,
                },
                m => panic!("{m:?}"),
            }
        };
        assert_eq!(code, GoAwayCode::TextMessage);
        let e = server.await.unwrap();
        assert!(matches!(
            e,
            Error::Protocol {
                code: GoAwayCode::TextMessage,
                ..
            }
        ));
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_websocket_as_a_byte_stream() {
    tokio::time::timeout(LIMIT, async {
        let (c, s) = ws_pair().await;
        let mut c = ByteStream::new(c);
        let mut s = ByteStream::new(s);
        let data = payload(99, 1_000_000);
        let expected = data.clone();
        let writer = tokio::spawn(async move {
            c.write_all(&data).await.unwrap();
            c.flush().await.unwrap();
            let mut back = Vec::new();
            // Reads until the server's close: EOF.
            c.read_to_end(&mut back).await.unwrap();
            assert_eq!(back, b"thanks");
            c.shutdown().await.unwrap();
        });
        let mut got = vec![0u8; expected.len()];
        s.read_exact(&mut got).await.unwrap();
        assert!(got == expected);
        s.write_all(b"thanks").await.unwrap();
        s.shutdown().await.unwrap(); // WebSocket close frame
        writer.await.unwrap();
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_then_one_byte_reply_repeatedly() {
    for round in 0..20 {
        let (client, server) = session_pair().await;
        let srv = tokio::spawn(async move {
            let mut s = server.accept().await.unwrap();
            let mut buf = vec![0u8; 64 * 1024];
            let mut n = 0;
            loop {
                let k = s.read(&mut buf).await.unwrap();
                if k == 0 {
                    break;
                }
                n += k;
            }
            s.write_all(b"k").await.unwrap();
            s.flush().await.unwrap();
            s.shutdown().await.unwrap();
            drop(s);
            (server, n)
        });
        let mut c = client.open().await.unwrap();
        let chunk = vec![1u8; 64 * 1024];
        for _ in 0..64 {
            c.write_all(&chunk).await.unwrap();
        }
        c.flush().await.unwrap();
        c.shutdown().await.unwrap();
        let mut b = [0u8; 1];
        let r = c.read(&mut b).await;
        let (_server, n) = srv.await.unwrap();
        assert_eq!(n, 64 * 64 * 1024);
        assert!(matches!(r, Ok(1)), "round {round}: {r:?}");
    }
}

/// The defect a third implementation found: after a protocol error the
/// session sent GOAWAY and Close and closed its socket at once; a peer still
/// sending got a reset and never read the GOAWAY (close 1006 on its side).
/// Now the session completes the close handshake: it reads and discards
/// until the peer's Close (or EOF), so the GOAWAY always arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_still_sending_after_a_protocol_error_reads_goaway_then_a_clean_close() {
    tokio::time::timeout(LIMIT, async {
        for trial in 0..10 {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let server = tokio::spawn(async move {
                let (tcp, _) = listener.accept().await.unwrap();
                tcp.set_nodelay(true).unwrap();
                let session =
                    Session::server(WsTransport::accept(tcp).await.unwrap(), Config::default());
                session.closed().await
            });
            let tcp = TcpStream::connect(addr).await.unwrap();
            tcp.set_nodelay(true).unwrap();
            let (mut ws, _) = wsframe::WebSocket::connect(
                tcp,
                &addr.to_string(),
                "/",
                &[wsmux::ws::SUBPROTOCOL],
                wsframe::DecoderConfig::default(),
            )
            .await
            .unwrap();
            // DATA for a stream that was never opened: PROTOCOL_ERROR.
            let bad = Frame::Data {
                stream_id: 5,
                flags: frame::Flags::empty(),
                rst_code: 0,
                payload: bytes::Bytes::from_static(b"x"),
            }
            .encode();
            ws.send(wsframe::Message::Binary(bad)).await.unwrap();
            // The peer has not read anything yet and keeps sending.
            let mut send_error = None;
            for i in 0..20 {
                tokio::time::sleep(Duration::from_millis(1)).await;
                let kib = bytes::Bytes::from(vec![i as u8; 1024]);
                if let Err(e) = ws.send(wsframe::Message::Binary(kib)).await {
                    send_error = Some(format!("send {i}: {e}"));
                    break;
                }
            }
            let mut goaway = None;
            let close = loop {
                match ws.recv().await {
                    Ok(wsframe::Message::Binary(b)) => {
                        if let Ok(Frame::GoAway { code, .. }) = frame::decode(b) {
                            goaway = Some(code);
                        }
                    }
                    Ok(wsframe::Message::Close(c)) => break c,
                    Ok(m) => panic!("trial {trial}: {m:?}"),
                    Err(e) => {
                        panic!("trial {trial}: {e} (GOAWAY read: {goaway:?}; {send_error:?})")
                    }
                }
            };
            assert_eq!(send_error, None, "trial {trial}");
            assert_eq!(goaway, Some(GoAwayCode::ProtocolError), "trial {trial}");
            assert_eq!(close.map(|(c, _)| c), Some(1000), "trial {trial}");
            // Our Close answer went out in recv(); the server then ends.
            let e = server.await.unwrap();
            assert_eq!(e.goaway_code(), Some(GoAwayCode::ProtocolError), "{e:?}");
        }
    })
    .await
    .expect("test timed out");
}

/// A text message is a mux protocol error whatever its bytes: one with
/// invalid UTF-8 gets GOAWAY TEXT_MESSAGE too, then a normal close (the
/// WebSocket layer used to fail on the UTF-8 first and close with 1000
/// without a GOAWAY).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_text_message_with_invalid_utf8_gets_goaway_text_message() {
    tokio::time::timeout(LIMIT, async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let session =
                Session::server(WsTransport::accept(tcp).await.unwrap(), Config::default());
            session.closed().await
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (mut ws, _) = wsframe::WebSocket::connect(
            tcp,
            &addr.to_string(),
            "/",
            &[wsmux::ws::SUBPROTOCOL],
            wsframe::DecoderConfig::default(),
        )
        .await
        .unwrap();
        let invalid = bytes::Bytes::from_static(&[0x68, 0xff, 0xfe, 0x69]);
        ws.send(wsframe::Message::Text(invalid)).await.unwrap();
        let mut goaway = None;
        let close = loop {
            match ws.recv().await.unwrap() {
                wsframe::Message::Binary(b) => {
                    if let Ok(Frame::GoAway { code, .. }) = frame::decode(b) {
                        goaway = Some(code);
                    }
                }
                wsframe::Message::Close(c) => break c,
                m => panic!("{m:?}"),
            }
        };
        assert_eq!(goaway, Some(GoAwayCode::TextMessage));
        assert_eq!(close.map(|(c, _)| c), Some(1000));
        let e = server.await.unwrap();
        assert_eq!(e.goaway_code(), Some(GoAwayCode::TextMessage), "{e:?}");
    })
    .await
    .expect("test timed out");
}
