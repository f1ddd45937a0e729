"""The SDK asks for compact results (SyncHello.compact_results) and rebuilds what they leave out.

An APPLIED answer without warnings carries the record's version, not its
fields; the SDK rebuilds them from its last server state and the queued
mutation (fieldsync_client._compact). These tests push a queue of every kind
of write against a real service and compare the SDK's stored server state,
before any pull, with the server's records; and they show the fallback (the
record read back with GetRecords) when the SDK does not hold the state the
server applied a mutation to.
"""

from __future__ import annotations

import dataclasses
import sqlite3
from pathlib import Path

from fieldsync.textops import Insert, Retain
from fieldsync.values import Timestamp
from fieldsync_client import FieldSyncClient
from fieldsync_client._compact import rebuilt
from fieldsync_client._sync import Counters, push
from fieldsync_client._types import QueuedMutation
from fieldsync_client._view import ServerState
from tests.support import SyncEnv
from tests.test_client_support import client_view, open_client, server_view


def _push(client: FieldSyncClient) -> Counters:
    """Deliver the queue without the pull that sync() runs after it."""
    counters = Counters()
    push(client._store, client._transport, client._settings, counters)
    return counters


def _queued(op: str, fields: dict[str, object], base: int, **kw: object) -> QueuedMutation:
    return QueuedMutation(
        client_seq=1,
        mutation_id="m",
        op=op,  # type: ignore[arg-type]
        collection="tasks",
        record_id="r",
        fields=fields,  # type: ignore[arg-type]
        base_version=base,
        client_time=Timestamp(0),
        resolves_conflict_id="",
        state="pending",
        **kw,  # type: ignore[arg-type]
    )


def replace_version(state: ServerState, version: int) -> ServerState:
    return dataclasses.replace(state, version=version)


def test_rebuilt_applies_the_write_as_the_server_does() -> None:
    held = ServerState("tasks", "r", 3, False, {"title": "T", "status": "todo", "estimate": 2})
    answer = ServerState("tasks", "r", 4, False, {})
    patch = rebuilt(held, _queued("PATCH", {"status": "done", "estimate": None}, 3), answer)
    assert patch == ServerState("tasks", "r", 4, False, {"title": "T", "status": "done"})
    replaced = rebuilt(held, _queued("PUT", {"title": "New"}, 3), answer)
    assert replaced == ServerState("tasks", "r", 4, False, {"title": "New"})  # PUT clears the rest
    create_again = rebuilt(held, _queued("PUT", {"title": "New"}, 0), answer)
    assert create_again is not None and create_again.fields["status"] == "todo"  # base 0 merges
    gone = rebuilt(held, _queued("DELETE", {}, 3), ServerState("tasks", "r", 4, True, {}))
    assert gone == ServerState("tasks", "r", 4, True, dict(held.fields))
    typed = rebuilt(
        held, _queued("PATCH", {}, 3, text_edits={"title": [Retain(1), Insert("!")]}), answer
    )
    assert typed is not None and typed.fields["title"] == "T!"
    # Not the state the server applied it to: unknown here, never a guess.
    unchanged = rebuilt(held, _queued("PATCH", {"status": "todo"}, 3), replace_version(answer, 3))
    assert unchanged == held  # it changed nothing: the version stays
    later = replace_version(answer, 6)
    assert rebuilt(held, _queued("PATCH", {"status": "done"}, 3), later) is None
    bad_ops = _queued("PATCH", {}, 3, text_edits={"title": [Retain(5)]})
    assert rebuilt(held, bad_ops, answer) is None


def test_a_pushed_queue_leaves_the_same_records_as_the_server_holds(
    tmp_path: Path, sync_env: SyncEnv
) -> None:
    desk = open_client(tmp_path / "desk.db", sync_env.address, sub="desk")
    rep = open_client(tmp_path / "rep.db", sync_env.address, sub="rep")
    with desk, rep:
        desk.put("tasks", "shared", {"title": "Shared", "status": "todo", "estimate": 1})
        desk.sync()
        rep.sync()
        # Offline: creates, patches, a replace, a delete, typed text, a warning,
        # and an edit that merges with the desk's.
        rep.put("tasks", "a", {"title": "A", "status": "todo", "estimate": 3})
        rep.patch("tasks", "a", {"status": "doing"})
        rep.patch("tasks", "a", {"estimate": None})
        rep.put("tasks", "b", {"title": "B", "status": "todo"})
        rep.put("tasks", "b", {"title": "B2"})
        rep.put("tasks", "c", {"title": "C", "status": "todo"})
        rep.delete("tasks", "c")
        rep.put("tasks", "d", {"title": "D", "legacy_flag": True})  # a warning: a whole result
        rep.patch("tasks", "shared", {"estimate": 8})
        desk.patch("tasks", "shared", {"status": "done"})
        desk.sync()
        counters = _push(rep)
        assert counters.applied >= 8 and counters.merged == 1 and counters.fetched == 0
        assert counters.rebuilt == 7  # every APPLIED result without a warning
        assert client_view(rep, "tasks") == server_view(sync_env, "tasks")


def test_a_record_the_client_does_not_hold_is_read_back_from_the_server(
    tmp_path: Path, sync_env: SyncEnv
) -> None:
    rep = open_client(tmp_path / "rep.db", sync_env.address, sub="rep")
    with rep:
        rep.put("tasks", "a", {"title": "A", "status": "todo"})
        rep.sync()
        rep.patch("tasks", "a", {"status": "done"})
    # The local file lost its copy of the record (restored from an older backup, say).
    with sqlite3.connect(tmp_path / "rep.db") as db:
        db.execute("DELETE FROM records")
    rep = open_client(tmp_path / "rep.db", sync_env.address, sub="rep")
    with rep:
        counters = _push(rep)
        assert (counters.applied, counters.rebuilt, counters.fetched) == (1, 0, 1)
        assert client_view(rep, "tasks") == server_view(sync_env, "tasks")
        assert client_view(rep, "tasks")["a"][2] == {"title": "A", "status": "done"}
