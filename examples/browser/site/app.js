// The browser example's page: a Redis console over the gateway's /redis
// bridge route (RedisClient, one RESP reply per WebSocket message) and a
// wsmux demo (MuxSession: several streams over one WebSocket to /mux, to an
// echo peer and to a slow one).
//
// Everything the page shows is also kept in `window.example`, which the
// end-to-end test (e2e/tests/test_example_browser.py) waits on and reads.
import { MuxSession, RedisClient, RespError, RespVerbatim, RespPush, OpenRefusedError, StreamResetError, ResetCode } from "wsgate-client";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const wsUrl = (path) => new URL(path, location.href.replace(/^http/, "ws")).href;

const state = {
  ready: false,
  console: { entries: [], busy: false, protocol: 2 },
  mux: { phase: "idle", protocol: null, streams: [], error: null, echoDone: false, slowStalled: false },
};
window.example = state;

// ------------------------------------------------------------------ console

/** Splits a console line into commands (`;`) of arguments (quotes as in redis-cli). */
export function parseLine(line) {
  const commands = [];
  let args = [];
  let cur = null;
  let quote = null;
  const endArg = () => {
    if (cur !== null) args.push(cur);
    cur = null;
  };
  for (let i = 0; i < line.length; i++) {
    const ch = line[i];
    if (quote) {
      if (ch === quote) quote = null;
      else if (ch === "\\" && quote === '"' && i + 1 < line.length) {
        const n = line[++i];
        if (n === "x" && /^[0-9a-fA-F]{2}$/.test(line.slice(i + 1, i + 3))) {
          cur += String.fromCharCode(parseInt(line.slice(i + 1, i + 3), 16));
          i += 2;
        } else cur += { n: "\n", r: "\r", t: "\t", b: "\b", a: "\x07" }[n] ?? n;
      } else cur += ch;
    } else if (ch === '"' || ch === "'") {
      quote = ch;
      cur = cur ?? "";
    } else if (/\s/.test(ch)) endArg();
    else if (ch === ";") {
      endArg();
      if (args.length) commands.push(args);
      args = [];
    } else cur = (cur ?? "") + ch;
  }
  if (quote) throw new Error("unbalanced quotes");
  endArg();
  if (args.length) commands.push(args);
  return commands;
}

/** A reply as redis-cli prints it, one string per line. */
export function formatReply(v) {
  if (v instanceof RespError) return [`(error) ${v.message}`];
  if (v === null || v === undefined) return ["(nil)"];
  if (typeof v === "boolean") return [v ? "(true)" : "(false)"];
  if (typeof v === "number") return [Number.isInteger(v) ? `(integer) ${v}` : `(double) ${v}`];
  if (typeof v === "bigint") return [`(big number) ${v}`];
  if (typeof v === "string") return [JSON.stringify(v)];
  if (v instanceof Uint8Array) return [`(${v.byteLength} bytes)`];
  if (v instanceof RespVerbatim) return v.text.replace(/\r?\n$/, "").split(/\r?\n/);
  if (v instanceof RespPush) return nest([v.kind, ...v.data], (i) => `${i + 1}) `, ["(push)"]);
  if (Array.isArray(v)) return v.length ? nest(v, (i) => `${i + 1}) `) : ["(empty array)"];
  if (v instanceof Set) return v.size ? nest([...v], (i) => `${i + 1}~ `) : ["(empty set)"];
  if (v instanceof Map) {
    if (!v.size) return ["(empty hash)"];
    const items = [...v].map(([k, val]) => ({ key: formatReply(k).join(" "), val }));
    const lines = [];
    items.forEach(({ key, val }, i) => {
      const head = `${i + 1}# ${key} => `;
      formatReply(val).forEach((l, j) => lines.push((j === 0 ? head : " ".repeat(head.length)) + l));
    });
    return lines;
  }
  return [String(v)];
}

function nest(items, label, head = []) {
  const width = label(items.length - 1).length;
  const lines = [...head];
  items.forEach((item, i) => {
    const p = label(i).padStart(width);
    formatReply(item).forEach((l, j) => lines.push((j === 0 ? p : " ".repeat(width)) + l));
  });
  return lines;
}

let redis = null;
let redisConnecting = null;

async function redisClient() {
  if (redis) return redis;
  redisConnecting ??= RedisClient.connect(wsUrl("/redis")).then(
    (c) => {
      redis = c;
      redisConnecting = null;
      c.closed.then((err) => {
        if (redis === c) redis = null;
        note(`connection closed${err ? `: ${err.message}` : ""}; the next command reconnects`);
      });
      return c;
    },
    (e) => {
      redisConnecting = null;
      throw e;
    },
  );
  return redisConnecting;
}

