"""Raw HTTP/1.1 and WebSocket framing over a plain socket, for the tests that
must send what a well-behaved client library refuses to: wrong versions,
missing headers, invalid UTF-8, oversized or garbage frames."""

from __future__ import annotations

import base64
import os
import socket
import struct
import time
from dataclasses import dataclass, field

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


@dataclass
class HttpResponse:
    status: int
    reason: str
    headers: dict[str, str]
    body: bytes = b""
    raw_head: bytes = b""

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


@dataclass
class Frame:
    fin: bool
    opcode: int
    payload: bytes
    rsv: int = 0

    @property
    def close_code(self) -> int | None:
        if self.opcode != OP_CLOSE:
            return None
        if len(self.payload) >= 2:
            return struct.unpack("!H", self.payload[:2])[0]
        return 1005


def connect(host: str, port: int, timeout: float = 10.0) -> socket.socket:
    s = socket.create_connection((host, port), timeout=timeout)
    s.settimeout(timeout)
    return s


def ws_request(path: str = "/", host: str = "127.0.0.1", key: str | None = None, version: str = "13",
               protocols: list[str] | None = None, extra: dict[str, str] | None = None,
               omit: tuple[str, ...] = ()) -> bytes:
    headers = {
        "Host": host,
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": key or base64.b64encode(os.urandom(16)).decode(),
        "Sec-WebSocket-Version": version,
    }
    if protocols:
        headers["Sec-WebSocket-Protocol"] = ", ".join(protocols)
    if extra:
        headers.update(extra)
    for h in omit:
        headers.pop(h, None)
    lines = [f"GET {path} HTTP/1.1"] + [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_http_response(sock: socket.socket, timeout: float = 10.0, read_body: bool = True) -> tuple[HttpResponse, bytes]:
    """Read a response head (and a Content-Length body when read_body and the
    status is not 101). Returns the response and bytes read past it."""
    deadline = time.monotonic() + timeout
    buf = b""
    while b"\r\n\r\n" not in buf:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed before a full response head: {buf!r}")
        buf += chunk
        if len(buf) > 1 << 20:
            raise ValueError("response head too large")
    head, rest = buf.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/"):
        raise ValueError(f"not an HTTP response: {lines[0]!r}")
    status = int(parts[1])
    reason = parts[2] if len(parts) > 2 else ""
    headers: dict[str, str] = {}
    for ln in lines[1:]:
        k, _, v = ln.partition(":")
        k = k.strip().lower()
        headers[k] = (headers[k] + ", " + v.strip()) if k in headers else v.strip()
    resp = HttpResponse(status, reason, headers, raw_head=head)
    if status != 101 and read_body:
        if "content-length" in headers:
            n = int(headers["content-length"])
            while len(rest) < n:
                sock.settimeout(max(0.05, deadline - time.monotonic()))
                chunk = sock.recv(65536)
                if not chunk:
                    break
                rest += chunk
            resp.body, rest = rest[:n], rest[n:]
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            resp.body, rest = _read_chunked(sock, rest, deadline)
    return resp, rest


def _read_chunked(sock, buf: bytes, deadline: float) -> tuple[bytes, bytes]:
    body = b""
    while True:
        while b"\r\n" not in buf:
            sock.settimeout(max(0.05, deadline - time.monotonic()))
            c = sock.recv(65536)
            if not c:
                return body, b""
            buf += c
        line, buf = buf.split(b"\r\n", 1)
        n = int(line.split(b";")[0], 16)
        while len(buf) < n + 2:
            sock.settimeout(max(0.05, deadline - time.monotonic()))
            c = sock.recv(65536)
            if not c:
                return body + buf, b""
            buf += c
        if n == 0:
            return body, buf[2:]
        body += buf[:n]
        buf = buf[n + 2:]


def http_get(host: str, port: int, path: str = "/", headers: dict[str, str] | None = None,
             timeout: float = 10.0) -> HttpResponse:
    h = {"Host": f"{host}:{port}", "Connection": "close"}
    if headers:
        h.update(headers)
    req = f"GET {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items()) + "\r\n"
    with connect(host, port, timeout) as s:
        s.sendall(req.encode())
        resp, _ = read_http_response(s, timeout)
        return resp


def raw_exchange(host: str, port: int, request: bytes, timeout: float = 10.0) -> HttpResponse:
    with connect(host, port, timeout) as s:
        s.sendall(request)
        resp, _ = read_http_response(s, timeout)
        return resp


def encode_frame(opcode: int, payload: bytes = b"", fin: bool = True, mask: bool = True, rsv: int = 0,
                 length_override: int | None = None) -> bytes:
    b0 = (0x80 if fin else 0) | ((rsv & 7) << 4) | (opcode & 0xF)
    n = len(payload) if length_override is None else length_override
    mbit = 0x80 if mask else 0
    if n < 126:
        head = struct.pack("!BB", b0, mbit | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", b0, mbit | 126, n)
    else:
        head = struct.pack("!BBQ", b0, mbit | 127, n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + _mask(payload, key)


def _mask(payload: bytes, key: bytes) -> bytes:
    if not payload:
        return b""
    n = len(payload)
    k = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(k, "big")).to_bytes(n, "big")


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason


class RawWebSocket:
    """A client connection after a (raw) successful handshake."""

    def __init__(self, sock: socket.socket, response: HttpResponse, leftover: bytes):
        self.sock = sock
        self.response = response
        self.buf = leftover

    @classmethod
    def open(cls, host: str, port: int, path: str = "/", protocols: list[str] | None = None,
             timeout: float = 10.0, host_header: str | None = None,
             extra: dict[str, str] | None = None) -> "RawWebSocket":
        s = connect(host, port, timeout)
        s.sendall(ws_request(path, host=host_header or f"{host}:{port}", protocols=protocols, extra=extra))
        resp, rest = read_http_response(s, timeout)
        if resp.status != 101:
            s.close()
            raise ConnectionError(f"handshake refused: {resp.status} {resp.reason} {resp.body[:500]!r}")
        return cls(s, resp, rest)

    def send_frame(self, opcode: int, payload: bytes = b"", **kw):
        self.sock.sendall(encode_frame(opcode, payload, **kw))

    def send_raw(self, data: bytes):
        self.sock.sendall(data)

    def _fill(self, n: int, deadline: float) -> bool:
        while len(self.buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("timed out reading a frame")
            self.sock.settimeout(left)
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                return False
            self.buf += chunk
        return True

    def recv_frame(self, timeout: float = 10.0) -> Frame | None:
        """Next frame from the server, or None on EOF (connection dropped)."""
        deadline = time.monotonic() + timeout
        if not self._fill(2, deadline):
            return None
        b0, b1 = self.buf[0], self.buf[1]
        n = b1 & 0x7F
        pos = 2
        if n == 126:
            if not self._fill(4, deadline):
                return None
            n = struct.unpack("!H", self.buf[2:4])[0]
            pos = 4
        elif n == 127:
            if not self._fill(10, deadline):
                return None
            n = struct.unpack("!Q", self.buf[2:10])[0]
            pos = 10
        masked = bool(b1 & 0x80)
        key = b""
        if masked:
            if not self._fill(pos + 4, deadline):
                return None
            key = self.buf[pos:pos + 4]
            pos += 4
        if not self._fill(pos + n, deadline):
            return None
        payload = self.buf[pos:pos + n]
        self.buf = self.buf[pos + n:]
        if masked:
            payload = _mask(payload, key)
        return Frame(bool(b0 & 0x80), b0 & 0xF, payload, (b0 >> 4) & 7)

    def recv_until_close(self, timeout: float = 10.0) -> tuple[list[Frame], Frame | None]:
        """Read frames until a Close frame (returned) or EOF/reset (None)."""
        deadline = time.monotonic() + timeout
        frames: list[Frame] = []
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no close within {timeout}s; frames so far: {[(f.opcode, len(f.payload)) for f in frames]}")
            try:
                f = self.recv_frame(left)
            except (ConnectionResetError, BrokenPipeError):
                return frames, None
            if f is None:
                return frames, None
            if f.opcode == OP_CLOSE:
                return frames, f
            frames.append(f)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass
