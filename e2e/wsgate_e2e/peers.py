"""Small peers that the gateway connects to: echo servers for every peer kind,
a blaster (writes N bytes then closes) and a sink (records everything until
EOF). Each runs in daemon threads on a loopback ephemeral port or a socket file
in a temp dir, exposes `.spec` (the gateway's PEER syntax) and is closed by
`.close()` (the fixtures do it)."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from pathlib import Path

BUF = 256 * 1024


class _Server:
    kind = ""

    def __init__(self):
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._conns: list[socket.socket] = []
        self.connections = 0
        self.errors: list[str] = []

    def _spawn(self, target, *args):
        t = threading.Thread(target=target, args=args, daemon=True)
        t.start()
        self._threads.append(t)

    def close(self):
        self._stop.set()
        for s in [self.sock, *self._conns]:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                s.close()
            except OSError:
                pass
        for t in self._threads:
            t.join(timeout=2)


class _StreamServer(_Server):
    """Accepts connections (TCP or Unix stream) and runs `handle(conn)` per connection."""

    def __init__(self, family: int, address):
        super().__init__()
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        if family == socket.AF_INET:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(address)
        self.sock.listen(512)
        self.address = self.sock.getsockname()
        self._spawn(self._accept_loop)

    @property
    def spec(self) -> str:
        if self.sock.family == socket.AF_INET:
            return f"tcp://{self.address[0]}:{self.address[1]}"
        return f"unix:{self.address}"

    def _accept_loop(self):
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            self._conns.append(conn)
            self._spawn(self._run, conn)

    def _run(self, conn: socket.socket):
        try:
            self.handle(conn)
        except OSError as e:
            if not self._stop.is_set():
                self.errors.append(repr(e))
        finally:
            try:
                conn.close()
            except OSError:
                pass

    def handle(self, conn: socket.socket):  # pragma: no cover - overridden
        raise NotImplementedError


class StreamEcho(_StreamServer):
    """Echoes bytes back; on EOF from the gateway it shuts down its write side."""

    def handle(self, conn):
        while True:
            data = conn.recv(BUF)
            if not data:
                conn.shutdown(socket.SHUT_WR)
                return
            conn.sendall(data)


class StreamBlaster(_StreamServer):
    """On connect writes `payload` and closes at once."""

    def __init__(self, family, address, payload: bytes):
        self.payload = payload
        super().__init__(family, address)

    def handle(self, conn):
        conn.sendall(self.payload)
        conn.close()


class StreamSink(_StreamServer):
    """Reads everything until EOF; `.done` is set when EOF was seen."""

    def __init__(self, family, address):
        self.received = bytearray()
        self.eof = False
        self.done = threading.Event()
        super().__init__(family, address)

    def handle(self, conn):
        while True:
            data = conn.recv(BUF)
            if not data:
                self.eof = True
                self.done.set()
                return
            self.received += data

    @property
    def sha256(self) -> str:
        return hashlib.sha256(bytes(self.received)).hexdigest()


class _DgramEcho(_Server):
    def __init__(self, family: int, address):
        super().__init__()
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        self.sock.bind(address)
        self.address = self.sock.getsockname()
        self.datagrams = 0
        self.unanswerable = 0
        self._spawn(self._loop)

    def _loop(self):
        while not self._stop.is_set():
            try:
                data, addr = self.sock.recvfrom(256 * 1024)
            except OSError:
                return
            self.datagrams += 1
            if not addr:
                # An unbound Unix datagram sender cannot be answered.
                self.unanswerable += 1
                continue
            try:
                self.sock.sendto(data, addr)
            except OSError as e:
                self.errors.append(repr(e))


class UdpEcho(_DgramEcho):
    def __init__(self):
        super().__init__(socket.AF_INET, ("127.0.0.1", 0))

    @property
    def spec(self) -> str:
        return f"udp://{self.address[0]}:{self.address[1]}"


class UnixDgramEcho(_DgramEcho):
    def __init__(self, path: Path):
        super().__init__(socket.AF_UNIX, str(path))

    @property
    def spec(self) -> str:
        return f"unix-dgram:{self.address}"


def tcp_echo() -> StreamEcho:
    return StreamEcho(socket.AF_INET, ("127.0.0.1", 0))


def unix_echo(path: Path) -> StreamEcho:
    return StreamEcho(socket.AF_UNIX, str(path))


def closed_tcp_port() -> tuple[socket.socket, int]:
    """A loopback port that refuses connections: bound (so nobody else takes it)
    but not listening. Keep the returned socket open while the port is used."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    return s, s.getsockname()[1]


