"""Authentication against real peers: tokens minted by PyJWT (valid,
expired, not yet valid, wrong aud/iss, bad signature, alg none, an HS256
token MAC'd with the RS public key, truncated, 100 KB, a key rotated in the
JWKS file while the gateway runs), htpasswd files written by Apache's
`htpasswd -B`, and client certificates made with the openssl CLI (valid,
expired, wrong CA, revoked) used by curl. Every refusal is a 401/403 (or a
TLS failure for bad certificates), never a 101."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import shutil
import subprocess
import time

import pytest

jwt = pytest.importorskip("jwt")
from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec, rsa  # noqa: E402

from wsgate_e2e import rawws  # noqa: E402
from wsgate_e2e.pki import make_pki  # noqa: E402

pytestmark = pytest.mark.gateway

WS = {
    "Upgrade": "websocket",
    "Connection": "Upgrade",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    "Sec-WebSocket-Version": "13",
}


def handshake(gw, path: str, headers: dict[str, str]) -> int:
    h = dict(WS)
    h.update(headers)
    return rawws.http_get(gw.host, gw.port, path, h).status


def jwk_of(public_key, kid: str) -> dict:
    d = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(public_key))
    d.update({"kid": kid, "alg": "RS256", "use": "sig"})
    return d


def b64url(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def test_tokens_from_pyjwt_and_a_key_rotated_in_the_jwks_file(start_gateway, write_config, tmp_path):
    k1 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    k2 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [jwk_of(k1.public_key(), "k1")]}))
    ec_key = ec.generate_private_key(ec.SECP256R1())
    ec_pem = tmp_path / "ec.pem"
    ec_pem.write_bytes(ec_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    cfg = write_config(f"""
        [[listener]]
        address = "127.0.0.1:0"
        [auth.rs]
        type = "jwt"
        jwks = "{jwks}"
        issuers = ["https://idp.test"]
        audiences = ["wsgate"]
        sources = ["bearer", "query:access_token", "protocol:bearer."]
        [auth.es]
        type = "jwt"
        public_key = "{ec_pem}"
        algorithms = ["ES256"]
        [[route]]
        path = "/rs"
        to = "echo:"
        auth = ["rs"]
        [[route]]
        path = "/es"
        to = "echo:"
        auth = ["es"]
    """)
    gw = start_gateway("serve", "--config", cfg)
    now = int(time.time())
    base = {"sub": "ada", "iss": "https://idp.test", "aud": "wsgate", "exp": now + 300, "tenant": "t1"}

    def rs(claims=None, key=k1, kid="k1", **over):
        c = dict(base if claims is None else claims)
        c.update(over)
        return jwt.encode(c, key, algorithm="RS256", headers={"kid": kid})

    def status(token, path="/rs"):
        return handshake(gw, path, {"Authorization": f"Bearer {token}"})

    good = rs()
    assert status(good) == 101
    assert handshake(gw, f"/rs?access_token={good}", {}) == 101
    assert handshake(gw, "/rs", {"Sec-WebSocket-Protocol": f"bearer.{good}"}) == 101
    assert status(rs(exp=now - 3600)) == 401, "expired"
    assert status(rs(nbf=now + 3600)) == 401, "not yet valid"
    assert status(rs(aud="other")) == 401, "wrong aud"
    assert status(rs(iss="https://evil.test")) == 401, "wrong iss"
    assert status(rs(key=k2)) == 401, "signed by a key the set lacks"
    unsigned = jwt.encode(base, None, algorithm="none")
    assert status(unsigned) == 401, "alg none"
    # HS256 MAC'd with the RS public key's PEM (the key-confusion attack).
    pem = k1.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    head = b64url(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "k1"}).encode())
    body = b64url(json.dumps(base).encode())
    mac = hmac.new(pem, f"{head}.{body}".encode(), hashlib.sha256).digest()
    assert status(f"{head}.{body}.{b64url(mac)}") == 401, "HS256 with the RS public key"
    assert status(good[: len(good) // 2]) == 401, "truncated"
    big = rs(pad="x" * 100_000)
    assert status(big) in (400, 401, 431), "100 KB token"
    assert handshake(gw, "/rs", {}) == 401
    # ES256 against a PEM key; an RS token there is refused.
    es = jwt.encode({"sub": "bob", "exp": now + 300}, ec_key, algorithm="ES256")
    assert status(es, "/es") == 101
    assert status(good, "/es") == 401

    # Rotation: k2 added to the file under a new kid is taken at first use.
    jwks.write_text(json.dumps({"keys": [jwk_of(k1.public_key(), "k1"), jwk_of(k2.public_key(), "k2")]}))
    deadline = time.time() + 5
    while status(rs(key=k2, kid="k2")) != 101:
        assert time.time() < deadline, "the rotated key was never taken"
        time.sleep(0.2)


@pytest.mark.skipif(shutil.which("htpasswd") is None, reason="apache2-utils (htpasswd) missing")
def test_htpasswd_written_by_apache(start_gateway, write_config, tmp_path, wsgate_bin):
    users = tmp_path / "users"
    subprocess.run(["htpasswd", "-cbB", "-C", "5", str(users), "ada", "s3cret"], check=True, capture_output=True)
    subprocess.run(["htpasswd", "-bB", "-C", "5", str(users), "bob", "hunter2"], check=True, capture_output=True)
    cfg = write_config(f"""
        [[listener]]
        address = "127.0.0.1:0"
        [auth.users]
        type = "basic"
        htpasswd = "{users}"
        realm = "ops"
        [[route]]
        path = "/ops"
        to = "echo:"
        auth = ["users"]
    """)
    gw = start_gateway("serve", "--config", cfg)

    def basic(up: str) -> dict:
        return {"Authorization": "Basic " + base64.b64encode(up.encode()).decode()}

    for _ in range(3):
        assert handshake(gw, "/ops", basic("ada:s3cret")) == 101
    assert handshake(gw, "/ops", basic("bob:hunter2")) == 101
    assert handshake(gw, "/ops", basic("ada:wrong")) == 401
    assert handshake(gw, "/ops", basic("eve:s3cret")) == 401
    r = rawws.http_get(gw.host, gw.port, "/ops", dict(WS))
    assert r.status == 401
    assert 'basic realm="ops"' in (r.header("www-authenticate") or "").lower(), r
    # An MD5 entry (htpasswd -m) is a configuration error naming the line.
    subprocess.run(["htpasswd", "-bm", str(users), "carl", "x"], check=True, capture_output=True)
    r = subprocess.run([str(wsgate_bin), "check", "--config", str(cfg)], capture_output=True, text=True, timeout=20)
    assert r.returncode == 1, r
    assert f"{users}:3: MD5" in r.stderr, r.stderr


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl missing")
def test_client_certificates_from_openssl_used_by_curl(start_gateway, write_config, tmp_path):
    d = tmp_path / "pki"
    d.mkdir()
    make_pki(d)
    cfg = write_config(f"""
        [[listener]]
        address = "127.0.0.1:0"
        tls_cert = "{d}/server.pem"
        tls_key = "{d}/server.key"
        client_ca = "{d}/ca.pem"
        client_auth = "optional"
        crl = "{d}/ca.crl"
        [auth.certs]
        type = "mtls"
        [[route]]
        path = "/who"
        to = "echo:"
        auth = ["certs"]
        subjects = ["alice"]
    """)
    gw = start_gateway("serve", "--config", cfg)
    url = f"https://127.0.0.1:{gw.port}/who"

    def curl(name: str | None) -> str:
        args = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--http1.1", "--cacert", str(d / "ca.pem"),
                "-H", "Upgrade: websocket", "-H", "Connection: Upgrade", "-H", "Sec-WebSocket-Version: 13",
                "-H", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "--max-time", "5"]
        if name:
            args += ["--cert", str(d / f"{name}.pem"), "--key", str(d / f"{name}.key")]
        r = subprocess.run([*args, url], capture_output=True, text=True, timeout=20)
        return r.stdout.strip()

    assert curl("alice") == "101"
    assert curl(None) == "401", "no certificate: the route's method finds none"
    # Refused in the TLS handshake: no HTTP status at all.
    for bad in ("expired", "revoked", "stranger"):
        assert curl(bad) == "000", bad
