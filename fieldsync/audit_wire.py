"""The wire AuditEvent, filled from an event's parts: one mapping for both services.

The sync service's relay sends outbox payloads (whose keys are the AuditEvent's
field names, sync_service/writes/audit_events.py) and the audit service
answers with the events it stored (audit_service/model.AuditEvent, whose
attributes have the same names); both fill the message here, so the two can
never disagree on a field.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fieldsync.v1 import audit_pb2
from fieldsync.values import Fields, fields_to_proto

# The AuditEvent's plain fields (occurred_at and details are converted).
_PLAIN = (
    "event_id",
    "tenant_id",
    "kind",
    "code",
    "collection",
    "record_id",
    "field",
    "mutation_id",
    "client_id",
    "actor",
    "client_schema_version",
    "message",
)


def fill_audit_event(
    out: audit_pb2.AuditEvent, value: Callable[[str], Any], details: Fields
) -> None:
    """Set every field of `out`: `value(name)` gives each plain one (the kind as an
    int, occurred_at in nanoseconds since the epoch); `details` are the values."""
    for name in _PLAIN:
        setattr(out, name, value(name))
    out.occurred_at.seconds, out.occurred_at.nanos = divmod(value("occurred_at"), 1_000_000_000)
    fields_to_proto(details, out.details)
