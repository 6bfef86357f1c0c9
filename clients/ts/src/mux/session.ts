// A wsmux session (docs/mux.md, version 1) over one WHATWG WebSocket.
//
// A session's life: `MuxSession.connect(url)` opens the WebSocket offering
// `wsmux.v1` (and the token as `wsgate.bearer.…`), sends a PING to measure
// the round trip, then runs keepalive (a PING per interval, counted from the
// previous answer; dead when a PING is out and nothing at all arrived for
// the timeout). `open(destination)` opens a stream whose first bytes are
// the gateway's open request (docs/tunnel.md §2) and resolves at the reply;
// `openRaw()` opens a bare stream, `accept()` takes the peer's. Every
// incoming message is checked against §2's tables (frame.ts) and §3's
// stream rules here; a violation sends GOAWAY with its code, closes the
// WebSocket and fails every stream with a MuxError. `goaway()` stops new
// streams both ways while existing ones finish; `close()` ends everything.

import {
  Flag,
  FrameError,
  FrameType,
  GoAwayCode,
  MAX_PAYLOAD,
  MAX_REASON,
  ResetCode,
  decodeFrame,
  encodeDataInto,
  encodeFrame,
} from "./frame.js";
import { MuxError, goAwayName } from "./errors.js";
import { INITIAL_WINDOW, MuxStream, SENT_MORE, SENT_WAIT, SENT_ALL } from "./stream.js";
import { encodeOpenRequest } from "./tunnel.js";
import {
  CONNECTING,
  OPEN,
  bearerProtocol,
  messageData,
  unref,
  webSocketClass,
  type WebSocketConstructor,
  type WebSocketLike,
} from "../websocket.js";

/** The WebSocket subprotocol of wsmux version 1. */
export const MUX_PROTOCOL = "wsmux.v1";

export interface MuxSessionOptions {
  /** This side is the WebSocket client (odd stream ids). Default true. */
  client?: boolean;
  /** PING every `interval` ms; dead after `timeout` ms of silence with a PING out. Default 15 s / 20 s; false: only the first PING (for the round trip), no deadline. */
  keepalive?: false | { interval?: number; timeout?: number };
  /** Receive window each new stream starts with (≥ 256 KiB; more is granted in the SYN or ACK). Default 256 KiB. */
  window?: number;
  /** Largest window auto-tuning grows a stream's to (§4.3). Default 16 MiB; set it to `window` to turn tuning off. */
  maxWindow?: number;
  /** Cap on the sum of all streams' receive windows. Default 64 MiB. */
  maxSessionMemory?: number;
  /** Streams alive at once, both directions (the peer's beyond it are refused). Default 256. */
  maxStreams?: number;
  /** Streams the peer opened that wait for accept(). Default 256. */
  acceptBacklog?: number;
  /** Largest DATA payload sent (≤ 65536). Default 65536. */
  maxFrame?: number;
  /** Writers wait while the WebSocket's bufferedAmount is above this. Default 1 MiB. */
  sendHighWaterMark?: number;
  /** Bytes a stream's WritableStream queues before `writer.ready` waits. Default 64 KiB. */
  writableHighWaterMark?: number;
}

export interface MuxConnectOptions extends MuxSessionOptions {
  /** A bearer token, offered as the subprotocol entry `wsgate.bearer.<base64url(token)>`. */
  token?: string;
  /** More subprotocols to offer after `wsmux.v1`. */
  protocols?: string[];
  /** The WebSocket class (default: the global one; in Node 20 pass the `ws` package's). */
  WebSocket?: WebSocketConstructor;
  /** Aborts connecting. */
  signal?: AbortSignal;
}

export interface OpenOptions {
  /** Aborts the open (the stream is reset). */
  signal?: AbortSignal;
}

const now = (): number => performance.now();

interface Corkable {
  cork(): void;
  uncork(): void;
  setImmediate(f: () => void): void;
}

/** The `ws` package's net.Socket under an open WebSocket, when it has one (Node only). */
function corkable(socket: WebSocketLike): Corkable | undefined {
  const s = (socket as { _socket?: { cork?: unknown; uncork?: unknown } | null })._socket;
  const immediate = (globalThis as { setImmediate?: (f: () => void) => void }).setImmediate;
  if (!s || typeof s.cork !== "function" || typeof s.uncork !== "function" || typeof immediate !== "function") return undefined;
  const tcp = s as { cork(): void; uncork(): void };
  return { cork: () => tcp.cork(), uncork: () => tcp.uncork(), setImmediate: immediate };
}

