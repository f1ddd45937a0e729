"""The merge decision: base, yours, theirs -> what a mutation does to a record.

A pure function of plain values (SPEC §3): no gRPC, no SQL, no clock. The
batch run (sync_service.writes.batch_run) loads the record and the changes
committed since the mutation's base, calls `decide`, and stores what it returns.

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
                                                                  (sync_service.rules.textmerge)

A field changed since base only by the same client is not "another writer"
(a client queues several edits to one record on the base it last saw).

Text fields (policy text), their operations and the history notes their merges leave
are sync_service.rules.textfields.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Protocol

from fieldsync.textops import TextOp
from fieldsync.values import Fields, FieldValue, Json, same
from sync_service.rules.schema import Policy
from sync_service.rules.textfields import (
    DELTA,
    OWN,
    SENT,
    Point,
    TextIn,
    merge_text_field,
    ops_json,
    ops_of,
    starts_of,
    text_or_none,
    texts_from_ops,
)

DELETED = "_deleted"
"""The pseudo-field for a record's existence; schema field names cannot start with '_'."""


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
        if self.last_change(name) <= self.base_version:
            return self.theirs(name)
        return None

    def last_change(self, name: str) -> int:
        return self.state.field_versions.get(name, 0)

    def other_change(self, name: str) -> Change | None:
        """The latest change to `name` since base by another client, if any."""
        if not self.changes and self.complete:
            return None  # the common case: nothing happened since the client's base
        for ch in reversed(self.changes):
            if name in ch.old and ch.client_id != self.client_id:
                return ch
        if not self.complete and self.last_change(name) > self.base_version:
            # Pruned history: who changed it is unknown, so it is never taken
            # as this client's own change (SPEC §1: a conflict, never a
            # silent overwrite).
            return Change(self.last_change(name), "", "", {})
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
        return Change(self.last_change(name), "", "", {})  # pruned: the writer is unknown

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
    texts: dict[str, TextIn] = {}
    starts = starts_of(base_texts or {}, points or {})
    if not text_edits:
        if op is Op.DELETE:
            return _decide_delete(hist, all_lww)
        return _decide_write(hist, op, writes, policies, state_fields, all_lww, texts, starts)
    edited = texts_from_ops(hist, text_edits, starts, texts)
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
        pts[name] = (yours, ops_of(own) if isinstance(own, Json) else [])
        if DELTA + name not in notes and t.point.text == text_or_none(hist.theirs(name)):
            notes[DELTA + name] = ops_json(t.ops)  # applied to the value as it was
    d.history_notes, d.points = notes, pts
    return d


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
    texts: Mapping[str, TextIn],
    starts: Mapping[str, Point],
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
            merged = merge_text_field(hist, name, yours, theirs, texts, starts)
            if merged is not None:
                ancestor, m = merged
                assert isinstance(yours, str)  # _merge_text checked it
                if not same(m.text, theirs):
                    updates[name] = m.text
                    notes[DELTA + name] = ops_json(m.yours_over_theirs)
                if m.overlapped:
                    overlaps.append(TextOverlap(name, ancestor, yours, str(theirs or ""), m.text))
                if m.text != yours:
                    notes[SENT + name] = yours
                    notes[OWN + name] = ops_json(m.theirs_over_yours)
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


def _outcome(hist: _History) -> Outcome:
    return Outcome.MERGED if hist.others_changed_anything() else Outcome.APPLIED
