use super::*;
use proptest::prelude::*;

fn neg(header: &str, config: &Config) -> Option<String> {
    negotiate([header.as_bytes()], config).map(|a| a.response())
}

#[test]
fn offers_are_answered_with_what_was_agreed() {
    let d = Config::default();
    let cases: &[(&str, Option<&str>)] = &[
        ("permessage-deflate", Some("permessage-deflate")),
        // Browsers' offer: the client's window is left as it is.
        (
            "permessage-deflate; client_max_window_bits",
            Some("permessage-deflate"),
        ),
        (
            "permessage-deflate; server_no_context_takeover",
            Some("permessage-deflate; server_no_context_takeover"),
        ),
        (
            "permessage-deflate; client_no_context_takeover",
            Some("permessage-deflate; client_no_context_takeover"),
        ),
        (
            "permessage-deflate; server_max_window_bits=10",
            Some("permessage-deflate; server_max_window_bits=10"),
        ),
        (
            "permessage-deflate; server_max_window_bits=\"8\"",
            Some("permessage-deflate; server_max_window_bits=8"),
        ),
        (
            "PerMessage-Deflate ;  Server_Max_Window_Bits = 9 ",
            Some("permessage-deflate; server_max_window_bits=9"),
        ),
        // Declined offers fall through to the next one.
        (
            "permessage-deflate; server_max_window_bits=7, permessage-deflate",
            Some("permessage-deflate"),
        ),
        ("permessage-deflate; server_max_window_bits=16", None),
        ("permessage-deflate; server_max_window_bits=08", None),
        ("permessage-deflate; server_max_window_bits", None),
        ("permessage-deflate; client_max_window_bits=0", None),
        ("permessage-deflate; server_no_context_takeover=1", None),
        ("permessage-deflate; foo", None),
        (
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            None,
        ),
        ("permessage-deflate; =", None),
        ("permessage-deflate; a=\"unclosed", None),
        ("x-webkit-deflate-frame", None),
        (
            "foo; bar=\"a,b\", permessage-deflate; client_no_context_takeover",
            Some("permessage-deflate; client_no_context_takeover"),
        ),
        (
            "garbage garbage, permessage-deflate",
            Some("permessage-deflate"),
        ),
        ("", None),
        (",,", None),
    ];
    for (offer, want) in cases {
        assert_eq!(neg(offer, &d).as_deref(), *want, "offer {offer:?}");
    }
}

#[test]
fn the_servers_settings_shape_the_answer() {
    let c = Config {
        server_no_context_takeover: true,
        client_no_context_takeover: true,
        server_max_window_bits: 10,
        client_max_window_bits: 12,
        ..Config::default()
    };
    assert_eq!(
        neg("permessage-deflate; client_max_window_bits", &c).as_deref(),
        Some(
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover; \
             server_max_window_bits=10; client_max_window_bits=12"
        )
    );
    // The smaller of the offer's and the server's.
    let a = negotiate(
        [&b"permessage-deflate; server_max_window_bits=9; client_max_window_bits=10"[..]],
        &c,
    )
    .unwrap();
    assert_eq!(
        (a.server_max_window_bits, a.client_max_window_bits),
        (9, 10)
    );
    assert!(!a.response().contains("client_max_window_bits"));
    // A client that cannot limit its window is declined when the server
    // needs it limited; its next offer is taken.
    assert_eq!(neg("permessage-deflate", &c), None);
    assert!(neg(
        "permessage-deflate, permessage-deflate; client_max_window_bits=15",
        &c
    )
    .unwrap()
    .ends_with("client_max_window_bits=12"));
    // Several header lines are one list.
    let a = negotiate(
        [
            &b"foo"[..],
            b"permessage-deflate; server_max_window_bits=11; client_max_window_bits",
        ],
        &c,
    );
    assert_eq!(a.unwrap().server_max_window_bits, 10);
}

