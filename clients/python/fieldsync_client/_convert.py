"""Wire messages <-> the SDK's plain values. No logic beyond the mapping."""

from __future__ import annotations

import grpc  # type: ignore[import-untyped, unused-ignore]  # stubs: types-grpcio

from fieldsync.errors import reason_of
from fieldsync.textops import Delete, Retain
from fieldsync.v1 import common_pb2, sync_pb2
from fieldsync.values import Timestamp, fields_from_proto, fields_to_proto, from_proto

from ._store import Outcome
from ._types import Conflict, ConflictKind, FieldConflict, QueuedMutation
from ._view import ServerState

__all__ = ["conflict_from_proto", "mutation_to_proto", "outcome_from_proto", "record_from_proto"]

_OPS = {"PUT": sync_pb2.OP_PUT, "PATCH": sync_pb2.OP_PATCH, "DELETE": sync_pb2.OP_DELETE}
_STATUS_NAMES = {
    sync_pb2.MUTATION_STATUS_APPLIED: "APPLIED",
    sync_pb2.MUTATION_STATUS_MERGED: "MERGED",
    sync_pb2.MUTATION_STATUS_CONFLICT: "CONFLICT",
    sync_pb2.MUTATION_STATUS_DUPLICATE: "DUPLICATE",
    sync_pb2.MUTATION_STATUS_REJECTED: "REJECTED",
}
_KIND_NAMES: dict[int, ConflictKind] = {
    sync_pb2.CONFLICT_KIND_FIELDS: "FIELDS",
    sync_pb2.CONFLICT_KIND_DELETE_UPDATE: "DELETE_UPDATE",
    sync_pb2.CONFLICT_KIND_UPDATE_DELETE: "UPDATE_DELETE",
    sync_pb2.CONFLICT_KIND_CREATE_CREATE: "CREATE_CREATE",
}
_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


def mutation_to_proto(m: QueuedMutation) -> sync_pb2.Mutation:
    out = sync_pb2.Mutation(
        mutation_id=m.mutation_id,
        client_seq=m.client_seq,
        op=_OPS[m.op],
        collection=m.collection,
        record_id=m.record_id,
        base_version=m.base_version,
        resolves_conflict_id=m.resolves_conflict_id,
    )
    fields_to_proto(dict(m.fields), out.fields)
    for name, ops in m.text_edits.items():
        add = out.text_edits[name].ops.add
        for op in ops:
            if isinstance(op, Retain):
                add(retain=op.n)
            elif isinstance(op, Delete):
                add(delete=op.n)
            else:
                add(insert=op.text)
    out.client_time.seconds, out.client_time.nanos = divmod(m.client_time.nanos, 1_000_000_000)
    return out


def record_from_proto(r: common_pb2.Record) -> ServerState:
    return ServerState(r.collection, r.record_id, r.version, r.deleted, fields_from_proto(r.fields))


def conflict_from_proto(c: sync_pb2.Conflict) -> Conflict:
    created = None
    if c.HasField("created_at"):
        created = Timestamp(c.created_at.seconds * 1_000_000_000 + c.created_at.nanos)
    return Conflict(
        conflict_id=c.conflict_id,
        # A kind this SDK does not know (a newer server) still shows its fields.
        kind=_KIND_NAMES.get(c.kind, "FIELDS"),
        collection=c.collection,
        record_id=c.record_id,
        base_version=c.base_version,
        server_version=c.server_version,
        fields=tuple(
            FieldConflict(f.field, from_proto(f.base), from_proto(f.yours), from_proto(f.theirs))
            for f in c.fields
        ),
        mutation_id=c.mutation_id,
        created_at=created,
    )


def outcome_from_proto(r: sync_pb2.MutationResult, *, compact: bool = False) -> Outcome:
    """`compact`: the stream asked for compact results (SyncHello.compact_results), so an
    APPLIED result without warnings carries its record without the fields."""
    error = reason = code = None
    if r.HasField("error"):
        error = r.error.message or "rejected by the server"
        reason = reason_of(r.error)
        code = _CODE_NAMES.get(r.error.code, str(r.error.code))
    has_record = r.HasField("record") and r.record.version > 0
    has_conflict = r.HasField("conflict") and bool(r.conflict.conflict_id)
    return Outcome(
        client_seq=int(r.client_seq),
        mutation_id=r.mutation_id,
        status=_STATUS_NAMES.get(r.status, "UNSPECIFIED"),
        original_status=_STATUS_NAMES.get(r.original_status),
        record=record_from_proto(r.record) if has_record else None,
        conflict=conflict_from_proto(r.conflict) if has_conflict else None,
        conflict_resolved=has_conflict and r.conflict.resolved,
        error=error,
        reason=reason,
        code=code,
        warnings=len(r.warnings),
        fields_left_out=(
            compact
            and has_record
            and r.status == sync_pb2.MUTATION_STATUS_APPLIED
            and not r.warnings
        ),
    )
