// A small second implementation of the wsmux wire protocol, version 1,
// written from docs/mux.md only. It runs on any WHATWG WebSocket (browsers,
// Node >= 22, or Node 20 with --experimental-websocket). It is used by the
// Rust crate's interop test and is a starting point for the browser client.
//
//   const ws = new WebSocket(url, "wsmux.v1");
//   const session = new Session(ws, { client: true });
//   await session.ready;
//   const s = session.open();
//   await s.write(bytes); s.end();
//   for (let c; (c = await s.read()) !== null; ) { ... }
//
// Limits: no auto-tuning (fixed 256 KiB windows), no keepalive of its own
// (it answers PINGs).

const VERSION = 1;
const DATA = 0, WINDOW_UPDATE = 1, PING = 2, GOAWAY = 3;
const SYN = 1, ACK = 2, FIN = 4, RST = 8;
const INITIAL_WINDOW = 256 * 1024;
const MAX_PAYLOAD = 64 * 1024;

export const GoAway = {
  NORMAL: 0, PROTOCOL_ERROR: 1, UNSUPPORTED_VERSION: 2, TEXT_MESSAGE: 3,
  FLOW_CONTROL_ERROR: 4, KEEPALIVE_TIMEOUT: 5, INTERNAL_ERROR: 6,
};

function frame(type, flags, id, value, payload) {
  const len = payload ? payload.length : 0;
  const buf = new Uint8Array(12 + len);
  const dv = new DataView(buf.buffer);
  dv.setUint8(0, VERSION);
  dv.setUint8(1, type);
  dv.setUint16(2, flags);
  dv.setUint32(4, id);
  dv.setUint32(8, value);
  if (len) buf.set(payload, 12);
  return buf;
}

class Waiter {
  constructor() { this.list = []; }
  wait() { return new Promise((r) => this.list.push(r)); }
  wake() { const l = this.list; this.list = []; for (const r of l) r(); }
}

export class MuxStream {
  constructor(session, id, sendCredit) {
    this.session = session;
    this.id = id;
    this.sendCredit = sendCredit;
    this.recvCredit = INITIAL_WINDOW; // what the peer may still send
    this.window = INITIAL_WINDOW;
    this.chunks = [];
    this.buffered = 0;
    this.finRecv = false;
    this.finSent = false;
    this.reset = null; // reset code once RST arrived
    this.readable = new Waiter();
    this.writable = new Waiter();
  }

  /** Write all of `bytes`, waiting for credit as needed. */
  async write(bytes) {
    let off = 0;
    while (off < bytes.length) {
      this._check();
      if (this.sendCredit === 0) { await this.writable.wait(); continue; }
      const n = Math.min(bytes.length - off, this.sendCredit, MAX_PAYLOAD);
      this.sendCredit -= n;
      this.session._send(frame(DATA, 0, this.id, 0, bytes.subarray(off, off + n)));
      off += n;
    }
  }

  /** Half-close: FIN. Reading goes on until the peer's FIN. */
  end() {
    if (this.finSent) return;
    this.finSent = true;
    this.session._send(frame(DATA, FIN, this.id, 0));
  }

  /** Abort with a code (RST). */
  abort(code = 0) {
    this.session._send(frame(DATA, RST, this.id, code));
    this.session.streams.delete(this.id);
  }

  // Closed (§3.5): FIN both ways, or reset. Frames for it are ignored.
  _closed() {
    return this.reset !== null || (this.finSent && this.finRecv);
  }

  /** Next chunk of data, or null at end of stream. Throws on reset. */
  async read() {
    for (;;) {
      if (this.chunks.length) {
        const c = this.chunks.shift();
        this.buffered -= c.length;
        this._consumed();
        return c;
      }
      if (this.finRecv) return null;
      if (this.reset !== null) throw new Error(`stream reset by peer with code ${this.reset}`);
      if (this.session.error) throw this.session.error;
      await this.readable.wait();
    }
  }

  _check() {
    if (this.reset !== null) throw new Error(`stream reset by peer with code ${this.reset}`);
    if (this.session.error) throw this.session.error;
    if (this.finSent) throw new Error("write after end");
  }

  // Credit back what was read once half the window is uncredited (§4.2).
  _consumed() {
    if (this.finRecv || this.reset !== null) return;
    const uncredited = this.window - this.recvCredit - this.buffered;
    if (uncredited >= this.window / 2) {
      this.recvCredit += uncredited;
      this.session._send(frame(WINDOW_UPDATE, 0, this.id, uncredited));
    }
  }
}

export class Session {
  constructor(ws, { client = true } = {}) {
    this.ws = ws;
    this.client = client;
    this.nextId = client ? 1 : 2;
    this.lastPeerId = 0;
    this.streams = new Map();
    this.acceptQueue = [];
    this.acceptable = new Waiter();
    this.error = null;
    this.peerGoAway = null;
    ws.binaryType = "arraybuffer";
    this.ready = new Promise((resolve, reject) => {
      if (ws.readyState === 1) resolve();
      ws.addEventListener("open", () => resolve());
      ws.addEventListener("error", (e) => reject(new Error("websocket error")));
    });
    ws.addEventListener("message", (ev) => this._onMessage(ev.data));
    ws.addEventListener("close", () => this._fail(new Error("transport closed")));
  }

  /** Open a stream (SYN); data may be written at once. */
  open() {
    const id = this.nextId;
    this.nextId += 2;
    const s = new MuxStream(this, id, INITIAL_WINDOW);
    this.streams.set(id, s);
    this._send(frame(WINDOW_UPDATE, SYN, id, 0));
    return s;
  }

