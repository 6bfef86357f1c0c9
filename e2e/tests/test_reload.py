"""Hot reload: a change to the config file (or SIGHUP) takes effect for new
handshakes at once while every established WebSocket keeps running, and a
bad new config is refused with its FILE:LINE:COL: KEY: MESSAGE, the running
settings kept."""

from __future__ import annotations

import asyncio
import re
import signal
import time

import websockets

N = 2000


def _config(routes: str) -> str:
    return (
        'workers = 2\n[[listener]]\naddress = "127.0.0.1:0"\n'
        "[limits]\nmax_connections = 5000\n" + routes
    )


async def _open_all(url: str, n: int):
    socks = []
    # In batches, so the listen backlog is never the test's bottleneck.
    for start in range(0, n, 200):
        batch = await asyncio.gather(
            *[websockets.connect(url, open_timeout=20, ping_interval=None, max_queue=4) for _ in range(start, min(n, start + 200))]
        )
        socks.extend(batch)
    return socks


async def _echo_all(socks, tag: str):
    async def one(i, ws):
        msg = f"{tag} {i}"
        await ws.send(msg)
        got = await asyncio.wait_for(ws.recv(), 20)
        assert got == msg, (got, msg)

    await asyncio.gather(*[one(i, ws) for i, ws in enumerate(socks)])


async def _status(url: str) -> int:
    try:
        async with websockets.connect(url, open_timeout=10):
            return 101
    except websockets.exceptions.InvalidStatus as e:
        return e.response.status_code


def _until(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout}s: {what}")


def test_reload_keeps_2000_open_websockets_and_refuses_a_bad_config(start_gateway, write_config):
    path = write_config(_config('[[route]]\npath = "/old"\nto = "echo:"\n'))
    gw = start_gateway("serve", "--config", path, listeners=1)
    base = f"ws://{gw.host}:{gw.port}"

    async def run():
        socks = await _open_all(base + "/old", N)
        await _echo_all(socks, "before")
        assert await _status(base + "/new") == 404

        # A change to the file: new handshakes take the new routes.
        path.write_text(_config('[[route]]\npath = "/new"\nto = "echo:"\n'))
        deadline = time.monotonic() + 15
        while await _status(base + "/new") != 101:
            assert time.monotonic() < deadline, "the changed file was not reloaded"
            await asyncio.sleep(0.1)
        assert await _status(base + "/old") == 404
        # Every WebSocket opened before still echoes, on the old route.
        await _echo_all(socks, "after")

        # A bad file, reloaded by SIGHUP: refused, settings kept.
        path.write_text(_config('[[route]]\npath = "/newer"\nto = "tcp:/nope"\n'))
        gw.proc.send_signal(signal.SIGHUP)
        await asyncio.to_thread(
            _until,
            lambda: "reload (SIGHUP) refused" in gw.proc.stderr_text(200_000),
            15,
            "the refusal logged",
        )
        log = gw.proc.stderr_text(200_000)
        assert re.search(r"wsgate-\d+\.toml:\d+:\d+: route\[0\]\.to: invalid peer `tcp:/nope`", log), log[-3000:]
        assert await _status(base + "/new") == 101
        assert await _status(base + "/newer") == 404
        await _echo_all(socks, "still")
        await asyncio.gather(*[ws.close() for ws in socks])

    asyncio.run(run())
    assert gw.proc.popen.poll() is None, "the gateway kept running"
    gw.proc.send_signal(signal.SIGTERM)
    assert gw.proc.wait(timeout=20) == 0, gw.proc.describe()
