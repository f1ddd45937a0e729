"""The gRPC SyncService: converts wire messages, calls the applier or storage, converts back.

No SQL and no merge logic here. Blocking work (the database) runs in worker
threads so the event loop keeps serving other calls; errors raised as
FieldSyncError are mapped to statuses by the interceptor (fieldsync.interceptors).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc

from fieldsync.auth import Principal
from fieldsync.errors import InvalidArgument, Reason
from fieldsync.interceptors import current_principal
from fieldsync.v1 import common_pb2, sync_pb2, sync_pb2_grpc
from fieldsync.values import fields_from_proto
from sync_service.apply import Applier
from sync_service.convert import (
    batch_from_proto,
    batch_outcome_to_proto,
    conflict_to_proto,
    record_to_proto,
)
from sync_service.feed import ChangeNotifier, decode_cursor, encode_cursor
from sync_service.model import BatchIn, BatchOutcome
from sync_service.storage.base import FeedRecord, Storage, StoredRecord

log = logging.getLogger("fieldsync.sync")

Ctx = grpc.aio.ServicerContext[Any, Any]

MAX_PULL_PAGE = 5000
MAX_CONFLICT_PAGE = 1000
MAX_GET_RECORDS = 1000

# Write transactions are serialized by the database (one write lock), so more
# than a couple in flight per process only adds waiters, and a waiter holds a
# worker thread and a pooled connection: with every worker thread blocked on
# the lock, this instance's reads (Pull, GetRecords, Subscribe) would queue
# behind the writes. Further writes wait here instead, on the event loop, and
# the next transaction takes all that wait (see SyncServicer._apply).
MAX_WRITES_IN_FLIGHT = 2

# From how many mutations in one transaction the answers are built while the
# commit runs (below, the hand-offs between threads cost more than they save).
OVERLAP_FROM = 64

# Batches a Sync stream decodes ahead of the one applying: they are applied
# together once the service is ready (see SyncServicer.Sync).
READ_AHEAD = 4


class SyncServicer(sync_pb2_grpc.SyncServiceServicer):
    def __init__(
        self,
        applier: Applier,
        storage: Storage,
        notifier: ChangeNotifier,
        *,
        pull_page_size: int = 500,
        subscribe_poll_seconds: float = 1.0,
        combine_writes: bool = True,
    ) -> None:
        self._applier = applier
        self._storage = storage
        self._notifier = notifier
        self._page = pull_page_size
        self._poll = subscribe_poll_seconds
        self._stopping = asyncio.Event()
        self._subscriptions: set[asyncio.Task[Any]] = set()
        self._waiting: deque[_Write[Any]] = deque()  # writes not started yet, in arrival order
        self._writing: set[asyncio.Task[None]] = set()  # their transactions' tasks
        # Write transactions in flight (batches' and conflict answers'), at most
        # MAX_WRITES_IN_FLIGHT; a conflict answer waiting for a slot gets the
        # next one before the waiting batches (it is one small transaction).
        self._in_flight = 0
        self._resolvers: deque[asyncio.Future[None]] = deque()
        # Several clients' writes in one transaction: where a write transaction
        # holds the whole database from its start anyway (SQLite). On
        # PostgreSQL a transaction takes the feed lock at its first write and
        # keeps it to the commit, so a combined one would hold it through
        # every later client's reads and decisions, and the other transaction
        # in flight, which could decide meanwhile, would wait instead
        # (concurrent_pg: 6,500-8,000/s combined against 8,600-9,500/s not).
        self._combine = combine_writes
        self.writes = 0  # ApplyBatch calls and Sync groups applied (or failed) so far
        self.write_transactions = 0  # the transactions they took

    async def subscriptions_ended(self, timeout: float) -> None:
        """Wait (at most `timeout`) until the Subscribe handlers have returned.

        The server can finish stopping while one still unwinds (its client
        already hung up); ending the event loop under it would cancel it with
        a traceback in the log.
        """
        if self._subscriptions:
            await asyncio.wait(set(self._subscriptions), timeout=timeout)

    def begin_shutdown(self) -> None:
        """End the open Subscribe streams: they never finish on their own."""
        self._stopping.set()

    async def ApplyBatch(
        self, request: sync_pb2.ApplyBatchRequest, context: Ctx
    ) -> sync_pb2.ApplyBatchResponse:
        principal = current_principal()
        batch = batch_from_proto(request.batch)
        self._applier.check_batch(batch)  # before it can share a transaction with others
        (answer,) = await self._apply(principal, [batch], sync_pb2.ApplyBatchResponse)
        return answer

    async def Sync(
        self,
        request_iterator: AsyncIterator[sync_pb2.SyncRequest],
        context: Ctx,
    ) -> AsyncIterator[sync_pb2.SyncResponse]:
        principal = current_principal()
        first = await anext(aiter(request_iterator), None)
        if first is None:
            return
        if first.WhichOneof("message") != "hello":
            raise InvalidArgument(
                Reason.HELLO_REQUIRED,
                "a Sync stream starts with a SyncHello",
                violations=[("hello", "required as the first message")],
            )
        client_id = first.hello.client_id
        compact = first.hello.compact_results
        last = await asyncio.to_thread(self._applier.last_applied_seq, principal, client_id)
        yield sync_pb2.SyncResponse(
            welcome=sync_pb2.SyncWelcome(
                last_applied_seq=last, server_schema_version=self._applier.schema.version
            )
        )
        # Batches are answered in order, each as soon as it is committed (a
        # client may wait for an answer before it sends more). A reader task
        # decodes up to READ_AHEAD batches ahead; those already waiting when
        # the service is ready for more are applied together, in one
        # transaction (group commit), and while a group applies in its worker
        # thread, the event loop reads ahead and answers the group before.
        # What is held is bounded, so gRPC flow control still holds a fast
        # sender back and memory stays flat.
        requests = aiter(request_iterator)
        inbox = _Inbox(
            lambda: self._next_batch(requests, client_id, first.hello.schema_version),
            READ_AHEAD,
            self._applier.max_batch,
        )
        running: asyncio.Future[list[sync_pb2.SyncResponse]] | None = None
        try:
            while True:
                if running is None:
                    group = await inbox.group()  # nothing is applying: wait for the client
                    if not group:
                        inbox.raise_error()
                        return
                    running = asyncio.ensure_future(
                        self._apply(principal, group, sync_pb2.SyncResponse, compact)
                    )
                answers = await running
                running = None
                group = inbox.group_waiting()
                if group:
                    running = asyncio.ensure_future(
                        self._apply(principal, group, sync_pb2.SyncResponse, compact)
                    )
                for answer in answers:
                    yield answer
                if running is None and inbox.ended:
                    inbox.raise_error()  # a bad message after these: they got their answers
                    return
        finally:
            inbox.close()
            if running is not None and not running.done():
                # The stream ended early: the batches apply anyway (they are
                # durable, and a resend is answered DUPLICATE); nobody waits.
                running.add_done_callback(_log_failure)

    async def _next_batch(
        self, requests: AsyncIterator[sync_pb2.SyncRequest], client_id: str, schema_version: int
    ) -> BatchIn | None:
        """The stream's next batch, decoded (None when the client is done sending)."""
        req = await anext(requests, None)
        if req is None:
            return None
        if req.WhichOneof("message") != "batch":
            raise InvalidArgument(
                Reason.INVALID_REQUEST,
                "after the hello, a Sync stream carries batches only",
                violations=[("batch", "expected")],
            )
        batch = batch_from_proto(req.batch)
        if batch.client_id and batch.client_id != client_id:
            raise InvalidArgument(
                Reason.CLIENT_ID_MISMATCH,
                f"batch client_id {batch.client_id!r} differs from the hello's",
                violations=[("batch.client_id", "must equal hello.client_id")],
            )
        batch = BatchIn(client_id, batch.schema_version or schema_version, batch.mutations)
        self._applier.check_batch(batch)  # a bad batch ends the stream after the ones before
        return batch

    async def _apply(
        self,
        principal: Principal,
        batches: list[BatchIn],
        answer: Callable[[], _Answer],
        compact: bool = False,
    ) -> list[_Answer]:
        """Apply one client's batches, in order; an answer message for each, once committed.

        Writes that arrive while MAX_WRITES_IN_FLIGHT transactions run wait
        here, on the event loop; when one ends, the next takes every write
        waiting (up to the applier's batch limit in mutations) and applies
        them in one transaction, each client's after the one before, with
        one commit (Applier.apply_many). Under load that turns a commit per
        call into a commit per round; a call alone starts at once, as before.
        A write whose caller went away before it started is dropped; one
        that started commits anyway (it is durable, and a resend is answered
        DUPLICATE). `compact`: the answers leave the fields out of an APPLIED
        result's record (SyncHello.compact_results).
        """
        size = sum(len(b.mutations) for b in batches)
        done: asyncio.Future[list[_Answer]] = asyncio.get_running_loop().create_future()
        self._waiting.append(_Write(principal, batches, size, answer, done, compact))
        self._start_writes()
        return await done

    def _start_writes(self) -> None:
        while self._in_flight < MAX_WRITES_IN_FLIGHT and self._waiting:
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
            self.writes += len(group)
            self.write_transactions += 1
            self._in_flight += 1
            task = asyncio.ensure_future(self._write(group, total))
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
        if self._in_flight < MAX_WRITES_IN_FLIGHT and not self._resolvers:
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

    async def _write(self, group: list[_Write[Any]], total: int) -> None:
        """One transaction for the writes of `group`; each caller gets its answers or error."""
        try:
            results = await self._apply_group(group, total)
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
            self._notifier.notify()
            self._release_slot()

    async def _apply_group(
        self, group: list[_Write[Any]], total: int
    ) -> list[list[Any] | Exception]:
        """The answers (or error) of each write of the group, applied in one transaction.

        The answers of a large transaction are built on the event loop while
        the worker thread commits (inside the database, without the GIL);
        they are used only if the attempt they were built from is the one
        that committed.
        """
        groups = [(w.principal, w.batches) for w in group]
        if total < OVERLAP_FROM:
            # Too little to gain from overlapping: no extra hand-offs.
            return _answers_each(await asyncio.to_thread(self._applier.apply_many, groups), group)
        loop = asyncio.get_running_loop()
        decided: asyncio.Future[list[list[BatchOutcome] | Exception]] = loop.create_future()

        def on_decided(results: list[list[BatchOutcome] | Exception]) -> None:
            loop.call_soon_threadsafe(_resolve, decided, results)

        work = asyncio.ensure_future(
            asyncio.to_thread(self._applier.apply_many, groups, on_decided)
        )
        await asyncio.wait((decided, work), return_when=asyncio.FIRST_COMPLETED)
        built = None
        if decided.done():
            seen = decided.result()
            built = seen, _answers_each(seen, group)
        results = await work
        if built is not None and built[0] is results:
            return built[1]
        return _answers_each(results, group)

    async def Pull(
        self, request: sync_pb2.PullRequest, context: Ctx
    ) -> AsyncIterator[sync_pb2.PullResponse]:
        tenant = current_principal().tenant_id
        position = decode_cursor(request.cursor)
        page = _page_size(request.page_size, self._page, MAX_PULL_PAGE)
        collections = list(request.collections)
        # Pages up to the head as it stood at the start: a busy tenant still ends.
        head = await asyncio.to_thread(self._storage.feed_head, tenant)

        def fetch(after: int) -> asyncio.Future[tuple[sync_pb2.PullResponse, int, int]]:
            return asyncio.ensure_future(
                asyncio.to_thread(self._pull_page, tenant, after, collections, page)
            )

        # Each page is read and encoded in a worker thread, the next one while
        # this one is sent.
        pending = fetch(position)
        try:
            while True:
                out, count, last = await pending
                position = last or position
                caught_up = count < page or position >= head
                if not caught_up:
                    pending = fetch(position)
                out.cursor = encode_cursor(position)
                out.caught_up = caught_up
                yield out
                if caught_up:
                    return
        finally:
            if not pending.done():
                pending.add_done_callback(_log_failure)

    def _pull_page(
        self, tenant: str, after: int, collections: list[str], limit: int
    ) -> tuple[sync_pb2.PullResponse, int, int]:
        """A page of the feed after `after`, as a response: (it, records, last position)."""
        rows = self._storage.pull(tenant, after, collections, limit)
        out = sync_pb2.PullResponse()
        add = out.changes.add
        for rec in rows:
            record_to_proto(rec, add())
        return out, len(rows), rows[-1].feed_seq if rows else 0

    async def Subscribe(
        self, request: sync_pb2.SubscribeRequest, context: Ctx
    ) -> AsyncIterator[sync_pb2.SubscribeResponse]:
        tenant = current_principal().tenant_id
        position = decode_cursor(request.cursor)
        collections = list(request.collections)
        task = asyncio.current_task()
        assert task is not None
        self._subscriptions.add(task)
        try:
            while True:
                woken = self._notifier.snapshot()  # before the read: no wake-up is lost
                rows = await asyncio.to_thread(
                    self._storage.pull, tenant, position, collections, self._page
                )
                if rows:
                    position = rows[-1].feed_seq
                    yield sync_pb2.SubscribeResponse(
                        changes=_records(rows), cursor=encode_cursor(position)
                    )
                    if len(rows) == self._page:
                        continue
                if self._stopping.is_set():
                    await context.abort(
                        grpc.StatusCode.UNAVAILABLE, "the server is shutting down; resubscribe"
                    )
                await self._notifier.wait(woken, self._poll)
        finally:
            self._subscriptions.discard(task)

    async def GetRecords(
        self, request: sync_pb2.GetRecordsRequest, context: Ctx
    ) -> sync_pb2.GetRecordsResponse:
        tenant = current_principal().tenant_id
        self._check_collection(request.collection, "collection")
        if len(request.record_ids) > MAX_GET_RECORDS:
            raise InvalidArgument(
                Reason.INVALID_REQUEST,
                f"at most {MAX_GET_RECORDS} record ids a call",
                violations=[("record_ids", f"at most {MAX_GET_RECORDS}")],
            )
        found = await asyncio.to_thread(
            self._storage.get_records, tenant, request.collection, list(request.record_ids)
        )
        return sync_pb2.GetRecordsResponse(records=_records(found))

    async def ListConflicts(
        self, request: sync_pb2.ListConflictsRequest, context: Ctx
    ) -> sync_pb2.ListConflictsResponse:
        tenant = current_principal().tenant_id
        if request.collection:
            self._check_collection(request.collection, "collection")
        after = _decode_page_token(request.page_token)
        page = await asyncio.to_thread(
            lambda: self._storage.list_conflicts(
                tenant,
                collection=request.collection or None,
                record_id=request.record_id or None,
                include_resolved=request.include_resolved,
                limit=_page_size(request.page_size, 100, MAX_CONFLICT_PAGE),
                after=after,
            )
        )
        out = sync_pb2.ListConflictsResponse()
        for c in page.conflicts:
            conflict_to_proto(c, out.conflicts.add())
        if page.next_after is not None:
            out.next_page_token = _encode_page_token(page.next_after)
        return out

    async def ResolveConflict(
        self, request: sync_pb2.ResolveConflictRequest, context: Ctx
    ) -> sync_pb2.ResolveConflictResponse:
        principal = current_principal()
        await self._take_slot()
        work = asyncio.ensure_future(
            asyncio.to_thread(
                self._applier.resolve_conflict,
                principal,
                request.conflict_id,
                int(request.resolution),
                fields_from_proto(request.fields),
            )
        )
        # The slot is the transaction's, not the call's: a caller that goes away
        # leaves the transaction running in its thread, and the slot held with it.
        work.add_done_callback(lambda _: self._release_slot())
        try:
            record = await asyncio.shield(work)
        except asyncio.CancelledError:
            work.add_done_callback(_log_failure)
            raise
        self._notifier.notify()
        out = sync_pb2.ResolveConflictResponse()
        if record.version:
            record_to_proto(record, out.record)
        return out

    async def GetSchema(
        self, request: sync_pb2.GetSchemaRequest, context: Ctx
    ) -> sync_pb2.GetSchemaResponse:
        current_principal()
        schema = self._applier.schema
        return sync_pb2.GetSchemaResponse(version=schema.version, schema_json=schema.source_json)

    def _check_collection(self, name: str, field: str) -> None:
        if name not in self._applier.schema.collections:
            raise InvalidArgument(
                Reason.UNKNOWN_COLLECTION,
                f"the schema has no collection {name!r}",
                violations=[(field, "not in the schema")],
            )


