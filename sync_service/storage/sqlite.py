"""What SQLite does differently: one exclusive writer, and the storage's engine hooks.

A SQLite write transaction holds the database's write lock from its first
statement (BEGIN IMMEDIATE; WAL mode, so readers are never blocked): it is
exclusive, so it checks nothing it read, and its rows go in by executemany.
The record cache gets a transaction's rows before its commit (only a writer,
which waits for the lock, reads the cache). Because a transaction holds the
whole database from its start anyway, the service combines the writes that
wait into one transaction (`SQLITE.combine_writes`).

Not here: the SQL both engines share (storage/transactions.py, storage/sql.py).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from typing import Any

from sqlalchemy import BigInteger, Connection, literal

from sync_service.storage.base import Ahead, BatchWrite, StoredRecord
from sync_service.storage.cache import RecordCache
from sync_service.storage.engine import Engine
from sync_service.storage.rows import Statements, fetch
from sync_service.storage.transactions import SqlWriteTx


class SqliteWriteTx(SqlWriteTx):
    """A write transaction on SQLite: exclusive from its first statement.

    It starts by reading sync_state: the feed head tells the record cache
    whether its rows are current (storage/cache.py), and the head and the last
    record key are where this batch's positions and keys go on.
    """

    DUPLICATE_KEY = sqlite3.IntegrityError

    def __init__(self, conn: Connection, sql: Statements, cache: RecordCache) -> None:
        self._conn = conn
        self._sql = sql
        self._cache = cache
        head, keys = fetch(conn, sql.read_state, ())[0]
        self._head, self._keys = self._start = int(head), int(keys)
        cache.begin(self._head)

    # One global head and key counter: the transaction holds the whole database.

    def _claim_feed(self, cur: Any, batch: BatchWrite) -> None:
        self._start = (self._head, self._keys)

    def _position(self, tenant_id: str) -> int:
        self._head += 1
        return self._head

    def _new_key(self) -> int:
        self._keys += 1
        return self._keys

    def _save_feed(self, cur: Any) -> None:
        if (self._head, self._keys) != self._start:
            cur.execute(self._sql.write_state, (self._head, self._keys))

    def _hand_over(self, written: list[StoredRecord]) -> None:
        # Now, before the commit: the transaction holds the database's write
        # lock, and only a write transaction (which waits for that lock) reads
        # the cache.
        self._cache.committing(written, self._head)

    def _insert_rows(self, cur: Any, table: str, rows: Sequence[Sequence[Any]]) -> None:
        cur.executemany(self._sql.inserts[table], rows)

    def _update_records(
        self, cur: Any, rows: Sequence[Sequence[Any]], decided_on: Sequence[int | None]
    ) -> None:
        # Exclusive: nothing was decided on a version to check (decided_on is all None).
        cur.executemany(self._sql.update_record, rows)


class _Sqlite(Engine):
    name = "sqlite"
    combine_writes = True

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
        return SqliteWriteTx(conn, sql, cache)  # exclusive (the whole database) either way

    def now_ns(self) -> Any:
        return literal(time.time_ns(), BigInteger)


SQLITE = _Sqlite()
