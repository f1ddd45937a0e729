"""The sync service's look at each call's first message: reconnect metrics and client ids.

`request_hook` is given to fieldsync.calls.CallObserver: a Sync stream's hello
reports the client's queue (`pending_mutations`, `oldest_pending_time`), which
becomes `fieldsync_reconnect_backlog_mutations` and
`fieldsync_reconnect_offline_seconds`; the hello's or batch's client id goes
to the call's log line (never to a metric label).
"""

from __future__ import annotations

from typing import Any

from fieldsync.calls import RequestHook
from fieldsync.metrics import SyncMetrics
from fieldsync.v1 import sync_pb2

__all__ = ["request_hook"]

_SERVICE = sync_pb2.DESCRIPTOR.services_by_name["SyncService"].full_name
_SYNC = f"/{_SERVICE}/Sync"
_APPLY = f"/{_SERVICE}/ApplyBatch"


def request_hook(metrics: SyncMetrics | None) -> RequestHook:
    def seen(method: str, request: Any) -> str | None:
        if method == _SYNC and isinstance(request, sync_pb2.SyncRequest):
            if request.WhichOneof("message") != "hello":
                return None
            hello = request.hello
            if metrics is not None:
                oldest = (
                    hello.oldest_pending_time.ToNanoseconds()
                    if hello.HasField("oldest_pending_time")
                    else None
                )
                metrics.hello(hello.pending_mutations, oldest)
            return hello.client_id or None
        if method == _APPLY and isinstance(request, sync_pb2.ApplyBatchRequest):
            return request.batch.client_id or None
        return None

    return seen
