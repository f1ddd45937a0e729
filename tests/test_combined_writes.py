"""Several clients' writes in one transaction (Applier.apply_many).

The SQLite service applies the writes that wait for the database together,
in one transaction with one commit. Each client must get exactly what it
would have got in a transaction of its own committed in the same order:
the same statuses, versions, merged fields and conflicts, and the database
must end the same. The reference here is the same groups applied one by one
(apply_batches) on a second database, with the same clock.
"""

from __future__ import annotations

import itertools
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import grpc
import pytest

from fieldsync.auth import Principal
from fieldsync.errors import FieldSyncError, PermissionDenied
from fieldsync.v1 import sync_pb2, sync_pb2_grpc
from fieldsync.values import Timestamp
from sync_service.rules.merge import Op
from sync_service.schema_file import DEFAULT_SCHEMA_PATH, load_schema
from sync_service.server import SyncApp
from sync_service.storage.base import Ahead, BatchWrite
from sync_service.storage.sql import SqlStorage
from sync_service.storage.transactions import SqlWriteTx
from sync_service.writes.applier import Applier
from sync_service.writes.model import BatchIn, BatchOutcome, MutationIn
from tests.conftest import make_config
from tests.grpc_harness import serve_in_thread
from tests.support import PATCH, S, SyncEnv, plain

SCHEMA = load_schema(DEFAULT_SCHEMA_PATH)
ALICE = Principal("alice", "acme", frozenset({"member"}))
BOB = Principal("bob", "acme", frozenset({"member"}))
MALLORY = Principal("mallory", "acme", frozenset({"member"}))

Group = tuple[Principal, list[BatchIn]]


def m(
    seq: int, op: Op, record_id: str, fields: dict[str, Any] | None = None, base: int = 0
) -> MutationIn:
    return MutationIn(
        f"m-{record_id}-{seq}-{op.name}", seq, int(op), "tasks", record_id, fields or {}, base
    )


def batch(client_id: str, *mutations: MutationIn) -> BatchIn:
    return BatchIn(client_id, SCHEMA.version, list(mutations))


def counter_clock() -> Callable[[], int]:
    ticks = itertools.count(1_700_000_000_000_000_000, 1000)
    return lambda: next(ticks)


@contextmanager
def applier_on(url: str) -> Iterator[tuple[Applier, SqlStorage]]:
    storage = SqlStorage(url, sqlite_synchronous="NORMAL")
    try:
        storage.migrate()
        yield Applier(storage, SCHEMA, clock=counter_clock()), storage
    finally:
        storage.close()


def seed(applier: Applier) -> None:
    """Two tasks alice made from her desk (version 1 each)."""
    applier.apply_batches(
        ALICE,
        [
            batch(
                "desk",
                m(1, Op.PUT, "t1", {"title": "Fix pump", "status": "todo", "estimate": 3}),
                m(2, Op.PUT, "t2", {"title": "Check valve", "status": "todo"}),
            )
        ],
    )


# The writes that waited together: alice's phone and bob's tablet edit the same
# task from the same base (different fields, then the same field), mallory's
# device claims the id alice's phone uses, alice's phone sends a second batch,
# and a new client creates and deletes.
GROUPS: list[Group] = [
    (ALICE, [batch("phone", m(1, Op.PATCH, "t1", {"status": "doing"}, base=1))]),
    (
        BOB,
        [
            batch(
                "tablet",
                m(1, Op.PATCH, "t1", {"estimate": 5}, base=1),  # merges with alice's
                m(2, Op.PATCH, "t2", {"title": "Check valve 2"}, base=1),
            )
        ],
    ),
    (MALLORY, [batch("phone", m(1, Op.PATCH, "t1", {"title": "mine"}, base=1))]),
    (
        ALICE,
        [
            batch("phone", m(2, Op.PATCH, "t2", {"title": "Check valve 3"}, base=1)),  # conflict
            batch("phone", m(3, Op.PUT, "t3", {"title": "New"})),
        ],
    ),
    (
        BOB,
        [
            batch(
                "tablet",
                m(3, Op.DELETE, "t2", base=2),
                m(4, Op.PATCH, "t1", {"estimate": 8}, base=3),
            )
        ],
    ),
    (ALICE, [batch("phone", m(1, Op.PATCH, "t1", {"status": "done"}, base=1))]),  # a replay
]


