"""latency_floor: the least one durable one-mutation call can take here, beside `latency`.

The same ApplyBatch requests as `latency` (the same warm-up calls first), one
after another, to bench.latency_floor: a bare grpc.aio server that commits one
row durably to SQLite in a worker thread per call and answers. bench.scenarios.online
runs it in each repetition right after `latency`, so `latency.ratio_vs_floor`
(the service's p50 / the floor's) compares two figures of the same moment.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from bench import driver, procs, workload
from bench.stats import Figures, percentile


def latency_figures(t: driver.Tally) -> Figures:
    p50 = percentile(t.latencies_ms, 50)
    return {
        "value": round(p50, 3),
        "p50_ms": round(p50, 3),
        "p90_ms": round(percentile(t.latencies_ms, 90), 3),
        "p99_ms": round(percentile(t.latencies_ms, 99), 3),
        "max_ms": round(max(t.latencies_ms, default=0.0), 3),
        "calls": len(t.latencies_ms),
        "errors": len(t.errors) + t.statuses["rejected"],
        "truncated": t.truncated,
        "first_error": t.errors[0] if t.errors else "",
    }


def latency_floor(
    folder: Path, warm: Sequence[bytes], requests: Sequence[bytes], *, cap: float
) -> Figures:
    port = procs.free_port()
    proc = procs.start_process(
        "bench.latency_floor",
        {},
        folder,
        address=f"127.0.0.1:{port}",
        args=("--port", str(port), "--db", str(folder / "latency-floor.db")),
    )
    with procs.running(proc):
        driver.apply_sequential(proc.address, workload.metadata(sub="warm"), warm, deadline=60)
        t = driver.apply_sequential(
            proc.address, workload.metadata(sub="lat"), requests, deadline=cap
        )
    return latency_figures(t)
