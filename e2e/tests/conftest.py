"""Fixtures for the wsgate end-to-end suite.

Everything listens on loopback ephemeral ports or socket files in temp dirs;
every process and peer started by a test is stopped by a finalizer; every wait
is bounded and fails the test when it runs out.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import textwrap
from pathlib import Path

import pytest

from wsgate_e2e import NODE_DIR, REPO_ROOT, peers as peerlib
from wsgate_e2e.procs import ProcessGroup, Proc, run_json, wait_listeners


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "wsgate_bin" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.gateway)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    group = getattr(item, "_e2e_procs", None)
    if rep.failed and group is not None and group.procs:
        rep.sections.append(("processes", group.describe_all()))


# --------------------------------------------------------------------- binary
@pytest.fixture(scope="session")
def wsgate_bin() -> Path:
    p = Path(os.environ.get("WSGATE_BIN", REPO_ROOT / "target" / "release" / "wsgate"))
    if not p.is_absolute():
        p = (REPO_ROOT / p).resolve()
    if not (p.is_file() and os.access(p, os.X_OK)):
        pytest.fail(f"wsgate binary not found at {p}: build it (cargo build --release -p wsgate) or set WSGATE_BIN")
    return p


@pytest.fixture(scope="session")
def node_bin() -> str:
    n = shutil.which("node")
    if not n:
        pytest.fail("node not found: run scripts/install-test-deps.sh")
    if not (NODE_DIR.parent / "node_modules" / "ws").is_dir():
        pytest.fail("e2e/node_modules missing: run scripts/install-test-deps.sh")
    return n


# ------------------------------------------------------------------ processes
@pytest.fixture
def procs(request, tmp_path) -> ProcessGroup:
    group = ProcessGroup(tmp_path / "logs")
    request.node._e2e_procs = group
    yield group
    group.stop_all()


@pytest.fixture
def sockdir(tmp_path) -> Path:
    d = peerlib.short_tmp_dir(tmp_path)
    yield d
    if d != tmp_path:
        shutil.rmtree(d, ignore_errors=True)


class Gateway:
    def __init__(self, proc: Proc, listeners, admin: str | None = None):
        self.proc = proc
        self.listeners = listeners
        self.admin = admin  # http://HOST:PORT of the metrics listener, when asked for

    @property
    def url(self) -> str:
        return self.listeners[0].url

    @property
    def host(self) -> str:
        return self.listeners[0].host

    @property
    def port(self) -> int:
        return self.listeners[0].port

    def ws(self, path: str = "/") -> str:
        return self.url + path


@pytest.fixture
def start_gateway(wsgate_bin, procs):
    """start_gateway('serve', '--listen', '127.0.0.1:0', '--to', 'echo:', ...) -> Gateway.

    Waits (bounded) for one `listening on ws://HOST:PORT` line per listener:
    the number of `--listen` flags, or `listeners=` for config files."""

    def start(*args, listeners: int | None = None, timeout: float = 20.0, env=None, admin: bool = False) -> Gateway:
        args = [str(a) for a in args]
        if listeners is None:
            listeners = max(1, args.count("--listen"))
        genv = {"RUST_LOG": os.environ.get("RUST_LOG", "info"), "RUST_BACKTRACE": "1"}
        if env:
            genv.update(env)
        p = procs.start([wsgate_bin, *args], "wsgate", env=genv)
        lst = wait_listeners(p, listeners, timeout)
        admin_url = None
        if admin:
            import re

            admin_url = p.wait_lines(re.compile(r"^admin on (http://\S+)$"), 1, timeout)[0].group(1)
        return Gateway(p, lst, admin_url)

    return start


@pytest.fixture
def quick_gateway(start_gateway):
    """quick_gateway(peer_spec, *extra_flags) runs `wsgate serve --listen 127.0.0.1:0 --to PEER ...`."""

    def start(to: str, *extra: str, **kw) -> Gateway:
        return start_gateway("serve", "--listen", "127.0.0.1:0", "--to", to, *extra, **kw)

    return start


@pytest.fixture
def write_config(tmp_path):
    n = [0]

    def write(text: str) -> Path:
        n[0] += 1
        p = tmp_path / f"wsgate-{n[0]}.toml"
        p.write_text(textwrap.dedent(text))
        return p

    return write


# ---------------------------------------------------------------------- peers
@pytest.fixture
def peer(sockdir):
    """peer(kind) -> a running peer: tcp-echo, unix-echo, udp-echo, unix-dgram-echo,
    tcp-blaster(payload=), unix-blaster(payload=), tcp-sink, unix-sink,
    tcp-script(chunks=, gap=), tcp-flood(limit=), tcp-stall, tcp-tag(tag=), tcp-holdopen, tcp-reset(payload=)."""
    made = []
    n = [0]

    def make(kind: str, **kw):
        n[0] += 1
        path = sockdir / f"peer{n[0]}.sock"
        import socket as s

        if kind == "tcp-echo":
            p = peerlib.tcp_echo()
        elif kind == "unix-echo":
            p = peerlib.unix_echo(path)
        elif kind == "udp-echo":
            p = peerlib.UdpEcho()
        elif kind == "unix-dgram-echo":
            p = peerlib.UnixDgramEcho(path)
        elif kind == "tcp-blaster":
            p = peerlib.StreamBlaster(s.AF_INET, ("127.0.0.1", 0), kw["payload"])
        elif kind == "unix-blaster":
            p = peerlib.StreamBlaster(s.AF_UNIX, str(path), kw["payload"])
        elif kind == "tcp-holdopen":
            p = peerlib.StreamHoldOpen(s.AF_INET, ("127.0.0.1", 0))
        elif kind == "tcp-reset":
            p = peerlib.StreamReset(s.AF_INET, ("127.0.0.1", 0), kw.get("payload", b"partial"))
        elif kind == "tcp-tag":
            p = peerlib.StreamTagEcho(s.AF_INET, ("127.0.0.1", 0), kw["tag"])
        elif kind == "tcp-script":
            p = peerlib.StreamScript(s.AF_INET, ("127.0.0.1", 0), kw["chunks"], kw.get("gap", 0.05))
        elif kind == "tcp-flood":
            p = peerlib.StreamFlood(s.AF_INET, ("127.0.0.1", 0), kw["limit"])
        elif kind == "tcp-stall":
            p = peerlib.StreamStall(s.AF_INET, ("127.0.0.1", 0))
        elif kind == "tcp-sink":
            p = peerlib.StreamSink(s.AF_INET, ("127.0.0.1", 0))
        elif kind == "unix-sink":
            p = peerlib.StreamSink(s.AF_UNIX, str(path))
        else:
            raise ValueError(kind)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


# ----------------------------------------------------------------------- node
@pytest.fixture
def node_client(node_bin):
    """node_client(url, mode, *args, timeout=60) -> parsed JSON result of e2e/node/ws-client.mjs."""

    def run(url: str, mode: str, *args, timeout: float = 60.0) -> dict:
        result, output = run_json([node_bin, NODE_DIR / "ws-client.mjs", url, mode, *args, "--timeout", str(timeout)],
                                  timeout=timeout + 15)
        result["_output"] = output[-4000:]
        return result

    return run


@pytest.fixture
def node_echo_server(node_bin, procs):
    """Reference echo server (Node ws 8.x, maxFragments 0) -> ws:// URL."""

    def start(*args) -> str:
        p = procs.start([node_bin, NODE_DIR / "echo-server.mjs", *args], "ws-echo-node")
        return wait_listeners(p, 1, 15)[0].url

    return start


