"""The merge decision (sync_service.rules.merge.decide), tested as a pure function (SPEC §1, §3).

Examples first, one per case of SPEC §3, each built from a small `Log` (the
record's history as the server would store it); then Hypothesis properties
that run random histories, random mutations and random policies against a
reference model written here from the SPEC, independently of the engine.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fieldsync.textops import Delete, Insert, Retain, TextOp, normalize
from fieldsync.values import FieldValue, Json, same
from sync_service.rules.merge import (
    DELETED,
    Change,
    ConflictKind,
    Decision,
    DuplicateTransition,
    FieldCollision,
    Op,
    Outcome,
    Overwrite,
    RecordState,
    TextOverlap,
    decide,
)
from sync_service.rules.schema import Policy
from sync_service.rules.textfields import SENT, TextEditsInvalid
from sync_service.rules.textmerge import diff

ME = "me"
OTHERS = ("ann", "bob", "cy")
FIELDS = ("title", "estimate", "status")

MERGE, LWW, TEXT = Policy.MERGE, Policy.LWW, Policy.TEXT


def _typed_into(base: FieldValue, yours: FieldValue, merged: FieldValue) -> bool:
    """Every insertion of `yours` (against `base`) is in `merged`, in order."""
    if not all(v is None or isinstance(v, str) for v in (base, yours, merged)):
        return False
    rest = str(merged or "")
    for e in diff(str(base or ""), str(yours or "")):
        at = rest.find(e.text)
        if at < 0:
            return False
        rest = rest[at + len(e.text) :]
    return True


def _same(a: FieldValue, b: FieldValue) -> bool:
    """The model's own value equality: the type is part of the value (True is not 1)."""
    return type(a) is type(b) and a == b


# -- a record's history, as the server stores it ------------------------------


@dataclass(frozen=True)
class Commit:
    version: int
    client_id: str
    mutation_id: str
    old: Mapping[str, FieldValue]  # the values this version replaced, DELETED included


@dataclass
class Log:
    """Every committed version of one record, from "never existed" (version 0) on.

    Deletes keep the fields (a tombstone), and a write to a deleted record
    re-creates it, as sync_service.writes.batch_run stores them. A commit always changes
    something: a no-op is not a version (SPEC §1).
    """

    commits: list[Commit] = field(default_factory=list)
    snapshots: list[tuple[bool, dict[str, FieldValue]]] = field(
        default_factory=lambda: [(True, {})]
    )

    @property
    def version(self) -> int:
        return len(self.commits)

    @property
    def deleted(self) -> bool:
        return self.snapshots[-1][0]

    def value(self, name: str, version: int | None = None) -> FieldValue:
        deleted, fields = self.snapshots[self.version if version is None else version]
        return deleted if name == DELETED else fields.get(name)

    def write(self, client_id: str, values: Mapping[str, FieldValue]) -> str:
        deleted, fields = self.snapshots[-1]
        old: dict[str, FieldValue] = {DELETED: True} if deleted else {}
        new = dict(fields)
        for name, value in values.items():
            if not _same(fields.get(name), value):
                old[name] = fields.get(name)
                if value is None:
                    new.pop(name, None)
                else:
                    new[name] = value
        return self._commit(client_id, old, False, new)

    def delete(self, client_id: str) -> str:
        assert not self.deleted
        return self._commit(client_id, {DELETED: False}, True, dict(self.snapshots[-1][1]))

    def _commit(
        self,
        client_id: str,
        old: dict[str, FieldValue],
        deleted: bool,
        fields: dict[str, FieldValue],
    ) -> str:
        assert old, "a commit changes something"
        mutation_id = f"m{self.version + 1}-{client_id}"
        self.commits.append(Commit(self.version + 1, client_id, mutation_id, old))
        self.snapshots.append((deleted, fields))
        return mutation_id

    def state(self, floor: int = 0) -> RecordState:
        field_versions = {name: c.version for c in self.commits for name in c.old}
        deleted, fields = self.snapshots[-1]
        return RecordState(self.version, deleted, dict(fields), field_versions, floor)

    def changes(self, base: int, floor: int = 0) -> list[Change]:
        """What the server still knows after `base`: nothing at or below the floor."""
        return [
            Change(c.version, c.client_id, c.mutation_id, dict(c.old))
            for c in self.commits
            if c.version > max(base, floor)
        ]


def run(
    log: Log,
    writes: Mapping[str, FieldValue],
    *,
    base: int,
    op: Op = Op.PATCH,
    floor: int = 0,
    policies: Mapping[str, Policy] | None = None,
    state_fields: frozenset[str] = frozenset(),
    all_lww: bool = False,
) -> Decision:
    d = decide(
        op,
        writes,
        state=log.state(floor),
        base_version=base,
        client_id=ME,
        changes=log.changes(base, floor),
        policies=policies or {},
        state_fields=state_fields,
        all_lww=all_lww,
    )
    return _plain(d)


