// RESP, the Redis protocol: commands encoded as arrays of bulk strings,
// replies decoded in RESP2 and RESP3 (https://redis.io/docs/latest/develop/reference/protocol-spec/),
// and a small client over a wsgate bridge route with `--framing resp`
// (one whole reply per WebSocket message) or any byte stream.
//
// Decoding checks, then parses (after mini-redis's Frame::check/parse): a
// reply that is not complete yet gives `null` and consumes nothing, so
// the decoder works the same whether replies arrive one per message or
// split and joined anyhow.

import { openStream, type OpenStreamOptions } from "./stream.js";
import type { Chunk } from "./mux/stream.js";

/** A decoded reply. */
export type RespValue =
  | string
  | number
  | bigint
  | boolean
  | null
  | Uint8Array
  | RespValue[]
  | Map<RespValue, RespValue>
  | Set<RespValue>
  | RespError
  | RespPush
  | RespVerbatim
  | RespAttributed;

/** An error reply (`-ERR …` or the RESP3 bulk error `!`). */
export class RespError extends Error {
  /** The first word, by convention the error's kind: `ERR`, `WRONGTYPE`, … */
  readonly code: string;
  constructor(message: string) {
    super(message);
    this.name = "RespError";
    this.code = /^\S+/.exec(message)?.[0] ?? "";
  }
}

/** An out-of-band RESP3 push (`>`): pub/sub messages, invalidations. */
export class RespPush {
  constructor(
    /** The first element as a string (`message`, `invalidate`, …). */
    readonly kind: string,
    readonly data: RespValue[],
  ) {}
}

/** A RESP3 verbatim string (`=`): its three-letter format (`txt`, `mkd`) and text. */
export class RespVerbatim {
  constructor(
    readonly format: string,
    readonly text: string,
  ) {}
  toString(): string {
    return this.text;
  }
}

/** A value with the RESP3 attributes (`|`) that preceded it (only with `attributes: true`). */
export class RespAttributed {
  constructor(
    readonly attributes: Map<RespValue, RespValue>,
    readonly value: RespValue,
  ) {}
}

/** A reply that breaks the protocol: the connection cannot be trusted further. */
export class RespProtocolError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "RespProtocolError";
  }
}

export interface RespDecodeOptions {
  /** Bulk strings as Uint8Array (binary safe) instead of UTF-8 strings. Default false. */
  binary?: boolean;
  /** Keep attributes (RespAttributed) instead of skipping them. Default false (the spec's advice). */
  attributes?: boolean;
  /** Deepest nesting of aggregates. Default 128. */
  maxDepth?: number;
  /** Longest bulk string or aggregate count. Default 512 MiB (Redis's proto-max-bulk-len). */
  maxLength?: number;
}

// ------------------------------------------------------------------ encode

const encoder = new TextEncoder();
const decoder = new TextDecoder();

/** An argument of a command. */
export type RespArg = string | number | bigint | Uint8Array;

function argBytes(a: RespArg): Uint8Array {
  if (a instanceof Uint8Array) return a;
  if (typeof a === "string") return encoder.encode(a);
  if (typeof a === "number" || typeof a === "bigint") return encoder.encode(String(a));
  throw new TypeError("command arguments are strings, numbers, bigints or Uint8Arrays");
}

/** One command as a RESP array of bulk strings: `encodeCommand(["SET", "k", "v"])`. */
export function encodeCommand(args: readonly RespArg[]): Uint8Array {
  return encodeCommands([args]);
}

/** Several commands back to back (a pipeline) in one buffer. */
export function encodeCommands(commands: readonly (readonly RespArg[])[]): Uint8Array {
  const parts: Uint8Array[] = [];
  let n = 0;
  for (const args of commands) {
    if (!args.length) throw new TypeError("a command needs at least its name");
    const head = encoder.encode(`*${args.length}\r\n`);
    parts.push(head);
    n += head.byteLength;
    for (const a of args) {
      const b = argBytes(a);
      const h = encoder.encode(`$${b.byteLength}\r\n`);
      parts.push(h, b, CRLF);
      n += h.byteLength + b.byteLength + 2;
    }
  }
  return concat(parts, n);
}

const CRLF = new Uint8Array([13, 10]);

