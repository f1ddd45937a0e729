"""The benchmark run: settings from the environment, the scenario groups in order, the report.

Environment:

- `BENCH_QUICK=1`: small sizes, one repetition (checks the harness in under
  two minutes; its figures are not measurements).
- `FIELDSYNC_BENCH_PG_URL`: the PostgreSQL server of the *_pg scenarios
  (default postgresql://postgres@127.0.0.1:5432/test); unreachable means
  those scenarios are skipped, with a note saying why.
- `BENCH_ONLY=group,group`: run only these groups (reconnect, online, text,
  store_size, memory, pull, audit, postgres, pg_tenants, clients), for working on the
  harness.
- `BENCH_KEEP=1`: keep the work folder (databases, service logs); it is kept
  anyway when a group fails.

A group that fails is reported as FAILED (with the error) and the others
still run; the exit status is 1 then, else 0. Missed goals do not change
the exit status: measuring is the bench's job, not judging.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from bench import pg, procs, report
from bench.context import Ctx, Sizes
from bench.scenarios import audit, clients, online, pg_tenants, postgres, reconnect, store, text
from bench.stats import Figures

# Seconds after which no further repetition starts (the limits are 15 and 2 minutes).
BUDGET_FULL = 780.0
BUDGET_QUICK = 90.0

Group = Callable[[Ctx], dict[str, Figures]]
GROUPS: dict[str, tuple[Group, tuple[str, ...]]] = {
    "reconnect": (
        reconnect.run,
        (
            "reconnect_sqlite",
            "storage_floor",
            "transport_floor",
            "reconnect_sqlite_metrics",
            "reconnect_conflicts",
        ),
    ),
    "online": (online.run, ("latency", "latency_metrics", "latency_floor", "concurrent")),
    "store_size": (lambda ctx: {"store_size": store.store_size(ctx)}, ("store_size",)),
    "memory": (lambda ctx: {"memory": store.memory(ctx)}, ("memory",)),
    "pull": (lambda ctx: {"pull": store.pull(ctx)}, ("pull",)),
    "audit": (audit.run, ("audit_relay",)),
    "text": (text.run, ("text_merge", "text_edits_100kb", "text_edits_1mb")),
    "postgres": (postgres.run, ("reconnect_pg", "concurrent_pg")),
    "clients": (clients.run, ("client_sync_ts",)),
    "pg_tenants": (pg_tenants.run, ("reconnect_pg_tenants",)),
}


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # so every `finally` stops what it started


def main() -> int:
    signal.signal(signal.SIGTERM, _on_sigterm)
    quick = os.environ.get("BENCH_QUICK", "") not in ("", "0")
    sizes = Sizes.quick() if quick else Sizes.full()
    only = [g.strip() for g in os.environ.get("BENCH_ONLY", "").split(",") if g.strip()]
    unknown = [g for g in only if g not in GROUPS]
    if unknown:
        print(f"BENCH_ONLY: unknown group(s) {unknown}; known: {list(GROUPS)}", file=sys.stderr)
        return 2
    pg_url = os.environ.get("FIELDSYNC_BENCH_PG_URL") or pg.DEFAULT_URL
    pg_version, pg_why = pg.probe(pg_url)
    pg_note = "" if pg_version else f"PostgreSQL scenarios skipped: {pg_url} unreachable ({pg_why})"
    if pg_note:
        print(pg_note, file=sys.stderr)

    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="fieldsync-bench-"))
    results: dict[str, Any] = {
        "machine": report.machine(pg_version),
        "run": {
            "mode": "quick" if quick else "full",
            "started_at": report.timestamp(),
            "repetitions": sizes.reps,
            "sqlite_synchronous": "FULL",
            "max_batch": 10_000,
            "batch": sizes.batch,
        },
    }
    failed = False
    audit_proc = procs.start_audit(f"sqlite:///{work / 'audit.db'}", work / "audit")
    try:
        ctx = Ctx(
            sizes,
            quick,
            work,
            audit_proc.address,
            pg_url if pg_version else None,
            pg_note,
            budget=BUDGET_QUICK if quick else BUDGET_FULL,
        )
        ctx.log(
            f"{'quick' if quick else 'full'} run, {sizes.reps} repetition(s); work folder {work}"
        )
        for name, (group, scenarios) in GROUPS.items():
            if only and name not in only:
                continue
            ctx.log(f"group {name}: {', '.join(scenarios)}")
            try:
                results.update(group(ctx))
            except Exception as err:
                failed = True
                traceback.print_exc()
                why = f"{type(err).__name__}: {err}"
                for s in scenarios:
                    results.setdefault(s, {"value": None, "unit": "", "failed": why})
        results["run"]["cut_short"] = ctx.cut_short
    finally:
        audit_proc.stop()
        duration = time.monotonic() - started
        results["run"]["duration_s"] = round(duration, 1)
    report.mark_goals(results)
    path = report.write_json(results)
    print()
    print(report.table(results))
    print()
    print(f"{results['run']['mode']} run: {duration:.0f}s; figures in {path}")
    if pg_note:
        print(pg_note)
    if failed or os.environ.get("BENCH_KEEP"):
        print(f"work folder kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0
