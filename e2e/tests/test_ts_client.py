"""The TypeScript client (clients/ts, npm `wsgate-client`) in headless
Chromium against the real gateway: the tarball `npm pack` makes is unpacked
and served to a plain `<script type="module">` page (e2e/web/ts-client-page.html),
which drives `/mux` to echo peers (100 streams over one WebSocket, one
reader stalled; half-close; resets both ways; a refused open) and a
`--framing resp` bridge route to a real redis-server with the package's
RESP client. The page measures; this file asserts."""

from __future__ import annotations

import json
import shutil
import subprocess
import tarfile

import pytest

from wsgate_e2e import REPO_ROOT

pytestmark = [pytest.mark.browser, pytest.mark.redis]

PKG = REPO_ROOT / "clients" / "ts"
PAGE_DIR = REPO_ROOT / "e2e" / "web"
STREAMS = 100
SIZE = 512 * 1024  # per stream each way: twice the 256 KiB window
# Written to the stalled stream: more than every buffer on the way holds (the
# gateway's auto-tuned window of up to 16 MiB, six socket buffers).
STALL = 64 * 1024 * 1024


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """The package as `npm pack` ships it, unpacked (package/dist/...)."""
    if not (PKG / "dist" / "index.js").is_file():
        pytest.fail("clients/ts is not built: run scripts/install-test-deps.sh")
    npm = shutil.which("npm")
    if not npm:
        pytest.fail("npm not found: run scripts/install-test-deps.sh")
    d = tmp_path_factory.mktemp("ts-client")
    out = subprocess.run([npm, "pack", "--json", "--ignore-scripts", "--pack-destination", str(d)], cwd=PKG,
                         check=True, capture_output=True, text=True, timeout=120)
    name = json.loads(out.stdout)[0]["filename"]
    with tarfile.open(d / name) as t:
        # Plain files under package/ only (Python 3.11.2 has no extraction filters).
        members = [m for m in t.getmembers() if m.isfile() and m.name.startswith("package/") and ".." not in m.name]
        t.extractall(d, members=members)
    return d / "package"


@pytest.fixture
def static_server(packed):
    from wsgate_e2e.web import StaticServer

    s = StaticServer({"/pkg/": packed, "/": PAGE_DIR})
    yield s
    s.close()


def test_browser_mux_streams_stall_half_close_reset_and_redis(
    start_gateway, quick_gateway, peer, redis_server, static_server, browser
):
    echo = peer("tcp-echo")
    resetter = peer("tcp-reset", payload=b"partial")
    gw = start_gateway("serve", "--listen", "127.0.0.1:0", "--mux-allow", "tcp://127.0.0.1:*")
    r = redis_server(tcp=True)
    rgw = quick_gateway(r.spec, "--framing", "resp", "--protocol", "redis")
    url = static_server.url(
        "/ts-client-page.html",
        mux=gw.ws("/mux"), echo=echo.spec, reset=resetter.spec, redis=rgw.url,
        n=STREAMS, size=SIZE, stall=STALL, timeout=100,
    )
    res = browser(url, timeout=120)
    assert res["ok"], res
    page = res["result"]
    assert page["error"] is None, page
    assert page["protocol"] == "wsmux.v1"

    s = page["streams"]
    print(json.dumps({k: v for k, v in s.items() if k != "ids"}))  # shown with -s: timings and samples
    assert s["ids"] == list(range(1, 2 * STREAMS, 2)), "100 streams, odd ids, over one session"
    assert s["othersOk"] == STREAMS - 1, s
    # The stalled stream holds exactly its window, sampled for a second in the page.
    assert s["highWaterMark"] == page["initialWindow"] == 256 * 1024
    assert s["samples"] == [s["highWaterMark"]] * 10, s["samples"]
    # ...and its writer was stopped too (the gateway stopped reading it), before its 64 MiB were out.
    assert len(set(s["writtenSamples"])) == 1 and s["writtenSamples"][0] < STALL, s["writtenSamples"]
    assert s["stalledResumedOk"], s

    assert page["halfClose"]["text"] == "half-close: the reply arrives after our FIN"

    rs = page["resets"]
    assert rs["echoBeforeAbort"] == "ping"
    assert rs["local"] == {"name": "StreamResetError", "code": 7, "remote": False, "isResetError": True}
    assert rs["readAfterAbort"] == "StreamResetError"
    assert rs["beforeRemoteReset"] == "partial"
    assert rs["remote"]["isResetError"] and rs["remote"]["remote"], rs
    assert rs["refused"] == {"name": "OpenRefusedError", "status": 1, "statusName": "NOT_ALLOWED", "isRefused": True}
    assert rs["sessionAlive"] is True
    assert page["closedKind"] == "closed"

    red = page["redis"]
    assert red["ping"] == "PONG"
    assert red["set"] == "OK"
    assert red["get"] == "héllo from the page"
    assert red["incrs"] == list(range(1, 101))
    assert red["pipeline"] == [101, {"error": "ERR"}, "héllo from the page"]
    assert red["error"] == {"name": "RespError", "code": "ERR"}
    assert red["hello"] == {"isMap": True, "proto": 3}
    assert red["set3"] == {"isSet": True, "members": ["a", "b"]}
    assert red["openStreamReply"] == "+PONG\r\n"
    # Chromium has WebSocketStream: openStream uses it there.
    assert red["openStreamVia"] == ("WebSocketStream" if page["webSocketStream"] else "WebSocket")
