"""Audit events from a sync to the audit service, through outages (SPEC §4, §7).

A real audit service process, a real sync service (in process, its relay on),
real tokens. The audit trail is read back the way an auditor would, with
QueryEvents; "exactly once" is checked on what the audit service stored.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from fieldsync.v1 import audit_pb2, audit_pb2_grpc
from fieldsync.values import from_proto
from sync_service.config import SyncConfig
from sync_service.storage.sql import SqlStorage
from tests.conftest import make_config, running_sync
from tests.proc import SyncProcess, free_port, start_audit_service
from tests.support import PUT, S, SyncEnv, md, token

K = audit_pb2.AuditEventKind
DELIVERY_TIMEOUT = 90.0


def _wait_for(what: str, condition: Callable[[], bool], timeout: float = DELIVERY_TIMEOUT) -> None:
    """Bounded polling on a real condition (delivery is asynchronous by design)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


class Auditor:
    def __init__(self, address: str, tenant: str = "acme") -> None:
        self._channel = grpc.insecure_channel(address)
        self._stub = audit_pb2_grpc.AuditServiceStub(self._channel)
        self._md = md(token(tenant, "ann", ["auditor"]))

    def events(self, *kinds: audit_pb2.AuditEventKind.ValueType) -> list[audit_pb2.AuditEvent]:
        out: list[audit_pb2.AuditEvent] = []
        page_token = ""
        while True:
            try:
                resp = self._stub.QueryEvents(
                    audit_pb2.QueryEventsRequest(
                        kinds=list(kinds), page_size=1000, page_token=page_token
                    ),
                    metadata=self._md,
                    timeout=10,
                )
            except grpc.RpcError:
                return []  # the audit service is down (or restarting): nothing readable
            out.extend(resp.events)
            page_token = resp.next_page_token
            if not page_token:
                return out

    def close(self) -> None:
        self._channel.close()


@pytest.fixture
def audit_addr() -> str:
    return f"127.0.0.1:{free_port()}"


def _sync_config(tmp_path: Path, audit_addr: str) -> SyncConfig:
    return make_config(
        f"sqlite:///{tmp_path / 'sync.db'}",
        relay_enabled=True,
        audit_addr=audit_addr,
        relay_batch_size=50,
        relay_max_backoff_seconds=0.5,
    )


@pytest.fixture
def audit(tmp_path: Path, audit_addr: str) -> Iterator[SyncProcess]:
    proc = start_audit_service(f"sqlite:///{tmp_path / 'audit.db'}", tmp_path, address=audit_addr)
    try:
        yield proc
    finally:
        if proc.alive():
            proc.stop()
        else:
            proc.close()


@pytest.fixture
def sync(tmp_path: Path, audit_addr: str) -> Iterator[SyncEnv]:
    with running_sync(_sync_config(tmp_path, audit_addr)) as env:
        yield env


def test_an_old_clients_batch_applies_whole_and_each_repair_is_audited_once(
    audit: SyncProcess, sync: SyncEnv
) -> None:
    c = sync.client(sub="rep")
    c.schema_version = 2  # built before the server moved to schema v3
    batch = [
        c.mut("t1", {"title": "a", "colour": "red"}, op=PUT),  # unknown field
        c.mut("t2", {"title": "b", "assigned_to": "rep"}, op=PUT),  # the old name of assignee
        c.mut("t3", {"estimate": 3}, op=PUT),  # create missing the required title
        c.mut("t4", {"title": "d", "estimate": "42"}, op=PUT),  # coercible
        c.mut("t5", {"title": "e", "estimate": "abc"}, op=PUT),  # not coercible
    ]
    expected = [
        ("UNKNOWN_FIELD", "colour"),
        ("FIELD_RENAMED", "assigned_to"),
        ("DEFAULT_APPLIED", "title"),
        ("TYPE_COERCED", "estimate"),
        ("FIELD_DROPPED", "estimate"),
    ]
    res = c.apply(*batch)
    assert [r.status for r in res.results] == [S.MUTATION_STATUS_APPLIED] * 5
    assert [[(w.code, w.field) for w in r.warnings] for r in res.results] == [[e] for e in expected]
    assert res.results[1].record.fields["assignee"].string_value == "rep"
    assert res.results[2].record.fields["title"].string_value == ""
    assert res.results[3].record.fields["estimate"].int_value == 42
    assert "estimate" not in res.results[4].record.fields

    auditor = Auditor(audit.address)
    try:
        _wait_for(
            "5 warnings", lambda: len(auditor.events(K.AUDIT_EVENT_KIND_VALIDATION_WARNING)) >= 5
        )
        events = auditor.events(K.AUDIT_EVENT_KIND_VALIDATION_WARNING)
        got = sorted((e.mutation_id, e.code, e.field) for e in events)
        want = sorted(
            (m.mutation_id, code, f) for m, (code, f) in zip(batch, expected, strict=True)
        )
        assert got == want  # each exactly once
        assert {e.client_schema_version for e in events} == {2}
        assert {e.actor for e in events} == {"rep"}
        assert {e.client_id for e in events} == {c.client_id}
    finally:
        auditor.close()


