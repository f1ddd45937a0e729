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

from sync_service.storage.base import StoredRecord, WriteConflict
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
        self._head, self._keys = fetch(conn, sql.read_state, ())[0]
        cache.begin(self._head)

    def _claim_feed(self, cur: Any) -> tuple[int, int]:
        return self._head, self._keys

    def _hand_over(self, written: list[StoredRecord], head: int) -> None:
        # Now, before the commit: the transaction holds the database's write
        # lock, and only a write transaction (which waits for that lock) reads
        # the cache.
        self._cache.committing(written, head)

    def _insert(self, cur: Any, table: str, rows: Sequence[Sequence[Any]]) -> None:
        try:
            cur.executemany(self._sql.inserts[table], rows)
        except sqlite3.IntegrityError as err:
            if table != "records":
                raise
            raise WriteConflict("a record the batch creates was created meanwhile") from err

    def _update_records(
        self, cur: Any, rows: Sequence[Sequence[Any]], decided_on: Sequence[int | None]
    ) -> None:
        # Exclusive: nothing was decided on a version to check (decided_on is all None).
        cur.executemany(self._sql.update_record, rows)


class _Sqlite(Engine):
    name = "sqlite"
    combine_writes = True

    def begin(
        self, conn: Connection, sql: Statements, cache: RecordCache, *, exclusive: bool
    ) -> SqlWriteTx:
        return SqliteWriteTx(conn, sql, cache)  # exclusive either way

    def now_ns(self) -> Any:
        return literal(time.time_ns(), BigInteger)


SQLITE = _Sqlite()
