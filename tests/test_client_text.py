"""The SDK's text edits (SPEC §3 `text_edits`): edit_text, diff_text, the queue, the local
view, `fieldsync-client edit`; against the real sync service."""

from __future__ import annotations

import itertools
import json
import sqlite3
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fieldsync.textops import apply_ops
from fieldsync_client import Delete, FieldSyncClient, Insert, Retain, diff_text
from fieldsync_client.cli import main
from tests.support import SyncEnv, plain, token
from tests.test_client_support import open_client


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="ab\r\n🎉é\u0301", max_size=30), st.text(alphabet="ab\r\n🎉é", max_size=30))
def test_diff_text_turns_one_text_into_the_other(old: str, new: str) -> None:
    ops = diff_text(old, new)
    assert (apply_ops(old, ops) if ops else old) == new


def test_edits_are_queued_as_operations_shown_locally_and_merged_by_the_server(
    tmp_path: Path, sync_env: SyncEnv
) -> None:
    ann = open_client(tmp_path / "ann.db", sync_env.address, sub="ann")
    bob = open_client(tmp_path / "bob.db", sync_env.address, sub="bob")
    with ann, bob:
        ann.put("pages", "p", {"title": "t", "body": "The quick fox"})
        ann.sync()
        bob.sync()
        q = ann.edit_text("pages", "p", "body", diff_text("The quick fox", "The quick red fox"))
        assert q.text_edits == {"body": [Retain(10), Insert("red "), Retain(3)]}
        assert q.fields == {}
        ann.edit_text("pages", "p", "body", [Retain(17), Insert("!")])  # on the text as shown
        assert ann.get("pages", "p").fields["body"] == "The quick red fox!"  # type: ignore[union-attr]
        bob.edit_text("pages", "p", "body", [Insert(">> "), Retain(13)])
        bob.sync()
        report = ann.sync()
        assert (report.conflicts, report.rejected) == (0, 0)
        bob.sync()
        for c in (ann, bob):
            rec = c.get("pages", "p")
            assert rec is not None and rec.fields["body"] == ">> The quick red fox!"
        with pytest.raises(ValueError, match="past the end"):
            ann.edit_text("pages", "p", "body", [Retain(99)])
        assert ann.queue() == []
    # Every queued edit was delivered.
    db = sqlite3.connect(tmp_path / "ann.db")
    assert db.execute("SELECT count(*) FROM queue").fetchone() == (0,)
    db.close()


def test_fieldsync_client_edit_inserts_and_deletes_offline_then_syncs(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, sync_env: SyncEnv
) -> None:
    base = ["--db", str(tmp_path / "c.db"), "--server", sync_env.address, "--token", token()]

    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        status = main([*base, *argv])
        out, err = capsys.readouterr()
        return status, out, err

    assert run("put", "pages", "p", "title=t", "body=Hello world")[0] == 0
    assert run("edit", "pages", "p", "body", "--insert", "5", ",")[0] == 0
    assert run("edit", "pages", "p", "body", "--delete", "6", "6")[0] == 0
    assert run("edit", "pages", "p", "body", "--insert", "6", " 🌍")[0] == 0
    status, out, _ = run("get", "pages", "p")
    assert json.loads(out)["fields"]["body"] == "Hello, 🌍"
    _, out, _ = run("queue")
    edits = [json.loads(line).get("text_edits") for line in out.splitlines()]
    assert edits[1] == {"body": [{"retain": 5}, {"insert": ","}, {"retain": 6}]}
    status, out, err = run("edit", "pages", "p", "body", "--delete", "3", "99")
    assert status != 0 and "code points" in err
    assert run("sync")[0] == 0
    status, out, _ = run("get", "pages", "p")
    assert json.loads(out)["fields"]["body"] == "Hello, 🌍" and json.loads(out)["pending"] == 0


def test_the_local_view_shows_queued_edits_on_the_servers_latest_text(
    tmp_path: Path, sync_env: SyncEnv
) -> None:
    """Between syncs the user sees their own edits on the last server text, even when an
    answer (here each of three batches') moved that text under the edits still queued;
    after the sync the local text is the server's."""
    ann = open_client(tmp_path / "ann.db", sync_env.address, sub="ann", batch_size=1)
    bob = open_client(tmp_path / "bob.db", sync_env.address, sub="bob")
    with ann, bob:
        ann.put("pages", "p", {"title": "t", "body": "one two three"})
        ann.sync()
        bob.sync()
        typed = ["one two three", "one and two three", "one and two three!", "ONE and two three!"]
        for old, new in itertools.pairwise(typed):
            ann.edit_text("pages", "p", "body", diff_text(old, new))
        assert _body(ann) == typed[-1]
        bob.edit_text("pages", "p", "body", [Insert(">> "), Retain(13)])
        bob.sync()
        seen: list[str] = []
        report = ann.sync(progress=lambda done, total: seen.append(_body(ann)))
        assert (report.conflicts, report.rejected) == (0, 0)
        assert len(seen) >= 3
        # After the first answer the server's text holds bob's ">> " and her first edit;
        # her other two are still queued, on the text she typed them on.
        assert seen == [">> ONE and two three!"] * len(seen)
        bob.sync()
        server = sync_env.client(sub="carl").get("p", collection="pages")
        assert server is not None
        assert _body(ann) == _body(bob) == plain(server)["body"] == ">> ONE and two three!"
        # Bob edits again; Ann types offline and pulls it in: her edit on his new text.
        bob.edit_text("pages", "p", "body", [Retain(21), Insert(" four")])
        bob.sync()
        ann.edit_text("pages", "p", "body", [Delete(3), Retain(18)])
        ann.sync()
        bob.sync()
        assert _body(ann) == _body(bob) == "ONE and two three! four"
        assert ann.queue() == []


def _body(c: FieldSyncClient) -> str:
    rec = c.get("pages", "p")
    assert rec is not None
    body = rec.fields["body"]
    assert isinstance(body, str)
    return body


def test_compact_answers_leave_the_server_state_the_server_holds(
    tmp_path: Path, sync_env: SyncEnv
) -> None:
    """The SDK asks for compact results: an APPLIED answer comes without the record's
    fields (a keystroke on a big page does not bring the page back), and the SDK stores
    the state it held with the edit applied: the server's, before any pull."""
    ann = open_client(tmp_path / "ann.db", sync_env.address, sub="ann", batch_size=1)
    with ann:
        ann.put("pages", "p", {"title": "t", "body": "a" * 50_000})
        ann.sync()
        ann.edit_text("pages", "p", "body", [Retain(10), Insert("é🎉"), Retain(49_990)])
        ann.patch("pages", "p", {"title": "t2"})
        ann.edit_text("pages", "p", "body", [Delete(3), Retain(49_999)])
        stored: list[tuple[int, dict[str, object]]] = []

        def held(done: int, total: int) -> None:
            db = sqlite3.connect(tmp_path / "ann.db")
            version, fields = db.execute(
                "SELECT version, fields FROM records WHERE record_id = 'p'"
            ).fetchone()
            db.close()
            stored.append((version, json.loads(fields)))

        ann.sync(progress=held)
        server = sync_env.client(sub="carl").get("p", collection="pages")
        assert server is not None
        assert stored[-1] == (server.version, plain(server))
        assert [v for v, _ in stored] == [2, 3, 4]
        assert stored[0][1]["body"] == "a" * 10 + "é🎉" + "a" * 49_990
