"""The harness checked against reference peers (no wsgate needed): the client
helpers, the Autobahn harness (clean against Node ws 8.x, and it notices a
broken server) and the browser plumbing."""

import threading

import pytest

from wsgate_e2e import autobahn, clients

pytestmark = pytest.mark.harness


def test_python_client_helpers_against_node_ws(node_echo_server):
    url = node_echo_server()
    sizes = [0, 1, 125, 126, 65536, 1 << 20, 3 << 20]
    sent = clients.payloads(sizes)
    got, n = clients.echo_stream(url, sent, timeout=30)
    assert got == b"".join(sent)
    assert n == len(sent)  # a message-preserving echo: the 0-byte one comes back first


def test_sync_client_refuses_wss():
    """The sync client loses handshakes over TLS (clients' module doc), so it
    refuses wss:// before opening anything; echo_tls() is the way."""
    with pytest.raises(ValueError, match="echo_tls"):
        clients.connect("wss://127.0.0.1:1/")



@pytest.mark.parametrize("text", [False, True])
def test_node_client_echo_against_node_ws(node_echo_server, node_client, text):
    url = node_echo_server()
    args = ["--sizes", "0,1,126,65536,1048576,5000000", "--datagram", "--check-types"] + (["--text"] if text else [])
    r = node_client(url, "echo", *args, timeout=60)
    assert r["ok"], r
    assert r["closeCode"] == 1000 and r["messages"] == 6


def test_node_client_detects_corruption(node_echo_server, node_client):
    url = node_echo_server("--corrupt")
    r = node_client(url, "echo", "--sizes", "10,20", "--datagram", timeout=20)
    assert not r["ok"], r


def test_node_client_hold_and_handshake(node_echo_server, node_client):
    url = node_echo_server("--protocol", "redis")
    r = node_client(url, "handshake", "--protocol", "foo", "--protocol", "redis", timeout=10)
    assert r["ok"] and r["protocol"] == "redis", r


@pytest.mark.autobahn
def test_autobahn_harness_clean_against_node_ws(node_echo_server, tmp_path):
    url = node_echo_server()
    res = autobahn.run_fuzzingclient(url, agent="node-ws", outdir=tmp_path / "ab")
    print(res.summary())
    assert len(res.expected) >= 300, res.summary()
    assert res.ok, res.summary()


@pytest.mark.autobahn
def test_autobahn_harness_reports_failures(node_echo_server, tmp_path):
    url = node_echo_server("--corrupt")
    res = autobahn.run_fuzzingclient(url, cases=["1.1.1", "1.1.2", "2.1"], agent="broken", outdir=tmp_path / "ab")
    print(res.summary())
    assert res.expected == ["1.1.1", "1.1.2", "2.1"]
    assert not res.ok
    assert {"1.1.1", "1.1.2"} <= set(res.bad), res.summary()


@pytest.mark.autobahn
@pytest.mark.parametrize("deflate", [False, True])
def test_autobahn_harness_sees_whether_deflate_was_negotiated(node_echo_server, tmp_path, deflate):
    """What the proxy's compression test relies on: a backend that offers no
    permessage-deflate is told apart from one that does, case by case."""
    url = node_echo_server(*(["--deflate"] if deflate else []))
    res = autobahn.run_fuzzingclient(url, cases=["12.1.1", "13.1.1"], agent="node-ws", outdir=tmp_path / "ab")
    print(res.summary())
    assert res.expected == ["12.1.1", "13.1.1"] and set(res.results) == set(res.expected), res.summary()
    assert res.cases_without_deflate() == ([] if deflate else ["12.1.1", "13.1.1"])


def test_autobahn_harness_reports_missing_cases(tmp_path):
    # Nothing listens at this URL: every case is missing or failed, never clean.
    from wsgate_e2e.peers import closed_tcp_port

    sock, port = closed_tcp_port()
    try:
        res = autobahn.run_fuzzingclient(f"ws://127.0.0.1:{port}", cases=["1.1.1"], agent="nobody",
                                         outdir=tmp_path / "ab", timeout=120)
    finally:
        sock.close()
    print(res.summary())
    assert not res.ok


@pytest.mark.browser
def test_browser_plumbing_against_node_ws(node_echo_server, page_server, browser):
    url = node_echo_server("--protocol", "redis")
    r = browser(page_server.url(url, "*1\r\n$4\r\nPING\r\n", protocols=["redis"]))
    assert r["ok"], r
    res = r["result"]
    assert res["opened"] and res["protocol"] == "redis", r
    assert res["messages"] == ["*1\r\n$4\r\nPING\r\n"], r


@pytest.mark.autobahn
@pytest.mark.parametrize("proxy", ["nginx", "haproxy"])
def test_reference_proxies_in_front_of_node_ws(request, node_echo_server, tmp_path, proxy):
    """The nginx/HAProxy fixtures (for the reverse-proxy comparisons) relay
    WebSockets cleanly: a quick Autobahn subset through each."""
    backend = node_echo_server()
    front = request.getfixturevalue(proxy)(backend.removeprefix("ws://"))
    res = autobahn.run_fuzzingclient(front.url, cases=["1.*", "2.*", "5.*"], agent=proxy, outdir=tmp_path / "ab")
    print(res.summary())
    assert res.ok, res.summary()


def test_http_backend_helper(http_backend, node_client):
    import json
    import urllib.request

    url = http_backend("--name", "b1")
    host = url.removeprefix("ws://")
    with urllib.request.urlopen(f"http://{host}/hello?x=1", timeout=10) as r:
        info = json.loads(r.read())
    assert info["name"] == "b1" and info["url"] == "/hello?x=1"
    try:
        urllib.request.urlopen(f"http://{host}/status/403", timeout=10)
        raise AssertionError("expected 403")
    except urllib.error.HTTPError as e:
        assert e.code == 403
    with clients.connect(url + "/headers", additional_headers={"X-Test": "1"}) as ws:
        first = json.loads(ws.recv(timeout=10))
        assert first["headers"]["x-test"] == "1"
        ws.send(b"echo")
        assert ws.recv(timeout=10) == b"echo"
