"""Client side of the error contract: a failed call back into a typed `FieldSyncError`.

The server sends every domain error as a `google.rpc.Status` carrying an
`ErrorInfo` (domain "fieldsync", a stable reason) and, for bad requests,
`BadRequest` field violations (see `fieldsync.errors`). `error_from_rpc`
unpacks that into the same exception class the server raised, so SDK users
catch `fieldsync.errors.NotFound` rather than inspect status codes. Calls
that failed for other reasons (transport, deadline, a proxy) stay RpcErrors.
"""

from __future__ import annotations

from typing import Any

import grpc  # type: ignore[import-untyped, unused-ignore]  # stubs: types-grpcio
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from fieldsync.errors import ERROR_DOMAIN, FieldSyncError, Reason

__all__ = ["error_from_rpc"]


def _subclasses(cls: type[FieldSyncError]) -> list[type[FieldSyncError]]:
    found: list[type[FieldSyncError]] = []
    for sub in cls.__subclasses__():
        found += [sub, *_subclasses(sub)]
    return found


def _class_for(code: grpc.StatusCode) -> type[FieldSyncError] | None:
    # Looked up at call time so error classes added to fieldsync.errors later
    # are found without a second table to keep in step.
    for cls in _subclasses(FieldSyncError):
        if cls.code == code:
            return cls
    return None


def error_from_rpc(err: grpc.RpcError) -> FieldSyncError | grpc.RpcError:
    """The FieldSyncError a failed call carries, or `err` itself when it carries none.

    `err` is what a stub raised (sync or grpc.aio). The result is `err` when
    the status has no fieldsync ErrorInfo, when its reason is one this client
    does not know (a newer server), or when no error class has its code.
    """
    try:
        status: status_pb2.Status | None = rpc_status.from_call(err)
    except (ValueError, AttributeError):
        # Details that contradict the call's code or message, or an error
        # that is not a call at all: trust nothing in them.
        return err
    if status is None:
        return err
    info: Any = None
    violations: list[tuple[str, str]] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR) and info is None:
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad: Any = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations += [(v.field, v.description) for v in bad.field_violations]
    if info is None or info.domain != ERROR_DOMAIN:
        return err
    try:
        reason = Reason(info.reason)
    except ValueError:
        return err
    cls = _class_for(err.code())
    if cls is None:
        return err
    return cls(reason, status.message, violations=violations, metadata=dict(info.metadata))
