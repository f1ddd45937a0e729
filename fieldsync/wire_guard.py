"""Requests that do not parse, and failures of the database, as the statuses callers expect.

grpc.aio runs a method's request deserializer before any handler code: bytes
that are not the method's message make it answer UNKNOWN (unary calls) or
raise inside the handler (streamed requests, so INTERNAL), with an ERROR
traceback each time. `guard_deserializer` turns a parse failure into a
`Malformed` value instead, which `check_request` / `checked_requests` raise as
INVALID_ARGUMENT, reason MALFORMED_MESSAGE, without a traceback.

`outage_error` says when an unexpected exception is the database or its disk
failing (`fieldsync.db.is_outage`): that is UNAVAILABLE (retry later), not a
bug. Nothing here knows a service.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fieldsync.db import is_outage
from fieldsync.errors import InvalidArgument, Reason, Unavailable

__all__ = [
    "Malformed",
    "check_request",
    "checked_requests",
    "guard_deserializer",
    "outage_error",
]


@dataclass(frozen=True)
class Malformed:
    """What a request deserializer gave for bytes that are not its message."""

    error: str


def guard_deserializer(
    deserializer: Callable[[bytes], Any] | None,
) -> Callable[[bytes], Any] | None:
    """The deserializer, answering `Malformed` instead of raising."""
    if deserializer is None:
        return None
    inner = deserializer

    def deserialize(data: bytes) -> Any:
        try:
            return inner(data)
        except Exception as err:  # DecodeError, or whatever a custom parser raises
            return Malformed(type(err).__name__)

    return deserialize


def check_request(request: Any) -> Any:
    """The request, or INVALID_ARGUMENT / MALFORMED_MESSAGE when it did not parse."""
    if isinstance(request, Malformed):
        raise InvalidArgument(
            Reason.MALFORMED_MESSAGE,
            "the request is not a valid protobuf message of this method",
            violations=[("request", "does not parse")],
        )
    return request


async def checked_requests(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """A stream of requests that raises MALFORMED_MESSAGE at the first that did not parse."""
    async for request in requests:
        yield check_request(request)


def outage_error(err: BaseException) -> Unavailable | None:
    """UNAVAILABLE (DATABASE_UNAVAILABLE) when `err` is a database outage, else None."""
    if not is_outage(err):
        return None
    return Unavailable(
        Reason.DATABASE_UNAVAILABLE,
        "the database is unavailable (lost connection, locked or full disk); retry later",
    )
