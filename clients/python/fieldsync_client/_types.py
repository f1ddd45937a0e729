"""What the public API returns: plain frozen dataclasses, no I/O and no wire types.

Field values are `fieldsync.values.FieldValue`s (None, bool, int, float, str,
bytes, `Json`, `Timestamp`), the same plain form the server works in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeAlias

from fieldsync.textops import TextOp
from fieldsync.values import FieldValue, Timestamp

__all__ = [
    "Conflict",
    "ConflictKind",
    "FieldConflict",
    "Op",
    "QueueState",
    "QueuedMutation",
    "Record",
    "SyncReport",
]

Op: TypeAlias = Literal["PUT", "PATCH", "DELETE"]
QueueState: TypeAlias = Literal["pending", "rejected"]
ConflictKind: TypeAlias = Literal["FIELDS", "DELETE_UPDATE", "UPDATE_DELETE", "CREATE_CREATE"]


@dataclass(frozen=True)
class Record:
    """One record as this client sees it: the last server state with the queued writes on top."""

    collection: str
    record_id: str
    version: int
    """The last server version this client knows (0: the server has not confirmed it yet)."""
    deleted: bool
    fields: Mapping[str, FieldValue]
    pending: int
    """How many queued mutations for this record the server has not answered yet."""


@dataclass(frozen=True)
class QueuedMutation:
    """One write in the local queue: waiting to be sent, or rejected by the server."""

    client_seq: int
    mutation_id: str
    op: Op
    collection: str
    record_id: str
    fields: Mapping[str, FieldValue]
    base_version: int
    """The record's server version the write was made on (0: never synced)."""
    client_time: Timestamp
    resolves_conflict_id: str
    """The conflict this write answers, or "" for an ordinary write."""
    state: QueueState
    """"pending" until the server answers; "rejected" when it never can apply."""
    error: str | None = None
    """Rejected: the server's message."""
    reason: str | None = None
    """Rejected: the server's stable reason code (e.g. "UNKNOWN_COLLECTION")."""
    code: str | None = None
    """Rejected: the gRPC status code's name (e.g. "INVALID_ARGUMENT")."""
    text_edits: Mapping[str, Sequence[TextOp]] = field(default_factory=dict)
    """Text fields written as operations (see `FieldSyncClient.edit_text`)."""


@dataclass(frozen=True)
class FieldConflict:
    """One field that collided: its value at the base, the losing value, the kept one."""

    field: str
    base: FieldValue
    yours: FieldValue
    """The value of the mutation that raised the conflict (the one not kept)."""
    theirs: FieldValue
    """The server's value (kept until the conflict is resolved)."""


@dataclass(frozen=True)
class Conflict:
    """An open conflict of the tenant, durable on the server until someone resolves it."""

    conflict_id: str
    kind: ConflictKind
    collection: str
    record_id: str
    base_version: int
    server_version: int
    """The record version holding the merge; an answer is made on this version."""
    fields: tuple[FieldConflict, ...]
    mutation_id: str
    """The mutation that raised it (of this client or another)."""
    created_at: Timestamp | None
    answer_queued: bool = False
    """An answer (`resolve`) is in the local queue, not yet delivered."""


@dataclass(frozen=True)
class SyncReport:
    """What one `sync()` did. The first five count the server's answers to this client."""

    applied: int = 0
    merged: int = 0
    conflicts: int = 0
    rejected: int = 0
    duplicates: int = 0
    """Answers for mutations the server had already applied (their answer had been lost)."""
    warnings: int = 0
    """Validation warnings in the answers (a value coerced to its field's type, an unknown
    field dropped, a default applied...): the write went through, but not exactly as sent.
    The audit log has each one (kind VALIDATION_WARNING)."""
    pulled: int = 0
    """Records the change feed brought (others' changes and this client's own)."""
    pending: int = 0
    """Mutations still queued after the sync (0 when the whole queue was delivered)."""
