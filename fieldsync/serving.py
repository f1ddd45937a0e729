"""The process scaffolding both services share: the app's server, stop signals, health, GC.

Each service's `serve` builds its own app (a `ServiceApp`: its server
options, interceptor, health and reflection come from here) and runs it with
`run_until_stopped`; what every service process does the same way lives
here: SIGTERM/SIGINT set an event (installed before the slow start-up, so
a stop during migrations still ends gracefully), the health names answer
NOT_SERVING from the moment the port opens until the service says it is
ready (never NOT_FOUND: a probe would take that for a wrong name), and the
same names go NOT_SERVING again when the stop begins.
`wait_until_serving` is the other side: how a launcher (tests, the bench)
waits for a service process it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import subprocess
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from fieldsync.auth import AuthConfig, TokenVerifier
from fieldsync.interceptors import FieldSyncInterceptor

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def tune_gc() -> None:
    """Run the cycle collector far less often than Python's default.

    A batch allocates tens of thousands of short-lived objects, freed by
    reference counting (they hold no cycles); at the default threshold (700
    allocations) the collector ran dozens of times a batch and, now and then,
    walked every object the process holds (its record cache included): 22%
    of a reconnect's time. Call it once the service is built: what exists by
    then (modules, schema, configuration) is frozen out of every collection.
    """
    gc.freeze()
    gc.set_threshold(50_000, 20, 10)


def stop_event() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT (call it on the loop that serves)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def set_health(
    servicer: health.aio.HealthServicer,
    names: Sequence[str],
    status: health_pb2.HealthCheckResponse.ServingStatus.ValueType,
) -> None:
    for name in names:
        await servicer.set(name, status)


async def listen(
    server: grpc.aio.Server,
    addr: str,
    servicer: health.aio.HealthServicer,
    names: Sequence[str],
) -> int:
    """Open `addr` and start the server, its health names NOT_SERVING; the port bound."""
    await set_health(servicer, names, NOT_SERVING)
    port = server.add_insecure_port(addr)
    if port == 0:
        raise SystemExit(f"cannot listen on {addr}")
    await server.start()
    return port


def wait_until_serving(
    channel: grpc.Channel,
    names: Sequence[str],
    time_left: Callable[[], float],
    process: subprocess.Popen[Any],
) -> None:
    """Poll the standard health check (no token) until each of `names` answers SERVING.

    `time_left()` runs before every try: the seconds left, or it raises (the
    process exited, the time is up). After an answer other than SERVING
    (listening, not ready yet) it waits a moment for `process` (the service's),
    so the loop does not hammer the service.
    """
    pending = list(names)
    stub = health_pb2_grpc.HealthStub(channel)
    while pending:
        left = time_left()
        try:
            # wait_for_ready: the call waits for the connection instead of
            # failing at once, so this loop does not spin while it starts.
            status = stub.Check(
                health_pb2.HealthCheckRequest(service=pending[0]),
                timeout=min(0.5, left),
                wait_for_ready=True,
            )
        except grpc.RpcError as err:
            if err.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise
            continue
        if status.status == SERVING:
            pending.pop(0)
        else:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=0.05)


class ServiceConfig(Protocol):
    """What serving needs of a service's configuration (SyncConfig, AuditConfig)."""

    @property
    def addr(self) -> str: ...

    @property
    def max_message_bytes(self) -> int: ...

    @property
    def shutdown_grace_seconds(self) -> float: ...


def verifier_for(auth: AuthConfig | None) -> TokenVerifier:
    """The token verifier of a service; a ValueError if none is configured."""
    if auth is None:
        raise ValueError("no token verification configured (FIELDSYNC_JWT_SECRET, ...)")
    return TokenVerifier(auth)


class ServiceApp:
    """What both services' apps share (SyncApp, AuditApp): the server they run on.

    A subclass names its gRPC service and registers its servicer in
    `add_services` (with `add_health_and_reflection`); tests run it in
    process the same way.
    """

    service_name: ClassVar[str]  # the full name of the service's gRPC service
    config: ServiceConfig
    verifier: TokenVerifier

    @property
    def dialect(self) -> str:
        """The database's engine, for the log."""
        raise NotImplementedError

    def server_options(self) -> list[tuple[str, int]]:
        n = self.config.max_message_bytes
        return [("grpc.max_receive_message_length", n), ("grpc.max_send_message_length", n)]

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [FieldSyncInterceptor(self.verifier)]

    def add_services(self, server: grpc.aio.Server) -> health.aio.HealthServicer:
        """Register everything on `server` (on the loop that will run it); the health servicer."""
        raise NotImplementedError

    def add_health_and_reflection(self, server: grpc.aio.Server) -> health.aio.HealthServicer:
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            [self.service_name, health.SERVICE_NAME, reflection.SERVICE_NAME], server
        )
        return health_servicer

    async def before_serving(self) -> None:
        """What must be in place before the health names answer SERVING."""

    def begin_shutdown(self) -> None:
        """End what never finishes on its own (open streams), once the stop begins."""


async def run_until_stopped(
    app: ServiceApp, stop: asyncio.Event, log: logging.Logger, what: str
) -> None:
    """Serve `app` on its address until `stop` is set, then stop within its grace.

    Health answers NOT_SERVING from the moment the port opens, SERVING once the
    app is ready, NOT_SERVING again when the stop begins; calls in flight get
    the grace period to finish.
    """
    addr, grace = app.config.addr, app.config.shutdown_grace_seconds
    server = grpc.aio.server(interceptors=app.interceptors(), options=app.server_options())
    health_servicer = app.add_services(server)
    names = ("", app.service_name)
    port = await listen(server, addr, health_servicer, names)
    await app.before_serving()
    await set_health(health_servicer, names, SERVING)
    host = addr.rsplit(":", 1)[0]
    log.info("%s listening on %s:%d (database %s)", what, host, port, app.dialect)

    await stop.wait()
    log.info("stopping: finishing calls in flight (grace %.1fs)", grace)
    await set_health(health_servicer, names, NOT_SERVING)
    app.begin_shutdown()
    await server.stop(grace)
