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
        self._pairs: dict[tuple[str, int], Any] = {}

    def waited(self, seconds: float) -> None:
        """A write waited `seconds` for its transaction to start."""
        self._lock_wait.observe(seconds)

    def committed(self, runs: Committed) -> None:
        # Counted in C (Counter.update over zip/map) by the raw (collection, Status)
        # pair, each pair named once: a Python loop a mutation cost 260 ns of the
        # reconnect's CPU, 170 now. Warnings and conflicts are rare: looked at only
        # when a batch has any, so a one-mutation write stays cheap too.
        pairs: Counter[tuple[str, int]] = Counter()
        warnings: list[str] = []
        surfaced: list[int] = []
        resolved: list[int] = []
        for batches, outcomes, resolved_kinds in runs:
            for batch, outcome in zip(batches, outcomes, strict=False):
                results = outcome.results
                # One result per mutation applied, in order (a batch stops at a gap).
                pairs.update(
                    zip(map(_collection, batch.mutations), map(_status, results), strict=False)
                )
                if any(map(_warnings, results)):
                    warnings.extend(str(w.code) for r in results for w in r.warnings)
                if any(map(_conflict, results)):
                    surfaced.extend(c.kind for c in filter(None, map(_conflict, results)))
            resolved.extend(resolved_kinds)
        self._transactions.inc()
        for pair, n in pairs.items():
            self._mutations(pair).inc(n)
        m = self._m
        if warnings:
            for code, n in Counter(warnings).items():
                self._child(m.validation_warnings, "w", code).inc(n)
        for tag, metric, kinds in (
            ("s", m.conflicts_surfaced, surfaced),
            ("r", m.conflicts_resolved, resolved),
        ):
            if kinds:
                for kind, n in Counter(kinds).items():
                    self._child(metric, tag, _KIND.get(kind, "unspecified")).inc(n)

    def _mutations(self, pair: tuple[str, int]) -> Any:
        """The fieldsync_mutations_total child of a raw (collection, status) pair."""
        child = self._pairs.get(pair)
        if child is None:
            collection, status = pair
            known = collection in self._known
            name = collection if known else "unknown"
            child = self._child(self._m.mutations, "m", name, _STATUS.get(status, "unspecified"))
            if known:  # a collection a client made up is not kept: there is no end to them
                self._pairs[pair] = child
        return child

    def _child(self, metric: Any, tag: str, *labels: str) -> Any:
        key = (tag, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child
