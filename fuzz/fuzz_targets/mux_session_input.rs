//! Arbitrary message sequences fed to a server session: whatever the peer
//! sends, the session must end in an orderly way (a GOAWAY and an error) or
//! keep going, never panic. Input format: repeated [len: u8][kind: u8][bytes].
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use std::future::poll_fn;
use wsmux::transport::memory_pair;
use wsmux::{Config, Session, Transport};

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    rt.block_on(async {
        let (mut peer, ours) = memory_pair(4096);
        let cfg = Config {
            max_streams: 8,
            accept_backlog: 4,
            max_session_memory: 4 << 20,
            ..Config::default()
        };
        let session = Session::server(ours, cfg);
        let mut rest = data;
        while rest.len() >= 2 {
            let len = (rest[0] as usize).min(rest.len() - 2);
            let kind = rest[1];
            let body = &rest[2..2 + len];
            rest = &rest[2 + len..];
            let r = if kind == 0xff {
                peer.send_text_now("text")
            } else {
                match poll_fn(|cx| peer.poll_ready(cx)).await {
                    Ok(()) => peer.start_send(Bytes::copy_from_slice(body)),
                    Err(e) => Err(e),
                }
            };
            if r.is_err() {
                break;
            }
            tokio::task::yield_now().await;
            if kind & 0x80 != 0 {
                // Accept whatever is waiting, then drop it (RST).
                if let Ok(Ok(s)) =
                    tokio::time::timeout(std::time::Duration::from_millis(1), session.accept())
                        .await
                {
                    drop(s);
                }
            }
        }
        let _ = session.stats();
    });
});
