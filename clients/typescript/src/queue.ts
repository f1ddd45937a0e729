// The queue `sync` delivers: an interface the application implements on its own database,
// and one in-memory implementation (tests, examples, a relay that holds nothing across
// restarts).
//
// A backend speaking for its devices already has a database: its queue belongs there, so
// that a mutation survives the backend's own restart until the sync service answered it.
// `sync` only reads the queue (`pendingAfter`, `size`) and, when a batch's answers arrive,
// hands them to `settle`, which drops exactly the mutations they answer (a persistent
// implementation stores the answers and deletes the rows in one transaction). A mutation
// whose answer never arrived stays queued and is sent again next time; the server answers
// it DUPLICATE with its original outcome, so nothing is applied twice (SPEC §3).
import { randomUUID } from "node:crypto";
import type { MutationResult } from "./gen/fieldsync/v1/sync_pb.js";
import type { Fields } from "./values.js";

export type Op = "PUT" | "PATCH" | "DELETE";

/** One operation of a text edit (SPEC §3); counts are Unicode code points. */
export type TextOp = { retain: number | bigint } | { insert: string } | { delete: number | bigint };

/** One queued write, numbered by its client (`clientSeq` 1, 2, 3 …, never reused). */
export interface QueuedMutation {
  clientSeq: bigint;
  /** A UUID: the idempotency key. */
  mutationId: string;
  op: Op;
  collection: string;
  recordId: string;
  fields?: Fields;
  /** The record version the client last saw (0 or absent: it creates the record). */
  baseVersion?: bigint;
  /** When the user made the change. */
  clientTime?: Date;
  baseFields?: Fields;
  resolvesConflictId?: string;
  textEdits?: { [field: string]: TextOp[] };
}

export interface MutationQueue {
  /** Up to `limit` queued mutations with clientSeq above `after`, in clientSeq order. */
  pendingAfter(after: bigint, limit: number): readonly QueuedMutation[] | Promise<readonly QueuedMutation[]>;
  /** How many mutations are queued. */
  size(): number | Promise<number>;
  /** One batch's answers arrived (in clientSeq order): drop the mutations they answer. */
  settle(results: readonly MutationResult[]): void | Promise<void>;
}

export type NewMutation = Omit<QueuedMutation, "clientSeq" | "mutationId"> &
  Partial<Pick<QueuedMutation, "clientSeq" | "mutationId">>;

/** A MutationQueue in memory: lost when the process ends. */
export class MemoryQueue implements MutationQueue {
  // Sorted by clientSeq; settled entries are removed from `live` and compacted lazily.
  private items: QueuedMutation[] = [];
  private readonly live = new Map<bigint, QueuedMutation>();
  private lastSeq = 0n;

  /** Queue a mutation; without `clientSeq` it gets the next one, without `mutationId` a UUID. */
  add(m: NewMutation): QueuedMutation {
    const clientSeq = m.clientSeq ?? this.lastSeq + 1n;
    if (clientSeq <= this.lastSeq) {
      throw new RangeError(`clientSeq ${clientSeq} is not above the last queued one (${this.lastSeq})`);
    }
    const queued: QueuedMutation = { ...m, clientSeq, mutationId: m.mutationId ?? randomUUID() };
    this.items.push(queued);
    this.live.set(clientSeq, queued);
    this.lastSeq = clientSeq;
    return queued;
  }

  pendingAfter(after: bigint, limit: number): QueuedMutation[] {
    let lo = 0;
    let hi = this.items.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (this.items[mid]!.clientSeq <= after) lo = mid + 1;
      else hi = mid;
    }
    const out: QueuedMutation[] = [];
    for (let i = lo; i < this.items.length && out.length < limit; i++) {
      const m = this.items[i]!;
      if (this.live.has(m.clientSeq)) out.push(m);
    }
    return out;
  }

  size(): number {
    return this.live.size;
  }

  settle(results: readonly MutationResult[]): void {
    for (const r of results) {
      const m = this.live.get(r.clientSeq);
      if (m !== undefined && m.mutationId === r.mutationId) this.live.delete(r.clientSeq);
    }
    if (this.live.size * 2 < this.items.length) {
      this.items = this.items.filter((m) => this.live.has(m.clientSeq));
    }
  }
}
