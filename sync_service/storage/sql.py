"""The Storage interface on SQLAlchemy Core, for SQLite and PostgreSQL.

What differs between the two is how writers share the database. On SQLite a
write transaction takes the write lock up front (BEGIN IMMEDIATE; WAL mode,
so readers are never blocked) and holds the whole database: concurrent
writers wait instead of failing or interleaving. On PostgreSQL, where several
service instances write at once, a write transaction is optimistic (it reads
and decides without a lock and its write checks that nothing it read has
changed, see _PgWriteTx) or exclusive (the feed lock from the start). Either
way the feed lock, an advisory lock held from handing out the next feed
positions to the commit, means transactions commit in feed order, so a
reader asking for `feed_seq > cursor` never skips a late committer. On
PostgreSQL a write that moves the feed also sends a NOTIFY so other
instances' Subscribe streams wake at once (storage/pg_notify.py).

The outbox is shared by the relays of every instance: a fetch claims its rows
for a lease (FOR UPDATE SKIP LOCKED on PostgreSQL), so no two relays send the
same event at once and a crashed relay's claims expire.

Queries are set-based: one read of all the records of a batch (per
collection), one of their history, and bulk writes (executemany on SQLite,
COPY on PostgreSQL).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy import (
    BigInteger,
    Connection,
    and_,
    bindparam,
    cast,
    extract,
    func,
    literal,
    or_,
    select,
)

from fieldsync.db import chunks, normalize_url, open_engines, upgrade_schema
from fieldsync.jsontext import dumps
from fieldsync.values import decode, dumps_fields, encode, loads_fields
from sync_service.merge import Change
from sync_service.storage.base import (
    BatchWrite,
    ClientRow,
    ConflictPage,
    OutboxEvent,
    StoredConflict,
    StoredFieldConflict,
    StoredRecord,
    StoredResult,
    WriteConflict,
)
from sync_service.storage.cache import RecordCache
from sync_service.storage.pg_notify import notify_feed
from sync_service.storage.tables import (
    conflicts,
    outbox,
    records,
)

log = logging.getLogger("fieldsync.storage")

_loads = json.JSONDecoder().decode

MIGRATIONS = Path(__file__).parent / "migrations"
_PG_WRITE_LOCK = 0x46_53_59_4E  # "FSYN": the advisory lock id of sync writes


# The write path's statements, run on the driver's cursor with positional rows:
# SQLAlchemy Core's statement compilation and per-row parameter processing
# cost more than the database's own work there. Column lists are spelled out,
# so a column added later with a server default needs no change here.
_RECORD_COLUMNS = (
    "version",
    "deleted",
    "fields",
    "field_versions",
    "history_floor",
    "updated_at",
    "updated_by",
    "last_client_id",
    "others_version",
    "feed_seq",
)
_RECORD_READ = ", ".join(("record_id", "record_key", *_RECORD_COLUMNS[:-1]))


# The columns each bulk insert writes, in the order of its rows.
_INSERT_COLUMNS = {
    "records": ("tenant_id", "collection", "record_id", "record_key", *_RECORD_COLUMNS),
    "record_history": ("record_key", "version", "client_id", "mutation_id", "old", "committed_at"),
    "mutation_results": ("client_id", "client_seq", "tenant_id", "mutation_id", "result"),
    "outbox": ("event_id", "tenant_id", "payload", "created_at"),
}


@dataclass(frozen=True)
class _Statements:
    """The write transaction's statements, as driver SQL in the driver's paramstyle."""

    ph: str  # the driver's placeholder
    read_state: str
    write_state: str
    inserts: dict[str, str]  # table -> its INSERT of _INSERT_COLUMNS
    update_record: str
    select_client: str
    insert_client: str
    update_client: str

    @classmethod
    def for_paramstyle(cls, paramstyle: str) -> _Statements:
        ph = "?" if paramstyle == "qmark" else "%s"

        def insert(table: str, columns: Sequence[str]) -> str:
            marks = ", ".join([ph] * len(columns))
            return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})"

        sets = ", ".join(f"{c} = {ph}" for c in _RECORD_COLUMNS)
        return cls(
            ph=ph,
            read_state="SELECT feed_head, record_keys FROM sync_state WHERE id = 1",
            write_state=f"UPDATE sync_state SET feed_head = {ph}, record_keys = {ph} WHERE id = 1",
            inserts={table: insert(table, columns) for table, columns in _INSERT_COLUMNS.items()},
            update_record=f"UPDATE records SET {sets} WHERE record_key = {ph}",
            select_client=f"SELECT tenant_id, sub, last_seq FROM clients WHERE client_id = {ph}",
            insert_client=insert("clients", ("client_id", "tenant_id", "sub", "last_seq")),
            update_client=f"UPDATE clients SET last_seq = {ph} WHERE client_id = {ph}",
        )

    def marks(self, n: int) -> str:
        """`?, ?, ?` for an IN list of n values."""
        return ", ".join([self.ph] * n)

    def select_records(self, n: int) -> str:
        ph = self.ph
        return (
            f"SELECT {_RECORD_READ} FROM records WHERE tenant_id = {ph} AND collection = {ph}"
            f" AND record_id IN ({self.marks(n)})"
        )

    def select_history(self, n: int) -> str:
        """The history of n records (by record_key) above a version, per record in order."""
        return (
            "SELECT record_key, version, client_id, mutation_id, old FROM record_history"
            f" WHERE record_key IN ({self.marks(n)}) AND version > {self.ph}"
            " ORDER BY record_key, version"
        )


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
        self._statements = _Statements.for_paramstyle(self._write.dialect.paramstyle)

    # -- lifecycle ------------------------------------------------------------

    def migrate(self) -> None:
        """Create or upgrade the schema to the newest migration, atomically.

        On the write engine, so SQLite runs it in one BEGIN IMMEDIATE
        transaction (instances starting together wait for each other; a crash
        mid-migration leaves nothing half-built) and PostgreSQL under the
        advisory write lock.
        """
        with self._write.begin() as conn:
            if self.dialect == "postgresql":
                conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_WRITE_LOCK})")
            upgrade_schema(conn, MIGRATIONS)

    def close(self) -> None:
        self._write.dispose()
        if self._read is not self._write:
            self._read.dispose()

    # -- writes ---------------------------------------------------------------

    @contextmanager
    def write_transaction(self, *, exclusive: bool = False) -> Iterator[SqlWriteTx]:
        try:
            with self._write.begin() as conn:
                if self.dialect == "postgresql":
                    yield _PgWriteTx(conn, self._statements, self._cache, exclusive=exclusive)
                else:
                    yield SqlWriteTx(conn, self._statements, self._cache)
        except BaseException:
            self._cache.forget()  # what the transaction handed it may not be committed
            raise

    # -- reads ----------------------------------------------------------------

    def get_records(
        self, tenant_id: str, collection: str, record_ids: Sequence[str]
    ) -> list[StoredRecord]:
        with self._read.connect() as conn:
            found = _load_records(conn, self._statements, tenant_id, collection, record_ids)
        return [found[r] for r in dict.fromkeys(record_ids) if r in found]

    def pull(
        self, tenant_id: str, after: int, collections: Sequence[str], limit: int
    ) -> list[tuple[int, StoredRecord]]:
        ph = self._statements.ph
        sql = (
            f"SELECT feed_seq, collection, {_RECORD_READ} FROM records"
            f" WHERE tenant_id = {ph} AND feed_seq > {ph}"
        )
        params: list[Any] = [tenant_id, after]
        if collections:
            sql += f" AND collection IN ({self._statements.marks(len(collections))})"
            params += collections
        sql += f" ORDER BY feed_seq LIMIT {ph}"
        params.append(limit)
        with self._read.connect() as conn:
            rows = _fetch(conn, sql, params)
        return [(row[0], _record_from_tuple(tenant_id, row[1], row[2:])) for row in rows]

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
            rows = [_conflict_from_row(r) for r in conn.execute(q)]
        more = len(rows) > limit
        rows = rows[:limit]
        last = rows[-1] if more and rows else None
        return ConflictPage(rows, (last.created_at, last.conflict_id) if last else None)

    def get_conflict(self, tenant_id: str, conflict_id: str) -> StoredConflict | None:
        with self._read.connect() as conn:
            return _load_conflicts(conn, tenant_id, [conflict_id]).get(conflict_id)

    def get_client(self, client_id: str) -> ClientRow | None:
        with self._read.connect() as conn:
            return _get_client(conn, self._statements, client_id)

    def outbox_depth(self) -> tuple[int, int | None]:
        q = select(func.count(), func.min(outbox.c.created_at))
        with self._read.connect() as conn:
            count, oldest = conn.execute(q).one()
        return int(count), oldest

    def outbox_fetch(self, limit: int, max_attempts: int) -> list[OutboxEvent]:
        """Claim the oldest undelivered events for this instance's relay, for a lease.

        Several instances' relays share one outbox: each fetch claims its rows
        (claimed_by, claimed_until) in a short transaction, on PostgreSQL with
        FOR UPDATE SKIP LOCKED so two relays never wait for or take the same
        rows. Rows claimed by another relay are left alone until the lease
        expires (that relay crashed or hangs); this relay's own claims come
        back to it at once (it retries a batch the audit service did not take).
        """
        o = outbox.c
        pg = self.dialect == "postgresql"
        # The database's clock on PostgreSQL, so instances' clocks need not agree.
        now: Any = _pg_now_ns() if pg else literal(time.time_ns(), BigInteger)
        claimable = and_(
            o.attempts < max_attempts,
            or_(o.claimed_until.is_(None), o.claimed_until < now, o.claimed_by == self._owner),
        )
        pick = select(o.id).where(claimable).order_by(o.id).limit(limit)
        with self._read.connect() as conn:
            if conn.execute(pick).first() is None:
                return []  # idle: no write transaction (on SQLite, no write lock)
        with self._write.begin() as conn:
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
            for chunk in chunks(list(event_ids)):
                conn.execute(outbox.delete().where(outbox.c.event_id.in_(chunk)))

    def outbox_refused(self, event_ids: Sequence[str]) -> None:
        with self._write.begin() as conn:
            for chunk in chunks(list(event_ids)):
                conn.execute(
                    outbox.update()
                    .where(outbox.c.event_id.in_(chunk))
                    .values(attempts=outbox.c.attempts + 1, claimed_by=None, claimed_until=None)
                )


def _pg_now_ns() -> Any:
    """PostgreSQL's current time in nanoseconds since the epoch (the outbox's time unit)."""
    return cast(extract("epoch", func.clock_timestamp()) * 1_000_000_000, BigInteger)


class SqlWriteTx:
    """The reads and the write of one batch, on one connection in one transaction.

    On SQLite the transaction holds the database's write lock from its first
    statement (BEGIN IMMEDIATE): it is exclusive. It starts by reading
    sync_state: the feed head tells the record cache whether its rows are
    current (storage/cache.py), and the head and the last record key are
    where this batch's positions and keys go on.
    """

    def __init__(self, conn: Connection, sql: _Statements, cache: RecordCache) -> None:
        self._conn = conn
        self._sql = sql
        self._cache = cache
        self._head, self._keys = _fetch(conn, sql.read_state, ())[0]
        cache.begin(self._head)

    def _cached(self, name: tuple[str, str, str]) -> StoredRecord | None:
        """The cached row of a record, if the transaction may use it."""
        return self._cache.get(name)

    def _claim_feed(self, cur: Any, batch: BatchWrite) -> tuple[int, int]:
        """The feed head and the last record key this write goes on from."""
        return self._head, self._keys

    def get_client(self, client_id: str) -> ClientRow | None:
        return _get_client(self._conn, self._sql, client_id)

    def load_results(self, client_id: str, seqs: Sequence[int]) -> dict[int, StoredResult]:
        if not seqs:
            return {}
        ph = self._sql.ph
        rows = _fetch(
            self._conn,
            "SELECT client_seq, tenant_id, mutation_id, result FROM mutation_results"
            f" WHERE client_id = {ph} AND client_seq >= {ph} AND client_seq <= {ph}",
            (client_id, min(seqs), max(seqs)),
        )
        wanted = set(seqs)
        return {
            seq: StoredResult(client_id, seq, tenant, mutation_id, json.loads(result))
            for seq, tenant, mutation_id, result in rows
            if seq in wanted
        }

    def load_records(
        self, tenant_id: str, collection: str, record_ids: Iterable[str]
    ) -> dict[str, StoredRecord]:
        out: dict[str, StoredRecord] = {}
        missing = []
        for rid in record_ids:
            rec = self._cached((tenant_id, collection, rid))
            if rec is None:
                missing.append(rid)
            else:
                out[rid] = rec
        if missing:
            # Not cached: a record read is almost always written in the same
            # batch, and its written row is what the cache keeps.
            out.update(_load_records(self._conn, self._sql, tenant_id, collection, missing))
        return out

    def load_changes(
        self, tenant_id: str, collection: str, since: Mapping[str, int]
    ) -> dict[str, list[Change]]:
        out: dict[str, list[Change]] = {rid: [] for rid in since}
        stored = self.load_records(tenant_id, collection, list(since))
        after = {rec.key: (rid, since[rid]) for rid, rec in stored.items()}
        for chunk in chunks(list(after)):
            floor = min(after[k][1] for k in chunk)
            rows = _fetch(self._conn, self._sql.select_history(len(chunk)), (*chunk, floor))
            for key, version, client_id, mutation_id, old in rows:
                rid, base = after[key]
                if version > base:
                    out[rid].append(Change(version, client_id, mutation_id, loads_fields(old)))
        return out

    def load_conflicts(self, tenant_id: str, ids: Iterable[str]) -> dict[str, StoredConflict]:
        return _load_conflicts(self._conn, tenant_id, list(ids))

    def write(self, batch: BatchWrite) -> None:
        conn = self._conn
        sql = self._sql
        cur = conn.connection.cursor()
        head, keys = start = self._claim_feed(cur, batch)
        known = self._record_keys(batch)
        written: list[StoredRecord] = []  # the rows as stored, for the cache
        if batch.records:
            new_rows: list[tuple[Any, ...]] = []
            old_rows: list[tuple[Any, ...]] = []
            for rec in batch.records:
                head += 1
                values = (
                    rec.version,
                    rec.deleted,
                    dumps_fields(rec.fields),
                    dumps(rec.field_versions),
                    rec.history_floor,
                    rec.updated_at,
                    rec.updated_by,
                    rec.last_client,
                    rec.others_version,
                    head,
                )
                name = (rec.tenant_id, rec.collection, rec.record_id)
                if rec.exists:
                    key = known[name]
                    old_rows.append((*values, key))
                    if rec.key == key:
                        written.append(rec)  # as stored already: the cache can share it
                        continue
                else:
                    keys += 1
                    key = known[name] = keys
                    new_rows.append((*name, key, *values))
                written.append(replace(rec, exists=True, key=key))
            if new_rows:
                self._insert(cur, "records", new_rows)
            if old_rows:
                self._update_records(cur, old_rows)
        if batch.history:
            rows = [
                [
                    known.get((h.tenant_id, h.collection, h.record_id)),
                    h.version,
                    h.client_id,
                    h.mutation_id,
                    dumps_fields(h.old),
                    h.committed_at,
                ]
                for h in batch.history
            ]
            unknown = [h for h, row in zip(batch.history, rows, strict=True) if row[0] is None]
            if unknown:
                found = self._keys_of((h.tenant_id, h.collection, h.record_id) for h in unknown)
                for h, row in zip(batch.history, rows, strict=True):
                    if row[0] is None:
                        row[0] = found[(h.tenant_id, h.collection, h.record_id)]
            self._insert(cur, "record_history", rows)
        if batch.conflicts:
            conn.execute(conflicts.insert(), [_conflict_row(c) for c in batch.conflicts])
        if batch.resolutions:
            c = conflicts.c
            conn.execute(
                conflicts.update()
                .where(c.conflict_id == bindparam("b_id"), c.tenant_id == bindparam("b_tenant"))
                .values(
                    resolved=True,
                    resolved_at=bindparam("resolved_at"),
                    resolved_by=bindparam("resolved_by"),
                    resolution=bindparam("resolution"),
                ),
                [
                    {
                        "b_id": r.conflict_id,
                        "b_tenant": r.tenant_id,
                        "resolved_at": r.resolved_at,
                        "resolved_by": r.resolved_by,
                        "resolution": r.resolution,
                    }
                    for r in batch.resolutions
                ],
            )
        if batch.results:
            self._insert(
                cur,
                "mutation_results",
                [
                    (r.client_id, r.client_seq, r.tenant_id, r.mutation_id, dumps(r.payload))
                    for r in batch.results
                ],
            )
        if batch.events:
            self._insert(
                cur,
                "outbox",
                [(e.event_id, e.tenant_id, dumps(e.payload), e.created_at) for e in batch.events],
            )
        if batch.client is not None:
            self._write_client(cur, batch.client)
        if (head, keys) != start:
            cur.execute(sql.write_state, (head, keys))
            self._head, self._keys = head, keys
        cur.close()
        self._cache.committing(written, head)

    def _write_client(self, cur: Any, cl: ClientRow) -> None:
        if cl.exists:
            cur.execute(self._sql.update_client, (cl.last_seq, cl.client_id))
        else:
            cur.execute(self._sql.insert_client, (cl.client_id, cl.tenant_id, cl.sub, cl.last_seq))

    def _insert(self, cur: Any, table: str, rows: Sequence[Sequence[Any]]) -> None:
        """Add rows of _INSERT_COLUMNS[table]."""
        cur.executemany(self._sql.inserts[table], rows)

    def _update_records(self, cur: Any, rows: Sequence[Sequence[Any]]) -> None:
        """Rewrite stored records: rows of _RECORD_COLUMNS, then the record_key."""
        cur.executemany(self._sql.update_record, rows)

    def _record_keys(self, batch: BatchWrite) -> dict[tuple[str, str, str], int]:
        """The record_key of each stored record the batch updates (more are added as
        new records get theirs). The applier's records carry theirs; one without
        (key 0) is looked up."""
        known = {}
        unknown = []
        for r in batch.records:
            if r.exists:
                name = (r.tenant_id, r.collection, r.record_id)
                if r.key:
                    known[name] = r.key
                else:
                    unknown.append(name)
        if unknown:
            known.update(self._keys_of(unknown))
        return known

    def _keys_of(self, names: Iterable[tuple[str, str, str]]) -> dict[tuple[str, str, str], int]:
        wanted: dict[tuple[str, str], list[str]] = {}
        for tenant, collection, rid in names:
            wanted.setdefault((tenant, collection), []).append(rid)
        found = {}
        for (tenant, collection), rids in wanted.items():
            stored = self.load_records(tenant, collection, rids)
            for rid in rids:
                if rid not in stored:
                    name = (tenant, collection, rid)
                    raise ValueError(f"no stored record {name!r} to update or file history under")
                found[(tenant, collection, rid)] = stored[rid].key
        return found


class _PgWriteTx(SqlWriteTx):
    """A write transaction on PostgreSQL, where several instances write at once.

    Optimistic (the default): it reads and decides without a lock, noting
    what it read (the client's last sequence, each record's key and version
    or its absence, each conflict's resolved flag); its write takes the feed
    lock (an advisory lock, held until the commit) and first checks that all
    of that is still so, or raises WriteConflict. So batches of different
    clients on different records decide in parallel, on several instances,
    and queue only to write. A conflict costs a second attempt, which the
    applier makes exclusive: the feed lock from the start, like SQLite's
    whole-database lock. Every change of a record moves its version, and
    history, results and conflicts of a record change only with it or with
    its client, so this check covers all a batch read. Holding the feed lock
    from the feed head's read to the commit makes feed positions visible in
    their order (SPEC §6).

    The record cache is trusted only as far as the check: an optimistic
    transaction may use a cached row (a stale one fails the check); an
    exclusive one reads every record.

    Rows go in by COPY (about a third of the time executemany takes, most of
    it in the driver's Python); stored records are rewritten from a COPY into
    a temporary table by one UPDATE. A write that moves the feed also wakes
    the other instances' Subscribe streams (pg_notify: delivered at commit,
    dropped on rollback).
    """

    def __init__(
        self, conn: Connection, sql: _Statements, cache: RecordCache, *, exclusive: bool
    ) -> None:
        self._conn = conn
        self._sql = sql
        self._cache = cache
        self._exclusive = exclusive
        self._clients_read: dict[str, int | None] = {}  # client id -> last_seq
        self._records_read: dict[tuple[str, str, str], tuple[int, int] | None] = {}
        self._versions_read: dict[int, int] = {}  # record key -> the version read
        self._conflicts_read: dict[str, bool] = {}  # conflict id -> resolved
        self._feed_locked = False
        if exclusive:
            self._lock_feed(conn.connection.cursor())

    def _lock_feed(self, cur: Any) -> None:
        cur.execute(f"SELECT pg_advisory_xact_lock({_PG_WRITE_LOCK})")
        self._feed_locked = True

    def _cached(self, name: tuple[str, str, str]) -> StoredRecord | None:
        return None if self._exclusive else self._cache.get(name)

    def get_client(self, client_id: str) -> ClientRow | None:
        client = super().get_client(client_id)
        self._clients_read.setdefault(client_id, client.last_seq if client else None)
        return client

    def load_records(
        self, tenant_id: str, collection: str, record_ids: Iterable[str]
    ) -> dict[str, StoredRecord]:
        ids = list(record_ids)
        found = super().load_records(tenant_id, collection, ids)
        seen = self._records_read
        for rid in ids:
            name = (tenant_id, collection, rid)
            if name not in seen:
                rec = found.get(rid)
                seen[name] = (rec.key, rec.version) if rec else None
                if rec:
                    self._versions_read[rec.key] = rec.version
        return found

    def load_conflicts(self, tenant_id: str, ids: Iterable[str]) -> dict[str, StoredConflict]:
        found = super().load_conflicts(tenant_id, ids)
        for cid, conflict in found.items():
            self._conflicts_read.setdefault(cid, conflict.resolved)
        return found

    def _claim_feed(self, cur: Any, batch: BatchWrite) -> tuple[int, int]:
        if not self._feed_locked:
            self._lock_feed(cur)
            self._check_unwritten(cur, batch)
        cur.execute(self._sql.read_state)
        head, keys = cur.fetchone()
        self._head, self._keys = head, keys
        return head, keys

    # What the batch writes is checked by its write (under the feed lock): a stored
    # record is rewritten only at the version read, the client's row only at the
    # sequence read, and an insert of a record or a client another writer created
    # meanwhile fails. What it read and does not write is checked here first.

    def _check_unwritten(self, cur: Any, batch: BatchWrite) -> None:
        """WriteConflict unless what the batch read and does not write is as it was."""
        client = batch.client.client_id if batch.client is not None else None
        for client_id, last_seq in self._clients_read.items():
            if client_id == client:
                continue
            cur.execute("SELECT last_seq FROM clients WHERE client_id = %s", (client_id,))
            row = cur.fetchone()
            if (row[0] if row else None) != last_seq:
                raise WriteConflict(f"client {client_id!r} wrote meanwhile")
        written = {(r.tenant_id, r.collection, r.record_id) for r in batch.records}
        kept: dict[int, int] = {}
        absent: dict[tuple[str, str], list[str]] = {}
        for name, kv in self._records_read.items():
            if name in written:
                continue
            if kv is None:
                absent.setdefault(name[:2], []).append(name[2])
            else:
                kept[kv[0]] = kv[1]
        if kept:
            cur.execute(
                "SELECT record_key, version FROM records WHERE record_key = ANY(%s)",
                (list(kept),),
            )
            if dict(cur.fetchall()) != kept:
                raise WriteConflict("a record the batch read was changed meanwhile")
        for (tenant, collection), rids in absent.items():
            cur.execute(
                "SELECT 1 FROM records WHERE tenant_id = %s AND collection = %s"
                " AND record_id = ANY(%s) LIMIT 1",
                (tenant, collection, rids),
            )
            if cur.fetchone() is not None:
                raise WriteConflict("a record the batch found absent was created meanwhile")
        if self._conflicts_read:
            cur.execute(
                "SELECT conflict_id, resolved FROM conflicts WHERE conflict_id = ANY(%s)",
                (list(self._conflicts_read),),
            )
            if any(self._conflicts_read[cid] != bool(r) for cid, r in cur.fetchall()):
                raise WriteConflict("a conflict the batch read was resolved meanwhile")

    def _write_client(self, cur: Any, cl: ClientRow) -> None:
        read = self._clients_read.get(cl.client_id, "unread")
        if read == "unread":
            super()._write_client(cur, cl)
        elif read is None:
            try:
                super()._write_client(cur, cl)
            except psycopg.errors.UniqueViolation as err:
                raise WriteConflict(f"client {cl.client_id!r} was created meanwhile") from err
        else:
            cur.execute(
                "UPDATE clients SET last_seq = %s WHERE client_id = %s AND last_seq = %s",
                (cl.last_seq, cl.client_id, read),
            )
            if cur.rowcount != 1:
                raise WriteConflict(f"client {cl.client_id!r} wrote meanwhile")

    def write(self, batch: BatchWrite) -> None:
        super().write(batch)
        if batch.records:
            notify_feed(self._conn, {r.tenant_id for r in batch.records})

    def _insert(self, cur: Any, table: str, rows: Sequence[Sequence[Any]]) -> None:
        try:
            with cur.copy(f"COPY {table} ({', '.join(_INSERT_COLUMNS[table])}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
        except psycopg.errors.UniqueViolation as err:
            if table != "records":
                raise
            raise WriteConflict("a record the batch creates was created meanwhile") from err

    def _update_records(self, cur: Any, rows: Sequence[Sequence[Any]]) -> None:
        # One per session, emptied at every commit (and a rollback drops its rows);
        # its name changes with its columns (a pooled session may outlive a release).
        cur.execute(_PG_RECORD_CHANGES)
        read = self._versions_read
        columns = (*_RECORD_COLUMNS, "record_key", "read_version")
        with cur.copy(f"COPY fieldsync_record_changes_2 ({', '.join(columns)}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row((*row, read.get(row[-1])))
        sets = ", ".join(f"{c} = c.{c}" for c in _RECORD_COLUMNS)
        cur.execute(
            f"UPDATE records SET {sets} FROM fieldsync_record_changes_2 c"
            " WHERE records.record_key = c.record_key"
            " AND (c.read_version IS NULL OR records.version = c.read_version)"
        )
        if cur.rowcount != len(rows):
            raise WriteConflict("a record the batch rewrites was changed meanwhile")


_PG_RECORD_CHANGES = (
    "CREATE TEMPORARY TABLE IF NOT EXISTS fieldsync_record_changes_2 ("
    " version BIGINT, deleted BOOLEAN, fields TEXT, field_versions TEXT,"
    " history_floor BIGINT, updated_at BIGINT, updated_by VARCHAR(500),"
    " last_client_id VARCHAR(200), others_version BIGINT, feed_seq BIGINT,"
    " record_key BIGINT, read_version BIGINT) ON COMMIT DELETE ROWS"
)


# -- row mapping ---------------------------------------------------------------


def _get_client(conn: Connection, sql: _Statements, client_id: str) -> ClientRow | None:
    rows = _fetch(conn, sql.select_client, (client_id,))
    if not rows:
        return None
    tenant_id, sub, last_seq = rows[0]
    return ClientRow(client_id, tenant_id, sub, last_seq, exists=True)


def _fetch(conn: Connection, sql: str, params: Sequence[Any]) -> Sequence[Any]:
    """Rows of driver SQL on the connection's DBAPI cursor, as plain tuples.

    The hot reads of a batch skip SQLAlchemy's statement compilation and row
    objects, which cost more than the database's own work there.
    """
    cur = conn.connection.cursor()
    try:
        cur.execute(sql, params)
        return cur.fetchall()
    finally:
        cur.close()


def _load_records(
    conn: Connection, sql: _Statements, tenant_id: str, collection: str, record_ids: Sequence[str]
) -> dict[str, StoredRecord]:
    out: dict[str, StoredRecord] = {}
    ids = list(dict.fromkeys(record_ids))
    for chunk in chunks(ids):
        for row in _fetch(conn, sql.select_records(len(chunk)), (tenant_id, collection, *chunk)):
            out[row[0]] = _record_from_tuple(tenant_id, collection, row)
    return out


def _record_from_tuple(tenant_id: str, collection: str, row: Sequence[Any]) -> StoredRecord:
    """A records row read as _RECORD_READ lists its columns."""
    (
        rid,
        key,
        version,
        deleted,
        fields,
        field_versions,
        floor,
        updated_at,
        updated_by,
        last_client,
        others_version,
    ) = row
    return StoredRecord(
        tenant_id,
        collection,
        rid,
        version,
        bool(deleted),
        loads_fields(fields),
        _loads(field_versions),
        floor,
        updated_at,
        updated_by,
        True,
        last_client,
        others_version,
        key,
    )


def _record_from_row(row: Any) -> StoredRecord:
    return StoredRecord(
        tenant_id=row.tenant_id,
        collection=row.collection,
        record_id=row.record_id,
        version=row.version,
        deleted=bool(row.deleted),
        fields=loads_fields(row.fields),
        field_versions=_loads(row.field_versions),
        history_floor=row.history_floor,
        updated_at=row.updated_at,
        updated_by=row.updated_by,
        exists=True,
        last_client=row.last_client_id,
        others_version=row.others_version,
        key=row.record_key,
    )


def _conflict_row(c: StoredConflict) -> dict[str, Any]:
    return {
        "conflict_id": c.conflict_id,
        "tenant_id": c.tenant_id,
        "collection": c.collection,
        "record_id": c.record_id,
        "kind": c.kind,
        "base_version": c.base_version,
        "server_version": c.server_version,
        "fields": dumps(
            [
                {"f": f.field, "b": encode(f.base), "y": encode(f.yours), "t": encode(f.theirs)}
                for f in c.fields
            ]
        ),
        "mutation_id": c.mutation_id,
        "client_id": c.client_id,
        "created_by": c.created_by,
        "created_at": c.created_at,
        "resolved": c.resolved,
        "resolved_at": c.resolved_at,
        "resolved_by": c.resolved_by,
        "resolution": c.resolution,
    }


def _conflict_from_row(r: Any) -> StoredConflict:
    return StoredConflict(
        conflict_id=r.conflict_id,
        tenant_id=r.tenant_id,
        collection=r.collection,
        record_id=r.record_id,
        kind=r.kind,
        base_version=r.base_version,
        server_version=r.server_version,
        fields=[
            StoredFieldConflict(f["f"], decode(f["b"]), decode(f["y"]), decode(f["t"]))
            for f in json.loads(r.fields)
        ],
        mutation_id=r.mutation_id,
        client_id=r.client_id,
        created_by=r.created_by,
        created_at=r.created_at,
        resolved=bool(r.resolved),
        resolved_at=r.resolved_at,
        resolved_by=r.resolved_by,
        resolution=r.resolution,
    )


def _load_conflicts(
    conn: Connection, tenant_id: str, ids: Sequence[str]
) -> dict[str, StoredConflict]:
    out: dict[str, StoredConflict] = {}
    for chunk in chunks(list(dict.fromkeys(ids))):
        q = select(conflicts).where(
            conflicts.c.tenant_id == tenant_id, conflicts.c.conflict_id.in_(chunk)
        )
        for r in conn.execute(q):
            out[r.conflict_id] = _conflict_from_row(r)
    return out
