"""Ordering, replay and idempotency (SPEC §3): what a flaky network does to a queue."""

from __future__ import annotations

import random

import grpc
import pytest

from fieldsync.v1 import sync_pb2
from tests.support import DELETE, PUT, S, SyncEnv, mut, rpc_reason


def _queue(n: int) -> list[sync_pb2.Mutation]:
    """A realistic offline queue: creates, edits on the client's own base, deletes."""
    rng = random.Random(7)
    out: list[sync_pb2.Mutation] = []
    versions: dict[str, int] = {}
    for seq in range(1, n + 1):
        rid = f"t{rng.randrange(20)}"
        if rid not in versions:
            out.append(mut(seq, rid, {"title": f"task {rid}", "estimate": seq}, op=PUT))
            versions[rid] = 0
        elif rng.random() < 0.1:
            out.append(mut(seq, rid, op=DELETE, base=versions[rid]))
        else:
            out.append(mut(seq, rid, {"estimate": seq, "notes": f"edit {seq}"}, base=versions[rid]))
    return out


def _snapshot(env: SyncEnv, client: object) -> dict[str, tuple[int, bool, dict[str, object]]]:
    records, _ = env.client(sub="auditor").pull()
    return {
        r.record_id: (r.version, r.deleted, {k: v.SerializeToString() for k, v in r.fields.items()})
        for r in records
    }


def test_a_batch_delivered_three_times_and_every_prefix_resent_applies_once(
    sync_env: SyncEnv,
) -> None:
    queue = _queue(100)
    c = sync_env.client()
    first = c.apply(*queue)
    assert first.last_applied_seq == 100
    assert all(r.status != S.MUTATION_STATUS_REJECTED for r in first.results)
    original = {r.client_seq: r.status for r in first.results}
    state = _snapshot(sync_env, c)

    for _ in range(2):
        again = c.apply(*queue)
        assert again.last_applied_seq == 100
        assert [r.status for r in again.results] == [S.MUTATION_STATUS_DUPLICATE] * 100
        assert {r.client_seq: r.original_status for r in again.results} == original
    for k in (1, 17, 50, 99):
        prefix = c.apply(*queue[:k])
        assert [r.original_status for r in prefix.results] == [original[s] for s in range(1, k + 1)]
    assert _snapshot(sync_env, c) == state


def test_a_replay_overlapping_new_mutations_applies_only_the_new_ones(sync_env: SyncEnv) -> None:
    c = sync_env.client()
    queue = [mut(s, "r", {"estimate": s}, op=PUT if s == 1 else 2, base=0) for s in range(1, 11)]
    c.apply(*queue[:6])
    res = c.apply(*queue)  # the client did not hear the answer and resends everything
    assert [r.status for r in res.results[:6]] == [S.MUTATION_STATUS_DUPLICATE] * 6
    assert all(r.status != S.MUTATION_STATUS_DUPLICATE for r in res.results[6:])
    assert res.last_applied_seq == 10
    rec = c.get("r")
    assert rec is not None and rec.fields["estimate"].int_value == 10


def test_a_gap_stops_the_batch_and_says_where_to_resend_from(sync_env: SyncEnv) -> None:
    c = sync_env.client()
    res = c.apply(
        mut(1, "a", {"title": "a"}, op=PUT),
        mut(2, "b", {"title": "b"}, op=PUT),
        mut(4, "d", {"title": "d"}, op=PUT),
        mut(5, "e", {"title": "e"}, op=PUT),
    )
    assert [r.client_seq for r in res.results] == [1, 2]
    assert res.last_applied_seq == 2
    assert c.get("d") is None and c.get("e") is None
    res = c.apply(mut(3, "c", {"title": "c"}, op=PUT), mut(4, "d", {"title": "d"}, op=PUT))
    assert res.last_applied_seq == 4


def test_one_rejected_mutation_consumes_its_sequence_and_blocks_nothing(sync_env: SyncEnv) -> None:
    c = sync_env.client()
    queue = [mut(s, f"r{s}", {"title": f"r{s}"}, op=PUT) for s in range(1, 101)]
    queue[40] = mut(41, "r41", {"title": "x"}, op=PUT, collection="no_such_collection")
    res = c.apply(*queue)
    assert res.last_applied_seq == 100
    statuses = [r.status for r in res.results]
    assert statuses.count(S.MUTATION_STATUS_REJECTED) == 1
    bad = res.results[40]
    assert bad.status == S.MUTATION_STATUS_REJECTED
    assert bad.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "no_such_collection" in bad.error.message
    assert statuses.count(S.MUTATION_STATUS_APPLIED) == 99
    again = c.apply(queue[40])
    assert again.results[0].status == S.MUTATION_STATUS_DUPLICATE
    assert again.results[0].original_status == S.MUTATION_STATUS_REJECTED
    assert again.results[0].error.message == bad.error.message