def expect(
    outcome: Outcome,
    updates: Mapping[str, FieldValue],
    conflict_kind: ConflictKind | None = None,
    collisions: Sequence[FieldCollision] = (),
    overwrites: Sequence[Overwrite] = (),
    duplicates: Sequence[DuplicateTransition] = (),
) -> Decision:
    """A decision with its lists as tuples, to compare with `run`'s."""
    return Decision(
        outcome,
        dict(updates),
        conflict_kind,
        tuple(collisions),
        tuple(overwrites),
        tuple(duplicates),
    )


def _plain(d: Decision) -> Decision:
    return expect(d.outcome, d.updates, d.conflict_kind, d.collisions, d.overwrites, d.duplicates)


def task(title: str = "draft", estimate: int = 1, status: str = "todo") -> Log:
    """A task ann created at version 1."""
    log = Log()
    log.write("ann", {"title": title, "estimate": estimate, "status": status})
    return log


# -- the merge table, row by row ----------------------------------------------


def test_a_field_unchanged_on_the_server_takes_yours() -> None:
    log = task()
    assert run(log, {"title": "final"}, base=1) == expect(Outcome.APPLIED, {"title": "final"})


@pytest.mark.parametrize("policy", [MERGE, LWW, TEXT])
def test_a_field_changed_on_the_server_to_your_value_is_no_update_and_no_conflict(
    policy: Policy,
) -> None:
    log = task()
    log.write("bob", {"title": "final"})
    d = run(log, {"title": "final"}, base=1, policies={"title": policy})
    assert d == expect(Outcome.MERGED, {})


def test_a_field_changed_to_another_value_under_merge_is_a_conflict_and_theirs_is_kept() -> None:
    log = task()
    log.write("bob", {"title": "bob's"})
    d = run(log, {"title": "mine"}, base=1, policies={"title": MERGE})
    assert d == expect(
        Outcome.CONFLICT,
        {},
        conflict_kind=ConflictKind.FIELDS,
        collisions=[FieldCollision("title", base="draft", yours="mine", theirs="bob's")],
    )


def test_a_field_changed_to_another_value_under_lww_takes_yours_and_records_the_overwrite() -> None:
    log = task()
    bobs = log.write("bob", {"title": "bob's"})
    d = run(log, {"title": "mine"}, base=1, policies={"title": LWW})
    assert d == expect(
        Outcome.MERGED,
        {"title": "mine"},
        overwrites=[
            Overwrite("title", overwritten="bob's", value="mine", overwritten_by_mutation=bobs)
        ],
    )


def test_a_text_field_edited_on_both_sides_merges_character_by_character() -> None:
    log = task()
    log.write("bob", {"title": "draft, bob"})
    d = run(log, {"title": "mine, draft"}, base=1, policies={"title": TEXT})
    assert d == expect(Outcome.MERGED, {"title": "mine, draft, bob"})


def test_overlapping_text_edits_merge_and_the_overlap_is_reported() -> None:
    log = task(title="The quick fox")
    log.write("bob", {"title": "The slow fox"})
    d = decide_text(log, {"title": "The fast fox"}, base=1)
    assert (d.outcome, d.updates, d.collisions) == (
        Outcome.MERGED,
        {"title": "The slowfast fox"},
        (),
    )
    assert d.text_overlaps == [
        TextOverlap("title", "The quick fox", "The fast fox", "The slow fox", "The slowfast fox")
    ]
    assert d.history_notes[SENT + "title"] == "The fast fox"


def decide_text(
    log: Log,
    writes: Mapping[str, FieldValue],
    *,
    base: int,
    text_edits: Mapping[str, Sequence[TextOp]] | None = None,
    base_texts: Mapping[str, FieldValue] | None = None,
    client: str = ME,
    floor: int = 0,
) -> Decision:
    return decide(
        Op.PATCH,
        writes,
        state=log.state(floor),
        base_version=base,
        client_id=client,
        changes=log.changes(base, floor),
        policies={"title": TEXT},
        text_edits=text_edits,
        base_texts=base_texts,
    )


def commit(log: Log, client: str, d: Decision) -> None:
    """What the applier stores: the updates, and the client's own text beside a merge."""
    if not d.updates:
        return
    deleted, fields = log.snapshots[-1]
    old: dict[str, FieldValue] = {n: fields.get(n) for n in d.updates}
    old.update({k: v for k, v in d.history_notes.items() if k.split(":", 1)[1] in d.updates})
    log._commit(client, old, deleted, {**fields, **d.updates})


def test_text_edits_apply_to_the_base_and_merge_with_another_writers_edit() -> None:
    log = task(title="The quick fox")
    log.write("bob", {"title": "The quick fox jumps"})
    ops: list[TextOp] = [Retain(4), Insert("very "), Retain(9)]
    d = decide_text(log, {}, base=1, text_edits={"title": ops})
    assert (d.outcome, d.updates) == (Outcome.MERGED, {"title": "The very quick fox jumps"})
    assert d.text_overlaps == []


