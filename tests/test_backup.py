"""docs/operations.md's SQLite backup, check and restore, run as written against a real
sync service taking writes; and an old release refusing a newer schema.

Two writers stream batches of 20 PUTs (one transaction each) while the doc's
backup command copies the database. The restored copy must be a state the
service really passed through: each writer's records are exactly its
mutations 1..S with S a whole number of batches (no torn batch), the service
restarted on it continues each client's sequence at S + 1 and answers S as
DUPLICATE, and the copy is older than the end (the writes went on during and
after the backup).
"""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import grpc  # type: ignore[import-untyped, unused-ignore]  # stubs: types-grpcio

from fieldsync.v1 import sync_pb2_grpc
from fieldsync.values import fields_from_proto
from sync_service.storage.sql import SqlStorage
from tests.proc import fast_reconnect_channel, start_sync_service
from tests.support import PUT, Client, S, SyncEnv

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "operations.md"
BATCH = 20
NO_RELAY = {"FIELDSYNC_AUDIT_RELAY": "0", "FIELDSYNC_SQLITE_SYNCHRONOUS": "NORMAL"}


def doc_block(first_line: str) -> str:
    """The ```sh block of docs/operations.md that starts with `first_line`."""
    text = DOC.read_text(encoding="utf-8")
    for m in re.finditer(r"^```sh\n(.*?)^```\n", text, re.S | re.M):
        if m.group(1).startswith(first_line):
            return m.group(1)
    raise AssertionError(f"docs/operations.md has no sh block starting {first_line!r}")


def run_doc(block: str, cwd: Path) -> str:
    done = subprocess.run(
        ["bash", "-c", f"set -euo pipefail\n{block}"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"{block}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _env(address: str, db_url: str) -> tuple[SyncEnv, grpc.Channel]:
    channel = fast_reconnect_channel(address)
    return SyncEnv(address, channel, sync_pb2_grpc.SyncServiceStub(channel), db_url), channel


class Writer(threading.Thread):
    """One client streaming batches of PUTs until told to stop."""

    def __init__(self, env: SyncEnv, name: str) -> None:
        super().__init__(daemon=True)
        self.client = Client(env, sub=name, client_id=f"{name}-{uuid.uuid4()}")
        self.name = name
        self.applied = 0
        self.stop = threading.Event()
        self.batches = threading.Semaphore(0)
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                c = self.client
                muts = [
                    c.mut(
                        f"{self.name}-{c.next_seq}", {"title": "w", "estimate": c.next_seq}, op=PUT
                    )
                    for _ in range(BATCH)
                ]
                result = c.apply(*muts)
                assert [r.status for r in result.results] == [S.MUTATION_STATUS_APPLIED] * BATCH
                self.applied = int(result.last_applied_seq)
                self.batches.release()
        except BaseException as err:  # reported by the test, not lost in the thread
            self.error = err

    def wait_batches(self, n: int) -> None:
        """Until `n` more batches are answered from now on (those answered before, say
        during a backup, do not count: their writes may be in it)."""
        while self.batches.acquire(blocking=False):
            pass
        for _ in range(n):
            assert self.batches.acquire(timeout=60), self.error


def test_an_online_backup_taken_while_writes_run_restores_to_a_consistent_store(
    tmp_path: Path,
) -> None:
    run = tmp_path / ".run"
    run.mkdir()
    (tmp_path / ".venv").symlink_to(Path(sys.executable).parent.parent)  # a checkout's layout
    url = f"sqlite:///{run / 'sync.db'}"
    proc = start_sync_service(url, tmp_path, env=NO_RELAY)
    try:
        env, channel = _env(proc.address, url)
        writers = [Writer(env, "ann"), Writer(env, "bob")]
        for w in writers:
            w.start()
        for w in writers:
            w.wait_batches(3)
        before = [w.applied for w in writers]
        run_doc(doc_block("# Back up the sync database"), tmp_path)
        for w in writers:
            w.wait_batches(3)  # the writes went on during and after the copy
            w.stop.set()
        for w in writers:
            w.join(60)
            assert w.error is None, w.error
        final = [w.applied for w in writers]
        channel.close()
    finally:
        assert proc.stop() == 0

    assert run_doc(doc_block("# Check the backup"), tmp_path).strip() == "ok"
    assert not (tmp_path / "backup" / "sync.db-wal").exists()
    run_doc(doc_block("# Restore: with the sync service stopped."), tmp_path)

    proc = start_sync_service(url, tmp_path, env=NO_RELAY)
    try:
        env, channel = _env(proc.address, url)
        for w, low, high in zip(writers, before, final, strict=True):
            reader = Client(env, sub=w.name, client_id=w.client.client_id)
            records, _ = reader.pull()
            mine = sorted(
                (int(fields_from_proto(r.fields)["estimate"]), r.record_id, r.version)  # type: ignore[arg-type]
                for r in records
                if r.record_id.startswith(f"{w.name}-")
            )
            restored = len(mine)
            # Exactly mutations 1..S, each once, and only whole batches.
            assert mine == [(i, f"{w.name}-{i}", 1) for i in range(1, restored + 1)]
            assert restored % BATCH == 0
            assert low <= restored < high
            # The restored client row agrees with the records: S is a duplicate, S + 1 new.
            reader.next_seq = restored
            assert reader.one(f"{w.name}-{restored}", {"title": "again"}, op=PUT).status == (
                S.MUTATION_STATUS_DUPLICATE
            )
            assert reader.one(f"{w.name}-after", {"title": "new"}, op=PUT).status == (
                S.MUTATION_STATUS_APPLIED
            )
        channel.close()
    finally:
        assert proc.stop() == 0
    db = sqlite3.connect(run / "sync.db")
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        db.close()


def test_an_old_release_refuses_a_database_a_newer_one_migrated(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'sync.db'}"
    storage = SqlStorage(url)  # this release's migrations, in process
    storage.migrate()
    storage.close()
    db = sqlite3.connect(tmp_path / "sync.db")
    with db:
        db.execute("UPDATE alembic_version SET version_num = '9999_from_a_newer_release'")
    db.close()
    done = subprocess.run(
        [sys.executable, "-m", "sync_service"],
        cwd=tmp_path,
        env={
            "PATH": "/usr/bin:/bin",
            "FIELDSYNC_SYNC_DB": url,
            "FIELDSYNC_JWT_SECRET": "s" * 32,
            "FIELDSYNC_AUDIT_RELAY": "0",
            "FIELDSYNC_SYNC_ADDR": "127.0.0.1:0",
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()[-1:]
    assert line.startswith(
        "fieldsync-sync: the database is at schema revision 9999_from_a_newer_release, which "
        "this release does not know"
    )
    assert "Traceback" not in done.stderr
    db = sqlite3.connect(tmp_path / "sync.db")
    try:  # untouched
        assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [
            ("9999_from_a_newer_release",)
        ]
    finally:
        db.close()
