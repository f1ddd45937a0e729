// The bulk reconnect (`sync`, SPEC §3) against a real sync service: pipelining, the hello,
// answers that were lost, a stream broken by killing the server, a queue the server cannot
// continue, a refused token.
import assert from "node:assert/strict";
import { test } from "node:test";
import type { Interceptor } from "@connectrpc/connect";
import {
  FieldSyncClient,
  MemoryQueue,
  type MutationResult,
  MutationStatus,
  type SyncRequest,
  type SyncResponse,
  SyncError,
  SyncUnauthenticated,
  fromValues,
} from "../src/index.js";
import { backend } from "../examples/backend.js";
import { type Service, token } from "./harness.js";
import { services as S } from "./services.js";

function client(sub: string, extra: { interceptors?: Interceptor[]; maxRetries?: number } = {}): FieldSyncClient {
  return new FieldSyncClient({ address: S.sync.address, token: () => token({ tenant: "acme", sub }), timeoutMs: 10_000, ...extra });
}

/** `records` records created (PUT), then `patches` PATCHes of `estimate` spread over them. */
function fieldQueue(prefix: string, records: number, patches: number): MemoryQueue {
  const q = new MemoryQueue();
  const start = new Date("2026-01-01T00:00:00Z").getTime();
  for (let i = 0; i < records; i++) {
    q.add({ op: "PUT", collection: "tasks", recordId: `${prefix}-${i}`, fields: { title: `t${i}` }, clientTime: new Date(start + i) });
  }
  for (let i = 0; i < patches; i++) {
    const seq = BigInt(records + i + 1);
    q.add({ op: "PATCH", collection: "tasks", recordId: `${prefix}-${i % records}`, baseVersion: 1n, fields: { estimate: seq } });
  }
  return q;
}

/** The server holds exactly one delivery of fieldQueue(prefix, records, patches). */
async function assertDeliveredOnce(c: FieldSyncClient, prefix: string, records: number, patches: number): Promise<void> {
  const ids = Array.from({ length: records }, (_, i) => `${prefix}-${i}`);
  const got = new Map((await c.getRecords("tasks", ids)).map((r) => [r.recordId, r]));
  for (let i = 0; i < records; i++) {
    const mine = Array.from({ length: patches }, (_, k) => k).filter((k) => k % records === i);
    const r = got.get(`${prefix}-${i}`);
    assert.ok(r, `record ${prefix}-${i} is missing`);
    // Each patch sets a new value: version 1 (PUT) + one per patch, exactly.
    assert.equal(r.version, BigInt(1 + mine.length), `${prefix}-${i}: version`);
    const last = mine.at(-1);
    if (last !== undefined) assert.equal(fromValues(r.fields)["estimate"], BigInt(records + last + 1));
  }
}

test("a queue goes over one Sync stream, pipelined, with the hello's queue figures", async () => {
  const seen: SyncRequest[] = [];
  let outstanding = 0;
  let most = 0;
  // Counts batches sent and not yet answered, as the wire sees them.
  const spy: Interceptor = (next) => async (req) => {
    if (!req.stream || req.method.name !== "Sync") return next(req);
    const sent = req.message as AsyncIterable<SyncRequest>;
    const res = await next({
      ...req,
      message: (async function* () {
        for await (const m of sent) {
          seen.push(m);
          if (m.message.case === "batch") most = Math.max(most, ++outstanding);
          yield m;
        }
      })(),
    });
    if (!res.stream) return res;
    const answers = res.message;
    return {
      ...res,
      message: (async function* () {
        for await (const a of answers) {
          if ((a as unknown as SyncResponse).message.case === "result") outstanding -= 1;
          yield a;
        }
      })(),
    };
  };
  const c = client("rep-pipe", { interceptors: [spy] });
  const queue = fieldQueue("p", 20, 280);
  const results: MutationResult[] = [];
  const report = await c.sync("ts-pipe", queue, { batchSize: 25, maxInFlight: 3, onResults: (r) => void results.push(...r) });
  assert.deepEqual(
    { applied: report.applied, answered: report.answered, pending: report.pending, attempts: report.attempts, last: report.lastAppliedSeq },
    { applied: 300, answered: 300, pending: 0, attempts: 1, last: 300n },
  );
  assert.deepEqual(results.map((r) => r.clientSeq), Array.from({ length: 300 }, (_, i) => BigInt(i + 1)));
  assert.equal(most, 3, "at most, and up to, maxInFlight batches in flight");
  const hello = seen[0]?.message;
  assert.equal(hello?.case, "hello");
  if (hello?.case === "hello") {
    assert.equal(hello.value.clientId, "ts-pipe");
    assert.equal(hello.value.pendingMutations, 300n);
    assert.equal(hello.value.oldestPendingTime?.seconds, BigInt(Date.parse("2026-01-01T00:00:00Z") / 1000));
  }
  assert.equal(seen.filter((m) => m.message.case === "batch").length, 12);
  await assertDeliveredOnce(c, "p", 20, 280);
});

test("mutations applied but whose answers were lost come back DUPLICATE with their outcome", async () => {
  const c = client("rep-lost");
  const queue = fieldQueue("l", 5, 45);
  // Delivered once already (the answers "lost": still queued).
  const firstTen = queue.pendingAfter(0n, 10);
  const direct = await c.applyBatch("ts-lost", firstTen);
  assert.equal(direct.lastAppliedSeq, 10n);
  const report = await c.sync("ts-lost", queue, { batchSize: 20 });
  assert.deepEqual(
    { duplicates: report.duplicates, applied: report.applied, pending: report.pending },
    { duplicates: 10, applied: 40, pending: 0 },
  );
  await assertDeliveredOnce(c, "l", 5, 45);
});

