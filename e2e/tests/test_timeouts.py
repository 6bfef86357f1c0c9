"""Idle timeout and keepalive pings with a pong deadline."""

from __future__ import annotations

import time

from wsgate_e2e import clients
from wsgate_e2e.rawws import OP_PING, OP_PONG, RawWebSocket


def gateway_with(start_gateway, write_config, limits: str):
    cfg = write_config(f"""
        [[listener]]
        address = "127.0.0.1:0"

        [limits]
        {limits}

        [[route]]
        to = "echo:"
    """)
    return start_gateway("serve", "--config", cfg, listeners=1)


def test_idle_connection_is_closed(start_gateway, write_config):
    gw = gateway_with(start_gateway, write_config, 'idle_timeout = "1s"')
    with clients.connect(gw.url) as busy, clients.connect(gw.url) as idle:
        t0 = time.monotonic()
        # The busy one keeps traffic moving past the idle one's deadline.
        while time.monotonic() - t0 < 2.5:
            busy.send(b"tick")
            assert busy.recv(timeout=5) == b"tick"
            time.sleep(0.2)  # pacing the traffic, not synchronisation
        _, code = clients.recv_until_close(idle, timeout=10)
        waited = time.monotonic() - t0
        assert code is not None, "idle connection dropped without a Close frame"
        assert code in (1000, 1001), code
        assert waited < 8, waited
        busy.send(b"still open")
        assert busy.recv(timeout=5) == b"still open"


def test_unanswered_pings_drop_the_connection(start_gateway, write_config):
    gw = gateway_with(start_gateway, write_config, 'ping_interval = "300ms"\n        pong_timeout = "1s"')
    raw = RawWebSocket.open(gw.host, gw.port)
    try:
        t0 = time.monotonic()
        frames, close = raw.recv_until_close(timeout=15)  # never answers a ping
        waited = time.monotonic() - t0
    finally:
        raw.close()
    assert any(f.opcode == OP_PING for f in frames), [f.opcode for f in frames]
    assert waited < 8, f"connection kept {waited:.1f}s without pongs (interval 300ms, deadline 1s)"


def test_answered_pings_keep_the_connection(start_gateway, write_config):
    gw = gateway_with(start_gateway, write_config, 'ping_interval = "300ms"\n        pong_timeout = "1s"')
    raw = RawWebSocket.open(gw.host, gw.port)
    try:
        pings = 0
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            try:
                f = raw.recv_frame(timeout=max(0.05, deadline - time.monotonic()))
            except TimeoutError:
                break
            assert f is not None, "dropped although every ping was answered"
            assert f.opcode == OP_PING, f
            pings += 1
            raw.send_frame(OP_PONG, f.payload)
        assert pings >= 3, pings
        raw.send_frame(0x2, b"alive")
        f = raw.recv_frame(timeout=5)
        while f is not None and f.opcode == OP_PING:
            raw.send_frame(OP_PONG, f.payload)
            f = raw.recv_frame(timeout=5)
        assert f is not None and f.payload == b"alive", f
    finally:
        raw.close()
