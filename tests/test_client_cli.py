"""`fieldsync-client` (SPEC §10) end to end: `main([...])` in process against the real sync
service, and the installed entry point as a real subprocess."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fieldsync_client import Json, Timestamp
from fieldsync_client.cli import main, parse_value
from tests.support import SyncEnv, token
from tests.test_client_support import free_port, open_client, server_view

ENTRY_POINT = Path(sys.executable).with_name("fieldsync-client")


class Cli:
    """Runs `main(argv)` in this process with a given database, server and token."""

    def __init__(
        self, capsys: pytest.CaptureFixture[str], db: Path, server: str, tok: str | None
    ) -> None:
        self._capsys = capsys
        self._base = ["--db", str(db), "--server", server]
        if tok is not None:
            self._base += ["--token", tok]

    def run(self, *argv: str) -> tuple[int, str, str]:
        self._capsys.readouterr()
        status = main([*self._base, *argv])
        out, err = self._capsys.readouterr()
        return status, out, err

    def ok(self, *argv: str) -> str:
        status, out, err = self.run(*argv)
        assert status == 0, err
        assert err == ""
        return out

    def json_lines(self, *argv: str) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.ok(*argv).splitlines()]

    def one(self, *argv: str) -> dict[str, Any]:
        (obj,) = self.json_lines(*argv)
        return obj


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], tmp_path: Path, sync_env: SyncEnv) -> Cli:
    return Cli(capsys, tmp_path / "alice.db", sync_env.address, token(sub="alice"))


def test_values_read_as_json_where_they_parse_else_as_strings() -> None:
    assert parse_value("50000") == 50000
    assert parse_value("2.5") == 2.5
    assert parse_value("true") is True
    assert parse_value("null") is None
    assert parse_value('"42"') == "42"
    assert parse_value("hello world") == "hello world"
    assert parse_value("") == ""
    assert parse_value('["a", "b"]') == Json('["a", "b"]')


def test_write_offline_read_back_then_sync(cli: Cli, sync_env: SyncEnv) -> None:
    assert cli.ok("put", "accounts", "acc1", "name=Initech", "amount=50000", "vip=true") == ""
    assert cli.ok("patch", "accounts", "acc1", "status=negotiating", "notes=null") == ""
    assert cli.ok("put", "tasks", "t1", "title=Call back", 'tags=["urgent"]') == ""
    assert cli.ok("delete", "tasks", "t1") == ""

    acc = cli.one("get", "accounts", "acc1")
    assert acc == {
        "record_id": "acc1",
        "version": 0,
        "deleted": False,
        "fields": {"name": "Initech", "amount": 50000, "vip": True, "status": "negotiating"},
        "pending": 2,
    }
    queue = cli.json_lines("queue")
    assert [(q["client_seq"], q["op"], q["record_id"]) for q in queue] == [
        (1, "PUT", "acc1"),
        (2, "PATCH", "acc1"),
        (3, "PUT", "t1"),
        (4, "DELETE", "t1"),
    ]
    assert queue[2]["fields"] == {"title": "Call back", "tags": '["urgent"]'}
    assert all(q["state"] == "pending" and q["error"] is None for q in queue)

    report = cli.one("sync")
    assert report == {
        "applied": 4,
        "merged": 0,
        "conflicts": 0,
        "rejected": 0,
        "duplicates": 0,
        # `vip` is no field of accounts (UNKNOWN_FIELD), the int 50000 went into a float
        # field (TYPE_COERCED): applied, with a warning each.
        "warnings": 2,
        "pulled": 2,
        "pending": 0,
    }
    assert cli.ok("queue") == ""
    acc = cli.one("get", "accounts", "acc1")
    # The server's answer replaced the guess: `vip` is no field of accounts (ignored,
    # with a warning) and amount is a float there.
    assert (acc["version"], acc["pending"]) == (2, 0)
    assert acc["fields"] == {"name": "Initech", "amount": 50000.0, "status": "negotiating"}
    assert server_view(sync_env, "accounts")["acc1"][2] == {
        "name": "Initech",
        "amount": 50000.0,
        "status": "negotiating",
    }
    assert cli.json_lines("list", "tasks") == []
    (t1,) = cli.json_lines("list", "tasks", "--include-deleted")
    assert (t1["record_id"], t1["deleted"], t1["version"]) == ("t1", True, 2)


def test_get_of_an_unknown_record_fails_with_a_message(cli: Cli) -> None:
    status, out, err = cli.run("get", "tasks", "nope")
    assert (status, out) == (1, "")
    assert "no record tasks/nope" in err


def test_list_prints_one_json_object_a_line(cli: Cli) -> None:
    for i in (3, 1, 2):
        cli.ok("put", "tasks", f"t{i}", f"title=task {i}", f"estimate={i}")
    rows = cli.json_lines("list", "tasks")
    assert [(r["record_id"], r["fields"]["estimate"], r["pending"]) for r in rows] == [
        ("t1", 1, 1),
        ("t2", 2, 1),
        ("t3", 3, 1),
    ]
    assert set(rows[0]) == {"record_id", "version", "deleted", "fields", "pending"}


def test_sync_fails_clearly_and_keeps_the_queue_when_the_server_is_unreachable(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    address = f"127.0.0.1:{free_port()}"
    cli = Cli(capsys, tmp_path / "c.db", address, token())
    for i in range(50):
        cli.ok("patch", "tasks", f"t{i % 5}", f"estimate={i}")
    status, out, err = cli.run("sync")
    assert status == 3 and out == ""
    assert "unreachable" in err and address in err and "queue is kept" in err
    assert len(cli.json_lines("queue")) == 50


def test_sync_refused_token_or_no_token_exits_non_zero_and_keeps_the_queue(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, sync_env: SyncEnv, monkeypatch: Any
) -> None:
    monkeypatch.delenv("FIELDSYNC_TOKEN", raising=False)
    db = tmp_path / "c.db"
    Cli(capsys, db, sync_env.address, None).ok("put", "tasks", "t", "title=x")
    status, _, err = Cli(capsys, db, sync_env.address, "forged.jwt.token").run("sync")
    assert status == 4 and "refused the token" in err and "INVALID_TOKEN" in err
    status, _, err = Cli(capsys, db, sync_env.address, None).run("sync")
    assert status == 4 and "FIELDSYNC_TOKEN" in err
    assert len(Cli(capsys, db, sync_env.address, None).json_lines("queue")) == 1


def test_a_rejected_write_shows_in_the_queue_with_its_reason(cli: Cli) -> None:
    cli.ok("put", "no_such_collection", "x", "a=1")
    cli.ok("put", "tasks", "t", "title=fine")
    report = cli.one("sync")
    assert (report["applied"], report["rejected"], report["pending"]) == (1, 1, 0)
    (bad,) = cli.json_lines("queue")
    assert (bad["state"], bad["reason"]) == ("rejected", "UNKNOWN_COLLECTION")
    assert "no_such_collection" in bad["error"]


def test_conflicts_and_resolve_through_the_command_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, sync_env: SyncEnv
) -> None:
    desk = Cli(capsys, tmp_path / "desk.db", sync_env.address, token(sub="desk"))
    rep = Cli(capsys, tmp_path / "rep.db", sync_env.address, token(sub="rep"))
    desk.ok("put", "accounts", "acc", "name=Initech", "status=prospect")
    desk.one("sync")
    rep.one("sync")
    desk.ok("patch", "accounts", "acc", "status=open", "notes=desk")
    rep.ok("patch", "accounts", "acc", "status=closed", "amount=50000")
    desk.one("sync")
    assert rep.one("sync")["conflicts"] == 1

    (conflict,) = rep.json_lines("conflicts")
    assert (conflict["collection"], conflict["record_id"], conflict["kind"]) == (
        "accounts",
        "acc",
        "FIELDS",
    )
    assert conflict["fields"] == {
        "status": {"base": "prospect", "yours": "closed", "theirs": "open"}
    }
    assert rep.json_lines("conflicts", "--local") == [conflict]
    cid = conflict["conflict_id"]

    status, _, err = rep.run("resolve", cid, "--keep-theirs", "--take-yours")
    assert status == 2 and "exactly one" in err
    assert rep.ok("resolve", cid, "status=negotiating") == ""
    assert rep.one("get", "accounts", "acc")["fields"]["status"] == "negotiating"
    assert rep.json_lines("conflicts", "--local")[0]["answer_queued"] is True
    assert rep.one("sync")["applied"] == 1
    desk.one("sync")
    assert rep.ok("conflicts") == "" and desk.ok("conflicts") == ""
    for side in (desk, rep):
        acc = side.one("get", "accounts", "acc")
        assert acc["fields"] == {
            "name": "Initech",
            "status": "negotiating",
            "notes": "desk",
            "amount": 50000.0,
        }
    status, _, err = rep.run("resolve", "no-such-conflict", "--keep-theirs")
    assert status == 1 and "no open conflict" in err


def test_settings_come_from_the_environment_then_the_defaults(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, sync_env: SyncEnv, monkeypatch: Any
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FIELDSYNC_CLIENT_DB", raising=False)
    monkeypatch.delenv("FIELDSYNC_SERVER", raising=False)
    monkeypatch.delenv("FIELDSYNC_TOKEN", raising=False)
    assert main(["put", "tasks", "t", "title=default db"]) == 0
    assert (tmp_path / "fieldsync-client.db").exists()

    monkeypatch.setenv("FIELDSYNC_CLIENT_DB", str(tmp_path / "env.db"))
    monkeypatch.setenv("FIELDSYNC_SERVER", sync_env.address)
    monkeypatch.setenv("FIELDSYNC_TOKEN", token())
    assert main(["put", "tasks", "e", "title=from env"]) == 0
    capsys.readouterr()
    assert main(["sync"]) == 0
    assert json.loads(capsys.readouterr().out)["applied"] == 1
    assert "e" in server_view(sync_env, "tasks")
    # Flags win over the environment, before or after the command.
    assert main(["get", "tasks", "t", "--db", str(tmp_path / "fieldsync-client.db")]) == 0
    assert json.loads(capsys.readouterr().out)["fields"] == {"title": "default db"}


def test_the_installed_command_runs_end_to_end(tmp_path: Path, sync_env: SyncEnv) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FIELDSYNC_")}
    env |= {
        "FIELDSYNC_CLIENT_DB": str(tmp_path / "c.db"),
        "FIELDSYNC_SERVER": sync_env.address,
        "FIELDSYNC_TOKEN": token(),
    }

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(ENTRY_POINT), *argv], env=env, capture_output=True, text=True, timeout=60
        )

    assert run("put", "tasks", "t", "title=from a shell", "estimate=2").returncode == 0
    synced = run("sync")
    assert synced.returncode == 0, synced.stderr
    assert synced.stderr == ""  # not a terminal: no progress bar
    assert json.loads(synced.stdout)["applied"] == 1
    got = run("get", "tasks", "t")
    assert json.loads(got.stdout) == {
        "record_id": "t",
        "version": 1,
        "deleted": False,
        "fields": {"title": "from a shell", "estimate": 2},
        "pending": 0,
    }
    usage = run("frobnicate")
    assert usage.returncode == 2 and "invalid choice" in usage.stderr


def test_a_long_sync_shows_a_progress_bar_on_a_terminal(tmp_path: Path, sync_env: SyncEnv) -> None:
    db = tmp_path / "c.db"
    with open_client(db, sync_env.address) as c, c.transaction():
        for i in range(1200):
            c.patch("tasks", f"t{i % 100}", {"estimate": i, "seen_at": Timestamp(i)})
    env = {k: v for k, v in os.environ.items() if not k.startswith("FIELDSYNC_")}
    controller, terminal = pty.openpty()
    try:
        child = subprocess.Popen(
            [str(ENTRY_POINT), "--db", str(db), "--server", sync_env.address, "sync"],
            env=env | {"FIELDSYNC_TOKEN": token()},
            stdout=subprocess.PIPE,
            stderr=terminal,
            text=True,
        )
        os.close(terminal)
        out, _ = child.communicate(timeout=120)
        shown = b""
        while select.select([controller], [], [], 0)[0]:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # the terminal closed with the child
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(controller)
    assert child.returncode == 0
    assert json.loads(out)["applied"] == 1200
    assert b"1200/1200" in shown and b"[####" in shown
