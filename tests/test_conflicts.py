"""Conflicts through the real service: every kind, LWW, duplicate transitions, resolution."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from fieldsync.v1 import sync_pb2
from fieldsync.values import FieldValue, Timestamp, to_proto
from sync_service.config import SyncConfig
from tests.conftest import make_config, running_sync
from tests.support import DELETE, PUT, Client, S, SyncEnv, plain, rpc_reason

K = sync_pb2.ConflictKind


def _resolve(
    env: SyncEnv, who: Client, conflict_id: str, resolution: int, **fields: FieldValue
) -> sync_pb2.ResolveConflictResponse:
    req = sync_pb2.ResolveConflictRequest(conflict_id=conflict_id, resolution=resolution)  # type: ignore[arg-type]
    for k, v in fields.items():
        to_proto(v, req.fields[k])
    return env.stub.ResolveConflict(req, metadata=who.metadata)


def test_delete_of_a_record_changed_since_base_is_a_conflict_and_the_record_stays(
    sync_env: SyncEnv,
) -> None:
    a, b = sync_env.client(sub="a"), sync_env.client(sub="b")
    a.one("t", {"title": "x"}, op=PUT)
    a.one("t", {"title": "edited"}, base=1)
    r = b.one("t", op=DELETE, base=1)
    assert r.status == S.MUTATION_STATUS_CONFLICT
    assert r.conflict.kind == K.CONFLICT_KIND_DELETE_UPDATE
    assert [(f.field, f.theirs.string_value) for f in r.conflict.fields] == [("title", "edited")]
    rec = a.get("t")
    assert rec is not None and not rec.deleted and rec.version == 2


def test_write_to_a_record_deleted_since_base_is_a_conflict_and_it_stays_deleted(
    sync_env: SyncEnv,
) -> None:
    a, b = sync_env.client(sub="a"), sync_env.client(sub="b")
    a.one("t", {"title": "x"}, op=PUT)
    a.one("t", op=DELETE, base=1)
    r = b.one("t", {"title": "mine"}, base=1)
    assert r.status == S.MUTATION_STATUS_CONFLICT
    assert r.conflict.kind == K.CONFLICT_KIND_UPDATE_DELETE
    assert [(f.field, f.yours.string_value) for f in r.conflict.fields] == [("title", "mine")]
    rec = a.get("t")
    assert rec is not None and rec.deleted and rec.version == 2
    # The losing value is durable: the rep can take it back.
    out = _resolve(sync_env, b, r.conflict.conflict_id, sync_pb2.RESOLUTION_TAKE_YOURS)
    assert not out.record.deleted and out.record.version == 3
    assert out.record.fields["title"].string_value == "mine"


def test_two_creates_of_one_id_merge_against_an_empty_base(sync_env: SyncEnv) -> None:
    a, b = sync_env.client(sub="a"), sync_env.client(sub="b")
    a.one("t", {"title": "A", "estimate": 3}, op=PUT)
    r = b.one("t", {"title": "B", "estimate": 3, "assignee": "bob"}, op=PUT)
    assert r.status == S.MUTATION_STATUS_CONFLICT
    assert r.conflict.kind == K.CONFLICT_KIND_CREATE_CREATE
    assert [(f.field, f.yours.string_value, f.theirs.string_value) for f in r.conflict.fields] == [
        ("title", "B", "A")
    ]
    assert plain(r.record) == {"title": "A", "estimate": 3, "assignee": "bob"}


def test_a_lww_field_takes_the_later_write(sync_env: SyncEnv) -> None:
    a, b = sync_env.client(sub="a"), sync_env.client(sub="b")
    a.one("t", {"title": "x", "seen_at": Timestamp(1_000)}, op=PUT)
    a.one("t", {"seen_at": Timestamp(2_000)}, base=1)
    r = b.one("t", {"seen_at": Timestamp(1_500)}, base=1)
    assert r.status == S.MUTATION_STATUS_MERGED
    assert plain(r.record)["seen_at"] == Timestamp(1_500)
    assert a.conflicts() == []


def test_two_users_moving_a_task_to_done_is_a_duplicate_transition_not_a_conflict(
    sync_env: SyncEnv,
) -> None:
    a, b = sync_env.client(sub="a"), sync_env.client(sub="b")
    a.one("t", {"title": "deploy"}, op=PUT)
    first = a.one("t", {"status": "done"}, base=1)
    second = b.one("t", {"status": "done"}, base=1)
    assert first.status == S.MUTATION_STATUS_APPLIED and not first.duplicate_transition
    assert second.status == S.MUTATION_STATUS_MERGED and second.duplicate_transition
    assert second.record.version == 2  # nothing changed twice
    assert a.conflicts() == []


ALL_LWW = """
version: 1
collections:
  presence:
    policy: lww
    fields:
      where: {type: string}
      battery: {type: int}