def test_text_edits_on_base_fields_apply_to_that_text() -> None:
    log = task(title="abc")
    d = decide_text(
        log, {}, base=1, text_edits={"title": [Retain(1), Delete(1)]}, base_texts={"title": "xy"}
    )
    assert d.updates == {"title": "x"}


def test_a_queue_of_text_edits_on_one_base_applies_as_typed_between_other_writers() -> None:
    """Each queued edit applies to the text the client had after its previous one, even
    when the server merged that one with another writer's edits."""
    log = task(title="hello")
    mine = "hello"
    for i, (pos, word) in enumerate([(5, " world"), (0, "Oh, "), (4, "my ")]):
        ops = normalize([Retain(pos), Insert(word), Retain(len(mine) - pos)])
        mine = mine[:pos] + word + mine[pos:]
        d = decide_text(log, {}, base=1, text_edits={"title": ops})
        assert d.collisions == ()
        commit(log, ME, d)
        log.write("bob", {"title": str(log.value("title")) + f" [{i}]"})
    assert log.value("title") == "Oh, my hello world [0] [1] [2]"


def test_text_edits_that_do_not_cover_the_text_are_invalid() -> None:
    log = task(title="abc")
    with pytest.raises(TextEditsInvalid, match="past the end"):
        decide_text(log, {}, base=1, text_edits={"title": [Retain(4)]})
    with pytest.raises(TextEditsInvalid, match="no operations"):
        decide_text(log, {}, base=1, text_edits={"title": []})


def test_text_edits_after_pruned_history_are_a_conflict_keeping_the_operations() -> None:
    log = task(title="abc")
    log.write("bob", {"title": "abcd"})
    ops: list[TextOp] = [Insert("X"), Retain(3)]
    d = decide_text(log, {}, base=1, floor=2, text_edits={"title": ops})
    assert d.outcome is Outcome.CONFLICT
    (c,) = d.collisions
    assert c.yours == Json('[{"insert":"X"},{"retain":3}]')
    assert c.theirs == "abcd"


def test_text_after_pruned_history_is_a_conflict_not_a_guess() -> None:
    log = task()
    log.write("bob", {"title": "draft, bob"})
    d = run(log, {"title": "mine, draft"}, base=1, floor=2, policies={"title": TEXT})
    assert d.outcome is Outcome.CONFLICT


def test_a_field_another_writer_changed_and_changed_back_takes_yours() -> None:
    log = task()
    log.write("bob", {"title": "oops"})
    log.write("bob", {"title": "draft"})  # back to what the client saw
    d = run(log, {"title": "mine"}, base=1, policies={"title": MERGE})
    assert d == expect(Outcome.MERGED, {"title": "mine"})


def test_a_put_replacing_a_record_keeps_theirs_where_it_repeats_the_base() -> None:
    log = task()
    log.write("bob", {"estimate": 8})
    # The client saw v1 (draft, 1, todo) and re-sends the whole record, changing the title only.
    d = run(log, {"title": "final", "estimate": 1, "status": "todo"}, base=1, op=Op.PUT)
    assert d == expect(Outcome.MERGED, {"title": "final"})


def test_fields_the_mutation_does_not_write_are_left_as_the_server_has_them() -> None:
    log = task()
    log.write("bob", {"estimate": 8, "status": "doing"})
    d = run(log, {"title": "final"}, base=1)
    assert d == expect(Outcome.MERGED, {"title": "final"})


def test_two_users_changing_different_fields_both_keep_their_change() -> None:
    log = task()
    log.write("bob", {"title": "bob's title"})  # the first of the two, already committed
    d = run(log, {"estimate": 5}, base=1)
    assert d == expect(Outcome.MERGED, {"estimate": 5})
    # The record after both: bob's title and my estimate.
    assert {**log.state().fields, **d.updates} == {
        "title": "bob's title",
        "estimate": 5,
        "status": "todo",
    }


def test_a_mutation_with_a_conflicting_field_still_applies_its_other_fields() -> None:
    log = task()
    log.write("bob", {"title": "bob's"})
    d = run(log, {"title": "mine", "estimate": 5, "status": "todo"}, base=1)
    assert d == expect(
        Outcome.CONFLICT,
        {"estimate": 5},
        conflict_kind=ConflictKind.FIELDS,
        collisions=[FieldCollision("title", "draft", "mine", "bob's")],
    )


def test_a_clients_own_earlier_changes_since_base_never_conflict() -> None:
    log = task()
    log.write(ME, {"title": "first edit"})
    log.write(ME, {"title": "second edit", "estimate": 3})
    d = run(log, {"title": "third edit", "estimate": 4}, base=1)
    assert d == expect(Outcome.APPLIED, {"title": "third edit", "estimate": 4})


def test_another_clients_change_between_my_own_changes_does_conflict() -> None:
    log = task()
    log.write(ME, {"title": "first edit"})
    log.write("bob", {"title": "bob's"})
    log.write(ME, {"estimate": 3})
    d = run(log, {"title": "third edit", "estimate": 4}, base=1)
    assert d == expect(
        Outcome.CONFLICT,
        {"estimate": 4},
        conflict_kind=ConflictKind.FIELDS,
        collisions=[FieldCollision("title", "draft", "third edit", "bob's")],
    )


