// The services every test module shares (one sync service, one audit service), started by
// fieldsync.test.ts: a service start costs seconds of CPU, so the suite pays for two
// (and the restart of the sync test), not one pair per file.
import { Service, freePort } from "./harness.js";

/** The sync service's FIELDSYNC_MAX_BATCH in these tests. */
export const MAX_BATCH = 100;

export const services = {} as { sync: Service; audit: Service };

export async function startServices(): Promise<void> {
  // Both at once (the sync service only reaches the audit service after a write).
  const auditAddress = `127.0.0.1:${await freePort()}`;
  [services.audit, services.sync] = await Promise.all([
    Service.start("audit_service", { address: auditAddress }),
    Service.start("sync_service", { env: { FIELDSYNC_AUDIT_ADDR: auditAddress, FIELDSYNC_MAX_BATCH: String(MAX_BATCH) } }),
  ]);
}
