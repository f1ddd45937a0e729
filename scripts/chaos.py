"""`make chaos`: the slow fault cases of issue 21, against real processes.

Each scenario runs a client that sends a queue of PUTs (one in ten with an
unknown field, so it raises an audit event) in batches, resending from the
server's last applied sequence whenever a call fails, while a fault is
injected into the real processes:

- kill -9 of the sync service mid-queue (SQLite), restarted;
- kill -9 of the audit service while it receives events, restarted;
- PostgreSQL losing every connection of the sync database mid-queue (its
  sessions terminated; the shared server itself is not restarted, other
  people's databases live on it);
- a full disk: the SQLite database on a small tmpfs that fills up, then grows
  (needs root for mount; skipped otherwise).

It then checks what a user would: every acknowledged write is there (lost),
none was applied twice (doubled: a record's version above 1, each record is
written once), and the audit log holds each expected event exactly once. It
prints a table and exits 1 if anything was lost or doubled.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fieldsync.v1 import audit_pb2, audit_pb2_grpc, sync_pb2, sync_pb2_grpc  # noqa: E402
from tests.pg import fresh_pg_database, pg_server_url  # noqa: E402
from tests.proc import SyncProcess, free_port, start_audit_service, start_sync_service  # noqa: E402
from tests.support import md, token  # noqa: E402

N = int(os.environ.get("CHAOS_MUTATIONS", "3000"))
BATCH = 50
S = sync_pb2.MutationStatus


@dataclass
class Outcome:
    name: str
    faults: int = 0
    acked: int = 0
    lost: int = 0
    doubled: int = 0
    events_missing: int = 0
    events_doubled: int = 0
    refusals: Counter[str] = field(default_factory=Counter)
    skipped: str = ""


class Queue:
    """One client's offline queue, sent until the server has all of it."""

    def __init__(self, n: int) -> None:
        self.client_id = str(uuid.uuid4())
        self.metadata = md(token("acme", "chaos", ["member"]))
        self.mutations = []
        for i in range(n):
            m = sync_pb2.Mutation(
                mutation_id=str(uuid.uuid4()),
                client_seq=i + 1,
                op=sync_pb2.OP_PUT,
                collection="tasks",
                record_id=f"r{i}",
            )
            m.fields["title"].string_value = f"t{i}"
            if i % 10 == 0:
                m.fields["legacy_flag"].bool_value = True
            self.mutations.append(m)
        self.acked: set[int] = set()
        self.last = 0

    def send(self, address: Callable[[], str], out: Outcome, stop: float) -> None:
        while self.last < len(self.mutations) and time.monotonic() < stop:
            try:
                with grpc.insecure_channel(address()) as channel:
                    stub = sync_pb2_grpc.SyncServiceStub(channel)
                    batch = self.mutations[self.last : self.last + BATCH]
                    res = stub.ApplyBatch(
                        sync_pb2.ApplyBatchRequest(
                            batch=sync_pb2.MutationBatch(client_id=self.client_id, mutations=batch)
                        ),
                        metadata=self.metadata,
                        timeout=10,
                    ).result
                for r in res.results:
                    if r.status in (S.MUTATION_STATUS_APPLIED, S.MUTATION_STATUS_DUPLICATE):
                        self.acked.add(r.client_seq)
                self.last = res.last_applied_seq
            except grpc.RpcError as err:
                out.refusals[err.code().name] += 1
                time.sleep(0.2)

    def check(self, address: str, out: Outcome) -> None:
        out.acked = len(self.acked)
        with grpc.insecure_channel(address) as channel:
            stub = sync_pb2_grpc.SyncServiceStub(channel)
            ids = [f"r{s - 1}" for s in sorted(self.acked)]
            found = {}
            for i in range(0, len(ids), 1000):
                resp = stub.GetRecords(
                    sync_pb2.GetRecordsRequest(collection="tasks", record_ids=ids[i : i + 1000]),
                    metadata=self.metadata,
                    timeout=30,
                )
                found.update({r.record_id: r for r in resp.records})
        for seq in self.acked:
            rec = found.get(f"r{seq - 1}")
            if rec is None or rec.fields["title"].string_value != f"t{seq - 1}":
                out.lost += 1
            elif rec.version != 1:
                out.doubled += 1

    def check_audit(self, audit_address: str, out: Outcome, timeout: float = 120) -> None:
        want = {m.mutation_id for m in self.mutations if m.client_seq % 10 == 1}
        deadline = time.monotonic() + timeout
        counts: Counter[str] = Counter()
        while time.monotonic() < deadline:
            counts = Counter(e.mutation_id for e in _audit_events(audit_address))
            if want <= set(counts):
                break
            time.sleep(1)
        out.events_missing = len(want - set(counts))
        out.events_doubled = sum(1 for n in counts.values() if n > 1)


def _audit_events(address: str) -> list[audit_pb2.AuditEvent]:
    out: list[audit_pb2.AuditEvent] = []
    page = ""
    try:
        with grpc.insecure_channel(address) as channel:
            stub = audit_pb2_grpc.AuditServiceStub(channel)
            while True:
                resp = stub.QueryEvents(
                    audit_pb2.QueryEventsRequest(page_size=1000, page_token=page),
                    metadata=md(token("acme", "ann", ["auditor"])),
                    timeout=30,
                )
                out.extend(resp.events)
                page = resp.next_page_token
                if not page:
                    return out
    except grpc.RpcError:
        return out


