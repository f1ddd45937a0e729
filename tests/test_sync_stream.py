"""The Sync stream (bulk reconnect), message limits and tokens through the real sync service."""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import jwt
import pytest

from fieldsync.v1 import sync_pb2
from tests.conftest import make_config, running_sync
from tests.support import PUT, SECRET, S, SyncEnv, md, mut, rpc_reason, token


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
