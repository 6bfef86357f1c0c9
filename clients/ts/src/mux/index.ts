// The wsmux protocol on its own, frame codec included (for tests and
// tools): `import { decodeFrame } from "wsgate-client/mux"`.
export * from "./frame.js";
export * from "./errors.js";
export * from "./session.js";
export * from "./stream.js";
export * from "./tunnel.js";
