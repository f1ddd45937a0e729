"""Building and running the audit service: storage, servicer, health, reflection.

`AuditApp` holds what a running service shares (storage, verifier, the commit
signal); `add_services` registers everything on a grpc.aio server, so tests
run the real thing in process; `serve` is the process: migrate, listen, answer
health once ready, and on SIGTERM stop taking calls, end the open tails, let
the calls in flight finish within the grace period, and return.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health

from audit_service.config import AuditConfig
from audit_service.servicer import AuditServicer
from audit_service.storage import SqlAuditStorage
from audit_service.tail import CommitSignal
from fieldsync.auth import TokenVerifier
from fieldsync.interceptors import FieldSyncInterceptor
from fieldsync.metrics import AuditMetrics
from fieldsync.operations import Operations
from fieldsync.serving import (
    NOT_SERVING,
    SERVING,
    add_health,
    enable_reflection,
    listen,
    set_health,
    stop_event,
    tune_gc,
)
from fieldsync.v1 import audit_pb2, audit_pb2_grpc

__all__ = ["SERVICE_NAME", "AuditApp", "serve"]

log = logging.getLogger("fieldsync.audit")

SERVICE_NAME = audit_pb2.DESCRIPTOR.services_by_name["AuditService"].full_name


@dataclass
class AuditApp:
    config: AuditConfig
    storage: SqlAuditStorage
    verifier: TokenVerifier
    # Made by add_services, on the loop that serves: asyncio events belong to one loop.
    signal: CommitSignal | None = field(default=None, init=False)
    metrics: AuditMetrics | None = None

    @classmethod
    def from_config(cls, config: AuditConfig) -> AuditApp:
        if config.auth is None:
            raise ValueError("no token verification configured (FIELDSYNC_JWT_SECRET, ...)")
        verifier = TokenVerifier(config.auth)
        storage = SqlAuditStorage(
            config.db_url,
            sqlite_synchronous=config.sqlite_synchronous,
            pool_size=config.db_pool_size,
        )
        try:
            storage.migrate()
        except BaseException:
            storage.close()
            raise
        return cls(config, storage, verifier)

    def server_options(self) -> list[tuple[str, int]]:
        n = self.config.max_message_bytes
        return [
            ("grpc.max_receive_message_length", n),
            ("grpc.max_send_message_length", n),
            *self.config.limits.options(),
        ]

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [FieldSyncInterceptor(self.verifier)]

    def add_services(self, server: grpc.aio.Server) -> health.aio.HealthServicer:
        """Register the audit, health and reflection services; returns the health servicer."""
        self.signal = CommitSignal()
        servicer = AuditServicer(
            self.storage,
            self.signal,
            tail_poll_seconds=self.config.tail_poll_seconds,
            metrics=self.metrics,
        )
        audit_pb2_grpc.add_AuditServiceServicer_to_server(servicer, server)
        health_servicer = add_health(server)
        enable_reflection(server, [SERVICE_NAME])
        return health_servicer

    def begin_shutdown(self) -> None:
        """End the open tails (they would otherwise hold the stop for its whole grace)."""
        if self.signal is not None:
            self.signal.close()

    def close(self) -> None:
        self.storage.close()


async def serve(config: AuditConfig) -> None:
    # Signals first: a SIGTERM during startup (migrations) still ends gracefully.
    stop = stop_event()
    ops = Operations.start(
        "fieldsync-audit",
        tls=config.server_tls(),
        metrics=AuditMetrics() if config.metrics_addr else None,
        metrics_addr=config.metrics_addr,
        log_calls=config.log_calls,
        tracing=config.tracing,
    )
    app = AuditApp.from_config(config)
    app.metrics = ops.metrics
    tune_gc()
    try:
        server = grpc.aio.server(
            interceptors=[*ops.interceptors(), *app.interceptors()],
            options=app.server_options(),
        )
        health_servicer = app.add_services(server)
        names = ("", SERVICE_NAME)
        ops.serve_metrics(log)
        port = await listen(server, config.addr, health_servicer, names, ops.credentials)
        await set_health(health_servicer, names, SERVING)
        ops.announce(log, "audit service", config.addr, port, app.storage.dialect)

        await stop.wait()
        log.info("stopping: finishing calls in flight (grace %.1fs)", config.shutdown_grace_seconds)
        await set_health(health_servicer, names, NOT_SERVING)
        app.begin_shutdown()
        await server.stop(config.shutdown_grace_seconds)
    finally:
        app.close()
        ops.close()
    log.info("stopped")