/** Size of a pooled frame buffer: a header and the largest payload. */
const FRAME_BUF = 12 + MAX_PAYLOAD;

/** A reusable frame buffer and the send callback that returns it to the pool (made once per buffer). */
interface PooledFrame {
  readonly buf: Uint8Array;
  readonly release: () => void;
}
/** Frame buffers kept for reuse (1.5 MiB at most). */
const POOL_MAX = 24;
/** Payloads from this size on are encoded into pooled buffers. */
const POOLED_FROM = 8192;

export class MuxSession {
  /** The WebSocket the session runs on. */
  readonly socket: WebSocketLike;
  /** Resolves when the WebSocket is open; rejects with a MuxError if it never opens. */
  readonly ready: Promise<void>;
  /** Resolves, with the error that ended it, when the session has ended. */
  readonly closed: Promise<MuxError>;

  private readonly client: boolean;
  private readonly keepaliveInterval: number | undefined;
  private readonly keepaliveTimeout: number;
  private readonly window: number;
  private readonly maxWindow: number;
  private readonly maxMemory: number;
  private readonly maxStreams: number;
  private readonly acceptBacklog: number;
  /** @internal */ readonly _maxFrame: number;
  private readonly sendHighWaterMark: number;
  private readonly writableHighWaterMark: number;
  private readonly sendCallbacks: boolean;
  private transport: Corkable | undefined;
  private corked = false;
  /** A frame was sent in this turn of the event loop (uncorked). */
  private sentThisTurn = false;

  private nextId: number;
  private lastPeerId = 0;
  private readonly streams = new Map<number, MuxStream>();
  private readonly acceptQueue: MuxStream[] = [];
  private acceptWaiters: Array<{ resolve: (s: MuxStream) => void; reject: (e: Error) => void }> = [];
  private memory = 0; // sum of the alive streams' receive windows
  private grown = 0; // how much of it auto-tuning added
  private error: MuxError | undefined;
  private goAwaySent = false;
  private goAwayRecv: number | undefined;
  private pending: Uint8Array[] | undefined = []; // frames sent before the WebSocket opened
  // Streams with a write waiting for room in the WebSocket's buffer, in
  // turn order; sendHead is the next one.
  private sendQueue: Array<MuxStream | undefined> = [];
  private sendHead = 0;
  private pumping = false;
  private pumpQueued = false;
  private readonly framePool: PooledFrame[] = [];
  private drainTimer: ReturnType<typeof setTimeout> | undefined;
  // Keepalive and round trip.
  private rttMs: number | undefined;
  private pingValue = 0;
  private pingOut: { value: number; sentAt: number } | undefined;
  private lastRecv = now();
  private lastPong = now();
  private timer: ReturnType<typeof setTimeout> | undefined;
  private resolveClosed!: (e: MuxError) => void;

  /** Connects to a `/mux` URL and starts a client session once the WebSocket is open. */
  static async connect(url: string | URL, opts: MuxConnectOptions = {}): Promise<MuxSession> {
    const WS = webSocketClass(opts.WebSocket);
    const protocols = [MUX_PROTOCOL];
    if (opts.token !== undefined) protocols.push(bearerProtocol(opts.token));
    if (opts.protocols) protocols.push(...opts.protocols);
    opts.signal?.throwIfAborted();
    const ws = new WS(url, protocols);
    const session = new MuxSession(ws, { ...opts, client: true });
    const onAbort = () => session.close();
    opts.signal?.addEventListener("abort", onAbort, { once: true });
    try {
      await session.ready;
    } catch (e) {
      if (opts.signal?.aborted) throw opts.signal.reason;
      throw e;
    } finally {
      opts.signal?.removeEventListener("abort", onAbort);
    }
    if (ws.protocol && ws.protocol !== MUX_PROTOCOL) {
      const err = new MuxError("transport", `server selected subprotocol ${JSON.stringify(ws.protocol)}, not ${MUX_PROTOCOL}`);
      session.fail(err);
      ws.close(1000);
      throw err;
    }
    return session;
  }

