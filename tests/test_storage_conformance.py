"""The storage conformance suite: every engine behind `Storage` must pass all of it.

Each test runs once on a SQLite file and once on a fresh PostgreSQL database
(tests/pg.py; skipped without FIELDSYNC_TEST_PG_URL), and talks to the
database only through the `Storage` / `WriteTx` interface, except where the
schema itself is the subject (`SqlStorage.migrate`, and a comparison of the
migrated tables with `tables.metadata`). What is checked is the contract the
applier and the feed rely on: exact value round-trips, tenant isolation in
every read, feed order, history windows, paging, atomic rollback, and writers
that wait for each other instead of failing.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.operations import Operations
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

from fieldsync.db import normalize_url
from fieldsync.values import FieldValue, Json, Timestamp
from sync_service.rules.merge import Change
from sync_service.storage import SqlStorage, Storage
from sync_service.storage.base import (
    BatchWrite,
    ClientRow,
    ConflictResolution,
    FeedRecord,
    HistoryRow,
    OutboxEvent,
    StoredConflict,
    StoredFieldConflict,
    StoredRecord,
    StoredResult,
    WriteConflict,
    WriteTx,
)
from sync_service.storage.sql import MIGRATIONS
from sync_service.storage.tables import metadata
from tests import pg

# Bound here rather than imported by name, so pytest finds the fixture in this
# module even before conftest imports it (and ruff sees no shadowed import).
storage_url = pg.storage_url

T1, T2 = "tenant-one", "tenant-two"
NOW = 1_700_000_000_000_000_000

# Every kind of field value, with the edges an encoding tends to lose.
ALL_KINDS: dict[str, FieldValue] = {
    "null": None,
    "true": True,
    "false": False,
    "zero": 0,
    "int_max": 2**63 - 1,
    "int_min": -(2**63),
    "int_past_double": 2**53 + 1,  # lost if a JSON layer goes through a double
    "float": 0.1,
    "float_whole": 3.0,  # must stay a float, not become the int 3
    "neg_zero": -0.0,
    "float_max": sys.float_info.max,
    "subnormal": 5e-324,
    "nan": math.nan,
    "inf": math.inf,
    "neg_inf": -math.inf,
    "empty": "",
    "unicode": "Grüße, 東京 — 🚀 and a family 👩\u200d👩\u200d👧",
    "nul": "a\x00b",  # PostgreSQL text refuses a raw NUL
    "tag_lookalike": '{"$b": "AAAA"}',  # a string, not a tagged value
    "bytes_empty": b"",
    "bytes": bytes(range(256)),
    "json": Json('{"b": [1, 2.50, "ü"], "a": null}'),  # kept as written, not re-serialized
    "ts_epoch": Timestamp(0),
    "ts_before_epoch": Timestamp(-1),
    "ts_max": Timestamp(2**63 - 1),
    "ts_nanos": Timestamp(1_700_000_000_123_456_789),
    "ключ 🔑": "a non-ASCII field name",
}


# -- fixtures and builders -------------------------------------------------------


@pytest.fixture
def storage(storage_url: str) -> Iterator[Storage]:
    st = SqlStorage(storage_url, sqlite_synchronous="NORMAL")
    try:
        st.migrate()
        yield st
    finally:
        st.close()


def rec(
    tenant: str,
    collection: str,
    record_id: str,
    *,
    version: int = 1,
    fields: dict[str, FieldValue] | None = None,
    deleted: bool = False,
    exists: bool = False,
    updated_by: str = "alice",
) -> StoredRecord:
    fields = {"title": f"{record_id} v{version}"} if fields is None else fields
    return StoredRecord(
        tenant_id=tenant,
        collection=collection,
        record_id=record_id,
        version=version,
        deleted=deleted,
        fields=dict(fields),
        field_versions={name: version for name in fields},
        history_floor=0,
        updated_at=NOW + version,
        updated_by=updated_by,
        exists=exists,
    )


def hist(
    tenant: str, collection: str, record_id: str, version: int, old: dict[str, FieldValue]
) -> HistoryRow:
    return HistoryRow(
        tenant, collection, record_id, version, "client-1", f"m-{record_id}-{version}", old, NOW
    )


def conflict(
    conflict_id: str,
    *,
    tenant: str = T1,
    collection: str = "tasks",
    record_id: str = "r1",
    created_at: int = NOW,
    resolved: bool = False,
    fields: list[StoredFieldConflict] | None = None,
) -> StoredConflict:
    return StoredConflict(
        conflict_id=conflict_id,
        tenant_id=tenant,
        collection=collection,
        record_id=record_id,
        kind=1,
        base_version=1,
        server_version=2,
        fields=[StoredFieldConflict("title", "base", "yours", "theirs")]
        if fields is None
        else fields,
        mutation_id=f"m-{conflict_id}",
        client_id="client-1",
        created_by="alice",
        created_at=created_at,
        resolved=resolved,
        resolved_at=created_at + 1 if resolved else None,
        resolved_by="bob" if resolved else None,
        resolution="keep_server" if resolved else None,
    )


def commit(storage: Storage, batch: BatchWrite) -> None:
    with storage.write_transaction() as tx:
        tx.write(batch)


def identical(a: FieldValue, b: FieldValue) -> bool:
    """Same type and same value, NaN equal to NaN and -0.0 unequal to 0.0."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    return a == b


def assert_fields_identical(got: dict[str, FieldValue], want: dict[str, FieldValue]) -> None:
    assert got.keys() == want.keys()
    wrong = {k: (got[k], want[k]) for k in want if not identical(got[k], want[k])}
    assert not wrong, f"changed by the round-trip (got, sent): {wrong}"


