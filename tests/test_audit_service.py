"""The audit service (SPEC §5, §7, §9): a real grpc.aio server, real tokens, real databases.

Every test that takes `storage_url` runs once on a SQLite file and once on a
fresh PostgreSQL database (tests/pg.py; skipped without FIELDSYNC_TEST_PG_URL).
The service is called through its stubs; the storage tests call
`SqlAuditStorage` directly. The process test runs `python -m audit_service`
and stops it with SIGTERM. Waiting is always on a real condition (initial
metadata, the next streamed event, a health answer, a process exit), never a
fixed sleep; the timeouts are safety nets only.
"""

from __future__ import annotations

import base64
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc  # type: ignore[import-untyped, unused-ignore]  # stubs: types-grpcio
import pytest
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from sqlalchemy import create_engine, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

import audit_service.commands
import audit_service.storage
from audit_service.__main__ import main as audit_main
from audit_service.config import AuditConfig
from audit_service.model import AuditEvent, EventFilter
from audit_service.server import SERVICE_NAME, AuditApp
from audit_service.storage import MIGRATIONS, SqlAuditStorage
from audit_service.tables import VERSION_TABLE, metadata
from fieldsync.audit_kinds import EventKind
from fieldsync.auth import DEFAULT_SERVICE_AUDIENCE, AuthConfig, mint_token
from fieldsync.db import normalize_url
from fieldsync.v1 import audit_pb2, audit_pb2_grpc
from fieldsync.values import FieldValue, Json, Timestamp, fields_from_proto, same, to_proto
from sync_service.storage import SqlStorage
from tests import pg
from tests.grpc_harness import serve_in_thread
from tests.proc import fast_reconnect_channel, free_port
from tests.support import SECRET, rpc_reason

# Bound here rather than imported by name, so pytest finds the fixture in this
# module even before conftest imports it (and ruff sees no shadowed import).
storage_url = pg.storage_url

K = audit_pb2.AuditEventKind
LWW = K.AUDIT_EVENT_KIND_LWW_OVERWRITE
WARN = K.AUDIT_EVENT_KIND_VALIDATION_WARNING
REJECTED = K.AUDIT_EVENT_KIND_MUTATION_REJECTED
CONFLICT = K.AUDIT_EVENT_KIND_CONFLICT_SURFACED
DUP = K.AUDIT_EVENT_KIND_DUPLICATE_TRANSITION

ACME, GLOBEX = "acme", "globex"
SEC = 1_000_000_000
T0 = 1_700_000_000 * SEC
DAY = 86_400 * SEC
CALL_TIMEOUT = 30.0  # a safety net for a wedged server, never reached when it works

Metadata = tuple[tuple[str, str], ...]


def md(
    *, tenant: str = ACME, sub: str = "someone", roles: Sequence[str] = (), aud: str = "fieldsync"
) -> Metadata:
    tok = mint_token(SECRET, sub=sub, tenant_id=tenant, roles=list(roles), audience=aud)
    return (("authorization", f"Bearer {tok}"),)


def service() -> Metadata:
    """The sync service's token: its own tenant claim says nothing about the events."""
    return md(
        tenant="fieldsync-system",
        sub="sync-service",
        roles=["fieldsync:service"],
        aud=DEFAULT_SERVICE_AUDIENCE,
    )


def auditor(tenant: str = ACME) -> Metadata:
    return md(tenant=tenant, sub=f"auditor@{tenant}", roles=["auditor"])


def ev(
    event_id: str | None = None,
    *,
    tenant: str = ACME,
    kind: int = LWW,
    at: int = T0,
    details: dict[str, FieldValue] | None = None,
    **fields: Any,
) -> audit_pb2.AuditEvent:
    e = audit_pb2.AuditEvent(
        event_id=uuid.uuid4().hex if event_id is None else event_id,
        tenant_id=tenant,
        kind=audit_pb2.AuditEventKind.ValueType(kind),
        **fields,
    )
    e.occurred_at.seconds, e.occurred_at.nanos = divmod(at, SEC)
    for k, v in (details or {}).items():
        to_proto(v, e.details[k])
    return e


def event(event_id: str, *, tenant: str = ACME, at: int = T0, **kw: Any) -> AuditEvent:
    """A domain event, for the storage tests."""
    return AuditEvent(event_id, tenant, kw.pop("kind", EventKind.LWW_OVERWRITE), at, **kw)


def violations(err: grpc.RpcError) -> dict[str, str]:
    status = rpc_status.from_call(err)
    assert status is not None
    out: dict[str, str] = {}
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            out.update({v.field: v.description for v in bad.field_violations})
    return out


def error_metadata(err: grpc.RpcError) -> dict[str, str]:
    status = rpc_status.from_call(err)
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return dict(info.metadata)
    return {}


# -- fixtures ----------------------------------------------------------------------


def make_config(db_url: str, **overrides: Any) -> AuditConfig:
    base: dict[str, Any] = {
        "db_url": db_url,
        "auth": AuthConfig(secret=SECRET),
        "sqlite_synchronous": "NORMAL",
    }
    base.update(overrides)
    return AuditConfig(**base)


