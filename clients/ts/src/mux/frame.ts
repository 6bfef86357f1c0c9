// The wsmux frame codec (docs/mux.md §2): one WebSocket binary message is
// one frame, a 12-byte header and a payload. Decoding needs no session
// state; every check of §2's tables is here, and a frame that breaks one
// becomes a FrameError carrying the GOAWAY code the session must send.

export const VERSION = 1;
export const HEADER_LEN = 12;
/** Largest DATA payload a frame may carry (§4.1). */
export const MAX_PAYLOAD = 65536;
/** Largest GOAWAY reason (§6). */
export const MAX_REASON = 1024;

/** Frame types (§2). */
export const FrameType = {
  Data: 0,
  WindowUpdate: 1,
  Ping: 2,
  GoAway: 3,
} as const;
export type FrameType = (typeof FrameType)[keyof typeof FrameType];

/** Frame flags (§2). */
export const Flag = {
  Syn: 0x1,
  Ack: 0x2,
  Fin: 0x4,
  Rst: 0x8,
} as const;

/** GOAWAY codes (§6). */
export const GoAwayCode = {
  NORMAL: 0,
  PROTOCOL_ERROR: 1,
  UNSUPPORTED_VERSION: 2,
  TEXT_MESSAGE: 3,
  FLOW_CONTROL_ERROR: 4,
  KEEPALIVE_TIMEOUT: 5,
  INTERNAL_ERROR: 6,
} as const;

/** Reset codes (§3.4); other values are the application's. */
export const ResetCode = {
  CANCEL: 0,
  REFUSED: 1,
  INTERNAL: 2,
} as const;

export interface Frame {
  type: FrameType;
  flags: number;
  id: number;
  value: number;
  /** A view into the received message (no copy). */
  payload: Uint8Array;
}

/** A message that is not a valid frame; `code` is the GOAWAY code to send. */
export class FrameError extends Error {
  readonly code: number;
  constructor(code: number, message: string) {
    super(message);
    this.name = "FrameError";
    this.code = code;
  }
}

/** Encodes one frame into a fresh message buffer. */
export function encodeFrame(
  type: FrameType,
  flags: number,
  id: number,
  value: number,
  payload?: Uint8Array,
): Uint8Array {
  const len = payload ? payload.byteLength : 0;
  const buf = new Uint8Array(HEADER_LEN + len);
  buf[0] = VERSION;
  buf[1] = type;
  buf[2] = flags >>> 8;
  buf[3] = flags & 0xff;
  writeU32(buf, 4, id);
  writeU32(buf, 8, value);
  if (len) buf.set(payload!, HEADER_LEN);
  return buf;
}

/**
 * Encodes a DATA frame into `target` (at least 12 + payload bytes) and
 * returns the view of it that is the message.
 */
export function encodeDataInto(target: Uint8Array, flags: number, id: number, payload: Uint8Array): Uint8Array {
  target[0] = VERSION;
  target[1] = FrameType.Data;
  target[2] = flags >>> 8;
  target[3] = flags & 0xff;
  writeU32(target, 4, id);
  target[8] = target[9] = target[10] = target[11] = 0;
  target.set(payload, HEADER_LEN);
  return target.subarray(0, HEADER_LEN + payload.byteLength);
}

function writeU32(b: Uint8Array, at: number, v: number): void {
  b[at] = v >>> 24;
  b[at + 1] = (v >>> 16) & 0xff;
  b[at + 2] = (v >>> 8) & 0xff;
  b[at + 3] = v & 0xff;
}

function readU32(b: Uint8Array, at: number): number {
  return ((b[at]! << 24) | (b[at + 1]! << 16) | (b[at + 2]! << 8) | b[at + 3]!) >>> 0;
}

/**
 * Decodes one message. Throws FrameError (with the GOAWAY code of §2/§7)
 * for anything the tables of §2 do not allow.
 */
export function decodeFrame(msg: Uint8Array): Frame {
  if (msg.byteLength >= 1 && msg[0] !== VERSION) {
    throw new FrameError(GoAwayCode.UNSUPPORTED_VERSION, `unsupported version ${msg[0]}`);
  }
  if (msg.byteLength < HEADER_LEN) {
    throw new FrameError(GoAwayCode.PROTOCOL_ERROR, `frame of ${msg.byteLength} bytes is shorter than its header`);
  }
  const type = msg[1]! as FrameType;
  const flags = (msg[2]! << 8) | msg[3]!;
  const id = readU32(msg, 4);
  const value = readU32(msg, 8);
  const payload = msg.subarray(HEADER_LEN);
  const bad = (why: string): never => {
    throw new FrameError(GoAwayCode.PROTOCOL_ERROR, why);
  };
  if (flags & ~0xf) bad(`unknown flags 0x${flags.toString(16)}`);
  switch (type) {
    case FrameType.Data:
      if (id === 0) bad("DATA on stream 0");
      if (flags & Flag.Syn && flags & Flag.Ack) bad("DATA with SYN and ACK");
      if (flags & Flag.Rst) {
        if (payload.byteLength) bad("DATA with RST and a payload");
      } else if (value !== 0) {
        bad("DATA with a non-zero value");
      }
      if (payload.byteLength > MAX_PAYLOAD) bad(`DATA payload of ${payload.byteLength} bytes`);
      break;
    case FrameType.WindowUpdate:
      if (id === 0) bad("WINDOW_UPDATE on stream 0");
      if (flags & Flag.Rst) bad("WINDOW_UPDATE with RST");
      if (flags & Flag.Syn && flags & Flag.Ack) bad("WINDOW_UPDATE with SYN and ACK");
      if (payload.byteLength) bad("WINDOW_UPDATE with a payload");
      break;
    case FrameType.Ping:
      if (id !== 0) bad("PING on a stream");
      if (flags !== Flag.Syn && flags !== Flag.Ack) bad("PING flags are not exactly SYN or ACK");
      if (payload.byteLength) bad("PING with a payload");
      break;
    case FrameType.GoAway:
      if (id !== 0) bad("GOAWAY on a stream");
      if (flags) bad("GOAWAY with flags");
      if (payload.byteLength > MAX_REASON) bad("GOAWAY reason over 1024 bytes");
      break;
    default:
      bad(`unknown frame type ${type}`);
  }
  return { type, flags, id, value, payload };
}
