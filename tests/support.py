"""Helpers for tests that talk to a real sync service: tokens, mutations, values.

`SyncEnv` is one running sync service (in process, real grpc.aio on loopback,
a real SQLite file) with a stub and a way to mint real tokens for it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from fieldsync.auth import mint_token
from fieldsync.v1 import common_pb2, sync_pb2, sync_pb2_grpc
from fieldsync.values import FieldValue, fields_from_proto, to_proto

SECRET = "fieldsync-test-secret-0123456789abcdef"

PUT, PATCH, DELETE = sync_pb2.OP_PUT, sync_pb2.OP_PATCH, sync_pb2.OP_DELETE
S = sync_pb2.MutationStatus


def token(tenant: str = "acme", sub: str = "alice", roles: Sequence[str] = ("member",)) -> str:
    return mint_token(SECRET, sub=sub, tenant_id=tenant, roles=list(roles))


Metadata = tuple[tuple[str, str | bytes], ...]


def md(tok: str) -> Metadata:
    return (("authorization", f"Bearer {tok}"),)


def mut(
    seq: int,
    record_id: str,
    fields: Mapping[str, FieldValue] | None = None,
    *,
    op: int = PATCH,
    base: int = 0,
    collection: str = "tasks",
    mutation_id: str | None = None,
    resolves: str = "",
) -> sync_pb2.Mutation:
    m = sync_pb2.Mutation(
        mutation_id=str(uuid.uuid4()) if mutation_id is None else mutation_id,
        client_seq=seq,
        op=sync_pb2.Op.ValueType(op),
        collection=collection,
        record_id=record_id,
        base_version=base,
        resolves_conflict_id=resolves,
    )
    for k, v in (fields or {}).items():
        to_proto(v, m.fields[k])
    return m


def plain(rec: common_pb2.Record) -> dict[str, FieldValue]:
    return fields_from_proto(rec.fields)


@dataclass
class Client:
    """One user's device: a client id, its token and its next client_seq."""

    env: SyncEnv
    tenant: str = "acme"
    sub: str = "alice"
    roles: Sequence[str] = ("member",)
    client_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    next_seq: int = 1
    schema_version: int = 3

    @property
    def metadata(self) -> Metadata:
        return md(token(self.tenant, self.sub, self.roles))

    def mut(
        self, record_id: str, fields: Mapping[str, FieldValue] | None = None, **kw: Any
    ) -> sync_pb2.Mutation:
        m = mut(self.next_seq, record_id, fields, **kw)
        self.next_seq += 1
        return m

    def apply(self, *mutations: sync_pb2.Mutation) -> sync_pb2.BatchResult:
        return self.env.stub.ApplyBatch(
            sync_pb2.ApplyBatchRequest(
                batch=sync_pb2.MutationBatch(
                    client_id=self.client_id,
                    schema_version=self.schema_version,
                    mutations=list(mutations),
                )
            ),
            metadata=self.metadata,
        ).result

    def one(
        self, record_id: str, fields: Mapping[str, FieldValue] | None = None, **kw: Any
    ) -> sync_pb2.MutationResult:
        (result,) = self.apply(self.mut(record_id, fields, **kw)).results
        return result

    def get(self, record_id: str, collection: str = "tasks") -> common_pb2.Record | None:
        resp = self.env.stub.GetRecords(
            sync_pb2.GetRecordsRequest(collection=collection, record_ids=[record_id]),
            metadata=self.metadata,
        )
        return resp.records[0] if resp.records else None

    def pull(self, cursor: str = "", page_size: int = 0) -> tuple[list[common_pb2.Record], str]:
        records: list[common_pb2.Record] = []
        pages = list(
            self.env.stub.Pull(
                sync_pb2.PullRequest(cursor=cursor, page_size=page_size), metadata=self.metadata
            )
        )
        assert pages and pages[-1].caught_up
        for p in pages:
            records.extend(p.changes)
        return records, pages[-1].cursor

    def conflicts(self, **kw: Any) -> list[sync_pb2.Conflict]:
        return list(
            self.env.stub.ListConflicts(
                sync_pb2.ListConflictsRequest(**kw), metadata=self.metadata
            ).conflicts
        )


@dataclass
class SyncEnv:
    address: str
    channel: grpc.Channel
    stub: sync_pb2_grpc.SyncServiceStub
    db_url: str

    def client(self, **kw: Any) -> Client:
        return Client(self, **kw)


def rpc_reason(err: grpc.RpcError) -> str | None:
    from grpc_status import rpc_status

    from fieldsync.errors import reason_of

    status = rpc_status.from_call(err)
    return None if status is None else reason_of(status)


def iter_results(responses: Iterator[sync_pb2.SyncResponse]) -> Iterator[sync_pb2.BatchResult]:
    for r in responses:
        if r.WhichOneof("message") == "result":
            yield r.result