@dataclass
class AuditEnv:
    address: str
    stub: audit_pb2_grpc.AuditServiceStub
    db_url: str

    def record(
        self, *events: audit_pb2.AuditEvent, metadata: Metadata | None = None
    ) -> audit_pb2.RecordEventsResponse:
        return self.stub.RecordEvents(
            audit_pb2.RecordEventsRequest(events=list(events)),
            metadata=metadata or service(),
            timeout=CALL_TIMEOUT,
        )

    def query(self, metadata: Metadata | None = None, **kw: Any) -> audit_pb2.QueryEventsResponse:
        return self.stub.QueryEvents(
            audit_pb2.QueryEventsRequest(**kw),
            metadata=metadata or auditor(),
            timeout=CALL_TIMEOUT,
        )

    def ids(self, metadata: Metadata | None = None, **kw: Any) -> list[str]:
        """Every matching event id, following the page tokens to the end."""
        out: list[str] = []
        token = ""
        while True:
            page = self.query(metadata, page_token=token, **kw)
            out.extend(e.event_id for e in page.events)
            if not page.next_page_token:
                return out
            token = page.next_page_token


@pytest.fixture
def tail_poll_seconds() -> float:
    """Longer than any test may take: a tail that receives an event recorded through
    this server proves the in-process wake-up. A test that needs the poll overrides
    it with `@pytest.mark.parametrize("tail_poll_seconds", [...])`."""
    return 3600.0


@pytest.fixture
def audit(storage_url: str, tail_poll_seconds: float) -> Iterator[AuditEnv]:
    app = AuditApp.from_config(make_config(storage_url, tail_poll_seconds=tail_poll_seconds))
    try:
        with serve_in_thread(app.add_services, app.interceptors()) as address:
            channel = grpc.insecure_channel(address)
            try:
                yield AuditEnv(address, audit_pb2_grpc.AuditServiceStub(channel), storage_url)
            finally:
                channel.close()
    finally:
        app.close()


@pytest.fixture
def storage(storage_url: str) -> Iterator[SqlAuditStorage]:
    st = SqlAuditStorage(storage_url, sqlite_synchronous="NORMAL")
    st.migrate()
    try:
        yield st
    finally:
        st.close()


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No FIELDSYNC_* setting of the developer's shell reaches the command under test."""
    for name in list(os.environ):
        if name.startswith("FIELDSYNC_"):
            monkeypatch.delenv(name)
    return monkeypatch


# -- schema ------------------------------------------------------------------------


def test_migrate_is_idempotent_matches_the_metadata_and_shares_a_database(
    storage: SqlAuditStorage, storage_url: str
) -> None:
    storage.migrate()  # a second time, as a restart does
    # The sync service migrating the same database must not confuse either history.
    sync = SqlStorage(storage_url)
    try:
        sync.migrate()
    finally:
        sync.close()
    again = SqlAuditStorage(storage_url)
    try:
        again.migrate()
    finally:
        again.close()

    engine = create_engine(normalize_url(storage_url), poolclass=NullPool)
    try:
        with engine.connect() as conn:
            tables = set(inspect(conn).get_table_names())
            assert {"audit_events", VERSION_TABLE, "records", "alembic_version"} <= tables
            ctx = MigrationContext.configure(
                conn,
                opts={
                    "compare_type": True,
                    "compare_server_default": True,
                    "version_table": VERSION_TABLE,
                },
            )
            cfg = Config()
            cfg.set_main_option("script_location", str(MIGRATIONS))
            assert ctx.get_current_revision() == ScriptDirectory.from_config(cfg).get_current_head()
            diff = [
                d
                for d in compare_metadata(ctx, metadata)
                # The sync service's tables are not this metadata's business.
                if not (d[0] == "remove_table" and d[1].name != "audit_events")
                and not (d[0] == "remove_index" and d[1].table.name != "audit_events")
            ]
            assert diff == []
    finally:
        engine.dispose()


_MIGRATE_CHILD = """
import sys
from audit_service.storage import SqlAuditStorage
st = SqlAuditStorage(sys.argv[1])
print("ready", flush=True)
sys.stdin.readline()
try:
    st.migrate()
finally:
    st.close()
"""


def test_instances_starting_together_all_migrate(storage_url: str) -> None:
    # Processes, not threads: Alembic keeps its migration context in module globals.
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _MIGRATE_CHILD, storage_url],
            cwd=Path(__file__).resolve().parents[1],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    failures = []
    try:
        for p in procs:
            assert p.stdout is not None
            if p.stdout.readline() != "ready\n":
                pytest.fail(f"a migrating process did not start: {p.communicate()[1]}")
        # All released at once, each already connected: as close to a race as it gets.
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        for p in procs:
            _, err = p.communicate(timeout=CALL_TIMEOUT * 2)
            if p.returncode:
                failures.append(err.strip().splitlines()[-1:])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert failures == []
    st = SqlAuditStorage(storage_url)
    try:
        assert st.record([event("works")]).recorded == 1
    finally:
        st.close()


# -- storage -------------------------------------------------------------------------


