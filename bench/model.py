"""A discrete-event model of N sync instances on one PostgreSQL, calibrated from the bench.

What it models: reconnecting clients, each one `Sync` stream of batches on
one instance, each batch decided (reads and the merge, outside any lock) and
then written in the commit section (the feed lock: one global lock, the old
way, or the batch's tenant's row, the new way). Not pipelined, a stream
decides its next batch only once the last one committed; pipelined
(`Calibration.pipelined`, what the PostgreSQL service does since issue 17:
writes/pipeline.py), it decides the next one while the last one is in its
commit section, and enters the section after it. Work is of two kinds:

- **instance CPU** (the GIL): a share `cpu_share` of each phase's time runs
  Python on the instance and queues for that instance's one interpreter;
- **database time**: the rest, a delay (the database's own queues are
  left out: its CPU is a bound, below).

Calibration (`Calibration.measured`) comes from one stream through one
process on this machine, as `reconnect_pg_tenants` measures it: its rate
(so the time per batch, T = batch / rate), the share of T spent inside the
commit section (sampled from PostgreSQL, bench/locksampler.py) and the
share of T the service process was on a CPU. Pipelined, deciding and the
section overlap, so the deciding time is solved for (bisection) as the one
with which the model's one stream makes the measured rate. So the model
reproduces the one-process figure by construction, and its other
predictions are checks.

`this_machine` models the bench's machine: the queues above, bounded by
what the CPUs the run had (`cores_free`: 2 less what the machine's other
users took meanwhile) can do at the measured CPU seconds per mutation of
everything (service, PostgreSQL, client). `grid` models the tiers past it:
each instance on a core of its own, 2 streams per instance, their tenants
drawn uniformly or Zipf-skewed (s = 1.1) from 1 to 10,000 tenants, bounded
by PostgreSQL's CPU (`db_cores`, default 16, at the measured PostgreSQL CPU
seconds per mutation).

What it leaves out (docs/scaling.md says what that means for its figures):
retries of optimistic writes (the reconnect workload has none across
tenants, few within one), WAL flush batching, network latency between
machines, and that a larger database machine is not linearly faster.

    python -m bench.model            # calibrate from bench/results/latest.json, print, plot
    python -m bench.model --rate 11938 --section-share 0.41 --cpu-share 0.5 --db-cpu-us 40
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import sys
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
INSTANCES = (1, 2, 4, 8, 16, 32, 64)
TENANT_COUNTS = (1, 10, 100, 1000, 10_000)
ZIPF_S = 1.1


@dataclass(frozen=True)
class Calibration:
    batch: int  # mutations per batch
    decide: float  # seconds per batch outside the commit section
    section: float  # seconds per batch inside it
    cpu_share: float  # of both, the share that is the instance's Python (the GIL)
    db_cpu: float = 0.0  # PostgreSQL's CPU seconds per mutation (0: not bounded)
    machine_cpu: float = 0.0  # everything's CPU seconds per mutation here (service, db, client)
    cores_free: float = 2.0  # the CPUs of this machine the run had (less the others' load)
    pipelined: bool = False  # a stream decides its next batch while the last one writes

    @classmethod
    def measured(
        cls,
        *,
        rate: float,
        batch: int,
        section_share: float,
        service_cpu_share: float,
        db_cpu: float = 0.0,
        machine_cpu: float = 0.0,
        cores_free: float = 2.0,
        pipelined: bool = False,
    ) -> Calibration:
        """From one stream through one process: mutations/s, the shares of its time spent
        in the commit section and on the service's CPU, and CPU seconds per mutation.

        Not pipelined, a batch's time is its deciding and its commit section, one
        after the other. Pipelined, they overlap, so the deciding time is the one
        with which the model's one stream makes the measured rate (bisection)."""
        per_batch = batch / rate
        section = min(max(section_share, 0.0), 1.0) * per_batch
        cal = cls(
            batch,
            per_batch - section,
            section,
            min(max(service_cpu_share, 0.0), 1.0),
            db_cpu,
            machine_cpu,
            cores_free,
            pipelined,
        )
        if not pipelined:
            return cal
        low, high = 0.0, per_batch
        for _ in range(30):
            mid = (low + high) / 2
            trial = replace(cal, decide=mid)
            if simulate(trial, instances=1, stream_tenants=[0], lock="tenant") > rate:
                low = mid  # too fast: deciding takes longer
            else:
                high = mid
        return replace(cal, decide=(low + high) / 2)


class _Sim:
    """A minimal event loop: callbacks at simulated times."""

    def __init__(self) -> None:
        self.now = 0.0
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0

    def at(self, delay: float, fn: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._events, (self.now + delay, self._seq, fn))

    def run(self, until: float) -> None:
        while self._events and self._events[0][0] <= until:
            self.now, _, fn = heapq.heappop(self._events)
            fn()
        self.now = until


