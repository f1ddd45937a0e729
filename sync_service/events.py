"""Audit events the sync service writes to its outbox (SPEC §7).

An event is built here as a plain payload whose keys are the wire AuditEvent's
field names (details encoded with fieldsync.values.encode), stored in the same
transaction as the change it describes; the relay turns it into the proto.
"""

from __future__ import annotations

import os

from fieldsync.audit_kinds import EventKind
from fieldsync.values import Fields, encode_fields
from sync_service.storage.base import OutboxEvent


def new_id() -> str:
    """A random version-4 UUID as 32 hex digits, exactly as `uuid.uuid4().hex` gives one, in
    a fifth of its time (it builds a UUID object around the integer); an event or conflict
    id is made for every conflicting field, so this runs several times a mutation."""
    b = bytearray(os.urandom(16))
    b[6] = (b[6] & 0x0F) | 0x40  # version 4
    b[8] = (b[8] & 0x3F) | 0x80  # the RFC 4122 variant
    return b.hex()


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
    event_id = new_id()
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
    return OutboxEvent(event_id, tenant_id, payload, occurred_at)