def assert_record(got: StoredRecord, want: StoredRecord) -> None:
    """The same record as written; its key is the storage's to give (and never 0)."""
    assert_fields_identical(got.fields, want.fields)
    assert got.key > 0
    assert dataclasses.replace(got, fields={}, key=0) == dataclasses.replace(
        want, fields={}, exists=True, key=0
    )


def assert_fed(got: FeedRecord, want: StoredRecord) -> None:
    """The record as the feed carries it: its latest state as written."""
    assert_fields_identical(got.fields, want.fields)
    assert got.feed_seq > 0
    assert (got.collection, got.record_id, got.version, got.deleted) == (
        want.collection,
        want.record_id,
        want.version,
        want.deleted,
    )
    assert (got.updated_at, got.updated_by) == (want.updated_at, want.updated_by)


def ids(page: Sequence[FeedRecord]) -> list[str]:
    return [r.record_id for r in page]


# -- schema ----------------------------------------------------------------------


def assert_schema_is_current(url: str) -> None:
    """The database is at the newest migration and its tables are exactly `tables.metadata`."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    head = ScriptDirectory.from_config(cfg).get_current_head()
    engine = create_engine(normalize_url(url), poolclass=NullPool)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(
                conn, opts={"compare_type": True, "compare_server_default": True}
            )
            assert ctx.get_current_revision() == head
            assert compare_metadata(ctx, metadata) == []
    finally:
        engine.dispose()


def test_migrate_is_idempotent_and_matches_the_metadata(storage: Storage, storage_url: str) -> None:
    assert isinstance(storage, SqlStorage)
    storage.migrate()  # a second time on the same storage
    again = SqlStorage(storage_url)
    try:
        again.migrate()  # and by another instance, as at a restart
    finally:
        again.close()
    assert_schema_is_current(storage_url)


def test_a_migration_that_fails_part_way_leaves_nothing_behind(
    storage_url: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash in the middle of a migration must not strand a half-made schema
    that every later start then fails on ("table records already exists")."""
    real = Operations.create_table
    calls = itertools.count(1)

    def create_table_then_crash(self: Operations, *args: Any, **kwargs: Any) -> Any:
        if next(calls) == 3:
            raise RuntimeError("crash mid-migration")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Operations, "create_table", create_table_then_crash)
    st = SqlStorage(storage_url)
    try:
        with pytest.raises(RuntimeError, match="crash mid-migration"):
            st.migrate()
        monkeypatch.undo()
        st.migrate()
    finally:
        st.close()
    assert_schema_is_current(storage_url)


_MIGRATE_CHILD = """
import sys
from sync_service.storage import SqlStorage
st = SqlStorage(sys.argv[1])
print("ready", flush=True)
sys.stdin.readline()
try:
    st.migrate()
finally:
    st.close()
"""


