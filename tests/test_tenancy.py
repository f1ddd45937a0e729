"""Tenancy (SPEC §1, §5): the same record_id in two tenants is two records; no RPC leaks."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from fieldsync.errors import reason_of
from fieldsync.v1 import sync_pb2
from tests.conftest import make_config, running_sync
from tests.support import PUT, S, SyncEnv


def test_same_record_id_in_two_tenants_stays_two_records_in_every_rpc(sync_env: SyncEnv) -> None:
    acme = sync_env.client(tenant="acme", sub="alice")
    globex = sync_env.client(tenant="globex", sub="alice")
    acme.one("shared-id", {"title": "acme's"}, op=PUT)
    r = globex.one("shared-id", {"title": "globex's"}, op=PUT)
    # Globex's create is a create (v1), not a create/create conflict with acme's.
    assert r.status == S.MUTATION_STATUS_APPLIED and r.record.version == 1

    # A conflict in acme only.
    acme.one("shared-id", {"title": "acme edit"}, base=1)
    bob = sync_env.client(tenant="acme", sub="bob")
    conflict = bob.one("shared-id", {"title": "bob's"}, base=1)
    assert conflict.status == S.MUTATION_STATUS_CONFLICT

    a, g = acme.get("shared-id"), globex.get("shared-id")
    assert a is not None and g is not None
    assert a.fields["title"].string_value == "acme edit"
    assert g.fields["title"].string_value == "globex's" and g.version == 1

    g_records, _ = globex.pull()
    assert [(x.record_id, x.fields["title"].string_value) for x in g_records] == [
        ("shared-id", "globex's")
    ]
    assert globex.conflicts(include_resolved=True) == []
    assert len(acme.conflicts()) == 1

    # Globex can neither see nor resolve acme's conflict by id.
    with pytest.raises(grpc.RpcError) as info:
        sync_env.stub.ResolveConflict(
            sync_pb2.ResolveConflictRequest(
                conflict_id=conflict.conflict.conflict_id,
                resolution=sync_pb2.RESOLUTION_TAKE_YOURS,
            ),
            metadata=globex.metadata,
        )
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert len(acme.conflicts()) == 1

    # A mutation naming acme's conflict from globex resolves nothing in acme.
    globex.one("shared-id", {"title": "g2"}, base=1, resolves=conflict.conflict.conflict_id)
    assert len(acme.conflicts()) == 1


ROLES_SCHEMA = """
version: 1
collections:
  tasks:
    fields:
      title: {type: string}
  payroll:
    write_roles: [admin, finance]
    fields:
      amount: {type: int}
"""


def test_a_role_the_collection_requires_rejects_that_mutation_only(tmp_path: Path) -> None:
    schema = tmp_path / "schema.yaml"
    schema.write_text(ROLES_SCHEMA)
    config = make_config(f"sqlite:///{tmp_path / 'sync.db'}", schema_path=str(schema))
    with running_sync(config) as env:
        member = env.client(roles=["member"])
        res = member.apply(
            member.mut("p1", {"amount": 100}, op=PUT, collection="payroll"),
            member.mut("t1", {"title": "fine"}, op=PUT),
        )
        assert [r.status for r in res.results] == [
            S.MUTATION_STATUS_REJECTED,
            S.MUTATION_STATUS_APPLIED,
        ]
        assert res.results[0].error.code == grpc.StatusCode.PERMISSION_DENIED.value[0]
        assert reason_of(res.results[0].error) == "ROLE_REQUIRED"
        assert member.get("p1", collection="payroll") is None

        finance = env.client(sub="fin", roles=["finance"])
        ok = finance.one("p1", {"amount": 100}, op=PUT, collection="payroll")
        assert ok.status == S.MUTATION_STATUS_APPLIED
