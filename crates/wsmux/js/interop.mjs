// Interop check driven by crates/wsmux/tests/js_interop.rs:
//   node [--experimental-websocket] interop.mjs ws://127.0.0.1:PORT/
// The Rust side echoes every stream the client opens (then FIN) and opens
// one stream itself carrying "hello from rust" + FIN, expecting it echoed.
// Exit code 0 when everything matched.

import { Session } from "./wsmux.mjs";

const url = process.argv[2];
const ws = new WebSocket(url, "wsmux.v1");
const session = new Session(ws, { client: true });

function pattern(seed, len) {
  const b = new Uint8Array(len);
  let x = seed * 2654435761 >>> 0;
  for (let i = 0; i < len; i++) { x = (x * 1103515245 + 12345) >>> 0; b[i] = x >>> 24; }
  return b;
}

async function readAll(s) {
  const parts = [];
  let n = 0;
  for (let c; (c = await s.read()) !== null; ) { parts.push(c); n += c.length; }
  const out = new Uint8Array(n);
  let o = 0;
  for (const p of parts) { out.set(p, o); o += p.length; }
  return out;
}

function equal(a, b) {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

async function echoOne(i) {
  const s = session.open();
  // More than the 256 KiB initial window: exercises WINDOW_UPDATE both ways.
  const data = pattern(i + 1, 200_000 + i * 77_777);
  const reading = readAll(s);
  for (let off = 0; off < data.length; off += 50_000) {
    await s.write(data.subarray(off, off + 50_000));
  }
  s.end();
  const back = await reading;
  if (!equal(back, data)) throw new Error(`stream ${s.id}: echo mismatch (${back.length} vs ${data.length})`);
  if (s.id % 2 !== 1) throw new Error(`client stream id ${s.id} is not odd`);
}

async function serverStream() {
  const s = await session.accept();
  if (s.id % 2 !== 0) throw new Error(`server stream id ${s.id} is not even`);
  const got = await readAll(s);
  const text = new TextDecoder().decode(got);
  if (text !== "hello from rust") throw new Error(`server stream said ${JSON.stringify(text)}`);
  await s.write(got);
  s.end();
}

const timer = setTimeout(() => { console.error("interop: timeout"); process.exit(3); }, 30_000);
try {
  await session.ready;
  await Promise.all([serverStream(), ...[0, 1, 2, 3, 4].map(echoOne)]);
  session.close(); // queued after everything sent so far
  clearTimeout(timer);
  console.log("interop: ok");
  process.exit(0);
} catch (e) {
  console.error("interop: FAILED:", e);
  process.exit(1);
}
