"""The gRPC AuditService: checks the caller's role, converts wire messages, calls storage.

No SQL here. Database work runs in worker threads so the event loop keeps
serving other calls; FieldSyncErrors become statuses in the interceptor
(fieldsync.interceptors). Who may do what (SPEC §5):

- RecordEvents: a service token (audience FIELDSYNC_SERVICE_AUDIENCE, role
  `fieldsync:service`), a cross-tenant caller (each event names its own
  tenant). A user token, whatever its roles, is refused: user tokens of any
  tenant must not write any tenant's audit log.
- QueryEvents, TailEvents: role `auditor`, confined to the token's tenant.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import grpc

from audit_service.convert import (
    event_to_proto,
    filter_from_proto,
    kinds_from_proto,
    split_events,
)
from audit_service.paging import decode_page_token, encode_page_token
from audit_service.storage import AuditStorage
from audit_service.tail import CommitSignal, follow
from fieldsync.auth import SERVICE_ROLE, require_service
from fieldsync.errors import InvalidArgument, Reason
from fieldsync.interceptors import current_principal, require_role
from fieldsync.metrics import AuditMetrics
from fieldsync.v1 import audit_pb2, audit_pb2_grpc

__all__ = ["AUDITOR_ROLE", "SERVICE_ROLE", "AuditServicer"]

log = logging.getLogger("fieldsync.audit")

Ctx = grpc.aio.ServicerContext[Any, Any]

AUDITOR_ROLE = "auditor"

DEFAULT_PAGE = 100
MAX_PAGE = 1000


class AuditServicer(audit_pb2_grpc.AuditServiceServicer):
    def __init__(
        self,
        storage: AuditStorage,
        signal: CommitSignal,
        *,
        tail_poll_seconds: float = 1.0,
        metrics: AuditMetrics | None = None,
    ) -> None:
        self._storage = storage
        self._signal = signal
        self._poll = tail_poll_seconds
        self._metrics = metrics

    async def RecordEvents(
        self, request: audit_pb2.RecordEventsRequest, context: Ctx
    ) -> audit_pb2.RecordEventsResponse:
        require_service(current_principal())
        good, refused = split_events(request.events)
        outcome = await asyncio.to_thread(self._storage.record, good)
        if outcome.recorded:
            self._signal.notify()
        if self._metrics is not None:
            for kind, n in outcome.kinds.items():
                self._metrics.events_recorded.labels(kind.lower()).inc(n)
        if refused:
            # The good events stay stored: the sender's retry of the whole batch
            # counts them as duplicates, and one bad event never holds back the rest.
            # The bad ones are kept whole as dead letters (`fieldsync-audit
            # dead-letters`), so a sender may forget them: "dead_lettered" says so.
            new = await asyncio.to_thread(self._storage.dead_letter, refused)
            log.warning(
                "RecordEvents: %d malformed events kept as dead letters (%d new): %s",
                len(refused),
                new,
                "; ".join(f"{f}: {d}" for f, d in refused[0].reasons)[:500],
            )
            raise InvalidArgument(
                Reason.INVALID_AUDIT_EVENT,
                f"{len(refused)} of {len(request.events)} events are malformed and were"
                " not stored as events (they were kept as dead letters); the others were",
                violations=[v for letter in refused for v in letter.reasons],
                metadata={
                    "recorded": str(outcome.recorded),
                    "duplicates": str(outcome.duplicates),
                    "dead_lettered": str(len(refused)),
                },
            )
        return audit_pb2.RecordEventsResponse(
            recorded=outcome.recorded, duplicates=outcome.duplicates
        )

    async def QueryEvents(
        self, request: audit_pb2.QueryEventsRequest, context: Ctx
    ) -> audit_pb2.QueryEventsResponse:
        principal = current_principal()
        require_role(principal, AUDITOR_ROLE)
        flt = filter_from_proto(principal.tenant_id, request)
        after = decode_page_token(request.page_token, flt)
        limit = min(request.page_size or DEFAULT_PAGE, MAX_PAGE)
        page = await asyncio.to_thread(
            lambda: self._storage.query(flt, after_seq=after, limit=limit)
        )
        out = audit_pb2.QueryEventsResponse()
        for stored in page.events:
            event_to_proto(stored, out.events.add())
        if page.more:
            out.next_page_token = encode_page_token(page.events[-1].seq, flt)
        return out

    async def TailEvents(
        self, request: audit_pb2.TailEventsRequest, context: Ctx
    ) -> AsyncIterator[audit_pb2.TailEventsResponse]:
        principal = current_principal()
        require_role(principal, AUDITOR_ROLE)
        kinds = kinds_from_proto(request.kinds)
        start = await asyncio.to_thread(self._storage.head, principal.tenant_id)
        # Initial metadata marks the moment the stream is live: every event
        # recorded after the caller receives it will be sent.
        await context.send_initial_metadata((("fieldsync-tail-from", str(start)),))
        events = follow(
            self._storage,
            self._signal,
            principal.tenant_id,
            kinds,
            after=start,
            poll_seconds=self._poll,
        )
        # Closed here when the caller goes away, not left to garbage collection.
        async with aclosing(events):
            async for stored in events:
                response = audit_pb2.TailEventsResponse()
                event_to_proto(stored, response.event)
                yield response