  /** Runs a session on a WebSocket (open or still connecting); `client: false` for the server side. */
  constructor(socket: WebSocketLike, opts: MuxSessionOptions = {}) {
    this.socket = socket;
    this.client = opts.client ?? true;
    this.nextId = this.client ? 1 : 2;
    const ka = opts.keepalive === undefined ? {} : opts.keepalive;
    this.keepaliveInterval = ka === false ? undefined : (ka.interval ?? 15_000);
    this.keepaliveTimeout = ka === false ? Infinity : (ka.timeout ?? 20_000);
    this.window = Math.max(INITIAL_WINDOW, opts.window ?? INITIAL_WINDOW);
    this.maxWindow = Math.max(this.window, opts.maxWindow ?? 16 * 1024 * 1024);
    this.maxMemory = opts.maxSessionMemory ?? 64 * 1024 * 1024;
    this.maxStreams = opts.maxStreams ?? 256;
    this.acceptBacklog = opts.acceptBacklog ?? 256;
    this._maxFrame = Math.min(MAX_PAYLOAD, Math.max(1, opts.maxFrame ?? MAX_PAYLOAD));
    this.sendHighWaterMark = opts.sendHighWaterMark ?? 1024 * 1024;
    this.writableHighWaterMark = opts.writableHighWaterMark ?? 64 * 1024;
    // The `ws` package's send(data, options, cb) calls back once the frame
    // is handed to the kernel: a chance to wake writers without polling.
    this.sendCallbacks = socket.send.length >= 3;
    this.closed = new Promise<MuxError>((r) => (this.resolveClosed = r));
    // ArrayBuffers, except that the `ws` package's Buffers (its default) are
    // kept: they are Uint8Arrays already, and converting them copies.
    if (socket.binaryType !== "nodebuffer") socket.binaryType = "arraybuffer";
    this.ready = new Promise<void>((resolve, reject) => {
      const started = () => {
        this.start();
        resolve();
      };
      if (socket.readyState === OPEN) {
        started();
      } else if (socket.readyState !== CONNECTING) {
        reject(new MuxError("transport", "the WebSocket is closed"));
      } else {
        socket.addEventListener("open", started, { once: true });
        this.closed.then(reject);
      }
    });
    this.ready.catch(() => {});
    const emitter = socket as unknown as { on?: (event: string, f: (data: unknown, isBinary: boolean) => void) => unknown };
    if (this.sendCallbacks && typeof emitter.on === "function") {
      // The `ws` package: its own "message" event (a Buffer and whether it
      // is binary), without the MessageEvent its addEventListener makes
      // for every message.
      emitter.on("message", (data, isBinary) => this.onMessage(isBinary ? data : ""));
    } else {
      socket.addEventListener("message", (ev: { data: unknown }) => this.onMessage(ev.data));
    }
    socket.addEventListener("close", (ev: { code?: number; reason?: string }) => {
      const code = ev?.code;
      this.fail(
        new MuxError("transport", `the WebSocket closed${code ? ` (${code}${ev.reason ? ` ${ev.reason}` : ""})` : ""}`, {
          closeCode: code,
        }),
      );
    });
    socket.addEventListener("error", () => {
      if (socket.readyState === CONNECTING || socket.readyState === OPEN) return; // a close event follows
      this.fail(new MuxError("transport", "the WebSocket failed"));
    });
  }

  /** The last measured round trip in milliseconds (undefined before the first PING answer). */
  get rtt(): number | undefined {
    return this.rttMs;
  }

  /** Streams alive (opened or accepted, not yet closed both ways or reset). */
  get streamCount(): number {
    return this.streams.size;
  }

  /** Whether new streams may still be opened (no GOAWAY either way, not ended). */
  get acceptsNewStreams(): boolean {
    return !this.error && !this.goAwaySent && this.goAwayRecv === undefined;
  }

  /**
   * Opens a stream to `destination` through the gateway (`tcp://HOST:PORT`,
   * `udp://HOST:PORT`, `agent://ID/tcp://HOST:PORT`): sends the open
   * request and resolves once the gateway replied OK. Rejects with
   * OpenRefusedError (its `status`), StreamResetError or MuxError.
   */
  async open(destination: string, opts: OpenOptions = {}): Promise<MuxStream> {
    const request = encodeOpenRequest(destination);
    opts.signal?.throwIfAborted();
    await this.ready;
    const s = this.newStream(destination);
    const reply = s._awaitReply();
    this.sendSyn(s, request);
    const onAbort = () => s.reset(ResetCode.CANCEL);
    opts.signal?.addEventListener("abort", onAbort, { once: true });
    try {
      await reply;
    } catch (e) {
      if (opts.signal?.aborted) throw opts.signal.reason;
      throw e;
    } finally {
      opts.signal?.removeEventListener("abort", onAbort);
    }
    return s;
  }