def test_another_clients_change_to_another_field_between_mine_is_merged() -> None:
    log = task()
    log.write(ME, {"title": "first edit"})
    log.write("bob", {"status": "doing"})
    d = run(log, {"title": "second edit"}, base=1)
    assert d == expect(Outcome.MERGED, {"title": "second edit"})


def test_a_no_op_write_changes_nothing_and_is_applied() -> None:
    log = task()
    d = run(log, {"title": "draft", "estimate": 1}, base=1)
    assert d == expect(Outcome.APPLIED, {})
    assert not d.changes_record


# -- existence: creates and deletes ---------------------------------------------


def test_creating_a_new_record_applies_every_field_it_writes() -> None:
    d = run(Log(), {"title": "new", "estimate": 2, "status": None}, base=0, op=Op.PUT)
    assert d == expect(Outcome.APPLIED, {DELETED: False, "title": "new", "estimate": 2})
    assert Log().state() == RecordState()


def test_deleting_a_record_unchanged_since_base_deletes_it() -> None:
    log = task()
    assert run(log, {}, base=1, op=Op.DELETE) == expect(Outcome.APPLIED, {DELETED: True})


def test_deleting_a_record_another_client_changed_since_base_is_a_delete_update_conflict() -> None:
    log = task()
    log.write("bob", {"estimate": 8})
    d = run(log, {}, base=1, op=Op.DELETE)
    assert d == expect(
        Outcome.CONFLICT,
        {},
        conflict_kind=ConflictKind.DELETE_UPDATE,
        collisions=[FieldCollision("estimate", base=1, yours=None, theirs=8)],
    )


def test_deleting_a_record_only_i_changed_since_base_deletes_it() -> None:
    log = task()
    log.write(ME, {"estimate": 8})
    assert run(log, {}, base=1, op=Op.DELETE) == expect(Outcome.APPLIED, {DELETED: True})


def test_in_an_all_lww_collection_a_delete_wins_over_a_concurrent_update_and_is_audited() -> None:
    log = task()
    bobs = log.write("bob", {"estimate": 8, "title": "bob's"})
    d = run(log, {}, base=1, op=Op.DELETE, policies=dict.fromkeys(FIELDS, LWW), all_lww=True)
    assert d == expect(
        Outcome.MERGED,
        {DELETED: True},
        overwrites=[
            Overwrite("estimate", overwritten=8, value=None, overwritten_by_mutation=bobs),
            Overwrite("title", overwritten="bob's", value=None, overwritten_by_mutation=bobs),
        ],
    )


def test_deleting_a_record_another_client_already_deleted_changes_nothing() -> None:
    log = task()
    log.delete("bob")
    assert run(log, {}, base=1, op=Op.DELETE) == expect(Outcome.MERGED, {})


def test_deleting_a_record_that_never_existed_changes_nothing() -> None:
    assert run(Log(), {}, base=0, op=Op.DELETE) == expect(Outcome.APPLIED, {})


def test_deleting_a_record_i_saw_deleted_changes_nothing() -> None:
    log = task()
    log.delete("bob")
    assert run(log, {}, base=2, op=Op.DELETE) == expect(Outcome.APPLIED, {})


def test_writing_to_a_record_another_client_deleted_since_base_is_an_update_delete_conflict() -> (
    None
):
    log = task()
    log.delete("bob")
    d = run(log, {"title": "mine", "estimate": 1}, base=1)
    assert d == expect(
        Outcome.CONFLICT,
        {},
        conflict_kind=ConflictKind.UPDATE_DELETE,
        collisions=[
            FieldCollision("estimate", base=1, yours=1, theirs=1),
            FieldCollision("title", base="draft", yours="mine", theirs="draft"),
        ],
    )


def test_in_an_all_lww_collection_a_write_wins_over_a_concurrent_delete_and_undeletes() -> None:
    log = task()
    bobs = log.delete("bob")
    d = run(log, {"title": "mine"}, base=1, policies=dict.fromkeys(FIELDS, LWW), all_lww=True)
    assert d == expect(
        Outcome.MERGED,
        {DELETED: False, "title": "mine"},
        overwrites=[
            Overwrite(DELETED, overwritten=True, value=False, overwritten_by_mutation=bobs)
        ],
    )


def test_writing_to_a_record_deleted_before_my_base_re_creates_it() -> None:
    log = task()
    log.delete("bob")
    d = run(log, {"title": "back again"}, base=2)
    assert d == expect(Outcome.APPLIED, {DELETED: False, "title": "back again"})


def test_writing_to_a_record_i_deleted_myself_since_base_re_creates_it() -> None:
    log = task()
    log.delete(ME)
    d = run(log, {"title": "back again"}, base=1)
    assert d == expect(Outcome.APPLIED, {DELETED: False, "title": "back again"})