"""


def test_in_an_all_lww_collection_the_later_write_wins_every_case(tmp_path: Path) -> None:
    schema = tmp_path / "schema.yaml"
    schema.write_text(ALL_LWW)
    config = make_config(f"sqlite:///{tmp_path / 'sync.db'}", schema_path=str(schema))
    with running_sync(config) as env:
        a, b = env.client(sub="a"), env.client(sub="b")
        a.one("p", {"where": "office"}, op=PUT, collection="presence")
        a.one("p", {"where": "car"}, base=1, collection="presence")
        r = b.one("p", op=DELETE, base=1, collection="presence")  # delete vs update
        assert r.status == S.MUTATION_STATUS_MERGED
        rec = a.get("p", collection="presence")
        assert rec is not None and rec.deleted and rec.version == 3
        r = a.one("p", {"where": "home"}, base=2, collection="presence")  # update vs delete
        assert r.status == S.MUTATION_STATUS_MERGED
        assert not r.record.deleted and plain(r.record)["where"] == "home"
        assert a.conflicts() == []


def _field_rep_conflict(env: SyncEnv) -> tuple[Client, Client, sync_pb2.Conflict]:
    desk, rep = env.client(sub="desk"), env.client(sub="rep")
    desk.one("acc", {"name": "Initech", "status": "prospect"}, op=PUT, collection="accounts")
    desk.one("acc", {"status": "open"}, base=1, collection="accounts")
    r = rep.one("acc", {"status": "closed", "amount": 5.0}, base=1, collection="accounts")
    assert r.status == S.MUTATION_STATUS_CONFLICT
    return desk, rep, r.conflict


def test_resolve_keep_theirs_closes_the_conflict_and_changes_nothing(sync_env: SyncEnv) -> None:
    _desk, rep, c = _field_rep_conflict(sync_env)
    before = rep.get("acc", collection="accounts")
    out = _resolve(sync_env, rep, c.conflict_id, sync_pb2.RESOLUTION_KEEP_THEIRS)
    assert out.record == before
    assert rep.conflicts() == []


def test_resolve_take_yours_applies_the_losing_value(sync_env: SyncEnv) -> None:
    _desk, rep, c = _field_rep_conflict(sync_env)
    out = _resolve(sync_env, rep, c.conflict_id, sync_pb2.RESOLUTION_TAKE_YOURS)
    assert out.record.version == c.server_version + 1
    assert plain(out.record)["status"] == "closed"
    assert rep.conflicts() == []


def test_resolve_custom_applies_the_given_values(sync_env: SyncEnv) -> None:
    _desk, rep, c = _field_rep_conflict(sync_env)
    out = _resolve(sync_env, rep, c.conflict_id, sync_pb2.RESOLUTION_CUSTOM, status="negotiating")
    assert plain(out.record)["status"] == "negotiating"


def test_resolving_twice_or_an_unknown_conflict_is_refused(sync_env: SyncEnv) -> None:
    _desk, rep, c = _field_rep_conflict(sync_env)
    _resolve(sync_env, rep, c.conflict_id, sync_pb2.RESOLUTION_KEEP_THEIRS)
    with pytest.raises(grpc.RpcError) as info:
        _resolve(sync_env, rep, c.conflict_id, sync_pb2.RESOLUTION_TAKE_YOURS)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert rpc_reason(info.value) == "CONFLICT_ALREADY_RESOLVED"
    with pytest.raises(grpc.RpcError) as info:
        _resolve(sync_env, rep, "no-such-id", sync_pb2.RESOLUTION_TAKE_YOURS)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as info:
        _resolve(sync_env, rep, c.conflict_id, sync_pb2.RESOLUTION_UNSPECIFIED)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_taking_yours_after_the_field_changed_again_is_refused_and_changes_nothing(
    sync_env: SyncEnv,
) -> None:
    desk, rep, c = _field_rep_conflict(sync_env)
    desk.one("acc", {"status": "lost"}, base=c.server_version, collection="accounts")
    before = rep.get("acc", collection="accounts")
    with pytest.raises(grpc.RpcError) as info:
        _resolve(sync_env, rep, c.conflict_id, sync_pb2.RESOLUTION_TAKE_YOURS)
    assert info.value.code() == grpc.StatusCode.ABORTED
    assert rpc_reason(info.value) == "CONFLICT_STALE"
    assert rep.get("acc", collection="accounts") == before
    assert [x.conflict_id for x in rep.conflicts()] == [c.conflict_id]


def test_conflicts_are_durable_across_a_restart(sync_config: SyncConfig) -> None:
    with running_sync(sync_config) as env:
        _, _, c = _field_rep_conflict(env)
    with running_sync(sync_config) as env:
        (kept,) = env.client(sub="rep").conflicts()
        assert kept.conflict_id == c.conflict_id
        assert kept.fields[0].yours.string_value == "closed"


def test_list_conflicts_pages_through_all_of_them(sync_env: SyncEnv) -> None:
    a, b = sync_env.client(sub="a"), sync_env.client(sub="b")
    for i in range(7):
        a.one(f"t{i}", {"title": "x"}, op=PUT)
        a.one(f"t{i}", {"title": "a"}, base=1)
        assert b.one(f"t{i}", {"title": "b"}, base=1).status == S.MUTATION_STATUS_CONFLICT
    seen: list[str] = []
    token = ""
    while True:
        page = sync_env.stub.ListConflicts(
            sync_pb2.ListConflictsRequest(page_size=3, page_token=token), metadata=a.metadata
        )
        seen.extend(c.record_id for c in page.conflicts)
        token = page.next_page_token
        if not token:
            break
    assert sorted(seen) == [f"t{i}" for i in range(7)]
    only = a.conflicts(record_id="t3")
    assert [c.record_id for c in only] == ["t3"]
    with pytest.raises(grpc.RpcError) as info:
        sync_env.stub.ListConflicts(
            sync_pb2.ListConflictsRequest(page_token="%%%"), metadata=a.metadata
        )
    assert rpc_reason(info.value) == "INVALID_PAGE_TOKEN"


def test_a_replayed_conflict_answers_with_the_same_durable_conflict(sync_env: SyncEnv) -> None:
    desk, rep = sync_env.client(sub="desk"), sync_env.client(sub="rep")
    desk.one("t", {"title": "x"}, op=PUT)
    desk.one("t", {"title": "desk"}, base=1)
    m = rep.mut("t", {"title": "rep", "estimate": 4}, base=1)
    first = rep.apply(m).results[0]
    assert first.status == S.MUTATION_STATUS_CONFLICT
    again = rep.apply(m).results[0]
    assert again.status == S.MUTATION_STATUS_DUPLICATE
    assert again.original_status == S.MUTATION_STATUS_CONFLICT
    assert again.conflict == first.conflict
    assert len(rep.conflicts()) == 1
