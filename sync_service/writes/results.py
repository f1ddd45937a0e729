"""The stored form of a mutation's result, for answering its replays (SPEC §3).

A mutation's outcome is stored with the batch that applied it, as a small JSON
payload: `s` status, `dt` a duplicate transition, `w` warnings, `e` the error
(class, reason, message), `c` its conflict's id, `k` its record (collection,
id). `result_payload` writes it; `replayed_outcome` reads it back into the
DUPLICATE answer of a resend. The payload's form is stored data: it changes
only with a migration. Nothing here reads or writes the database.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fieldsync.errors import (
    Aborted,
    FailedPrecondition,
    FieldSyncError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Reason,
)
from sync_service.rules.decode import Repair, WarningCode
from sync_service.storage.base import StoredConflict, StoredRecord, StoredResult
from sync_service.writes.model import MutationIn, MutationOutcome, Status

_ERROR_TYPES: dict[str, type[FieldSyncError]] = {
    cls.__name__: cls
    for cls in (InvalidArgument, PermissionDenied, NotFound, FailedPrecondition, Aborted)
}


def result_payload(m: MutationIn, o: MutationOutcome, *, keyed: bool) -> dict[str, Any]:
    """The stored form of `o`; `keyed`: its record is named (a known collection)."""
    payload: dict[str, Any] = {"s": int(o.status)}
    if o.duplicate_transition:
        payload["dt"] = True
    if o.text_overlaps:
        payload["to"] = o.text_overlaps
    if o.warnings:
        payload["w"] = [[str(r.code), r.field, r.message] for r in o.warnings]
    if o.error is not None:
        e = o.error
        payload["e"] = [type(e).__name__, str(e.reason), e.message]
    if o.conflict is not None:
        payload["c"] = o.conflict.conflict_id
    if keyed:
        payload["k"] = [m.collection, m.record_id]
    return payload


def replayed_outcome(
    m: MutationIn,
    stored: StoredResult | None,
    conflicts: Mapping[str, StoredConflict],
    records: Mapping[tuple[str, str], StoredRecord],
) -> MutationOutcome:
    """The DUPLICATE answer to a resend of a committed mutation, from its stored result."""
    outcome = MutationOutcome(m.mutation_id, m.client_seq, Status.DUPLICATE)
    if stored is None:
        return outcome  # its result was pruned: only the fact of its application is kept
    p = stored.payload
    outcome.mutation_id = stored.mutation_id
    outcome.original_status = Status(p["s"])
    outcome.duplicate_transition = bool(p.get("dt"))
    outcome.text_overlaps = list(p.get("to", []))
    outcome.warnings = [Repair(WarningCode(c), f, msg) for c, f, msg in p.get("w", [])]
    if p.get("e"):
        outcome.error = _error_from_payload(p["e"])
    if p.get("c"):
        outcome.conflict = conflicts.get(p["c"])
    if p.get("k"):
        rec = records.get((p["k"][0], p["k"][1]))
        outcome.record = rec if rec is not None and rec.version else None
    return outcome


def _error_from_payload(e: list[str]) -> FieldSyncError:
    cls_name, reason, message = e
    return _ERROR_TYPES.get(cls_name, InvalidArgument)(Reason(reason), message)
