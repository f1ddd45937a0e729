"""Text fields in the merge decision (SPEC §3): the text a client edited, and the merge.

Pure, used by sync_service.rules.merge. Text fields (policy text) may come as operations
(`text_edits`) instead of a value. Both forms are edits of the text the client had when it
made them: its `base_fields` value if sent, else the value at base_version followed by
the client's own later changes of that field, as it sent them (`client_point`). The other
side of the merge is what happened to the field since that text, as exact operations where
the history has them (`ops_since`): each change of a text field records, in its `old`, the
operations from the previous value to the new one (`DELTA + field`), and a change that
merged a client's edit records the client's text (`SENT + field`) and the operations from
it to the merge (`OWN + field`). Composed, they take the client's text to the server's
exactly, so no diff has to guess which character is whose (a diff can align a deleted
character with an equal one another user inserted, and delete that one). Where a link is
missing (a whole value written without a merge: its diff against the value before;
`base_fields`, or a broken chain: the diff of the client's text against the server's) the
diff stands in.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from fieldsync.textops import (
    TextOp,
    TextOpsError,
    apply_ops,
    compose,
    ops_from_json,
    ops_to_json,
)
from fieldsync.values import Fields, FieldValue, Json
from sync_service.rules.textmerge import (
    Edit,
    TextMerge,
    diff,
    edits_from_ops,
    merge,
    merge_ops,
    merge_text,
    ops_from_edits,
)


class TextEditsInvalid(Exception):
    """Operations that do not cover the text they apply to (field, why)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class ChangeView(Protocol):
    @property
    def version(self) -> int: ...
    @property
    def client_id(self) -> str: ...
    @property
    def old(self) -> Mapping[str, FieldValue]: ...


class HistoryView(Protocol):
    """What of the record's history since base these rules read (merge._History)."""

    @property
    def base_version(self) -> int: ...
    @property
    def client_id(self) -> str: ...
    @property
    def changes(self) -> Sequence[ChangeView]: ...
    @property
    def complete(self) -> bool: ...
    def theirs(self, name: str) -> FieldValue: ...
    def base(self, name: str) -> FieldValue: ...
    def last_change(self, name: str) -> int: ...


SENT = "_sent:"
"""Prefix, in a change's `old`, of the text a client sent when the change merged it."""
OWN = "_own:"
"""Prefix, beside SENT: the operations (JSON) from the client's text to the merge."""
DELTA = "_delta:"
"""Prefix, in a change's `old`: the operations (JSON) from the field's old value to its new."""


class Unknown:
    """A value pruned history no longer holds."""


UNKNOWN = Unknown()


@dataclass(frozen=True, slots=True)
class Point:
    """A text a client had, and how it relates to the server's value at `version`: `ops`
    take it there ([]: it is that value; None: unknown)."""

    text: str
    ops: list[TextOp] | None
    version: int


@dataclass(frozen=True, slots=True)
class TextIn:
    """A field written as operations: the text they apply to, and their edits."""

    point: Point
    ops: Sequence[TextOp]
    edits: list[Edit]


def _text(value: FieldValue) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise TextOpsError("the field does not hold text")
    return value


def ops_of(value: Json) -> list[TextOp]:
    return ops_from_json(json.loads(value.text))


def ops_json(ops: Sequence[TextOp]) -> Json:
    return Json(json.dumps(ops_to_json(ops), ensure_ascii=False, separators=(",", ":")))


def client_point(hist: HistoryView, name: str, points: Mapping[str, Point]) -> Point | Unknown:
    """The field as this client last had it: at base_version, then its own later
    changes as it sent them; with how it relates to the server's value at some
    version (UNKNOWN when pruned history hides it). `points`: its `base_fields` text
    (taken as is), or what its latest edit that changed nothing left it with (taken
    unless the history holds a later change of the client's)."""
    noted = points.get(name)
    if noted is not None and noted.ops is None:
        return noted  # base_fields: the client's own word
    changes = hist.changes
    for i in range(len(changes) - 1, -1, -1):
        ch = changes[i]
        if ch.client_id != hist.client_id or name not in ch.old:
            continue
        if noted is not None and noted.version >= ch.version:
            return noted  # a later edit of the client's that changed nothing
        if SENT + name in ch.old:
            own = ch.old.get(OWN + name)
            ops = ops_of(own) if isinstance(own, Json) else None
            return Point(_text(ch.old[SENT + name]), ops, ch.version)
        return Point(_text(_after(hist, i, name)), [], ch.version)
    if noted is not None:
        return noted
    if not hist.complete and hist.last_change(name) > hist.base_version:
        return UNKNOWN
    return Point(_text(hist.base(name)), [], hist.base_version)


