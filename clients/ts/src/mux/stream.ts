// One wsmux stream as a pair of WHATWG streams (docs/mux.md §3, §4).
//
// Receiving: DATA goes into this stream's queue; the ReadableStream has a
// high-water mark of 0, so its pull() runs only while a read is waiting,
// and only then is a chunk handed over. Handing over is what "consumed"
// means for credit (§4.2): once half the window is consumed and not yet
// credited, one WINDOW_UPDATE credits all of it. A reader that stops
// therefore stops the credit, and the peer's sender stops after at most
// one window: the queue never holds more than the window (the stream's
// `highWaterMark`), and no other stream is touched.
//
// Sending: the WritableStream's write() hands its chunk to the session,
// which cuts it into DATA frames of at most its frame size and never beyond
// the credit. While the WebSocket's bufferedAmount is above the session's
// send high-water mark, the streams that have something to send wait in the
// session's queue and take turns, one frame each; a stream without credit
// leaves the queue until a WINDOW_UPDATE. The write resolves when its last
// frame is out (at once when there was room). close() sends FIN
// (half-close: the readable side goes on); abort(reason) and cancel(reason)
// send RST with a code taken from the reason.

import { Flag, FrameType, ResetCode, encodeFrame } from "./frame.js";
import { MuxError, OpenRefusedError, StreamResetError } from "./errors.js";
import { decodeReply, type Reply } from "./tunnel.js";
import { toBytes } from "../websocket.js";
import type { MuxSession } from "./session.js";

/** Protocol constant: every stream starts with this much credit each way (§4.1). */
export const INITIAL_WINDOW = 256 * 1024;

/** What `_sendFrame()` did: the write is all out (or gone), */
export const SENT_ALL = 0;
/** more of it can go at its next turn, */
export const SENT_MORE = 1;
/** or it waits for credit (it queues again when a WINDOW_UPDATE comes). */
export const SENT_WAIT = 2;

/** What a writer may write: bytes, or a string (sent as UTF-8). */
export type Chunk = Uint8Array | ArrayBuffer | ArrayBufferView | string;

/** The reset code a reason for abort()/cancel() stands for. */
export function resetCodeOf(reason: unknown): number {
  if (typeof reason === "number" && Number.isInteger(reason) && reason >= 0 && reason <= 0xffffffff) return reason;
  if (reason && typeof reason === "object" && "code" in reason) {
    const c = (reason as { code: unknown }).code;
    if (typeof c === "number" && Number.isInteger(c) && c >= 0 && c <= 0xffffffff) return c;
  }
  return ResetCode.CANCEL;
}

export class MuxStream {
  /** The stream id: odd when the WebSocket client opened it, even for the server. */
  readonly id: number;
  /** The destination given to `session.open()`, if it was opened that way. */
  readonly destination: string | undefined;
  /** Received bytes; ends at the peer's FIN; errors with StreamResetError or MuxError. */
  readonly readable: ReadableStream<Uint8Array>;
  /** Bytes to send; `close()` sends FIN, `abort(reason)` RST with `reason.code` or a number (default 0). */
  readonly writable: WritableStream<Chunk>;
  /** Resolves when FIN went both ways; rejects when the stream is reset or the session fails. */
  readonly closed: Promise<void>;

