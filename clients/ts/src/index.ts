// wsgate-client: WebSockets as WHATWG streams (openStream), the wsmux
// protocol (MuxSession: many flow-controlled streams over one WebSocket,
// docs/mux.md) and a RESP (Redis) codec and client. No dependencies; the
// same build runs in browsers and in Node >= 20.

export { openStream, WebSocketCloseError } from "./stream.js";
export type { OpenStreamOptions, WebSocketDuplex, CloseInfo } from "./stream.js";
export { bearerProtocol } from "./websocket.js";
export type { WebSocketLike, WebSocketConstructor } from "./websocket.js";
export { MuxSession, MUX_PROTOCOL } from "./mux/session.js";
export type { MuxSessionOptions, MuxConnectOptions, OpenOptions } from "./mux/session.js";
export { MuxStream, INITIAL_WINDOW } from "./mux/stream.js";
export type { Chunk } from "./mux/stream.js";
export { MuxError, StreamResetError, OpenRefusedError, OpenStatus, goAwayName } from "./mux/errors.js";
export type { MuxErrorKind } from "./mux/errors.js";
export { GoAwayCode, ResetCode } from "./mux/frame.js";
export {
  RedisClient,
  RespDecoder,
  RespError,
  RespPush,
  RespVerbatim,
  RespAttributed,
  RespProtocolError,
  encodeCommand,
  encodeCommands,
  encodeResp,
  decodeResp,
} from "./resp.js";
export type { RespValue, RespArg, RespDecodeOptions, RedisClientOptions, RedisConnectOptions, Duplex } from "./resp.js";
