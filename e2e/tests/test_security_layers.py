"""Security in layers against live peers: an auth hook and a JWKS endpoint
served by Python's http.server, tokens minted by PyJWT, agents and /mux
clients (wsgate-client in Node) holding identities, the forward proxy driven
by curl, HTTP/2 extended CONNECT from the `h2` library. What each test
checks is in its name; every refusal is checked for its status (401, 403,
429, 503 or the wsmux reply), never only for "not 101"."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

jwt = pytest.importorskip("jwt")
from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: E402

from wsgate_e2e import NODE_DIR, rawws  # noqa: E402
from wsgate_e2e.authpeers import HookServer, JwksServer, h2_request, metric, until  # noqa: E402
from wsgate_e2e.procs import run_json  # noqa: E402

pytestmark = pytest.mark.gateway

SECRET = b"e2e-secret-0123456789abcdef-0123456789"


def mint(sub: str, key=SECRET, alg: str = "HS256", headers=None, **claims) -> str:
    c = {"sub": sub, "exp": int(time.time()) + 600}
    c.update(claims)
    return jwt.encode(c, key, algorithm=alg, headers=headers)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def handshake(gw, path: str, headers: dict[str, str] | None = None) -> rawws.HttpResponse:
    return rawws.http_get(gw.host, gw.port, path, {
        "Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", **(headers or {})})


def get(gw, path: str, headers: dict[str, str] | None = None) -> rawws.HttpResponse:
    return rawws.http_get(gw.host, gw.port, path, headers or {})


def secret_file(tmp_path: Path) -> Path:
    p = tmp_path / "hs.secret"
    p.write_bytes(SECRET + b"\n")
    return p


# ------------------------------------------------------------------ the hook
def test_an_auth_hook_admits_relays_refusals_and_caches_a_2xx_per_credential(
        start_gateway, write_config, http_backend):
    def decide(auth):
        return {
            "Bearer good": (200, {"X-User": "ada", "X-Tenant": "t1"}, 0),
            "Bearer other": (204, {"X-User": "bob", "X-Tenant": "t2"}, 0),
            "Bearer deny401": (401, {"WWW-Authenticate": 'Bearer realm="hook"'}, 0),
            "Bearer deny403": (403, {}, 0),
            "Bearer boom": (500, {}, 0),
            "Bearer slow": (200, {"X-User": "slow"}, 3.0),
        }.get(auth, (401, {}, 0))

    hook = HookServer(decide)
    try:
        backend = http_backend()
        cfg = write_config(f"""
            [[listener]]
            address = "127.0.0.1:0"
            [auth.hook]
            type = "hook"
            url = "{hook.url}/check"
            send_headers = ["authorization"]
            copy_headers = ["x-tenant"]
            subject_header = "x-user"
            timeout = "500ms"
            cache_ttl = "1500ms"
            [[route]]
            path_prefix = "/"
            proxy = "{backend}"
            auth = ["hook"]
            identity_headers = {{ "x-user" = "subject" }}
        """)
        gw = start_gateway("serve", "--config", cfg)
        forged = {"X-User": "mallory", "X-Tenant": "forged"}

        # A 2xx admits: its X-Tenant and the subject reach the backend, the
        # client's own copies do not (plain HTTP and a WebSocket alike).
        r = get(gw, "/api?x=1", {**bearer("good"), **forged})
        assert r.status == 200, r
        seen = json.loads(r.body)["headers"]
        assert seen["x-user"] == "ada" and seen["x-tenant"] == "t1", seen
        t0 = time.monotonic()
        ws = rawws.RawWebSocket.open(gw.host, gw.port, "/headers", extra={**bearer("good"), **forged})
        first = ws.recv_frame(timeout=10)
        ws.close()
        seen = json.loads(first.payload)["headers"]
        assert seen["x-user"] == "ada" and seen["x-tenant"] == "t1", seen
        # Both were decided by one call: the 2xx is cached for the credential.
        assert hook.count("Bearer good") == 1
        asked = hook.requests[0]
        assert asked["path"] == "/check"
        assert asked["x-original-method"] == "GET" and asked["x-original-uri"] == "/api?x=1", asked
        assert asked["x-forwarded-for"] == "127.0.0.1", asked
        # Another credential is another cache entry.
        r = get(gw, "/api", bearer("other"))
        assert r.status == 200 and json.loads(r.body)["headers"]["x-user"] == "bob", r
        assert hook.count("Bearer other") == 1

        # 401 and 403 are relayed (the hook's challenge too); refusals are not cached.
        for _ in range(2):
            r = handshake(gw, "/ws", bearer("deny401"))
            assert r.status == 401, r
            assert r.header("www-authenticate") == 'Bearer realm="hook"', r.headers
        assert hook.count("Bearer deny401") == 2
        assert get(gw, "/api", bearer("deny403")).status == 403
        assert handshake(gw, "/ws", bearer("deny403")).status == 403
        # A 500 and a timeout are 503.
        assert get(gw, "/api", bearer("boom")).status == 503
        assert handshake(gw, "/ws", bearer("boom")).status == 503
        t = time.monotonic()
        assert handshake(gw, "/ws", bearer("slow")).status == 503
        assert time.monotonic() - t < 2.5, "the hook's timeout (500ms) did not apply"

        # The cached answer lives for cache_ttl (1.5 s), then the hook is asked again.
        until(lambda: get(gw, "/api", bearer("good")).status == 200 and hook.count("Bearer good") == 2,
              10, "the cached 2xx expired", step=0.1)
        assert time.monotonic() - t0 >= 1.4, "asked again before cache_ttl"
    finally:
        hook.close()


# ---------------------------------------------------------------- limits
async def _pump(url: str, token: str, total: int, chunk: int = 16384) -> None:
    """Sends `total` bytes in binary messages of `chunk` and reads the echo of all."""
    from websockets.asyncio.client import connect

    async with connect(url, additional_headers=bearer(token), compression=None, max_size=None,
                       ping_interval=None, open_timeout=10) as ws:
        async def send():
            for _ in range(total // chunk):
                await ws.send(b"x" * chunk)

        async def recv():
            got = 0
            while got < total:
                got += len(await asyncio.wait_for(ws.recv(), 20))

        await asyncio.gather(send(), recv())


def _timed_pumps(urls_tokens, total: int) -> float:
    async def main():
        t = time.monotonic()
        await asyncio.gather(*[_pump(u, tok, total) for u, tok in urls_tokens])
        return time.monotonic() - t

    return asyncio.run(main())


def test_per_identity_limits_cap_connections_rate_and_bytes_per_second(
        start_gateway, write_config, tmp_path, http_backend):
    backend = http_backend()
    cfg = write_config(f"""
        [[listener]]
        address = "127.0.0.1:0"
        [admin]
        address = "127.0.0.1:0"
        [auth.sso]
        type = "jwt"
        secret_file = "{secret_file(tmp_path)}"
        [[route]]
        path = "/capped"
        to = "echo:"
        auth = ["sso"]
        [route.limits]
        per_identity_max_connections = 2
        [[route]]
        path = "/rated"
        to = "echo:"
        auth = ["sso"]
        [route.limits]
        per_identity_rate = "3/m"
        [[route]]
        path = "/paced"
        to = "echo:"
        auth = ["sso"]
        [route.limits]
        per_identity_bandwidth = "32KiB"
        [[route]]
        path = "/paced-proxy"
        proxy = "{backend}"
        auth = ["sso"]
        [route.limits]
        per_identity_bandwidth = "32KiB"
        [[route]]
        path = "/free"
        to = "echo:"
        auth = ["sso"]
    """)
    gw = start_gateway("serve", "--config", cfg, admin=True)
    ada, bob, carl, dave = (mint(s) for s in ("ada", "bob", "carl", "dave"))

    # Open WebSockets per subject: two for ada, the third is 429; bob is apart.
    held = [rawws.RawWebSocket.open(gw.host, gw.port, "/capped", extra=bearer(ada)) for _ in range(2)]
    r = handshake(gw, "/capped", bearer(ada))
    assert r.status == 429 and r.header("retry-after"), r
    assert handshake(gw, "/capped", bearer(bob)).status == 101
    assert metric(gw.admin, "wsgate_handshake_refusals_total", reason="per_identity_cap") == 1
    # One closed: its slot comes back.
    held[0].send_frame(rawws.OP_CLOSE, rawws.close_payload(1000))
    held[0].recv_until_close(timeout=10)
    held[0].close()
    until(lambda: handshake(gw, "/capped", bearer(ada)).status == 101, 10, "the slot came back")
    held[1].close()

    # New connections per subject: 3 a minute.
    assert [handshake(gw, "/rated", bearer(carl)).status for _ in range(4)] == [101, 101, 101, 429]
    assert handshake(gw, "/rated", bearer(dave)).status == 101
    assert metric(gw.admin, "wsgate_handshake_refusals_total", reason="per_identity_rate") == 1

    # Bytes per second per subject (32 KiB/s each way, 32 KiB of burst): two of
    # ada's WebSockets echo 64 KiB each, 128 KiB in all, so the pair needs at
    # least (128 - 32) / 32 = 3 s; the same on an unpaced route takes far less.
    base = f"ws://{gw.host}:{gw.port}"
    free = _timed_pumps([(base + "/free", ada), (base + "/free", ada)], 64 * 1024)
    paced = _timed_pumps([(base + "/paced", ada), (base + "/paced", ada)], 64 * 1024)
    assert paced >= 2.7, f"two WebSockets of one subject moved 128 KiB in {paced:.2f}s at 32 KiB/s"
    assert free < 2.0, f"the unpaced route took {free:.2f}s: the machine is too slow for this check"
    # Each subject has its own budget: bob's 32 KiB fits in his burst.
    assert _timed_pumps([(base + "/paced", bob)], 32 * 1024) < 2.0
    # A proxied WebSocket is paced too: 96 KiB one way needs (96 - 32) / 32 = 2 s.
    proxied = _timed_pumps([(base + "/paced-proxy", dave)], 96 * 1024)
    assert proxied >= 1.8, f"a proxied WebSocket moved 96 KiB in {proxied:.2f}s at 32 KiB/s"


# ---------------------------------------------------------------- tunnel
def mux_open(node_bin, url: str, targets: list[str], token: str | None = None, timeout: float = 30) -> dict:
    args = [node_bin, NODE_DIR / "mux-open.mjs", url, "--timeout", str(timeout), *targets]
    if token is not None:
        args[3:3] = ["--token", token]
    result, output = run_json(args, timeout=timeout + 15)
    result["_output"] = output[-3000:]
    return result


def curl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-s", "--max-time", "10", *args], capture_output=True, text=True, timeout=30)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl missing")
def test_every_tunnel_stream_is_checked_against_the_identity_rules_when_it_opens(
        start_gateway, write_config, tmp_path, peer, http_backend, node_bin, wsgate_bin, procs):
    e1, e2 = peer("tcp-echo"), peer("tcp-echo")
    p1, p2 = e1.spec.rsplit(":", 1)[1], e2.spec.rsplit(":", 1)[1]
    web = http_backend("--name", "web")
    web_port = web.rsplit(":", 1)[1]
    cfg = write_config(f"""
        [[listener]]
        address = "127.0.0.1:0"
        [admin]
        address = "127.0.0.1:0"
        [limits]
        per_identity_max_streams = 2
        [auth.sso]
        type = "jwt"
        secret_file = "{secret_file(tmp_path)}"
        sources = ["bearer", "protocol:wsgate.bearer."]
        [tunnel]
        mux_allow = ["tcp://*:*", "agent://*/tcp://*:*"]
        auth = ["sso"]
        allow = [
          "tcp://db-{{claim:tenant}}:5432",
          "tcp://127.0.0.1:{{claim:port}}",
          "agent://site-{{claim:tenant}}/tcp://127.0.0.1:{{claim:port}}",
        ]
        identity_headers = {{ "x-user" = "subject", "x-tenant" = "claim:tenant" }}
        agent_auth = ["sso"]
        agent_ids = ["site-{{claim:tenant}}"]
    """)
    gw = start_gateway("serve", "--config", cfg, admin=True)
    ada = mint("ada", tenant="t1", port=int(p1))
    bob = mint("bob", tenant="t2", port=int(web_port))

    # Agents register with a JWT; the ids an identity may register are its rules.
    agent_token = tmp_path / "agent.jwt"
    agent_token.write_text(mint("agent-t1", tenant="t1"))
    agent = procs.start([wsgate_bin, "agent", "--server", gw.ws("/agent"), "--id", "site-t1",
                         "--token-file", agent_token, "--allow", "tcp://127.0.0.1:*", "--pool", "1"], "agent")
    agent.wait_lines(re.compile(r"^agent site-t1 registered at "), 1, 20)
    wrong = procs.start([wsgate_bin, "agent", "--server", gw.ws("/agent"), "--id", "site-t2",
                         "--token-file", agent_token, "--allow", "tcp://127.0.0.1:*"], "agent-wrong-id")
    assert wrong.wait(timeout=20) == 1
    assert "403" in wrong.stderr_text(), wrong.stderr_text()
    assert metric(gw.admin, "wsgate_auth_total", method="sso", outcome="agent_id_not_allowed") >= 1

    # /mux: each stream is checked when it opens, against rules filled from ada's claims.
    res = mux_open(node_bin, gw.ws("/mux"), [
        f"tcp://127.0.0.1:{p1}",                     # her port: allowed
        f"tcp://127.0.0.1:{p2}",                     # not hers
        "tcp://db-t2:5432",                          # another tenant's database
        "tcp://db-t1:5432",                          # hers: past the rule (no such host here)
        f"agent://site-t1/tcp://127.0.0.1:{p1}",     # her tenant's agent
        f"agent://site-t2/tcp://127.0.0.1:{p1}",     # another tenant's agent id
        f"tcp://127.0.0.1:{p1}",                     # a third open stream: over her cap of 2
    ], token=ada)
    assert res["ok"] and res["protocol"] == "wsmux.v1", res
    by = [(s["target"], s["opened"], s["statusName"]) for s in res["streams"]]
    assert by == [
        (f"tcp://127.0.0.1:{p1}", True, None),
        (f"tcp://127.0.0.1:{p2}", False, "NOT_ALLOWED"),
        ("tcp://db-t2:5432", False, "NOT_ALLOWED"),
        ("tcp://db-t1:5432", False, "UNREACHABLE"),
        (f"agent://site-t1/tcp://127.0.0.1:{p1}", True, None),
        (f"agent://site-t2/tcp://127.0.0.1:{p1}", False, "NOT_ALLOWED"),
        (f"tcp://127.0.0.1:{p1}", False, "NOT_ALLOWED"),
    ], res
    for s in res["streams"]:
        if s["opened"]:
            assert s["echoed"] == f"ping {s['target']}", s
    assert "for this identity" in res["streams"][1]["reason"], res["streams"][1]
    assert "too many open tunnel streams" in res["streams"][6]["reason"], res["streams"][6]
    # Bob's rules are his own; without a token there is no session at all.
    res = mux_open(node_bin, gw.ws("/mux"), [f"tcp://127.0.0.1:{p1}"], token=bob)
    assert [s["statusName"] for s in res["streams"]] == ["NOT_ALLOWED"], res
    before = metric(gw.admin, "wsgate_handshake_refusals_total", reason="unauthenticated")
    res = mux_open(node_bin, gw.ws("/mux"), [f"tcp://127.0.0.1:{p1}"])
    assert not res["ok"] and res["streams"] == [], res
    assert metric(gw.admin, "wsgate_handshake_refusals_total", reason="unauthenticated") == before + 1

    # /request and the forward proxy through the agent: bob's claim:port is
    # the web server's, ada's is not; identity headers replace the client's.
    dest = {"X-PROXY-DESTINATION": f"http://127.0.0.1:{web_port}/hello", "X-User": "mallory"}
    r = get(gw, "/request", {**dest, **bearer(bob)})
    assert r.status == 200, r
    seen = json.loads(r.body)
    assert seen["url"] == "/hello" and seen["headers"]["x-user"] == "bob", seen
    assert seen["headers"]["x-tenant"] == "t2", seen
    assert get(gw, "/request", {**dest, **bearer(ada)}).status == 403
    assert get(gw, "/request", dest).status == 401
    proxy = f"http://{gw.host}:{gw.port}"
    target = f"http://127.0.0.1:{web_port}/fp"
    r = curl("-x", proxy, "-H", f"Authorization: Bearer {bob}", "-H", "X-Tenant: forged", target)
    seen = json.loads(r.stdout)
    assert seen["url"] == "/fp" and seen["headers"]["x-tenant"] == "t2", seen
    assert curl("-o", "/dev/null", "-w", "%{http_code}", "-x", proxy, "-H", f"Authorization: Bearer {ada}",
                target).stdout == "403"
    # CONNECT: the same rule decides the tunnel.
    r = curl("-p", "-x", proxy, "--proxy-header", f"Authorization: Bearer {bob}", "-o", "/dev/null",
             "-w", "%{http_connect} %{http_code}", target)
    assert r.stdout == "200 200", r
    r = curl("-p", "-x", proxy, "--proxy-header", f"Authorization: Bearer {ada}", "-o", "/dev/null",
             "-w", "%{http_connect}", target)
    assert r.stdout == "403", r
    assert metric(gw.admin, "wsgate_tunnel_streams_total", via="request", outcome="not_allowed") >= 1
    agent.stop(signal.SIGTERM)


def test_client_certificates_name_agents_and_fill_cert_templates(
        start_gateway, write_config, tmp_path, peer, http_backend, wsgate_bin, procs):
    from wsgate_e2e.pki import make_pki

    d = tmp_path / "pki"
    d.mkdir()
    make_pki(d, clients=("site-a",))
    tagged = peer("tcp-tag", tag="alice-db")
    (tmp_path / "peers").mkdir()
    (tmp_path / "peers" / "alice.peers").write_text(f"{tagged.spec} *\n")
    echo = peer("tcp-echo")
    backend = http_backend()
    dummy = tmp_path / "dummy.token"
    dummy.write_text("not-a-token-of-any-file\n")
    cfg = write_config(f"""
        [[listener]]
        address = "127.0.0.1:0"
        tls_cert = "{d}/server.pem"
        tls_key = "{d}/server.key"
        client_ca = "{d}/ca.pem"
        client_auth = "optional"
        crl = "{d}/ca.crl"
        [admin]
        address = "127.0.0.1:0"
        [auth.certs]
        type = "mtls"
        [tunnel]
        agent_auth = ["certs"]
        agent_ids = ["{{cert:cn}}"]
        [[route]]
        path = "/me"
        proxy = "{backend}"
        auth = ["certs"]
        identity_headers = {{ "x-cn" = "cert:cn", "x-email" = "cert:email" }}
        [[route]]
        path = "/db"
        auth = ["certs"]
        [route.discovery]
        type = "file"
        lookups = ["{tmp_path}/peers/{{cert:cn}}.peers"]
        allow = ["tcp://127.0.0.1:*"]
        [[route]]
        path = "/via-agent"
        to = "agent://site-a/{echo.spec}"
        auth = ["certs"]
    """)
    gw = start_gateway("serve", "--config", cfg, admin=True)
    wss = f"wss://127.0.0.1:{gw.port}"

    # An agent registers by its certificate alone (no --token-file): its CN
    # is the id it may take.
    common = ["--allow", "tcp://127.0.0.1:*", "--ca", d / "ca.pem", "--pool", "1"]
    agent = procs.start([wsgate_bin, "agent", "--server", wss + "/agent", "--id", "site-a",
                         "--client-cert", d / "site-a.pem", "--client-key", d / "site-a.key", *common], "agent")
    agent.wait_lines(re.compile(r"^agent site-a registered at "), 1, 20)
    other = procs.start([wsgate_bin, "agent", "--server", wss + "/agent", "--id", "site-b",
                         "--client-cert", d / "site-a.pem", "--client-key", d / "site-a.key", *common],
                        "agent-other-id")
    assert other.wait(timeout=20) == 1
    nocert = procs.start([wsgate_bin, "agent", "--server", wss + "/agent", "--id", "site-a",
                          "--token-file", dummy, *common],
                         "agent-no-cert")
    assert nocert.wait(timeout=20) == 1
    assert "401" in nocert.stderr_text(), nocert.stderr_text()

    def curl_cert(path: str, name: str | None, *extra: str) -> subprocess.CompletedProcess:
        args = ["--cacert", str(d / "ca.pem"), *extra]
        if name:
            args += ["--cert", str(d / f"{name}.pem"), "--key", str(d / f"{name}.key")]
        return curl(*args, f"https://127.0.0.1:{gw.port}{path}")

    # {cert:cn} and {cert:email} reach the backend; the client's copies do not.
    r = curl_cert("/me", "alice", "-H", "X-CN: mallory")
    seen = json.loads(r.stdout)["headers"]
    assert seen["x-cn"] == "alice" and seen["x-email"] == "ada@example.test", seen
    assert curl_cert("/me", None, "-o", "/dev/null", "-w", "%{http_code}").stdout == "401"

    # Discovery by {cert:cn}, and a bridge through the agent that registered by certificate.
    import ssl

    from wsgate_e2e.clients import as_bytes, echo_tls

    ctx = ssl.create_default_context(cafile=str(d / "ca.pem"))
    ctx.load_cert_chain(str(d / "alice.pem"), str(d / "alice.key"))
    _, replies = echo_tls(wss + "/db", ctx, [b"hi"])
    assert b"".join(map(as_bytes, replies)).startswith(b"alice-db\n"), replies
    _, replies = echo_tls(wss + "/via-agent", ctx, [b"through site-a"])
    assert [as_bytes(r) for r in replies] == [b"through site-a"], replies
    # A revoked certificate never gets that far: refused in TLS, and counted.
    assert curl_cert("/me", "revoked", "-o", "/dev/null", "-w", "%{http_code}").stdout == "000"
    until(lambda: metric(gw.admin, "wsgate_handshake_refusals_total", reason="client_cert_revoked") >= 1,
          10, "the revoked certificate counted")
    agent.stop(signal.SIGTERM)


def test_discovery_templates_take_the_token_subject_and_refuse_what_is_not_a_name(
        start_gateway, write_config, tmp_path, peer):
    peers = tmp_path / "peers"
    peers.mkdir()
    for who in ("ada", "bob"):
        p = peer("tcp-tag", tag=f"{who}-db")
        (peers / f"{who}.peers").write_text(f"{p.spec} *\n")
    cfg = write_config(f"""
        [[listener]]
        address = "127.0.0.1:0"
        [auth.sso]
        type = "jwt"
        secret_file = "{secret_file(tmp_path)}"
        [[route]]
        path = "/db"
        auth = ["sso"]
        [route.discovery]
        type = "file"
        lookups = ["{peers}/{{claim:sub}}.peers"]
        allow = ["tcp://127.0.0.1:*"]
    """)
    gw = start_gateway("serve", "--config", cfg)
    for who in ("ada", "bob"):
        ws = rawws.RawWebSocket.open(gw.host, gw.port, "/db", extra=bearer(mint(who)))
        f = ws.recv_frame(timeout=10)
        ws.close()
        assert f.payload == f"{who}-db\n".encode(), f
    # A subject that is not a plain name fills no template: nothing is found.
    assert handshake(gw, "/db", bearer(mint("../peers/ada"))).status == 404
    assert handshake(gw, "/db", bearer(mint("carl"))).status == 404


# ---------------------------------------------------------------- JWKS, logs
def rsa_jwk(key, kid: str) -> dict:
    d = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    d.update({"kid": kid, "alg": "RS256", "use": "sig"})
    return d


def test_jwks_from_a_url_and_a_file_rotate_and_refusals_are_logged_without_credentials(
        start_gateway, write_config, tmp_path):
    k1, k2, k3 = (rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(3))
    server = JwksServer({"keys": [rsa_jwk(k1, "k1")]})
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text(json.dumps({"keys": [rsa_jwk(k1, "k1")]}))
    try:
        cfg = write_config(f"""
            [[listener]]
            address = "127.0.0.1:0"
            [admin]
            address = "127.0.0.1:0"
            [auth.url]
            type = "jwt"
            jwks_url = "{server.url}/jwks.json"
            refresh = "1s"
            [auth.file]
            type = "jwt"
            jwks = "{jwks_file}"
            refresh = "1h"
            [[route]]
            path = "/url"
            to = "echo:"
            auth = ["url"]
            [[route]]
            path = "/file"
            to = "echo:"
            auth = ["file"]
        """)
        gw = start_gateway("serve", "--config", cfg, admin=True, env={"RUST_LOG": "debug"})

        def tok(key, kid, sub="ada"):
            return mint(sub, key=key, alg="RS256", headers={"kid": kid})

        def status(path, token):
            return handshake(gw, path, bearer(token)).status

        used = [tok(k1, "k1"), tok(k2, "k2"), tok(k3, "k3")]
        until(lambda: status("/url", used[0]) == 101, 10, "the first JWKS fetch")
        assert status("/url", used[1]) == 401
        # The URL rotates to k2: taken at a refresh; k1 is gone with it.
        server.serve({"keys": [rsa_jwk(k2, "k2")]})
        until(lambda: status("/url", used[1]) == 101, 10, "the rotated JWKS")
        assert status("/url", used[0]) == 401
        # Then it fails: the last good set stays.
        server.fail(500)
        n = server.fetched()
        until(lambda: server.fetched() >= n + 2, 10, "two failed refreshes")
        assert status("/url", used[1]) == 101
        until(lambda: "keeping the last good set" in gw.proc.stderr_text(400_000), 10, "the failure logged")

        # The file: k1 rotated out (replaced by k3) is dropped by the reload the change triggers.
        assert status("/file", used[0]) == 101
        tmp = tmp_path / "jwks.json.new"
        tmp.write_text(json.dumps({"keys": [rsa_jwk(k3, "k3")]}))
        tmp.replace(jwks_file)
        until(lambda: status("/file", used[0]) == 401, 15, "the rotated file reloaded")
        assert "reloaded (a watched file changed)" in gw.proc.stderr_text(400_000)
        assert status("/file", used[2]) == 101

        # A 100 KB token and a truncated one: 401, nothing crashes.
        big = mint("ada", pad="x" * 100_000)
        assert len(big) > 100_000
        for path in ("/url", "/file"):
            r = handshake(gw, path, bearer(big))
            assert r.status == 401, r
            assert "invalid_token" in (r.header("www-authenticate") or ""), r.headers
        assert status("/url", used[1][: len(used[1]) // 2]) == 401
        assert status("/url", used[1][:-5]) == 401
        assert status("/url", used[1]) == 101, "still serving"
        assert metric(gw.admin, "wsgate_auth_total", method="url", outcome="token_too_long") == 1
        assert metric(gw.admin, "wsgate_auth_total", method="url", outcome="unknown_key") >= 1
        assert metric(gw.admin, "wsgate_handshake_refusals_total", reason="unauthenticated") >= 5

        # Every refusal's reason is in the log; no credential is.
        log = gw.proc.stderr_text(2_000_000)
        assert re.search(r"authentication refused.*token_too_long", log), log[-3000:]
        assert re.search(r"authentication refused.*unknown_key", log), log[-3000:]
        for t in [*used, big]:
            for part in t.split("."):
                if len(part) > 16:
                    assert part[:40] not in log, "a token reached the log"
    finally:
        server.close()


# ---------------------------------------------------------------- check, reload
@pytest.mark.skipif(shutil.which("htpasswd") is None, reason="apache2-utils (htpasswd) missing")
def test_check_and_reload_name_every_bad_auth_file_and_keep_the_running_settings(
        start_gateway, write_config, tmp_path, wsgate_bin):
    from wsgate_e2e.pki import make_pki

    d = tmp_path / "pki"
    d.mkdir()
    make_pki(d)
    users = tmp_path / "users"
    subprocess.run(["htpasswd", "-cbB", "-C", "5", str(users), "ada", "s3cret"], check=True, capture_output=True)
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [rsa_jwk(rsa.generate_private_key(public_exponent=65537, key_size=2048),
                                                 "k1")]}))
    pem = tmp_path / "es.pem"
    subprocess.run(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(tmp_path / "es.key")],
                   check=True, capture_output=True)
    subprocess.run(["openssl", "ec", "-in", str(tmp_path / "es.key"), "-pubout", "-out", str(pem)],
                   check=True, capture_output=True)
    secret = secret_file(tmp_path)
    crl = tmp_path / "ca.crl"
    shutil.copy(d / "ca.crl", crl)
    cfg = write_config(f"""
        [[listener]]
        address = "127.0.0.1:0"
        tls_cert = "{d}/server.pem"
        tls_key = "{d}/server.key"
        client_ca = "{d}/ca.pem"
        client_auth = "optional"
        crl = "{crl}"
        [auth.users]
        type = "basic"
        htpasswd = "{users}"
        [auth.keys]
        type = "jwt"
        jwks = "{jwks}"
        [auth.es]
        type = "jwt"
        public_key = "{pem}"
        [auth.hs]
        type = "jwt"
        secret_file = "{secret}"
        [[route]]
        path = "/ops"
        to = "echo:"
        auth = ["users", "keys", "es", "hs"]
    """)

    def check():
        r = subprocess.run([str(wsgate_bin), "check", "--config", str(cfg)], capture_output=True, text=True,
                           timeout=30)
        return r.returncode, r.stdout + r.stderr

    rc, out = check()
    assert rc == 0 and "ok" in out, out
    gw = start_gateway("serve", "--config", cfg)
    import ssl

    ctx = ssl.create_default_context(cafile=str(d / "ca.pem"))

    def ops(up: str) -> int:
        s = ctx.wrap_socket(rawws.connect("127.0.0.1", gw.port), server_hostname="127.0.0.1")
        try:
            s.sendall(rawws.ws_request("/ops", extra={
                "Authorization": "Basic " + base64.b64encode(up.encode()).decode()}))
            return rawws.read_http_response(s)[0].status
        finally:
            s.close()

    assert ops("ada:s3cret") == 101
    # Every file a method or listener reads, broken: check names each.
    good = {p: p.read_bytes() for p in (users, jwks, pem, secret, crl)}
    subprocess.run(["htpasswd", "-bm", str(users), "carl", "x"], check=True, capture_output=True)
    jwks.write_text('{"keys": [{"kty": "RSA", "n": "!!"}]}')
    pem.write_text("-----BEGIN PUBLIC KEY-----\nnot base64\n-----END PUBLIC KEY-----\n")
    secret.write_text("short\n")
    crl.write_text("-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n")
    rc, out = check()
    assert rc == 1, out
    name = re.escape(cfg.name)
    for key, what in [("auth.users.htpasswd", re.escape(f"{users}:2: ")),
                      ("auth.keys.jwks", re.escape(str(jwks))),
                      ("auth.es.public_key", re.escape(str(pem))),
                      ("auth.hs.secret_file", ""),
                      (r"listener\[0\]\.crl", re.escape(str(crl)))]:
        assert re.search(rf"{name}:\d+:\d+: {key}: {what}", out), (key, out)
    # A reload meets the same errors: refused, logged, the running settings kept.
    users.write_bytes(good[users] + b"carl:$apr1$x$y\n")
    for p in (jwks, pem, secret, crl):
        p.write_bytes(good[p])
    until(lambda: "reload (a watched file changed) refused" in gw.proc.stderr_text(200_000), 15,
          "the bad htpasswd refused")
    assert re.search(rf"{name}:\d+:\d+: auth\.users\.htpasswd: .*users:2: ", gw.proc.stderr_text(200_000))
    assert ops("ada:s3cret") == 101
    assert gw.proc.popen.poll() is None
    # Fixed: reloaded, and the new user is in.
    subprocess.run(["htpasswd", "-cbB", "-C", "5", str(users), "bob", "hunter2"], check=True, capture_output=True)
    until(lambda: ops("bob:hunter2") == 101, 15, "the fixed htpasswd reloaded")
    assert ops("ada:s3cret") == 401


# ---------------------------------------------------------------- every path
def test_one_rule_for_every_request_path_http1_http2_plain_and_websocket(
        start_gateway, write_config, tmp_path, http_backend):
    backend = http_backend()
    cfg = write_config(f"""
        [[listener]]
        address = "127.0.0.1:0"
        [auth.sso]
        type = "jwt"
        secret_file = "{secret_file(tmp_path)}"
        [[route]]
        path_prefix = "/app"
        proxy = "{backend}"
        auth = ["sso"]
        subjects = ["ada"]
        [[route]]
        path = "/bridge"
        to = "echo:"
        auth = ["sso"]
        subjects = ["ada"]
    """)
    gw = start_gateway("serve", "--config", cfg)
    ada, bob = mint("ada"), mint("bob")
    cases = {"none": {}, "ada": bearer(ada), "bob": bearer(bob)}
    want = {"none": 401, "bob": 403}

    # HTTP/1.1: a plain request and a WebSocket handshake on the same route.
    for who, h in cases.items():
        assert get(gw, "/app/x", h).status == want.get(who, 200), who
        assert handshake(gw, "/app/ws", h).status == want.get(who, 101), who
        assert handshake(gw, "/bridge", h).status == want.get(who, 101), who

    # A WebSocket after a keep-alive request on one connection (hyper's path).
    s = rawws.connect(gw.host, gw.port)
    try:
        s.sendall(f"GET /app/x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ada}\r\n\r\n".encode())
        r, _ = rawws.read_http_response(s)
        assert r.status == 200
        s.sendall(rawws.ws_request("/app/ws", extra=bearer(bob)))
        r, _ = rawws.read_http_response(s)
        assert r.status == 403, r
    finally:
        s.close()

    # HTTP/2 (prior knowledge): plain requests and extended CONNECT alike.
    def h2(method: str, path: str, h: dict, message: bytes | None = None):
        headers = [(":method", method), (":scheme", "http"), (":path", path), (":authority", f"{gw.host}:{gw.port}")]
        if method == "CONNECT":
            headers += [(":protocol", "websocket"), ("sec-websocket-version", "13")]
        headers += [(k.lower(), v) for k, v in h.items()]
        return h2_request(gw.host, gw.port, headers, body_message=message, end_stream=method != "CONNECT")

    for who, h in cases.items():
        assert h2("GET", "/app/x", h)[0] == want.get(who, 200), who
        for path in ("/app/ws", "/bridge"):
            status, _, data = h2("CONNECT", path, h, b"over h2")
            assert status == want.get(who, 200), (who, path)
            if status == 200:
                assert data[2:] == b"over h2", data
