"""Reverse tunnel, `/mux` and `wsgate connect`: a local listener and stdio
through an agent, real `ssh` to a real `sshd` (Debian's openssh-server on an
ephemeral loopback port) with `ProxyCommand='wsgate connect ... --stdio'`,
`--mux-allow` default deny, and garbage open requests from a hand-written
wsmux client (the stream is reset with BAD_OPEN, the session goes on)."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess

import pytest

from wsgate_e2e import rawws
from wsgate_e2e.sshd import start_sshd, unusable_reason
from wsgate_e2e.tunnel import BAD_OPEN, MuxClient, open_request, reply_of

pytestmark = pytest.mark.tunnel

MUX = "agent://site-a/tcp://127.0.0.1:*"


def test_connect_listen_echo(tunnel, internal, owners):
    echo = internal.echo()
    gw = tunnel.gateway("--mux-allow", MUX)
    tunnel.agent(gw, "site-a", allow=["tcp://127.0.0.1:*"])
    _, host, port = tunnel.connect(gw, f"agent://site-a/tcp://{echo.addr}")
    for n in (1, 70_000, 1_000_000):
        data = os.urandom(n)
        with socket.create_connection((host, port), timeout=10) as s:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            got = bytearray()
            s.settimeout(10)
            while d := s.recv(262144):
                got += d
        assert bytes(got) == data, (n, len(got))
    assert gw.metric("wsgate_tunnel_streams_total", via="mux", outcome="ok") == 3
    owners.assert_only_agents(min_seen=3)


def test_connect_stdio_is_one_stream_with_half_close(tunnel, internal, wsgate_bin):
    echo = internal.echo()
    gw = tunnel.gateway("--mux-allow", MUX)
    tunnel.agent(gw, "site-a", allow=["tcp://127.0.0.1:*"])
    data = os.urandom(3_000_000)
    cp = subprocess.run([wsgate_bin, "connect", gw.url + "/mux", "--to", f"agent://site-a/tcp://{echo.addr}", "--stdio"],
                        input=data, capture_output=True, timeout=60)
    assert cp.returncode == 0, cp.stderr[-2000:]
    assert cp.stdout == data, (len(cp.stdout), cp.stderr[-2000:])


@pytest.fixture
def sshd(procs, tmp_path):
    why = unusable_reason()
    if why:
        pytest.fail(why)
    return start_sshd(procs, tmp_path / "sshd")


def test_ssh_through_wsgate_connect_stdio(tunnel, sshd, wsgate_bin, tmp_path):
    gw = tunnel.gateway("--mux-allow", MUX)
    tunnel.agent(gw, "site-a", allow=[f"tcp://127.0.0.1:{sshd.port}"])
    proxy = f"{wsgate_bin} connect {gw.url}/mux --to agent://site-a/tcp://%h:%p --stdio"
    data = os.urandom(2_000_000)
    cp = subprocess.run(sshd.ssh_argv("-o", f"ProxyCommand={proxy}") + ["echo hello from $(id -un); sha256sum"],
                        input=data, capture_output=True, timeout=90)
    out = cp.stdout.decode(errors="replace")
    assert cp.returncode == 0, (out, cp.stderr.decode(errors="replace")[-3000:], sshd.proc.stderr_text())
    assert out.splitlines()[0] == f"hello from {sshd.user}", out
    assert out.splitlines()[1].split()[0] == hashlib.sha256(data).hexdigest(), out
    # sshd's peer was the agent: its log names the connection, the gateway counted one mux stream.
    assert "Accepted publickey" in sshd.proc.stderr_text()
    assert gw.metric("wsgate_tunnel_streams_total", via="mux", outcome="ok") == 1
    # Without the tunnel the same ssh command cannot get through a refused destination.
    bad = f"{wsgate_bin} connect {gw.url}/mux --to agent://site-a/tcp://%h:1 --stdio"
    cp = subprocess.run(sshd.ssh_argv("-o", f"ProxyCommand={bad}") + ["true"], capture_output=True, timeout=60)
    assert cp.returncode != 0 and b"NOT_ALLOWED" in cp.stderr, cp.stderr[-2000:]


def test_mux_is_off_by_default_and_default_deny(tunnel, internal, wsgate_bin):
    echo = internal.echo()
    gw = tunnel.gateway()
    r = rawws.raw_exchange(gw.host, gw.port, rawws.ws_request("/mux", protocols=["wsmux.v1"]))
    assert r.status == 404, (r.status, r.body)
    gw = tunnel.gateway("--mux-allow", f"agent://site-a/tcp://127.0.0.1:{echo.port}")

    def stdio(to: str):
        return subprocess.run([wsgate_bin, "connect", gw.url + "/mux", "--to", to, "--stdio"], input=b"x",
                              capture_output=True, timeout=30)

    # site-a is not connected yet.
    cp = stdio(f"agent://site-a/tcp://{echo.addr}")
    assert cp.returncode == 1 and b"NO_AGENT" in cp.stderr, cp.stderr
    tunnel.agent(gw, "site-a", allow=["tcp://127.0.0.1:*"])
    cp = stdio(f"agent://site-a/tcp://{echo.addr}")
    assert cp.returncode == 0 and cp.stdout == b"x", cp.stderr
    for to in (f"tcp://{echo.addr}", f"agent://site-b/tcp://{echo.addr}", "agent://site-a/tcp://127.0.0.1:1"):
        cp = stdio(to)
        assert cp.returncode == 1 and b"NOT_ALLOWED" in cp.stderr, (to, cp.stderr)
    assert echo.accepted == 1


def test_garbage_open_requests_reset_the_stream_and_the_session_goes_on(tunnel, internal):
    echo = internal.echo()
    gw = tunnel.gateway("--mux-allow", MUX)
    tunnel.agent(gw, "site-a", allow=["tcp://127.0.0.1:*"])
    m = MuxClient(gw.url + "/mux")
    try:
        garbage = [
            b"GET / HTTP/1.1\r\n\r\n",                        # wrong first byte
            b"W\x02\x00\x05tcp:/",                            # wrong version
            b"W\x01\x04\x01" + b"a" * 1025,                   # length over 1024
            b"W\x01\x00\x04\xff\xfe\xfd\xfc",                 # not UTF-8
            b"W\x01\x00\x0bnot a place",                      # not a destination
            open_request("agent://site-a/ftp://127.0.0.1:21"),  # unknown scheme
        ]
        sids = [m.open(g) for g in garbage]
        m.pump(lambda: all(s in m.rst for s in sids), timeout=15)
        assert {s: m.rst[s] for s in sids} == {s: BAD_OPEN for s in sids}, m.rst
        assert m.goaway is None
        # The same session still opens streams and carries bytes.
        sid = m.open(open_request(f"agent://site-a/tcp://{echo.addr}"))
        m.pump(lambda: reply_of(bytes(m.data[sid])) is not None)
        status, msg, rest = reply_of(bytes(m.data[sid]))
        assert status == 0, msg
        m.send(sid, b"still up", fin=True)
        m.pump(lambda: sid in m.fin)
        assert reply_of(bytes(m.data[sid]))[2] == b"still up"
    finally:
        m.close()
