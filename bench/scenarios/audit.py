"""audit_relay: how fast the sync service's relay empties its outbox into the audit service.

Each repetition: a sync service whose audit service is not running yet
(relay backoff capped at 0.2 s, so the wait for a retry stays small) takes
mutations that each raise two UNKNOWN_FIELD warnings, so its outbox holds N
events; then the audit service starts on the address the relay calls, and
the outbox (`SELECT count(*) FROM outbox` on the sync database, every 20 ms)
is watched until it is empty. `value` = N / (empty - audit service SERVING);
`delivery_events_per_s` counts from the first delivered event instead, which
leaves out the relay's retry wait.
"""

from __future__ import annotations

import random
import sqlite3
import time
from pathlib import Path

from bench import driver, procs, workload
from bench.context import Ctx
from bench.stats import Figures, summarize

POLL = 0.02
RELAY_ENV = {"FIELDSYNC_AUDIT_RELAY_MAX_BACKOFF": "0.2"}


def _queue(client_id: str, n: int, batch: int) -> list[bytes]:
    rng = random.Random(9)
    out = []
    for lo in range(0, n, batch):
        muts = [
            workload.mutation(
                rng,
                seq,
                f"a{seq:07d}",
                {"title": f"Audit {seq}", "legacy_code": seq, "legacy_note": "old client"},
                op=workload.PUT,
                base=0,
            )
            for seq in range(lo + 1, min(n, lo + batch) + 1)
        ]
        out.append(workload.sync_batch_bytes(client_id, muts))
    return out


def _outbox(db: Path) -> int:
    conn = sqlite3.connect(db, timeout=30)
    try:
        return int(conn.execute("SELECT count(*) FROM outbox").fetchone()[0])
    finally:
        conn.close()


def _one(ctx: Ctx, folder: Path, queue: list[bytes]) -> Figures:
    s = ctx.sizes
    audit_addr = f"127.0.0.1:{procs.free_port()}"
    db = folder / "sync.db"
    sync = procs.start_sync(f"sqlite:///{db}", audit_addr, folder, extra=RELAY_ENV)
    with procs.running(sync):
        tally = driver.stream_sync(
            sync.address, workload.metadata(sub="auditee"), "auditee", queue, deadline=600
        )
        if tally.errors or tally.truncated:
            raise RuntimeError(f"audit_relay setup: {tally.errors[:3]}")
        events = _outbox(db)
        audit = procs.start_audit(f"sqlite:///{folder / 'audit.db'}", folder, address=audit_addr)
        with procs.running(audit):
            ready = time.perf_counter()
            stop_at = time.monotonic() + s.audit_cap
            first: tuple[float, int] | None = None
            left = events
            while left and time.monotonic() < stop_at:
                time.sleep(POLL)
                left = _outbox(db)
                if first is None and left < events:
                    first = (time.perf_counter(), left)
            end = time.perf_counter()
    delivered = events - left
    total = end - ready
    delivery = 0.0
    if first is not None and end > first[0]:
        delivery = (first[1] - left) / (end - first[0])
    return {
        "value": round(delivered / total, 1) if total > 0 else 0.0,
        "events": events,
        "delivered": delivered,
        "seconds": round(total, 3),
        "delivery_events_per_s": round(delivery, 1),
        "first_delivery_after_s": round(first[0] - ready, 3) if first else None,
        "truncated": left > 0,
    }


def run(ctx: Ctx) -> dict[str, Figures]:
    queue = _queue("auditee", ctx.sizes.audit_mutations, ctx.sizes.batch)
    runs: list[Figures] = []
    for rep in ctx.repetitions("audit_relay"):
        runs.append(_one(ctx, ctx.folder(f"audit-{rep}"), queue))
        ctx.log(
            f"audit_relay rep {rep + 1}/{ctx.reps}: {runs[-1]['value']:.0f} events/s "
            f"({runs[-1]['delivered']}/{runs[-1]['events']} in {runs[-1]['seconds']}s)"
        )
    return {"audit_relay": summarize("events/s", runs)}
