"""nginx and HAProxy as WebSocket reverse proxies in front of a backend, for
comparisons and for checking the harness (issue 3). Neither can report an
ephemeral port, so a free loopback port is picked just before start (retried)
and readiness is a bounded TCP-connect poll."""

from __future__ import annotations

import shutil
import socket
import time
from pathlib import Path

from .peers import free_tcp_port
from .procs import ProcessGroup, Proc

NGINX_CONF = """
daemon off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
    upstream backend {{ server {backend}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $host;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
            proxy_buffering off;
        }}
    }}
}}
"""

HAPROXY_CONF = """
global
    maxconn 9000
defaults
    mode http
    timeout connect 5s
    timeout client 3600s
    timeout server 3600s
    timeout tunnel 3600s
frontend fe
    bind 127.0.0.1:{port}
    default_backend be
backend be
    server s1 {backend}
"""


class Proxy:
    def __init__(self, proc: Proc, port: int):
        self.proc, self.port = proc, port

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"


def _wait_port(proc: Proc, port: int, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            return False
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            time.sleep(0.05)  # readiness poll, bounded
    return False


def _start(procs: ProcessGroup, name: str, argv_for, conf_for, workdir: Path) -> Proxy:
    exe = shutil.which(name) or f"/usr/sbin/{name}"
    if not Path(exe).exists():
        raise FileNotFoundError(f"{name} not found: run scripts/install-test-deps.sh")
    for attempt in range(3):
        port = free_tcp_port()
        d = workdir / f"{name}{attempt}"
        for sub in ("", "body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        conf = d / f"{name}.conf"
        conf.write_text(conf_for(d, port))
        p = procs.start(argv_for(exe, conf), name)
        if _wait_port(p, port):
            return Proxy(p, port)
        p.stop()
    raise RuntimeError(f"{name} did not start:\n{procs.describe_all()}")


def start_nginx(procs: ProcessGroup, workdir: Path, backend: str) -> Proxy:
    """backend: HOST:PORT of a ws:// (and http://) backend."""
    return _start(procs, "nginx", lambda exe, conf: [exe, "-c", str(conf), "-e", str(conf.parent / "nginx-error.log")],
                  lambda d, port: NGINX_CONF.format(dir=d, port=port, backend=backend), workdir)


def start_haproxy(procs: ProcessGroup, workdir: Path, backend: str) -> Proxy:
    return _start(procs, "haproxy", lambda exe, conf: [exe, "-db", "-f", str(conf)],
                  lambda d, port: HAPROXY_CONF.format(port=port, backend=backend), workdir)