#[test]
fn the_client_reads_the_answer() {
    let c = Config::default();
    let ok = |h: &str| accept_response([h.as_bytes()], &c);
    assert_eq!(ok("").unwrap(), None);
    let a = ok("permessage-deflate; server_no_context_takeover; client_max_window_bits=9")
        .unwrap()
        .unwrap();
    assert!(a.server_no_context_takeover);
    assert_eq!(a.client_max_window_bits, 9);
    assert!(ok("permessage-deflate; bogus").is_err());
    assert!(ok("permessage-deflate, permessage-deflate").is_err());
    assert!(ok("x-other").is_err());
    // What the client did not offer, the server may not impose.
    let small = Config {
        server_max_window_bits: 10,
        ..Config::default()
    };
    assert!(accept_response(
        [&b"permessage-deflate; server_max_window_bits=12"[..]],
        &small
    )
    .is_err());
    assert_eq!(
        client_offer(&small),
        "permessage-deflate; server_max_window_bits=10; client_max_window_bits"
    );
}

#[test]
fn config_lists_parse_and_name_their_errors() {
    let c = Config::parse_list(
        "server_no_context_takeover, client_max_window_bits=9,min_size=10,level=1",
    )
    .unwrap();
    assert!(c.server_no_context_takeover && !c.client_no_context_takeover);
    assert_eq!((c.client_max_window_bits, c.min_size, c.level), (9, 10, 1));
    assert_eq!(Config::parse_list("").unwrap(), Config::default());
    for (bad, why) in [
        ("server_max_window_bits=7", "8 to 15"),
        ("level=10", "0 to 9"),
        ("nope", "unknown key"),
        ("server_no_context_takeover=1", "no value"),
        ("min_size", "needs a value"),
    ] {
        let e = Config::parse_list(bad).unwrap_err();
        assert!(e.contains(why), "{bad}: {e}");
    }
}

/// Inflates a whole message given in pieces, with `room` bytes per call.
fn inflate_pieces(
    inf: &mut Inflater,
    pieces: &[&[u8]],
    text: bool,
    room: usize,
) -> Result<Vec<u8>, ProtocolError> {
    inf.begin(text);
    let mut all = vec![];
    for (i, p) in pieces.iter().enumerate() {
        let last = i + 1 == pieces.len();
        let mut at = 0;
        loop {
            let mut out = BytesMut::new();
            let step = inf.inflate(&p[at..], last, &mut out, room)?;
            assert!(out.len() <= room);
            all.extend_from_slice(&out);
            at += step.consumed;
            if step.done {
                assert!(last);
                return Ok(all);
            }
            if at == p.len() && !last {
                break;
            }
        }
    }
    unreachable!("the last piece ends the message")
}

fn compress(d: &mut Deflater, msg: &[u8]) -> Vec<u8> {
    let mut v = vec![];
    d.compress(msg, &mut v);
    v
}

#[test]
fn a_stream_of_messages_round_trips_with_every_setting() {
    let msgs: Vec<Vec<u8>> = (0..40)
        .map(|i| {
            format!(
                "{{\"id\":{i},\"name\":\"item {i}\",\"tags\":[\"a\",\"b\"],\"pad\":\"{}\"}}",
                "x".repeat(i * 37 % 700)
            )
            .into_bytes()
        })
        .collect();
    for bits in [8u8, 9, 12, 15] {
        for takeover in [false, true] {
            for hibernate in [false, true] {
                let mut d = Deflater::new(6, bits, !takeover, 0, Role::Server);
                let mut inf = Inflater::new(bits, !takeover, 1 << 20);
                let mut wire = 0;
                for m in &msgs {
                    let c = compress(&mut d, m);
                    wire += c.len();
                    let back = inflate_pieces(
                        &mut inf,
                        &[&c[..c.len() / 2], &c[c.len() / 2..]],
                        true,
                        100,
                    )
                    .unwrap();
                    assert_eq!(&back, m, "bits {bits} takeover {takeover}");
                    if hibernate {
                        d.hibernate();
                        inf.hibernate();
                        assert!(!d.holds_state() && !inf.holds_state());
                    }
                }
                let raw: usize = msgs.iter().map(Vec::len).sum();
                if takeover {
                    // The window carries between messages.
                    assert!(wire * 4 < raw, "bits {bits}: {wire} of {raw}");
                }
            }
        }
    }
}