def summary(result: list[BatchOutcome] | Exception) -> Any:
    """What a client is told, without the ids the server makes up (conflict ids)."""
    if isinstance(result, Exception):
        return (type(result).__name__, str(getattr(result, "reason", "")))
    return [
        (
            b.last_applied_seq,
            [
                (
                    o.client_seq,
                    o.status.name,
                    o.original_status.name,
                    (o.record.version, o.record.deleted, o.record.fields) if o.record else None,
                    (o.conflict.kind, [f.field for f in o.conflict.fields]) if o.conflict else None,
                    [str(w.code) for w in o.warnings],
                    str(o.error.reason) if o.error else None,
                )
                for o in b.results
            ],
        )
        for b in result
    ]


def database(storage: SqlStorage) -> Any:
    records = storage.get_records("acme", "tasks", ["t1", "t2", "t3"])
    feed = [(r.record_id, r.version) for r in storage.pull("acme", 0, [], 100)]
    found = storage.list_conflicts(
        "acme", collection=None, record_id=None, include_resolved=True, limit=100, after=None
    )
    return (
        [(r.record_id, r.version, r.deleted, r.fields, r.field_versions) for r in records],
        feed,
        sorted((c.record_id, c.kind, c.base_version, c.server_version) for c in found.conflicts),
        {cid: storage.get_client(cid) for cid in ("desk", "phone", "tablet")},
    )


def one_by_one(applier: Applier, groups: list[Group]) -> list[list[BatchOutcome] | Exception]:
    out: list[list[BatchOutcome] | Exception] = []
    for principal, batches in groups:
        try:
            out.append(applier.apply_batches(principal, batches))
        except FieldSyncError as err:
            out.append(err)
    return out


