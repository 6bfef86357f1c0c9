"""Data through the bridge, with Python `websockets` and Node `ws` clients,
against real stream (tcp://, unix:) and datagram (udp://, unix-dgram:) peers
and the built-in echo: peer."""

from __future__ import annotations

import hashlib
import os

import pytest

from wsgate_e2e import clients

MiB = 1 << 20
# 0 B to 8 MiB, around every WebSocket length-encoding boundary.
STREAM_SIZES = [0, 1, 2, 125, 126, 127, 1000, 65535, 65536, 65537, 300_000, MiB, 3 * MiB + 7, 8 * MiB]
# One datagram per message: the largest IPv4 UDP payload is 65507 bytes.
DGRAM_SIZES = [0, 1, 100, 1400, 9000, 32768, 65000, 65507]
BURST = 50


@pytest.fixture(params=["tcp", "unix"])
def stream_peer(request, peer):
    return peer(f"{request.param}-echo")


@pytest.fixture(params=["udp", "unix-dgram"])
def dgram_peer(request, peer):
    return peer(f"{request.param}-echo")


# ------------------------------------------------------------------- streams
def test_stream_echo_python(quick_gateway, stream_peer):
    gw = quick_gateway(stream_peer.spec)
    sent = clients.payloads(STREAM_SIZES, seed=7)
    expected = b"".join(sent)
    got, nmsg = clients.echo_stream(gw.url, sent, timeout=60)
    assert len(got) == len(expected)
    assert got == expected, "echoed bytes differ from the bytes sent (corrupted or reordered)"


def test_stream_echo_node(quick_gateway, stream_peer, node_client):
    gw = quick_gateway(stream_peer.spec)
    r = node_client(gw.url, "echo", "--sizes", ",".join(map(str, STREAM_SIZES)), timeout=90)
    assert r["ok"], r
    assert r["closeCode"] == 1000


def test_stream_many_small_messages_in_order(quick_gateway, stream_peer):
    gw = quick_gateway(stream_peer.spec)
    msgs = [f"{i:06d};".encode() for i in range(5000)]
    got, _ = clients.echo_stream(gw.url, msgs, timeout=60)
    assert got == b"".join(msgs)


@pytest.mark.parametrize("client", ["python", "node"])
def test_peer_writes_4mib_then_closes(quick_gateway, peer, node_client, client):
    """Peer EOF: everything it wrote is delivered, then close 1000."""
    data = os.urandom(4 * MiB)
    blaster = peer("tcp-blaster", payload=data)
    gw = quick_gateway(blaster.spec)
    if client == "python":
        with clients.connect(gw.url) as ws:
            msgs, code = clients.recv_until_close(ws, timeout=60)
        got = b"".join(clients.as_bytes(m) for m in msgs)
        assert len(got) == len(data), f"got {len(got)} of {len(data)} bytes before close {code}"
        assert got == data
        assert code == 1000
    else:
        r = node_client(gw.url, "recv-all", timeout=60)
        assert r["ok"], r
        assert r["bytes"] == len(data), r
        assert r["sha256"] == hashlib.sha256(data).hexdigest()
        assert r["closeCode"] == 1000, r


def test_unix_peer_writes_4mib_then_closes(quick_gateway, peer):
    data = os.urandom(4 * MiB)
    blaster = peer("unix-blaster", payload=data)
    gw = quick_gateway(blaster.spec)
    with clients.connect(gw.url) as ws:
        msgs, code = clients.recv_until_close(ws, timeout=60)
    got = b"".join(clients.as_bytes(m) for m in msgs)
    assert got == data, f"got {len(got)} of {len(data)} bytes"
    assert code == 1000