function concat(parts: Uint8Array[], n: number): Uint8Array {
  const out = new Uint8Array(n);
  let o = 0;
  for (const p of parts) {
    out.set(p, o);
    o += p.byteLength;
  }
  return out;
}

/**
 * Encodes a value as RESP3 (what a server sends): strings as bulk strings,
 * numbers as integers (or doubles), bigints as big numbers, Maps, Sets,
 * arrays, null, booleans, RespError, RespPush, RespVerbatim, RespAttributed.
 * For tests and for peers that serve RESP.
 */
export function encodeResp(value: RespValue): Uint8Array {
  const parts: Uint8Array[] = [];
  let n = 0;
  const text = (s: string) => {
    const b = encoder.encode(s);
    parts.push(b);
    n += b.byteLength;
  };
  const bytes = (b: Uint8Array) => {
    parts.push(b);
    n += b.byteLength;
  };
  const enc = (v: RespValue): void => {
    if (v === null) text("_\r\n");
    else if (typeof v === "boolean") text(v ? "#t\r\n" : "#f\r\n");
    else if (typeof v === "number") {
      if (Number.isInteger(v)) text(`:${v}\r\n`);
      else text(`,${Number.isNaN(v) ? "nan" : v === Infinity ? "inf" : v === -Infinity ? "-inf" : String(v)}\r\n`);
    } else if (typeof v === "bigint") text(`(${v}\r\n`);
    else if (typeof v === "string" || v instanceof Uint8Array) {
      const b = typeof v === "string" ? encoder.encode(v) : v;
      text(`$${b.byteLength}\r\n`);
      bytes(b);
      bytes(CRLF);
    } else if (v instanceof RespError) {
      const b = encoder.encode(v.message);
      text(`!${b.byteLength}\r\n`);
      bytes(b);
      bytes(CRLF);
    } else if (v instanceof RespVerbatim) {
      const b = encoder.encode(`${v.format}:${v.text}`);
      text(`=${b.byteLength}\r\n`);
      bytes(b);
      bytes(CRLF);
    } else if (v instanceof RespPush) {
      text(`>${v.data.length}\r\n`);
      for (const x of v.data) enc(x);
    } else if (v instanceof RespAttributed) {
      text(`|${v.attributes.size}\r\n`);
      for (const [k, x] of v.attributes) {
        enc(k);
        enc(x);
      }
      enc(v.value);
    } else if (Array.isArray(v)) {
      text(`*${v.length}\r\n`);
      for (const x of v) enc(x);
    } else if (v instanceof Map) {
      text(`%${v.size}\r\n`);
      for (const [k, x] of v) {
        enc(k);
        enc(x);
      }
    } else if (v instanceof Set) {
      text(`~${v.size}\r\n`);
      for (const x of v) enc(x);
    } else {
      throw new TypeError(`cannot encode ${Object.prototype.toString.call(v)} as RESP`);
    }
  };
  enc(value);
  return concat(parts, n);
}

// ------------------------------------------------------------------ decode

const INCOMPLETE: unique symbol = Symbol("incomplete");
const END: unique symbol = Symbol("end"); // `.` closing a streamed aggregate
type Parsed = RespValue | typeof INCOMPLETE | typeof END;

class Parser {
  pos = 0;
  /** After INCOMPLETE: the fewest bytes the buffer needs before a retry can succeed. */
  need = 0;
  constructor(
    readonly buf: Uint8Array,
    readonly binary: boolean,
    readonly attributes: boolean,
    readonly maxDepth: number,
    readonly maxLength: number,
  ) {}

  /** The line at `pos` (without CRLF), advancing past it; null if no CRLF yet. */
  line(): string | null {
    const b = this.buf;
    const cr = b.indexOf(13, this.pos);
    if (cr < 0 || cr + 1 >= b.byteLength) return null;
    if (b[cr + 1] !== 10) throw new RespProtocolError("CR without LF");
    const s = decoder.decode(b.subarray(this.pos, cr));
    this.pos = cr + 2;
    return s;
  }

  /** `n` bytes then CRLF; null if not all there yet. */
  blob(n: number): Uint8Array | null {
    const b = this.buf;
    if (this.pos + n + 2 > b.byteLength) {
      this.need = this.pos + n + 2;
      return null;
    }
    if (b[this.pos + n] !== 13 || b[this.pos + n + 1] !== 10) throw new RespProtocolError("bulk string without its CRLF");
    const out = b.subarray(this.pos, this.pos + n);
    this.pos += n + 2;
    return out;
  }

