"""Where audit events are kept: the `AuditStorage` interface and its SQL implementation.

`SqlAuditStorage` runs on SQLite or PostgreSQL through SQLAlchemy Core; the
schema is created or upgraded by Alembic (`migrate`, run at start).

Two guarantees the readers rely on:

- Each `event_id` is stored once. `record` finds the ids already stored in
  one query and inserts the rest with one executemany; the insert also says
  ON CONFLICT DO NOTHING, so an id another caller stored meanwhile is counted
  as a duplicate, never a failed call.
- Events become visible in `seq` order. Writers take the write lock before
  their first insert (SQLite: BEGIN IMMEDIATE; PostgreSQL: a transaction-scoped
  advisory lock) and hold it until commit, so no transaction can commit a
  smaller seq after a reader has seen a larger one; a tail that asks for
  `seq > position` never skips an event.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import Connection, Select, func, select
from sqlalchemy.dialects import postgresql, sqlite

from audit_service.model import (
    AuditEvent,
    DeadLetter,
    EventFilter,
    EventPage,
    RecordOutcome,
    StoredEvent,
)
from audit_service.tables import VERSION_TABLE, audit_events, dead_letters
from fieldsync.audit_kinds import EventKind
from fieldsync.db import chunks, normalize_url, open_engines, upgrade_schema
from fieldsync.jsontext import dumps
from fieldsync.values import decode_fields, encode_fields

__all__ = ["MIGRATIONS", "AuditStorage", "SqlAuditStorage"]

log = logging.getLogger("fieldsync.audit.storage")

MIGRATIONS = Path(__file__).parent / "migrations"
_PRUNE_CHUNK = 5_000  # rows deleted per transaction, so prune never holds the lock for long
_PG_WRITE_LOCK = 0x46_53_41_55  # "FSAU": the advisory lock id of audit writes


class AuditStorage(Protocol):
    """What the servicer needs of a store of audit events."""

    def record(self, events: Sequence[AuditEvent]) -> RecordOutcome:
        """Store each event whose id is not stored yet; every event offered is counted
        once, as recorded or as a duplicate (a repeat within `events` included)."""
        ...

    def query(self, flt: EventFilter, *, after_seq: int, limit: int) -> EventPage:
        """The tenant's events matching `flt` with seq > after_seq, oldest first."""
        ...

    def events_after(
        self, tenant_id: str, seq: int, kinds: frozenset[EventKind], limit: int
    ) -> list[StoredEvent]:
        """For tailing: the tenant's events of `kinds` (all when empty) after `seq`."""
        ...

    def head(self, tenant_id: str) -> int:
        """The seq of the tenant's newest event (0 when there is none)."""
        ...

    def prune(self, older_than_ns: int) -> int:
        """Delete every event that occurred before the instant; how many were deleted."""
        ...

    def dead_letter(self, letters: Sequence[DeadLetter]) -> int:
        """Keep refused events whole (each key once); how many were new."""
        ...

    def dead_letters(self, limit: int = 1000) -> list[DeadLetter]:
        """The refused events kept, oldest first."""
        ...


