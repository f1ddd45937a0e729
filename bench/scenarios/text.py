"""text_merge: the time to merge two edited copies of a 100 KB page (issue 7).

A deterministic page of words and lines (100 KB); each side makes 50 small
edits (insert, delete or replace a few words) in its own regions, far from
the other side's, as two people editing one page offline do. The figure is
the median time of `sync_service.rules.textmerge.merge_text(base, yours, theirs)`,
the call the merge engine makes for a `text` field, and each run checks that
every edit of both sides is in the result.
"""

from __future__ import annotations

import random
import time

from bench.context import Ctx
from bench.scenarios import text_edits
from bench.stats import Figures, summarize
from sync_service.rules.textmerge import merge_text

PAGE_BYTES = 100_000
EDITS_PER_SIDE = 50
CALLS_PER_RUN = 7

_WORDS = [
    "sync",
    "offline",
    "field",
    "merge",
    "record",
    "version",
    "conflict",
    "queue",
    "batch",
    "page",
    "note",
    "task",
]


def _page(rng: random.Random) -> str:
    words: list[str] = []
    size = 0
    while size < PAGE_BYTES:
        w = rng.choice(_WORDS)
        words.append(w + ("\n" if rng.random() < 0.08 else " "))
        size += len(words[-1])
    return "".join(words)


def _edit(base: str, rng: random.Random, slots: list[int], tag: str) -> tuple[str, list[str]]:
    """Apply one small edit at each slot (right to left, so positions hold)."""
    out = base
    inserted: list[str] = []
    for i, pos in enumerate(sorted(slots, reverse=True)):
        text = f" [{tag}{i}] "
        kind = rng.randrange(3)
        if kind == 0:  # insert
            out = out[:pos] + text + out[pos:]
        elif kind == 1:  # delete a few characters
            out = out[:pos] + out[pos + 5 :]
            continue
        else:  # replace a few characters
            out = out[:pos] + text + out[pos + 5 :]
        inserted.append(text)
    return out, inserted


def _one(rng: random.Random) -> Figures:
    base = _page(rng)
    # 100 regions, alternating between the sides, edits in the middle of each.
    region = len(base) // (2 * EDITS_PER_SIDE)
    starts = [r * region + region // 2 for r in range(2 * EDITS_PER_SIDE)]
    yours, mine = _edit(base, rng, starts[0::2], "ann")
    theirs, others = _edit(base, rng, starts[1::2], "bob")
    times = []
    merged = ""
    for _ in range(CALLS_PER_RUN):
        t = time.perf_counter()
        merged = merge_text(base, yours, theirs).text
        times.append((time.perf_counter() - t) * 1000)
    if not all(s in merged for s in mine + others):
        raise RuntimeError("text_merge: the two edited copies did not merge with every edit")
    times.sort()
    return {
        "value": round(times[len(times) // 2], 3),
        "max_ms": round(times[-1], 3),
        "page_bytes": len(base.encode()),
        "edits_per_side": EDITS_PER_SIDE,
    }


def run(ctx: Ctx) -> dict[str, Figures]:
    return {**run_merge(ctx), **text_edits.run(ctx)}


def run_merge(ctx: Ctx) -> dict[str, Figures]:
    runs: list[Figures] = []
    for rep in ctx.repetitions("text_merge"):
        runs.append(_one(random.Random(100 + rep)))
        ctx.log(f"text_merge rep {rep + 1}/{ctx.reps}: {runs[-1]['value']:.1f} ms (100 KB page)")
    return {"text_merge": summarize("ms", runs)}
