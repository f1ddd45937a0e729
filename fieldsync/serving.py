"""The process scaffolding both services share: the app's server, stop signals, listening,
health, reflection, GC.

Each service's `serve` builds its own app (a `ServiceApp`: its server
options, interceptors, health and reflection come from here) and runs it with
`run_until_stopped`; what every service process does the same way lives
here: SIGTERM/SIGINT set an event (installed before the slow start-up, so
a stop during migrations still ends gracefully), the health names answer
NOT_SERVING from the moment the port opens until the service says it is
ready (never NOT_FOUND: a probe would take that for a wrong name), and the
same names go NOT_SERVING again when the stop begins.
`wait_until_serving` is the other side: how a launcher (tests, the bench)
waits for a service process it started.

`HealthServicer` adds `grpc.health.v1.Health/List` to grpcio's servicer (which
has Check and Watch only, so List answered UNIMPLEMENTED with a traceback a
call); `enable_reflection` serves `grpc.reflection.v1` beside `v1alpha` (the
package only ships v1alpha; the two protocols are the same messages under
another package name, so one servicer answers both).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from fieldsync.auth import AuthConfig, TokenVerifier
from fieldsync.calls import RequestHook
from fieldsync.interceptors import FieldSyncInterceptor
from fieldsync.operations import Operations
from fieldsync.wire_guard import RequestBudget

__all__ = [
    "NOT_SERVING",
    "REFLECTION_V1",
    "SERVING",
    "HealthServicer",
    "ServerLimits",
    "ServiceApp",
    "add_health",
    "enable_reflection",
    "listen",
    "run_until_stopped",
    "set_health",
    "stop_event",
    "tune_gc",
    "verifier_for",
    "wait_until_serving",
]

REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
_V1_FILE = "grpc/reflection/v1/reflection.proto"
# Far more than a service registers; past it List answers RESOURCE_EXHAUSTED, as the
# health protocol says a server should rather than send a huge answer.
_LIST_LIMIT = 100

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass(frozen=True)
class ServerLimits:
    """The gRPC server's connection limits, the same for both services.

    Read from the environment here (`from_env`), held by each service's config.
    """

    max_concurrent_streams: int = 1000
    """FIELDSYNC_MAX_CONCURRENT_STREAMS: calls (streams) one connection may have open
    at once (grpc.max_concurrent_streams); further calls on it wait for a free slot."""
    keepalive_seconds: float = 60.0
    """FIELDSYNC_KEEPALIVE_SECONDS: the server pings an idle connection this often, and
    drops it when no answer comes within FIELDSYNC_KEEPALIVE_TIMEOUT_SECONDS: a
    vanished client's streams are ended instead of held for ever."""
    keepalive_timeout_seconds: float = 20.0
    """FIELDSYNC_KEEPALIVE_TIMEOUT_SECONDS: how long the server waits for a ping's answer."""
    min_client_ping_seconds: float = 30.0
    """FIELDSYNC_MIN_CLIENT_PING_SECONDS: keepalive enforcement, the shortest interval
    between a client's pings the server tolerates; a client that pings more often
    is sent GOAWAY (ENHANCE_YOUR_CALM) after two such pings."""
    max_connection_idle_seconds: float = 0.0
    """FIELDSYNC_MAX_CONNECTION_IDLE_SECONDS: a connection with no call open for this
    long is closed (GOAWAY); 0 (default) keeps idle connections."""
    max_connection_age_seconds: float = 0.0
    """FIELDSYNC_MAX_CONNECTION_AGE_SECONDS: a connection older than this is asked to
    reconnect (GOAWAY), so clients spread over new instances behind a load balancer;
    calls open then get FIELDSYNC_MAX_CONNECTION_AGE_GRACE_SECONDS to finish. 0
    (default): no limit. A Subscribe stream ended this way is resumed by the client."""
    max_connection_age_grace_seconds: float = 30.0
    """FIELDSYNC_MAX_CONNECTION_AGE_GRACE_SECONDS: see max_connection_age_seconds."""

    def __post_init__(self) -> None:
        if self.max_concurrent_streams < 1:
            raise ValueError("FIELDSYNC_MAX_CONCURRENT_STREAMS must be at least 1")
        if self.keepalive_seconds <= 0 or self.keepalive_timeout_seconds <= 0:
            raise ValueError("FIELDSYNC_KEEPALIVE_SECONDS and _TIMEOUT_SECONDS must be positive")

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> ServerLimits:
        """The limits the environment gives; ValueError naming a bad variable."""
        d = cls()

        def number(name: str, default: float, kind: type[float] | type[int] = float) -> float:
            text = env.get(name)
            if not text:
                return default
            try:
                value = kind(text)
            except ValueError:
                raise ValueError(f"{name} must be a number, not {text!r}") from None
            if value < 0:
                raise ValueError(f"{name} must not be negative")
            return value

        return cls(
            max_concurrent_streams=int(
                number("FIELDSYNC_MAX_CONCURRENT_STREAMS", d.max_concurrent_streams, int)
            ),
            keepalive_seconds=number("FIELDSYNC_KEEPALIVE_SECONDS", d.keepalive_seconds),
            keepalive_timeout_seconds=number(
                "FIELDSYNC_KEEPALIVE_TIMEOUT_SECONDS", d.keepalive_timeout_seconds
            ),
            min_client_ping_seconds=number(
                "FIELDSYNC_MIN_CLIENT_PING_SECONDS", d.min_client_ping_seconds
            ),
            max_connection_idle_seconds=number(
                "FIELDSYNC_MAX_CONNECTION_IDLE_SECONDS", d.max_connection_idle_seconds
            ),
            max_connection_age_seconds=number(
                "FIELDSYNC_MAX_CONNECTION_AGE_SECONDS", d.max_connection_age_seconds
            ),
            max_connection_age_grace_seconds=number(
                "FIELDSYNC_MAX_CONNECTION_AGE_GRACE_SECONDS", d.max_connection_age_grace_seconds
            ),
        )

    def options(self) -> list[tuple[str, int]]:
        """The grpc server options for these limits."""

        def ms(seconds: float) -> int:
            return max(1, int(seconds * 1000))

        out = [
            ("grpc.max_concurrent_streams", self.max_concurrent_streams),
            ("grpc.keepalive_time_ms", ms(self.keepalive_seconds)),
            ("grpc.keepalive_timeout_ms", ms(self.keepalive_timeout_seconds)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", ms(self.min_client_ping_seconds)),
            ("grpc.http2.max_ping_strikes", 2),
        ]
        if self.max_connection_idle_seconds:
            out.append(("grpc.max_connection_idle_ms", ms(self.max_connection_idle_seconds)))
        if self.max_connection_age_seconds:
            out.append(("grpc.max_connection_age_ms", ms(self.max_connection_age_seconds)))
            out.append(
                ("grpc.max_connection_age_grace_ms", ms(self.max_connection_age_grace_seconds))
            )
        return out


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
    credentials: grpc.ServerCredentials | None = None,
) -> int:
    """Open `addr` (TLS with `credentials`) and start the server, its health names
    NOT_SERVING; the port bound."""
    await set_health(servicer, names, NOT_SERVING)
    if credentials is None:
        port = server.add_insecure_port(addr)
    else:
        port = server.add_secure_port(addr, credentials)
    if port == 0:
        raise SystemExit(f"cannot listen on {addr}")
    await server.start()
    return port


