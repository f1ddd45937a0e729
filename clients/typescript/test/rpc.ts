// Every RPC of both services from TypeScript, against the real processes: round trips,
// merges, a durable conflict resolved, replay, errors with their reasons, tenancy, int64.
import assert from "node:assert/strict";
import { describe, test } from "node:test";
import {
  AuditClient,
  AuditEventKind,
  ConflictKind,
  FieldSyncClient,
  Json,
  MutationStatus,
  type QueuedMutation,
  SyncError,
  SyncUnauthenticated,
  fromValues,
  rejection,
} from "../src/index.js";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { MemoryQueue } from "../src/index.js";
import { REPO, eventually, token } from "./harness.js";
import { MAX_BATCH, services as S } from "./services.js";

function client(tenant = "acme", sub = "rep-1", roles: string[] = []): FieldSyncClient {
  return new FieldSyncClient({ address: S.sync.address, token: () => token({ tenant, sub, roles }), timeoutMs: 10_000 });
}

function auditor(tenant = "acme"): AuditClient {
  return new AuditClient({ address: S.audit.address, token: () => token({ tenant, sub: "aud", roles: ["auditor"] }) });
}

let seq = 0n;
/** A mutation of this file's one client ("ts-rpc"), numbered in order. */
function m(rest: Omit<QueuedMutation, "clientSeq" | "mutationId">): QueuedMutation {
  seq += 1n;
  return { ...rest, clientSeq: seq, mutationId: crypto.randomUUID() };
}


