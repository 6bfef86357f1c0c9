#!/usr/bin/env python3
"""Sends a permessage-deflate bomb to a wsgate binary and prints the close
code and the growth of the gateway's peak RSS (VmHWM), per route:

  echo  `--to echo:`
  tcp   `--to tcp://…` (a TCP echo peer of this script's), `--framing lines`
  mux   `/mux` (wsmux's own limit: 1 MiB, whatever --max-message-size says)

  e2e/tools/deflate_bomb.py [--limit 4MiB] [--inflates-to 1024] [--runs 3] BIN

The bomb is one masked binary frame with RSV1: `--inflates-to` MiB of zeros
deflated (level 9; about 1 MB for 1 GiB). Before each bomb the peak is reset
to the current RSS (`echo 5 > /proc/PID/clear_refs`), after a warm-up
message on the same connection, so the growth is the bomb's alone.
Standard library only.
"""

import argparse
import base64
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib

TRAILER = b"\x00\x00\xff\xff"


def kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def deflate(data: bytes, level: int = 6) -> bytes:
    c = zlib.compressobj(level, zlib.DEFLATED, -15)
    out = c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(TRAILER)
    return out[:-4]


def bomb(mib: int) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    zeros = bytes(1 << 20)
    parts = [c.compress(zeros) for _ in range(mib)]
    parts.append(c.flush(zlib.Z_SYNC_FLUSH))
    return b"".join(parts)[:-4]


def frame(opcode: int, payload: bytes, rsv1: bool) -> bytes:
    b0 = 0x80 | (0x40 if rsv1 else 0) | opcode
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", b0, 0x80 | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", b0, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", b0, 0x80 | 127, n)
    mask = os.urandom(4)
    body = bytes(b ^ mask[i & 3] for i, b in enumerate(payload)) if n < 4096 else _mask(payload, mask)
    return head + mask + body


def _mask(payload: bytes, mask: bytes) -> bytes:
    m = int.from_bytes(mask * 2, "little")
    n = len(payload)
    pad = (-n) % 8
    words = memoryview(payload + bytes(pad)).cast("Q")
    out = bytearray(n + pad)
    ow = memoryview(out).cast("Q")
    for i, w in enumerate(words):
        ow[i] = w ^ m
    return bytes(out[:n])


class Conn:
    def __init__(self, port: int, path: str, protocol: str | None):
        self.s = socket.create_connection(("127.0.0.1", port), timeout=30)
        key = base64.b64encode(os.urandom(16)).decode()
        req = (f"GET {path} HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
               "Sec-WebSocket-Extensions: permessage-deflate\r\n")
        if protocol:
            req += f"Sec-WebSocket-Protocol: {protocol}\r\n"
        self.s.sendall((req + "\r\n").encode())
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            d = self.s.recv(65536)
            assert d, "closed before the 101"
            self.buf += d
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        assert b" 101 " in head.split(b"\r\n")[0], head
        assert b"permessage-deflate" in head.lower(), head

    def _need(self, n: int) -> bytes:
        while len(self.buf) < n:
            d = self.s.recv(1 << 20)
            if not d:
                raise EOFError
            self.buf += d
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def recv(self) -> tuple[int, bytes]:
        b0, b1 = self._need(2)
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack("!H", self._need(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", self._need(8))[0]
        return b0 & 0x0F, self._need(n)

    def close_code(self) -> int | None:
        try:
            while True:
                op, p = self.recv()
                if op == 8:
                    return struct.unpack("!H", p[:2])[0] if len(p) >= 2 else 1005
        except (EOFError, ConnectionResetError):
            return None


def tcp_echo() -> int:
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(16)

    def serve(c):
        with c:
            try:
                while d := c.recv(65536):
                    c.sendall(d)
            except OSError:
                pass

    def accept():
        while True:
            c, _ = ls.accept()
            threading.Thread(target=serve, args=(c,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return ls.getsockname()[1]


def start(binary: str, *args: str) -> tuple[subprocess.Popen, int]:
    p = subprocess.Popen([binary, "serve", "--listen", "127.0.0.1:0", *args],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                         env={**os.environ, "WSGATE_LOG": "error"})
    line = p.stdout.readline()
    assert line.startswith("listening on "), line
    return p, int(line.rsplit(":", 1)[1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("binary")
    ap.add_argument("--limit", default="4MiB")
    ap.add_argument("--inflates-to", type=int, default=1024, help="MiB")
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    payload = bomb(a.inflates_to)
    wire = frame(2, payload, True)
    warm = deflate(b'{"warm":"up"}' * 200)
    echo_port = tcp_echo()
    routes = {
        "echo": (["--to", "echo:", "--deflate", "--max-message-size", a.limit,
                  "--mux-allow", "tcp://127.0.0.1:*"], "/", None, True),
        "tcp": (["--to", f"tcp://127.0.0.1:{echo_port}", "--framing", "lines", "--deflate",
                 "--max-message-size", a.limit], "/", None, True),
        "mux": (["--to", "echo:", "--deflate", "--max-message-size", a.limit,
                 "--mux-allow", "tcp://127.0.0.1:*"], "/mux", "wsmux.v1", False),
    }
    print(f"{a.binary}: bomb frame {len(payload)} B inflating to {a.inflates_to} MiB, "
          f"--max-message-size {a.limit}")
    for name, (args, path, protocol, warmup) in routes.items():
        p, port = start(a.binary, *args)
        try:
            for run in range(a.runs):
                c = Conn(port, path, protocol)
                if warmup:
                    c.s.sendall(frame(1, warm, True) + (frame(1, b"\n", False) if name == "tcp" else b""))
                    c.recv()
                with open(f"/proc/{p.pid}/clear_refs", "w") as f:
                    f.write("5")
                before = kib(p.pid, "VmRSS")
                t = time.monotonic()
                c.s.sendall(wire)
                code = c.close_code()
                took = time.monotonic() - t
                peak = kib(p.pid, "VmHWM")
                print(f"  {name:4} run {run}: close {code} in {took:.2f} s; "
                      f"RSS {before} KiB, peak +{peak - before} KiB")
                c.s.close()
        finally:
            p.kill()
            p.wait()


if __name__ == "__main__":
    sys.exit(main())
