"""The change feed (SPEC §6): Pull from a cursor, Subscribe while others write."""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import pytest

from fieldsync.v1 import sync_pb2
from tests.conftest import make_config, running_sync
from tests.support import DELETE, PUT, SyncEnv, rpc_reason


def test_pull_from_a_cursor_returns_exactly_the_later_changes_tombstones_included(
    sync_env: SyncEnv,
) -> None:
    w = sync_env.client(sub="writer")
    for i in range(5):
        w.one(f"r{i}", {"title": f"r{i}"}, op=PUT)
    reader = sync_env.client(sub="reader")
    first, cursor = reader.pull()
    assert sorted(r.record_id for r in first) == [f"r{i}" for i in range(5)]

    w.one("r1", {"title": "r1 again"}, base=1)
    w.one("r3", op=DELETE, base=1)
    w.one("r9", {"title": "new"}, op=PUT)
    later, cursor2 = reader.pull(cursor)
    by_id = {r.record_id: r for r in later}
    assert sorted(by_id) == ["r1", "r3", "r9"]
    assert by_id["r1"].fields["title"].string_value == "r1 again" and by_id["r1"].version == 2
    assert by_id["r3"].deleted and by_id["r3"].version == 2
    assert not by_id["r9"].deleted

    nothing, cursor3 = reader.pull(cursor2)
    assert nothing == [] and cursor3 == cursor2


def test_pull_pages_cover_everything_once(sync_env: SyncEnv) -> None:
    w = sync_env.client()
    w.apply(*[w.mut(f"r{i:03}", {"title": str(i)}, op=PUT) for i in range(120)])
    pages = list(sync_env.stub.Pull(sync_pb2.PullRequest(page_size=50), metadata=w.metadata))
    assert [len(p.changes) for p in pages] == [50, 50, 20]
    assert [p.caught_up for p in pages] == [False, False, True]
    ids = [r.record_id for p in pages for r in p.changes]
    assert sorted(ids) == [f"r{i:03}" for i in range(120)] and len(set(ids)) == 120


def test_pull_filters_by_collection(sync_env: SyncEnv) -> None:
    w = sync_env.client()
    w.one("t", {"title": "task"}, op=PUT)
    w.one("p", {"title": "page"}, op=PUT, collection="pages")
    pages = list(
        sync_env.stub.Pull(sync_pb2.PullRequest(collections=["pages"]), metadata=w.metadata)
    )
    assert [r.record_id for p in pages for r in p.changes] == ["p"]


def test_a_cursor_the_server_did_not_issue_is_refused(sync_env: SyncEnv) -> None:
    w = sync_env.client()
    with pytest.raises(grpc.RpcError) as info:
        list(sync_env.stub.Pull(sync_pb2.PullRequest(cursor="garbage!"), metadata=w.metadata))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_reason(info.value) == "INVALID_CURSOR"


def test_subscribe_open_during_writes_receives_every_change_once(sync_env: SyncEnv) -> None:
    w = sync_env.client(sub="writer")
    w.one("before", {"title": "x"}, op=PUT)
    _, cursor = sync_env.client(sub="reader").pull()

    n = 60
    expected = {f"s{i}": 1 for i in range(n)} | {"before": 2}
    seen: list[tuple[str, int]] = []
    done = threading.Event()
    call = sync_env.stub.Subscribe(sync_pb2.SubscribeRequest(cursor=cursor), metadata=w.metadata)

    def follow() -> None:
        for resp in call:
            seen.extend((r.record_id, r.version) for r in resp.changes)
            latest = dict(seen)
            if all(latest.get(k, 0) >= v for k, v in expected.items()):
                done.set()
                return

    t = threading.Thread(target=follow, daemon=True)
    t.start()
    for i in range(n):
        w.one(f"s{i}", {"title": str(i)}, op=PUT)
        if i == n // 2:
            w.one("before", {"title": "y"}, base=1)
    assert done.wait(20), f"subscriber saw only {len(seen)} changes"
    call.cancel()
    t.join(5)
    assert sorted(seen) == sorted(expected.items())  # every change, once


def test_subscribe_is_woken_by_every_commit_without_polling(tmp_path: Path) -> None:
    # Polling an hour apart: every change must arrive through the in-process wake-up,
    # including commits that land while the stream is reading the database.
    config = make_config(f"sqlite:///{tmp_path / 'sync.db'}", subscribe_poll_seconds=3600)
    with running_sync(config) as env:
        w = env.client(sub="writer")
        call = env.stub.Subscribe(sync_pb2.SubscribeRequest(), metadata=w.metadata)
        seen: set[str] = set()
        want = {f"w{i}" for i in range(40)}
        done = threading.Event()

        def follow() -> None:
            for resp in call:
                seen.update(r.record_id for r in resp.changes)
                if want <= seen:
                    done.set()
                    return

        t = threading.Thread(target=follow, daemon=True)
        t.start()
        writers = [
            threading.Thread(
                target=lambda k=k: [
                    env.client(sub=f"u{k}").one(f"w{i}", {"title": "x"}, op=PUT)
                    for i in range(k, 40, 4)
                ]
            )
            for k in range(4)
        ]
        for th in writers:
            th.start()
        for th in writers:
            th.join()
        assert done.wait(20), f"missing: {sorted(want - seen)}"
        call.cancel()
        t.join(5)
