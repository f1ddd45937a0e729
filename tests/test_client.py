"""The client SDK (issue 4) against the real sync service: real gRPC, real SQLite files.

Offline writes and the local view, the queue across reopen, delivery when the
server comes back, rejection, conflicts between two offline clients in both
orders and their resolution, a restored backup, a 10,000-mutation queue. The
crash test is in test_client_crash.py, the command line in test_client_cli.py.
"""

from __future__ import annotations

import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

import fieldsync_client
from fieldsync.v1 import sync_pb2
from fieldsync.values import FieldValue
from fieldsync_client import (
    Conflict,
    ConflictNotFound,
    FieldSyncClient,
    Json,
    SyncError,
    SyncPermissionDenied,
    SyncUnauthenticated,
    SyncUnavailable,
    Timestamp,
)
from sync_service.config import SyncConfig
from tests.conftest import make_config, running_sync
from tests.support import PATCH, PUT, SyncEnv, md, mut, token
from tests.test_client_support import (
    client_view,
    free_port,
    open_client,
    server_view,
    silent_listener,
    sync_service_on,
)


def _last_applied(env: SyncEnv, client_id: str, sub: str = "alice") -> int:
    """What the server says it has from this client id (a Sync hello, nothing sent)."""
    hello = sync_pb2.SyncRequest(hello=sync_pb2.SyncHello(client_id=client_id, schema_version=3))
    (welcome,) = env.stub.Sync(iter([hello]), metadata=md(token(sub=sub)), timeout=10)
    seq: int = welcome.welcome.last_applied_seq
    return seq


def test_the_public_api_is_sorted_and_importable() -> None:
    names = fieldsync_client.__all__
    assert names == sorted(names)
    for name in names:
        assert getattr(fieldsync_client, name) is not None, name
    # Nothing else public: the modules beside __init__ are private (_*.py), but cli.
    assert {n for n in dir(fieldsync_client) if not n.startswith("_")} - {"cli"} == set(names)


# -- offline: the local store ----------------------------------------------------------


def test_writes_return_at_once_offline_and_the_local_view_includes_them(tmp_path: Path) -> None:
    with silent_listener() as nowhere, open_client(tmp_path / "c.db", nowhere) as c:
        first = c.put("tasks", "t1", {"title": "Survey", "estimate": 3, "tags": Json('["a"]')})
        second = c.patch("tasks", "t1", {"estimate": 4, "seen_at": Timestamp(5), "tags": None})
        c.put("tasks", "t2", {"title": "Gone soon"})
        c.delete("tasks", "t2")

        assert (first.client_seq, second.client_seq) == (1, 2)
        assert first.mutation_id != second.mutation_id
        assert [m.base_version for m in c.queue()] == [0, 0, 0, 0]
        assert [m.op for m in c.queue()] == ["PUT", "PATCH", "PUT", "DELETE"]
        t1 = c.get("tasks", "t1")
        assert t1 is not None
        assert (t1.version, t1.deleted, t1.pending) == (0, False, 2)
        assert t1.fields == {"title": "Survey", "estimate": 4, "seen_at": Timestamp(5)}
        t2 = c.get("tasks", "t2")
        assert t2 is not None and t2.deleted and t2.pending == 2
        assert [r.record_id for r in c.query("tasks")] == ["t1"]
        assert [r.record_id for r in c.query("tasks", include_deleted=True)] == ["t1", "t2"]
        assert c.get("tasks", "nope") is None


def test_bad_writes_are_refused_before_anything_is_queued(tmp_path: Path) -> None:
    with open_client(tmp_path / "c.db", "127.0.0.1:1") as c:
        with pytest.raises(TypeError):
            c.put("tasks", "t", {"title": object()})  # type: ignore[dict-item]
        with pytest.raises(ValueError):
            c.put("", "t", {})
        with pytest.raises(ValueError):
            c.patch("tasks", "", {"title": "x"})
        assert c.queue() == []
        assert c.patch("tasks", "t", {"title": "ok"}).client_seq == 1  # no sequence was used


