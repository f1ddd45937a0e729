"""A mutation's `text_edits` on their way to the decision (SPEC §3): what lives here.

`text_inputs` checks them against the schema (sync_service.rules.textedits) for one
mutation; `TextPoints` remembers the text each of a client's `text_edits` left it with
and how that text relates to the record, so its next edit on the same base applies to
the text it had even when its previous one changed nothing on the server (then the
history holds no trace of it, see sync_service.rules.textfields): in memory within one
run, and in storage (`text_points`, written in the same transaction) across batches,
streams and restarts.
"""

from __future__ import annotations

import json
from collections.abc import Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from fieldsync.errors import InvalidArgument, Reason
from fieldsync.textops import TextOp, ops_from_json, ops_to_json
from fieldsync.values import FieldValue
from sync_service.rules.decode import Repair
from sync_service.rules.merge import Op
from sync_service.rules.schema import CollectionSpec
from sync_service.rules.textedits import check_text_edits
from sync_service.storage.base import Reads, TextPointRow
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
    """The text each of a client's `text_edits` left it with, by record and field: noted
    as the run decides, and loaded from and stored to `text_points` (storage) where the
    history cannot tell it, so it holds across batches, streams and restarts."""

    # (collection, record_id, field) -> (base_version, point)
    _points: dict[tuple[str, str, str], tuple[int, Point]] = field(default_factory=dict)
    # ... those the history holds no trace of: to store
    _untraced: dict[tuple[str, str, str], tuple[int, Point]] = field(default_factory=dict)

    def load(self, tx: Reads, tenant: str, client_id: str, fresh: Iterable[MutationIn]) -> None:
        """Read the stored points of the records `fresh` mutations edit as text."""
        wanted: dict[str, set[str]] = {}
        for m in fresh:
            if m.text_edits and m.record_id and not m.invalid:
                wanted.setdefault(m.collection, set()).add(m.record_id)
        for collection, rids in wanted.items():
            for row in tx.load_text_points(tenant, client_id, collection, sorted(rids)):
                key = (row.collection, row.record_id, row.field)
                if key not in self._points:
                    point = (row.text, ops_from_json(json.loads(row.ops)), row.version)
                    self._points[key] = (row.base_version, point)

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
        traced: Container[str],
    ) -> None:
        """`traced`: the fields the mutation changed (its history row tells their point)."""
        for name, (text, ops) in points.items():
            had = (base_version, (text, ops, version))
            self._points[(*key, name)] = had
            if name in traced:
                self._untraced.pop((*key, name), None)
            else:
                self._untraced[(*key, name)] = had

    def rows(self, tenant: str, client_id: str, now: int) -> list[TextPointRow]:
        """The points to store: those of edits that left the record as it was."""
        return [
            TextPointRow(
                tenant, client_id, *key, base, version, text, json.dumps(ops_to_json(ops)), now
            )
            for key, (base, (text, ops, version)) in self._untraced.items()
        ]