@pytest.mark.parametrize(
    ("mutation", "reason"),
    [
        (mut(1, "r", {"title": "x"}, op=0), "INVALID_OP"),
        (mut(1, "", {"title": "x"}, op=PUT), "INVALID_MUTATION"),
        (mut(1, "r", {"title": "x"}, op=PUT, mutation_id=""), "INVALID_MUTATION"),
        (mut(1, "r", {"title": "x"}, op=PUT, collection="nope"), "UNKNOWN_COLLECTION"),
        (mut(1, "r", {"title": "x"}, base=3), "BASE_VERSION_AHEAD"),
    ],
)
def test_a_malformed_mutation_is_rejected_with_its_reason(
    sync_env: SyncEnv, mutation: sync_pb2.Mutation, reason: str
) -> None:
    from fieldsync.errors import reason_of

    c = sync_env.client()
    ok = mut(2, "fine", {"title": "fine"}, op=PUT)
    res = c.apply(mutation, ok)
    assert [r.status for r in res.results] == [
        S.MUTATION_STATUS_REJECTED,
        S.MUTATION_STATUS_APPLIED,
    ]
    assert res.results[0].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert reason_of(res.results[0].error) == reason
    records, _ = c.pull()
    assert [r.record_id for r in records] == ["fine"]


def test_a_client_id_belongs_to_the_user_who_first_used_it(sync_env: SyncEnv) -> None:
    alice = sync_env.client(sub="alice")
    alice.one("r", {"title": "mine"}, op=PUT)
    mallory = sync_env.client(sub="mallory", client_id=alice.client_id)
    mallory.next_seq = 2
    with pytest.raises(grpc.RpcError) as info:
        mallory.one("r", {"title": "stolen"}, base=1)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert rpc_reason(info.value) == "CLIENT_ID_TAKEN"
    other_tenant = sync_env.client(tenant="globex", sub="alice", client_id=alice.client_id)
    other_tenant.next_seq = 2
    with pytest.raises(grpc.RpcError) as info:
        other_tenant.one("r", {"title": "stolen"})
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    rec = alice.get("r")
    assert rec is not None and rec.version == 1 and rec.fields["title"].string_value == "mine"


def test_an_oversized_batch_is_refused_whole_and_changes_nothing(
    sync_env: SyncEnv, sync_config: object
) -> None:
    c = sync_env.client()
    too_many = [mut(s, f"r{s}", {"title": "x"}, op=PUT) for s in range(1, 10_002)]
    with pytest.raises(grpc.RpcError) as info:
        c.apply(*too_many)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_reason(info.value) == "BATCH_TOO_LARGE"
    records, _ = c.pull()
    assert records == []
    assert c.apply(too_many[0]).last_applied_seq == 1


def test_a_batch_without_client_id_is_refused(sync_env: SyncEnv) -> None:
    c = sync_env.client(client_id="")
    with pytest.raises(grpc.RpcError) as info:
        c.one("r", {"title": "x"}, op=PUT)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_reason(info.value) == "MISSING_CLIENT_ID"


def test_mutations_of_one_client_on_its_own_base_never_conflict_with_each_other(
    sync_env: SyncEnv,
) -> None:
    creator = sync_env.client(sub="carol")
    creator.one("t", {"title": "a", "estimate": 1}, op=PUT)
    rep = sync_env.client(sub="rep")
    # Offline: three edits of the same fields, all on base 1.
    res = rep.apply(
        rep.mut("t", {"estimate": 2}, base=1),
        rep.mut("t", {"estimate": 3}, base=1),
        rep.mut("t", {"title": "b", "estimate": 4}, base=1),
    )
    assert [r.status for r in res.results] == [S.MUTATION_STATUS_APPLIED] * 3
    assert res.results[-1].record.version == 4
    assert res.results[-1].record.fields["estimate"].int_value == 4