def free_tcp_port() -> int:
    """For servers that cannot report an ephemeral port (redis-server)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def short_tmp_dir(base: Path) -> Path:
    """Unix socket paths are limited to 107 bytes; pytest's tmp_path can be long."""
    import tempfile

    if len(str(base)) < 60:
        return base
    d = Path(tempfile.mkdtemp(prefix="wsg-"))
    os.chmod(d, 0o700)
    return d


class StreamScript(_StreamServer):
    """On connect writes `chunks` one by one (TCP_NODELAY, `gap` seconds apart, so
    the gateway sees separate reads), then shuts its write side down (EOF) and
    reads until the gateway closes."""

    def __init__(self, family, address, chunks: list[bytes], gap: float = 0.05):
        self.chunks, self.gap = chunks, gap
        super().__init__(family, address)

    def handle(self, conn):
        import time

        if conn.family == socket.AF_INET:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i, c in enumerate(self.chunks):
            if i and self.gap:
                time.sleep(self.gap)  # creates separate reads; not a synchronisation
            conn.sendall(c)
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(30)
        while conn.recv(BUF):
            pass


class StreamFlood(_StreamServer):
    """On connect writes `limit` bytes of a deterministic pattern as fast as the
    gateway takes them, then closes. `.sent` counts what the kernel accepted;
    `.sha256` is the hash of all `limit` bytes."""

    CHUNK = 64 * 1024

    def __init__(self, family, address, limit: int):
        self.limit = limit
        self.sent = 0
        self.finished = threading.Event()
        block = hashlib.sha256(b"flood").digest() * (self.CHUNK // 32)
        self.blocks = [bytes([i & 0xFF]) + block[1:] for i in range(256)]
        h = hashlib.sha256()
        for i in range(limit // self.CHUNK):
            h.update(self.blocks[i & 0xFF])
        self.sha256 = h.hexdigest()
        assert limit % self.CHUNK == 0
        super().__init__(family, address)

    def handle(self, conn):
        for i in range(self.limit // self.CHUNK):
            conn.sendall(self.blocks[i & 0xFF])
            self.sent += self.CHUNK
        self.finished.set()
        conn.close()


class StreamStall(_StreamServer):
    """Accepts and reads nothing until `.resume` is set; then reads everything
    until EOF (`.done`), hashing it."""

    def __init__(self, family, address):
        self.resume = threading.Event()
        self.done = threading.Event()
        self.received = 0
        self._hash = hashlib.sha256()
        super().__init__(family, address)

    def handle(self, conn):
        while not self.resume.wait(0.2):
            if self._stop.is_set():
                return
        while True:
            data = conn.recv(BUF)
            if not data:
                self.done.set()
                return
            self.received += len(data)
            self._hash.update(data)

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()


class StreamTagEcho(StreamEcho):
    """An echo peer that first says who it is (`tag` + b"\\n"), so a client can
    tell which peer the gateway picked."""

    def __init__(self, family, address, tag: str):
        self.tag = tag.encode() + b"\n"
        super().__init__(family, address)

    def handle(self, conn):
        conn.sendall(self.tag)
        super().handle(conn)


class StreamHoldOpen(StreamSink):
    """A `StreamSink` (reads until EOF: `.done`, `.received`) that then keeps
    its side of the connection open (never closes it) until the test ends."""

    def handle(self, conn):
        super().handle(conn)
        self._stop.wait()


class StreamReset(_StreamServer):
    """Waits for the first bytes from the gateway (so the WebSocket is up), writes
    `payload`, then resets the connection (RST, SO_LINGER 0)."""

    def __init__(self, family, address, payload: bytes = b"partial"):
        self.payload = payload
        super().__init__(family, address)

    def handle(self, conn):
        import struct as _struct

        conn.recv(1)
        conn.sendall(self.payload)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _struct.pack("ii", 1, 0))
        conn.close()
