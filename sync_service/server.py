"""Building and running the sync service: storage, schema, servicer, health, reflection.

`SyncApp` holds what a running service shares (storage, applier, notifier);
`add_services` registers everything on a grpc.aio server, so tests can run the
real thing in process; `serve` is the process: listen, answer health once
ready, and on SIGTERM stop taking calls, finish those in flight within the
grace period, and return. The server's scaffolding (options, interceptors,
TLS, metrics endpoint, health, reflection) is fieldsync.serving's, shared with
the audit service.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2

from fieldsync.auth import DEFAULT_SERVICE_AUDIENCE, TokenVerifier
from fieldsync.calls import RequestHook
from fieldsync.metrics import SyncMetrics
from fieldsync.operations import Operations
from fieldsync.serving import ServiceApp, run_until_stopped, stop_event, tune_gc, verifier_for
from fieldsync.v1 import sync_pb2, sync_pb2_grpc
from fieldsync.wire_guard import RequestBudget
from sync_service.api.observe import request_hook
from sync_service.api.servicer import SyncServicer
from sync_service.config import SyncConfig
from sync_service.feed import ChangeNotifier
from sync_service.relay import HEALTH_NAME as RELAY_HEALTH_NAME
from sync_service.relay import AuditRelay, ServiceToken
from sync_service.retention import prune_history
from sync_service.schema_file import load_schema
from sync_service.storage.engine import ChangeListener
from sync_service.storage.sql import SqlStorage
from sync_service.writes.applier import Applier
from sync_service.writes.metrics import WriteMetrics

log = logging.getLogger("fieldsync.sync")

SERVICE_NAME = sync_pb2.DESCRIPTOR.services_by_name["SyncService"].full_name


@dataclass
class SyncApp(ServiceApp):
    service_name = SERVICE_NAME

    config: SyncConfig
    storage: SqlStorage
    applier: Applier
    verifier: TokenVerifier
    relay: AuditRelay | None = None
    servicer: SyncServicer | None = None
    notifier: ChangeNotifier | None = None
    relay_task: asyncio.Task[None] | None = None
    prune_task: asyncio.Task[None] | None = None
    feed_listener: ChangeListener | None = None
    ops: Operations[SyncMetrics] | None = None

    @classmethod
    def from_config(cls, config: SyncConfig) -> SyncApp:
        verifier = verifier_for(config.auth)
        schema = load_schema(config.schema_path)
        storage = SqlStorage(
            config.db_url,
            sqlite_synchronous=config.sqlite_synchronous,
            pool_size=config.db_pool_size,
            record_cache=config.record_cache,
        )
        try:
            storage.migrate()
            previous = storage.serve_schema(
                schema.version, allow_downgrade=config.allow_schema_downgrade
            )
        except BaseException:
            storage.close()
            raise
        if previous is not None and schema.version < previous:
            log.warning("serving schema version %d below %d (forced)", schema.version, previous)
        applier = Applier(storage, schema, max_batch=config.max_batch)
        return cls(config, storage, applier, verifier)

    @property
    def dialect(self) -> str:
        return self.storage.dialect

    def request_hook(self) -> RequestHook | None:
        return request_hook(self.ops.metrics) if self.ops is not None else None

    def request_budget(self) -> RequestBudget | None:
        return RequestBudget(self.config.max_inflight_request_bytes)

    def add_services(self, server: grpc.aio.Server) -> health.aio.HealthServicer:
        """Register the sync, health and reflection services, and start the audit relay.

        Call it on the loop that will run the server. Returns the health servicer.
        """
        self.notifier = ChangeNotifier()
        self.servicer = servicer = SyncServicer(
            self.applier,
            self.storage,
            self.notifier,
            pull_page_size=self.config.pull_page_size,
            subscribe_poll_seconds=self.config.subscribe_poll_seconds,
            pipeline=self.config.pg_pipeline,
            trace_source=self.ops.tracing.traceparent if self.ops and self.ops.tracing else None,
        )
        sync_pb2_grpc.add_SyncServiceServicer_to_server(servicer, server)
        # Commits of other instances (PostgreSQL) wake this one's Subscribe streams at once.
        self.feed_listener = self.storage.change_listener(
            asyncio.get_running_loop(), self.notifier.notify
        )
        if self.feed_listener is not None:
            self.feed_listener.start()
        health_servicer = self.add_health_and_reflection(server)
        if self.config.relay_enabled:
            self.relay_task = asyncio.get_running_loop().create_task(
                self._run_relay(health_servicer), name="audit-relay"
            )
        if self.config.history_retention_seconds > 0:
            self.prune_task = asyncio.get_running_loop().create_task(
                prune_history(
                    self.storage,
                    self.config.history_retention_seconds,
                    self.config.history_prune_interval_seconds,
                ),
                name="history-retention",
            )
        return health_servicer

    async def _run_relay(self, health_servicer: health.aio.HealthServicer) -> None:
        try:
            await self._relay(health_servicer)
        except Exception:
            # Said now, in the log and the relay's health, not as a traceback at SIGTERM.
            log.exception("the audit relay stopped: audit events stay in the outbox")
            await health_servicer.set(RELAY_HEALTH_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)

    async def _relay(self, health_servicer: health.aio.HealthServicer) -> None:
        auth = self.config.auth
        token = ServiceToken(
            secret=self.config.jwt_secret,
            token_file=self.config.service_token_file,
            audience=auth.service_audience if auth else DEFAULT_SERVICE_AUDIENCE,
            issuer=auth.issuer if auth else None,
        )

        async def on_health(ok: bool) -> None:
            status = (
                health_pb2.HealthCheckResponse.SERVING
                if ok
                else (health_pb2.HealthCheckResponse.NOT_SERVING)
            )
            await health_servicer.set(RELAY_HEALTH_NAME, status)

        self.relay = AuditRelay(
            self.storage,
            self.config.audit_addr,
            token,
            tls=self.config.audit_tls(),
            tracing=self.ops.tracing if self.ops else None,
            batch_size=self.config.relay_batch_size,
            max_backoff=self.config.relay_max_backoff_seconds,
            on_health=on_health,
        )
        await self.relay.run()

    async def before_serving(self) -> None:
        await self.wait_feed_listener()

    async def wait_feed_listener(self, timeout: float = 10.0) -> None:
        """Wait until the LISTEN is in place (if there is one), so that a service
        reporting SERVING already hears other instances' commits."""
        if self.feed_listener is not None and not await asyncio.to_thread(
            self.feed_listener.wait_ready, timeout
        ):
            log.warning("no LISTEN connection after %.0fs; Subscribe polls until it is up", timeout)

    def begin_shutdown(self) -> None:
        """Stop waking and end the streams that never finish on their own (Subscribe)."""
        if self.servicer is not None:
            self.servicer.begin_shutdown()
        if self.notifier is not None:
            self.notifier.close()

    async def subscriptions_ended(self, timeout: float) -> None:
        if self.servicer is not None:
            await self.servicer.subscriptions_ended(timeout)
            await asyncio.sleep(0)  # and gRPC's own task around each, one step behind

    async def stop_relay(self) -> None:
        """Stop the background tasks: the audit relay and the history retention."""
        for task in (self.relay_task, self.prune_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    def close(self) -> None:
        if self.feed_listener is not None:
            self.feed_listener.stop()
        self.storage.close()


async def serve(config: SyncConfig) -> None:
    # Signals first: a SIGTERM during startup (migrations) still ends gracefully.
    stop = stop_event()
    ops = Operations.start(
        "fieldsync-sync",
        tls=config.server_tls(),
        metrics=SyncMetrics() if config.metrics_addr else None,
        metrics_addr=config.metrics_addr,
        log_calls=config.log_calls,
        tracing=config.tracing,
    )
    audit_tls = config.audit_tls()
    if audit_tls is not None and config.relay_enabled:
        audit_tls.credentials()  # bad files are a start error, not a relay that never connects
    app = SyncApp.from_config(config)
    app.ops = ops
    if ops.metrics is not None:
        app.applier.observer = WriteMetrics(ops.metrics, app.applier.schema)
        ops.metrics.watch_outbox(app.storage.outbox_depth)
    tune_gc()
    await run_until_stopped(app, stop, log, "sync service")
    if app.servicer is not None:
        log.info(
            "writes: %d applied in %d transactions",
            app.servicer.writes,
            app.servicer.write_transactions,
        )
    await app.subscriptions_ended(config.shutdown_grace_seconds)
    await app.stop_relay()
    app.close()
    ops.close()
    log.info("stopped")
