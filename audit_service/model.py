"""The audit service's domain values: events, what a query asks for, what a write did.

Plain frozen dataclasses with no gRPC and no SQL in them; `convert` turns wire
messages into these (validating them), `storage` stores and reads them.
Times are integer nanoseconds since the Unix epoch, as everywhere in FieldSync.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from fieldsync.audit_kinds import EventKind
from fieldsync.values import Fields

# Bounds of an int64 in nanoseconds (years 1677 to 2262): what the BIGINT
# columns hold. Wire timestamps outside them are refused or clamped.
MIN_NANOS = -(2**63)
MAX_NANOS = 2**63 - 1

MAX_EVENT_ID_LENGTH = 64

# The longest text each identifying field may hold (the columns' sizes, the
# same as the sync service's). Longer values are refused, not truncated: a
# truncated id would name another record.
MAX_LENGTHS: dict[str, int] = {
    "event_id": MAX_EVENT_ID_LENGTH,
    "tenant_id": 200,
    "code": 200,
    "collection": 200,
    "record_id": 500,
    "field": 200,
    "mutation_id": 200,
    "client_id": 200,
    "actor": 500,
}


@dataclass(frozen=True)
class AuditEvent:
    """One event as the sync service reported it (SPEC §7)."""

    event_id: str
    tenant_id: str
    kind: EventKind
    occurred_at: int
    code: str = ""
    collection: str = ""
    record_id: str = ""
    field: str = ""
    mutation_id: str = ""
    client_id: str = ""
    actor: str = ""
    client_schema_version: int = 0
    message: str = ""
    # dataclasses.field by its full name: the `field` above shadows it in here.
    details: Fields = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class StoredEvent:
    """An event as stored: `seq` is its place in the order events were recorded in."""

    seq: int
    recorded_at: int
    event: AuditEvent


@dataclass(frozen=True)
class EventFilter:
    """What a reader asks for; empty / None parts do not filter.

    `since` is inclusive and `until` exclusive, both on `occurred_at`.
    """

    tenant_id: str
    kinds: frozenset[EventKind] = frozenset()
    collection: str = ""
    record_id: str = ""
    mutation_id: str = ""
    since: int | None = None
    until: int | None = None
    newest_first: bool = False


@dataclass(frozen=True)
class RecordOutcome:
    """What one RecordEvents write did: every event offered is exactly one of the two."""

    recorded: int
    duplicates: int
    kinds: Mapping[str, int] = dataclasses.field(default_factory=dict)
    """Events recorded (duplicates excluded) by kind name, e.g. {"LWW_OVERWRITE": 2}."""


@dataclass(frozen=True)
class DeadLetter:
    """An event the audit service could not store as one, kept whole instead.

    `key` is its event_id when that is a valid id, else a digest of its bytes,
    so a resend of the same refused event is stored once. `event` is the wire
    AuditEvent's serialized bytes; `reasons` the field violations.
    """

    key: str
    tenant_id: str
    event: bytes
    reasons: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class EventPage:
    """One page of a query; `more` says whether events follow the last one."""

    events: list[StoredEvent]
    more: bool