  /**
   * Opens a bare wsmux stream (SYN), without the gateway's open request:
   * for peers that speak plain wsmux. Data may be written at once (0-RTT).
   */
  openRaw(): MuxStream {
    const s = this.newStream(undefined);
    this.sendSyn(s, undefined);
    return s;
  }

  /** The next stream the peer opens (sends its ACK). Rejects when the session ends or the peer sent GOAWAY. */
  accept(): Promise<MuxStream> {
    const s = this.acceptQueue.shift();
    if (s) return Promise.resolve(this.acknowledge(s));
    if (this.error) return Promise.reject(this.error);
    if (this.goAwayRecv !== undefined) {
      return Promise.reject(new MuxError("goaway", "the peer sent GOAWAY: it opens no more streams", { code: this.goAwayRecv }));
    }
    return new Promise((resolve, reject) => this.acceptWaiters.push({ resolve, reject }));
  }

  /** GOAWAY NORMAL: neither side opens new streams; existing ones finish. */
  goaway(): void {
    if (this.goAwaySent || this.error) return;
    this.goAwaySent = true;
    this.send(encodeFrame(FrameType.GoAway, 0, 0, GoAwayCode.NORMAL));
  }

  /**
   * Ends the session now: GOAWAY NORMAL, then the WebSocket's close
   * handshake (data already written goes first). Streams not finished fail
   * with MuxError `closed`.
   */
  close(): void {
    if (this.error) return;
    this.goaway();
    this.fail(new MuxError("closed", "session closed"));
    this.closeSocket();
  }

  // ------------------------------------------------------------- opening

  private newStream(destination: string | undefined): MuxStream {
    if (this.error) throw this.error;
    if (this.goAwaySent || this.goAwayRecv !== undefined) {
      throw new MuxError("goaway", this.goAwaySent ? "this side sent GOAWAY" : "the peer sent GOAWAY", {
        code: this.goAwayRecv ?? GoAwayCode.NORMAL,
      });
    }
    if (this.streams.size >= this.maxStreams) throw new MuxError("limit", `too many streams (${this.maxStreams})`);
    if (this.memory + this.window > this.maxMemory) throw new MuxError("limit", "session memory limit reached");
    if (this.nextId > 0xffffffff) throw new MuxError("limit", "stream ids used up");
    const id = this.nextId;
    this.nextId += 2;
    const s = new MuxStream(this, id, {
      sendCredit: INITIAL_WINDOW,
      window: this.window,
      baseWindow: this.window,
      destination,
      writableHighWaterMark: this.writableHighWaterMark,
    });
    this.streams.set(id, s);
    this.memory += this.window;
    return s;
  }

  /** SYN: the extra window on a WINDOW_UPDATE, or the first bytes on a DATA. */
  private sendSyn(s: MuxStream, first: Uint8Array | undefined): void {
    const extra = this.window - INITIAL_WINDOW;
    if (first && extra === 0) {
      s._useCredit(first.byteLength);
      this.send(encodeFrame(FrameType.Data, Flag.Syn, s.id, 0, first));
      return;
    }
    this.send(encodeFrame(FrameType.WindowUpdate, Flag.Syn, s.id, extra));
    if (first) {
      s._useCredit(first.byteLength);
      this.send(encodeFrame(FrameType.Data, 0, s.id, 0, first));
    }
  }

  private acknowledge(s: MuxStream): MuxStream {
    // Also after the opener's FIN; not after its RST (§3.2).
    if (!s._isReset() && !this.error) {
      let extra = this.window - INITIAL_WINDOW;
      if (this.memory + extra > this.maxMemory) extra = 0;
      this.memory += extra;
      s._grant(extra);
      this.send(encodeFrame(FrameType.WindowUpdate, Flag.Ack, s.id, extra));
    }
    return s;
  }

  // ------------------------------------------------------------- sending

  private send(buf: Uint8Array): void {
    if (this.pending) {
      if (this.socket.readyState === CONNECTING) {
        this.pending.push(buf);
        return;
      }
      this.flushPending();
    }
    if (this.socket.readyState === OPEN) {
      this.cork();
      this.socket.send(buf);
    }
  }

