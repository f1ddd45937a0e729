"""The merge decision: base, yours, theirs -> what a mutation does to a record.

A pure function of plain values (SPEC §3): no gRPC, no SQL, no clock. The
applier (sync_service.apply) loads the record and the changes committed since
the mutation's base, calls `decide`, and stores what it returns.

Existence is modelled as one more field, `DELETED` ("_deleted"): a record that
never existed is deleted at version 0, a create moves it to False, a DELETE
writes True. So delete/update, update/delete and create/create are the same
three-way comparison as any field, told apart only to name the conflict kind.

Per field the mutation writes (policy in the schema):

  changed since base by another writer?   no            -> yours is applied
                                          yes, = yours  -> nothing to do
                                          yes, other    -> merge: conflict (theirs kept)
                                                           lww:   yours, overwrite recorded
                                                           text:  merge of both sides'
                                                                  edits, never a conflict
                                                                  (sync_service.textmerge)

A field changed since base only by the same client is not "another writer"
(a client queues several edits to one record on the base it last saw).

Text fields (policy text) may come as operations (`text_edits`) instead of a
value. Both forms are edits of the text the client had when it made them: its
`base_fields` value if sent, else the value at base_version followed by the
client's own later changes of that field, as it sent them. The other side of
the merge is what happened to the field since that text, as exact operations
where the history has them: each change of a text field records, in its `old`,
the operations from the previous value to the new one (`DELTA + field`), and a
change that merged a client's edit records the client's text (`SENT + field`)
and the operations from it to the merge (`OWN + field`). Composed, they take the
client's text to the server's exactly, so no diff has to guess which character
is whose. Where a link is missing (a whole value written without a merge: its
diff against the value before; `base_fields`, or a broken chain: the diff of
the client's text against the server's) the diff stands in.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Protocol

from fieldsync.textops import (
    TextOp,
    TextOpsError,
    apply_ops,
    compose,
    ops_from_json,
    ops_to_json,
)
from fieldsync.values import Fields, FieldValue, Json, same
from sync_service.schema import Policy
from sync_service.textmerge import (
    Edit,
    TextMerge,
    diff,
    edits_from_ops,
    merge,
    merge_ops,
    merge_text,
    ops_from_edits,
)

DELETED = "_deleted"
"""The pseudo-field for a record's existence; schema field names cannot start with '_'."""

SENT = "_sent:"
"""Prefix, in a change's `old`, of the text a client sent when the change merged it."""
OWN = "_own:"
"""Prefix, beside SENT: the operations (JSON) from the client's text to the merge."""
DELTA = "_delta:"
"""Prefix, in a change's `old`: the operations (JSON) from the field's old value to its new."""


