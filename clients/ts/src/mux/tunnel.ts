// The gateway's open request and reply (docs/tunnel.md §2, §3): the first
// bytes each way on a stream opened with `session.open(destination)`.

const MAGIC = 0x57; // 'W'
const VERSION = 1;
/** Longest destination or reply message (bytes of UTF-8). */
export const MAX_TEXT = 1024;

export interface Reply {
  /** 0 OK, 1 NOT_ALLOWED, 2 UNREACHABLE, 3 TIMEOUT, 4 NO_AGENT. */
  status: number;
  message: string;
}

const encoder = new TextEncoder();
const decoder = new TextDecoder();

/** `0x57, 1, u16 length, destination`; throws TypeError for a destination the gateway would reject outright. */
export function encodeOpenRequest(destination: string): Uint8Array {
  if (!/^[a-z][a-z0-9+.-]*:\/\/\S+$/i.test(destination)) {
    throw new TypeError(`destination ${JSON.stringify(destination)} is not SCHEME://HOST:PORT or agent://ID/SCHEME://HOST:PORT`);
  }
  const text = encoder.encode(destination);
  if (text.byteLength > MAX_TEXT) throw new TypeError(`destination is ${text.byteLength} bytes (at most ${MAX_TEXT})`);
  const out = new Uint8Array(4 + text.byteLength);
  out[0] = MAGIC;
  out[1] = VERSION;
  out[2] = text.byteLength >>> 8;
  out[3] = text.byteLength & 0xff;
  out.set(text, 4);
  return out;
}

/**
 * The reply at the start of `buf`, and how many bytes it took; null while
 * it is incomplete. Throws on a reply that cannot be one.
 */
export function decodeReply(buf: Uint8Array): { reply: Reply; used: number } | null {
  if (buf.byteLength >= 1 && buf[0] !== VERSION) throw new Error(`open reply of version ${buf[0]}`);
  if (buf.byteLength < 4) return null;
  const len = (buf[2]! << 8) | buf[3]!;
  if (len > MAX_TEXT) throw new Error(`open reply message of ${len} bytes`);
  if (buf.byteLength < 4 + len) return null;
  return { reply: { status: buf[1]!, message: decoder.decode(buf.subarray(4, 4 + len)) }, used: 4 + len };
}
