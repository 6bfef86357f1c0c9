// A backend for reverse-proxy tests (issue 3): plain HTTP and WebSocket on one port.
//
//   node http-backend.mjs [--host 127.0.0.1] [--port 0] [--name NAME] [--bad-accept]
//                         [--tls-cert PEM --tls-key PEM]
//
// Prints `listening on ws://HOST:PORT` once bound (`wss://` with --tls-cert:
// HTTPS and WebSocket over TLS on the same port).
// HTTP:  every request is answered with JSON {name, method, url, httpVersion,
//        headers, body} (the body read in full, chunked or not);
//        /status/NNN answers with status NNN (same JSON body);
//        /ws-page.html is the browser test page (e2e/web/ws-page.html).
// WS:    echoes every message with its type (maxFragments 0, like the reference
//        echo server); on path /headers it first sends the handshake request as
//        a JSON text message {name, url, headers}. Offered subprotocols: the
//        first one is accepted. An upgrade on /status/NNN is refused with NNN.
//        With --bad-accept every upgrade is answered with a 101 whose
//        Sec-WebSocket-Accept is wrong.
import http from 'node:http';
import https from 'node:https';
import { readFileSync } from 'node:fs';
import { WebSocketServer } from 'ws';

const args = process.argv.slice(2);
let host = '127.0.0.1';
let port = 0;
let name = 'backend';
let badAccept = false;
let tlsCert = null;
let tlsKey = null;
for (let i = 0; i < args.length; i++) {
  if (args[i] === '--host') host = args[++i];
  else if (args[i] === '--port') port = Number(args[++i]);
  else if (args[i] === '--name') name = args[++i];
  else if (args[i] === '--bad-accept') badAccept = true;
  else if (args[i] === '--tls-cert') tlsCert = args[++i];
  else if (args[i] === '--tls-key') tlsKey = args[++i];
  else { console.error(`unknown argument ${args[i]}`); process.exit(2); }
}

const handler = (req, res) => {
  const chunks = [];
  req.on('data', (c) => chunks.push(c));
  req.on('end', () => {
    if (req.url.split('?')[0] === '/ws-page.html') {
      // The browser test page (e2e/web/ws-page.html).
      res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' });
      res.end(readFileSync(new URL('../web/ws-page.html', import.meta.url)));
      return;
    }
    const m = req.url.match(/^\/status\/(\d{3})/);
    const status = m ? Number(m[1]) : 200;
    const body = JSON.stringify({
      name, method: req.method, url: req.url, httpVersion: req.httpVersion,
      headers: req.headers, rawHeaders: req.rawHeaders, body: Buffer.concat(chunks).toString('utf8'),
    });
    res.writeHead(status, { 'content-type': 'application/json', 'x-backend': name });
    res.end(body);
  });
};
const server = tlsCert
  ? https.createServer({ cert: readFileSync(tlsCert), key: readFileSync(tlsKey) }, handler)
  : http.createServer(handler);

const wss = new WebSocketServer({
  noServer: true, maxPayload: 64 * 1024 * 1024, maxFragments: 0, perMessageDeflate: false,
  handleProtocols: (offered) => (offered.size ? [...offered][0] : false),
});
server.on('upgrade', (req, socket, head) => {
  if (badAccept) {
    socket.end('HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n' +
      'Sec-WebSocket-Accept: AAAAAAAAAAAAAAAAAAAAAAAAAAA=\r\n\r\n');
    return;
  }
  const st = req.url.match(/^\/status\/(\d{3})/);
  if (st) {
    const body = `refused by ${name}`;
    socket.end(`HTTP/1.1 ${st[1]} Refused\r\nContent-Type: text/plain\r\nX-Backend: ${name}\r\n` +
      `Content-Length: ${body.length}\r\nConnection: close\r\n\r\n${body}`);
    return;
  }
  wss.handleUpgrade(req, socket, head, (ws) => {
    if (req.url.startsWith('/headers')) ws.send(JSON.stringify({ name, url: req.url, headers: req.headers }));
    ws.on('message', (data, isBinary) => ws.send(data, { binary: isBinary }));
    ws.on('error', () => {});
  });
});

server.listen(port, host, () => {
  const a = server.address();
  process.stdout.write(`listening on ${tlsCert ? 'wss' : 'ws'}://${a.address}:${a.port}\n`);
});
const stop = () => { for (const c of wss.clients) c.close(1001); server.close(() => process.exit(0)); setTimeout(() => process.exit(0), 1000).unref(); };
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
