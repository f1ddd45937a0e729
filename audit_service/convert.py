"""Wire <-> domain for the audit service, with the checks a wire event must pass.

`events_from_proto` splits a RecordEvents batch into the events that can be
stored and the field violations of those that cannot (`events[i].field`), so
the caller can store the good ones and still report each bad one.
`filter_from_proto` does the same for a query's filters, raising at once since
a query has nothing partial to keep. Nothing here touches the database.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

from google.protobuf import timestamp_pb2

from audit_service.model import (
    MAX_EVENT_ID_LENGTH,
    MAX_LENGTHS,
    MAX_NANOS,
    MIN_NANOS,
    AuditEvent,
    DeadLetter,
    EventFilter,
    StoredEvent,
)
from fieldsync.audit_kinds import EventKind
from fieldsync.errors import InvalidArgument, Reason
from fieldsync.v1 import audit_pb2
from fieldsync.values import InvalidValue, fields_from_proto, fields_to_proto

__all__ = [
    "event_from_proto",
    "event_to_proto",
    "events_from_proto",
    "filter_from_proto",
    "kinds_from_proto",
    "split_events",
]

Violation = tuple[str, str]

_KNOWN_KINDS = {int(k) for k in EventKind}


def _nanos(ts: timestamp_pb2.Timestamp) -> int:
    return ts.seconds * 1_000_000_000 + ts.nanos


def event_from_proto(pe: audit_pb2.AuditEvent, path: str) -> AuditEvent | list[Violation]:
    """The event, or what is wrong with it (fields named under `path`, e.g. `events[3]`)."""
    bad: list[Violation] = []
    for name in ("event_id", "tenant_id"):
        if not getattr(pe, name):
            bad.append((f"{path}.{name}", "required"))
    for name, most in MAX_LENGTHS.items():
        if len(getattr(pe, name)) > most:
            bad.append((f"{path}.{name}", f"at most {most} characters"))
    kind = int(pe.kind)
    if kind == audit_pb2.AUDIT_EVENT_KIND_UNSPECIFIED:
        bad.append((f"{path}.kind", "required"))
    elif kind not in _KNOWN_KINDS:
        bad.append((f"{path}.kind", f"unknown kind {kind}"))
    occurred_at = 0
    if not pe.HasField("occurred_at"):
        bad.append((f"{path}.occurred_at", "required"))
    else:
        occurred_at = _nanos(pe.occurred_at)
        if not 0 <= pe.occurred_at.nanos <= 999_999_999:
            bad.append((f"{path}.occurred_at", "nanos must be 0 to 999999999"))
        elif not MIN_NANOS <= occurred_at <= MAX_NANOS:
            bad.append((f"{path}.occurred_at", "out of range (years 1677 to 2262)"))
    try:
        details = fields_from_proto(pe.details)
    except InvalidValue as err:
        bad.append((f"{path}.details", err.message))
    if bad:
        return bad
    return AuditEvent(
        event_id=pe.event_id,
        tenant_id=pe.tenant_id,
        kind=EventKind(kind),
        occurred_at=occurred_at,
        code=pe.code,
        collection=pe.collection,
        record_id=pe.record_id,
        field=pe.field,
        mutation_id=pe.mutation_id,
        client_id=pe.client_id,
        actor=pe.actor,
        client_schema_version=pe.client_schema_version,
        message=pe.message,
        details=details,
    )


def events_from_proto(
    events: Sequence[audit_pb2.AuditEvent],
) -> tuple[list[AuditEvent], list[Violation]]:
    """The storable events of a batch, and the violations of the others."""
    good, refused = split_events(events)
    return good, [v for letter in refused for v in letter.reasons]


def split_events(
    events: Sequence[audit_pb2.AuditEvent],
) -> tuple[list[AuditEvent], list[DeadLetter]]:
    """The storable events of a batch, and the others as dead letters (with their
    violations, named `events[i].field`)."""
    good: list[AuditEvent] = []
    refused: list[DeadLetter] = []
    for i, pe in enumerate(events):
        out = event_from_proto(pe, f"events[{i}]")
        if isinstance(out, AuditEvent):
            good.append(out)
            continue
        raw = pe.SerializeToString(deterministic=True)
        id_ok = 0 < len(pe.event_id) <= MAX_EVENT_ID_LENGTH and "\x00" not in pe.event_id
        key = pe.event_id if id_ok else hashlib.sha256(raw).hexdigest()
        refused.append(DeadLetter(key, pe.tenant_id, raw, tuple(out)))
    return good, refused


def kinds_from_proto(kinds: Iterable[int], path: str = "kinds") -> frozenset[EventKind]:
    """A filter's kinds; an unspecified or unknown one is an INVALID_REQUEST."""
    out: set[EventKind] = set()
    bad: list[Violation] = []
    for i, k in enumerate(kinds):
        if int(k) in _KNOWN_KINDS:
            out.add(EventKind(int(k)))
        else:
            bad.append((f"{path}[{i}]", f"not an event kind: {int(k)}"))
    if bad:
        raise InvalidArgument(Reason.INVALID_REQUEST, "unknown event kinds", violations=bad)
    return frozenset(out)


def _clamped(ts: timestamp_pb2.Timestamp) -> int:
    # A bound beyond what is storable filters the same as the storable extreme.
    return max(MIN_NANOS, min(MAX_NANOS, _nanos(ts)))


def filter_from_proto(tenant_id: str, req: audit_pb2.QueryEventsRequest) -> EventFilter:
    """The query's filters, for the caller's tenant (never a tenant named in the request)."""
    since = _clamped(req.since) if req.HasField("since") else None
    until = _clamped(req.until) if req.HasField("until") else None
    if since is not None and until is not None and until < since:
        raise InvalidArgument(
            Reason.INVALID_REQUEST,
            "until is before since",
            violations=[("until", "must not be before since")],
        )
    return EventFilter(
        tenant_id=tenant_id,
        kinds=kinds_from_proto(req.kinds),
        collection=req.collection,
        record_id=req.record_id,
        mutation_id=req.mutation_id,
        since=since,
        until=until,
        newest_first=req.newest_first,
    )


def event_to_proto(stored: StoredEvent, out: audit_pb2.AuditEvent) -> None:
    ev = stored.event
    out.event_id = ev.event_id
    out.tenant_id = ev.tenant_id
    out.kind = audit_pb2.AuditEventKind.ValueType(int(ev.kind))
    out.code = ev.code
    out.collection = ev.collection
    out.record_id = ev.record_id
    out.field = ev.field
    out.mutation_id = ev.mutation_id
    out.client_id = ev.client_id
    out.actor = ev.actor
    out.occurred_at.seconds, out.occurred_at.nanos = divmod(ev.occurred_at, 1_000_000_000)
    out.client_schema_version = ev.client_schema_version
    out.message = ev.message
    fields_to_proto(ev.details, out.details)
