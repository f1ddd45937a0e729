"""The Storage interface on SQLAlchemy Core, for SQLite and PostgreSQL.

What differs between the two is how writers share the database. On SQLite a
write transaction takes the write lock up front (BEGIN IMMEDIATE; WAL mode,
so readers are never blocked) and holds the whole database: concurrent
writers wait instead of failing or interleaving. On PostgreSQL, where several
service instances write at once, a write transaction is optimistic (it reads
and decides without a lock and its write checks that nothing it read has
changed, see storage/postgres.py) or exclusive (its tenants' feed rows
locked from the start). Either way the tenant's feed row (`tenant_feed`, a
row lock held from handing out the tenant's next feed positions to the
commit) means one tenant's transactions commit in its feed order, so a reader
of that tenant asking for `feed_seq > cursor` never skips a late committer;
other tenants' transactions commit alongside. On
PostgreSQL a write that moves the feed also sends a NOTIFY so other
instances' Subscribe streams wake at once.

The outbox is shared by the relays of every instance: a fetch claims its rows
for a lease (FOR UPDATE SKIP LOCKED on PostgreSQL), so no two relays send the
same event at once and a crashed relay's claims expire.

Queries are set-based: one read of all the records of a batch (per
collection), one of their history, and bulk writes (executemany on SQLite,
COPY on PostgreSQL).

Each engine's differences are its `Engine`'s (storage/sqlite.py,
storage/postgres.py); nothing in this file names an engine.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, and_, func, or_, select

from fieldsync.db import chunks, locked_write, migrate, normalize_url, open_engines
from fieldsync.values import loads_fields
from sync_service.storage.base import (
    Ahead,
    ClientRow,
    ConflictPage,
    FeedRecord,
    OutboxEvent,
    StoredConflict,
    StoredRecord,
)
from sync_service.storage.cache import RecordCache
from sync_service.storage.engine import ChangeListener, Engine
from sync_service.storage.postgres import POSTGRES
from sync_service.storage.rows import (
    PG_FEED_LOCK,
    Statements,
    conflict_from_row,
    fetch,
    get_client,
    load_conflicts,
    load_records,
)
from sync_service.storage.sqlite import SQLITE
from sync_service.storage.tables import (
    conflicts,
    outbox,
    record_history,
    records,
    served_schema,
    text_points,
)
from sync_service.storage.transactions import SqlWriteTx

log = logging.getLogger("fieldsync.storage")

MIGRATIONS = Path(__file__).parent / "migrations"
ENGINES: dict[str, Engine] = {e.name: e for e in (SQLITE, POSTGRES)}


class SchemaDowngrade(ValueError):
    """The schema file's version is below the one the database was served with."""


