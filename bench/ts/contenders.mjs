// The three contenders, client and server side, with one interface each:
//
//   connect(url, n) -> { streams: [Duplex], close() }   n streams, all opened
//   serve(ws)                                          server side of one WebSocket
//
// A Duplex has write(bytes) (resolves when the writer may go on), end()
// (half-close), and next() (resolves with the next received chunk as a
// Uint8Array, or null at the end). Every stream carries the same tiny
// protocol: the first byte says what the server does with the rest, 'S'
// (sink: count the bytes until the end, answer with one byte 'k') or 'E'
// (echo everything back).
//
// * wsmux: the wsgate-client package (clients/ts/dist), one WebSocket.
// * wsmux baseline (only with WSMUX_BASELINE=DIR, a dist/ built from an
//   earlier commit by baseline.sh): the same, from that build, to compare
//   two versions of the package in the same rounds, under the same load.
// * ws: N plain WebSockets (the `ws` package), one per stream; a stream's
//   end is a text message "end".
// * yamux: @chainsafe/libp2p-yamux over one WebSocket used as a byte
//   stream (each write of the muxer becomes one binary message), through
//   the MultiaddrConnection below, which follows @libp2p/websockets: send,
//   and report "full" while bufferedAmount is over the mark; 'drain' when
//   it is back under.

import "./polyfill.mjs";
import { resolve } from "node:path";
import { pathToFileURL } from "node:url";
import WebSocket from "ws";
import { MuxSession } from "../../clients/ts/dist/index.js";
import { yamux } from "@chainsafe/libp2p-yamux";
import { AbstractMultiaddrConnection } from "@libp2p/utils";
import { defaultLogger } from "@libp2p/logger";
import { multiaddr } from "@multiformats/multiaddr";

/** bufferedAmount above which every contender's writers wait (the package's default). */
export const SEND_HWM = 1024 * 1024;

const END = "end";

/** A queue of received chunks with a promise-based next(). */
class Inbox {
  constructor() {
    this.items = [];
    this.head = 0;
    this.waiter = null;
    this.ended = false;
  }
  push(c) {
    if (this.waiter) {
      const w = this.waiter;
      this.waiter = null;
      w(c);
    } else this.items.push(c);
  }
  end() {
    this.ended = true;
    if (this.waiter) {
      const w = this.waiter;
      this.waiter = null;
      w(null);
    }
  }
  next() {
    if (this.head < this.items.length) {
      const c = this.items[this.head++];
      if (this.head === this.items.length) {
        this.items = [];
        this.head = 0;
      }
      return Promise.resolve(c);
    }
    if (this.ended) return Promise.resolve(null);
    return new Promise((r) => (this.waiter = r));
  }
}

function openWs(url) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url, { perMessageDeflate: false });
    ws.binaryType = "nodebuffer";
    ws.once("open", () => resolve(ws));
    ws.once("error", reject);
  });
}

/**
 * send() for a `ws` socket that resolves once bufferedAmount is under the
 * mark: every send's callback (the frame reached the kernel) wakes waiters,
 * as the package does with the same socket.
 */
function sender(ws) {
  let waiters = [];
  const wake = () => {
    if (waiters.length && (ws.bufferedAmount <= SEND_HWM || ws.readyState !== 1)) {
      const w = waiters;
      waiters = [];
      for (const r of w) r();
    }
  };
  return (b) => {
    ws.send(b, wake);
    if (ws.bufferedAmount <= SEND_HWM) return undefined;
    return new Promise((r) => waiters.push(r));
  };
}

// ------------------------------------------------------------------ wsmux

/** The wsmux contender for one build of the package (its MuxSession), served at `path`. */
function wsmuxContender(name, path, MuxSession) {
  return {
    name,
    path,
    async connect(url, n) {
      const session = await MuxSession.connect(url + path, { WebSocket, keepalive: false });
      const streams = [];
      for (let i = 0; i < n; i++) {
        const s = session.openRaw();
        const w = s.writable.getWriter();
        const r = s.readable.getReader();
        streams.push({
          async write(b) {
            await w.ready;
            w.write(b).catch(() => {});
          },
          end: () => w.close(),
          next: async () => {
            const { value, done } = await r.read();
            return done ? null : value;
          },
        });
      }
      return { streams, close: () => session.close() };
    },
    serve(ws) {
      const session = new MuxSession(ws, { client: false, keepalive: false, maxStreams: 4096, acceptBacklog: 4096 });
      (async () => {
        for (;;) {
          let s;
          try {
            s = await session.accept();
          } catch {
            return;
          }
          serveStream(s).catch(() => {});
        }
      })();
      async function serveStream(s) {
        const r = s.readable.getReader();
        const w = s.writable.getWriter();
        let first = true;
        let sink = false;
        for (;;) {
          const { value, done } = await r.read();
          if (done) break;
          let c = value;
          if (first) {
            first = false;
            sink = c[0] === 0x53;
            c = c.subarray(1);
            if (!c.byteLength) continue;
          }
          if (sink) continue;
          await w.ready;
          w.write(c).catch(() => {});
        }
        if (sink) await w.write(Uint8Array.of(0x6b));
        await w.close();
      }
    },
  };
}