def test_service_instances_starting_together_all_migrate(
    storage_url: str, request: pytest.FixtureRequest
) -> None:
    """Processes, not threads: Alembic keeps its migration context in module
    globals, so in-process concurrent migrations are not a supported case."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _MIGRATE_CHILD, storage_url],
            cwd=Path(__file__).resolve().parents[1],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        for p in procs:
            assert p.stdout is not None
            if p.stdout.readline() != "ready\n":
                pytest.fail(f"a migrating process did not start: {p.communicate()[1]}")
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        failures = []
        for p in procs:
            _, err = p.communicate(timeout=60)
            if p.returncode:
                # The error itself, not just SQLAlchemy's closing "background" line.
                lines = err.strip().splitlines()
                failures.append([ln for ln in lines if "Error" in ln][-3:] or lines[-3:])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert not failures, failures
    assert_schema_is_current(storage_url)


# -- records ---------------------------------------------------------------------


def test_every_value_kind_round_trips_exactly(storage: Storage) -> None:
    first = rec(T1, "tasks", "r1", fields=ALL_KINDS)
    first.version = 2**63 - 1
    first.history_floor = 2**62
    first.updated_at = 2**63 - 1
    first.updated_by = "ünïcødé 🚀 user"
    first.field_versions = {name: 2**63 - 1 - i for i, name in enumerate(ALL_KINDS)}
    commit(storage, BatchWrite(records=[first]))

    (got,) = storage.get_records(T1, "tasks", ["r1"])
    assert_record(got, first)
    (pulled,) = storage.pull(T1, 0, [], 10)
    assert_fed(pulled, first)
    with storage.write_transaction() as tx:
        assert_record(tx.load_records(T1, "tasks", ["r1"])["r1"], first)

    # An update replaces the whole state: no field of the old one survives.
    second = rec(T1, "tasks", "r1", fields=dict(reversed(list(ALL_KINDS.items()))), exists=True)
    second.fields.pop("nan")
    second.fields["new"] = Timestamp(-(2**63))
    second.field_versions = {"new": 7}
    second.version = 7
    second.deleted = True
    commit(storage, BatchWrite(records=[second]))
    (got,) = storage.get_records(T1, "tasks", ["r1"])
    assert_record(got, second)


def test_history_and_conflicts_round_trip_every_value_kind(storage: Storage) -> None:
    flipped: dict[str, FieldValue] = {k: v for k, v in reversed(list(ALL_KINDS.items()))}
    fields = [
        StoredFieldConflict(name, value, flipped[name], value) for name, value in ALL_KINDS.items()
    ]
    commit(
        storage,
        BatchWrite(
            records=[rec(T1, "tasks", "r1")],
            history=[hist(T1, "tasks", "r1", 1, ALL_KINDS)],
            conflicts=[conflict("c1", fields=fields)],
        ),
    )
    with storage.write_transaction() as tx:
        (change,) = tx.load_changes(T1, "tasks", {"r1": 0})["r1"]
        assert_fields_identical(dict(change.old), ALL_KINDS)
        loaded = tx.load_conflicts(T1, ["c1"])["c1"]
    got = storage.get_conflict(T1, "c1")
    assert got is not None
    for stored in (got, loaded):
        assert [f.field for f in stored.fields] == list(ALL_KINDS)
        for g, w in zip(stored.fields, fields, strict=True):
            assert identical(g.base, w.base), g.field
            assert identical(g.yours, w.yours), g.field
            assert identical(g.theirs, w.theirs), g.field


def test_get_records_returns_the_asked_ids_in_order_each_once(storage: Storage) -> None:
    commit(storage, BatchWrite(records=[rec(T1, "tasks", r) for r in ("a", "b", "c")]))
    commit(storage, BatchWrite(records=[rec(T1, "notes", "d")]))
    got = storage.get_records(T1, "tasks", ["c", "missing", "a", "c", "d"])
    assert [r.record_id for r in got] == ["c", "a"]
    assert all(r.exists for r in got)
    assert storage.get_records(T1, "tasks", []) == []
    with storage.write_transaction() as tx:
        assert tx.load_records(T1, "tasks", []) == {}
        assert set(tx.load_records(T1, "tasks", ["a", "d", "zz"])) == {"a"}


# -- tenant isolation ------------------------------------------------------------


def test_every_read_is_confined_to_its_tenant(storage: Storage) -> None:
    for tenant in (T1, T2):
        commit(
            storage,
            BatchWrite(
                records=[rec(tenant, "tasks", "shared", fields={"owner": tenant})],
                history=[hist(tenant, "tasks", "shared", 1, {"owner": f"before {tenant}"})],
                conflicts=[conflict(f"c-{tenant}", tenant=tenant, record_id="shared")],
            ),
        )
    commit(storage, BatchWrite(records=[rec(T1, "tasks", "only-one")]))

    for tenant, other in ((T1, T2), (T2, T1)):
        (got,) = storage.get_records(tenant, "tasks", ["shared"])
        assert got.tenant_id == tenant and got.fields == {"owner": tenant}

        pulled = storage.pull(tenant, 0, [], 100)
        assert ids(pulled) == (["shared", "only-one"] if tenant == T1 else ["shared"])
        shared = [r for r in pulled if r.record_id == "shared"]
        assert len(shared) == 1 and shared[0].fields == {"owner": tenant}

        page = storage.list_conflicts(
            tenant,
            collection=None,
            record_id=None,
            include_resolved=True,
            limit=10,
            after=None,
        )
        assert [c.conflict_id for c in page.conflicts] == [f"c-{tenant}"]
        assert storage.get_conflict(tenant, f"c-{tenant}") is not None
        assert storage.get_conflict(tenant, f"c-{other}") is None

        with storage.write_transaction() as tx:
            loaded = tx.load_records(tenant, "tasks", ["shared", "only-one"])
            assert loaded["shared"].fields == {"owner": tenant}
            assert ("only-one" in loaded) == (tenant == T1)
            (change,) = tx.load_changes(tenant, "tasks", {"shared": 0})["shared"]
            assert change.old == {"owner": f"before {tenant}"}
            assert set(tx.load_conflicts(tenant, [f"c-{T1}", f"c-{T2}"])) == {f"c-{tenant}"}

    assert storage.get_records(T2, "tasks", ["only-one"]) == []


# -- the feed --------------------------------------------------------------------


def test_pull_follows_feed_order_with_each_record_once_at_its_latest(
    storage: Storage,
) -> None:
    commit(storage, BatchWrite(records=[rec(T1, "tasks", "a"), rec(T1, "notes", "b")]))
    commit(storage, BatchWrite(records=[rec(T1, "tasks", "c")]))
    first = storage.pull(T1, 0, [], 100)
    assert ids(first) == ["a", "b", "c"]
    positions = [r.feed_seq for r in first]
    assert positions == sorted(set(positions)) and positions[0] > 0
    head = storage.feed_head(T1)
    assert head == positions[-1]
    assert storage.pull(T1, head, [], 100) == []

    # A record that changes again moves to the end of the feed, once.
    commit(storage, BatchWrite(records=[rec(T1, "tasks", "a", version=2, exists=True)]))
    again = storage.pull(T1, 0, [], 100)
    assert ids(again) == ["b", "c", "a"]
    a = again[-1]
    assert a.feed_seq > head and a.version == 2 and a.fields == {"title": "a v2"}
    assert ids(storage.pull(T1, head, [], 100)) == ["a"]

    # Deletes are in the feed as tombstones.
    head = storage.feed_head(T1)
    tomb = rec(T1, "notes", "b", version=2, fields={}, deleted=True, exists=True)
    commit(storage, BatchWrite(records=[tomb]))
    (got,) = storage.pull(T1, head, [], 100)
    assert_fed(got, tomb)
    assert ids(storage.pull(T1, 0, [], 100)) == ["c", "a", "b"]

    assert ids(storage.pull(T1, 0, ["tasks"], 100)) == ["c", "a"]
    assert ids(storage.pull(T1, 0, ["notes"], 100)) == ["b"]
    assert ids(storage.pull(T1, 0, ["notes", "tasks"], 100)) == ["c", "a", "b"]
    assert storage.pull(T1, 0, ["nothing"], 100) == []

    assert ids(storage.pull(T1, 0, [], 2)) == ["c", "a"]
    seen: list[str] = []
    cursor = 0
    while page := storage.pull(T1, cursor, [], 1):
        assert len(page) == 1
        seen += ids(page)
        cursor = page[-1].feed_seq
    assert seen == ["c", "a", "b"]
    assert cursor == storage.feed_head(T1)


def test_a_batch_takes_feed_positions_in_its_order(storage: Storage) -> None:
    order = ["m", "z", "a", "k"]
    commit(storage, BatchWrite(records=[rec(T1, "tasks", r) for r in order]))
    assert ids(storage.pull(T1, 0, [], 100)) == order


def test_feed_head_is_per_tenant(storage: Storage) -> None:
    assert storage.feed_head(T1) == 0
    commit(storage, BatchWrite(records=[rec(T1, "tasks", "a")]))
    h1 = storage.feed_head(T1)
    assert h1 > 0 and storage.feed_head(T2) == 0
    commit(storage, BatchWrite(records=[rec(T2, "tasks", "a"), rec(T2, "tasks", "b")]))
    assert storage.feed_head(T1) == h1
    assert storage.feed_head(T2) > h1
    assert storage.feed_head(T2) == storage.pull(T2, 0, [], 100)[-1][0]


# -- history and results ---------------------------------------------------------


def test_load_changes_returns_each_records_history_above_its_own_since(
    storage: Storage,
) -> None:
    rows = [hist(T1, "tasks", "r1", v, {"n": v, "at": Timestamp(v)}) for v in range(1, 6)]
    rows += [hist(T1, "tasks", "r2", v, {"n": -v}) for v in range(1, 4)]
    rows += [hist(T1, "notes", "r1", 9, {"n": 9}), hist(T2, "tasks", "r1", 9, {"n": 9})]
    rows.reverse()  # stored out of order: the order must come from the read
    stored = [rec(T1, "tasks", "r1"), rec(T1, "tasks", "r2"), rec(T1, "notes", "r1")]
    commit(storage, BatchWrite(records=[*stored, rec(T2, "tasks", "r1")], history=rows))

    with storage.write_transaction() as tx:
        got = tx.load_changes(T1, "tasks", {"r1": 2, "r2": 0, "r3": 0, "never": 99})
        assert tx.load_changes(T1, "tasks", {}) == {}
        assert tx.load_changes(T1, "tasks", {"r1": 5, "r2": 3}) == {"r1": [], "r2": []}

    assert got == {
        "r1": [Change(v, "client-1", f"m-r1-{v}", {"n": v, "at": Timestamp(v)}) for v in (3, 4, 5)],
        "r2": [Change(v, "client-1", f"m-r2-{v}", {"n": -v}) for v in (1, 2, 3)],
        "r3": [],
        "never": [],
    }


def test_history_of_a_record_that_is_not_stored_is_refused_and_nothing_is_written(
    storage: Storage,
) -> None:
    commit(storage, BatchWrite(records=[rec(T1, "tasks", "r1")]))
    head = storage.feed_head(T1)
    batch = BatchWrite(
        records=[rec(T1, "tasks", "r2")],
        history=[hist(T1, "tasks", "r1", 1, {"n": 1}), hist(T2, "tasks", "r1", 1, {"n": 2})],
    )
    with pytest.raises(ValueError, match="no stored record"):
        commit(storage, batch)
    assert storage.feed_head(T1) == head
    assert storage.get_records(T1, "tasks", ["r2"]) == []
    with storage.write_transaction() as tx:
        assert tx.load_changes(T1, "tasks", {"r1": 0}) == {"r1": []}


def test_load_results_returns_only_the_asked_seqs(storage: Storage) -> None:
    payload: dict[str, Any] = {"status": "APPLIED", "note": "naïve ☃", "nested": {"v": [1, 2]}}
    results = [StoredResult("c1", s, T1, f"m{s}", {**payload, "seq": s}) for s in range(1, 11)]
    results.append(StoredResult("c2", 5, T2, "other", {"status": "REJECTED"}))
    commit(storage, BatchWrite(results=results))

    with storage.write_transaction() as tx:
        got = tx.load_results("c1", [9, 2, 5, 42])
        assert tx.load_results("c1", []) == {}
        assert tx.load_results("nobody", [1, 2]) == {}
        assert tx.load_results("c2", [5])[5].payload == {"status": "REJECTED"}
    assert sorted(got) == [2, 5, 9]
    for seq, r in got.items():
        assert r == StoredResult("c1", seq, T1, f"m{seq}", {**payload, "seq": seq})


# -- conflicts -------------------------------------------------------------------


def test_conflicts_page_in_created_order_with_ids_breaking_ties(storage: Storage) -> None:
    created = {"c5": 30, "c1": 10, "c4": 20, "c2": 20, "c3": 20, "c6": 40}
    commit(
        storage,
        BatchWrite(
            conflicts=[
                conflict(cid, created_at=at, record_id="r2" if cid == "c4" else "r1")
                for cid, at in created.items()
            ]
            + [conflict("c0", resolved=True, created_at=5)]
        ),
    )

    def walk(limit: int, **filters: Any) -> list[list[str]]:
        args: dict[str, Any] = {"collection": None, "record_id": None, "include_resolved": False}
        args.update(filters)
        pages: list[list[str]] = []
        after: tuple[int, str] | None = None
        while True:
            page = storage.list_conflicts(T1, limit=limit, after=after, **args)
            pages.append([c.conflict_id for c in page.conflicts])
            if page.next_after is None:
                return pages
            last = page.conflicts[-1]
            assert page.next_after == (last.created_at, last.conflict_id)
            after = page.next_after

    assert walk(2) == [["c1", "c2"], ["c3", "c4"], ["c5", "c6"]]
    assert walk(4) == [["c1", "c2", "c3", "c4"], ["c5", "c6"]]
    assert walk(6) == [["c1", "c2", "c3", "c4", "c5", "c6"]]
    assert walk(3, include_resolved=True) == [["c0", "c1", "c2"], ["c3", "c4", "c5"], ["c6"]]
    assert walk(10, collection="tasks", record_id="r2") == [["c4"]]
    assert walk(10, collection="tasks", record_id="r1") == [["c1", "c2", "c3", "c5", "c6"]]
    assert walk(10, collection="notes") == [[]]

    # A cursor in the middle of a tie continues right after it.
    page = storage.list_conflicts(
        T1, collection=None, record_id=None, include_resolved=False, limit=10, after=(20, "c2")
    )
    assert [c.conflict_id for c in page.conflicts] == ["c3", "c4", "c5", "c6"]


def test_a_resolution_is_stored_and_hides_the_conflict(storage: Storage) -> None:
    open_one = conflict("c1")
    commit(storage, BatchWrite(conflicts=[open_one, conflict("c2", created_at=NOW + 1)]))
    assert storage.get_conflict(T1, "c1") == open_one

    commit(
        storage,
        BatchWrite(resolutions=[ConflictResolution(T2, "c1", NOW + 4, "eve", "m-evil")]),
    )
    assert storage.get_conflict(T1, "c1") == open_one  # another tenant's answer touches nothing
    commit(
        storage,
        BatchWrite(resolutions=[ConflictResolution(T1, "c1", NOW + 5, "bob", "m-answer")]),
    )
    resolved = storage.get_conflict(T1, "c1")
    assert resolved == dataclasses.replace(
        open_one, resolved=True, resolved_at=NOW + 5, resolved_by="bob", resolution="m-answer"
    )
    with storage.write_transaction() as tx:
        assert tx.load_conflicts(T1, ["c1"]) == {"c1": resolved}

    def listed(include_resolved: bool) -> list[str]:
        page = storage.list_conflicts(
            T1,
            collection=None,
            record_id=None,
            include_resolved=include_resolved,
            limit=10,
            after=None,
        )
        return [c.conflict_id for c in page.conflicts]

    assert listed(False) == ["c2"]
    assert listed(True) == ["c1", "c2"]


# -- clients and the outbox ------------------------------------------------------


def test_a_client_row_is_inserted_then_its_last_seq_updated(storage: Storage) -> None:
    assert storage.get_client("c1") is None
    commit(storage, BatchWrite(client=ClientRow("c1", T1, "alice", last_seq=3)))
    assert storage.get_client("c1") == ClientRow("c1", T1, "alice", 3, exists=True)

    with storage.write_transaction() as tx:
        row = tx.get_client("c1")
        assert row == ClientRow("c1", T1, "alice", 3, exists=True)
        assert tx.get_client("c2") is None
        tx.write(BatchWrite(client=dataclasses.replace(row, last_seq=2**63 - 1)))
    assert storage.get_client("c1") == ClientRow("c1", T1, "alice", 2**63 - 1, exists=True)


def test_outbox_depth_counts_events_and_finds_the_oldest(storage: Storage) -> None:
    assert storage.outbox_depth() == (0, None)
    events = [
        OutboxEvent(f"e{at}", tenant, {"kind": "LWW_OVERWRITE", "details": "🚀"}, NOW + at)
        for tenant, at in ((T1, 300), (T2, 100), (T1, 200))
    ]
    commit(storage, BatchWrite(events=events[:1]))
    assert storage.outbox_depth() == (1, NOW + 300)
    commit(storage, BatchWrite(events=events[1:]))
    assert storage.outbox_depth() == (3, NOW + 100)


def test_outbox_fetch_claims_rows_for_its_relay(storage: Storage, storage_url: str) -> None:
    """Relays of several instances share the outbox: a fetch claims what it returns."""
    ids = [f"e{i}" for i in range(6)]
    commit(storage, BatchWrite(events=[OutboxEvent(e, T1, {"n": e}, NOW) for e in ids]))
    other = SqlStorage(storage_url)
    try:
        fetched = [e.event_id for e in storage.outbox_fetch(4, 10)]
        assert fetched == ids[:4]
        assert [e.event_id for e in other.outbox_fetch(10, 10)] == ids[4:]  # the rest only
        assert [e.event_id for e in storage.outbox_fetch(10, 10)] == ids[:4]  # its own again
        storage.outbox_delivered(ids[:2])
        storage.outbox_refused(ids[2:4])  # counted, and free for any relay to retry
        assert [e.event_id for e in other.outbox_fetch(10, 10)] == ids[2:]
        assert storage.outbox_depth() == (4, NOW)
    finally:
        other.close()


# -- transactions ----------------------------------------------------------------


def test_a_failed_write_transaction_leaves_nothing_behind(storage: Storage) -> None:
    commit(storage, BatchWrite(records=[rec(T1, "tasks", "old")]))
    before = storage.pull(T1, 0, [], 100)
    head = storage.feed_head(T1)

    batch = BatchWrite(
        client=ClientRow("c1", T1, "alice", last_seq=1),
        records=[
            rec(T1, "tasks", "new"),
            rec(T1, "tasks", "old", version=2, exists=True, fields={"title": "changed"}),
        ],
        history=[hist(T1, "tasks", "old", 2, {"title": "old v1"})],
        conflicts=[conflict("c1")],
        results=[StoredResult("c1", 1, T1, "m1", {"status": "APPLIED"})],
        events=[OutboxEvent("e1", T1, {"kind": "CONFLICT_SURFACED"}, NOW)],
    )
    with pytest.raises(RuntimeError, match="boom"), storage.write_transaction() as tx:
        tx.write(batch)
        raise RuntimeError("boom")

    assert storage.pull(T1, 0, [], 100) == before
    assert storage.feed_head(T1) == head
    assert storage.get_records(T1, "tasks", ["new"]) == []
    assert storage.get_client("c1") is None
    assert storage.get_conflict(T1, "c1") is None
    assert storage.outbox_depth() == (0, None)
    with storage.write_transaction() as tx:
        assert tx.load_results("c1", [1]) == {}
        assert tx.load_changes(T1, "tasks", {"old": 0}) == {"old": []}
        # The same batch commits fine afterwards: nothing half-written is in the way.
        tx.write(batch)
    assert ids(storage.pull(T1, head, [], 100)) == ["new", "old"]


def test_readers_see_committed_state_while_a_writer_holds_the_lock(storage: Storage) -> None:
    commit(storage, BatchWrite(records=[rec(T1, "tasks", "a")]))
    with storage.write_transaction() as tx:
        tx.write(BatchWrite(records=[rec(T1, "tasks", "a", version=2, exists=True)]))
        (seen,) = storage.get_records(T1, "tasks", ["a"])
        assert seen.version == 1
        assert ids(storage.pull(T1, 0, [], 100)) == ["a"]
    (seen,) = storage.get_records(T1, "tasks", ["a"])
    assert seen.version == 2


def test_exclusive_writers_wait_for_each_other(storage: Storage) -> None:
    """Each writer reads, dawdles, then writes: with the lock taken up front none fails
    and none loses another's update. On SQLite this is BEGIN IMMEDIATE plus a busy
    timeout; on PostgreSQL the tenant's feed row, locked by an exclusive transaction."""
    commit(storage, BatchWrite(records=[rec(T1, "tasks", "counter", version=1)]))
    writers = 3
    start = threading.Barrier(writers)
    spans: list[tuple[float, float]] = []
    errors: list[BaseException] = []

    def bump(n: int) -> None:
        try:
            start.wait()
            with storage.write_transaction(exclusive=True, tenants=[T1]) as tx:
                began = time.monotonic()
                current = tx.load_records(T1, "tasks", ["counter"])["counter"]
                time.sleep(0.1)  # hold the lock long enough for the others to queue
                nxt = rec(T1, "tasks", "counter", version=current.version + 1, exists=True)
                tx.write(BatchWrite(records=[nxt, rec(T1, "tasks", f"w{n}")]))
                spans.append((began, time.monotonic()))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=bump, args=(n,)) for n in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors
    assert len(spans) == writers

    (counter,) = storage.get_records(T1, "tasks", ["counter"])
    assert counter.version == 1 + writers  # no lost update
    spans.sort()
    for (_, end), (began, _) in itertools.pairwise(spans):
        assert began >= end, "two write transactions overlapped"
    pulled = storage.pull(T1, 0, [], 100)
    positions = [r.feed_seq for r in pulled]
    assert len(set(positions)) == len(positions) == 1 + writers


