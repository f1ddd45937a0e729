"""Traces across both services (OTEL_EXPORTER_OTLP_ENDPOINT) into an OTLP collector in the test.

The collector is a real gRPC server implementing the OTLP trace service (from
opentelemetry-proto) on loopback; both services run as processes exporting to
it. A call that carries a caller's `traceparent` and writes an audit event
must come back as one trace: the caller's span, the sync service's call, the
relay's delivery and the audit service's RecordEvents. Without the variable,
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

from fieldsync.v1 import sync_pb2, sync_pb2_grpc
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


def test_a_callers_trace_runs_through_the_sync_call_the_outbox_and_record_events(
    tmp_path: Path, collector: tuple[Collector, str]
) -> None:
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
                c = env.client()
                batch = sync_pb2.ApplyBatchRequest(
                    batch=sync_pb2.MutationBatch(
                        client_id=c.client_id,
                        schema_version=3,
                        mutations=[c.mut("t1", {"title": "x", "colour": "red"}, op=PUT)],
                    )
                )
                metadata = (
                    ("authorization", f"Bearer {token()}"),
                    ("traceparent", f"00-{TRACE_ID}-{CALLER_SPAN}-01"),
                )
                res = env.stub.ApplyBatch(batch, metadata=metadata).result
                assert res.results[0].status == S.MUTATION_STATUS_APPLIED
                assert [w.code for w in res.results[0].warnings] == ["UNKNOWN_FIELD"]

            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                names = {(s.service, s.name) for s in spans.trace(TRACE_ID)}
                if ("fieldsync-audit", "/fieldsync.v1.AuditService/RecordEvents") in names:
                    break
                time.sleep(0.1)
        finally:
            sync.stop()
    finally:
        audit.stop()

    trace = spans.trace(TRACE_ID)
    by_name = {(s.service, s.name): s for s in trace}
    call = by_name[("fieldsync-sync", "/fieldsync.v1.SyncService/ApplyBatch")]
    assert call.parent_id == CALLER_SPAN  # the caller's traceparent is continued
    deliver = by_name[("fieldsync-sync", "fieldsync.relay deliver")]
    assert deliver.parent_id == call.span_id  # through the outbox
    client = by_name[("fieldsync-sync", "/fieldsync.v1.AuditService/RecordEvents")]
    assert client.parent_id == deliver.span_id
    server = by_name[("fieldsync-audit", "/fieldsync.v1.AuditService/RecordEvents")]
    assert server.parent_id == client.span_id
    # Health checks and everything else are traces of their own.
    assert all(s.trace_id == TRACE_ID for s in trace)


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
        "assert ops.tracing is None and len(ops.interceptors()) == 1\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('opentelemetry'))\n"
        "assert not loaded, loaded\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
