// The package's mux against itself (client and server over a real loopback
// WebSocket, the `ws` package) and against raw peers that misbehave on
// purpose. The Rust reference is the peer in crates/wsmux/tests/js_interop.rs
// and the real gateway in e2e/tests/test_ts_client.py.
import { test } from "node:test";
import assert from "node:assert/strict";
import { WebSocket } from "ws";
import {
  MuxSession,
  MuxError,
  StreamResetError,
  OpenRefusedError,
  INITIAL_WINDOW,
  GoAwayCode,
  bearerProtocol,
} from "../dist/index.js";
import { muxServer, wsServer, echo, pattern, readAll, writeAll, delay, until, frame, parseFrame } from "./helpers.mjs";

const connect = (url, opts = {}) => MuxSession.connect(url, { WebSocket, ...opts });

test("20 streams echo 1 MB each, with half-close: the echo arrives after our FIN", async () => {
  const srv = await muxServer(echo);
  const c = await connect(srv.url);
  try {
    await Promise.all(
      Array.from({ length: 20 }, async (_, i) => {
        const s = c.openRaw();
        assert.equal(s.id, 2 * i + 1, "client ids are odd and increasing");
        const data = pattern(i, 1_000_000 + i);
        const [, back] = await Promise.all([writeAll(s.writable, data), readAll(s.readable)]);
        assert.deepEqual(back, data);
        await s.closed;
      }),
    );
    assert.equal(c.streamCount, 0, "closed streams are released");
  } finally {
    c.close();
    await srv.close();
  }
});

test("over the `ws` package, a turn's first frame leaves at once and the rest of the turn's in one write", async () => {
  const srv = await muxServer(echo);
  const c = await connect(srv.url);
  const turn = () => new Promise((r) => setImmediate(r));
  try {
    const streams = Array.from({ length: 10 }, () => c.openRaw());
    await turn(); // the SYNs are out
    const tcp = c.socket._socket;
    const writes = [];
    const { _write, _writev } = tcp;
    tcp._write = function (chunk, enc, cb) {
      writes.push(1);
      return _write.call(this, chunk, enc, cb);
    };
    tcp._writev = function (chunks, cb) {
      writes.push(chunks.length);
      return _writev.call(this, chunks, cb);
    };
    const writers = streams.map((s) => s.writable.getWriter());
    await Promise.all(writers.map((w, i) => w.write(new Uint8Array([i]))));
    await turn();
    // Frames of a later turn (none are expected) would follow these.
    assert.deepEqual(writes.slice(0, 2), [1, 9], "ten DATA frames: the first at once, nine in one write");
    tcp._write = _write;
    tcp._writev = _writev;
    await Promise.all(writers.map((w) => w.close()));
    const back = await Promise.all(streams.map((s) => readAll(s.readable)));
    assert.deepEqual(back.map((b) => [...b]), streams.map((_, i) => [i]));
  } finally {
    c.close();
    await srv.close();
  }
});

test("a stalled reader stops its own sender at its window and no other stream", async () => {
  let stalledPeer;
  const srv = await muxServer((s) => {
    // The server writes 8 MiB on every stream the client opens.
    const w = s.writable.getWriter();
    if (!stalledPeer) stalledPeer = s;
    (async () => {
      const chunk = new Uint8Array(65536).fill(s.id & 0xff);
      try {
        for (let i = 0; i < 128; i++) await w.write(chunk);
        await w.close();
      } catch {}
    })();
  });
  const c = await connect(srv.url);
  try {
    const stalled = c.openRaw();
    await stalled.writable.getWriter().write(new Uint8Array([1])); // the SYN reaches the server first
    await until(() => stalledPeer, 5000, "the server to accept");
    const other = c.openRaw();
    await other.writable.getWriter().write(new Uint8Array([1]));
    const got = await readAll(other.readable);
    assert.equal(got.byteLength, 8 << 20, "the other stream got all 8 MiB");
    // The stalled stream holds exactly its window; its sender has no credit.
    await until(() => stalled.bufferedAmount === stalled.highWaterMark, 5000, "the stalled stream to fill its window");
    assert.equal(stalled.highWaterMark, INITIAL_WINDOW);
    assert.equal(stalledPeer.sendWindow, 0);
    await delay(100);
    assert.equal(stalled.bufferedAmount, INITIAL_WINDOW, "nothing beyond the window arrives");
    // Reading again resumes it, and everything arrives intact.
    const rest = await readAll(stalled.readable);
    assert.equal(rest.byteLength, 8 << 20);
    assert.ok(rest.every((b) => b === (stalledPeer.id & 0xff)));
  } finally {
    c.close();
    await srv.close();
  }
});

