"""A tiny HTTP server on a loopback ephemeral port serving the browser test page."""

from __future__ import annotations

import threading
from pathlib import Path
from http.server import BaseHTTPRequestHandler

from .httpd import LoopbackHTTPServer

# The page opens `new WebSocket(ws, protocol)`, sends `send` (a text message),
# and publishes what happened in window.__result once the first message
# arrived (or the socket failed/closed).
PAGE = (Path(__file__).resolve().parent.parent / "web" / "ws-page.html").read_text()


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server API
        if self.path.split("?")[0] in ("/", "/index.html"):
            body = PAGE.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
        else:
            body = b"not found"
            self.send_response(404)
            self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class PageServer:
    def __init__(self):
        self.httpd = LoopbackHTTPServer(("127.0.0.1", 0), _Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
        self.thread.start()

    def url(self, ws_url: str, send: str, protocols=()) -> str:
        from urllib.parse import urlencode

        q = [("ws", ws_url), ("send", send)] + [("protocol", p) for p in protocols]
        return f"http://127.0.0.1:{self.port}/?{urlencode(q)}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=2)


class StaticServer:
    """Serves files from directories on a loopback ephemeral port: `mounts`
    maps a URL prefix ("/pkg/") to a directory. For pages that load ES
    modules (the TypeScript client's build)."""

    TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
             ".mjs": "text/javascript; charset=utf-8", ".map": "application/json", ".json": "application/json",
             ".ts": "text/plain; charset=utf-8"}

    def __init__(self, mounts: dict[str, Path]):
        mounts = {prefix: Path(d).resolve() for prefix, d in mounts.items()}

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server API
                path = self.path.split("?")[0]
                for prefix, root in mounts.items():
                    if path.startswith(prefix):
                        f = (root / path[len(prefix):]).resolve()
                        if f.is_file() and f.is_relative_to(root):
                            body = f.read_bytes()
                            self.send_response(200)
                            self.send_header("Content-Type", StaticServer.TYPES.get(f.suffix, "application/octet-stream"))
                            self.send_header("Content-Length", str(len(body)))
                            self.end_headers()
                            self.wfile.write(body)
                            return
                self.send_error(404)

            def log_message(self, *args):
                pass

        self.httpd = LoopbackHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
        self.thread.start()

    def url(self, path: str, **query) -> str:
        from urllib.parse import urlencode

        return f"http://127.0.0.1:{self.port}{path}" + (f"?{urlencode(query)}" if query else "")

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=2)
