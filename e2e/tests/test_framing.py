"""Framing functions seen from a WebSocket client: a scripted TCP peer writes
bytes in awkward pieces (separate reads) or in one burst, and every message
must carry exactly one unit (line, record, frame) with the right type."""

from __future__ import annotations

import os
import struct

import pytest

from wsgate_e2e import clients


def collect(gw, timeout=20):
    with clients.connect(gw.url) as ws:
        return clients.recv_until_close(ws, timeout)


def pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    out, last = [], 0
    for c in cuts:
        out.append(data[last:c])
        last = c
    out.append(data[last:])
    return [p for p in out if p]


def test_lines(quick_gateway, peer):
    p = peer("tcp-script", chunks=[b"alpha\nbe", b"ta\n", b"\n", b"gam", b"ma\n", b"\xff\xfe\n", b"last\n"])
    gw = quick_gateway(p.spec, "--framing", "lines")
    msgs, code = collect(gw)
    assert msgs == ["alpha", "beta", "", "gamma", b"\xff\xfe", "last"], msgs
    assert code == 1000


def test_lines_partial_line_at_eof_is_delivered(quick_gateway, peer):
    p = peer("tcp-script", chunks=[b"one\ntw", b"o-without-newline"])
    gw = quick_gateway(p.spec, "--framing", "lines")
    msgs, code = collect(gw)
    assert [clients.as_bytes(m) for m in msgs] == [b"one", b"two-without-newline"], msgs
    assert code == 1000


def test_lines_crlf_separator(quick_gateway, peer):
    p = peer("tcp-script", chunks=[b"one\r", b"\ntwo\r\nthr", b"ee\r\n"])
    gw = quick_gateway(p.spec, "--framing", "lines", "--framing-config", "separator=\\r\\n")
    msgs, code = collect(gw)
    assert msgs == ["one", "two", "three"], msgs


def test_auto_keeps_split_utf8_text(quick_gateway, peer):
    text = "café ok € 𝄞 done"
    data = text.encode()
    # Cut inside every multi-byte character.
    cuts = [data.index("é".encode()) + 1, data.index("€".encode()) + 2, data.index("𝄞".encode()) + 1,
            data.index("𝄞".encode()) + 3]
    p = peer("tcp-script", chunks=pieces(data, cuts))
    gw = quick_gateway(p.spec, "--framing", "auto")
    msgs, code = collect(gw)
    assert all(isinstance(m, str) for m in msgs), f"a split character turned text into binary: {msgs!r}"
    assert "".join(msgs) == text
    assert code == 1000


def test_auto_binary_stays_binary(quick_gateway, peer):
    p = peer("tcp-script", chunks=[b"\xff\xfe\x00binary", b"plain text"])
    gw = quick_gateway(p.spec, "--framing", "auto")
    msgs, code = collect(gw)
    assert msgs[0] == b"\xff\xfe\x00binary", msgs
    assert b"".join(clients.as_bytes(m) for m in msgs) == b"\xff\xfe\x00binaryplain text"


RECORDS = [b"", b"x", os.urandom(300), os.urandom(70000), b"end"]


@pytest.mark.parametrize("mode", ["split", "burst"])
def test_length_prefixed_u32_strip(quick_gateway, peer, mode):
    stream = b"".join(struct.pack("!I", len(r)) + r for r in RECORDS)
    chunks = pieces(stream, [2, 5, 6, 400, 40000]) if mode == "split" else [stream]
    p = peer("tcp-script", chunks=chunks)
    gw = quick_gateway(p.spec, "--framing", "length-prefixed")
    msgs, code = collect(gw)
    assert [clients.as_bytes(m) for m in msgs] == RECORDS
    assert code == 1000


@pytest.mark.parametrize("mode", ["split", "burst"])
def test_length_prefixed_u16_keep_header(quick_gateway, peer, mode):
    recs = [r for r in RECORDS if len(r) < 65536]
    framed = [struct.pack("!H", len(r)) + r for r in recs]
    stream = b"".join(framed)
    chunks = pieces(stream, [1, 3, 200]) if mode == "split" else [stream]
    p = peer("tcp-script", chunks=chunks)
    gw = quick_gateway(p.spec, "--framing", "length-prefixed", "--framing-config", "u16,keep-header")
    msgs, code = collect(gw)
    assert [clients.as_bytes(m) for m in msgs] == framed


def cql_frame(stream_id: int, opcode: int, body: bytes, version: int = 4) -> bytes:
    return struct.pack("!BBhBI", 0x80 | version, 0, stream_id, opcode, len(body)) + body


@pytest.mark.parametrize("mode", ["split", "burst"])
def test_cql_frames(quick_gateway, peer, mode):
    frames = [cql_frame(0, 0x02, b""), cql_frame(1, 0x08, os.urandom(5000)), cql_frame(2, 0x08, b"\x00\x00\x00\x01", 5),
              cql_frame(3, 0x08, os.urandom(100_000), 3)]
    stream = b"".join(frames)
    chunks = pieces(stream, [4, 9, 12, 3000, 5020]) if mode == "split" else [stream]
    p = peer("tcp-script", chunks=chunks)
    gw = quick_gateway(p.spec, "--framing", "cql")
    msgs, code = collect(gw)
    assert [clients.as_bytes(m) for m in msgs] == frames


@pytest.mark.parametrize("mode", ["split", "burst"])
def test_kafka_responses(quick_gateway, peer, mode):
    bodies = [struct.pack("!i", 7) + os.urandom(n) for n in (0, 10, 9000, 200_000)]
    frames = [struct.pack("!i", len(b)) + b for b in bodies]
    stream = b"".join(frames)
    chunks = pieces(stream, [2, 4, 7, 30, 9000]) if mode == "split" else [stream]
    p = peer("tcp-script", chunks=chunks)
    gw = quick_gateway(p.spec, "--framing", "kafka")
    msgs, code = collect(gw)
    assert [clients.as_bytes(m) for m in msgs] == frames
