// Interop check driven by crates/wsmux/tests/js_interop.rs (not a
// `node --test` file): the package's mux, from dist/, against the Rust
// reference implementation over a real loopback WebSocket.
//
//   node [--experimental-websocket] test/interop-rust.mjs ws://127.0.0.1:PORT/
//
// The Rust side echoes every stream this side opens (then FIN), and opens
// streams itself: each carries a pattern + FIN, which this side echoes
// back (then FIN) for the Rust side to check. One stream this side opens
// is reset with code 7 after its first bytes; the Rust side reports the
// code it saw. Prints "interop: ok" and exits 0 when everything matched.

import { MuxSession, StreamResetError } from "../dist/index.js";

const [url, rustStreams = "3"] = process.argv.slice(2);

function pattern(seed, len) {
  const b = new Uint8Array(len);
  let x = (seed * 2654435761) >>> 0;
  for (let i = 0; i < len; i++) {
    x = (x * 1103515245 + 12345) >>> 0;
    b[i] = x >>> 24;
  }
  return b;
}

async function readAll(readable) {
  const parts = [];
  let n = 0;
  for await (const c of readable) {
    parts.push(c);
    n += c.byteLength;
  }
  const out = new Uint8Array(n);
  let o = 0;
  for (const p of parts) {
    out.set(p, o);
    o += p.byteLength;
  }
  return out;
}

function equal(a, b) {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

const session = await MuxSession.connect(url, { keepalive: { interval: 1000, timeout: 5000 } });

async function echoOne(i) {
  const s = session.openRaw();
  if (s.id % 2 !== 1) throw new Error(`client stream id ${s.id} is not odd`);
  // More than the 256 KiB initial window: WINDOW_UPDATEs both ways.
  const data = pattern(i + 1, 200_000 + i * 77_777);
  const reading = readAll(s.readable);
  const w = s.writable.getWriter();
  for (let off = 0; off < data.length; off += 50_000) await w.write(data.subarray(off, off + 50_000));
  await w.close(); // FIN; the echo still arrives
  const back = await reading;
  if (!equal(back, data)) throw new Error(`stream ${s.id}: echo mismatch (${back.length} vs ${data.length})`);
  await s.closed;
}

async function resetOne() {
  const s = session.openRaw();
  const w = s.writable.getWriter();
  await w.write(new TextEncoder().encode("about to reset"));
  // The echo of the first bytes proves the Rust side has the stream.
  const r = s.readable.getReader();
  let got = 0;
  while (got < 14) got += (await r.read()).value.byteLength;
  await w.abort({ code: 7 });
  try {
    await s.closed;
    throw new Error("closed cleanly after abort");
  } catch (e) {
    if (!(e instanceof StreamResetError) || e.code !== 7 || e.remote) throw new Error(`after abort: ${e}`);
  }
}

async function acceptOne() {
  const s = await session.accept();
  if (s.id % 2 !== 0) throw new Error(`server stream id ${s.id} is not even`);
  const got = await readAll(s.readable);
  const w = s.writable.getWriter();
  await w.write(got);
  await w.close();
  await s.closed;
  return got.length;
}

const timer = setTimeout(() => {
  console.error("interop: timeout");
  process.exit(3);
}, 30_000);
try {
  const accepted = Promise.all(Array.from({ length: Number(rustStreams) }, acceptOne));
  await Promise.all([accepted, resetOne(), ...[0, 1, 2, 3, 4].map(echoOne)]);
  console.log(`interop: accepted ${(await accepted).join(",")} bytes`);
  session.close(); // GOAWAY, then the close handshake, after everything sent so far
  await session.closed;
  clearTimeout(timer);
  console.log("interop: ok");
  process.exit(0);
} catch (e) {
  console.error("interop: FAILED:", e);
  process.exit(1);
}
