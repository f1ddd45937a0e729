"""The storage interface of the sync service, and the rows that cross it.

Everything the applier and the servicer need from a database is here, as
plain dataclasses and two Protocols: `Storage` (reads, and opening a write
transaction) and `WriteTx` (the set-based reads and the one write of a batch,
all in one transaction). storage/sql.py implements it for SQLite and PostgreSQL (each engine's
differences in storage/sqlite.py and storage/postgres.py); the conformance
suite (tests/test_storage_conformance.py) runs against both.

Every method takes the tenant and filters by it: no method can read or write
another tenant's row.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from fieldsync.values import FieldValue
from sync_service.rules.merge import Change


@dataclass(slots=True)
class StoredRecord:
    tenant_id: str
    collection: str
    record_id: str
    version: int = 0
    deleted: bool = True
    fields: dict[str, FieldValue] = field(default_factory=dict)
    field_versions: dict[str, int] = field(default_factory=dict)
    history_floor: int = 0
    updated_at: int = 0  # nanoseconds since the epoch
    updated_by: str = ""
    exists: bool = False  # whether the row is in the database yet
    last_client: str = ""  # the client of the latest change ("" : unknown)
    others_version: int = 0  # the latest version made by a client other than last_client
    key: int = 0  # the storage's integer name for the record (0: none yet)

    def changed_by_others_since(self, client_id: str, base: int) -> bool:
        """Whether a client other than `client_id` made a version above `base`."""
        if self.last_client != client_id:
            return self.version > base
        return self.others_version > base


class FeedRecord(NamedTuple):
    """A record as the change feed (Pull) carries it: its position and latest state.

    Not what only deciding needs (field versions, history floor, who wrote
    last): a Pull page reads and decodes none of that.
    """

    feed_seq: int
    collection: str
    record_id: str
    version: int
    deleted: bool
    fields: dict[str, FieldValue]
    updated_at: int  # nanoseconds since the epoch
    updated_by: str


@dataclass(slots=True)  # not frozen: built per mutation, and frozen init costs 4x
class HistoryRow:
    """One committed version of a record: who made it and the values it replaced."""

    tenant_id: str
    collection: str
    record_id: str
    version: int
    client_id: str
    mutation_id: str
    old: Mapping[str, FieldValue]
    committed_at: int

    def as_change(self) -> Change:
        return Change(self.version, self.client_id, self.mutation_id, self.old)


@dataclass(slots=True)
class ClientRow:
    client_id: str
    tenant_id: str
    sub: str
    last_seq: int = 0
    exists: bool = False


@dataclass(frozen=True, slots=True)
class StoredFieldConflict:
    field: str
    base: FieldValue
    yours: FieldValue
    theirs: FieldValue


@dataclass(slots=True)
class StoredConflict:
    conflict_id: str
    tenant_id: str
    collection: str
    record_id: str
    kind: int
    base_version: int
    server_version: int
    fields: list[StoredFieldConflict]
    mutation_id: str
    client_id: str
    created_by: str
    created_at: int
    resolved: bool = False
    resolved_at: int | None = None
    resolved_by: str | None = None
    resolution: str | None = None


@dataclass(frozen=True, slots=True)
class ConflictResolution:
    tenant_id: str
    conflict_id: str
    resolved_at: int
    resolved_by: str
    resolution: str  # the answering mutation's id, or the ResolveConflict choice


@dataclass(slots=True)  # not frozen: built per mutation, and frozen init costs 4x
class StoredResult:
    """A mutation's original outcome, kept so a replay is answered identically."""

    client_id: str
    client_seq: int
    tenant_id: str
    mutation_id: str
    payload: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class TextPointRow:
    """What a client's text edit of a field left it with, when the edit left the record
    as it was (so the history holds no trace of it): the client's `text`, and `ops`
    (JSON) from it to the record's value at `version`; the edit was on `base_version`."""

    tenant_id: str
    client_id: str
    collection: str
    record_id: str
    field: str
    base_version: int
    version: int
    text: str
    ops: str
    updated_at: int


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    event_id: str
    tenant_id: str
    payload: Mapping[str, Any]
    created_at: int


@dataclass(slots=True)
class BatchWrite:
    """Everything one transaction commits."""

    client: ClientRow | None = None
    records: list[StoredRecord] = field(default_factory=list)
    history: list[HistoryRow] = field(default_factory=list)
    conflicts: list[StoredConflict] = field(default_factory=list)
    resolutions: list[ConflictResolution] = field(default_factory=list)
    results: list[StoredResult] = field(default_factory=list)
    events: list[OutboxEvent] = field(default_factory=list)
    text_points: list[TextPointRow] = field(default_factory=list)  # each replaces its key's


@dataclass(frozen=True, slots=True)
class ConflictPage:
    conflicts: list[StoredConflict]
    next_after: tuple[int, str] | None


