"""Requests that do not parse, and failures of the database, as the statuses callers expect.

grpc.aio runs a method's request deserializer before any handler code: bytes
that are not the method's message make it answer UNKNOWN (unary calls) or
raise inside the handler (streamed requests, so INTERNAL), with an ERROR
traceback each time. `guard_deserializer` turns a parse failure into a
`Malformed` value instead, which `check_request` raises as
INVALID_ARGUMENT, reason MALFORMED_MESSAGE, without a traceback.

`RequestBudget` bounds the memory requests take in total: each request
message's bytes are counted from the moment it arrives (before it is
decoded) until its call ends (a stream: until it is a few messages behind);
one that would take the total over the budget is not decoded at all and the
call is answered RESOURCE_EXHAUSTED, SERVER_BUSY (retry later).

`outage_error` says when an unexpected exception is the database or its disk
failing (`fieldsync.db.is_outage`): that is UNAVAILABLE (retry later), not a
bug. Nothing here knows a service.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fieldsync.db import is_outage
from fieldsync.errors import InvalidArgument, Reason, ResourceExhausted, Unavailable

__all__ = [
    "CallReservation",
    "Malformed",
    "OverBudget",
    "RequestBudget",
    "check_request",
    "guard_deserializer",
    "outage_error",
]


@dataclass(frozen=True)
class Malformed:
    """What a request deserializer gave for bytes that are not its message."""

    error: str


@dataclass(frozen=True)
class OverBudget:
    """What a request deserializer gave for a message the budget had no room for."""

    size: int


class RequestBudget:
    """Bytes of request messages in flight, at most `limit` in all (0: no limit)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0
        self.refused = 0
        self._lock = threading.Lock()

    def take(self, n: int) -> bool:
        with self._lock:
            if self.limit and self.in_use + n > self.limit and self.in_use:
                # One message alone is always let through (gRPC's own limit,
                # max_message_bytes, bounds it): a budget below one message
                # would refuse it for ever.
                self.refused += 1
                return False
            self.in_use += n
            return True

    def give_back(self, n: int) -> None:
        with self._lock:
            self.in_use -= n


class CallReservation:
    """One call's share of the budget: a stream keeps its last `keep` messages'."""

    def __init__(self, budget: RequestBudget, keep: int = 8) -> None:
        self._budget = budget
        self._held: deque[int] = deque()
        self._keep = keep

    def take(self, n: int) -> bool:
        if not self._budget.take(n):
            return False
        self._held.append(n)
        while len(self._held) > self._keep:
            self._budget.give_back(self._held.popleft())
        return True

    def release(self) -> None:
        while self._held:
            self._budget.give_back(self._held.popleft())


def guard_deserializer(
    deserializer: Callable[[bytes], Any] | None,
    reservation: CallReservation | None = None,
) -> Callable[[bytes], Any] | None:
    """The deserializer, answering `Malformed` instead of raising, and `OverBudget`
    (without decoding) when `reservation` has no room for the message."""
    if deserializer is None:
        return None
    inner = deserializer

    def deserialize(data: bytes) -> Any:
        if reservation is not None and not reservation.take(len(data)):
            return OverBudget(len(data))
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
    if isinstance(request, OverBudget):
        raise ResourceExhausted(
            Reason.SERVER_BUSY,
            f"the server holds as many request bytes as it may; this {request.size}-byte"
            " message was not read: retry later (or send smaller batches)",
        )
    return request


def outage_error(err: BaseException) -> Unavailable | None:
    """UNAVAILABLE (DATABASE_UNAVAILABLE) when `err` is a database outage, else None."""
    if not is_outage(err):
        return None
    return Unavailable(
        Reason.DATABASE_UNAVAILABLE,
        "the database is unavailable (lost connection, locked or full disk); retry later",
    )
