"""The reverse tunnel's end-to-end pieces (docs/tunnel.md, docs/agent.md).

* `TunnelGateway`: `wsgate serve` with tunnel flags, its admin listener
  (`GET /agents`, `/metrics`) and its `forwarding ...` lines;
* `Agent`: a `wsgate agent` process, started and waited for until it prints
  `agent ID registered at URL`;
* "internal" services, the ones behind the NAT: an HTTP server (plain or TLS
  with a test CA made by `openssl`) with endpoints for the relay tests, a TCP
  echo, a blaster (N bytes per connection, then EOF), a UDP DNS-like echo.
  Every one of them records, for each connection or datagram it gets, **which
  process** sent it (the peer socket's owner, looked up in `/proc`): that is
  how the tests assert "behind NAT" on one machine — every byte that reached
  an internal service came from an agent process, none from the gateway or
  from a test client (`Owners.assert_only_agents`);
* `MuxClient`: a minimal wsmux client (docs/mux.md) over the sync
  `websockets` client, for what `wsgate connect` cannot send (garbage open
  requests).

Everything listens on 127.0.0.1 ephemeral ports; every wait has a deadline.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Callable, Sequence

from .httpd import LoopbackHTTPServer
from .procs import Proc, ProcessError, ProcessGroup, wait_listeners

AGENT_RE = re.compile(r"^agent (\S+) registered at (\S+)$")
ADMIN_RE = re.compile(r"^admin on (http://\S+)$")
FORWARD_RE = re.compile(r"^forwarding (tcp|udp)://(\S+):(\d+) to (agent://\S+)$")
CONNECT_LISTEN_RE = re.compile(r"^listening on (tcp|udp)://(\S+):(\d+)$")


def poll(what: str, check: Callable[[], object], timeout: float, interval: float = 0.05):
    """Calls `check` until it returns something truthy (returned) or `timeout`
    runs out (AssertionError naming `what` and the last value)."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        last = check()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
        time.sleep(interval)  # polling a condition, bounded by the deadline


def write_tokens(d: Path, tokens: dict[str, str], name: str = "agents.txt") -> Path:
    """The gateway's `--agent-tokens` file: one `ID TOKEN` line each."""
    p = d / name
    p.write_text("# wsgate e2e agent tokens\n" + "".join(f"{i} {t}\n" for i, t in tokens.items()))
    return p


# ------------------------------------------------------------ who sent this?
def _hexaddr(addr: tuple[str, int]) -> str:
    return socket.inet_aton(addr[0])[::-1].hex().upper() + ":%04X" % addr[1]


def socket_inode(local: tuple[str, int], remote: tuple[str, int] | None, proto: str = "tcp") -> int | None:
    """The inode of the IPv4 socket bound to `local` (and connected to
    `remote`, if given), from /proc/net/tcp or /proc/net/udp."""
    want_l, want_r = _hexaddr(local), _hexaddr(remote) if remote else None
    try:
        lines = Path(f"/proc/net/{proto}").read_text().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        f = line.split()
        if f[1] == want_l and (want_r is None or f[2] == want_r):
            return int(f[9])
    return None


def pid_has_socket(pid: int, inode: int) -> bool:
    target = f"socket:[{inode}]"
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                return True
        except OSError:
            continue
    return False


