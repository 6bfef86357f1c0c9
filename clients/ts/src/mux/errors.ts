// Typed errors of a mux session and its streams. Every error a stream's
// reader or writer sees is one of these three.

import { GoAwayCode } from "./frame.js";

/** Why a session ended (or refused to do something). */
export type MuxErrorKind =
  /** The peer broke docs/mux.md; we sent GOAWAY `code`. */
  | "protocol"
  /** The peer sent a GOAWAY with an error `code` (or NORMAL: no new streams). */
  | "goaway"
  /** The peer answered no PING and sent nothing for the keepalive timeout. */
  | "keepalive"
  /** The WebSocket closed or failed (`closeCode` when it closed). */
  | "transport"
  /** This side closed the session. */
  | "closed"
  /** A local limit: too many streams, session memory, stream ids used up. */
  | "limit";

const GOAWAY_NAMES = Object.fromEntries(Object.entries(GoAwayCode).map(([k, v]) => [v, k])) as Record<
  number,
  string
>;

/** The name of a GOAWAY code (`PROTOCOL_ERROR`), or `code N` for others. */
export function goAwayName(code: number): string {
  return GOAWAY_NAMES[code] ?? `code ${code}`;
}

/** A session-level failure; every stream of a failed session fails with it. */
export class MuxError extends Error {
  readonly kind: MuxErrorKind;
  /** The GOAWAY code sent or received, where there was one. */
  readonly code: number | undefined;
  /** The WebSocket close code, for `transport`. */
  readonly closeCode: number | undefined;
  constructor(kind: MuxErrorKind, message: string, opts: { code?: number; closeCode?: number; cause?: unknown } = {}) {
    super(message, opts.cause === undefined ? undefined : { cause: opts.cause });
    this.name = "MuxError";
    this.kind = kind;
    this.code = opts.code;
    this.closeCode = opts.closeCode;
  }
}

/** A stream was reset (RST), by the peer (`remote`) or by this side. */
export class StreamResetError extends Error {
  /** The reset code: 0 CANCEL, 1 REFUSED, 2 INTERNAL, others the application's. */
  readonly code: number;
  readonly remote: boolean;
  readonly streamId: number;
  constructor(streamId: number, code: number, remote: boolean) {
    super(`stream ${streamId} reset ${remote ? "by the peer" : "locally"} with code ${code}${resetSuffix(code)}`);
    this.name = "StreamResetError";
    this.streamId = streamId;
    this.code = code;
    this.remote = remote;
  }
}

function resetSuffix(code: number): string {
  switch (code) {
    case 0:
      return " (CANCEL)";
    case 1:
      return " (REFUSED)";
    case 2:
      return " (INTERNAL)";
    case 0x100:
      return " (BAD_OPEN)";
    case 0x101:
      return " (OPEN_TIMEOUT)";
    default:
      return "";
  }
}

/** The status of an open reply (docs/tunnel.md §3). */
export const OpenStatus = {
  OK: 0,
  NOT_ALLOWED: 1,
  UNREACHABLE: 2,
  TIMEOUT: 3,
  NO_AGENT: 4,
} as const;

const STATUS_NAMES = Object.fromEntries(Object.entries(OpenStatus).map(([k, v]) => [v, k])) as Record<number, string>;

/** The gateway (or an agent) refused `session.open(destination)`. */
export class OpenRefusedError extends Error {
  /** 1 NOT_ALLOWED, 2 UNREACHABLE, 3 TIMEOUT, 4 NO_AGENT, or another value. */
  readonly status: number;
  /** `NOT_ALLOWED`, … (or `status N`). */
  readonly statusName: string;
  readonly destination: string;
  /** The reply's message, as the gateway wrote it. */
  readonly reason: string;
  constructor(destination: string, status: number, reason: string) {
    const name = STATUS_NAMES[status] ?? `status ${status}`;
    super(`open ${destination} refused: ${name}${reason ? `: ${reason}` : ""}`);
    this.name = "OpenRefusedError";
    this.destination = destination;
    this.status = status;
    this.statusName = name;
    this.reason = reason;
  }
}
