"""The SDK's text edits (SPEC §3 `text_edits`): edit_text, diff_text, the queue, the local
view, `fieldsync-client edit`; against the real sync service."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fieldsync.textops import apply_ops
from fieldsync_client import Insert, Retain, diff_text
from fieldsync_client.cli import main
from tests.support import SyncEnv, token
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