def _after(hist: HistoryView, i: int, name: str) -> FieldValue:
    """The value changes[i] left in `name`."""
    for later in hist.changes[i + 1 :]:
        if name in later.old:
            return later.old[name]
    return hist.theirs(name)


def ops_since(hist: HistoryView, name: str, point: Point) -> list[TextOp] | None:
    """Operations from the point's text to the field's value now (None: unknown)."""
    if point.ops is None or not hist.complete:
        return None
    ops = point.ops
    try:
        for i, ch in enumerate(hist.changes):
            if ch.version <= point.version or name not in ch.old:
                continue
            delta = ch.old.get(DELTA + name)
            if isinstance(delta, Json):
                step = ops_of(delta)
            else:  # a whole value written: its diff against the value before
                before, after = _text(ch.old[name]), _text(_after(hist, i, name))
                step = ops_from_edits(len(before), diff(before, after))
            ops = compose(ops, step)
    except (TextOpsError, ValueError):
        return None
    return ops


def text_or_none(value: FieldValue) -> str | None:
    return "" if value is None else value if isinstance(value, str) else None


def starts_of(
    base_texts: Mapping[str, FieldValue], points: Mapping[str, tuple[str, Sequence[TextOp], int]]
) -> dict[str, Point]:
    out = {name: Point(text, list(ops), v) for name, (text, ops, v) in points.items()}
    for name, value in base_texts.items():  # the client's word for it: related by diff
        if value is None or isinstance(value, str):
            out[name] = Point(value or "", None, 0)
    return out


def texts_from_ops(
    hist: HistoryView,
    text_edits: Mapping[str, Sequence[TextOp]],
    starts: Mapping[str, Point],
    texts: dict[str, TextIn],
) -> Fields:
    """Each field's operations applied to the text the client had (see the module
    docstring); ``texts`` receives that text and the edits, for the merge."""
    out: Fields = {}
    for name, ops in text_edits.items():
        try:
            point = client_point(hist, name, starts)
        except TextOpsError:
            raise TextEditsInvalid(name, "the field does not hold text") from None
        if isinstance(point, Unknown):
            # Pruned history: the text cannot be built, so the operations themselves
            # are what a conflict keeps (SPEC §1: never a silent overwrite).
            out[name] = ops_json(ops)
            continue
        try:
            edits = edits_from_ops(point.text, ops)
            out[name] = apply_ops(point.text, ops)
        except TextOpsError as e:
            raise TextEditsInvalid(name, str(e)) from None
        texts[name] = TextIn(point, ops, edits)
    return out


def merge_text_field(
    hist: HistoryView,
    name: str,
    yours: FieldValue,
    theirs: FieldValue,
    texts: Mapping[str, TextIn],
    starts: Mapping[str, Point],
) -> tuple[str, TextMerge] | None:
    """Both sides' edits of a text field merged: (the text the client edited, the
    merge). None (a conflict) only after pruned history, when the base is unknown and a
    guessed one could drop an edit (SPEC §1), or for a value that is not text."""
    if not hist.complete:
        return None
    if theirs is None:
        theirs = ""  # the field is absent on the server: nothing of theirs to keep
    if not (isinstance(yours, str) and isinstance(theirs, str)):
        return None
    if name in texts:
        point, mine = texts[name].point, texts[name].edits
    else:
        try:
            found = client_point(hist, name, starts)
        except TextOpsError:
            return None
        if isinstance(found, Unknown):
            return None
        point, mine = found, diff(found.text, yours)
    exact = ops_since(hist, name, point)
    if exact is not None:
        try:
            if (apply_ops(point.text, exact) if exact else point.text) == theirs:
                return point.text, merge(point.text, mine, edits_from_ops(point.text, exact))
        except TextOpsError:
            pass
    if name in texts:
        return point.text, merge_ops(point.text, mine, theirs)
    return point.text, merge_text(point.text, yours, theirs)
