// wsgate-client's mux against N plain WebSockets and libp2p-yamux over one
// WebSocket, in Node, against an echo/sink server in a second process
// (server.mjs). One run measures, for 1, 10 and 100 streams:
//
//   bulk     each of N streams uploads TOTAL/N bytes in 64 KiB writes, then
//            half-closes; the server counts and answers one byte; MB/s of
//            TOTAL over the time until every answer is in.
//   latency  N concurrent streams each do sequential 64 B request/echo
//            round trips (after a warm-up); p50 and p99 over all of them.
//
// CPU: the CPU time of both processes (client and server, user + system)
// over each run, per MB and per round trip: a cost the other processes on
// a shared machine hardly change, unlike the wall-clock figures.
//
// Rounds: every cell runs once per round, the contenders taking turns in a
// rotating order; the table gives the median over rounds (for latency, the
// median of each round's p50 and of each round's p99).
//
//   node bench.mjs [--rounds 5] [--total-mb 64] [--quick] [--json FILE]
//                  [--cells bulk100,lat100]   only these cells (more rounds of one cell)

import { spawn } from "node:child_process";
import { once } from "node:events";
import os from "node:os";
import { readFileSync, writeFileSync } from "node:fs";
import { CONTENDERS } from "./contenders.mjs";

const args = process.argv.slice(2);
const opt = (name, def) => {
  const i = args.indexOf(name);
  return i >= 0 ? args[i + 1] : def;
};
const quick = args.includes("--quick");
const ROUNDS = Number(opt("--rounds", quick ? 1 : 5));
const TOTAL = Number(opt("--total-mb", quick ? 16 : 64)) * 1024 * 1024;
const COUNTS = [1, 10, 100];
const CHUNK = 65536;
const RTT_OPS = quick ? 2000 : 10000; // round trips per run, spread over the streams
const WARMUP = 20; // per stream
const CELLS = opt("--cells", undefined)?.split(",");
const wanted = (cell) => !CELLS || CELLS.includes(cell);

const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
};
const pct = (sorted, p) => sorted[Math.min(sorted.length - 1, Math.floor(p * sorted.length))];

const cpuNow = () => {
  const u = process.cpuUsage();
  return u.user + u.system;
};
/** Runs `f`; returns its result and the CPU time (µs) both processes spent meanwhile. */
async function withCpu(url, f) {
  const http = url.replace(/^ws/, "http") + "/cpu";
  const s0 = Number(await (await fetch(http)).text());
  const c0 = cpuNow();
  const result = await f();
  const c1 = cpuNow();
  const s1 = Number(await (await fetch(http)).text());
  return { result, cpu: c1 - c0 + (s1 - s0) };
}

async function bulk(c, url, n) {
  const conn = await c.connect(url, n);
  const per = Math.floor(TOTAL / n);
  const chunk = new Uint8Array(CHUNK).fill(0x61);
  const t0 = performance.now();
  const { cpu } = await withCpu(url, () => Promise.all(
    conn.streams.map(async (s) => {
      await s.write(Uint8Array.of(0x53)); // 'S': sink
      for (let sent = 0; sent < per; sent += CHUNK) {
        await s.write(sent + CHUNK <= per ? chunk : chunk.subarray(0, per - sent));
      }
      await s.end();
      const ack = await s.next();
      if (!ack || ack[0] !== 0x6b) throw new Error(`${c.name}: no answer from the sink`);
    }),
  ));
  const dt = performance.now() - t0;
  conn.close();
  const mb = (per * n) / 1e6;
  return { mbps: mb / (dt / 1000), cpuPerMb: cpu / mb };
}

async function latency(c, url, n) {
  const conn = await c.connect(url, n);
  const per = Math.max(50, Math.ceil(RTT_OPS / n));
  const req = new Uint8Array(64).fill(0x62);
  const samples = [];
  const { cpu } = await withCpu(url, () => Promise.all(
    conn.streams.map(async (s, i) => {
      await s.write(Uint8Array.of(0x45)); // 'E': echo
      for (let k = 0; k < WARMUP + per; k++) {
        const t0 = performance.now();
        await s.write(req);
        let got = 0;
        while (got < 64) {
          const c2 = await s.next();
          if (!c2) throw new Error(`${c.name}: stream ended`);
          got += c2.byteLength;
        }
        if (k >= WARMUP) samples.push((performance.now() - t0) * 1000);
      }
      await s.end();
    }),
  ));
  conn.close();
  samples.sort((a, b) => a - b);
  return { p50: pct(samples, 0.5), p99: pct(samples, 0.99), cpuPerRt: cpu / ((WARMUP + per) * n) };
}

