// The frame codec against docs/mux.md §2: the example bytes, and one case
// per rule of the tables with the GOAWAY code it must give.
import { test } from "node:test";
import assert from "node:assert/strict";
import { decodeFrame, encodeFrame, FrameError, FrameType, Flag, GoAwayCode } from "../dist/mux/index.js";
import { encodeOpenRequest, decodeReply } from "../dist/mux/index.js";

const hex = (s) => Uint8Array.from((s.replace(/\s+/g, "").match(/../g) ?? []).map((b) => parseInt(b, 16)));

test("the example frames of docs/mux.md §2 decode to what the document says", () => {
  const cases = [
    ["01 01 0001 00000001 00000000", FrameType.WindowUpdate, Flag.Syn, 1, 0, ""],
    ["01 00 0000 00000001 00000000 68 69", FrameType.Data, 0, 1, 0, "hi"],
    ["01 00 0004 00000001 00000000", FrameType.Data, Flag.Fin, 1, 0, ""],
    ["01 01 0002 00000002 00000000", FrameType.WindowUpdate, Flag.Ack, 2, 0, ""],
    ["01 01 0000 00000001 00020000", FrameType.WindowUpdate, 0, 1, 131072, ""],
    ["01 00 0008 00000003 00000000", FrameType.Data, Flag.Rst, 3, 0, ""],
    ["01 02 0001 00000000 0000002a", FrameType.Ping, Flag.Syn, 0, 42, ""],
    ["01 02 0002 00000000 0000002a", FrameType.Ping, Flag.Ack, 0, 42, ""],
    ["01 03 0000 00000000 00000000", FrameType.GoAway, 0, 0, GoAwayCode.NORMAL, ""],
  ];
  for (const [bytes, type, flags, id, value, payload] of cases) {
    const f = decodeFrame(hex(bytes));
    assert.deepEqual(
      { type: f.type, flags: f.flags, id: f.id, value: f.value, payload: new TextDecoder().decode(f.payload) },
      { type, flags, id, value, payload },
      bytes,
    );
    const again = encodeFrame(type, flags, id, value, new TextEncoder().encode(payload));
    assert.deepEqual(again, hex(bytes), `encoding gives the same bytes: ${bytes}`);
  }
});

test("ids and values use all 32 bits, big-endian", () => {
  const f = decodeFrame(encodeFrame(FrameType.WindowUpdate, 0, 0xfffffffe, 0xffffffff));
  assert.equal(f.id, 0xfffffffe);
  assert.equal(f.value, 0xffffffff);
});

test("the payload is a view of the message, not a copy", () => {
  const msg = encodeFrame(FrameType.Data, 0, 1, 0, new Uint8Array(100).fill(7));
  const f = decodeFrame(msg);
  assert.equal(f.payload.buffer, msg.buffer);
  assert.equal(f.payload.byteLength, 100);
});

test("every rule of the §2 tables gives its GOAWAY code", () => {
  const P = GoAwayCode.PROTOCOL_ERROR;
  const cases = [
    ["version 2", "02 00 0000 00000001 00000000", GoAwayCode.UNSUPPORTED_VERSION],
    ["short message with a wrong version", "07 00", GoAwayCode.UNSUPPORTED_VERSION],
    ["shorter than 12 bytes", "01 00 0000 000000", P],
    ["empty message", "", P],
    ["unknown flag bit", "01 00 0010 00000001 00000000", P],
    ["unknown type", "01 04 0000 00000001 00000000", P],
    ["DATA on stream 0", "01 00 0000 00000000 00000000", P],
    ["DATA with SYN|ACK", "01 00 0003 00000001 00000000", P],
    ["DATA with a value and no RST", "01 00 0000 00000001 00000001", P],
    ["DATA with RST and a payload", "01 00 0008 00000001 00000000 00", P],
    ["WINDOW_UPDATE on stream 0", "01 01 0000 00000000 00000001", P],
    ["WINDOW_UPDATE with RST", "01 01 0008 00000001 00000000", P],
    ["WINDOW_UPDATE with SYN|ACK", "01 01 0003 00000001 00000000", P],
    ["WINDOW_UPDATE with a payload", "01 01 0000 00000001 00000000 00", P],
    ["PING on a stream", "01 02 0001 00000001 00000000", P],
    ["PING with no flags", "01 02 0000 00000000 00000000", P],
    ["PING with SYN|ACK", "01 02 0003 00000000 00000000", P],
    ["PING with FIN", "01 02 0004 00000000 00000000", P],
    ["PING with a payload", "01 02 0001 00000000 00000000 00", P],
    ["GOAWAY on a stream", "01 03 0000 00000001 00000000", P],
    ["GOAWAY with flags", "01 03 0001 00000000 00000000", P],
  ];
  for (const [what, bytes, code] of cases) {
    assert.throws(() => decodeFrame(hex(bytes)), (e) => e instanceof FrameError && e.code === code, what);
  }
  const big = new Uint8Array(12 + 65537);
  big.set(hex("01 00 0000 00000001 00000000"));
  assert.throws(() => decodeFrame(big), (e) => e.code === P, "DATA of 65537 bytes");
  assert.equal(decodeFrame(big.subarray(0, 12 + 65536)).payload.byteLength, 65536, "65536 bytes is allowed");
  const reason = new Uint8Array(12 + 1025);
  reason.set(hex("01 03 0000 00000000 00000001"));
  assert.throws(() => decodeFrame(reason), (e) => e.code === P, "GOAWAY reason over 1024 bytes");
  assert.equal(decodeFrame(reason.subarray(0, 12 + 1024)).payload.byteLength, 1024);
});

test("the open request and reply of docs/tunnel.md §2-§3", () => {
  assert.deepEqual(encodeOpenRequest("tcp://10.0.0.5:22"), Uint8Array.from([0x57, 1, 0, 17, ...new TextEncoder().encode("tcp://10.0.0.5:22")]));
  assert.throws(() => encodeOpenRequest("10.0.0.5:22"), TypeError);
  assert.throws(() => encodeOpenRequest("tcp://" + "a".repeat(1020)), TypeError);
  const reply = Uint8Array.from([1, 1, 0, 3, 0x6e, 0x6f, 0x21, 9, 9]);
  for (let n = 0; n < 7; n++) assert.equal(decodeReply(reply.subarray(0, n)), null, `${n} bytes are not a whole reply`);
  assert.deepEqual(decodeReply(reply), { reply: { status: 1, message: "no!" }, used: 7 });
  assert.throws(() => decodeReply(Uint8Array.from([2, 0, 0, 0])));
});
