"""The call observer: per-call metrics and the call log line (FIELDSYNC_LOG_CALLS).

`CallObserver` is the outermost server interceptor of a service that has a
metrics endpoint or call logging; a service with neither does not install it,
so then nothing of this runs for a call. For each finished call it counts
`fieldsync_rpc_handled_total` by status code, observes
`fieldsync_rpc_duration_seconds`, keeps `fieldsync_streams_active` for
streaming calls, and (with call logging) writes one INFO line with the
method, code, duration, tenant, client id and trace id; never a token or a
field value.

`on_request`, given by the service, sees the first request message of each
call (a Sync stream's hello, an ApplyBatch's batch) and returns the client id
for the log line; the sync service records its reconnect metrics there.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any

import grpc  # type: ignore[import-untyped, unused-ignore]  # stubs: types-grpcio

from fieldsync.interceptors import current_principal
from fieldsync.metrics import ServiceMetrics

__all__ = ["CallObserver", "RequestHook"]

log = logging.getLogger("fieldsync.calls")

RequestHook = Callable[[str, Any], str | None]
"""(full method name, first request message) -> the caller's client id, if it names one."""

_STREAM_METHODS = frozenset({"Sync", "Pull", "Subscribe", "TailEvents"})


def _code_name(context: grpc.aio.ServicerContext[Any, Any], fallback: str) -> str:
    code = context.code()
    if code is None:
        return fallback
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    for status in grpc.StatusCode:  # an int, as some grpc.aio versions hold it
        if status.value[0] == code:
            return str(status.name)
    return fallback


class _Call:
    """One call being observed."""

    __slots__ = ("client_id", "method", "service", "start")

    def __init__(self, full_method: str) -> None:
        self.service, _, self.method = full_method.lstrip("/").rpartition("/")
        self.start = time.perf_counter()
        self.client_id: str | None = None


class CallObserver(grpc.aio.ServerInterceptor):  # type: ignore[misc, unused-ignore]
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
        # Label children looked up once: .labels() costs more than the increment.
        self._handled: dict[tuple[str, str, str], Any] = {}
        self._duration: dict[tuple[str, str], Any] = {}

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method: str = handler_call_details.method
        deserializer, serializer = handler.request_deserializer, handler.response_serializer
        observe = self

        if handler.unary_unary is not None:
            inner_uu: Callable[..., Any] = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                call = _Call(method)
                code = "UNKNOWN"
                try:
                    observe._first(call, request)
                    response = await _result(inner_uu(request, context))
                    code = "OK"
                    return response
                except asyncio.CancelledError:
                    code = "CANCELLED"
                    raise
                finally:
                    observe._finish(call, _code_name(context, code))

            return grpc.unary_unary_rpc_method_handler(unary_unary, deserializer, serializer)

        if handler.unary_stream is not None:
            inner_us: Callable[..., Any] = handler.unary_stream

            async def unary_stream(
                request: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                call = _Call(method)
                observe._opened(call)
                code = "UNKNOWN"
                try:
                    observe._first(call, request)
                    async for response in _responses(inner_us(request, context)):
                        yield response
                    code = "OK"
                except (asyncio.CancelledError, GeneratorExit):
                    code = "CANCELLED"
                    raise
                finally:
                    observe._closed(call)
                    observe._finish(call, _code_name(context, code))

            return grpc.unary_stream_rpc_method_handler(unary_stream, deserializer, serializer)

        if handler.stream_unary is not None:
            inner_su: Callable[..., Any] = handler.stream_unary

            async def stream_unary(
                requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
            ) -> Any:
                call = _Call(method)
                code = "UNKNOWN"
                try:
                    response = await _result(inner_su(observe._peek(call, requests), context))
                    code = "OK"
                    return response
                except asyncio.CancelledError:
                    code = "CANCELLED"
                    raise
                finally:
                    observe._finish(call, _code_name(context, code))

            return grpc.stream_unary_rpc_method_handler(stream_unary, deserializer, serializer)

        if handler.stream_stream is not None:
            inner_ss: Callable[..., Any] = handler.stream_stream

            async def stream_stream(
                requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                call = _Call(method)
                observe._opened(call)
                code = "UNKNOWN"
                try:
                    async for response in _responses(
                        inner_ss(observe._peek(call, requests), context)
                    ):
                        yield response
                    code = "OK"
                except (asyncio.CancelledError, GeneratorExit):
                    code = "CANCELLED"
                    raise
                finally:
                    observe._closed(call)
                    observe._finish(call, _code_name(context, code))

            return grpc.stream_stream_rpc_method_handler(stream_stream, deserializer, serializer)

        return handler

    async def _peek(self, call: _Call, requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """The request stream, its first message shown to `on_request` on the way."""
        first = True
        async for request in requests:
            if first:
                first = False
                self._first(call, request)
            yield request

    def _first(self, call: _Call, request: Any) -> None:
        if self._on_request is not None:
            try:
                call.client_id = self._on_request(f"/{call.service}/{call.method}", request)
            except Exception:  # an observer must never fail a call
                log.warning("request hook failed for %s", call.method, exc_info=True)

    def _opened(self, call: _Call) -> None:
        if self._metrics is not None and call.method in _STREAM_METHODS:
            self._metrics.streams_active.labels(call.method).inc()

    def _closed(self, call: _Call) -> None:
        if self._metrics is not None and call.method in _STREAM_METHODS:
            self._metrics.streams_active.labels(call.method).dec()

    def _finish(self, call: _Call, code: str) -> None:
        elapsed = time.perf_counter() - call.start
        m = self._metrics
        if m is not None:
            key = (call.service, call.method, code)
            handled = self._handled.get(key)
            if handled is None:
                handled = self._handled[key] = m.rpc_handled.labels(*key)
            handled.inc()
            dkey = (call.service, call.method)
            duration = self._duration.get(dkey)
            if duration is None:
                duration = self._duration[dkey] = m.rpc_duration.labels(*dkey)
            duration.observe(elapsed)
        if self._log_calls:
            try:
                tenant: str | None = current_principal().tenant_id
            except RuntimeError:
                tenant = None  # health checks and reflection carry no token
            log.info(
                "%s %s %.1fms",
                call.method,
                code,
                elapsed * 1000,
                extra={
                    "method": f"/{call.service}/{call.method}",
                    "code": code,
                    "duration_ms": round(elapsed * 1000, 3),
                    "tenant": tenant,
                    "client_id": call.client_id,
                    "trace_id": self._trace_id() if self._trace_id is not None else None,
                },
            )


async def _result(outcome: Any) -> Any:
    return await outcome if inspect.isawaitable(outcome) else outcome


async def _responses(outcome: Any) -> AsyncGenerator[Any, None]:
    """A streaming handler's responses: an async generator, a plain one, or a coroutine
    that sends with `context.write`."""
    if inspect.isasyncgen(outcome):
        async with aclosing(outcome):
            async for response in outcome:
                yield response
    elif hasattr(outcome, "__aiter__"):
        async for response in outcome:
            yield response
    elif inspect.isawaitable(outcome):
        await outcome
    elif outcome is not None:
        for response in outcome:
            yield response
