"""Traces across both services (OTEL_EXPORTER_OTLP_ENDPOINT) into an OTLP collector in the test.

The collector is a real gRPC server implementing the OTLP trace service (from
opentelemetry-proto) on loopback; both services run as processes exporting to
it. A call that carries a caller's `traceparent` and writes an audit event
must come back as one trace: the caller's span, the sync service's call, the
relay's delivery and the audit service's RecordEvents; so must a conflict's
answer (ResolveConflict, both the answer that keeps the server's values and
the one that writes the caller's). Without the variable,
the services never import OpenTelemetry.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from fieldsync.v1 import audit_pb2, audit_pb2_grpc, sync_pb2, sync_pb2_grpc
from tests.proc import start_audit_service, start_sync_service
from tests.support import PUT, S, SyncEnv, token

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


@dataclass(frozen=True)
class Span:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: list[Span] = []
        self._lock = threading.Lock()

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        with self._lock:
            for rs in request.resource_spans:
                service = next(
                    (
                        a.value.string_value
                        for a in rs.resource.attributes
                        if a.key == "service.name"
                    ),
                    "",
                )
                for ss in rs.scope_spans:
                    for sp in ss.spans:
                        self.spans.append(
                            Span(
                                service,
                                sp.name,
                                sp.trace_id.hex(),
                                sp.span_id.hex(),
                                sp.parent_span_id.hex(),
                            )
                        )
        return trace_service_pb2.ExportTraceServiceResponse()

    def trace(self, trace_id: str) -> list[Span]:
        with self._lock:
            return [s for s in self.spans if s.trace_id == trace_id]


@pytest.fixture
def collector() -> Iterator[tuple[Collector, str]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = Collector()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield servicer, f"http://127.0.0.1:{port}"
    finally:
        server.stop(grace=None)


@dataclass
class Traced:
    """Both services as processes exporting spans to the collector, and a channel to sync."""

    spans: Collector
    env: SyncEnv
    audit_address: str


@pytest.fixture
def traced(tmp_path: Path, collector: tuple[Collector, str]) -> Iterator[Traced]:
    spans, endpoint = collector
    otel = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",  # export within 0.1 s, not the default 5 s
    }
    audit = start_audit_service(f"sqlite:///{tmp_path / 'audit.db'}", tmp_path, env=otel)
    try:
        sync = start_sync_service(
            f"sqlite:///{tmp_path / 'sync.db'}",
            tmp_path,
            env={**otel, "FIELDSYNC_AUDIT_ADDR": audit.address},
        )
        try:
            with grpc.insecure_channel(sync.address) as ch:
                env = SyncEnv(sync.address, ch, sync_pb2_grpc.SyncServiceStub(ch), sync.db_url)
                yield Traced(spans, env, audit.address)
        finally:
            sync.stop()
    finally:
        audit.stop()


def caller(tok: str) -> tuple[tuple[str, str], ...]:
    """A caller's metadata: its token and the `traceparent` of its own span."""
    return (
        ("authorization", f"Bearer {tok}"),
        ("traceparent", f"00-{TRACE_ID}-{CALLER_SPAN}-01"),
    )


def assert_one_trace(spans: Collector, method: str) -> None:
    """The caller's trace holds the sync call `method`, the relay's delivery of its events
    and both ends of RecordEvents, each the child of the one before, and nothing else."""
    want = {
        ("fieldsync-sync", f"/fieldsync.v1.SyncService/{method}"),
        ("fieldsync-sync", "fieldsync.relay deliver"),
        ("fieldsync-sync", "/fieldsync.v1.AuditService/RecordEvents"),
        ("fieldsync-audit", "/fieldsync.v1.AuditService/RecordEvents"),
    }
    # Each process exports its spans in its own time: wait for all four.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if want <= {(s.service, s.name) for s in spans.trace(TRACE_ID)}:
            break
        time.sleep(0.1)
    trace = spans.trace(TRACE_ID)
    by_name = {(s.service, s.name): s for s in trace}
    call = by_name[("fieldsync-sync", f"/fieldsync.v1.SyncService/{method}")]
    assert call.parent_id == CALLER_SPAN  # the caller's traceparent is continued
    deliver = by_name[("fieldsync-sync", "fieldsync.relay deliver")]
    assert deliver.parent_id == call.span_id  # through the outbox
    client = by_name[("fieldsync-sync", "/fieldsync.v1.AuditService/RecordEvents")]
    assert client.parent_id == deliver.span_id
    server = by_name[("fieldsync-audit", "/fieldsync.v1.AuditService/RecordEvents")]
    assert server.parent_id == client.span_id
    # Health checks and every other call are traces of their own.
    assert all(s.trace_id == TRACE_ID for s in trace)
    assert len(trace) == 4, trace


