"""One sync, on the wire: stream the queue over `Sync`, store each answer as it comes, then pull.

Push (SPEC §3): hello, then the pending queue in batches of `batch_size`,
pipelined with up to two batches in flight, so the server is never idle
waiting for the client to send the next one and never holds more than two.
Each batch's answers are stored in one local transaction the moment they
arrive (_store.LocalStore.apply_results): a failure at any point loses
nothing and the next attempt resumes from what is still queued. Mutations the
server already applied are sent again when their answers were lost (a crash,
a dropped stream): it answers them DUPLICATE with their original outcome, which
is how a rejection or a conflict whose answer never arrived is still learned.
A gap (results stopping before the end of a batch) resends from the server's
last applied sequence + 1.

Pull (SPEC §6): `Pull` from the saved cursor, each page stored with the
cursor after it in one transaction.
"""

from __future__ import annotations

import math
import queue
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from fieldsync.v1 import sync_pb2

from ._convert import conflict_from_proto, mutation_to_proto, outcome_from_proto, record_from_proto
from ._errors import SyncError
from ._store import LocalStore, ResultSummary
from ._transport import Transport
from ._types import Conflict, SyncReport

__all__ = ["Counters", "list_conflicts", "pull", "push"]

IN_FLIGHT = 2
"""Batches sent and not yet answered: enough to keep both sides busy, and bounded."""

_CONFLICT_PAGE = 1000

ProgressCallback = Callable[[int, int], None]
ConflictCallback = Callable[[Conflict], None]


@dataclass
class Counters:
    """What a sync has done so far; every attempt of it adds to the same counters."""

    applied: int = 0
    merged: int = 0
    conflicts: int = 0
    rejected: int = 0
    duplicates: int = 0
    warnings: int = 0
    pulled: int = 0
    answered: int = 0
    pages: int = 0
    rebuilt: int = 0  # compact results whose record was rebuilt from the queue
    fetched: int = 0  # compact results whose record was read back with GetRecords

    def add(self, summary: ResultSummary) -> None:
        s = summary.statuses
        self.applied += s["APPLIED"]
        self.merged += s["MERGED"]
        self.conflicts += s["CONFLICT"]
        self.rejected += s["REJECTED"]
        self.duplicates += s["DUPLICATE"]
        self.warnings += summary.warnings
        self.answered += s.total()
        self.rebuilt += summary.rebuilt
        self.fetched += len(summary.unknown_records)

    def report(self, pending: int) -> SyncReport:
        return SyncReport(
            applied=self.applied,
            merged=self.merged,
            conflicts=self.conflicts,
            rejected=self.rejected,
            duplicates=self.duplicates,
            warnings=self.warnings,
            pulled=self.pulled,
            pending=pending,
        )


@dataclass(frozen=True)
class PushSettings:
    client_id: str
    schema_version: int
    batch_size: int


def push(
    store: LocalStore,
    transport: Transport,
    settings: PushSettings,
    counters: Counters,
    *,
    on_conflict: ConflictCallback | None = None,
    progress: ProgressCallback | None = None,
) -> None:
    """Deliver the pending queue; retried as a whole, resuming from what is still queued."""
    total = store.pending_count()

    def attempt() -> None:
        _push_once(store, transport, settings, counters, on_conflict, progress, total)

    transport.call("sync", attempt, progress=lambda: counters.answered)


class _Stream:
    """One `Sync` call: requests go through a queue that gRPC's sending thread drains."""

    def __init__(self, transport: Transport, deadline: float) -> None:
        self._requests: queue.Queue[sync_pb2.SyncRequest | None] = queue.Queue()
        self.transport = transport
        self._call = transport.stub.Sync(
            self._request_iterator(), metadata=transport.metadata(), timeout=deadline
        )

    def _request_iterator(self) -> Iterator[sync_pb2.SyncRequest]:
        while (request := self._requests.get()) is not None:
            yield request

    def send(self, request: sync_pb2.SyncRequest) -> None:
        self._requests.put(request)

    def receive(self) -> sync_pb2.SyncResponse:
        response: sync_pb2.SyncResponse | None = next(self._call, None)
        if response is None:
            raise SyncError("sync: the server ended the stream before answering every batch")
        return response

    def finish(self) -> None:
        """End the requests and read the stream to its end (the server then closes it)."""
        self._requests.put(None)
        for response in self._call:
            if response.WhichOneof("message") == "result" and response.result.results:
                raise SyncError("sync: the server answered a batch that was not sent")

    def abandon(self) -> None:
        # Always unblock the sending thread, which waits on the queue otherwise.
        self._requests.put(None)
        self._call.cancel()