const log = $("console-log");

function addLines(cls, lines) {
  const div = document.createElement("div");
  div.className = cls;
  div.textContent = lines.join("\n");
  log.append(div);
  log.scrollTop = log.scrollHeight;
}

function note(text) {
  addLines("note", [text]);
}

/** Runs one console line: a command, or a pipeline of several. */
async function runLine(input) {
  const entry = { input, commands: 0, replies: [], lines: [], error: null, done: false };
  state.console.entries.push(entry);
  addLines("cmd", [input]);
  try {
    const commands = parseLine(input);
    entry.commands = commands.length;
    if (!commands.length) return;
    const client = await redisClient();
    let replies;
    if (commands.length === 1) {
      replies = [await client.send(...commands[0]).catch((e) => (e instanceof RespError ? e : Promise.reject(e)))];
    } else {
      replies = await client.pipeline(commands);
    }
    for (const [i, r] of replies.entries()) {
      let lines = formatReply(r);
      if (commands.length > 1) {
        const tag = `[${i + 1}] `;
        lines = lines.map((l, j) => (j === 0 ? tag : " ".repeat(tag.length)) + l);
      }
      entry.replies.push(lines);
      entry.lines.push(...lines);
      addLines(r instanceof RespError ? "reply err" : "reply", lines);
      if (commands[i][0].toUpperCase() === "HELLO" && r instanceof Map) state.console.protocol = r.get("proto");
    }
  } catch (e) {
    entry.error = e.message;
    addLines("reply err", [`(client error) ${e.message}`]);
  } finally {
    entry.done = true;
  }
}

function setupConsole() {
  const input = $("console-input");
  const history = [];
  let at = 0;
  $("console-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const line = input.value.trim();
    if (!line || state.console.busy) return;
    history.push(line);
    at = history.length;
    input.value = "";
    state.console.busy = true;
    try {
      await runLine(line);
    } finally {
      state.console.busy = false;
    }
  });
  input.addEventListener("keydown", (ev) => {
    if (ev.key !== "ArrowUp" && ev.key !== "ArrowDown") return;
    ev.preventDefault();
    at = Math.max(0, Math.min(history.length, at + (ev.key === "ArrowUp" ? -1 : 1)));
    input.value = history[at] ?? "";
  });
  input.disabled = false;
  note(`ws ${wsUrl("/redis")}: commands go through the gateway to redis-server`);
}

// ---------------------------------------------------------------- mux demo

const CHUNK = 64 * 1024;
const MiB = 1024 * 1024;

/** The bytes every stream sends: byte k of a stream is k mod 251 (checked on the way back). */
const PATTERN = (() => {
  const b = new Uint8Array(CHUNK + 251);
  for (let i = 0; i < b.length; i++) b[i] = i % 251;
  return b;
})();

let session = null;
let slowStream = null;

function fmtBytes(n) {
  if (n >= MiB) return `${(n / MiB).toFixed(n >= 10 * MiB ? 1 : 2)} MiB`;
  if (n >= 1024) return `${(n / 1024).toFixed(0)} KiB`;
  return `${n} B`;
}

/** One stream of the demo: write `total` bytes, close (FIN), read the echo back and check it. */
async function runStream(row, s) {
  row.id = s.id;
  row.stream = s;
  row.state = "sending";
  const writer = s.writable.getWriter();
  const reader = s.readable.getReader();
  const reading = (async () => {
    let ok = true;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      for (let i = 0; i < value.byteLength; i++) {
        if (value[i] !== (row.received + i) % 251) {
          ok = false;
          break;
        }
      }
      row.received += value.byteLength;
    }
    row.verified = ok && row.received === row.total;
  })();
  reading.catch(() => {}); // a reset fails it; awaited below
  while (row.sent < row.total) {
    const n = Math.min(CHUNK, row.total - row.sent);
    const off = row.sent % 251;
    row.writing = true;
    await writer.write(PATTERN.subarray(off, off + n));
    row.writing = false;
    row.sent += n;
  }
  row.state = "half-closed";
  await writer.close(); // FIN: the echo still comes back
  await reading;
  await s.closed;
  row.state = row.verified ? "done" : "wrong bytes";
}

