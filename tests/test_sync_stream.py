"""The Sync stream (bulk reconnect), message limits and tokens through the real sync service."""

from __future__ import annotations

import queue
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import jwt
import pytest

from fieldsync.auth import Principal
from fieldsync.v1 import sync_pb2
from fieldsync.values import FieldValue
from sync_service.api.convert import batch_from_proto, batch_outcome_to_proto
from sync_service.config import SyncConfig
from sync_service.server import SyncApp
from tests.conftest import make_config, running_sync
from tests.support import DELETE, PUT, SECRET, S, SyncEnv, md, mut, plain, rpc_reason, token


def _stream(
    client_id: str, batches: list[list[sync_pb2.Mutation]]
) -> Iterator[sync_pb2.SyncRequest]:
    yield sync_pb2.SyncRequest(hello=sync_pb2.SyncHello(client_id=client_id, schema_version=3))
    for b in batches:
        yield sync_pb2.SyncRequest(
            batch=sync_pb2.MutationBatch(client_id=client_id, schema_version=3, mutations=b)
        )


def test_hello_welcome_then_one_result_per_batch_in_order(sync_env: SyncEnv) -> None:
    c = sync_env.client()
    batches = [
        [mut(s, f"r{s}", {"title": str(s)}, op=PUT) for s in range(i, i + 10)]
        for i in range(1, 51, 10)
    ]
    responses = list(sync_env.stub.Sync(_stream(c.client_id, batches), metadata=c.metadata))
    assert responses[0].WhichOneof("message") == "welcome"
    assert responses[0].welcome.last_applied_seq == 0
    assert responses[0].welcome.server_schema_version == 3
    results = [r.result for r in responses[1:]]
    assert [r.last_applied_seq for r in results] == [10, 20, 30, 40, 50]
    assert [m.client_seq for r in results for m in r.results] == list(range(1, 51))

    # Reconnect: the welcome says what the server already has.
    again = list(sync_env.stub.Sync(_stream(c.client_id, []), metadata=c.metadata))
    assert again[0].welcome.last_applied_seq == 50


def test_a_stream_must_start_with_a_hello(sync_env: SyncEnv) -> None:
    c = sync_env.client()

    def no_hello() -> Iterator[sync_pb2.SyncRequest]:
        yield sync_pb2.SyncRequest(batch=sync_pb2.MutationBatch(client_id=c.client_id))

    with pytest.raises(grpc.RpcError) as info:
        list(sync_env.stub.Sync(no_hello(), metadata=c.metadata))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_reason(info.value) == "HELLO_REQUIRED"


def test_a_batch_under_another_client_id_ends_the_stream_and_applies_nothing(
    sync_env: SyncEnv,
) -> None:
    c = sync_env.client()

    def mixed() -> Iterator[sync_pb2.SyncRequest]:
        yield sync_pb2.SyncRequest(hello=sync_pb2.SyncHello(client_id=c.client_id))
        yield sync_pb2.SyncRequest(
            batch=sync_pb2.MutationBatch(
                client_id="someone-else", mutations=[mut(1, "x", {"title": "x"}, op=PUT)]
            )
        )

    with pytest.raises(grpc.RpcError) as info:
        list(sync_env.stub.Sync(mixed(), metadata=c.metadata))
    assert rpc_reason(info.value) == "CLIENT_ID_MISMATCH"
    assert c.get("x") is None


def test_a_client_that_waits_for_each_answer_before_sending_more_is_answered(
    sync_env: SyncEnv,
) -> None:
    """Lock-step: the service must answer a batch without waiting for the next."""
    c = sync_env.client()
    answered: queue.Queue[int] = queue.Queue()

    def lock_step() -> Iterator[sync_pb2.SyncRequest]:
        yield sync_pb2.SyncRequest(hello=sync_pb2.SyncHello(client_id=c.client_id))
        answered.get(timeout=10)  # the welcome
        for seq in range(1, 4):
            yield sync_pb2.SyncRequest(
                batch=sync_pb2.MutationBatch(
                    client_id=c.client_id, mutations=[mut(seq, f"r{seq}", {"title": "t"}, op=PUT)]
                )
            )
            assert answered.get(timeout=10) == seq

    seen = []
    for r in sync_env.stub.Sync(lock_step(), metadata=c.metadata, timeout=30):
        seq = r.result.last_applied_seq if r.WhichOneof("message") == "result" else 0
        seen.append(seq)
        answered.put(seq)
    assert seen == [0, 1, 2, 3]


