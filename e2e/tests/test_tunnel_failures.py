"""Reverse tunnel, failures: bad token (401), an id owned by another token
(403), replicas under one id (least loaded first; killing one fails only its
own streams), an agent killed mid-transfer (a relayed request, a TCP forward,
a bridged WebSocket: each fails visibly within 2 s), keepalive both ways (an
agent or a gateway frozen with SIGSTOP is detected within two ping
intervals), an agent and a gateway restarted, SIGTERM to an agent (GOAWAY,
open streams finish, exit 0).

Timing bounds are asserted on measured durations; every wait polls with a
deadline."""

from __future__ import annotations

import http.client
import re
import signal
import socket
import subprocess
import threading
import time

import pytest

from wsgate_e2e import clients, rawws
from wsgate_e2e.tunnel import poll, wait_exit

pytestmark = pytest.mark.tunnel


class Held:
    """A TCP connection through a forward to an echo, kept open; alive()
    echoes one byte."""

    def __init__(self, addr):
        self.s = socket.create_connection(addr, timeout=10)
        assert self.alive(), "the first echo failed"

    def alive(self, timeout: float = 5.0) -> bool:
        try:
            self.s.settimeout(timeout)
            self.s.sendall(b"?")
            return self.s.recv(1) == b"?"
        except OSError:
            return False

    def wait_closed(self, timeout: float) -> float:
        """Seconds until the connection ended (EOF or reset)."""
        t0 = time.monotonic()
        self.s.settimeout(timeout)
        try:
            while self.s.recv(65536):
                pass
        except (ConnectionResetError, BrokenPipeError):
            pass
        except socket.timeout:
            raise AssertionError(f"still open after {timeout}s")
        return time.monotonic() - t0

    def close(self):
        self.s.close()


def http_get(gw, url: str, timeout: float = 10.0) -> tuple[int, bytes]:
    c = http.client.HTTPConnection(gw.host, gw.port, timeout=timeout)
    try:
        c.request("GET", "/request", headers={"X-PROXY-DESTINATION": url})
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


# ------------------------------------------------------------ registration
def test_bad_or_missing_token_is_401(tunnel):
    gw = tunnel.gateway()
    a = tunnel.agent(gw, "site-a", token="not-a-listed-token", wait=False)
    assert wait_exit(a.proc, 15) == 1
    assert re.search(r"registration refused: 401", a.proc.stderr_text()), a.proc.stderr_text()
    r = rawws.raw_exchange(gw.host, gw.port, rawws.ws_request("/agent", protocols=["wsgate-agent.v1"],
                                                              extra={"Wsgate-Agent-Id": "site-a"}))
    assert r.status == 401 and "Bearer" in (r.header("www-authenticate") or ""), (r.status, r.headers)
    assert gw.metric("wsgate_handshake_refusals_total", reason="unauthenticated") == 2
    assert gw.connections("site-a") == 0


def test_an_id_owned_by_another_token_is_403(tunnel):
    gw = tunnel.gateway()
    a = tunnel.agent(gw, "site-a", token=tunnel.tokens["site-b"], wait=False)
    assert wait_exit(a.proc, 15) == 1
    assert "registration refused: 403" in a.proc.stderr_text(), a.proc.stderr_text()
    # An id no token owns is refused the same way.
    z = tunnel.agent(gw, "site-z", token=tunnel.tokens["site-a"], wait=False)
    assert wait_exit(z.proc, 15) == 1 and "403" in z.proc.stderr_text()
    assert gw.metric("wsgate_handshake_refusals_total", reason="forbidden") == 2
    # The rightful owner registers.
    tunnel.agent(gw, "site-a")


