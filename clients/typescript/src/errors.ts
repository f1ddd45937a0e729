// The client's exceptions: one small tree, so a backend catches what it can act on.
//
//   ClientError                  any error this client throws on purpose
//   └── SyncError                a call failed; a queue given to `sync` is kept whole
//       ├── SyncUnavailable      unreachable or too slow after the retries
//       │                        (UNAVAILABLE, DEADLINE_EXCEEDED): try again later
//       ├── SyncUnauthenticated  no token, or the server refused it (UNAUTHENTICATED)
//       └── SyncPermissionDenied the token is valid but not allowed (PERMISSION_DENIED)
//
// A SyncError carries the gRPC status code's name (`code`, e.g. "INVALID_ARGUMENT") and,
// when the server sent a rich error (`grpc-status-details-bin`: a google.rpc.Status with
// an ErrorInfo of domain "fieldsync" and, for bad requests, BadRequest violations), its
// stable `reason` (docs/errors.md), the ErrorInfo's `metadata` and the `violations`.
import { Code, ConnectError } from "@connectrpc/connect";
import { anyUnpack } from "@bufbuild/protobuf/wkt";
import { BadRequestSchema, ErrorInfoSchema } from "./gen/google/rpc/error_details_pb.js";
import type { Status } from "./gen/google/rpc/status_pb.js";

/** The domain of every FieldSync ErrorInfo. */
export const ERROR_DOMAIN = "fieldsync";

/** gRPC status code names by number (google.rpc.Code). */
export const CODE_NAMES: readonly string[] = [
  "OK",
  "CANCELLED",
  "UNKNOWN",
  "INVALID_ARGUMENT",
  "DEADLINE_EXCEEDED",
  "NOT_FOUND",
  "ALREADY_EXISTS",
  "PERMISSION_DENIED",
  "RESOURCE_EXHAUSTED",
  "FAILED_PRECONDITION",
  "ABORTED",
  "OUT_OF_RANGE",
  "UNIMPLEMENTED",
  "INTERNAL",
  "UNAVAILABLE",
  "DATA_LOSS",
  "UNAUTHENTICATED",
];

export interface Violation {
  field: string;
  description: string;
}

export interface ErrorFields {
  code?: string | undefined;
  reason?: string | undefined;
  violations?: Violation[];
  metadata?: { [key: string]: string };
  cause?: unknown;
}

export class ClientError extends Error {
  override name = "ClientError";
}

export class SyncError extends ClientError {
  override name = "SyncError";
  /** The gRPC status code's name ("UNAVAILABLE"), when a call failed with one. */
  readonly code: string | undefined;
  /** The server's stable reason ("TOKEN_EXPIRED"), when it sent a FieldSync ErrorInfo. */
  readonly reason: string | undefined;
  /** BadRequest field violations the server sent. */
  readonly violations: Violation[];
  /** The ErrorInfo's metadata. */
  readonly metadata: { [key: string]: string };

  constructor(message: string, fields: ErrorFields = {}) {
    super(message, fields.cause === undefined ? undefined : { cause: fields.cause });
    this.code = fields.code;
    this.reason = fields.reason;
    this.violations = fields.violations ?? [];
    this.metadata = fields.metadata ?? {};
  }
}

export class SyncUnavailable extends SyncError {
  override name = "SyncUnavailable";
}

export class SyncUnauthenticated extends SyncError {
  override name = "SyncUnauthenticated";
}

export class SyncPermissionDenied extends SyncError {
  override name = "SyncPermissionDenied";
}

/** Codes that waiting can cure: a call failing with one is retried. */
export const RETRYABLE: ReadonlySet<Code> = new Set([Code.Unavailable, Code.DeadlineExceeded]);

