"""Peers of the security tests: an auth hook and a JWKS endpoint (live HTTP
servers on loopback ephemeral ports that count what they were asked), the
metrics scraper, and an HTTP/2 client for extended CONNECT (RFC 8441) built
on the `h2` library."""

from __future__ import annotations

import collections
import json
import socket
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler
from typing import Callable

from .httpd import LoopbackHTTPServer


class _Http:
    """A LoopbackHTTPServer on 127.0.0.1:0 whose GETs `handle` answers."""

    def __init__(self, handle: Callable[[BaseHTTPRequestHandler], tuple[int, dict, bytes]]):
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # noqa: N802 - http.server API
                status, headers, body = handle(self)
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    if status not in (204, 304):
                        self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass  # the gateway gave up (a timeout under test)

            def log_message(self, *args):
                pass

        self.httpd = LoopbackHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=2)


class HookServer(_Http):
    """An `auth_request`-style endpoint. `decide(authorization)` returns
    (status, headers, delay_seconds); every request is recorded and counted
    by its Authorization header."""

    def __init__(self, decide: Callable[[str | None], tuple[int, dict, float]]):
        self.hits: collections.Counter = collections.Counter()
        self.requests: list[dict] = []

        def handle(h: BaseHTTPRequestHandler):
            auth = h.headers.get("Authorization")
            with self.lock:
                self.hits[auth] += 1
                self.requests.append({"path": h.path, **{k.lower(): v for k, v in h.headers.items()}})
            status, headers, delay = decide(auth)
            if delay:
                time.sleep(delay)  # the slow hook under test, not synchronisation
            return status, headers, b""

        super().__init__(handle)

    def count(self, auth: str | None) -> int:
        with self.lock:
            return self.hits[auth]


class JwksServer(_Http):
    """Serves a JWKS document that the test swaps (`serve`) or breaks
    (`fail`); counts the fetches."""

    def __init__(self, doc: dict):
        self.doc: dict | None = doc
        self.status = 200
        self.fetches = 0

        def handle(h: BaseHTTPRequestHandler):
            with self.lock:
                self.fetches += 1
                status, doc = self.status, self.doc
            if status != 200:
                return status, {"Content-Type": "text/plain"}, b"down"
            return 200, {"Content-Type": "application/json"}, json.dumps(doc).encode()

        super().__init__(handle)

    def serve(self, doc: dict):
        with self.lock:
            self.doc, self.status = doc, 200

    def fail(self, status: int = 500):
        with self.lock:
            self.status = status

    def fetched(self) -> int:
        with self.lock:
            return self.fetches


def metrics_text(admin: str) -> str:
    with urllib.request.urlopen(admin + "/metrics", timeout=10) as r:
        return r.read().decode()


def metric(admin: str, name: str, **labels) -> float:
    """The sum of the series of `name` whose labels include `labels`."""
    total = 0.0
    for ln in metrics_text(admin).splitlines():
        series, _, value = ln.rpartition(" ")
        if not (series == name or series.startswith(name + "{")):
            continue
        if all(f'{k}="{v}"' in series for k, v in labels.items()):
            total += float(value)
    return total


def until(pred: Callable[[], bool], timeout: float, what: str, step: float = 0.05):
    """Polls `pred` until it holds; fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(step)


def h2_request(host: str, port: int, headers: list[tuple[str, str]], timeout: float = 10.0,
               body_message: bytes | None = None, end_stream: bool = True) -> tuple[int, dict, bytes]:
    """One request on a fresh cleartext HTTP/2 connection (prior knowledge).
    Returns (status, response headers, what came back on the stream within a
    short wait: for an extended CONNECT that was answered 200, the echo of
    `body_message` sent as one masked WebSocket frame)."""
    import h2.config
    import h2.connection
    import h2.events

    from .rawws import OP_TEXT, encode_frame

    sock = socket.create_connection((host, port), timeout=timeout)
    sock.settimeout(timeout)
    conn = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    deadline = time.monotonic() + timeout
    settings_seen = False
    status, rheaders, data, ended = None, {}, b"", False
    sent = False
    try:
        while time.monotonic() < deadline:
            if settings_seen and not sent:
                conn.send_headers(1, headers, end_stream=end_stream)
                sock.sendall(conn.data_to_send())
                sent = True
            chunk = sock.recv(65536)
            if not chunk:
                break
            for ev in conn.receive_data(chunk):
                if isinstance(ev, h2.events.RemoteSettingsChanged):
                    settings_seen = True
                elif isinstance(ev, h2.events.ResponseReceived):
                    rheaders = dict(ev.headers)
                    status = int(rheaders[":status"])
                    if status == 200 and body_message is not None:
                        conn.send_data(1, encode_frame(OP_TEXT, body_message))
                elif isinstance(ev, h2.events.DataReceived):
                    data += ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, 1)
                elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)):
                    ended = True
            out = conn.data_to_send()
            if out:
                sock.sendall(out)
            if status is not None and (ended or status != 200 or body_message is None
                                       or len(data) >= 2 + len(body_message)):
                break
    finally:
        sock.close()
    if status is None:
        raise AssertionError("no HTTP/2 answer")
    return status, rheaders, data
