"""Audit events the sync service writes to its outbox (SPEC §7).

An event is built here as a plain payload whose keys are the wire AuditEvent's
field names (details encoded with fieldsync.values.encode), stored in the same
transaction as the change it describes; the relay turns it into the proto.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

from fieldsync.audit_kinds import EventKind
from fieldsync.values import Fields, encode_fields
from sync_service.storage.base import OutboxEvent

# With tracing on (fieldsync.tracing), the current call's W3C traceparent: each
# event carries it through the outbox, so the relay's RecordEvents joins the trace.
# None (the default) costs one comparison an event.
_trace_source: Callable[[], str | None] | None = None


def carry_trace_context(source: Callable[[], str | None] | None) -> None:
    """Stamp each event with `source()` (set once at start, when tracing is on)."""
    global _trace_source
    _trace_source = source


def make_event(
    kind: EventKind,
    *,
    tenant_id: str,
    occurred_at: int,
    code: str = "",
    collection: str = "",
    record_id: str = "",
    field: str = "",
    mutation_id: str = "",
    client_id: str = "",
    actor: str = "",
    client_schema_version: int = 0,
    message: str = "",
    details: Fields | None = None,
) -> OutboxEvent:
    event_id = uuid.uuid4().hex
    payload = {
        "event_id": event_id,
        "tenant_id": tenant_id,
        "kind": int(kind),
        "code": code,
        "collection": collection,
        "record_id": record_id,
        "field": field,
        "mutation_id": mutation_id,
        "client_id": client_id,
        "actor": actor,
        "occurred_at": occurred_at,
        "client_schema_version": client_schema_version,
        "message": message,
        "details": encode_fields(details or {}),
    }
    if _trace_source is not None and (traceparent := _trace_source()):
        payload["traceparent"] = traceparent
    return OutboxEvent(event_id, tenant_id, payload, occurred_at)
