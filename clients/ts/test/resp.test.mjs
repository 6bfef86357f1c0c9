// RESP encoding and decoding: every example of the Redis protocol spec
// (RESP2 and RESP3), at every split point, and the client against a peer
// that speaks RESP over a WebSocket.
import { test } from "node:test";
import assert from "node:assert/strict";
import { WebSocketServer, WebSocket } from "ws";
import {
  decodeResp,
  encodeCommand,
  encodeCommands,
  encodeResp,
  RespDecoder,
  RespError,
  RespPush,
  RespVerbatim,
  RespAttributed,
  RespProtocolError,
  RedisClient,
} from "../dist/index.js";

const enc = (s) => new TextEncoder().encode(s);
const dec = (s, opts) => {
  const r = decodeResp(enc(s), opts);
  assert.ok(r, `whole reply: ${JSON.stringify(s)}`);
  assert.equal(r.used, enc(s).byteLength, `all bytes used: ${JSON.stringify(s)}`);
  return r.value;
};

// [wire, expected value] from https://redis.io/docs/latest/develop/reference/protocol-spec/
const SPEC = [
  // RESP2
  ["+OK\r\n", "OK"],
  [":0\r\n", 0],
  [":1000\r\n", 1000],
  [":-42\r\n", -42],
  [":+7\r\n", 7],
  ["$5\r\nhello\r\n", "hello"],
  ["$0\r\n\r\n", ""],
  ["$-1\r\n", null],
  ["*0\r\n", []],
  ["*2\r\n$5\r\nhello\r\n$5\r\nworld\r\n", ["hello", "world"]],
  ["*3\r\n:1\r\n:2\r\n:3\r\n", [1, 2, 3]],
  ["*5\r\n:1\r\n:2\r\n:3\r\n:4\r\n$5\r\nhello\r\n", [1, 2, 3, 4, "hello"]],
  ["*-1\r\n", null],
  ["*3\r\n$5\r\nhello\r\n$-1\r\n$5\r\nworld\r\n", ["hello", null, "world"]],
  // RESP3
  ["_\r\n", null],
  ["#t\r\n", true],
  ["#f\r\n", false],
  [",1.23\r\n", 1.23],
  [",10\r\n", 10],
  [",-1.5e3\r\n", -1500],
  [",inf\r\n", Infinity],
  [",-inf\r\n", -Infinity],
  ["(3492890328409238509324850943850943825024385\r\n", 3492890328409238509324850943850943825024385n],
  ["(-12\r\n", -12n],
  [":9223372036854775807\r\n", 9223372036854775807n],
  ["=15\r\ntxt:Some string\r\n", new RespVerbatim("txt", "Some string")],
  ["%2\r\n+first\r\n:1\r\n+second\r\n:2\r\n", new Map([["first", 1], ["second", 2]])],
  ["~5\r\n+orange\r\n+apple\r\n#t\r\n:100\r\n:999\r\n", new Set(["orange", "apple", true, 100, 999])],
  [">4\r\n+pubsub\r\n+message\r\n+somechannel\r\n+this is the message\r\n",
    new RespPush("pubsub", ["pubsub", "message", "somechannel", "this is the message"])],
  // Attributes are skipped by default.
  ["|1\r\n+key-popularity\r\n%2\r\n$1\r\na\r\n,0.1923\r\n$1\r\nb\r\n,0.0012\r\n*2\r\n:2039123\r\n:9543892\r\n", [2039123, 9543892]],
  ["*2\r\n:1\r\n|1\r\n+ttl\r\n:3600\r\n:2\r\n", [1, 2]],
  // Streamed strings and aggregates.
  ["$?\r\n;4\r\nHell\r\n;5\r\no wor\r\n;1\r\nd\r\n;0\r\n", "Hello word"],
  ["$?\r\n;0\r\n", ""],
  ["*?\r\n:1\r\n:2\r\n:3\r\n.\r\n", [1, 2, 3]],
  ["*?\r\n.\r\n", []],
  ["%?\r\n+a\r\n:1\r\n+b\r\n:2\r\n.\r\n", new Map([["a", 1], ["b", 2]])],
  ["~?\r\n+a\r\n*?\r\n:1\r\n.\r\n.\r\n", new Set(["a", [1]])],
  // Nesting.
  ["*2\r\n*3\r\n:1\r\n:2\r\n:3\r\n*2\r\n+Hello\r\n-World\r\n", [[1, 2, 3], ["Hello", new RespError("World")]]],
  ["%1\r\n$3\r\nkey\r\n%1\r\n+x\r\n*1\r\n_\r\n", new Map([["key", new Map([["x", [null]]])]])],
];

test("every example of the RESP2 and RESP3 spec decodes", () => {
  for (const [wire, want] of SPEC) {
    assert.deepEqual(dec(wire), want, JSON.stringify(wire));
  }
});