class SqlAuditStorage:
    """AuditStorage on one SQLAlchemy URL (sqlite:///path or postgresql://...)."""

    def __init__(self, url: str, *, sqlite_synchronous: str = "FULL", pool_size: int = 5) -> None:
        self.url = normalize_url(url)
        self.dialect, self._write, self._read = open_engines(
            url, sqlite_synchronous=sqlite_synchronous, pool_size=pool_size
        )

    # -- lifecycle ------------------------------------------------------------

    def migrate(self) -> None:
        """Create or upgrade the schema to the newest migration, atomically.

        On the write engine, so SQLite runs it in one BEGIN IMMEDIATE
        transaction and PostgreSQL under the advisory write lock: instances
        starting together wait for each other instead of both creating the
        table, and a crash mid-migration leaves nothing half-built.
        """
        with self._write_transaction() as conn:
            upgrade_schema(conn, MIGRATIONS, version_table=VERSION_TABLE)

    def close(self) -> None:
        self._write.dispose()
        if self._read is not self._write:
            self._read.dispose()

    @contextmanager
    def _write_transaction(self) -> Iterator[Connection]:
        with self._write.begin() as conn:
            if self.dialect == "postgresql":
                conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_WRITE_LOCK})")
            yield conn

    # -- writes ---------------------------------------------------------------

    def record(self, events: Sequence[AuditEvent]) -> RecordOutcome:
        # The first of several events under one id is the one kept.
        unique: dict[str, AuditEvent] = {}
        for ev in events:
            unique.setdefault(ev.event_id, ev)
        if not unique:
            return RecordOutcome(0, len(events))
        recorded_at = time.time_ns()
        c = audit_events.c
        with self._write_transaction() as conn:
            stored: set[str] = set()
            for chunk in chunks(list(unique)):
                stored.update(
                    conn.execute(select(c.event_id).where(c.event_id.in_(chunk))).scalars()
                )
            rows = [_row(ev, recorded_at) for eid, ev in unique.items() if eid not in stored]
            new: list[str] = []
            if rows:
                # RETURNING names only the rows really inserted, whatever the
                # driver reports as rowcount for an executemany.
                new = list(conn.execute(self._insert_new().returning(c.event_id), rows).scalars())
        kinds = Counter(unique[eid].kind.name for eid in new)
        return RecordOutcome(len(new), len(events) - len(new), dict(kinds))

    def dead_letter(self, letters: Sequence[DeadLetter]) -> int:
        unique: dict[str, DeadLetter] = {}
        for d in letters:
            unique.setdefault(d.key, d)
        if not unique:
            return 0
        now = time.time_ns()
        rows = [
            {
                "key": d.key,
                "tenant_id": d.tenant_id.replace("\x00", "\ufffd"),
                "received_at": now,
                "reasons": dumps([list(r) for r in d.reasons]),
                "event": base64.b64encode(d.event).decode("ascii"),
            }
            for d in unique.values()
        ]
        table = dead_letters
        dialect_insert = postgresql.insert if self.dialect == "postgresql" else sqlite.insert
        stmt = dialect_insert(table).on_conflict_do_nothing(index_elements=[table.c.key])
        with self._write_transaction() as conn:
            return len(conn.execute(stmt.returning(table.c.seq), rows).all())

    def dead_letters(self, limit: int = 1000) -> list[DeadLetter]:
        c = dead_letters.c
        with self._read.connect() as conn:
            rows = conn.execute(select(dead_letters).order_by(c.seq).limit(limit)).all()
        return [
            DeadLetter(
                r.key,
                r.tenant_id,
                base64.b64decode(r.event),
                tuple((f, d) for f, d in json.loads(r.reasons)),
            )
            for r in rows
        ]

    def _insert_new(self) -> Any:
        """INSERT that skips an event_id already stored instead of failing."""
        if self.dialect == "postgresql":
            return postgresql.insert(audit_events).on_conflict_do_nothing(
                index_elements=[audit_events.c.event_id]
            )
        return sqlite.insert(audit_events).on_conflict_do_nothing(
            index_elements=[audit_events.c.event_id]
        )

    def prune(self, older_than_ns: int) -> int:
        c = audit_events.c
        doomed = (
            select(c.seq)
            .where(c.occurred_at < older_than_ns)
            .order_by(c.seq)
            .limit(_PRUNE_CHUNK)
            .scalar_subquery()
        )
        total = 0
        while True:
            with self._write.begin() as conn:
                deleted = conn.execute(audit_events.delete().where(c.seq.in_(doomed))).rowcount
            total += deleted
            if deleted < _PRUNE_CHUNK:
                return total

    # -- reads ----------------------------------------------------------------

    def query(self, flt: EventFilter, *, after_seq: int, limit: int) -> EventPage:
        """`after_seq` is the last position of the previous page (0: from the start);
        with `flt.newest_first` the listing runs from the newest event backwards."""
        q = _select(flt, after_seq).limit(limit + 1)
        with self._read.connect() as conn:
            found = [_from_row(r) for r in conn.execute(q)]
        return EventPage(found[:limit], more=len(found) > limit)

    def events_after(
        self, tenant_id: str, seq: int, kinds: frozenset[EventKind], limit: int
    ) -> list[StoredEvent]:
        q = _select(EventFilter(tenant_id, kinds=kinds), seq).limit(limit)
        with self._read.connect() as conn:
            return [_from_row(r) for r in conn.execute(q)]

    def head(self, tenant_id: str) -> int:
        q = select(func.coalesce(func.max(audit_events.c.seq), 0)).where(
            audit_events.c.tenant_id == tenant_id
        )
        with self._read.connect() as conn:
            return int(conn.execute(q).scalar_one())


def _select(flt: EventFilter, after_seq: int) -> Select[Any]:
    c = audit_events.c
    q = select(audit_events).where(c.tenant_id == flt.tenant_id)
    if flt.newest_first:
        q = q.where(c.seq < after_seq) if after_seq else q
    else:
        q = q.where(c.seq > after_seq)
    if flt.kinds:
        q = q.where(c.kind.in_(sorted(int(k) for k in flt.kinds)))
    if flt.collection:
        q = q.where(c.collection == flt.collection)
    if flt.record_id:
        q = q.where(c.record_id == flt.record_id)
    if flt.mutation_id:
        q = q.where(c.mutation_id == flt.mutation_id)
    if flt.since is not None:
        q = q.where(c.occurred_at >= flt.since)
    if flt.until is not None:
        q = q.where(c.occurred_at < flt.until)
    return q.order_by(c.seq.desc() if flt.newest_first else c.seq)


def _row(ev: AuditEvent, recorded_at: int) -> dict[str, Any]:
    return {
        "event_id": ev.event_id,
        "tenant_id": ev.tenant_id,
        "kind": int(ev.kind),
        "code": ev.code,
        "collection": ev.collection,
        "record_id": ev.record_id,
        "field": ev.field,
        "mutation_id": ev.mutation_id,
        "client_id": ev.client_id,
        "actor": ev.actor,
        "occurred_at": ev.occurred_at,
        "recorded_at": recorded_at,
        "client_schema_version": ev.client_schema_version,
        "message": ev.message,
        "details": dumps(encode_fields(ev.details)),
    }


def _from_row(r: Any) -> StoredEvent:
    return StoredEvent(
        seq=r.seq,
        recorded_at=r.recorded_at,
        event=AuditEvent(
            event_id=r.event_id,
            tenant_id=r.tenant_id,
            kind=EventKind(r.kind),
            occurred_at=r.occurred_at,
            code=r.code,
            collection=r.collection,
            record_id=r.record_id,
            field=r.field,
            mutation_id=r.mutation_id,
            client_id=r.client_id,
            actor=r.actor,
            client_schema_version=r.client_schema_version,
            message=r.message,
            details=decode_fields(json.loads(r.details)),
        ),
    )
