// Per-round spread of a bench.mjs --json file: each contender's range, and
// in how many rounds the mux was ahead of libp2p-yamux (same round, so
// under the same load).
//   node spread.mjs runs/FILE.json
import { readFileSync } from "node:fs";

const r = JSON.parse(readFileSync(process.argv[2]));
const mux = "wsmux (wsgate-client)";
const yam = "libp2p-yamux over 1 WebSocket";
const plain = "N WebSockets (ws)";
const range = (xs) => `${Math.min(...xs).toFixed(0)}–${Math.max(...xs).toFixed(0)}`;
console.log("| cell | wsmux range | N WebSockets range | yamux range | rounds with wsmux ahead of yamux |");
console.log("|---|---|---|---|---|");
for (const n of [1, 10, 100]) {
  const [a, p, b] = [mux, plain, yam].map((k) => r.results[k][`bulk${n}`].map((x) => x.mbps));
  console.log(`| bulk, ${n} (MB/s) | ${range(a)} | ${range(p)} | ${range(b)} | ${a.filter((v, i) => v > b[i]).length} of ${a.length} |`);
}
for (const n of [1, 10, 100]) {
  for (const q of ["p50", "p99"]) {
    const [a, p, b] = [mux, plain, yam].map((k) => r.results[k][`lat${n}`].map((x) => x[q]));
    console.log(`| round trip ${q}, ${n} (µs) | ${range(a)} | ${range(p)} | ${range(b)} | ${a.filter((v, i) => v < b[i]).length} of ${a.length} |`);
  }
}