  /**
   * Where the WebSocket is the `ws` package's, the frames sent in one turn
   * of the event loop after its first leave in one write (its socket is
   * corked until setImmediate): one system call for many frames. The turn's
   * first frame goes at once, so a lone frame (a ping-pong's) does not wait
   * for the end of the turn.
   */
  private cork(): void {
    const t = this.transport;
    if (this.corked || !t) return;
    if (!this.sentThisTurn) {
      this.sentThisTurn = true;
      t.setImmediate(this.uncork);
      return;
    }
    this.corked = true;
    t.cork();
  }

  private readonly uncork = (): void => {
    this.sentThisTurn = false;
    if (!this.corked) return;
    this.corked = false;
    this.transport!.uncork();
  };

  private flushPending(): void {
    const p = this.pending;
    this.pending = undefined;
    if (p && this.socket.readyState === OPEN) for (const b of p) this.socket.send(b);
  }

  /** @internal A control frame (WINDOW_UPDATE, RST, FIN): never waits. */
  _sendControl(buf: Uint8Array): void {
    this.send(buf);
  }

  /** @internal A DATA frame without payload (FIN). */
  _sendData(buf: Uint8Array): void {
    this.send(buf);
  }

  /**
   * @internal A DATA frame carrying `payload`, for `MuxStream._sendFrame()`
   * while `_canSend()`. Frame buffers are reused: the WHATWG WebSocket
   * copies what send() is given at once (WebIDL "get a copy of the
   * bytes"), so a buffer is free again when send() returns; the `ws`
   * package may hold it until the frame reaches the kernel, and says so in
   * its send callback. Allocating 64 KiB per frame instead cost a fifth of
   * the CPU of a bulk transfer in garbage collection (bench/ts, in-process
   * profile).
   */
  _sendPayload(id: number, payload: Uint8Array): void {
    if (this.socket.readyState !== OPEN) return;
    this.cork();
    let f = payload.byteLength < POOLED_FROM ? undefined : this.framePool.pop();
    if (!f && payload.byteLength < MAX_PAYLOAD) {
      // Small frames are cheaper to allocate than to pool, and so are
      // partial ones when the pool is dry (a new pooled buffer is 64 KiB,
      // zero-filled: a hundred streams ending with 15 KiB each took
      // sixty of them per run in bench/ts).
      const msg = encodeFrame(FrameType.Data, 0, id, 0, payload);
      if (this.sendCallbacks) this.socket.send(msg, undefined, this.onFlushed);
      else this.socket.send(msg);
      return;
    }
    f ??= this.newPooledFrame();
    const msg = encodeDataInto(f.buf, 0, id, payload);
    if (this.sendCallbacks) {
      this.socket.send(msg, undefined, f.release);
    } else {
      this.socket.send(msg);
      if (this.framePool.length < POOL_MAX) this.framePool.push(f);
    }
  }

  private newPooledFrame(): PooledFrame {
    const f: PooledFrame = {
      buf: new Uint8Array(FRAME_BUF),
      release: () => {
        if (this.framePool.length < POOL_MAX) this.framePool.push(f);
        this.pumpSoon();
      },
    };
    return f;
  }

  /** @internal Whether the WebSocket's buffer is under the send high-water mark. */
  _canSend(): boolean {
    return this.socket.bufferedAmount <= this.sendHighWaterMark && !this.pending;
  }

  /**
   * @internal A stream's write came in: its frames go out now while there
   * is room and nobody waits before it; true when all of it is out. Else
   * the stream waits in the send queue (or for credit, see `_resume()`).
   */
  _write(s: MuxStream): boolean {
    if (this.error) throw this.error;
    if (this.sendHead === this.sendQueue.length) {
      while (this._canSend()) {
        const r = s._sendFrame();
        if (r === SENT_ALL) return true;
        if (r === SENT_WAIT) return false;
      }
    }
    this.enqueue(s);
    return false;
  }

  /** @internal Credit came for a stream whose write waited for it. */
  _resume(s: MuxStream): void {
    this.enqueue(s);
    this.pump();
  }

  private enqueue(s: MuxStream): void {
    if (s._queued || this.error) return;
    s._queued = true;
    this.sendQueue.push(s);
    this.pollDrain();
  }