test("a Sync stream broken by killing the server resumes after its restart: nothing lost or applied twice", async (t) => {
  const c = client("rep-crash", { maxRetries: 30 }); // the restart took up to 30 s on a loaded machine
  const records = 40;
  const patches = 1960;
  const queue = fieldQueue("k", records, patches);
  const answered = new Map<bigint, number>();
  let restarted: Promise<Service> | undefined;
  let pendingAtKill = 0;
  let report;
  try {
    report = await c.sync("ts-crash", queue, {
      batchSize: 100,
      onResults: (results) => {
        for (const r of results) answered.set(r.clientSeq, (answered.get(r.clientSeq) ?? 0) + 1);
        if (restarted === undefined && answered.size >= 600) {
          pendingAtKill = queue.size();
          // SIGKILL mid-stream (batches in flight), then the same service on the same file.
          restarted = S.sync.kill().then(() => S.sync.restart());
        }
      },
    });
  } finally {
    if (restarted) S.sync = await restarted; // the next tests need it, whatever happened here
  }
  t.diagnostic(
    `killed with ${pendingAtKill} queued; ${report.attempts} streams; ${report.duplicates} answered DUPLICATE after the restart`,
  );
  assert.ok(restarted, "the server was killed");
  assert.ok(pendingAtKill > 1000, `killed mid-way (${pendingAtKill} still queued)`);
  assert.ok(report.attempts >= 2, `the stream was opened again (${report.attempts})`);
  assert.equal(report.pending, 0);
  assert.equal(answered.size, records + patches, "every mutation was answered");
  // DUPLICATE only for what was in flight at the kill (applied or not, its answer was lost):
  // at most maxInFlight (2) batches of 100; everything else was answered once.
  assert.ok(report.duplicates <= 200, `${report.duplicates} DUPLICATE answers`);
  assert.ok([...answered.values()].every((n) => n <= 2), "no mutation answered more than twice");
  assert.equal(report.applied + report.duplicates, report.answered);
  await assertDeliveredOnce(c, "k", records, patches);
});

test("a queue the server cannot continue (a gap it never had) fails and is kept whole", async () => {
  const c = client("rep-gap");
  const queue = new MemoryQueue();
  queue.add({ clientSeq: 5n, op: "PUT", collection: "tasks", recordId: "gap-1", fields: { title: "x" } });
  await assert.rejects(c.sync("ts-gap", queue), (e: unknown) => e instanceof SyncError && /lost mutations/.test(e.message));
  assert.equal(queue.size(), 1);
});

test("a refused token fails the sync as UNAUTHENTICATED and keeps the queue", async () => {
  const c = new FieldSyncClient({ address: S.sync.address, token: () => token({ tenant: "acme", sub: "x", expiresIn: -60 }) });
  const queue = fieldQueue("u", 2, 0);
  await assert.rejects(c.sync("ts-unauth", queue), (e: unknown) => e instanceof SyncUnauthenticated && e.reason === "TOKEN_EXPIRED");
  assert.equal(queue.size(), 2);
});

test("a REJECTED mutation is dropped on its result; the rest of the queue applies", async () => {
  const c = client("rep-rej");
  const queue = new MemoryQueue();
  queue.add({ op: "PUT", collection: "nope", recordId: "r-0", fields: { a: "b" } });
  queue.add({ op: "PUT", collection: "tasks", recordId: "r-1", fields: { title: "ok" } });
  const statuses: MutationStatus[] = [];
  const report = await c.sync("ts-rej", queue, { onResults: (rs) => void statuses.push(...rs.map((r) => r.status)) });
  assert.deepEqual(statuses, [MutationStatus.REJECTED, MutationStatus.APPLIED]);
  assert.equal(report.pending, 0);
});

test("examples/backend.ts relays a device's queued writes and answers per mutation", async () => {
  const server = backend(S.sync.address);
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address() as { port: number };
  const post = async (bearer: string, mutations: unknown[]): Promise<{ status: number; json: any }> => {
    const res = await fetch(`http://127.0.0.1:${port}/devices/phone-1/sync`, {
      method: "POST",
      headers: { authorization: `Bearer ${bearer}`, "content-type": "application/json" },
      body: JSON.stringify({ mutations }),
    });
    return { status: res.status, json: await res.json() };
  };
  try {
    const device = token({ tenant: "acme", sub: "phone-user" });
    const writes = [
      { clientSeq: 1, mutationId: crypto.randomUUID(), op: "PUT", collection: "tasks", recordId: "bk-1", fields: { title: "From a phone", estimate: { $int: "9007199254740993" } } },
      { clientSeq: 2, mutationId: crypto.randomUUID(), op: "PATCH", collection: "tasks", recordId: "bk-1", fields: { status: "doing" }, clientTime: "2026-05-01T12:00:00Z" },
    ];
    const first = await post(device, writes);
    assert.equal(first.status, 200);
    assert.deepEqual(first.json.results.map((r: any) => r.status), ["MUTATION_STATUS_APPLIED", "MUTATION_STATUS_APPLIED"]);
    assert.equal(first.json.results[1].record.version, "2");
    assert.equal(first.json.results[0].record.fields.estimate.intValue, "9007199254740993");
    // The phone did not get the answer and sends again: nothing is applied twice.
    const again = await post(device, writes);
    assert.deepEqual(again.json.results.map((r: any) => r.status), ["MUTATION_STATUS_DUPLICATE", "MUTATION_STATUS_DUPLICATE"]);
    const refused = await post(token({ tenant: "acme", sub: "p", secret: "wrong" }), writes);
    assert.deepEqual({ status: refused.status, reason: refused.json.reason }, { status: 401, reason: "INVALID_TOKEN" });
  } finally {
    server.close();
  }
});
