// The real services as processes, for the TypeScript tests: `python -m sync_service` and
// `python -m audit_service` from the repository's .venv, each on a free loopback port with a
// throwaway SQLite file, ready once an authenticated call answers; and development tokens
// (HS256, signed with the secret the services are started with).
//
// Every process started here is stopped by `stop()`/`kill()`, and `stopAll()` (each test
// file's `after`) stops whatever is still running, so no test leaves one behind.
import { type ChildProcess, spawn } from "node:child_process";
import { createHmac, randomBytes } from "node:crypto";
import { existsSync, mkdtempSync, openSync, readFileSync, rmSync, closeSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { AuditClient, FieldSyncClient } from "../src/index.js";

export const SECRET = "ts-tests-" + randomBytes(12).toString("hex");

function findRepo(): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  while (!existsSync(join(dir, "pyproject.toml"))) {
    const up = dirname(dir);
    if (up === dir) throw new Error("the FieldSync repository (pyproject.toml) is not above this test");
    dir = up;
  }
  return dir;
}

export const REPO = findRepo();
const PYTHON = process.env["FIELDSYNC_PYTHON"] ?? join(REPO, ".venv", "bin", "python");

function b64url(data: string | Buffer): string {
  return Buffer.from(data).toString("base64url");
}

export interface TokenClaims {
  tenant: string;
  sub: string;
  roles?: string[];
  /** Seconds from now; negative: already expired. */
  expiresIn?: number;
  /** Default `fieldsync` (users); `fieldsync-service` for the sync service's own calls. */
  aud?: string;
  secret?: string;
}

/** A development JWT, as `fieldsync-token` mints it. */
export function token(c: TokenClaims): string {
  const header = b64url(JSON.stringify({ alg: "HS256", typ: "JWT" }));
  const now = Math.floor(Date.now() / 1000);
  const payload = b64url(
    JSON.stringify({
      sub: c.sub,
      tenant_id: c.tenant,
      roles: c.roles ?? [],
      aud: c.aud ?? "fieldsync",
      iat: now,
      exp: now + (c.expiresIn ?? 3600),
    }),
  );
  const signature = createHmac("sha256", c.secret ?? SECRET).update(`${header}.${payload}`).digest("base64url");
  return `${header}.${payload}.${signature}`;
}

export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const address = server.address();
      server.close(() => (typeof address === "object" && address ? resolve(address.port) : reject(new Error("no port"))));
    });
  });
}

const running = new Set<Service>();
let workDir: string | undefined;

// `python -m module`, made (on Linux) to die with the test process even when that is
// SIGKILLed (the runner stopping it): the parent-death signal survives the exec.
const BOOT = [
  "import os, signal, sys",
  "if sys.platform.startswith('linux'):",
  "    import ctypes",
  "    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG",
  "os.execv(sys.executable, [sys.executable, '-m', sys.argv[1]])",
].join("\n");

// A test process that ends without its `after` hooks (an uncaught error, Ctrl-C, the
// runner stopping it) still takes its services with it.
function killRunning(): void {
  for (const s of running) s.killNow();
}
process.once("exit", killRunning);
for (const signal of ["SIGINT", "SIGTERM", "SIGHUP"] as const) {
  process.once(signal, () => {
    killRunning();
    process.exit(128 + (signal === "SIGINT" ? 2 : signal === "SIGTERM" ? 15 : 1));
  });
}

/** This test file's scratch folder (databases, service logs), removed by stopAll(). */
export function scratch(): string {
  workDir ??= mkdtempSync(join(tmpdir(), "fieldsync-ts-test-"));
  return workDir;
}

export type Module = "sync_service" | "audit_service";

export interface ServiceOptions {
  /** FIELDSYNC_* settings added to (or overriding) the defaults. */
  env?: { [name: string]: string };
  /** host:port; default a free loopback port. */
  address?: string;
  /** The SQLite file; default a fresh one in scratch(). */
  dbPath?: string;
}

export class Service {
  private exited: Promise<number | null>;
  private code: number | null | undefined;

  private constructor(
    readonly module: Module,
    readonly address: string,
    readonly dbPath: string,
    readonly logPath: string,
    private readonly child: ChildProcess,
    private readonly options: ServiceOptions,
  ) {
    this.exited = new Promise((resolve) => child.once("exit", (code, signal) => resolve(code ?? (signal ? -1 : null))));
    void this.exited.then((code) => {
      this.code = code;
      running.delete(this);
    });
  }