# ------------------------------------------------------------ replicas
def test_replicas_least_loaded_and_killing_one_fails_only_its_streams(tunnel, internal, owners):
    echo = internal.echo()
    web = internal.http()
    gw = tunnel.gateway("--forward", f"127.0.0.1:0=agent://site-a/tcp://{echo.addr}")
    r1 = tunnel.agent(gw, "site-a", name="agent-r1")
    r2 = tunnel.agent(gw, "site-a", name="agent-r2")
    gw.wait_connections("site-a", 2)
    held = [Held(gw.forward()) for _ in range(6)]
    # Least loaded first: 3 streams on each replica.
    links = gw.agents()["site-a"]["links"]
    assert sorted(l["open_streams"] for l in links) == [3, 3], links
    on = owners.of("internal-echo")
    assert sorted(on) == ["agent-r1"] * 3 + ["agent-r2"] * 3, on

    # Requests run back to back while r1 is killed.
    results: list[tuple[float, int]] = []
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            t = time.monotonic()
            try:
                status, body = http_get(gw, web.url("/hello"))
                ok = status == 200 and body == b"hello from internal-http"
                results.append((t, 200 if ok else status))
            except (OSError, http.client.HTTPException):
                # A request riding on r1 when it died: its answer is cut.
                results.append((t, -1))

    th = threading.Thread(target=loop, daemon=True)
    th.start()
    poll("requests flowing", lambda: len(results) >= 10, 20)
    killed_at = time.monotonic()
    r1.proc.send_signal(signal.SIGKILL)
    # r1's streams fail promptly; r2's go on.
    for h, who in zip(held, on):
        if who == "agent-r1":
            assert h.wait_closed(2.0) < 2.0
        else:
            assert h.alive(), "a stream of the surviving replica failed"
    poll("requests after the kill", lambda: sum(1 for t, _ in results if t > killed_at) >= 50, 30)
    stop.set()
    th.join(15)
    after = [s for t, s in results if t > killed_at]
    assert after and all(s == 200 for s in after), f"{sum(s != 200 for s in after)} of {len(after)} failed after the kill"
    gw.wait_connections("site-a", 1)
    for h in held:
        h.close()


# ------------------------------------------------------------ killed mid-transfer
def test_agent_killed_mid_request_truncates_the_answer(tunnel, internal, tmp_path):
    web = internal.http()
    gw = tunnel.gateway()
    a = tunnel.agent(gw, "site-a")
    out = tmp_path / "trickle.out"
    p = subprocess.Popen(["curl", "-sS", "--max-time", "60", "-o", str(out), "-H",
                          f"X-PROXY-DESTINATION: {web.url('/trickle')}", f"{gw.http}/request"],
                         stderr=subprocess.PIPE)
    try:
        poll("the answer streaming", lambda: out.exists() and out.stat().st_size > 20_000, 20)
        t0 = time.monotonic()
        a.proc.send_signal(signal.SIGKILL)
        rc = p.wait(timeout=10)
        took = time.monotonic() - t0
    finally:
        if p.poll() is None:
            p.kill()
    err = p.stderr.read().decode(errors="replace")
    # curl 18: "transfer closed with outstanding read data remaining" (the
    # chunked body never ended); 56: the connection was reset.
    assert rc in (18, 56), (rc, err)
    assert took < 2.0, f"curl noticed after {took:.2f}s"


def test_agent_killed_mid_transfer_closes_the_forward(tunnel, internal):
    big = internal.blaster(256 << 20)
    gw = tunnel.gateway("--forward", f"127.0.0.1:0=agent://site-a/tcp://{big.addr}")
    a = tunnel.agent(gw, "site-a")
    s = socket.create_connection(gw.forward(), timeout=10)
    got = 0
    try:
        while got < 20_000_000:
            d = s.recv(1 << 20)
            assert d, "EOF before the kill"
            got += len(d)
        a.proc.send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        s.settimeout(5)
        reset = False
        try:
            while d := s.recv(1 << 20):
                got += len(d)
        except ConnectionResetError:
            reset = True
        took = time.monotonic() - t0
    finally:
        s.close()
    assert got < (256 << 20)
    assert took < 2.0, f"the forward closed {took:.2f}s after the kill"
    assert reset, "a failed stream must reset the client's connection, not end it cleanly"


def test_agent_killed_closes_a_bridged_websocket_with_1011(tunnel, internal):
    echo = internal.echo()
    gw = tunnel.gateway("--to", f"agent://site-a/tcp://{echo.addr}", "--framing", "binary")
    a = tunnel.agent(gw, "site-a")
    from websockets.exceptions import ConnectionClosed

    with clients.connect(gw.url + "/") as ws:
        ws.send(b"before")
        assert clients.as_bytes(ws.recv(timeout=10)) == b"before"
        a.proc.send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(ConnectionClosed) as e:
            ws.recv(timeout=10)
        took = time.monotonic() - t0
    code = e.value.rcvd.code if e.value.rcvd else None
    assert code in (1011, 1014), e.value
    assert took < 2.0, f"closed {took:.2f}s after the kill"


# ------------------------------------------------------------ keepalive
KEEPALIVE = 2.0  # seconds: both ends declare a silent link dead within 2 x this