@pytest.mark.parametrize("client", ["python", "node"])
@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_client_sends_4mib_then_closes(quick_gateway, peer, node_client, client, kind):
    """Client Close: every message before it is written to the peer, the peer
    sees EOF (half-close), and the Close is answered."""
    sink = peer(f"{kind}-sink")
    gw = quick_gateway(sink.spec)
    if client == "python":
        data = os.urandom(4 * MiB)
        with clients.connect(gw.url) as ws:
            for i in range(0, len(data), MiB // 2):
                ws.send(data[i:i + MiB // 2])
            ws.close(1000)
            answered = ws.protocol.close_rcvd
        digest, nbytes = hashlib.sha256(data).hexdigest(), len(data)
        assert answered is not None, "the gateway did not answer the Close"
        assert answered.code == 1000, answered
    else:
        r = node_client(gw.url, "send-close", "--bytes", str(4 * MiB), "--chunk", str(MiB // 2), timeout=60)
        assert r["ok"], r
        assert r["closeCode"] == 1000, r
        digest, nbytes = r["sha256"], r["bytes"]
    assert sink.done.wait(30), f"peer saw no EOF; it received {len(sink.received)} bytes"
    assert len(sink.received) == nbytes, f"peer received {len(sink.received)} of {nbytes} bytes"
    assert sink.sha256 == digest, "peer received different bytes"


def test_client_close_is_answered_without_waiting_for_the_peer(quick_gateway, peer):
    """The peer gets everything and EOF but keeps its side open: the Close is
    still answered promptly (half-close towards the peer)."""
    import time

    p = peer("tcp-holdopen")
    gw = quick_gateway(p.spec)
    data = os.urandom(MiB)
    with clients.connect(gw.url) as ws:
        ws.send(data)
        t0 = time.monotonic()
        ws.close(1000)
        took = time.monotonic() - t0
        answered = ws.protocol.close_rcvd
    assert answered is not None and answered.code == 1000, answered
    assert took < 3, f"Close answered after {took:.1f}s: the gateway waited for the peer"
    assert p.done.wait(10), "peer saw no EOF"
    assert bytes(p.received) == data


def test_peer_reset_is_1011(quick_gateway, peer):
    p = peer("tcp-reset")
    gw = quick_gateway(p.spec, "--framing", "binary")
    with clients.connect(gw.url) as ws:
        ws.send(b"go")  # the peer resets once it has read this
        _, code = clients.recv_until_close(ws, timeout=15)
    assert code == 1011, code


def test_unreachable_unix_dgram_peer_is_502(quick_gateway, sockdir):
    from wsgate_e2e import rawws

    gw = quick_gateway(f"unix-dgram:{sockdir}/nobody.sock")
    r = rawws.raw_exchange(gw.host, gw.port, rawws.ws_request("/"))
    assert r.status == 502, (r.status, r.body)


# ----------------------------------------------------------------- datagrams
def test_datagram_echo_python(quick_gateway, dgram_peer):
    gw = quick_gateway(dgram_peer.spec)
    sent = clients.payloads(DGRAM_SIZES, seed=3)
    with clients.connect(gw.url) as ws:
        # One at a time: a loopback datagram socket drops what its buffer cannot hold.
        for i, p in enumerate(sent):
            ws.send(p)
            m = ws.recv(timeout=10)
            assert clients.as_bytes(m) == p, f"datagram {i} ({len(p)} B) came back as {len(clients.as_bytes(m))} B"
        burst = [f"burst-{i:04d}".encode() * 10 for i in range(BURST)]
        for p in burst:
            ws.send(p)
        got = [clients.as_bytes(m) for m in clients.recv_messages(ws, BURST, timeout=20)]
    assert got == burst, "a burst of datagrams came back merged, split or reordered"


def test_datagram_echo_node(quick_gateway, dgram_peer, node_client):
    gw = quick_gateway(dgram_peer.spec)
    r = node_client(gw.url, "echo", "--datagram", "--sequential", "--sizes", ",".join(map(str, DGRAM_SIZES)), timeout=60)
    assert r["ok"], r
    r = node_client(gw.url, "echo", "--datagram", "--sizes", ",".join(["200"] * BURST), timeout=60)
    assert r["ok"], r


# ---------------------------------------------------------------------- echo:
def test_echo_peer_keeps_message_types(quick_gateway):
    gw = quick_gateway("echo:")
    with clients.connect(gw.url) as ws:
        ws.send("héllo wörld ✓")
        m = ws.recv(timeout=10)
        assert isinstance(m, str) and m == "héllo wörld ✓"
        ws.send(b"\x00\xff\x80binary")
        m = ws.recv(timeout=10)
        assert isinstance(m, bytes) and m == b"\x00\xff\x80binary"
        big = os.urandom(8 * MiB)
        ws.send(big)
        assert ws.recv(timeout=30) == big


def test_echo_peer_node(quick_gateway, node_client):
    gw = quick_gateway("echo:")
    r = node_client(gw.url, "echo", "--datagram", "--check-types", "--text", "--sizes", "0,1,125,126,70000,2000000", timeout=60)
    assert r["ok"], r
    r = node_client(gw.url, "echo", "--datagram", "--check-types", "--sizes", ",".join(map(str, STREAM_SIZES)), timeout=60)
    assert r["ok"], r


def test_two_listeners(start_gateway):
    gw = start_gateway("serve", "--listen", "127.0.0.1:0", "--listen", "127.0.0.1:0", "--to", "echo:")
    assert len(gw.listeners) == 2
    assert gw.listeners[0].port != gw.listeners[1].port
    for lst in gw.listeners:
        assert lst.scheme == "ws" and lst.host == "127.0.0.1" and lst.port > 0
        with clients.connect(lst.url) as ws:
            ws.send(b"x")
            assert ws.recv(timeout=10) == b"x"
