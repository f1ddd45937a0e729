"""Where a PostgreSQL run's write transactions spend their time, sampled from the server.

`LockSampler` is a thread on a connection of its own to the bench's
database. Every `interval` seconds it asks the server, for each client
session of that database, whether it

- **waits for its commit turn**: `pg_stat_activity.wait_event_type = 'Lock'`
  (an advisory lock, a row lock on a tenant's feed row: any heavyweight
  lock), or
- **is in the commit section**: it holds the feed lock (a granted advisory
  lock, or the table lock a transaction keeps from its `UPDATE` of
  `tenant_feed` to its commit) and waits for no lock.

The time-weighted means give `lock_wait_share` (the time writes waited for
their turn, as a share of the run of each writing stream) and
`commit_section_share` (the share of the run a stream spent inside the
commit section), the calibration of bench/model.py. It measures from the
database's side, so it sees the same thing whichever lock the service
takes, and needs nothing from the service. A sample costs the server a scan
of pg_stat_activity and pg_locks (about 0.2 ms here): at the default 100 a
second, well under 1 % of a core.
"""

from __future__ import annotations

import os
import resource
import threading
import time
from dataclasses import dataclass

import psycopg

_SAMPLE = """
SELECT
  count(*) FILTER (WHERE a.wait_event_type = 'Lock'),
  count(*) FILTER (WHERE a.wait_event_type IS DISTINCT FROM 'Lock' AND EXISTS (
    SELECT 1 FROM pg_locks l WHERE l.pid = a.pid AND l.granted AND (
      l.locktype = 'advisory'
      OR (l.locktype = 'relation' AND l.relation = to_regclass('tenant_feed')
          AND l.mode = 'RowExclusiveLock'))))
FROM pg_stat_activity a
WHERE a.datname = current_database() AND a.pid <> pg_backend_pid()
  AND a.backend_type = 'client backend' AND a.application_name <> 'fieldsync-feed-listener'
"""


@dataclass
class LockFigures:
    samples: int
    seconds: float
    waiting: float  # mean number of sessions waiting for a lock
    in_section: float  # mean number of sessions inside the commit section

    def shares(self, streams: int) -> tuple[float, float]:
        """(lock_wait_share, commit_section_share) per writing stream."""
        if streams <= 0:
            return 0.0, 0.0
        return self.waiting / streams, self.in_section / streams


class LockSampler:
    """Samples lock waits and commit sections of one database while it runs (a context manager)."""

    def __init__(self, url: str, interval: float = 0.01) -> None:
        self._url = url
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lock-sampler", daemon=True)
        self._waiting = 0
        self._in_section = 0
        self._samples = 0
        self._started = 0.0
        self._seconds = 0.0
        self._error: BaseException | None = None

    def __enter__(self) -> LockSampler:
        self._started = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._seconds = time.perf_counter() - self._started

    def _run(self) -> None:
        try:
            with psycopg.connect(self._url, autocommit=True) as conn:
                while not self._stop.is_set():
                    row = conn.execute(_SAMPLE).fetchone()
                    if row is not None:
                        self._waiting += int(row[0])
                        self._in_section += int(row[1])
                        self._samples += 1
                    self._stop.wait(self._interval)
        except BaseException as err:  # reported by figures(): a bench run must not hang on it
            self._error = err

    def figures(self) -> LockFigures:
        if self._error is not None:
            raise RuntimeError(f"lock sampler failed: {self._error}") from self._error
        n = max(self._samples, 1)
        return LockFigures(self._samples, self._seconds, self._waiting / n, self._in_section / n)


class CpuMeter:
    """CPU seconds used during a block: by given processes, by the database's sessions,
    by this (the bench's client) process, and by the whole machine (/proc/stat), so a
    run can say what it cost and how much of the machine others were using meanwhile."""

    def __init__(self, url: str, pids: list[int]) -> None:
        self._url = url
        self._pids = pids
        self._start: tuple[float, dict[int, float], float, float, float] | None = None
        self.service = self.database = self.client = self.machine = self.seconds = 0.0

    def _backends(self) -> dict[int, float]:
        with psycopg.connect(self._url, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                " AND pid <> pg_backend_pid()"
            ).fetchall()
        out = {}
        for (pid,) in rows:
            try:
                out[int(pid)] = _cpu_of(int(pid))
            except OSError:
                continue  # gone meanwhile
        return out

    def _now(self) -> tuple[float, dict[int, float], float, float, float]:
        service = sum(_cpu_of(p) for p in self._pids)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return (
            service,
            self._backends(),
            usage.ru_utime + usage.ru_stime,
            _machine_busy(),
            time.perf_counter(),
        )

    def __enter__(self) -> CpuMeter:
        self._start = self._now()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._start is not None
        service, backends, client, machine, at = self._now()
        s_service, s_backends, s_client, s_machine, s_at = self._start
        self.service = service - s_service
        self.database = sum(cpu - s_backends.get(pid, 0.0) for pid, cpu in backends.items())
        self.client = client - s_client
        self.machine = machine - s_machine
        self.seconds = at - s_at

    @property
    def ours(self) -> float:
        return self.service + self.database + self.client


def _cpu_of(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # the name (field 2) may hold spaces
    return (int(fields[11]) + int(fields[12])) / _TICK


def _machine_busy() -> float:
    """CPU seconds the whole machine has been busy (all but idle and iowait)."""
    with open("/proc/stat", encoding="ascii") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    return (sum(parts[:8]) - parts[3] - parts[4]) / _TICK


_TICK = os.sysconf("SC_CLK_TCK")
