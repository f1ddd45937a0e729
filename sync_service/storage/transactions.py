"""A batch's reads and its write on the sync database, for SQLite and PostgreSQL.

`SqlWriteTx` (SQLite) and `PgWriteTx` (PostgreSQL) are the write
transactions of storage/base.WriteTx. Both share the reads of `_Reads`.

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
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import psycopg
from sqlalchemy import Connection, bindparam

from fieldsync.db import chunks
from fieldsync.jsontext import dumps
from fieldsync.values import dumps_fields, loads_fields
from sync_service.merge import Change
from sync_service.storage.base import (
    BatchWrite,
    ClientRow,
    StoredConflict,
    StoredRecord,
    StoredResult,
    WriteConflict,
)
from sync_service.storage.cache import RecordCache
from sync_service.storage.pg_notify import notify_feed
from sync_service.storage.rows import (
    INSERT_COLUMNS,
    PG_FEED_LOCK,
    RECORD_COLUMNS,
    Statements,
    conflict_row,
    fetch,
    get_client,
    load_conflicts,
    load_records,
)
from sync_service.storage.tables import conflicts

Name = tuple[str, str, str]  # tenant, collection, record id


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


class _Reads:
    """The set-based reads of a batch, on one connection."""

    _conn: Connection
    _sql: Statements
    _cache: RecordCache

    def _cached(self, name: Name) -> StoredRecord | None:
        """The cached row of a record, if these reads may use it."""
        return self._cache.get(name)

    def get_client(self, client_id: str) -> ClientRow | None:
        return get_client(self._conn, self._sql, client_id)

    def load_results(self, client_id: str, seqs: Sequence[int]) -> dict[int, StoredResult]:
        if not seqs:
            return {}
        ph = self._sql.ph
        rows = fetch(
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
            out.update(load_records(self._conn, self._sql, tenant_id, collection, missing))
        return out

    def load_changes(
        self, tenant_id: str, collection: str, since: Mapping[str, int]
    ) -> dict[str, list[Change]]:
        out: dict[str, list[Change]] = {rid: [] for rid in since}
        stored = self.load_records(tenant_id, collection, list(since))
        after = {rec.key: (rid, since[rid]) for rid, rec in stored.items()}
        for chunk in chunks(list(after)):
            floor = min(after[k][1] for k in chunk)
            rows = fetch(self._conn, self._sql.select_history(len(chunk)), (*chunk, floor))
            for key, version, client_id, mutation_id, old in rows:
                rid, base = after[key]
                if version > base:
                    out[rid].append(Change(version, client_id, mutation_id, loads_fields(old)))
        return out

    def load_conflicts(self, tenant_id: str, ids: Iterable[str]) -> dict[str, StoredConflict]:
        return load_conflicts(self._conn, tenant_id, list(ids))


class SqlWriteTx(_Reads):
    """The reads and the write of one batch, on one connection in one transaction.

    On SQLite the transaction holds the database's write lock from its first
    statement (BEGIN IMMEDIATE): it is exclusive. It starts by reading
    sync_state: the feed head tells the record cache whether its rows are
    current (storage/cache.py), and the head and the last record key are
    where this batch's positions and keys go on.
    """

    def __init__(self, conn: Connection, sql: Statements, cache: RecordCache) -> None:
        self._conn = conn
        self._sql = sql
        self._cache = cache
        self._head, self._keys = fetch(conn, sql.read_state, ())[0]
        cache.begin(self._head)

    def _claim_feed(self, cur: Any) -> tuple[int, int]:
        """The feed head and the last record key this write goes on from, under the lock."""
        return self._head, self._keys

    def _expectations(self) -> Expectations | None:
        """What to check the write against (SQLite: nothing, the transaction is exclusive)."""
        return None

    def write(self, batch: BatchWrite) -> None:
        conn = self._conn
        cur = conn.connection.cursor()
        head, keys = start = self._claim_feed(cur)
        check = self._expectations()
        if check:
            self._check_unwritten(cur, batch, check)
        if batch.client is not None:
            # First: another instance that applied this client's next sequence
            # meanwhile fails it here (WriteConflict), before any row of ours
            # meets one of its rows (a result at the same sequence).
            cl = batch.client
            self._write_client(cur, cl, check.clients.get(cl.client_id, -1) if check else -1)
        known = self._record_keys(batch)
        written: list[StoredRecord] = []  # the rows as stored, for the cache
        if batch.records:
            new_rows: list[tuple[Any, ...]] = []
            old_rows: list[tuple[Any, ...]] = []
            decided_on: list[int | None] = []  # the version each old row was decided on
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
                    decided_on.append(check.records.get(name) if check else None)
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
                self._update_records(cur, old_rows, decided_on)
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
            self._insert(cur, "conflicts", [conflict_row(c) for c in batch.conflicts])
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
        if (head, keys) != start:
            cur.execute(self._sql.write_state, (head, keys))
            self._head, self._keys = head, keys
        cur.close()
        self._hand_over(written, head)

    def _hand_over(self, written: list[StoredRecord], head: int) -> None:
        """Give the cache the rows this transaction writes (see storage/cache.py).

        On SQLite now, before the commit: the transaction holds the database's
        write lock, and only a write transaction (which waits for that lock)
        reads the cache.
        """
        self._cache.committing(written, head)

    def committed(self) -> None:
        """The transaction committed (called by the storage, after the commit)."""

    # -- checks and writes that differ by engine -------------------------------------

    def _check_unwritten(self, cur: Any, batch: BatchWrite, check: Expectations) -> None:
        """WriteConflict unless what the batch read and does not write is as it was."""
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

    def _versions(self, cur: Any, tenant: str, collection: str, rids: list[str]) -> dict[str, int]:
        out: dict[str, int] = {}
        ph = self._sql.ph
        for chunk in chunks(rids):
            cur.execute(
                f"SELECT record_id, version FROM records WHERE tenant_id = {ph}"
                f" AND collection = {ph} AND record_id IN ({self._sql.marks(len(chunk))})",
                (tenant, collection, *chunk),
            )
            out.update(cur.fetchall())
        return out

    def _write_client(self, cur: Any, cl: ClientRow, decided_on: int | None) -> None:
        """Write the client's row; `decided_on`: the sequence the batch was decided on
        (None: the row was absent; -1: nothing to check)."""
        try:
            if not cl.exists:
                cur.execute(
                    self._sql.insert_client, (cl.client_id, cl.tenant_id, cl.sub, cl.last_seq)
                )
            elif decided_on is None:
                raise WriteConflict(f"client {cl.client_id!r} was decided on as new")
            elif decided_on < 0:
                cur.execute(self._sql.update_client, (cl.last_seq, cl.client_id))
            else:
                cur.execute(self._sql.update_client_at, (cl.last_seq, cl.client_id, decided_on))
                if cur.rowcount != 1:
                    raise WriteConflict(f"client {cl.client_id!r} wrote meanwhile")
        except (sqlite3.IntegrityError, psycopg.errors.UniqueViolation) as err:
            raise WriteConflict(f"client {cl.client_id!r} was created meanwhile") from err

    def _insert(self, cur: Any, table: str, rows: Sequence[Sequence[Any]]) -> None:
        """Add rows of INSERT_COLUMNS[table]."""
        try:
            cur.executemany(self._sql.inserts[table], rows)
        except sqlite3.IntegrityError as err:
            if table != "records":
                raise
            raise WriteConflict("a record the batch creates was created meanwhile") from err

    def _update_records(
        self, cur: Any, rows: Sequence[Sequence[Any]], decided_on: Sequence[int | None]
    ) -> None:
        """Rewrite stored records: rows of RECORD_COLUMNS, then the record_key; each only
        at the version it was decided on, where given."""
        plain = [row for row, v in zip(rows, decided_on, strict=True) if v is None]
        checked = [(*row, v) for row, v in zip(rows, decided_on, strict=True) if v is not None]
        if plain:
            cur.executemany(self._sql.update_record, plain)
        if checked:
            cur.executemany(self._sql.update_record_at, checked)
            if cur.rowcount != len(checked):
                raise WriteConflict("a record the batch rewrites was changed meanwhile")

    def _record_keys(self, batch: BatchWrite) -> dict[Name, int]:
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

    def _keys_of(self, names: Iterable[Name]) -> dict[Name, int]:
        wanted: dict[tuple[str, str], list[str]] = {}
        for tenant, collection, rid in names:
            wanted.setdefault((tenant, collection), []).append(rid)
        found = {}
        for (tenant, collection), rids in wanted.items():
            stored = load_records(self._conn, self._sql, tenant, collection, rids)
            for rid in rids:
                if rid not in stored:
                    name = (tenant, collection, rid)
                    raise ValueError(f"no stored record {name!r} to update or file history under")
                found[(tenant, collection, rid)] = stored[rid].key
        return found


class PgWriteTx(SqlWriteTx):
    """A write transaction on PostgreSQL, where several instances write at once.

    Optimistic (the default): it reads and decides without a lock, noting
    what it read (Expectations); its write takes the feed lock (an advisory
    lock, held until the commit) and checks that all of that is still so,
    or raises WriteConflict (see the module docstring for how). So batches of
    different clients on different records decide in parallel, on several
    instances, and queue only to write. A conflict costs a second attempt,
    which the applier makes exclusive: the feed lock from the start, like
    SQLite's whole-database lock. Holding the feed lock from the feed head's
    read to the commit makes feed positions visible in their order (SPEC §6).

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
        self, conn: Connection, sql: Statements, cache: RecordCache, *, exclusive: bool
    ) -> None:
        self._conn = conn
        self._sql = sql
        self._cache = cache
        self._exclusive = exclusive
        self._read = Expectations()  # what this transaction read itself
        self._feed_locked = False
        self._written: dict[Name, StoredRecord] = {}  # for the cache, once committed
        self._changes_filled = False  # the temporary table holds this transaction's rows
        if exclusive:
            self._lock_feed(conn.connection.cursor())

    def _lock_feed(self, cur: Any) -> None:
        cur.execute(f"SELECT pg_advisory_xact_lock({PG_FEED_LOCK})")
        self._feed_locked = True

    def _cached(self, name: Name) -> StoredRecord | None:
        # What this transaction wrote is exact within it (a second write of
        # several clients' batches in one transaction reads the first's rows).
        own = self._written.get(name)
        if own is not None or self._exclusive:
            return own
        return self._cache.get(name)

    def get_client(self, client_id: str) -> ClientRow | None:
        client = super().get_client(client_id)
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

    def load_conflicts(self, tenant_id: str, ids: Iterable[str]) -> dict[str, StoredConflict]:
        found = super().load_conflicts(tenant_id, ids)
        for cid, conflict in found.items():
            self._read.conflicts.setdefault(cid, conflict.resolved)
        return found

    def _claim_feed(self, cur: Any) -> tuple[int, int]:
        if not self._feed_locked:
            self._lock_feed(cur)
        cur.execute(self._sql.read_state)
        head, keys = cur.fetchone()
        self._head, self._keys = head, keys
        return head, keys

    def _expectations(self) -> Expectations | None:
        return None if self._exclusive else self._read

    def write(self, batch: BatchWrite) -> None:
        super().write(batch)
        if batch.records:
            notify_feed(self._conn, {r.tenant_id for r in batch.records})
        # Checked: and from here to the commit this transaction holds the feed
        # lock, so a later write in it (another client's batch) reads under the
        # lock. What this one read is no longer what a later one must find:
        # this write changed it.
        self._read = Expectations()

    def _hand_over(self, written: list[StoredRecord], head: int) -> None:
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

    def _insert(self, cur: Any, table: str, rows: Sequence[Sequence[Any]]) -> None:
        try:
            with cur.copy(f"COPY {table} ({', '.join(INSERT_COLUMNS[table])}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
        except psycopg.errors.UniqueViolation as err:
            if table != "records":
                raise
            raise WriteConflict("a record the batch creates was created meanwhile") from err

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


_PG_RECORD_CHANGES = (
    "CREATE TEMPORARY TABLE IF NOT EXISTS fieldsync_record_changes_2 ("
    " version BIGINT, deleted BOOLEAN, fields TEXT, field_versions TEXT,"
    " history_floor BIGINT, updated_at BIGINT, updated_by VARCHAR(500),"
    " last_client_id VARCHAR(200), others_version BIGINT, feed_seq BIGINT,"
    " record_key BIGINT, read_version BIGINT) ON COMMIT DELETE ROWS"
)