// Node errors of a connection that broke under a call (the server died, the network
// dropped). connect-node reports a reset connection as ABORTED, the code it shares with its
// server side; for a client it is what gRPC calls UNAVAILABLE, and must be retried like it.
// A server's own ABORTED (CONFLICT_STALE) carries a grpc-status and none of these causes.
const BROKEN_CONNECTION = new Set([
  "ECONNRESET",
  "EPIPE",
  "ERR_STREAM_DESTROYED",
  "ERR_HTTP2_INVALID_STREAM",
  "ERR_HTTP2_STREAM_ERROR",
  "ERR_HTTP2_SESSION_ERROR",
  "ERR_HTTP2_GOAWAY_SESSION",
  "ERR_HTTP2_STREAM_CANCEL",
]);

function brokenConnection(err: unknown): boolean {
  for (let e: unknown = err, depth = 0; e instanceof Error && depth < 8; e = e.cause, depth++) {
    const code = (e as { code?: unknown }).code;
    if (typeof code === "string" && BROKEN_CONNECTION.has(code)) return true;
  }
  return false;
}

/** The ConnectError of a failed call, with a broken connection reported as UNAVAILABLE.
 *
 * Also CANCELLED: this client cancels a call only after it has given up on it, so a
 * CANCELLED that reaches it is the HTTP/2 session closing under the stream (Node resets
 * its streams with CANCEL when the socket dies) or a server cancelling as it stops. */
export function connectErrorOf(err: unknown): ConnectError {
  const ce = ConnectError.from(err);
  if (ce.code === Code.Canceled || (ce.code !== Code.Unavailable && ce.code !== Code.DeadlineExceeded && brokenConnection(err))) {
    return new ConnectError(ce.rawMessage, Code.Unavailable, undefined, undefined, err);
  }
  return ce;
}

interface RichError {
  reason: string | undefined;
  violations: Violation[];
  metadata: { [key: string]: string };
}

function rich(err: ConnectError): RichError {
  const info = err.findDetails(ErrorInfoSchema).find((i) => i.domain === ERROR_DOMAIN);
  const violations = err
    .findDetails(BadRequestSchema)
    .flatMap((b) => b.fieldViolations.map((v) => ({ field: v.field, description: v.description })));
  return { reason: info?.reason, violations, metadata: info ? { ...info.metadata } : {} };
}

/** The typed error for a failed call; `what` names the operation ("sync", "get records"). */
export function errorFromCall(err: unknown, what: string, server: string, attempts = 1): SyncError {
  if (err instanceof SyncError) return err;
  const ce = connectErrorOf(err);
  const { reason, violations, metadata } = rich(ce);
  const code = CODE_NAMES[ce.code] ?? String(ce.code);
  const message = ce.rawMessage;
  const tries = attempts > 1 ? ` (gave up after ${attempts} attempts)` : "";
  const fields: ErrorFields = { code, reason, violations, metadata, cause: err };
  switch (ce.code) {
    case Code.Unavailable:
      return new SyncUnavailable(`${what}: the sync server at ${server} is unreachable: ${message}${tries}`, fields);
    case Code.DeadlineExceeded:
      return new SyncUnavailable(`${what}: the server at ${server} did not answer in time${tries}`, fields);
    case Code.Unauthenticated:
      return new SyncUnauthenticated(
        `${what}: the server refused the token${reason ? ` (${reason})` : ""}: ${message}`,
        fields,
      );
    case Code.PermissionDenied:
      return new SyncPermissionDenied(`${what}: not allowed: ${message}`, fields);
    default:
      return new SyncError(`${what} failed: ${code}: ${message}`, fields);
  }
}

/** What a REJECTED mutation's `error` (a google.rpc.Status) says: code name, reason, message. */
export function rejection(status: Status | undefined): { code: string; reason: string | undefined; message: string } | undefined {
  if (status === undefined) return undefined;
  let reason: string | undefined;
  for (const detail of status.details) {
    const info = anyUnpack(detail, ErrorInfoSchema);
    if (info !== undefined && info.domain === ERROR_DOMAIN) {
      reason = info.reason;
      break;
    }
  }
  return { code: CODE_NAMES[status.code] ?? String(status.code), reason, message: status.message };
}
