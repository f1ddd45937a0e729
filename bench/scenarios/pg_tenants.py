"""reconnect_pg_tenants: four tenants reconnect at once through two processes on PostgreSQL.

Each repetition, on fresh databases (bench.pg):

1. **one process** (the reference, as `reconnect_pg`'s first half): one
   tenant's client streams the whole queue of `pg_mutations` through one
   service process;
2. **two processes, four tenants**: four tenants (`t0`..`t3`), each with its
   desk setup and a field client whose queue is a quarter of the same size,
   two clients on each process, all four streaming at once. `value` is the
   aggregate mutations/s of the four (first hello to last answer), and
   `ratio_vs_1_process` its ratio to step 1 of the same repetition.

Both steps run under a `LockSampler` (bench/locksampler.py), which gives
`lock_wait_share` (the share of the run the four streams' writes spent
waiting for their commit turn) and, for step 1, `commit_section_share_1`
(the share of the stream's time spent inside the commit section), the
calibration of bench/model.py. The model's predictions for step 2 and for
`reconnect_pg`'s two-process figure (one tenant, two processes) are made
from step 1's figures of the same repetition and reported beside the
measurement (`model_value`, `model_error`).
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

from bench import model, pg, procs
from bench.context import Ctx
from bench.driver import Tally
from bench.locksampler import CpuMeter, LockSampler
from bench.scenarios import reconnect
from bench.stats import Figures, summarize

UNIT = "mutations/s"
TENANTS = 4
PROCESSES = 2


def _sampled_one_process(ctx: Ctx, server: str, prep: reconnect.Prepared) -> Figures:
    with pg.fresh_database(server) as url:
        proc = procs.start_sync(url, ctx.audit_addr, ctx.folder("pgt-1"))
        with procs.running(proc):
            reconnect.seed(proc.address, prep)
            with CpuMeter(url, [proc.pid]) as cpu, LockSampler(url) as sampler:
                tally = reconnect.stream(proc.address, prep, cap=ctx.sizes.pg_cap)
    figures = reconnect.tally_figures(tally)
    lock = sampler.figures()
    wait, section = lock.shares(1)
    n = max(tally.mutations, 1)
    figures["lock_wait_share"] = round(wait, 4)
    figures["commit_section_share"] = round(section, 4)
    figures["service_cpu_share"] = round(cpu.service / cpu.seconds, 4) if cpu.seconds else 0.0
    figures["db_cpu_us_per_mutation"] = round(cpu.database / n * 1e6, 2)
    figures["machine_cpu_us_per_mutation"] = round(cpu.ours / n * 1e6, 2)
    # What the others on the machine used meanwhile, and so what was left for this run.
    others = max(cpu.machine - cpu.ours, 0.0) / cpu.seconds if cpu.seconds else 0.0
    figures["cores_free"] = round(max((os.cpu_count() or 2) - others, 0.1), 3)
    figures["samples"] = lock.samples
    return figures


def _tenants_run(ctx: Ctx, server: str, preps: list[reconnect.Prepared]) -> Figures:
    with pg.fresh_database(server) as url:
        folder = ctx.folder("pgt-4")
        started = [procs.start_sync(url, ctx.audit_addr, folder)]
        try:
            started.append(procs.start_sync(url, ctx.audit_addr, folder))
            plan = [
                (started[i % PROCESSES], prep, f"t{i}") for i, prep in enumerate(preps)
            ]  # two tenants on each process
            for proc, prep, tenant in plan:
                reconnect.seed(proc.address, prep, tenant)
            start = time.perf_counter()
            meter = CpuMeter(url, [p.pid for p in started])
            with meter, LockSampler(url) as sampler, ThreadPoolExecutor(len(plan)) as pool:
                futures = [
                    pool.submit(
                        reconnect.stream, proc.address, prep, cap=ctx.sizes.pg_cap, tenant=tenant
                    )
                    for proc, prep, tenant in plan
                ]
                tallies = [f.result() for f in futures]
            seconds = time.perf_counter() - start
        finally:
            for proc in reversed(started):
                proc.stop()
    total = Tally(seconds=seconds)
    for t in tallies:
        total.merge(t)
    figures = reconnect.tally_figures(total)
    wait, section = sampler.figures().shares(len(plan))
    figures["lock_wait_share"] = round(wait, 4)
    figures["commit_section_share"] = round(section, 4)
    figures["per_tenant_mutations_per_s"] = [round(t.rate, 1) for t in tallies]
    others = max(meter.machine - meter.ours, 0.0) / meter.seconds if meter.seconds else 0.0
    figures["cores_free"] = round(max((os.cpu_count() or 2) - others, 0.1), 3)
    return figures


def run(ctx: Ctx) -> dict[str, Figures]:
    if ctx.pg_url is None:
        return {"reconnect_pg_tenants": {"value": None, "unit": UNIT, "skipped": ctx.pg_note}}
    server = ctx.pg_url
    s = ctx.sizes
    single = reconnect.prepare(s.pg_mutations, s.pg_records, s.batch, name="pgt")
    quarters = [
        reconnect.prepare(
            s.pg_mutations // TENANTS,
            s.pg_records // TENANTS,
            s.batch,
            prefix=f"q{i}",
            name=f"pgt{i}",
        )
        for i in range(TENANTS)
    ]
    runs: list[Figures] = []
    for rep in ctx.repetitions("reconnect_pg_tenants"):
        one = _sampled_one_process(ctx, server, single)
        four = _tenants_run(ctx, server, quarters)
        v1, v4 = float(one["value"] or 0), float(four["value"] or 0)  # type: ignore[arg-type]
        cal = model.Calibration.measured(
            rate=v1,
            batch=s.batch,
            section_share=float(one["commit_section_share"]),  # type: ignore[arg-type]
            service_cpu_share=float(one["service_cpu_share"]),  # type: ignore[arg-type]
            db_cpu=float(one["db_cpu_us_per_mutation"]) / 1e6,  # type: ignore[arg-type]
            machine_cpu=float(one["machine_cpu_us_per_mutation"]) / 1e6,  # type: ignore[arg-type]
            cores_free=float(four["cores_free"]),  # type: ignore[arg-type]
            pipelined=True,  # the service pipelines a stream's groups (writes/pipeline.py)
        )
        predicted = model.this_machine(cal, instances=PROCESSES, tenants=TENANTS, lock="tenant")
        predicted_one_tenant = model.this_machine(
            cal, instances=PROCESSES, tenants=1, lock="tenant"
        )
        figures: Figures = {
            "value": v4,
            "value_1_process": v1,
            "ratio_vs_1_process": round(v4 / v1, 4) if v1 > 0 else 0.0,
            "lock_wait_share": four["lock_wait_share"],
            "commit_section_share": four["commit_section_share"],
            "lock_wait_share_1_process": one["lock_wait_share"],
            "commit_section_share_1": one["commit_section_share"],
            "service_cpu_share_1": one["service_cpu_share"],
            "db_cpu_us_per_mutation_1": one["db_cpu_us_per_mutation"],
            "machine_cpu_us_per_mutation_1": one["machine_cpu_us_per_mutation"],
            "cores_free_1": one["cores_free"],
            "cores_free": four["cores_free"],
            "pipelined": True,
            "model_value": round(predicted, 1),
            "model_error": round(predicted / v4 - 1, 4) if v4 > 0 else 0.0,
            "model_value_2_processes_1_tenant": round(predicted_one_tenant, 1),
            "calibration_decide_ms_per_batch": round(cal.decide * 1000, 2),
            "calibration_section_ms_per_batch": round(cal.section * 1000, 2),
            "mutations": four["mutations"],
            "mutations_1_process": one["mutations"],
            "errors": int(one["errors"] or 0) + int(four["errors"] or 0),  # type: ignore[arg-type]
            "truncated": bool(one["truncated"]) or bool(four["truncated"]),
            "statuses": four["statuses"],
            "per_tenant_mutations_per_s": four["per_tenant_mutations_per_s"],
            "first_error": one["first_error"] or four["first_error"],
        }
        runs.append(figures)
        ctx.log(
            f"reconnect_pg_tenants rep {rep + 1}/{ctx.reps}: one process {v1:.0f}/s "
            f"(commit section {one['commit_section_share']}, cpu {one['service_cpu_share']}); "
            f"4 tenants on 2 processes {v4:.0f}/s ({four['per_tenant_mutations_per_s']}), "
            f"lock wait {four['lock_wait_share']}; model {predicted:.0f}/s"
        )
    return {"reconnect_pg_tenants": summarize(UNIT, runs)}
