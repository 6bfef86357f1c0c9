//! Whatever a peer sends, a session never panics, keeps its memory bounds,
//! and fails (if it fails) with a GOAWAY and a clear error.

mod common;

use bytes::{BufMut, Bytes, BytesMut};
use common::raw_client;
use proptest::prelude::*;
use std::time::Duration;
use wsmux::Config;

fn raw_frame(version: u8, typ: u8, flags: u16, id: u32, value: u32, len: usize) -> Bytes {
    let mut b = BytesMut::with_capacity(12 + len);
    b.put_u8(version);
    b.put_u8(typ);
    b.put_u16(flags);
    b.put_u32(id);
    b.put_u32(value);
    b.put_bytes(0xab, len);
    b.freeze()
}

fn frame() -> impl Strategy<Value = Bytes> {
    (
        prop_oneof![20 => Just(1u8), 1 => any::<u8>()],
        prop_oneof![20 => 0u8..4, 1 => any::<u8>()],
        prop_oneof![10 => 0u16..16, 1 => any::<u16>()],
        prop_oneof![10 => 0u32..12, 1 => any::<u32>()],
        prop_oneof![5 => Just(0u32), 5 => 0u32..300_000, 1 => any::<u32>()],
        prop_oneof![5 => 0usize..100, 2 => 0usize..70_000],
    )
        .prop_map(|(v, t, f, id, value, len)| raw_frame(v, t, f, id, value, len))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_frames_never_panic_and_memory_stays_bounded(
        frames in proptest::collection::vec(frame(), 1..40),
        accept_every in 1usize..5,
    ) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async move {
            let cfg = Config {
                max_streams: 6,
                accept_backlog: 3,
                max_session_memory: 1 << 20,
                ..Config::default()
            };
            let (session, mut raw) = raw_client(cfg.clone());
            let mut accepted = Vec::new();
            for (i, f) in frames.into_iter().enumerate() {
                let sent = raw.try_send(f).await;
                tokio::task::yield_now().await;
                let st = session.stats();
                assert!(st.buffered <= st.committed && st.committed <= cfg.max_session_memory, "{st:?}");
                assert!(st.streams <= cfg.max_streams, "{st:?}");
                if i % accept_every == 0 {
                    if let Ok(Ok(s)) =
                        tokio::time::timeout(Duration::from_millis(1), session.accept()).await
                    {
                        accepted.push(s);
                    }
                }
                if session.error().is_some() || !sent {
                    break;
                }
            }
            drop(accepted);
            tokio::task::yield_now().await;
            match session.error() {
                // The peer ended it with an error GOAWAY: nothing to answer.
                None | Some(wsmux::Error::RemoteGoAway { .. }) => {}
                // Otherwise the session told the peer why.
                Some(e) => {
                    let code = tokio::time::timeout(Duration::from_secs(1), raw.expect_goaway())
                        .await
                        .expect("GOAWAY sent");
                    if let wsmux::Error::Protocol { code: c, .. } = e {
                        assert_eq!(code, c);
                    }
                }
            }
        });
    }
}