# -- the record cache --------------------------------------------------------------


def test_a_write_by_another_instance_is_never_hidden_by_the_cache(storage_url: str) -> None:
    """Two instances on one database: what one has cached, the other changes. The
    first's next transaction sees the change, or (optimistic, on PostgreSQL) may
    read its stale copy but then cannot write on it; an exclusive one sees it."""
    a = SqlStorage(storage_url, sqlite_synchronous="NORMAL")
    b = SqlStorage(storage_url, sqlite_synchronous="NORMAL")
    try:
        a.migrate()
        commit(a, BatchWrite(records=[rec(T1, "tasks", "r1"), rec(T1, "tasks", "r2")]))  # cached
        with b.write_transaction() as tx:
            current = tx.load_records(T1, "tasks", ["r1"])["r1"]
            tx.write(BatchWrite(records=[dataclasses.replace(current, version=2)]))
        try:
            with a.write_transaction() as tx:
                seen = tx.load_records(T1, "tasks", ["r1", "r2"])
                stale = seen["r1"].version == 1
                tx.write(BatchWrite(records=[dataclasses.replace(seen["r1"], version=3)]))
        except WriteConflict:
            assert a.dialect == "postgresql" and stale
        else:
            assert not stale  # it saw version 2, and wrote on it
        with a.write_transaction(exclusive=True, tenants=[T1]) as tx:
            seen = tx.load_records(T1, "tasks", ["r1", "r2"])
            assert (seen["r1"].version, seen["r2"].version) == (3 if not stale else 2, 1)
            tx.write(BatchWrite(records=[dataclasses.replace(seen["r2"], version=2)]))
        with b.write_transaction() as tx:  # and the other way round
            assert tx.load_records(T1, "tasks", ["r2"])["r2"].version == 2
    finally:
        a.close()
        b.close()


