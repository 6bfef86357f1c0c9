// One WebSocket as a pair of WHATWG streams, with backpressure both ways.
//
// Where the runtime has `WebSocketStream` (Chromium), it is used: its
// readable stops reading from the network when its queue is full and its
// writable resolves writes as the network takes them. Elsewhere a
// `WebSocket` is wrapped:
//   * writing: `send()`, then wait while `bufferedAmount` is above the
//     writable high-water mark (polled, or at the `ws` package's send
//     callbacks);
//   * reading: messages go into a ReadableStream whose queue is counted in
//     bytes; once it reaches the high-water mark the socket is paused
//     (`pause()`/`resume()` of the `ws` package), so TCP backpressure
//     reaches the sender: through wsgate, its relay stops reading from the
//     peer. The WHATWG `WebSocket` of browsers without WebSocketStream and
//     of Node (undici) cannot stop reading: there the queue keeps growing
//     past the mark (documented in the README).

import {
  CONNECTING,
  OPEN,
  messageData,
  webSocketClass,
  type WebSocketConstructor,
  type WebSocketLike,
} from "./websocket.js";
import type { Chunk } from "./mux/stream.js";

export interface OpenStreamOptions {
  /** Subprotocols to offer. */
  protocols?: string | string[];
  /** Bytes the readable side queues before it stops reading. Default 1 MiB. */
  highWaterMark?: number;
  /** `bufferedAmount` above which writes wait. Default 1 MiB. */
  writableHighWaterMark?: number;
  /** The WebSocket class (default: the global one; in Node 20 pass the `ws` package's). */
  WebSocket?: WebSocketConstructor;
  /** Use `WebSocketStream` where the runtime has one (default true; ignored when `WebSocket` is given). */
  webSocketStream?: boolean;
  /** Aborts connecting, and closes the WebSocket later. */
  signal?: AbortSignal;
}

export interface CloseInfo {
  /** 1000, or 3000–4999. */
  closeCode?: number;
  reason?: string;
}

/** An open WebSocket as WHATWG streams. */
export interface WebSocketDuplex {
  /** Messages: `Uint8Array` for binary ones, `string` for text ones. Ends at a clean close; errors with WebSocketCloseError otherwise. */
  readonly readable: ReadableStream<Uint8Array | string>;
  /** Each chunk is one message: bytes as binary, strings as text. close() closes the WebSocket. */
  readonly writable: WritableStream<Chunk>;
  /** The subprotocol the server selected ("" if none). */
  readonly protocol: string;
  readonly extensions: string;
  /** Resolves with the close code and reason once the WebSocket has closed. */
  readonly closed: Promise<{ closeCode: number; reason: string }>;
  /** Which implementation carries it. */
  readonly via: "WebSocketStream" | "WebSocket";
  /** Closes the WebSocket (1000 unless told otherwise). */
  close(info?: CloseInfo): void;
}

/** The WebSocket closed without a clean close handshake. */
export class WebSocketCloseError extends Error {
  readonly closeCode: number;
  readonly reason: string;
  constructor(closeCode: number, reason: string) {
    super(`WebSocket closed with ${closeCode}${reason ? ` ${reason}` : ""}`);
    this.name = "WebSocketCloseError";
    this.closeCode = closeCode;
    this.reason = reason;
  }
}

const DEFAULT_HWM = 1024 * 1024;

const chunkSize = (c: Uint8Array | string): number => (typeof c === "string" ? c.length : c.byteLength);

function validCloseCode(info: CloseInfo | undefined, reason?: unknown): { code: number; reason: string } {
  const r = (reason ?? {}) as { closeCode?: unknown };
  const c = info?.closeCode ?? (typeof r.closeCode === "number" ? r.closeCode : 1000);
  return { code: c === 1000 || (c >= 3000 && c <= 4999) ? c : 1000, reason: info?.reason ?? "" };
}

interface WebSocketStreamLike {
  opened: Promise<{
    readable: ReadableStream<ArrayBuffer | Uint8Array | string>;
    writable: WritableStream<ArrayBuffer | Uint8Array | string>;
    protocol: string;
    extensions: string;
  }>;
  closed: Promise<{ closeCode?: number; reason?: string }>;
  close(info?: { closeCode?: number; reason?: string }): void;
}
type WebSocketStreamConstructor = new (
  url: string,
  opts?: { protocols?: string[]; signal?: AbortSignal },
) => WebSocketStreamLike;

/**
 * Opens a WebSocket and resolves, once it is open, with its messages as a
 * ReadableStream and a WritableStream for sending, each with backpressure.
 */
export async function openStream(url: string | URL, opts: OpenStreamOptions = {}): Promise<WebSocketDuplex> {
  const protocols = opts.protocols === undefined ? [] : Array.isArray(opts.protocols) ? opts.protocols : [opts.protocols];
  const hwm = opts.highWaterMark ?? DEFAULT_HWM;
  const whwm = opts.writableHighWaterMark ?? DEFAULT_HWM;
  opts.signal?.throwIfAborted();
  const WSS = (globalThis as { WebSocketStream?: WebSocketStreamConstructor }).WebSocketStream;
  if (!opts.WebSocket && opts.webSocketStream !== false && typeof WSS === "function") {
    return viaWebSocketStream(new WSS(String(url), { protocols, signal: opts.signal }), hwm);
  }
  const WS = webSocketClass(opts.WebSocket);
  return viaWebSocket(new WS(url, protocols), hwm, whwm, opts.signal);
}