class HealthServicer(health.aio.HealthServicer):  # type: ignore[misc]  # grpc_health is untyped
    """grpcio's health servicer, with List: every name and its status, as Check answers."""

    async def List(
        self, request: health_pb2.HealthListRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> health_pb2.HealthListResponse:
        statuses = dict(self._server_status)
        if len(statuses) > _LIST_LIMIT:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"more than {_LIST_LIMIT} health names"
            )
        response = health_pb2.HealthListResponse()
        for name, status in statuses.items():
            response.statuses[name].status = status
        return response


def add_health(server: grpc.aio.Server) -> HealthServicer:
    """Register the health service (Check, Watch, List) on `server`."""
    servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    return servicer


def _register_v1_descriptor() -> None:
    """Put grpc.reflection.v1's file in the default pool, so reflection can describe it.

    It is v1alpha's file with the package renamed (the protocol is the same).
    """
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(_V1_FILE)
        return  # a newer grpcio-reflection (or an earlier call) registered it
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    old, new = proto.package, "grpc.reflection.v1"
    proto.name, proto.package = _V1_FILE, new
    for message in proto.message_type:
        for f in message.field:
            if f.type_name.startswith(f".{old}."):
                f.type_name = f".{new}." + f.type_name.removeprefix(f".{old}.")
    for service in proto.service:
        for method in service.method:
            method.input_type = f".{new}." + method.input_type.removeprefix(f".{old}.")
            method.output_type = f".{new}." + method.output_type.removeprefix(f".{old}.")
    proto.options.Clear()  # v1alpha's language options name v1alpha's packages
    pool.Add(proto)