def test_a_rolled_back_write_is_never_served_from_the_cache(storage: Storage) -> None:
    commit(storage, BatchWrite(records=[rec(T1, "tasks", "r1")]))
    with storage.write_transaction() as tx:
        current = tx.load_records(T1, "tasks", ["r1"])["r1"]
    with pytest.raises(RuntimeError, match="boom"), storage.write_transaction() as tx:
        tx.write(BatchWrite(records=[dataclasses.replace(current, version=2), rec(T1, "x", "n")]))
        raise RuntimeError("boom")
    with storage.write_transaction() as tx:
        assert tx.load_records(T1, "tasks", ["r1"])["r1"].version == 1
        assert tx.load_records(T1, "x", ["n"]) == {}


def test_a_write_not_yet_committed_is_never_read_from_the_cache(
    storage: Storage, storage_url: str
) -> None:
    """Optimistic transactions read while another writes (PostgreSQL). One that read
    a row before its commit would find that row's history missing (not visible
    yet): a change by another client would look like none, and its version check
    would pass once the writer commits. So it sees the record as committed, with
    the history that goes with it. (SQLite: one writer at a time, nothing to race.)"""
    if not storage_url.startswith("postgresql"):
        pytest.skip("SQLite writers hold the database's lock from their first read")
    commit(storage, BatchWrite(records=[rec(T1, "tasks", "r1")]))
    with storage.write_transaction() as writer:
        current = writer.load_records(T1, "tasks", ["r1"])["r1"]
        mine = dataclasses.replace(current, version=2, fields={"title": "theirs"})
        writer.write(
            BatchWrite(records=[mine], history=[hist(T1, "tasks", "r1", 2, {"title": "r1 v1"})])
        )
        # The writer holds the feed lock and has not committed: another reads.
        with storage.write_transaction() as reader:
            seen = reader.load_records(T1, "tasks", ["r1"])["r1"]
            changes = reader.load_changes(T1, "tasks", {"r1": 1})["r1"]
            assert (seen.version, seen.fields, changes) == (1, {"title": "r1 v1"}, [])
    with storage.write_transaction() as reader:  # committed now: the row and its history
        seen = reader.load_records(T1, "tasks", ["r1"])["r1"]
        (change,) = reader.load_changes(T1, "tasks", {"r1": 1})["r1"]
        assert (seen.version, seen.fields, change.version) == (2, {"title": "theirs"}, 2)