  length(s: string, what: string): number {
    if (!/^\d{1,15}$/.test(s)) throw new RespProtocolError(`bad ${what} length ${JSON.stringify(s)}`);
    const n = Number(s);
    if (n > this.maxLength) throw new RespProtocolError(`${what} of ${n} exceeds the limit of ${this.maxLength}`);
    return n;
  }

  str(b: Uint8Array): string | Uint8Array {
    return this.binary ? b.slice() : decoder.decode(b);
  }

  value(depth: number): Parsed {
    if (depth > this.maxDepth) throw new RespProtocolError(`nesting deeper than ${this.maxDepth}`);
    const b = this.buf;
    if (this.pos >= b.byteLength) return INCOMPLETE;
    const type = b[this.pos]!;
    this.pos++;
    const line = this.line();
    if (line === null) return INCOMPLETE;
    switch (type) {
      case 0x2b: // + simple string
        return line;
      case 0x2d: // - error
        return new RespError(line);
      case 0x3a: // : integer
        return integer(line);
      case 0x5f: // _ null
        if (line !== "") throw new RespProtocolError("null with a payload");
        return null;
      case 0x23: // # boolean
        if (line === "t") return true;
        if (line === "f") return false;
        throw new RespProtocolError(`bad boolean ${JSON.stringify(line)}`);
      case 0x2c: // , double
        return double(line);
      case 0x28: // ( big number
        if (!/^[-+]?\d+$/.test(line)) throw new RespProtocolError(`bad big number ${JSON.stringify(line)}`);
        return BigInt(line);
      case 0x2e: // . end of a streamed aggregate
        if (line !== "") throw new RespProtocolError("end marker with a payload");
        return END;
      case 0x24: // $ bulk string
      case 0x21: // ! bulk error
      case 0x3d: {
        // = verbatim string
        if (line === "-1" && type === 0x24) return null; // RESP2 null bulk string
        let data: Uint8Array | null;
        if (line === "?" && type === 0x24) {
          data = this.streamed();
          if (data === null) return INCOMPLETE;
          return this.str(data);
        }
        data = this.blob(this.length(line, "bulk string"));
        if (data === null) return INCOMPLETE;
        if (type === 0x24) return this.str(data);
        if (type === 0x21) return new RespError(decoder.decode(data));
        if (data.byteLength < 4 || data[3] !== 0x3a) throw new RespProtocolError("verbatim string without its format");
        return new RespVerbatim(decoder.decode(data.subarray(0, 3)), decoder.decode(data.subarray(4)));
      }
      case 0x2a: // * array
      case 0x7e: // ~ set
      case 0x3e: // > push
      case 0x25: // % map
      case 0x7c: {
        // | attribute
        if (line === "-1" && type === 0x2a) return null; // RESP2 null array
        const pairs = type === 0x25 || type === 0x7c;
        const streamed = line === "?" && type !== 0x7c;
        const count = streamed ? Infinity : this.length(line, "aggregate");
        const items: RespValue[] = [];
        for (let i = 0; i < (pairs ? count * 2 : count); i++) {
          const v = this.value(depth + 1);
          if (v === INCOMPLETE) return INCOMPLETE;
          if (v === END) {
            if (!streamed || (pairs && i % 2 === 1)) throw new RespProtocolError("unexpected end marker");
            break;
          }
          items.push(v);
        }
        if (type === 0x2a) return items;
        if (type === 0x7e) return new Set(items);
        if (type === 0x3e) {
          const k = items[0];
          return new RespPush(typeof k === "string" ? k : k instanceof Uint8Array ? decoder.decode(k) : "", items);
        }
        const m = new Map<RespValue, RespValue>();
        for (let i = 0; i < items.length; i += 2) m.set(items[i]!, items[i + 1]!);
        if (type === 0x25) return m;
        // Attributes describe the value that follows them.
        const next = this.value(depth);
        if (next === INCOMPLETE) return INCOMPLETE;
        if (next === END) throw new RespProtocolError("attribute before an end marker");
        return this.attributes ? new RespAttributed(m, next) : next;
      }
      default:
        throw new RespProtocolError(`unknown type byte 0x${type.toString(16)}`);
    }
  }

