"""Prometheus metrics (SPEC §11) scraped from real service processes after a known workload.

Both services run as processes with a metrics address (port 0: the port is
read from the start log, as an operator would); an SDK client that queued 12
writes offline syncs them, and a few direct calls add failures. The scrape
must show exactly those figures, label sets without any tenant, user or
client id, the audit outbox gauge back at 0 once the audit service has every
event, and the audit service's count of events stored by kind. On
PostgreSQL, two instances sharing one outbox each report the whole backlog,
and both fall back to 0 once the audit service has it.
"""

from __future__ import annotations

import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fieldsync.v1 import sync_pb2, sync_pb2_grpc
from fieldsync.values import FieldValue
from fieldsync_client import FieldSyncClient
from tests.pg import PG_SKIP_REASON, fresh_pg_database, pg_server_url
from tests.proc import SyncProcess, free_port, start_audit_service, start_sync_service
from tests.support import PUT, S, SyncEnv, token

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

SYNC = "fieldsync.v1.SyncService"


def metrics_url(proc: SyncProcess) -> str:
    """The endpoint the start log names (the service picked the port)."""
    found = re.search(r"metrics on (http://\S+/metrics)", proc.stderr_text())
    assert found, proc.describe()
    return found.group(1)


def scrape(url: str) -> tuple[str, Samples]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return text, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def wait_for(url: str, name: str, want: float, timeout: float = 20.0, **labels: str) -> Samples:
    deadline = time.monotonic() + timeout
    while True:
        _, samples = scrape(url)
        if value(samples, name, **labels) == want or time.monotonic() > deadline:
            return samples
        time.sleep(0.1)


@pytest.fixture
def services(tmp_path: Path) -> Iterator[tuple[SyncProcess, SyncProcess]]:
    audit = start_audit_service(
        f"sqlite:///{tmp_path / 'audit.db'}",
        tmp_path,
        env={"FIELDSYNC_AUDIT_METRICS_ADDR": "127.0.0.1:0"},
    )
    try:
        sync = start_sync_service(
            f"sqlite:///{tmp_path / 'sync.db'}",
            tmp_path,
            env={
                "FIELDSYNC_SYNC_METRICS_ADDR": "127.0.0.1:0",
                "FIELDSYNC_AUDIT_ADDR": audit.address,
                "FIELDSYNC_AUDIT_RELAY_MAX_BACKOFF": "0.5",
            },
        )
        try:
            yield sync, audit
        finally:
            sync.stop()
    finally:
        audit.stop()


def test_the_scrape_shows_the_workload_exactly_and_the_outbox_drains(
    tmp_path: Path, services: tuple[SyncProcess, SyncProcess]
) -> None:
    sync, audit = services
    sync_url, audit_url = metrics_url(sync), metrics_url(audit)

    # A device queues 12 writes offline (3 with a field the schema does not know),
    # then reconnects: one Sync stream whose hello reports the 12.
    with FieldSyncClient(tmp_path / "dev.db", sync.address, lambda: token()) as device:
        for i in range(12):
            fields: dict[str, object] = {"title": f"t{i}"}
            if i % 4 == 0:
                fields["legacy_flag"] = True
            device.put("tasks", f"t{i}", fields)  # type: ignore[arg-type]
        time.sleep(0.2)  # the queue has waited a little when the device reconnects
        report = device.sync()
        assert (report.applied, report.pending) == (12, 0)
        client_id = device.client_id

    with grpc.insecure_channel(sync.address) as ch:
        stub = sync_pb2_grpc.SyncServiceStub(ch)
        env = SyncEnv(sync.address, ch, stub, sync.db_url)
        # bob edits two titles; carol, from the same base, makes them 2 conflicts and
        # writes to a collection there is none of (1 rejected); she keeps theirs of one.
        bob, carol = env.client(sub="bob"), env.client(sub="carol")
        applied = bob.apply(
            bob.mut("t1", {"title": "bob's"}, base=1), bob.mut("t2", {"title": "bob's"}, base=1)
        )
        assert {r.status for r in applied.results} == {S.MUTATION_STATUS_APPLIED}
        clashed = carol.apply(
            carol.mut("t1", {"title": "carol's"}, base=1),
            carol.mut("t2", {"title": "carol's"}, base=1),
        )
        assert {r.status for r in clashed.results} == {S.MUTATION_STATUS_CONFLICT}
        nowhere = carol.one("n1", {"title": "x"}, op=PUT, collection="no_such_collection")
        assert nowhere.status == S.MUTATION_STATUS_REJECTED
        stub.ResolveConflict(
            sync_pb2.ResolveConflictRequest(
                conflict_id=clashed.results[0].conflict.conflict_id,
                resolution=sync_pb2.RESOLUTION_KEEP_THEIRS,
            ),
            metadata=carol.metadata,
        )
        with pytest.raises(grpc.RpcError) as no_token:
            stub.GetSchema(sync_pb2.GetSchemaRequest())
        assert no_token.value.code() == grpc.StatusCode.UNAUTHENTICATED

    text, got = scrape(sync_url)
    handled = "fieldsync_rpc_handled_total"
    assert value(got, handled, service=SYNC, method="Sync", code="OK") == 1
    assert value(got, handled, service=SYNC, method="ApplyBatch", code="OK") == 3
    # The write path: 12 + 2 applied, 2 conflicts, 1 rejected, 3 warnings, 1 answered.
    mutations = "fieldsync_mutations_total"
    assert value(got, mutations, collection="tasks", status="applied") == 14
    assert value(got, mutations, collection="tasks", status="conflict") == 2
    assert value(got, mutations, collection="unknown", status="rejected") == 1
    assert value(got, "fieldsync_validation_warnings_total", code="UNKNOWN_FIELD") == 3
    assert value(got, "fieldsync_conflicts_surfaced_total", kind="fields") == 2
    assert value(got, "fieldsync_conflicts_resolved_total", kind="fields") == 1
    # Sync, bob's, carol's two, the answer: five transactions, four of them waited for.
    assert value(got, "fieldsync_write_transactions_total") == 5
    assert value(got, "fieldsync_write_lock_wait_seconds_count") == 4
    assert value(got, handled, service=SYNC, method="GetSchema", code="UNAUTHENTICATED") == 1
    assert value(got, "fieldsync_rpc_duration_seconds_count", service=SYNC, method="Sync") == 1
    assert value(got, "fieldsync_streams_active", method="Sync") == 0
    # The hello's queue health: one reconnect with 12 queued, waiting a moment.
    assert value(got, "fieldsync_reconnect_backlog_mutations_count") == 1
    assert value(got, "fieldsync_reconnect_backlog_mutations_sum") == 12
    assert value(got, "fieldsync_reconnect_backlog_mutations_bucket", le="10.0") == 0
    assert value(got, "fieldsync_reconnect_backlog_mutations_bucket", le="50.0") == 1
    assert value(got, "fieldsync_reconnect_offline_seconds_count") == 1
    assert 0.2 <= value(got, "fieldsync_reconnect_offline_seconds_sum") < 60
    assert value(got, "process_resident_memory_bytes") > 0  # the standard process metrics
    # No tenant, user, client or record id in any label.
    for needle in ("acme", client_id, "alice", "bob", "carol", 't1"', "no_such_collection"):
        assert needle not in text, needle

    # The 3 warnings reach the audit service; the outbox gauge falls back to 0.
    got = wait_for(sync_url, "fieldsync_audit_outbox_events", 0)
    assert value(got, "fieldsync_audit_outbox_events") == 0
    assert value(got, "fieldsync_audit_outbox_oldest_seconds") == 0
    got = wait_for(audit_url, "fieldsync_audit_events_recorded_total", 3, kind="validation_warning")
    assert value(got, "fieldsync_audit_events_recorded_total", kind="validation_warning") == 3
    assert (
        value(
            got,
            "fieldsync_rpc_handled_total",
            service="fieldsync.v1.AuditService",
            method="RecordEvents",
            code="OK",
        )
        >= 1
    )


