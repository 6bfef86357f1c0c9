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
import threading
import time

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
def ctl_dir(tmp_path):
    """Files the test creates to signal the page (served under /ctl/)."""
    d = tmp_path / "ctl"
    d.mkdir()
    return d


@pytest.fixture
def static_server(packed, ctl_dir):
    from wsgate_e2e.web import StaticServer

    s = StaticServer({"/pkg/": packed, "/ctl/": ctl_dir, "/": PAGE_DIR})
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


MiB = 1 << 20
FLOOD = 128 * MiB
# Kernel socket buffers, the gateway's and Chromium's own: a few MiB each.
# A readable that kept reading would take in all 128 MiB within seconds.
MAX_IN_FLIGHT = 48 * MiB


def test_browser_open_stream_stops_reading_at_its_high_water_mark(quick_gateway, peer, static_server, ctl_dir, browser):
    """openStream in Chromium (WebSocketStream) on a bridge route to a peer
    that writes 128 MiB as fast as it can: while the page reads nothing, the
    peer stalls (the gateway's relay stopped reading from it); once the page
    reads, all of it arrives and the stream ends cleanly."""
    flood = peer("tcp-flood", limit=FLOOD)
    gw = quick_gateway(flood.spec)
    url = static_server.url("/ts-stream-page.html", ws=gw.url, hwm=MiB)
    box = {}
    t = threading.Thread(target=lambda: box.update(res=browser(url, timeout=120)), daemon=True)
    t.start()
    try:
        deadline = time.monotonic() + 60
        while flood.sent == 0:
            assert time.monotonic() < deadline, "the peer never started writing"
            assert t.is_alive(), box
            time.sleep(0.05)  # polling a counter, bounded by the deadline
        sent = wait_plateau(lambda: flood.sent)
        print(f"peer stalled after {sent / MiB:.1f} MiB")
        assert sent < MAX_IN_FLIGHT, f"the peer wrote {sent / MiB:.1f} MiB to a page that reads nothing"
    finally:
        (ctl_dir / "go").write_text("read now")
    t.join(timeout=180)
    res = box["res"]
    assert res["ok"], res
    page = res["result"]
    assert page["error"] is None, page
    assert page["via"] == "WebSocketStream", page
    assert page["total"] == FLOOD, page
    assert page["closed"]["closeCode"] == 1000, page


def wait_plateau(read, settle: float = 1.0, timeout: float = 30.0) -> int:
    """Poll `read()` until it has not changed for `settle` seconds (bounded)."""
    deadline = time.monotonic() + timeout
    last, since = read(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)  # polling a counter, bounded by the deadline
        v = read()
        if v != last:
            last, since = v, time.monotonic()
        elif time.monotonic() - since >= settle:
            return v
    raise AssertionError(f"still moving after {timeout}s (at {last})")