# ---------------------------------------------------------------------- redis
class Redis:
    def __init__(self, proc: Proc, socket_path: Path | None, port: int | None):
        self.proc, self.socket_path, self.port = proc, socket_path, port

    @property
    def spec(self) -> str:
        return f"unix:{self.socket_path}" if self.socket_path else f"tcp://127.0.0.1:{self.port}"


def _redis_ping(r: Redis, timeout: float) -> bool:
    import socket as s
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if r.proc.popen.poll() is not None:
            return False
        try:
            if r.socket_path:
                c = s.socket(s.AF_UNIX, s.SOCK_STREAM)
                c.settimeout(1)
                c.connect(str(r.socket_path))
            else:
                c = s.create_connection(("127.0.0.1", r.port), timeout=1)
            with c:
                c.sendall(b"*1\r\n$4\r\nPING\r\n")
                if c.recv(64).startswith(b"+PONG"):
                    return True
        except OSError:
            pass
        time.sleep(0.05)  # polling a readiness probe, bounded by the deadline
    return False


@pytest.fixture
def redis_server(procs, sockdir, tmp_path):
    """redis_server(tcp=False) -> Redis on a Unix socket (or a free loopback TCP port), no persistence."""
    exe = shutil.which("redis-server")
    if not exe:
        pytest.fail("redis-server not found: run scripts/install-test-deps.sh")

    def start(tcp: bool = False) -> Redis:
        for attempt in range(3):
            sock = None if tcp else sockdir / f"redis{attempt}.sock"
            port = peerlib.free_tcp_port() if tcp else 0
            args = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                    "--dir", str(tmp_path), "--daemonize", "no", "--protected-mode", "no",
                    "--proto-max-bulk-len", "64mb", "--client-query-buffer-limit", "64mb"]
            if sock:
                args += ["--unixsocket", str(sock), "--unixsocketperm", "700"]
            r = Redis(procs.start(args, "redis"), sock, port or None)
            if _redis_ping(r, 10):
                return r
            r.proc.stop()
        pytest.fail("redis-server did not become ready:\n" + procs.describe_all())

    return start