def test_a_second_create_of_one_id_conflicts_on_the_fields_that_differ() -> None:
    log = Log()
    log.write("ann", {"title": "A", "estimate": 3})
    d = run(log, {"title": "B", "estimate": 3, "status": "todo"}, base=0, op=Op.PUT)
    assert d == expect(
        Outcome.CONFLICT,
        {"status": "todo"},
        conflict_kind=ConflictKind.CREATE_CREATE,
        collisions=[FieldCollision("title", base=None, yours="B", theirs="A")],
    )


def test_a_second_create_of_one_id_with_the_same_values_is_merged() -> None:
    log = Log()
    log.write("ann", {"title": "A", "estimate": 3})
    d = run(log, {"title": "A", "estimate": 3}, base=0, op=Op.PUT)
    assert d == expect(Outcome.MERGED, {})


def test_in_an_all_lww_collection_the_later_create_wins() -> None:
    log = Log()
    anns = log.write("ann", {"title": "A", "estimate": 3})
    d = run(
        log,
        {"title": "B", "estimate": 3},
        base=0,
        op=Op.PUT,
        policies=dict.fromkeys(FIELDS, LWW),
        all_lww=True,
    )
    assert d == expect(
        Outcome.MERGED, {"title": "B"}, overwrites=[Overwrite("title", "A", "B", anns)]
    )


def test_a_create_of_an_id_another_client_created_and_deleted_is_an_update_delete_conflict() -> (
    None
):
    log = Log()
    log.write("ann", {"title": "A"})
    log.delete("ann")
    d = run(log, {"title": "B"}, base=0, op=Op.PUT)
    assert d == expect(
        Outcome.CONFLICT,
        {},
        conflict_kind=ConflictKind.UPDATE_DELETE,
        collisions=[FieldCollision("title", base=None, yours="B", theirs="A")],
    )


def test_an_empty_patch_to_a_record_another_client_deleted_changes_nothing() -> None:
    # Nothing is written, so there is nothing to conflict with the delete: a
    # CONFLICT result needs a conflict the user can see and resolve.
    log = task()
    log.delete("bob")
    assert run(log, {}, base=1) == expect(Outcome.MERGED, {})


# -- duplicate transitions ---------------------------------------------------------


def test_moving_a_state_field_to_the_value_another_user_moved_it_to_is_a_duplicate() -> None:
    log = task()
    bobs = log.write("bob", {"status": "done"})
    d = run(log, {"status": "done"}, base=1, state_fields=frozenset({"status"}))
    assert d == expect(
        Outcome.MERGED,
        {},
        duplicates=[
            DuplicateTransition("status", "done", earlier_mutation_id=bobs, earlier_client_id="bob")
        ],
    )


def test_a_duplicate_transition_names_the_mutation_that_made_it() -> None:
    log = task()
    log.write("bob", {"status": "doing"})
    cys = log.write("cy", {"status": "done"})
    log.write("bob", {"title": "bob's"})
    d = run(log, {"status": "done"}, base=1, state_fields=frozenset({"status"}))
    assert d.duplicates == (DuplicateTransition("status", "done", cys, "cy"),)


def test_a_state_field_moved_back_to_its_base_value_is_no_transition() -> None:
    log = task()
    log.write("bob", {"status": "doing"})
    log.write("bob", {"status": "todo"})
    d = run(log, {"status": "todo"}, base=1, state_fields=frozenset({"status"}))
    assert d == expect(Outcome.MERGED, {})


def test_the_same_value_in_a_field_that_is_not_a_state_field_is_no_transition() -> None:
    log = task()
    log.write("bob", {"status": "done"})
    assert run(log, {"status": "done"}, base=1) == expect(Outcome.MERGED, {})


def test_my_repeated_transition_after_overwriting_another_users_is_no_duplicate() -> None:
    # Whole-record PUTs queued offline: the first moved status over bob's
    # (last write wins), the second writes the same status again. Nobody else
    # moved it to done, so there is no duplicate to report.
    log = task()
    log.write("bob", {"status": "doing"})
    log.write(ME, {"status": "done"})
    d = run(
        log,
        {"status": "done", "title": "x"},
        base=1,
        policies={"status": LWW},
        state_fields=frozenset({"status"}),
    )
    assert d == expect(Outcome.MERGED, {"title": "x"})


def test_an_lww_overwrite_names_the_mutation_that_wrote_the_overwritten_value() -> None:
    log = task()
    log.write("bob", {"estimate": 5})
    mine = log.write(ME, {"estimate": 7})
    d = run(log, {"estimate": 9}, base=1, policies={"estimate": LWW})
    assert d == expect(
        Outcome.MERGED, {"estimate": 9}, overwrites=[Overwrite("estimate", 7, 9, mine)]
    )


# -- pruned history ------------------------------------------------------------------