@contextlib.contextmanager
def _services(
    tmp: Path, db_url: str, audit_db: str | None = None
) -> Iterator[tuple[list[SyncProcess], list[SyncProcess], str]]:
    audit_addr = f"127.0.0.1:{free_port()}"
    audit = start_audit_service(
        audit_db or f"sqlite:///{tmp / 'audit.db'}", tmp, address=audit_addr
    )
    env = {"FIELDSYNC_AUDIT_ADDR": audit_addr, "FIELDSYNC_AUDIT_RELAY_MAX_BACKOFF": "1"}
    sync = start_sync_service(db_url, tmp, env=env)
    syncs, audits = [sync], [audit]
    try:
        yield syncs, audits, audit_addr
    finally:
        for p in syncs + audits:
            with contextlib.suppress(Exception):
                if p.alive():
                    p.stop()
                else:
                    p.close()


def _in_background(fn: Callable[[], None]) -> threading.Thread:
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    return t


def kill_sync(tmp: Path) -> Outcome:
    out = Outcome("kill -9 sync service")
    db = f"sqlite:///{tmp / 'sync.db'}"
    with _services(tmp, db) as (syncs, _audits, audit_addr):
        q = Queue(N)
        sender = _in_background(
            lambda: q.send(lambda: syncs[-1].address, out, time.monotonic() + 300)
        )
        for at in (N // 4, N // 2, 3 * N // 4):
            while q.last < at and sender.is_alive():
                time.sleep(0.01)
            syncs[-1].kill()
            out.faults += 1
            env = {"FIELDSYNC_AUDIT_ADDR": audit_addr, "FIELDSYNC_AUDIT_RELAY_MAX_BACKOFF": "1"}
            syncs.append(start_sync_service(db, tmp, env=env))
        sender.join()
        q.check(syncs[-1].address, out)
        q.check_audit(audit_addr, out)
    return out


def kill_audit(tmp: Path) -> Outcome:
    out = Outcome("kill -9 audit service")
    db = f"sqlite:///{tmp / 'sync.db'}"
    audit_db = f"sqlite:///{tmp / 'audit.db'}"
    with _services(tmp, db, audit_db) as (syncs, audits, audit_addr):
        q = Queue(N)
        q.send(lambda: syncs[-1].address, out, time.monotonic() + 300)
        for _ in range(3):
            time.sleep(0.5)
            audits[-1].kill()
            out.faults += 1
            audits.append(start_audit_service(audit_db, tmp, address=audit_addr))
        q.check(syncs[-1].address, out)
        q.check_audit(audit_addr, out)
    return out


def lose_postgres(tmp: Path) -> Outcome:
    out = Outcome("PostgreSQL connections lost")
    server = pg_server_url()
    if server is None:
        out.skipped = "FIELDSYNC_TEST_PG_URL not set"
        return out
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.pool import NullPool

    from fieldsync.db import normalize_url

    with fresh_pg_database(server) as url:
        name = make_url(url).database
        admin = create_engine(
            normalize_url(server), isolation_level="AUTOCOMMIT", poolclass=NullPool
        )
        try:
            with _services(tmp, url) as (syncs, _audits, audit_addr):
                q = Queue(N)
                sender = _in_background(
                    lambda: q.send(lambda: syncs[-1].address, out, time.monotonic() + 300)
                )
                for at in (N // 4, N // 2, 3 * N // 4):
                    while q.last < at and sender.is_alive():
                        time.sleep(0.01)
                    with admin.connect() as conn:
                        conn.execute(
                            text(
                                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                                " WHERE datname = :n AND pid <> pg_backend_pid()"
                            ),
                            {"n": name},
                        )
                    out.faults += 1
                sender.join()
                q.check(syncs[-1].address, out)
                q.check_audit(audit_addr, out)
        finally:
            admin.dispose()
    return out


def full_disk(tmp: Path) -> Outcome:
    out = Outcome("full disk (tmpfs)")
    if os.geteuid() != 0 or shutil.which("mount") is None:
        out.skipped = "needs root to mount a tmpfs"
        return out
    mnt = tmp / "small"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], check=False)
    if done.returncode != 0:
        out.skipped = "tmpfs cannot be mounted here"
        return out
    try:
        db = f"sqlite:///{mnt / 'sync.db'}"
        with _services(tmp, db) as (syncs, _audits, audit_addr):
            q = Queue(N)
            q.send(lambda: syncs[-1].address, out, time.monotonic() + 30)  # fills the disk
            if q.last < N:
                out.faults += 1
            subprocess.run(["mount", "-o", "remount,size=256m", str(mnt)], check=True)
            q.send(lambda: syncs[-1].address, out, time.monotonic() + 300)
            q.check(syncs[-1].address, out)
            q.check_audit(audit_addr, out)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
    return out


def main() -> int:
    results = []
    for scenario in (kill_sync, kill_audit, lose_postgres, full_disk):
        with tempfile.TemporaryDirectory(prefix="fieldsync-chaos-") as d:
            started = time.monotonic()
            out = scenario(Path(d))
            print(f"{out.name}: done in {time.monotonic() - started:.0f}s", file=sys.stderr)
            results.append(out)
    head = ("fault", "injected", "acked", "lost", "doubled", "events missing", "events twice")
    rows = [
        (
            r.name,
            str(r.faults),
            str(r.acked),
            str(r.lost),
            str(r.doubled),
            str(r.events_missing),
            str(r.events_doubled),
        )
        if not r.skipped
        else (r.name, "skipped", r.skipped, "", "", "", "")
        for r in results
    ]
    widths = [max(len(x[i]) for x in [head, *rows]) for i in range(len(head))]
    for row in [head, tuple("-" * w for w in widths), *rows]:
        print(" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    for r in results:
        if r.refusals:
            print(f"{r.name}: answers while faulted: {dict(r.refusals)}")
    bad = any(r.lost or r.doubled or r.events_missing or r.events_doubled for r in results)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
