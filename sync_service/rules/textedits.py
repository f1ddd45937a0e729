"""A mutation's ``text_edits`` checked against the schema (SPEC §3, §9): what lives here.

Pure: the wire's operations (already decoded by sync_service.api.convert) become the schema's
field names and their operations, or an ``InvalidArgument`` that rejects the mutation
(``TEXT_EDITS_INVALID``; a field sent both as a value and as operations:
``TEXT_FIELD_TWICE``). Whether the operations cover the text they apply to is decided
with the record's history, in sync_service.rules.merge.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Final

from fieldsync.errors import InvalidArgument, Reason
from fieldsync.textops import TextOp
from fieldsync.values import FieldValue
from sync_service.rules.decode import Repair, WarningCode
from sync_service.rules.schema import CollectionSpec, FieldType

__all__ = ["MAX_TEXT_OPS", "check_text_edits", "invalid"]

MAX_TEXT_OPS: Final = 100_000
"""Most operations for one field in one mutation (a keystroke is 2 or 3)."""


def invalid(field: str, message: str) -> InvalidArgument:
    return InvalidArgument(
        Reason.TEXT_EDITS_INVALID,
        f"text_edits[{field!r}]: {message}",
        violations=[(f"mutation.text_edits[{field}]", message)],
    )


def check_text_edits(
    spec: CollectionSpec,
    text_edits: Mapping[str, Sequence[TextOp]],
    fields: Mapping[str, FieldValue],
    base_fields: Mapping[str, FieldValue],
) -> tuple[dict[str, Sequence[TextOp]], dict[str, FieldValue], list[Repair]]:
    """(operations by field name, base texts of those fields, repairs made)."""
    edits: dict[str, Sequence[TextOp]] = {}
    repairs: list[Repair] = []
    written = {spec.aliases.get(n, n) for n in fields}
    for sent, ops in text_edits.items():
        name = sent if sent in spec.fields else spec.aliases.get(sent, "")
        f = spec.fields.get(name)
        if f is None:
            repairs.append(
                Repair(
                    WarningCode.UNKNOWN_FIELD,
                    sent,
                    f"{sent!r} is not a field of {spec.name}; its text_edits were ignored",
                )
            )
            continue
        if f.type is not FieldType.TEXT:
            raise invalid(sent, f"{name} is a {f.type} field; only text fields take text_edits")
        if name in written or name in edits:
            raise InvalidArgument(
                Reason.TEXT_FIELD_TWICE,
                f"{name!r} is sent twice (in fields and text_edits, or under two names)",
                violations=[(f"mutation.text_edits[{sent}]", "also in fields")],
            )
        if name != sent:
            repairs.append(
                Repair(WarningCode.FIELD_RENAMED, sent, f"{sent!r} is now {name!r}; applied")
            )
        if len(ops) > MAX_TEXT_OPS:
            raise invalid(sent, f"{len(ops)} operations; at most {MAX_TEXT_OPS}")
        edits[name] = ops
    bases: dict[str, FieldValue] = {}
    for sent, value in base_fields.items():
        name = sent if sent in spec.fields else spec.aliases.get(sent, "")
        if name in edits:
            if value is not None and not isinstance(value, str):
                raise invalid(sent, "its base_fields value is not text")
            bases[name] = value
    return edits, bases, repairs