class Owners:
    """Names of the processes the tests watch (`watch(name, pid)`), and what
    each internal service saw: the owner of every connection's (datagram's)
    peer socket, by name; `?` when no watched process owns it (a test client,
    or a socket already gone)."""

    def __init__(self):
        self.pids: dict[str, int] = {}
        self.seen: list[tuple[str, str]] = []  # (service, owner)
        self._lock = threading.Lock()

    def watch(self, name: str, pid: int):
        self.pids[name] = pid

    def owner(self, peer: tuple[str, int], local: tuple[str, int], proto: str = "tcp") -> str:
        inode = socket_inode(peer, local if proto == "tcp" else None, proto)
        if inode is None:
            return "?"
        for name, pid in list(self.pids.items()):
            if pid_has_socket(pid, inode):
                return name
        # The test process itself (a client of ours) counts as "test".
        if pid_has_socket(os.getpid(), inode):
            return "test"
        return "?"

    def record(self, service: str, peer, local, proto: str = "tcp") -> str:
        o = self.owner(peer, local, proto)
        with self._lock:
            self.seen.append((service, o))
        return o

    def of(self, service: str) -> list[str]:
        with self._lock:
            return [o for s, o in self.seen if s == service]

    def assert_only_agents(self, min_seen: int = 1):
        """Every connection an internal service accepted came from an agent
        process (watched under a name starting with `agent`): the gateway and
        the test's own clients never reached the services behind the NAT."""
        with self._lock:
            seen = list(self.seen)
        assert len(seen) >= min_seen, f"the internal services saw {len(seen)} connection(s): {seen}"
        bad = [(s, o) for s, o in seen if not o.startswith("agent")]
        assert not bad, f"internal services reached by something other than an agent: {bad} (watched: {self.pids})"


# ------------------------------------------------------------ internal HTTP
class _HttpHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "InternalHttp._Server"

    def log_message(self, *args):
        pass

    def _body(self) -> tuple[bytes, bool]:
        te = (self.headers.get("Transfer-Encoding") or "").lower()
        if "chunked" in te:
            out = bytearray()
            while True:
                size_line = self.rfile.readline(1024)
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out), True
                out += self.rfile.read(size)
                self.rfile.readline(8)
        n = int(self.headers.get("Content-Length") or 0)
        return (self.rfile.read(n) if n else b""), False

    def _send(self, status: int, body: bytes, ctype: str = "text/plain", extra: dict | None = None):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Served-By", self.server.name)
        self.send_header("X-Peer-Owner", self.peer_owner)
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def setup(self):
        if isinstance(self.request, ssl.SSLSocket):
            self.request.do_handshake()
        super().setup()
        self.peer_owner = self.server.owners.record(self.server.name, self.client_address,
                                                    self.server.server_address)

    def _any(self):
        path = self.path.split("?")[0]
        query = dict(p.split("=", 1) for p in self.path.split("?", 1)[1].split("&")) if "?" in self.path else {}
        body, chunked = self._body()
        if path == "/hello":
            return self._send(200, f"hello from {self.server.name}".encode())
        if path == "/inspect":
            info = {"method": self.command, "path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()},
                    "body_len": len(body), "body_sha256": hashlib.sha256(body).hexdigest(), "chunked": chunked,
                    "peer_owner": self.peer_owner}
            return self._send(200, json.dumps(info).encode(), "application/json")
        if path == "/status":
            return self._send(int(query.get("code", "200")), b"status\n")
        if path == "/chunked":
            # A streamed (chunked) answer of n bytes in chunks of 16 KiB.
            n = int(query.get("n", "1000000"))
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("X-Sha256", hashlib.sha256(pattern(n)).hexdigest())
            self.end_headers()
            data = pattern(n)
            for i in range(0, n, 16384):
                c = data[i:i + 16384]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(c), c))
            self.wfile.write(b"0\r\n\r\n")
            return
        if path == "/trickle":
            # A chunked answer that never ends: a chunk every 20 ms until the
            # client goes away (for "agent killed mid-transfer").
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.server.trickling.set()
            try:
                while not self.server.stopping.is_set():
                    self.wfile.write(b"400\r\n" + b"t" * 1024 + b"\r\n")
                    self.wfile.flush()
                    self.server.stopping.wait(0.02)  # the pace of the stream, not a synchronisation
            except OSError:
                pass
            self.close_connection = True
            return
        if path == "/hang":
            # Never answers (for "no answer in time").
            self.server.hanging.set()
            self.server.stopping.wait(120)
            self.close_connection = True
            return
        return self._send(404, b"no such path\n")

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _any


