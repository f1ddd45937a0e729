"""The domain errors of FieldSync, their stable reason codes, and their wire form.

    FieldSyncError                 any error a caller is told about
    ├── InvalidArgument            INVALID_ARGUMENT: a malformed request
    ├── Unauthenticated            UNAUTHENTICATED: no, bad or expired token
    ├── PermissionDenied           PERMISSION_DENIED: valid token, not allowed
    ├── NotFound                   NOT_FOUND
    ├── FailedPrecondition         FAILED_PRECONDITION: not in the state the call needs
    ├── Aborted                    ABORTED: lost a race; retrying may succeed
    ├── ResourceExhausted          RESOURCE_EXHAUSTED: too much in flight; retry later
    └── Unavailable                UNAVAILABLE: stopping, or its database is down; retry

Every error carries one `Reason` (a stable code, documented in docs/errors.md,
which a test keeps in step with this enum). `to_status` turns an error into a
`google.rpc.Status` with an `ErrorInfo` (domain `fieldsync`) and, for bad
requests, `BadRequest` field violations: that is what the server sends and
what the client SDK unpacks. Anything that is not a FieldSyncError is a bug
and reaches callers as an opaque INTERNAL.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

ERROR_DOMAIN = "fieldsync"


class Reason(StrEnum):
    """Stable reason codes; see docs/errors.md for when each happens and what to do."""

    MISSING_TOKEN = "MISSING_TOKEN"
    INVALID_TOKEN = "INVALID_TOKEN"
    TOKEN_EXPIRED = "TOKEN_EXPIRED"
    ROLE_REQUIRED = "ROLE_REQUIRED"
    CLIENT_ID_TAKEN = "CLIENT_ID_TAKEN"
    MISSING_CLIENT_ID = "MISSING_CLIENT_ID"
    BATCH_TOO_LARGE = "BATCH_TOO_LARGE"
    HELLO_REQUIRED = "HELLO_REQUIRED"
    CLIENT_ID_MISMATCH = "CLIENT_ID_MISMATCH"
    INVALID_MUTATION = "INVALID_MUTATION"
    INVALID_OP = "INVALID_OP"
    UNKNOWN_COLLECTION = "UNKNOWN_COLLECTION"
    BASE_VERSION_AHEAD = "BASE_VERSION_AHEAD"
    NO_APPLICABLE_FIELDS = "NO_APPLICABLE_FIELDS"
    TEXT_EDITS_INVALID = "TEXT_EDITS_INVALID"
    TEXT_FIELD_TWICE = "TEXT_FIELD_TWICE"
    INVALID_CURSOR = "INVALID_CURSOR"
    INVALID_PAGE_TOKEN = "INVALID_PAGE_TOKEN"
    INVALID_REQUEST = "INVALID_REQUEST"
    CONFLICT_NOT_FOUND = "CONFLICT_NOT_FOUND"
    CONFLICT_ALREADY_RESOLVED = "CONFLICT_ALREADY_RESOLVED"
    CONFLICT_STALE = "CONFLICT_STALE"
    INVALID_AUDIT_EVENT = "INVALID_AUDIT_EVENT"
    SHUTTING_DOWN = "SHUTTING_DOWN"
    MALFORMED_MESSAGE = "MALFORMED_MESSAGE"
    DATABASE_UNAVAILABLE = "DATABASE_UNAVAILABLE"
    SERVICE_TOKEN_REQUIRED = "SERVICE_TOKEN_REQUIRED"
    SERVER_BUSY = "SERVER_BUSY"
    INTERNAL = "INTERNAL"


class FieldSyncError(Exception):
    """Base of every error a caller is told about."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        reason: Reason,
        message: str,
        *,
        violations: Sequence[tuple[str, str]] = (),
        metadata: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.violations = tuple(violations)
        self.metadata = dict(metadata or {})

    def to_status(self) -> status_pb2.Status:
        return to_status(self.code, self.reason, self.message, self.violations, self.metadata)


class InvalidArgument(FieldSyncError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class Unauthenticated(FieldSyncError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(FieldSyncError):
    code = grpc.StatusCode.PERMISSION_DENIED


class NotFound(FieldSyncError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(FieldSyncError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(FieldSyncError):
    code = grpc.StatusCode.ABORTED


class ResourceExhausted(FieldSyncError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(FieldSyncError):
    code = grpc.StatusCode.UNAVAILABLE


# What an error may echo back: a status travels in a trailer (gRPC's default
# limit on metadata is 8 KB), and a request field can be megabytes long.
MAX_MESSAGE_CHARS = 1000
MAX_VIOLATIONS = 1000
MAX_VIOLATION_CHARS = 300


def clip(text: str, most: int = 80) -> str:
    """`text`, shortened to `most` characters (with a marker) when longer: for quoting
    a request's value in an error message."""
    if len(text) <= most:
        return text
    return f"{text[: most - 1]}…({len(text)} characters)"


def to_status(
    code: grpc.StatusCode,
    reason: Reason,
    message: str,
    violations: Sequence[tuple[str, str]] = (),
    metadata: dict[str, str] | None = None,
) -> status_pb2.Status:
    """A google.rpc.Status with ErrorInfo (and BadRequest when there are violations).

    Bounded whatever the error holds: a message or violation that quotes a huge
    request field is clipped, so the status always fits in a trailer.
    """
    status = status_pb2.Status(code=code.value[0], message=clip(message, MAX_MESSAGE_CHARS))
    info = error_details_pb2.ErrorInfo(reason=str(reason), domain=ERROR_DOMAIN)
    info.metadata.update({k: clip(v, MAX_VIOLATION_CHARS) for k, v in (metadata or {}).items()})
    detail = any_pb2.Any()
    detail.Pack(info)
    status.details.append(detail)
    if violations:
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=clip(f, MAX_VIOLATION_CHARS), description=clip(d, MAX_VIOLATION_CHARS)
                )
                for f, d in violations[:MAX_VIOLATIONS]
            ]
        )
        detail = any_pb2.Any()
        detail.Pack(bad)
        status.details.append(detail)
    return status


def internal_status() -> status_pb2.Status:
    return to_status(grpc.StatusCode.INTERNAL, Reason.INTERNAL, "internal error")


def reason_of(status: status_pb2.Status) -> str | None:
    """The ErrorInfo reason packed in a status, if any."""
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return str(info.reason)
    return None


assert grpc.StatusCode.INVALID_ARGUMENT.value[0] == code_pb2.INVALID_ARGUMENT