  /**
   * Sends while there is room: the queued streams take turns, one frame
   * each, so that a hundred busy streams share the socket evenly. Runs on
   * every send callback (the `ws` package), on credit, and on a timer
   * while streams wait (browsers' WebSocket has no drain event).
   */
  private pump(): void {
    if (this.pumping) return;
    this.pumping = true;
    const q = this.sendQueue;
    while (this.sendHead < q.length && this._canSend()) {
      const s = q[this.sendHead]!;
      q[this.sendHead++] = undefined;
      s._queued = false;
      if (s._sendFrame() === SENT_MORE) {
        s._queued = true;
        q.push(s);
      }
    }
    if (this.sendHead === q.length) {
      q.length = 0;
      this.sendHead = 0;
    } else if (this.sendHead >= 1024) {
      q.splice(0, this.sendHead);
      this.sendHead = 0;
    }
    this.pumping = false;
    if (this.sendHead < q.length) this.pollDrain();
  }

  private pollDrain(): void {
    // Browsers' WebSocket has no drain event: poll. With send callbacks
    // (the `ws` package) the poll is only a safety net.
    if (this.drainTimer === undefined) this.drainTimer = setTimeout(this.drainCheck, this.sendCallbacks ? 4 : 1);
  }

  private readonly drainCheck = (): void => {
    this.drainTimer = undefined;
    this.pump();
  };

  private readonly onFlushed = (): void => {
    this.pumpSoon();
  };

  /**
   * Pumps once the current callbacks are done: the `ws` package calls the
   * send callbacks of one write of the socket (up to the high-water mark,
   * sixteen 64 KiB frames) one after the other; pumping at the first would
   * refill the socket before the other fifteen buffers are back in the
   * pool, and allocate fifteen new ones (a hundred per 64 MiB at 100
   * streams in bench/ts).
   */
  private pumpSoon(): void {
    if (this.pumpQueued) return;
    this.pumpQueued = true;
    queueMicrotask(this.pumpQueuedNow);
  }

  private readonly pumpQueuedNow = (): void => {
    this.pumpQueued = false;
    this.pump();
  };

  /** @internal */
  _failed(): boolean {
    return this.error !== undefined;
  }

  // ---------------------------------------------------------- flow control

  /**
   * @internal Growth for a window about to be credited `sinceLast` ms after
   * its previous update (§4.3): double it when that was within two round
   * trips, within the maximum and the session caps.
   */
  _growWindow(window: number, sinceLast: number): number {
    if (this.rttMs === undefined || window >= this.maxWindow || sinceLast >= 2 * Math.max(this.rttMs, 0.05)) return 0;
    const grow = Math.min(window, this.maxWindow - window);
    if (this.memory + grow > this.maxMemory || this.grown + grow > this.maxMemory / 2) return 0;
    this.memory += grow;
    this.grown += grow;
    return grow;
  }

  /** @internal The stream closed (FIN both ways or RST): frames for it are ignored from now on. */
  _release(s: MuxStream): void {
    if (this.streams.get(s.id) !== s) return;
    this.streams.delete(s.id);
    this.memory -= s.highWaterMark;
    this.grown -= s.highWaterMark - s._baseWindow();
  }

  // ------------------------------------------------------------ receiving