_Answer = TypeVar("_Answer", sync_pb2.ApplyBatchResponse, sync_pb2.SyncResponse)


class _Inbox:
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


@dataclass(eq=False)
class _Write(Generic[_Answer]):
    """One client's batches waiting for a write transaction, and who waits for them."""

    principal: Principal
    batches: list[BatchIn]
    size: int  # mutations
    answer: Callable[[], _Answer]
    done: asyncio.Future[list[_Answer]]
    compact: bool = False  # SyncHello.compact_results


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
            out.append(_answers(result, w.answer, w.compact))
        except Exception as err:
            log.exception("building the answers of a committed write failed")
            out.append(err)
    return out


def _answers(
    outcomes: list[BatchOutcome], answer: Callable[[], _Answer], compact: bool = False
) -> list[_Answer]:
    out = []
    for o in outcomes:
        msg = answer()
        batch_outcome_to_proto(o, msg.result, compact=compact)
        out.append(msg)
    return out


def _resolve(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _log_failure(task: asyncio.Future[Any]) -> None:
    """For work a closed stream left running: nobody waits for it, but a failure is said."""
    if not task.cancelled() and (err := task.exception()) is not None:
        log.warning("work left behind by a closed stream failed: %r", err)


def _records(records: Iterable[StoredRecord | FeedRecord]) -> list[common_pb2.Record]:
    out = []
    for rec in records:
        pr = common_pb2.Record()
        record_to_proto(rec, pr)
        out.append(pr)
    return out


def _page_size(asked: int, default: int, most: int) -> int:
    return min(asked or default, most)


def _encode_page_token(after: tuple[int, str]) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(after)).encode()).decode()


def _decode_page_token(token: str) -> tuple[int, str] | None:
    if not token:
        return None
    try:
        at, cid = json.loads(base64.urlsafe_b64decode(token.encode()))
        if not isinstance(at, int) or not isinstance(cid, str):
            raise ValueError(token)
        return at, cid
    except (ValueError, TypeError, binascii.Error):
        raise InvalidArgument(
            Reason.INVALID_PAGE_TOKEN,
            "the page token was not issued by this server; start the listing again",
            violations=[("page_token", "not issued by this server")],
        ) from None
