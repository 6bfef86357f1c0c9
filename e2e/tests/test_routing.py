"""Routing on handshake metadata (path, Host, header, cookie, query,
subprotocol) and the file discovery backend (lookups templated from the
handshake, allowlist, re-read on change without touching open connections)."""

from __future__ import annotations

import time

import pytest

from wsgate_e2e import clients, rawws


def which(peers: dict, url: str, **kw) -> str:
    """Connect, read the peer's name (tcp-tag peers say it first), echo one
    message, and return the name."""
    with clients.connect(url, **kw) as ws:
        tag = clients.recv_bytes(ws, 1, timeout=10)[0]
        while not tag.endswith(b"\n"):
            tag += clients.as_bytes(ws.recv(timeout=10))
        ws.send(b"hello")
        assert ws.recv(timeout=10) == b"hello"
    name = tag.decode().strip()
    assert name in peers, name
    return name


def raw_which(gw, host_header: str) -> str:
    raw = rawws.RawWebSocket.open(gw.host, gw.port, "/x", host_header=host_header)
    try:
        tag = b""
        while not tag.endswith(b"\n"):
            f = raw.recv_frame(timeout=10)
            assert f is not None
            tag += f.payload
        return tag.decode().strip()
    finally:
        raw.close()


def test_route_matchers(start_gateway, write_config, peer):
    ps = {k: peer("tcp-tag", tag=k) for k in ("path", "host", "header", "cookie", "query", "proto", "fallback")}
    cfg = write_config(f"""
        [[listener]]
        address = "127.0.0.1:0"

        [[route]]
        path = "/exact"
        to = "{ps['path'].spec}"
        framing = "binary"

        [[route]]
        host = "svc.example"
        to = "{ps['host'].spec}"
        framing = "binary"

        [[route]]
        headers = {{ "x-tenant" = "acme" }}
        to = "{ps['header'].spec}"
        framing = "binary"

        [[route]]
        cookies = {{ session = "*" }}
        to = "{ps['cookie'].spec}"
        framing = "binary"

        [[route]]
        query = {{ db = "users" }}
        to = "{ps['query'].spec}"
        framing = "binary"

        [[route]]
        protocols = ["special"]
        to = "{ps['proto'].spec}"
        framing = "binary"

        [[route]]
        path_prefix = "/"
        to = "{ps['fallback'].spec}"
        framing = "binary"
    """)
    gw = start_gateway("serve", "--config", cfg, listeners=1)
    assert which(ps, gw.ws("/exact")) == "path"
    # websockets would add its own Host: a raw handshake sends exactly one.
    assert raw_which(gw, "svc.example") == "host"
    assert raw_which(gw, "svc.example:8080") == "host"
    assert raw_which(gw, "other.example") == "fallback"
    assert which(ps, gw.ws("/x"), additional_headers={"X-Tenant": "acme"}) == "header"
    assert which(ps, gw.ws("/x"), additional_headers={"X-Tenant": "other"}) == "fallback"
    assert which(ps, gw.ws("/x"), additional_headers={"Cookie": "a=1; session=abc"}) == "cookie"
    assert which(ps, gw.ws("/x?db=users")) == "query"
    assert which(ps, gw.ws("/x?db=orders")) == "fallback"
    assert which(ps, gw.ws("/x"), protocols=["other", "special"]) == "proto"
    assert which(ps, gw.ws("/x"), protocols=["other"]) == "fallback"
    assert which(ps, gw.ws("/anything")) == "fallback"


def write_peers(path, text: str):
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def test_file_discovery(start_gateway, write_config, peer, tmp_path):
    ps = {k: peer("tcp-tag", tag=k) for k in ("default", "acme", "acme2", "users")}
    d = tmp_path / "peers"
    d.mkdir()
    write_peers(d / "default.peers", f"# comment\n{ps['default'].spec} * binary\n")
    write_peers(d / "acme.peers", f"{ps['acme'].spec} * binary\n")
    write_peers(d / "users.peers", f"{ps['users'].spec} * binary\n")
    write_peers(d / "evil.peers", "tcp://127.0.0.2:1 * binary\n")  # not in the allowlist
    cfg = write_config(f"""
        [[listener]]
        address = "127.0.0.1:0"

        [[route]]
        path_prefix = "/db/"
        framing = "binary"
        [route.discovery]
        type = "file"
        lookups = ["{d}/{{header:x-tenant}}.peers", "{d}/{{query:db}}.peers", "{d}/default.peers"]
        allow = ["tcp://127.0.0.1:*"]
    """)
    gw = start_gateway("serve", "--config", cfg, listeners=1)
    url = gw.ws("/db/x")
    assert which(ps, url) == "default"
    assert which(ps, url, additional_headers={"X-Tenant": "acme"}) == "acme"
    assert which(ps, url + "?db=users") == "users"
    assert which(ps, url, additional_headers={"X-Tenant": "nobody"}) == "default"
    # Client input never walks the file system.
    for bad in ("../default", ".hidden", "a/b", "%2e%2e"):
        r = rawws.raw_exchange(gw.host, gw.port, rawws.ws_request("/db/x", extra={"X-Tenant": bad}))
        assert r.status in (101, 400, 403, 404), (bad, r.status)
    # A discovered peer outside the allowlist is refused.
    r = rawws.raw_exchange(gw.host, gw.port, rawws.ws_request("/db/x", extra={"X-Tenant": "evil"}))
    assert r.status == 403, (r.status, r.body)

    # Re-read on change, without a restart and without touching open connections.
    held = clients.connect(url, additional_headers={"X-Tenant": "acme"})
    try:
        assert clients.as_bytes(held.recv(timeout=10)) == b"acme\n"
        held.send(b"before")
        assert held.recv(timeout=10) == b"before"
        write_peers(d / "acme.peers", f"{ps['acme2'].spec} * binary\n")
        deadline = time.monotonic() + 15
        while which(ps, url, additional_headers={"X-Tenant": "acme"}) != "acme2":
            assert time.monotonic() < deadline, "acme.peers was not re-read within 15s"
            time.sleep(0.2)  # bounded polling for the reload
        held.send(b"after reload")
        assert held.recv(timeout=10) == b"after reload"
    finally:
        held.close()
    assert gw.proc.popen.poll() is None


def test_discovery_with_empty_allowlist_denies(start_gateway, write_config, peer, tmp_path):
    p = peer("tcp-echo")
    (tmp_path / "default.peers").write_text(f"{p.spec} * binary\n")
    cfg = write_config(f"""
        [[listener]]
        address = "127.0.0.1:0"

        [[route]]
        [route.discovery]
        type = "file"
        lookups = ["{tmp_path}/default.peers"]
    """)
    gw = start_gateway("serve", "--config", cfg, listeners=1)
    r = rawws.raw_exchange(gw.host, gw.port, rawws.ws_request("/"))
    assert r.status == 403, (r.status, r.body)
    assert p.connections == 0