class _Resource:
    """`capacity` servers, first come first served."""

    def __init__(self, capacity: int) -> None:
        self.free = capacity
        self._queue: deque[Callable[[], None]] = deque()

    def take(self, then: Callable[[], None]) -> None:
        if self.free > 0:
            self.free -= 1
            then()
        else:
            self._queue.append(then)

    def give(self) -> None:
        if self._queue:
            self._queue.popleft()()
        else:
            self.free += 1


def simulate(
    cal: Calibration,
    *,
    instances: int,
    stream_tenants: Sequence[int],
    lock: str,
    batches_per_stream: int = 30,
) -> float:
    """Aggregate mutations/s of the streams (stream i on instance i % instances, writing
    to tenant stream_tenants[i]) over a run in which each stream could do about
    `batches_per_stream` batches alone: the queues for each instance's GIL and for the
    lock (global, or one per tenant); the database's time as a delay."""
    if lock not in ("global", "tenant"):
        raise ValueError(f"lock is 'global' or 'tenant', not {lock!r}")
    sim = _Sim()
    gils = [_Resource(1) for _ in range(instances)]
    locks: dict[int, _Resource] = {}
    done = [0]
    g = cal.cpu_share

    def phase(inst: int, seconds: float, then: Callable[[], None]) -> None:
        """The instance's Python (queued on its GIL), then the database's part."""

        def on_gil() -> None:
            def release() -> None:
                gils[inst].give()
                sim.at((1 - g) * seconds, then)

            sim.at(g * seconds, release)

        gils[inst].take(on_gil)

    def stream(inst: int, tenant: int) -> None:
        mutex = locks.setdefault(0 if lock == "global" else tenant, _Resource(1))
        state = {"writing": False, "decided": False}

        def decide() -> None:
            phase(inst, cal.decide, decided)

        def decided() -> None:
            if state["writing"]:  # pipelined: the batch before is still writing
                state["decided"] = True
            else:
                mutex.take(enter)

        def enter() -> None:
            state["writing"] = True
            if cal.pipelined:
                decide()  # the next batch decides while this one writes and commits
            phase(inst, cal.section, leave)

        def leave() -> None:
            mutex.give()
            done[0] += cal.batch
            state["writing"] = False
            if not cal.pipelined:
                decide()
            elif state["decided"]:
                state["decided"] = False
                mutex.take(enter)

        decide()

    for i, tenant in enumerate(stream_tenants):
        stream(i % instances, tenant)
    horizon = batches_per_stream * (cal.decide + cal.section)
    warmup = horizon * 0.1
    sim.run(warmup)
    before = done[0]
    sim.run(horizon)
    return (done[0] - before) / (horizon - warmup)


def this_machine(cal: Calibration, *, instances: int, tenants: int, lock: str) -> float:
    """The bench's runs here: `tenants` streams (one per tenant, at least one per
    instance) on `instances` processes; at most what the CPUs the run had can do
    (`cores_free` / `machine_cpu`), since everything shares them."""
    streams = max(tenants, instances)
    queued = simulate(
        cal, instances=instances, stream_tenants=[i % tenants for i in range(streams)], lock=lock
    )
    return min(queued, cal.cores_free / cal.machine_cpu) if cal.machine_cpu > 0 else queued


def tenants_of(streams: int, tenants: int, skew: str, rng: random.Random) -> list[int]:
    """Each stream's tenant: uniform over `tenants`, or Zipf (s = 1.1) over them."""
    if skew == "uniform":
        return [rng.randrange(tenants) for _ in range(streams)]
    weights = [1 / (k + 1) ** ZIPF_S for k in range(tenants)]
    return rng.choices(range(tenants), weights=weights, k=streams)


def grid(
    cal: Calibration, *, streams_per_instance: int = 2, db_cores: int = 16, seed: int = 17
) -> list[dict[str, object]]:
    """Predictions for INSTANCES x TENANT_COUNTS, uniform and Zipf, old and new lock."""
    rows: list[dict[str, object]] = []
    db_bound = db_cores / cal.db_cpu if cal.db_cpu > 0 else 0.0
    for skew in ("uniform", "zipf"):
        for tenants in TENANT_COUNTS:
            for n in INSTANCES:
                rng = random.Random(seed)
                assigned = tenants_of(n * streams_per_instance, tenants, skew, rng)
                row: dict[str, object] = {"skew": skew, "tenants": tenants, "instances": n}
                for lock in ("global", "tenant"):
                    queued = simulate(
                        cal, instances=n, stream_tenants=assigned, lock=lock, batches_per_stream=20
                    )
                    row[lock] = round(min(queued, db_bound) if db_bound else queued)
                rows.append(row)
    return rows