class TextEditsInvalid(Exception):
    """Operations that do not cover the text they apply to (field, why)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class Op(IntEnum):
    PUT = 1
    PATCH = 2
    DELETE = 3


class Outcome(IntEnum):
    """Matches MutationStatus APPLIED / MERGED / CONFLICT on the wire."""

    APPLIED = 1
    MERGED = 2
    CONFLICT = 3


class ConflictKind(IntEnum):
    """Matches the wire ConflictKind."""

    FIELDS = 1
    DELETE_UPDATE = 2
    UPDATE_DELETE = 3
    CREATE_CREATE = 4


@dataclass(slots=True)  # not frozen: built per mutation, and frozen init costs 4x
class Change:
    """One committed version of the record after the mutation's base.

    `old` holds, for each field that version changed (DELETED included), the
    value it had before: enough to know any field's value at any base.
    """

    version: int
    client_id: str
    mutation_id: str
    old: Mapping[str, FieldValue]


class RecordView(Protocol):
    """The record as the server holds it now: what `decide` reads of it (the
    storage's own record type has these attributes, so it needs no copy)."""

    @property
    def version(self) -> int: ...  # 0: never existed
    @property
    def deleted(self) -> bool: ...
    @property
    def fields(self) -> Mapping[str, FieldValue]: ...
    @property
    def field_versions(self) -> Mapping[str, int]: ...  # field -> its last change
    @property
    def history_floor(self) -> int: ...  # changes above this version are all known


@dataclass(frozen=True, slots=True)
class RecordState:
    """A RecordView of plain values."""

    version: int = 0  # 0: never existed
    deleted: bool = True
    fields: Mapping[str, FieldValue] = field(default_factory=dict)
    field_versions: Mapping[str, int] = field(default_factory=dict)  # field -> last change
    history_floor: int = 0  # changes above this version are all known


@dataclass(frozen=True, slots=True)
class FieldCollision:
    field: str
    base: FieldValue
    yours: FieldValue
    theirs: FieldValue


@dataclass(frozen=True, slots=True)
class Overwrite:
    """A last-write-wins field that replaced a concurrent value."""

    field: str
    overwritten: FieldValue
    value: FieldValue
    overwritten_by_mutation: str


@dataclass(frozen=True, slots=True)
class DuplicateTransition:
    """A state field moved to the value another writer already moved it to."""

    field: str
    value: FieldValue
    earlier_mutation_id: str
    earlier_client_id: str


@dataclass(frozen=True, slots=True)
class TextOverlap:
    """A text field whose two sides' edits overlapped, merged all the same."""

    field: str
    base: str  # the text the client edited
    yours: str
    theirs: str
    merged: str


@dataclass(slots=True)  # not frozen: built per mutation, and frozen init costs 4x
class Decision:
    outcome: Outcome
    updates: Mapping[str, FieldValue]  # fields to change (DELETED included); None clears
    conflict_kind: ConflictKind | None = None
    collisions: Sequence[FieldCollision] = ()
    overwrites: Sequence[Overwrite] = ()
    duplicates: Sequence[DuplicateTransition] = ()
    text_overlaps: Sequence[TextOverlap] = ()
    # Stored with the change, in its `old`, for fields it updates: SENT/OWN/DELTA + field
    # (see the module docstring).
    history_notes: Mapping[str, FieldValue] = field(default_factory=dict)
    # Per field written with text_edits: the client's text after the edit, and the
    # operations from it to the field's value after this mutation ([]: the same).
    points: Mapping[str, tuple[str, list[TextOp]]] = field(default_factory=dict)

    @property
    def changes_record(self) -> bool:
        return bool(self.updates)


class _Unknown:
    """A value pruned history no longer holds."""


UNKNOWN = _Unknown()


@dataclass(frozen=True, slots=True)
class _Point:
    """A text a client had, and how it relates to the server's value at `version`: `ops`
    take it there ([]: it is that value; None: unknown)."""

    text: str
    ops: list[TextOp] | None
    version: int


@dataclass(frozen=True, slots=True)
class _TextIn:
    """A field written as operations: the text they apply to, and their edits."""

    point: _Point
    ops: Sequence[TextOp]
    edits: list[Edit]


def _text(value: FieldValue) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise TextOpsError("the field does not hold text")
    return value


def _ops_of(value: Json) -> list[TextOp]:
    return ops_from_json(json.loads(value.text))


def _ops_json(ops: Sequence[TextOp]) -> Json:
    return Json(json.dumps(ops_to_json(ops), ensure_ascii=False, separators=(",", ":")))


@dataclass(frozen=True, slots=True)
class _History:
    """What happened to the record after the mutation's base, seen from one client."""

    state: RecordView
    base_version: int
    client_id: str
    changes: Sequence[Change]  # version > base_version, ascending

    @property
    def complete(self) -> bool:
        return self.base_version >= self.state.history_floor

    def theirs(self, name: str) -> FieldValue:
        if name == DELETED:
            return self.state.deleted
        return self.state.fields.get(name)

    def base(self, name: str) -> FieldValue:
        """The field's value at base_version (None when history was pruned)."""
        if name == DELETED and self.base_version == 0:
            return True
        if self.complete:
            for ch in self.changes:
                if name in ch.old:
                    return ch.old[name]
            return self.theirs(name)
        if self._last_change(name) <= self.base_version:
            return self.theirs(name)
        return None

    def _last_change(self, name: str) -> int:
        return self.state.field_versions.get(name, 0)

    def client_point(self, name: str, points: Mapping[str, _Point]) -> _Point | _Unknown:
        """The field as this client last had it: at base_version, then its own later
        changes as it sent them; with how it relates to the server's value at some
        version (UNKNOWN when pruned history hides it)."""
        if name in points:
            return points[name]
        changes = self.changes
        for i in range(len(changes) - 1, -1, -1):
            ch = changes[i]
            if ch.client_id != self.client_id or name not in ch.old:
                continue
            if SENT + name in ch.old:
                own = ch.old.get(OWN + name)
                ops = _ops_of(own) if isinstance(own, Json) else None
                return _Point(_text(ch.old[SENT + name]), ops, ch.version)
            return _Point(_text(self._after(i, name)), [], ch.version)
        if not self.complete and self._last_change(name) > self.base_version:
            return UNKNOWN
        return _Point(_text(self.base(name)), [], self.base_version)

    def _after(self, i: int, name: str) -> FieldValue:
        """The value changes[i] left in `name`."""
        for later in self.changes[i + 1 :]:
            if name in later.old:
                return later.old[name]
        return self.theirs(name)

    def ops_since(self, name: str, point: _Point) -> list[TextOp] | None:
        """Operations from the point's text to the field's value now (None: unknown)."""
        if point.ops is None or not self.complete:
            return None
        ops = point.ops
        try:
            for i, ch in enumerate(self.changes):
                if ch.version <= point.version or name not in ch.old:
                    continue
                delta = ch.old.get(DELTA + name)
                if isinstance(delta, Json):
                    step = _ops_of(delta)
                else:  # a whole value written: its diff against the value before
                    before, after = _text(ch.old[name]), _text(self._after(i, name))
                    step = ops_from_edits(len(before), diff(before, after))
                ops = compose(ops, step)
        except (TextOpsError, ValueError):
            return None
        return ops

    def other_change(self, name: str) -> Change | None:
        """The latest change to `name` since base by another client, if any."""
        if not self.changes and self.complete:
            return None  # the common case: nothing happened since the client's base
        for ch in reversed(self.changes):
            if name in ch.old and ch.client_id != self.client_id:
                return ch
        if not self.complete and self._last_change(name) > self.base_version:
            # Pruned history: who changed it is unknown, so it is never taken
            # as this client's own change (SPEC §1: a conflict, never a
            # silent overwrite).
            return Change(self._last_change(name), "", "", {})
        return None

    def moved(self, name: str) -> Change | None:
        """Like other_change, but None when the field is back at its base value.

        A field another writer changed and changed back holds nothing of
        theirs to keep, so a write to it is no collision. (Existence is
        excluded: a record created and deleted again by another since base 0
        is still their delete, see _decide_write.)
        """
        change = self.other_change(name)
        if (
            change is not None
            and name != DELETED
            and self.complete
            and same(self.theirs(name), self.base(name))
        ):
            return None
        return change

    def writer(self, name: str) -> Change:
        """The change that wrote `name`'s current value (call only if it changed since base).

        Not always `other_change`: the client's own later change may have
        replaced another's, and then the value is the client's own.
        """
        for ch in reversed(self.changes):
            if name in ch.old:
                return ch
        return Change(self._last_change(name), "", "", {})  # pruned: the writer is unknown

    def others_changed_anything(self) -> bool:
        if any(ch.client_id != self.client_id for ch in self.changes):
            return True
        return not self.complete and self.state.version > self.base_version


def decide(
    op: Op,
    writes: Mapping[str, FieldValue],
    *,
    state: RecordView,
    base_version: int,
    client_id: str,
    changes: Sequence[Change],
    policies: Mapping[str, Policy],
    state_fields: frozenset[str] = frozenset(),
    all_lww: bool = False,
    text_edits: Mapping[str, Sequence[TextOp]] | None = None,
    base_texts: Mapping[str, FieldValue] | None = None,
    points: Mapping[str, tuple[str, Sequence[TextOp], int]] | None = None,
) -> Decision:
    """Decide what `op` with `writes` on `base_version` does to the record.

    `writes` are the validated fields the mutation writes (for a PUT, every
    field: None for those it clears); ignored for DELETE. `changes` are the
    record's committed versions above base_version, in ascending order (the
    caller checked that base_version <= state.version). Fields not in
    `policies` default to merge. `text_edits` are text fields written as
    operations (not also in `writes`), `base_texts` the client's base values
    (`base_fields`) of text fields, `points` what this client's earlier
    edits in the same transaction left (text, operations to the value, version).
    Raises TextEditsInvalid when operations do not cover the text they apply to.
    """
    quiet = base_version >= state.history_floor and (
        not changes or all(c.client_id == client_id for c in changes)
    )
    if quiet and not text_edits:
        return _decide_quiet(op, writes, state)
    hist = _History(state, base_version, client_id, sorted(changes, key=lambda c: c.version))
    texts: dict[str, _TextIn] = {}
    starts = _starts(base_texts or {}, points or {})
    if not text_edits:
        if op is Op.DELETE:
            return _decide_delete(hist, all_lww)
        return _decide_write(hist, op, writes, policies, state_fields, all_lww, texts, starts)
    edited = _texts_from_ops(hist, text_edits, starts, texts)
    writes = {**writes, **edited}
    if quiet:
        d = _decide_quiet(op, writes, state)
    else:
        d = _decide_write(hist, op, writes, policies, state_fields, all_lww, texts, starts)
    notes = dict(d.history_notes)
    pts: dict[str, tuple[str, list[TextOp]]] = {}
    for name, t in texts.items():
        yours = edited[name]
        assert isinstance(yours, str)
        own = notes.get(OWN + name)
        pts[name] = (yours, _ops_of(own) if isinstance(own, Json) else [])
        if DELTA + name not in notes and t.point.text == _text_or_none(hist.theirs(name)):
            notes[DELTA + name] = _ops_json(t.ops)  # applied to the value as it was
    d.history_notes, d.points = notes, pts
    return d


def _text_or_none(value: FieldValue) -> str | None:
    return "" if value is None else value if isinstance(value, str) else None


def _starts(
    base_texts: Mapping[str, FieldValue], points: Mapping[str, tuple[str, Sequence[TextOp], int]]
) -> dict[str, _Point]:
    out = {name: _Point(text, list(ops), v) for name, (text, ops, v) in points.items()}
    for name, value in base_texts.items():  # the client's word for it: related by diff
        if value is None or isinstance(value, str):
            out[name] = _Point(value or "", None, 0)
    return out


def _texts_from_ops(
    hist: _History,
    text_edits: Mapping[str, Sequence[TextOp]],
    starts: Mapping[str, _Point],
    texts: dict[str, _TextIn],
) -> Fields:
    """Each field's operations applied to the text the client had (see the module
    docstring); ``texts`` receives that text and the edits, for the merge."""
    out: Fields = {}
    for name, ops in text_edits.items():
        try:
            point = hist.client_point(name, starts)
        except TextOpsError:
            raise TextEditsInvalid(name, "the field does not hold text") from None
        if isinstance(point, _Unknown):
            # Pruned history: the text cannot be built, so the operations themselves
            # are what a conflict keeps (SPEC §1: never a silent overwrite).
            out[name] = _ops_json(ops)
            continue
        try:
            edits = edits_from_ops(point.text, ops)
            out[name] = apply_ops(point.text, ops)
        except TextOpsError as e:
            raise TextEditsInvalid(name, str(e)) from None
        texts[name] = _TextIn(point, ops, edits)
    return out


def _decide_quiet(op: Op, writes: Mapping[str, FieldValue], state: RecordView) -> Decision:
    """Nobody else changed the record since base (and its history is whole): every
    write applies. The common case by far, so it skips the general bookkeeping;
    the general rules give the same (tests/test_merge.py checks it)."""
    if op is Op.DELETE:
        return Decision(Outcome.APPLIED, {} if state.deleted else {DELETED: True})
    updates: Fields = {DELETED: False} if state.deleted else {}
    fields = state.fields
    for name, yours in writes.items():
        if not same(yours, fields.get(name)):
            updates[name] = yours
    return Decision(Outcome.APPLIED, updates)


def _decide_delete(hist: _History, all_lww: bool) -> Decision:
    if hist.theirs(DELETED):
        # Deleted already (or never existed): nothing to do.
        outcome = Outcome.MERGED if hist.others_changed_anything() else Outcome.APPLIED
        return Decision(outcome, {})
    changed = _fields_changed_by_others(hist)
    if not changed:
        return Decision(_outcome(hist), {DELETED: True})
    if all_lww:
        overwrites = [
            Overwrite(name, hist.theirs(name), None, hist.writer(name).mutation_id)
            for name, _ in changed
        ]
        return Decision(Outcome.MERGED, {DELETED: True}, overwrites=overwrites)
    collisions = [
        FieldCollision(name, hist.base(name), None, hist.theirs(name)) for name, _ in changed
    ]
    return Decision(
        Outcome.CONFLICT,
        {},
        conflict_kind=ConflictKind.DELETE_UPDATE,
        collisions=collisions,
    )


def _fields_changed_by_others(hist: _History) -> list[tuple[str, Change]]:
    """Fields (not DELETED) that another writer changed since base, in name order."""
    names: set[str] = set()
    for ch in hist.changes:
        if ch.client_id != hist.client_id:
            names.update(n for n in ch.old if not n.startswith("_"))
    if not hist.complete:
        versions = hist.state.field_versions
        names.update(
            n for n, v in versions.items() if v > hist.base_version and not n.startswith("_")
        )
    out = []
    for name in sorted(names):
        change = hist.moved(name)
        if change is not None:
            out.append((name, change))
    return out


def _decide_write(
    hist: _History,
    op: Op,
    writes: Mapping[str, FieldValue],
    policies: Mapping[str, Policy],
    state_fields: frozenset[str],
    all_lww: bool,
    texts: Mapping[str, _TextIn],
    starts: Mapping[str, _Point],
) -> Decision:
    deleted_by = hist.other_change(DELETED) if hist.theirs(DELETED) else None
    if deleted_by is not None and not all_lww:
        # Someone else deleted the record since this client's base (at base 0:
        # created and deleted it, so the pseudo-field went True -> False -> True).
        if not writes:
            # A write of no fields has nothing to conflict with: the delete stands.
            return Decision(_outcome(hist), {})
        return Decision(
            Outcome.CONFLICT,
            {},
            conflict_kind=ConflictKind.UPDATE_DELETE,
            collisions=[
                FieldCollision(name, hist.base(name), value, hist.theirs(name))
                for name, value in sorted(writes.items())
            ],
        )

    updates: Fields = {}
    collisions: list[FieldCollision] = []
    overwrites: list[Overwrite] = []
    duplicates: list[DuplicateTransition] = []
    overlaps: list[TextOverlap] = []
    notes: Fields = {}
    if hist.theirs(DELETED):
        updates[DELETED] = False
        if deleted_by is not None:  # all-lww collection: the write wins over the delete
            overwrites.append(Overwrite(DELETED, True, False, hist.writer(DELETED).mutation_id))

    for name, yours in writes.items():
        theirs = hist.theirs(name)
        other = hist.moved(name)
        if other is None:
            if not same(yours, theirs):
                updates[name] = yours
            continue
        if (
            op is Op.PUT
            and hist.base_version > 0
            and hist.complete
            and same(yours, hist.base(name))
        ):
            # Replacing a record it has seen, a PUT repeats every field; one it
            # left as it saw it is no intent to undo another writer's change.
            # (On base 0 a PUT is a create and names only what it means.)
            continue
        if same(yours, theirs):
            # A duplicate only if another writer made the transition (not this
            # client, whose own later change may hold the value now).
            writer = hist.writer(name)
            if (
                name in state_fields
                and not same(yours, hist.base(name))
                and writer.client_id != hist.client_id
            ):
                duplicates.append(
                    DuplicateTransition(name, yours, writer.mutation_id, writer.client_id)
                )
            continue
        policy = policies.get(name, Policy.MERGE)
        if policy is Policy.LWW:
            updates[name] = yours
            overwrites.append(Overwrite(name, theirs, yours, hist.writer(name).mutation_id))
            continue
        if policy is Policy.TEXT:
            merged = _merge_text(hist, name, yours, theirs, texts, starts)
            if merged is not None:
                ancestor, m = merged
                assert isinstance(yours, str)  # _merge_text checked it
                if not same(m.text, theirs):
                    updates[name] = m.text
                    notes[DELTA + name] = _ops_json(m.yours_over_theirs)
                if m.overlapped:
                    overlaps.append(TextOverlap(name, ancestor, yours, str(theirs or ""), m.text))
                if m.text != yours:
                    notes[SENT + name] = yours
                    notes[OWN + name] = _ops_json(m.theirs_over_yours)
                continue
        collisions.append(FieldCollision(name, hist.base(name), yours, theirs))

    if collisions:
        created_by_other = hist.base_version == 0 and hist.other_change(DELETED) is not None
        kind = ConflictKind.CREATE_CREATE if created_by_other else ConflictKind.FIELDS
        return Decision(
            Outcome.CONFLICT,
            updates,
            conflict_kind=kind,
            collisions=collisions,
            overwrites=overwrites,
            duplicates=duplicates,
            text_overlaps=overlaps,
            history_notes=notes,
        )
    return Decision(
        _outcome(hist),
        updates,
        overwrites=overwrites,
        duplicates=duplicates,
        text_overlaps=overlaps,
        history_notes=notes,
    )


def _merge_text(
    hist: _History,
    name: str,
    yours: FieldValue,
    theirs: FieldValue,
    texts: Mapping[str, _TextIn],
    starts: Mapping[str, _Point],
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
            found = hist.client_point(name, starts)
        except TextOpsError:
            return None
        if isinstance(found, _Unknown):
            return None
        point, mine = found, diff(found.text, yours)
    exact = hist.ops_since(name, point)
    if exact is not None:
        try:
            if (apply_ops(point.text, exact) if exact else point.text) == theirs:
                return point.text, merge(point.text, mine, edits_from_ops(point.text, exact))
        except TextOpsError:
            pass
    if name in texts:
        return point.text, merge_ops(point.text, mine, theirs)
    return point.text, merge_text(point.text, yours, theirs)


def _outcome(hist: _History) -> Outcome:
    return Outcome.MERGED if hist.others_changed_anything() else Outcome.APPLIED
