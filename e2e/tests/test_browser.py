"""Headless Chromium (Debian's) via playwright-core: a page served by the test
opens `new WebSocket(url, "redis")` to the gateway in front of a real
redis-server, sends PING as RESP and sees +PONG."""

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.redis]


def test_browser_redis_ping(redis_server, quick_gateway, page_server, browser):
    r = redis_server()
    gw = quick_gateway(r.spec, "--framing", "resp", "--protocol", "redis")
    res = browser(page_server.url(gw.url, "*1\r\n$4\r\nPING\r\n", protocols=["redis"]))
    assert res["ok"], res
    page = res["result"]
    assert page["error"] is None, page
    assert page["opened"] and page["protocol"] == "redis", page
    assert page["messages"] == ["+PONG\r\n"], page
