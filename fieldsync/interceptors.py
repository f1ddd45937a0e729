"""The server interceptor every FieldSync service installs: authentication, error mapping
and (given a call observer) per-call metrics and the call log line.

`FieldSyncInterceptor` wraps each RPC handler so that, in order:

1. the caller's bearer token is verified (except for the standard health and
   reflection services, which load balancers and tools call without one) and
   the `Principal` is made available to the handler via `current_principal()`;
2. a request that does not parse is INVALID_ARGUMENT / MALFORMED_MESSAGE
   (fieldsync.wire_guard), never a traceback;
3. errors are turned into statuses, in this one place: a `FieldSyncError`
   becomes its rich `google.rpc.Status`; a database outage is UNAVAILABLE /
   DATABASE_UNAVAILABLE (logged as a warning); anything else is logged with its
   traceback (logger "fieldsync") and reaches the caller as an opaque INTERNAL.

4. with a `CallObserver` (fieldsync.calls: the service has a metrics address or
   logs its calls), the call is observed from the same wrapper: its first
   request message, its status code and duration, its stream open. Health
   checks and reflection are observed too, still without a token. One
   interceptor layer doing both costs a call less than two.

Handlers therefore raise domain errors and never call `context.abort` for
them. Role checks belong to the handlers (`require_role`), since which role a
call needs depends on what it touches.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from contextlib import aclosing, asynccontextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import grpc  # type: ignore[import-untyped, unused-ignore]  # stubs: types-grpcio
from grpc_status import rpc_status

from fieldsync.auth import Principal, TokenVerifier, bearer_from_metadata, require_role
from fieldsync.errors import FieldSyncError, internal_status
from fieldsync.wire_guard import (
    CallReservation,
    RequestBudget,
    check_request,
    guard_deserializer,
    outage_error,
)

if TYPE_CHECKING:
    from fieldsync.calls import Call, CallObserver

__all__ = [
    "UNAUTHENTICATED_METHOD_PREFIXES",
    "FieldSyncInterceptor",
    "current_principal",
    "require_role",
]

log = logging.getLogger("fieldsync")

# Infrastructure services answered without a token: health checks come from
# load balancers and orchestrators that hold no FieldSync credentials.
UNAUTHENTICATED_METHOD_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")

_principal: ContextVar[Principal | None] = ContextVar("fieldsync_principal", default=None)

_Metadata = Sequence[tuple[str, str | bytes]]


def current_principal() -> Principal:
    """The authenticated caller of the RPC being handled.

    A RuntimeError (so an INTERNAL to the caller) outside an authenticated
    RPC: that is a bug, e.g. a health-check handler asking for a principal.
    """
    principal = _principal.get()
    if principal is None:
        raise RuntimeError("current_principal() called outside an authenticated RPC")
    return principal


@asynccontextmanager
async def _statuses_for_errors(
    context: grpc.aio.ServicerContext[Any, Any],
    method: str,
    reservation: CallReservation | None,
) -> AsyncIterator[None]:
    """Abort the RPC with the status an exception raised in the block stands for;
    give the call's request bytes back to the budget when it ends."""
    try:
        yield
    except grpc.aio.AbortError:
        # The handler (or we, for an earlier error) already aborted: the status
        # is set, and aborting again would raise a UsageError.
        raise
    except FieldSyncError as err:
        await context.abort_with_status(rpc_status.to_status(err.to_status()))
    except Exception as err:
        outage = outage_error(err)
        if outage is not None:
            log.warning("%s: database unavailable: %s", method, _first_line(err))
            await context.abort_with_status(rpc_status.to_status(outage.to_status()))
        log.exception("unexpected error in %s", method)
        await context.abort_with_status(rpc_status.to_status(internal_status()))
    finally:
        if reservation is not None:
            reservation.release()


class FieldSyncInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc, unused-ignore]
    """Authenticates calls, maps their errors and observes them; see the module docstring."""

    def __init__(
        self,
        verifier: TokenVerifier,
        budget: RequestBudget | None = None,
        observer: CallObserver | None = None,
    ) -> None:
        self._verifier = verifier
        self.budget = budget  # bytes of requests in flight, in all (fieldsync.wire_guard)
        self._observer = observer

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
        if method.startswith(UNAUTHENTICATED_METHOD_PREFIXES):
            if self._observer is None:
                return handler
            # Observed like every call, but without a token and outside the budget:
            # a health check must answer however busy the service is.
            return self._wrap(handler, method, None, authenticate=False)
        return self._wrap(handler, method, handler_call_details.invocation_metadata)

    def _authenticate(self, metadata: _Metadata | None) -> Principal:
        # Each RPC runs in its own asyncio task, hence its own copy of the
        # context: the principal set here is seen by this RPC's handler only
        # and needs no reset (a reset from an async generator closed in
        # another context would even fail).
        principal = self._verifier.verify(bearer_from_metadata(metadata))
        _principal.set(principal)
        return principal

    def _wrap(
        self,
        handler: grpc.RpcMethodHandler[Any, Any],
        method: str,
        metadata: _Metadata | None,
        *,
        authenticate: bool = True,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        """The handler, authenticating first, mapping its errors and observing it (one
        wrapper a shape)."""
        reservation = (
            CallReservation(self.budget) if self.budget is not None and authenticate else None
        )
        deserializer = guard_deserializer(handler.request_deserializer, reservation)
        call = _CallSetup(self, method, metadata, reservation, authenticate)
        for kind, request_streams, response_streams, make in _HANDLER_KINDS:
            inner: Callable[..., Any] | None = getattr(handler, kind)
            if inner is None:
                continue
            checked = _checked_stream if request_streams else _checked_one
            wrapped = (
                call.streaming(inner, checked) if response_streams else call.unary(inner, checked)
            )
            return make(wrapped, deserializer, handler.response_serializer)
        raise TypeError(f"{method}: the RPC method handler has no behaviour")


class _CallSetup:
    """One call's wrapper, for a handler answering once or with a stream; `checked`
    vets its request (`_checked_one`) or request stream (`_checked_stream`) and shows
    the first message to the call's observer."""

    __slots__ = ("authenticate", "interceptor", "metadata", "method", "observer", "reservation")

    def __init__(
        self,
        interceptor: FieldSyncInterceptor,
        method: str,
        metadata: _Metadata | None,
        reservation: CallReservation | None,
        authenticate: bool,
    ) -> None:
        self.interceptor, self.method, self.metadata = interceptor, method, metadata
        self.reservation, self.authenticate = reservation, authenticate
        self.observer = interceptor._observer

    def begin(self) -> Call | None:
        return self.observer.start(self.method) if self.observer is not None else None

    def admit(self, seen: Call | None) -> None:
        """Authenticate the caller (unless the method needs no token)."""
        if self.authenticate:
            principal = self.interceptor._authenticate(self.metadata)
            if seen is not None:
                seen.tenant = principal.tenant_id

    def unary(self, inner: Callable[..., Any], checked: _Check) -> Callable[..., Any]:
        """unary_unary and stream_unary."""

        async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            seen = self.begin()
            code = "UNKNOWN"
            try:
                async with _statuses_for_errors(context, self.method, self.reservation):
                    self.admit(seen)
                    response = await _result(inner(checked(request, seen), context))
                    code = "OK"
                    return response
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            finally:
                if seen is not None:
                    seen.finish(context, code)

        return call

    def streaming(self, inner: Callable[..., Any], checked: _Check) -> Callable[..., Any]:
        """unary_stream and stream_stream."""

        async def call(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            seen = self.begin()
            code = "UNKNOWN"
            try:
                async with _statuses_for_errors(context, self.method, self.reservation):
                    self.admit(seen)
                    outcome = inner(checked(request, seen), context)
                    async with aclosing(_responses(outcome)) as responses:
                        async for response in responses:
                            yield response
                    code = "OK"
            except (asyncio.CancelledError, GeneratorExit):
                code = "CANCELLED"
                raise
            finally:
                if seen is not None:
                    seen.finish(context, code)

        return call


_Check = Callable[[Any, "Call | None"], Any]


def _checked_one(request: Any, seen: Call | None) -> Any:
    """The request, or MALFORMED_MESSAGE / SERVER_BUSY (wire_guard.check_request);
    the call's observer sees it."""
    request = check_request(request)
    if seen is not None:
        seen.first(request)
    return request


async def _checked_stream(requests: AsyncIterator[Any], seen: Call | None) -> AsyncIterator[Any]:
    """The request stream, checked message by message; the call's observer sees the first."""
    async for request in requests:
        request = check_request(request)
        if seen is not None:
            seen.first(request)
            seen = None
        yield request


# The four shapes of an RPC handler: its attribute, whether it takes a stream,
# whether it answers with one, and how grpc builds a handler of that shape.
_HANDLER_KINDS: tuple[
    tuple[str, bool, bool, Callable[..., grpc.RpcMethodHandler[Any, Any]]], ...
] = (
    ("unary_unary", False, False, grpc.unary_unary_rpc_method_handler),
    ("unary_stream", False, True, grpc.unary_stream_rpc_method_handler),
    ("stream_unary", True, False, grpc.stream_unary_rpc_method_handler),
    ("stream_stream", True, True, grpc.stream_stream_rpc_method_handler),
)


def _first_line(err: BaseException) -> str:
    """An exception's first line, bounded: a driver's message can run to many lines."""
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:300]


async def _result(outcome: Any) -> Any:
    """A unary handler's response, whether it is a coroutine or a plain function."""
    return await outcome if inspect.isawaitable(outcome) else outcome


async def _responses(outcome: Any) -> AsyncGenerator[Any, None]:
    """A streaming handler's responses, whatever style it is written in.

    grpc.aio takes an async generator, a plain generator, or a coroutine that
    sends with `context.write` and returns None; the wrapper must accept all three.
    """
    if inspect.isasyncgen(outcome):
        # Closed here, not left to garbage collection, when the call ends early.
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
