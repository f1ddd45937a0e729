"""The call observer: per-call metrics and the call log line (FIELDSYNC_LOG_CALLS).

`CallObserver` is what a service with a metrics endpoint or call logging
gives its `FieldSyncInterceptor` (fieldsync.interceptors), which calls it
from the one wrapper it puts around every handler: one interceptor layer
does authentication, error mapping and observation. A service with neither
has no observer, so then nothing of this runs for a call.

For each finished call it counts `fieldsync_rpc_handled_total` by status
code, observes `fieldsync_rpc_duration_seconds`, keeps
`fieldsync_streams_active` for streaming calls, and (with call logging)
writes one INFO line with the method, code, duration, tenant, client id and
trace id; never a token or a field value.

`on_request`, given by the service, sees the first request message of each
call (a Sync stream's hello, an ApplyBatch's batch) and returns the client id
for the log line; the sync service records its reconnect metrics there.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import grpc  # type: ignore[import-untyped, unused-ignore]  # stubs: types-grpcio

from fieldsync.metrics import ServiceMetrics

__all__ = ["Call", "CallObserver", "RequestHook"]

log = logging.getLogger("fieldsync.calls")

RequestHook = Callable[[str, Any], str | None]
"""(full method name, first request message) -> the caller's client id, if it names one."""

_STREAM_METHODS = frozenset({"Sync", "Pull", "Subscribe", "TailEvents"})
_CODE_NAMES = {status.value[0]: str(status.name) for status in grpc.StatusCode}


def _code_name(context: grpc.aio.ServicerContext[Any, Any], fallback: str) -> str:
    code = context.code()
    if code is None:
        return fallback
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    return _CODE_NAMES.get(code, fallback)  # an int, as some grpc.aio versions hold it


class _Method:
    """What the observer keeps of one method: its names and its metric children
    (looked up once: `.labels()` costs more than the increment)."""

    __slots__ = ("duration", "full", "handled", "method", "service", "streams")

    def __init__(self, full: str, metrics: ServiceMetrics | None) -> None:
        self.full = full
        self.service, _, self.method = full.lstrip("/").rpartition("/")
        self.handled: dict[str, Any] = {}
        self.duration = self.streams = None
        if metrics is not None:
            self.duration = metrics.rpc_duration.labels(self.service, self.method)
            if self.method in _STREAM_METHODS:
                self.streams = metrics.streams_active.labels(self.method)


class Call:
    """One call being observed; the interceptor sets `tenant` once it knows the caller."""

    __slots__ = ("client_id", "method", "observer", "start", "tenant")

    def __init__(self, observer: CallObserver, method: _Method) -> None:
        self.observer, self.method = observer, method
        self.start = time.perf_counter()
        self.client_id: str | None = None
        self.tenant: str | None = None

    def first(self, request: Any) -> None:
        """The call's first request message."""
        self.observer.first(self, request)

    def finish(self, context: grpc.aio.ServicerContext[Any, Any], fallback: str) -> None:
        """The call ended with the status `context` holds (`fallback` if it holds none)."""
        self.observer.finish(self, context, fallback)


class CallObserver:
    """See the module docstring."""

    def __init__(
        self,
        metrics: ServiceMetrics | None,
        *,
        log_calls: bool = False,
        on_request: RequestHook | None = None,
        trace_id: Callable[[], str | None] | None = None,
    ) -> None:
        self._metrics = metrics
        self._log_calls = log_calls
        self._on_request = on_request
        self._trace_id = trace_id
        self._methods: dict[str, _Method] = {}

    def start(self, full_method: str) -> Call:
        """A call of `full_method` begins (a stream: it is open from now)."""
        m = self._methods.get(full_method)
        if m is None:
            m = self._methods[full_method] = _Method(full_method, self._metrics)
        if m.streams is not None:
            m.streams.inc()
        return Call(self, m)

    def first(self, call: Call, request: Any) -> None:
        if self._on_request is not None:
            try:
                call.client_id = self._on_request(call.method.full, request)
            except Exception:  # an observer must never fail a call
                log.warning("request hook failed for %s", call.method.full, exc_info=True)

    def finish(
        self, call: Call, context: grpc.aio.ServicerContext[Any, Any], fallback: str
    ) -> None:
        elapsed = time.perf_counter() - call.start
        code = _code_name(context, fallback)
        m = call.method
        if m.streams is not None:
            m.streams.dec()
        if m.duration is not None:
            handled = m.handled.get(code)
            if handled is None:
                assert self._metrics is not None
                handled = m.handled[code] = self._metrics.rpc_handled.labels(
                    m.service, m.method, code
                )
            handled.inc()
            m.duration.observe(elapsed)
        if self._log_calls:
            log.info(
                "%s %s %.1fms",
                m.method,
                code,
                elapsed * 1000,
                extra={
                    "method": m.full,
                    "code": code,
                    "duration_ms": round(elapsed * 1000, 3),
                    "tenant": call.tenant,  # None: health checks and reflection carry no token
                    "client_id": call.client_id,
                    "trace_id": self._trace_id() if self._trace_id is not None else None,
                },
            )
