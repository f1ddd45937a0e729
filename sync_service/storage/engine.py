"""What an SQL engine decides for the storage: the seam between storage/sql.py and each engine.

SqlStorage runs the same SQL on both engines; where they differ it asks its
`Engine` (storage/sqlite.py's SQLITE, storage/postgres.py's POSTGRES): which
write transaction to open, whether the service should combine the writes that
wait into one transaction, the clock the outbox's
leases use, and whether other instances' commits must wake this one.
Nothing here runs SQL.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Protocol

from sqlalchemy import Connection

from sync_service.storage.base import Ahead
from sync_service.storage.cache import RecordCache
from sync_service.storage.rows import Statements
from sync_service.storage.transactions import SqlWriteTx


class ChangeListener(Protocol):
    """Hears other instances' commits (PostgreSQL's FeedListener)."""

    def start(self) -> None: ...

    def wait_ready(self, timeout: float) -> bool: ...

    def stop(self, timeout: float = 5.0) -> None: ...


class Engine:
    name: ClassVar[str]  # the dialect's name, as SQLAlchemy spells it
    # Several clients' writes in one transaction: worth it where a write
    # transaction holds the whole database from its start anyway.
    combine_writes: ClassVar[bool]
    # A client's next write decided while its last one commits (an optimistic
    # transaction given `ahead`, checked at its write): where writers run at once.
    pipeline_writes: ClassVar[bool] = False

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
        """The write transaction on `conn` (already begun); an exclusive one holds the
        write lock of `tenants` from the start; an optimistic one may decide on
        `ahead` (only where `pipeline_writes`)."""
        raise NotImplementedError

    def now_ns(self) -> Any:
        """The current time in nanoseconds, as an SQL expression (the outbox's leases)."""
        raise NotImplementedError

    def change_listener(
        self,
        url: str,
        loop: asyncio.AbstractEventLoop,
        wake: Callable[[frozenset[str] | None], None],
    ) -> ChangeListener | None:
        """What wakes this instance when another commits (None: only this one writes)."""
        return None
