"""A real redis-server behind `--framing resp --protocol redis`: each WebSocket
message carries exactly one whole RESP reply, however the bytes arrived."""

from __future__ import annotations

import os

import pytest

from wsgate_e2e import clients

pytestmark = pytest.mark.redis


def resp(*args: bytes | str) -> bytes:
    out = [f"*{len(args)}\r\n".encode()]
    for a in args:
        b = a.encode() if isinstance(a, str) else a
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


@pytest.fixture(params=["unix", "tcp"])
def redis_gw(request, redis_server, quick_gateway):
    r = redis_server(tcp=request.param == "tcp")
    return quick_gateway(r.spec, "--framing", "resp", "--protocol", "redis")


def test_single_command(redis_gw):
    with clients.connect(redis_gw.url, protocols=["redis"]) as ws:
        assert ws.subprotocol == "redis"
        ws.send(resp("PING"))
        assert clients.as_bytes(ws.recv(timeout=10)) == b"+PONG\r\n"
        ws.send(resp("SET", "k", "v"))
        assert clients.as_bytes(ws.recv(timeout=10)) == b"+OK\r\n"
        ws.send(resp("GET", "k"))
        assert clients.as_bytes(ws.recv(timeout=10)) == b"$1\r\nv\r\n"
        ws.send(resp("GET", "missing"))
        assert clients.as_bytes(ws.recv(timeout=10)) == b"$-1\r\n"
        ws.send(resp("NOSUCHCOMMAND"))
        assert clients.as_bytes(ws.recv(timeout=10)).startswith(b"-ERR")


def test_pipelined_1000_commands_in_one_message(redis_gw):
    n = 1000
    cmds = []
    expected = []
    for i in range(n):
        if i % 3 == 0:
            cmds.append(resp("INCR", "counter"))
            expected.append(b":%d\r\n" % (i // 3 + 1))
        elif i % 3 == 1:
            v = os.urandom(i)
            cmds.append(resp("SET", f"key{i}", v))
            expected.append(b"+OK\r\n")
        else:
            cmds.append(resp("LRANGE", "nolist", "0", "-1"))
            expected.append(b"*0\r\n")
    with clients.connect(redis_gw.url, protocols=["redis"]) as ws:
        ws.send(b"".join(cmds))
        got = [clients.as_bytes(m) for m in clients.recv_messages(ws, n, timeout=30)]
        # Nothing more may arrive: exactly one message per reply.
        ws.send(resp("PING"))
        assert clients.as_bytes(ws.recv(timeout=10)) == b"+PONG\r\n"
    assert len(got) == n
    bad = [i for i in range(n) if got[i] != expected[i]]
    assert not bad, f"{len(bad)} messages are not exactly one reply, first at {bad[0]}: {got[bad[0]][:80]!r}"


def test_pipelined_replies_of_mixed_sizes(redis_gw):
    """Replies of very different sizes arrive pipelined; each is one message."""
    values = [os.urandom(n) for n in (0, 1, 1000, 70000, 500_000, 3)]
    with clients.connect(redis_gw.url, protocols=["redis"]) as ws:
        ws.send(b"".join(resp("SET", f"m{i}", v) for i, v in enumerate(values)))
        assert [clients.as_bytes(m) for m in clients.recv_messages(ws, len(values), 20)] == [b"+OK\r\n"] * len(values)
        ws.send(b"".join(resp("GET", f"m{i}") for i in range(len(values))))
        got = [clients.as_bytes(m) for m in clients.recv_messages(ws, len(values), 20)]
    assert got == [b"$%d\r\n%s\r\n" % (len(v), v) for v in values]


def test_10mb_value(redis_gw):
    value = os.urandom(10_000_000)
    with clients.connect(redis_gw.url, protocols=["redis"]) as ws:
        ws.send(resp("SET", "big", value))
        assert clients.as_bytes(ws.recv(timeout=30)) == b"+OK\r\n"
        ws.send(resp("GET", "big"))
        m = clients.as_bytes(ws.recv(timeout=30))
        expected = b"$10000000\r\n" + value + b"\r\n"
        assert len(m) == len(expected), f"the 10 MB reply came as a {len(m)}-byte message"
        assert m == expected
        ws.send(resp("STRLEN", "big"))
        assert clients.as_bytes(ws.recv(timeout=10)) == b":10000000\r\n"


def test_redis_without_subprotocol_is_refused(redis_gw):
    from wsgate_e2e import rawws

    r = rawws.raw_exchange(redis_gw.host, redis_gw.port, rawws.ws_request("/", protocols=["mqtt"]))
    assert r.status == 400 and b"redis" in r.body, (r.status, r.body)