def test_without_a_metrics_address_there_is_no_endpoint(tmp_path: Path) -> None:
    sync = start_sync_service(
        f"sqlite:///{tmp_path / 'sync.db'}", tmp_path, env={"FIELDSYNC_AUDIT_RELAY": "0"}
    )
    try:
        assert "metrics on" not in sync.stderr_text()
    finally:
        sync.stop()


@pytest.mark.skipif(pg_server_url() is None, reason=PG_SKIP_REASON)
def test_two_instances_on_postgresql_each_report_the_shared_outbox(tmp_path: Path) -> None:
    server = pg_server_url()
    assert server is not None
    audit_address = f"127.0.0.1:{free_port()}"  # nothing there yet: the events wait
    with fresh_pg_database(server) as db_url:
        env = {
            "FIELDSYNC_SYNC_METRICS_ADDR": "127.0.0.1:0",
            "FIELDSYNC_AUDIT_ADDR": audit_address,
            "FIELDSYNC_AUDIT_RELAY_MAX_BACKOFF": "0.5",
        }
        syncs = [start_sync_service(db_url, tmp_path, env=env)]
        try:
            syncs.append(start_sync_service(db_url, tmp_path, env=env))
            # Three audit events: two warnings through the first instance, one through
            # the second.
            unknown: list[dict[str, FieldValue]] = [
                {"colour": "red", "legacy_flag": True},
                {"colour": "blue"},
            ]
            for n, (sync, fields) in enumerate(zip(syncs, unknown, strict=True)):
                with grpc.insecure_channel(sync.address) as ch:
                    stub = sync_pb2_grpc.SyncServiceStub(ch)
                    c = SyncEnv(sync.address, ch, stub, db_url).client()
                    res = c.one(f"t{n}", {"title": "x", **fields}, op=PUT)
                    assert res.status == S.MUTATION_STATUS_APPLIED
                    assert len(res.warnings) == len(fields)
            urls = [metrics_url(sync) for sync in syncs]
            for url in urls:
                text, got = scrape(url)
                assert value(got, "fieldsync_audit_outbox_events") == 3
                assert value(got, "fieldsync_audit_outbox_oldest_seconds") > 0
                assert "each reports the whole backlog" in text  # the help text says so

            audit = start_audit_service(
                f"sqlite:///{tmp_path / 'audit.db'}",
                tmp_path,
                address=audit_address,
                env={"FIELDSYNC_AUDIT_METRICS_ADDR": "127.0.0.1:0"},
            )
            try:
                for url in urls:
                    got = wait_for(url, "fieldsync_audit_outbox_events", 0)
                    assert value(got, "fieldsync_audit_outbox_events") == 0
                    assert value(got, "fieldsync_audit_outbox_oldest_seconds") == 0
                got = wait_for(
                    metrics_url(audit),
                    "fieldsync_audit_events_recorded_total",
                    3,
                    kind="validation_warning",
                )
                recorded = "fieldsync_audit_events_recorded_total"
                assert value(got, recorded, kind="validation_warning") == 3
            finally:
                audit.stop()
        finally:
            for sync in syncs:
                sync.stop()