class SqlStorage:
    """Storage on one SQLAlchemy URL (sqlite:///path or postgresql://...)."""

    # How long a relay's claim on outbox rows holds: longer than one delivery
    # (RecordEvents times out after 30 s), so only a crashed relay's claim expires.
    outbox_lease_seconds = 60.0

    def __init__(
        self,
        url: str,
        *,
        sqlite_synchronous: str = "FULL",
        pool_size: int = 5,
        record_cache: int = 10_000,
    ) -> None:
        self.url = normalize_url(url)
        self._cache = RecordCache(record_cache)
        self._owner = uuid.uuid4().hex  # this instance's name on its outbox claims
        self.dialect, self._write, self._read = open_engines(
            url, sqlite_synchronous=sqlite_synchronous, pool_size=pool_size
        )
        self._statements = Statements.for_paramstyle(self._write.dialect.paramstyle)
        self._engine: Engine = ENGINES[self.dialect]

    @property
    def combine_writes(self) -> bool:
        """Whether the service should apply the writes that wait in one transaction."""
        return self._engine.combine_writes

    @property
    def pipeline_writes(self) -> bool:
        """Whether a client's next write may decide while its last one commits."""
        return self._engine.pipeline_writes

    def change_listener(
        self, loop: asyncio.AbstractEventLoop, wake: Callable[[frozenset[str] | None], None]
    ) -> ChangeListener | None:
        """What calls `wake` on `loop` when another instance commits (None: none can)."""
        return self._engine.change_listener(self.url, loop, wake)

    # -- lifecycle ------------------------------------------------------------

    def migrate(self) -> None:
        """Create or upgrade the schema to the newest migration, atomically.

        On the write engine, so SQLite runs it in one BEGIN IMMEDIATE
        transaction (instances starting together wait for each other; a crash
        mid-migration leaves nothing half-built) and PostgreSQL under the
        advisory write lock.
        """
        migrate(self._write, MIGRATIONS, PG_FEED_LOCK)

    def serve_schema(self, version: int, *, allow_downgrade: bool = False) -> int | None:
        """Record that the database is served with schema `version`; the highest version
        served before (None the first time). A lower version than that raises
        SchemaDowngrade unless `allow_downgrade`; the highest stays recorded either way."""
        s = served_schema.c
        # Under the write lock: instances starting together take turns.
        with locked_write(self._write, PG_FEED_LOCK) as conn:
            before = conn.execute(select(s.version).where(s.id == 1)).scalar()
            if before is not None and version < before and not allow_downgrade:
                raise SchemaDowngrade(
                    f"the schema file has version {version}, but this database was served"
                    f" with version {before}; deploy that schema, or set"
                    " FIELDSYNC_SCHEMA_ALLOW_DOWNGRADE=1 to serve the older one anyway"
                )
            now = time.time_ns()
            if before is None:
                conn.execute(served_schema.insert().values(id=1, version=version, served_at=now))
            elif version >= before:
                conn.execute(
                    served_schema.update().where(s.id == 1).values(version=version, served_at=now)
                )
        return None if before is None else int(before)

    def close(self) -> None:
        self._write.dispose()
        if self._read is not self._write:
            self._read.dispose()

    # -- writes ---------------------------------------------------------------

    @contextmanager
    def write_transaction(
        self, *, exclusive: bool = False, tenants: Sequence[str] = (), ahead: Ahead | None = None
    ) -> Iterator[SqlWriteTx]:
        try:
            with self._write.begin() as conn:
                tx = self._engine.begin(
                    conn,
                    self._statements,
                    self._cache,
                    exclusive=exclusive,
                    tenants=tenants,
                    ahead=ahead,
                )
                yield tx
            tx.committed()
        except BaseException:
            self._cache.forget()  # what the transaction handed it may not be committed
            raise

    def prune_history(self, before_ns: int, *, chunk: int = 2_000) -> int:
        """Forget history rows (and text points) committed before `before_ns` (SPEC §1's
        retention); the number of history rows gone.

        A little at a time, each chunk in a short write transaction of its own, so
        writers wait at most one chunk. Nothing else moves: a writer finds a record's
        history shorter than its versions (sync_service.writes.batch_run) and takes the
        base as unknown, a conflict rather than an overwrite. Records keep their own
        latest state, so no record, feed position or conflict is lost.
        """
        h = record_history.c
        old = select(h.record_key).where(h.committed_at < before_ns).distinct().limit(chunk)
        gone = 0
        while True:
            with self._read.connect() as conn:
                keys = list(conn.execute(old).scalars())
            if not keys:
                break
            with self._write.begin() as conn:
                done = conn.execute(
                    record_history.delete().where(
                        h.record_key.in_(keys), h.committed_at < before_ns
                    )
                )
                gone += done.rowcount
            if len(keys) < chunk:
                break
        with self._write.begin() as conn:
            conn.execute(text_points.delete().where(text_points.c.updated_at < before_ns))
        return gone

    # -- reads ----------------------------------------------------------------

    def get_records(
        self, tenant_id: str, collection: str, record_ids: Sequence[str]
    ) -> list[StoredRecord]:
        with self._read.connect() as conn:
            found = load_records(conn, self._statements, tenant_id, collection, record_ids)
        return [found[r] for r in dict.fromkeys(record_ids) if r in found]

    def pull(
        self, tenant_id: str, after: int, collections: Sequence[str], limit: int
    ) -> list[FeedRecord]:
        ph = self._statements.ph
        sql = (
            "SELECT feed_seq, collection, record_id, version, deleted, fields,"
            f" updated_at, updated_by FROM records WHERE tenant_id = {ph} AND feed_seq > {ph}"
        )
        params: list[Any] = [tenant_id, after]
        if collections:
            sql += f" AND collection IN ({self._statements.marks(len(collections))})"
            params += collections
        sql += f" ORDER BY feed_seq LIMIT {ph}"
        params.append(limit)
        with self._read.connect() as conn:
            rows = fetch(conn, sql, params)
        return [
            FeedRecord(seq, coll, rid, version, bool(deleted), loads_fields(fields), at, by)
            for seq, coll, rid, version, deleted, fields, at, by in rows
        ]

    def feed_head(self, tenant_id: str) -> int:
        q = select(func.coalesce(func.max(records.c.feed_seq), 0)).where(
            records.c.tenant_id == tenant_id
        )
        with self._read.connect() as conn:
            return int(conn.execute(q).scalar_one())

    def list_conflicts(
        self,
        tenant_id: str,
        *,
        collection: str | None,
        record_id: str | None,
        include_resolved: bool,
        limit: int,
        after: tuple[int, str] | None,
    ) -> ConflictPage:
        c = conflicts.c
        q = select(conflicts).where(c.tenant_id == tenant_id)
        if not include_resolved:
            q = q.where(c.resolved.is_(False))
        if collection:
            q = q.where(c.collection == collection)
        if record_id:
            q = q.where(c.record_id == record_id)
        if after is not None:
            at, cid = after
            q = q.where((c.created_at > at) | and_(c.created_at == at, c.conflict_id > cid))
        q = q.order_by(c.created_at, c.conflict_id).limit(limit + 1)
        with self._read.connect() as conn:
            rows = [conflict_from_row(r) for r in conn.execute(q)]
        more = len(rows) > limit
        rows = rows[:limit]
        last = rows[-1] if more and rows else None
        return ConflictPage(rows, (last.created_at, last.conflict_id) if last else None)

    def get_conflict(self, tenant_id: str, conflict_id: str) -> StoredConflict | None:
        with self._read.connect() as conn:
            return load_conflicts(conn, tenant_id, [conflict_id]).get(conflict_id)

    def get_client(self, client_id: str) -> ClientRow | None:
        with self._read.connect() as conn:
            return get_client(conn, self._statements, client_id)

    def outbox_depth(self) -> tuple[int, int | None]:
        q = select(func.count(), func.min(outbox.c.created_at))
        with self._read.connect() as conn:
            count, oldest = conn.execute(q).one()
        return int(count), oldest

    def outbox_fetch(
        self, limit: int, max_attempts: int, delivered: Sequence[str] = ()
    ) -> list[OutboxEvent]:
        """Claim the oldest undelivered events for this instance's relay, for a lease;
        first forget `delivered` (as outbox_delivered), in the same transaction.

        Several instances' relays share one outbox: each fetch claims its rows
        (claimed_by, claimed_until) in a short transaction, on PostgreSQL with
        FOR UPDATE SKIP LOCKED so two relays never wait for or take the same
        rows. Rows claimed by another relay are left alone until the lease
        expires (that relay crashed or hangs); this relay's own claims come
        back to it at once (it retries a batch the audit service did not take).
        """
        o = outbox.c
        now = self._engine.now_ns()
        claimable = and_(
            o.attempts < max_attempts,
            or_(o.claimed_until.is_(None), o.claimed_until < now, o.claimed_by == self._owner),
        )
        pick = select(o.id).where(claimable).order_by(o.id).limit(limit)
        if not delivered:
            with self._read.connect() as conn:
                if conn.execute(pick).first() is None:
                    return []  # idle: no write transaction (on SQLite, no write lock)
        with self._write.begin() as conn:
            _forget(conn, delivered)
            ids = list(conn.execute(pick.with_for_update(skip_locked=True)).scalars())
            if not ids:
                return []
            rows = conn.execute(
                outbox.update()
                .where(o.id.in_(ids))
                .values(
                    claimed_by=self._owner,
                    claimed_until=now + int(self.outbox_lease_seconds * 1e9),
                )
                .returning(o.id, o.event_id, o.tenant_id, o.payload, o.created_at)
            ).all()
        return [
            OutboxEvent(r.event_id, r.tenant_id, json.loads(r.payload), r.created_at)
            for r in sorted(rows, key=lambda r: r.id)
        ]

    def outbox_delivered(self, event_ids: Sequence[str]) -> None:
        with self._write.begin() as conn:
            _forget(conn, event_ids)

    def outbox_parked(self, max_attempts: int) -> int:
        q = select(func.count()).where(outbox.c.attempts >= max_attempts)
        with self._read.connect() as conn:
            return int(conn.execute(q).scalar_one())

    def outbox_refused(self, event_ids: Sequence[str]) -> None:
        with self._write.begin() as conn:
            for chunk in chunks(list(event_ids)):
                conn.execute(
                    outbox.update()
                    .where(outbox.c.event_id.in_(chunk))
                    .values(attempts=outbox.c.attempts + 1, claimed_by=None, claimed_until=None)
                )


def _forget(conn: Connection, event_ids: Sequence[str]) -> None:
    """Delete delivered outbox events."""
    for chunk in chunks(list(event_ids)):
        conn.execute(outbox.delete().where(outbox.c.event_id.in_(chunk)))
