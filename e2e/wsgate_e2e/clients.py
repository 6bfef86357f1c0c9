"""Python `websockets` client helpers; every receive has a deadline.

Mostly the sync API. Caveat: a sync connection holds its lock while a send is
blocked on a full socket, and its reader thread needs that lock too, so a big
send while the echo is still coming back can deadlock *in the client*
(seen with 8 MiB messages through a Unix echo peer). Transfers where the peer
answers while the client is still sending go through echo_stream(), which uses
the asyncio API (reads continue while a send waits for the socket).

Over TLS the sync client is not used at all: its reader thread and a send on
the caller's thread drive one OpenSSL connection at the same time, which
Python's ssl module (3.11 here) does not serialise. When the server's TLS 1.3
session tickets arrive as the client sends its upgrade request, the request
can be lost and the handshake times out on the client's side.
`e2e/tools/tls_client_race.py -n 2000` measures it (open, echo "x", close;
websockets 17.4, 2-core VM, 2026-12-04): the sync client lost 2 of 2,000
against wsgate, 10 of 2,000 against Python's own asyncio TLS server and 0 of
2,000 against that server with its tickets off; the asyncio client lost 0 of
2,000 against wsgate. So wss:// tests go through echo_tls(), which uses the
asyncio API, and connect() refuses wss:// URLs."""

from __future__ import annotations

import hashlib
import os
import threading
import time

from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as _connect


def connect(url: str, protocols=None, timeout: float = 10.0, **kw):
    if url.startswith("wss://"):
        raise ValueError("the sync client loses handshakes over TLS: use echo_tls() (see the module doc)")
    return _connect(url, subprotocols=protocols, compression=None, proxy=None, max_size=None,
                    open_timeout=timeout, close_timeout=timeout, ping_interval=None, legacy=True, **kw)


def echo_tls(url: str, ssl, messages: list, protocols=None, timeout: float = 20.0):
    """Over wss:// with the asyncio API (see the module doc): opens with the
    given SSL context, sends each message and reads one reply after each.
    Returns (negotiated subprotocol, replies); closes with 1000."""
    import asyncio

    async def main():
        async with _aconnect(url, protocols, timeout, ssl=ssl) as ws:
            replies = []
            for m in messages:
                await ws.send(m)
                replies.append(await asyncio.wait_for(ws.recv(), timeout))
            return ws.subprotocol, replies

    return asyncio.run(main())


def _aconnect(url: str, protocols, timeout: float, **kw):
    """The asyncio client with the same settings as connect()."""
    from websockets.asyncio.client import connect as aconnect

    return aconnect(url, subprotocols=protocols, compression=None, proxy=None, max_size=None,
                    open_timeout=timeout, close_timeout=timeout, ping_interval=None, **kw)


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
        try:
            got += as_bytes(ws.recv(timeout=left))
        except TimeoutError:
            raise TimeoutError(f"received {len(got)} of {total} bytes in {n} messages within {timeout}s") from None
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


def echo_stream(url: str, sent: list, timeout: float, protocols=None, text: bool = False) -> tuple[bytes, int]:
    """Send `sent` while concurrently receiving until as many bytes came back
    (asyncio API, see the module doc). Returns (bytes received, message count);
    closes with 1000. Raises TimeoutError (with progress) after `timeout`."""
    import asyncio

    total = sum(len(m) for m in sent)
    progress = {"bytes": 0, "messages": 0, "sent": 0}

    async def main():
        async with _aconnect(url, protocols, 10) as ws:
            async def send():
                for m in sent:
                    await ws.send(m.decode() if text else m)
                    progress["sent"] += 1

            async def recv():
                got = bytearray()
                while len(got) < total:
                    got += as_bytes(await ws.recv())
                    progress["bytes"] = len(got)
                    progress["messages"] += 1
                return bytes(got)

            _, got = await asyncio.gather(send(), recv())
            return got, progress["messages"]

    try:
        return asyncio.run(asyncio.wait_for(main(), timeout))
    except (TimeoutError, asyncio.TimeoutError):
        raise TimeoutError(f"after {timeout}s: sent {progress['sent']}/{len(sent)} messages, received "
                           f"{progress['bytes']}/{total} bytes in {progress['messages']} messages") from None
