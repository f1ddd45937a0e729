// `sync`: deliver a client's queue over the `Sync` stream, exactly as SPEC §3 says.
//
// Hello (with the queue's length and the client_time of its oldest write), welcome, then
// the queue in batches of `batchSize`, pipelined with at most `maxInFlight` batches sent
// and not yet answered, so the server is never idle waiting for the next one and never
// holds more. Each batch's answers go to `queue.settle` the moment they arrive, which
// drops exactly the mutations answered: a failure at any point loses nothing, and the
// next attempt resumes from what is still queued.
//
// The welcome's `last_applied_seq` says what the server already has. New delivery goes
// on from `last_applied_seq + 1`; mutations still queued at or below it were applied but
// their answers were lost (a crash, a dropped stream), so they are sent first, once, and
// come back DUPLICATE with their original outcome: that is how a conflict or a rejection
// whose answer never arrived is still learned, and why a queued mutation is dropped only
// on its result. A gap (a batch answered short) resends from the server's last applied
// sequence + 1. A stream broken by the network or a server restart (UNAVAILABLE) is
// opened again with a new hello, with backoff (transport.ts).
import { create } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import type { Client } from "@connectrpc/connect";
import {
  type BatchResult,
  type Mutation,
  MutationSchema,
  type MutationResult,
  MutationStatus,
  Op as WireOp,
  type SyncRequest,
  SyncRequestSchema,
  type SyncResponse,
  type SyncService,
  TextEditSchema,
  type TextEdit,
} from "./gen/fieldsync/v1/sync_pb.js";
import { SyncError } from "./errors.js";
import type { MutationQueue, QueuedMutation, TextOp } from "./queue.js";
import type { Connection } from "./transport.js";
import { toValues } from "./values.js";

export interface SyncOptions {
  /** The schema version the client was built against; default 0 (unknown). */
  schemaVersion?: number;
  /** Mutations per batch on the wire; default 500 (at most the server's FIELDSYNC_MAX_BATCH). */
  batchSize?: number;
  /** Batches sent and not yet answered; default 2. */
  maxInFlight?: number;
  /** Each batch's answers, after `queue.settle` took them. */
  onResults?: (results: readonly MutationResult[]) => void | Promise<void>;
}

export interface SyncReport {
  applied: number;
  merged: number;
  conflicts: number;
  rejected: number;
  duplicates: number;
  /** Results received (every attempt of this sync). */
  answered: number;
  /** The server's last applied client_seq of this client at the end. */
  lastAppliedSeq: bigint;
  /** Still queued (0 after a complete sync). */
  pending: number;
  /** Streams opened (1 unless one broke and was resumed). */
  attempts: number;
}

const OPS = { PUT: WireOp.PUT, PATCH: WireOp.PATCH, DELETE: WireOp.DELETE } as const;

function textEdit(op: TextOp): TextEdit {
  if ("retain" in op) return create(TextEditSchema, { op: { case: "retain", value: BigInt(op.retain) } });
  if ("insert" in op) return create(TextEditSchema, { op: { case: "insert", value: op.insert } });
  return create(TextEditSchema, { op: { case: "delete", value: BigInt(op.delete) } });
}

export function mutationToProto(m: QueuedMutation): Mutation {
  const textEdits: { [field: string]: { ops: TextEdit[] } } = {};
  for (const [field, ops] of Object.entries(m.textEdits ?? {})) textEdits[field] = { ops: ops.map(textEdit) };
  return create(MutationSchema, {
    mutationId: m.mutationId,
    clientSeq: m.clientSeq,
    op: OPS[m.op],
    collection: m.collection,
    recordId: m.recordId,
    fields: toValues(m.fields),
    baseVersion: m.baseVersion ?? 0n,
    ...(m.clientTime ? { clientTime: timestampFromDate(m.clientTime) } : {}),
    baseFields: toValues(m.baseFields),
    resolvesConflictId: m.resolvesConflictId ?? "",
    textEdits,
  });
}

/** An async iterable the caller pushes to: the request side of a stream. */
class Pushable<T> implements AsyncIterable<T> {
  private readonly buffered: T[] = [];
  private wake: (() => void) | undefined;
  private ended = false;

  push(item: T): void {
    this.buffered.push(item);
    this.wake?.();
  }

  end(): void {
    this.ended = true;
    this.wake?.();
  }

  async *[Symbol.asyncIterator](): AsyncIterator<T> {
    for (;;) {
      const next = this.buffered.shift();
      if (next !== undefined) {
        yield next;
        continue;
      }
      if (this.ended) return;
      await new Promise<void>((resolve) => (this.wake = resolve));
      this.wake = undefined;
    }
  }
}

function tally(report: SyncReport, results: readonly MutationResult[]): void {
  for (const r of results) {
    report.answered += 1;
    switch (r.status) {
      case MutationStatus.APPLIED:
        report.applied += 1;
        break;
      case MutationStatus.MERGED:
        report.merged += 1;
        break;
      case MutationStatus.CONFLICT:
        report.conflicts += 1;
        break;
      case MutationStatus.REJECTED:
        report.rejected += 1;
        break;
      case MutationStatus.DUPLICATE:
        report.duplicates += 1;
        break;
    }
  }
}