describe("sync service", () => {
  test("GetSchema returns the shipped schema and its version", async () => {
    const schema = await client().getSchema();
    assert.equal(schema.version, 3);
    const parsed = JSON.parse(schema.schemaJson) as { collections: { [name: string]: unknown } };
    assert.ok("tasks" in parsed.collections);
  });

  test("PUT, PATCH and DELETE round-trip through ApplyBatch, GetRecords and Pull", async () => {
    const c = client();
    const due = new Date("2026-05-01T12:30:00.123Z");
    const put = await c.applyBatch("ts-rpc", [
      m({ op: "PUT", collection: "tasks", recordId: "rt-1", fields: { title: "Visit", estimate: 3n, due, tags: Json.of(["a", 1]) } }),
    ]);
    assert.equal(put.results[0]?.status, MutationStatus.APPLIED);
    assert.equal(put.results[0]?.record?.version, 1n);

    const patch = await c.applyBatch("ts-rpc", [
      m({ op: "PATCH", collection: "tasks", recordId: "rt-1", baseVersion: 1n, fields: { status: "doing" } }),
    ]);
    assert.equal(patch.results[0]?.status, MutationStatus.APPLIED);
    const [afterPatch] = await c.getRecords("tasks", ["rt-1", "no-such-id"]);
    assert.ok(afterPatch);
    assert.equal(afterPatch.version, 2n);
    const fields = fromValues(afterPatch.fields);
    assert.equal(fields["title"], "Visit");
    assert.equal(fields["status"], "doing");
    assert.equal(fields["estimate"], 3n);
    assert.deepEqual(fields["due"], due);
    assert.deepEqual((fields["tags"] as Json).parse(), ["a", 1]);

    const del = await c.applyBatch("ts-rpc", [m({ op: "DELETE", collection: "tasks", recordId: "rt-1", baseVersion: 2n })]);
    assert.equal(del.results[0]?.status, MutationStatus.APPLIED);
    const [tombstone] = await c.getRecords("tasks", ["rt-1"]);
    assert.equal(tombstone?.deleted, true);
    assert.equal(tombstone?.version, 3n);

    const seen = new Map<string, { version: bigint; deleted: boolean }>();
    let caughtUp = false;
    for await (const page of c.pull({ collections: ["tasks"], pageSize: 2 })) {
      for (const r of page.changes) seen.set(r.recordId, { version: r.version, deleted: r.deleted });
      caughtUp = page.caughtUp;
    }
    assert.ok(caughtUp, "the pull ends caught up");
    assert.deepEqual(seen.get("rt-1"), { version: 3n, deleted: true });
  });

  test("int64 values above 2^53 round-trip exactly as bigint", async () => {
    const c = client();
    const big = 2n ** 62n + 1n; // not representable as a JS number
    const negative = -(2n ** 60n) - 7n;
    await c.applyBatch("ts-rpc", [m({ op: "PUT", collection: "tasks", recordId: "big-1", fields: { title: "big", estimate: big } })]);
    const [r1] = await c.getRecords("tasks", ["big-1"]);
    assert.equal(fromValues(r1!.fields)["estimate"], big);
    await c.applyBatch("ts-rpc", [
      m({ op: "PATCH", collection: "tasks", recordId: "big-1", baseVersion: 1n, fields: { estimate: negative } }),
    ]);
    const [r2] = await c.getRecords("tasks", ["big-1"]);
    assert.equal(fromValues(r2!.fields)["estimate"], negative);
    assert.equal(typeof r2!.version, "bigint");
  });

  test("a stale base merges other fields, and a durable conflict is resolved from TypeScript", async () => {
    const rep = client("acme", "rep-1");
    const desk = client("acme", "desk-1");
    let deskSeq = 0n;
    const deskM = (rest: Omit<QueuedMutation, "clientSeq" | "mutationId">): QueuedMutation => ({
      ...rest,
      clientSeq: (deskSeq += 1n),
      mutationId: crypto.randomUUID(),
    });
    await desk.applyBatch("ts-desk", [deskM({ op: "PUT", collection: "tasks", recordId: "mc-1", fields: { title: "Plan", estimate: 1n } })]);
    await desk.applyBatch("ts-desk", [deskM({ op: "PATCH", collection: "tasks", recordId: "mc-1", baseVersion: 1n, fields: { estimate: 5n } })]);

    // The rep, still on version 1, changes another field: merged, both kept.
    const merged = await rep.applyBatch("ts-rpc", [
      m({ op: "PATCH", collection: "tasks", recordId: "mc-1", baseVersion: 1n, fields: { status: "done" } }),
    ]);
    assert.equal(merged.results[0]?.status, MutationStatus.MERGED);
    const mergedFields = fromValues(merged.results[0]!.record!.fields);
    assert.equal(mergedFields["estimate"], 5n);
    assert.equal(mergedFields["status"], "done");

    // Then the same field as the desk, on the stale base: a conflict, theirs kept.
    const clash = await rep.applyBatch("ts-rpc", [
      m({ op: "PATCH", collection: "tasks", recordId: "mc-1", baseVersion: 1n, fields: { estimate: 8n } }),
    ]);
    const result = clash.results[0]!;
    assert.equal(result.status, MutationStatus.CONFLICT);
    assert.equal(result.conflict?.kind, ConflictKind.FIELDS);
    const fc = result.conflict!.fields[0]!;
    assert.equal(fc.field, "estimate");
    assert.deepEqual(
      [fc.base, fc.yours, fc.theirs].map((v) => (v?.kind.case === "intValue" ? v.kind.value : undefined)),
      [1n, 8n, 5n],
    );

    const open = await rep.listConflicts({ collection: "tasks", recordId: "mc-1" });
    assert.deepEqual(open.map((c) => c.conflictId), [result.conflict!.conflictId]);
    const resolved = await rep.resolveConflict(result.conflict!.conflictId, "CUSTOM", { estimate: 6n });
    assert.equal(fromValues(resolved.fields)["estimate"], 6n);
    assert.deepEqual(await rep.listConflicts({ collection: "tasks", recordId: "mc-1" }), []);
    const all = await rep.listConflicts({ collection: "tasks", recordId: "mc-1", includeResolved: true });
    assert.equal(all[0]?.resolved, true);

    // The audit service received both events of the conflict (delivered after commit).
    const kinds = await eventually(async () => {
      const page = await auditor().queryEvents({ recordId: "mc-1" });
      const found = new Set(page.events.map((e) => e.kind));
      return found.has(AuditEventKind.CONFLICT_SURFACED) && found.has(AuditEventKind.CONFLICT_RESOLVED) && found;
    });
    assert.ok(kinds.has(AuditEventKind.CONFLICT_RESOLVED));
  });

  test("a replayed batch is answered DUPLICATE with its original outcome, nothing applied twice", async () => {
    const c = client();
    const batch = [
      m({ op: "PUT", collection: "tasks", recordId: "rp-1", fields: { title: "once" } }),
      m({ op: "PATCH", collection: "tasks", recordId: "rp-1", baseVersion: 1n, fields: { estimate: 2n } }),
    ];
    const first = await c.applyBatch("ts-rpc", batch);
    assert.deepEqual(first.results.map((r) => r.status), [MutationStatus.APPLIED, MutationStatus.APPLIED]);
    const again = await c.applyBatch("ts-rpc", batch);
    assert.deepEqual(again.results.map((r) => r.status), [MutationStatus.DUPLICATE, MutationStatus.DUPLICATE]);
    assert.deepEqual(again.results.map((r) => r.originalStatus), [MutationStatus.APPLIED, MutationStatus.APPLIED]);
    assert.equal(again.lastAppliedSeq, seq);
    const [r] = await c.getRecords("tasks", ["rp-1"]);
    assert.equal(r?.version, 2n);
  });

  test("a mutation that can never apply is REJECTED with its reason, and the batch goes on", async () => {
    const c = client();
    const res = await c.applyBatch("ts-rpc", [
      m({ op: "PUT", collection: "no_such_collection", recordId: "x", fields: { a: "b" } }),
      m({ op: "PUT", collection: "tasks", recordId: "after-reject", fields: { title: "kept" } }),
    ]);
    assert.equal(res.results[0]?.status, MutationStatus.REJECTED);
    assert.deepEqual(
      { code: rejection(res.results[0]!.error)?.code, reason: rejection(res.results[0]!.error)?.reason },
      { code: "INVALID_ARGUMENT", reason: "UNKNOWN_COLLECTION" },
    );
    assert.equal(res.results[1]?.status, MutationStatus.APPLIED);
  });

  test("a bad or expired token is UNAUTHENTICATED with its reason", async () => {
    const forged = new FieldSyncClient({
      address: S.sync.address,
      token: () => token({ tenant: "acme", sub: "x", secret: "not-the-secret" }),
    });
    const err = await forged.getSchema().then(
      () => assert.fail("a forged token was accepted"),
      (e: unknown) => e,
    );
    assert.ok(err instanceof SyncUnauthenticated, String(err));
    assert.deepEqual({ code: err.code, reason: err.reason }, { code: "UNAUTHENTICATED", reason: "INVALID_TOKEN" });

    const expired = new FieldSyncClient({ address: S.sync.address, token: () => token({ tenant: "acme", sub: "x", expiresIn: -600 }) });
    await assert.rejects(expired.getRecords("tasks", ["rt-1"]), (e: unknown) => e instanceof SyncUnauthenticated && e.reason === "TOKEN_EXPIRED");

    const none = new FieldSyncClient({ address: S.sync.address, token: () => "" });
    await assert.rejects(none.getSchema(), SyncUnauthenticated);
  });

  test("another tenant's records are invisible: reads, the feed and conflicts show nothing", async () => {
    const acme = client("acme");
    await acme.applyBatch("ts-rpc", [m({ op: "PUT", collection: "tasks", recordId: "secret-1", fields: { title: "acme only" } })]);
    const other = client("globex", "spy");
    assert.deepEqual(await other.getRecords("tasks", ["secret-1", "rt-1", "mc-1"]), []);
    const pulled: string[] = [];
    for await (const page of other.pull()) pulled.push(...page.changes.map((r) => r.recordId));
    assert.deepEqual(pulled, []);
    assert.deepEqual(await other.listConflicts({ includeResolved: true }), []);
    const page = await auditor("globex").queryEvents({});
    assert.deepEqual(page.events, []);
  });

  test("a batch over the server's limit is refused as BATCH_TOO_LARGE, and nothing of it applies", async () => {
    const c = client();
    const start = seq;
    const tooMany = Array.from({ length: MAX_BATCH + 1 }, (_, i) =>
      m({ op: "PUT", collection: "tasks", recordId: `big-batch-${i}`, fields: { title: "x" } }),
    );
    seq = start; // nothing of it is applied: the numbers are free again
    const err = await c.applyBatch("ts-rpc", tooMany).then(
      () => assert.fail("an oversized batch was accepted"),
      (e: unknown) => e,
    );
    assert.ok(err instanceof SyncError, String(err));
    assert.deepEqual({ code: err.code, reason: err.reason }, { code: "INVALID_ARGUMENT", reason: "BATCH_TOO_LARGE" });
    assert.deepEqual(await c.getRecords("tasks", ["big-batch-0"]), []);
  });

  test("a page token the server did not issue is INVALID_PAGE_TOKEN", async () => {
    const err = await client()
      .stub.listConflicts({ pageToken: "forged" }, { headers: { authorization: `Bearer ${token({ tenant: "acme", sub: "r" })}` } })
      .then(
        () => assert.fail("a forged page token was accepted"),
        (e: unknown) => e,
      );
    // The raw stub's ConnectError carries the same details the typed client unpacks.
    const typed = (await import("../src/errors.js")).errorFromCall(err, "list conflicts", S.sync.address);
    assert.deepEqual({ code: typed.code, reason: typed.reason }, { code: "INVALID_ARGUMENT", reason: "INVALID_PAGE_TOKEN" });
  });

  test("Subscribe sends a change as it commits", async () => {
    const c = client();
    const abort = new AbortController();
    const live = (async () => {
      for await (const page of c.subscribe({ collections: ["tasks"], signal: abort.signal })) {
        if (page.changes.some((r) => r.recordId === "live-1")) return true;
      }
      return false;
    })();
    // Written after the subscription opened: the feed must carry it, whatever the timing.
    await new Promise((r) => setTimeout(r, 200));
    await c.applyBatch("ts-rpc", [m({ op: "PUT", collection: "tasks", recordId: "live-1", fields: { title: "now" } })]);
    const timer = setTimeout(() => abort.abort(), 10_000);
    assert.equal(await live, true);
    clearTimeout(timer);
    abort.abort();
  });
});