test("auto-tuning grows the window of a stream that is read fast, up to the maximum", async () => {
  const srv = await muxServer((s) => {
    const w = s.writable.getWriter();
    (async () => {
      const chunk = new Uint8Array(65536);
      for (let i = 0; i < 256; i++) await w.write(chunk);
      await w.close();
    })().catch(() => {});
  });
  const c = await connect(srv.url, { maxWindow: 1 << 20 });
  try {
    await until(() => c.rtt !== undefined, 5000, "the first PING answer");
    const s = c.openRaw();
    await s.writable.getWriter().write(new Uint8Array([0]));
    assert.equal((await readAll(s.readable)).byteLength, 16 << 20);
    assert.ok(s.highWaterMark > INITIAL_WINDOW, `window grew (${s.highWaterMark})`);
    assert.ok(s.highWaterMark <= 1 << 20, `window stayed under the maximum (${s.highWaterMark})`);
  } finally {
    c.close();
    await srv.close();
  }
});

test("abort(reason) and cancel(reason) reset the stream with the reason's code", async () => {
  const seen = [];
  const srv = await muxServer(async (s) => {
    try {
      await readAll(s.readable);
      seen.push("end");
    } catch (e) {
      seen.push(e);
    }
  });
  const c = await connect(srv.url);
  try {
    const a = c.openRaw();
    const w = a.writable.getWriter();
    await w.write(new Uint8Array([1, 2, 3]));
    await w.abort({ code: 42 });
    await assert.rejects(a.closed, (e) => e instanceof StreamResetError && e.code === 42 && !e.remote);
    await assert.rejects(a.readable.getReader().read(), StreamResetError);

    const b = c.openRaw();
    await b.writable.getWriter().write(new Uint8Array([1]));
    await b.readable.cancel(7);
    b.reset(9); // already reset: no second RST
    await until(() => seen.length === 2, 5000, "both resets at the server");
    assert.ok(seen.every((e) => e instanceof StreamResetError && e.remote));
    assert.deepEqual(seen.map((e) => e.code), [42, 7]);
    // The session goes on.
    const d = c.openRaw();
    await d.writable.getWriter().close();
    await until(() => seen.length === 3);
    assert.equal(seen[2], "end");
  } finally {
    c.close();
    await srv.close();
  }
});

test("data sent before a reset stays readable, then reads fail with the code", async () => {
  const srv = await muxServer(async (s) => {
    const w = s.writable.getWriter();
    await w.write(new TextEncoder().encode("last words"));
    await w.abort(1234);
  });
  const c = await connect(srv.url);
  try {
    const s = c.openRaw();
    const w = s.writable.getWriter();
    await w.write(new Uint8Array([0]));
    await until(() => s.bufferedAmount === 10, 5000, "the data before the RST");
    await assert.rejects(s.closed, (e) => e instanceof StreamResetError && e.code === 1234 && e.remote);
    const r = s.readable.getReader();
    assert.equal(new TextDecoder().decode((await r.read()).value), "last words");
    await assert.rejects(r.read(), (e) => e instanceof StreamResetError && e.code === 1234);
    await assert.rejects(w.write(new Uint8Array(1)), StreamResetError);
  } finally {
    c.close();
    await srv.close();
  }
});

test("accept() takes streams the server opens; ids are even", async () => {
  const srv = await muxServer(() => {});
  const c = await connect(srv.url);
  try {
    await until(() => srv.sessions.length === 1);
    const server = srv.sessions[0];
    const opened = [server.openRaw(), server.openRaw()];
    for (const [i, s] of opened.entries()) writeAll(s.writable, pattern(i, 300_000));
    for (const [i, want] of opened.entries()) {
      const s = await c.accept();
      assert.equal(s.id, want.id);
      assert.equal(s.id % 2, 0);
      assert.deepEqual(await readAll(s.readable), pattern(i, 300_000));
    }
  } finally {
    c.close();
    await srv.close();
  }
});

test("GOAWAY: no new streams either way, existing streams finish", async () => {
  let accepted = 0;
  const srv = await muxServer((s) => {
    accepted++;
    echo(s);
  });
  const c = await connect(srv.url);
  try {
    const s = c.openRaw();
    const w = s.writable.getWriter();
    await w.write(new Uint8Array(1000));
    await until(() => accepted === 1, 5000, "the server to accept");
    srv.sessions[0].goaway();
    await until(() => !c.acceptsNewStreams, 5000, "the GOAWAY");
    assert.throws(() => c.openRaw(), (e) => e instanceof MuxError && e.kind === "goaway" && e.code === GoAwayCode.NORMAL);
    await assert.rejects(c.open("tcp://127.0.0.1:1"), (e) => e instanceof MuxError && e.kind === "goaway");
    await assert.rejects(c.accept(), (e) => e instanceof MuxError && e.kind === "goaway");
    await w.write(new Uint8Array(1000));
    await w.close();
    assert.equal((await readAll(s.readable)).byteLength, 2000);
    await s.closed;
  } finally {
    c.close();
    await srv.close();
  }
});

