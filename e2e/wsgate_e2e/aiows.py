"""A minimal asyncio WebSocket client on a raw `asyncio.Protocol`, for tests
that hold thousands of connections at once (the `websockets` library costs
several times more memory and CPU per connection on a 2-core machine).

Unlike `asyncio.StreamReader`, whose reads raise a recorded reset before the
bytes buffered ahead of it, this client keeps every byte that arrived before
an EOF or a reset: a Close frame that the server sent just before the
connection died is still read. Every wait has a deadline.

    ws = await AioWebSocket.open("127.0.0.1", port, "/", local_addr=("127.0.0.2", 0))
    ws.send(OP_TEXT, b"hi")
    frame = await ws.recv(timeout=10)   # Frame, or None at EOF/reset (ws.lost says which)
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import struct

from .rawws import OP_CLOSE, OP_TEXT, Frame, HttpResponse, encode_frame  # noqa: F401 (re-exported)

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class HandshakeRefused(ConnectionError):
    def __init__(self, response: HttpResponse):
        super().__init__(f"handshake refused: {response.status} {response.reason} {response.body[:200]!r}")
        self.response = response


class _Proto(asyncio.Protocol):
    def __init__(self):
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.eof = False
        self.lost: BaseException | bool | None = None  # True: clean EOF; an exception: reset/error
        self._waiter: asyncio.Future | None = None

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.buf += data
        self._wake()

    def eof_received(self):
        self.eof = True
        self._wake()
        return False  # close the transport

    def connection_lost(self, exc):
        self.lost = exc if exc is not None else True
        self._wake()

    def _wake(self):
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def wait(self, timeout: float):
        """Until more bytes, EOF or loss; raises TimeoutError at the deadline."""
        if self.lost is not None or self.eof:
            return
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(self._waiter, timeout)
        finally:
            self._waiter = None

    @property
    def finished(self) -> bool:
        return self.eof or self.lost is not None


class AioWebSocket:
    def __init__(self, proto: _Proto, response: HttpResponse):
        self.p = proto
        self.response = response

    @classmethod
    async def open(cls, host: str, port: int, path: str = "/", timeout: float = 20.0,
                   local_addr: tuple[str, int] | None = None, headers: dict[str, str] | None = None
                   ) -> "AioWebSocket":
        """Connect and handshake; raises HandshakeRefused (with the response) on a non-101."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        _, proto = await asyncio.wait_for(
            loop.create_connection(_Proto, host, port, local_addr=local_addr), timeout)
        try:
            key = base64.b64encode(os.urandom(16)).decode()
            h = {"Host": f"{host}:{port}", "Upgrade": "websocket", "Connection": "Upgrade",
                 "Sec-WebSocket-Key": key, "Sec-WebSocket-Version": "13", **(headers or {})}
            req = f"GET {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items()) + "\r\n"
            proto.transport.write(req.encode())
            while b"\r\n\r\n" not in proto.buf:
                if proto.finished:
                    raise ConnectionError(f"connection closed during the handshake: {bytes(proto.buf)!r}")
                left = deadline - loop.time()
                if left <= 0:
                    raise TimeoutError(f"no handshake answer within {timeout}s")
                await proto.wait(left)
            head, _, rest = bytes(proto.buf).partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            parts = lines[0].split(" ", 2)
            headers_in: dict[str, str] = {}
            for ln in lines[1:]:
                k, _, v = ln.partition(":")
                k = k.strip().lower()
                headers_in[k] = (headers_in[k] + ", " + v.strip()) if k in headers_in else v.strip()
            resp = HttpResponse(int(parts[1]), parts[2] if len(parts) > 2 else "", headers_in, raw_head=head)
            proto.buf = bytearray(rest)
            if resp.status != 101:
                n = int(headers_in.get("content-length", "0") or 0)
                while len(proto.buf) < n and not proto.finished and loop.time() < deadline:
                    try:
                        await proto.wait(deadline - loop.time())
                    except (TimeoutError, asyncio.TimeoutError):
                        break
                resp.body = bytes(proto.buf[:n])
                raise HandshakeRefused(resp)
            want = base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()
            if resp.header("sec-websocket-accept") != want:
                raise ConnectionError(f"bad Sec-WebSocket-Accept {resp.header('sec-websocket-accept')!r}")
            return cls(proto, resp)
        except BaseException:
            proto.transport.abort()
            raise

    # ------------------------------------------------------------------ I/O
    def send(self, opcode: int, payload: bytes = b""):
        t = self.p.transport
        if t is not None and not t.is_closing():
            t.write(encode_frame(opcode, payload))

    def send_close(self, code: int = 1000, reason: bytes = b""):
        self.send(OP_CLOSE, struct.pack("!H", code) + reason)

    def _parse(self) -> Frame | None:
        b = self.p.buf
        if len(b) < 2:
            return None
        n = b[1] & 0x7F
        pos = 2
        if n == 126:
            if len(b) < 4:
                return None
            n = struct.unpack_from("!H", b, 2)[0]
            pos = 4
        elif n == 127:
            if len(b) < 10:
                return None
            n = struct.unpack_from("!Q", b, 2)[0]
            pos = 10
        if b[1] & 0x80:
            raise ValueError("server sent a masked frame")
        if len(b) < pos + n:
            return None
        f = Frame(bool(b[0] & 0x80), b[0] & 0xF, bytes(b[pos:pos + n]), (b[0] >> 4) & 7)
        del b[:pos + n]
        return f

    async def recv(self, timeout: float = 10.0) -> Frame | None:
        """The next frame; None once the connection ended (EOF or reset) with
        no complete frame left in the buffer; TimeoutError at the deadline."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            f = self._parse()
            if f is not None:
                return f
            if self.p.finished:
                return None
            left = deadline - loop.time()
            if left <= 0:
                raise TimeoutError(f"no frame within {timeout}s")
            await self.p.wait(left)

    @property
    def lost(self):
        return self.p.lost if self.p.lost is not None else (True if self.p.eof else None)

    def abort(self):
        if self.p.transport is not None:
            self.p.transport.abort()

    def close(self):
        if self.p.transport is not None:
            self.p.transport.close()