describe("the README's TypeScript example", () => {
  test("runs as written", async () => {
    const address = S.sync.address;
    const tokenFor = (tenant: string, sub: string): string => token({ tenant, sub });
    // README example start
    const client = new FieldSyncClient({ address, token: () => tokenFor("acme", "rep-7") });

    // A device's offline writes; the queue numbers them 1, 2, 3 … (clientSeq) and gives
    // each a UUID. MemoryQueue is for examples: implement MutationQueue on your database.
    const queue = new MemoryQueue();
    queue.add({ op: "PUT", collection: "tasks", recordId: "task-1", fields: { title: "Visit site", estimate: 2n } });
    queue.add({ op: "PATCH", collection: "tasks", recordId: "task-1", fields: { status: "doing" } });

    // The reconnect: hello, welcome, the unanswered writes in pipelined batches; a write
    // leaves the queue only when its result arrives, and a broken stream is resumed.
    const report = await client.sync("install-7f3a", queue);
    assert.deepEqual([report.applied, report.pending], [2, 0]);

    // Reads: int64 values are bigint, exact beyond 2^53.
    const [task] = await client.getRecords("tasks", ["task-1"]);
    const { title, status, estimate } = fromValues(task!.fields);
    assert.deepEqual([title, status, estimate, task!.version], ["Visit site", "doing", 2n, 2n]);

    // Errors are typed, with the server's stable reason (google.rpc.ErrorInfo).
    const stranger = new FieldSyncClient({ address, token: () => "not-a-jwt" });
    await assert.rejects(stranger.getSchema(), (err) => err instanceof SyncUnauthenticated && err.reason === "INVALID_TOKEN");
    // README example end
  });

  test("README.md carries the example above, verbatim", () => {
    const source = readFileSync(join(REPO, "clients", "typescript", "test", "rpc.ts"), "utf8");
    const block = /\/\/ README example start\n([\s\S]*?)\n\s*\/\/ README example end/.exec(source)?.[1];
    assert.ok(block, "the markers are in test/rpc.ts");
    const lines = block.split("\n");
    const indent = Math.min(...lines.filter((l) => l.trim()).map((l) => l.length - l.trimStart().length));
    const example = lines.map((l) => l.slice(indent)).join("\n");
    const readme = readFileSync(join(REPO, "README.md"), "utf8");
    assert.ok(readme.includes(example), `README.md's TypeScript example differs from test/rpc.ts's; copy it:\n${example}`);
  });
});