const server = spawn(process.execPath, [new URL("./server.mjs", import.meta.url).pathname], { stdio: ["ignore", "pipe", "inherit"] });
const [line] = await once(server.stdout, "data");
const url = /listening on (\S+)/.exec(String(line))[1];

const results = {}; // results[contender][cell] = [values per round]
const record = (c, cell, v) => ((results[c.name] ??= {})[cell] ??= []).push(v);
const started = new Date();
const load0 = os.loadavg();
try {
  // Round 0 warms up the JIT of both processes and is not recorded.
  for (let round = 0; round <= ROUNDS; round++) {
    const order = CONTENDERS.map((_, i) => CONTENDERS[(i + round) % CONTENDERS.length]);
    const keep = round === 0 ? () => {} : record;
    for (const n of COUNTS) {
      if (wanted(`bulk${n}`)) for (const c of order) keep(c, `bulk${n}`, await bulk(c, url, n));
      if (wanted(`lat${n}`)) for (const c of order) keep(c, `lat${n}`, await latency(c, url, n));
    }
    process.stderr.write(round === 0 ? "warm-up round done\n" : `round ${round}/${ROUNDS} done\n`);
  }
} finally {
  server.kill("SIGTERM");
}
const load1 = os.loadavg();

const cpus = os.cpus();
const version = (pkg) => {
  try {
    return JSON.parse(readFileSync(new URL(`./node_modules/${pkg}/package.json`, import.meta.url))).version;
  } catch {
    return "?";
  }
};
const head = [
  `Run ${started.toISOString()}, Node ${process.version}, ${cpus.length} × ${cpus[0]?.model ?? "?"}, ` +
    `load average ${load0[0].toFixed(1)} → ${load1[0].toFixed(1)}; ws ${version("ws")} (bufferutil ${version("bufferutil")}), ` +
    `@chainsafe/libp2p-yamux ${version("@chainsafe/libp2p-yamux")}; ${ROUNDS} rounds after a warm-up round, ` +
    `bulk ${TOTAL / 1048576} MiB per run, ${RTT_OPS} round trips per latency run. Medians over rounds.`,
  "",
];
const names = CONTENDERS.map((c) => c.name);
const rows = [`| workload | ${names.join(" | ")} |`, `|---|${names.map(() => "---").join("|")}|`];
const cell = (nm, key, f) => median(results[nm][key].map(f));
const has = (key) => wanted(key);
for (const n of COUNTS.filter((n) => has(`bulk${n}`))) {
  rows.push(`| bulk, ${n} stream${n > 1 ? "s" : ""} (MB/s) | ${names.map((nm) => cell(nm, `bulk${n}`, (x) => x.mbps).toFixed(0)).join(" | ")} |`);
}
for (const n of COUNTS.filter((n) => has(`lat${n}`))) {
  rows.push(
    `| 64 B round trip, ${n} stream${n > 1 ? "s" : ""}, p50 / p99 (µs) | ${names
      .map((nm) => {
        const r = results[nm][`lat${n}`];
        return `${median(r.map((x) => x.p50)).toFixed(0)} / ${median(r.map((x) => x.p99)).toFixed(0)}`;
      })
      .join(" | ")} |`,
  );
}
// CPU cost: both processes' CPU time over the work done. The load of other
// processes stretches wall-clock figures but hardly moves these.
for (const n of COUNTS.filter((n) => has(`bulk${n}`))) {
  rows.push(`| CPU per MB, bulk, ${n} stream${n > 1 ? "s" : ""} (µs) | ${names.map((nm) => cell(nm, `bulk${n}`, (x) => x.cpuPerMb).toFixed(0)).join(" | ")} |`);
}
for (const n of COUNTS.filter((n) => has(`lat${n}`))) {
  rows.push(`| CPU per round trip, ${n} stream${n > 1 ? "s" : ""} (µs) | ${names.map((nm) => cell(nm, `lat${n}`, (x) => x.cpuPerRt).toFixed(1)).join(" | ")} |`);
}
console.log([...head, ...rows].join("\n"));
const jsonOut = opt("--json", undefined);
if (jsonOut) writeFileSync(jsonOut, JSON.stringify({ started, node: process.version, cpus: cpus.length, load0, load1, ROUNDS, TOTAL, RTT_OPS, results }, null, 1));
process.exit(0);