# -------------------------------------------------------------------- browser
@pytest.fixture
def page_server():
    from wsgate_e2e.web import PageServer

    s = PageServer()
    yield s
    s.close()


@pytest.fixture
def browser(node_bin):
    """browser(page_url, timeout=30) -> result of e2e/node/browser.mjs (headless Debian Chromium)."""
    chromium = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    if not os.access(chromium, os.X_OK):
        pytest.fail(f"{chromium} not found: run scripts/install-test-deps.sh")

    def run(page_url: str, timeout: float = 30.0, ignore_https_errors: bool = False) -> dict:
        extra = ["--ignore-https-errors"] if ignore_https_errors else []
        result, output = run_json([node_bin, NODE_DIR / "browser.mjs", page_url, "--timeout", str(timeout),
                                   "--chromium", chromium, *extra], timeout=timeout + 30)
        result["_output"] = output[-4000:]
        return result

    return run


# ------------------------------------------------------ reverse-proxy backends
@pytest.fixture
def http_backend(node_bin, procs):
    """http_backend(*flags) -> ws:// URL of e2e/node/http-backend.mjs (HTTP + WebSocket echo)."""

    def start(*args) -> str:
        p = procs.start([node_bin, NODE_DIR / "http-backend.mjs", *args], "http-backend-node")
        return wait_listeners(p, 1, 15)[0].url

    return start


@pytest.fixture
def nginx(procs, tmp_path):
    from wsgate_e2e.proxies import start_nginx

    return lambda backend_hostport: start_nginx(procs, tmp_path, backend_hostport)


@pytest.fixture
def haproxy(procs, tmp_path):
    from wsgate_e2e.proxies import start_haproxy

    return lambda backend_hostport: start_haproxy(procs, tmp_path, backend_hostport)


# ------------------------------------------------------------ reverse tunnel
@pytest.fixture
def owners():
    """Who connected to the internal services (see wsgate_e2e.tunnel.Owners)."""
    from wsgate_e2e.tunnel import Owners

    return Owners()


@pytest.fixture
def tunnel(wsgate_bin, procs, tmp_path, owners):
    """tunnel.gateway(*flags) / tunnel.agent(gw, id, allow=...) / tunnel.connect(gw, to):
    wsgate serve with --agent-tokens (ids site-a, site-b), wsgate agent, wsgate connect."""
    from wsgate_e2e.tunnel import Tunnel

    return Tunnel(wsgate_bin, procs, tmp_path, owners)


class _Internal:
    """The services behind the NAT, each recording who connected (owners)."""

    def __init__(self, owners, tmp_path):
        self.owners, self.tmp_path, self.made = owners, tmp_path, []
        self._pki = None

    def _keep(self, s):
        self.made.append(s)
        return s

    @property
    def pki(self) -> dict:
        from wsgate_e2e.tunnel import make_ca_and_cert

        if self._pki is None:
            self._pki = make_ca_and_cert(self.tmp_path / "pki")
        return self._pki

    def http(self, name: str = "internal-http", tls: bool = False):
        from wsgate_e2e.tunnel import InternalHttp

        return self._keep(InternalHttp(self.owners, name, (self.pki["cert"], self.pki["key"]) if tls else None))

    def echo(self, name: str = "internal-echo"):
        from wsgate_e2e.tunnel import TcpEcho

        return self._keep(TcpEcho(self.owners, name))

    def blaster(self, size: int, name: str = "internal-blaster", record: bool = True):
        from wsgate_e2e.tunnel import TcpBlaster

        return self._keep(TcpBlaster(self.owners, name, size, record))

    def dns(self, name: str = "internal-dns"):
        from wsgate_e2e.tunnel import UdpDns

        return self._keep(UdpDns(self.owners, name))

    def close(self):
        for s in reversed(self.made):
            try:
                s.close()
            except Exception:  # noqa: BLE001 - best effort cleanup
                pass


@pytest.fixture
def internal(owners, tmp_path):
    """internal.http(tls=False) / .echo() / .blaster(size) / .dns(): services on
    127.0.0.1:0 that only agents are configured to reach; closed at the end."""
    i = _Internal(owners, tmp_path)
    yield i
    i.close()
