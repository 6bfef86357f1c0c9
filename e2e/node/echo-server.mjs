// Reference WebSocket echo server (Node `ws` 8.x) used to validate the e2e
// harness itself (Autobahn fuzzingclient, client helpers, browser plumbing).
//
//   node echo-server.mjs [--host 127.0.0.1] [--port 0] [--protocol NAME]... [--corrupt] [--deflate]
//
// Prints exactly `listening on ws://HOST:PORT` once bound (same contract as
// `wsgate serve`), echoes every message with its type (text stays text), and
// exits on SIGTERM/SIGINT after closing clients with 1001.
import { WebSocketServer } from 'ws';

const args = process.argv.slice(2);
let host = '127.0.0.1';
let port = 0;
const protocols = [];
let corrupt = false;
let deflate = false;
for (let i = 0; i < args.length; i++) {
  const a = args[i];
  if (a === '--host') host = args[++i];
  else if (a === '--port') port = Number(args[++i]);
  else if (a === '--protocol') protocols.push(args[++i]);
  // Deliberately broken echo (appends a byte), to prove the harness notices.
  else if (a === '--corrupt') corrupt = true;
  // Offer permessage-deflate (Autobahn 12.*/13.* through a proxy).
  else if (a === '--deflate') deflate = true;
  else {
    console.error(`unknown argument ${a}`);
    process.exit(2);
  }
}

const wss = new WebSocketServer({
  host,
  port,
  maxPayload: 64 * 1024 * 1024,
  // Autobahn case 9.* sends messages with very many fragments: no limit.
  maxFragments: 0,
  perMessageDeflate: deflate ? { threshold: 0 } : false,
  handleProtocols: protocols.length
    ? (offered) => {
        for (const p of offered) if (protocols.includes(p)) return p;
        return false;
      }
    : undefined,
});

wss.on('connection', (ws) => {
  ws.on('message', (data, isBinary) => {
    ws.send(corrupt ? Buffer.concat([data, Buffer.from('!')]) : data, { binary: isBinary });
  });
  ws.on('error', () => {});
});

wss.on('listening', () => {
  const addr = wss.address();
  process.stdout.write(`listening on ws://${addr.address}:${addr.port}\n`);
});

function shutdown() {
  for (const c of wss.clients) c.close(1001, 'going away');
  wss.close(() => process.exit(0));
  setTimeout(() => process.exit(0), 2000).unref();
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);