def test_a_duplicate_transition_event_names_both_writers(audit: SyncProcess, sync: SyncEnv) -> None:
    a, b = sync.client(sub="a"), sync.client(sub="b")
    a.one("t", {"title": "deploy"}, op=PUT)
    first = a.mut("t", {"status": "done"}, base=1)
    second = b.mut("t", {"status": "done"}, base=1)
    a.apply(first)
    assert b.apply(second).results[0].duplicate_transition
    auditor = Auditor(audit.address)
    try:
        _wait_for(
            "the event", lambda: bool(auditor.events(K.AUDIT_EVENT_KIND_DUPLICATE_TRANSITION))
        )
        (event,) = auditor.events(K.AUDIT_EVENT_KIND_DUPLICATE_TRANSITION)
        assert event.mutation_id == second.mutation_id
        assert from_proto(event.details["earlier_mutation_id"]) == first.mutation_id
        assert event.field == "status" and event.record_id == "t"
    finally:
        auditor.close()


def test_an_lww_overwrite_is_audited_with_the_value_that_lost(
    audit: SyncProcess, sync: SyncEnv
) -> None:
    from fieldsync.values import Timestamp

    a, b = sync.client(sub="a"), sync.client(sub="b")
    a.one("t", {"title": "x", "seen_at": Timestamp(1_000)}, op=PUT)
    a.one("t", {"seen_at": Timestamp(2_000)}, base=1)
    assert b.one("t", {"seen_at": Timestamp(1_500)}, base=1).status == S.MUTATION_STATUS_MERGED
    auditor = Auditor(audit.address)
    try:
        _wait_for("the event", lambda: bool(auditor.events(K.AUDIT_EVENT_KIND_LWW_OVERWRITE)))
        (event,) = auditor.events(K.AUDIT_EVENT_KIND_LWW_OVERWRITE)
        assert event.field == "seen_at"
        assert from_proto(event.details["overwritten"]) == Timestamp(2_000)
        assert from_proto(event.details["value"]) == Timestamp(1_500)
        # Another tenant's auditor sees none of it.
        other = Auditor(audit.address, tenant="globex")
        try:
            assert other.events() == []
        finally:
            other.close()
    finally:
        auditor.close()


def _sync_with_warnings(env: SyncEnv, n: int = 5000, every: int = 10) -> int:
    """n mutations, every `every`-th with an unknown field: returns the warnings raised."""
    c = env.client(sub="rep")
    warnings = 0
    for start in range(0, n, 500):
        batch = []
        for i in range(start, start + 500):
            fields: dict[str, object] = {"title": f"t{i}"}
            if i % every == 0:
                fields["legacy_flag"] = True
                warnings += 1
            batch.append(c.mut(f"r{i}", fields, op=PUT))  # type: ignore[arg-type]
        assert all(r.status == S.MUTATION_STATUS_APPLIED for r in c.apply(*batch).results)
    return warnings


def _assert_each_exactly_once(auditor: Auditor, warnings: int) -> None:
    events = auditor.events(K.AUDIT_EVENT_KIND_VALIDATION_WARNING)
    assert len(events) == warnings
    assert len({e.event_id for e in events}) == warnings
    per_mutation = Counter(e.mutation_id for e in events)
    assert set(per_mutation.values()) == {1}


