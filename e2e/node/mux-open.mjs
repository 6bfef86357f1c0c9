// Opens wsmux streams through a gateway's /mux with wsgate-client (the
// TypeScript client in clients/ts, built to dist/), for the security tests.
//
//   node mux-open.mjs URL [--token TOKEN] [--timeout SECONDS] TARGET...
//
// Connects (the token goes as the subprotocol entry
// `wsgate.bearer.<base64url(token)>`), then opens the targets one after the
// other, each kept open: an opened stream is sent `ping TARGET` and must
// echo it. Prints one JSON line: {ok, protocol, streams: [{target, opened,
// echoed, status, statusName, reason, error}]}; ok is false when the session
// itself failed (then `error` says why).
import WebSocket from 'ws';
import { MuxSession, OpenRefusedError } from '../../clients/ts/dist/index.js';

const args = process.argv.slice(2);
const url = args.shift();
let token;
let timeout = 20;
const targets = [];
for (let i = 0; i < args.length; i++) {
  if (args[i] === '--token') token = args[++i];
  else if (args[i] === '--timeout') timeout = Number(args[++i]);
  else targets.push(args[i]);
}

const hardStop = setTimeout(() => {
  console.log(JSON.stringify({ ok: false, error: `hard timeout after ${timeout}s` }));
  process.exit(1);
}, timeout * 1000);

async function readAtLeast(reader, n) {
  let got = Buffer.alloc(0);
  while (got.length < n) {
    const { value, done } = await reader.read();
    if (done) break;
    got = Buffer.concat([got, Buffer.from(value)]);
  }
  return got.toString('utf8');
}

const out = { ok: false, protocol: null, streams: [] };
let session;
try {
  session = await MuxSession.connect(url, { token, WebSocket });
  await session.ready;
  out.protocol = session.socket.protocol;
  const open = [];
  for (const target of targets) {
    const r = { target, opened: false, echoed: null, status: null, statusName: null, reason: null, error: null };
    try {
      const s = await session.open(target);
      r.opened = true;
      open.push(s);
      const w = s.writable.getWriter();
      const msg = `ping ${target}`;
      await w.write(new TextEncoder().encode(msg));
      w.releaseLock();
      const reader = s.readable.getReader();
      r.echoed = await readAtLeast(reader, msg.length);
      reader.releaseLock();
    } catch (e) {
      if (e instanceof OpenRefusedError) {
        r.status = e.status;
        r.statusName = e.statusName;
        r.reason = e.reason;
      } else {
        r.error = String(e && e.message || e);
      }
    }
    out.streams.push(r);
  }
  out.ok = true;
  for (const s of open) await s.writable.abort(0).catch(() => {});
} catch (e) {
  out.error = String(e && e.stack || e);
} finally {
  if (session) session.close?.();
}
clearTimeout(hardStop);
console.log(JSON.stringify(out));
process.exit(0);
