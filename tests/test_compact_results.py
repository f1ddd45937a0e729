"""SyncHello.compact_results: APPLIED results without the record's fields, everything else whole."""

from __future__ import annotations

from collections.abc import Iterator

from fieldsync.v1 import sync_pb2
from tests.support import PUT, Metadata, SyncEnv, iter_results, mut, plain

APPLIED = sync_pb2.MUTATION_STATUS_APPLIED
MERGED = sync_pb2.MUTATION_STATUS_MERGED
CONFLICT = sync_pb2.MUTATION_STATUS_CONFLICT
DUPLICATE = sync_pb2.MUTATION_STATUS_DUPLICATE


def _stream(
    client_id: str, batches: list[list[sync_pb2.Mutation]], *, compact: bool
) -> Iterator[sync_pb2.SyncRequest]:
    hello = sync_pb2.SyncHello(client_id=client_id, schema_version=3, compact_results=compact)
    yield sync_pb2.SyncRequest(hello=hello)
    for b in batches:
        yield sync_pb2.SyncRequest(
            batch=sync_pb2.MutationBatch(client_id=client_id, schema_version=3, mutations=b)
        )


def _sync(
    env: SyncEnv, client_id: str, md: Metadata, batch: list[sync_pb2.Mutation], *, compact: bool
) -> list[sync_pb2.MutationResult]:
    responses = env.stub.Sync(_stream(client_id, [batch], compact=compact), metadata=md)
    return [r for result in iter_results(responses) for r in result.results]


def test_compact_results_leave_out_only_an_applied_records_fields(sync_env: SyncEnv) -> None:
    field, desk = sync_env.client(), sync_env.client()
    created = [
        mut(1, "r1", {"title": "one", "status": "todo"}, op=PUT),
        mut(2, "r2", {"title": "two", "legacy_flag": True}, op=PUT),  # a warning
    ]
    r1, r2 = _sync(sync_env, field.client_id, field.metadata, created, compact=True)
    assert r1.status == APPLIED and not r1.warnings
    assert (r1.record.record_id, r1.record.version, r1.record.deleted) == ("r1", 1, False)
    assert r1.record.updated_by and r1.record.updated_at.seconds > 0
    assert dict(r1.record.fields) == {}  # the client holds them
    # With a warning the server's record differs from what the client wrote: whole.
    assert r2.status == APPLIED and r2.warnings
    assert plain(r2.record) == {"title": "two"}  # legacy_flag dropped

    desk.apply(desk.mut("r1", {"assignee": "desk", "estimate": 5}, base=1))
    later = [
        mut(3, "r1", {"status": "doing"}, base=1),  # merges with the desk's edit
        mut(4, "r1", {"estimate": 9}, base=1),  # collides with it
    ]
    merged, conflicted = _sync(sync_env, field.client_id, field.metadata, later, compact=True)
    assert merged.status == MERGED
    assert plain(merged.record)["assignee"] == "desk"  # the client did not have it
    assert conflicted.status == CONFLICT and conflicted.conflict.conflict_id
    assert plain(conflicted.record)["estimate"] == 5

    # Without the option, an APPLIED result carries the whole record (the default).
    (whole,) = _sync(
        sync_env,
        field.client_id,
        field.metadata,
        [mut(5, "r3", {"title": "t"}, op=PUT)],
        compact=False,
    )
    assert whole.status == APPLIED and plain(whole.record)["title"] == "t"


def test_a_replay_is_answered_the_same_whether_compact_or_not(sync_env: SyncEnv) -> None:
    c = sync_env.client()
    batch = [mut(1, "r1", {"title": "one"}, op=PUT), mut(2, "r1", {"status": "done"}, base=1)]
    first = _sync(sync_env, c.client_id, c.metadata, batch, compact=True)
    assert [r.status for r in first] == [APPLIED, APPLIED]
    compact_again = _sync(sync_env, c.client_id, c.metadata, batch, compact=True)
    whole_again = _sync(sync_env, c.client_id, c.metadata, batch, compact=False)
    assert [r.status for r in compact_again] == [DUPLICATE, DUPLICATE]
    assert [r.SerializeToString() for r in compact_again] == [
        r.SerializeToString() for r in whole_again
    ]
    assert plain(compact_again[1].record) == {"title": "one", "status": "done"}
