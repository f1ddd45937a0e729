// The typed client a backend calls on behalf of its devices: one per sync service,
// each call with a token from the provider (`authorization: Bearer`), a deadline, and
// retries of what waiting can cure. Answers are the generated messages (src/gen); the
// helpers in values.ts turn their fields into plain values.
import { type MessageInitShape, create } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import { type Client, createClient } from "@connectrpc/connect";
import type { Record as WireRecord } from "./gen/fieldsync/v1/common_pb.js";
import {
  AuditService,
  type AuditEvent,
  type AuditEventKind,
  type AuditEventSchema,
  type QueryEventsResponse,
  type RecordEventsResponse,
} from "./gen/fieldsync/v1/audit_pb.js";
import {
  type BatchResult,
  type Conflict,
  type GetSchemaResponse,
  MutationBatchSchema,
  Resolution,
  SyncService,
} from "./gen/fieldsync/v1/sync_pb.js";
import type { QueuedMutation, MutationQueue } from "./queue.js";
import { type SyncOptions, type SyncReport, mutationToProto, runSync } from "./sync.js";
import { Connection, type ConnectionOptions } from "./transport.js";
import { type Fields, toValues } from "./values.js";

export interface Page {
  changes: WireRecord[];
  cursor: string;
  caughtUp: boolean;
}

export interface FeedOptions {
  /** Opaque; empty (the default) means from the beginning. */
  cursor?: string;
  /** Empty (the default) means every collection. */
  collections?: string[];
  /** Records a page (Pull only); 0 means the server's default. */
  pageSize?: number;
  /** Ends the iteration (Subscribe stays open until then, or until the loop breaks). */
  signal?: AbortSignal;
}

export interface ListConflictsOptions {
  collection?: string;
  recordId?: string;
  includeResolved?: boolean;
  pageSize?: number;
}

export type ResolutionName = "KEEP_THEIRS" | "TAKE_YOURS" | "CUSTOM";

const RESOLUTIONS = {
  KEEP_THEIRS: Resolution.KEEP_THEIRS,
  TAKE_YOURS: Resolution.TAKE_YOURS,
  CUSTOM: Resolution.CUSTOM,
} as const;

/** A feed's pages; a stream broken by the network or a restart is reopened from the cursor
 * after the last page handed out (each page read has the connection's retry budget). */
async function* feed<T extends { cursor: string }>(
  conn: Connection,
  what: string,
  open: (cursor: string, signal: AbortSignal) => Promise<AsyncIterable<T>>,
  options: FeedOptions,
  endAt: (page: T) => boolean,
): AsyncGenerator<T> {
  let cursor = options.cursor ?? "";
  const abort = new AbortController();
  const stop = (): void => abort.abort();
  options.signal?.addEventListener("abort", stop);
  let iterator: AsyncIterator<T> | undefined;
  try {
    for (;;) {
      let next: IteratorResult<T>;
      try {
        next = await conn.call(what, async () => {
          iterator ??= (await open(cursor, abort.signal))[Symbol.asyncIterator]();
          try {
            return await iterator.next();
          } catch (err) {
            iterator = undefined;
            throw err;
          }
        });
      } catch (err) {
        if (abort.signal.aborted) return; // the caller's signal ended it
        throw err;
      }
      if (next.done) return;
      cursor = next.value.cursor;
      yield next.value;
      if (endAt(next.value)) return;
    }
  } finally {
    options.signal?.removeEventListener("abort", stop);
    abort.abort();
  }
}

export class FieldSyncClient {
  readonly connection: Connection;
  /** The generated client, for what this class does not wrap. */
  readonly stub: Client<typeof SyncService>;

  constructor(options: ConnectionOptions) {
    this.connection = new Connection(options);
    this.stub = createClient(SyncService, this.connection.transport);
  }

  private async unary<T>(what: string, call: (headers: { authorization: string }) => Promise<T>): Promise<T> {
    return this.connection.call(what, async () => call(await this.connection.headers()));
  }

  private opts(headers: { authorization: string }): { headers: { authorization: string }; timeoutMs: number } {
    return { headers, timeoutMs: this.connection.timeoutMs };
  }

  /** One batch of one client's mutations, applied in client_seq order in one transaction. */
  async applyBatch(
    clientId: string,
    mutations: readonly QueuedMutation[],
    options: { schemaVersion?: number } = {},
  ): Promise<BatchResult> {
    const batch = create(MutationBatchSchema, {
      clientId,
      schemaVersion: options.schemaVersion ?? 0,
      mutations: mutations.map(mutationToProto),
    });
    const response = await this.unary("apply batch", (h) => this.stub.applyBatch({ batch }, this.opts(h)));
    if (response.result === undefined) throw new Error("apply batch: the server sent no result");
    return response.result;
  }

  /** Deliver `queue` over the Sync stream (SPEC §3); see sync.ts. */
  async sync(clientId: string, queue: MutationQueue, options: SyncOptions = {}): Promise<SyncReport> {
    return runSync(this.connection, this.stub, clientId, queue, options);
  }