def test_record_stores_each_event_id_once(storage: SqlAuditStorage) -> None:
    batch = [event("a"), event("b"), event("a"), event("c")]
    first = storage.record(batch)
    assert (first.recorded, first.duplicates) == (3, 1)  # the repeat within the batch
    again = storage.record(batch)
    assert (again.recorded, again.duplicates) == (0, 4)
    page = storage.query(EventFilter(ACME), after_seq=0, limit=10)
    assert [s.event.event_id for s in page.events] == ["a", "b", "c"]
    assert storage.record([]).recorded == 0


def test_concurrent_recorders_store_each_event_once(
    storage: SqlAuditStorage, storage_url: str
) -> None:
    # Each thread has its own storage (its own pool), as separate instances would.
    ids = [f"ev-{i}" for i in range(300)]
    threads_n = 6
    barrier = threading.Barrier(threads_n)
    outcomes: list[tuple[int, int]] = []
    errors: list[BaseException] = []

    def work(n: int) -> None:
        st = SqlAuditStorage(storage_url, sqlite_synchronous="NORMAL")
        try:
            # Overlapping, differently ordered batches: every id is offered 3 times.
            mine = [ids[(n * 50 + j) % len(ids)] for j in range(150)]
            barrier.wait(CALL_TIMEOUT)
            for start in range(0, len(mine), 30):
                out = st.record([event(i) for i in mine[start : start + 30]])
                outcomes.append((out.recorded, out.duplicates))
        except BaseException as exc:
            errors.append(exc)
        finally:
            st.close()

    threads = [threading.Thread(target=work, args=(n,)) for n in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(CALL_TIMEOUT * 2)
    assert errors == []
    assert sum(r for r, _ in outcomes) == len(ids)
    assert sum(r + d for r, d in outcomes) == threads_n * 150
    page = storage.query(EventFilter(ACME), after_seq=0, limit=1000)
    assert sorted(s.event.event_id for s in page.events) == sorted(ids)
    seqs = [s.seq for s in page.events]
    assert seqs == sorted(set(seqs))


def test_a_reader_following_seq_order_never_skips_a_concurrent_writers_event(
    storage: SqlAuditStorage, storage_url: str
) -> None:
    # What TailEvents relies on: events become visible in seq order, so asking
    # for `seq > position` never passes over one that commits late.
    writers_n, batches, per_batch = 4, 60, 5
    errors: list[BaseException] = []

    def write(n: int) -> None:
        st = SqlAuditStorage(storage_url, sqlite_synchronous="NORMAL")
        try:
            for b in range(batches):
                st.record([event(f"w{n}-{b}-{i}") for i in range(per_batch)])
        except BaseException as exc:
            errors.append(exc)
        finally:
            st.close()

    writers = [threading.Thread(target=write, args=(n,)) for n in range(writers_n)]
    reader = SqlAuditStorage(storage_url, sqlite_synchronous="NORMAL")
    seen: list[str] = []
    position = 0

    def read_on() -> int:
        nonlocal position
        got = reader.events_after(ACME, position, frozenset(), 1000)
        seen.extend(s.event.event_id for s in got)
        if got:
            position = got[-1].seq
        return len(got)

    try:
        for t in writers:
            t.start()
        # Follow while they write, as a tail does; then drain what is left.
        while any(t.is_alive() for t in writers):
            read_on()
        for t in writers:
            t.join()
        while read_on():
            pass
    finally:
        reader.close()
    assert errors == []
    assert len(seen) == len(set(seen))
    assert set(seen) == {
        f"w{n}-{b}-{i}" for n in range(writers_n) for b in range(batches) for i in range(per_batch)
    }


def test_prune_deletes_only_older_events_and_counts_them(
    storage: SqlAuditStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A small chunk, so the delete loop runs several rounds.
    monkeypatch.setattr(audit_service.storage, "_PRUNE_CHUNK", 3)
    cutoff = T0
    old = [event(f"old-{i}", at=cutoff - 1 - i, tenant=[ACME, GLOBEX][i % 2]) for i in range(7)]
    new = [event("at-cutoff", at=cutoff), event("newer", at=cutoff + DAY)]
    storage.record(old + new)
    assert storage.prune(cutoff) == 7
    assert storage.prune(cutoff) == 0
    left = storage.query(EventFilter(ACME), after_seq=0, limit=100).events
    assert [s.event.event_id for s in left] == ["at-cutoff", "newer"]
    assert storage.query(EventFilter(GLOBEX), after_seq=0, limit=100).events == []


def test_a_seq_is_never_reused_after_the_newest_events_are_pruned(
    storage: SqlAuditStorage,
) -> None:
    storage.record([event("a", at=T0), event("b", at=T0 - DAY)])
    top = storage.head(ACME)
    assert storage.prune(T0) == 1  # "b", the newest by seq
    storage.record([event("c")])
    (c,) = storage.events_after(ACME, top, frozenset(), 10)
    assert c.event.event_id == "c" and c.seq > top


EVERY_VALUE: dict[str, FieldValue] = {
    "string": "ünïcødé 🚀",
    "empty": "",
    "int": 2**63 - 1,
    "negative": -(2**63),
    "double": 0.1,
    "inf": math.inf,
    "true": True,
    "false": False,
    "timestamp": Timestamp(1_700_000_000_123_456_789),
    "null": None,
    "json": Json('{"a": [1, 2]}'),
    "bytes": b"\x00\xff",
}


def test_every_detail_value_round_trips_through_storage(storage: SqlAuditStorage) -> None:
    details = {**EVERY_VALUE, "nan": math.nan}
    storage.record([event("a", details=details, code="X", client_schema_version=2**32 - 1)])
    (got,) = storage.query(EventFilter(ACME), after_seq=0, limit=1).events
    assert got.event.details.keys() == details.keys()
    for name, value in details.items():
        assert same(got.event.details[name], value), name
    assert got.event.client_schema_version == 2**32 - 1


# -- RecordEvents --------------------------------------------------------------------


def test_record_events_stores_once_and_counts_duplicates(audit: AuditEnv) -> None:
    batch = [ev("e1"), ev("e2", kind=WARN), ev("e3", tenant=GLOBEX)]
    first = audit.record(*batch)
    assert (first.recorded, first.duplicates) == (3, 0)
    again = audit.record(*batch)
    assert (again.recorded, again.duplicates) == (0, 3)
    repeat = audit.record(ev("e4"), ev("e4"), ev("e1"))
    assert (repeat.recorded, repeat.duplicates) == (1, 2)
    assert audit.ids() == ["e1", "e2", "e4"]
    assert audit.ids(auditor(GLOBEX)) == ["e3"]


@pytest.mark.parametrize(
    "roles",
    [["auditor"], ["member"], [], ["fieldsync:services"]],
    ids=["auditor", "member", "no-role", "near-miss"],
)
def test_record_events_needs_the_service_role(audit: AuditEnv, roles: list[str]) -> None:
    with pytest.raises(grpc.RpcError) as err:
        audit.record(ev("e1"), metadata=md(roles=roles, aud=DEFAULT_SERVICE_AUDIENCE))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert rpc_reason(err.value) == "ROLE_REQUIRED"
    assert audit.ids() == []
    # Once the role is there, the event was not half-recorded: it is new.
    assert audit.record(ev("e1")).recorded == 1


@pytest.mark.parametrize("tenant", [ACME, GLOBEX, "fieldsync-system"])
def test_record_events_refuses_a_user_token_even_with_the_service_role(
    audit: AuditEnv, tenant: str
) -> None:
    # Issue 21: any tenant's user token with the role could write any tenant's events.
    with pytest.raises(grpc.RpcError) as err:
        audit.record(ev("e1"), metadata=md(tenant=tenant, roles=["fieldsync:service"]))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert rpc_reason(err.value) == "SERVICE_TOKEN_REQUIRED"
    assert audit.ids() == []
    # Once the role is there, the event was not half-recorded: it is new.
    assert audit.record(ev("e1")).recorded == 1


def test_record_events_without_a_token_is_unauthenticated(audit: AuditEnv) -> None:
    with pytest.raises(grpc.RpcError) as err:
        audit.stub.RecordEvents(
            audit_pb2.RecordEventsRequest(events=[ev("e1")]), timeout=CALL_TIMEOUT
        )
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert audit.ids() == []


def test_malformed_events_are_named_and_the_valid_ones_beside_them_are_stored(
    audit: AuditEnv,
) -> None:
    no_time = ev("no-time")
    no_time.ClearField("occurred_at")
    batch = [
        ev("good-0"),
        ev(""),  # no event_id
        ev("good-2", kind=WARN),
        ev("no-kind", kind=K.AUDIT_EVENT_KIND_UNSPECIFIED),
        no_time,
        ev("x" * 65),
        ev("unknown-kind", kind=99),
        ev("no-tenant", tenant=""),
        ev("good-8", tenant=GLOBEX),
        ev("long-record", record_id="r" * 501),
    ]
    with pytest.raises(grpc.RpcError) as err:
        audit.record(*batch)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_reason(err.value) == "INVALID_AUDIT_EVENT"
    assert violations(err.value) == {
        "events[1].event_id": "required",
        "events[3].kind": "required",
        "events[4].occurred_at": "required",
        "events[5].event_id": "at most 64 characters",
        "events[6].kind": "unknown kind 99",
        "events[7].tenant_id": "required",
        "events[9].record_id": "at most 500 characters",
    }
    # The malformed ones are kept whole as dead letters (issue 21), never lost.
    assert error_metadata(err.value) == {"recorded": "3", "duplicates": "0", "dead_lettered": "7"}
    assert audit.ids() == ["good-0", "good-2"]
    assert audit.ids(auditor(GLOBEX)) == ["good-8"]

    # The sender's retry of the same batch fails the same way; the valid events
    # are duplicates now, and a batch of only those succeeds.
    with pytest.raises(grpc.RpcError) as again:
        audit.record(*batch)
    assert error_metadata(again.value) == {
        "recorded": "0",
        "duplicates": "3",
        "dead_lettered": "7",
    }
    fixed = audit.record(batch[0], batch[2], batch[8])
    assert (fixed.recorded, fixed.duplicates) == (0, 3)


# -- QueryEvents ---------------------------------------------------------------------


def test_query_shows_only_the_callers_tenant(audit: AuditEnv) -> None:
    # The same shapes in two tenants: the filters must never reach across.
    for tenant in (ACME, GLOBEX):
        audit.record(
            *[
                ev(f"{tenant}-{i}", tenant=tenant, record_id="r1", mutation_id="m1")
                for i in range(3)
            ]
        )
    assert audit.ids(auditor(ACME)) == ["acme-0", "acme-1", "acme-2"]
    assert audit.ids(auditor(GLOBEX), record_id="r1") == ["globex-0", "globex-1", "globex-2"]
    assert audit.ids(auditor("initech")) == []
    assert audit.ids(auditor("initech"), mutation_id="m1") == []
    # Events name their own tenant; the response says which.
    assert {e.tenant_id for e in audit.query(auditor(GLOBEX)).events} == {GLOBEX}


# (filters, the events they select): each filter alone, several kinds, combinations.
FILTER_CASES: list[tuple[dict[str, Any], list[str]]] = [
    ({}, ["a", "b", "c", "d", "e"]),
    ({"kinds": [WARN]}, ["b", "d"]),
    ({"kinds": [WARN, REJECTED]}, ["b", "d", "e"]),
    ({"kinds": [CONFLICT]}, []),
    ({"collection": "tasks"}, ["a", "b", "c"]),
    ({"record_id": "r1"}, ["a", "b", "e"]),
    ({"mutation_id": "m2"}, ["c", "d"]),
    ({"collection": "tasks", "record_id": "r1", "kinds": [LWW]}, ["a"]),
    ({"collection": "deals", "mutation_id": "m1"}, []),
]


def test_query_filters(audit: AuditEnv) -> None:
    audit.record(
        ev("a", kind=LWW, collection="tasks", record_id="r1", mutation_id="m1"),
        ev("b", kind=WARN, collection="tasks", record_id="r1", mutation_id="m1"),
        ev("c", kind=LWW, collection="tasks", record_id="r2", mutation_id="m2"),
        ev("d", kind=WARN, collection="deals", record_id="r2", mutation_id="m2"),
        ev("e", kind=REJECTED, collection="deals", record_id="r1", mutation_id="m3"),
        # Another tenant's twin of "a" matches every filter but the tenant.
        ev("z", tenant=GLOBEX, kind=LWW, collection="tasks", record_id="r1", mutation_id="m1"),
    )
    for filters, expected in FILTER_CASES:
        assert audit.ids(**filters) == expected, filters


def test_query_time_range_is_since_inclusive_until_exclusive(audit: AuditEnv) -> None:
    audit.record(*[ev(f"t{i}", at=T0 + i * SEC) for i in range(5)])

    def ts(i: int) -> dict[str, int]:
        return {"seconds": (T0 + i * SEC) // SEC}

    assert audit.ids(since=ts(1), until=ts(3)) == ["t1", "t2"]
    assert audit.ids(since=ts(3)) == ["t3", "t4"]
    assert audit.ids(until=ts(1)) == ["t0"]
    assert audit.ids(since=ts(2), until=ts(2)) == []
    # Bounds beyond what a timestamp can hold filter like the extremes.
    assert audit.ids(since={"seconds": -(2**40)}, until={"seconds": 2**40}) == [
        f"t{i}" for i in range(5)
    ]
    with pytest.raises(grpc.RpcError) as err:
        audit.query(since=ts(3), until=ts(1))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(err.value) == {"until": "must not be before since"}


def test_query_refuses_unknown_kinds(audit: AuditEnv) -> None:
    with pytest.raises(grpc.RpcError) as err:
        audit.query(kinds=[LWW, K.AUDIT_EVENT_KIND_UNSPECIFIED, 42])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_reason(err.value) == "INVALID_REQUEST"
    assert set(violations(err.value)) == {"kinds[1]", "kinds[2]"}


def test_pages_cover_every_event_exactly_once_oldest_first(audit: AuditEnv) -> None:
    ids = [f"p{i:02}" for i in range(23)]
    # Interleaved with another tenant's and another kind's events, which must
    # neither show up nor shorten a page.
    for i, eid in enumerate(ids):
        audit.record(ev(eid), ev(f"g{i}", tenant=GLOBEX), ev(f"w{i}", kind=WARN))
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = audit.query(kinds=[LWW], page_size=5, page_token=token)
        pages += 1
        assert len(page.events) <= 5
        seen.extend(e.event_id for e in page.events)
        if pages == 2:
            # Recorded while the listing is under way: it comes last, once.
            audit.record(ev("late"))
        if not page.next_page_token:
            break
        token = page.next_page_token
    assert seen == [*ids, "late"]
    assert pages == 5


def test_pages_newest_first_cover_every_event_exactly_once_newest_first(audit: AuditEnv) -> None:
    ids = [f"p{i:02}" for i in range(13)]
    for i, eid in enumerate(ids):
        audit.record(ev(eid), ev(f"g{i}", tenant=GLOBEX), ev(f"w{i}", kind=WARN))
    seen: list[str] = []
    token = ""
    while True:
        page = audit.query(kinds=[LWW], page_size=5, page_token=token, newest_first=True)
        seen.extend(e.event_id for e in page.events)
        if len(seen) == 5:
            audit.record(ev("late"))  # newer than the listing's start: not in it
        if not page.next_page_token:
            break
        token = page.next_page_token
    assert seen == list(reversed(ids))
    # A newest-first token does not continue an oldest-first listing.
    first = audit.query(kinds=[LWW], page_size=5, newest_first=True)
    with pytest.raises(grpc.RpcError) as err:
        audit.query(kinds=[LWW], page_token=first.next_page_token)
    assert rpc_reason(err.value) == "INVALID_PAGE_TOKEN"


def test_page_size_defaults_to_100_and_is_capped_at_1000(audit: AuditEnv) -> None:
    audit.record(*[ev(f"e{i:04}") for i in range(1005)])
    assert len(audit.query().events) == 100
    capped = audit.query(page_size=5000)
    assert len(capped.events) == 1000
    rest = audit.query(page_size=5000, page_token=capped.next_page_token)
    assert [e.event_id for e in rest.events] == [f"e{i:04}" for i in range(1000, 1005)]
    assert rest.next_page_token == ""


def test_a_page_token_only_continues_its_own_listing(audit: AuditEnv) -> None:
    audit.record(*[ev(f"e{i}", kind=[LWW, WARN][i % 2]) for i in range(6)])
    token = audit.query(kinds=[LWW], page_size=1).next_page_token
    assert token
    assert [e.event_id for e in audit.query(kinds=[LWW], page_token=token).events] == [
        "e2",
        "e4",
    ]

    def refused(metadata: Metadata | None = None, **kw: Any) -> None:
        with pytest.raises(grpc.RpcError) as err:
            audit.query(metadata, **kw)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert rpc_reason(err.value) == "INVALID_PAGE_TOKEN"

    refused(kinds=[WARN], page_token=token)  # other filters
    refused(page_token=token)  # no filters is other filters too
    refused(kinds=[LWW], record_id="r1", page_token=token)
    refused(auditor(GLOBEX), kinds=[LWW], page_token=token)  # another tenant
    refused(kinds=[LWW], page_token="not-a-token")
    refused(kinds=[LWW], page_token=token[:-2])
    # An edited position (the token is readable, so this is what tampering looks like).
    text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    prefix, seq, digest = text.split(":")
    edited = base64.urlsafe_b64encode(f"{prefix}:{int(seq) + 1}:{digest}".encode()).decode()
    refused(kinds=[LWW], page_token=edited)


@pytest.mark.parametrize(
    "roles", [["fieldsync:service"], ["member"], []], ids=["service", "member", "no-role"]
)
def test_reading_needs_the_auditor_role(audit: AuditEnv, roles: list[str]) -> None:
    audit.record(ev("e1"))
    who = md(roles=roles)
    with pytest.raises(grpc.RpcError) as err:
        audit.query(who)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert rpc_reason(err.value) == "ROLE_REQUIRED"
    tail = audit.stub.TailEvents(audit_pb2.TailEventsRequest(), metadata=who, timeout=CALL_TIMEOUT)
    with pytest.raises(grpc.RpcError) as err:
        next(tail)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert rpc_reason(err.value) == "ROLE_REQUIRED"


def test_details_values_round_trip_through_the_service(audit: AuditEnv) -> None:
    audit.record(ev("d", details=EVERY_VALUE, field="amount", actor="alice", message="m"))
    (got,) = audit.query().events
    values = fields_from_proto(got.details)
    assert values.keys() == EVERY_VALUE.keys()
    for name, value in EVERY_VALUE.items():
        assert same(values[name], value), name
    assert got.details["null"].WhichOneof("kind") is None
    assert (got.field, got.actor, got.message, got.kind) == ("amount", "alice", "m", LWW)
    assert got.occurred_at.seconds * SEC + got.occurred_at.nanos == T0


# -- TailEvents ----------------------------------------------------------------------


@pytest.fixture
def tail(audit: AuditEnv) -> Iterator[Any]:
    """Opens tails for a test and cancels them after it."""
    calls: list[Any] = []

    def open_tail(kinds: Sequence[int] = (), metadata: Metadata | None = None) -> Any:
        call = audit.stub.TailEvents(
            audit_pb2.TailEventsRequest(kinds=[K.ValueType(k) for k in kinds]),
            metadata=metadata or auditor(),
            timeout=CALL_TIMEOUT,
        )
        calls.append(call)
        # The stream is live once its initial metadata arrives.
        call.initial_metadata()
        return call

    yield open_tail
    for call in calls:
        call.cancel()


def test_tail_streams_new_events_of_its_kinds_and_tenant_only(audit: AuditEnv, tail: Any) -> None:
    audit.record(ev("before"))  # recorded before the tail started: not sent
    call = tail([LWW, REJECTED])
    audit.record(
        ev("other-tenant", tenant=GLOBEX),
        ev("other-kind", kind=WARN),
        ev("one"),
    )
    audit.record(ev("two", kind=REJECTED))
    audit.record(ev("other-kind-2", kind=CONFLICT), ev("three"))
    got = [next(call).event for _ in range(3)]
    # Had anything else been sent it would have come before "three" (seq order).
    assert [e.event_id for e in got] == ["one", "two", "three"]
    assert {e.tenant_id for e in got} == {ACME}


def test_tail_of_every_kind_and_a_second_tenant(audit: AuditEnv, tail: Any) -> None:
    acme = tail()
    globex = tail(metadata=auditor(GLOBEX))
    audit.record(ev("a1", kind=WARN), ev("g1", tenant=GLOBEX), ev("a2", kind=DUP))
    assert [next(acme).event.event_id for _ in range(2)] == ["a1", "a2"]
    assert next(globex).event.event_id == "g1"


@pytest.mark.parametrize("tail_poll_seconds", [0.2])
def test_tail_finds_events_another_instance_recorded(audit: AuditEnv, tail: Any) -> None:
    call = tail()
    # Written straight to the database, as another instance would: no in-process
    # wake-up, so only the poll can find it (within the call's safety deadline).
    other = SqlAuditStorage(audit.db_url, sqlite_synchronous="NORMAL")
    try:
        other.record([event("from-elsewhere")])
    finally:
        other.close()
    assert next(call).event.event_id == "from-elsewhere"


def test_tail_refuses_unknown_kinds(audit: AuditEnv) -> None:
    call = audit.stub.TailEvents(
        audit_pb2.TailEventsRequest(kinds=[K.ValueType(77)]),
        metadata=auditor(),
        timeout=CALL_TIMEOUT,
    )
    with pytest.raises(grpc.RpcError) as err:
        next(call)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(err.value) == {"kinds[0]": "not an event kind: 77"}


# -- configuration -------------------------------------------------------------------


def test_config_reads_the_environment() -> None:
    config = AuditConfig.from_env(
        {
            "FIELDSYNC_JWT_SECRET": SECRET,
            "FIELDSYNC_AUDIT_ADDR": "0.0.0.0:6000",
            "FIELDSYNC_AUDIT_DB": "postgresql://u@h/db",
            "FIELDSYNC_SHUTDOWN_GRACE": "2.5",
            "FIELDSYNC_AUDIT_RETENTION_DAYS": "90",
        }
    )
    assert (config.addr, config.db_url, config.shutdown_grace_seconds) == (
        "0.0.0.0:6000",
        "postgresql://u@h/db",
        2.5,
    )
    assert config.retention_days == 90 and config.auth is not None
    defaults = AuditConfig.from_env({}, require_auth=False)
    assert (defaults.addr, defaults.db_url, defaults.retention_days) == (
        "127.0.0.1:50052",
        "sqlite:///fieldsync-audit.db",
        None,
    )
    with pytest.raises(ValueError, match="FIELDSYNC_AUDIT_RETENTION_DAYS"):
        AuditConfig.from_env({"FIELDSYNC_AUDIT_RETENTION_DAYS": "ninety"}, require_auth=False)
    with pytest.raises(ValueError, match="FIELDSYNC_AUDIT_RETENTION_DAYS"):
        AuditConfig.from_env({"FIELDSYNC_AUDIT_RETENTION_DAYS": "0"}, require_auth=False)
    with pytest.raises(ValueError, match="FIELDSYNC_JWT_SECRET"):
        AuditConfig.from_env({})
    with pytest.raises(ValueError, match="token verification"):
        AuditApp.from_config(AuditConfig())


# -- commands ------------------------------------------------------------------------


def test_prune_command_deletes_older_events_and_says_how_many(
    storage: SqlAuditStorage,
    storage_url: str,
    clean_env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    now = time.time_ns()
    storage.record(
        [
            event("ancient", at=now - 400 * DAY),
            event("old", at=now - 31 * DAY, tenant=GLOBEX),
            event("recent", at=now - 29 * DAY),
            event("today", at=now),
        ]
    )
    clean_env.setenv("FIELDSYNC_AUDIT_DB", storage_url)
    assert audit_main(["prune", "--older-than-days", "30"]) == 0
    said = capsys.readouterr().out
    assert "pruned 2 audit events" in said
    # It names the database it touched (a PostgreSQL password is never shown).
    assert said.rstrip().endswith(f"from {make_url(storage_url).render_as_string()}")
    left = storage.query(EventFilter(ACME), after_seq=0, limit=10).events
    assert [s.event.event_id for s in left] == ["recent", "today"]

    # The retention setting is the default age; the flag wins over it.
    clean_env.setenv("FIELDSYNC_AUDIT_RETENTION_DAYS", "1")
    assert audit_main(["prune", "--older-than-days", "365"]) == 0
    assert "pruned 0 audit events" in capsys.readouterr().out
    assert audit_main(["prune"]) == 0
    assert "pruned 1 audit events" in capsys.readouterr().out
    assert [
        s.event.event_id for s in storage.query(EventFilter(ACME), after_seq=0, limit=10).events
    ] == ["today"]


def test_prune_command_never_creates_a_database(
    tmp_path: Path, clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A wrong FIELDSYNC_AUDIT_DB (or none: ./fieldsync-audit.db) used to create and migrate
    # an empty database and say "pruned 0": now it says which database is missing.
    missing = tmp_path / "nowhere" / "audit.db"
    clean_env.setenv("FIELDSYNC_AUDIT_DB", f"sqlite:///{missing}")
    assert audit_main(["prune", "--older-than-days", "30"]) == 1
    err = capsys.readouterr().err
    assert f"no audit database at sqlite:///{missing}" in err
    assert "FIELDSYNC_AUDIT_DB" in err
    assert not missing.parent.exists()


def test_prune_command_needs_an_age(
    storage_url: str, clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clean_env.setenv("FIELDSYNC_AUDIT_DB", storage_url)
    assert audit_main(["prune"]) == 2
    assert "--older-than-days" in capsys.readouterr().err
    assert audit_main(["prune", "--older-than-days", "0"]) == 2


def test_query_command_prints_json_lines(
    audit: AuditEnv, clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    audit.record(
        *[ev(f"e{i}", record_id="r1" if i % 2 else "r2", details={"n": i}) for i in range(7)],
        ev("w", kind=WARN, record_id="r1"),
        ev("g", tenant=GLOBEX, record_id="r1"),
    )
    # A small page, so the command has to follow page tokens.
    clean_env.setattr(audit_service.commands, "QUERY_PAGE", 2)
    clean_env.setenv("FIELDSYNC_AUDIT_ADDR", audit.address)
    clean_env.setenv("FIELDSYNC_TOKEN", auditor()[0][1].removeprefix("Bearer "))

    assert audit_main(["query", "--kind", "lww_overwrite", "--record", "r1", "--limit", "3"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["event_id"] for e in lines] == ["e1", "e3", "e5"]
    assert lines[0]["kind"] == "LWW_OVERWRITE" and lines[0]["details"] == {"n": 1}
    assert lines[0]["occurred_at"] == Timestamp(T0).isoformat()

    assert audit_main(["query", "--record", "r1"]) == 0
    out = capsys.readouterr().out
    assert [json.loads(line)["event_id"] for line in out.splitlines()] == ["e1", "e3", "e5", "w"]

    assert audit_main(["query", "--kind", "NOPE"]) == 2
    clean_env.setenv("FIELDSYNC_TOKEN", md(roles=["member"])[0][1].removeprefix("Bearer "))
    assert audit_main(["query"]) == 1
    assert "PERMISSION_DENIED (ROLE_REQUIRED)" in capsys.readouterr().err
    clean_env.delenv("FIELDSYNC_TOKEN")
    assert audit_main(["query"]) == 2


# -- the process ---------------------------------------------------------------------


def _wait_serving(address: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + CALL_TIMEOUT
    with fast_reconnect_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for name in ("", SERVICE_NAME):
            while True:
                assert proc.poll() is None, f"exited early:\n{log.read_text()}"
                assert time.monotonic() < deadline, f"not serving:\n{log.read_text()}"
                try:
                    status = stub.Check(
                        health_pb2.HealthCheckRequest(service=name),
                        timeout=0.5,
                        wait_for_ready=True,
                    ).status
                except grpc.RpcError as err:
                    if err.code() not in (
                        grpc.StatusCode.UNAVAILABLE,
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        grpc.StatusCode.NOT_FOUND,  # health service up, name not set yet
                    ):
                        raise
                    continue
                if status == health_pb2.HealthCheckResponse.SERVING:
                    break


def test_the_process_serves_health_and_reflection_and_stops_on_sigterm(tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FIELDSYNC_")}
    grace = 60.0  # far longer than the test may take: open tails must not wait it out
    env.update(
        {
            "FIELDSYNC_AUDIT_ADDR": address,
            "FIELDSYNC_AUDIT_DB": f"sqlite:///{tmp_path / 'audit.db'}",
            "FIELDSYNC_JWT_SECRET": SECRET,
            "FIELDSYNC_SHUTDOWN_GRACE": str(grace),
            "PYTHONUNBUFFERED": "1",
        }
    )
    log = tmp_path / "audit.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "audit_service"],
            cwd=tmp_path,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    try:
        _wait_serving(address, proc, log)
        assert f"audit service listening on {address}" in log.read_text()
        with grpc.insecure_channel(address) as channel:
            refl = reflection_pb2_grpc.ServerReflectionStub(channel)
            (answer,) = refl.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                timeout=CALL_TIMEOUT,
            )
            names = {s.name for s in answer.list_services_response.service}
            assert SERVICE_NAME in names

            stub = audit_pb2_grpc.AuditServiceStub(channel)
            call = stub.TailEvents(
                audit_pb2.TailEventsRequest(), metadata=auditor(), timeout=CALL_TIMEOUT
            )
            call.initial_metadata()
            stub.RecordEvents(
                audit_pb2.RecordEventsRequest(events=[ev("e1")]), metadata=service(), timeout=5
            )
            assert next(call).event.event_id == "e1"

            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            with pytest.raises(grpc.RpcError) as err:
                next(call)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert rpc_reason(err.value) == "SHUTTING_DOWN"
        assert proc.wait(timeout=CALL_TIMEOUT) == 0, log.read_text()
        assert time.monotonic() - started < grace / 2
        assert "stopped" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    # The events outlive the process.
    st = SqlAuditStorage(f"sqlite:///{tmp_path / 'audit.db'}")
    try:
        assert [
            s.event.event_id for s in st.query(EventFilter(ACME), after_seq=0, limit=5).events
        ] == ["e1"]
    finally:
        st.close()