def test_with_pruned_history_a_field_changed_since_base_conflicts_whoever_changed_it() -> None:
    # Versions 2..3 are pruned: the server cannot tell whether the change to
    # the title was mine, so it is never a silent overwrite.
    log = task()
    log.write(ME, {"title": "mine, earlier"})
    log.write("bob", {"estimate": 2})
    log.write("bob", {"status": "doing"})
    d = run(log, {"title": "mine, later", "estimate": 2}, base=1, floor=3)
    assert d == expect(
        Outcome.CONFLICT,
        {},
        conflict_kind=ConflictKind.FIELDS,
        collisions=[
            FieldCollision("title", base=None, yours="mine, later", theirs="mine, earlier")
        ],
    )


def test_with_pruned_history_an_lww_field_changed_since_base_records_the_overwrite() -> None:
    log = task()
    log.write("bob", {"title": "bob's"})
    log.write("bob", {"status": "doing"})
    d = run(log, {"title": "mine"}, base=1, floor=2, policies={"title": LWW})
    assert d == expect(
        Outcome.MERGED,
        {"title": "mine"},
        overwrites=[Overwrite("title", "bob's", "mine", overwritten_by_mutation="")],
    )


def test_with_pruned_history_a_field_unchanged_since_base_takes_yours() -> None:
    log = task()
    log.write("bob", {"estimate": 2})
    log.write("bob", {"status": "doing"})
    d = run(log, {"title": "mine"}, base=1, floor=3)
    assert d == expect(Outcome.MERGED, {"title": "mine"})


def test_with_pruned_history_a_delete_of_a_changed_record_conflicts() -> None:
    log = task()
    log.write(ME, {"estimate": 2})
    d = run(log, {}, base=1, floor=2, op=Op.DELETE)
    assert d == expect(
        Outcome.CONFLICT,
        {},
        conflict_kind=ConflictKind.DELETE_UPDATE,
        collisions=[FieldCollision("estimate", base=None, yours=None, theirs=2)],
    )


# -- what counts as the same value ---------------------------------------------------


def test_same_tells_types_apart() -> None:
    assert not same(True, 1)
    assert not same(1, True)
    assert not same(1, 1.0)
    assert not same(0, None)
    assert not same("", None)
    assert same(1, 1)
    assert same(math.nan, math.nan)


def test_true_over_1_is_a_change_not_the_same_value() -> None:
    log = task(estimate=1)
    assert run(log, {"estimate": True}, base=1) == expect(Outcome.APPLIED, {"estimate": True})


def test_1_point_0_against_1_is_a_conflict_not_the_same_value() -> None:
    log = task(estimate=0)
    log.write("bob", {"estimate": 1})
    d = run(log, {"estimate": 1.0}, base=1)
    assert d == expect(
        Outcome.CONFLICT,
        {},
        conflict_kind=ConflictKind.FIELDS,
        collisions=[FieldCollision("estimate", base=0, yours=1.0, theirs=1)],
    )


# -- properties against a reference model ---------------------------------------------

VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(0, 2), st.just(1.0), st.sampled_from(["x", "y"])
)


@dataclass(frozen=True)
class Case:
    log: Log
    base: int
    floor: int
    op: Op
    writes: Mapping[str, FieldValue]
    policies: Mapping[str, Policy]
    state_fields: frozenset[str]
    all_lww: bool

    def decide(self, changes: list[Change] | None = None) -> Decision:
        return decide(
            self.op,
            self.writes,
            state=self.log.state(self.floor),
            base_version=self.base,
            client_id=ME,
            changes=self.log.changes(self.base, self.floor) if changes is None else changes,
            policies=self.policies,
            state_fields=self.state_fields,
            all_lww=self.all_lww,
        )

    def since(self, name: str) -> list[Commit]:
        """Every commit after base that changed `name` (the model sees the whole log)."""
        return [c for c in self.log.commits if c.version > self.base and name in c.old]

    def others_touched(self, name: str) -> bool:
        return any(c.client_id != ME for c in self.since(name))

    def others_committed(self) -> bool:
        return any(c.client_id != ME for c in self.log.commits if c.version > self.base)


MAX_COMMITS = 6
# Strategies are built once: building them inside `cases` would cost more than the test.
_WRITERS = [st.sampled_from((ME, *OTHERS[:n])) for n in range(1, len(OTHERS) + 1)]
_UP_TO = [st.integers(0, n) for n in range(MAX_COMMITS + 1)]
_FLOOR = [st.one_of(st.just(0), up_to) for up_to in _UP_TO]  # often nothing pruned
_A_DELETE = st.integers(0, 4).map(lambda n: n == 0)
_SOME_VALUES = st.dictionaries(st.sampled_from(FIELDS), VALUES, max_size=3)
_WRITTEN = st.lists(st.sampled_from(FIELDS), unique=True)
_ECHO = st.integers(0, 2).map(lambda n: n == 0)  # write the value the server holds
_POLICIES = st.one_of(
    st.fixed_dictionaries({f: st.sampled_from([MERGE, LWW, TEXT]) for f in FIELDS}),
    st.just(dict.fromkeys(FIELDS, LWW)),  # an all-lww collection: deletes take the last write
)
_STATE_FIELDS = st.frozensets(st.sampled_from(FIELDS))


