"""Python `websockets` (sync API) client helpers. Sending runs in its own thread
while the caller's thread receives, so big transfers cannot deadlock on
backpressure; every receive has a deadline."""

from __future__ import annotations

import hashlib
import os
import threading
import time

from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as _connect


def connect(url: str, protocols=None, timeout: float = 10.0, **kw):
    return _connect(url, subprotocols=protocols, compression=None, proxy=None, max_size=None,
                    open_timeout=timeout, close_timeout=timeout, ping_interval=None, legacy=True, **kw)


def as_bytes(m) -> bytes:
    return m.encode() if isinstance(m, str) else bytes(m)


def payloads(sizes, seed: int = 1) -> list[bytes]:
    import random

    rnd = random.Random(seed)
    return [rnd.randbytes(n) for n in sizes]


class Sender(threading.Thread):
    def __init__(self, ws, messages, text: bool = False):
        super().__init__(daemon=True)
        self.ws, self.messages, self.text = ws, messages, text
        self.error: BaseException | None = None

    def run(self):
        try:
            for m in self.messages:
                self.ws.send(m, text=self.text or None)
        except BaseException as e:  # noqa: BLE001 - reported to the test
            self.error = e


def recv_bytes(ws, total: int, timeout: float) -> tuple[bytes, int]:
    """Receive messages until `total` bytes arrived; returns (bytes, message count)."""
    deadline = time.monotonic() + timeout
    got = bytearray()
    n = 0
    while len(got) < total:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"received {len(got)} of {total} bytes in {n} messages within {timeout}s")
        got += as_bytes(ws.recv(timeout=left))
        n += 1
    return bytes(got), n


def recv_messages(ws, count: int, timeout: float) -> list:
    deadline = time.monotonic() + timeout
    out = []
    while len(out) < count:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"received {len(out)} of {count} messages within {timeout}s")
        out.append(ws.recv(timeout=left))
    return out


def recv_until_close(ws, timeout: float) -> tuple[list, int | None]:
    """All messages until the connection closes; returns (messages, close code received)."""
    deadline = time.monotonic() + timeout
    out = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no close within {timeout}s after {len(out)} messages")
        try:
            out.append(ws.recv(timeout=left))
        except ConnectionClosed:
            rcvd = ws.protocol.close_rcvd
            return out, (rcvd.code if rcvd is not None else None)


def sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def rand(n: int) -> bytes:
    return os.urandom(n)
