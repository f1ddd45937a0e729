"""A mutation's `text_edits` on their way to the decision (SPEC §3): what lives here.

`text_inputs` checks them against the schema (sync_service.rules.textedits) for one
mutation; `TextPoints` remembers, within one client's run in a write transaction, the
text each of its `text_edits` left it with and how that text relates to the record, so
its next edit on the same base applies to the text it had even when its previous one
changed nothing on the server (then the history holds no trace of it, see
sync_service.rules.merge).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from fieldsync.errors import InvalidArgument, Reason
from fieldsync.textops import TextOp
from fieldsync.values import FieldValue
from sync_service.rules.decode import Repair
from sync_service.rules.merge import Op
from sync_service.rules.schema import CollectionSpec
from sync_service.rules.textedits import check_text_edits
from sync_service.writes.model import MutationIn

Point = tuple[str, list[TextOp], int]  # text, operations to the field's value, at version


def text_inputs(
    op: Op, spec: CollectionSpec, m: MutationIn
) -> tuple[dict[str, Sequence[TextOp]], dict[str, FieldValue], list[Repair]]:
    """(operations by field, base_fields texts of those fields, repairs); InvalidArgument."""
    if not m.text_edits and not m.text_edits_error:
        return {}, {}, []
    if m.text_edits_error:
        raise InvalidArgument(Reason.TEXT_EDITS_INVALID, m.text_edits_error)
    if op is Op.DELETE:
        raise InvalidArgument(Reason.TEXT_EDITS_INVALID, "a DELETE takes no text_edits")
    return check_text_edits(spec, m.text_edits, m.fields, m.base_fields)


@dataclass
class TextPoints:
    # (collection, record_id, field) -> (base_version, point)
    _points: dict[tuple[str, str, str], tuple[int, Point]] = field(default_factory=dict)

    def get(
        self, key: tuple[str, str], base_version: int, names: Iterable[str]
    ) -> dict[str, Point]:
        out = {}
        for name in names:
            had = self._points.get((*key, name))
            if had is not None and had[0] == base_version:
                out[name] = had[1]
        return out

    def note(
        self,
        key: tuple[str, str],
        base_version: int,
        points: Mapping[str, tuple[str, list[TextOp]]],
        version: int,
    ) -> None:
        for name, (text, ops) in points.items():
            self._points[(*key, name)] = (base_version, (text, ops, version))
