// Per-round spread of bench.mjs --json files: each contender's range, and
// in how many rounds the mux was ahead of libp2p-yamux (same round, so
// under the same load). Several files are pooled (their rounds joined),
// and the medians over the pooled rounds printed first, as bench.mjs does.
// Runs with the "wsmux baseline" contender (WSMUX_BASELINE, baseline.sh)
// get one more table: per-round ratios of the two builds against yamux
// and against each other.
//   node spread.mjs runs/FILE.json [runs/FILE2.json ...]
import { readFileSync } from "node:fs";

const files = process.argv.slice(2);
if (!files.length) {
  console.error("usage: node spread.mjs runs/FILE.json [more files, pooled]");
  process.exit(2);
}
const runs = files.map((f) => JSON.parse(readFileSync(f)));
const mux = "wsmux (wsgate-client)";
const yam = "libp2p-yamux over 1 WebSocket";
const plain = "N WebSockets (ws)";
const base = "wsmux baseline";
const withBase = runs.every((r) => r.results[base]);
const names = withBase ? [mux, plain, yam, base] : [mux, plain, yam];
const COUNTS = [1, 10, 100];
/** results[contender][cell]: the rounds of every file, in order. */
const results = {};
for (const r of runs) {
  for (const k of names) {
    for (const [cell, xs] of Object.entries(r.results[k])) ((results[k] ??= {})[cell] ??= []).push(...xs);
  }
}
const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
};
const range = (xs) => `${Math.min(...xs).toFixed(0)}–${Math.max(...xs).toFixed(0)}`;
const rounds = Object.values(results[mux])[0].length;
const has = (cell) => results[mux][cell] !== undefined;
const loads = runs.map((r) => `${r.load0[0].toFixed(1)} → ${r.load1[0].toFixed(1)}`).join(", ");
console.log(`${files.length} run(s), ${rounds} rounds pooled; load average ${loads}. Medians over the rounds:\n`);
console.log(`| workload | ${names.join(" | ")} |`);
console.log(`|---|${names.map(() => "---").join("|")}|`);
const s = (n) => (n > 1 ? "s" : "");
for (const n of COUNTS.filter((n) => has(`bulk${n}`))) {
  console.log(`| bulk, ${n} stream${s(n)} (MB/s) | ${names.map((k) => median(results[k][`bulk${n}`].map((x) => x.mbps)).toFixed(0)).join(" | ")} |`);
}
for (const n of COUNTS.filter((n) => has(`lat${n}`))) {
  const cell = (k) => `${median(results[k][`lat${n}`].map((x) => x.p50)).toFixed(0)} / ${median(results[k][`lat${n}`].map((x) => x.p99)).toFixed(0)}`;
  console.log(`| 64 B round trip, ${n} stream${s(n)}, p50 / p99 (µs) | ${names.map(cell).join(" | ")} |`);
}
for (const n of COUNTS.filter((n) => has(`bulk${n}`))) {
  console.log(`| CPU per MB, bulk, ${n} stream${s(n)} (µs) | ${names.map((k) => median(results[k][`bulk${n}`].map((x) => x.cpuPerMb)).toFixed(0)).join(" | ")} |`);
}
for (const n of COUNTS.filter((n) => has(`lat${n}`))) {
  console.log(`| CPU per round trip, ${n} stream${s(n)} (µs) | ${names.map((k) => median(results[k][`lat${n}`].map((x) => x.cpuPerRt)).toFixed(1)).join(" | ")} |`);
}

console.log("\n| cell | wsmux range | N WebSockets range | yamux range | rounds with wsmux ahead of yamux |");
console.log("|---|---|---|---|---|");
for (const n of COUNTS.filter((n) => has(`bulk${n}`))) {
  const [a, p, b] = names.map((k) => results[k][`bulk${n}`].map((x) => x.mbps));
  console.log(`| bulk, ${n} (MB/s) | ${range(a)} | ${range(p)} | ${range(b)} | ${a.filter((v, i) => v > b[i]).length} of ${a.length} |`);
}
for (const n of COUNTS.filter((n) => has(`lat${n}`))) {
  for (const q of ["p50", "p99"]) {
    const [a, p, b] = names.map((k) => results[k][`lat${n}`].map((x) => x[q]));
    console.log(`| round trip ${q}, ${n} (µs) | ${range(a)} | ${range(p)} | ${range(b)} | ${a.filter((v, i) => v < b[i]).length} of ${a.length} |`);
  }
}

if (withBase) {
  // Per round, so under the same load: throughput and CPU of each build
  // against yamux's and against each other (median of the rounds' ratios).
  const ratio = (a, b, cell, f) => {
    const x = results[a][cell];
    const y = results[b][cell];
    return median(x.map((v, i) => f(v) / f(y[i]))).toFixed(2);
  };
  const won = (a, b, cell, f, lower) => {
    const x = results[a][cell];
    const y = results[b][cell];
    return `${x.filter((v, i) => (lower ? f(v) < f(y[i]) : f(v) > f(y[i]))).length}/${x.length}`;
  };
  console.log("\nPer-round ratios (median), and rounds won: this build (wsmux), the baseline, yamux.\n");
  console.log("| cell | wsmux / yamux | baseline / yamux | wsmux / baseline |");
  console.log("|---|---|---|---|");
  const row = (label, cell, f, lower) =>
    console.log(
      `| ${label} | ${ratio(mux, yam, cell, f)} (${won(mux, yam, cell, f, lower)}) | ${ratio(base, yam, cell, f)} (${won(base, yam, cell, f, lower)}) | ${ratio(mux, base, cell, f)} (${won(mux, base, cell, f, lower)}) |`,
    );
  for (const n of COUNTS.filter((n) => has(`bulk${n}`))) {
    row(`bulk, ${n}: MB/s`, `bulk${n}`, (x) => x.mbps, false);
    row(`bulk, ${n}: CPU per MB`, `bulk${n}`, (x) => x.cpuPerMb, true);
  }
  for (const n of COUNTS.filter((n) => has(`lat${n}`))) {
    row(`round trip, ${n}: p50`, `lat${n}`, (x) => x.p50, true);
    row(`round trip, ${n}: CPU`, `lat${n}`, (x) => x.cpuPerRt, true);
  }
}
