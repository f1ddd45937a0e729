"""The write path's metrics (SPEC §11): what each committed write transaction did.

`WriteMetrics` is the applier's observer when the service has a metrics
address (without one the applier has none and nothing here runs). It is told
after each commit, in the worker thread, and adds up the transaction first,
so a batch of a thousand mutations costs a handful of counter increments, not
a thousand: `fieldsync_mutations_total` by collection and status,
`fieldsync_validation_warnings_total` by code, conflicts surfaced and
resolved by kind, `fieldsync_write_transactions_total`. The scheduler reports
each write's wait for its transaction (`fieldsync_write_lock_wait_seconds`).

A collection the schema does not know is counted as `unknown`: a label value
never comes from what a client may send unchecked.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from fieldsync.metrics import SyncMetrics
from sync_service.rules.merge import ConflictKind
from sync_service.rules.schema import Schema
from sync_service.writes.model import BatchIn, BatchOutcome, Status

__all__ = ["WriteMetrics"]

_STATUS = {s: s.name.lower() for s in Status}
_KIND = {int(k): k.name.lower() for k in ConflictKind}

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
        statuses: Counter[tuple[str, str]] = Counter()
        warnings: Counter[str] = Counter()
        surfaced: Counter[str] = Counter()
        resolved: Counter[str] = Counter()
        known = self._known
        for batches, outcomes, resolved_kinds in runs:
            for batch, outcome in zip(batches, outcomes, strict=False):
                # One result per mutation applied, in order (a batch stops at a gap).
                for m, r in zip(batch.mutations, outcome.results, strict=False):
                    collection = m.collection if m.collection in known else "unknown"
                    statuses[(collection, _STATUS.get(r.status, "unspecified"))] += 1
                    for w in r.warnings:
                        warnings[str(w.code)] += 1
                    if r.conflict is not None:
                        surfaced[_KIND.get(r.conflict.kind, "unspecified")] += 1
            for answered in resolved_kinds:
                resolved[_KIND.get(answered, "unspecified")] += 1
        self._transactions.inc()
        metrics = self._m
        for (collection, status), n in statuses.items():
            self._child(metrics.mutations, "m", collection, status).inc(n)
        for code, n in warnings.items():
            self._child(metrics.validation_warnings, "w", code).inc(n)
        for kind, n in surfaced.items():
            self._child(metrics.conflicts_surfaced, "s", kind).inc(n)
        for kind, n in resolved.items():
            self._child(metrics.conflicts_resolved, "r", kind).inc(n)

    def _child(self, metric: Any, tag: str, *labels: str) -> Any:
        key = (tag, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child
