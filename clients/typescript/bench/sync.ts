// `make bench`'s TypeScript side (bench/scenarios/clients.py runs it): one client's offline
// queue delivered with `sync`, timed. The queue is built before the clock starts:
// `--records` PUTs, then PATCHes of `estimate` spread over those records, `--mutations` in
// all, the same workload the Python client is given. Prints one JSON line.
//
//   node dist/bench/sync.js --address 127.0.0.1:50051 --mutations 100000 --records 10000 \
//     --batch 1000   (the token is read from FIELDSYNC_TOKEN)
import { parseArgs } from "node:util";
import { FieldSyncClient, MemoryQueue } from "../src/index.js";

const { values } = parseArgs({
  options: {
    address: { type: "string" },
    mutations: { type: "string", default: "100000" },
    records: { type: "string", default: "10000" },
    batch: { type: "string", default: "1000" },
    "client-id": { type: "string", default: "bench-ts" },
  },
});
const token = process.env["FIELDSYNC_TOKEN"];
if (!values.address || !token) throw new Error("--address and FIELDSYNC_TOKEN are required");
const mutations = Number(values.mutations);
const records = Number(values.records);

const queue = new MemoryQueue();
for (let i = 0; i < mutations; i++) {
  if (i < records) {
    queue.add({ op: "PUT", collection: "tasks", recordId: `ts-${i}`, fields: { title: `t${i}`, estimate: BigInt(i) } });
  } else {
    queue.add({ op: "PATCH", collection: "tasks", recordId: `ts-${i % records}`, fields: { estimate: BigInt(i) } });
  }
}
const client = new FieldSyncClient({ address: values.address, token: () => token, timeoutMs: 60_000 });
const started = performance.now();
const report = await client.sync(values["client-id"], queue, { batchSize: Number(values.batch) });
const seconds = (performance.now() - started) / 1000;
console.log(
  JSON.stringify({
    mutations: report.answered,
    seconds,
    pending: report.pending,
    statuses: { applied: report.applied, merged: report.merged, conflict: report.conflicts, rejected: report.rejected, duplicate: report.duplicates },
  }),
);