def _push_once(
    store: LocalStore,
    transport: Transport,
    settings: PushSettings,
    counters: Counters,
    on_conflict: ConflictCallback | None,
    progress: ProgressCallback | None,
    total: int,
) -> None:
    batches = math.ceil(store.pending_count() / settings.batch_size)
    # Every batch gets the full timeout: the stream's deadline grows with the
    # queue, so a long offline queue is not cut off for being long.
    stream = _Stream(transport, transport.timeout * (1 + batches))
    try:
        # The queue's health, for the server's reconnect metrics.
        pending, oldest = store.pending_health()
        hello = sync_pb2.SyncHello(
            client_id=settings.client_id,
            schema_version=settings.schema_version,
            pending_mutations=pending,
            # APPLIED answers without the fields this client holds (_compact.py).
            compact_results=True,
        )
        if oldest is not None:
            hello.oldest_pending_time.FromNanoseconds(oldest)
        stream.send(sync_pb2.SyncRequest(hello=hello))
        welcome = stream.receive()
        if welcome.WhichOneof("message") != "welcome":
            raise SyncError("sync: the server did not start the stream with a welcome")
        store.note_last_applied(welcome.welcome.last_applied_seq)
        # From the start of the queue, not from last_applied_seq + 1: what is
        # still queued at or below it was applied but its answer was lost.
        cursor = 0
        stalled_at: int | None = None
        while True:
            gap_at = _deliver_from(
                cursor, store, stream, settings, counters, on_conflict, progress, total
            )
            if gap_at is None:
                break
            nxt = store.pending_after(gap_at, 1)
            if stalled_at == gap_at or (nxt and nxt[0].client_seq != gap_at + 1):
                raise SyncError(
                    f"sync: the server has this client's mutations up to {gap_at}, but the next "
                    f"one queued here is {nxt[0].client_seq if nxt else 'none'}: the server lost "
                    "mutations it had acknowledged (restored from a backup?); the queue is kept"
                )
            stalled_at, cursor = gap_at, gap_at
        stream.finish()
    except BaseException:
        stream.abandon()
        raise


def _deliver_from(
    cursor: int,
    store: LocalStore,
    stream: _Stream,
    settings: PushSettings,
    counters: Counters,
    on_conflict: ConflictCallback | None,
    progress: ProgressCallback | None,
    total: int,
) -> int | None:
    """Send what is pending above `cursor` until answered; the server's seq at a gap, if any."""
    in_flight: deque[int] = deque()  # the size of each batch sent, oldest first

    def send_next() -> bool:
        nonlocal cursor
        batch = store.pending_after(cursor, settings.batch_size)
        if not batch:
            return False
        stream.send(
            sync_pb2.SyncRequest(
                batch=sync_pb2.MutationBatch(
                    client_id=settings.client_id,
                    schema_version=settings.schema_version,
                    mutations=[mutation_to_proto(m) for m in batch],
                )
            )
        )
        in_flight.append(len(batch))
        cursor = batch[-1].client_seq
        return True

    gap_at: int | None = None
    while len(in_flight) < IN_FLIGHT and send_next():
        pass
    while in_flight:
        response = stream.receive()
        if response.WhichOneof("message") != "result":
            raise SyncError("sync: the server sent something other than a batch result")
        result = response.result
        sent = in_flight.popleft()
        summary = store.apply_results([outcome_from_proto(r, compact=True) for r in result.results])
        if summary.unknown_records:
            _fetch_records(store, stream.transport, summary.unknown_records)
        counters.add(summary)
        if len(result.results) < sent:
            # A gap: the batches still in flight are answered short too; once
            # they are in, resend from the server's position.
            gap_at = result.last_applied_seq
        if on_conflict is not None:
            for conflict in summary.new_conflicts:
                on_conflict(conflict)
        if progress is not None:
            progress(counters.answered, max(total, counters.answered))
        if gap_at is None:
            while len(in_flight) < IN_FLIGHT and send_next():
                pass
    return gap_at


def _fetch_records(store: LocalStore, transport: Transport, keys: list[tuple[str, str]]) -> None:
    """The records of compact results this client could not rebuild, from the server."""
    by_collection: dict[str, list[str]] = {}
    for collection, record_id in keys:
        by_collection.setdefault(collection, []).append(record_id)
    for collection, record_ids in by_collection.items():
        response = transport.stub.GetRecords(
            sync_pb2.GetRecordsRequest(collection=collection, record_ids=record_ids),
            metadata=transport.metadata(),
            timeout=transport.timeout,
        )
        store.save_fetched([record_from_proto(r) for r in response.records])


def pull(store: LocalStore, transport: Transport, counters: Counters) -> None:
    """Bring the local server state up to date from the saved cursor."""

    def attempt() -> None:
        request = sync_pb2.PullRequest(cursor=store.cursor())
        metadata = transport.metadata()
        pages = transport.stub.Pull(request, metadata=metadata, timeout=transport.timeout)
        for page in pages:
            store.save_pulled([record_from_proto(r) for r in page.changes], page.cursor)
            counters.pulled += len(page.changes)
            counters.pages += 1
            if page.caught_up:
                return

    try:
        transport.call("pull", attempt, progress=lambda: counters.pages)
    except SyncError as err:
        if err.reason != "INVALID_CURSOR":
            raise
        # A cursor from another server (or a reset one): the feed says to start
        # over; the pulled states only ever move records forward, so it is safe.
        store.save_pulled([], "")
        transport.call("pull", attempt, progress=lambda: counters.pages)


def list_conflicts(transport: Transport) -> list[Conflict]:
    """Every open conflict of the tenant, page by page."""

    def attempt() -> list[Conflict]:
        metadata = transport.metadata()
        found: list[Conflict] = []
        token = ""
        while True:
            response = transport.stub.ListConflicts(
                sync_pb2.ListConflictsRequest(page_size=_CONFLICT_PAGE, page_token=token),
                metadata=metadata,
                timeout=transport.timeout,
            )
            found.extend(conflict_from_proto(c) for c in response.conflicts)
            if not response.next_page_token:
                return found
            token = response.next_page_token

    return transport.call("list conflicts", attempt)