@pytest.mark.parametrize("exclusive", [False, True], ids=["optimistic", "exclusive"])
def test_a_second_write_in_one_transaction_reads_the_first_and_passes_its_checks(
    storage: Storage, exclusive: bool
) -> None:
    """Several clients' batches can share a transaction, each written in turn. The
    second reads the rows the first wrote (not the cache's older copy), and is
    checked against what it read itself: the first's reads are out of date by
    then (it changed them) and must not fail it. Its rewrite of a record the
    first also rewrote is the one that stays."""
    commit(storage, BatchWrite(records=[rec(T1, "tasks", "r1"), rec(T1, "tasks", "r2")]))
    with storage.write_transaction(exclusive=exclusive, tenants=[T1]) as tx:
        r1 = tx.load_records(T1, "tasks", ["r1"])["r1"]  # cached or read: version 1
        tx.write(
            BatchWrite(
                records=[dataclasses.replace(r1, version=2, fields={"title": "first"})],
                history=[hist(T1, "tasks", "r1", 2, {"title": "r1 v1"})],
            )
        )
        again = tx.load_records(T1, "tasks", ["r1", "r2"])
        assert (again["r1"].version, again["r1"].fields) == (2, {"title": "first"})
        tx.write(
            BatchWrite(
                records=[
                    dataclasses.replace(again["r1"], version=3, fields={"title": "second"}),
                    dataclasses.replace(again["r2"], version=2, fields={"title": "r2 second"}),
                ],
                history=[
                    hist(T1, "tasks", "r1", 3, {"title": "first"}),
                    hist(T1, "tasks", "r2", 2, {"title": "r2 v1"}),
                ],
            )
        )
    with storage.write_transaction() as tx:
        changes = tx.load_changes(T1, "tasks", {"r1": 1})["r1"]
    stored = storage.get_records(T1, "tasks", ["r1", "r2"])  # the database, not the cache
    assert [(r.version, r.fields["title"]) for r in stored] == [(3, "second"), (2, "r2 second")]
    assert [c.version for c in changes] == [2, 3]
    assert [(r.record_id, r.version) for r in storage.pull(T1, 0, [], 10)] == [
        ("r1", 3),
        ("r2", 2),
    ]