def table(rows: Sequence[dict[str, object]]) -> str:
    """A Markdown table: one line per skew and tenant count, global / per-tenant per instances."""
    head = "| tenants (skew) | " + " | ".join(f"{n} inst." for n in INSTANCES) + " |"
    lines = [head, "|---" * (len(INSTANCES) + 1) + "|"]
    keyed = {(r["skew"], r["tenants"], r["instances"]): r for r in rows}
    for skew in ("uniform", "zipf"):
        for tenants in TENANT_COUNTS:
            cells = []
            for n in INSTANCES:
                r = keyed[(skew, tenants, n)]
                cells.append(f"{_k(r['global'])} / {_k(r['tenant'])}")
            lines.append(f"| {tenants:,} ({skew}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _k(v: object) -> str:
    return f"{float(v) / 1000:.0f}k" if isinstance(v, int | float) else str(v)


def plot(rows: Sequence[dict[str, object]], path: Path) -> Path:
    import matplotlib  # a bench dependency (pyproject's dev extra), not the service's

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, skew in zip(axes, ("uniform", "zipf"), strict=True):
        for tenants in TENANT_COUNTS:
            mine = [r for r in rows if r["skew"] == skew and r["tenants"] == tenants]
            xs = [int(str(r["instances"])) for r in mine]
            ax.plot(
                xs,
                [float(str(r["tenant"])) for r in mine],
                marker="o",
                label=f"{tenants:,} tenants, per-tenant lock",
            )
        glob = [r for r in rows if r["skew"] == skew and r["tenants"] == TENANT_COUNTS[-1]]
        ax.plot(
            [int(str(r["instances"])) for r in glob],
            [float(str(r["global"])) for r in glob],
            "k--",
            label="global lock (any tenants)",
        )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sync instances (2 streams each)")
        ax.set_title(f"tenants {skew}" + (f" (Zipf s={ZIPF_S})" if skew == "zipf" else ""))
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("modelled mutations/s")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _from_results(path: Path) -> tuple[Calibration, dict[str, object]]:
    data = json.loads(path.read_text())
    f = data.get("reconnect_pg_tenants") or {}
    if not isinstance(f.get("value_1_process"), int | float):
        raise SystemExit(f"{path}: no reconnect_pg_tenants figures (BENCH_ONLY=pg_tenants)")
    cal = Calibration.measured(
        rate=float(f["value_1_process"]),
        batch=int(data.get("run", {}).get("batch", 1000)),
        section_share=float(f["commit_section_share_1"]),
        service_cpu_share=float(f["service_cpu_share_1"]),
        db_cpu=float(f["db_cpu_us_per_mutation_1"]) / 1e6,
        machine_cpu=float(f["machine_cpu_us_per_mutation_1"]) / 1e6,
        cores_free=float(f["cores_free"]),
        pipelined=bool(f.get("pipelined", True)),  # the service pipelines since issue 17
    )
    return cal, f


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=RESULTS / "latest.json")
    p.add_argument("--rate", type=float, help="one stream's mutations/s (instead of --results)")
    p.add_argument("--section-share", type=float, default=0.3)
    p.add_argument("--cpu-share", type=float, default=0.9)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--pipelined", action="store_true", help="the stream pipelines (--rate)")
    p.add_argument("--db-cpu-us", type=float, default=0.0, help="PostgreSQL CPU µs a mutation")
    p.add_argument("--db-cores", type=int, default=16)
    p.add_argument("--png", type=Path, default=RESULTS / "model.png")
    args = p.parse_args(argv)
    measured: dict[str, object] = {}
    if args.rate:
        cal = Calibration.measured(
            rate=args.rate,
            batch=args.batch,
            section_share=args.section_share,
            service_cpu_share=args.cpu_share,
            db_cpu=args.db_cpu_us / 1e6,
            pipelined=args.pipelined,
        )
    else:
        cal, measured = _from_results(args.results)
    print(
        f"calibration: {cal.batch} mutations a batch, {cal.decide * 1000:.1f} ms deciding, "
        f"{cal.section * 1000:.1f} ms in the commit section, {cal.cpu_share:.0%} of it the "
        f"instance's CPU"
    )
    if measured:
        print(
            f"  from: reconnect_pg_tenants one process {measured['value_1_process']}/s, "
            f"commit section share {measured['commit_section_share_1']}, "
            f"service CPU share {measured['service_cpu_share_1']}"
        )
    for n, tenants in ((1, 1), (2, 1), (2, 4)):
        for lock in ("global", "tenant"):
            v = this_machine(cal, instances=n, tenants=tenants, lock=lock)
            line = f"this machine, {n} process(es), {tenants} tenant(s), {lock} lock: {v:,.0f}/s"
            if measured and (n, tenants, lock) == (2, 4, "tenant"):
                m = float(str(measured["value"]))
                line += f"  (measured {m:,.0f}/s: error {v / m - 1:+.1%})"
            print(line)
    rows = grid(cal, db_cores=args.db_cores)
    print()
    print(f"past this machine (global / per-tenant lock; database on {args.db_cores} cores):")
    print(table(rows))
    try:
        print(f"\nplot: {plot(rows, args.png)}")
    except ImportError:
        print("\nno plot: matplotlib is not installed (pip install -e '.[dev]')", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