async function viaWebSocketStream(wss: WebSocketStreamLike, hwm: number): Promise<WebSocketDuplex> {
  const opened = await wss.opened;
  const inner = opened.readable.getReader();
  const innerWriter = opened.writable.getWriter();
  const closed = wss.closed.then((c) => ({ closeCode: c.closeCode ?? 1005, reason: c.reason ?? "" }));
  closed.catch(() => {});
  const readable = new ReadableStream<Uint8Array | string>(
    {
      // Called only while the queue is under the high-water mark: reading
      // stops there, and WebSocketStream stops reading from the network.
      async pull(c) {
        const { value, done } = await inner.read();
        if (done) c.close();
        else c.enqueue(messageData(value));
      },
      cancel(reason) {
        return inner.cancel(reason);
      },
    },
    { highWaterMark: hwm, size: chunkSize },
  );
  const writable = new WritableStream<Chunk>({
    write: (chunk) => innerWriter.write(chunk as Uint8Array | string),
    close: () => innerWriter.close(),
    abort: (reason) => innerWriter.abort(reason),
  });
  return {
    readable,
    writable,
    protocol: opened.protocol,
    extensions: opened.extensions,
    closed,
    via: "WebSocketStream",
    close(info) {
      const { code, reason } = validCloseCode(info);
      wss.close({ closeCode: code, reason });
    },
  };
}

function viaWebSocket(ws: WebSocketLike, hwm: number, whwm: number, signal?: AbortSignal): Promise<WebSocketDuplex> {
  // ArrayBuffers, except that the `ws` package's Buffers (its default) are
  // kept: they are Uint8Arrays already, and converting them copies.
  if (ws.binaryType !== "nodebuffer") ws.binaryType = "arraybuffer";
  const pausable = ws as WebSocketLike & { pause?: () => void; resume?: () => void };
  const canPause = typeof pausable.pause === "function" && typeof pausable.resume === "function";
  const sendCallbacks = ws.send.length >= 3;
  let paused = false;
  let rctl!: ReadableStreamDefaultController<Uint8Array | string>;
  let readDone = false;
  let closeInfo: { closeCode: number; reason: string } | undefined;
  let resolveClosed!: (c: { closeCode: number; reason: string }) => void;
  const closed = new Promise<{ closeCode: number; reason: string }>((r) => (resolveClosed = r));
  let drainWaiters: Array<() => void> = [];
  let drainTimer: ReturnType<typeof setTimeout> | undefined;

  const wakeDrained = () => {
    if (!drainWaiters.length) return;
    if (closeInfo || ws.readyState !== OPEN || ws.bufferedAmount <= whwm) {
      const w = drainWaiters;
      drainWaiters = [];
      for (const r of w) r();
    }
  };
  const poll = () => {
    drainTimer = undefined;
    wakeDrained();
    if (drainWaiters.length) drainTimer = setTimeout(poll, sendCallbacks ? 50 : 1);
  };
  const drained = () =>
    new Promise<void>((r) => {
      drainWaiters.push(r);
      if (drainTimer === undefined) drainTimer = setTimeout(poll, sendCallbacks ? 50 : 1);
    });

  const readable = new ReadableStream<Uint8Array | string>(
    {
      start(c) {
        rctl = c;
      },
      pull() {
        if (paused) {
          paused = false;
          pausable.resume!();
        }
      },
      cancel() {
        readDone = true;
        if (ws.readyState === OPEN || ws.readyState === CONNECTING) ws.close(1000);
      },
    },
    { highWaterMark: hwm, size: chunkSize },
  );
  ws.addEventListener("message", (ev: { data: unknown }) => {
    if (readDone) return;
    rctl.enqueue(messageData(ev.data));
    if (canPause && !paused && (rctl.desiredSize ?? 1) <= 0) {
      paused = true;
      pausable.pause!();
    }
  });

  const writable = new WritableStream<Chunk>({
    async write(chunk) {
      if (ws.readyState !== OPEN) throw new WebSocketCloseError(closeInfo?.closeCode ?? 1006, closeInfo?.reason ?? "not open");
      const data = typeof chunk === "string" || chunk instanceof Uint8Array || chunk instanceof ArrayBuffer ? chunk : new Uint8Array(chunk.buffer, chunk.byteOffset, chunk.byteLength);
      if (sendCallbacks) ws.send(data, undefined, wakeDrained);
      else ws.send(data);
      while (ws.readyState === OPEN && ws.bufferedAmount > whwm) await drained();
    },
    close() {
      ws.close(1000);
    },
    abort(reason) {
      const { code, reason: text } = validCloseCode(undefined, reason);
      ws.close(code, text);
    },
  });

  return new Promise<WebSocketDuplex>((resolve, reject) => {
    // A close event follows every error; without a listener, the `ws`
    // package would throw the error instead.
    ws.addEventListener("error", () => {});
    const onAbort = () => ws.close(1000);
    signal?.addEventListener("abort", onAbort, { once: true });
    ws.addEventListener("close", (ev: { code: number; reason: string; wasClean: boolean }) => {
      closeInfo = { closeCode: ev.code, reason: ev.reason };
      resolveClosed(closeInfo);
      wakeDrained();
      if (!readDone) {
        readDone = true;
        if (ev.wasClean) rctl.close();
        else rctl.error(new WebSocketCloseError(ev.code, ev.reason));
      }
      reject(signal?.aborted ? signal.reason : new WebSocketCloseError(ev.code, ev.reason || "the WebSocket did not open"));
    });
    const opened = () =>
      resolve({
        readable,
        writable,
        protocol: ws.protocol,
        extensions: ws.extensions ?? "",
        closed,
        via: "WebSocket",
        close(info) {
          const { code, reason } = validCloseCode(info);
          ws.close(code, reason);
        },
      });
    if (ws.readyState === OPEN) opened();
    else ws.addEventListener("open", opened, { once: true });
  });
}
