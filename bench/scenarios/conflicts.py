"""reconnect_conflicts: the reconnect's offline queue when every mutation meets a desk edit.

The setup (untimed) is the reconnect's: a desk client creates the records
(version 1); then it edits every one of them (version 2), in every field the
field client's queue writes (title, status, estimate, assignee) to values that
queue never sends. The field client's queue is the reconnect's in shape
(100,000 mutations spread at random over the records, all on base 1, in
batches of 1,000; 70% PATCH of one or two of those fields, 20% PUT of the
whole record, 10% DELETE; the same share of warnings), but every value it
writes differs from both the base and the desk's: so every mutation surfaces a
durable conflict (a PATCH or PUT a FIELDS conflict, a DELETE a DELETE_UPDATE
one), with its audit events, and none changes the record.

It runs in every repetition of the reconnect group, right after
reconnect_sqlite and on a service of its own on a fresh file, so
`ratio_vs_reconnect` (its throughput / reconnect_sqlite's) compares two
figures of the same moment. Both carry `cpu_us_per_mutation`: the sync
process's CPU time (user + system, all its threads, from /proc) over the
timed stream, per mutation answered.
"""

from __future__ import annotations

import random

from bench import workload
from bench.workload import DELETE, PATCH, PEOPLE, PUT, STATUSES, ReconnectWorkload
from fieldsync.v1 import sync_pb2
from fieldsync.values import FieldValue

WRITTEN = ("status", "estimate", "assignee", "title")


def conflict_workload(
    n_mutations: int, n_records: int, *, batch: int = 1000, prefix: str = "k", seed: int = 20
) -> ReconnectWorkload:
    """See the module docstring. Deterministic for given arguments."""
    rng = random.Random(seed)
    ids = workload.record_ids(prefix, n_records)
    base = {rid: workload.full_fields(rng, rid, 0) for rid in ids}
    seed_muts = [
        workload.mutation(rng, i, rid, base[rid], op=PUT, base=0)
        for i, rid in enumerate(ids, start=1)
    ]
    desk: dict[str, dict[str, FieldValue]] = {}
    for rid in ids:
        desk[rid] = {
            "title": f"Desk's {rid}",
            "status": rng.choice([s for s in STATUSES if s != base[rid]["status"]]),
            "estimate": rng.randrange(40, 80),
            "assignee": "desk",
        }
    desk_muts = [
        workload.mutation(rng, i, rid, desk[rid], op=PATCH, base=1)
        for i, rid in enumerate(ids, start=len(seed_muts) + 1)
    ]

    def value(rid: str, name: str, seq: int) -> FieldValue:
        if name == "status":  # the one neither the base nor the desk holds
            (third,) = [s for s in STATUSES if s not in (base[rid]["status"], desk[rid]["status"])]
            return third
        if name == "estimate":
            return rng.randrange(80, 120)
        if name == "assignee":
            return rng.choice([p for p in PEOPLE if p != base[rid]["assignee"]])
        return f"Task {rid} rev {seq}"

    queue = []
    for seq in range(1, n_mutations + 1):
        rid = rng.choice(ids)
        roll = rng.random()
        if roll < 0.10:
            queue.append(workload.mutation(rng, seq, rid, None, op=DELETE, base=1))
            continue
        names = WRITTEN if roll < 0.30 else rng.sample(WRITTEN, rng.choice((1, 2)))
        fields: dict[str, FieldValue] = {n: value(rid, n, seq) for n in names}
        op = PUT if roll < 0.30 else PATCH
        if op == PUT:
            fields["notes"] = base[rid]["notes"]  # as the client saw it: no intent to change
        warn = rng.random()
        if warn < 0.02:
            fields["legacy_flag"] = True  # UNKNOWN_FIELD
        elif warn < 0.03 and "assignee" in fields:
            fields["assigned_to"] = fields.pop("assignee")  # FIELD_RENAMED
        elif warn < 0.04 and "estimate" in fields:
            fields["estimate"] = str(fields["estimate"])  # TYPE_COERCED
        queue.append(workload.mutation(rng, seq, rid, fields, op=op, base=1))
    return ReconnectWorkload(
        _chunked(seed_muts, batch),
        _chunked(desk_muts, batch),
        _chunked(queue, batch),
        frozenset(ids),
    )


def _chunked(items: list[sync_pb2.Mutation], size: int) -> list[list[sync_pb2.Mutation]]:
    return [items[i : i + size] for i in range(0, len(items), size)]
