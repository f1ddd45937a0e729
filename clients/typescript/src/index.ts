// @fieldsync/client: a typed FieldSync client for Node mobile backends.
export { AuditClient, FieldSyncClient } from "./client.js";
export type { FeedOptions, ListConflictsOptions, Page, QueryEventsOptions, ResolutionName } from "./client.js";
export {
  CODE_NAMES,
  ClientError,
  ERROR_DOMAIN,
  SyncError,
  SyncPermissionDenied,
  SyncUnauthenticated,
  SyncUnavailable,
  rejection,
} from "./errors.js";
export type { Violation } from "./errors.js";
export { MemoryQueue } from "./queue.js";
export type { MutationQueue, NewMutation, Op, QueuedMutation, TextOp } from "./queue.js";
export { mutationToProto } from "./sync.js";
export type { SyncOptions, SyncReport } from "./sync.js";
export { Connection, backoffDelayMs } from "./transport.js";
export type { ConnectionOptions, TlsOptions, TokenProvider } from "./transport.js";
export { Json, fromValue, fromValues, toValue, toValues } from "./values.js";
export type { FieldValue, Fields } from "./values.js";
// The generated messages and enums, for what the wrappers above do not cover.
export * from "./gen/fieldsync/v1/common_pb.js";
export * from "./gen/fieldsync/v1/sync_pb.js";
export * from "./gen/fieldsync/v1/audit_pb.js";
