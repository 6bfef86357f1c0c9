// What the package needs of a WebSocket: the WHATWG API that browsers,
// Node >= 22 (and Node 20 with --experimental-websocket) and the `ws`
// package all provide. Nothing here is specific to one of them; where `ws`
// offers more (pause/resume, a send callback) it is detected, not required.

/**
 * The subset of the WHATWG `WebSocket` the package uses. Like the WHATWG
 * one, `send()` must take a copy of the bytes it is given (the mux reuses
 * its frame buffers), unless it takes a third argument, a callback called
 * once it is done with them (the `ws` package's `send(data, options, cb)`).
 */
export interface WebSocketLike {
  readonly readyState: number;
  readonly bufferedAmount: number;
  readonly protocol: string;
  readonly extensions?: string;
  binaryType: string;
  send(data: ArrayBufferView | ArrayBuffer | string, ...rest: unknown[]): void;
  close(code?: number, reason?: string): void;
  addEventListener(type: string, listener: (ev: any) => void, options?: unknown): void;
  removeEventListener(type: string, listener: (ev: any) => void, options?: unknown): void;
}

/** `new WebSocket(url, protocols)`, as browsers, Node and `ws` spell it. */
export type WebSocketConstructor = new (url: string | URL, protocols?: string | string[]) => WebSocketLike;

export const CONNECTING = 0;
export const OPEN = 1;

/** The global WebSocket, or `given`; throws a clear TypeError when there is none. */
export function webSocketClass(given?: WebSocketConstructor): WebSocketConstructor {
  const ctor = given ?? (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
  if (typeof ctor !== "function") {
    throw new TypeError(
      "no WebSocket: pass { WebSocket } (for example the `ws` package's) or run Node >= 22 " +
        "(Node 20: node --experimental-websocket)",
    );
  }
  return ctor;
}

/** A received message's bytes (no copy), or the string of a text message. */
export function messageData(data: unknown): Uint8Array | string {
  if (typeof data === "string") return data;
  if (data instanceof ArrayBuffer) return new Uint8Array(data);
  if (ArrayBuffer.isView(data)) return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  throw new TypeError(`unexpected message data of type ${Object.prototype.toString.call(data)}`);
}

const encoder = new TextEncoder();

/** Bytes of a chunk a writer was given (strings as UTF-8). */
export function toBytes(chunk: unknown): Uint8Array {
  if (chunk instanceof Uint8Array) return chunk;
  if (typeof chunk === "string") return encoder.encode(chunk);
  if (chunk instanceof ArrayBuffer) return new Uint8Array(chunk);
  if (ArrayBuffer.isView(chunk)) return new Uint8Array(chunk.buffer, chunk.byteOffset, chunk.byteLength);
  throw new TypeError("chunks must be Uint8Array, ArrayBuffer, an ArrayBufferView or a string");
}

/**
 * The `Sec-WebSocket-Protocol` entry that carries a bearer token:
 * `wsgate.bearer.` + the token's UTF-8 in unpadded base64url. Browsers
 * cannot set an Authorization header on a WebSocket, and a subprotocol
 * entry must be an HTTP token (RFC 7230), which a raw token with `/`, `=`
 * or `"` is not; base64url always is (the Kubernetes API server does the
 * same with `base64url.bearer.authorization.k8s.io.`).
 */
export function bearerProtocol(token: string): string {
  const bytes = encoder.encode(token);
  let bin = "";
  for (let i = 0; i < bytes.length; i++) bin += String.fromCharCode(bytes[i]!);
  return "wsgate.bearer." + btoa(bin).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

/** Unrefs a Node timer so that it does not keep the process alive (no-op elsewhere). */
export function unref<T>(timer: T): T {
  (timer as { unref?: () => void }).unref?.();
  return timer;
}
