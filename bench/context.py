"""What every scenario group is given: the sizes, the repetitions, a work folder, the audit
service, the PostgreSQL server (if reachable), and a way to report progress.

`Sizes.full()` is `make bench`; `Sizes.quick()` is `BENCH_QUICK=1 make bench`
(smaller sizes, one repetition: a check of the harness, not a measurement).
Every `*_cap` is the most seconds one timed run may send for: a run that
reaches it stops sending, is measured over what was answered, and is marked
`truncated`, so the whole bench stays inside its time budget however slow
the service is; and once the run is past its budget (`Ctx.budget`), the
scenarios still to come run one repetition only.

Every repetition starts on a settled disk: `os.sync()` first, so the page
cache's writeback of what ran before (hundreds of MB after a reconnect or a
concurrent run) does not land in this repetition's fsyncs. Without it the
latency p50 read 1.7 ms after the concurrent run and 1.3 to 1.5 ms on its own.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Sizes:
    reps: int
    batch: int
    # reconnect_sqlite / storage_floor / transport_floor
    reconnect_mutations: int
    reconnect_records: int
    reconnect_cap: float
    # latency
    latency_calls: int
    latency_cap: float
    # concurrent (and concurrent_pg)
    concurrent_clients: int
    concurrent_mutations: int  # per client
    concurrent_batch: int
    concurrent_cap: float
    # store_size
    store_small: int
    store_large: int
    store_mutations: int
    store_records: int
    store_cap: float
    # memory
    memory_mutations: int
    memory_cap: float
    # pull
    pull_records: int
    pull_reps: int  # more than `reps`: a run is about a second, and one-core CPU-bound
    pull_cap: float
    # audit_relay
    audit_mutations: int  # each raises two warnings
    audit_cap: float
    # reconnect_pg / concurrent_pg
    pg_mutations: int
    pg_records: int
    pg_cap: float
    # client_sync_ts (and the Python client's figure beside it)
    client_mutations: int
    client_records: int
    client_cap: float

    @classmethod
    def full(cls) -> Sizes:
        return cls(
            reps=3,
            batch=1000,
            reconnect_mutations=100_000,
            reconnect_records=10_000,
            reconnect_cap=35,
            latency_calls=1000,
            latency_cap=30,
            concurrent_clients=50,
            concurrent_mutations=2000,
            concurrent_batch=100,
            concurrent_cap=25,
            store_small=10_000,
            store_large=1_000_000,
            store_mutations=20_000,
            store_records=2_000,
            store_cap=12,
            memory_mutations=1_000_000,
            memory_cap=150,  # the whole 1,000,000: about 90 s here
            pull_records=100_000,
            pull_reps=7,
            pull_cap=60,
            audit_mutations=10_000,
            audit_cap=60,
            pg_mutations=100_000,
            pg_records=10_000,
            pg_cap=15,
            client_mutations=100_000,
            client_records=10_000,
            client_cap=120,  # a bound on each client's sync (a failure past it), not a cut
        )

    @classmethod
    def quick(cls) -> Sizes:
        return cls(
            reps=1,
            batch=1000,
            reconnect_mutations=5_000,
            reconnect_records=500,
            reconnect_cap=10,
            latency_calls=100,
            latency_cap=10,
            concurrent_clients=50,
            concurrent_mutations=100,
            concurrent_batch=50,
            concurrent_cap=10,
            store_small=10_000,
            store_large=50_000,
            store_mutations=2_000,
            store_records=200,
            store_cap=5,
            memory_mutations=10_000,
            memory_cap=10,
            pull_records=10_000,
            pull_reps=1,
            pull_cap=20,
            audit_mutations=1_000,
            audit_cap=20,
            pg_mutations=5_000,
            pg_records=500,
            pg_cap=10,
            client_mutations=5_000,
            client_records=500,
            client_cap=30,
        )


@dataclass
class Ctx:
    sizes: Sizes
    quick: bool
    work: Path
    audit_addr: str
    pg_url: str | None
    pg_note: str
    budget: float = 840.0
    started: float = 0.0
    cut_short: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.started = time.monotonic()

    @property
    def reps(self) -> int:
        return self.sizes.reps

    def repetitions(self, scenario: str, reps: int | None = None) -> Iterator[int]:
        """0, 1, … reps-1 (`reps`, or the sizes' `reps`), each on a settled disk; but once the
        whole run is past its budget, no repetition after the first starts (the scenario
        says so in `cut_short`, and its `repetitions` shows it)."""
        for rep in range(self.reps if reps is None else reps):
            if rep and time.monotonic() - self.started > self.budget:
                self.cut_short.append(scenario)
                self.log(f"{scenario}: over the time budget, {rep} repetition(s) only")
                return
            os.sync()
            yield rep

    def log(self, message: str) -> None:
        """A progress line on stderr (the table goes to stdout)."""
        elapsed = time.monotonic() - self.started
        print(f"[{elapsed:6.1f}s] {message}", file=sys.stderr, flush=True)

    def folder(self, name: str) -> Path:
        path = self.work / name
        path.mkdir(parents=True, exist_ok=True)
        return path