def enable_reflection(server: grpc.aio.Server, service_names: Sequence[str]) -> None:
    """Serve server reflection, v1 and v1alpha, listing `service_names`, health and both."""
    _register_v1_descriptor()
    names = [*service_names, health.SERVICE_NAME, REFLECTION_V1, reflection.SERVICE_NAME]
    # v1alpha registered as the package does it; v1 is the same servicer under its name.
    servicer = reflection.aio.ReflectionServicer(names)
    handler = grpc.method_handlers_generic_handler(
        REFLECTION_V1,
        {
            "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                servicer.ServerReflectionInfo,
                request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
                response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
            )
        },
    )
    server.add_generic_rpc_handlers((handler,))
    reflection.enable_server_reflection(names, server)


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

    @property
    def limits(self) -> ServerLimits: ...


def verifier_for(auth: AuthConfig | None) -> TokenVerifier:
    """The token verifier of a service; a ValueError if none is configured."""
    if auth is None:
        raise ValueError("no token verification configured (FIELDSYNC_JWT_SECRET, ...)")
    return TokenVerifier(auth)


class ServiceApp:
    """What both services' apps share (SyncApp, AuditApp): the server they run on.

    A subclass names its gRPC service and registers its servicer in
    `add_services` (with `add_health_and_reflection`); tests run it in
    process the same way. `ops` (TLS, metrics, call logs, traces) is set by
    the process's `serve`; without it (in-process tests) the server is
    plaintext and observes nothing.
    """

    service_name: ClassVar[str]  # the full name of the service's gRPC service
    config: ServiceConfig
    verifier: TokenVerifier
    ops: Operations[Any] | None

    @property
    def dialect(self) -> str:
        """The database's engine, for the log."""
        raise NotImplementedError

    def server_options(self) -> list[tuple[str, int]]:
        n = self.config.max_message_bytes
        return [
            ("grpc.max_receive_message_length", n),
            ("grpc.max_send_message_length", n),
            *self.config.limits.options(),
        ]

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """Tracing's first (with tracing on), then authentication, errors and the call
        observer (metrics, call logs) in one layer."""
        if self.ops is None:
            return [FieldSyncInterceptor(self.verifier, self.request_budget())]
        observer = self.ops.observer(self.request_hook())
        return [
            *self.ops.interceptors(),
            FieldSyncInterceptor(self.verifier, self.request_budget(), observer),
        ]

    def request_hook(self) -> RequestHook | None:
        """What the call observer tells about each request (None: nothing)."""
        return None

    def request_budget(self) -> RequestBudget | None:
        """The bound on request bytes in flight over all calls (None: unbounded)."""
        return None

    def add_services(self, server: grpc.aio.Server) -> health.aio.HealthServicer:
        """Register everything on `server` (on the loop that will run it); the health servicer."""
        raise NotImplementedError

    def add_health_and_reflection(self, server: grpc.aio.Server) -> HealthServicer:
        health_servicer = add_health(server)
        enable_reflection(server, [self.service_name])
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
    the grace period to finish. With `app.ops`: TLS, and the metrics endpoint.
    """
    addr, grace, ops = app.config.addr, app.config.shutdown_grace_seconds, app.ops
    server = grpc.aio.server(interceptors=app.interceptors(), options=app.server_options())
    health_servicer = app.add_services(server)
    names = ("", app.service_name)
    if ops is not None:
        ops.serve_metrics(log)
    credentials = ops.credentials if ops is not None else None
    port = await listen(server, addr, health_servicer, names, credentials)
    await app.before_serving()
    await set_health(health_servicer, names, SERVING)
    if ops is not None:
        ops.announce(log, what, addr, port, app.dialect)
    else:
        host = addr.rsplit(":", 1)[0]
        log.info("%s listening on %s:%d (database %s)", what, host, port, app.dialect)

    await stop.wait()
    log.info("stopping: finishing calls in flight (grace %.1fs)", grace)
    await set_health(health_servicer, names, NOT_SERVING)
    app.begin_shutdown()
    await server.stop(grace)