test("doubles: nan, and the spec's exponent forms", () => {
  assert.ok(Number.isNaN(dec(",nan\r\n")));
  assert.equal(dec(",1.5E+2\r\n"), 150);
  assert.equal(dec(",.5\r\n"), 0.5);
});

test("errors decode to RespError values with their code", () => {
  const e = dec("-ERR unknown command 'foobar'\r\n");
  assert.ok(e instanceof RespError);
  assert.equal(e.code, "ERR");
  assert.equal(e.message, "ERR unknown command 'foobar'");
  const w = dec("-WRONGTYPE Operation against a key holding the wrong kind of value\r\n");
  assert.equal(w.code, "WRONGTYPE");
  const b = dec("!21\r\nSYNTAX invalid syntax\r\n");
  assert.ok(b instanceof RespError);
  assert.equal(b.code, "SYNTAX");
  assert.equal(b.message, "SYNTAX invalid syntax");
});

test("attributes are kept when asked for", () => {
  const wire = "|1\r\n+key-popularity\r\n%2\r\n$1\r\na\r\n,0.1923\r\n$1\r\nb\r\n,0.0012\r\n*2\r\n:2039123\r\n:9543892\r\n";
  const v = dec(wire, { attributes: true });
  assert.ok(v instanceof RespAttributed);
  assert.deepEqual(v.value, [2039123, 9543892]);
  assert.deepEqual(v.attributes, new Map([["key-popularity", new Map([["a", 0.1923], ["b", 0.0012]])]]));
});

test("binary mode gives bulk strings as bytes, intact", () => {
  const bytes = Uint8Array.from({ length: 256 }, (_, i) => i);
  const wire = new Uint8Array([...enc("$256\r\n"), ...bytes, 13, 10]);
  assert.deepEqual(decodeResp(wire, { binary: true }).value, bytes);
  assert.deepEqual(decodeResp(enc("$?\r\n;2\r\nab\r\n;1\r\nc\r\n;0\r\n"), { binary: true }).value, enc("abc"));
});

test("every proper prefix of a reply is incomplete, and the decoder reassembles any split", () => {
  for (const [wire] of SPEC) {
    const b = enc(wire);
    for (let n = 0; n < b.byteLength; n++) {
      assert.equal(decodeResp(b.subarray(0, n)), null, `${JSON.stringify(wire)} cut at ${n}`);
    }
  }
  const all = enc(SPEC.map(([w]) => w).join(""));
  for (const step of [1, 2, 3, 7, 64, all.byteLength]) {
    const d = new RespDecoder();
    const got = [];
    for (let o = 0; o < all.byteLength; o += step) {
      d.push(all.subarray(o, o + step));
      for (let r = d.next(); r; r = d.next()) got.push(r.value);
    }
    assert.deepEqual(got, SPEC.map(([, v]) => v), `chunks of ${step}`);
    assert.equal(d.pending, 0);
  }
});

test("a big bulk string split in many chunks is joined once it is whole", () => {
  const d = new RespDecoder({ binary: true });
  const value = new Uint8Array(3_000_000).fill(0x61);
  const wire = new Uint8Array([...enc("$3000000\r\n"), ...value, 13, 10, ...enc("+OK\r\n")]);
  let got = [];
  for (let o = 0; o < wire.byteLength; o += 65536) {
    d.push(wire.subarray(o, o + 65536));
    for (let r = d.next(); r; r = d.next()) got.push(r.value);
  }
  assert.equal(got.length, 2);
  assert.deepEqual(got[0], value);
  assert.equal(got[1], "OK");
});

test("bytes that cannot be RESP are a RespProtocolError", () => {
  for (const wire of ["?x\r\n", "+OK\rX", "$abc\r\n", "$3\r\nabcde", ":1.5\r\n", "#x\r\n", "_x\r\n", ".\r\n", "*1\r\n.\r\n", ",1.2.3\r\n", "=3\r\ntxt\r\n"]) {
    assert.throws(() => decodeResp(enc(wire)), RespProtocolError, JSON.stringify(wire));
  }
  assert.throws(() => decodeResp(enc("*1\r\n".repeat(200) + ":1\r\n")), RespProtocolError, "nesting is bounded");
  assert.throws(() => decodeResp(enc("$99999999999\r\n")), RespProtocolError, "bulk length is bounded");
});

