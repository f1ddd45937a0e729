"""OpenTelemetry traces (OTEL_EXPORTER_OTLP_ENDPOINT): set-up, interceptors, trace context.

Imported only when tracing is on (the services check the variable first), so
a service without it loads and runs no OpenTelemetry code at all. `Tracing`
installs a tracer provider that exports spans over OTLP/gRPC in batches (the
exporter reads the standard OTEL_* variables itself), gives the grpc.aio
server and client interceptors of opentelemetry-instrumentation-grpc (a
caller's W3C `traceparent` is continued), and turns the current span into a
`traceparent` string and back, which is how the trace of a call rides
through the audit outbox to the relay's RecordEvents.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.instrumentation.grpc import aio_client_interceptors, aio_server_interceptor
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Link
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

__all__ = ["Tracing"]

log = logging.getLogger("fieldsync.tracing")

_PROPAGATOR = TraceContextTextMapPropagator()


class Tracing:
    """One service process's tracing: its provider, interceptors and trace-context helpers."""

    def __init__(self, service_name: str) -> None:
        self.provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service_name}))
        self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        self.tracer = self.provider.get_tracer("fieldsync")
        log.info("tracing: exporting spans over OTLP as %s", service_name)

    def server_interceptor(self) -> Any:
        return aio_server_interceptor(tracer_provider=self.provider)  # type: ignore[no-untyped-call]

    def client_interceptors(self) -> list[Any]:
        interceptors = aio_client_interceptors(tracer_provider=self.provider)  # type: ignore[no-untyped-call]
        return list(interceptors)

    @staticmethod
    def trace_id() -> str | None:
        """The current span's trace id (32 hex digits), for log lines; None outside one."""
        ctx = trace.get_current_span().get_span_context()
        return f"{ctx.trace_id:032x}" if ctx.is_valid else None

    @staticmethod
    def traceparent() -> str | None:
        """The current span as a W3C `traceparent`, None outside one."""
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier)
        return carrier.get("traceparent")

    @contextmanager
    def continued(self, name: str, traceparents: Sequence[str]) -> Iterator[None]:
        """A span continuing the first trace of `traceparents`, linked to the others."""
        parents = [_PROPAGATOR.extract({"traceparent": tp}) for tp in dict.fromkeys(traceparents)]
        parent = parents[0] if parents else None
        links = [
            Link(trace.get_current_span(p).get_span_context())
            for p in parents[1:]
            if trace.get_current_span(p).get_span_context().is_valid
        ]
        with self.tracer.start_as_current_span(name, context=parent, links=links):
            yield

    def shutdown(self) -> None:
        """Export what is still buffered, then stop."""
        try:
            self.provider.shutdown()
        except Exception:
            log.warning("tracing: exporting the last spans failed", exc_info=True)