  /** @internal */ readonly session: MuxSession;
  // Sending.
  private sendCredit: number;
  // The write in progress (a WritableStream hands over one chunk at a time):
  // its bytes, how far they went out, and its promise's functions, set only
  // when it had to wait.
  private out: Uint8Array | undefined;
  private outOff = 0;
  private outDone: (() => void) | undefined;
  private outFail: ((e: Error) => void) | undefined;
  private creditWait = false; // the write waits for a WINDOW_UPDATE
  /** @internal In the session's send queue. */
  _queued = false;
  private finSent = false;
  private wctl!: WritableStreamDefaultController;
  // Receiving.
  private base: number; // W before auto-tuning grew it
  private window: number; // W: what the peer may have in flight plus what we hold
  private recvCredit: number; // what the peer may still send
  private queue: Uint8Array[] = [];
  private queueHead = 0;
  private queued = 0;
  private uncredited = 0; // handed to the reader, not yet credited back
  private lastUpdate = -Infinity;
  private finRecv = false;
  private rctl!: ReadableStreamDefaultController<Uint8Array>;
  private wantData = false; // a read is waiting (pull() ran, nothing handed over since)
  private readDone = false; // the readable was closed, errored or cancelled
  private pendingError: Error | undefined; // fails the readable once the queue is drained
  // Both.
  private error: Error | undefined; // reset or session error
  private released = false;
  private resolveClosed!: () => void;
  private rejectClosed!: (e: Error) => void;
  // Open reply (session.open()): bytes collected until the reply is whole.
  private reply: { buf: Uint8Array; resolve: (r: Reply) => void; reject: (e: Error) => void } | undefined;

  /** @internal */
  constructor(
    session: MuxSession,
    id: number,
    opts: { sendCredit: number; window: number; baseWindow: number; destination?: string; writableHighWaterMark: number },
  ) {
    this.session = session;
    this.id = id;
    this.destination = opts.destination;
    this.sendCredit = opts.sendCredit;
    this.window = opts.window;
    this.recvCredit = opts.window;
    this.base = opts.baseWindow;
    this.closed = new Promise<void>((res, rej) => {
      this.resolveClosed = res;
      this.rejectClosed = rej;
    });
    this.closed.catch(() => {}); // rejections are for whoever awaits it
    this.readable = new ReadableStream<Uint8Array>(
      {
        start: (c) => {
          this.rctl = c;
        },
        pull: () => this.pull(),
        cancel: (reason) => {
          this.readDone = true;
          this.resetLocal(resetCodeOf(reason));
        },
      },
      { highWaterMark: 0 },
    );
    this.writable = new WritableStream<Chunk>(
      {
        start: (c) => {
          this.wctl = c;
        },
        write: (chunk) => this.write(chunk),
        close: () => this.finish(),
        abort: (reason) => this.resetLocal(resetCodeOf(reason)),
      },
      {
        highWaterMark: opts.writableHighWaterMark,
        size: (c: Chunk) => (typeof c === "string" ? c.length : c.byteLength),
      },
    );
  }

  /** Bytes received and not yet read: at most `highWaterMark`. */
  get bufferedAmount(): number {
    return this.queued;
  }

  /** The receive window: the most this stream buffers before its sender stops. */
  get highWaterMark(): number {
    return this.window;
  }

  /** Bytes this side may still send before it waits for a WINDOW_UPDATE. */
  get sendWindow(): number {
    return this.sendCredit;
  }

  /** Resets the stream (RST with `code`, default 0 CANCEL): both directions fail. */
  reset(code: number = ResetCode.CANCEL): void {
    this.resetLocal(code);
  }

  // ------------------------------------------------------------ sending

  /**
   * The writable's write(): no promise, no closure per frame; one promise
   * per chunk, and only when the chunk has to wait (for room in the
   * WebSocket's buffer, its turn, or credit).
   */
  private write(chunk: Chunk): Promise<void> | undefined {
    if (this.error) throw this.error;
    const bytes = toBytes(chunk);
    if (bytes.byteLength === 0) return undefined;
    this.out = bytes;
    this.outOff = 0;
    if (this.session._write(this)) return undefined;
    return new Promise<void>((resolve, reject) => {
      this.outDone = resolve;
      this.outFail = reject;
    });
  }

  /**
   * @internal Sends the next DATA frame of the write in progress: at most
   * the session's frame size and the credit. SENT_ALL when the write is
   * all out (it resolves) or there is none, SENT_MORE when more can go at
   * the next turn, SENT_WAIT when the credit is spent.
   */
  _sendFrame(): number {
    const out = this.out;
    if (!out) return SENT_ALL;
    if (this.sendCredit === 0) {
      this.creditWait = true;
      return SENT_WAIT;
    }
    const off = this.outOff;
    const n = Math.min(out.byteLength - off, this.sendCredit, this.session._maxFrame);
    this.sendCredit -= n;
    this.outOff = off + n;
    this.session._sendPayload(this.id, n === out.byteLength ? out : out.subarray(off, off + n));
    if (off + n < out.byteLength) {
      if (this.sendCredit > 0) return SENT_MORE;
      this.creditWait = true;
      return SENT_WAIT;
    }
    this.out = undefined;
    const done = this.outDone;
    this.outDone = this.outFail = undefined;
    done?.();
    return SENT_ALL;
  }