test("commands encode as arrays of bulk strings", () => {
  assert.deepEqual(encodeCommand(["SET", "k", "v"]), enc("*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n"));
  assert.deepEqual(encodeCommand(["INCRBY", "n", 42]), enc("*3\r\n$6\r\nINCRBY\r\n$1\r\nn\r\n$2\r\n42\r\n"));
  assert.deepEqual(encodeCommand(["SET", "ü", Uint8Array.of(0, 13, 10)]), new Uint8Array([...enc("*3\r\n$3\r\nSET\r\n$2\r\nü\r\n$3\r\n"), 0, 13, 10, 13, 10]));
  assert.deepEqual(encodeCommands([["PING"], ["PING"]]), enc("*1\r\n$4\r\nPING\r\n*1\r\n$4\r\nPING\r\n"));
  assert.throws(() => encodeCommand([]), TypeError);
});

test("encodeResp and decodeResp round-trip every kind of value", () => {
  const values = [
    "OK", "", "multi\r\nline", 0, -42, 2.5, Infinity, -Infinity, 123456789012345678901234567890n, null, true, false,
    [1, "two", [3, null]], new Map([["a", 1], ["b", [true]]]), new Set(["x", 2]), new RespError("ERR boom"),
    new RespPush("message", ["message", "ch", "hi"]), new RespVerbatim("mkd", "# title"),
    new RespAttributed(new Map([["ttl", 10]]), "v"),
  ];
  for (const v of values) assert.deepEqual(decodeResp(encodeResp(v), { attributes: true }).value, v);
});

// A peer that answers RESP commands: one reply per WebSocket message, as a
// `--framing resp` bridge route does.
async function fakeRedis() {
  const wss = new WebSocketServer({ host: "127.0.0.1", port: 0, handleProtocols: (p) => (p.has("redis") ? "redis" : false) });
  await new Promise((r) => wss.on("listening", r));
  const store = new Map();
  wss.on("connection", (ws) => {
    const d = new RespDecoder();
    ws.on("message", (data) => {
      d.push(new Uint8Array(data));
      for (let r = d.next(); r; r = d.next()) {
        const [cmd, ...args] = r.value;
        const c = cmd.toUpperCase();
        let reply;
        if (c === "PING") reply = "+PONG\r\n";
        else if (c === "SET") (store.set(args[0], args[1]), (reply = "+OK\r\n"));
        else if (c === "GET") reply = store.has(args[0]) ? encodeResp(store.get(args[0])) : enc("$-1\r\n");
        else if (c === "INCR") {
          const n = Number(store.get(args[0]) ?? 0) + 1;
          store.set(args[0], String(n));
          reply = `:${n}\r\n`;
        } else if (c === "HELLO") reply = encodeResp(new Map([["proto", 3]]));
        else if (c === "PUSHME") {
          ws.send(encodeResp(new RespPush("message", ["message", "ch", args[0]])));
          reply = "+OK\r\n";
        } else reply = `-ERR unknown command '${cmd}'\r\n`;
        ws.send(typeof reply === "string" ? enc(reply) : reply);
      }
    });
  });
  return { url: `ws://127.0.0.1:${wss.address().port}/`, close: () => wss.close() };
}

test("RedisClient: commands, error replies, pipelining and pushes", async () => {
  const srv = await fakeRedis();
  const pushes = [];
  const r = await RedisClient.connect(srv.url, { WebSocket, onPush: (p) => pushes.push(p) });
  try {
    assert.equal(await r.send("PING"), "PONG");
    assert.equal(await r.send("SET", "k", "v"), "OK");
    assert.equal(await r.send("GET", "k"), "v");
    assert.equal(await r.send("GET", "nope"), null);
    await assert.rejects(r.send("NOSUCH"), (e) => e instanceof RespError && e.code === "ERR");
    // Pipelined sends: written back to back, answered in order.
    const many = await Promise.all(Array.from({ length: 200 }, () => r.send("INCR", "n")));
    assert.deepEqual(many, Array.from({ length: 200 }, (_, i) => i + 1));
    // One write of several commands; error replies are values there.
    const replies = await r.pipeline([["INCR", "n"], ["NOSUCH"], ["GET", "k"]]);
    assert.equal(replies[0], 201);
    assert.ok(replies[1] instanceof RespError);
    assert.equal(replies[2], "v");
    assert.equal(await r.send("PUSHME", "hello"), "OK");
    assert.equal(pushes.length, 1);
    assert.equal(pushes[0].kind, "message");
    assert.deepEqual(pushes[0].data, ["message", "ch", "hello"]);
  } finally {
    await r.close();
    srv.close();
  }
});

test("RedisClient: commands waiting when the connection ends are rejected", async () => {
  const wss = new WebSocketServer({ host: "127.0.0.1", port: 0 });
  await new Promise((res) => wss.on("listening", res));
  wss.on("connection", (ws) => ws.on("message", () => ws.close(1000)));
  const r = await RedisClient.connect(`ws://127.0.0.1:${wss.address().port}/`, { WebSocket });
  await assert.rejects(r.send("PING"), /closed/);
  await assert.rejects(r.send("PING"));
  wss.close();
});
