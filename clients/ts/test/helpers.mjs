// Shared by the Node tests: local WebSocket servers (the `ws` package) and
// byte helpers. Every server listens on 127.0.0.1 with an OS-chosen port.
import { WebSocketServer } from "ws";
import { MuxSession } from "../dist/index.js";

/** A `ws` server; `onConnection(ws, req)` per client. Returns { url, wss, close }. */
export async function wsServer(onConnection, opts = {}) {
  const wss = new WebSocketServer({ host: "127.0.0.1", port: 0, ...opts });
  await new Promise((r) => wss.on("listening", r));
  wss.on("connection", onConnection);
  return {
    url: `ws://127.0.0.1:${wss.address().port}/`,
    wss,
    close: () => {
      for (const c of wss.clients) c.terminate();
      return new Promise((r) => wss.close(r));
    },
  };
}

/** A wsmux server (the package, server side): `onStream(stream, session)` per accepted stream. */
export async function muxServer(onStream, sessionOpts = {}) {
  const sessions = [];
  const srv = await wsServer((ws) => {
    const s = new MuxSession(ws, { client: false, ...sessionOpts });
    sessions.push(s);
    (async () => {
      for (;;) {
        let st;
        try {
          st = await s.accept();
        } catch {
          return;
        }
        onStream(st, s);
      }
    })();
  });
  return { ...srv, sessions };
}

/** Echoes a stream: everything read is written back, then FIN. */
export function echo(stream) {
  stream.readable.pipeTo(stream.writable).catch(() => {});
}

export function pattern(seed, len) {
  const b = new Uint8Array(len);
  let x = (seed * 2654435761) >>> 0;
  for (let i = 0; i < len; i++) {
    x = (x * 1103515245 + 12345) >>> 0;
    b[i] = x >>> 24;
  }
  return b;
}

export async function readAll(readable) {
  const parts = [];
  let n = 0;
  for await (const c of readable) {
    const b = typeof c === "string" ? new TextEncoder().encode(c) : c;
    parts.push(b);
    n += b.byteLength;
  }
  const out = new Uint8Array(n);
  let o = 0;
  for (const p of parts) {
    out.set(p, o);
    o += p.byteLength;
  }
  return out;
}

/** Writes `data` in `chunk`-byte writes, then closes (FIN) unless `close` is false. */
export async function writeAll(writable, data, { chunk = 65536, close = true } = {}) {
  const w = writable.getWriter();
  for (let o = 0; o < data.byteLength; o += chunk) await w.write(data.subarray(o, o + chunk));
  if (close) await w.close();
  else w.releaseLock();
}

/** Resolves after `ms` (for "nothing happens meanwhile" checks only, never to synchronise). */
export const delay = (ms) => new Promise((r) => setTimeout(r, ms));

/** Polls `cond` every 5 ms until it holds; fails after `ms`. */
export async function until(cond, ms = 5000, what = "condition") {
  const end = Date.now() + ms;
  while (!(await cond())) {
    if (Date.now() > end) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await delay(5);
  }
}

// Raw frames, for peers that misbehave on purpose.
export function frame(type, flags, id, value, payload = new Uint8Array(0)) {
  const b = new Uint8Array(12 + payload.byteLength);
  const dv = new DataView(b.buffer);
  dv.setUint8(0, 1);
  dv.setUint8(1, type);
  dv.setUint16(2, flags);
  dv.setUint32(4, id);
  dv.setUint32(8, value);
  b.set(payload, 12);
  return b;
}

export function parseFrame(data) {
  const b = new Uint8Array(data);
  const dv = new DataView(b.buffer, b.byteOffset, b.byteLength);
  return { type: b[1], flags: dv.getUint16(2), id: dv.getUint32(4), value: dv.getUint32(8), payload: b.subarray(12) };
}