@dataclass(frozen=True, slots=True)
class Ahead:
    """What a client's write still committing will have written, for its next write
    to decide on meanwhile (pipelining, writes/pipeline.py).

    The next write's transaction reads these instead of the database and checks
    them at its write as it checks what it read (so, once the write before has
    committed them, they pass). `since_seq`: the client's sequence before the
    write ahead (its results above that are not stored yet).
    """

    client: ClientRow
    since_seq: int
    records: Mapping[tuple[str, str, str], StoredRecord]  # (tenant, collection, id) -> row
    changes: Mapping[tuple[str, str, str], Sequence[Change]]  # their history, ascending


class WriteConflict(Exception):
    """Another writer changed what this transaction read, before it wrote.

    Only where writers run at once (PostgreSQL, optimistic transactions): the
    transaction is rolled back, nothing of it is kept, and the work is to be
    done again, in an exclusive transaction, which cannot meet this.
    """


class Reads(Protocol):
    """The set-based reads a batch is decided on (a write transaction's)."""

    def get_client(self, client_id: str) -> ClientRow | None: ...

    def load_results(self, client_id: str, seqs: Sequence[int]) -> dict[int, StoredResult]: ...

    def load_records(
        self, tenant_id: str, collection: str, record_ids: Iterable[str]
    ) -> dict[str, StoredRecord]: ...

    def load_changes(
        self, tenant_id: str, collection: str, since: Mapping[str, int]
    ) -> dict[str, list[Change]]:
        """For each record id, its history rows with version > since[id], ascending."""
        ...

    def load_conflicts(self, tenant_id: str, ids: Iterable[str]) -> dict[str, StoredConflict]: ...

    def load_text_points(
        self, tenant_id: str, client_id: str, collection: str, record_ids: Iterable[str]
    ) -> list[TextPointRow]:
        """The client's stored text points of these records (any field)."""
        ...


class WriteTx(Reads, Protocol):
    """One write transaction: what it reads stays true until it commits.

    An exclusive one holds the write lock of the tenants it names from its
    first statement (SQLite: the whole database's). Where writers can run at
    once (PostgreSQL) a transaction can be optimistic instead: it reads and
    decides without any lock, and its write first checks, under the write
    lock of the tenants it touches, that nothing it read has changed since
    (WriteConflict if it has). On SQLite every transaction is exclusive.
    """

    def write(self, batch: BatchWrite) -> None:
        """Store the batch (records get the next feed positions); commit follows.

        A record's history rows go with it: each HistoryRow names a record of
        `batch.records` or one already stored. WriteConflict (an optimistic
        transaction): what it read is no longer so; nothing is written."""
        ...


class Storage(Protocol):
    @property
    def combine_writes(self) -> bool:
        """Whether the service should apply several clients' waiting writes in one
        transaction (where a write transaction holds the whole database anyway)."""
        ...

    @property
    def pipeline_writes(self) -> bool:
        """Whether a client's next write may decide while its last one commits (an
        optimistic transaction given `ahead`: PostgreSQL)."""
        ...

    def write_transaction(
        self, *, exclusive: bool = False, tenants: Sequence[str] = (), ahead: Ahead | None = None
    ) -> AbstractContextManager[WriteTx]:
        """A write transaction (see WriteTx); optimistic where the engine can be. An
        exclusive one names every tenant it will read or write (`tenants`); an
        optimistic one may decide on `ahead` (what a write not committed yet wrote)."""
        ...

    def get_records(
        self, tenant_id: str, collection: str, record_ids: Sequence[str]
    ) -> list[StoredRecord]: ...

    def pull(
        self, tenant_id: str, after: int, collections: Sequence[str], limit: int
    ) -> list[FeedRecord]:
        """Records whose latest change is after feed position `after`, in feed order."""
        ...

    def feed_head(self, tenant_id: str) -> int:
        """The feed position of the tenant's latest change (0 when none)."""
        ...

    def list_conflicts(
        self,
        tenant_id: str,
        *,
        collection: str | None,
        record_id: str | None,
        include_resolved: bool,
        limit: int,
        after: tuple[int, str] | None,
    ) -> ConflictPage: ...

    def get_conflict(self, tenant_id: str, conflict_id: str) -> StoredConflict | None: ...

    def get_client(self, client_id: str) -> ClientRow | None: ...

    def outbox_depth(self) -> tuple[int, int | None]:
        """Undelivered audit events: count and the oldest one's creation time."""
        ...

    def outbox_fetch(
        self, limit: int, max_attempts: int, delivered: Sequence[str] = ()
    ) -> list[OutboxEvent]:
        """The oldest undelivered events (those refused max_attempts times are held back),
        after forgetting `delivered` in the same write (one transaction, not two)."""
        ...

    def outbox_delivered(self, event_ids: Sequence[str]) -> None:
        """Forget events the audit service has acknowledged."""
        ...

    def outbox_refused(self, event_ids: Sequence[str]) -> None:
        """Count one refusal of each event (a malformed event must not block the rest)."""
        ...

    def outbox_parked(self, max_attempts: int) -> int:
        """Events refused max_attempts times or more: no longer fetched, still kept."""
        ...

    def close(self) -> None: ...
