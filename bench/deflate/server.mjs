// The Node contender of benchmark (b): a `ws` 8.x echo server with
// permessage-deflate, settings as wsgate's defaults (level 6, memLevel 8,
// 15-bit windows, context takeover, messages under 64 B uncompressed).
// `ws` comes from e2e/node_modules (scripts/install-test-deps.sh).
// Prints `listening on ws://127.0.0.1:PORT` once bound.
import { createRequire } from 'node:module';

const require = createRequire(new URL('../../e2e/package.json', import.meta.url));
const { WebSocketServer } = require('ws');

const wss = new WebSocketServer({
  host: '127.0.0.1',
  port: 0,
  perMessageDeflate: {
    threshold: 64,
    zlibDeflateOptions: { level: 6, memLevel: 8 },
  },
  maxPayload: 16 << 20,
});
wss.on('connection', (ws) => {
  ws.on('message', (data, isBinary) => ws.send(data, { binary: isBinary }));
});
wss.on('listening', () => console.log(`listening on ws://127.0.0.1:${wss.address().port}`));
