"""The read-ahead of a Sync stream: batches decoded while earlier ones apply.

A Sync stream's client may send batch after batch without waiting; the
servicer applies those already waiting together (one group) while the event
loop decodes the next ones, at most READ_AHEAD ahead, so gRPC flow control
still holds a fast sender back and memory stays flat. Not here: how a group
is applied (writes/scheduler.py) or decoded (api/convert.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from sync_service.writes.model import BatchIn

# Batches a Sync stream decodes ahead of the one applying: they are applied
# together once the service is ready (see SyncServicer.Sync).
READ_AHEAD = 4


class Inbox:
    """The batches a Sync stream has read ahead, decoded, in order.

    A reader task decodes them (at most `depth` waiting); the end of the
    stream or a bad message is kept in line behind the batches before it, so
    those are applied and answered first. A failure of the call itself
    (the client went away) ends the stream at once.
    """

    def __init__(
        self, read: Callable[[], Awaitable[BatchIn | None]], depth: int, max_mutations: int
    ) -> None:
        self._queue: asyncio.Queue[BatchIn | BaseException | None] = asyncio.Queue(depth)
        self._max = max_mutations
        self._reader = asyncio.ensure_future(self._fill(read))
        self._held: BatchIn | BaseException | None = None  # taken from the queue, not yet grouped
        self.ended = False
        self._error: BaseException | None = None

    async def _fill(self, read: Callable[[], Awaitable[BatchIn | None]]) -> None:
        while True:
            try:
                batch = await read()
            except Exception as err:
                await self._queue.put(err)
                return
            await self._queue.put(batch)
            if batch is None:
                return

    async def group(self) -> list[BatchIn]:
        """Wait for the next batch; it and those waiting behind it (empty: the end)."""
        if self.ended:
            return []
        if self._held is None:
            item = await self._queue.get()
            if item is None:
                self.ended = True  # the client is done sending
                return []
            self._held = item
        return self.group_waiting()

    async def wait(self) -> None:
        """Until a batch (or the end) is waiting; taking nothing (cancellable)."""
        if self.ended or self._held is not None:
            return
        item = await self._queue.get()
        if item is None:
            self.ended = True
        else:
            self._held = item

    def group_waiting(self) -> list[BatchIn]:
        """The batches already waiting (maybe none), up to max_mutations in all (or one)."""
        out: list[BatchIn] = []
        total = 0
        while not self.ended:
            if self._held is None:
                if self._queue.empty():
                    break
                self._held = self._queue.get_nowait()
            item = self._held
            if isinstance(item, BatchIn):
                if out and total + len(item.mutations) > self._max:
                    break  # it starts the next group
                out.append(item)
                total += len(item.mutations)
            else:
                self.ended = True  # the stream's end, or a bad message: after these
                self._error = item
            self._held = None
        return out

    def raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        if self._reader.done():
            if not self._reader.cancelled():
                self._reader.exception()  # retrieved: it was passed on through the queue
        else:
            self._reader.cancel()
