"""The gRPC SyncService: each RPC converts the request, calls the use case, converts back.

Writes go to the WriteScheduler (writes/scheduler.py: slots, queue,
combining), reads to the storage, in worker threads so the event loop keeps
serving other calls. Sync's read-ahead is api/inbox.py; the wire mapping is
api/convert.py. No scheduling, SQL or merge logic here; errors raised as
FieldSyncError are mapped to statuses by the interceptor (fieldsync.interceptors).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import grpc

from fieldsync.auth import Principal
from fieldsync.errors import InvalidArgument, Reason, clip
from fieldsync.interceptors import current_principal
from fieldsync.v1 import sync_pb2, sync_pb2_grpc
from fieldsync.values import fields_from_proto
from sync_service.api.convert import (
    Answer,
    batch_answers,
    batch_from_proto,
    conflict_to_proto,
    decode_page_token,
    encode_page_token,
    record_to_proto,
    records_to_proto,
)
from sync_service.api.inbox import READ_AHEAD, Inbox
from sync_service.feed import ChangeNotifier, decode_cursor, encode_cursor
from sync_service.rules.limits import MAX_RECORD_ID_LENGTH, problem
from sync_service.storage.base import Storage
from sync_service.writes.applier import Applier
from sync_service.writes.model import BatchIn
from sync_service.writes.scheduler import WriteScheduler, log_left_behind

log = logging.getLogger("fieldsync.sync")

Ctx = grpc.aio.ServicerContext[Any, Any]

MAX_PULL_PAGE = 5000
MAX_CONFLICT_PAGE = 1000
MAX_GET_RECORDS = 1000


class SyncServicer(sync_pb2_grpc.SyncServiceServicer):
    def __init__(
        self,
        applier: Applier,
        storage: Storage,
        notifier: ChangeNotifier,
        *,
        pull_page_size: int = 500,
        subscribe_poll_seconds: float = 1.0,
        pipeline: bool = False,
        trace_source: Callable[[], str | None] | None = None,
    ) -> None:
        self._applier = applier
        # With tracing on: the current call's traceparent, stamped on its batches.
        self._trace_source = trace_source
        self._storage = storage
        self._notifier = notifier
        self._writes = WriteScheduler(
            applier,
            combine=storage.combine_writes,
            on_written=notifier.notify,
            pipeline=pipeline and storage.pipeline_writes,  # FIELDSYNC_PG_PIPELINE
        )
        self._page = pull_page_size
        self._poll = subscribe_poll_seconds
        self._stopping = asyncio.Event()
        self._subscriptions: set[asyncio.Task[Any]] = set()

    @property
    def writes(self) -> int:
        """ApplyBatch calls and Sync groups applied (or failed) so far."""
        return self._writes.writes

    @property
    def write_transactions(self) -> int:
        """The write transactions they took."""
        return self._writes.write_transactions

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
        inbox = Inbox(
            lambda: self._next_batch(requests, client_id, first.hello.schema_version),
            READ_AHEAD,
            self._applier.max_batch,
        )
        # Where writes pipeline (PostgreSQL), the next group starts once the one
        # before has decided and goes on to write, with the batches waiting by
        # then, and decides while that one commits (writes/pipeline.py): two
        # groups in flight, answered in order.
        depth = 2 if self._writes.pipelines else 1
        running: deque[tuple[asyncio.Future[list[sync_pb2.SyncResponse]], asyncio.Event]] = deque()

        def start(group: list[BatchIn]) -> None:
            decided = asyncio.Event()
            work = self._apply(principal, group, sync_pb2.SyncResponse, compact, decided)
            running.append((asyncio.ensure_future(work), decided))

        try:
            while True:
                if not running:
                    group = await inbox.group()  # nothing is applying: wait for the client
                    if not group:
                        inbox.raise_error()
                        return
                    start(group)
                while len(running) < depth and not running[0][0].done():
                    current, decided = running[0]
                    if decided.is_set():
                        group = inbox.group_waiting()
                        if group:
                            start(group)
                            continue
                        if inbox.ended:
                            break
                    wake = asyncio.ensure_future(
                        inbox.wait() if decided.is_set() else decided.wait()
                    )
                    try:
                        await asyncio.wait((current, wake), return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        wake.cancel()  # (done: no-op)
                answers = await running.popleft()[0]
                if len(running) < depth:
                    group = inbox.group_waiting()
                    if group:
                        start(group)
                for answer in answers:
                    yield answer
                if not running and inbox.ended:
                    inbox.raise_error()  # a bad message after these: they got their answers
                    return
        finally:
            inbox.close()
            for left, _ in running:
                if not left.done():
                    # The stream ended early: the batches apply anyway (they are
                    # durable, and a resend is answered DUPLICATE); nobody waits.
                    left.add_done_callback(log_left_behind)

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
                f"batch client_id {clip(batch.client_id)!r} differs from the hello's",
                violations=[("batch.client_id", "must equal hello.client_id")],
            )
        batch = BatchIn(client_id, batch.schema_version or schema_version, batch.mutations)
        self._applier.check_batch(batch)  # a bad batch ends the stream after the ones before
        return batch

    async def _apply(
        self,
        principal: Principal,
        batches: list[BatchIn],
        answer: type[Answer],
        compact: bool = False,
        decided: asyncio.Event | None = None,
    ) -> list[Answer]:
        """One client's batches through the scheduler; an `answer` message for each
        (`compact`: SyncHello.compact_results, see api/convert.outcome_to_proto)."""
        if self._trace_source is not None and (traceparent := self._trace_source()):
            batches = [replace(b, traceparent=traceparent) for b in batches]
        return await self._writes.apply(
            principal, batches, lambda outcomes: batch_answers(outcomes, answer, compact), decided
        )

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
                pending.add_done_callback(log_left_behind)

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
                woken = self._notifier.snapshot(tenant)  # before the read: none is lost
                rows = await asyncio.to_thread(
                    self._storage.pull, tenant, position, collections, self._page
                )
                if rows:
                    position = rows[-1].feed_seq
                    yield sync_pb2.SubscribeResponse(
                        changes=records_to_proto(rows), cursor=encode_cursor(position)
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
        # An id no engine can hold names no record: absent, as unknown ids are.
        ids = [r for r in request.record_ids if problem(r, MAX_RECORD_ID_LENGTH) is None]
        found = await asyncio.to_thread(self._storage.get_records, tenant, request.collection, ids)
        return sync_pb2.GetRecordsResponse(records=records_to_proto(found))

    async def ListConflicts(
        self, request: sync_pb2.ListConflictsRequest, context: Ctx
    ) -> sync_pb2.ListConflictsResponse:
        tenant = current_principal().tenant_id
        if request.collection:
            self._check_collection(request.collection, "collection")
        after = decode_page_token(request.page_token)
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
            out.next_page_token = encode_page_token(page.next_after)
        return out

    async def ResolveConflict(
        self, request: sync_pb2.ResolveConflictRequest, context: Ctx
    ) -> sync_pb2.ResolveConflictResponse:
        principal = current_principal()
        record = await self._writes.resolve_conflict(
            principal,
            request.conflict_id,
            int(request.resolution),
            fields_from_proto(request.fields),
            # With tracing on, the answer's audit events carry this call's trace.
            traceparent=self._trace_source() if self._trace_source is not None else None,
        )
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
                f"the schema has no collection {clip(name)!r}",
                violations=[(field, "not in the schema")],
            )


def _page_size(asked: int, default: int, most: int) -> int:
    return min(asked or default, most)
