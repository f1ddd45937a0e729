"""What PostgreSQL does differently: optimistic writers, per-tenant feed rows, NOTIFY.

Several service instances write one PostgreSQL database at once, so:

- `PgWriteTx`, the write transaction, is optimistic by default (it reads and
  decides without a lock, noting what it read: `Expectations`) and checks
  under its tenants' feed rows at its write that all of that is still so, or
  raises WriteConflict; a retry is exclusive (its tenants' rows locked from
  the start). Rows go in by COPY.
- A tenant's feed row (`tenant_feed`, locked by the UPDATE … RETURNING that
  hands out the tenant's next positions, held to the commit) makes the
  tenant's feed positions visible in their order; other tenants commit
  alongside (docs/scaling.md). Record keys come from the sequence
  `record_keys`. Migrations take an advisory lock.
- A write that moves the feed calls `notify_feed` (a
  `pg_notify('fieldsync_feed', tenant)`, which PostgreSQL delivers only when
  the transaction commits, and never if it rolls back). Each sync process
  runs one `FeedListener` (storage/pg_listen.py, re-exported here), a
  thread with a LISTEN connection that wakes the process's Subscribe
  streams.
- The outbox's leases use the database's clock, so instances' clocks need
  not agree; the service does not combine several clients' writes in one
  transaction (`POSTGRES.combine_writes`): a transaction takes its tenant's
  feed row at its first write and keeps it to the commit, so a combined one
  would hold it through every later client's reads and decisions.

How an optimistic transaction's check of Expectations works (PostgreSQL; a
SQLite transaction is exclusive and checks nothing): what the batch writes
is checked by its own statements, under the write lock: a stored record is
rewritten only at the version it was decided on (row count checked), the
client's row only at the sequence it was decided on, and inserting a record
or a client another writer created meanwhile fails on the primary key. What
the batch read and does not write (a record it left as it was, one it found
absent and still leaves absent, a conflict) is checked by one query each
before anything is written. Any difference raises WriteConflict, and the
transaction is rolled back.

Not here: the SQL both engines share (storage/transactions.py, storage/sql.py);
a wake-up decides nothing and reads no feed, it only tells Subscribe streams
to look again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import psycopg
from sqlalchemy import BigInteger, Connection, cast, extract, func

from fieldsync.db import chunks
from sync_service.rules.merge import Change
from sync_service.storage.base import (
    Ahead,
    BatchWrite,
    ClientRow,
    StoredConflict,
    StoredRecord,
    StoredResult,
    WriteConflict,
)
from sync_service.storage.cache import RecordCache
from sync_service.storage.engine import Engine
from sync_service.storage.pg_listen import (
    FEED_CHANNEL,
    LISTENER_APPLICATION_NAME,
    FeedListener,
    libpq_url,
    notify_feed,
)
from sync_service.storage.rows import (
    INSERT_COLUMNS,
    RECORD_COLUMNS,
    Statements,
    get_client,
)
from sync_service.storage.transactions import Name, SqlWriteTx

__all__ = [
    "FEED_CHANNEL",
    "LISTENER_APPLICATION_NAME",
    "POSTGRES",
    "Expectations",
    "FeedListener",
    "PgWriteTx",
    "libpq_url",
    "notify_feed",
]


@dataclass(slots=True)
class Expectations:
    """What an optimistic transaction read, for its write to check it is still so.

    PgWriteTx notes these as it reads, and its write raises WriteConflict if
    any differs under the write lock. Every
    change of a record moves its version, and its history, its client's
    results and its conflicts change only with it or with the client's
    sequence, so these cover all a batch reads.
    """

    clients: dict[str, int | None] = field(default_factory=dict)  # client id -> last_seq
    records: dict[tuple[str, str, str], int] = field(default_factory=dict)  # -> version; 0 absent
    conflicts: dict[str, bool] = field(default_factory=dict)  # conflict id -> resolved

    def __bool__(self) -> bool:
        return bool(self.clients or self.records or self.conflicts)


class PgWriteTx(SqlWriteTx):
    """A write transaction on PostgreSQL, where several instances write at once.

    Optimistic (the default): it reads and decides without a lock, noting
    what it read (Expectations); its write locks the feed row of each tenant
    it touches or read (in tenant order, held until the commit) and checks
    that all it read is still so, or raises WriteConflict (see below for
    how). So batches of different clients on different records decide in
    parallel, on several instances, and queue only to write, behind writes
    of the same tenant only. A conflict costs a second attempt, which the
    applier makes exclusive: its tenants' rows locked from the start, like
    SQLite's whole-database lock. Holding a tenant's row from taking its
    positions to the commit makes that tenant's feed positions visible in
    their order (SPEC §6: a cursor belongs to one tenant).

    The record cache is trusted only as far as the check: an optimistic
    transaction may use a cached row (a stale one fails the check); an
    exclusive one reads every record.

    Rows go in by COPY (about a third of the time executemany takes, most of
    it in the driver's Python); stored records are rewritten from a COPY into
    a temporary table by one UPDATE. A write that moves the feed also wakes
    the other instances' Subscribe streams (notify_feed: delivered at commit,
    dropped on rollback).
    """

    DUPLICATE_KEY = psycopg.errors.UniqueViolation

    def __init__(
        self,
        conn: Connection,
        sql: Statements,
        cache: RecordCache,
        *,
        exclusive: bool,
        tenants: Iterable[str] = (),
        ahead: Ahead | None = None,
    ) -> None:
        self._conn = conn
        self._sql = sql
        self._cache = cache
        self._exclusive = exclusive
        # What the client's write still committing wrote (pipelining): read instead
        # of the database, and checked as any read is. Never when exclusive.
        self._ahead = None if exclusive else ahead
        self._read = Expectations()  # what this transaction read (of tenants not locked yet)
        self._read_tenants: dict[str, str] = {}  # client or conflict id read -> its tenant
        self._locked: set[str] = set()  # the tenants whose feed rows this transaction holds
        self._next: dict[str, int] = {}  # tenant -> the last feed position handed out
        self._keys_claimed: list[int] = []  # record keys for this write's new records
        self._written: dict[Name, StoredRecord] = {}  # for the cache, once committed
        self._changes_filled = False  # the temporary table holds this transaction's rows
        if exclusive:
            named = set(tenants)
            if not named:
                raise ValueError("an exclusive PostgreSQL write transaction names its tenants")
            self._lock_tenants(conn.connection.cursor(), dict.fromkeys(named, 0))

    def _lock_tenants(self, cur: Any, counts: Mapping[str, int]) -> None:
        """Lock the feed row of each tenant (in tenant order, so that two transactions
        never wait for each other) and take `counts[tenant]` positions from it."""
        try:
            for tenant in sorted(counts):
                n = counts[tenant]
                if tenant in self._locked and not n:
                    continue
                cur.execute(_PG_TAKE_POSITIONS, (n, tenant))
                row = cur.fetchone()
                if row is None:  # the tenant's first write: its row first
                    cur.execute(_PG_NEW_TENANT, (tenant, tenant))
                    cur.execute(_PG_TAKE_POSITIONS, (n, tenant))
                    row = cur.fetchone()
                self._locked.add(tenant)
                self._next[tenant] = int(row[0]) - n
        except psycopg.errors.DeadlockDetected as err:
            # Only a transaction that meets a tenant after locking a later one (several
            # clients' writes in one transaction) can: it is decided again, exclusively.
            raise WriteConflict("tenant feed rows locked in another order meanwhile") from err

    def _cached(self, name: Name) -> StoredRecord | None:
        # What this transaction wrote is exact within it (a second write of
        # several clients' batches in one transaction reads the first's rows).
        own = self._written.get(name)
        if own is None and self._ahead is not None:
            own = self._ahead.records.get(name)
        if own is not None or self._exclusive:
            return own
        return self._cache.get(name)

    def get_client(self, client_id: str) -> ClientRow | None:
        ahead = self._ahead
        if ahead is not None and ahead.client.client_id == client_id:
            client: ClientRow | None = replace(ahead.client)  # the run moves its sequence
        else:
            client = super().get_client(client_id)
        if client is not None:
            self._read_tenants.setdefault(client_id, client.tenant_id)
        self._read.clients.setdefault(client_id, client.last_seq if client else None)
        return client

    def load_records(
        self, tenant_id: str, collection: str, record_ids: Iterable[str]
    ) -> dict[str, StoredRecord]:
        ids = list(record_ids)
        found = super().load_records(tenant_id, collection, ids)
        seen = self._read.records
        for rid in ids:
            rec = found.get(rid)
            seen.setdefault((tenant_id, collection, rid), rec.version if rec else 0)
        return found

    def load_results(self, client_id: str, seqs: Sequence[int]) -> dict[int, StoredResult]:
        ahead = self._ahead
        if (
            ahead is not None
            and ahead.client.client_id == client_id
            and any(seq > ahead.since_seq for seq in seqs)
        ):
            # A replay of the write ahead, whose results are not stored yet:
            # decided again once it committed.
            raise WriteConflict("a replay of a write still committing")
        return super().load_results(client_id, seqs)

    def load_changes(
        self, tenant_id: str, collection: str, since: Mapping[str, int]
    ) -> dict[str, list[Change]]:
        ahead = self._ahead
        if ahead is None:
            return super().load_changes(tenant_id, collection, since)
        mine = {rid: ahead.changes.get((tenant_id, collection, rid)) for rid in since}
        stored = self.load_records(tenant_id, collection, list(since))
        # The stored history, and the write ahead's on top of it (a record it
        # creates has none stored, nor a key yet).
        from_db = {
            rid: base
            for rid, base in since.items()
            if mine[rid] is None or (rid in stored and stored[rid].key)
        }
        out = super().load_changes(tenant_id, collection, from_db) if from_db else {}
        for rid, changes in mine.items():
            have = out.setdefault(rid, [])
            if changes:
                versions = {c.version for c in changes}
                merged = [c for c in have if c.version not in versions]
                merged.extend(c for c in changes if c.version > since[rid])
                merged.sort(key=_version)
                out[rid] = merged
        return out

    def load_conflicts(self, tenant_id: str, ids: Iterable[str]) -> dict[str, StoredConflict]:
        found = super().load_conflicts(tenant_id, ids)
        for cid, conflict in found.items():
            self._read_tenants.setdefault(cid, tenant_id)
            self._read.conflicts.setdefault(cid, conflict.resolved)
        return found

    def _claim_feed(self, cur: Any, batch: BatchWrite) -> None:
        # Every tenant the write touches or read, each with the positions its records take.
        counts = dict.fromkeys(self._tenants_of(batch), 0)
        for rec in batch.records:
            counts[rec.tenant_id] += 1
        self._lock_tenants(cur, counts)
        new = sum(1 for rec in batch.records if not rec.exists)
        self._keys_claimed = []
        if new:
            cur.execute(_PG_TAKE_KEYS, (new,))
            self._keys_claimed = [int(k) for (k,) in cur.fetchall()]

    def _tenants_of(self, batch: BatchWrite) -> set[str]:
        tenants = {name[0] for name in self._read.records}
        tenants.update(self._read_tenants.values())
        if batch.client is not None:
            tenants.add(batch.client.tenant_id)
        for rows in (batch.records, batch.history, batch.conflicts, batch.resolutions):
            tenants.update(row.tenant_id for row in rows)
        return tenants

    def _position(self, tenant_id: str) -> int:
        self._next[tenant_id] += 1
        return self._next[tenant_id]

    def _new_key(self) -> int:
        return self._keys_claimed.pop()

    def _save_feed(self, cur: Any) -> None:
        """Nothing left to save: _lock_tenants moved each row by the positions taken."""

    def _expectations(self) -> Expectations | None:
        """What to check the write against (none when exclusive: nothing can differ)."""
        return None if self._exclusive else self._read

    def _check_unwritten(self, cur: Any, batch: BatchWrite) -> None:
        check = self._expectations()
        if not check:
            return
        client = batch.client.client_id if batch.client is not None else None
        for client_id, last_seq in check.clients.items():
            if client_id != client:
                found = get_client(self._conn, self._sql, client_id)
                if (found.last_seq if found else None) != last_seq:
                    raise WriteConflict(f"client {client_id!r} wrote meanwhile")
        written = {(r.tenant_id, r.collection, r.record_id) for r in batch.records}
        kept: dict[tuple[str, str], dict[str, int]] = {}
        for name, version in check.records.items():
            if name not in written:
                kept.setdefault(name[:2], {})[name[2]] = version
        for (tenant, collection), versions in kept.items():
            now = self._versions(cur, tenant, collection, list(versions))
            if any(now.get(rid, 0) != version for rid, version in versions.items()):
                raise WriteConflict("a record the batch read was changed meanwhile")
        if check.conflicts:
            ids = list(check.conflicts)
            for chunk in chunks(ids):
                cur.execute(
                    "SELECT conflict_id, resolved FROM conflicts"
                    f" WHERE conflict_id IN ({self._sql.marks(len(chunk))})",
                    tuple(chunk),
                )
                if any(check.conflicts[cid] != bool(r) for cid, r in cur.fetchall()):
                    raise WriteConflict("a conflict the batch read was resolved meanwhile")

    def _client_decided_on(self, client_id: str) -> int | None:
        check = self._expectations()
        return check.clients.get(client_id, -1) if check else -1

    def _record_decided_on(self, name: Name) -> int | None:
        check = self._expectations()
        return check.records.get(name) if check else None

    def write(self, batch: BatchWrite) -> None:
        super().write(batch)
        if batch.records:
            notify_feed(self._conn, {r.tenant_id for r in batch.records})
        # Checked: and from here to the commit this transaction holds its tenants'
        # feed rows, so a later write in it (another client's batch) reads those
        # tenants under the lock. What this one read of them is no longer what a
        # later one must find (this write changed it); what it read of any other
        # tenant is still checked, when a later write brings that tenant in.
        read, locked, of = self._read, self._locked, self._read_tenants
        wrote = batch.client.client_id if batch.client is not None else None
        self._read = Expectations(
            clients={
                c: seq for c, seq in read.clients.items() if c != wrote and of.get(c) not in locked
            },
            records={n: v for n, v in read.records.items() if n[0] not in locked},
            conflicts={c: r for c, r in read.conflicts.items() if of.get(c) not in locked},
        )

    def _hand_over(self, written: list[StoredRecord]) -> None:
        # Not before the commit: optimistic transactions read the cache without
        # the lock, and a row they saw before its commit would come without its
        # history (not visible yet), so a change by another client would look
        # like none, and its version would pass the check once committed.
        for rec in written:
            self._written[(rec.tenant_id, rec.collection, rec.record_id)] = rec

    def committed(self) -> None:
        self._cache.committed(self._written.values())

    def _versions(self, cur: Any, tenant: str, collection: str, rids: list[str]) -> dict[str, int]:
        cur.execute(
            "SELECT record_id, version FROM records"
            " WHERE tenant_id = %s AND collection = %s AND record_id = ANY(%s)",
            (tenant, collection, rids),
        )
        return dict(cur.fetchall())

    def _insert_rows(self, cur: Any, table: str, rows: Sequence[Sequence[Any]]) -> None:
        with cur.copy(f"COPY {table} ({', '.join(INSERT_COLUMNS[table])}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)

    def _update_records(
        self, cur: Any, rows: Sequence[Sequence[Any]], decided_on: Sequence[int | None]
    ) -> None:
        # One per session, emptied at every commit (and a rollback drops its rows);
        # its name changes with its columns (a pooled session may outlive a release).
        # A second write in the same transaction (several clients' batches) finds
        # the first's rows still there: they go first, or its UPDATE would join
        # them again.
        if self._changes_filled:
            cur.execute("DELETE FROM fieldsync_record_changes_2")
        else:
            cur.execute(_PG_RECORD_CHANGES)
        self._changes_filled = True
        columns = (*RECORD_COLUMNS, "record_key", "read_version")
        with cur.copy(f"COPY fieldsync_record_changes_2 ({', '.join(columns)}) FROM STDIN") as copy:
            for row, version in zip(rows, decided_on, strict=True):
                copy.write_row((*row, version))
        sets = ", ".join(f"{c} = c.{c}" for c in RECORD_COLUMNS)
        cur.execute(
            f"UPDATE records SET {sets} FROM fieldsync_record_changes_2 c"
            " WHERE records.record_key = c.record_key"
            " AND (c.read_version IS NULL OR records.version = c.read_version)"
        )
        if cur.rowcount != len(rows):
            raise WriteConflict("a record the batch rewrites was changed meanwhile")


# Lock a tenant's feed row and move its head by n (returning the new head).
_PG_TAKE_POSITIONS = (
    "UPDATE tenant_feed SET feed_head = feed_head + %s WHERE tenant_id = %s RETURNING feed_head"
)
# A tenant's first write: its row, from its highest position (0 for a new tenant).
_PG_NEW_TENANT = (
    "INSERT INTO tenant_feed (tenant_id, feed_head)"
    " SELECT %s, COALESCE(MAX(feed_seq), 0) FROM records WHERE tenant_id = %s"
    " ON CONFLICT (tenant_id) DO NOTHING"
)
_PG_TAKE_KEYS = "SELECT nextval('record_keys') FROM generate_series(1, %s)"

_PG_RECORD_CHANGES = (
    "CREATE TEMPORARY TABLE IF NOT EXISTS fieldsync_record_changes_2 ("
    " version BIGINT, deleted BOOLEAN, fields TEXT, field_versions TEXT,"
    " history_floor BIGINT, updated_at BIGINT, updated_by VARCHAR(500),"
    " last_client_id VARCHAR(200), others_version BIGINT, feed_seq BIGINT,"
    " record_key BIGINT, read_version BIGINT) ON COMMIT DELETE ROWS"
)


def _version(change: Change) -> int:
    return change.version


class _Postgres(Engine):
    name = "postgresql"
    combine_writes = False  # concurrent_pg: 6,500-8,000/s combined against 8,600-9,500/s not
    pipeline_writes = True

    def begin(
        self,
        conn: Connection,
        sql: Statements,
        cache: RecordCache,
        *,
        exclusive: bool,
        tenants: Sequence[str] = (),
        ahead: Ahead | None = None,
    ) -> SqlWriteTx:
        return PgWriteTx(conn, sql, cache, exclusive=exclusive, tenants=tenants, ahead=ahead)

    def now_ns(self) -> Any:
        # The database's clock, so instances' clocks need not agree.
        return cast(extract("epoch", func.clock_timestamp()) * 1_000_000_000, BigInteger)

    def change_listener(
        self,
        url: str,
        loop: asyncio.AbstractEventLoop,
        wake: Callable[[frozenset[str] | None], None],
    ) -> FeedListener:
        return FeedListener(url, loop, wake)


POSTGRES = _Postgres()