def test_events_raised_while_the_audit_service_is_down_all_arrive_once_it_is_back(
    tmp_path: Path, audit_addr: str, sync: SyncEnv
) -> None:
    started = time.monotonic()
    warnings = _sync_with_warnings(sync)  # the audit service is not running at all
    assert warnings == 500
    assert time.monotonic() - started < 60  # the sync never waited on the audit service
    storage = SqlStorage(sync.db_url)
    try:
        assert storage.outbox_depth()[0] == warnings
        proc = start_audit_service(
            f"sqlite:///{tmp_path / 'audit.db'}", tmp_path, address=audit_addr
        )
        auditor = Auditor(audit_addr)
        try:
            _wait_for("the outbox to drain", lambda: storage.outbox_depth()[0] == 0)
            _assert_each_exactly_once(auditor, warnings)
        finally:
            auditor.close()
            proc.stop()
    finally:
        storage.close()


def test_events_survive_the_audit_service_killed_three_times_during_delivery(
    tmp_path: Path, audit_addr: str
) -> None:
    # One event a call, so delivery takes long enough for kills to land inside it.
    config = dataclasses.replace(_sync_config(tmp_path, audit_addr), relay_batch_size=1)
    with running_sync(config) as sync:
        _killed_three_times(tmp_path, audit_addr, sync)


def _killed_three_times(tmp_path: Path, audit_addr: str, sync: SyncEnv) -> None:
    audit_db = f"sqlite:///{tmp_path / 'audit.db'}"
    warnings = _sync_with_warnings(sync)  # queued in the outbox
    storage = SqlStorage(sync.db_url)
    auditor = Auditor(audit_addr)
    left_at_kill = []
    try:
        for threshold in (50, 150, 250):
            proc = start_audit_service(audit_db, tmp_path, address=audit_addr)

            def delivered(t: int = threshold) -> bool:
                return len(auditor.events(K.AUDIT_EVENT_KIND_VALIDATION_WARNING)) >= t

            _wait_for(f"{threshold} delivered", delivered)
            proc.kill()
            proc.close()
            left_at_kill.append(storage.outbox_depth()[0])
        # Each kill came while events were still on their way.
        assert all(left > 0 for left in left_at_kill), left_at_kill
        proc = start_audit_service(audit_db, tmp_path, address=audit_addr)
        try:
            _wait_for("the outbox to drain", lambda: storage.outbox_depth()[0] == 0)
            _assert_each_exactly_once(auditor, warnings)
        finally:
            proc.stop()
    finally:
        auditor.close()
        storage.close()


def test_a_text_overlap_and_rejected_text_edits_are_audited_with_the_texts_and_operations(
    audit: SyncProcess, sync: SyncEnv
) -> None:
    from fieldsync.textops import Retain
    from fieldsync.values import Json
    from tests.test_text_fields import with_edits

    a, b = sync.client(sub="a"), sync.client(sub="b")
    a.one("n", {"title": "t", "notes": "Call the quick courier"}, op=PUT)
    a.one("n", {"notes": "Call the slow courier"}, base=1)
    r = b.one("n", {"notes": "Call the fast courier"}, base=1)
    assert list(r.text_overlaps) == ["notes"]
    (bad,) = b.apply(with_edits(b.mut("n", base=1), "notes", [Retain(999)])).results
    assert bad.status == S.MUTATION_STATUS_REJECTED
    auditor = Auditor(audit.address)
    try:
        kinds = (K.AUDIT_EVENT_KIND_TEXT_OVERLAP_MERGED, K.AUDIT_EVENT_KIND_MUTATION_REJECTED)
        _wait_for("the events", lambda: len(auditor.events(*kinds)) == 2)
        (overlap,) = auditor.events(K.AUDIT_EVENT_KIND_TEXT_OVERLAP_MERGED)
        assert (overlap.field, overlap.mutation_id) == ("notes", r.mutation_id)
        assert {k: from_proto(v) for k, v in overlap.details.items()} == {
            "base": "Call the quick courier",
            "yours": "Call the fast courier",
            "theirs": "Call the slow courier",
            "merged": "Call the slowfast courier",
        }
        (rejected,) = auditor.events(K.AUDIT_EVENT_KIND_MUTATION_REJECTED)
        assert rejected.code == "TEXT_EDITS_INVALID"
        assert from_proto(rejected.details["text_edits.notes"]) == Json('[{"retain":999}]')
    finally:
        auditor.close()