def test_a_rolled_back_write_is_not_served_when_another_writer_reaches_the_same_head(
    storage_url: str,
) -> None:
    """The head a rolled-back write would have made can be reached by another
    instance's commit; the cache must not take that for its own."""
    a = SqlStorage(storage_url, sqlite_synchronous="NORMAL")
    b = SqlStorage(storage_url, sqlite_synchronous="NORMAL")
    try:
        a.migrate()
        commit(a, BatchWrite(records=[rec(T1, "tasks", "r1")]))
        with a.write_transaction() as tx:
            current = tx.load_records(T1, "tasks", ["r1"])["r1"]
        with pytest.raises(RuntimeError, match="boom"), a.write_transaction() as tx:
            tx.write(BatchWrite(records=[dataclasses.replace(current, version=9)]))
            raise RuntimeError("boom")
        commit(b, BatchWrite(records=[rec(T1, "tasks", "other")]))  # one record, as a's was
        with a.write_transaction() as tx:
            assert tx.load_records(T1, "tasks", ["r1"])["r1"].version == 1
    finally:
        a.close()
        b.close()


def test_without_a_cache_and_with_a_tiny_one_every_read_is_the_databases(
    storage_url: str,
) -> None:
    for size in (0, 2):
        st = SqlStorage(storage_url, sqlite_synchronous="NORMAL", record_cache=size)
        try:
            st.migrate()
            rids = [f"s{size}-{i}" for i in range(5)]
            commit(st, BatchWrite(records=[rec(T1, "tasks", r) for r in rids]))
            for version in (2, 3):
                with st.write_transaction() as tx:
                    got = tx.load_records(T1, "tasks", rids)
                    assert {r.version for r in got.values()} == {version - 1}
                    tx.write(
                        BatchWrite(
                            records=[dataclasses.replace(r, version=version) for r in got.values()]
                        )
                    )
            assert {r.version for r in st.get_records(T1, "tasks", rids)} == {3}
        finally:
            st.close()