@st.composite
def cases(draw: st.DrawFn) -> Case:
    """A record's history by me and one to three others, then my mutation on some base."""
    who = draw(st.sampled_from(_WRITERS))
    log = Log()
    for _ in range(draw(_UP_TO[MAX_COMMITS])):
        if not log.deleted and draw(_A_DELETE):
            log.delete(draw(who))
            continue
        values = draw(_SOME_VALUES)
        if log.deleted or any(not _same(log.value(k), v) for k, v in values.items()):
            log.write(draw(who), values)
    base = draw(_UP_TO[log.version])
    floor = draw(_FLOOR[log.version])
    op = draw(st.sampled_from(Op))
    writes: dict[str, FieldValue] = {}
    if op is not Op.DELETE:
        for name in draw(_WRITTEN):
            writes[name] = log.value(name) if draw(_ECHO) else draw(VALUES)
    policies = draw(_POLICIES)
    all_lww = all(p is LWW for p in policies.values())  # as CollectionSpec.all_lww
    state_fields = draw(_STATE_FIELDS)
    return Case(log, base, floor, op, writes, policies, state_fields, all_lww)


def reference(c: Case, merged_text: Mapping[str, FieldValue] | None = None) -> Decision:
    """SPEC §1 and §3, rule by rule, from the record's whole history.

    A text field whose two sides are text merges (§3: never a conflict when the
    history is whole); the merged text itself is the text engine's, which
    tests/test_textmerge.py checks on its own: `merged_text` (the engine's updates)
    gives it."""
    log = c.log
    complete = c.base >= c.floor

    def changed_by_others(name: str) -> bool:
        # Pruned history: whoever changed it may have been someone else (§1).
        return c.others_touched(name) if complete else bool(c.since(name))

    def base_value(name: str) -> FieldValue:
        # The server can tell a field's base only if it kept the history.
        return log.value(name, c.base) if complete or not c.since(name) else None

    def writer(name: str) -> tuple[str, str]:
        """Who wrote the field's current value: (mutation, client); unknown if pruned."""
        last = c.since(name)[-1]
        return (last.mutation_id, last.client_id) if last.version > c.floor else ("", "")

    def text_point(name: str) -> FieldValue:
        """The text field as this client last had it: after its latest own change since
        its base, else at its base (what the text merge starts from)."""
        own = [x for x in log.commits if x.version > c.base and x.client_id == ME]
        own = [x for x in own if name in x.old]
        return log.value(name, own[-1].version) if own else base_value(name)

    def moved(name: str) -> bool:
        """Changed by others, and not back at its base value (existence excluded)."""
        if not changed_by_others(name):
            return False
        return name == DELETED or not (complete and _same(log.value(name), base_value(name)))

    quiet = complete and not c.others_committed()
    outcome = Outcome.APPLIED if quiet else Outcome.MERGED

    if c.op is Op.DELETE:
        if log.deleted:
            return Decision(outcome, {})
        hit = [f for f in FIELDS if moved(f)]
        if not hit:
            return Decision(outcome, {DELETED: True})
        if c.all_lww:
            overwrites = [Overwrite(f, log.value(f), None, writer(f)[0]) for f in hit]
            return Decision(Outcome.MERGED, {DELETED: True}, overwrites=overwrites)
        collisions = [FieldCollision(f, base_value(f), None, log.value(f)) for f in hit]
        return Decision(Outcome.CONFLICT, {}, ConflictKind.DELETE_UPDATE, collisions)

    deleted_by_others = log.deleted and changed_by_others(DELETED)
    if deleted_by_others and not c.all_lww:
        if not c.writes:
            return Decision(outcome, {})
        collisions = [
            FieldCollision(f, base_value(f), v, log.value(f)) for f, v in sorted(c.writes.items())
        ]
        return Decision(Outcome.CONFLICT, {}, ConflictKind.UPDATE_DELETE, collisions)

    updates: dict[str, FieldValue] = {}
    collisions = []
    overwrites = []
    duplicates = []
    if log.deleted:
        updates[DELETED] = False
        if deleted_by_others:
            overwrites.append(Overwrite(DELETED, True, False, writer(DELETED)[0]))
    for f, yours in c.writes.items():
        theirs = log.value(f)
        if not moved(f):
            if not _same(yours, theirs):
                updates[f] = yours
        elif c.op is Op.PUT and c.base > 0 and complete and _same(yours, base_value(f)):
            pass  # a PUT repeating the base value of a field another writer moved
        elif _same(yours, theirs):
            mutation_id, client_id = writer(f)
            if f in c.state_fields and not _same(yours, base_value(f)) and client_id != ME:
                duplicates.append(DuplicateTransition(f, yours, mutation_id, client_id))
        elif c.policies[f] is LWW:
            updates[f] = yours
            overwrites.append(Overwrite(f, theirs, yours, writer(f)[0]))
        elif (
            c.policies[f] is TEXT
            and complete
            and isinstance(yours, str)
            and isinstance(theirs, str | None)
            and isinstance(text_point(f), str | None)
        ):
            if merged_text is not None and f in merged_text:
                updates[f] = merged_text[f]
        else:
            collisions.append(FieldCollision(f, base_value(f), yours, theirs))
    if collisions:
        kind = (
            ConflictKind.CREATE_CREATE
            if c.base == 0 and changed_by_others(DELETED)
            else ConflictKind.FIELDS
        )
        return Decision(Outcome.CONFLICT, updates, kind, collisions, overwrites, duplicates)
    return Decision(outcome, updates, overwrites=overwrites, duplicates=duplicates)


