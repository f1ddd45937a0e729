"""What PostgreSQL does differently: optimistic writers, the feed lock, LISTEN/NOTIFY.

Several service instances write one PostgreSQL database at once, so:

- `PgWriteTx`, the write transaction, is optimistic by default (it reads and
  decides without a lock, noting what it read: `Expectations`) and checks
  under the feed lock at its write that all of that is still so, or raises
  WriteConflict; a retry is exclusive (the feed lock from the start). Rows go
  in by COPY.
- The feed lock (an advisory lock, held from the feed head's read to the
  commit) makes feed positions visible in their order; migrations take it too.
- A write that moves the feed calls `notify_feed` (a
  `pg_notify('fieldsync_feed', tenant)`, which PostgreSQL delivers only when
  the transaction commits, and never if it rolls back). Each sync process
  runs one `FeedListener`: a thread holding one dedicated connection (not
  from the pool) that LISTENs on the channel and, for each notification,
  wakes the process's ChangeNotifier on its event loop. If the connection
  drops it reconnects with backoff and then wakes everyone once, since
  notifications sent meanwhile are lost; the Subscribe poll stays as the
  last resort.
- The outbox's leases use the database's clock, so instances' clocks need
  not agree; the service does not combine several clients' writes in one
  transaction (`POSTGRES.combine_writes`): a transaction takes the feed lock
  at its first write and keeps it to the commit, so a combined one would
  hold it through every later client's reads and decisions.

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
import logging
import random
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from sqlalchemy import BigInteger, Connection, cast, extract, func, text
from sqlalchemy.engine import make_url

from fieldsync.db import chunks
from sync_service.storage.base import (
    BatchWrite,
    ClientRow,
    StoredConflict,
    StoredRecord,
    WriteConflict,
)
from sync_service.storage.cache import RecordCache
from sync_service.storage.engine import Engine
from sync_service.storage.rows import (
    INSERT_COLUMNS,
    PG_FEED_LOCK,
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

log = logging.getLogger("fieldsync.feed.listen")

FEED_CHANNEL = "fieldsync_feed"
LISTENER_APPLICATION_NAME = "fieldsync-feed-listener"

_NOTIFY = text(f"SELECT pg_notify('{FEED_CHANNEL}', :tenant)")


def notify_feed(conn: Connection, tenants: Iterable[str]) -> None:
    """Queue one notification per tenant on the open transaction; sent at its commit."""
    for tenant in sorted(set(tenants)):
        conn.execute(_NOTIFY, {"tenant": tenant})


def libpq_url(url: str) -> str:
    """The SQLAlchemy URL as a libpq connection URI (no '+driver')."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


class FeedListener:
    """One LISTEN connection in a background thread; calls `wake` on `loop` per commit.

    Bursts are coalesced: while a wake-up is queued on the loop and has not
    run yet, further notifications add nothing (the queued one runs after
    them, and the streams it wakes read the database afresh).
    """

    def __init__(
        self,
        url: str,
        loop: asyncio.AbstractEventLoop,
        wake: Callable[[], None],
        *,
        poll_interval: float = 0.5,
        min_backoff: float = 0.1,
        max_backoff: float = 5.0,
    ) -> None:
        self._conninfo = libpq_url(url)
        self._loop = loop
        self._wake = wake
        self._interval = poll_interval  # how often the thread checks for stop()
        self._min_backoff, self._max_backoff = min_backoff, max_backoff
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._queued = False
        self._thread = threading.Thread(target=self._run, name="fieldsync-feed-listener")
        self._thread.daemon = True  # never holds the process up at exit

    def start(self) -> None:
        self._thread.start()

    def wait_ready(self, timeout: float) -> bool:
        """Whether the first LISTEN is in place (within `timeout` seconds)."""
        return self._ready.wait(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- the thread -------------------------------------------------------------

    def _run(self) -> None:
        backoff = self._min_backoff
        while not self._stop.is_set():
            try:
                with psycopg.Connection.connect(
                    self._conninfo,
                    autocommit=True,
                    application_name=LISTENER_APPLICATION_NAME,
                    connect_timeout=5,
                    # A peer that vanished without closing the socket is noticed.
                    keepalives=1,
                    keepalives_idle=30,
                    keepalives_interval=10,
                    keepalives_count=3,
                ) as conn:
                    conn.execute(f"LISTEN {FEED_CHANNEL}")
                    if self._ready.is_set():
                        log.info("feed listener reconnected")
                    self._ready.set()
                    backoff = self._min_backoff
                    # Commits while there was no LISTEN sent nothing: look once.
                    self._schedule_wake()
                    while not self._stop.is_set():
                        for _ in conn.notifies(timeout=self._interval):
                            self._schedule_wake()
            except Exception as err:  # psycopg.Error mostly; any error must not end listening
                if self._stop.is_set():
                    return
                delay = backoff * random.uniform(0.5, 1.0)
                log.warning("feed listener connection lost (%s); reconnecting in %.1fs", err, delay)
                self._stop.wait(delay)
                backoff = min(backoff * 2, self._max_backoff)

    def _schedule_wake(self) -> None:
        if self._queued:
            return
        self._queued = True
        try:
            self._loop.call_soon_threadsafe(self._wake_on_loop)
        except RuntimeError:  # the loop is closed: the process is stopping
            self._stop.set()

    def _wake_on_loop(self) -> None:
        # Cleared before waking: a notification that arrives from here on
        # queues another wake-up, so none is lost.
        self._queued = False
        self._wake()


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
    what it read (Expectations); its write takes the feed lock (an advisory
    lock, held until the commit) and checks that all of that is still so,
    or raises WriteConflict (see below for how). So batches of
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
    the other instances' Subscribe streams (notify_feed: delivered at commit,
    dropped on rollback).
    """

    DUPLICATE_KEY = psycopg.errors.UniqueViolation

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


class _Postgres(Engine):
    name = "postgresql"
    combine_writes = False  # concurrent_pg: 6,500-8,000/s combined against 8,600-9,500/s not

    def begin(
        self, conn: Connection, sql: Statements, cache: RecordCache, *, exclusive: bool
    ) -> SqlWriteTx:
        return PgWriteTx(conn, sql, cache, exclusive=exclusive)

    def lock_for_migration(self, conn: Connection) -> None:
        # Instances starting together migrate one after the other.
        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({PG_FEED_LOCK})")

    def now_ns(self) -> Any:
        # The database's clock, so instances' clocks need not agree.
        return cast(extract("epoch", func.clock_timestamp()) * 1_000_000_000, BigInteger)

    def change_listener(
        self, url: str, loop: asyncio.AbstractEventLoop, wake: Callable[[], None]
    ) -> FeedListener:
        return FeedListener(url, loop, wake)


POSTGRES = _Postgres()