def test_a_write_on_what_another_writer_changed_meanwhile_is_refused_or_waited_for(
    storage: Storage,
) -> None:
    """Two read-modify-writes at once, on a client row, a record, a record found
    absent and a conflict: on SQLite the second waits (every transaction is
    exclusive); on PostgreSQL the optimistic one that read first is refused
    with WriteConflict and leaves nothing behind. Never a lost update."""
    assert isinstance(storage, SqlStorage)
    commit(storage, BatchWrite(records=[rec(T1, "tasks", "counter")], conflicts=[conflict("c1")]))
    commit(storage, BatchWrite(client=ClientRow("c9", T1, "alice", last_seq=1)))
    cases: list[tuple[Callable[[WriteTx], object], BatchWrite]] = [
        (
            lambda tx: tx.load_records(T1, "tasks", ["counter"]),
            BatchWrite(records=[rec(T1, "tasks", "counter", version=2, exists=True)]),
        ),
        (
            lambda tx: tx.get_client("c9"),
            BatchWrite(client=ClientRow("c9", T1, "alice", last_seq=2, exists=True)),
        ),
        (
            lambda tx: tx.load_records(T1, "tasks", ["later"]),
            BatchWrite(records=[rec(T1, "tasks", "later")]),
        ),
        (
            lambda tx: tx.load_conflicts(T1, ["c1"]),
            BatchWrite(resolutions=[ConflictResolution(T1, "c1", NOW, "bob", "m-b")]),
        ),
    ]
    for n, (read, change) in enumerate(cases):
        refused = _read_then_write_while_another_commits(storage, read, change, f"e{n}")
        assert refused == (storage.dialect == "postgresql"), n
        assert storage.outbox_depth()[0] == (0 if refused else 1), n
        storage.outbox_delivered([f"e{n}"])
    assert storage.get_records(T1, "tasks", ["counter"])[0].version == 2
    assert storage.get_client("c9") == ClientRow("c9", T1, "alice", 2, exists=True)


def test_a_new_client_another_writer_applied_meanwhile_is_refused_before_its_rows(
    storage: Storage,
) -> None:
    """Two instances apply a new client's first mutation at once (PostgreSQL): the one
    that read the client as absent is refused with WriteConflict (it decides again
    and answers DUPLICATE), before its result row meets the other's at the same
    sequence. (SQLite: one writer at a time, nothing to race.)"""
    assert isinstance(storage, SqlStorage)
    if storage.dialect != "postgresql":
        pytest.skip("SQLite writers hold the database's lock from their first read")
    first = BatchWrite(
        client=ClientRow("c20", T1, "alice", last_seq=1),
        results=[StoredResult("c20", 1, T1, "m-1", {"s": 1})],
    )
    with storage.write_transaction() as late:
        assert late.get_client("c20") is None
        commit(storage, first)  # the other instance, meanwhile
        with pytest.raises(WriteConflict):
            late.write(
                BatchWrite(
                    client=ClientRow("c20", T1, "alice", last_seq=1),
                    results=[StoredResult("c20", 1, T1, "m-1", {"s": 1})],
                )
            )
    assert storage.get_client("c20") == ClientRow("c20", T1, "alice", 1, exists=True)


def _read_then_write_while_another_commits(
    storage: Storage, read: Callable[[WriteTx], object], change: BatchWrite, event_id: str
) -> bool:
    """Whether the reading transaction's write was refused with WriteConflict."""
    has_read = threading.Event()
    refused: list[WriteConflict] = []

    def reader() -> None:
        try:
            with storage.write_transaction() as tx:
                read(tx)
                has_read.set()
                time.sleep(0.3)  # the other writer commits meanwhile (or waits)
                tx.write(BatchWrite(events=[OutboxEvent(event_id, T1, {}, NOW)]))
        except WriteConflict as err:
            refused.append(err)
        finally:
            has_read.set()

    t = threading.Thread(target=reader)
    t.start()
    assert has_read.wait(10)
    commit(storage, change)
    t.join(10)
    return bool(refused)


# -- size ------------------------------------------------------------------------


def test_large_in_lists(storage: Storage) -> None:
    n = 2_000
    rids = [f"r{i:05d}" for i in range(n)]
    commit(
        storage,
        BatchWrite(
            records=[rec(T1, "tasks", r) for r in rids],
            history=[hist(T1, "tasks", r, 1, {"title": None}) for r in rids],
            conflicts=[conflict(f"c-{r}", record_id=r) for r in rids],
            results=[StoredResult("c1", s, T1, f"m{s}", {"s": s}) for s in range(1, n + 1)],
        ),
    )
    asked = [*reversed(rids), "missing"]
    assert [r.record_id for r in storage.get_records(T1, "tasks", asked)] == asked[:-1]
    assert len(storage.pull(T1, 0, [], n + 10)) == n
    with storage.write_transaction() as tx:
        assert set(tx.load_records(T1, "tasks", asked)) == set(rids)
        changes = tx.load_changes(T1, "tasks", dict.fromkeys(asked, 0))
        assert changes["missing"] == [] and all(len(changes[r]) == 1 for r in rids)
        assert len(tx.load_conflicts(T1, [f"c-{r}" for r in asked])) == n
        assert sorted(tx.load_results("c1", list(range(n, 0, -1)))) == list(range(1, n + 1))
