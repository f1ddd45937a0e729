"""reconnect_sqlite, storage_floor and transport_floor: one offline queue, three ways;
and reconnect_conflicts, the same client meeting desk edits everywhere.

Each repetition builds nothing new: the queue (bench.workload.reconnect_workload)
is serialized once, and in every repetition it goes

- to the real sync service on a fresh SQLite file, through `Sync` after the
  desk client's setup (reconnect_sqlite),
- through the plain SQLAlchemy Core loop on a fresh SQLite file (storage_floor),
- through `Sync` to the in-bench server that stores nothing (transport_floor),

and the conflicting queue (bench.scenarios.conflicts) goes to a service of
its own on a fresh file right after reconnect_sqlite (reconnect_conflicts),
so each ratio compares two figures of the same repetition. The reconnect also
runs a second time in each repetition with the Prometheus endpoint on
(reconnect_sqlite_metrics, tracing off): its ratio to the run without metrics
is the cost of metrics. The two alternate which goes first. `seed_and_stream`
is the reconnect itself, shared with store_size and reconnect_pg.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bench import driver, procs, storage_floor, workload
from bench.context import Ctx
from bench.driver import Tally
from bench.scenarios import conflicts
from bench.stats import Figures, summarize

UNIT = "mutations/s"
SETUP_DEADLINE = 600.0  # setup is not timed, only bounded
METRICS_ON = {"FIELDSYNC_SYNC_METRICS_ADDR": "127.0.0.1:0"}


class SetupFailed(RuntimeError):
    """The untimed setup of a scenario did not do what it must (the service refused it)."""


@dataclass(frozen=True)
class Prepared:
    """A reconnect workload, serialized: the desk's setup batches and the field client's queue."""

    load: workload.ReconnectWorkload
    desk_id: str
    client_id: str
    desk: list[bytes]
    queue: list[bytes]

    @property
    def setup_mutations(self) -> int:
        return sum(len(b) for b in self.load.seed_batches + self.load.desk_batches)


def prepare(
    mutations: int,
    records: int,
    batch: int,
    *,
    prefix: str = "t",
    name: str = "field",
    load: workload.ReconnectWorkload | None = None,
) -> Prepared:
    """`load` (default: bench.workload.reconnect_workload of these sizes), serialized."""
    if load is None:
        load = workload.reconnect_workload(mutations, records, batch=batch, prefix=prefix)
    desk_id, client_id = f"{name}-desk", f"{name}-rep"
    return Prepared(
        load,
        desk_id,
        client_id,
        [workload.sync_batch_bytes(desk_id, b) for b in load.seed_batches + load.desk_batches],
        [workload.sync_batch_bytes(client_id, b) for b in load.queue_batches],
    )


def seed(address: str, prep: Prepared, tenant: str = "acme") -> None:
    """The desk creates the records and edits a few (untimed); every mutation must apply."""
    md = workload.metadata(tenant, sub=prep.desk_id)
    tally = driver.stream_sync(address, md, prep.desk_id, prep.desk, deadline=SETUP_DEADLINE)
    bad = tally.mutations - tally.statuses["applied"]
    if tally.errors or tally.mutations != prep.setup_mutations or bad:
        raise SetupFailed(
            f"seeding {address}: {tally.mutations}/{prep.setup_mutations} answered, "
            f"statuses {dict(tally.statuses)}, errors {tally.errors[:3]}"
        )


def stream(address: str, prep: Prepared, *, cap: float, tenant: str = "acme") -> Tally:
    """The field client's reconnect: its whole queue over one Sync stream (timed)."""
    md = workload.metadata(tenant, sub=prep.client_id)
    return driver.stream_sync(address, md, prep.client_id, prep.queue, deadline=cap)


def seed_and_stream(address: str, prep: Prepared, *, cap: float, tenant: str = "acme") -> Tally:
    seed(address, prep, tenant)
    return stream(address, prep, cap=cap, tenant=tenant)


def tally_figures(t: Tally) -> Figures:
    return {
        "value": round(t.rate, 1),
        "mutations": t.mutations,
        "seconds": round(t.seconds, 3),
        "truncated": t.truncated,
        "errors": len(t.errors),
        "warnings": t.warnings,
        "statuses": dict(t.statuses),
        "first_error": t.errors[0] if t.errors else "",
    }


