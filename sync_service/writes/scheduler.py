"""When writes run: the queue of waiting writes, the write slots, combining, early answers.

Write transactions are serialized by the database (one write lock), so more
than a couple in flight per process only adds waiters, and a waiter holds a
worker thread and a pooled connection: with every worker thread blocked on
the lock, this instance's reads (Pull, GetRecords, Subscribe) would queue
behind the writes. So at most MAX_WRITES_IN_FLIGHT write transactions run;
further writes wait here, on the event loop, and the next transaction takes
all that wait, where the storage combines writes (`Storage.combine_writes`:
SQLite, whose transaction holds the whole database from its start anyway).
A conflict answer waiting for a slot gets the next one before the waiting
batches (it is one small transaction).

The scheduler is generic over the answer: each write brings the function
that turns its outcomes into the caller's answer messages (api/convert.py),
and for a large transaction those are built on the event loop while the
worker thread commits.

Not here: what a write does (writes/applier.py), the wire (api/).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from fieldsync.auth import Principal
from fieldsync.values import Fields
from sync_service.storage.base import StoredRecord
from sync_service.writes.applier import Applier
from sync_service.writes.model import BatchIn, BatchOutcome
from sync_service.writes.pipeline import Link

log = logging.getLogger("fieldsync.sync")

MAX_WRITES_IN_FLIGHT = 2
# Where a client's next write decides while its last one commits (pipelining,
# writes/pipeline.py): two per stream, and writes of different tenants commit
# in parallel there.
MAX_PIPELINED_IN_FLIGHT = 4

# From how many mutations in one transaction the answers are built while the
# commit runs (below, the hand-offs between threads cost more than they save).
OVERLAP_FROM = 64

A = TypeVar("A")

Answers = Callable[[list[BatchOutcome]], list[A]]
"""A write's answer messages from its batches' outcomes (built on the event loop)."""


class WriteScheduler:
    """Runs the writes of one process, at most MAX_WRITES_IN_FLIGHT transactions at once."""

    def __init__(
        self,
        applier: Applier,
        *,
        combine: bool,
        on_written: Callable[[frozenset[str]], None],
        pipeline: bool = False,
    ) -> None:
        self._applier = applier
        # A client's next write started while its last one is in flight decides
        # meanwhile (writes/pipeline.py); never with combining (one client a write).
        self.pipelines = pipeline and not combine
        self._slots = MAX_PIPELINED_IN_FLIGHT if self.pipelines else MAX_WRITES_IN_FLIGHT
        self._links: dict[str, Link] = {}  # client id -> its latest write's, while in flight
        # Several clients' writes in one transaction (see the module docstring).
        # On PostgreSQL a transaction takes the feed lock at its first write and
        # keeps it to the commit, so a combined one would hold it through every
        # later client's reads and decisions, and the other transaction in
        # flight, which could decide meanwhile, would wait instead.
        self._combine = combine
        # After each write transaction, with the tenants it wrote (wakes their Subscribe).
        self._on_written = on_written
        self._waiting: deque[_Write[Any]] = deque()  # writes not started yet, in arrival order
        self._writing: set[asyncio.Task[None]] = set()  # their transactions' tasks
        # Write transactions in flight (batches' and conflict answers'), at most
        # MAX_WRITES_IN_FLIGHT; a conflict answer waiting for a slot gets the
        # next one before the waiting batches.
        self._in_flight = 0
        self._resolvers: deque[asyncio.Future[None]] = deque()
        self.writes = 0  # ApplyBatch calls and Sync groups applied (or failed) so far
        self.write_transactions = 0  # the transactions they took

    async def apply(
        self,
        principal: Principal,
        batches: list[BatchIn],
        answers: Answers[A],
        decided: asyncio.Event | None = None,
    ) -> list[A]:
        """Apply one client's batches, in order; an answer message for each, once committed.

        Writes that arrive while MAX_WRITES_IN_FLIGHT transactions run wait
        here, on the event loop; when one ends, the next takes every write
        waiting (up to the applier's batch limit in mutations) and applies
        them in one transaction, each client's after the one before, with
        one commit (Applier.apply_many). Under load that turns a commit per
        call into a commit per round; a call alone starts at once, as before.
        A write whose caller went away before it started is dropped; one
        that started commits anyway (it is durable, and a resend is answered
        DUPLICATE). `decided` (pipelining) is set once the write has decided
        and goes on to write (or has ended): the time to start the client's next.
        """
        size = sum(len(b.mutations) for b in batches)
        done: asyncio.Future[list[A]] = asyncio.get_running_loop().create_future()
        self._waiting.append(_Write(principal, batches, size, answers, done, decided))
        self._start_writes()
        return await done

    async def resolve_conflict(
        self,
        principal: Principal,
        conflict_id: str,
        resolution: int,
        fields: Fields,
        *,
        traceparent: str | None = None,
    ) -> StoredRecord:
        """Answer a conflict in a write slot of its own (Applier.resolve_conflict)."""
        await self._take_slot()
        work = asyncio.ensure_future(
            asyncio.to_thread(
                self._applier.resolve_conflict,
                principal,
                conflict_id,
                resolution,
                fields,
                traceparent=traceparent,
            )
        )
        # The slot is the transaction's, not the call's: a caller that goes away
        # leaves the transaction running in its thread, and the slot held with it.
        work.add_done_callback(lambda _: self._release_slot())
        try:
            record = await asyncio.shield(work)
        except asyncio.CancelledError:
            work.add_done_callback(log_left_behind)
            raise
        self._on_written(frozenset((principal.tenant_id,)))
        return record

    def _start_writes(self) -> None:
        while self._in_flight < self._slots and self._waiting:
            group: list[_Write[Any]] = []
            total = 0
            while self._waiting:
                w = self._waiting[0]
                if w.done.done():  # cancelled before it started
                    self._waiting.popleft()
                    continue
                if group and (not self._combine or total + w.size > self._applier.max_batch):
                    break
                group.append(self._waiting.popleft())
                total += w.size
            if not group:
                return
            observer = self._applier.observer
            if observer is not None:
                now = time.perf_counter()
                for w in group:
                    observer.waited(now - w.queued_at)
            self.writes += len(group)
            self.write_transactions += 1
            self._in_flight += 1
            link = None
            if self.pipelines:
                client_id = group[0].batches[0].client_id
                before = self._links.get(client_id)
                link = self._links[client_id] = Link(before)
                if group[0].decided is not None:
                    link.on_ready = _setter(group[0].decided)
            task = asyncio.ensure_future(self._write(group, total, link))
            self._writing.add(task)

    def _release_slot(self) -> None:
        """A write transaction ended: its slot to a waiting conflict answer, or to batches."""
        self._in_flight -= 1
        while self._resolvers:
            taker = self._resolvers.popleft()
            if not taker.done():  # not cancelled meanwhile
                self._in_flight += 1
                taker.set_result(None)
                return
        self._start_writes()

    async def _take_slot(self) -> None:
        """Hold one of the MAX_WRITES_IN_FLIGHT write slots (for a conflict answer);
        `_release_slot` gives it back."""
        if self._in_flight < self._slots and not self._resolvers:
            self._in_flight += 1
            return
        given: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._resolvers.append(given)
        try:
            await given
        except asyncio.CancelledError:
            if given.done() and not given.cancelled():
                self._release_slot()  # handed over just as the caller went away
            raise

    async def _write(self, group: list[_Write[Any]], total: int, link: Link | None) -> None:
        """One transaction for the writes of `group`; each caller gets its answers or error."""
        try:
            results = await self._apply_group(group, total, link)
        except BaseException as err:
            for w in group:
                if w.done.done():
                    continue
                if isinstance(err, asyncio.CancelledError):
                    w.done.cancel()
                else:
                    w.done.set_exception(err)
            if isinstance(err, Exception):
                return  # given to the callers
            raise
        else:
            for w, result in zip(group, results, strict=True):
                if w.done.done():
                    continue
                if isinstance(result, Exception):
                    w.done.set_exception(result)
                else:
                    w.done.set_result(result)
        finally:
            task = asyncio.current_task()
            assert task is not None
            self._writing.discard(task)
            for w in group:
                if w.decided is not None:
                    w.decided.set()
            if link is not None:
                link.end()  # (the thread ended it; if it never ran, here)
                client_id = group[0].batches[0].client_id
                if self._links.get(client_id) is link:
                    del self._links[client_id]
            self._on_written(frozenset(w.principal.tenant_id for w in group))
            self._release_slot()

    async def _apply_group(
        self, group: list[_Write[Any]], total: int, link: Link | None
    ) -> list[list[Any] | Exception]:
        """The answers (or error) of each write of the group, applied in one transaction.

        The answers of a large transaction are built on the event loop while
        the worker thread commits (inside the database, without the GIL);
        they are used only if the attempt they were built from is the one
        that committed.
        """
        groups = [(w.principal, w.batches) for w in group]

        def apply(
            on_decided: Callable[[list[list[BatchOutcome] | Exception]], None] | None,
        ) -> list[list[BatchOutcome] | Exception]:
            try:
                return self._applier.apply_many(groups, on_decided, link)
            finally:
                if link is not None:
                    link.end()  # the write after it goes on

        if total < OVERLAP_FROM:
            # Too little to gain from overlapping: no extra hand-offs.
            return _answers_each(await asyncio.to_thread(apply, None), group)
        loop = asyncio.get_running_loop()
        decided: asyncio.Future[list[list[BatchOutcome] | Exception]] = loop.create_future()

        def on_decided(results: list[list[BatchOutcome] | Exception]) -> None:
            loop.call_soon_threadsafe(_resolve, decided, results)

        work = asyncio.ensure_future(asyncio.to_thread(apply, on_decided))
        await asyncio.wait((decided, work), return_when=asyncio.FIRST_COMPLETED)
        built = None
        if decided.done():
            seen = decided.result()
            built = seen, _answers_each(seen, group)
        results = await work
        if built is not None and built[0] is results:
            return built[1]
        return _answers_each(results, group)


@dataclass(eq=False)
class _Write(Generic[A]):
    """One client's batches waiting for a write transaction, and who waits for them."""

    principal: Principal
    batches: list[BatchIn]
    size: int  # mutations
    answers: Answers[A]
    done: asyncio.Future[list[A]]
    decided: asyncio.Event | None = None  # set when its decisions are handed on (pipelining)
    queued_at: float = field(default_factory=time.perf_counter)  # for the lock-wait metric


def _answers_each(
    results: list[list[BatchOutcome] | Exception], group: list[_Write[Any]]
) -> list[list[Any] | Exception]:
    """Each write's answers, or its error: a failure to build one write's answers is
    its own, not the other writes' of the transaction (all committed)."""
    out: list[list[Any] | Exception] = []
    for result, w in zip(results, group, strict=True):
        if isinstance(result, Exception):
            out.append(result)
            continue
        try:
            out.append(w.answers(result))
        except Exception as err:
            log.exception("building the answers of a committed write failed")
            out.append(err)
    return out


def _setter(event: asyncio.Event) -> Callable[[], None]:
    """Sets `event` from a worker thread (on the event loop that runs now)."""
    loop = asyncio.get_running_loop()

    def set_it() -> None:
        loop.call_soon_threadsafe(event.set)

    return set_it


def _resolve(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def log_left_behind(task: asyncio.Future[Any]) -> None:
    """For work a closed call left running: nobody waits for it, but a failure is said."""
    if not task.cancelled() and (err := task.exception()) is not None:
        log.warning("work left behind by a closed stream failed: %r", err)
