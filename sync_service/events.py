"""Audit events the sync service writes to its outbox (SPEC §7).

An event is built here as a plain payload whose keys are the wire AuditEvent's
field names (details encoded with fieldsync.values.encode), stored in the same
transaction as the change it describes; the relay turns it into the proto.

Every event is made valid for the audit service here, at the source: an
identifying field longer than the audit service stores (`EVENT_LIMITS`, its
column sizes) or holding a NUL character is cut with a marker (`…`), and its
whole value goes to `details` as `full.<field>` (itself cut at
`MAX_FULL_VALUE` characters, its length then in `full.<field>.length`). An event
the audit service refuses would otherwise never reach the audit log.
"""

from __future__ import annotations

import uuid

from fieldsync.audit_kinds import EventKind
from fieldsync.values import Fields, FieldValue, encode_fields
from sync_service.limits import MARKER, storable
from sync_service.storage.base import OutboxEvent

# What the audit service stores of each identifying field (audit_service.model.MAX_LENGTHS).
EVENT_LIMITS: dict[str, int] = {
    "tenant_id": 200,
    "code": 200,
    "collection": 200,
    "record_id": 500,
    "field": 200,
    "mutation_id": 200,
    "client_id": 200,
    "actor": 500,
}
MAX_FULL_VALUE = 65_536
"""Characters of an over-long field's whole value kept in the event's details."""
MAX_MESSAGE = 10_000
MAX_WARNING_EVENTS = 100
"""VALIDATION_WARNING events a mutation, at most; one more event counts the rest."""


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
    extra: dict[str, FieldValue] = {}
    ids = {
        "tenant_id": tenant_id,
        "code": code,
        "collection": collection,
        "record_id": record_id,
        "field": field,
        "mutation_id": mutation_id,
        "client_id": client_id,
        "actor": actor,
    }
    for name, value in ids.items():
        fit = storable(value, EVENT_LIMITS[name])
        if fit != value:
            ids[name] = fit
            extra[f"full.{name}"] = value[:MAX_FULL_VALUE]
            if len(value) > MAX_FULL_VALUE:
                extra[f"full.{name}.length"] = len(value)
    if len(message) > MAX_MESSAGE:
        message = message[: MAX_MESSAGE - len(MARKER)] + MARKER
    everything = {**(details or {}), **extra} if extra else (details or {})
    payload = {
        "event_id": event_id,
        "tenant_id": ids["tenant_id"],
        "kind": int(kind),
        "code": ids["code"],
        "collection": ids["collection"],
        "record_id": ids["record_id"],
        "field": ids["field"],
        "mutation_id": ids["mutation_id"],
        "client_id": ids["client_id"],
        "actor": ids["actor"],
        "occurred_at": occurred_at,
        "client_schema_version": client_schema_version,
        "message": message,
        "details": encode_fields(everything),
    }
    return OutboxEvent(event_id, ids["tenant_id"], payload, occurred_at)