def test_a_bad_message_after_good_batches_ends_the_stream_after_their_answers(
    sync_env: SyncEnv,
) -> None:
    """The service reads ahead while a batch applies: a bad message behind good
    batches must not cost them their answers, nor apply anything of its own."""
    c = sync_env.client()

    def then_bad() -> Iterator[sync_pb2.SyncRequest]:
        yield from _stream(c.client_id, [[mut(1, "a", {"title": "a"}, op=PUT)]])
        yield sync_pb2.SyncRequest(
            batch=sync_pb2.MutationBatch(client_id=c.client_id, mutations=[mut(2, "b", {})])
        )
        yield sync_pb2.SyncRequest(hello=sync_pb2.SyncHello(client_id=c.client_id))
        yield from _stream(c.client_id, [[mut(3, "c", {"title": "c"}, op=PUT)]])

    responses = []
    with pytest.raises(grpc.RpcError) as info:
        for r in sync_env.stub.Sync(then_bad(), metadata=c.metadata):
            responses.append(r)
    assert rpc_reason(info.value) == "INVALID_REQUEST"
    assert [r.WhichOneof("message") for r in responses] == ["welcome", "result", "result"]
    assert [r.result.last_applied_seq for r in responses[1:]] == [1, 2]
    assert c.get("a") is not None and c.get("c") is None


def test_a_hello_under_another_users_client_id_is_refused(sync_env: SyncEnv) -> None:
    alice = sync_env.client(sub="alice")
    alice.one("r", {"title": "x"}, op=PUT)
    bob = sync_env.client(sub="bob")
    with pytest.raises(grpc.RpcError) as info:
        list(sync_env.stub.Sync(_stream(alice.client_id, []), metadata=bob.metadata))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_a_message_over_the_size_limit_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    config = make_config(f"sqlite:///{tmp_path / 'sync.db'}", max_message_bytes=64 * 1024)
    with running_sync(config) as env:
        c = env.client()
        big = c.mut("big", {"title": "x" * 100_000}, op=PUT)
        with pytest.raises(grpc.RpcError) as info:
            c.apply(big)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        records, _ = c.pull()
        assert records == []
        c.next_seq = 1
        ok = c.one("small", {"title": "fits"}, op=PUT)
        assert ok.status == S.MUTATION_STATUS_APPLIED


def _bad_tokens() -> dict[str, str]:
    now = int(time.time())
    good = {"sub": "alice", "tenant_id": "acme", "roles": ["member"], "aud": "fieldsync"}
    return {
        "expired": jwt.encode({**good, "exp": now - 60}, SECRET, algorithm="HS256"),
        "no exp": jwt.encode(good, SECRET, algorithm="HS256"),
        "wrong aud": jwt.encode({**good, "aud": "other", "exp": now + 60}, SECRET, "HS256"),
        "wrong key": jwt.encode(
            {**good, "exp": now + 60}, "another-secret-0123456789abcdef-0123", "HS256"
        ),
        "no tenant": jwt.encode(
            {k: v for k, v in good.items() if k != "tenant_id"} | {"exp": now + 60},
            SECRET,
            algorithm="HS256",
        ),
        "alg none": jwt.encode({**good, "exp": now + 60}, None, algorithm="none"),  # type: ignore[arg-type]
        "garbage": "not.a.jwt",
    }


@pytest.mark.parametrize("case", sorted(_bad_tokens()))
def test_every_rpc_refuses_a_bad_token_and_nothing_changes(sync_env: SyncEnv, case: str) -> None:
    bad = md(_bad_tokens()[case])
    good = sync_env.client()
    good.one("r", {"title": "before"}, op=PUT)
    calls: list[Callable[[], object]] = [
        lambda: sync_env.stub.ApplyBatch(
            sync_pb2.ApplyBatchRequest(
                batch=sync_pb2.MutationBatch(
                    client_id="evil", mutations=[mut(1, "r", {"title": "x"}, op=PUT)]
                )
            ),
            metadata=bad,
        ),
        lambda: list(sync_env.stub.Pull(sync_pb2.PullRequest(), metadata=bad)),
        lambda: sync_env.stub.GetRecords(
            sync_pb2.GetRecordsRequest(collection="tasks", record_ids=["r"]), metadata=bad
        ),
        lambda: sync_env.stub.ListConflicts(sync_pb2.ListConflictsRequest(), metadata=bad),
        lambda: sync_env.stub.GetSchema(sync_pb2.GetSchemaRequest(), metadata=bad),
        lambda: list(sync_env.stub.Sync(_stream("evil", []), metadata=bad)),
    ]
    for call in calls:
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, case
    rec = good.get("r")
    assert rec is not None and rec.version == 1 and rec.fields["title"].string_value == "before"
    assert token()  # the good token still works


