"""The browser example (examples/browser) as a reader runs it: its one
documented command (`examples/browser/run.sh`, which starts redis-server,
the demo peers and wsgate with the example's gateway.toml) and its page in
headless Chromium, driven like a person would (e2e/node/example-browser.mjs):
console lines typed into the Redis console (SET/GET, a pipeline, an error
reply, RESP3 aggregates) against the real redis-server; the mux demo's
streams over one WebSocket to an echo peer and a slow one, until the echo
streams are done and the slow one waits for credit; then a reset of the
slow stream. The screenshot the README shows (docs/img/browser-example.png)
is written here, once everything passed."""

from __future__ import annotations

import json
import re
import shutil
import struct
import urllib.request

import pytest

from wsgate_e2e import NODE_DIR, REPO_ROOT
from wsgate_e2e.procs import run_json

pytestmark = [pytest.mark.browser, pytest.mark.redis]

EXAMPLE = REPO_ROOT / "examples" / "browser"
SCREENSHOT = REPO_ROOT / "docs" / "img" / "browser-example.png"
MiB = 1 << 20
ECHO_STREAMS = 4
ECHO_MIB = 8
# More than every buffer between the page and the slow peer holds (the
# gateway's auto-tuned window, up to 16 MiB, and the sockets' buffers), so
# the slow stream must run out of credit long before it is done.
SLOW_MIB = 64

CONSOLE = [
    'SET greeting "hello from the page"',
    "GET greeting",
    "INCR visits; INCR visits; RPUSH langs rust ts; LRANGE langs 0 -1",
    "INCR greeting",
    "HELLO 3",
    "HSET h a 1 b 2; HGETALL h",
]


def test_browser_example_console_and_mux_demo(procs, wsgate_bin, node_bin, tmp_path):
    if not shutil.which("redis-server"):
        pytest.fail("redis-server not found: run scripts/install-test-deps.sh")
    chromium = "/usr/bin/chromium"
    run = procs.start([EXAMPLE / "run.sh", "--listen", "127.0.0.1:0"], "run.sh", env={"WSGATE_BIN": str(wsgate_bin)})
    url = run.wait_lines(re.compile(r"^open (http://\S+)$"), 1, timeout=180)[0].group(1)

    # The gateway's static routes serve the page and the package.
    base = url.split("?")[0]
    with urllib.request.urlopen(base, timeout=10) as r:
        assert r.headers["Content-Type"] == "text/html; charset=utf-8"
        assert b'"wsgate-client": "/pkg/index.js"' in r.read()
    with urllib.request.urlopen(base + "pkg/index.js", timeout=10) as r:
        assert r.headers["Content-Type"] == "text/javascript; charset=utf-8"

    shot = tmp_path / "browser-example.png"
    scenario = {"console": CONSOLE, "echoStreams": ECHO_STREAMS, "mib": ECHO_MIB, "slowMib": SLOW_MIB}
    res, _ = run_json([node_bin, NODE_DIR / "example-browser.mjs", url, "--scenario", json.dumps(scenario),
                       "--screenshot", shot, "--timeout", "120", "--chromium", chromium], timeout=160)
    assert res["ok"], res
    assert not [line for line in res["logs"] if line.startswith(("pageerror", "console.error"))], res["logs"]

    # ------------------------------------------------------------- console
    entries = res["console"]["entries"]
    assert [e["input"] for e in entries] == CONSOLE
    assert all(e["done"] and e["error"] is None for e in entries), entries
    replies = [e["replies"] for e in entries]
    assert replies[0] == [['"OK"']]
    assert replies[1] == [['"hello from the page"']]
    # One pipeline, four replies in order; the nested array is indented under its tag.
    assert entries[2]["commands"] == 4
    assert replies[2] == [["[1] (integer) 1"], ["[2] (integer) 2"], ["[3] (integer) 2"],
                          ['[4] 1) "rust"', '    2) "ts"']]
    assert replies[3] == [["(error) ERR value is not an integer or out of range"]]
    # RESP3 from HELLO 3 on: a map, from the real redis-server.
    hello = replies[4][0]
    assert hello[0] == '1# "server" => "redis"' and '3# "proto" => (integer) 3' in hello, hello
    assert any(re.fullmatch(r'2# "version" => "\d+\.\d+\.\d+"', line) for line in hello), hello
    assert res["console"]["protocol"] == 3
    assert replies[5] == [["[1] (integer) 2"], ['[2] 1# "a" => "1"', '    2# "b" => "2"']]
    text = res["consoleText"]
    for line in CONSOLE + ['"hello from the page"', "(error) ERR value is not an integer or out of range"]:
        assert line in text, (line, text)

    # ------------------------------------------------------------- mux demo
    mux = res["mux"]
    assert mux["error"] is None and mux["phase"] == "running", mux
    assert mux["protocol"] == "wsmux.v1"
    streams = mux["streams"]
    # Five streams, odd ids in order: one client session, one WebSocket.
    assert [s["id"] for s in streams] == [1, 3, 5, 7, 9]
    echoes, slow = streams[:-1], streams[-1]
    for s in echoes:
        assert s["kind"] == "echo"
        assert (s["state"], s["sent"], s["received"], s["verified"]) == ("done", ECHO_MIB * MiB, ECHO_MIB * MiB, True), s
    # The slow stream: out of credit with a write pending, far from done.
    assert slow["kind"] == "slow" and slow["total"] == SLOW_MIB * MiB
    assert slow["state"] == "sending" and slow["writing"] and slow["sendWindow"] == 0 and slow["stalled"], slow
    assert slow["received"] < slow["sent"] < slow["total"] // 2, slow
    assert mux["echoDone"] and mux["slowStalled"]
    table = res["tableText"]
    assert table.count("done") == ECHO_STREAMS and "waiting for credit" in table, table

    # Reset: only the slow stream fails; the session and the finished streams stand.
    after = res["afterReset"]
    assert after["phase"] == "finished", after
    last = after["streams"][-1]
    assert last["state"] == "reset (code 0)" and "reset locally" in last["error"], last
    assert [s["state"] for s in after["streams"][:-1]] == ["done"] * ECHO_STREAMS

    # ------------------------------------------------------------ screenshot
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert width == 1280 and height >= 600, (width, height)
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, SCREENSHOT)
