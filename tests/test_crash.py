"""Acknowledged means durable (SPEC §3), shown by killing the real process mid-sync.

A client streams an offline queue of 20,000 mutations over `Sync`; the
service is SIGKILLed while batches are in flight; it restarts on the same
SQLite file (default `synchronous=FULL`). The welcome must cover everything
the client saw acknowledged, the database must hold exactly a prefix of the
queue, and after the client resends the rest the state must be the one a
crash-free run of the same queue produces: nothing lost, nothing applied twice.
"""

from __future__ import annotations

import functools
import queue
import random
import signal
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc  # type: ignore[import-untyped, unused-ignore]  # stubs: types-grpcio
import pytest

from fieldsync.v1 import sync_pb2, sync_pb2_grpc
from fieldsync.values import FieldValue
from tests.proc import SyncProcess, fast_reconnect_channel, running_sync_service
from tests.support import DELETE, PATCH, PUT, S, md, mut, plain, token

RECORDS = 2_000
EDITS_PER_RECORD = 10  # a create, then edits; every tenth record ends deleted
TOTAL = RECORDS * EDITS_PER_RECORD
BATCH = 500
SCHEMA_VERSION = 3
CALL_TIMEOUT = 120.0  # a safety net for a wedged service, never reached when it works

Snapshot = dict[str, tuple[int, bool, dict[str, FieldValue]]]


@functools.cache
def _queue() -> tuple[sync_pb2.Mutation, ...]:
    """One device's offline queue: each record created, then edited on the client's own
    base (0: it never heard back while offline), round by round in a shuffled order.
    Every mutation sets `estimate` to its own seq, so each one changes its record."""
    rng = random.Random(20_000)
    ids = [f"task-{i:04d}" for i in range(RECORDS)]
    out: list[sync_pb2.Mutation] = []
    for rnd in range(EDITS_PER_RECORD):
        order = ids[:]
        rng.shuffle(order)
        for rid in order:
            seq = len(out) + 1
            if rnd == 0:
                fields: dict[str, FieldValue] = {"title": f"{rid} created", "estimate": seq}
                out.append(mut(seq, rid, fields, op=PUT))
            elif rnd == EDITS_PER_RECORD - 1 and rid.endswith("9"):
                out.append(mut(seq, rid, op=DELETE))
            else:
                fields = {
                    "estimate": seq,
                    "status": ("todo", "doing", "done")[rnd % 3],
                    "notes": f"visit {rnd} of {rid}",
                }
                if rnd % 4 == 0:
                    fields["title"] = f"{rid} renamed {rnd}"
                out.append(mut(seq, rid, fields, op=PATCH))
    assert len(out) == TOTAL
    return tuple(out)


def _batches(mutations: Sequence[sync_pb2.Mutation], client_id: str) -> list[sync_pb2.SyncRequest]:
    return [
        sync_pb2.SyncRequest(
            batch=sync_pb2.MutationBatch(
                client_id=client_id,
                schema_version=SCHEMA_VERSION,
                mutations=mutations[i : i + BATCH],
            )
        )
        for i in range(0, len(mutations), BATCH)
    ]


class SyncStream:
    """One Sync call fed from a queue, so the client can send after reading the welcome.

    `taken` counts the requests gRPC has pulled to send: batches in flight are
    those taken but not yet answered.
    """

    def __init__(self, proc: SyncProcess, client_id: str) -> None:
        self.client_id = client_id
        self.taken = 0
        self._outbox: queue.Queue[sync_pb2.SyncRequest | None] = queue.Queue()
        self._channel = fast_reconnect_channel(proc.address)
        stub = sync_pb2_grpc.SyncServiceStub(self._channel)
        self._call = stub.Sync(self._requests(), metadata=md(token()), timeout=CALL_TIMEOUT)

    def _requests(self) -> Iterator[sync_pb2.SyncRequest]:
        while (request := self._outbox.get()) is not None:
            self.taken += 1
            yield request

    def hello(self) -> int:
        """Send the hello; the welcome's last_applied_seq."""
        self.send(
            sync_pb2.SyncRequest(
                hello=sync_pb2.SyncHello(client_id=self.client_id, schema_version=SCHEMA_VERSION)
            )
        )
        first = next(self._call)
        assert first.WhichOneof("message") == "welcome"
        assert first.welcome.server_schema_version == SCHEMA_VERSION
        seq: int = first.welcome.last_applied_seq
        return seq

    def send(self, *requests: sync_pb2.SyncRequest) -> None:
        for r in requests:
            self._outbox.put(r)

    def results(self) -> Iterator[sync_pb2.BatchResult]:
        for response in self._call:
            assert response.WhichOneof("message") == "result"
            yield response.result

    def close(self) -> None:
        """End the call: half-close, cancel whatever is still open, release the channel."""
        self._outbox.put(None)
        self._call.cancel()
        self._channel.close()

    def __enter__(self) -> SyncStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _deliver(proc: SyncProcess, client_id: str, start_seq: int) -> list[sync_pb2.BatchResult]:
    """Reconnect: hello, then resend the queue from `start_seq`; every batch's result."""
    with SyncStream(proc, client_id) as stream:
        assert stream.hello() == start_seq - 1
        requests = _batches(_queue()[start_seq - 1 :], client_id)
        stream.send(*requests)
        results = [r for _, r in zip(requests, stream.results(), strict=False)]
    assert len(results) == len(requests)
    return results