def test_a_callers_trace_runs_through_the_sync_call_the_outbox_and_record_events(
    traced: Traced,
) -> None:
    c = traced.env.client()
    batch = sync_pb2.ApplyBatchRequest(
        batch=sync_pb2.MutationBatch(
            client_id=c.client_id,
            schema_version=3,
            mutations=[c.mut("t1", {"title": "x", "colour": "red"}, op=PUT)],
        )
    )
    res = traced.env.stub.ApplyBatch(batch, metadata=caller(token())).result
    assert res.results[0].status == S.MUTATION_STATUS_APPLIED
    assert [w.code for w in res.results[0].warnings] == ["UNKNOWN_FIELD"]
    assert_one_trace(traced.spans, "ApplyBatch")


@pytest.mark.parametrize(
    "resolution", [sync_pb2.RESOLUTION_KEEP_THEIRS, sync_pb2.RESOLUTION_TAKE_YOURS]
)
def test_a_conflict_answers_audit_events_carry_its_callers_trace(
    traced: Traced, resolution: sync_pb2.Resolution.ValueType
) -> None:
    env = traced.env
    bob, carol = env.client(sub="bob"), env.client(sub="carol")
    assert bob.one("t1", {"title": "first"}, op=PUT).status == S.MUTATION_STATUS_APPLIED
    assert bob.one("t1", {"title": "bob's"}, base=1).status == S.MUTATION_STATUS_APPLIED
    clash = carol.one("t1", {"title": "carol's"}, base=1)
    assert clash.status == S.MUTATION_STATUS_CONFLICT
    # The conflict's own event (another trace) reaches the audit service first, so the
    # answer's events travel in a delivery of their own.
    with grpc.insecure_channel(traced.audit_address) as ch:
        stub = audit_pb2_grpc.AuditServiceStub(ch)
        auditor = (("authorization", f"Bearer {token('acme', 'ann', ['auditor'])}"),)
        deadline = time.monotonic() + 20
        kinds: list[int] = []
        while audit_pb2.AUDIT_EVENT_KIND_CONFLICT_SURFACED not in kinds:
            assert time.monotonic() < deadline, kinds
            got = stub.QueryEvents(audit_pb2.QueryEventsRequest(), metadata=auditor, timeout=5)
            kinds = [e.kind for e in got.events]
            time.sleep(0.05)

    answer = sync_pb2.ResolveConflictRequest(
        conflict_id=clash.conflict.conflict_id, resolution=resolution
    )
    env.stub.ResolveConflict(answer, metadata=caller(token(sub="carol")))
    assert_one_trace(traced.spans, "ResolveConflict")


def test_without_the_variable_the_services_never_import_opentelemetry(tmp_path: Path) -> None:
    probe = (
        "import sys\n"
        "from sync_service.config import SyncConfig\n"
        "from sync_service.server import SyncApp\n"
        "from audit_service.server import AuditApp\n"
        "from fieldsync.operations import Operations\n"
        "from fieldsync.metrics import SyncMetrics\n"
        "ops = Operations.start('x', tls=None, metrics=SyncMetrics(), metrics_addr=None,"
        " log_calls=True, tracing=False)\n"
        "assert ops.tracing is None and ops.interceptors() == []\n"
        "assert ops.observer() is not None\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('opentelemetry'))\n"
        "assert not loaded, loaded\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
