"""Issue 21, points 1, 2 and 6: identifiers neither engine can hold, and warning floods.

A real audit service process and a real sync service (relay on), on SQLite and
on PostgreSQL. Mutations with over-long or NUL-bearing ids are REJECTED and
consume their sequence (they once failed the whole batch on PostgreSQL, on
every resend); their events are made valid at the source, so the audit log
ends with every event exactly once, through an audit-service restart.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_status import rpc_status

from audit_service.commands import run_dead_letters
from audit_service.config import AuditConfig
from fieldsync.audit_kinds import EventKind
from fieldsync.auth import DEFAULT_SERVICE_AUDIENCE, mint_token
from fieldsync.errors import reason_of
from fieldsync.v1 import audit_pb2, audit_pb2_grpc
from fieldsync.values import from_proto
from sync_service.storage.sql import SqlStorage
from sync_service.storage.tables import outbox
from sync_service.writes.audit_events import make_event
from tests.conftest import make_config, running_sync
from tests.pg import fresh_pg_database, pg_server_url
from tests.proc import free_port, start_audit_service
from tests.support import PUT, SECRET, Client, S
from tests.test_audit_delivery import Auditor, _wait_for

K = audit_pb2.AuditEventKind
LONG_MID = "m" * 300
NUL_RID = "bad\x00id"
LONG_RID = "r" * 600
LONG_COLLECTION = "c" * 300
LONG_FIELD = "f" * 300


@contextlib.contextmanager
def _audit_db(storage_url: str, tmp_path: Path) -> Iterator[str]:
    if storage_url.startswith("postgresql"):
        server = pg_server_url()
        assert server is not None
        with fresh_pg_database(server) as url:
            yield url
    else:
        yield f"sqlite:///{tmp_path / 'audit.db'}"


def _batch(c: Client, tag: str) -> tuple[list[object], int]:
    """A batch mixing every bad id with unknown fields; (mutations, events it makes)."""
    flood = {f"x{i}": i for i in range(250)}
    muts = [
        c.mut(f"{tag}-a", {"title": "a"}, op=PUT, mutation_id=LONG_MID + tag),
        c.mut(NUL_RID + tag, {"title": "b"}, op=PUT),
        c.mut(LONG_RID + tag, {"title": "c"}, op=PUT),
        c.mut(f"{tag}-d", {"title": "d", LONG_FIELD: 1}, op=PUT),
        c.mut(f"{tag}-e", {"title": "e"}, op=PUT, collection=LONG_COLLECTION),
        c.mut(f"{tag}-f", {"title": "f", **flood}, op=PUT),
        c.mut(f"{tag}-g", {"title": "g"}, op=PUT),
    ]
    # 4 rejections, 1 warning, 100 warnings + 1 summary.
    return list(muts), 4 + 1 + 101


def _send(c: Client, muts: list[object]) -> None:
    res = c.apply(*muts)  # type: ignore[arg-type]
    statuses = [r.status for r in res.results]
    R, A = S.MUTATION_STATUS_REJECTED, S.MUTATION_STATUS_APPLIED
    assert statuses == [R, R, R, A, R, A, A]
    assert {reason_of(r.error) for r in res.results if r.status == R} == {"INVALID_MUTATION"}
    assert res.last_applied_seq == c.next_seq - 1  # every one consumed its sequence
    again = c.apply(*muts)  # type: ignore[arg-type]
    assert {r.status for r in again.results} == {S.MUTATION_STATUS_DUPLICATE}
    assert [r.original_status for r in again.results] == statuses


def test_bad_ids_consume_their_sequence_and_every_event_arrives_once(
    storage_url: str, tmp_path: Path
) -> None:
    audit_addr = f"127.0.0.1:{free_port()}"
    config = make_config(
        storage_url,
        relay_enabled=True,
        audit_addr=audit_addr,
        relay_batch_size=50,
        relay_max_backoff_seconds=0.5,
    )
    with _audit_db(storage_url, tmp_path) as audit_url, running_sync(config) as sync:
        c = sync.client(sub="rep")
        storage = SqlStorage(sync.db_url)
        # An event an older sync service wrote, which the audit service refuses: it
        # must end as a dead letter, not parked in the outbox for good.
        bad = make_event(EventKind.VALIDATION_WARNING, tenant_id="acme", occurred_at=1)
        with storage._write.begin() as conn:
            conn.execute(
                outbox.insert().values(
                    event_id=bad.event_id,
                    tenant_id="acme",
                    payload=json.dumps({**bad.payload, "kind": 99}),
                    created_at=1,
                )
            )
        proc = start_audit_service(audit_url, tmp_path, address=audit_addr)
        first, n1 = _batch(c, "1")
        _send(c, first)
        proc.stop()  # an audit-service restart in the middle of the run
        second, n2 = _batch(c, "2")
        _send(c, second)
        proc = start_audit_service(audit_url, tmp_path, address=audit_addr)
        auditor = Auditor(audit_addr)
        try:
            _wait_for("the outbox to drain", lambda: storage.outbox_depth()[0] == 0)
            assert storage.outbox_parked(10) == 0
            assert [d["key"] for d in _dead_letters(audit_url)] == [bad.event_id]
            events = auditor.events()
            assert len(events) == n1 + n2
            assert len({e.event_id for e in events}) == n1 + n2
            kinds = Counter(e.kind for e in events)
            assert kinds[K.AUDIT_EVENT_KIND_MUTATION_REJECTED] == 8
            long_mid = [e for e in events if e.details.get("full.mutation_id")]
            assert sorted(str(from_proto(e.details["full.mutation_id"])) for e in long_mid) == [
                LONG_MID + "1",
                LONG_MID + "2",
            ]
            assert all(len(e.mutation_id) == 200 and e.mutation_id.endswith("…") for e in long_mid)
            nul = [e for e in events if e.details.get("full.record_id")]
            full_rids = {from_proto(e.details["full.record_id"]) for e in nul}
            assert {NUL_RID + "1", NUL_RID + "2", LONG_RID + "1", LONG_RID + "2"} == full_rids
            assert all("\x00" not in e.record_id for e in events)
            fields = [e for e in events if e.details.get("full.field")]
            assert {from_proto(e.details["full.field"]) for e in fields} == {LONG_FIELD}
            summary = [e for e in events if e.details.get("omitted")]
            assert [from_proto(e.details["omitted"]) for e in summary] == [150, 150]
            assert {from_proto(e.details["omitted.UNKNOWN_FIELD"]) for e in summary} == {150}
        finally:
            auditor.close()
            storage.close()
            proc.stop()
        # The queue goes on: the next mutation applies.
        assert c.one("after", {"title": "ok"}, op=PUT).status == S.MUTATION_STATUS_APPLIED


@pytest.mark.parametrize("rid", [NUL_RID, LONG_RID])
def test_get_records_of_an_id_no_engine_holds_is_absent(storage_url: str, rid: str) -> None:
    with running_sync(make_config(storage_url)) as sync:
        c = sync.client()
        assert c.one("t1", {"title": "x"}, op=PUT).status == S.MUTATION_STATUS_APPLIED
        assert c.get(rid) is None
        got = c.get("t1")
        assert got is not None and got.version == 1


# -- refused events: dead letters, never parked silently ---------------------------


def _service_md() -> tuple[tuple[str, str], ...]:
    tok = mint_token(
        SECRET,
        sub="sync",
        tenant_id="_service",
        roles=["fieldsync:service"],
        audience=DEFAULT_SERVICE_AUDIENCE,
    )
    return (("authorization", f"Bearer {tok}"),)


def _event(event_id: str, kind: int = 1, **kw: Any) -> audit_pb2.AuditEvent:
    e = audit_pb2.AuditEvent(event_id=event_id, tenant_id="acme", kind=kind, **kw)  # type: ignore[arg-type]
    e.occurred_at.seconds = 1_700_000_000
    return e


def _dead_letters(audit_url: str) -> list[dict[str, Any]]:
    """What `fieldsync-audit dead-letters` prints (run in process, on the real database)."""
    out = io.StringIO()
    config = AuditConfig(db_url=audit_url)
    assert run_dead_letters(argparse.Namespace(limit=1000), config, out) == 0
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_refused_events_are_kept_as_dead_letters_once(storage_url: str, tmp_path: Path) -> None:
    with _audit_db(storage_url, tmp_path) as audit_url:
        proc = start_audit_service(audit_url, tmp_path)
        try:
            with grpc.insecure_channel(proc.address) as channel:
                stub = audit_pb2_grpc.AuditServiceStub(channel)
                batch = [_event("good"), _event("bad-kind", kind=99), _event("x" * 100)]
                for _ in range(2):  # a resend of the same batch
                    with pytest.raises(grpc.RpcError) as err:
                        stub.RecordEvents(
                            audit_pb2.RecordEventsRequest(events=batch),
                            metadata=_service_md(),
                            timeout=30,
                        )
                    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                    status = rpc_status.from_call(err.value)
                    assert status is not None and reason_of(status) == "INVALID_AUDIT_EVENT"
                    assert "dead_lettered" in str(status.details[0].value)
                auditor = Auditor(proc.address)
                try:
                    assert [e.event_id for e in auditor.events()] == ["good"]
                finally:
                    auditor.close()
        finally:
            proc.stop()
        letters = _dead_letters(audit_url)
        assert [d["event"]["eventId"] for d in letters] == ["bad-kind", "x" * 100]
        assert letters[0]["key"] == "bad-kind" and len(letters[1]["key"]) == 64
        assert letters[0]["reasons"] == [["events[1].kind", "unknown kind 99"]]