def test_the_queue_survives_reopening_with_its_sequence_and_client_id(
    tmp_path: Path, sync_env: SyncEnv
) -> None:
    db = tmp_path / "c.db"
    with open_client(db, "127.0.0.1:1", client_id="device-7") as c:
        for i in range(5):
            c.patch("tasks", f"t{i % 2}", {"title": f"v{i}"})
        before = c.queue()
    with open_client(db, sync_env.address) as c:
        assert c.client_id == "device-7"
        assert c.queue() == before
        assert c.patch("tasks", "t9", {"title": "after"}).client_seq == 6
        report = c.sync()
        assert (report.applied, report.pending) == (6, 0)
    assert _last_applied(sync_env, "device-7") == 6
    with pytest.raises(ValueError, match="device-7"):
        FieldSyncClient(db, client_id="someone-else")


def test_a_transaction_keeps_all_its_writes_or_none(tmp_path: Path) -> None:
    with open_client(tmp_path / "c.db", "127.0.0.1:1") as c:
        with c.transaction():
            c.put("forms", "f1", {"kind": "visit"})
            c.patch("accounts", "a1", {"status": "open"})
            assert c.get("forms", "f1") is not None  # reads in the block see its writes
        with pytest.raises(RuntimeError), c.transaction():
            c.put("forms", "f2", {"kind": "order"})
            raise RuntimeError("the app changed its mind")
        assert [m.record_id for m in c.queue()] == ["f1", "a1"]
        assert c.get("forms", "f2") is None
        with c.transaction(), pytest.raises(ValueError, match="transaction"):
            c.sync()
        assert c.put("forms", "f3", {}).client_seq == 3  # the discarded write used none


# -- delivery ------------------------------------------------------------------------


def test_server_down_the_queue_stays_whole_and_is_delivered_when_it_is_back(
    tmp_path: Path, sync_config: SyncConfig
) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    with open_client(tmp_path / "c.db", address) as c:
        for i in range(50):
            rid = f"t{i % 20}"
            if i < 20:
                c.put("tasks", rid, {"title": f"task {i}", "estimate": i})
            elif i % 7 == 0:
                c.delete("tasks", rid)
            else:
                c.patch("tasks", rid, {"estimate": i, "notes": f"edit {i}"})
        queued = c.queue()
        view = client_view(c, "tasks")

        with pytest.raises(SyncUnavailable) as info:
            c.sync()
        assert address in str(info.value) and info.value.code == "UNAVAILABLE"
        assert c.queue() == queued and len(queued) == 50
        assert client_view(c, "tasks") == view

        with sync_service_on(sync_config, port) as env:
            report = c.sync()
            assert (report.applied, report.merged, report.conflicts) == (50, 0, 0)
            assert (report.rejected, report.duplicates, report.pending) == (0, 0, 0)
            assert report.pulled == 20
            assert c.queue() == []
            server = server_view(env, "tasks")
            assert client_view(c, "tasks") == server
            # What the user saw offline is what the server now holds.
            assert {k: (d, f) for k, (_, d, f) in server.items()} == {
                k: (d, f) for k, (_, d, f) in view.items()
            }


