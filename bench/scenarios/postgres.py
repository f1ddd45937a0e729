"""reconnect_pg and concurrent_pg: the same workloads on PostgreSQL.

Every run gets a database of its own (`fs_bench_<random>`, created and
dropped on the server at FIELDSYNC_BENCH_PG_URL). reconnect_pg runs the
reconnect (bench.scenarios.reconnect) through one service process, and in
the same repetition through two processes on one database, each with a
client of its own streaming half the queue at the same time (`value` is the
one-process figure, `value_2_processes` the aggregate of the two, and
`ratio_2_vs_1_processes` their ratio). concurrent_pg is concurrent
(bench.scenarios.online) on one process.

When the server cannot be reached the scenarios are skipped, with a note.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from bench import pg, procs
from bench.context import Ctx
from bench.driver import Tally
from bench.scenarios import online, reconnect
from bench.stats import Figures, summarize

UNIT = "mutations/s"


def _one_process(ctx: Ctx, server: str, prep: reconnect.Prepared) -> Figures:
    with pg.fresh_database(server) as url:
        folder = ctx.folder("pg-1")
        proc = procs.start_sync(url, ctx.audit_addr, folder)
        with procs.running(proc):
            return reconnect.tally_figures(
                reconnect.seed_and_stream(proc.address, prep, cap=ctx.sizes.pg_cap)
            )


def _two_processes(
    ctx: Ctx, server: str, preps: tuple[reconnect.Prepared, reconnect.Prepared]
) -> Figures:
    with pg.fresh_database(server) as url:
        folder = ctx.folder("pg-2")
        first = procs.start_sync(url, ctx.audit_addr, folder)
        with procs.running(first):
            second = procs.start_sync(url, ctx.audit_addr, folder)
            with procs.running(second):
                pairs = list(zip((first, second), preps, strict=True))
                for proc, prep in pairs:
                    reconnect.seed(proc.address, prep)
                start = time.perf_counter()
                with ThreadPoolExecutor(max_workers=2) as pool:
                    futures = [
                        pool.submit(reconnect.stream, proc.address, prep, cap=ctx.sizes.pg_cap)
                        for proc, prep in pairs
                    ]
                    tallies = [f.result() for f in futures]
                seconds = time.perf_counter() - start
    total = Tally(seconds=seconds)
    for t in tallies:
        total.merge(t)
    figures = reconnect.tally_figures(total)
    figures["per_process_mutations_per_s"] = [round(t.rate, 1) for t in tallies]
    return figures


def _concurrent(ctx: Ctx, server: str) -> Figures:
    with pg.fresh_database(server) as url:
        folder = ctx.folder("pg-concurrent")
        proc = procs.start_sync(url, ctx.audit_addr, folder)
        with procs.running(proc):
            return online.run_concurrent([proc.address], ctx, cap=ctx.sizes.pg_cap)


def run(ctx: Ctx) -> dict[str, Figures]:
    if ctx.pg_url is None:
        skipped: Figures = {"value": None, "unit": UNIT, "skipped": ctx.pg_note}
        return {"reconnect_pg": dict(skipped), "concurrent_pg": dict(skipped)}
    server = ctx.pg_url
    s = ctx.sizes
    single = reconnect.prepare(s.pg_mutations, s.pg_records, s.batch, name="pg")
    halves = (
        reconnect.prepare(s.pg_mutations // 2, s.pg_records // 2, s.batch, prefix="a", name="pga"),
        reconnect.prepare(s.pg_mutations // 2, s.pg_records // 2, s.batch, prefix="b", name="pgb"),
    )
    reconnect_runs: list[Figures] = []
    concurrent_runs: list[Figures] = []
    for rep in ctx.repetitions("reconnect_pg"):
        one = _one_process(ctx, server, single)
        two = _two_processes(ctx, server, halves)
        v1, v2 = float(one["value"] or 0), float(two["value"] or 0)  # type: ignore[arg-type]
        figures: Figures = {
            "value": v1,
            "value_1_process": v1,
            "value_2_processes": v2,
            "ratio_2_vs_1_processes": round(v2 / v1, 4) if v1 > 0 else 0.0,
            "mutations_1_process": one["mutations"],
            "mutations_2_processes": two["mutations"],
            "errors": int(one["errors"] or 0) + int(two["errors"] or 0),  # type: ignore[arg-type]
            "truncated": bool(one["truncated"]) or bool(two["truncated"]),
            "statuses_1_process": one["statuses"],
            "first_error": one["first_error"] or two["first_error"],
        }
        reconnect_runs.append(figures)
        ctx.log(
            f"reconnect_pg rep {rep + 1}/{ctx.reps}: {v1:.0f}/s one process, {v2:.0f}/s two "
            f"({two['per_process_mutations_per_s']})"
        )
        conc = _concurrent(ctx, server)
        concurrent_runs.append(conc)
        ctx.log(
            f"concurrent_pg rep {rep + 1}/{ctx.reps}: {conc['value']:.0f}/s, "
            f"p99 batch {conc['p99_batch_ms']} ms, errors {conc['errors']}"
        )
    return {
        "reconnect_pg": summarize(UNIT, reconnect_runs),
        "concurrent_pg": summarize(UNIT, concurrent_runs),
    }
