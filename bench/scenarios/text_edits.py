"""text_edits: single keystrokes sent as `text_edits` to a page of 100 KB and of 1 MB (issue 16).

One client, the real SQLite service: the page is created, then each keystroke is one
`ApplyBatch` of one mutation carrying `text_edits` (retain, insert one character, retain),
one call after another, each on the version the previous answer returned. Figures: the
mutations/s for each page size, and the bytes on the wire per keystroke (the serialized
request) against the same keystroke sent as the whole new value.
"""

from __future__ import annotations

import random
import uuid

from bench import driver, procs, workload
from bench.context import Ctx
from bench.stats import Figures, summarize
from fieldsync.v1 import sync_pb2

PAGES = {"100kb": 100_000, "1mb": 1_000_000}
KEYSTROKES = {"100kb": 300, "1mb": 100}
QUICK_KEYSTROKES = 20
CAP_SECONDS = 30.0


def _page(n: int, rng: random.Random) -> str:
    words = ["sync", "offline", "page", "merge", "café", "🎉", "note\n"]
    out: list[str] = []
    size = 0
    while size < n:
        out.append(rng.choice(words) + " ")
        size += len(out[-1])
    return "".join(out)[:n]


def _keystroke(seq: int, base: int, pos: int, length: int) -> sync_pb2.Mutation:
    m = sync_pb2.Mutation(
        mutation_id=str(uuid.uuid4()),
        client_seq=seq,
        op=sync_pb2.OP_PATCH,
        collection="pages",
        record_id="p",
        base_version=base,
    )
    ops = m.text_edits["body"].ops
    if pos:
        ops.add(retain=pos)
    ops.add(insert="x")
    if length - pos:
        ops.add(retain=length - pos)
    return m


def _one(ctx: Ctx, rep: int, name: str, size: int, keystrokes: int) -> Figures:
    rng = random.Random(1600 + rep)
    text = _page(size, rng)
    folder = ctx.folder(f"text_edits-{name}-{rep}")
    client = f"typist-{name}-{rep}"
    create = sync_pb2.Mutation(
        mutation_id=str(uuid.uuid4()), client_seq=1, op=sync_pb2.OP_PUT, collection="pages",
        record_id="p",
    )  # fmt: skip
    create.fields["title"].string_value = "bench"
    create.fields["body"].string_value = text
    requests, whole = [], []
    length = len(text)
    for i in range(keystrokes):
        pos = rng.randrange(length + 1)
        requests.append(workload.apply_batch_bytes(client, [_keystroke(i + 2, i + 1, pos, length)]))
        if i < 3:  # the same keystroke as a whole value, for the wire figure
            as_value = sync_pb2.Mutation(
                mutation_id=str(uuid.uuid4()), client_seq=i + 2, op=sync_pb2.OP_PATCH,
                collection="pages", record_id="p", base_version=i + 1,
            )  # fmt: skip
            as_value.fields["body"].string_value = text[:pos] + "x" + text[pos:]
            whole.append(len(workload.apply_batch_bytes(client, [as_value])))
        text = text[:pos] + "x" + text[pos:]
        length += 1
    md = workload.metadata(sub=client)
    proc = procs.start_sync(f"sqlite:///{folder / 'sync.db'}", ctx.audit_addr, folder)
    with procs.running(proc):
        first = driver.apply_sequential(
            proc.address, md, [workload.apply_batch_bytes(client, [create])], deadline=60
        )
        t = driver.apply_sequential(proc.address, md, requests, deadline=CAP_SECONDS)
    errors = len(t.errors) + len(first.errors) + t.statuses["rejected"]
    edit_bytes = sum(len(r) for r in requests) / len(requests)
    return {
        "value": round(t.rate, 1),
        "keystrokes": t.mutations,
        "page_bytes": len(text.encode()),
        "bytes_per_keystroke": round(edit_bytes, 1),
        "bytes_per_whole_value": round(sum(whole) / len(whole), 1),
        "wire_ratio": round(sum(whole) / len(whole) / edit_bytes, 1),
        "errors": errors,
        "truncated": t.truncated,
        "first_error": (t.errors or first.errors or [""])[0],
    }


def run(ctx: Ctx) -> dict[str, Figures]:
    out: dict[str, Figures] = {}
    runs: dict[str, list[Figures]] = {name: [] for name in PAGES}
    for rep in ctx.repetitions("text_edits"):
        for name, size in PAGES.items():
            n = QUICK_KEYSTROKES if ctx.quick else KEYSTROKES[name]
            runs[name].append(_one(ctx, rep, name, size, n))
            r = runs[name][-1]
            ctx.log(
                f"text_edits {name} rep {rep + 1}/{ctx.reps}: {r['value']} keystrokes/s, "
                f"{r['bytes_per_keystroke']} B a keystroke vs {r['bytes_per_whole_value']} B"
            )
    for name in PAGES:
        out[f"text_edits_{name}"] = summarize("mutations/s", runs[name])
    return out