describe("audit service", () => {
  test("RecordEvents (service role), QueryEvents and TailEvents (auditor)", async () => {
    const service = new AuditClient({
      address: S.audit.address,
      // RecordEvents takes service tokens only: the service audience and role.
      token: () => token({ tenant: "acme", sub: "sync", roles: ["fieldsync:service"], aud: "fieldsync-service" }),
    });
    const abort = new AbortController();
    const tail = auditor().tailEvents({ kinds: [AuditEventKind.LWW_OVERWRITE], signal: abort.signal });
    const first = tail.next();
    await new Promise((r) => setTimeout(r, 200));
    const eventId = crypto.randomUUID();
    const ev = {
      eventId,
      tenantId: "acme",
      kind: AuditEventKind.LWW_OVERWRITE,
      collection: "tasks",
      recordId: "audit-1",
      field: "seen_at",
      occurredAt: { seconds: BigInt(Math.floor(Date.now() / 1000)), nanos: 0 },
    };
    assert.deepEqual(await service.recordEvents([ev]), { $typeName: "fieldsync.v1.RecordEventsResponse", recorded: 1, duplicates: 0 });
    assert.equal((await service.recordEvents([ev])).duplicates, 1);
    const tailed = await first;
    assert.equal(tailed.done, false);
    assert.equal(tailed.value?.eventId, eventId);
    abort.abort();
    await tail.return(undefined);
    // A bad event among good ones: the call fails INVALID_AUDIT_EVENT, with a BadRequest
    // violation naming it (events[1]...), and the good one was stored.
    const other = { ...ev, eventId: crypto.randomUUID() };
    const bad = await service.recordEvents([other, { ...ev, eventId: "" }]).then(
      () => assert.fail("an event without event_id was accepted"),
      (e: unknown) => e,
    );
    assert.ok(bad instanceof SyncError, String(bad));
    assert.equal(bad.reason, "INVALID_AUDIT_EVENT");
    assert.ok(bad.violations.length > 0 && bad.violations.every((v) => v.field.startsWith("events[1]")), JSON.stringify(bad.violations));
    const page = await auditor().queryEvents({ recordId: "audit-1" });
    assert.deepEqual(page.events.map((e) => e.eventId), [eventId, other.eventId]);
    // Reading needs the auditor role.
    const notAuditor = new AuditClient({ address: S.audit.address, token: () => token({ tenant: "acme", sub: "u" }) });
    await assert.rejects(notAuditor.queryEvents({}), (e: unknown) => e instanceof SyncError && e.reason === "ROLE_REQUIRED");
  });
});