def test_writes_combined_in_one_transaction_are_answered_as_one_by_one(
    storage_url: str, tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """On both engines (the service combines on SQLite only, but the applier's
    semantics do not depend on it); the reference is a SQLite file."""
    with (
        applier_on(storage_url) as (combined, combined_db),
        applier_on(f"sqlite:///{tmp_path / 'reference.db'}") as (alone, alone_db),
    ):
        seed(combined)
        seed(alone)
        together = combined.apply_many(GROUPS)
        assert FALLBACK not in caplog.text  # one transaction did it all, not each alone
        reference = one_by_one(alone, GROUPS)
        assert [summary(r) for r in together] == [summary(r) for r in reference]
        assert database(combined_db) == database(alone_db)
    # What the story says, so the reference itself is checked too.
    statuses = [
        [o.status.name for b in r for o in b.results] if not isinstance(r, Exception) else r
        for r in together
    ]
    assert statuses[0] == ["APPLIED"]
    assert statuses[1] == ["MERGED", "APPLIED"]
    assert isinstance(statuses[2], PermissionDenied)
    assert statuses[3] == ["CONFLICT", "APPLIED"]
    assert statuses[4] == ["APPLIED", "APPLIED"]
    assert statuses[5] == ["DUPLICATE"]


FALLBACK = "applying each alone"  # the applier's warning when a combined write failed


class FailingFor(SqlStorage):
    """The real storage, whose write fails for one client's rows with `error`."""

    def __init__(self, url: str, doomed: str, error: Exception) -> None:
        super().__init__(url, sqlite_synchronous="NORMAL")
        self.doomed = doomed
        self.error = error

    def write_transaction(
        self, *, exclusive: bool = False, tenants: Sequence[str] = (), ahead: Ahead | None = None
    ) -> Any:
        inner = super().write_transaction(exclusive=exclusive, tenants=tenants, ahead=ahead)

        @contextmanager
        def wrapped() -> Iterator[SqlWriteTx]:
            with inner as tx:
                write = tx.write

                def failing(b: BatchWrite) -> None:
                    if b.client is not None and b.client.client_id == self.doomed:
                        raise self.error
                    write(b)

                tx.write = failing  # type: ignore[method-assign, assignment]
                yield tx

        return wrapped()


def test_a_group_that_fails_the_combined_write_fails_alone(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A row of bob's that the database refuses: alice's writes, in the same
    transaction, are applied again without his, and committed."""
    refused = sqlite3.IntegrityError("CHECK constraint failed (injected)")
    storage = FailingFor(f"sqlite:///{tmp_path / 'sync.db'}", "tablet", refused)
    storage.migrate()
    try:
        applier = Applier(storage, SCHEMA, clock=counter_clock())
        seed(applier)
        results = applier.apply_many(GROUPS[:2] + GROUPS[3:4])
        assert results[1] is refused  # bob's tablet: its own error
        for result in (results[0], results[2]):  # alice's phone: applied, committed
            assert not isinstance(result, Exception)
            assert all(o.status.name in ("APPLIED", "CONFLICT") for b in result for o in b.results)
        assert storage.get_client("tablet") is None  # nothing of the failed group was kept
        phone = storage.get_client("phone")
        assert phone is not None and phone.last_seq == 3
        (t1,) = storage.get_records("acme", "tasks", ["t1"])
        assert (t1.version, t1.fields["status"], t1.fields["estimate"]) == (2, "doing", 3)
        assert FALLBACK in caplog.text
    finally:
        storage.close()


def test_an_outage_fails_every_group_without_trying_each_again(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The disk fails: every client gets the error at once (each alone would meet
    it again, one after another), and nothing is committed."""
    disk = OSError(5, "disk I/O error (injected)")
    storage = FailingFor(f"sqlite:///{tmp_path / 'sync.db'}", "tablet", disk)
    storage.migrate()
    try:
        applier = Applier(storage, SCHEMA, clock=counter_clock())
        seed(applier)
        with pytest.raises(OSError, match="injected"):
            applier.apply_many(GROUPS[:2] + GROUPS[3:4])
        assert storage.get_client("phone") is None and storage.get_client("tablet") is None
        (t1,) = storage.get_records("acme", "tasks", ["t1"])
        assert t1.version == 1
        assert FALLBACK not in caplog.text
    finally:
        storage.close()


def test_one_group_alone_raises_its_error_as_before(tmp_path: Any) -> None:
    with applier_on(f"sqlite:///{tmp_path / 'sync.db'}") as (applier, _):
        seed(applier)
        applier.apply_many(GROUPS[:1])
        with pytest.raises(PermissionDenied):
            applier.apply_many([GROUPS[2]])


def test_concurrent_callers_share_transactions_and_each_gets_its_own_answers(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """16 devices call ApplyBatch at once on the SQLite service (each its own tasks,
    all of them also bumping one shared counter task with a last-write-wins field):
    writes that waited together were committed together, and every answer and
    every record is what the calls made, none lost and none applied twice."""
    config = make_config(f"sqlite:///{tmp_path / 'sync.db'}")
    app = SyncApp.from_config(config)
    devices, calls, per_call = 16, 5, 4
    try:
        with serve_in_thread(app.add_services, app.interceptors(), app.server_options()) as addr:
            channel = grpc.insecure_channel(addr)
            env = SyncEnv(addr, channel, sync_pb2_grpc.SyncServiceStub(channel), config.db_url)
            env.client(sub="desk").one("shared", {"title": "Shared"})
            start = threading.Barrier(devices)

            def device(i: int) -> list[sync_pb2.BatchResult]:
                c = env.client(sub=f"user{i}")
                start.wait()
                out = []
                for call in range(calls):
                    muts = [
                        c.mut(f"d{i}-{k}", {"title": f"{i}/{call}", "estimate": call}, base=call)
                        for k in range(per_call - 1)
                    ]
                    seen = Timestamp(1_700_000_000_000_000_000 + i * 1000 + call)
                    muts.append(c.mut("shared", {"seen_at": seen}, op=PATCH, base=1))
                    out.append(c.apply(*muts))
                return out

            with ThreadPoolExecutor(devices) as pool:
                answers = list(pool.map(device, range(devices)))
            reader = env.client(sub="reader")
            records = {r.record_id: r for r in reader.pull()[0]}
            channel.close()
        servicer = app.servicer
        assert servicer is not None
    finally:
        app.close()
    for i, results in enumerate(answers):
        assert [r.last_applied_seq for r in results] == [per_call * (n + 1) for n in range(calls)]
        for n, result in enumerate(results):
            statuses = [r.status for r in result.results]
            assert statuses[:-1] == [S.MUTATION_STATUS_APPLIED] * (per_call - 1)
            assert statuses[-1] in (
                S.MUTATION_STATUS_APPLIED,
                S.MUTATION_STATUS_MERGED,
            )  # lww: never a conflict
            for k in range(per_call - 1):
                assert result.results[k].record.version == n + 1
        for k in range(per_call - 1):
            rec = records[f"d{i}-{k}"]
            assert (rec.version, plain(rec)["title"]) == (calls, f"{i}/{calls - 1}")
    # the shared task: created once, then one version per call
    assert records["shared"].version == 1 + devices * calls
    assert servicer.writes == 1 + devices * calls  # every call (the desk's included)
    assert servicer.write_transactions < servicer.writes, "no two calls shared a transaction"
    assert FALLBACK not in caplog.text  # and those transactions committed as combined
