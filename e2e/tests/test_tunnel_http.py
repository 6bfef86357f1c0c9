"""Reverse tunnel, HTTP: `/request` (wsp's relay, X-PROXY-DESTINATION /
X-PROXY-AGENT) and the forward proxy (absolute-form requests, CONNECT with
TLS end to end) through a real `wsgate agent`, driven by curl, against an
internal HTTP server that only the agent reaches. Every answer of
docs/answers.md's tunnel table; the gateway never connects to a destination
itself (the internal servers see only the agent's sockets)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from wsgate_e2e import clients
from wsgate_e2e.peers import closed_tcp_port
from wsgate_e2e.tunnel import pattern

pytestmark = pytest.mark.tunnel


class Curl:
    def __init__(self, rc: int, status: int, headers: dict[str, str], body: bytes, stderr: str, seconds: float):
        self.rc, self.status, self.headers, self.body, self.stderr, self.seconds = rc, status, headers, body, stderr, seconds

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def __repr__(self):
        return f"Curl(rc={self.rc}, status={self.status}, headers={self.headers}, body={self.body[:300]!r}, stderr={self.stderr[-500:]!r})"


def curl(tmp_path: Path, *args: str, timeout: float = 60.0) -> Curl:
    exe = shutil.which("curl")
    if not exe:
        pytest.fail("curl not found: run scripts/install-test-deps.sh")
    hdr, body = tmp_path / "curl.headers", tmp_path / "curl.body"
    for p in (hdr, body):
        p.unlink(missing_ok=True)
    t0 = time.monotonic()
    cp = subprocess.run([exe, "-sS", "--max-time", str(int(timeout)), "-D", str(hdr), "-o", str(body),
                         "-w", "%{http_code}", *args], capture_output=True, text=True, timeout=timeout + 10)
    seconds = time.monotonic() - t0
    headers = {}
    if hdr.exists():
        # The last head (after a CONNECT's 200 comes the origin's).
        heads = [h for h in hdr.read_text(errors="replace").split("\r\n\r\n") if h.strip()]
        for line in (heads[-1].splitlines()[1:] if heads else []):
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
    return Curl(cp.returncode, int(cp.stdout.strip() or 0), headers, body.read_bytes() if body.exists() else b"",
                cp.stderr, seconds)


def dest(h: str) -> list[str]:
    return ["-H", f"X-PROXY-DESTINATION: {h}"]


@pytest.fixture
def site(tunnel, internal):
    """A gateway, agent site-a (pool 2) allowed to reach 127.0.0.1, and an internal HTTP server."""
    web = internal.http()
    gw = tunnel.gateway()
    a = tunnel.agent(gw, "site-a", allow=["tcp://127.0.0.1:*"], pool=2)
    gw.wait_connections("site-a", 2)
    return gw, a, web


def test_request_get_is_relayed_through_the_agent(site, tmp_path, owners):
    gw, a, web = site
    r = curl(tmp_path, *dest(web.url("/hello")), f"{gw.http}/request")
    assert (r.rc, r.status, r.body) == (0, 200, b"hello from internal-http"), r
    # The internal server saw a connection from the agent's process.
    assert r.headers.get("x-peer-owner", "").startswith("agent"), r
    owners.assert_only_agents()


def test_request_method_headers_and_query_are_relayed(site, tmp_path):
    gw, a, web = site
    r = curl(tmp_path, "-X", "PUT", "--data-binary", "put body", "-H", "X-Custom: kept", "-H", "Content-Type: text/x-test",
             *dest(web.url("/inspect?a=1&b=2")), f"{gw.http}/request")
    assert (r.rc, r.status) == (0, 200), r
    seen = json.loads(r.body)
    assert seen["method"] == "PUT" and seen["path"] == "/inspect?a=1&b=2", seen
    assert seen["headers"].get("x-custom") == "kept", seen
    assert seen["headers"].get("content-type") == "text/x-test", seen
    assert seen["body_sha256"] == hashlib.sha256(b"put body").hexdigest(), seen
    # The relay's own headers stop at the gateway; Host is the destination's.
    assert "x-proxy-destination" not in seen["headers"], seen
    assert seen["headers"].get("host") == f"127.0.0.1:{web.port}", seen
    r = curl(tmp_path, *dest(web.url("/status?code=418")), f"{gw.http}/request")
    assert r.status == 418, r


def test_request_10mb_post(site, tmp_path):
    gw, a, web = site
    data = os.urandom(10_000_000)
    f = tmp_path / "post.bin"
    f.write_bytes(data)
    r = curl(tmp_path, "--data-binary", f"@{f}", "-H", "Content-Type: application/octet-stream",
             *dest(web.url("/inspect")), f"{gw.http}/request")
    assert (r.rc, r.status) == (0, 200), r
    seen = json.loads(r.body)
    assert seen["body_len"] == len(data) and seen["body_sha256"] == hashlib.sha256(data).hexdigest(), seen
    assert not seen["chunked"], seen


def test_request_chunked_upload_and_chunked_answer(site, tmp_path):
    gw, a, web = site
    data = os.urandom(3_000_000)
    f = tmp_path / "up.bin"
    f.write_bytes(data)
    r = curl(tmp_path, "-H", "Transfer-Encoding: chunked", "--data-binary", f"@{f}",
             *dest(web.url("/inspect")), f"{gw.http}/request")
    assert (r.rc, r.status) == (0, 200), r
    seen = json.loads(r.body)
    assert seen["chunked"], f"the body did not reach the destination chunked: {seen}"
    assert seen["body_len"] == len(data) and seen["body_sha256"] == hashlib.sha256(data).hexdigest(), seen
    # An answer streamed chunked by the destination comes back whole.
    n = 5_000_000
    r = curl(tmp_path, *dest(web.url(f"/chunked?n={n}")), f"{gw.http}/request")
    assert (r.rc, r.status) == (0, 200), r
    assert len(r.body) == n and hashlib.sha256(r.body).hexdigest() == r.headers["x-sha256"], (len(r.body), r.headers)
    assert r.body == pattern(n)


def test_x_proxy_agent_picks_the_agent(tunnel, internal, tmp_path):
    web = internal.http()
    gw = tunnel.gateway()
    a = tunnel.agent(gw, "site-a", allow=["tcp://127.0.0.1:*"], name="agent-a")
    b = tunnel.agent(gw, "site-b", allow=["tcp://127.0.0.1:*"], name="agent-b")
    for who, name in (("site-a", "agent-a"), ("site-b", "agent-b"), ("site-a", "agent-a"), ("site-b", "agent-b")):
        r = curl(tmp_path, "-H", f"X-PROXY-AGENT: {who}", *dest(web.url("/hello")), f"{gw.http}/request")
        assert r.status == 200 and r.headers["x-peer-owner"] == name, (who, r)
    del a, b


def test_forward_proxy_absolute_form(site, tmp_path, owners):
    gw, a, web = site
    r = curl(tmp_path, "-x", gw.http, web.url("/hello"))
    assert (r.rc, r.status, r.body) == (0, 200, b"hello from internal-http"), r
    data = os.urandom(1_000_000)
    f = tmp_path / "p.bin"
    f.write_bytes(data)
    r = curl(tmp_path, "-x", gw.http, "--data-binary", f"@{f}", web.url("/inspect?via=proxy"))
    seen = json.loads(r.body)
    assert seen["path"] == "/inspect?via=proxy" and seen["body_sha256"] == hashlib.sha256(data).hexdigest(), seen
    assert gw.metric("wsgate_tunnel_streams_total", via="forward_proxy", outcome="ok") >= 2
    owners.assert_only_agents()


def test_connect_https_is_tls_end_to_end(tunnel, internal, tmp_path, owners):
    tls = internal.http("internal-https", tls=True)
    gw = tunnel.gateway()
    tunnel.agent(gw, "site-a", allow=["tcp://127.0.0.1:*"])
    ca = str(internal.pki["ca"])
    r = curl(tmp_path, "-v", "--cacert", ca, "-x", gw.http, tls.url("/hello", "https"))
    assert (r.rc, r.status, r.body) == (0, 200, b"hello from internal-https"), r
    # curl checked the internal server's certificate (our test CA) through
    # the tunnel: the gateway relays bytes, it does not terminate TLS.
    assert "wsgate e2e test CA" in r.stderr and "CONNECT 127.0.0.1:" in r.stderr, r.stderr[-3000:]
    # Without the CA, verification fails: nothing in between presents a trusted certificate.
    r = curl(tmp_path, "-x", gw.http, tls.url("/hello", "https"))
    assert r.rc == 60, r
    assert gw.metric("wsgate_tunnel_streams_total", via="connect", outcome="ok") >= 2
    owners.assert_only_agents()


def test_tunnel_answers(tunnel, internal, tmp_path):
    """docs/answers.md: 503 naming the missing agent, 403 with the agent's
    reason, 502 unreachable, 400 for a missing or unparsable destination."""
    web = internal.http()
    gw = tunnel.gateway()
    tunnel.agent(gw, "site-a", allow=[f"tcp://127.0.0.1:{web.port}", "tcp://127.0.0.1:1-1024"])
    sock, closed = closed_tcp_port()
    try:
        req = f"{gw.http}/request"
        # No such agent connected (site-b has a token but no agent).
        r = curl(tmp_path, "-H", "X-PROXY-AGENT: site-b", *dest(web.url("/hello")), req)
        assert r.status == 503 and "site-b" in r.text, r
        # No agent whose allow list covers the destination.
        r = curl(tmp_path, *dest(f"http://127.0.0.1:{closed}/"), req)
        assert r.status == 503 and f"127.0.0.1:{closed}" in r.text, r
        r = curl(tmp_path, "-x", gw.http, f"http://127.0.0.1:{closed}/")
        assert r.status == 503, r
        # Named agent, destination outside its --allow: the agent refuses it.
        r = curl(tmp_path, "-H", "X-PROXY-AGENT: site-a", *dest(f"http://127.0.0.1:{closed}/"), req)
        assert r.status == 403 and "allow" in r.text and f"127.0.0.1:{closed}" in r.text, r
        # Allowed but nothing listens: 502 (port 1 on loopback refuses).
        r = curl(tmp_path, *dest("http://127.0.0.1:1/"), req)
        assert r.status == 502 and "refused" in r.text.lower(), r
        r = curl(tmp_path, "-x", gw.http, "http://127.0.0.1:1/x")
        assert r.status == 502, r
        # CONNECT: 503 when nobody covers it, 502 when unreachable.
        r = curl(tmp_path, "-p", "-x", gw.http, f"http://127.0.0.1:{closed}/")
        assert r.rc != 0 and "503" in r.stderr, r
        r = curl(tmp_path, "-p", "-x", gw.http, "http://127.0.0.1:1/")
        assert r.rc != 0 and "502" in r.stderr, r
        # Missing or unparsable X-PROXY-DESTINATION, https:// on /request, a bad X-PROXY-AGENT.
        for h in ([], dest("not a url"), dest("ftp://127.0.0.1/x"), dest("https://127.0.0.1:443/"),
                  ["-H", "X-PROXY-AGENT: ../etc", *dest(web.url("/hello"))]):
            r = curl(tmp_path, *h, req)
            assert r.status == 400, (h, r)
        # The refusals are counted.
        assert gw.metric("wsgate_handshake_refusals_total", reason="agent_unavailable") >= 4
        assert gw.metric("wsgate_handshake_refusals_total", reason="agent_refused") >= 1
        assert gw.metric("wsgate_handshake_refusals_total", reason="bad_destination") >= 5
        # Nothing was relayed to the internal server by any of these.
        assert web.httpd.owners.of("internal-http") == []
    finally:
        sock.close()


def test_no_answer_in_time_is_504(tunnel, internal, tmp_path, write_config):
    """No answer from the destination within backend_timeout, and no reply
    from a frozen agent within open_timeout: 504, promptly."""
    web = internal.http()
    cfg = write_config(f"""
        [[listener]]
        address = "127.0.0.1:0"

        [limits]
        backend_timeout = "2s"

        [admin]
        address = "127.0.0.1:0"

        [tunnel]
        agent_tokens = "{tunnel.tokens_file}"
        open_timeout = "1s"
    """)
    gw = tunnel.gateway(config=cfg)
    a = tunnel.agent(gw, "site-a", allow=["tcp://127.0.0.1:*"])
    r = curl(tmp_path, *dest(web.url("/hang")), f"{gw.http}/request")
    assert r.status == 504 and web.hanging.is_set(), r
    assert 1.5 < r.seconds < 6, r.seconds
    # A frozen agent does not answer the open request.
    a.proc.send_signal(signal.SIGSTOP)
    try:
        r = curl(tmp_path, *dest(web.url("/hello")), f"{gw.http}/request")
        assert r.status == 504 and "did not answer" in r.text, r
        assert r.seconds < 5, r.seconds
    finally:
        a.proc.send_signal(signal.SIGCONT)
    assert gw.metric("wsgate_handshake_refusals_total", reason="agent_timeout") >= 2


def test_quick_mode_tunnel_paths_come_before_to(tunnel, internal, tmp_path):
    """With --to, /agent, /request, /mux and absolute-form requests are the
    tunnel's; every other path is the --to route's."""
    web = internal.http()
    echo = internal.echo()
    gw = tunnel.gateway("--to", "echo:", "--mux-allow", "agent://site-a/tcp://127.0.0.1:*")
    tunnel.agent(gw, "site-a", allow=["tcp://127.0.0.1:*"])
    r = curl(tmp_path, *dest(web.url("/hello")), f"{gw.http}/request")
    assert r.status == 200 and r.body == b"hello from internal-http", r
    r = curl(tmp_path, "-x", gw.http, web.url("/hello"))
    assert r.status == 200, r
    with clients.connect(gw.url + "/anything") as ws:
        ws.send(b"to the echo route")
        assert clients.as_bytes(ws.recv(timeout=10)) == b"to the echo route"
    from wsgate_e2e.tunnel import MuxClient, open_request, reply_of

    m = MuxClient(gw.url + "/mux")
    try:
        assert m.subprotocol == "wsmux.v1"
        sid = m.open(open_request(f"agent://site-a/tcp://{echo.addr}"))
        m.pump(lambda: reply_of(bytes(m.data[sid])) is not None)
        assert reply_of(bytes(m.data[sid]))[0] == 0
    finally:
        m.close()


def test_the_gateway_never_connects_to_a_destination_itself(tunnel, internal, tmp_path, owners):
    """Behind NAT on one machine: with no agent, every path to the internal
    server is refused and the server sees nothing; with an agent, everything
    that reaches it comes from the agent's process."""
    web = internal.http()
    tls = internal.http("internal-https", tls=True)
    gw = tunnel.gateway()
    attempts = [
        [*dest(web.url("/hello")), f"{gw.http}/request"],
        ["-x", gw.http, web.url("/hello")],
        ["-p", "-x", gw.http, web.url("/hello")],
        ["--cacert", str(internal.pki["ca"]), "-x", gw.http, tls.url("/hello", "https")],
    ]
    for args in attempts:
        r = curl(tmp_path, *args)
        assert r.status == 503 or "503" in r.stderr, (args, r)
    assert owners.seen == [], f"reached without an agent: {owners.seen}"
    tunnel.agent(gw, "site-a", allow=["tcp://127.0.0.1:*"])
    for args in attempts:
        r = curl(tmp_path, *args)
        assert r.status == 200 and r.body.startswith(b"hello from internal-http"), (args, r)
    owners.assert_only_agents(min_seen=4)
