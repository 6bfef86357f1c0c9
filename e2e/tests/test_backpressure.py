"""Backpressure end to end: a client that stops reading stops the peer reads
for that connection only (and the reverse), the gateway's memory stays flat,
and once the slow side reads again every byte arrives."""

from __future__ import annotations

import hashlib
import socket
import threading
import time

from wsgate_e2e import clients, rawws
from wsgate_e2e.rawws import OP_BINARY, OP_CLOSE, RawWebSocket

MiB = 1 << 20
LIMIT = 96 * MiB
# Kernel socket buffers on loopback can hold several MiB each way; a gateway that
# buffers without bound would take in nearly all of LIMIT.
MAX_IN_FLIGHT = 40 * MiB
MAX_RSS_GROWTH = 32 * MiB


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def wait_plateau(read, settle: float = 1.0, timeout: float = 30.0) -> int:
    """Poll `read()` until it has not changed for `settle` seconds (bounded)."""
    deadline = time.monotonic() + timeout
    last, since = read(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)  # polling a counter, bounded by the deadline
        v = read()
        if v != last:
            last, since = v, time.monotonic()
        elif time.monotonic() - since >= settle:
            return v
    raise AssertionError(f"still moving after {timeout}s (at {last})")


def config(write_config, peer_spec):
    return write_config(f"""
        [[listener]]
        address = "127.0.0.1:0"

        [[route]]
        path = "/slow"
        to = "{peer_spec}"
        framing = "binary"

        [[route]]
        path = "/echo"
        to = "echo:"
    """)


def test_client_that_stops_reading_stops_the_peer(start_gateway, write_config, peer):
    flood = peer("tcp-flood", limit=LIMIT)
    gw = start_gateway("serve", "--config", config(write_config, flood.spec), listeners=1)
    base = rss(gw.proc.pid)
    slow = RawWebSocket.open(gw.host, gw.port, "/slow")
    slow.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)
    try:
        sent = wait_plateau(lambda: flood.sent)
        grown = rss(gw.proc.pid) - base
        print(f"in flight at plateau: {sent / MiB:.1f} MiB, gateway RSS growth {grown / MiB:.1f} MiB")
        assert sent < MAX_IN_FLIGHT, f"the peer could write {sent / MiB:.1f} MiB to a client that reads nothing"
        assert grown < MAX_RSS_GROWTH, f"gateway RSS grew {grown / MiB:.1f} MiB for one stalled client"
        # Another client of the same gateway is not held up.
        with clients.connect(gw.ws("/echo")) as ws:
            for i in range(20):
                ws.send(b"x" * 1000 * i)
                assert ws.recv(timeout=5) == b"x" * 1000 * i
        # The stalled client reads again: everything arrives, then 1000.
        h, total = hashlib.sha256(), 0
        deadline = time.monotonic() + 60
        while True:
            f = slow.recv_frame(timeout=max(0.1, deadline - time.monotonic()))
            assert f is not None, f"dropped after {total} bytes"
            if f.opcode == OP_CLOSE:
                break
            h.update(f.payload)
            total += len(f.payload)
        assert total == LIMIT, f"{total} of {LIMIT} bytes"
        assert h.hexdigest() == flood.sha256
        assert f.close_code == 1000, f.close_code
    finally:
        slow.close()


def test_peer_that_stops_reading_stops_the_client(start_gateway, write_config, peer):
    stall = peer("tcp-stall")
    gw = start_gateway("serve", "--config", config(write_config, stall.spec), listeners=1)
    base = rss(gw.proc.pid)
    ws = RawWebSocket.open(gw.host, gw.port, "/slow")
    ws.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 256 * 1024)
    progress = {"sent": 0, "error": None}
    h = hashlib.sha256()
    chunk = bytes(range(256)) * 256  # 64 KiB

    def send_all():
        try:
            while progress["sent"] < LIMIT:
                ws.send_frame(OP_BINARY, chunk)
                h.update(chunk)
                progress["sent"] += len(chunk)
            ws.send_frame(OP_CLOSE, rawws.close_payload(1000))
        except OSError as e:
            progress["error"] = e

    t = threading.Thread(target=send_all, daemon=True)
    t.start()
    try:
        sent = wait_plateau(lambda: progress["sent"])
        grown = rss(gw.proc.pid) - base
        print(f"in flight at plateau: {sent / MiB:.1f} MiB, gateway RSS growth {grown / MiB:.1f} MiB")
        assert progress["error"] is None, progress
        assert sent < MAX_IN_FLIGHT, f"the client could send {sent / MiB:.1f} MiB to a peer that reads nothing"
        assert grown < MAX_RSS_GROWTH, f"gateway RSS grew {grown / MiB:.1f} MiB for one stalled peer"
        with clients.connect(gw.ws("/echo")) as other:
            other.send(b"unaffected")
            assert other.recv(timeout=5) == b"unaffected"
        stall.resume.set()
        t.join(60)
        assert not t.is_alive() and progress["error"] is None, progress
        assert stall.done.wait(60), f"peer saw no EOF after {stall.received} bytes"
        assert stall.received == LIMIT, f"peer received {stall.received} of {LIMIT}"
        assert stall.sha256 == h.hexdigest()
        _, close = ws.recv_until_close(timeout=20)
        assert close is not None and close.close_code == 1000, close
    finally:
        stall.resume.set()
        ws.close()