  /** The chunks of a streamed string (`$?`): `;N` parts until `;0`. */
  streamed(): Uint8Array | null {
    const parts: Uint8Array[] = [];
    let n = 0;
    for (;;) {
      if (this.pos >= this.buf.byteLength) return null;
      if (this.buf[this.pos] !== 0x3b) throw new RespProtocolError("streamed string part without ';'");
      this.pos++;
      const l = this.line();
      if (l === null) return null;
      const len = this.length(l, "streamed string part");
      if (len === 0) return concat(parts, n);
      const d = this.blob(len);
      if (d === null) return null;
      n += len;
      if (n > this.maxLength) throw new RespProtocolError(`streamed string over ${this.maxLength} bytes`);
      parts.push(d);
    }
  }
}

function integer(s: string): number | bigint {
  if (!/^[-+]?\d+$/.test(s)) throw new RespProtocolError(`bad integer ${JSON.stringify(s)}`);
  const n = Number(s);
  return Number.isSafeInteger(n) ? n : BigInt(s);
}

function double(s: string): number {
  switch (s.toLowerCase()) {
    case "inf":
    case "+inf":
      return Infinity;
    case "-inf":
      return -Infinity;
    case "nan":
    case "-nan":
      return NaN;
  }
  if (!/^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$/.test(s)) throw new RespProtocolError(`bad double ${JSON.stringify(s)}`);
  return Number(s);
}

/**
 * The reply at the start of `buf` and the bytes it took, or null when it is
 * not complete yet. Throws RespProtocolError on bytes that cannot be RESP.
 */
export function decodeResp(buf: Uint8Array, opts: RespDecodeOptions = {}): { value: RespValue; used: number } | null {
  const r = parseOne(buf, opts);
  return "need" in r ? null : r;
}

function parseOne(buf: Uint8Array, opts: RespDecodeOptions): { value: RespValue; used: number } | { need: number } {
  const p = new Parser(buf, opts.binary ?? false, opts.attributes ?? false, opts.maxDepth ?? 128, opts.maxLength ?? 512 * 1024 * 1024);
  const v = p.value(0);
  if (v === INCOMPLETE) return { need: Math.max(p.need, buf.byteLength + 1) };
  if (v === END) throw new RespProtocolError("end marker outside a streamed aggregate");
  return { value: v, used: p.pos };
}

/** Decodes a stream of replies from chunks of bytes, split and joined anyhow. */
export class RespDecoder {
  private chunks: Uint8Array[] = [];
  private size = 0;
  // A partial reply is parsed again only once this many bytes are held:
  // a 10 MB bulk string arriving in 64 KiB pieces is joined once, not 160
  // times.
  private need = 1;
  private readonly opts: RespDecodeOptions;
  constructor(opts: RespDecodeOptions = {}) {
    this.opts = opts;
  }

  /** Appends received bytes. */
  push(chunk: Uint8Array): void {
    if (!chunk.byteLength) return;
    this.chunks.push(chunk);
    this.size += chunk.byteLength;
  }

  /** The next whole reply, or undefined until more bytes arrive. */
  next(): { value: RespValue } | undefined {
    if (this.size < this.need) return undefined;
    const buf = this.chunks.length === 1 ? this.chunks[0]! : concat(this.chunks, this.size);
    const r = parseOne(buf, this.opts);
    if ("need" in r) {
      this.chunks = [buf];
      this.need = r.need;
      return undefined;
    }
    const rest = buf.subarray(r.used);
    this.chunks = rest.byteLength ? [rest] : [];
    this.size = rest.byteLength;
    this.need = 1;
    return { value: r.value };
  }

  /** Bytes held that do not make a whole reply yet. */
  get pending(): number {
    return this.size;
  }
}

// ------------------------------------------------------------------ client

export interface RedisClientOptions extends RespDecodeOptions {
  /** Called with every RESP3 push (pub/sub messages, invalidations). */
  onPush?: (push: RespPush) => void;
}

export interface RedisConnectOptions extends RedisClientOptions, Omit<OpenStreamOptions, "protocols"> {
  /** Subprotocols to offer. Default `["redis"]` (what `--protocol redis` routes ask for). */
  protocols?: string[];
}

/** Something with a byte (or message) readable and a writable: openStream()'s result, a mux stream. */
export interface Duplex {
  readable: ReadableStream<Uint8Array | string>;
  writable: WritableStream<Chunk>;
}

