// The connection to a FieldSync service: one HTTP/2 gRPC transport, the bearer token of
// each call, deadlines, and retries of what waiting can cure (the Python SDK's rules).
//
// `Connection.call` runs one attempt (a unary call, or a whole stream that hands what it
// receives to the caller as it goes) and retries it with exponential backoff and jitter
// while the failure is UNAVAILABLE or DEADLINE_EXCEEDED. An attempt that made progress
// before failing resets the count, so a long sync over a flaky link goes on as long as it
// keeps moving. Whatever ends the call becomes a typed SyncError (errors.ts).
import { createGrpcTransport } from "@connectrpc/connect-node";
import type { Interceptor, Transport } from "@connectrpc/connect";
import { RETRYABLE, SyncError, SyncUnauthenticated, connectErrorOf, errorFromCall } from "./errors.js";

/** Returns the token of the next call (called once per call, so it may rotate). */
export type TokenProvider = () => string | Promise<string>;

export interface TlsOptions {
  /** PEM of the CA that signed the server's certificate. */
  ca?: string | Buffer;
  /** PEM client certificate and key, for mutual TLS. */
  cert?: string | Buffer;
  key?: string | Buffer;
}

export interface ConnectionOptions {
  /** host:port of the service, e.g. "127.0.0.1:50051". */
  address: string;
  token: TokenProvider;
  /** Milliseconds each call (and each batch of a sync) may take; default 30,000. */
  timeoutMs?: number;
  /** Retries of a call that failed with UNAVAILABLE or DEADLINE_EXCEEDED; default 5. */
  maxRetries?: number;
  /** Serve over TLS (the service's FIELDSYNC_TLS_* settings); absent: plaintext. */
  tls?: TlsOptions;
  /** Connect interceptors run on every call (logging, tracing). */
  interceptors?: Interceptor[];
}

const BACKOFF_FIRST_MS = 100;
const BACKOFF_CAP_MS = 5000;
const MAX_MESSAGE_BYTES = 32 * 1024 * 1024; // the server's default limit

/** Milliseconds to wait after the `failures`-th failure in a row: half fixed, half random. */
export function backoffDelayMs(failures: number): number {
  const ceiling = Math.min(BACKOFF_CAP_MS, BACKOFF_FIRST_MS * 2 ** (failures - 1));
  return ceiling / 2 + Math.random() * (ceiling / 2);
}

export class Connection {
  readonly address: string;
  readonly timeoutMs: number;
  readonly transport: Transport;
  private readonly token: TokenProvider;
  private readonly maxRetries: number;

  constructor(options: ConnectionOptions) {
    this.address = options.address;
    this.timeoutMs = options.timeoutMs ?? 30_000;
    this.maxRetries = options.maxRetries ?? 5;
    this.token = options.token;
    if (this.timeoutMs <= 0) throw new RangeError("timeoutMs must be positive");
    if (this.maxRetries < 0) throw new RangeError("maxRetries must not be negative");
    const tls = options.tls;
    this.transport = createGrpcTransport({
      baseUrl: `${tls ? "https" : "http"}://${options.address}`,
      interceptors: options.interceptors ?? [],
      readMaxBytes: MAX_MESSAGE_BYTES,
      writeMaxBytes: MAX_MESSAGE_BYTES,
      // A dead connection (the server's host gone) is noticed within ~20 s, not at the
      // next TCP timeout.
      pingIntervalMs: 10_000,
      pingTimeoutMs: 10_000,
      ...(tls ? { nodeOptions: { ca: tls.ca, cert: tls.cert, key: tls.key } } : {}),
    });
  }

  /** The call's `authorization` header, with a token fresh from the provider. */
  async headers(): Promise<{ authorization: string }> {
    let token: string;
    try {
      token = await this.token();
    } catch (err) {
      if (err instanceof SyncError) throw err;
      throw new SyncUnauthenticated(`the token provider failed: ${String(err)}`, { cause: err });
    }
    if (!token) throw new SyncUnauthenticated("no token: the token provider returned an empty one");
    return { authorization: `Bearer ${token}` };
  }

  /** `attempt()`, retried on transient failures; a typed SyncError when it gives up. */
  async call<T>(what: string, attempt: () => Promise<T>, progress: () => number = () => 0): Promise<T> {
    let failures = 0;
    for (;;) {
      const before = progress();
      try {
        return await attempt();
      } catch (err) {
        if (err instanceof SyncError) throw err;
        const code = connectErrorOf(err).code;
        if (!RETRYABLE.has(code)) throw errorFromCall(err, what, this.address);
        if (progress() > before) failures = 0;
        if (failures >= this.maxRetries) throw errorFromCall(err, what, this.address, failures + 1);
        failures += 1;
        await new Promise((resolve) => setTimeout(resolve, backoffDelayMs(failures)));
      }
    }
  }
}
