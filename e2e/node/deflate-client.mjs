// Node `ws` 8.x as a permessage-deflate peer of wsgate (tests/test_deflate.py).
//
//   node deflate-client.mjs URL [--offer JSON] [--sizes a,b,c] [--fragments N]
//                               [--newline] [--timeout SECONDS]
//
// Connects with `perMessageDeflate` set to --offer (ws's option names:
// serverNoContextTakeover, clientNoContextTakeover, serverMaxWindowBits,
// clientMaxWindowBits; threshold 0, so ws compresses every message), sends
// one JSON-like text message of each size (with --fragments N, each one in N
// fragments: ws compresses the fragments as one message with RSV1 on the
// first), waits for each echo and compares it, then closes with 1000.
// --newline ends each message with "\n" (a `lines` route through a TCP echo
// peer gives it back without). Prints one JSON result line:
// {"ok", "extensions" (the server's answer), "echoed", "close_code", "error"};
// exit 0 when ok.
import WebSocket from 'ws';

const [url, ...rest] = process.argv.slice(2);
const opt = { offer: {}, sizes: [16, 1000, 100000], fragments: 1, newline: false, timeout: 60 };
for (let i = 0; i < rest.length; i++) {
  const a = rest[i];
  if (a === '--offer') opt.offer = JSON.parse(rest[++i]);
  else if (a === '--sizes') opt.sizes = rest[++i].split(',').map(Number);
  else if (a === '--fragments') opt.fragments = Number(rest[++i]);
  else if (a === '--newline') opt.newline = true;
  else if (a === '--timeout') opt.timeout = Number(rest[++i]);
  else finish({ ok: false, error: `unknown argument ${a}` });
}

let done = false;
function finish(r) {
  if (done) return;
  done = true;
  console.log(JSON.stringify(r));
  process.exit(r.ok ? 0 : 1);
}
setTimeout(() => finish({ ok: false, error: 'timeout' }), opt.timeout * 1000).unref();

// A compressible JSON-ish text of exactly n bytes.
function message(n, seed) {
  let s = '';
  let i = 0;
  while (s.length < n) {
    s += JSON.stringify({ id: seed * 1000 + i, user: `user${(i * 7) % 13}`, ok: i % 3 === 0, v: (i * 31) % 997 }) + ',';
    i++;
  }
  return s.slice(0, n);
}

const ws = new WebSocket(url, { perMessageDeflate: { ...opt.offer, threshold: 0 } });
// The server's Sec-WebSocket-Extensions answer (ws.extensions has only the names).
let answered;
ws.on('upgrade', (res) => { answered = res.headers['sec-websocket-extensions']; });
const expected = [];
let echoed = 0;
ws.on('open', () => {
  opt.sizes.forEach((n, k) => {
    const m = message(n, k);
    expected.push(m);
    const wire = opt.newline ? m + '\n' : m;
    if (opt.fragments <= 1) {
      ws.send(wire, { binary: false, compress: true });
      return;
    }
    const step = Math.ceil(wire.length / opt.fragments) || 1;
    for (let at = 0; at < wire.length || at === 0; at += step) {
      const fin = at + step >= wire.length;
      ws.send(wire.slice(at, at + step), { binary: false, compress: true, fin });
      if (fin) break;
    }
  });
});
ws.on('message', (data, isBinary) => {
  const want = expected[echoed];
  const got = data.toString();
  if (isBinary || got !== want) {
    finish({ ok: false, error: `message ${echoed}: ${isBinary ? 'binary' : 'text'} of ${got.length} bytes, expected text of ${want?.length}`, extensions: answered ?? ws.extensions });
  }
  echoed++;
  if (echoed === opt.sizes.length) ws.close(1000);
});
ws.on('close', (code) => {
  finish({ ok: echoed === opt.sizes.length && code === 1000, extensions: answered ?? ws.extensions, echoed, close_code: code });
});
ws.on('error', (e) => finish({ ok: false, error: String(e), extensions: answered ?? ws.extensions, echoed }));
