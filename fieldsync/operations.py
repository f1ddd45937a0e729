"""What a service process needs to be operated: TLS, metrics, call logs, traces.

`Operations.start` is called once per process with the service's settings and
returns what the server is built with: its server credentials (None for
plaintext), the tracing interceptor to install before the service's own, the
call observer the service's interceptor is given, the
metrics (None without a metrics address) and the tracing (None without
OTEL_EXPORTER_OTLP_ENDPOINT: then fieldsync.tracing, and OpenTelemetry, are
never imported). `announce` writes the start log line (address, transport,
metrics endpoint); `close` stops the metrics endpoint and flushes the traces.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import grpc  # type: ignore[import-untyped, unused-ignore]  # stubs: types-grpcio

from fieldsync.calls import CallObserver, RequestHook
from fieldsync.metrics import MetricsError, MetricsServer, ServiceMetrics, serve_metrics
from fieldsync.tls import (
    ServerTLS,
    TLSError,
    server_credentials,
    transport_description,
    warn_if_exposed,
)

if TYPE_CHECKING:
    from fieldsync.tracing import Tracing

__all__ = ["START_ERRORS", "Operations"]

START_ERRORS = (TLSError, MetricsError)
"""Bad operational settings found at start: the process says which and exits 2."""

M = TypeVar("M", bound=ServiceMetrics)


@dataclass
class Operations(Generic[M]):
    service: str
    """The service's name in logs and traces: fieldsync-sync or fieldsync-audit."""
    tls: ServerTLS | None
    metrics: M | None
    metrics_addr: str | None
    log_calls: bool
    tracing: Tracing | None
    credentials: grpc.ServerCredentials | None = None
    _metrics_server: MetricsServer | None = field(default=None, repr=False)

    @classmethod
    def start(
        cls,
        service: str,
        *,
        tls: ServerTLS | None,
        metrics: M | None,
        metrics_addr: str | None,
        log_calls: bool,
        tracing: bool,
    ) -> Operations[M]:
        """Check the TLS files (TLSError), set up tracing; the metrics endpoint opens in
        `serve_metrics`, once the service is built."""
        credentials = server_credentials(tls) if tls is not None else None
        tracer = None
        if tracing:
            from fieldsync.tracing import Tracing

            tracer = Tracing(service)
        return cls(service, tls, metrics, metrics_addr, log_calls, tracer, credentials)

    def interceptors(self) -> list[Any]:
        """Tracing's, outermost so every span covers the whole call; none without tracing.
        The call observer is not one: it rides in FieldSyncInterceptor (`observer`)."""
        return [self.tracing.server_interceptor()] if self.tracing is not None else []

    def observer(self, on_request: RequestHook | None = None) -> CallObserver | None:
        """What FieldSyncInterceptor observes calls with; None when nothing is observed."""
        if self.metrics is None and not self.log_calls:
            return None
        return CallObserver(
            self.metrics,
            log_calls=self.log_calls,
            on_request=on_request,
            trace_id=self.tracing.trace_id if self.tracing is not None else None,
        )

    def serve_metrics(self, log: logging.Logger) -> None:
        if self.metrics is None or self.metrics_addr is None:
            return
        self._metrics_server = serve_metrics(self.metrics.registry, self.metrics_addr)
        log.info(
            "metrics on http://%s:%d/metrics", self._metrics_server.host, self._metrics_server.port
        )

    @property
    def metrics_port(self) -> int | None:
        return self._metrics_server.port if self._metrics_server is not None else None

    def announce(self, log: logging.Logger, what: str, addr: str, port: int, database: str) -> None:
        """The start line, e.g. "sync service listening on 127.0.0.1:50051 (TLS, ...)"."""
        host = addr.rsplit(":", 1)[0]
        log.info(
            "%s listening on %s:%d (%s, database %s)",
            what,
            host,
            port,
            transport_description(self.tls),
            database,
        )
        warn_if_exposed(addr, self.tls, what)

    def close(self) -> None:
        if self._metrics_server is not None:
            self._metrics_server.close()
            self._metrics_server = None
        if self.tracing is not None:
            self.tracing.shutdown()