#[test]
fn an_empty_message_and_a_final_block_are_read() {
    let mut d = Deflater::new(6, 15, false, 0, Role::Server);
    let mut inf = Inflater::new(15, false, 0);
    let c = compress(&mut d, b"");
    assert_eq!(inflate_pieces(&mut inf, &[&c], false, 10).unwrap(), b"");
    // A sender that ends each message with BFINAL (RFC 7692 §7.2.3.4).
    let mut z = Compress::new_with_window_bits(Compression::default(), false, 15);
    let mut fin = Vec::with_capacity(256);
    let s = z
        .compress_vec(b"hello hello hello", &mut fin, FlushCompress::Finish)
        .unwrap();
    assert_eq!(s, Status::StreamEnd);
    assert_eq!(
        inflate_pieces(&mut inf, &[&fin], false, 7).unwrap(),
        b"hello hello hello"
    );
    // The inflater starts a new zlib stream for the next message.
    let mut d2 = Deflater::new(6, 15, true, 0, Role::Server);
    let c2 = compress(&mut d2, b"after the final block");
    assert_eq!(
        inflate_pieces(&mut inf, &[&c2], false, 64).unwrap(),
        b"after the final block"
    );
    // Data after a final block is an error.
    let mut extra = fin.clone();
    extra.extend_from_slice(&c2);
    let mut inf = Inflater::new(15, true, 0);
    assert_eq!(
        inflate_pieces(&mut inf, &[&extra], false, 64),
        Err(ProtocolError::BadDeflate)
    );
}

#[test]
fn corrupt_data_and_bad_text_are_1007() {
    let mut inf = Inflater::new(15, true, 0);
    let e = inflate_pieces(&mut inf, &[&[0xff, 0xff, 0xff, 0x00, 0x12]], false, 64).unwrap_err();
    assert_eq!(e, ProtocolError::BadDeflate);
    assert_eq!(e.close_code(), 1007);
    let mut d = Deflater::new(6, 15, true, 0, Role::Server);
    let c = compress(&mut d, b"ok \xff\xfe not utf-8");
    let mut inf = Inflater::new(15, true, 0);
    assert_eq!(
        inflate_pieces(&mut inf, &[&c], true, 64),
        Err(ProtocolError::InvalidUtf8)
    );
    let mut inf = Inflater::new(15, true, 0);
    assert!(inflate_pieces(&mut inf, &[&c], false, 64).is_ok());
}

#[test]
fn a_bomb_stops_at_the_limit_without_holding_more() {
    // 64 MiB of zeros in about 64 KiB of deflate.
    let mut z = Compress::new_with_window_bits(Compression::best(), false, 15);
    let zeros = vec![0u8; 1 << 20];
    let mut bomb = Vec::with_capacity(1 << 17);
    for _ in 0..64 {
        bomb.reserve(1 << 12);
        let before = z.total_in();
        let mut at = 0;
        while at < zeros.len() {
            z.compress_vec(&zeros[at..], &mut bomb, FlushCompress::None)
                .unwrap();
            at = (z.total_in() - before) as usize;
            bomb.reserve(1 << 12);
        }
    }
    z.compress_vec(b"", &mut bomb, FlushCompress::Sync).unwrap();
    assert!(bomb.len() < 1 << 17, "{}", bomb.len());
    let limit = 1u64 << 20;
    let mut inf = Inflater::new(15, false, limit);
    inf.begin(false);
    let (mut total, mut at) = (0u64, 0);
    let err = loop {
        let mut out = BytesMut::new();
        match inf.inflate(&bomb[at..], true, &mut out, 64 * 1024) {
            Ok(step) => {
                assert!(!step.done);
                at += step.consumed;
                total += out.len() as u64;
                assert!(out.capacity() <= 128 * 1024);
            }
            Err(e) => break e,
        }
    };
    assert_eq!(err, ProtocolError::MessageTooBig { limit });
    assert_eq!(err.close_code(), 1009);
    // Stopped at the limit exactly: not a byte of the chunk past it made.
    assert_eq!(total, limit);
}

#[test]
fn output_reaches_the_limit_and_never_passes_it() {
    let mut d = Deflater::new(6, 15, true, 0, Role::Server);
    for limit in [1usize, 100, 4096, 70_000] {
        for room in [1usize, 7, 4096, 64 * 1024] {
            // A message of exactly the limit passes.
            let at = vec![b'a'; limit];
            let c = compress(&mut d, &at);
            let mut inf = Inflater::new(15, true, limit as u64);
            assert_eq!(inflate_pieces(&mut inf, &[&c], true, room).unwrap(), at);
            // One byte more is 1009, with output (and the capacity asked
            // for) never past the limit.
            let over = vec![b'a'; limit + 1];
            let c = compress(&mut d, &over);
            let mut inf = Inflater::new(15, true, limit as u64);
            inf.begin(true);
            let (mut made, mut at) = (0usize, 0);
            let err = loop {
                let mut out = BytesMut::new();
                match inf.inflate(&c[at..], true, &mut out, room) {
                    Ok(step) => {
                        assert!(!step.done);
                        // (8: the smallest allocation `BytesMut` makes.)
                        assert!(
                            out.capacity() <= room.min(limit - made).max(8),
                            "limit {limit} room {room}: {} at {made}",
                            out.capacity()
                        );
                        made += out.len();
                        at += step.consumed;
                    }
                    Err(e) => break e,
                }
            };
            assert_eq!(
                err,
                ProtocolError::MessageTooBig {
                    limit: limit as u64
                }
            );
            assert_eq!(made, limit, "room {room}");
        }
    }
}