class InternalHttp:
    """An HTTP/1.1 server behind the NAT on 127.0.0.1:0 (TLS with `tls=(cert,
    key)`). Paths: /hello, /inspect (method, headers, body length and hash,
    whether it came chunked), /status?code=N, /chunked?n=N (a chunked answer,
    hash in X-Sha256), /trickle (a chunked answer that never ends), /hang
    (never answers)."""

    class _Server(LoopbackHTTPServer):
        allow_reuse_address = True
        request_queue_size = 256

    def __init__(self, owners: Owners, name: str = "internal-http", tls: tuple[Path, Path] | None = None):
        self.httpd = self._Server(("127.0.0.1", 0), _HttpHandler)
        self.httpd.name = name
        self.httpd.owners = owners
        self.httpd.stopping = threading.Event()
        self.httpd.trickling = threading.Event()
        self.httpd.hanging = threading.Event()
        if tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(str(tls[0]), str(tls[1]))
            # The handshake happens in the handler's thread (`setup`), not in
            # accept(): a client that never sends its hello holds only its own
            # thread, never the serve_forever loop.
            self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True,
                                                do_handshake_on_connect=False)
        self.port = self.httpd.server_address[1]
        self.name = name
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self.thread.start()

    @property
    def trickling(self) -> threading.Event:
        return self.httpd.trickling

    @property
    def hanging(self) -> threading.Event:
        return self.httpd.hanging

    def url(self, path: str = "/", scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    def close(self):
        self.httpd.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=2)


def pattern(n: int) -> bytes:
    block = hashlib.sha256(b"wsgate-tunnel").digest() * 2048  # 64 KiB
    reps = n // len(block) + 1
    return (block * reps)[:n]


# ------------------------------------------------------------ internal TCP/UDP
class _TcpService:
    # record=False: no owner lookup per connection (it reads /proc/net/tcp
    # and the watched processes' descriptors: too slow for 1,000 at once).
    def __init__(self, owners: Owners, name: str, record: bool = True):
        self.owners, self.name, self.record = owners, name, record
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1024)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self.accepted = 0
        self.closed = 0  # connections whose handler has ended
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self):
        while not self._stop.is_set():
            try:
                c, peer = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            self._conns.append(c)
            owner = self.owners.record(self.name, peer, ("127.0.0.1", self.port)) if self.record else "?"
            threading.Thread(target=self._run, args=(c, owner), daemon=True).start()

    def _run(self, c: socket.socket, owner: str):
        try:
            self.handle(c, owner)
        except OSError:
            pass
        finally:
            try:
                c.close()
            except OSError:
                pass
            self.closed += 1

    def handle(self, c: socket.socket, owner: str):  # pragma: no cover - overridden
        raise NotImplementedError

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


class TcpEcho(_TcpService):
    """Echoes; on EOF half-closes its side."""

    def handle(self, c, owner):
        while True:
            d = c.recv(256 * 1024)
            if not d:
                c.shutdown(socket.SHUT_WR)
                return
            c.sendall(d)


class TcpBlaster(_TcpService):
    """Writes `size` bytes of `pattern()` (in 64 KiB writes) then closes;
    `.sent` counts what the kernel took, per connection, in accept order."""

    def __init__(self, owners: Owners, name: str, size: int, record: bool = True):
        self.size = size
        self.sent: list[int] = []
        self.done = 0
        self._data = pattern(size)
        super().__init__(owners, name, record)

    def handle(self, c, owner):
        i = len(self.sent)
        self.sent.append(0)
        mv = memoryview(self._data)
        for off in range(0, self.size, 65536):
            c.sendall(mv[off:off + 65536])
            self.sent[i] += len(mv[off:off + 65536])
        c.shutdown(socket.SHUT_WR)
        self.done += 1
        c.settimeout(30)
        while c.recv(65536):
            pass


def dns_query(qid: int, name: str) -> bytes:
    """A DNS-like query: id, flags (RD), one question for `name`, type A."""
    q = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\x00"
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + q + struct.pack("!HH", 1, 1)