export async function runSync(
  conn: Connection,
  stub: Client<typeof SyncService>,
  clientId: string,
  queue: MutationQueue,
  options: SyncOptions = {},
): Promise<SyncReport> {
  const batchSize = options.batchSize ?? 500;
  const maxInFlight = options.maxInFlight ?? 2;
  if (!clientId) throw new RangeError("clientId must not be empty");
  if (!(batchSize >= 1)) throw new RangeError("batchSize must be at least 1");
  if (!(maxInFlight >= 1)) throw new RangeError("maxInFlight must be at least 1");
  const report: SyncReport = {
    applied: 0,
    merged: 0,
    conflicts: 0,
    rejected: 0,
    duplicates: 0,
    answered: 0,
    lastAppliedSeq: 0n,
    pending: 0,
    attempts: 0,
  };
  const settings = { clientId, schemaVersion: options.schemaVersion ?? 0, batchSize, maxInFlight };
  await conn.call(
    "sync",
    () => syncOnce(conn, stub, queue, settings, options.onResults, report),
    () => report.answered,
  );
  report.pending = await queue.size();
  return report;
}

interface Settings {
  clientId: string;
  schemaVersion: number;
  batchSize: number;
  maxInFlight: number;
}

async function syncOnce(
  conn: Connection,
  stub: Client<typeof SyncService>,
  queue: MutationQueue,
  s: Settings,
  onResults: SyncOptions["onResults"],
  report: SyncReport,
): Promise<void> {
  report.attempts += 1;
  const pending = await queue.size();
  const oldest = (await queue.pendingAfter(0n, 1))[0];
  const batches = Math.ceil(pending / s.batchSize);
  const requests = new Pushable<SyncRequest>();
  const abort = new AbortController();
  // Every batch gets the full timeout: a long offline queue is not cut off for being long.
  const responses = stub
    .sync(requests, {
      headers: await conn.headers(),
      signal: abort.signal,
      timeoutMs: conn.timeoutMs * (1 + batches),
    })
    [Symbol.asyncIterator]();
  const receive = async (): Promise<SyncResponse> => {
    const next = await responses.next();
    if (next.done) throw new SyncError("sync: the server ended the stream before answering every batch");
    return next.value;
  };
  let finished = false;
  try {
    requests.push(
      create(SyncRequestSchema, {
        message: {
          case: "hello",
          value: {
            clientId: s.clientId,
            schemaVersion: s.schemaVersion,
            pendingMutations: BigInt(pending),
            ...(oldest?.clientTime ? { oldestPendingTime: timestampFromDate(oldest.clientTime) } : {}),
          },
        },
      }),
    );
    const welcome = await receive();
    if (welcome.message.case !== "welcome") {
      throw new SyncError("sync: the server did not start the stream with a welcome");
    }
    report.lastAppliedSeq = welcome.message.value.lastAppliedSeq;
    // From the start of the queue: what is still queued at or below last_applied_seq was
    // applied but its answer was lost; it comes back DUPLICATE with its outcome.
    let cursor = 0n;
    let stalledAt: bigint | undefined;
    for (;;) {
      const gapAt = await deliverFrom(cursor, queue, requests, receive, s, onResults, report);
      if (gapAt === undefined) break;
      const next = (await queue.pendingAfter(gapAt, 1))[0];
      if (stalledAt === gapAt || (next !== undefined && next.clientSeq !== gapAt + 1n)) {
        throw new SyncError(
          `sync: the server has this client's mutations up to ${gapAt}, but the next one queued ` +
            `here is ${next?.clientSeq ?? "none"}: the server lost mutations it had acknowledged ` +
            "(restored from a backup?), or the queue skipped a number; the queue is kept",
        );
      }
      stalledAt = gapAt;
      cursor = gapAt;
    }
    requests.end();
    for (;;) {
      const rest = await responses.next();
      if (rest.done) break;
      if (rest.value.message.case === "result" && rest.value.message.value.results.length) {
        throw new SyncError("sync: the server answered a batch that was not sent");
      }
    }
    finished = true;
  } finally {
    if (!finished) {
      requests.end();
      abort.abort();
    }
  }
}

async function deliverFrom(
  start: bigint,
  queue: MutationQueue,
  requests: Pushable<SyncRequest>,
  receive: () => Promise<SyncResponse>,
  s: Settings,
  onResults: SyncOptions["onResults"],
  report: SyncReport,
): Promise<bigint | undefined> {
  let cursor = start;
  const inFlight: number[] = []; // the size of each batch sent, oldest first
  const sendNext = async (): Promise<boolean> => {
    const batch = await queue.pendingAfter(cursor, s.batchSize);
    if (batch.length === 0) return false;
    requests.push(
      create(SyncRequestSchema, {
        message: {
          case: "batch",
          value: { clientId: s.clientId, schemaVersion: s.schemaVersion, mutations: batch.map(mutationToProto) },
        },
      }),
    );
    inFlight.push(batch.length);
    cursor = batch[batch.length - 1]!.clientSeq;
    return true;
  };
  let gapAt: bigint | undefined;
  while (inFlight.length < s.maxInFlight && (await sendNext()));
  while (inFlight.length > 0) {
    const response = await receive();
    if (response.message.case !== "result") {
      throw new SyncError("sync: the server sent something other than a batch result");
    }
    const result: BatchResult = response.message.value;
    const sent = inFlight.shift()!;
    await queue.settle(result.results);
    tally(report, result.results);
    report.lastAppliedSeq = result.lastAppliedSeq;
    if (result.results.length < sent) {
      // A gap: the batches still in flight are answered short too; once they are in,
      // resend from the server's position.
      gapAt = result.lastAppliedSeq;
    }
    if (onResults) await onResults(result.results);
    if (gapAt === undefined) while (inFlight.length < s.maxInFlight && (await sendNext()));
  }
  return gapAt;
}
