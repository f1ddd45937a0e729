"""What the benchmark's clients send: tokens, and queues of mutations built ahead of time.

`reconnect_workload` is the offline queue of the reconnect scenarios: a desk
client first creates the records (version 1) and then edits a few of them
(version 2); the field client's queue, every mutation on the base it last saw
(1), is 70% PATCH / 20% PUT / 10% DELETE spread over the records, so the
mutations on the desk-edited records (about 5%) merge or conflict, and a few
carry fields that raise warnings (an unknown field, an old alias, a value
that needs coercion). `rounds_workload` is the online client of the latency
and concurrency scenarios: it creates its records, then patches each of them
round after round on the exact version it last saw, so nothing conflicts.

Batches are serialized to `SyncRequest` / `ApplyBatchRequest` bytes before
the clock starts, so the client's own protobuf work stays out of the figures.
Everything is seeded: the same sizes give the same bytes.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from bench.procs import SECRET
from fieldsync.auth import mint_token
from fieldsync.v1 import sync_pb2
from fieldsync.values import FieldValue, Timestamp, to_proto

SCHEMA_VERSION = 3
COLLECTION = "tasks"
STATUSES = ("todo", "doing", "done")
PEOPLE = ("ann", "bob", "cy", "dee", "eli", "fay")
TOKEN_TTL = 4 * 3600  # longer than any bench run

PUT, PATCH, DELETE = sync_pb2.OP_PUT, sync_pb2.OP_PATCH, sync_pb2.OP_DELETE

Metadata = tuple[tuple[str, str], ...]


def token(tenant: str = "acme", sub: str = "rep") -> str:
    return mint_token(SECRET, sub=sub, tenant_id=tenant, roles=["member"], ttl_seconds=TOKEN_TTL)


def metadata(tenant: str = "acme", sub: str = "rep") -> Metadata:
    return (("authorization", f"Bearer {token(tenant, sub)}"),)


def mutation(
    rng: random.Random,
    seq: int,
    record_id: str,
    fields: Mapping[str, FieldValue] | None,
    *,
    op: int,
    base: int,
) -> sync_pb2.Mutation:
    m = sync_pb2.Mutation(
        mutation_id=str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        client_seq=seq,
        op=sync_pb2.Op.ValueType(op),
        collection=COLLECTION,
        record_id=record_id,
        base_version=base,
    )
    for k, v in (fields or {}).items():
        to_proto(v, m.fields[k])
    return m


def hello_bytes(client_id: str) -> bytes:
    hello = sync_pb2.SyncHello(client_id=client_id, schema_version=SCHEMA_VERSION)
    return sync_pb2.SyncRequest(hello=hello).SerializeToString()


def sync_batch_bytes(client_id: str, mutations: Sequence[sync_pb2.Mutation]) -> bytes:
    batch = sync_pb2.MutationBatch(
        client_id=client_id, schema_version=SCHEMA_VERSION, mutations=mutations
    )
    return sync_pb2.SyncRequest(batch=batch).SerializeToString()


def apply_batch_bytes(client_id: str, mutations: Sequence[sync_pb2.Mutation]) -> bytes:
    batch = sync_pb2.MutationBatch(
        client_id=client_id, schema_version=SCHEMA_VERSION, mutations=mutations
    )
    return sync_pb2.ApplyBatchRequest(batch=batch).SerializeToString()


def record_ids(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i:07d}" for i in range(n)]


def full_fields(rng: random.Random, rid: str, k: int) -> dict[str, FieldValue]:
    return {
        "title": f"Task {rid} rev {k}",
        "status": rng.choice(STATUSES),
        "estimate": rng.randrange(1, 40),
        "assignee": rng.choice(PEOPLE),
        "notes": f"Site visit {rid}: check the meter, photograph the panel.",
    }


@dataclass(frozen=True)
class ReconnectWorkload:
    """The desk's setup batches and the field client's queue, as raw mutations."""

    seed_batches: list[list[sync_pb2.Mutation]]
    desk_batches: list[list[sync_pb2.Mutation]]
    queue_batches: list[list[sync_pb2.Mutation]]
    stale_records: frozenset[str]

    @property
    def queued(self) -> int:
        return sum(len(b) for b in self.queue_batches)


def _chunked(items: list[sync_pb2.Mutation], size: int) -> list[list[sync_pb2.Mutation]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _queued_mutation(
    rng: random.Random, seq: int, rid: str, k: int
) -> tuple[sync_pb2.Mutation, str]:
    """One mutation of the offline queue (all on base 1) and its kind."""
    roll = rng.random()
    if roll < 0.10:
        return mutation(rng, seq, rid, None, op=DELETE, base=1), "delete"
    fields: dict[str, FieldValue]
    if roll < 0.30:
        op, kind = PUT, "put"
        fields = full_fields(rng, rid, k)
    else:
        op, kind = PATCH, "patch"
        names = rng.sample(
            ("status", "estimate", "assignee", "title", "seen_at"), rng.choice((1, 2))
        )
        fields = {}
        for name in names:
            if name == "status":
                fields[name] = rng.choice(STATUSES)
            elif name == "estimate":
                fields[name] = rng.randrange(1, 40)
            elif name == "assignee":
                fields[name] = rng.choice(PEOPLE)
            elif name == "title":
                fields[name] = f"Task {rid} rev {k}"
            else:
                fields[name] = Timestamp(1_700_000_000_000_000_000 + seq * 1000)
    warn = rng.random()
    if warn < 0.02:
        fields["legacy_flag"] = True  # UNKNOWN_FIELD
    elif warn < 0.03 and "assignee" in fields:
        fields["assigned_to"] = fields.pop("assignee")  # FIELD_RENAMED
    elif warn < 0.04 and "estimate" in fields:
        fields["estimate"] = str(fields["estimate"])  # TYPE_COERCED
    return mutation(rng, seq, rid, fields, op=op, base=1), kind


def reconnect_workload(
    n_mutations: int,
    n_records: int,
    *,
    batch: int = 1000,
    stale_fraction: float = 0.05,
    prefix: str = "t",
    seed: int = 6,
) -> ReconnectWorkload:
    """See the module docstring. Deterministic for given arguments."""
    rng = random.Random(seed)
    ids = record_ids(prefix, n_records)
    seed_muts = [
        mutation(rng, i, rid, full_fields(rng, rid, 0), op=PUT, base=0)
        for i, rid in enumerate(ids, start=1)
    ]
    stale = rng.sample(ids, max(1, int(n_records * stale_fraction)))
    desk_muts = []
    for i, rid in enumerate(stale, start=len(seed_muts) + 1):
        # Half move the status and estimate, half reassign: our writes to the same
        # fields conflict (or are duplicates), to the others merge.
        if i % 2:
            fields: dict[str, FieldValue] = {
                "status": rng.choice(STATUSES),
                "estimate": rng.randrange(40, 80),
            }
        else:
            fields = {"assignee": "desk"}
        desk_muts.append(mutation(rng, i, rid, fields, op=PATCH, base=1))
    queue = []
    for seq in range(1, n_mutations + 1):
        m, _kind = _queued_mutation(rng, seq, rng.choice(ids), seq)
        queue.append(m)
    return ReconnectWorkload(
        _chunked(seed_muts, batch),
        _chunked(desk_muts, batch),
        _chunked(queue, batch),
        frozenset(stale),
    )


def streamed_queue(
    client_id: str, n_mutations: int, n_records: int, *, batch: int = 1000, seed: int = 7
) -> Iterator[bytes]:
    """A long offline queue built while it is sent (the memory scenario), without a setup:
    the mutations create and rewrite records of their own, on base 0."""
    rng = random.Random(seed)
    ids = record_ids("m", n_records)
    seq = 0
    while seq < n_mutations:
        muts = []
        for _ in range(min(batch, n_mutations - seq)):
            seq += 1
            m, _kind = _queued_mutation(rng, seq, rng.choice(ids), seq)
            m.base_version = 0
            muts.append(m)
        yield sync_batch_bytes(client_id, muts)


def rounds_workload(
    prefix: str, n_records: int, n_mutations: int, *, seed: int = 8
) -> list[sync_pb2.Mutation]:
    """An online client's mutations: PUT each record, then PATCH each on the version it
    holds (round r patches version r), so every mutation applies and bumps it by one."""
    rng = random.Random(seed)
    ids = record_ids(prefix, n_records)
    out: list[sync_pb2.Mutation] = []
    seq = 0
    for r in range(n_mutations // n_records + 1):
        for rid in ids:
            if seq == n_mutations:
                return out
            seq += 1
            if r == 0:
                out.append(mutation(rng, seq, rid, full_fields(rng, rid, 0), op=PUT, base=0))
            else:
                # estimate = 100 + r never equals an earlier value: each patch changes the record
                fields: dict[str, FieldValue] = {"estimate": 100 + r, "status": STATUSES[r % 3]}
                out.append(mutation(rng, seq, rid, fields, op=PATCH, base=r))
    return out