  /** One WebSocket message: its bytes (a Uint8Array, Buffer or ArrayBuffer), or a string for a text message. */
  private onMessage(raw: unknown): void {
    if (this.error) return;
    if (this.keepaliveInterval !== undefined) this.lastRecv = now();
    let data: Uint8Array;
    if (raw instanceof Uint8Array) {
      data = raw;
    } else if (typeof raw === "string") {
      return this.protocolError(GoAwayCode.TEXT_MESSAGE, "text message");
    } else {
      let d;
      try {
        d = messageData(raw);
      } catch (e) {
        return this.protocolError(GoAwayCode.PROTOCOL_ERROR, (e as Error).message);
      }
      if (typeof d === "string") return this.protocolError(GoAwayCode.TEXT_MESSAGE, "text message");
      data = d;
    }
    // The bulk of the traffic, DATA and WINDOW_UPDATE without flags for a
    // stream that is open: checked and delivered without decoding into a
    // Frame (one view for the payload, nothing else allocated). Anything
    // else takes the general path below, which checks every rule.
    const len = data.byteLength;
    if (len >= 12 && data[0] === 1 && (data[2]! | data[3]!) === 0) {
      const type = data[1];
      const s = this.streams.get(((data[4]! << 24) | (data[5]! << 16) | (data[6]! << 8) | data[7]!) >>> 0);
      if (type === FrameType.Data && s && len > 12 && len <= 12 + MAX_PAYLOAD && !s._isFinRecv()) {
        if ((data[8]! | data[9]! | data[10]! | data[11]!) === 0) {
          if (!s._takeCredit(len - 12)) {
            return this.protocolError(GoAwayCode.FLOW_CONTROL_ERROR, `stream ${s.id} sent beyond its credit`);
          }
          s._onData(new Uint8Array(data.buffer, data.byteOffset + 12, len - 12));
          return;
        }
      } else if (type === FrameType.WindowUpdate && s && len === 12 && !s._isFinRecv()) {
        const value = ((data[8]! << 24) | (data[9]! << 16) | (data[10]! << 8) | data[11]!) >>> 0;
        if (!s._onCredit(value)) return this.protocolError(GoAwayCode.FLOW_CONTROL_ERROR, `credit above 2^32-1 on stream ${s.id}`);
        return;
      }
    }
    // Payloads handed on are plain Uint8Arrays, not the `ws` package's Buffers.
    if (data.constructor !== Uint8Array) data = new Uint8Array(data.buffer, data.byteOffset, len);
    let f;
    try {
      f = decodeFrame(data);
    } catch (e) {
      if (e instanceof FrameError) return this.protocolError(e.code, e.message);
      throw e;
    }
    const { type, flags, id, value, payload } = f;
    if (type === FrameType.Ping) {
      if (flags === Flag.Syn) this.send(encodeFrame(FrameType.Ping, Flag.Ack, 0, value));
      else this.onPong(value);
      return;
    }
    if (type === FrameType.GoAway) return this.onGoAway(value, payload);

    if (flags & Flag.Ack && !this.isLocal(id)) {
      return this.protocolError(GoAwayCode.PROTOCOL_ERROR, `ACK from the opener of stream ${id}`);
    }
    if (flags & Flag.Syn) {
      if (this.isLocal(id) || id <= this.lastPeerId) {
        return this.protocolError(GoAwayCode.PROTOCOL_ERROR, `SYN for stream ${id}: not a new id of the peer's`);
      }
      this.lastPeerId = id;
      if (flags & Flag.Rst) return; // SYN|RST: the id is used, nothing opens (§3.2)
      if (
        this.goAwaySent ||
        this.streams.size >= this.maxStreams ||
        this.acceptQueue.length >= this.acceptBacklog ||
        this.memory + INITIAL_WINDOW > this.maxMemory
      ) {
        // Refused: one RST, and what else comes for the id is ignored.
        this.send(encodeFrame(FrameType.Data, Flag.Rst, id, ResetCode.REFUSED));
        return;
      }
      const extra = type === FrameType.WindowUpdate ? value : 0;
      const s = new MuxStream(this, id, {
        sendCredit: INITIAL_WINDOW + extra,
        window: INITIAL_WINDOW,
        baseWindow: INITIAL_WINDOW,
        writableHighWaterMark: this.writableHighWaterMark,
      });
      this.streams.set(id, s);
      this.memory += INITIAL_WINDOW;
      const w = this.acceptWaiters.shift();
      if (w) w.resolve(this.acknowledge(s));
      else this.acceptQueue.push(s);
    }
    const s = this.streams.get(id);
    if (!s) {
      const known = this.isLocal(id) ? id < this.nextId : id <= this.lastPeerId;
      if (!known) return this.protocolError(GoAwayCode.PROTOCOL_ERROR, `frame for stream ${id}, never opened`);
      return; // closed, refused or SYN|RST: ignored (§3.1)
    }
    if (s._isFinRecv() && (type === FrameType.Data ? !(flags & Flag.Rst) : flags & Flag.Fin)) {
      return this.protocolError(GoAwayCode.PROTOCOL_ERROR, `DATA or a second FIN after FIN on stream ${id}`);
    }
    if (type === FrameType.WindowUpdate && !(flags & Flag.Syn)) {
      if (!s._onCredit(value)) return this.protocolError(GoAwayCode.FLOW_CONTROL_ERROR, `credit above 2^32-1 on stream ${id}`);
    }
    if (type === FrameType.Data && payload.byteLength) {
      if (!s._takeCredit(payload.byteLength)) {
        return this.protocolError(GoAwayCode.FLOW_CONTROL_ERROR, `stream ${id} sent beyond its credit`);
      }
      s._onData(payload);
    }
    if (flags & Flag.Fin) s._onFin();
    if (flags & Flag.Rst) s._onReset(value);
  }

