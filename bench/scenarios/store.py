"""store_size, memory and pull: how the SQLite service behaves as data grows.

store_size: the reconnect (a smaller queue: bench.context.Sizes.store_*) on a
service whose database already holds 10,000 records, and on one holding
1,000,000 -> `value` is the ratio large/small of mutations/s (both sides in
the same repetition, in alternating order). The stores are preloaded once
(bench.preload) into template files, copied fresh for every run.

memory: one client streams a long queue (1,000,000 mutations, built while
it is sent) -> the service process's peak resident memory (VmHWM).

pull: an initial `Pull` (empty cursor, the server's page size, as the SDK
does) of a tenant holding 100,000 records -> records/s; and, as a second
figure, the same with the largest page the server allows (BIG_PAGE).
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

from bench import driver, preload, procs, workload
from bench.context import Ctx
from bench.scenarios import reconnect
from bench.stats import Figures, summarize

MIB = 1024
SAMPLE_EVERY = 0.5  # seconds between looks at the service's VmRSS
BIG_PAGE = 5000  # the most a Pull page may hold (sync_service.api.servicer.MAX_PULL_PAGE)


def _template(ctx: Ctx, name: str, n: int) -> Path:
    """A migrated sync database holding n preloaded records."""
    folder = ctx.folder("templates")
    path = folder / f"{name}.db"
    proc = procs.start_sync(f"sqlite:///{path}", ctx.audit_addr, folder)
    proc.stop()  # it ran only to migrate
    seconds = preload.preload(path, n)
    ctx.log(f"preloaded {n:,} records into {path.name} in {seconds:.1f}s")
    return path


def _reconnect_on(ctx: Ctx, template: Path, folder: Path, prep: reconnect.Prepared) -> Figures:
    db = folder / "sync.db"
    shutil.copyfile(template, db)
    proc = procs.start_sync(f"sqlite:///{db}", ctx.audit_addr, folder)
    with procs.running(proc):
        tally = reconnect.seed_and_stream(proc.address, prep, cap=ctx.sizes.store_cap)
    return reconnect.tally_figures(tally)


def store_size(ctx: Ctx) -> Figures:
    s = ctx.sizes
    small = _template(ctx, "small", s.store_small)
    large = _template(ctx, "large", s.store_large)
    prep = reconnect.prepare(s.store_mutations, s.store_records, s.batch, name="store")
    runs: list[Figures] = []
    for rep in ctx.repetitions("store_size"):
        sides = [("small", small), ("large", large)]
        if rep % 2:
            sides.reverse()
        got = {
            label: _reconnect_on(ctx, path, ctx.folder(f"store-{rep}-{label}"), prep)
            for label, path in sides
        }
        a, b = got["small"], got["large"]
        av, bv = float(a["value"] or 0), float(b["value"] or 0)  # type: ignore[arg-type]
        runs.append(
            {
                "value": round(bv / av, 4) if av > 0 else 0.0,
                "small_mutations_per_s": av,
                "large_mutations_per_s": bv,
                "small_records": s.store_small,
                "large_records": s.store_large,
                "mutations": min(int(a["mutations"] or 0), int(b["mutations"] or 0)),  # type: ignore[arg-type]
                "errors": int(a["errors"] or 0) + int(b["errors"] or 0),  # type: ignore[arg-type]
                "truncated": bool(a["truncated"]) or bool(b["truncated"]),
            }
        )
        ctx.log(
            f"store_size rep {rep + 1}/{ctx.reps}: {av:.0f}/s small, {bv:.0f}/s large, "
            f"ratio {runs[-1]['value']}"
        )
    shutil.rmtree(small.parent, ignore_errors=True)
    return summarize("ratio (large/small)", runs)


def _sample_rss(pid: int, stop: threading.Event, out: list[tuple[float, float]]) -> None:
    """VmRSS every SAMPLE_EVERY seconds until stop (or the process is gone)."""
    start = time.monotonic()
    while not stop.wait(SAMPLE_EVERY):
        try:
            out.append((round(time.monotonic() - start, 1), round(procs.vm_rss_kib(pid) / MIB, 1)))
        except (OSError, procs.ProcessFailed):
            return


def memory(ctx: Ctx) -> Figures:
    s = ctx.sizes
    runs: list[Figures] = []
    for rep in ctx.repetitions("memory"):
        folder = ctx.folder(f"memory-{rep}")
        samples: list[tuple[float, float]] = []
        stop = threading.Event()
        proc = procs.start_sync(f"sqlite:///{folder / 'sync.db'}", ctx.audit_addr, folder)
        with procs.running(proc):
            baseline = procs.vm_hwm_kib(proc.pid)
            sampler = threading.Thread(target=_sample_rss, args=(proc.pid, stop, samples))
            sampler.start()
            try:
                client_id = "mem"
                queue = workload.streamed_queue(
                    client_id, s.memory_mutations, max(1, s.memory_mutations // 10), batch=s.batch
                )
                tally = driver.stream_sync(
                    proc.address,
                    workload.metadata(sub=client_id),
                    client_id,
                    queue,
                    deadline=s.memory_cap,
                )
            finally:
                stop.set()
                sampler.join()
            peak = procs.vm_hwm_kib(proc.pid)
            rss = procs.vm_rss_kib(proc.pid)
        grown = (peak - baseline) / MIB
        step = max(1, len(samples) // 10)
        runs.append(
            {
                "value": round(peak / MIB, 1),
                "baseline_mb": round(baseline / MIB, 1),
                "rss_at_end_mb": round(rss / MIB, 1),
                "growth_mb_per_100k_mutations": (
                    round(grown / tally.mutations * 100_000, 2) if tally.mutations else 0.0
                ),
                "mutations": tally.mutations,
                "mutations_per_s": round(tally.rate, 1),
                "errors": len(tally.errors),
                "truncated": tally.truncated,
                "rss_mb_over_time": [list(x) for x in samples[step - 1 :: step]],
                "first_error": tally.errors[0] if tally.errors else "",
            }
        )
        ctx.log(
            f"memory rep {rep + 1}/{ctx.reps}: peak {runs[-1]['value']} MB after "
            f"{tally.mutations:,} mutations (baseline {runs[-1]['baseline_mb']} MB)"
        )
    return summarize("MB (VmHWM)", runs)


def pull(ctx: Ctx) -> Figures:
    s = ctx.sizes
    template = _template(ctx, "pull", s.pull_records)
    runs: list[Figures] = []
    folder = ctx.folder("pull")
    proc = procs.start_sync(f"sqlite:///{template}", ctx.audit_addr, folder)
    with procs.running(proc):
        md = workload.metadata(sub="puller")
        for rep in ctx.repetitions("pull", s.pull_reps):
            n, seconds, pages = driver.pull_all(proc.address, md, deadline=s.pull_cap)
            big_n, big_seconds, _ = driver.pull_all(
                proc.address, md, page_size=BIG_PAGE, deadline=s.pull_cap
            )
            if n != s.pull_records or big_n != s.pull_records:
                raise RuntimeError(f"Pull returned {n}/{big_n} records, not {s.pull_records}")
            runs.append(
                {
                    "value": round(n / seconds, 1),
                    "records": n,
                    "seconds": round(seconds, 3),
                    "pages": pages,
                    f"records_per_s_page_{BIG_PAGE}": round(big_n / big_seconds, 1),
                }
            )
            ctx.log(
                f"pull rep {rep + 1}/{s.pull_reps}: {runs[-1]['value']:.0f} records/s "
                f"({pages} pages); {big_n / big_seconds:.0f}/s with pages of {BIG_PAGE}"
            )
    template.unlink(missing_ok=True)
    return summarize("records/s", runs)