  static async start(module: Module, options: ServiceOptions = {}): Promise<Service> {
    const dir = scratch();
    const address = options.address ?? `127.0.0.1:${await freePort()}`;
    const dbPath = options.dbPath ?? join(dir, `${module}-${randomBytes(4).toString("hex")}.db`);
    const logPath = join(dir, `${module}-${address.replace(":", "-")}-${Date.now()}.log`);
    const env: { [name: string]: string } = {};
    for (const [k, v] of Object.entries(process.env)) if (v !== undefined && !k.startsWith("FIELDSYNC_")) env[k] = v;
    env["FIELDSYNC_JWT_SECRET"] = SECRET;
    env["PYTHONUNBUFFERED"] = "1";
    if (module === "sync_service") {
      env["FIELDSYNC_SYNC_ADDR"] = address;
      env["FIELDSYNC_SYNC_DB"] = `sqlite:///${dbPath}`;
      env["FIELDSYNC_AUDIT_ADDR"] = `127.0.0.1:${await freePort()}`; // nobody's, unless given
    } else {
      env["FIELDSYNC_AUDIT_ADDR"] = address;
      env["FIELDSYNC_AUDIT_DB"] = `sqlite:///${dbPath}`;
    }
    Object.assign(env, options.env ?? {});
    const log = openSync(logPath, "a");
    const child = spawn(PYTHON, ["-c", BOOT, module], { cwd: dir, env, stdio: ["ignore", log, log] });
    closeSync(log);
    const service = new Service(module, address, dbPath, logPath, child, options);
    running.add(service);
    try {
      await service.waitReady();
    } catch (err) {
      await service.kill();
      throw err;
    }
    return service;
  }

  get alive(): boolean {
    return this.code === undefined;
  }

  /** The last lines of its log, for a failure's message. */
  tail(lines = 30): string {
    return readFileSync(this.logPath, "utf8").split("\n").slice(-lines).join("\n");
  }

  // A safety net, not synchronisation: on a loaded 2-core machine a start took 12-25 s.
  private async waitReady(timeoutMs = 90_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    const opts = { address: this.address, timeoutMs: 1000, maxRetries: 0 };
    const probe =
      this.module === "sync_service"
        ? (() => {
            const c = new FieldSyncClient({ ...opts, token: () => token({ tenant: "probe", sub: "probe" }) });
            return () => c.getSchema();
          })()
        : (() => {
            const c = new AuditClient({ ...opts, token: () => token({ tenant: "probe", sub: "p", roles: ["auditor"] }) });
            return () => c.queryEvents({ pageSize: 1 });
          })();
    for (;;) {
      if (!this.alive) throw new Error(`${this.module} exited before it was ready:\n${this.tail()}`);
      try {
        await probe();
        return;
      } catch (err) {
        if (Date.now() > deadline) throw new Error(`${this.module} not ready in ${timeoutMs} ms: ${String(err)}\n${this.tail()}`);
        await new Promise((r) => setTimeout(r, 100));
      }
    }
  }

  /** SIGKILL without waiting (for a process that is exiting). */
  killNow(): void {
    if (this.alive) this.child.kill("SIGKILL");
  }

  /** SIGKILL: a crash, as far as the service can tell. Resolves once it is gone. */
  async kill(): Promise<void> {
    if (this.alive) this.child.kill("SIGKILL");
    await this.exited;
  }

  /** SIGTERM and wait (SIGKILL after 20 s); the exit code. */
  async stop(): Promise<number | null> {
    if (this.alive) {
      this.child.kill("SIGTERM");
      const timer = setTimeout(() => this.child.kill("SIGKILL"), 20_000);
      await this.exited;
      clearTimeout(timer);
    }
    return this.code ?? null;
  }

  /** The same service again: same address, same database, same settings. */
  async restart(): Promise<Service> {
    await this.stop();
    return Service.start(this.module, { ...this.options, address: this.address, dbPath: this.dbPath });
  }
}

/** Stop every service still running and remove the scratch folder. */
export async function stopAll(): Promise<void> {
  await Promise.all([...running].map((s) => s.stop()));
  if (workDir) rmSync(workDir, { recursive: true, force: true });
  workDir = undefined;
}

/** Poll `check` until it returns something truthy (a real condition; bounded). */
export async function eventually<T>(check: () => Promise<T | undefined | false>, timeoutMs = 10_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`not within ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 50));
  }
}
