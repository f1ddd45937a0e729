"""Following new events as they are recorded: the wake-up signal and the tail loop.

`CommitSignal` wakes this process's tails when RecordEvents commits; events
recorded by other instances on the same database are found by polling.
`follow` yields a tenant's events after a position, for as long as the caller
reads, and raises SHUTTING_DOWN once the signal is closed (server stopping),
so a stop never waits out its grace period on open streams.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator

from audit_service.model import StoredEvent
from audit_service.storage import AuditStorage
from fieldsync.audit_kinds import EventKind
from fieldsync.errors import Reason, Unavailable

__all__ = ["CommitSignal", "follow"]

TAIL_PAGE = 500


class CommitSignal:
    """Wakes every tail of this process (call its methods on the event loop only)."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self.closed = False

    def armed(self) -> asyncio.Event:
        """The event the next `notify` (or `close`) sets.

        Take it before reading the database: a commit that lands during the
        read then still wakes the reader, instead of waiting for the next poll.
        """
        return self._event

    def notify(self) -> None:
        if self.closed:
            return
        self._event.set()
        self._event = asyncio.Event()

    def close(self) -> None:
        """Wake every tail for good: the server is stopping."""
        self.closed = True
        self._event.set()


async def follow(
    storage: AuditStorage,
    signal: CommitSignal,
    tenant_id: str,
    kinds: frozenset[EventKind],
    *,
    after: int,
    poll_seconds: float,
) -> AsyncGenerator[StoredEvent, None]:
    """The tenant's events of `kinds` (all when empty) recorded after seq `after`, forever."""
    position = after
    while True:
        if signal.closed:
            raise Unavailable(Reason.SHUTTING_DOWN, "the audit service is stopping; reconnect")
        woken = signal.armed()
        found = await asyncio.to_thread(storage.events_after, tenant_id, position, kinds, TAIL_PAGE)
        for stored in found:
            position = stored.seq
            yield stored
        if len(found) == TAIL_PAGE:
            continue  # more are waiting: no need to sleep
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(woken.wait(), poll_seconds)