/**
 * A Redis client over a wsgate bridge route (`--framing resp`), or over any
 * duplex of byte streams (a mux stream to `tcp://redis:6379`). Replies are
 * matched to commands in order, so commands may be pipelined: call send()
 * many times without awaiting, or pipeline() to write many in one message.
 */
export class RedisClient {
  /** Resolves when the connection has ended (with the error that ended it, if any). */
  readonly closed: Promise<Error | undefined>;
  onPush: ((push: RespPush) => void) | undefined;

  private readonly writer: WritableStreamDefaultWriter<Chunk>;
  private readonly decoder: RespDecoder;
  private waiting: Array<{ resolve: (v: RespValue) => void; reject: (e: Error) => void; raw: boolean }> = [];
  private waitHead = 0;
  private error: Error | undefined;

  /** Opens a WebSocket to a `--framing resp` bridge route. */
  static async connect(url: string | URL, opts: RedisConnectOptions = {}): Promise<RedisClient> {
    const ws = await openStream(url, { ...opts, protocols: opts.protocols ?? ["redis"] });
    return new RedisClient(ws, opts);
  }

  constructor(duplex: Duplex, opts: RedisClientOptions = {}) {
    this.decoder = new RespDecoder(opts);
    this.onPush = opts.onPush;
    this.writer = duplex.writable.getWriter();
    this.writer.closed.catch(() => {});
    this.closed = this.readLoop(duplex.readable.getReader());
  }

  /** Sends one command; resolves with its reply, rejects with RespError for an error reply. */
  send(...args: RespArg[]): Promise<RespValue> {
    return this.enqueue([args], false).then((r) => r[0]!);
  }

  /**
   * Sends all `commands` in one write and resolves with their replies in
   * order; error replies are RespError values in the array, not rejections.
   */
  pipeline(commands: readonly (readonly RespArg[])[]): Promise<RespValue[]> {
    return this.enqueue(commands, true);
  }

  /** Closes the connection (after what was written). */
  async close(): Promise<void> {
    await this.writer.close().catch(() => {});
    await this.closed;
  }

  private enqueue(commands: readonly (readonly RespArg[])[], raw: boolean): Promise<RespValue[]> {
    if (this.error) return Promise.reject(this.error);
    if (!commands.length) return Promise.resolve([]);
    const bytes = encodeCommands(commands);
    const replies = commands.map(
      () =>
        new Promise<RespValue>((resolve, reject) => {
          this.waiting.push({ resolve, reject, raw });
        }),
    );
    this.writer.write(bytes).catch((e) => this.fail(e instanceof Error ? e : new Error(String(e))));
    if (raw) return Promise.allSettled(replies).then((rs) => rs.map((r) => (r.status === "fulfilled" ? r.value : rejection(r.reason))));
    return Promise.all(replies);
  }

  private async readLoop(reader: ReadableStreamDefaultReader<Uint8Array | string>): Promise<Error | undefined> {
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        this.decoder.push(typeof value === "string" ? encoder.encode(value) : value);
        for (let r = this.decoder.next(); r; r = this.decoder.next()) this.dispatch(r.value);
      }
      this.fail(new Error("the connection closed"));
      return undefined;
    } catch (e) {
      const err = e instanceof Error ? e : new Error(String(e));
      this.fail(err);
      reader.cancel(err).catch(() => {});
      return err;
    }
  }

  private dispatch(v: RespValue): void {
    if (v instanceof RespPush) {
      this.onPush?.(v);
      return;
    }
    if (this.waitHead >= this.waiting.length) throw new RespProtocolError("a reply no command asked for");
    const w = this.waiting[this.waitHead]!;
    this.waiting[this.waitHead++] = undefined as never;
    if (this.waitHead === this.waiting.length) {
      this.waiting.length = 0;
      this.waitHead = 0;
    }
    if (v instanceof RespError && !w.raw) w.reject(v);
    else w.resolve(v);
  }

  private fail(err: Error): void {
    if (this.error) return;
    this.error = err;
    const w = this.waiting.slice(this.waitHead);
    this.waiting = [];
    this.waitHead = 0;
    for (const x of w) x.reject(err);
    this.writer.abort(err).catch(() => {});
  }
}

function rejection(reason: unknown): RespValue {
  if (reason instanceof RespError) return reason;
  throw reason;
}