def test_sync_retries_until_the_server_answers(tmp_path: Path, sync_config: SyncConfig) -> None:
    """The first attempt meets a port that hangs up; the server starts; the retry delivers."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        c = open_client(tmp_path / "c.db", f"127.0.0.1:{port}", max_retries=20)
        c.put("tasks", "t", {"title": "x"})
        outcome: list[object] = []
        worker = threading.Thread(target=lambda: outcome.append(c.sync()), daemon=True)
        worker.start()
        conn, _ = listener.accept()  # the first attempt is here
        conn.close()
    try:
        with sync_service_on(sync_config, port) as env:
            worker.join(60)
            assert not worker.is_alive()
            (report,) = outcome
            assert getattr(report, "applied", None) == 1
            assert server_view(env, "tasks")["t"][0] == 1
    finally:
        c.close()


def test_a_server_that_never_answers_runs_into_the_deadline(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    with silent_listener() as hang, open_client(db, hang, timeout=0.5, max_retries=1) as c:
        c.put("tasks", "t", {"title": "x"})
        started = time.monotonic()
        with pytest.raises(SyncUnavailable) as info:
            c.sync()
        assert time.monotonic() - started < 10  # two attempts of a second (hello + a batch)
        assert info.value.code == "DEADLINE_EXCEEDED"
        assert "did not answer within 0.5s" in str(info.value)
        assert len(c.queue()) == 1


def test_a_refused_token_keeps_the_queue_and_says_why(tmp_path: Path, sync_env: SyncEnv) -> None:
    db = tmp_path / "c.db"
    with FieldSyncClient(db, sync_env.address, lambda: "not-a-jwt") as c:
        c.put("tasks", "t", {"title": "x"})
        with pytest.raises(SyncUnauthenticated) as info:
            c.sync()
        assert info.value.reason == "INVALID_TOKEN" and info.value.code == "UNAUTHENTICATED"
        assert "refused the token" in str(info.value)
        assert len(c.queue()) == 1
    with FieldSyncClient(db, sync_env.address) as c, pytest.raises(SyncUnauthenticated):
        c.sync()  # no token provider: still a client, offline
    with open_client(db, sync_env.address) as owner:
        owner.sync()
        stolen = owner.client_id
    with open_client(tmp_path / "t2.db", sync_env.address, sub="mallory", client_id=stolen) as t:
        t.put("tasks", "t", {"title": "mine now"})
        with pytest.raises(SyncPermissionDenied) as denied:
            t.sync()
        assert denied.value.reason == "CLIENT_ID_TAKEN"
        assert len(t.queue()) == 1


def test_a_rejected_mutation_blocks_nothing_and_stays_visible(
    tmp_path: Path, sync_env: SyncEnv
) -> None:
    with open_client(tmp_path / "c.db", sync_env.address, batch_size=25) as c:
        for i in range(1, 101):
            collection = "no_such_collection" if i == 41 else "tasks"
            c.put(collection, f"r{i}", {"title": f"r{i}"})
        report = c.sync()
        assert (report.applied, report.rejected, report.pending) == (99, 1, 0)
        (bad,) = c.rejected()
        assert (bad.client_seq, bad.collection, bad.state) == (41, "no_such_collection", "rejected")
        assert bad.reason == "UNKNOWN_COLLECTION" and bad.code == "INVALID_ARGUMENT"
        assert bad.error is not None and "no_such_collection" in bad.error
        assert c.queue() == []
        assert len(server_view(sync_env, "tasks")) == 99
        again = c.sync()  # not resent: a rejection is final
        assert (again.applied, again.rejected, again.duplicates) == (0, 0, 0)
        assert c.rejected() == [bad]
        # Gone only when the application says the user has seen it.
        assert not c.dismiss(c.put("tasks", "p", {}).mutation_id)  # pending: never dropped
        assert c.dismiss(bad.mutation_id)
        assert c.rejected() == [] and len(c.queue()) == 1


def test_each_queued_edit_carries_the_last_known_server_version(
    tmp_path: Path, sync_env: SyncEnv
) -> None:
    with open_client(tmp_path / "c.db", sync_env.address) as c:
        c.put("tasks", "t", {"title": "a", "estimate": 1})
        c.sync()
        for n in (2, 3, 4):
            c.patch("tasks", "t", {"estimate": n})
        assert [m.base_version for m in c.queue()] == [1, 1, 1]
        view = c.get("tasks", "t")
        assert view is not None and (view.version, view.pending) == (1, 3)
        assert view.fields["estimate"] == 4
        report = c.sync()
        assert (report.applied, report.conflicts) == (3, 0)
        assert c.patch("tasks", "t", {"estimate": 5}).base_version == 4


def test_a_restored_backup_does_not_lose_the_writes_made_after_it(
    tmp_path: Path, sync_env: SyncEnv
) -> None:
    """The file goes back in time; the server has seen sequences the file hands out again."""
    db, backup = tmp_path / "c.db", tmp_path / "backup.db"
    with open_client(db, sync_env.address) as c:
        c.put("tasks", "a", {"title": "a"})
        c.sync()
    shutil.copy(db, backup)
    with open_client(db, sync_env.address) as c:
        c.put("tasks", "b", {"title": "b"})
        c.put("tasks", "c", {"title": "c"})
        c.sync()
        client_id = c.client_id
    shutil.copy(backup, db)
    with open_client(db, sync_env.address) as c:
        c.put("tasks", "d", {"title": "d"})  # seq 2 again, a new mutation
        c.sync()
        assert c.queue() == [] and c.rejected() == []
        assert sorted(server_view(sync_env, "tasks")) == ["a", "b", "c", "d"]
        assert c.put("tasks", "e", {}).client_seq > 3  # no sequence is handed out twice
    assert _last_applied(sync_env, client_id) == 4


def test_answers_lost_on_the_way_back_are_learned_from_the_replay(
    tmp_path: Path, sync_env: SyncEnv
) -> None:
    """The server applied the queue but the answers never arrived (a crash, a cut link):
    the client resends, and the DUPLICATE answers still bring each original outcome."""
    other = sync_env.client(sub="desk")
    other.one("t", {"title": "Desk"}, op=PUT)
    with open_client(tmp_path / "c.db", sync_env.address) as c:
        c.patch("tasks", "t", {"title": "Mine"})  # base 0: a create that meets desk's
        c.put("no_such_collection", "x", {"a": 1})
        c.put("tasks", "u", {"title": "u"})
        queued = c.queue()
        delivered = sync_env.client(client_id=c.client_id).apply(
            *[
                mut(
                    m.client_seq,
                    m.record_id,
                    dict(m.fields),
                    op=PATCH if m.op == "PATCH" else PUT,
                    collection=m.collection,
                    mutation_id=m.mutation_id,
                )
                for m in queued
            ]
        )
        assert delivered.last_applied_seq == 3

        report = c.sync()
        assert (report.duplicates, report.applied, report.conflicts) == (3, 0, 0)
        assert c.queue() == []
        (rejected,) = c.rejected()
        assert (rejected.client_seq, rejected.reason) == (2, "UNKNOWN_COLLECTION")
        (conflict,) = c.conflicts(refresh=False)
        assert (conflict.kind, conflict.record_id) == ("CREATE_CREATE", "t")
        assert client_view(c, "tasks") == server_view(sync_env, "tasks")


def test_a_server_that_lost_acknowledged_mutations_is_reported_not_papered_over(
    tmp_path: Path, sync_env: SyncEnv
) -> None:
    db = tmp_path / "c.db"
    with open_client(db, sync_env.address) as c:
        c.put("tasks", "a", {"title": "a"})
        c.sync()
    config = make_config(f"sqlite:///{tmp_path / 'other.db'}")
    with running_sync(config) as empty, open_client(db, empty.address) as c:
        c.put("tasks", "b", {"title": "b"})
        with pytest.raises(SyncError, match="lost mutations"):
            c.sync()
        assert [m.record_id for m in c.queue()] == ["b"]


# -- conflicts -----------------------------------------------------------------------


@pytest.mark.parametrize("choice", ["keep_theirs", "take_yours", "values"])
@pytest.mark.parametrize("first", ["a", "b"])
def test_two_offline_clients_converge_in_either_order_and_after_resolving(
    tmp_path: Path, sync_env: SyncEnv, first: str, choice: str
) -> None:
    raised: dict[str, list[Conflict]] = {"a": [], "b": []}
    a = open_client(tmp_path / "a.db", sync_env.address, sub="ann", on_conflict=raised["a"].append)
    b = open_client(tmp_path / "b.db", sync_env.address, sub="bob", on_conflict=raised["b"].append)
    edits: dict[str, dict[str, FieldValue]] = {
        "a": {"title": "Plan A", "status": "doing", "estimate": 5},
        "b": {"title": "Plan B", "status": "done", "assignee": "bob"},
    }
    second = "b" if first == "a" else "a"
    one, two = (a, b) if first == "a" else (b, a)
    theirs = {k: edits[first][k] for k in ("title", "status")}
    yours = {k: edits[second][k] for k in ("title", "status")}
    with a, b:
        a.put("tasks", "t", {"title": "Plan", "status": "todo", "estimate": 1, "assignee": "ann"})
        a.put("tasks", "u", {"title": "Other", "estimate": 1})
        a.sync()
        b.sync()
        # Offline: t's title and status to different values on each side, and a
        # different field each; u only different fields.
        a.patch("tasks", "t", edits["a"])
        b.patch("tasks", "t", edits["b"])
        a.patch("tasks", "u", {"estimate": 2})
        b.patch("tasks", "u", {"title": "Other B"})

        r1 = one.sync()
        r2 = two.sync()
        one.sync()
        assert (r1.applied, r1.conflicts) == (2, 0)
        assert (r2.merged, r2.conflicts) == (1, 1)
        server = server_view(sync_env, "tasks")
        assert client_view(a, "tasks") == client_view(b, "tasks") == server
        t = server["t"][2]
        assert {k: t[k] for k in theirs} == theirs  # the first to arrive is kept
        assert (t["estimate"], t["assignee"]) == (5, "bob")  # both sides' other fields
        assert server["u"][2] == {"title": "Other B", "estimate": 2}

        (conflict,) = two.conflicts()
        assert raised[second] == [conflict] and raised[first] == []
        assert (conflict.kind, conflict.record_id, conflict.base_version) == ("FIELDS", "t", 1)
        assert {f.field: (f.base, f.yours, f.theirs) for f in conflict.fields} == {
            name: ({"title": "Plan", "status": "todo"}[name], yours[name], theirs[name])
            for name in ("title", "status")
        }
        assert [c.conflict_id for c in one.conflicts()] == [conflict.conflict_id]  # tenant-wide

        expected: dict[str, FieldValue]
        if choice == "keep_theirs":
            two.resolve(conflict.conflict_id, keep_theirs=True)
            expected = dict(theirs)
        elif choice == "take_yours":
            two.resolve(conflict.conflict_id, take_yours=True)
            expected = dict(yours)
        else:
            expected = {"title": "Plan AB", "status": "doing"}
            two.resolve(conflict.conflict_id, values=expected)
        (queued,) = two.conflicts(refresh=False)
        assert queued.answer_queued
        shown = two.get("tasks", "t")
        assert shown is not None and {k: shown.fields[k] for k in expected} == expected
        two.sync()
        one.sync()

        server = server_view(sync_env, "tasks")
        assert client_view(a, "tasks") == client_view(b, "tasks") == server
        assert {k: server["t"][2][k] for k in expected} == expected
        assert a.conflicts() == [] and b.conflicts() == []
        assert sync_env.client(sub="inspector").conflicts() == []


@pytest.mark.parametrize(
    ("kind", "choice", "stays_deleted"),
    [
        ("DELETE_UPDATE", "keep_theirs", False),
        ("DELETE_UPDATE", "take_yours", True),
        ("UPDATE_DELETE", "keep_theirs", True),
        ("UPDATE_DELETE", "take_yours", False),
    ],
)
def test_delete_conflicts_are_answered_with_the_right_operation(
    tmp_path: Path, sync_env: SyncEnv, kind: str, choice: str, stays_deleted: bool
) -> None:
    me = open_client(tmp_path / "me.db", sync_env.address, sub="me")
    other = open_client(tmp_path / "other.db", sync_env.address, sub="other")
    with me, other:
        other.put("tasks", "t", {"title": "Start"})
        other.sync()
        me.sync()
        if kind == "DELETE_UPDATE":
            me.delete("tasks", "t")
            other.patch("tasks", "t", {"title": "Edited"})
        else:
            me.patch("tasks", "t", {"title": "Mine"})
            other.delete("tasks", "t")
        other.sync()
        assert me.sync().conflicts == 1
        (conflict,) = me.conflicts()
        assert conflict.kind == kind
        me.resolve(conflict.conflict_id, **{choice: True})  # type: ignore[arg-type]
        shown = me.get("tasks", "t")
        assert shown is not None and shown.deleted == stays_deleted
        me.sync()
        other.sync()
        server = server_view(sync_env, "tasks")
        assert server["t"][1] == stays_deleted
        assert client_view(me, "tasks") == client_view(other, "tasks") == server
        assert me.conflicts() == []


def test_a_conflict_is_answered_offline_and_the_answer_delivered_later(
    tmp_path: Path, sync_env: SyncEnv
) -> None:
    desk = open_client(tmp_path / "desk.db", sync_env.address, sub="desk")
    db = tmp_path / "rep.db"
    with desk, open_client(db, sync_env.address, sub="rep") as rep:
        desk.put("accounts", "acc", {"name": "Initech", "status": "prospect"})
        desk.sync()
        rep.sync()
        desk.patch("accounts", "acc", {"status": "open"})
        desk.sync()
        rep.patch("accounts", "acc", {"status": "closed", "amount": 50000.0})
        rep.sync()
        (conflict,) = rep.conflicts(refresh=False)
    offline = f"127.0.0.1:{free_port()}"
    with open_client(db, offline, sub="rep", max_retries=0) as rep:
        rep.resolve(conflict.conflict_id, take_yours=True)
        assert rep.conflicts(refresh=False)[0].answer_queued
        with pytest.raises(SyncUnavailable):
            rep.resolve("never-seen-here", keep_theirs=True)  # only the server could know it
    with open_client(db, sync_env.address, sub="rep") as rep:
        assert rep.sync().applied == 1
        assert rep.conflicts() == []
        acc = rep.get("accounts", "acc")
        assert acc is not None and (acc.fields["status"], acc.fields["amount"]) == (
            "closed",
            50000.0,
        )


def test_resolve_of_an_unknown_conflict_asks_the_server_then_refuses(
    tmp_path: Path, sync_env: SyncEnv
) -> None:
    with open_client(tmp_path / "c.db", sync_env.address) as c:
        with pytest.raises(ConflictNotFound):
            c.resolve("no-such-conflict", keep_theirs=True)
        with pytest.raises(ValueError, match="exactly one"):
            c.resolve("x", keep_theirs=True, take_yours=True)
        assert c.queue() == []


# -- volume ------------------------------------------------------------------------


def test_ten_thousand_queued_mutations_go_in_one_sync(tmp_path: Path, sync_env: SyncEnv) -> None:
    with open_client(tmp_path / "c.db", sync_env.address, timeout=120) as c:
        started = time.perf_counter()
        with c.transaction():
            for i in range(10_000):
                rid = f"t{i % 1000}"
                if i < 1000:
                    c.put("tasks", rid, {"title": rid, "estimate": i})
                else:
                    c.patch("tasks", rid, {"estimate": i, "notes": f"visit {i // 1000}"})
        queued = time.perf_counter() - started
        assert len(c.queue()) == 10_000
        started = time.perf_counter()
        report = c.sync()
        took = time.perf_counter() - started
        print(f"\n10,000 mutations: queued in {queued:.2f}s, one sync() in {took:.2f}s")
        assert (report.applied, report.pending, report.pulled) == (10_000, 0, 1000)
        server = server_view(sync_env, "tasks")
        assert client_view(c, "tasks") == server
        assert server["t999"] == (
            10,
            False,
            {"title": "t999", "estimate": 9999, "notes": "visit 9"},
        )
