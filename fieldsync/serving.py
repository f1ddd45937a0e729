"""The process scaffolding both services share: stop signals, listening, health, GC.

Each service's `serve` builds its own app; what every service process does the
same way lives here: SIGTERM/SIGINT set an event (installed before the slow
start-up, so a stop during migrations still ends gracefully), the health
names answer NOT_SERVING from the moment the port opens until the service
says it is ready (never NOT_FOUND: a probe would take that for a wrong
name), and the same names go NOT_SERVING again when the stop begins.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2

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
) -> int:
    """Open `addr` and start the server, its health names NOT_SERVING; the port bound."""
    await set_health(servicer, names, NOT_SERVING)
    port = server.add_insecure_port(addr)
    if port == 0:
        raise SystemExit(f"cannot listen on {addr}")
    await server.start()
    return port