def _in_order(d: Decision) -> Decision:
    """The decision with its lists in field order (the order is not part of the contract)."""
    return expect(
        d.outcome,
        d.updates,
        d.conflict_kind,
        sorted(d.collisions, key=lambda x: x.field),
        sorted(d.overwrites, key=lambda x: x.field),
        sorted(d.duplicates, key=lambda x: x.field),
    )


PROPERTY = settings(max_examples=300, deadline=None)


@PROPERTY
@given(cases(), st.data())
def test_the_same_inputs_give_the_same_decision_in_any_order_of_changes(
    case: Case, data: st.DataObject
) -> None:
    first = case.decide()
    assert case.decide() == first
    changes = case.log.changes(case.base, case.floor)
    assert case.decide(data.draw(st.permutations(changes))) == first


@PROPERTY
@given(cases())
def test_no_value_any_client_wrote_disappears(case: Case) -> None:
    d = case.decide()
    log = case.log
    after = {name: d.updates.get(name, log.value(name)) for name in (*FIELDS, DELETED)}
    # Mine: in the record (which is then alive), or in the conflict.
    for name, yours in case.writes.items():
        if (
            case.op is Op.PUT
            and case.base > 0
            and case.base >= case.floor
            and _same(yours, log.value(name, case.base))
        ):
            continue  # a replace repeating what it saw: no write of the client's
        kept = _same(after[name], yours) and after[DELETED] is False
        if case.policies.get(name) is Policy.TEXT and not kept and after[DELETED] is False:
            # A text field merges: what the client typed (its diff against its base) is
            # in the merged text, beside the other side's insertions.
            kept = _typed_into(log.value(name, case.base), yours, after[name])
        reported = any(x.field == name and _same(x.yours, yours) for x in d.collisions)
        assert kept or reported, (name, yours)
    # Theirs: what another client wrote since my base and my mutation replaced
    # (or hid, by deleting the record) is in an LWW overwrite.
    # A field changed and changed back holds its base value: nothing of theirs to lose.
    complete = case.base >= case.floor

    def moved(f: str) -> bool:
        return case.others_touched(f) and not (
            complete and _same(log.value(f), log.value(f, case.base))
        )

    if case.op is Op.DELETE and d.updates:
        replaced = [f for f in FIELDS if moved(f)]
    else:
        replaced = [f for f in d.updates if f != DELETED and moved(f)]
        replaced += [DELETED] if DELETED in d.updates and case.others_touched(DELETED) else []
    for name in replaced:
        if (
            case.policies.get(name) is Policy.TEXT
            and after[DELETED] is False
            and _typed_into(log.value(name, case.base), log.value(name), after[name])
        ):
            continue  # a text field merges: what they typed is in the merged text, not lost
        assert any(o.field == name and _same(o.overwritten, log.value(name)) for o in d.overwrites)


@PROPERTY
@given(cases())
def test_fields_the_mutation_does_not_write_are_never_updated(case: Case) -> None:
    d = case.decide()
    assert set(d.updates) - {DELETED} <= set(case.writes)
    if case.op is Op.DELETE:
        assert d.updates in ({}, {DELETED: True})


@PROPERTY
@given(cases())
def test_each_field_is_decided_as_the_reference_model_says(case: Case) -> None:
    d = case.decide()
    assert _in_order(d) == _in_order(reference(case, d.updates))


@PROPERTY
@given(cases())
def test_conflict_iff_collisions_and_applied_only_when_nobody_else_wrote(case: Case) -> None:
    d = case.decide()
    assert (d.outcome is Outcome.CONFLICT) == bool(d.collisions)
    assert (d.conflict_kind is not None) == bool(d.collisions)
    if d.outcome is Outcome.APPLIED:
        assert not case.others_committed()
    if d.outcome is Outcome.MERGED:
        assert case.others_committed() or case.base < case.floor


@PROPERTY
@given(cases())
def test_updates_never_write_the_value_already_there(case: Case) -> None:
    d = case.decide()
    for name, value in d.updates.items():
        assert not _same(value, case.log.value(name)), name


@PROPERTY
@given(cases())
def test_a_clients_own_changes_since_base_decide_as_none(case: Case) -> None:
    # What lets storage leave out the history of a record that only this client
    # changed since its base (WriteTx.load_changes): with the history whole, the
    # client's own changes decide nothing.
    changes = case.log.changes(case.base, case.floor)
    assume(case.base >= case.floor and changes)
    assume(all(c.client_id == ME for c in changes))
    assert case.decide([]) == case.decide()
