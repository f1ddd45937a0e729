"""The sync service's requests and results as domain objects (no protobuf).

The servicer converts wire messages to these (sync_service.api.convert); the
scheduler, applier and batch run (sync_service.writes) work only with them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

from fieldsync.errors import FieldSyncError
from fieldsync.textops import TextOp
from fieldsync.values import Fields
from sync_service.rules.decode import Repair
from sync_service.storage.base import StoredConflict, StoredRecord


class Status(IntEnum):
    """Matches the wire MutationStatus."""

    UNSPECIFIED = 0
    APPLIED = 1
    MERGED = 2
    CONFLICT = 3
    DUPLICATE = 4
    REJECTED = 5


@dataclass(slots=True)  # not frozen: built per mutation, and frozen init costs 4x
class MutationIn:
    mutation_id: str
    client_seq: int
    op: int  # wire Op value; validated by the applier
    collection: str
    record_id: str
    fields: Fields
    base_version: int
    client_time: int | None = None  # nanoseconds
    base_fields: Fields = field(default_factory=dict)
    resolves_conflict_id: str = ""
    invalid: str = ""  # why the wire mutation cannot be read (it is rejected), if it cannot
    # text fields sent as operations (SPEC §3); text_edits_error: why the wire's
    # operations could not be read at all (then the mutation is rejected)
    text_edits: dict[str, list[TextOp]] = field(default_factory=dict)
    text_edits_error: str = ""


@dataclass(frozen=True, slots=True)
class BatchIn:
    client_id: str
    schema_version: int
    mutations: list[MutationIn]
    traceparent: str | None = None
    """With tracing on, the W3C trace context of the call that sent the batch: its
    audit events carry it through the outbox (fieldsync.tracing)."""


@dataclass(slots=True)
class MutationOutcome:
    mutation_id: str
    client_seq: int
    status: Status
    record: StoredRecord | None = None
    conflict: StoredConflict | None = None
    warnings: list[Repair] = field(default_factory=list)
    error: FieldSyncError | None = None
    duplicate_transition: bool = False
    original_status: Status = Status.UNSPECIFIED
    text_overlaps: list[str] = field(default_factory=list)


@dataclass(slots=True)
class BatchOutcome:
    results: list[MutationOutcome]
    last_applied_seq: int