def test_a_frozen_agent_is_detected_within_two_intervals_and_comes_back(tunnel, internal):
    echo = internal.echo()
    gw = tunnel.gateway("--keepalive", f"{KEEPALIVE:g}s", "--forward", f"127.0.0.1:0=agent://site-a/tcp://{echo.addr}")
    a = tunnel.agent(gw, "site-a", extra=["--keepalive", f"{KEEPALIVE:g}s"])
    h = Held(gw.forward())
    a.proc.send_signal(signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        took = h.wait_closed(4 * KEEPALIVE)
        poll("the gateway dropping the frozen agent", lambda: gw.connections("site-a") == 0, 2 * KEEPALIVE)
        gone = time.monotonic() - t0
    finally:
        a.proc.send_signal(signal.SIGCONT)
    print(f"frozen agent: its stream failed after {took:.2f}s, the link dropped after {gone:.2f}s "
          f"(keepalive {KEEPALIVE}s)")
    assert took <= 2 * KEEPALIVE + 0.5 and gone <= 2 * KEEPALIVE + 0.5, (took, gone)
    poll("the gateway's log", lambda: "dead (keepalive)" in gw.proc.stderr_text(), 5)
    # Thawed, the agent finds its link gone and registers again.
    t1 = time.monotonic()
    gw.wait_connections("site-a", 1, timeout=10)
    print(f"the agent was back {time.monotonic() - t1:.2f}s after SIGCONT")
    h2 = Held(gw.forward())
    h2.close()


def test_a_frozen_gateway_is_detected_by_the_agent_within_two_intervals(tunnel, internal):
    echo = internal.echo()
    gw = tunnel.gateway("--keepalive", "30s", "--forward", f"127.0.0.1:0=agent://site-a/tcp://{echo.addr}")
    a = tunnel.agent(gw, "site-a", extra=["--keepalive", f"{KEEPALIVE:g}s"])
    h = Held(gw.forward())
    assert echo.closed == 0
    old = gw.agents()["site-a"]["remote_addresses"]
    gw.proc.send_signal(signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        poll("the agent declaring the link dead", lambda: "connection 1/1 lost" in a.proc.stderr_text(),
             2 * KEEPALIVE + 1)
        lost = time.monotonic() - t0
        # Its stream failed: the agent closed its connection to the echo.
        poll("the agent's stream to the echo ending", lambda: echo.closed == 1, 2)
    finally:
        gw.proc.send_signal(signal.SIGCONT)
    print(f"frozen gateway: the agent dropped the link after {lost:.2f}s (keepalive {KEEPALIVE}s)")
    assert lost <= 2 * KEEPALIVE + 0.5, lost
    assert re.search(r"connection 1/1 lost: .*(keepalive|ping|pong|silent|dead)", a.proc.stderr_text(), re.I), \
        a.proc.stderr_text()
    # Thawed, the gateway reads the old link's GOAWAY and takes the new one.
    poll("the agent registered again on a new link",
         lambda: (lambda a: a and a["connections"] == 1 and a["remote_addresses"] != old)(gw.agents().get("site-a")),
         20)
    h.close()
    Held(gw.forward()).close()


# ------------------------------------------------------------ restarts
def test_a_restarted_agent_serves_again(tunnel, internal):
    web = internal.http()
    gw = tunnel.gateway()
    a = tunnel.agent(gw, "site-a")
    assert http_get(gw, web.url("/hello"))[0] == 200
    a.proc.send_signal(signal.SIGKILL)
    poll("503 without the agent", lambda: http_get(gw, web.url("/hello"))[0] == 503, 5)
    # A request can find the link dead before the registry has dropped it;
    # the new agent's link is counted from an empty listing.
    gw.wait_connections("site-a", 0)
    tunnel.agent(gw, "site-a")
    assert http_get(gw, web.url("/hello")) == (200, b"hello from internal-http")


def test_a_restarted_gateway_has_its_agents_back_within_seconds(tunnel, internal):
    web = internal.http()
    gw = tunnel.gateway()
    a = tunnel.agent(gw, "site-a", pool=2)
    gw.wait_connections("site-a", 2)
    port = gw.port
    assert gw.proc.stop(signal.SIGTERM, timeout=15) == 0
    gw2 = tunnel.gateway(listen=f"127.0.0.1:{port}")
    t0 = time.monotonic()
    gw2.wait_connections("site-a", 2, timeout=15)
    back = time.monotonic() - t0
    print(f"both pooled connections back {back:.2f}s after the new gateway listened")
    assert back < 5.0, back
    assert http_get(gw2, web.url("/hello")) == (200, b"hello from internal-http")
    assert a.proc.popen.poll() is None


# ------------------------------------------------------------ SIGTERM
def test_sigterm_sends_goaway_lets_open_streams_finish_and_exits_0(tunnel, internal):
    echo = internal.echo()
    web = internal.http()
    gw = tunnel.gateway("--forward", f"127.0.0.1:0=agent://site-a/tcp://{echo.addr}")
    a = tunnel.agent(gw, "site-a", extra=["--drain", "20s"])
    h = Held(gw.forward())
    a.proc.send_signal(signal.SIGTERM)
    poll("the agent's GOAWAY", lambda: "shutting down: GOAWAY sent" in a.proc.stderr_text(), 5)
    # New streams are not opened on it...
    assert http_get(gw, web.url("/hello"))[0] == 503
    late = socket.create_connection(gw.forward(), timeout=5)
    late.settimeout(5)
    try:
        assert late.recv(1) == b""
    except ConnectionResetError:
        pass
    late.close()
    # ...the open one goes on, and ends cleanly.
    for _ in range(5):
        assert h.alive(), "the open stream failed during the drain"
    assert a.proc.popen.poll() is None
    h.s.shutdown(socket.SHUT_WR)
    assert h.wait_closed(5) < 5
    h.close()
    t0 = time.monotonic()
    assert wait_exit(a.proc, 10) == 0
    assert time.monotonic() - t0 < 5


# ------------------------------------------------------------ stalled consumer
FAST_STREAMS = 999
FAST_BYTES = 256 * 1024
STALL_BYTES = 64 << 20


def _raise_nofile(need: int):
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.fail(f"open-files limit {hard} is below the {need} this test needs")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def _drain_all(addr, n: int, size: int, timeout: float, gate=None) -> tuple[float, list[str]]:
    """Opens n connections to addr at once, calls gate() (which waits until
    they are all open), then reads each to EOF with one selector; returns
    (seconds from the first read, problems)."""
    import hashlib
    import selectors

    from wsgate_e2e.tunnel import pattern

    want = hashlib.sha256(pattern(size)).hexdigest()
    sel = selectors.DefaultSelector()
    conns = {}
    errs: dict = {}
    for i in range(n):
        s = socket.socket()
        s.setblocking(False)
        e = s.connect_ex(addr)
        errs[e] = errs.get(e, 0) + 1
        sel.register(s, selectors.EVENT_READ, i)
        conns[i] = (s, hashlib.sha256(), [0])
    if gate:
        try:
            gate()
        except AssertionError as e:
            states: dict = {}
            for s, _, _ in conns.values():
                try:
                    s.getpeername()
                    k = "connected"
                except OSError as x:
                    k = repr(x)
                k += f" so_error={s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)}"
                states[k] = states.get(k, 0) + 1
            raise AssertionError(f"{e}; connect_ex: {errs}; sockets: {states}")
    t0 = time.monotonic()
    problems, left = [], n
    deadline = t0 + timeout
    while left:
        if time.monotonic() > deadline:
            problems.append(f"{left} of {n} streams not finished after {timeout}s")
            break
        for key, _ in sel.select(timeout=1):
            s, h, got = conns[key.data]
            try:
                d = s.recv(262144)
            except BlockingIOError:
                continue
            except OSError as e:
                d, problems = b"", problems + [f"stream {key.data}: {e!r}"]
            if d:
                h.update(d)
                got[0] += len(d)
                continue
            sel.unregister(s)
            s.close()
            left -= 1
            if got[0] != size or h.hexdigest() != want:
                problems.append(f"stream {key.data}: {got[0]} bytes")
    for s, _, _ in conns.values():
        try:
            s.close()
        except OSError:
            pass
    return time.monotonic() - t0, problems


def test_a_stalled_consumer_slows_only_its_own_stream(tunnel, internal):
    """1,000 streams at once on ONE agent WebSocket (--pool 1): 999 read
    their 256 KiB at full speed while one consumer has stopped reading a
    64 MiB answer; the others finish as fast as without it.

    The bound: at the gateway a stream holds at most its wsmux receive
    window (256 KiB; it grows, up to 16 MiB, only while its consumer keeps
    up) plus one 64 KiB read waiting in the splice while the client's socket
    is full; the windows of one agent WebSocket add up to 1 GiB at most
    (`max_session_memory`). A stalled stream therefore holds <= 320 KiB at
    the gateway, and its source is held back by that window plus the
    kernels' socket buffers along the way (asserted: < 16 MiB of the 64
    MiB). Asserted here: RSS growth < 1,000 x 256 KiB + 64 MiB at the peak,
    < 64 MiB left after the 999 finished; measured on 2 cores: +25 MiB."""
    _raise_nofile(8192)
    fast = internal.blaster(FAST_BYTES, "internal-fast", record=False)
    slow = internal.blaster(STALL_BYTES, "internal-slow", record=False)
    gw = tunnel.gateway("--forward", f"127.0.0.1:0=agent://site-a/tcp://{fast.addr}",
                        "--forward", f"127.0.0.1:0=agent://site-a/tcp://{slow.addr}")
    tunnel.agent(gw, "site-a", pool=1)
    gw.wait_connections("site-a", 1)

    def all_open(n):
        seen = []

        def check():
            seen.append(gw.agents()["site-a"]["open_streams"])
            # The gate's own observation counts towards the peak: the
            # sampler's 50 ms period can miss a short-lived maximum.
            open_peak[0] = max(open_peak[0], seen[-1])
            return seen[-1] >= n

        def gate():
            try:
                poll(f"{n} streams open on the agent's WebSocket", check, 60)
            except AssertionError as e:
                raise AssertionError(f"{e}; open streams seen: {seen[::max(1, len(seen) // 20)]}")
        return gate

    fresh = gw.rss_kib()
    peak = [fresh]
    stop = threading.Event()
    open_peak = [0]

    def sample():
        while not stop.wait(0.05):
            try:
                peak[0] = max(peak[0], gw.rss_kib())
                open_peak[0] = max(open_peak[0], gw.agents()["site-a"]["open_streams"])
            except (OSError, KeyError):
                pass

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    # Reference: the 999 without a stalled consumer.
    base_s, problems = _drain_all(gw.forward(0), FAST_STREAMS, FAST_BYTES, 120, all_open(FAST_STREAMS))
    assert not problems, problems[:10]
    peak_alone = peak[0]

    # The stalled consumer: connected, reads nothing.
    stalled = socket.create_connection(gw.forward(1), timeout=10)
    poll("the slow source to start", lambda: slow.sent and slow.sent[0] > 0, 10)

    def settled():
        a = slow.sent[0]
        time.sleep(0.5)  # observing that the source stopped, bounded by poll()
        return slow.sent[0] == a

    poll("the stalled stream's source to be held back", settled, 20)
    held_back = slow.sent[0]
    rss0 = gw.rss_kib()
    peak[0] = rss0
    # All 1,000 open at once on the one WebSocket, then the 999 read.
    stall_s, problems = _drain_all(gw.forward(0), FAST_STREAMS, FAST_BYTES, 120, all_open(FAST_STREAMS + 1))
    stop.set()
    sampler.join(5)
    assert not problems, problems[:10]
    after = gw.rss_kib()
    links = gw.agents()["site-a"]["links"]
    print(f"999 x 256 KiB: {base_s:.2f}s alone, {stall_s:.2f}s beside a stalled consumer; "
          f"up to {open_peak[0]} streams open at once on {len(links)} agent WebSocket; "
          f"stalled source held back at {held_back / 2**20:.1f} MiB of {STALL_BYTES >> 20} MiB; "
          f"gateway RSS {fresh} KiB fresh, peak +{peak_alone - fresh} KiB with 999 streams alone; "
          f"with the stalled one: {rss0} KiB before, peak +{peak[0] - rss0} KiB, after +{after - rss0} KiB")
    assert len(links) == 1
    assert open_peak[0] >= FAST_STREAMS + 1, f"at most {open_peak[0]} streams were open at once"
    # The stalled stream did not pull its source: 64 MiB were to be sent.
    assert held_back < 16 << 20, held_back
    assert slow.sent[0] == held_back, "the stalled source moved while nobody read"
    # The others: as fast as without a stalled consumer (noise allowed).
    assert stall_s <= 1.5 * base_s + 1.0, (base_s, stall_s)
    # Memory: bounded by the windows of the streams open at once (256 KiB
    # each to start) and does not keep what the stalled stream could not pass.
    assert max(peak[0], peak_alone) - fresh < (FAST_STREAMS + 1) * 256 + 64 * 1024, (fresh, peak_alone, peak[0])
    assert after - rss0 < 64 * 1024, after - rss0
    # Resumed, the stalled stream delivers all of its 64 MiB, intact.
    import hashlib

    from wsgate_e2e.tunnel import pattern

    h, got = hashlib.sha256(), 0
    stalled.settimeout(30)
    while d := stalled.recv(1 << 20):
        h.update(d)
        got += len(d)
    stalled.close()
    assert got == STALL_BYTES and h.hexdigest() == hashlib.sha256(pattern(STALL_BYTES)).hexdigest(), got
