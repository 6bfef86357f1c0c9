"""Reverse proxy limits (issue 3): a flood from one address is limited while a
second address keeps being served; the global cap; the close frames the
gateway injects on proxied WebSockets (max_lifetime, idle timeout, shutdown).

The flooder's sockets are bound to 127.0.0.2 and the good client's to
127.0.0.1 (Linux routes all of 127/8 to loopback), so the gateway sees two
client addresses. The backend is the Node `ws` echo server."""

from __future__ import annotations

import math
import signal
import socket
import time
import urllib.request

import pytest

from wsgate_e2e import clients, rawws
from wsgate_e2e.rawws import OP_CLOSE, OP_TEXT, RawWebSocket

pytestmark = pytest.mark.proxy

FLOODER = "127.0.0.2"
GOOD = "127.0.0.1"


def limits_gateway(start_gateway, write_config, backend: str, limits: str):
    cfg = write_config(f"""
        [admin]
        address = "127.0.0.1:0"

        [[listener]]
        address = "127.0.0.1:0"

        [limits]
        {limits}

        [[route]]
        name = "echo"
        path_prefix = "/"
        proxy = "{backend}"
    """)
    return start_gateway("serve", "--config", cfg, listeners=1, admin=True)


def handshake_from(src: str, gw, path: str = "/", timeout: float = 10.0):
    """A WebSocket handshake from source address `src` -> (response, RawWebSocket or None).
    `gw`: the gateway (its first listener) or one of its listeners."""
    s = socket.create_connection((gw.host, gw.port), timeout=timeout, source_address=(src, 0))
    s.settimeout(timeout)
    try:
        s.sendall(rawws.ws_request(path, host=f"{gw.host}:{gw.port}"))
        resp, rest = rawws.read_http_response(s, timeout)
    except BaseException:
        s.close()
        raise
    if resp.status != 101:
        s.close()
        return resp, None
    return resp, RawWebSocket(s, resp, rest)


def echo_ok(ws: RawWebSocket, msg: bytes) -> bool:
    ws.send_frame(OP_TEXT, msg)
    f = ws.recv_frame(timeout=10)
    return f is not None and f.opcode == OP_TEXT and f.payload == msg


def close_ws(ws: RawWebSocket):
    """Client Close, then wait (bounded) for the answer so the gateway has let go."""
    try:
        ws.send_frame(OP_CLOSE, rawws.close_payload(1000))
        ws.recv_until_close(timeout=10)
    except (OSError, TimeoutError):
        pass
    ws.close()