#[test]
fn a_message_in_parts_is_sent_as_the_whole_would_be() {
    let msgs: Vec<Vec<u8>> = (0..12)
        .map(|i| {
            format!(
                "{{\"id\":{i},\"pad\":\"{}\"}}",
                "xy".repeat(i * 4099 % 20_000)
            )
            .into_bytes()
        })
        .collect();
    for takeover in [false, true] {
        let cfg = Config {
            min_size: 20,
            ..Config::default()
        };
        let offer = if takeover {
            "permessage-deflate"
        } else {
            "permessage-deflate; client_no_context_takeover"
        };
        let agreed = negotiate([offer.as_bytes()], &cfg).unwrap();
        assert_eq!(agreed.client_no_context_takeover, !takeover);
        let mut d = agreed.deflater(Role::Client, &cfg);
        let mut wire = BytesMut::new();
        // Under `min_size`, as it is, in one frame.
        d.encode_parts(&mut wire, OpCode::Text, &[&b"sh"[..], b"", b"ort"]);
        d.encode_parts::<&[u8]>(&mut wire, OpCode::Binary, &[]);
        for m in &msgs {
            let cut = [0, 1, m.len() / 3, m.len() / 2, m.len()];
            let parts: Vec<&[u8]> = cut.windows(2).map(|w| &m[w[0]..w[1]]).collect();
            d.encode_parts(&mut wire, OpCode::Text, &parts);
        }
        let mut dec = InflatingDecoder::new(
            Role::Server,
            DecoderConfig::default(),
            Some(agreed.inflater(Role::Server, 1 << 20)),
            4096,
        );
        let (mut got, mut msg) = (vec![], vec![]);
        while let Some(f) = dec.next(&mut wire).unwrap() {
            let Frame::Data { payload, last, .. } = f else {
                panic!("{f:?}")
            };
            msg.extend_from_slice(&payload);
            if last {
                got.push(std::mem::take(&mut msg));
            }
        }
        let mut want = vec![b"short".to_vec(), vec![]];
        want.extend(msgs.iter().cloned());
        assert_eq!(got, want, "takeover {takeover}");
    }
    // An empty list of parts is the empty message.
    let mut d = Deflater::new(6, 15, false, 0, Role::Server);
    let mut c = vec![];
    d.compress_parts::<&[u8]>(&[], &mut c);
    let mut inf = Inflater::new(15, false, 0);
    assert_eq!(inflate_pieces(&mut inf, &[&c], false, 100).unwrap(), b"");
}

#[test]
fn frames_carry_rsv1_and_the_decoder_hands_it_on() {
    let agreed = negotiate([&b"permessage-deflate"[..]], &Config::default()).unwrap();
    let cfg = Config {
        min_size: 10,
        ..Config::default()
    };
    let mut client = agreed.deflater(Role::Client, &cfg);
    let mut wire = BytesMut::new();
    client.encode(&mut wire, OpCode::Text, b"short");
    client.encode(
        &mut wire,
        OpCode::Text,
        "a longer message, compressed".as_bytes(),
    );
    let mut dec = Decoder::new(
        Role::Server,
        DecoderConfig {
            allowed_rsv: RSV1,
            ..DecoderConfig::default()
        },
    );
    let mut inf = agreed.inflater(Role::Server, 1 << 20);
    let mut got = vec![];
    while let Some(f) = dec.next(&mut wire).unwrap() {
        let Frame::Data {
            payload, rsv, text, ..
        } = f
        else {
            panic!("{f:?}")
        };
        if rsv & RSV1 != 0 {
            got.push(inflate_pieces(&mut inf, &[&payload], text, 1024).unwrap());
        } else {
            got.push(payload.to_vec());
        }
    }
    assert_eq!(
        got,
        vec![b"short".to_vec(), b"a longer message, compressed".to_vec()]
    );
}

