"""The two field reports FieldSync was born from, told through the real service."""

from __future__ import annotations

from fieldsync.v1 import sync_pb2
from tests.support import PUT, S, SyncEnv


def test_flowera_title_and_status_at_once_both_survive(sync_env: SyncEnv) -> None:
    creator = sync_env.client(sub="carol")
    created = creator.one("t1", {"title": "Write spec", "status": "todo"}, op=PUT)
    assert created.status == S.MUTATION_STATUS_APPLIED
    assert created.record.version == 1

    a = sync_env.client(sub="alice")
    b = sync_env.client(sub="bob")
    ra = a.one("t1", {"title": "Write the spec"}, base=1)
    rb = b.one("t1", {"status": "doing"}, base=1)
    assert ra.status == S.MUTATION_STATUS_APPLIED
    assert rb.status == S.MUTATION_STATUS_MERGED
    rec = a.get("t1")
    assert rec is not None
    assert rec.version == 3
    assert rec.fields["title"].string_value == "Write the spec"
    assert rec.fields["status"].string_value == "doing"


def test_field_rep_offline_edit_conflicts_only_on_status_and_is_resolved(sync_env: SyncEnv) -> None:
    desk = sync_env.client(sub="desk")
    rep = sync_env.client(sub="rep")
    # The account reaches v3 before the rep drives into the dead zone.
    desk.one("acc1", {"name": "Globex", "status": "prospect"}, op=PUT, collection="accounts")
    desk.one("acc1", {"owner": "rep"}, base=1, collection="accounts")
    r3 = desk.one("acc1", {"amount": 10000.0}, base=2, collection="accounts")
    assert r3.record.version == 3

    # Desk user: status and notes (v4).
    r4 = desk.one(
        "acc1", {"status": "open", "notes": "Called, wants a demo"}, base=3, collection="accounts"
    )
    assert r4.status == S.MUTATION_STATUS_APPLIED and r4.record.version == 4

    # Mobile, offline since v3: status and amount.
    r5 = rep.one("acc1", {"status": "closed", "amount": 50000.0}, base=3, collection="accounts")
    assert r5.status == S.MUTATION_STATUS_CONFLICT
    assert r5.record.version == 5
    rec = r5.record
    assert rec.fields["amount"].double_value == 50000.0  # applied
    assert rec.fields["notes"].string_value == "Called, wants a demo"  # kept
    assert rec.fields["status"].string_value == "open"  # theirs kept
    c = r5.conflict
    assert c.kind == sync_pb2.CONFLICT_KIND_FIELDS
    assert (c.base_version, c.server_version) == (3, 5)
    assert [f.field for f in c.fields] == ["status"]
    (fc,) = c.fields
    assert (fc.base.string_value, fc.yours.string_value, fc.theirs.string_value) == (
        "prospect",
        "closed",
        "open",
    )

    listed = rep.conflicts()
    assert [x.conflict_id for x in listed] == [c.conflict_id]
    assert not listed[0].resolved

    # The rep answers: closed after all, on base 5, naming the conflict.
    r6 = rep.one(
        "acc1", {"status": "closed"}, base=5, collection="accounts", resolves=c.conflict_id
    )
    assert r6.status == S.MUTATION_STATUS_APPLIED
    assert r6.record.version == 6
    assert r6.record.fields["status"].string_value == "closed"
    assert rep.conflicts() == []
    (done,) = rep.conflicts(include_resolved=True)
    assert done.resolved
