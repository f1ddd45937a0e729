"""Audit events the sync service writes to its outbox (SPEC §7).

An event is built here as a plain payload whose keys are the wire AuditEvent's
field names (details encoded with fieldsync.values.encode), stored in the same
transaction as the change it describes; the relay turns it into the proto.
`make_event` builds one; `MutationEvents` stages those of a write
transaction's mutations (warnings, conflicts, overwrites, duplicate
transitions, text overlaps, rejections, conflict answers) into its BatchWrite, in the order
the audit has always received them. Nothing here decides or stores anything.

Every event is made valid for the audit service here, at the source: an
identifying field longer than the audit service stores (`EVENT_LIMITS`, its
column sizes) or holding a NUL character is cut with a marker (`…`), and its
whole value goes to `details` as `full.<field>` (itself cut at
`MAX_FULL_VALUE` characters, its length then in `full.<field>.length`). An event
the audit service refuses would otherwise never reach the audit log. A
mutation records at most MAX_WARNING_EVENTS warning events; one more counts
the rest.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass

from fieldsync.audit_kinds import EventKind
from fieldsync.errors import FieldSyncError
from fieldsync.jsontext import dumps
from fieldsync.textops import ops_to_json
from fieldsync.values import Fields, FieldValue, Json, encode_fields
from sync_service.rules.decode import Repair
from sync_service.rules.limits import MARKER, storable
from sync_service.rules.merge import DELETED, ConflictKind, Decision
from sync_service.storage.base import OutboxEvent, StoredConflict
from sync_service.writes.model import MutationIn, MutationOutcome, Status

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


def new_id() -> str:
    """A random version-4 UUID as 32 hex digits, exactly as `uuid.uuid4().hex` gives one, in
    a third of its time (that builds a UUID object around the integer first): an event id
    is made for every conflicting field, so this runs several times a conflicting mutation."""
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
    traceparent: str | None = None,
) -> OutboxEvent:
    event_id = new_id()
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
    if traceparent:
        # The relay continues this trace in its RecordEvents (fieldsync.tracing).
        payload["traceparent"] = traceparent
    return OutboxEvent(event_id, ids["tenant_id"], payload, occurred_at)


@dataclass
class MutationEvents:
    """The audit events of one write transaction's mutations, appended to `events`."""

    events: list[OutboxEvent]
    tenant_id: str
    occurred_at: int
    client_id: str
    actor: str
    client_schema_version: int  # of the batch being applied
    traceparent: str | None = None  # of the call that sent it (tracing on)

    def add(
        self,
        kind: EventKind,
        m: MutationIn,
        *,
        code: str = "",
        field: str = "",
        message: str = "",
        details: Fields | None = None,
    ) -> None:
        self.events.append(
            make_event(
                kind,
                tenant_id=self.tenant_id,
                occurred_at=self.occurred_at,
                code=code,
                collection=m.collection,
                record_id=m.record_id,
                field=field,
                mutation_id=m.mutation_id,
                client_id=self.client_id,
                actor=self.actor,
                client_schema_version=self.client_schema_version,
                message=message,
                details=details,
                traceparent=self.traceparent,
            )
        )

    def decided(self, m: MutationIn, outcome: MutationOutcome, d: Decision) -> None:
        """A decided mutation's repairs, conflict, overwrites and duplicate transitions."""
        self.warnings(m, outcome.warnings)
        if outcome.conflict is not None:
            c = outcome.conflict
            for fc in c.fields:
                self.add(
                    EventKind.CONFLICT_SURFACED,
                    m,
                    code=ConflictKind(c.kind).name,
                    field=fc.field,
                    message=f"conflict {c.conflict_id}: the server kept its value",
                    details={
                        "conflict_id": c.conflict_id,
                        "base": fc.base,
                        "yours": fc.yours,
                        "theirs": fc.theirs,
                    },
                )
        for o in d.overwrites:
            self.add(
                EventKind.LWW_OVERWRITE,
                m,
                field="" if o.field == DELETED else o.field,
                message="the later write won; the overwritten value is in details",
                details={
                    "overwritten": o.overwritten,
                    "value": o.value,
                    "overwritten_mutation_id": o.overwritten_by_mutation,
                },
            )
        for dup in d.duplicates:
            self.add(
                EventKind.DUPLICATE_TRANSITION,
                m,
                field=dup.field,
                message=f"{dup.field} was already moved to this value by another writer",
                details={
                    "value": dup.value,
                    "earlier_mutation_id": dup.earlier_mutation_id,
                    "earlier_client_id": dup.earlier_client_id,
                },
            )
        for t in d.text_overlaps:
            self.add(
                EventKind.TEXT_OVERLAP_MERGED,
                m,
                field=t.field,
                message=f"{t.field}: both sides edited the same passage; both edits were kept",
                details={"base": t.base, "yours": t.yours, "theirs": t.theirs, "merged": t.merged},
            )

    def warning(self, m: MutationIn, r: Repair) -> None:
        self.add(
            EventKind.VALIDATION_WARNING, m, code=str(r.code), field=r.field, message=r.message
        )

    def warnings(self, m: MutationIn, repairs: list[Repair]) -> None:
        """A VALIDATION_WARNING event a warning, up to MAX_WARNING_EVENTS; one event
        counts the rest (200,000 unknown fields made 200,000 outbox rows)."""
        for r in repairs[:MAX_WARNING_EVENTS]:
            self.warning(m, r)
        rest = repairs[MAX_WARNING_EVENTS:]
        if rest:
            codes = Counter(str(r.code) for r in rest)
            details: Fields = {"omitted": len(rest)}
            details.update({f"omitted.{code}": n for code, n in sorted(codes.items())})
            self.add(
                EventKind.VALIDATION_WARNING,
                m,
                code=codes.most_common(1)[0][0],
                message=f"{len(rest)} more warnings of this mutation, counted in details",
                details=details,
            )

    def rejected(self, m: MutationIn, err: FieldSyncError, repairs: list[Repair]) -> None:
        """A rejected mutation: its repairs, and its values, so nothing is lost for good."""
        self.warnings(m, repairs)
        self.add(
            EventKind.MUTATION_REJECTED,
            m,
            code=str(err.reason),
            message=err.message,
            details={
                "op": m.op,
                "base_version": m.base_version,
                **_prefixed(m.fields),
                **{
                    f"text_edits.{k}": Json(dumps(ops_to_json(ops)))
                    for k, ops in m.text_edits.items()
                },
            },
        )

    def resolved(self, m: MutationIn, conflict_id: str, status: Status) -> None:
        """A conflict answered by mutation `m`."""
        self.add(
            EventKind.CONFLICT_RESOLVED,
            m,
            message=f"conflict {conflict_id} answered by mutation {m.mutation_id}",
            details={"conflict_id": conflict_id, "status": status.name},
        )

    def kept_theirs(self, conflict: StoredConflict) -> None:
        """A conflict answered KEEP_THEIRS (no mutation, no client)."""
        self.events.append(
            make_event(
                EventKind.CONFLICT_RESOLVED,
                tenant_id=self.tenant_id,
                occurred_at=self.occurred_at,
                collection=conflict.collection,
                record_id=conflict.record_id,
                mutation_id=conflict.mutation_id,
                actor=self.actor,
                client_schema_version=self.client_schema_version,
                message=f"conflict {conflict.conflict_id} resolved: kept the server's values",
                details={"conflict_id": conflict.conflict_id, "resolution": "KEEP_THEIRS"},
                traceparent=self.traceparent,
            )
        )


def _prefixed(fields: Fields) -> Fields:
    """A rejected mutation's values, kept in the audit so nothing is lost for good."""
    return {f"field.{k}": v for k, v in fields.items()}
