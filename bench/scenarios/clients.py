"""client_sync_ts: the TypeScript client's `sync` of an offline queue, beside the Python client's.

Both clients get the same queue of `client_mutations` writes: `client_records`
PUTs (title, estimate), then PATCHes of `estimate` spread over those records,
all written while offline (base version 0: only the client itself changed
them since). In each repetition:

- the Python SDK (`fieldsync_client.FieldSyncClient`, its SQLite store on a
  fresh file) queues them in one local transaction (untimed), then `sync()`:
  the figure is its push, from the call to the progress callback of the last
  batch's answers (stored in its store, as an app would), so the pull that
  follows is not counted; `python_sync_s` is the whole call;
- the TypeScript client (`clients/typescript/bench/sync.ts`, run with node)
  builds its MemoryQueue (untimed) and times `sync()`,

each against its own sync service on a fresh SQLite file, batches of
`batch`, two in flight (both clients' default). `ratio_vs_python` is TS / Python
inside each repetition; two repetitions (not three: ~100 s each here). No
npm or node here: the scenario is skipped, saying so.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from bench import procs, workload
from bench.context import Ctx
from bench.stats import Figures, summarize
from fieldsync_client import FieldSyncClient

UNIT = "mutations/s"
REPS = 2
ROOT = Path(__file__).resolve().parent.parent.parent
TS_DIR = ROOT / "clients" / "typescript"
TS_SCRIPT = TS_DIR / "dist" / "bench" / "sync.js"


def _skip_reason() -> str | None:
    if shutil.which("node") is None or shutil.which("npm") is None:
        return "node/npm not found: the TypeScript client is not installed here"
    if not (TS_DIR / "node_modules").is_dir():
        return "clients/typescript/node_modules missing: run make install with npm present"
    return None


def _build_ts() -> None:
    subprocess.run(["npm", "run", "--silent", "build"], cwd=TS_DIR, check=True, timeout=300)


def _python_run(ctx: Ctx, folder: Path) -> Figures:
    s = ctx.sizes
    proc = procs.start_sync(f"sqlite:///{folder / 'py-sync.db'}", ctx.audit_addr, folder / "py")
    with procs.running(proc):
        tok = workload.token(sub="bench-py")
        with FieldSyncClient(
            folder / "py-client.db",
            proc.address,
            lambda: tok,
            client_id="bench-py",
            batch_size=s.batch,
            timeout=s.client_cap,
        ) as client:
            with client.transaction():
                for i in range(s.client_mutations):
                    if i < s.client_records:
                        client.put("tasks", f"py-{i}", {"title": f"t{i}", "estimate": i})
                    else:
                        client.patch("tasks", f"py-{i % s.client_records}", {"estimate": i})
            pushed_at: list[float] = []
            started = time.perf_counter()
            report = client.sync(progress=lambda done, total: pushed_at.append(time.perf_counter()))
            whole = time.perf_counter() - started
    push = (pushed_at[-1] - started) if pushed_at else whole
    r = report
    answered = r.applied + r.merged + r.conflicts + r.rejected + r.duplicates
    return {
        "value": round(answered / push, 1) if push > 0 else 0.0,
        "mutations": answered,
        "seconds": round(push, 3),
        "sync_s": round(whole, 3),
        "pending": report.pending,
    }


def _ts_run(ctx: Ctx, folder: Path) -> Figures:
    s = ctx.sizes
    proc = procs.start_sync(f"sqlite:///{folder / 'ts-sync.db'}", ctx.audit_addr, folder / "ts")
    with procs.running(proc):
        env = {**os.environ, "FIELDSYNC_TOKEN": workload.token(sub="bench-ts")}
        out = subprocess.run(
            [
                "node",
                str(TS_SCRIPT),
                "--address",
                proc.address,
                "--mutations",
                str(s.client_mutations),
                "--records",
                str(s.client_records),
                "--batch",
                str(s.batch),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=s.client_cap + 120,  # + building the queue; a bound, not a measurement
            check=False,
        )
    if out.returncode != 0:
        raise RuntimeError(f"the TypeScript sync failed ({out.returncode}): {out.stderr[-2000:]}")
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    seconds = float(figures["seconds"])
    return {
        "value": round(figures["mutations"] / seconds, 1) if seconds > 0 else 0.0,
        "mutations": int(figures["mutations"]),
        "seconds": round(seconds, 3),
        "pending": int(figures["pending"]),
        "statuses": {k: int(v) for k, v in figures["statuses"].items() if v},
    }


def run(ctx: Ctx) -> dict[str, Figures]:
    why = _skip_reason()
    if why:
        ctx.log(f"client_sync_ts skipped: {why}")
        return {"client_sync_ts": {"value": None, "unit": UNIT, "skipped": why}}
    _build_ts()
    runs: list[Figures] = []
    # Two repetitions at most: each is two 100,000-mutation syncs (~100 s here), and the
    # whole bench must stay under 15 minutes.
    for rep in ctx.repetitions("client_sync_ts", reps=min(ctx.reps, REPS)):
        folder = ctx.folder(f"clients-{rep}")
        py = _python_run(ctx, folder)
        ts = _ts_run(ctx, folder)
        ts["python_mutations_per_s"] = py["value"]
        ts["python_seconds"] = py["seconds"]
        ts["python_sync_s"] = py["sync_s"]
        py_value = py["value"]
        ts_value = ts["value"]
        ratio = 0.0
        if isinstance(py_value, float) and isinstance(ts_value, float) and py_value > 0:
            ratio = round(ts_value / py_value, 4)
        ts["ratio_vs_python"] = ratio
        runs.append(ts)
        ctx.log(
            f"clients rep {rep + 1}/{ctx.reps}: TypeScript {ts_value}/s "
            f"({ts['mutations']} in {ts['seconds']}s), Python {py_value}/s "
            f"({py['mutations']} pushed in {py['seconds']}s, sync() {py['sync_s']}s)"
        )
    return {"client_sync_ts": summarize(UNIT, runs)}