proptest! {
    #[test]
    fn any_messages_split_anywhere_round_trip(
        msgs in proptest::collection::vec(proptest::collection::vec(0u8..4, 0..3000), 1..6),
        cut in 1usize..500,
        room in 1usize..5000,
        bits in 8u8..=15,
        takeover: bool,
        sleep_every in 1usize..4,
    ) {
        let mut d = Deflater::new(1, bits, !takeover, 0, Role::Server);
        let mut inf = Inflater::new(bits, !takeover, 0);
        for (i, m) in msgs.iter().enumerate() {
            let c = compress(&mut d, m);
            let pieces: Vec<&[u8]> = if c.is_empty() { vec![&c[..]] } else { c.chunks(cut).collect() };
            prop_assert_eq!(&inflate_pieces(&mut inf, &pieces, false, room).unwrap(), m);
            if i % sleep_every == 0 {
                d.hibernate();
            } else {
                inf.hibernate();
            }
        }
    }

    #[test]
    fn garbage_never_panics_the_inflater(data in proptest::collection::vec(any::<u8>(), 0..600), room in 1usize..300) {
        let mut inf = Inflater::new(15, false, 4096);
        let _ = inflate_pieces(&mut inf, &[&data], true, room);
        let _ = offers([&data[..]]);
    }
}

#[test]
fn the_inflating_decoder_hands_out_inflated_pieces() {
    let agreed = negotiate([&b"permessage-deflate"[..]], &Config::default()).unwrap();
    let cfg = Config {
        min_size: 0,
        ..Config::default()
    };
    let mut client = agreed.deflater(Role::Client, &cfg);
    let text = "héllo wörld, ".repeat(50);
    let mut compressed = vec![];
    client.compress(text.as_bytes(), &mut compressed);
    // The compressed message in three frames, a ping between them, then an
    // uncompressed one.
    let mut wire = BytesMut::new();
    let mask = [1, 2, 3, 4];
    let key = Some(mask);
    let thirds: Vec<&[u8]> = compressed.chunks(compressed.len() / 3 + 1).collect();
    for (i, part) in thirds.iter().enumerate() {
        let op = if i == 0 {
            OpCode::Text
        } else {
            OpCode::Continuation
        };
        let rsv = if i == 0 { RSV1 } else { 0 };
        write_header(&mut wire, i + 1 == thirds.len(), rsv, op, key, part.len());
        let at = wire.len();
        wire.put_slice(part);
        apply_mask(&mut wire[at..], mask, 0);
        if i == 0 {
            crate::encode_frame(&mut wire, true, OpCode::Ping, key, b"p");
        }
    }
    crate::encode_frame(&mut wire, true, OpCode::Binary, key, b"plain");
    let mut dec = InflatingDecoder::new(
        Role::Server,
        DecoderConfig::default(),
        Some(agreed.inflater(Role::Server, 1 << 20)),
        7,
    );
    let (mut msg, mut msgs, mut pings) = (vec![], vec![], 0);
    while let Some(f) = dec.next(&mut wire).unwrap() {
        match f {
            Frame::Data {
                payload,
                first,
                last,
                rsv,
                ..
            } => {
                assert_eq!(rsv, 0);
                assert!(payload.len() <= 7);
                assert_eq!(first, msg.is_empty() && !payload.is_empty() || first);
                msg.extend_from_slice(&payload);
                if last {
                    msgs.push(std::mem::take(&mut msg));
                }
            }
            Frame::Control { .. } => pings += 1,
        }
    }
    assert_eq!(msgs, vec![text.into_bytes(), b"plain".to_vec()]);
    assert_eq!(pings, 1);
    assert!(dec.holds_state());
    dec.hibernate();
    assert!(!dec.holds_state());
    // Without an inflater, RSV1 is a protocol error (1002).
    let mut plain = InflatingDecoder::new(Role::Server, DecoderConfig::default(), None, 7);
    let mut wire = BytesMut::new();
    write_header(&mut wire, true, RSV1, OpCode::Binary, key, 0);
    assert_eq!(plain.next(&mut wire).unwrap_err().close_code(), 1002);
}