test("close() fails unfinished streams with MuxError closed and ends the session", async () => {
  const srv = await muxServer(() => {});
  const c = await connect(srv.url);
  const s = c.openRaw();
  c.close();
  await assert.rejects(s.closed, (e) => e instanceof MuxError && e.kind === "closed");
  assert.equal((await c.closed).kind, "closed");
  assert.throws(() => c.openRaw(), MuxError);
  await until(() => srv.sessions.length === 1);
  const e = await srv.sessions[0].closed;
  assert.ok(e.kind === "goaway" || e.kind === "transport", e.message);
  await srv.close();
});

test("open(destination) sends the open request and resolves at the OK reply", async () => {
  const dec = new TextDecoder();
  const srv = await muxServer((s) => gateway(s).catch(() => {}));
  // A minimal gateway: read the request, reply, echo.
  async function gateway(s) {
    const r = s.readable.getReader();
    let buf = new Uint8Array(0);
    while (buf.length < 4 || buf.length < 4 + ((buf[2] << 8) | buf[3])) {
      const { value } = await r.read();
      buf = new Uint8Array([...buf, ...value]);
    }
    assert.deepEqual([...buf.subarray(0, 2)], [0x57, 1]);
    const dest = dec.decode(buf.subarray(4));
    const w = s.writable.getWriter();
    const status = dest.includes(":1") ? 1 : 0;
    const msg = new TextEncoder().encode(status ? `${dest} is not allowed` : "");
    // Reply and the first echoed bytes in one write: both must be handled.
    await w.write(new Uint8Array([1, status, 0, msg.length, ...msg, ...(status ? [] : new TextEncoder().encode(">"))]));
    if (status) {
      await w.close();
      await r.read();
      return;
    }
    r.releaseLock();
    w.releaseLock();
    echo(s);
  }
  const c = await connect(srv.url);
  try {
    const s = await c.open("tcp://127.0.0.1:7");
    assert.equal(s.destination, "tcp://127.0.0.1:7");
    const w = s.writable.getWriter();
    await w.write("hello");
    await w.close();
    assert.equal(dec.decode(await readAll(s.readable)), ">hello");
    await assert.rejects(
      c.open("tcp://127.0.0.1:1"),
      (e) => e instanceof OpenRefusedError && e.status === 1 && e.statusName === "NOT_ALLOWED" && /not allowed/.test(e.reason),
    );
    await until(() => c.streamCount === 0, 5000, "the refused stream to close cleanly");
    await assert.rejects(c.open("not a destination"), TypeError);
  } finally {
    c.close();
    await srv.close();
  }
});

test("the token is offered as wsgate.bearer.<base64url> beside wsmux.v1", async () => {
  let offered;
  const srv = await wsServer((ws, req) => {
    offered = req.headers["sec-websocket-protocol"];
    new MuxSession(ws, { client: false });
  });
  const c = await connect(srv.url, { token: "s3cret/+=token" });
  try {
    assert.deepEqual(offered.split(/\s*,\s*/), ["wsmux.v1", "wsgate.bearer.czNjcmV0Lys9dG9rZW4"]);
    assert.equal(bearerProtocol("s3cret/+=token"), "wsgate.bearer.czNjcmV0Lys9dG9rZW4");
    assert.equal(c.socket.protocol, "wsmux.v1");
  } finally {
    c.close();
    await srv.close();
  }
});

// Raw peers: what a violation makes the package send, and how it fails.
async function rawPeer(script) {
  const frames = [];
  const srv = await wsServer((ws) => {
    ws.on("message", (data, isBinary) => frames.push(isBinary ? parseFrame(data) : { text: String(data) }));
    script(ws);
  });
  return { ...srv, frames };
}