def _offline_queue(rng: random.Random) -> list[list[sync_pb2.Mutation]]:
    """40 batches of 5 on 12 records (base 1), a resent batch, and a gap then its resend."""
    seq = 0
    batches: list[list[sync_pb2.Mutation]] = []
    for b in range(40):
        if b == 20:
            batches.append(list(batches[-1]))  # the connection dropped: resent as is
            continue
        batch = []
        for _ in range(5):
            seq += 1
            rid = f"r{rng.randrange(12)}"
            roll = rng.random()
            if roll < 0.1:
                batch.append(mut(seq, rid, op=DELETE, base=1))
            elif roll < 0.3:
                batch.append(mut(seq, rid, {"title": f"t{seq}", "status": "done"}, op=PUT, base=1))
            else:
                value: FieldValue = "todo" if rng.random() < 0.5 else 5
                fields = {rng.choice(["status", "estimate", "title"]): value}
                batch.append(mut(seq, rid, fields, base=1))
        if b == 30:
            skipped = [mut(m.client_seq + 100, m.record_id, {"title": "gap"}) for m in batch]
            batches.append(skipped)  # a gap: nothing of it applies
        batches.append(batch)
    return batches


def _comparable(result: sync_pb2.BatchResult) -> list[object]:
    """A batch's answer without what differs between two services (ids, clocks)."""
    out: list[object] = [result.last_applied_seq]
    for r in result.results:
        c = r.conflict
        out.append(
            (
                r.client_seq,
                r.status,
                r.original_status,
                r.duplicate_transition,
                r.record.version,
                r.record.deleted,
                sorted((k, v.SerializeToString()) for k, v in r.record.fields.items()),
                c.kind,
                [(f.field, f.base, f.yours, f.theirs) for f in c.fields],
                [w.code for w in r.warnings],
                r.error.code,
            )
        )
    return out


def test_batches_streamed_together_are_answered_as_if_applied_one_by_one(
    sync_env: SyncEnv,
) -> None:
    """A Sync stream applies the batches already waiting in one transaction
    (how many wait depends on timing); each answer, and what is stored, must
    be what applying them one by one gives."""
    answers = {}
    for tenant, streamed in (("streamed", True), ("one-by-one", False)):
        desk = sync_env.client(tenant=tenant, sub="desk")
        for i in range(12):
            desk.one(f"r{i}", {"title": f"r{i}", "status": "todo", "estimate": 1}, op=PUT)
        for i in range(0, 12, 3):  # others' edits the queue will merge or conflict with
            desk.one(f"r{i}", {"status": "doing", "estimate": 7}, base=1)
        rep = sync_env.client(tenant=tenant, sub="rep")
        queue = _offline_queue(random.Random(11))
        if streamed:
            responses = list(
                sync_env.stub.Sync(_stream(rep.client_id, queue), metadata=rep.metadata)
            )
            results = [r.result for r in responses[1:]]
        else:
            results = [rep.apply(*batch) for batch in queue]
        records, _ = rep.pull()
        answers[tenant] = (
            [_comparable(r) for r in results],
            sorted((r.record_id, r.version, r.deleted, plain(r)) for r in records),
        )
    assert answers["streamed"] == answers["one-by-one"]


@pytest.mark.parametrize("group", [2, 3, 7])
def test_batches_applied_in_one_transaction_answer_as_one_by_one(
    sync_config: SyncConfig, group: int
) -> None:
    """The applier's group commit, in groups of a fixed size (the stream's depend
    on timing): per-batch answers and stored records as one by one, gaps included."""
    app = SyncApp.from_config(sync_config)
    try:
        answers = {}
        for tenant in ("grouped", "single"):
            desk = Principal("desk", tenant, frozenset({"member"}))
            desk_queue = [mut(i + 1, f"r{i}", {"title": f"r{i}"}, op=PUT) for i in range(12)]
            desk_queue += [
                mut(13 + i // 3, f"r{i}", {"status": "doing"}, base=1) for i in range(0, 12, 3)
            ]
            app.applier.apply_batch(desk, batch_from_proto(_batch(f"desk-{tenant}", desk_queue)))
            rep = Principal("rep", tenant, frozenset({"member"}))
            queue = [
                batch_from_proto(_batch(f"rep-{tenant}", b))
                for b in _offline_queue(random.Random(5))
            ]
            if tenant == "grouped":
                outcomes = []
                for i in range(0, len(queue), group):
                    outcomes += app.applier.apply_batches(rep, queue[i : i + group])
            else:
                outcomes = [app.applier.apply_batch(rep, b) for b in queue]
            results = [batch_outcome_to_proto(o) for o in outcomes]
            records = app.storage.get_records(tenant, "tasks", [f"r{i}" for i in range(12)])
            answers[tenant] = (
                [_comparable(r) for r in results],
                [(r.record_id, r.version, r.deleted, r.fields) for r in records],
            )
        assert answers["grouped"] == answers["single"]
    finally:
        app.close()


def _batch(client_id: str, mutations: list[sync_pb2.Mutation]) -> sync_pb2.MutationBatch:
    return sync_pb2.MutationBatch(client_id=client_id, schema_version=3, mutations=mutations)