class UdpDns:
    """A DNS-like UDP responder: answers each query with the same id, the QR
    bit set, the question, and one A record 10.0.0.<qid % 256>; records the
    owner of each datagram's source socket."""

    def __init__(self, owners: Owners, name: str = "internal-dns"):
        self.owners, self.name = owners, name
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.datagrams = 0
        self.sources: set[tuple[str, int]] = set()
        threading.Thread(target=self._loop, daemon=True).start()

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    @staticmethod
    def answer(query: bytes) -> bytes:
        qid, flags = struct.unpack("!HH", query[:4])
        question = query[12:]
        rr = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + bytes([10, 0, 0, qid % 256])
        return struct.pack("!HHHHHH", qid, 0x8180, 1, 1, 0, 0) + question + rr

    def _loop(self):
        while True:
            try:
                d, src = self.sock.recvfrom(65536)
            except OSError:
                return
            self.datagrams += 1
            if src not in self.sources:
                self.sources.add(src)
                self.owners.record(self.name, src, ("127.0.0.1", self.port), proto="udp")
            try:
                self.sock.sendto(self.answer(d), src)
            except OSError:
                pass

    def close(self):
        self.sock.close()


# ------------------------------------------------------------ certificates
def make_ca_and_cert(d: Path, cn: str = "internal.test") -> dict[str, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1/localhost signed
    by it (EC P-256, `openssl`). Returns paths: ca, cert, key."""
    openssl = shutil.which("openssl")
    if not openssl:
        raise AssertionError("openssl not found: run scripts/install-test-deps.sh")
    d.mkdir(parents=True, exist_ok=True)
    ca_key, ca, key, csr, cert = (d / n for n in ("ca.key", "ca.pem", "srv.key", "srv.csr", "srv.pem"))
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*a):
        subprocess.run([openssl, *a], check=True, capture_output=True, timeout=30)

    run("req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", "2", "-subj", "/CN=wsgate e2e test CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    run("req", *ec, "-keyout", key, "-out", csr, "-subj", f"/CN={cn}")
    ext = d / "srv.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
                   "keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n")
    run("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert,
        "-days", "2", "-extfile", ext)
    return {"ca": ca, "cert": cert, "key": key}


# ------------------------------------------------------------ processes
def http_json(url: str, timeout: float = 5.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - loopback test URL
        return json.loads(r.read())


def http_text(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310
        return r.read().decode()


class TunnelGateway:
    def __init__(self, proc: Proc, host: str, port: int, admin: str | None, forwards: list[tuple[str, str, int, str]]):
        self.proc, self.host, self.port, self.admin, self.forwards = proc, host, port, admin, forwards

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    @property
    def http(self) -> str:
        return f"http://{self.host}:{self.port}"

    def forward(self, i: int = 0) -> tuple[str, int]:
        _, h, p, _ = self.forwards[i]
        return h, p

    def agents(self) -> dict[str, dict]:
        """`GET /agents` on the admin listener, by id."""
        assert self.admin, "start the gateway with admin=True"
        data = http_json(self.admin + "/agents")
        items = data if isinstance(data, list) else data.get("agents", data)
        if isinstance(items, dict):
            return items
        return {a["id"]: a for a in items}

    def connections(self, agent_id: str) -> int:
        try:
            a = self.agents().get(agent_id)
        except OSError:
            return -1
        return a["connections"] if a else 0

    def wait_connections(self, agent_id: str, n: int, timeout: float = 15.0) -> dict:
        poll(f"{n} connection(s) of agent {agent_id} in GET /agents", lambda: self.connections(agent_id) == n,
             timeout)
        return self.agents().get(agent_id, {})

    def metrics(self) -> str:
        assert self.admin, "start the gateway with admin=True"
        return http_text(self.admin + "/metrics")

    def metric(self, name: str, **labels) -> float:
        """The value of one series (0 when absent)."""
        total = 0.0
        for line in self.metrics().splitlines():
            if not line.startswith(name) or line.startswith("#"):
                continue
            m = re.match(r"^([a-zA-Z_:]+)(\{[^}]*\})?\s+(\S+)", line)
            if not m or m.group(1) != name:
                continue
            lab = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
            if all(lab.get(k) == v for k, v in labels.items()):
                total += float(m.group(3))
        return total

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")


class Agent:
    def __init__(self, proc: Proc, agent_id: str, url: str, name: str):
        # `name`: what Owners calls its sockets.
        self.proc, self.id, self.url, self.name = proc, agent_id, url, name

    @property
    def pid(self) -> int:
        return self.proc.pid


class Tunnel:
    """Starts gateways, agents and `wsgate connect` for one test (the
    `tunnel` fixture); everything is stopped by the test's ProcessGroup."""

    def __init__(self, wsgate_bin: Path, procs: ProcessGroup, tmp: Path, owners: Owners):
        self.bin, self.procs, self.tmp, self.owners = wsgate_bin, procs, tmp, owners
        self.tokens = {"site-a": "token-site-a-0123456789", "site-b": "token-site-b-0123456789"}
        self.tokens_file = write_tokens(tmp, self.tokens)
        self._agents = 0
        self._gateways = 0

    def env(self) -> dict[str, str]:
        return {"RUST_LOG": os.environ.get("RUST_LOG", "info"), "RUST_BACKTRACE": "1"}

    def gateway(self, *flags: str, listen: str = "127.0.0.1:0", admin: bool = True, tokens: bool = True,
                config: Path | None = None, timeout: float = 20.0) -> TunnelGateway:
        """`wsgate serve --listen LISTEN --agent-tokens FILE [--admin 127.0.0.1:0] FLAGS...`
        (or `--config FILE`); waits for its listening, admin and forwarding lines."""
        if config:
            argv = ["serve", "--config", config, *flags]
            forwards = len(re.findall(r"^\s*\[\[tunnel\.forward\]\]", config.read_text(), re.M))
        else:
            argv = ["serve", "--listen", listen]
            if tokens:
                argv += ["--agent-tokens", self.tokens_file]
            if admin:
                argv += ["--admin", "127.0.0.1:0"]
            argv += list(flags)
            forwards = list(flags).count("--forward")
        self._gateways += 1
        p = self.procs.start([self.bin, *argv], f"gateway{self._gateways}", env=self.env())
        self.owners.watch(f"gateway{self._gateways}", p.pid)
        lst = wait_listeners(p, 1, timeout)[0]
        admin_url = None
        if admin:
            admin_url = p.wait_lines(ADMIN_RE, 1, timeout)[0].group(1)
        fw = [(m.group(1), m.group(2), int(m.group(3)), m.group(4)) for m in p.wait_lines(FORWARD_RE, forwards, timeout)] \
            if forwards else []
        return TunnelGateway(p, lst.host, lst.port, admin_url, fw)

    def agent(self, gw: TunnelGateway | str, agent_id: str = "site-a", allow: Sequence[str] = ("tcp://127.0.0.1:*",),
              pool: int = 1, token: str | None = None, extra: Sequence[str] = (), wait: bool = True,
              timeout: float = 20.0, name: str | None = None) -> Agent:
        """`wsgate agent --server ws://GW/agent --id ID --token-file F --allow ... --pool N`,
        waited for until it prints `agent ID registered at URL` (unless wait=False)."""
        self._agents += 1
        name = name or f"agent{self._agents}-{agent_id}"
        tf = self.tmp / f"{name}.token"
        tf.write_text((token if token is not None else self.tokens.get(agent_id, "no-such-token-000")) + "\n")
        url = gw if isinstance(gw, str) else gw.url + "/agent"
        argv = [self.bin, "agent", "--server", url, "--id", agent_id, "--token-file", tf, "--pool", str(pool)]
        for a in allow:
            argv += ["--allow", a]
        argv += list(extra)
        before = gw.connections(agent_id) if isinstance(gw, TunnelGateway) and gw.admin else None
        p = self.procs.start(argv, name, env=self.env())
        self.owners.watch(name, p.pid)
        if wait:
            m = p.wait_lines(AGENT_RE, 1, timeout)[0]
            assert m.group(1) == agent_id and m.group(2) == url, m.group(0)
            # The agent prints its line when its first 101 arrives; the
            # gateway lists the connection a moment later. Streams opened in
            # between find no agent, so wait for all `pool` links.
            if before is not None and before >= 0:
                poll(f"the gateway listing {pool} more link(s) of {agent_id}",
                     lambda: gw.connections(agent_id) >= before + pool, timeout)
        return Agent(p, agent_id, url, name)

    def connect(self, gw: TunnelGateway, to: str, *extra: str, timeout: float = 20.0) -> tuple[Proc, str, int]:
        """`wsgate connect ws://GW/mux --to TO --listen 127.0.0.1:0`: (proc, host, port)."""
        p = self.procs.start([self.bin, "connect", gw.url + "/mux", "--to", to, "--listen", "127.0.0.1:0", *extra],
                             "connect", env=self.env())
        self.owners.watch("connect", p.pid)
        m = p.wait_lines(CONNECT_LISTEN_RE, 1, timeout)[0]
        return p, m.group(2), int(m.group(3))


# ------------------------------------------------------------ wsmux client
MUX_DATA, MUX_WINDOW, MUX_PING, MUX_GOAWAY = 0, 1, 2, 3
SYN, ACK, FIN, RST = 0x1, 0x2, 0x4, 0x8
BAD_OPEN = 0x100


def mux_frame(ftype: int, flags: int, sid: int, value: int = 0, payload: bytes = b"") -> bytes:
    return struct.pack("!BBHII", 1, ftype, flags, sid, value) + payload


def open_request(dest: str) -> bytes:
    d = dest.encode()
    return b"W\x01" + struct.pack("!H", len(d)) + d


class MuxClient:
    """A minimal wsmux session as the WebSocket client (odd stream ids) over
    the sync `websockets` client: enough to open streams, send bytes, and see
    what comes back per stream (data, FIN, RST and its code); PINGs are
    answered as they arrive."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 10.0):
        from websockets.sync.client import connect

        headers = {"Authorization": f"Bearer {token}"} if token else None
        self.ws = connect(url, subprotocols=["wsmux.v1"], compression=None, proxy=None, max_size=None,
                          open_timeout=timeout, close_timeout=2, ping_interval=None, additional_headers=headers,
                          legacy=True)
        self.next_id = 1
        self.data: dict[int, bytearray] = {}
        self.fin: set[int] = set()
        self.rst: dict[int, int] = {}
        self.goaway: int | None = None

    @property
    def subprotocol(self):
        return self.ws.subprotocol

    def open(self, first: bytes) -> int:
        sid = self.next_id
        self.next_id += 2
        self.data[sid] = bytearray()
        self.ws.send(mux_frame(MUX_DATA, SYN, sid, 0, first))
        return sid

    def send(self, sid: int, data: bytes, fin: bool = False):
        self.ws.send(mux_frame(MUX_DATA, FIN if fin else 0, sid, 0, data))

    def pump(self, until: Callable[[], bool], timeout: float = 10.0):
        deadline = time.monotonic() + timeout
        while not until():
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"mux: timed out; data={ {k: bytes(v[:64]) for k, v in self.data.items()} } "
                                     f"fin={self.fin} rst={self.rst} goaway={self.goaway}")
            try:
                m = self.ws.recv(timeout=left)
            except TimeoutError:
                continue
            if isinstance(m, str) or len(m) < 12:
                raise AssertionError(f"mux: not a frame: {m!r}")
            _, ftype, flags, sid, value = struct.unpack("!BBHII", m[:12])
            if ftype == MUX_PING and flags & SYN:
                self.ws.send(mux_frame(MUX_PING, ACK, 0, value))
            elif ftype == MUX_GOAWAY:
                self.goaway = value
            elif ftype == MUX_DATA:
                if flags & RST:
                    self.rst[sid] = value
                else:
                    self.data.setdefault(sid, bytearray()).extend(m[12:])
                    if flags & FIN:
                        self.fin.add(sid)
            elif ftype == MUX_WINDOW and flags & FIN:
                self.fin.add(sid)

    def close(self):
        try:
            self.ws.close()
        except Exception:  # noqa: BLE001
            pass


def reply_of(buf: bytes) -> tuple[int, str, bytes] | None:
    """The tunnel reply at the start of `buf`: (status, message, rest)."""
    if len(buf) < 4:
        return None
    n = struct.unpack("!H", buf[2:4])[0]
    if len(buf) < 4 + n:
        return None
    assert buf[0] == 1, f"reply version {buf[0]}"
    return buf[1], buf[4:4 + n].decode(), bytes(buf[4 + n:])


def wait_exit(proc: Proc, timeout: float) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise ProcessError(f"{proc.name} did not exit within {timeout}s\n{proc.describe()}")