  /** The tenant's records changed after the cursor, page by page, until caught up. */
  pull(options: FeedOptions = {}): AsyncGenerator<Page> {
    return feed(
      this.connection,
      "pull",
      async (cursor, signal) =>
        this.stub.pull(
          { cursor, collections: options.collections ?? [], pageSize: options.pageSize ?? 0 },
          { headers: await this.connection.headers(), signal, timeoutMs: this.connection.timeoutMs },
        ),
      options,
      (page) => page.caughtUp,
    );
  }

  /** Like pull, then stays open with changes as they commit; ends on `signal` or `break`. */
  subscribe(options: FeedOptions = {}): AsyncGenerator<Page> {
    return feed(
      this.connection,
      "subscribe",
      async (cursor, signal) => {
        const stream = this.stub.subscribe(
          { cursor, collections: options.collections ?? [] },
          { headers: await this.connection.headers(), signal, timeoutMs: 0 },
        );
        return (async function* () {
          for await (const page of stream) yield { changes: page.changes, cursor: page.cursor, caughtUp: false };
        })();
      },
      options,
      () => false,
    );
  }

  /** The records with these ids (unknown ids, and other tenants' records, are absent). */
  async getRecords(collection: string, recordIds: readonly string[]): Promise<WireRecord[]> {
    const response = await this.unary("get records", (h) =>
      this.stub.getRecords({ collection, recordIds: [...recordIds] }, this.opts(h)),
    );
    return response.records;
  }

  /** Every conflict matching the options (open ones by default), all pages. */
  async listConflicts(options: ListConflictsOptions = {}): Promise<Conflict[]> {
    const found: Conflict[] = [];
    let pageToken = "";
    for (;;) {
      const response = await this.unary("list conflicts", (h) =>
        this.stub.listConflicts(
          {
            collection: options.collection ?? "",
            recordId: options.recordId ?? "",
            includeResolved: options.includeResolved ?? false,
            pageSize: options.pageSize ?? 1000,
            pageToken,
          },
          this.opts(h),
        ),
      );
      found.push(...response.conflicts);
      if (!response.nextPageToken) return found;
      pageToken = response.nextPageToken;
    }
  }

  /** Answer a durable conflict; `fields` for CUSTOM. The record after it. */
  async resolveConflict(conflictId: string, resolution: ResolutionName, fields?: Fields): Promise<WireRecord> {
    const response = await this.unary("resolve conflict", (h) =>
      this.stub.resolveConflict(
        { conflictId, resolution: RESOLUTIONS[resolution], fields: toValues(fields) },
        this.opts(h),
      ),
    );
    if (response.record === undefined) throw new Error("resolve conflict: the server sent no record");
    return response.record;
  }

  /** The schema the server applies (`schemaJson`) and its version. */
  async getSchema(): Promise<GetSchemaResponse> {
    return this.unary("get schema", (h) => this.stub.getSchema({}, this.opts(h)));
  }
}

export interface QueryEventsOptions {
  kinds?: AuditEventKind[];
  collection?: string;
  recordId?: string;
  mutationId?: string;
  since?: Date;
  until?: Date;
  pageSize?: number;
  pageToken?: string;
  newestFirst?: boolean;
}

/** The audit service: reading needs the role `auditor`; recording `fieldsync:service`. */
export class AuditClient {
  readonly connection: Connection;
  readonly stub: Client<typeof AuditService>;

  constructor(options: ConnectionOptions) {
    this.connection = new Connection(options);
    this.stub = createClient(AuditService, this.connection.transport);
  }

  private async unary<T>(what: string, call: (headers: { authorization: string }) => Promise<T>): Promise<T> {
    return this.connection.call(what, async () => call(await this.connection.headers()));
  }

  /** One page of events of the caller's tenant. */
  async queryEvents(options: QueryEventsOptions = {}): Promise<QueryEventsResponse> {
    const { since, until, ...rest } = options;
    return this.unary("query events", async (headers) =>
      this.stub.queryEvents(
        {
          ...rest,
          ...(since ? { since: timestampFromDate(since) } : {}),
          ...(until ? { until: timestampFromDate(until) } : {}),
        },
        { headers, timeoutMs: this.connection.timeoutMs },
      ),
    );
  }

  /** Store events (the sync service's call; needs the role `fieldsync:service`). */
  async recordEvents(events: MessageInitShape<typeof AuditEventSchema>[]): Promise<RecordEventsResponse> {
    return this.unary("record events", async (headers) =>
      this.stub.recordEvents({ events }, { headers, timeoutMs: this.connection.timeoutMs }),
    );
  }

  /** New events as they are recorded, until `signal` aborts or the loop breaks. */
  async *tailEvents(options: { kinds?: AuditEventKind[]; signal?: AbortSignal } = {}): AsyncGenerator<AuditEvent> {
    const abort = new AbortController();
    const stop = (): void => abort.abort();
    options.signal?.addEventListener("abort", stop);
    try {
      const stream = this.stub.tailEvents(
        { kinds: options.kinds ?? [] },
        { headers: await this.connection.headers(), signal: abort.signal, timeoutMs: 0 },
      );
      for await (const response of stream) if (response.event) yield response.event;
    } finally {
      options.signal?.removeEventListener("abort", stop);
      abort.abort();
    }
  }
}
