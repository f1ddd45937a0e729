// The TypeScript client's tests, in one process sharing one pair of real services:
// rpc.ts (every RPC of both services, errors, tenancy, int64, the README's example) and
// sync.ts (the reconnect protocol, a killed and restarted server, examples/backend.ts).
import { after, before } from "node:test";
import { stopAll } from "./harness.js";
import { startServices } from "./services.js";

before(startServices);
after(stopAll);

await import("./rpc.js");
await import("./sync.js");
