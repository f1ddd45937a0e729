"""Wire messages <-> the sync service's domain objects, and the page tokens.

Mutations and batches from the wire; outcomes, records and conflicts to it;
a batch's outcomes as the answer message an RPC sends (`batch_answers`); the
opaque ListConflicts page token. No logic beyond the mapping.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Iterable
from typing import TypeVar

from google.protobuf.timestamp_pb2 import Timestamp

from fieldsync.errors import InvalidArgument, Reason
from fieldsync.textops import Delete, Insert, Retain, TextOp
from fieldsync.v1 import common_pb2, sync_pb2
from fieldsync.values import InvalidValue, fields_from_proto, fields_to_proto, to_proto
from sync_service.rules.limits import mutation_problem
from sync_service.rules.textedits import MAX_TEXT_OPS
from sync_service.storage.base import FeedRecord, StoredConflict, StoredRecord
from sync_service.writes.model import BatchIn, BatchOutcome, MutationIn, MutationOutcome, Status


def mutation_from_proto(pm: sync_pb2.Mutation) -> MutationIn:
    """The mutation; one that cannot be read or stored carries why in `invalid`, and
    is rejected by the applier, consuming its sequence (a resend is the same bytes)."""
    wrong = mutation_problem(pm.mutation_id, pm.collection, pm.record_id)
    if wrong is not None:
        return _unreadable(pm, f"mutation.{wrong[0]}: {wrong[1]}")
    try:
        return _mutation_from_proto(pm)
    except InvalidValue as err:
        return _unreadable(pm, err.message)


def _unreadable(pm: sync_pb2.Mutation, why: str) -> MutationIn:
    return MutationIn(
        pm.mutation_id, pm.client_seq, pm.op, pm.collection, pm.record_id, {}, 0, invalid=why
    )


def _mutation_from_proto(pm: sync_pb2.Mutation) -> MutationIn:
    # Positional, and maps read only when set: this runs for every mutation.
    fields = pm.fields
    base_fields = pm.base_fields
    m = MutationIn(
        pm.mutation_id,
        pm.client_seq,
        pm.op,
        pm.collection,
        pm.record_id,
        fields_from_proto(fields) if fields else {},
        pm.base_version,
        _nanos(pm.client_time) if pm.HasField("client_time") else None,
        fields_from_proto(base_fields) if base_fields else {},
        pm.resolves_conflict_id,
    )
    if pm.text_edits:
        _text_edits_from_proto(pm, m)
    return m


def _text_edits_from_proto(pm: sync_pb2.Mutation, m: MutationIn) -> None:
    for name, te in pm.text_edits.items():
        if len(te.ops) > MAX_TEXT_OPS:  # not even read: the mutation is rejected
            m.text_edits_error = f"{name}: {len(te.ops)} operations; at most {MAX_TEXT_OPS}"
            return
        ops: list[TextOp] = []
        for i, e in enumerate(te.ops):
            kind = e.WhichOneof("op")
            if kind == "retain":
                ops.append(Retain(e.retain))
            elif kind == "delete":
                ops.append(Delete(e.delete))
            elif kind == "insert":
                ops.append(Insert(e.insert))
            else:
                m.text_edits_error = f"{name}: operation {i} is neither retain, insert nor delete"
                return
        m.text_edits[name] = ops


def _nanos(ts: Timestamp) -> int:
    if not 0 <= ts.nanos <= 999_999_999:
        raise InvalidValue(f"client_time's nanos must be 0 to 999999999, not {ts.nanos}")
    return ts.seconds * 1_000_000_000 + ts.nanos


def batch_from_proto(pb: sync_pb2.MutationBatch) -> BatchIn:
    return BatchIn(
        client_id=pb.client_id,
        schema_version=pb.schema_version,
        mutations=[mutation_from_proto(m) for m in pb.mutations],
    )


def record_to_proto(
    rec: StoredRecord | FeedRecord, out: common_pb2.Record, *, with_fields: bool = True
) -> None:
    out.collection = rec.collection
    out.record_id = rec.record_id
    out.version = rec.version
    out.deleted = rec.deleted
    if with_fields:
        fields_to_proto(rec.fields, out.fields)
    ts = out.updated_at
    ts.seconds, ts.nanos = divmod(rec.updated_at, 1_000_000_000)
    out.updated_by = rec.updated_by


def conflict_to_proto(c: StoredConflict, out: sync_pb2.Conflict) -> None:
    out.conflict_id = c.conflict_id
    out.kind = c.kind  # type: ignore[assignment]
    out.collection = c.collection
    out.record_id = c.record_id
    out.base_version = c.base_version
    out.server_version = c.server_version
    for f in c.fields:
        pf = out.fields.add(field=f.field)
        to_proto(f.base, pf.base)
        to_proto(f.yours, pf.yours)
        to_proto(f.theirs, pf.theirs)
    out.mutation_id = c.mutation_id
    out.created_at.seconds = c.created_at // 1_000_000_000
    out.created_at.nanos = c.created_at % 1_000_000_000
    out.resolved = c.resolved


def outcome_to_proto(
    o: MutationOutcome, out: sync_pb2.MutationResult, *, compact: bool = False
) -> None:
    """`compact` (SyncHello.compact_results): an APPLIED result without warnings carries
    its record without the fields (they are the client's base plus its own writes)."""
    out.mutation_id = o.mutation_id
    out.client_seq = o.client_seq
    out.status = int(o.status)  # type: ignore[assignment]
    if o.record is not None and o.record.version:
        with_fields = not (compact and o.status is Status.APPLIED and not o.warnings)
        record_to_proto(o.record, out.record, with_fields=with_fields)
    if o.conflict is not None:
        conflict_to_proto(o.conflict, out.conflict)
    for w in o.warnings:
        out.warnings.add(code=str(w.code), field=w.field, message=w.message)
    if o.error is not None:
        out.error.CopyFrom(o.error.to_status())
    out.duplicate_transition = o.duplicate_transition
    out.original_status = int(o.original_status)  # type: ignore[assignment]
    if o.text_overlaps:
        out.text_overlaps.extend(o.text_overlaps)


def batch_outcome_to_proto(
    bo: BatchOutcome, out: sync_pb2.BatchResult | None = None, *, compact: bool = False
) -> sync_pb2.BatchResult:
    """Fill `out` (the result field of a response, so nothing is copied) or a new one;
    `compact` as outcome_to_proto takes it."""
    if out is None:
        out = sync_pb2.BatchResult()
    out.last_applied_seq = bo.last_applied_seq
    add = out.results.add
    for o in bo.results:
        outcome_to_proto(o, add(), compact=compact)
    return out


Answer = TypeVar("Answer", sync_pb2.ApplyBatchResponse, sync_pb2.SyncResponse)


def batch_answers(
    outcomes: list[BatchOutcome], answer: Callable[[], Answer], compact: bool = False
) -> list[Answer]:
    """One answer message (ApplyBatchResponse or SyncResponse) per batch outcome;
    `compact` as outcome_to_proto takes it (SyncHello.compact_results)."""
    out = []
    for o in outcomes:
        msg = answer()
        batch_outcome_to_proto(o, msg.result, compact=compact)
        out.append(msg)
    return out


def records_to_proto(records: Iterable[StoredRecord | FeedRecord]) -> list[common_pb2.Record]:
    out = []
    for rec in records:
        pr = common_pb2.Record()
        record_to_proto(rec, pr)
        out.append(pr)
    return out


def encode_page_token(after: tuple[int, str]) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(after)).encode()).decode()


def decode_page_token(token: str) -> tuple[int, str] | None:
    if not token:
        return None
    try:
        at, cid = json.loads(base64.urlsafe_b64decode(token.encode()))
        if not isinstance(at, int) or not isinstance(cid, str):
            raise ValueError(token)
        return at, cid
    except (ValueError, TypeError, binascii.Error):
        raise InvalidArgument(
            Reason.INVALID_PAGE_TOKEN,
            "the page token was not issued by this server; start the listing again",
            violations=[("page_token", "not issued by this server")],
        ) from None