for (const [what, send, code] of [
  ["a text message", (ws) => ws.send("hello"), GoAwayCode.TEXT_MESSAGE],
  ["a frame of version 2", (ws) => ws.send(Uint8Array.of(2, ...new Uint8Array(11))), GoAwayCode.UNSUPPORTED_VERSION],
  ["a frame for a stream never opened", (ws) => ws.send(frame(0, 0, 2, 0, Uint8Array.of(1))), GoAwayCode.PROTOCOL_ERROR],
  ["a SYN with the client's parity", (ws) => ws.send(frame(1, 1, 3, 0)), GoAwayCode.PROTOCOL_ERROR],
  [
    "DATA beyond the credit",
    (ws) => {
      ws.send(frame(1, 1, 2, 0));
      for (let i = 0; i < 5; i++) ws.send(frame(0, 0, 2, 0, new Uint8Array(65536)));
    },
    GoAwayCode.FLOW_CONTROL_ERROR,
  ],
  [
    "DATA after FIN",
    (ws) => {
      ws.send(frame(0, 1 | 4, 2, 0, Uint8Array.of(1)));
      ws.send(frame(0, 0, 2, 0, Uint8Array.of(1)));
    },
    GoAwayCode.PROTOCOL_ERROR,
  ],
]) {
  test(`${what} gets GOAWAY ${code} and fails the session`, async () => {
    const srv = await rawPeer((ws) => setTimeout(() => send(ws), 20));
    const c = await connect(srv.url, { keepalive: false });
    const err = await c.closed;
    assert.ok(err instanceof MuxError && err.kind === "protocol" && err.code === code, String(err));
    await until(() => srv.frames.some((f) => f.type === 3), 5000, "the GOAWAY");
    assert.equal(srv.frames.find((f) => f.type === 3).value, code);
    await srv.close();
  });
}

test("frames for a closed or refused stream are ignored", async () => {
  const srv = await rawPeer((ws) => {
    ws.send(frame(0, 1 | 8, 2, 0)); // SYN|RST: id 2 used, nothing opens
    ws.send(frame(0, 0, 2, 0, Uint8Array.of(1))); // ignored
    ws.send(frame(1, 1, 4, 0)); // a stream the client accepts
  });
  const c = await connect(srv.url, { keepalive: false });
  try {
    const s = await c.accept();
    assert.equal(s.id, 4);
    s.reset(3);
    // After our RST, anything for stream 4 is ignored, DATA included.
    const ws = [...srv.wss.clients][0];
    ws.send(frame(0, 0, 4, 0, Uint8Array.of(1, 2)));
    ws.send(frame(1, 0, 4, 100));
    ws.send(frame(2, 1, 0, 77)); // a PING shows the frames before it were read
    await until(() => srv.frames.some((f) => f.type === 2 && f.flags === 2 && f.value === 77));
    assert.ok(c.acceptsNewStreams, "no protocol error");
  } finally {
    c.close();
    await srv.close();
  }
});

test("a SYN beyond the accept backlog is refused with RST REFUSED", async () => {
  const srv = await rawPeer((ws) => {
    for (const id of [2, 4, 6]) ws.send(frame(1, 1, id, 0));
  });
  const c = await connect(srv.url, { keepalive: false, acceptBacklog: 2 });
  try {
    await until(() => srv.frames.some((f) => f.type === 0 && f.flags === 8), 5000, "the refusal");
    const rst = srv.frames.find((f) => f.type === 0 && f.flags === 8);
    assert.deepEqual([rst.id, rst.value], [6, 1]);
    assert.equal((await c.accept()).id, 2);
    assert.equal((await c.accept()).id, 4);
    await until(() => srv.frames.filter((f) => f.flags === 2 && f.type === 1).length === 2, 5000, "two ACKs");
  } finally {
    c.close();
    await srv.close();
  }
});

test("PINGs are answered at once; the first PING measures the round trip", async () => {
  const srv = await rawPeer((ws) => ws.send(frame(2, 1, 0, 4242)));
  const c = await connect(srv.url, { keepalive: false });
  try {
    await until(() => srv.frames.some((f) => f.type === 2 && f.flags === 2 && f.value === 4242), 5000, "the answer");
    const ping = srv.frames.find((f) => f.type === 2 && f.flags === 1);
    assert.ok(ping, "the client sent a PING");
    [...srv.wss.clients][0].send(frame(2, 2, 0, ping.value));
    await until(() => c.rtt !== undefined, 5000, "the round trip");
  } finally {
    c.close();
    await srv.close();
  }
});

test("keepalive: a peer that answers no PING and sends nothing is declared dead", async () => {
  const srv = await rawPeer(() => {});
  const t0 = performance.now();
  const c = await connect(srv.url, { keepalive: { interval: 100, timeout: 300 } });
  const s = c.openRaw();
  const err = await c.closed;
  const took = performance.now() - t0;
  assert.ok(err instanceof MuxError && err.kind === "keepalive" && err.code === GoAwayCode.KEEPALIVE_TIMEOUT, String(err));
  assert.ok(took >= 290 && took < 3000, `declared dead after ${took} ms`);
  await assert.rejects(s.closed, (e) => e === err);
  await until(() => srv.frames.some((f) => f.type === 3 && f.value === 5), 5000, "GOAWAY KEEPALIVE_TIMEOUT");
  await srv.close();
});

