"""The server interceptor every FieldSync service installs: authentication and error mapping.

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

Handlers therefore raise domain errors and never call `context.abort` for
them. Role checks belong to the handlers (`require_role`), since which role a
call needs depends on what it touches.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from contextlib import aclosing, asynccontextmanager
from contextvars import ContextVar
from typing import Any

import grpc  # type: ignore[import-untyped, unused-ignore]  # stubs: types-grpcio
from grpc_status import rpc_status

from fieldsync.auth import Principal, TokenVerifier, bearer_from_metadata, require_role
from fieldsync.errors import FieldSyncError, internal_status
from fieldsync.wire_guard import (
    CallReservation,
    RequestBudget,
    check_request,
    checked_requests,
    guard_deserializer,
    outage_error,
)

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
    """Authenticates calls and maps their errors; see the module docstring."""

    def __init__(self, verifier: TokenVerifier, budget: RequestBudget | None = None) -> None:
        self._verifier = verifier
        self.budget = budget  # bytes of requests in flight, in all (fieldsync.wire_guard)

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method.startswith(UNAUTHENTICATED_METHOD_PREFIXES):
            return handler
        return self._wrap(handler, method, handler_call_details.invocation_metadata)

    def _authenticate(self, metadata: _Metadata | None) -> None:
        # Each RPC runs in its own asyncio task, hence its own copy of the
        # context: the principal set here is seen by this RPC's handler only
        # and needs no reset (a reset from an async generator closed in
        # another context would even fail).
        _principal.set(self._verifier.verify(bearer_from_metadata(metadata)))

    def _wrap(
        self, handler: grpc.RpcMethodHandler[Any, Any], method: str, metadata: _Metadata | None
    ) -> grpc.RpcMethodHandler[Any, Any]:
        reservation = CallReservation(self.budget) if self.budget is not None else None
        deserializer = guard_deserializer(handler.request_deserializer, reservation)
        serializer = handler.response_serializer

        if handler.unary_unary is not None:
            inner_uu: Callable[..., Any] = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                async with _statuses_for_errors(context, method, reservation):
                    self._authenticate(metadata)
                    return await _result(inner_uu(check_request(request), context))

            return grpc.unary_unary_rpc_method_handler(unary_unary, deserializer, serializer)

        if handler.unary_stream is not None:
            inner_us: Callable[..., Any] = handler.unary_stream

            async def unary_stream(
                request: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                async with _statuses_for_errors(context, method, reservation):
                    self._authenticate(metadata)
                    outcome = inner_us(check_request(request), context)
                    async with aclosing(_responses(outcome)) as responses:
                        async for response in responses:
                            yield response

            return grpc.unary_stream_rpc_method_handler(unary_stream, deserializer, serializer)

        if handler.stream_unary is not None:
            inner_su: Callable[..., Any] = handler.stream_unary

            async def stream_unary(
                requests: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> Any:
                async with _statuses_for_errors(context, method, reservation):
                    self._authenticate(metadata)
                    return await _result(inner_su(checked_requests(requests), context))

            return grpc.stream_unary_rpc_method_handler(stream_unary, deserializer, serializer)

        if handler.stream_stream is not None:
            inner_ss: Callable[..., Any] = handler.stream_stream

            async def stream_stream(
                requests: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                async with _statuses_for_errors(context, method, reservation):
                    self._authenticate(metadata)
                    outcome = inner_ss(checked_requests(requests), context)
                    async with aclosing(_responses(outcome)) as responses:
                        async for response in responses:
                            yield response

            return grpc.stream_stream_rpc_method_handler(stream_stream, deserializer, serializer)

        raise TypeError(f"{method}: the RPC method handler has no behaviour")


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
