"""The connection to the sync service: channel, bearer token, deadlines, retries, errors.

`Transport.call` runs one attempt function (a unary call, or a whole stream
that stores what it receives as it goes) and retries it with exponential
backoff and jitter while the failure is one that waiting can cure
(UNAVAILABLE, DEADLINE_EXCEEDED). An attempt that made progress (stored
answers or pages) before failing resets the count, so a long sync over a
flaky link keeps going as long as it keeps moving. Every failure that ends the
call becomes one of the SDK's typed errors (_errors.py), with the server's
rich error unpacked by `fieldsync.client_errors.error_from_rpc`.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TypeVar

import grpc  # type: ignore[import-untyped, unused-ignore]  # stubs: types-grpcio

from fieldsync.client_errors import error_from_rpc
from fieldsync.errors import FieldSyncError
from fieldsync.v1 import sync_pb2_grpc

from ._errors import SyncError, SyncPermissionDenied, SyncUnauthenticated, SyncUnavailable

__all__ = ["RETRYABLE", "Metadata", "Transport"]

T = TypeVar("T")
Metadata = tuple[tuple[str, str], ...]

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})

_BACKOFF_FIRST = 0.1
_BACKOFF_CAP = 5.0
_MAX_MESSAGE_BYTES = 32 * 1024 * 1024  # the server's default limit

# gRPC's own reconnect backoff grows to 2 minutes by default: a phone that was
# offline for ten minutes would then fail fast long after the network is back.
# The SDK paces its retries itself, so the channel's stays short. (Not
# grpc.min_reconnect_backoff_ms: that is also the connect timeout, and a slow
# link needs its full 20 s; the call's deadline bounds the wait anyway.)
_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
]


def backoff_delay(failures: int, rng: random.Random | None = None) -> float:
    """Seconds to wait after the `failures`-th consecutive failure ("equal jitter").

    Doubling from 0.1 s to at most 5 s; half of it fixed, half random, so many
    clients cut off by one outage do not all come back in the same instant.
    """
    ceiling = min(_BACKOFF_CAP, _BACKOFF_FIRST * 2.0 ** (failures - 1))
    jitter = rng.uniform(0, ceiling / 2) if rng is not None else random.uniform(0, ceiling / 2)
    return ceiling / 2 + jitter


class Transport:
    """One channel to the sync service, and the rules every call follows."""

    def __init__(
        self,
        server: str,
        token_provider: Callable[[], str] | None,
        *,
        timeout: float,
        max_retries: int,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        if max_retries < 0:
            raise ValueError("max_retries must not be negative")
        self.server = server
        self.timeout = timeout
        self._token_provider = token_provider
        self._max_retries = max_retries
        if credentials is None:
            self._channel = grpc.insecure_channel(server, options=_CHANNEL_OPTIONS)
        else:
            self._channel = grpc.secure_channel(server, credentials, options=_CHANNEL_OPTIONS)
        self.stub = sync_pb2_grpc.SyncServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def metadata(self) -> Metadata:
        """The call's `authorization` metadata, with a token fresh from the provider."""
        if self._token_provider is None:
            raise SyncUnauthenticated("no token: this client was opened without a token provider")
        try:
            token = self._token_provider()
        except SyncError:
            raise  # the provider said what is wrong in the SDK's own terms
        except Exception as exc:  # the provider is the application's: say whose it was
            raise SyncUnauthenticated(f"the token provider failed: {exc}") from exc
        if not token:
            raise SyncUnauthenticated("no token: the token provider returned an empty one")
        return (("authorization", f"Bearer {token}"),)

    def call(
        self,
        what: str,
        attempt: Callable[[], T],
        progress: Callable[[], int] = lambda: 0,
    ) -> T:
        """`attempt()`, retried on transient failures; a typed SyncError when it gives up.

        `what` names the operation in messages ("sync", "list conflicts").
        `progress()` is a counter the attempt advances as it stores results.
        """
        failures = 0
        while True:
            before = progress()
            try:
                return attempt()
            except grpc.RpcError as err:
                code = _code(err)
                if code not in RETRYABLE:
                    raise self.error(err, what, failures + 1) from err
                if progress() > before:
                    failures = 0
                if failures >= self._max_retries:
                    raise self.error(err, what, failures + 1) from err
                failures += 1
                time.sleep(backoff_delay(failures))

    def error(self, err: grpc.RpcError, what: str, attempts: int = 1) -> SyncError:
        """The typed error for a failed call."""
        code = _code(err)
        unpacked = error_from_rpc(err)
        detail = unpacked if isinstance(unpacked, FieldSyncError) else None
        message = detail.message if detail is not None else _details(err)
        reason = str(detail.reason) if detail is not None else None
        name = code.name if code is not None else None
        tries = f" (gave up after {attempts} attempts)" if attempts > 1 else ""
        if code == grpc.StatusCode.UNAVAILABLE:
            return SyncUnavailable(
                f"{what}: the sync server at {self.server} is unreachable: {message}{tries}",
                code=name,
                reason=reason,
                detail=detail,
            )
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return SyncUnavailable(
                f"{what}: the sync server at {self.server} did not answer within "
                f"{self.timeout:g}s{tries}",
                code=name,
                reason=reason,
                detail=detail,
            )
        if code == grpc.StatusCode.UNAUTHENTICATED:
            because = f" ({reason})" if reason else ""
            return SyncUnauthenticated(
                f"{what}: the sync server refused the token{because}: {message}",
                code=name,
                reason=reason,
                detail=detail,
            )
        if code == grpc.StatusCode.PERMISSION_DENIED:
            return SyncPermissionDenied(
                f"{what}: not allowed: {message}", code=name, reason=reason, detail=detail
            )
        return SyncError(
            f"{what} failed: {name or 'error'}: {message}", code=name, reason=reason, detail=detail
        )


def _code(err: grpc.RpcError) -> grpc.StatusCode | None:
    # What the stubs raise is also a grpc.Call; an RpcError that is not has no code.
    code = getattr(err, "code", None)
    return code() if callable(code) else None


def _details(err: grpc.RpcError) -> str:
    details = getattr(err, "details", None)
    text = details() if callable(details) else None
    return str(text or err)