  private isLocal(id: number): boolean {
    return (id % 2 === 1) === this.client;
  }

  private onGoAway(code: number, payload: Uint8Array): void {
    this.goAwayRecv = code;
    const reason = new TextDecoder().decode(payload);
    if (code === GoAwayCode.NORMAL) {
      const err = new MuxError("goaway", "the peer sent GOAWAY: it opens no more streams", { code });
      const w = this.acceptWaiters;
      this.acceptWaiters = [];
      for (const x of w) x.reject(err);
      return;
    }
    this.fail(new MuxError("goaway", `the peer sent GOAWAY ${goAwayName(code)}${reason ? `: ${reason}` : ""}`, { code }));
    this.closeSocket();
  }

  /** Sends GOAWAY `code`, fails everything, closes the WebSocket (§6, §7). */
  private protocolError(code: number, reason: string): void {
    const r = new TextEncoder().encode(reason).subarray(0, MAX_REASON);
    this.send(encodeFrame(FrameType.GoAway, 0, 0, code, r));
    this.fail(new MuxError(code === GoAwayCode.KEEPALIVE_TIMEOUT ? "keepalive" : "protocol", `${goAwayName(code)}: ${reason}`, { code }));
    this.closeSocket();
  }

  private closeSocket(): void {
    try {
      // Browsers allow only 1000 and 3000-4999; the GOAWAY carries the code.
      this.socket.close(1000);
    } catch {
      // already closing
    }
  }

  /** Ends the session with `err`: every unfinished stream and waiter fails with it. */
  private fail(err: MuxError): void {
    if (this.error) return;
    this.error = err;
    if (this.timer !== undefined) clearTimeout(this.timer);
    for (const s of this.sendQueue) if (s) s._queued = false;
    this.sendQueue = [];
    this.sendHead = 0;
    if (this.drainTimer !== undefined) clearTimeout(this.drainTimer);
    this.drainTimer = undefined;
    for (const s of [...this.streams.values()]) s._onSessionError(err);
    this.streams.clear();
    const w = this.acceptWaiters;
    this.acceptWaiters = [];
    for (const x of w) x.reject(err);
    this.resolveClosed(err);
  }

  // ------------------------------------------------------------ keepalive

  private start(): void {
    this.transport = corkable(this.socket);
    this.flushPending();
    this.pump(); // writes made while connecting
    this.lastRecv = this.lastPong = now();
    this.sendPing(); // the first round trip, for window tuning
  }

  private sendPing(): void {
    const value = (this.pingValue = (this.pingValue + 1) >>> 0);
    this.pingOut = { value, sentAt: now() };
    this.send(encodeFrame(FrameType.Ping, Flag.Syn, 0, value));
    this.arm();
  }

  private onPong(value: number): void {
    const out = this.pingOut;
    if (!out || out.value !== value) return; // matches no outstanding request: ignored (§5)
    const t = now();
    this.rttMs = t - out.sentAt;
    this.pingOut = undefined;
    this.lastPong = t;
    this.arm();
  }

  /** Sets the one timer: the next PING, or the deadline of the one that is out. */
  private arm(): void {
    if (this.error) return;
    if (this.timer !== undefined) clearTimeout(this.timer);
    this.timer = undefined;
    let at: number;
    if (this.pingOut) {
      if (this.keepaliveInterval === undefined) return;
      at = Math.max(this.pingOut.sentAt, this.lastRecv) + this.keepaliveTimeout;
    } else {
      if (this.keepaliveInterval === undefined) return;
      at = this.lastPong + this.keepaliveInterval;
    }
    this.timer = unref(setTimeout(this.onTimer, Math.max(0, at - now())));
  }

  private readonly onTimer = (): void => {
    this.timer = undefined;
    if (this.error) return;
    const t = now();
    if (this.pingOut) {
      if (t - Math.max(this.pingOut.sentAt, this.lastRecv) >= this.keepaliveTimeout) {
        return this.protocolError(GoAwayCode.KEEPALIVE_TIMEOUT, `no answer to PING and nothing received for ${this.keepaliveTimeout} ms`);
      }
      this.arm(); // something arrived meanwhile: the deadline moved
    } else if (t - this.lastPong >= (this.keepaliveInterval ?? Infinity)) {
      this.sendPing();
    } else {
      this.arm();
    }
  };
}
