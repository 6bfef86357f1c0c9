// The benchmark's echo/sink server, one process for the three contenders:
// /mux (wsgate-client's mux, server side), /ws (one plain WebSocket per
// stream), /yamux (libp2p-yamux over the WebSocket), /mux-baseline (with
// WSMUX_BASELINE: the mux of an earlier build); GET /cpu gives its
// CPU time. Prints
// "listening on ws://HOST:PORT" when ready.
import { createServer } from "node:http";
import { WebSocketServer } from "ws";
import { wsmux, wsmuxBaseline, plain, libp2pYamux } from "./contenders.mjs";

const routes = { "/mux": wsmux, "/ws": plain, "/yamux": libp2pYamux };
if (wsmuxBaseline) routes[wsmuxBaseline.path] = wsmuxBaseline; // WSMUX_BASELINE, inherited from bench.mjs
// GET /cpu: this process's CPU time so far (µs), for the CPU cost figures.
const http = createServer((req, res) => {
  const u = process.cpuUsage();
  res.end(JSON.stringify(u.user + u.system));
});
http.listen(0, "127.0.0.1");
const wss = new WebSocketServer({ server: http, perMessageDeflate: false, maxPayload: 1 << 30 });
wss.on("connection", (ws, req) => {
  const c = routes[req.url];
  if (!c) return ws.close(4004, "unknown path");
  c.serve(ws);
});
http.on("listening", () => console.log(`listening on ws://127.0.0.1:${http.address().port}`));
process.on("SIGTERM", () => process.exit(0));
