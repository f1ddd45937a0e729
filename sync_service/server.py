"""Building and running the sync service: storage, schema, servicer, health, reflection.

`SyncApp` holds what a running service shares (storage, applier, notifier);
`add_services` registers everything on a grpc.aio server, so tests can run the
real thing in process; `serve` is the process: listen, answer health once
ready, and on SIGTERM stop taking calls, finish those in flight within the
grace period, and return.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from fieldsync.auth import TokenVerifier
from fieldsync.interceptors import FieldSyncInterceptor
from fieldsync.serving import NOT_SERVING, SERVING, listen, set_health, stop_event, tune_gc
from fieldsync.v1 import sync_pb2, sync_pb2_grpc
from sync_service.api.servicer import SyncServicer
from sync_service.config import SyncConfig
from sync_service.feed import ChangeNotifier
from sync_service.relay import HEALTH_NAME as RELAY_HEALTH_NAME
from sync_service.relay import AuditRelay, ServiceToken
from sync_service.schema_file import load_schema
from sync_service.storage.engine import ChangeListener
from sync_service.storage.sql import SqlStorage
from sync_service.writes.applier import Applier

log = logging.getLogger("fieldsync.sync")

SERVICE_NAME = sync_pb2.DESCRIPTOR.services_by_name["SyncService"].full_name


@dataclass
class SyncApp:
    config: SyncConfig
    storage: SqlStorage
    applier: Applier
    verifier: TokenVerifier
    relay: AuditRelay | None = None
    servicer: SyncServicer | None = None
    notifier: ChangeNotifier | None = None
    relay_task: asyncio.Task[None] | None = None
    feed_listener: ChangeListener | None = None

    @classmethod
    def from_config(cls, config: SyncConfig) -> SyncApp:
        if config.auth is None:
            raise ValueError("no token verification configured (FIELDSYNC_JWT_SECRET, ...)")
        schema = load_schema(config.schema_path)
        storage = SqlStorage(
            config.db_url,
            sqlite_synchronous=config.sqlite_synchronous,
            pool_size=config.db_pool_size,
            record_cache=config.record_cache,
        )
        storage.migrate()
        applier = Applier(storage, schema, max_batch=config.max_batch)
        return cls(config, storage, applier, TokenVerifier(config.auth))

    def server_options(self) -> list[tuple[str, int]]:
        n = self.config.max_message_bytes
        return [("grpc.max_receive_message_length", n), ("grpc.max_send_message_length", n)]

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [FieldSyncInterceptor(self.verifier)]

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
        )
        sync_pb2_grpc.add_SyncServiceServicer_to_server(servicer, server)
        # Commits of other instances (PostgreSQL) wake this one's Subscribe streams at once.
        self.feed_listener = self.storage.change_listener(
            asyncio.get_running_loop(), self.notifier.notify
        )
        if self.feed_listener is not None:
            self.feed_listener.start()
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            [SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], server
        )
        if self.config.relay_enabled:
            self.relay_task = asyncio.get_running_loop().create_task(
                self._run_relay(health_servicer), name="audit-relay"
            )
        return health_servicer

    async def _run_relay(self, health_servicer: health.aio.HealthServicer) -> None:
        auth = self.config.auth
        token = ServiceToken(
            secret=self.config.jwt_secret,
            token_file=self.config.service_token_file,
            audience=auth.audience if auth else "fieldsync",
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
            batch_size=self.config.relay_batch_size,
            max_backoff=self.config.relay_max_backoff_seconds,
            on_health=on_health,
        )
        await self.relay.run()

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
        if self.relay_task is not None:
            self.relay_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.relay_task

    def close(self) -> None:
        if self.feed_listener is not None:
            self.feed_listener.stop()
        self.storage.close()


async def serve(config: SyncConfig) -> None:
    # Signals first: a SIGTERM during startup (migrations) still ends gracefully.
    stop = stop_event()
    app = SyncApp.from_config(config)
    tune_gc()
    server = grpc.aio.server(interceptors=app.interceptors(), options=app.server_options())
    health_servicer = app.add_services(server)
    names = ("", SERVICE_NAME)
    port = await listen(server, config.addr, health_servicer, names)
    await app.wait_feed_listener()
    await set_health(health_servicer, names, SERVING)
    host = config.addr.rsplit(":", 1)[0]
    log.info("sync service listening on %s:%d (database %s)", host, port, app.storage.dialect)

    await stop.wait()
    log.info("stopping: finishing calls in flight (grace %.1fs)", config.shutdown_grace_seconds)
    await set_health(health_servicer, names, NOT_SERVING)
    app.begin_shutdown()
    await server.stop(config.shutdown_grace_seconds)
    if app.servicer is not None:
        log.info(
            "writes: %d applied in %d transactions",
            app.servicer.writes,
            app.servicer.write_transactions,
        )
    await app.subscriptions_ended(config.shutdown_grace_seconds)
    await app.stop_relay()
    app.close()
    log.info("stopped")
