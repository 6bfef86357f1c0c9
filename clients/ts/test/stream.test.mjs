// openStream() in Node over the `ws` package's WebSocket against local `ws`
// servers: backpressure both ways, message types, closing.
import { test } from "node:test";
import assert from "node:assert/strict";
import { WebSocket } from "ws";
import { openStream, WebSocketCloseError } from "../dist/index.js";
import { wsServer, delay, until } from "./helpers.mjs";

/** The `ws` WebSocket, recording its instances and the bytes of every message it delivered. */
class CountingWebSocket extends WebSocket {
  static last;
  constructor(...args) {
    super(...args);
    CountingWebSocket.last = this;
    this.delivered = 0;
    this.pauses = 0;
    this.addEventListener("message", (ev) => (this.delivered += ev.data.byteLength ?? ev.data.length));
  }
  pause() {
    this.pauses++;
    super.pause();
  }
}

test("the readable side queues at most its high-water mark, then stops reading the socket", async () => {
  const MSG = 65536;
  const TOTAL = 2048; // 128 MiB, far more than the kernel's buffers hold
  let server;
  const srv = await wsServer((ws) => {
    server = { ws, sent: 0 };
    const blast = () => {
      // Keep at most 1 MiB in the server's own buffer; the rest waits.
      while (server.sent < TOTAL && ws.bufferedAmount < 1 << 20) {
        const m = new Uint8Array(MSG);
        new DataView(m.buffer).setUint32(0, server.sent);
        ws.send(m);
        server.sent++;
      }
      if (server.sent < TOTAL) setTimeout(blast, 2);
    };
    blast();
  });
  const hwm = 1 << 20;
  const d = await openStream(srv.url, { WebSocket: CountingWebSocket, highWaterMark: hwm });
  const sock = CountingWebSocket.last;
  try {
    assert.equal(d.via, "WebSocket");
    // Nobody reads: the client pauses at the mark and the server stalls.
    let last = -1;
    await until(async () => {
      const now = server.sent;
      const stalled = now === last;
      last = now;
      await delay(150);
      return stalled && server.sent === now;
    }, 20000, "the server to stall");
    assert.ok(server.sent < TOTAL, `the server stalled (${server.sent} of ${TOTAL} messages sent)`);
    assert.ok(sock.pauses >= 1, "the socket was paused");
    assert.ok(sock.delivered >= hwm, `the queue filled to the mark (${sock.delivered})`);
    // `ws` may still deliver what it had parsed when paused: a few messages at most.
    assert.ok(sock.delivered <= hwm + 4 * MSG, `and stopped there: ${sock.delivered} bytes delivered, mark ${hwm}`);
    // Reading resumes the socket; every message arrives, in order.
    const r = d.readable.getReader();
    for (let i = 0; i < TOTAL; i++) {
      const { value } = await r.read();
      assert.equal(value.byteLength, MSG);
      assert.equal(new DataView(value.buffer, value.byteOffset).getUint32(0), i);
    }
  } finally {
    d.close();
    await srv.close();
  }
});

test("the writable side waits while bufferedAmount is above its high-water mark", async () => {
  let peer;
  let received = 0;
  const srv = await wsServer((ws) => {
    peer = ws;
    ws.pause(); // reads nothing until resumed
    ws.on("message", (m) => (received += m.length));
  });
  const whwm = 512 * 1024;
  const d = await openStream(srv.url, { WebSocket: CountingWebSocket, writableHighWaterMark: whwm });
  const sock = CountingWebSocket.last;
  const w = d.writable.getWriter();
  const chunk = new Uint8Array(65536);
  const N = 1000; // 64 MiB
  let written = 0;
  const writing = (async () => {
    for (let i = 0; i < N; i++) {
      await w.write(chunk);
      written++;
    }
  })();
  try {
    let last = -1;
    await until(async () => {
      const stalled = written === last;
      last = written;
      await delay(150);
      return stalled && written === last;
    }, 20000, "the writer to stop");
    assert.ok(written < N, `writes stopped (${written} of ${N})`);
    assert.ok(sock.bufferedAmount > whwm, `bufferedAmount ${sock.bufferedAmount} is above the mark`);
    assert.ok(sock.bufferedAmount <= whwm + chunk.length, `by at most one message (${sock.bufferedAmount})`);
    assert.ok(w.desiredSize <= 0, "writer.ready is pending: backpressure reaches the writer");
    peer.resume();
    await writing;
    await until(() => received === N * chunk.length, 20000, "everything at the server");
  } finally {
    d.close();
    await srv.close();
  }
});

test("text messages are strings, binary ones Uint8Arrays, both ways", async () => {
  const srv = await wsServer((ws) => ws.on("message", (m, isBinary) => ws.send(m, { binary: isBinary })));
  const d = await openStream(srv.url, { WebSocket });
  try {
    const w = d.writable.getWriter();
    const r = d.readable.getReader();
    await w.write("héllo");
    assert.equal((await r.read()).value, "héllo");
    await w.write(Uint8Array.of(1, 2, 3));
    assert.deepEqual((await r.read()).value, Uint8Array.of(1, 2, 3));
    await w.write(new Uint16Array([0x0102]).buffer);
    assert.equal((await r.read()).value.byteLength, 2);
    await w.close(); // closes the WebSocket
    assert.equal((await d.closed).closeCode, 1000);
    assert.equal((await r.read()).done, true);
  } finally {
    await srv.close();
  }
});

test("a clean close ends the readable after the messages before it; a dropped connection errors it", async () => {
  const srv = await wsServer((ws, req) => {
    ws.send("one");
    ws.send("two");
    if (req.url === "/clean") ws.close(4001, "done");
    else setTimeout(() => ws.terminate(), 50);
  });
  const d = await openStream(srv.url + "clean", { WebSocket });
  const got = [];
  for await (const m of d.readable) got.push(m);
  assert.deepEqual(got, ["one", "two"]);
  assert.deepEqual(await d.closed, { closeCode: 4001, reason: "done" });

  const e = await openStream(srv.url + "drop", { WebSocket });
  const r = e.readable.getReader();
  assert.equal((await r.read()).value, "one");
  assert.equal((await r.read()).value, "two");
  await assert.rejects(r.read(), (err) => err instanceof WebSocketCloseError && err.closeCode === 1006);
  await srv.close();
});

test("the selected subprotocol is reported; a refused handshake rejects", async () => {
  const srv = await wsServer(() => {}, { handleProtocols: (p) => (p.has("redis") ? "redis" : false) });
  const d = await openStream(srv.url, { WebSocket, protocols: ["x", "redis"] });
  assert.equal(d.protocol, "redis");
  d.close();
  await d.closed;
  const bad = await wsServer(() => {}, { verifyClient: () => false });
  await assert.rejects(openStream(bad.url, { WebSocket }), WebSocketCloseError);
  await srv.close();
  await bad.close();
});
