"""HTTP answers before the upgrade (200, 400, 404, 426, 502, 503) and the
close codes for oversized messages (1009) and invalid UTF-8 (1007)."""

from __future__ import annotations

import os
import threading

import pytest

from wsgate_e2e import clients, rawws
from wsgate_e2e.peers import closed_tcp_port
from wsgate_e2e.rawws import OP_BINARY, OP_CLOSE, OP_CONT, OP_TEXT, RawWebSocket

MiB = 1 << 20


def _send_quietly(ws: RawWebSocket, data: bytes):
    try:
        ws.send_raw(data)
    except OSError:
        pass


def test_healthz(quick_gateway):
    gw = quick_gateway("echo:")
    r = rawws.http_get(gw.host, gw.port, "/healthz")
    assert r.status == 200, (r.status, r.body)


# ------------------------------------------------------------------------ 502
def test_unreachable_tcp_peer_is_502(quick_gateway, node_client):
    sock, port = closed_tcp_port()  # bound, not listening: connections are refused
    try:
        gw = quick_gateway(f"tcp://127.0.0.1:{port}")
        r = rawws.raw_exchange(gw.host, gw.port, rawws.ws_request("/", host=f"{gw.host}:{gw.port}"))
        assert r.status == 502, (r.status, r.reason, r.body)
        assert r.body.strip(), "a 502 should carry a reason"
        n = node_client(gw.url, "handshake", timeout=20)
        assert n.get("refused") and n["status"] == 502, n
    finally:
        sock.close()


def test_unreachable_unix_peer_is_502(quick_gateway, sockdir):
    gw = quick_gateway(f"unix:{sockdir}/nobody-listens-here.sock")
    r = rawws.raw_exchange(gw.host, gw.port, rawws.ws_request("/", host=f"{gw.host}:{gw.port}"))
    assert r.status == 502, (r.status, r.reason, r.body)


def test_502_then_peer_up_works(quick_gateway, peer):
    """A 502 does not poison the route: once the peer listens, clients get through."""
    sock, port = closed_tcp_port()
    gw = quick_gateway(f"tcp://127.0.0.1:{port}")
    r = rawws.raw_exchange(gw.host, gw.port, rawws.ws_request("/"))
    assert r.status == 502
    sock.listen(8)  # the same port now accepts
    try:
        with clients.connect(gw.url) as ws:
            conn, _ = sock.accept()
            with conn:
                ws.send(b"ping")
                conn.settimeout(10)
                assert conn.recv(16) == b"ping"
    finally:
        sock.close()


