"""The write path's metrics (SPEC §11): what each committed write transaction did.

`WriteMetrics` is the applier's observer when the service has a metrics
address (without one the applier has none and nothing here runs). It is told
after each commit, in the worker thread, and adds up the transaction first,
so a batch of a thousand mutations costs a handful of counter increments, not
a thousand (and the adding up runs in C, `Counter.update` over `map`):
`fieldsync_mutations_total` by collection and status,
`fieldsync_validation_warnings_total` by code, conflicts surfaced and
resolved by kind, `fieldsync_write_transactions_total`. The scheduler reports
each write's wait for its transaction (`fieldsync_write_lock_wait_seconds`).

A collection the schema does not know is counted as `unknown`: a label value
never comes from what a client may send unchecked.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from operator import attrgetter
from typing import Any

from fieldsync.metrics import SyncMetrics
from sync_service.rules.merge import ConflictKind
from sync_service.rules.schema import Schema
from sync_service.writes.model import BatchIn, BatchOutcome, Status

__all__ = ["WriteMetrics"]

_STATUS = {int(s): s.name.lower() for s in Status}
_KIND = {int(k): k.name.lower() for k in ConflictKind}
_collection, _status = attrgetter("collection"), attrgetter("status")
_warnings, _conflict = attrgetter("warnings"), attrgetter("conflict")

Committed = Sequence[tuple[Sequence[BatchIn], Sequence[BatchOutcome], Sequence[int]]]
"""Per client of the transaction: its batches, their outcomes, the kinds of the
conflicts it answered."""


class WriteMetrics:
    def __init__(self, metrics: SyncMetrics, schema: Schema) -> None:
        self._m = metrics
        self._known = frozenset(schema.collections)
        self._transactions = metrics.write_transactions
        self._lock_wait = metrics.write_lock_wait
        # Label children looked up once: .labels() costs more than the increment.
        self._children: dict[tuple[str, ...], Any] = {}

    def waited(self, seconds: float) -> None:
        """A write waited `seconds` for its transaction to start."""
        self._lock_wait.observe(seconds)

    def committed(self, runs: Committed) -> None:
        # Counted in C (Counter.update over zip/map) by the raw (collection, Status)
        # pair, then named once a distinct pair: a Python loop a mutation cost a
        # microsecond of the reconnect's CPU.
        pairs: Counter[tuple[str, int]] = Counter()
        warnings: Counter[str] = Counter()
        surfaced: Counter[int] = Counter()
        resolved: Counter[int] = Counter()
        for batches, outcomes, resolved_kinds in runs:
            for batch, outcome in zip(batches, outcomes, strict=False):
                results = outcome.results
                # One result per mutation applied, in order (a batch stops at a gap).
                pairs.update(
                    zip(map(_collection, batch.mutations), map(_status, results), strict=False)
                )
                if any(map(_warnings, results)):
                    warnings.update(str(w.code) for r in results for w in r.warnings)
                surfaced.update(c.kind for c in filter(None, map(_conflict, results)))
            resolved.update(resolved_kinds)
        self._transactions.inc()
        metrics, known = self._m, self._known
        statuses: Counter[tuple[str, str]] = Counter()
        for (collection, status), n in pairs.items():
            name = collection if collection in known else "unknown"
            statuses[(name, _STATUS.get(status, "unspecified"))] += n
        for (collection, status_name), n in statuses.items():
            self._child(metrics.mutations, "m", collection, status_name).inc(n)
        for code, n in warnings.items():
            self._child(metrics.validation_warnings, "w", code).inc(n)
        for kind, n in surfaced.items():
            self._child(metrics.conflicts_surfaced, "s", _KIND.get(kind, "unspecified")).inc(n)
        for kind, n in resolved.items():
            self._child(metrics.conflicts_resolved, "r", _KIND.get(kind, "unspecified")).inc(n)

    def _child(self, metric: Any, tag: str, *labels: str) -> Any:
        key = (tag, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child
