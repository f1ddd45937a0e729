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
import signal
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health, health_pb2

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
