"""The process scaffolding both services share: stop signals, listening, health, reflection, GC.

Each service's `serve` builds its own app; what every service process does the
same way lives here: SIGTERM/SIGINT set an event (installed before the slow
start-up, so a stop during migrations still ends gracefully), the health
names answer NOT_SERVING from the moment the port opens until the service
says it is ready (never NOT_FOUND: a probe would take that for a wrong
name), and the same names go NOT_SERVING again when the stop begins.

`HealthServicer` adds `grpc.health.v1.Health/List` to grpcio's servicer (which
has Check and Watch only, so List answered UNIMPLEMENTED with a traceback a
call); `enable_reflection` serves `grpc.reflection.v1` beside `v1alpha` (the
package only ships v1alpha; the two protocols are the same messages under
another package name, so one servicer answers both).
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

__all__ = [
    "NOT_SERVING",
    "REFLECTION_V1",
    "SERVING",
    "HealthServicer",
    "add_health",
    "enable_reflection",
    "listen",
    "set_health",
    "stop_event",
    "tune_gc",
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
