"""SIGTERM/SIGINT: stop accepting, close 1001 to every open WebSocket, exit 0."""

from __future__ import annotations

import json
import re
import signal

import pytest

from wsgate_e2e import NODE_DIR, clients


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_shutdown_sends_1001_and_exits_0(quick_gateway, start_gateway, peer, procs, node_bin, sig):
    gw = quick_gateway("echo:")
    py = [clients.connect(gw.url) for _ in range(3)]
    for i, ws in enumerate(py):
        ws.send(f"hello {i}")
        assert ws.recv(timeout=10) == f"hello {i}"
    node = procs.start([node_bin, NODE_DIR / "ws-client.mjs", gw.url, "hold", "--timeout", "60"], "node-hold")
    node.wait_lines(re.compile(r'^\{"event":"open"'), 1, 20)

    # A bridged connection too: its peer must see the connection end.
    sink = peer("tcp-sink")
    gw2 = quick_gateway(sink.spec)
    bridged = clients.connect(gw2.url)
    bridged.send(b"before shutdown")

    gw.proc.send_signal(sig)
    gw2.proc.send_signal(sig)
    codes = []
    for ws in py:
        _, code = clients.recv_until_close(ws, timeout=15)
        codes.append(code)
    assert codes == [1001, 1001, 1001], codes
    _, code = clients.recv_until_close(bridged, timeout=15)
    assert code == 1001, code

    node.wait(timeout=20)
    result = json.loads(node.stdout_lines[-1])
    assert result["closeCode"] == 1001, result

    assert gw.proc.wait(timeout=20) == 0, gw.proc.describe()
    assert gw2.proc.wait(timeout=20) == 0, gw2.proc.describe()
    assert sink.done.wait(10), "the peer never saw the connection end"
    assert bytes(sink.received) == b"before shutdown"
    for ws in py + [bridged]:
        ws.close()


def test_shutdown_with_no_clients_exits_0(quick_gateway):
    gw = quick_gateway("echo:")
    gw.proc.send_signal(signal.SIGTERM)
    assert gw.proc.wait(timeout=15) == 0, gw.proc.describe()