# ------------------------------------------------------------------------ 400
@pytest.mark.parametrize(
    "what,request_bytes",
    [
        ("plain GET", b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        ("no Sec-WebSocket-Key", rawws.ws_request("/", omit=("Sec-WebSocket-Key",))),
        ("bad Sec-WebSocket-Key", rawws.ws_request("/", key="not-base64-of-16-bytes")),
        ("no Upgrade", rawws.ws_request("/", omit=("Upgrade",))),
        ("Upgrade: h2c", rawws.ws_request("/", extra={"Upgrade": "h2c"})),
        ("no Connection: upgrade", rawws.ws_request("/", extra={"Connection": "keep-alive"})),
    ],
)
def test_bad_websocket_headers_are_400(quick_gateway, what, request_bytes):
    gw = quick_gateway("echo:")
    r = rawws.raw_exchange(gw.host, gw.port, request_bytes)
    assert r.status == 400, f"{what}: got {r.status} {r.reason} {r.body[:200]!r}"


def test_subprotocol_selection_and_400(quick_gateway, node_client):
    gw = quick_gateway("echo:", "--protocol", "redis", "--protocol", "mqtt")
    host = f"{gw.host}:{gw.port}"
    # The first protocol the client offered that the route supports is echoed.
    r = rawws.raw_exchange(gw.host, gw.port, rawws.ws_request("/", host=host, protocols=["foo", "mqtt", "redis"]))
    assert r.status == 101 and r.header("sec-websocket-protocol") == "mqtt", (r.status, r.headers)
    with clients.connect(gw.url, protocols=["redis"]) as ws:
        assert ws.subprotocol == "redis"
    n = node_client(gw.url, "handshake", "--protocol", "bar", "--protocol", "redis", timeout=20)
    assert n["ok"] and n["protocol"] == "redis", n
    # None of the route's protocols offered: 400 listing what is supported.
    r = rawws.raw_exchange(gw.host, gw.port, rawws.ws_request("/", host=host, protocols=["foo", "bar"]))
    assert r.status == 400, (r.status, r.body)
    body = r.body.decode("utf-8", "replace")
    assert "redis" in body and "mqtt" in body, body
    n = node_client(gw.url, "handshake", "--protocol", "foo", timeout=20)
    assert n.get("refused") and n["status"] == 400, n


def test_no_subprotocol_offered_to_route_with_protocols_is_400(quick_gateway):
    gw = quick_gateway("echo:", "--protocol", "redis")
    r = rawws.raw_exchange(gw.host, gw.port, rawws.ws_request("/"))
    assert r.status == 400, (r.status, r.headers, r.body)
    assert b"redis" in r.body


# ------------------------------------------------------------------------ 426
def test_wrong_version_is_426(quick_gateway, node_client):
    gw = quick_gateway("echo:")
    n = node_client(gw.url, "handshake", "--ws-version", "8", timeout=20)
    assert n.get("refused") and n["status"] == 426, n
    assert "13" in n["headers"].get("sec-websocket-version", ""), n
    for version in ("8", "12", "14"):
        r = rawws.raw_exchange(gw.host, gw.port, rawws.ws_request("/", version=version))
        assert r.status == 426, (version, r.status, r.body)
        assert r.header("sec-websocket-version") is not None, r.headers
        assert "13" in [v.strip() for v in r.header("sec-websocket-version").split(",")], r.headers


# ------------------------------------------------------------------------ 404
def test_unknown_path_is_404(start_gateway, write_config, node_client):
    cfg = write_config("""
        [[listener]]
        address = "127.0.0.1:0"

        [[route]]
        path = "/echo"
        to = "echo:"

        [[route]]
        path_prefix = "/api/"
        to = "echo:"
    """)
    gw = start_gateway("serve", "--config", cfg, listeners=1)
    for path in ("/", "/other", "/echo/x", "/api"):
        r = rawws.raw_exchange(gw.host, gw.port, rawws.ws_request(path))
        assert r.status == 404, (path, r.status, r.body)
    n = node_client(gw.ws("/nope"), "handshake", timeout=20)
    assert n.get("refused") and n["status"] == 404, n
    for path in ("/echo", "/api/v1"):
        with clients.connect(gw.ws(path)) as ws:
            ws.send(path)
            assert ws.recv(timeout=10) == path
    # A route path without WebSocket headers is 400, /healthz still 200.
    assert rawws.http_get(gw.host, gw.port, "/echo").status == 400
    assert rawws.http_get(gw.host, gw.port, "/healthz").status == 200


# ------------------------------------------------------------------------ 503
def test_connection_cap_is_503(start_gateway, write_config, node_client):
    cfg = write_config("""
        [[listener]]
        address = "127.0.0.1:0"

        [limits]
        max_connections = 2

        [[route]]
        to = "echo:"
    """)
    gw = start_gateway("serve", "--config", cfg, listeners=1)
    a = clients.connect(gw.url)
    b = clients.connect(gw.url)
    try:
        for ws in (a, b):
            ws.send(b"hi")
            assert ws.recv(timeout=10) == b"hi"
        r = rawws.raw_exchange(gw.host, gw.port, rawws.ws_request("/"))
        assert r.status == 503, (r.status, r.body)
        n = node_client(gw.url, "handshake", timeout=20)
        assert n.get("refused") and n["status"] == 503, n
    finally:
        a.close()
    b.send(b"still here")
    assert b.recv(timeout=10) == b"still here"
    # A slot is free again once a client has gone (the gateway may need a moment
    # to see the close: bounded retries).
    import time

    deadline = time.monotonic() + 10
    while True:
        r = rawws.raw_exchange(gw.host, gw.port, rawws.ws_request("/"))
        if r.status == 101 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    b.close()
    assert r.status == 101, f"no slot freed after a client closed: {r.status}"


# ----------------------------------------------------------------------- 1009
def test_oversized_message_is_1009(quick_gateway):
    """Default max message size is 16 MiB."""
    gw = quick_gateway("echo:")
    with clients.connect(gw.url) as ws:
        ws.send(os.urandom(16 * MiB))  # exactly the limit: accepted
        assert len(ws.recv(timeout=60)) == 16 * MiB
    ws = RawWebSocket.open(gw.host, gw.port)
    try:
        # Sent from a thread: the gateway may stop reading once it saw the length.
        big = rawws.encode_frame(OP_BINARY, os.urandom(16 * MiB + 1))
        sender = threading.Thread(target=_send_quietly, args=(ws, big), daemon=True)
        sender.start()
        frames, close = ws.recv_until_close(timeout=30)
    finally:
        ws.close()
    assert close is not None, "connection dropped without a Close frame"
    assert close.close_code == 1009, close.close_code


def test_oversized_fragmented_message_is_1009(start_gateway, write_config):
    cfg = write_config("""
        [[listener]]
        address = "127.0.0.1:0"

        [limits]
        max_message_size = "64KiB"

        [[route]]
        to = "echo:"
    """)
    gw = start_gateway("serve", "--config", cfg, listeners=1)
    ws = RawWebSocket.open(gw.host, gw.port)
    try:
        ws.send_frame(OP_BINARY, b"a" * 1000)  # small: echoed
        f = ws.recv_frame(timeout=10)
        assert f is not None and f.payload == b"a" * 1000
        # 100 fragments of 1000 bytes: each frame is small, the message is not.
        ws.send_frame(OP_BINARY, b"b" * 1000, fin=False)
        for _ in range(98):
            ws.send_frame(OP_CONT, b"b" * 1000, fin=False)
        ws.send_frame(OP_CONT, b"b" * 1000, fin=True)
        frames, close = ws.recv_until_close(timeout=20)
    finally:
        ws.close()
    assert not any(fr.opcode in (OP_BINARY, OP_CONT) and len(fr.payload) > 64 * 1024 for fr in frames)
    assert close is not None and close.close_code == 1009, close


def test_oversized_node_client_gets_1009(quick_gateway, node_client):
    gw = quick_gateway("echo:")
    r = node_client(gw.url, "send-expect-close", "--bytes", str(16 * MiB + 1), timeout=60)
    assert r["ok"] and r["closeCode"] == 1009, r


def test_invalid_utf8_node_client_gets_1007(quick_gateway, node_client):
    gw = quick_gateway("echo:")
    r = node_client(gw.url, "send-expect-close", "--invalid-text", timeout=30)
    assert r["ok"] and r["closeCode"] == 1007, r


def test_oversized_python_client_gets_1009(quick_gateway):
    gw = quick_gateway("echo:")
    with clients.connect(gw.url) as ws:
        sender = clients.Sender(ws, [os.urandom(17 * MiB)])
        sender.start()
        msgs, code = clients.recv_until_close(ws, timeout=60)
    assert code == 1009, code


# ----------------------------------------------------------------------- 1007
@pytest.mark.parametrize(
    "frames",
    [
        [(OP_TEXT, b"\xff\xfe", True)],
        [(OP_TEXT, b"valid then \xc3\x28 invalid", True)],
        [(OP_TEXT, "κόσμε".encode() + b"\xed\xa0\x80", True)],  # UTF-16 surrogate
        [(OP_TEXT, b"abc", False), (OP_CONT, b"\xe2\x82", False), (OP_CONT, b"\x28", True)],
    ],
    ids=["bytes-ff-fe", "bad-continuation", "surrogate", "fragmented"],
)
def test_invalid_utf8_text_is_1007(quick_gateway, frames):
    gw = quick_gateway("echo:")
    ws = RawWebSocket.open(gw.host, gw.port)
    try:
        for op, payload, fin in frames:
            ws.send_frame(op, payload, fin=fin)
        got, close = ws.recv_until_close(timeout=15)
    finally:
        ws.close()
    assert close is not None, "connection dropped without a Close frame"
    assert close.close_code == 1007, close.close_code


def test_utf8_split_across_fragments_is_fine(quick_gateway):
    gw = quick_gateway("echo:")
    ws = RawWebSocket.open(gw.host, gw.port)
    try:
        text = "€uro ✓".encode()
        ws.send_frame(OP_TEXT, text[:1], fin=False)
        ws.send_frame(OP_CONT, text[1:2], fin=False)
        ws.send_frame(OP_CONT, text[2:], fin=True)
        payload = b""
        while True:
            f = ws.recv_frame(timeout=10)
            assert f is not None and f.opcode in (OP_TEXT, OP_CONT), f
            payload += f.payload
            if f.fin:
                break
        assert payload == text
        ws.send_frame(OP_CLOSE, rawws.close_payload(1000))
        _, close = ws.recv_until_close(timeout=10)
        assert close is not None and close.close_code == 1000
    finally:
        ws.close()


def test_invalid_utf8_python_client_gets_1007(quick_gateway):
    gw = quick_gateway("echo:")
    with clients.connect(gw.url) as ws:
        ws.send(b"\xc0\xaf not utf-8", text=True)
        msgs, code = clients.recv_until_close(ws, timeout=15)
    assert code == 1007, code
