"""latency and concurrent: online clients calling ApplyBatch on the SQLite service;
and latency_floor beside latency (bench.scenarios.floors).

latency: one client, `ApplyBatch` calls of one mutation each, one after
another (after a few untimed warm-up calls) -> p50 and p99 of the call time.

concurrent: 50 clients at once (each its own client_id, user and channel,
spread over five tenants), each sending its mutations in batches, one batch
after another -> aggregate mutations/s, batch latency percentiles, and
errors (failed calls plus REJECTED results: the workload has none that
should be). `run_concurrent` is shared with concurrent_pg.

latency_metrics: the latency run again in each repetition, with the
Prometheus endpoint on (tracing off); `ratio_vs_metrics_off` is its p50 over
the p50 without metrics in the same repetition. The two alternate which goes
first.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from bench import driver, procs, workload
from bench.context import Ctx
from bench.driver import ConcurrentClient, Tally
from bench.scenarios import floors
from bench.stats import Figures, percentile, summarize
from fieldsync.v1 import sync_pb2

WARMUP_CALLS = 20
TENANTS = 5
METRICS_ON = {"FIELDSYNC_SYNC_METRICS_ADDR": "127.0.0.1:0"}


def _requests(client_id: str, mutations: Sequence[sync_pb2.Mutation], batch: int) -> list[bytes]:
    return [
        workload.apply_batch_bytes(client_id, mutations[i : i + batch])
        for i in range(0, len(mutations), batch)
    ]


def concurrent_clients(
    n_clients: int, per_client: int, batch: int, *, prefix: str = "c"
) -> list[ConcurrentClient]:
    clients = []
    for i in range(n_clients):
        client_id = f"{prefix}{i:03d}"
        muts = workload.rounds_workload(
            f"{client_id}-", max(1, per_client // 10), per_client, seed=i
        )
        md = workload.metadata(tenant=f"tenant{i % TENANTS}", sub=f"user{i:03d}")
        clients.append(ConcurrentClient(md, _requests(client_id, muts, batch)))
    return clients


def concurrent_figures(t: Tally) -> Figures:
    rejected = t.statuses["rejected"]
    return {
        "value": round(t.rate, 1),
        "mutations": t.mutations,
        "seconds": round(t.seconds, 3),
        "p50_batch_ms": round(percentile(t.latencies_ms, 50), 3),
        "p99_batch_ms": round(percentile(t.latencies_ms, 99), 3),
        "max_batch_ms": round(max(t.latencies_ms, default=0.0), 3),
        "errors": len(t.errors) + rejected,
        "failed_calls": len(t.errors),
        "rejected": rejected,
        "conflicts": t.statuses["conflict"],
        "truncated": t.truncated,
        "statuses": dict(t.statuses),
        "first_error": t.errors[0] if t.errors else "",
    }


def run_concurrent(addresses: Sequence[str], ctx: Ctx, *, cap: float) -> Figures:
    s = ctx.sizes
    clients = concurrent_clients(s.concurrent_clients, s.concurrent_mutations, s.concurrent_batch)
    tally = driver.apply_concurrently(addresses, clients, deadline=cap)
    figures = concurrent_figures(tally)
    figures["clients"] = len(clients)
    return figures


def run(ctx: Ctx) -> dict[str, Figures]:
    s = ctx.sizes
    warm = workload.rounds_workload("warm-", 10, WARMUP_CALLS)
    warm_reqs = [workload.apply_batch_bytes("warm", [m]) for m in warm]
    muts = workload.rounds_workload("lat-", max(1, s.latency_calls // 10), s.latency_calls)
    reqs = [workload.apply_batch_bytes("lat", [m]) for m in muts]
    latency_runs: list[Figures] = []
    metrics_runs: list[Figures] = []
    floor_runs: list[Figures] = []
    concurrent_runs: list[Figures] = []
    for rep in ctx.repetitions("latency+concurrent"):
        folder = ctx.folder(f"latency-{rep}")
        metrics_folder = ctx.folder(f"latency-metrics-{rep}")
        if rep % 2:
            with_metrics = _latency_run(ctx, metrics_folder, warm_reqs, reqs, METRICS_ON)
            plain = _latency_run(ctx, folder, warm_reqs, reqs)
        else:
            plain = _latency_run(ctx, folder, warm_reqs, reqs)
            with_metrics = _latency_run(ctx, metrics_folder, warm_reqs, reqs, METRICS_ON)
        on, off = with_metrics["p50_ms"], plain["p50_ms"]
        ratio = on / off if isinstance(on, float) and isinstance(off, float) and off else 0.0
        with_metrics["ratio_vs_metrics_off"] = round(ratio, 4)
        on_cpu, off_cpu = with_metrics["cpu_us_per_call"], plain["cpu_us_per_call"]
        with_metrics["cpu_ratio_vs_metrics_off"] = (
            round(on_cpu / off_cpu, 4)
            if isinstance(on_cpu, float) and isinstance(off_cpu, float) and off_cpu
            else 0.0
        )
        latency_runs.append(plain)
        metrics_runs.append(with_metrics)
        floor_runs.append(
            floors.latency_floor(
                ctx.folder(f"latency-floor-{rep}"), warm_reqs, reqs, cap=s.latency_cap
            )
        )
        floor_p50 = floor_runs[-1]["p50_ms"]
        plain["ratio_vs_floor"] = (
            round(plain["p50_ms"] / floor_p50, 4)  # type: ignore[operator]
            if isinstance(floor_p50, float) and floor_p50 > 0
            else 0.0
        )
        ctx.log(
            f"latency rep {rep + 1}/{ctx.reps}: p50 {plain['p50_ms']} ms, "
            f"p99 {plain['p99_ms']} ms over {plain['calls']} calls; with metrics "
            f"p50 {with_metrics['p50_ms']} ms; floor p50 {floor_p50} ms, "
            f"p99 {floor_runs[-1]['p99_ms']} ms ({plain['ratio_vs_floor']} x)"
        )

        folder = ctx.folder(f"concurrent-{rep}")
        proc = procs.start_sync(f"sqlite:///{folder / 'sync.db'}", ctx.audit_addr, folder)
        with procs.running(proc):
            figures = run_concurrent([proc.address], ctx, cap=s.concurrent_cap)
        concurrent_runs.append(figures)
        ctx.log(
            f"concurrent rep {rep + 1}/{ctx.reps}: {figures['value']:.0f}/s, "
            f"p99 batch {figures['p99_batch_ms']} ms, errors {figures['errors']}"
        )
    return {
        "latency": summarize("ms (p50)", latency_runs),
        "latency_metrics": summarize("ms (p50)", metrics_runs),
        "latency_floor": summarize("ms (p50)", floor_runs),
        "concurrent": summarize("mutations/s", concurrent_runs),
    }


def _latency_run(
    ctx: Ctx,
    folder: Path,
    warm_reqs: list[bytes],
    reqs: list[bytes],
    extra: dict[str, str] | None = None,
) -> Figures:
    proc = procs.start_sync(f"sqlite:///{folder / 'sync.db'}", ctx.audit_addr, folder, extra=extra)
    with procs.running(proc):
        driver.apply_sequential(proc.address, workload.metadata(sub="warm"), warm_reqs, deadline=60)
        cpu = procs.cpu_seconds(proc.pid)
        t = driver.apply_sequential(
            proc.address, workload.metadata(sub="lat"), reqs, deadline=ctx.sizes.latency_cap
        )
        cpu = procs.cpu_seconds(proc.pid) - cpu
    p50 = percentile(t.latencies_ms, 50)
    return {
        "value": round(p50, 3),
        # The service's CPU time per call: steadier than wall time on a busy machine.
        "cpu_us_per_call": round(cpu * 1e6 / max(1, len(t.latencies_ms)), 1),
        "p50_ms": round(p50, 3),
        "p90_ms": round(percentile(t.latencies_ms, 90), 3),
        "p99_ms": round(percentile(t.latencies_ms, 99), 3),
        "max_ms": round(max(t.latencies_ms, default=0.0), 3),
        "calls": len(t.latencies_ms),
        "errors": len(t.errors) + t.statuses["rejected"],
        "truncated": t.truncated,
        "first_error": t.errors[0] if t.errors else "",
    }
