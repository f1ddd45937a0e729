// A minimal mobile backend: devices POST their queued writes as JSON, the backend relays
// them to the sync service with `sync` and answers with one result per mutation.
//
//     FIELDSYNC_SYNC_ADDR=127.0.0.1:50051 PORT=8080 node dist/examples/backend.js
//     curl -X POST localhost:8080/devices/install-7f3a/sync \
//       -H "authorization: Bearer $TOKEN" -H "content-type: application/json" \
//       -d '{"mutations": [{"clientSeq": 1, "mutationId": "…", "op": "PUT",
//            "collection": "tasks", "recordId": "t-1", "fields": {"title": "Visit"}}]}'
//
// The device's own bearer token is passed on: one client (one HTTP/2 connection) serves
// every request, and its token callback, called for each call, returns the token of the
// request that call is made for; so the sync service sees the device's user and tenant. A device numbers its writes itself
// (clientSeq 1, 2, 3 …, mutationId a UUID) and keeps each until a result for it came
// back: a write answered DUPLICATE was applied by an earlier attempt whose answer was lost.
//
// JSON has no int64 and no timestamp: a field value {"$int": "9007199254740993"} is an
// int (exact, any size), {"$time": "2026-05-01T12:00:00Z"} a timestamp and {"$json": …}
// a JSON document; other values map as they are (an integer number is an int). Results
// are the proto3 JSON of MutationResult (int64 as strings).
//
// The queue here is a MemoryQueue per request, which is enough because the device keeps
// the writes until answered. A backend that queues on the devices' behalf (answers the
// device at once, delivers later) implements MutationQueue on its own database instead.
import { AsyncLocalStorage } from "node:async_hooks";
import { createServer, type IncomingMessage, type Server, type ServerResponse } from "node:http";
import { toJson } from "@bufbuild/protobuf";
import {
  FieldSyncClient,
  type Fields,
  type FieldValue,
  Json,
  MemoryQueue,
  type MutationResult,
  MutationResultSchema,
  type Op,
  SyncError,
} from "../src/index.js";

interface DeviceMutation {
  clientSeq: number | string;
  mutationId: string;
  op: Op;
  collection: string;
  recordId: string;
  fields?: { [field: string]: unknown };
  baseVersion?: number | string;
  clientTime?: string;
}

function fieldValue(v: unknown): FieldValue {
  if (v === null || typeof v === "string" || typeof v === "number" || typeof v === "boolean") return v;
  if (typeof v === "object") {
    const o = v as { $int?: string; $time?: string; $json?: unknown };
    if (typeof o.$int === "string") return BigInt(o.$int);
    if (typeof o.$time === "string") return new Date(o.$time);
    if ("$json" in o) return Json.of(o.$json);
  }
  throw new TypeError(`unsupported field value ${JSON.stringify(v)}`);
}

function fields(raw: DeviceMutation["fields"]): Fields {
  const out: Fields = {};
  for (const [k, v] of Object.entries(raw ?? {})) out[k] = fieldValue(v);
  return out;
}

async function body(req: IncomingMessage): Promise<unknown> {
  const chunks: Buffer[] = [];
  for await (const chunk of req) chunks.push(chunk as Buffer);
  return JSON.parse(Buffer.concat(chunks).toString("utf8")) as unknown;
}

function reply(res: ServerResponse, status: number, payload: unknown): void {
  res.writeHead(status, { "content-type": "application/json" });
  res.end(JSON.stringify(payload));
}

/** The backend's HTTP server (not listening yet), relaying to the sync service at `syncAddress`. */
export function backend(syncAddress: string): Server {
  const requestToken = new AsyncLocalStorage<string>();
  const client = new FieldSyncClient({ address: syncAddress, token: () => requestToken.getStore() ?? "" });
  return createServer((req, res) => {
    void (async () => {
      const match = /^\/devices\/([^/]+)\/sync$/.exec(req.url ?? "");
      if (req.method !== "POST" || !match) return reply(res, 404, { error: "POST /devices/{clientId}/sync" });
      const deviceToken = /^Bearer (.+)$/.exec(req.headers.authorization ?? "")?.[1];
      if (!deviceToken) return reply(res, 401, { error: "authorization: Bearer <token> required" });
      let queue: MemoryQueue;
      try {
        const { mutations } = (await body(req)) as { mutations: DeviceMutation[] };
        queue = new MemoryQueue();
        for (const m of mutations) {
          queue.add({
            clientSeq: BigInt(m.clientSeq),
            mutationId: m.mutationId,
            op: m.op,
            collection: m.collection,
            recordId: m.recordId,
            fields: fields(m.fields),
            baseVersion: BigInt(m.baseVersion ?? 0),
            ...(m.clientTime ? { clientTime: new Date(m.clientTime) } : {}),
          });
        }
      } catch (err) {
        return reply(res, 400, { error: `bad request: ${String(err)}` });
      }
      const results: MutationResult[] = [];
      try {
        const report = await requestToken.run(deviceToken, () =>
          client.sync(decodeURIComponent(match[1]!), queue, { onResults: (rs) => void results.push(...rs) }),
        );
        reply(res, 200, {
          results: results.map((r) => toJson(MutationResultSchema, r)),
          pending: report.pending,
        });
      } catch (err) {
        // What was answered before the failure is final: the device drops those and
        // resends the rest later.
        const e = err instanceof SyncError ? err : new SyncError(String(err));
        const status = e.code === "UNAUTHENTICATED" ? 401 : e.code === "PERMISSION_DENIED" ? 403 : 502;
        reply(res, status, {
          error: e.message,
          code: e.code,
          reason: e.reason,
          results: results.map((r) => toJson(MutationResultSchema, r)),
        });
      }
    })();
  });
}

if (import.meta.url === `file://${process.argv[1]}`) {
  const sync = process.env["FIELDSYNC_SYNC_ADDR"] ?? "127.0.0.1:50051";
  const port = Number(process.env["PORT"] ?? 8080);
  backend(sync).listen(port, "127.0.0.1", () => {
    console.log(`backend on http://127.0.0.1:${port}, relaying to the sync service at ${sync}`);
  });
}