export const wsmux = wsmuxContender("wsmux (wsgate-client)", "/mux", MuxSession);

const baselineDir = process.env.WSMUX_BASELINE;
export const wsmuxBaseline = baselineDir
  ? wsmuxContender(
      "wsmux baseline",
      "/mux-baseline",
      (await import(pathToFileURL(resolve(baselineDir, "index.js")).href)).MuxSession,
    )
  : undefined;

// ---------------------------------------------------------- N WebSockets

export const plain = {
  name: "N WebSockets (ws)",
  async connect(url, n) {
    const sockets = await Promise.all(Array.from({ length: n }, () => openWs(url + "/ws")));
    const streams = sockets.map((ws) => {
      const send = sender(ws);
      const inbox = new Inbox();
      ws.on("message", (m, isBinary) => {
        if (isBinary) inbox.push(m);
        else inbox.end();
      });
      ws.on("close", () => inbox.end());
      return {
        write: send,
        end: () => ws.send(END),
        next: () => inbox.next(),
      };
    });
    return { streams, close: () => sockets.forEach((ws) => ws.close()) };
  },
  serve(ws) {
    let first = true;
    let sink = false;
    const send = sender(ws);
    ws.on("message", (m, isBinary) => {
      if (!isBinary) {
        // the stream's end
        if (sink) ws.send(Buffer.of(0x6b));
        ws.send(END);
        return;
      }
      let c = m;
      if (first) {
        first = false;
        sink = c[0] === 0x53;
        c = c.subarray(1);
        if (!c.length) return;
      }
      if (sink) return;
      const full = send(c);
      if (full) {
        ws.pause();
        full.then(() => ws.resume());
      }
    });
  },
};

// ------------------------------------------------------------------ yamux

let connId = 0;

/** One WebSocket as a libp2p MultiaddrConnection (a byte stream). */
class WebSocketConnection extends AbstractMultiaddrConnection {
  constructor(ws, direction) {
    const id = `${connId++}`;
    super({
      remoteAddr: multiaddr(`/ip4/127.0.0.1/tcp/${id}/ws`),
      direction,
      log: defaultLogger().forComponent(`bench:ws:${id}`),
    });
    this.ws = ws;
    this.draining = false;
    ws.on("message", (m) => {
      if (this.status === "open") this.onData(new Uint8Array(m.buffer, m.byteOffset, m.byteLength));
    });
    ws.on("close", () => this.onTransportClosed());
  }
  sendData(data) {
    const n = data.byteLength;
    this.ws.send(data.subarray(), { binary: true }, this.afterSend);
    const canSendMore = this.ws.bufferedAmount <= SEND_HWM;
    if (!canSendMore) this.draining = true;
    return { sentBytes: n, canSendMore };
  }
  afterSend = () => {
    if (this.draining && this.ws.bufferedAmount <= SEND_HWM) {
      this.draining = false;
      this.safeDispatchEvent("drain");
    } else if (this.draining) {
      setTimeout(this.afterSend, 1);
    }
  };
  sendReset() {
    this.ws.terminate();
  }
  async sendClose() {
    this.ws.close();
  }
  sendPause() {}
  sendResume() {}
}

function yamuxMuxer(ws, direction) {
  const conn = new WebSocketConnection(ws, direction);
  const muxer = yamux({ enableKeepAlive: false, maxInboundStreams: 4096, maxOutboundStreams: 4096 })().createStreamMuxer(conn);
  return { conn, muxer };
}

export const libp2pYamux = {
  name: "libp2p-yamux over 1 WebSocket",
  async connect(url, n) {
    const ws = await openWs(url + "/yamux");
    const { muxer } = yamuxMuxer(ws, "outbound");
    const streams = [];
    for (let i = 0; i < n; i++) {
      const s = await muxer.createStream();
      const inbox = new Inbox();
      s.addEventListener("message", (evt) => inbox.push(evt.data.subarray ? evt.data.subarray() : evt.data));
      s.addEventListener("remoteCloseWrite", () => inbox.end());
      s.addEventListener("close", () => inbox.end());
      streams.push({
        async write(b) {
          if (!s.send(b)) await s.onDrain();
        },
        end: () => s.close(),
        next: () => inbox.next(),
      });
    }
    return { streams, close: () => muxer.close().catch(() => {}).finally(() => ws.close()) };
  },
  serve(ws) {
    const { muxer } = yamuxMuxer(ws, "inbound");
    muxer.addEventListener("stream", (evt) => {
      const s = evt.detail;
      let first = true;
      let sink = false;
      s.addEventListener("message", (e) => {
        let c = e.data.subarray();
        if (first) {
          first = false;
          sink = c[0] === 0x53;
          c = c.subarray(1);
          if (!c.byteLength) return;
        }
        if (sink) return;
        if (!s.send(c)) {
          s.pause();
          s.onDrain().then(() => s.resume(), () => {});
        }
      });
      s.addEventListener("remoteCloseWrite", () => {
        if (sink) s.send(Uint8Array.of(0x6b));
        s.close().catch(() => {});
      });
    });
  },
};

export const CONTENDERS = [wsmux, plain, libp2pYamux, ...(wsmuxBaseline ? [wsmuxBaseline] : [])];
