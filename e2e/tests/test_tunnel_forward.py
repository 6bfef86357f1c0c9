"""Reverse tunnel, forwards and bridge routes: `--forward` TCP listeners to an
echo and to a real `redis-server` behind the agent (redis-cli's protocol by
hand, `redis-benchmark` against the forward), a bridge route to the agent's
Redis (`--to agent://site-a/tcp://... --framing resp`) from Python
`websockets` and from headless Chromium, a UDP forward to a DNS-like
responder, and the admin side (`GET /agents`, metrics)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import struct
import subprocess
import threading
import time

import pytest

from wsgate_e2e import clients
from wsgate_e2e.tunnel import dns_query, poll

pytestmark = pytest.mark.tunnel


def resp(*args) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a.encode() if isinstance(a, str) else a
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def recv_until(s: socket.socket, done, timeout: float = 10.0) -> bytes:
    s.settimeout(timeout)
    buf = b""
    deadline = time.monotonic() + timeout
    while not done(buf):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out, got {buf[:200]!r}")
        d = s.recv(65536)
        if not d:
            raise AssertionError(f"EOF, got {buf[:200]!r}")
        buf += d
    return buf


def test_tcp_forward_echo_with_half_close(tunnel, internal, owners):
    echo = internal.echo()
    gw = tunnel.gateway("--forward", f"127.0.0.1:0=agent://site-a/tcp://{echo.addr}")
    scheme, host, port, to = gw.forwards[0]
    assert (scheme, host, to) == ("tcp", "127.0.0.1", f"agent://site-a/tcp://{echo.addr}") and port > 0
    tunnel.agent(gw, "site-a", allow=["tcp://127.0.0.1:*"])
    datas = [os.urandom(n) for n in (1, 1000, 300_000, 2_000_000)]
    results: dict[int, bytes] = {}

    def one(i, data):
        with socket.create_connection((host, port), timeout=10) as s:
            t = threading.Thread(target=s.sendall, args=(data,), daemon=True)
            t.start()
            got = bytearray()
            while len(got) < len(data):
                d = s.recv(262144)
                if not d:
                    break
                got += d
            t.join(10)
            # Half-close: our FIN reaches the echo, whose FIN comes back.
            s.shutdown(socket.SHUT_WR)
            assert s.recv(1) == b"", "expected EOF after the echo's half-close"
            results[i] = bytes(got)

    ts = [threading.Thread(target=one, args=(i, d)) for i, d in enumerate(datas)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert {i: len(v) for i, v in results.items()} == {i: len(d) for i, d in enumerate(datas)}
    assert all(results[i] == d for i, d in enumerate(datas))
    assert echo.accepted == len(datas)
    assert gw.metric("wsgate_tunnel_streams_total", via="forward", outcome="ok") == len(datas)
    owners.assert_only_agents(min_seen=len(datas))


def test_forward_without_agent_closes_the_connection_at_once(tunnel, internal):
    echo = internal.echo()
    gw = tunnel.gateway("--forward", f"127.0.0.1:0=agent://site-a/tcp://{echo.addr}")
    t0 = time.monotonic()
    with socket.create_connection(gw.forward(), timeout=10) as s:
        s.settimeout(5)
        try:
            assert s.recv(1) == b""
        except ConnectionResetError:
            pass
    assert time.monotonic() - t0 < 2
    assert echo.accepted == 0
    assert gw.metric("wsgate_tunnel_streams_total", via="forward", outcome="agent_unavailable") == 1


def test_refused_destination_closes_the_forward(tunnel, internal):
    """The agent checks every open against its own --allow, whatever the gateway was told."""
    echo = internal.echo()
    gw = tunnel.gateway("--forward", f"127.0.0.1:0=agent://site-a/tcp://{echo.addr}")
    # Allows another port only.
    tunnel.agent(gw, "site-a", allow=[f"tcp://127.0.0.1:{echo.port + 1 if echo.port < 65535 else 1}"])
    with socket.create_connection(gw.forward(), timeout=10) as s:
        s.settimeout(5)
        try:
            assert s.recv(1) == b""
        except ConnectionResetError:
            pass
    assert echo.accepted == 0
    assert gw.metric("wsgate_tunnel_streams_total", via="forward", outcome="agent_refused") == 1


@pytest.mark.redis
def test_redis_through_a_forward_and_redis_benchmark(tunnel, redis_server, owners):
    r = redis_server(tcp=True)
    gw = tunnel.gateway("--forward", f"127.0.0.1:0=agent://site-a/tcp://127.0.0.1:{r.port}")
    agent = tunnel.agent(gw, "site-a", allow=[f"tcp://127.0.0.1:{r.port}"])
    host, port = gw.forward()
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(resp("PING") + resp("SET", "k", "v" * 1000) + resp("GET", "k"))
        want = b"+PONG\r\n+OK\r\n$1000\r\n" + b"v" * 1000 + b"\r\n"
        assert recv_until(s, lambda b: len(b) >= len(want)) == want
        # Redis sees its client at the agent's socket: the agent's process connected.
        s.sendall(resp("CLIENT", "INFO"))
        info = recv_until(s, lambda b: b.endswith(b"\r\n") and len(b) > 20 and b.count(b"\r\n") >= 2)
        addr = re.search(rb"addr=127\.0\.0\.1:(\d+)", info)
        assert addr, info
        who = owners.owner(("127.0.0.1", int(addr.group(1))), ("127.0.0.1", r.port))
        assert who == agent.name, f"redis' client socket belongs to {who}, not the agent"
    exe = shutil.which("redis-benchmark")
    if not exe:
        pytest.fail("redis-benchmark not found: run scripts/install-test-deps.sh (redis-tools)")
    cp = subprocess.run([exe, "-h", host, "-p", str(port), "-n", "5000", "-c", "20", "-P", "4", "-t", "ping,set,get",
                         "--csv"], capture_output=True, text=True, timeout=120)
    assert cp.returncode == 0, cp.stderr
    rates = {m.group(1): float(m.group(2)) for m in re.finditer(r'^"([A-Z_]+)[^"]*","([0-9.]+)"', cp.stdout, re.M)}
    print("redis-benchmark through the forward:", rates)
    assert {"SET", "GET"} <= set(rates) and all(v > 0 for v in rates.values()), cp.stdout
    assert gw.metric("wsgate_tunnel_streams_total", via="forward", outcome="agent_unavailable") == 0


@pytest.fixture
def redis_behind_agent(tunnel, redis_server):
    r = redis_server(tcp=True)
    gw = tunnel.gateway("--to", f"agent://site-a/tcp://127.0.0.1:{r.port}", "--framing", "resp",
                        "--protocol", "redis")
    tunnel.agent(gw, "site-a", allow=[f"tcp://127.0.0.1:{r.port}"])
    return gw


@pytest.mark.redis
def test_redis_bridge_route_to_the_agent_one_reply_per_message(redis_behind_agent):
    gw = redis_behind_agent
    with clients.connect(gw.url + "/", protocols=["redis"]) as ws:
        assert ws.subprotocol == "redis"
        ws.send(resp("PING"))
        assert clients.as_bytes(ws.recv(timeout=10)) == b"+PONG\r\n"
        big = os.urandom(1_000_000)
        ws.send(resp("SET", "big", big))
        assert clients.as_bytes(ws.recv(timeout=10)) == b"+OK\r\n"
        n = 300
        ws.send(b"".join(resp("INCR", "c") if i % 2 else resp("GET", "big") for i in range(n)))
        got = [clients.as_bytes(m) for m in clients.recv_messages(ws, n, timeout=60)]
        for i, m in enumerate(got):
            want = b":%d\r\n" % ((i + 1) // 2) if i % 2 else b"$1000000\r\n" + big + b"\r\n"
            assert m == want, f"message {i} is not exactly one reply: {m[:60]!r} ({len(m)} bytes)"
        ws.send(resp("PING"))
        assert clients.as_bytes(ws.recv(timeout=10)) == b"+PONG\r\n"
    assert gw.metric("wsgate_tunnel_streams_total", via="bridge", outcome="ok") == 1


@pytest.mark.redis
@pytest.mark.browser
def test_redis_bridge_route_from_chromium(redis_behind_agent, page_server, browser):
    gw = redis_behind_agent
    res = browser(page_server.url(gw.url + "/", "*1\r\n$4\r\nPING\r\n", protocols=["redis"]))
    assert res["ok"], res
    page = res["result"]
    assert page["error"] is None and page["opened"] and page["protocol"] == "redis", page
    assert page["messages"] == ["+PONG\r\n"], page


def test_udp_forward_to_a_dns_like_service(tunnel, internal, owners):
    dns = internal.dns()
    gw = tunnel.gateway("--forward", f"udp://127.0.0.1:0=agent://site-a/udp://{dns.addr}")
    scheme, host, port, to = gw.forwards[0]
    assert scheme == "udp" and port > 0 and to == f"agent://site-a/udp://{dns.addr}"
    # --drain 1s: its UDP flows stay open (60 s idle) and would hold its SIGTERM.
    tunnel.agent(gw, "site-a", allow=[f"udp://127.0.0.1:{dns.port}"], extra=["--drain", "1s"])
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
    try:
        for s in socks:
            s.settimeout(5)
        for i in range(40):
            s = socks[i % 2]
            q = dns_query(1000 + i, f"host{i}.internal")
            s.sendto(q, (host, port))
            a, src = s.recvfrom(2048)
            assert src == (host, port)
            qid, flags, qd, an = struct.unpack("!HHHH", a[:8])
            assert (qid, flags & 0x8000, qd, an) == (1000 + i, 0x8000, 1, 1), a
            assert a[-4:] == bytes([10, 0, 0, (1000 + i) % 256]) and q[12:] in a
        # One flow per client address, each one stream through the agent.
        assert dns.datagrams == 40 and len(dns.sources) == 2
        assert gw.metric("wsgate_tunnel_streams_total", via="forward", outcome="ok") == 2
    finally:
        for s in socks:
            s.close()
    owners.assert_only_agents(min_seen=2)


def test_admin_agents_json_and_metrics(tunnel, internal):
    echo = internal.echo()
    gw = tunnel.gateway("--forward", f"127.0.0.1:0=agent://site-a/tcp://{echo.addr}")
    allow = ["tcp://127.0.0.1:*", "udp://127.0.0.1:53"]
    tunnel.agent(gw, "site-a", allow=allow, pool=2)
    info = gw.wait_connections("site-a", 2)
    assert info["id"] == "site-a" and sorted(info["allow"]) == sorted(allow), info
    assert len(info["links"]) == 2 and info["open_streams"] == 0, info
    assert all(a.startswith("127.0.0.1:") for a in info["remote_addresses"]), info
    assert abs(info["connected_since"] - time.time()) < 120, info
    with socket.create_connection(gw.forward(), timeout=10) as s:
        s.sendall(b"x" * 5000)
        recv_until(s, lambda b: len(b) >= 5000)
        info = poll("one open stream", lambda: (lambda a: a if a["open_streams"] == 1 else None)(gw.agents()["site-a"]), 5)
        assert sorted(l["open_streams"] for l in info["links"]) == [0, 1], info
    info = poll("bytes counted", lambda: (lambda a: a if a["open_streams"] == 0 and a["bytes_from_agent"] >= 5000 else None)(gw.agents()["site-a"]), 5)
    assert info["bytes_to_agent"] >= 5000, info
    assert gw.metric("wsgate_agent_connections", agent="site-a") == 2
    assert gw.metric("wsgate_tunnel_bytes_total", direction="to_agent") >= 5000
    assert gw.metric("wsgate_tunnel_bytes_total", direction="from_agent") >= 5000
    assert gw.metric("wsgate_tunnel_streams_total", via="forward", outcome="ok") == 1
    assert gw.metric("wsgate_websockets_open", route="agent") == 2