def _snapshot(proc: SyncProcess) -> Snapshot:
    """Every task of the tenant, tombstones included, as Pull returns it."""
    with fast_reconnect_channel(proc.address) as channel:
        stub = sync_pb2_grpc.SyncServiceStub(channel)
        pages = list(
            stub.Pull(
                sync_pb2.PullRequest(collections=["tasks"], page_size=5_000),
                metadata=md(token()),
                timeout=CALL_TIMEOUT,
            )
        )
    assert pages and pages[-1].caught_up
    out: Snapshot = {}
    for page in pages:
        for rec in page.changes:
            out[rec.record_id] = (rec.version, rec.deleted, plain(rec))
    return out


def _prefix_model(applied: int) -> dict[str, tuple[int, bool, FieldValue]]:
    """What the first `applied` mutations make of each record: its version (one per
    mutation, as each changes something), whether it is deleted, and its estimate."""
    model: dict[str, tuple[int, bool, FieldValue]] = {}
    for m in _queue()[:applied]:
        version, _, estimate = model.get(m.record_id, (0, False, None))
        if m.op == DELETE:
            model[m.record_id] = (version + 1, True, estimate)
        else:
            model[m.record_id] = (version + 1, False, m.fields["estimate"].int_value)
    return model


def _as_model(snapshot: Snapshot) -> dict[str, tuple[int, bool, FieldValue]]:
    return {
        rid: (version, deleted, fields.get("estimate"))
        for rid, (version, deleted, fields) in snapshot.items()
    }


def _statuses(results: Sequence[sync_pb2.BatchResult]) -> set[int]:
    return {m.status for r in results for m in r.results}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Snapshot:
    """The same queue, delivered to a fresh database by a service that never crashes."""
    work = tmp_path_factory.mktemp("reference")
    with running_sync_service(f"sqlite:///{work / 'sync.db'}", work) as proc:
        results = _deliver(proc, str(uuid.uuid4()), 1)
        assert _statuses(results) == {S.MUTATION_STATUS_APPLIED}
        assert results[-1].last_applied_seq == TOTAL
        snapshot = _snapshot(proc)
    assert len(snapshot) == RECORDS
    assert {v for v, _, _ in snapshot.values()} == {EDITS_PER_RECORD}
    assert sum(deleted for _, deleted, _ in snapshot.values()) == RECORDS // 10
    return snapshot


@pytest.mark.timeout(150)
@pytest.mark.parametrize("kill_at_result", [1, 10, 30])
def test_a_crash_mid_sync_loses_nothing_acknowledged_and_applies_nothing_twice(
    tmp_path: Path, reference: Snapshot, kill_at_result: int
) -> None:
    db_url = f"sqlite:///{tmp_path / 'sync.db'}"
    client_id = str(uuid.uuid4())
    acknowledged = 0
    batches_answered = 0
    taken_at_kill = 0

    with running_sync_service(db_url, tmp_path) as proc:
        with SyncStream(proc, client_id) as stream:
            assert stream.hello() == 0
            stream.send(*_batches(_queue(), client_id))
            with pytest.raises(grpc.RpcError) as crashed:
                for result in stream.results():
                    # One result per batch, in order, for exactly that batch's mutations.
                    seqs = list(range(acknowledged + 1, acknowledged + BATCH + 1))
                    assert [m.client_seq for m in result.results] == seqs
                    assert _statuses([result]) == {S.MUTATION_STATUS_APPLIED}
                    assert result.last_applied_seq == seqs[-1]
                    acknowledged = result.last_applied_seq
                    batches_answered += 1
                    if batches_answered == kill_at_result:
                        taken_at_kill = stream.taken - 1  # less the hello
                        # From the test thread, while later batches are on their way.
                        assert proc.kill() == -signal.SIGKILL
            assert crashed.value.code() == grpc.StatusCode.UNAVAILABLE
        # Results read after the kill were sent before it: acknowledged all the same.
        assert kill_at_result <= batches_answered < TOTAL // BATCH
        assert taken_at_kill > batches_answered, "no batch was in flight at the kill"

    with running_sync_service(db_url, tmp_path) as proc:
        with SyncStream(proc, client_id) as stream:
            last_applied = stream.hello()
        print(
            f"kill after result {kill_at_result}: {acknowledged} mutations acknowledged, "
            f"{taken_at_kill} batches handed to gRPC; after restart last_applied_seq="
            f"{last_applied}"
        )
        assert acknowledged <= last_applied <= taken_at_kill * BATCH
        # Exactly a prefix of the queue is there: nothing half-applied, nothing beyond.
        assert _as_model(_snapshot(proc)) == _prefix_model(last_applied)

        results = _deliver(proc, client_id, last_applied + 1)
        assert _statuses(results) == {S.MUTATION_STATUS_APPLIED}
        assert results[-1].last_applied_seq == TOTAL
        # Versions included: what was applied before the crash was not applied again.
        assert _snapshot(proc) == reference

        # The whole queue once more, as a client that lost track would send it.
        with SyncStream(proc, client_id) as stream:
            assert stream.hello() == TOTAL
            requests = _batches(_queue(), client_id)
            stream.send(*requests)
            again = [r for _, r in zip(requests, stream.results(), strict=False)]
        assert len(again) == len(requests)
        assert _statuses(again) == {S.MUTATION_STATUS_DUPLICATE}
        assert {m.original_status for r in again for m in r.results} == {S.MUTATION_STATUS_APPLIED}
        assert [r.last_applied_seq for r in again] == [TOTAL] * len(requests)
        assert _snapshot(proc) == reference