def run(ctx: Ctx) -> dict[str, Figures]:
    s = ctx.sizes
    prep = prepare(s.reconnect_mutations, s.reconnect_records, s.batch)
    stale = conflicts.conflict_workload(s.reconnect_mutations, s.reconnect_records, batch=s.batch)
    conflict_prep = prepare(0, 0, 0, name="stale", load=stale)
    plain_setup = storage_floor.plain(prep.load.seed_batches + prep.load.desk_batches)
    plain_queue = storage_floor.plain(prep.load.queue_batches)
    service_runs: list[Figures] = []
    metrics_runs: list[Figures] = []
    floor_runs: list[Figures] = []
    transport_runs: list[Figures] = []
    conflict_runs: list[Figures] = []
    for rep in ctx.repetitions("reconnect"):
        folder = ctx.folder(f"reconnect-{rep}")
        if rep % 2:
            with_metrics = _service_run(
                ctx, ctx.folder(f"reconnect-metrics-{rep}"), prep, METRICS_ON
            )
            svc = _service_run(ctx, folder, prep)
        else:
            svc = _service_run(ctx, folder, prep)
            with_metrics = _service_run(
                ctx, ctx.folder(f"reconnect-metrics-{rep}"), prep, METRICS_ON
            )
        with_metrics["ratio_vs_metrics_off"] = _ratio(with_metrics["value"], svc["value"])
        with_metrics["cpu_ratio_vs_metrics_off"] = _ratio(
            with_metrics["cpu_us_per_mutation"], svc["cpu_us_per_mutation"]
        )
        metrics_runs.append(with_metrics)
        conflicted = _service_run(ctx, ctx.folder(f"reconnect-conflicts-{rep}"), conflict_prep)
        floor = _storage_floor_run(folder, prep, plain_setup, plain_queue, s.reconnect_cap)
        transport = _transport_run(folder, prep, s.reconnect_cap)
        svc["ratio_vs_storage_floor"] = _ratio(svc["value"], floor["value"])
        svc["ratio_vs_transport_floor"] = _ratio(svc["value"], transport["value"])
        conflicted["ratio_vs_reconnect"] = _ratio(conflicted["value"], svc["value"])
        service_runs.append(svc)
        floor_runs.append(floor)
        transport_runs.append(transport)
        conflict_runs.append(conflicted)
        ctx.log(
            f"reconnect rep {rep + 1}/{ctx.reps}: service {svc['value']:.0f}/s "
            f"({svc['mutations']} in {svc['seconds']:.1f}s, "
            f"{svc['cpu_us_per_mutation']} us CPU each), storage floor {floor['value']:.0f}/s, "
            f"transport floor {transport['value']:.0f}/s; all conflicting "
            f"{conflicted['value']:.0f}/s ({conflicted['cpu_us_per_mutation']} us CPU each, "
            f"{conflicted['ratio_vs_reconnect']} x), "
            f"with metrics {with_metrics['value']:.0f}/s"
        )
    return {
        "reconnect_sqlite": summarize(UNIT, service_runs),
        "storage_floor": summarize(UNIT, floor_runs),
        "transport_floor": summarize(UNIT, transport_runs),
        "reconnect_sqlite_metrics": summarize(UNIT, metrics_runs),
        "reconnect_conflicts": summarize(UNIT, conflict_runs),
    }


def _ratio(a: object, b: object) -> float:
    if isinstance(a, int | float) and isinstance(b, int | float) and b > 0:
        return round(a / b, 4)
    return 0.0


def _service_run(
    ctx: Ctx, folder: Path, prep: Prepared, extra: dict[str, str] | None = None
) -> Figures:
    proc = procs.start_sync(f"sqlite:///{folder / 'sync.db'}", ctx.audit_addr, folder, extra=extra)
    """The reconnect's figures, and the sync process's CPU (user + system, every thread,
    /proc) over the timed stream per mutation answered."""
    with procs.running(proc):
        seed(proc.address, prep)
        cpu = procs.cpu_seconds(proc.pid)
        tally = stream(proc.address, prep, cap=ctx.sizes.reconnect_cap)
        cpu = procs.cpu_seconds(proc.pid) - cpu
        figures = tally_figures(tally)
        # The service's CPU time per mutation: steadier than wall time on a busy machine.
        figures["cpu_us_per_mutation"] = round(cpu * 1e6 / max(1, tally.mutations), 2)
        figures["service_peak_rss_mb"] = round(procs.vm_hwm_kib(proc.pid) / 1024, 1)
    return figures


def _storage_floor_run(
    folder: Path,
    prep: Prepared,
    setup: list[list[storage_floor.PlainMutation]],
    queue: list[list[storage_floor.PlainMutation]],
    cap: float,
) -> Figures:
    floor = storage_floor.StorageFloor(folder / "floor.db")
    try:
        floor.write_batches(prep.desk_id, setup, deadline=SETUP_DEADLINE)
        done, seconds, truncated = floor.write_batches(prep.client_id, queue, deadline=cap)
    finally:
        floor.close()
    return {
        "value": round(done / seconds, 1) if seconds > 0 else 0.0,
        "mutations": done,
        "seconds": round(seconds, 3),
        "truncated": truncated,
    }


def _transport_run(folder: Path, prep: Prepared, cap: float) -> Figures:
    port = procs.free_port()
    proc = procs.start_process(
        "bench.transport_floor", {}, folder, address=f"127.0.0.1:{port}", args=("--port", str(port))
    )
    with procs.running(proc):
        md = workload.metadata(sub=prep.client_id)
        tally = driver.stream_sync(proc.address, md, prep.client_id, prep.queue, deadline=cap)
    figures = tally_figures(tally)
    for key in ("warnings", "statuses"):
        figures.pop(key)
    return figures
