// Scripted Node `ws` 8.x client driven by the pytest suite.
//
//   node ws-client.mjs URL MODE [options]
//
// Prints progress events as JSON lines and, last, one JSON result line
// {"ok": true|false, ...}. Exit status 0 when ok, 1 otherwise. Every mode is
// bounded by --timeout seconds (default 60).
//
// Modes:
//   echo       --sizes a,b,c [--text] [--datagram] [--sequential]
//              send payloads of the given sizes (random bytes; printable
//              ASCII with --text), read the echo back and compare. Stream
//              peers may re-chunk: the concatenation is compared. With
//              --datagram every message must come back as one message, in
//              order. --sequential waits for each echo before sending on.
//              --check-types: every message must come back with the type it
//              was sent with (text/binary).
//              Then closes with 1000 and reports the close code seen.
//   send-close --bytes N [--chunk M]
//              send N random bytes as binary messages of at most M bytes,
//              then close(1000) at once; report sha256 and the close answer.
//   recv-all   read every message until the close; report bytes, sha256,
//              message count and close code.
//   hold       open, print {"event":"open"}, wait for the server's close and
//              report its code.
//   handshake  only try to connect; report the HTTP status of a refusal
//              (unexpected-response) or the negotiated protocol.
//   send-expect-close --bytes N [--invalid-text]
//              send one binary message of N bytes (or, with --invalid-text, a
//              text frame whose payload is not UTF-8) and report the close
//              code the server answers with.
// Options: --protocol NAME (repeatable), --timeout SECONDS,
//          --ws-version 8|13 (Sec-WebSocket-Version sent)
import WebSocket from 'ws';
import { createHash, randomBytes } from 'node:crypto';

const [url, mode, ...rest] = process.argv.slice(2);
const opt = { protocols: [], timeout: 60, sizes: [], text: false, checkTypes: false, datagram: false, sequential: false, bytes: 0, chunk: 1 << 20 };
for (let i = 0; i < rest.length; i++) {
  const a = rest[i];
  switch (a) {
    case '--protocol': opt.protocols.push(rest[++i]); break;
    case '--timeout': opt.timeout = Number(rest[++i]); break;
    case '--sizes': opt.sizes = rest[++i].split(',').filter((s) => s !== '').map(Number); break;
    case '--text': opt.text = true; break;
    case '--datagram': opt.datagram = true; break;
    case '--check-types': opt.checkTypes = true; break;
    case '--sequential': opt.sequential = true; break;
    case '--bytes': opt.bytes = Number(rest[++i]); break;
    case '--chunk': opt.chunk = Number(rest[++i]); break;
    case '--invalid-text': opt.invalidText = true; break;
    case '--ws-version': opt.wsVersion = Number(rest[++i]); break;
    default: finish({ ok: false, error: `unknown argument ${a}` });
  }
}

let finished = false;
function finish(result) {
  if (finished) return;
  finished = true;
  process.stdout.write(JSON.stringify(result) + '\n', () => process.exit(result.ok ? 0 : 1));
}
function event(obj) {
  process.stdout.write(JSON.stringify(obj) + '\n');
}
const timer = setTimeout(() => finish({ ok: false, error: `timeout after ${opt.timeout}s`, mode, progress }), opt.timeout * 1000);
timer.unref();
const progress = {};

function payload(n) {
  if (!opt.text) return randomBytes(n);
  const b = randomBytes(n);
  for (let i = 0; i < n; i++) b[i] = 0x20 + (b[i] % 95);
  return b;
}
const sha = (buf) => createHash('sha256').update(buf).digest('hex');
const toBuf = (data) => (Buffer.isBuffer(data) ? data : Array.isArray(data) ? Buffer.concat(data) : Buffer.from(data));

const ws = new WebSocket(url, opt.protocols, {
  perMessageDeflate: false,
  maxPayload: 256 * 1024 * 1024,
  ...(opt.wsVersion ? { protocolVersion: opt.wsVersion } : {}),
});
ws.on('error', (err) => {
  progress.error = String(err && err.message);
  if (mode === 'handshake' || !progress.opened) finish({ ok: false, error: String(err && err.message), mode, progress });
});
ws.on('unexpected-response', (req, res) => {
  let body = '';
  res.setEncoding('utf8');
  res.on('data', (c) => { body += c; });
  const report = () => finish({ ok: mode === 'handshake', refused: true, status: res.statusCode, headers: res.headers, body });
  res.on('end', report);
  res.on('error', report);
  res.on('close', report);
});

