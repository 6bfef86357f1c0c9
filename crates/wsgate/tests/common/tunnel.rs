//! The client side of the tunnel for integration tests: a WebSocket
//! handshake that yields a wsmux transport, a minimal agent serving one
//! registered connection, and a stream opened with its reply read.

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wsgate::tunnel::allow::AllowList;
use wsgate::tunnel::proto::{self, Reply, Status};

/// The bound for one handshake answer or one stream reply.
const WAIT: Duration = Duration::from_secs(10);

/// Opens a WebSocket to `addr` at `path`, offering subprotocol `protocol`,
/// with `headers`: the status, and the transport (its leftover bytes kept)
/// once it is 101.
pub async fn websocket(
    addr: &str,
    path: &str,
    protocol: &str,
    headers: &[(&str, &str)],
) -> (u16, Option<wsmux::WsTransport<TcpStream>>) {
    let (status, _, t) = websocket_protocol(addr, path, protocol, headers).await;
    (status, t)
}

/// [`websocket`], with the subprotocol the answer chose.
pub async fn websocket_protocol(
    addr: &str,
    path: &str,
    protocol: &str,
    headers: &[(&str, &str)],
) -> (u16, Option<String>, Option<wsmux::WsTransport<TcpStream>>) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let key = wsframe::handshake::generate_key();
    let req = wsframe::handshake::client_request("gw", path, &key, &[protocol], headers);
    s.write_all(&req).await.unwrap();
    let mut buf = BytesMut::new();
    let resp = tokio::time::timeout(WAIT, async {
        loop {
            assert!(
                s.read_buf(&mut buf).await.unwrap() > 0,
                "closed before answering"
            );
            if let Some(r) = wsframe::handshake::parse_response(&buf).unwrap() {
                break r;
            }
        }
    })
    .await
    .expect("a handshake answer in time");
    if resp.status != 101 {
        return (resp.status, None, None);
    }
    let chosen = resp.header("sec-websocket-protocol").map(str::to_string);
    let leftover = buf.split_off(resp.head_len);
    let t = wsmux::WsTransport::from_raw(
        s,
        wsframe::Role::Client,
        wsmux::WsTransport::<TcpStream>::default_config(),
        &leftover,
    );
    (101, chosen, Some(t))
}

/// A `/mux` session on `addr` with `headers` (it must be accepted).
pub async fn mux(addr: &str, headers: &[(&str, &str)]) -> wsmux::Session {
    let (status, t) = websocket(addr, "/mux", proto::MUX_PROTOCOL, headers).await;
    assert_eq!(status, 101, "/mux refused");
    wsmux::Session::client(t.unwrap(), wsmux::Config::default())
}

/// Opens a stream of `session` to `dest` and reads the reply.
pub async fn open(session: &wsmux::Session, dest: &str) -> (wsmux::Stream, Reply) {
    let mut st = session.open().await.unwrap();
    let mut req = BytesMut::new();
    proto::encode_open(dest, &mut req);
    st.write_all(&req).await.unwrap();
    let mut buf = BytesMut::new();
    let reply = tokio::time::timeout(WAIT, async {
        loop {
            if let Some(r) = Reply::decode(&mut buf).unwrap() {
                break r;
            }
            assert!(st.read_buf(&mut buf).await.unwrap() > 0, "no reply");
        }
    })
    .await
    .expect("a reply in time");
    (st, reply)
}

/// A minimal agent: serves the streams of one registered WebSocket,
/// checking each destination against `allow`, connecting to it and relaying.
/// Aborting the task drops the session, as a killed agent would.
pub fn serve_agent(t: wsmux::WsTransport<TcpStream>, allow: &str) -> tokio::task::JoinHandle<()> {
    let allow = AllowList::from_header(allow).unwrap();
    let s = wsmux::Session::client(t, wsmux::Config::default());
    tokio::spawn(async move {
        while let Ok(mut st) = s.accept().await {
            let allow = allow.clone();
            tokio::spawn(async move {
                let mut buf = BytesMut::new();
                let text = loop {
                    match proto::decode_open(&mut buf) {
                        Ok(Some(t)) => break t,
                        Ok(None) => {}
                        Err(_) => return st.reset(proto::RESET_BAD_OPEN),
                    }
                    if st.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                        return;
                    }
                };
                let dest: proto::Destination = text.parse().unwrap();
                let mut out = BytesMut::new();
                let refusal = if allow.permits(&dest, None) {
                    match TcpStream::connect((dest.host.as_str(), dest.port)).await {
                        Ok(mut tcp) => {
                            Reply::ok().encode(&mut out);
                            st.write_all(&out).await.unwrap();
                            let _ = tokio::io::copy_bidirectional(&mut st, &mut tcp).await;
                            return;
                        }
                        Err(e) => Reply::refuse(Status::Unreachable, e.to_string()),
                    }
                } else {
                    Reply::refuse(Status::NotAllowed, format!("{dest} is not allowed"))
                };
                refusal.encode(&mut out);
                let _ = st.write_all(&out).await;
                let _ = st.shutdown().await;
                let _ = st.read_to_end(&mut vec![]).await;
            });
        }
    })
}