  /** Next stream opened by the peer (sends ACK). */
  async accept() {
    for (;;) {
      if (this.acceptQueue.length) {
        const s = this.acceptQueue.shift();
        // Also after the opener's FIN; not after its RST (§3.2).
        if (s.reset === null) this._send(frame(WINDOW_UPDATE, ACK, s.id, 0));
        return s;
      }
      if (this.error) throw this.error;
      await this.acceptable.wait();
    }
  }

  /** GOAWAY NORMAL, then close the WebSocket. */
  close() {
    this._send(frame(GOAWAY, 0, 0, GoAway.NORMAL));
    this.ws.close(1000);
  }

  _send(buf) {
    if (this.ws.readyState === 1) this.ws.send(buf);
  }

  _fail(err) {
    if (this.error) return;
    this.error = err;
    for (const s of this.streams.values()) { s.readable.wake(); s.writable.wake(); }
    this.acceptable.wake();
  }

  _protocolError(code, reason) {
    const r = new TextEncoder().encode(reason).subarray(0, 1024);
    this._send(frame(GOAWAY, 0, 0, code, r));
    this._fail(new Error(`protocol error ${code}: ${reason}`));
    this.ws.close(1002);
  }

  _isLocal(id) { return (id % 2 === 1) === this.client; }

  _onMessage(data) {
    if (this.error) return;
    if (typeof data === "string") return this._protocolError(GoAway.TEXT_MESSAGE, "text message");
    const buf = new Uint8Array(data);
    if (buf.length >= 1 && buf[0] !== VERSION) {
      return this._protocolError(GoAway.UNSUPPORTED_VERSION, `version ${buf[0]}`);
    }
    if (buf.length < 12) return this._protocolError(GoAway.PROTOCOL_ERROR, "short frame");
    const dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
    const type = dv.getUint8(1), flags = dv.getUint16(2), id = dv.getUint32(4), value = dv.getUint32(8);
    const payload = buf.subarray(12);
    if (flags & ~0xf) return this._protocolError(GoAway.PROTOCOL_ERROR, "unknown flags");
    switch (type) {
      case PING:
        if (id !== 0 || payload.length || (flags !== SYN && flags !== ACK)) {
          return this._protocolError(GoAway.PROTOCOL_ERROR, "bad PING");
        }
        if (flags === SYN) this._send(frame(PING, ACK, 0, value));
        return;
      case GOAWAY:
        if (id !== 0 || flags) return this._protocolError(GoAway.PROTOCOL_ERROR, "bad GOAWAY");
        this.peerGoAway = value;
        if (value !== GoAway.NORMAL) {
          this._fail(new Error(`peer GOAWAY ${value}: ${new TextDecoder().decode(payload)}`));
        }
        return;
      case DATA:
      case WINDOW_UPDATE:
        break;
      default:
        return this._protocolError(GoAway.PROTOCOL_ERROR, `unknown type ${type}`);
    }
    if (id === 0 || ((flags & SYN) && (flags & ACK))) {
      return this._protocolError(GoAway.PROTOCOL_ERROR, "bad stream frame");
    }
    if (type === WINDOW_UPDATE && ((flags & RST) || payload.length)) {
      return this._protocolError(GoAway.PROTOCOL_ERROR, "bad WINDOW_UPDATE");
    }
    if (type === DATA && (flags & RST ? payload.length !== 0 : value !== 0)) {
      return this._protocolError(GoAway.PROTOCOL_ERROR, "bad DATA");
    }
    if (payload.length > MAX_PAYLOAD) return this._protocolError(GoAway.PROTOCOL_ERROR, "DATA too large");
    if ((flags & ACK) && !this._isLocal(id)) {
      return this._protocolError(GoAway.PROTOCOL_ERROR, "ACK from the stream's opener");
    }

    if (flags & SYN) {
      if (this._isLocal(id) || id <= this.lastPeerId) {
        return this._protocolError(GoAway.PROTOCOL_ERROR, "bad SYN");
      }
      this.lastPeerId = id;
      if (flags & RST) return; // SYN|RST: the id is used, nothing opens (§3.2)
      const extra = type === WINDOW_UPDATE ? value : 0;
      const s = new MuxStream(this, id, INITIAL_WINDOW + extra);
      this.streams.set(id, s);
      this.acceptQueue.push(s);
      this.acceptable.wake();
    }
    const s = this.streams.get(id);
    if (!s) {
      const known = this._isLocal(id) ? id < this.nextId : id <= this.lastPeerId;
      if (!known) return this._protocolError(GoAway.PROTOCOL_ERROR, "frame for unopened stream");
      return; // closed stream: ignore
    }
    if (s._closed()) return; // FIN both ways or reset: ignore (§3.1)
    if (s.finRecv && (type === DATA ? !(flags & RST) : flags & FIN)) {
      return this._protocolError(GoAway.PROTOCOL_ERROR, "DATA or second FIN after FIN");
    }
    if (type === WINDOW_UPDATE && !(flags & SYN)) {
      s.sendCredit += value;
      s.writable.wake();
    }
    if (type === DATA && payload.length) {
      if (payload.length > s.recvCredit) {
        return this._protocolError(GoAway.FLOW_CONTROL_ERROR, "credit exceeded");
      }
      s.recvCredit -= payload.length;
      s.chunks.push(payload.slice());
      s.buffered += payload.length;
    }
    if (flags & FIN) s.finRecv = true;
    if (flags & RST) { s.reset = value; s.writable.wake(); }
    s.readable.wake();
  }
}