ws.on('open', () => {
  progress.opened = true;
  progress.protocol = ws.protocol;
  if (mode === 'handshake') {
    ws.close(1000);
    return finish({ ok: true, refused: false, protocol: ws.protocol });
  }
  if (mode === 'echo') return runEcho();
  if (mode === 'send-close') return runSendClose();
  if (mode === 'recv-all') return runRecvAll();
  if (mode === 'hold') return runHold();
  if (mode === 'send-expect-close') return runSendExpectClose();
  finish({ ok: false, error: `unknown mode ${mode}` });
});

function onClose(cb) {
  ws.on('close', (code, reason) => cb(code, reason.toString()));
}

function runEcho() {
  const sent = opt.sizes.map(payload);
  const expectedTotal = sent.reduce((a, b) => a + b.length, 0);
  const received = [];
  let receivedBytes = 0;
  let typesOk = true;
  let next = 0;
  let closing = false;
  const sendNext = () => {
    if (next < sent.length) ws.send(sent[next++], { binary: !opt.text });
  };
  const done = () => {
    if (opt.datagram) return received.length >= sent.length;
    return receivedBytes >= expectedTotal;
  };
  const check = () => {
    if (opt.datagram) {
      if (received.length !== sent.length) return `expected ${sent.length} messages, got ${received.length}`;
      for (let i = 0; i < sent.length; i++) {
        if (!sent[i].equals(received[i])) return `message ${i} differs (sent ${sent[i].length} B, got ${received[i].length} B)`;
      }
      return null;
    }
    const all = Buffer.concat(received);
    if (all.length !== expectedTotal) return `expected ${expectedTotal} bytes, got ${all.length}`;
    if (!all.equals(Buffer.concat(sent))) return 'echoed bytes differ from the bytes sent';
    return null;
  };
  ws.on('message', (data, isBinary) => {
    const buf = toBuf(data);
    received.push(buf);
    receivedBytes += buf.length;
    progress.messages = received.length;
    progress.bytes = receivedBytes;
    if (opt.checkTypes && isBinary === opt.text) typesOk = false;
    if (opt.sequential && !done()) sendNext();
    if (done() && !closing) {
      closing = true;
      ws.close(1000);
    }
  });
  onClose((code, reason) => {
    const err = done() ? check() : `connection closed (${code} ${reason}) after ${receivedBytes}/${expectedTotal} bytes, ${received.length}/${sent.length} messages`;
    finish({
      ok: err === null && code === 1000 && typesOk,
      error: err || (typesOk ? (code === 1000 ? undefined : `close code ${code}`) : 'message type changed'),
      closeCode: code, reason, messages: received.length, bytes: receivedBytes,
    });
  });
  if (expectedTotal === 0 && !opt.datagram) {
    for (const p of sent) ws.send(p, { binary: !opt.text });
    closing = true;
    ws.close(1000);
    return;
  }
  if (opt.sequential) sendNext();
  else while (next < sent.length) sendNext();
}

function runSendClose() {
  const hash = createHash('sha256');
  let left = opt.bytes;
  let messages = 0;
  while (left > 0) {
    const n = Math.min(left, opt.chunk);
    const p = randomBytes(n);
    hash.update(p);
    ws.send(p, { binary: true });
    left -= n;
    messages++;
  }
  const digest = hash.digest('hex');
  ws.close(1000);
  onClose((code, reason) => finish({ ok: true, sha256: digest, bytes: opt.bytes, messages, closeCode: code, reason }));
}

function runRecvAll() {
  const hash = createHash('sha256');
  let bytes = 0;
  let messages = 0;
  ws.on('message', (data) => {
    const buf = toBuf(data);
    hash.update(buf);
    bytes += buf.length;
    messages++;
  });
  onClose((code, reason) => finish({ ok: true, sha256: hash.digest('hex'), bytes, messages, closeCode: code, reason }));
}

function runHold() {
  event({ event: 'open', protocol: ws.protocol });
  onClose((code, reason) => finish({ ok: true, closeCode: code, reason }));
}

function runSendExpectClose() {
  // ws does not validate outgoing text: a Buffer sent with binary:false goes
  // out as a text frame with exactly these bytes.
  if (opt.invalidText) ws.send(Buffer.from([0x68, 0x69, 0xc3, 0x28, 0xff]), { binary: false });
  else ws.send(randomBytes(opt.bytes), { binary: true });
  onClose((code, reason) => finish({ ok: true, closeCode: code, reason }));
}