  /** The writable's close(): FIN. */
  private finish(): void {
    if (this.error) throw this.error;
    this.sendFin();
  }

  private sendFin(): void {
    if (this.finSent) return;
    this.finSent = true;
    this.session._sendData(encodeFrame(FrameType.Data, Flag.Fin, this.id, 0));
    this.maybeClosed();
  }

  /** @internal */
  _baseWindow(): number {
    return this.base;
  }

  /** @internal Extra window granted with the ACK. */
  _grant(extra: number): void {
    this.window += extra;
    this.recvCredit += extra;
    this.base += extra;
  }

  /** @internal */
  _isReset(): boolean {
    return this.error instanceof StreamResetError;
  }

  /** @internal The open request rides on the SYN (docs/tunnel.md §2). */
  _useCredit(n: number): void {
    this.sendCredit -= n;
  }

  // ---------------------------------------------------------- receiving

  private pull(): void {
    if (this.queueHead < this.queue.length) {
      const c = this.queue[this.queueHead]!;
      this.queue[this.queueHead++] = undefined as unknown as Uint8Array;
      if (this.queueHead === this.queue.length) {
        this.queue.length = 0;
        this.queueHead = 0;
      }
      this.queued -= c.byteLength;
      this.wantData = false;
      this.rctl.enqueue(c);
      this.consumed(c.byteLength);
      if (this.queued === 0) this.endReadableIfDone();
      return;
    }
    if (this.endReadableIfDone()) return;
    this.wantData = true;
  }

  /** Closes or fails the readable once everything before the FIN/RST was read. */
  private endReadableIfDone(): boolean {
    if (this.readDone || this.queued !== 0) return this.readDone;
    if (this.finRecv && !this.reply) {
      this.readDone = true;
      this.rctl.close();
      return true;
    }
    if (this.pendingError) {
      this.readDone = true;
      this.rctl.error(this.pendingError);
      return true;
    }
    return false;
  }

  /** Credits what the reader took once half the window is uncredited (§4.2). */
  private consumed(n: number): void {
    this.uncredited += n;
    if (this.finRecv || this.error || this.uncredited < this.window / 2) return;
    let delta = this.uncredited;
    this.uncredited = 0;
    const now = performance.now();
    const grow = this.session._growWindow(this.window, now - this.lastUpdate);
    this.lastUpdate = now;
    this.window += grow;
    delta += grow;
    this.recvCredit += delta;
    this.session._sendControl(encodeFrame(FrameType.WindowUpdate, 0, this.id, delta));
  }

  /** @internal */
  _onData(payload: Uint8Array): void {
    if (this.reply) {
      this.collectReply(payload);
      return;
    }
    if (this.readDone) {
      // Cancelled: the RST is out; nothing more is read.
      return;
    }
    if (this.wantData) {
      this.wantData = false;
      this.rctl.enqueue(payload);
      this.consumed(payload.byteLength);
      return;
    }
    this.queue.push(payload);
    this.queued += payload.byteLength;
  }

  /** @internal Credit check is the session's; returns false when the peer overran. */
  _takeCredit(n: number): boolean {
    if (n > this.recvCredit) return false;
    this.recvCredit -= n;
    return true;
  }

  /** @internal */
  _isFinRecv(): boolean {
    return this.finRecv;
  }

  /** @internal */
  _isClosed(): boolean {
    return this.error !== undefined || (this.finSent && this.finRecv);
  }

  /** @internal */
  _onFin(): void {
    this.finRecv = true;
    if (this.reply) {
      this.failReply(new MuxError("protocol", `stream ${this.id} ended before its open reply`));
      return;
    }
    if (this.wantData) this.endReadableIfDone();
    this.maybeClosed();
  }