def refusals(admin: str) -> dict[str, float]:
    with urllib.request.urlopen(admin + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for ln in text.splitlines():
        if ln.startswith('wsgate_handshake_refusals_total{reason="'):
            reason = ln.split('"')[1]
            out[reason] = float(ln.rsplit(" ", 1)[1])
    return out


def retry_after(resp) -> int:
    v = resp.header("retry-after")
    assert v is not None, f"{resp.status} without Retry-After: {resp.headers}"
    assert v.isdigit(), f"Retry-After {v!r} is not delay-seconds"
    return int(v)


# ---------------------------------------------------------------- per-IP rate
def test_rate_flood_from_one_address_is_limited(start_gateway, write_config, node_echo_server):
    rate, burst = 5.0, 5  # "5/s burst 5": one new handshake per 200 ms, 5 at once
    gw = limits_gateway(start_gateway, write_config, node_echo_server(),
                        f'per_ip_rate = "{int(rate)}/s burst {burst}"')
    before = refusals(gw.admin)

    # The flooder hammers as fast as it can; between its attempts the good
    # client takes five turns (every 200 flood attempts) opening a WebSocket and
    # echoing on it. Five stays within the good address's own burst, so every
    # turn must be served whatever the timing. Bounded by attempts, not time.
    flood_ok, flood_429, good_ok, good_bad = 0, [], 0, []
    t0 = time.monotonic()
    attempts = 0
    while good_ok + len(good_bad) < 5 and attempts < 4000:
        attempts += 1
        resp, ws = handshake_from(FLOODER, gw, "/flood")
        if ws is not None:
            flood_ok += 1
            ws.close()
        else:
            flood_429.append(resp)
        if attempts % 200 == 0:
            r, g = handshake_from(GOOD, gw, "/good")
            if g is not None and echo_ok(g, b"still served"):
                good_ok += 1
            else:
                good_bad.append((r.status, r.headers))
            if g is not None:
                g.close()
    elapsed = time.monotonic() - t0
    print(f"flood: {attempts} attempts in {elapsed:.2f}s, {flood_ok} upgraded, {len(flood_429)} refused; "
          f"good client: {good_ok} served, {len(good_bad)} refused")

    assert not good_bad, f"the good address was refused during the flood: {good_bad}"
    assert good_ok == 5, good_ok
    # GCRA: the burst, plus one per emission interval of the time that passed (+1 for edges)
    allowed = burst + math.ceil(elapsed * rate) + 1
    assert burst <= flood_ok <= allowed, f"flooder got {flood_ok} upgrades in {elapsed:.2f}s (at most {allowed})"
    assert len(flood_429) >= attempts - allowed, (attempts, flood_ok)
    assert all(r.status == 429 for r in flood_429), sorted({r.status for r in flood_429})
    waits = {retry_after(r) for r in flood_429}
    print(f"Retry-After values: {sorted(waits)}")
    assert waits and all(1 <= w <= math.ceil(burst / rate) + 1 for w in waits), \
        f"Retry-After values {sorted(waits)} for a {rate}/s limiter"

    after = refusals(gw.admin)
    counted = after.get("rate_limited", 0) - before.get("rate_limited", 0)
    assert counted == len(flood_429), f"rate_limited refusals {before} -> {after}, saw {len(flood_429)} 429s"

    # Once a rate window has passed (one emission interval, 1/rate s) the flooder
    # is served again: bounded retries, each after the window the limiter names.
    interval = 1.0 / rate
    deadline = time.monotonic() + 5 * burst / rate
    time.sleep(interval)  # a rate window must pass; its length comes from the configured rate
    while True:
        resp, ws = handshake_from(FLOODER, gw, "/again")
        if ws is not None:
            assert echo_ok(ws, b"recovered")
            ws.close()
            break
        assert resp.status == 429, resp.status
        assert time.monotonic() < deadline, "the flooder was never served again"
        time.sleep(interval)  # the next emission interval of the configured rate


# ------------------------------------------------------------ per-IP cap
def test_concurrent_cap_per_address(start_gateway, write_config, node_echo_server):
    cap = 3
    gw = limits_gateway(start_gateway, write_config, node_echo_server(), f"per_ip_max_connections = {cap}")
    before = refusals(gw.admin)
    held: list[RawWebSocket] = []
    try:
        for i in range(cap):
            resp, ws = handshake_from(FLOODER, gw, f"/f{i}")
            assert ws is not None, (i, resp.status, resp.body)
            held.append(ws)
        refused = []
        for i in range(5):
            resp, ws = handshake_from(FLOODER, gw, f"/over{i}")
            if ws is not None:
                held.append(ws)
            refused.append(resp)
            # the other address keeps being served, up to its own cap
            r, g = handshake_from(GOOD, gw, f"/good{i}")
            assert g is not None, f"good address refused while the flooder is capped: {r.status} {r.body!r}"
            assert echo_ok(g, b"served %d" % i)
            close_ws(g)
        assert len(held) == cap, f"{len(held)} WebSockets open from one address with a cap of {cap}"
        assert [r.status for r in refused] == [429] * 5, [r.status for r in refused]
        for r in refused:
            assert retry_after(r) >= 1, r.headers
        # the held ones still work
        for i, ws in enumerate(held):
            assert echo_ok(ws, b"held %d" % i)

        after = refusals(gw.admin)
        counted = after.get("per_ip_cap", 0) - before.get("per_ip_cap", 0)
        assert counted == 5, f"per_ip_cap refusals {before} -> {after}"

        # one closes: its slot comes back (bounded retries: the gateway frees it
        # once its close handshake is done)
        close_ws(held.pop())
        deadline = time.monotonic() + 10
        while True:
            resp, ws = handshake_from(FLOODER, gw, "/slot")
            if ws is not None:
                held.append(ws)
                break
            assert resp.status == 429 and time.monotonic() < deadline, resp.status
            time.sleep(0.05)  # polling for the freed slot, bounded by the deadline
        assert echo_ok(held[-1], b"slot reused")
    finally:
        for ws in held:
            ws.close()


# ------------------------------------------------------------- global cap
def test_global_cap_is_503(start_gateway, write_config, node_echo_server):
    cap = 4
    gw = limits_gateway(start_gateway, write_config, node_echo_server(), f"max_connections = {cap}")
    before = refusals(gw.admin)
    held = []
    try:
        for i in range(cap):
            resp, ws = handshake_from((FLOODER, GOOD)[i % 2], gw, f"/c{i}")
            assert ws is not None, (i, resp.status)
            held.append(ws)
        for src in (FLOODER, GOOD):
            resp, ws = handshake_from(src, gw, "/over")
            assert ws is None, f"{src} got a WebSocket past max_connections = {cap}"
            assert resp.status == 503, (resp.status, resp.body)
            retry_after(resp)
        after = refusals(gw.admin)
        assert after.get("global_cap", 0) - before.get("global_cap", 0) == 2, (before, after)
        for ws in held:
            assert echo_ok(ws, b"under the cap")
    finally:
        for ws in held:
            ws.close()


# ------------------------------------- admission per listener and per route
def test_admission_limits_per_listener_and_per_route(start_gateway, write_config, node_echo_server):
    """`[route.limits]` and `[listener.limits]` caps and per-client limits: each
    counts its own WebSockets; the most specific per-client limit wins; caps
    add up (503 `route_cap` / `listener_cap`)."""
    backend = node_echo_server()
    cfg = write_config(f"""
        [admin]
        address = "127.0.0.1:0"

        [[listener]]
        address = "127.0.0.1:0"

        [[listener]]
        address = "127.0.0.3:0"
        [listener.limits]
        max_connections = 2

        [limits]
        per_ip_max_connections = 3

        [[route]]
        name = "capped"
        path = "/capped"
        proxy = "{backend}"
        [route.limits]
        per_ip_max_connections = 1
        max_connections = 2

        [[route]]
        name = "slow"
        path = "/slow"
        proxy = "{backend}"
        [route.limits]
        per_ip_rate = "1/h burst 2"

        [[route]]
        name = "rest"
        path_prefix = "/"
        proxy = "{backend}"
    """)
    gw = start_gateway("serve", "--config", cfg, listeners=2, admin=True)
    by_host = {l.host: l for l in gw.listeners}
    main, small = by_host["127.0.0.1"], by_host["127.0.0.3"]
    before = refusals(gw.admin)
    held: list[RawWebSocket] = []

    def open_ok(src, listener, path):
        resp, ws = handshake_from(src, listener, path)
        assert ws is not None, (src, path, resp.status, resp.body)
        held.append(ws)
        assert echo_ok(ws, path.encode())

    def refused(src, listener, path, status):
        resp, ws = handshake_from(src, listener, path)
        if ws is not None:
            held.append(ws)
        assert ws is None and resp.status == status, (src, path, resp.status, resp.body)
        retry_after(resp)

    try:
        # /capped: one per address (the route's own cap, stricter than [limits])...
        open_ok(FLOODER, main, "/capped")
        refused(FLOODER, main, "/capped", 429)
        open_ok(GOOD, main, "/capped")
        # ...and two in all on the route.
        refused("127.0.0.4", main, "/capped", 503)
        # The route's WebSockets are not counted against [limits]' per-address
        # cap: the flooder still gets its 3 elsewhere, then 429.
        for i in range(3):
            open_ok(FLOODER, main, f"/rest{i}")
        refused(FLOODER, main, "/rest-over", 429)
        # /slow: the route's own rate (burst 2), then 429 with Retry-After.
        open_ok("127.0.0.5", main, "/slow")
        open_ok("127.0.0.5", main, "/slow")
        refused("127.0.0.5", main, "/slow", 429)
        open_ok("127.0.0.5", main, "/rest-after-slow")
        # The 127.0.0.3 listener lets two WebSockets in, whoever asks.
        open_ok("127.0.0.6", small, "/rest")
        open_ok("127.0.0.7", small, "/rest")
        refused("127.0.0.8", small, "/rest", 503)
        open_ok("127.0.0.8", main, "/rest")

        after = refusals(gw.admin)
        delta = {k: after.get(k, 0) - before.get(k, 0) for k in set(after) | set(before)}
        assert {k: v for k, v in delta.items() if v} == {
            "per_ip_cap": 2, "route_cap": 1, "rate_limited": 1, "listener_cap": 1,
        }, delta
        for ws in held:
            assert echo_ok(ws, b"all still open")
    finally:
        for ws in held:
            ws.close()


# -------------------------------------------------- injected close frames
def test_max_lifetime_closes_1008(start_gateway, write_config, node_echo_server):
    gw = limits_gateway(start_gateway, write_config, node_echo_server(), 'max_lifetime = "1s"')
    t0 = time.monotonic()
    resp, ws = handshake_from(GOOD, gw, "/life")
    assert ws is not None, resp.status
    try:
        assert echo_ok(ws, b"before the limit")
        frames, close = ws.recv_until_close(timeout=10)
        waited = time.monotonic() - t0
        assert close is not None, "dropped without a Close frame"
        assert close.close_code == 1008, (close.close_code, close.payload)
        assert 0.9 <= waited < 5, waited
    finally:
        ws.close()


def test_idle_timeout_closes_1008(start_gateway, write_config, node_echo_server):
    gw = limits_gateway(start_gateway, write_config, node_echo_server(), 'idle_timeout = "500ms"')
    busy = clients.connect(gw.url + "/busy")
    resp, idle = handshake_from(GOOD, gw, "/idle")
    assert idle is not None, resp.status
    try:
        t0 = time.monotonic()
        # the busy one keeps traffic moving well past the idle one's deadline
        while time.monotonic() - t0 < 1.5:
            busy.send("tick")
            assert busy.recv(timeout=5) == "tick"
            time.sleep(0.1)  # pacing the traffic, not synchronisation
        frames, close = idle.recv_until_close(timeout=10)
        waited = time.monotonic() - t0
        assert close is not None, "idle connection dropped without a Close frame"
        # A limit that strikes after the upgrade closes with 1008 (policy).
        assert close.close_code == 1008, (close.close_code, close.payload)
        assert waited < 5, waited
        busy.send("still open")
        assert busy.recv(timeout=5) == "still open"
    finally:
        idle.close()
        busy.close()


def test_backend_idle_timeout_closes_1008(start_gateway, write_config, node_echo_server):
    gw = limits_gateway(start_gateway, write_config, node_echo_server(), 'backend_idle_timeout = "500ms"')
    resp, ws = handshake_from(GOOD, gw, "/quiet-backend")
    assert ws is not None, resp.status
    try:
        assert echo_ok(ws, b"before the backend falls silent")
        t0 = time.monotonic()
        close = None
        # The client stays busy with unsolicited Pongs, which the backend
        # takes without a word: only the backend is idle.
        while close is None and time.monotonic() - t0 < 5:
            ws.send_frame(rawws.OP_PONG, b"still here")
            try:
                f = ws.recv_frame(timeout=0.1)
            except TimeoutError:
                continue
            assert f is not None, "dropped without a Close frame"
            if f.opcode == OP_CLOSE:
                close = f
        waited = time.monotonic() - t0
        assert close is not None, "no Close within 5 s"
        assert close.close_code == 1008, (close.close_code, close.payload)
        assert b"backend inactivity" in close.payload, close.payload
        assert 0.4 <= waited < 5, waited
    finally:
        ws.close()


def test_listener_limits_apply_on_their_listener_only(start_gateway, write_config, node_echo_server):
    backend = node_echo_server()
    cfg = write_config(f"""
        [[listener]]
        address = "127.0.0.1:0"

        [[listener]]
        address = "127.0.0.3:0"
        [listener.limits]
        idle_timeout = "500ms"

        [[route]]
        name = "echo"
        path_prefix = "/"
        proxy = "{backend}"
    """)
    gw = start_gateway("serve", "--config", cfg, listeners=2)
    by_host = {l.host: l for l in gw.listeners}
    plain_listener, strict_listener = by_host["127.0.0.1"], by_host["127.0.0.3"]
    resp, plain = handshake_from(GOOD, plain_listener, "/plain")
    assert plain is not None, resp.status
    resp, strict = handshake_from(GOOD, strict_listener, "/strict")
    assert strict is not None, resp.status
    try:
        assert echo_ok(plain, b"plain") and echo_ok(strict, b"strict")
        t0 = time.monotonic()
        _, close = strict.recv_until_close(timeout=10)
        waited = time.monotonic() - t0
        assert close is not None, "dropped without a Close frame"
        assert close.close_code == 1008, (close.close_code, close.payload)
        assert 0.4 <= waited < 5, waited
        # Idle just as long, on the listener without the limit: still open.
        assert echo_ok(plain, b"still open")
    finally:
        plain.close()
        strict.close()


def test_sigterm_closes_proxied_1001_and_exits_0(start_gateway, write_config, node_echo_server):
    gw = limits_gateway(start_gateway, write_config, node_echo_server(), "")
    raws = []
    for i in range(5):
        resp, ws = handshake_from(GOOD if i % 2 else FLOODER, gw, f"/s{i}")
        assert ws is not None, resp.status
        assert echo_ok(ws, b"up %d" % i)
        raws.append(ws)
    lib = clients.connect(gw.url + "/lib")
    lib.send("hello")
    assert lib.recv(timeout=10) == "hello"
    try:
        t_sig = time.monotonic()
        gw.proc.send_signal(signal.SIGTERM)
        codes = []
        for ws in raws:
            _, close = ws.recv_until_close(timeout=15)
            codes.append(close.close_code if close is not None else None)
            if close is not None:
                # answer, and close the socket once the gateway has ended its side
                ws.send_frame(OP_CLOSE, close.payload[:2])
                assert ws.recv_frame(timeout=10) is None
                ws.close()
        _, lib_code = clients.recv_until_close(lib, timeout=15)
        assert codes == [1001] * 5, codes
        assert lib_code == 1001, lib_code
        assert gw.proc.wait(timeout=20) == 0, gw.proc.describe()
        print(f"SIGTERM -> exit in {time.monotonic() - t_sig:.2f}s")
    finally:
        for ws in raws:
            ws.close()
        lib.close()