async function runMux() {
  const echoDest = $("echo-dest").value.trim();
  const slowDest = $("slow-dest").value.trim();
  const count = Number($("echo-count").value);
  const total = Number($("stream-mib").value) * MiB;
  const slowTotal = Number($("slow-mib").value) * MiB;
  const m = state.mux;
  m.phase = "connecting";
  m.error = null;
  m.echoDone = false;
  m.slowStalled = false;
  m.streams = [];
  if (session) session.close();
  for (let i = 0; i < count; i++) m.streams.push(newRow("echo", echoDest, total));
  m.streams.push(newRow("slow", slowDest, slowTotal));
  $("slow-reset").disabled = true;
  try {
    session = await MuxSession.connect(wsUrl("/mux"));
    m.protocol = session.socket.protocol;
    m.phase = "running";
    const runs = m.streams.map(async (row) => {
      try {
        const s = await session.open(row.dest);
        if (row.kind === "slow") {
          slowStream = s;
          $("slow-reset").disabled = false;
        }
        await runStream(row, s);
      } catch (e) {
        row.state = e instanceof StreamResetError ? `reset (code ${e.code}${e.remote ? ", by the peer" : ""})` : "failed";
        row.error = e instanceof OpenRefusedError ? `${e.statusName}: ${e.reason}` : e.message;
      }
    });
    await Promise.all(runs);
    m.phase = "finished";
  } catch (e) {
    m.phase = "failed";
    m.error = e.message;
  }
}

function newRow(kind, dest, total) {
  return { kind, dest, total, id: null, stream: null, sent: 0, received: 0, verified: false, writing: false, state: "opening", error: null };
}

/** Copies the streams' live figures into the state and the table, once a frame. */
function render() {
  const m = state.mux;
  const body = $("mux-table").tBodies[0];
  while (body.rows.length > m.streams.length) body.deleteRow(-1);
  while (body.rows.length < m.streams.length) {
    const tr = body.insertRow();
    tr.innerHTML = `<td class="num"></td><td class="peer"></td><td class="num"></td><td class="num"></td><td class="num"></td><td class="num"></td><td><div class="bar"><div></div></div></td><td class="state"></td>`;
  }
  m.streams.forEach((row, i) => {
    const s = row.stream;
    row.sendWindow = s ? s.sendWindow : null;
    // Waiting for credit: a write is pending and the peer granted nothing more (docs/mux.md §4).
    row.stalled = row.state === "sending" && row.writing && row.sendWindow === 0;
    const shown = row.stalled ? "waiting for credit" : row.state;
    const tr = body.rows[i];
    tr.className = row.state === "done" ? "done" : row.stalled ? "stalled" : row.error || row.state.startsWith("reset") ? "failed" : "";
    const cells = tr.cells;
    cells[0].textContent = row.id ?? "–";
    cells[1].textContent = row.kind;
    cells[1].title = row.dest;
    cells[2].textContent = fmtBytes(row.total);
    cells[3].textContent = fmtBytes(row.sent);
    cells[4].textContent = fmtBytes(row.received);
    cells[5].textContent = row.sendWindow === null ? "–" : fmtBytes(row.sendWindow);
    cells[6].firstChild.firstChild.style.width = `${((100 * row.received) / row.total).toFixed(1)}%`;
    cells[7].textContent = shown + (row.error ? `: ${row.error}` : "");
  });
  const echoes = m.streams.filter((r) => r.kind === "echo");
  const slow = m.streams.find((r) => r.kind === "slow");
  m.echoDone = echoes.length > 0 && echoes.every((r) => r.state === "done");
  m.slowStalled = !!slow && slow.stalled;
  const status = $("mux-status");
  if (m.phase === "failed") status.textContent = `session failed: ${m.error}`;
  else if (m.phase !== "idle") {
    const open = session ? session.streamCount : 0;
    status.textContent =
      `${m.streams.length} streams over one WebSocket (${m.protocol ?? "connecting"}), ${open} open` +
      (session?.rtt !== undefined ? `, round trip ${session.rtt.toFixed(1)} ms` : "") +
      (m.echoDone ? ` · the echo streams are done (every byte checked)` : "") +
      (m.slowStalled ? ` · the slow stream waits for credit, ${fmtBytes(slow.total - slow.sent)} left to send` : "");
  }
  requestAnimationFrame(render);
}

function setupMux() {
  $("echo-dest").value = params.get("echo") ?? "tcp://127.0.0.1:7001";
  $("slow-dest").value = params.get("slow") ?? "tcp://127.0.0.1:7002";
  $("mux-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    runMux();
  });
  $("slow-reset").addEventListener("click", () => {
    $("slow-reset").disabled = true;
    slowStream?.reset(ResetCode.CANCEL);
  });
  $("mux-run").disabled = false;
  requestAnimationFrame(render);
}

setupConsole();
setupMux();
state.ready = true;
