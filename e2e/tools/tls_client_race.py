"""How often the `websockets` sync client loses its opening handshake over
TLS, against the asyncio client and against servers with and without TLS 1.3
session tickets (see the module doc of wsgate_e2e/clients.py, which this backs).

    e2e/.venv/bin/python e2e/tools/tls_client_race.py [-n 500] [--wsgate target/release/wsgate]

Each attempt opens wss://, echoes "x" and closes, with 2 s deadlines; a lost
attempt is one that raised. Prints one line per (client, server) pair. Not a
test: the loss is a rate that depends on thread timing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import ssl
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from websockets.asyncio.client import connect as aconnect
from websockets.asyncio.server import serve
from websockets.sync.client import connect as sconnect

ROOT = Path(__file__).resolve().parents[2]


def make_cert(d: str) -> tuple[str, str]:
    cert, key = os.path.join(d, "c.pem"), os.path.join(d, "k.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
    return cert, key


def start_wsgate(binary: str, cert: str, key: str) -> tuple[subprocess.Popen, str]:
    p = subprocess.Popen([binary, "serve", "--listen", "127.0.0.1:0", "--to", "echo:", "--tls-cert", cert,
                          "--tls-key", key, "--log", "warn"], stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline().strip()
    if not line.startswith("listening on "):
        p.kill()
        sys.exit(f"wsgate did not start: {line!r}")
    return p, line.removeprefix("listening on ")


def start_python_server(cert: str, key: str, tickets: bool) -> str:
    """Python's own asyncio TLS echo server (OpenSSL) in a daemon thread."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    if not tickets:
        ctx.num_tickets = 0
    ready: dict = {}
    started = threading.Event()

    async def echo(ws):
        async for m in ws:
            await ws.send(m)

    async def main():
        async with serve(echo, "127.0.0.1", 0, ssl=ctx) as s:
            ready["url"] = f"wss://127.0.0.1:{s.sockets[0].getsockname()[1]}"
            started.set()
            await asyncio.Future()

    threading.Thread(target=lambda: asyncio.run(main()), daemon=True).start()
    if not started.wait(10):
        sys.exit("the Python TLS server did not start")
    return ready["url"]


def sync_lost(url: str, ctx: ssl.SSLContext, n: int) -> int:
    lost = 0
    for _ in range(n):
        try:
            with sconnect(url, ssl=ctx, open_timeout=2, close_timeout=2, compression=None) as ws:
                ws.send("x")
                if ws.recv(timeout=2) != "x":
                    lost += 1
        except Exception:  # noqa: BLE001 - counted, that is the measurement
            lost += 1
    return lost


def async_lost(url: str, ctx: ssl.SSLContext, n: int) -> int:
    async def main():
        lost = 0
        for _ in range(n):
            try:
                async with aconnect(url, ssl=ctx, open_timeout=2, close_timeout=2, compression=None) as ws:
                    await ws.send("x")
                    if await asyncio.wait_for(ws.recv(), 2) != "x":
                        lost += 1
            except Exception:  # noqa: BLE001 - counted, that is the measurement
                lost += 1
        return lost

    return asyncio.run(main())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=500, help="attempts per pair (default 500)")
    ap.add_argument("--wsgate", default=str(ROOT / "target/release/wsgate"))
    a = ap.parse_args()
    if a.n < 1:
        ap.error("-n must be at least 1")
    with tempfile.TemporaryDirectory() as d:
        cert, key = make_cert(d)
        ctx = ssl.create_default_context(cafile=cert)
        gw, gw_url = start_wsgate(a.wsgate, cert, key)
        try:
            pairs = [
                ("sync", "wsgate", lambda: sync_lost(gw_url, ctx, a.n)),
                ("asyncio", "wsgate", lambda: async_lost(gw_url, ctx, a.n)),
                ("sync", "python, tickets on", lambda: sync_lost(start_python_server(cert, key, True), ctx, a.n)),
                ("sync", "python, tickets off", lambda: sync_lost(start_python_server(cert, key, False), ctx, a.n)),
            ]
            for client, server, run in pairs:
                print(f"{client:8} client, {server:20} server: {run()} of {a.n} lost", flush=True)
        finally:
            gw.kill()
            gw.wait()


if __name__ == "__main__":
    main()
