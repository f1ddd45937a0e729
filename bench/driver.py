"""Driving a running service: a Sync stream of pre-serialized batches, timed ApplyBatch calls,
a timed Pull, and many clients at once.

Requests go out as bytes serialized before the clock starts (a generic gRPC
method with no request serializer); responses are parsed, because a real
client must read its results. Every loop is bounded by the number of batches
and by a deadline: a run that hits its deadline stops sending, collects the
answers to what it sent, and says so (`Tally.truncated`).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import grpc

from bench.workload import Metadata, hello_bytes
from fieldsync.v1 import sync_pb2

SYNC = "/fieldsync.v1.SyncService/Sync"
APPLY = "/fieldsync.v1.SyncService/ApplyBatch"
PULL = "/fieldsync.v1.SyncService/Pull"
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]
WINDOW = 4  # Sync batches in flight: sent, not yet answered
ANSWER_GRACE = 120.0  # seconds past a run's deadline for the answers to what it sent
STATUS_NAMES = {
    v: k.removeprefix("MUTATION_STATUS_").lower() for k, v in sync_pb2.MutationStatus.items()
}


@dataclass
class Tally:
    """What a client got back."""

    mutations: int = 0
    batches: int = 0
    seconds: float = 0.0
    statuses: Counter[str] = field(default_factory=Counter)
    warnings: int = 0
    errors: list[str] = field(default_factory=list)
    truncated: bool = False
    latencies_ms: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.mutations / self.seconds if self.seconds > 0 else 0.0

    def count(self, result: sync_pb2.BatchResult) -> None:
        self.batches += 1
        self.mutations += len(result.results)
        for r in result.results:
            self.statuses[STATUS_NAMES.get(r.status, str(r.status))] += 1
            self.warnings += len(r.warnings)

    def merge(self, other: Tally) -> None:
        self.mutations += other.mutations
        self.batches += other.batches
        self.statuses.update(other.statuses)
        self.warnings += other.warnings
        self.errors.extend(other.errors)
        self.truncated = self.truncated or other.truncated
        self.latencies_ms.extend(other.latencies_ms)


def channel(address: str) -> grpc.Channel:
    return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)


def stream_sync(
    address: str,
    md: Metadata,
    client_id: str,
    batches: Iterable[bytes],
    *,
    deadline: float,
    window: int = WINDOW,
) -> Tally:
    """Open Sync, send the hello and the batches, and read every answer.

    At most `window` batches are sent and not yet answered (so the server
    always has the next batch at hand, and the deadline really bounds the
    run: gRPC's own flow control would let megabytes through). Time runs from
    the hello to the last answer.
    """
    tally = Tally()
    stop_at = time.monotonic() + deadline
    room = threading.Semaphore(window)
    finished = threading.Event()

    def requests() -> Iterator[bytes]:
        yield hello_bytes(client_id)
        for b in batches:
            while not room.acquire(timeout=0.2):
                if finished.is_set() or time.monotonic() >= stop_at + ANSWER_GRACE:
                    return
            if time.monotonic() >= stop_at:
                tally.truncated = True
                return
            yield b

    with channel(address) as ch:
        call: grpc.StreamStreamMultiCallable[bytes, sync_pb2.SyncResponse] = ch.stream_stream(
            SYNC, request_serializer=None, response_deserializer=sync_pb2.SyncResponse.FromString
        )
        start = time.perf_counter()
        # The rpc's own timeout is a safety net past the sending deadline.
        responses = call(requests(), metadata=md, timeout=deadline + ANSWER_GRACE)
        try:
            for resp in responses:
                if resp.WhichOneof("message") == "result":
                    tally.count(resp.result)
                    room.release()
        except grpc.RpcError as err:
            tally.errors.append(f"Sync: {err.code()}: {err.details()}")
        finally:
            finished.set()
        tally.seconds = time.perf_counter() - start
    return tally


def apply_sequential(
    address: str, md: Metadata, requests: Sequence[bytes], *, deadline: float
) -> Tally:
    """One ApplyBatch call after another, each timed on its own."""
    tally = Tally()
    stop_at = time.monotonic() + deadline
    with channel(address) as ch:
        call: grpc.UnaryUnaryMultiCallable[bytes, sync_pb2.ApplyBatchResponse] = ch.unary_unary(
            APPLY,
            request_serializer=None,
            response_deserializer=sync_pb2.ApplyBatchResponse.FromString,
        )
        start = time.perf_counter()
        for req in requests:
            if time.monotonic() >= stop_at:
                tally.truncated = True
                break
            t0 = time.perf_counter()
            try:
                resp = call(req, metadata=md, timeout=60)
            except grpc.RpcError as err:
                tally.errors.append(f"ApplyBatch: {err.code()}: {err.details()}")
                continue
            tally.latencies_ms.append((time.perf_counter() - t0) * 1000)
            tally.count(resp.result)
        tally.seconds = time.perf_counter() - start
    return tally


@dataclass(frozen=True)
class ConcurrentClient:
    md: Metadata
    requests: Sequence[bytes]  # ApplyBatchRequest bytes, in order


def apply_concurrently(
    addresses: Sequence[str], clients: Sequence[ConcurrentClient], *, deadline: float
) -> Tally:
    """Every client at once (asyncio, a channel each, round-robin over the addresses),
    each sending its batches one after another. Time runs from the start of the first
    to the end of the last."""
    return asyncio.run(_apply_concurrently(addresses, clients, deadline))


async def _apply_concurrently(
    addresses: Sequence[str], clients: Sequence[ConcurrentClient], deadline: float
) -> Tally:
    stop_at = time.monotonic() + deadline
    channels = [
        grpc.aio.insecure_channel(addresses[i % len(addresses)], options=CHANNEL_OPTIONS)
        for i in range(len(clients))
    ]
    try:
        for ch in channels:  # connected before the clock starts
            await asyncio.wait_for(ch.channel_ready(), timeout=30)
        start = time.perf_counter()
        tallies = await asyncio.gather(
            *(_one_client(ch, c, stop_at) for ch, c in zip(channels, clients, strict=True))
        )
        total = Tally(seconds=time.perf_counter() - start)
    finally:
        for ch in channels:
            await ch.close()
    for t in tallies:
        total.merge(t)
    return total


async def _one_client(ch: grpc.aio.Channel, client: ConcurrentClient, stop_at: float) -> Tally:
    tally = Tally()
    call: grpc.aio.UnaryUnaryMultiCallable[bytes, sync_pb2.ApplyBatchResponse] = ch.unary_unary(
        APPLY, request_serializer=None, response_deserializer=sync_pb2.ApplyBatchResponse.FromString
    )
    for req in client.requests:
        if time.monotonic() >= stop_at:
            tally.truncated = True
            break
        t0 = time.perf_counter()
        try:
            resp = await call(req, metadata=client.md, timeout=120)
        except grpc.aio.AioRpcError as err:
            tally.errors.append(f"ApplyBatch: {err.code()}: {err.details()}")
            continue
        tally.latencies_ms.append((time.perf_counter() - t0) * 1000)
        tally.count(resp.result)
    return tally


def pull_all(
    address: str, md: Metadata, *, page_size: int = 0, deadline: float
) -> tuple[int, float, int]:
    """An initial Pull (empty cursor) to the end: (records, seconds, pages)."""
    req = sync_pb2.PullRequest(page_size=page_size).SerializeToString()
    records = pages = 0
    with channel(address) as ch:
        call: grpc.UnaryStreamMultiCallable[bytes, sync_pb2.PullResponse] = ch.unary_stream(
            PULL, request_serializer=None, response_deserializer=sync_pb2.PullResponse.FromString
        )
        start = time.perf_counter()
        for page in call(req, metadata=md, timeout=deadline):
            records += len(page.changes)
            pages += 1
            if page.caught_up:
                break
        seconds = time.perf_counter() - start
    return records, seconds, pages
