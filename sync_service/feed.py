"""The change feed's cursors and the in-process wake-up of Subscribe streams.

A cursor is an opaque token around a feed position (records.feed_seq).
`ChangeNotifier` wakes the Subscribe streams of this process when a batch
commits; changes committed by other processes are found by polling, or heard
at once on PostgreSQL (storage/postgres.FeedListener).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib

from fieldsync.errors import InvalidArgument, Reason

_PREFIX = "fs1:"


def encode_cursor(position: int) -> str:
    return base64.urlsafe_b64encode(f"{_PREFIX}{position}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    if not cursor:
        return 0
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        if not text.startswith(_PREFIX):
            raise ValueError(text)
        position = int(text[len(_PREFIX) :])
        if position < 0:
            raise ValueError(text)
        return position
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise InvalidArgument(
            Reason.INVALID_CURSOR,
            "the cursor was not issued by this server; pull from the start (empty cursor)",
            violations=[("cursor", "not a cursor of this server")],
        ) from None


class ChangeNotifier:
    """Wakes every waiter when something commits (call `notify` on the event loop).

    A waiter takes a `snapshot()` BEFORE it reads the database and waits on
    that: a commit that lands during the read has already set the snapshot,
    so the wake-up is never lost between reading and waiting.
    """

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self._closed = False

    def notify(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    def close(self) -> None:
        """Wake every waiter for good (shutdown)."""
        self._closed = True
        self._event.set()

    def snapshot(self) -> asyncio.Event:
        return self._event

    async def wait(self, since: asyncio.Event, timeout: float) -> None:
        """Return when something committed after `since` was taken, or after `timeout`."""
        if self._closed or since.is_set():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(since.wait(), timeout)