  /** @internal */
  _onCredit(delta: number): boolean {
    if (this.sendCredit + delta > 0xffffffff) return false;
    this.sendCredit += delta;
    if (this.creditWait && delta > 0) {
      this.creditWait = false;
      this.session._resume(this);
    }
    return true;
  }

  /** @internal The peer reset the stream. */
  _onReset(code: number): void {
    this.fail(new StreamResetError(this.id, code, true));
  }

  /** @internal The session failed. */
  _onSessionError(err: MuxError): void {
    if (this.finSent && this.finRecv) return;
    this.fail(err);
  }

  private fail(err: Error): void {
    if (this.error) return;
    this.error = err;
    if (this.reply) this.failReply(err);
    if (!this.finSent) this.wctl.error(err);
    const outFail = this.outFail;
    this.out = undefined;
    this.outDone = this.outFail = undefined;
    this.creditWait = false;
    outFail?.(err);
    if (!this.finRecv) {
      // What arrived before the RST stays readable (§3.4).
      this.pendingError = err;
      if (this.queued === 0 && !this.readDone) {
        this.readDone = true;
        this.rctl.error(err);
      }
    }
    this.rejectClosed(err);
    this.release();
  }

  /** RST from this side: abort(), cancel(), reset(). */
  private resetLocal(code: number): void {
    if (this.error || (this.finSent && this.finRecv)) return;
    const err = new StreamResetError(this.id, code, false);
    if (!this.session._failed()) this.session._sendControl(encodeFrame(FrameType.Data, Flag.Rst, this.id, code));
    this.queue.length = 0;
    this.queueHead = 0;
    this.queued = 0;
    this.fail(err);
  }

  private maybeClosed(): void {
    if (this.finSent && this.finRecv && !this.error) {
      this.resolveClosed();
      this.release();
    }
  }

  private release(): void {
    if (this.released) return;
    this.released = true;
    this.session._release(this);
  }

  // ------------------------------------------------------- open reply

  /** @internal Resolves with the open reply (docs/tunnel.md §3). */
  _awaitReply(): Promise<Reply> {
    return new Promise<Reply>((resolve, reject) => {
      this.reply = { buf: new Uint8Array(0), resolve, reject };
    });
  }

  private collectReply(payload: Uint8Array): void {
    const r = this.reply!;
    const buf = new Uint8Array(r.buf.byteLength + payload.byteLength);
    buf.set(r.buf);
    buf.set(payload, r.buf.byteLength);
    let parsed: { reply: Reply; used: number } | null;
    try {
      parsed = decodeReply(buf);
    } catch (e) {
      this.reply = undefined;
      this.resetLocal(ResetCode.INTERNAL);
      r.reject(new MuxError("protocol", `stream ${this.id}: ${(e as Error).message}`));
      return;
    }
    if (!parsed) {
      r.buf = buf;
      return;
    }
    this.reply = undefined;
    const rest = buf.subarray(parsed.used);
    if (parsed.reply.status !== 0) {
      // The gateway sends FIN after a refusal; ours ends the stream cleanly.
      this.readDone = true;
      this.rctl.close();
      this.sendFin();
      r.reject(new OpenRefusedError(this.destination ?? "", parsed.reply.status, parsed.reply.message));
      return;
    }
    // The reply was read here, not by the application: credit it at once,
    // so that the application's stream starts with its whole window (a
    // stalled reader then holds exactly `highWaterMark` bytes).
    if (!this.finRecv) {
      this.recvCredit += parsed.used;
      this.session._sendControl(encodeFrame(FrameType.WindowUpdate, 0, this.id, parsed.used));
    }
    if (rest.byteLength) this._onData(rest);
    if (this.finRecv) this.endReadableIfDone();
    r.resolve(parsed.reply);
  }

  private failReply(err: Error): void {
    const r = this.reply;
    if (!r) return;
    this.reply = undefined;
    if (!this.error) this.resetLocal(ResetCode.CANCEL);
    r.reject(err);
  }
}