test("keepalive: a peer that answers stays alive over many intervals", async () => {
  const srv = await muxServer(() => {});
  const c = await connect(srv.url, { keepalive: { interval: 20, timeout: 200 } });
  try {
    await delay(500);
    assert.ok(c.acceptsNewStreams, "still alive");
  } finally {
    c.close();
    await srv.close();
  }
});

test("a peer's error GOAWAY fails every stream with its code", async () => {
  const srv = await rawPeer((ws) => {
    ws.send(frame(1, 1, 2, 0));
    setTimeout(() => ws.send(frame(3, 0, 0, GoAwayCode.INTERNAL_ERROR, new TextEncoder().encode("bye"))), 50);
  });
  const c = await connect(srv.url, { keepalive: false });
  const s = await c.accept();
  const err = await c.closed;
  assert.ok(err.kind === "goaway" && err.code === GoAwayCode.INTERNAL_ERROR && /INTERNAL_ERROR: bye/.test(err.message), err.message);
  await assert.rejects(s.readable.getReader().read(), (e) => e === err);
  await srv.close();
});

test("the WebSocket closing fails the session with MuxError transport", async () => {
  const srv = await wsServer((ws) => setTimeout(() => ws.terminate(), 20));
  const c = await connect(srv.url, { keepalive: false });
  const err = await c.closed;
  assert.equal(err.kind, "transport");
  await srv.close();
});

test("connecting to a server that refuses rejects with MuxError transport", async () => {
  const srv = await wsServer(() => {}, { verifyClient: () => false });
  await assert.rejects(connect(srv.url), (e) => e instanceof MuxError && e.kind === "transport");
  await srv.close();
});

test("writers wait while the WebSocket's bufferedAmount is above the send high-water mark", async () => {
  let peer;
  let received = 0;
  // The server grants 32 MiB of credit: what stops the writer is the socket.
  const srv = await muxServer(async (s) => {
    for await (const c of s.readable) received += c.byteLength;
  }, { window: 32 << 20, maxSessionMemory: 64 << 20 });
  srv.wss.on("connection", (ws) => (peer = ws));
  const hwm = 256 * 1024;
  const c = await connect(srv.url, { sendHighWaterMark: hwm });
  try {
    const s = c.openRaw();
    const w = s.writable.getWriter();
    await w.write(new Uint8Array(1));
    await until(() => s.sendWindow > 1 << 20, 5000, "the server's ACK with its extra window");
    peer.pause(); // the server stops reading: the client's socket buffers fill
    let written = 0;
    const chunk = new Uint8Array(65536);
    const writing = (async () => {
      for (let i = 0; i < 400; i++) {
        await w.write(chunk);
        written += chunk.length;
      }
      await w.close();
    })();
    writing.catch(() => {});
    let last = -1;
    await until(async () => {
      const stuck = last === written;
      last = written;
      await delay(100);
      return stuck && written === last;
    }, 10000, "the writer to stop");
    assert.ok(written < 400 * 65536, `stopped before the end (${written})`);
    assert.ok(s.sendWindow > 0, "with credit left: the socket stopped it");
    assert.ok(c.socket.bufferedAmount > hwm, `bufferedAmount ${c.socket.bufferedAmount} is above the mark`);
    assert.ok(c.socket.bufferedAmount <= hwm + 2 * 65536, `by at most a frame or so (${c.socket.bufferedAmount})`);
    peer.resume();
    await writing;
    await until(() => received === 400 * 65536 + 1, 10000, "everything at the server");
  } finally {
    c.close();
    await srv.close();
  }
});

test("100 writers take turns through a small send high-water mark; every byte arrives in order", async () => {
  const srv = await muxServer(echo, { maxStreams: 1024, acceptBacklog: 1024 });
  const c = await connect(srv.url, { sendHighWaterMark: 64 * 1024 });
  try {
    await Promise.all(
      Array.from({ length: 100 }, async (_, i) => {
        const s = c.openRaw();
        const data = pattern(1000 + i, 200_000);
        const [, back] = await Promise.all([writeAll(s.writable, data, { chunk: 50_000 }), readAll(s.readable)]);
        assert.deepEqual(back, data, `stream ${s.id}`);
      }),
    );
  } finally {
    c.close();
    await srv.close();
  }
});
