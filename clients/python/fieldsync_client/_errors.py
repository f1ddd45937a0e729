"""The SDK's exceptions: one small tree, so callers catch what they can act on.

    ClientError                  any error this SDK raises on purpose
    ├── SyncError                a call to the server failed; the local queue is kept whole
    │   ├── SyncUnavailable      unreachable or too slow, after the retries
    │   │                        (UNAVAILABLE, DEADLINE_EXCEEDED): try again later
    │   ├── SyncUnauthenticated  no token, or the server refused it (UNAUTHENTICATED):
    │   │                        get a new token
    │   └── SyncPermissionDenied the token is valid but not allowed (PERMISSION_DENIED),
    │                            e.g. this client id belongs to another user
    └── ConflictNotFound         `resolve` named a conflict neither the client nor the
                                 server knows as open

A `SyncError` says what was attempted, carries the gRPC status code name and,
when the server sent a rich error, its stable `reason` (docs/errors.md) and the
typed `fieldsync.errors.FieldSyncError` it unpacks to (`detail`). Whatever
results had arrived before the failure are already stored: nothing is lost and
nothing needs undoing, the next `sync()` goes on from there.

Errors in the caller's own arguments are plain `ValueError`/`TypeError`.
"""

from __future__ import annotations

from fieldsync.errors import FieldSyncError

__all__ = [
    "ClientError",
    "ConflictNotFound",
    "SyncError",
    "SyncPermissionDenied",
    "SyncUnauthenticated",
    "SyncUnavailable",
]


class ClientError(Exception):
    """Base of every error this SDK raises on purpose."""


class SyncError(ClientError):
    """A call to the sync server failed; the local store and queue are intact."""

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        reason: str | None = None,
        detail: FieldSyncError | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        """The gRPC status code's name (e.g. "UNAVAILABLE"), when a call failed with one."""
        self.reason = reason
        """The server's stable reason code (e.g. "TOKEN_EXPIRED"), when it sent one."""
        self.detail = detail
        """The server's rich error as its typed exception, when it sent one."""


class SyncUnavailable(SyncError):
    """The server could not be reached, or did not answer in time, after the retries."""


class SyncUnauthenticated(SyncError):
    """There is no token, or the server refused it (bad, expired, wrong audience)."""


class SyncPermissionDenied(SyncError):
    """The token is valid but not allowed to do this (e.g. another user's client id)."""


class ConflictNotFound(ClientError, LookupError):
    """`resolve` named a conflict that is not open, as far as the client can learn."""
