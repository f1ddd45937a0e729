"""The records a sync instance last wrote or read, kept between its write transactions.

A batch reads every record it touches before deciding anything; a returning
client's queue touches the same records again and again, and reading them
(and decoding their JSON) was a large share of a batch. So a storage keeps
the committed rows it has seen, and a write transaction uses them while they
are provably the database's own:

- the cache is current at one feed head (sync_state.feed_head, which every
  committed change of any record moves forward);
- a write transaction reads the head under the write lock, so nobody can
  commit in between: if it is the cache's, no other writer (another instance,
  another process on the same file) has changed any record since, and every
  cached row is exact; otherwise the cache is emptied first;
- a transaction hands the cache its written rows and new head just before it
  commits (still holding the lock, so no other transaction of this process
  can look); if anything fails before the commit is through, the cache is
  emptied, so a rolled-back write is never served.

On PostgreSQL, optimistic transactions read the cache without the lock and
check afterwards that each record they read is still at the version they
read (storage/postgres.PgWriteTx), so there the head is not used: rows
are handed over only once committed (`committed`), never over a newer copy.
A row seen before its commit would come without its history, which is not
visible yet, and its version would pass the check once it commits: a change
by another client would look like none.

Only records are kept (not their history, conflicts or results), at most
`capacity` of them, the least recently stored dropped first. Rows in the
cache are shared with callers, who must not change them.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from itertools import islice

from sync_service.storage.base import StoredRecord

Key = tuple[str, str, str]  # tenant, collection, record id


class RecordCache:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._rows: dict[Key, StoredRecord] = {}
        self._head: int | None = None  # None: nothing is known
        self._lock = threading.Lock()  # for committed(), called from several threads

    def __len__(self) -> int:
        return len(self._rows)

    def begin(self, head: int) -> None:
        """A write transaction read `head` under the write lock: keep the rows only if
        they are current at it."""
        if head != self._head:
            self._rows.clear()
            self._head = head

    def get(self, key: Key) -> StoredRecord | None:
        return self._rows.get(key)

    def store(self, rows: Iterable[StoredRecord]) -> None:
        """Rows read or written at the current head."""
        if not self.capacity:
            return
        cached = self._rows
        for rec in rows:
            key = (rec.tenant_id, rec.collection, rec.record_id)
            cached.pop(key, None)  # to the young end
            cached[key] = rec
        excess = len(cached) - self.capacity
        if excess > 0:
            # A tenth at a time, so a full cache does not pay this on every batch.
            for key in list(islice(cached, excess + self.capacity // 10)):
                del cached[key]

    def committing(self, rows: Iterable[StoredRecord], head: int) -> None:
        """The transaction is about to commit these rows, moving the feed to `head`."""
        self._head = head
        self.store(rows)

    def committed(self, rows: Iterable[StoredRecord]) -> None:
        """Rows a transaction has committed, for readers that do not hold the write
        lock (PostgreSQL's optimistic transactions): a cached row is then never
        newer than the database. Transactions may hand theirs over in another
        order than they committed, so a row replaces only an older copy; a copy
        that is stale anyway fails the reader's version check."""
        with self._lock:
            cached = self._rows
            self.store(
                r
                for r in rows
                if (old := cached.get((r.tenant_id, r.collection, r.record_id))) is None
                or old.version < r.version
            )

    def forget(self) -> None:
        """Something failed: nothing cached can be trusted."""
        self._rows.clear()
        self._head = None
