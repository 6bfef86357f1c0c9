"""Headless Chromium (Debian's, via playwright-core) against a route that
asks for a JWT and an Origin: a page passes its token the one way a
browser's `new WebSocket()` can, as a `Sec-WebSocket-Protocol` entry
(`bearer.<JWT>`, docs/security.md), beside the subprotocol it speaks; the
gateway admits it and echoes only that subprotocol. The same page served
from another origin (a second static server on another port) is refused by
the Origin rule, and the refusal is counted in /metrics."""

from __future__ import annotations

import time

import pytest

jwt = pytest.importorskip("jwt")

from wsgate_e2e import rawws  # noqa: E402
from wsgate_e2e.authpeers import metric  # noqa: E402
from wsgate_e2e.web import PageServer  # noqa: E402

pytestmark = [pytest.mark.browser, pytest.mark.gateway]

SECRET = b"e2e-browser-secret-0123456789abcdef"


def test_a_page_passes_a_jwt_in_the_protocol_header_and_another_origin_is_refused(
        start_gateway, write_config, tmp_path, browser):
    home, elsewhere = PageServer(), PageServer()
    try:
        secret = tmp_path / "hs.secret"
        secret.write_bytes(SECRET)
        origin = f"http://127.0.0.1:{home.port}"
        cfg = write_config(f"""
            [[listener]]
            address = "127.0.0.1:0"
            [admin]
            address = "127.0.0.1:0"
            [auth.sso]
            type = "jwt"
            secret_file = "{secret}"
            sources = ["protocol:bearer."]
            [[route]]
            path = "/chat"
            protocols = ["chat"]
            to = "echo:"
            auth = ["sso"]
            origins = ["{origin}"]
            allow_missing_origin = false
        """)
        gw = start_gateway("serve", "--config", cfg, admin=True)
        token = jwt.encode({"sub": "ada", "exp": int(time.time()) + 600}, SECRET, algorithm="HS256")
        url = gw.ws("/chat")

        # Admitted: the token rode in the protocol list, only "chat" came back.
        res = browser(home.url(url, "hello", protocols=["chat", f"bearer.{token}"]))
        assert res["ok"], res
        page = res["result"]
        assert page["error"] is None and page["opened"], page
        assert page["protocol"] == "chat", page
        assert page["messages"] == ["hello"], page
        assert metric(gw.admin, "wsgate_auth_total", method="sso", outcome="ok") == 1

        # The same page without its token: 401, the WebSocket fails.
        res = browser(home.url(url, "hello", protocols=["chat"]))
        page = res["result"]
        assert not page["opened"] and page["closeCode"] == 1006, page
        assert metric(gw.admin, "wsgate_handshake_refusals_total", reason="unauthenticated") == 1

        # From another origin, token and all: refused by the Origin rule.
        res = browser(elsewhere.url(url, "hello", protocols=["chat", f"bearer.{token}"]))
        page = res["result"]
        assert not page["opened"] and page["closeCode"] == 1006, page
        assert metric(gw.admin, "wsgate_auth_total", method="origin", outcome="origin_not_allowed") == 1
        assert metric(gw.admin, "wsgate_handshake_refusals_total", reason="forbidden") == 1
        assert metric(gw.admin, "wsgate_auth_total", method="sso", outcome="ok") == 1, "checked before the token"

        # What the browser saw, on the wire: the 101 names "chat" and nothing else.
        r = rawws.http_get(gw.host, gw.port, "/chat", {
            "Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Origin": origin,
            "Sec-WebSocket-Protocol": f"chat, bearer.{token}"})
        assert r.status == 101 and r.header("sec-websocket-protocol") == "chat", r
        assert token not in r.raw_head.decode("latin-1")
        # Without an Origin (not a browser) the route refuses too: allow_missing_origin = false.
        r = rawws.http_get(gw.host, gw.port, "/chat", {
            "Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Protocol": f"chat, bearer.{token}"})
        assert r.status == 403, r
    finally:
        home.close()
        elsewhere.close()
