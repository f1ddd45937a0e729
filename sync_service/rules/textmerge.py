"""The merge of concurrent edits of a ``text`` field (SPEC §3): never a conflict.

What lives here: a pure, deterministic transformation of two sides' edits of one base
text, in code points (no I/O, no clock, no schema or storage). Each side is a list of
:class:`Edit` in base coordinates (replace ``base[start:end]`` with ``text``), made either
from the operations a client sent (:func:`edits_from_ops`, exact) or from a whole value
(:func:`diff`, its diff against base). :func:`merge` combines them, OT style:

- every character either side inserted survives exactly once, in its place;
- a base character either side deleted is gone (deletions are a union);
- two insertions at one place both survive, **theirs (the earlier arrival) first**;
- an insertion inside a span the other side deleted survives at its own place in that
  span (the span's other characters are gone around it);
- an identical insertion at one place on both sides (which an identical edit is) is made
  once;
- the result says whether the edits overlapped: a non-identical pair that shares a base
  character, an insertion strictly inside the other's span, or two insertions at one
  place. Edits that merely touch (one ends where the other starts) do not overlap.

The result also carries each side's edits transformed past the other's
(``yours_over_theirs`` turns theirs' text into the merge, ``theirs_over_yours`` yours'):
the convergence property (A then B' = B then A') the tests check.

The diff of a whole value (:func:`diff`) is diff-match-patch (Myers O(ND) on code points,
a line-level first pass for long texts) with two changes of ours:

- **A work budget, not a clock.** ``Diff_Timeout`` is off (a clock would make the result
  depend on machine speed) and each diff gets :data:`WORK_BUDGET` Myers steps (see
  ``_Differ``); past it the rest is diffed coarsely, at a point that depends on the texts
  alone. The bound: at most ``WORK_BUDGET`` diagonal steps of search per diff (measured
  ~0.7 s), plus linear passes over the texts (a caller caps their length); a whole-value
  merge makes two diffs, or four when both sides share changes. A coarse diff is still a
  correct diff: it turns a side's edits into fewer, larger replacements, so the merge
  keeps every insertion but reports an overlap more often.
- **diff_cleanupSemantic where the sides do not overlap**, so that a rewritten word is one
  replacement rather than "chaff" (single characters that happen to match). Where they
  overlap, the cleanup's reading cannot be used: it reads a character both sides kept as
  deleted and inserted again, so it would come out twice, or back after the other side
  deleted it. There the merge uses the minimal diffs (Myers), which keep every character
  they can: "Tuesday" rewritten to "Sunday" and to "Monday" merges as "MonSnday" (every
  character either side typed, once), not "MonSunday".
- **Clusters kept whole.** A diff insertion that its reading put between a base character
  and a combining mark, ZWJ, variation selector, emoji modifier, the LF of a CRLF or the
  low half of a surrogate pair is slid to the cluster's edge when the same text reads that
  way (``"e"`` + ``"\\u0300e"`` + ``"\\u0301"`` is ``"e\\u0300"`` + ``"e\\u0301"``), so a
  merge never places the other side's insertion inside it. Operations a client sent are
  taken as sent: where a user put a character is the user's choice.

Limits: positions are code points, not grapheme clusters (two users editing different code
points of one cluster get a cluster neither wrote); where a whole value's change reads more
than one way, the merge follows the diff's reading (no character is lost or doubled).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

from diff_match_patch import diff_match_patch

from fieldsync.textops import Delete, Insert, Retain, TextOp, check_ops, normalize

__all__ = [
    "WORK_BUDGET",
    "Edit",
    "TextMerge",
    "diff",
    "edits_from_ops",
    "merge",
    "merge_ops",
    "merge_text",
    "ops_from_edits",
]


@dataclass(frozen=True, slots=True)
class Edit:
    """Replace ``base[start:end]`` with ``text`` (an insertion when start == end)."""

    start: int
    end: int
    text: str


@dataclass(frozen=True, slots=True)
class TextMerge:
    text: str
    overlapped: bool
    yours_over_theirs: list[TextOp]  # theirs' text -> the merge
    theirs_over_yours: list[TextOp]  # yours' text -> the merge


# --- the two ways a side's edits are made ----------------------------------------------


def edits_from_ops(base: str, ops: Sequence[TextOp]) -> list[Edit]:
    """A client's operations on ``base`` as edits (TextOpsError when they do not cover it)."""
    check_ops(len(base), ops)
    edits: list[Edit] = []
    pos = 0
    start: int | None = None
    inserted: list[str] = []
    for op in ops:
        if isinstance(op, Retain):
            if start is not None:
                edits.append(Edit(start, pos, "".join(inserted)))
                start, inserted = None, []
            pos += op.n
            continue
        if start is None:
            start = pos
        if isinstance(op, Delete):
            pos += op.n
        else:
            inserted.append(op.text)
    if start is not None:
        edits.append(Edit(start, pos, "".join(inserted)))
    return edits


def ops_from_edits(length: int, edits: Sequence[Edit]) -> list[TextOp]:
    """Edits of a text of ``length`` code points as operations covering it."""
    ops: list[TextOp] = []
    pos = 0
    for e in edits:
        ops += [Retain(e.start - pos), Insert(e.text), Delete(e.end - e.start)]
        pos = e.end
    ops.append(Retain(length - pos))
    return normalize(ops)


# Search work allowed for one diff, in diagonals walked by the Myers search (see _Differ);
# measured: a 100 KB or 1 MB page with 50 scattered edits uses ~3,500, with 500 edits
# ~230,000; spending all of it takes about 0.7 s.
WORK_BUDGET = 500_000


def diff(base: str, changed: str) -> list[Edit]:
    """The edits that turn ``base`` into ``changed`` (bounded work, see the docstring)."""
    return _Diff(base, changed).edits


class _Diff:
    """A diff read two ways, both with clusters kept whole: ``edits`` after the semantic
    cleanup, ``raw`` before it (the minimal diff)."""

    __slots__ = ("edits", "raw")

    def __init__(self, base: str, changed: str) -> None:
        differ = _Differ()
        diffs: list[tuple[int, str]] = differ.diff_main(base, changed)
        self.raw = _keep_clusters(base, _to_edits(diffs))
        differ.diff_cleanupSemantic(diffs)  # in place
        self.edits = _keep_clusters(base, _to_edits(diffs))


def _to_edits(diffs: list[tuple[int, str]]) -> list[Edit]:
    edits: list[Edit] = []
    pos = 0
    start: int | None = None
    inserted: list[str] = []
    for op, text in diffs:
        if op == diff_match_patch.DIFF_EQUAL:
            if start is not None:
                edits.append(Edit(start, pos, "".join(inserted)))
                start, inserted = None, []
            pos += len(text)
            continue
        if start is None:
            start = pos
        if op == diff_match_patch.DIFF_DELETE:
            pos += len(text)
        else:
            inserted.append(text)
    if start is not None:
        edits.append(Edit(start, pos, "".join(inserted)))
    return edits


class _Differ(diff_match_patch):  # type: ignore[misc]  # the library ships no type hints
    """diff-match-patch with a work budget in place of its clock.

    The library's only brake is ``Diff_Timeout``, checked in its Myers loop
    (``diff_bisect``) as ``time.time() > deadline`` once per step; when it fires, that
    piece is diffed as one replacement. So the timeout is off and each Myers pass gets a
    :class:`_Meter` as its "deadline": the same check, counting work rather than seconds.
    """

    def __init__(self) -> None:
        super().__init__()
        self.Diff_Timeout = 0
        self.work_left = WORK_BUDGET

    def diff_bisect(self, text1: str, text2: str, deadline: object) -> list[tuple[int, str]]:
        diffs: list[tuple[int, str]] = super().diff_bisect(text1, text2, _Meter(self))
        return diffs


class _Meter:
    """The "deadline" of one Myers pass: expires when the differ's work budget is spent."""

    __slots__ = ("_differ", "_step")

    def __init__(self, differ: _Differ) -> None:
        self._differ = differ
        self._step = 0

    def __lt__(self, now: object) -> bool:
        # ``time.time() > meter`` lands here, so the clock's value is ignored. Step d of a
        # pass walks about d diagonals, hence the growing charge.
        self._step += 1
        self._differ.work_left -= self._step
        return self._differ.work_left < 0


def _attached(text: str, i: int) -> bool:
    """Whether ``text[i]`` belongs to the cluster of ``text[i - 1]`` (0 < i < len)."""
    c, prev = text[i], text[i - 1]
    if prev == "\u200d" or c == "\u200d":  # zero-width joiner
        return True
    if prev == "\r" and c == "\n":
        return True
    o = ord(c)
    if 0x1F3FB <= o <= 0x1F3FF or 0xE0020 <= o <= 0xE007F:  # skin tones, emoji tags
        return True
    if 0xDC00 <= o <= 0xDFFF and 0xD800 <= ord(prev) <= 0xDBFF:  # a surrogate pair
        return True
    return unicodedata.category(c) in ("Mn", "Mc", "Me")


def _keep_clusters(base: str, edits: list[Edit]) -> list[Edit]:
    """Slide each insertion inside a cluster to its edge where the text reads the same."""
    out: list[Edit] = []
    for k, e in enumerate(edits):
        if e.end == e.start and not _edge(base, e.start):
            floor = out[-1].end if out else 0
            ceiling = edits[k + 1].start if k + 1 < len(edits) else len(base)
            e = _slide(base, e.start, e.text, floor, ceiling) or e
        out.append(e)
    return out


def _edge(text: str, i: int) -> bool:
    return i <= 0 or i >= len(text) or not _attached(text, i)


def _slide(base: str, g: int, text: str, floor: int, ceiling: int) -> Edit | None:
    """``text`` inserted at ``g`` re-read at a cluster edge within [floor, ceiling]."""
    # Left: text ending in base[g-1], inserted at g, reads as base[g-1] + text[:-1] at g-1.
    p, t = g, text
    while p > floor and t[-1] == base[p - 1]:
        p, t = p - 1, base[p - 1] + t[:-1]
        if _edge(base, p):
            return Edit(p, p, t)
    p, t = g, text
    while p < ceiling and t[0] == base[p]:
        p, t = p + 1, t[1:] + base[p]
        if _edge(base, p):
            return Edit(p, p, t)
    return None


# --- the merge --------------------------------------------------------------------------

_YOURS, _THEIRS, _BOTH = 1, 2, 3


def merge(base: str, yours: Sequence[Edit], theirs: Sequence[Edit]) -> TextMerge:
    """Both sides' edits of ``base`` (each sorted, disjoint) combined; see the docstring."""
    ys, ts = _coalesce(yours), _coalesce(theirs)
    y_at = {e.start: e for e in ys}
    t_at = {e.start: e for e in ts}
    points = sorted({0, len(base), *y_at, *t_at, *(e.end for e in ys), *(e.end for e in ts)})
    # Segments in order: (side, text, deleted_by) -- an insertion has deleted_by 0 and
    # names its side; a base run has side 0 and says which sides deleted it.
    segs: list[tuple[int, str, int]] = []
    y_end = t_end = 0
    for i, p in enumerate(points):
        y, t = y_at.get(p), t_at.get(p)
        if y is not None:
            y_end = y.end
        if t is not None:
            t_end = t.end
        if y is not None and t is not None and y.text and y.text == t.text:
            segs.append((_BOTH, y.text, 0))
        else:
            if t is not None and t.text:
                segs.append((_THEIRS, t.text, 0))
            if y is not None and y.text:
                segs.append((_YOURS, y.text, 0))
        if i + 1 < len(points):
            q = points[i + 1]
            deleted = (_YOURS if p < y_end else 0) | (_THEIRS if p < t_end else 0)
            segs.append((0, base[p:q], deleted))
    merged: list[str] = []
    over_theirs: list[TextOp] = []
    over_yours: list[TextOp] = []
    for side, text, deleted in segs:
        if side:
            merged.append(text)
            over_theirs.append(Retain(len(text)) if side & _THEIRS else Insert(text))
            over_yours.append(Retain(len(text)) if side & _YOURS else Insert(text))
            continue
        if not deleted:
            merged.append(text)
        n = len(text)
        if not deleted & _THEIRS:
            over_theirs.append(Delete(n) if deleted else Retain(n))
        if not deleted & _YOURS:
            over_yours.append(Delete(n) if deleted else Retain(n))
    return TextMerge(
        "".join(merged), _overlapped(ys, ts), normalize(over_theirs), normalize(over_yours)
    )


def _coalesce(edits: Sequence[Edit]) -> list[Edit]:
    """Edits that touch (one ends where the next starts) as one; empty edits dropped."""
    out: list[Edit] = []
    for e in edits:
        if e.start == e.end and not e.text:
            continue
        if out and out[-1].end == e.start:
            last = out[-1]
            out[-1] = Edit(last.start, e.end, last.text + e.text)
        else:
            out.append(e)
    return out


def _overlapped(ys: list[Edit], ts: list[Edit]) -> bool:
    """Whether a non-identical pair of edits overlaps (see the docstring)."""
    i = j = 0
    while i < len(ys) and j < len(ts):
        y, t = ys[i], ts[j]
        if y != t and _overlap(y, t):
            return True
        if y.end < t.end:
            i += 1
        elif t.end < y.end:
            j += 1
        else:
            i += 1
            j += 1
    return False


def _overlap(a: Edit, b: Edit) -> bool:
    if max(a.start, b.start) < min(a.end, b.end):
        return True  # a shared base character
    if a.start == a.end and b.start < a.start < b.end:
        return True
    if b.start == b.end and a.start < b.start < a.end:
        return True
    return a.start == b.start and bool(a.text) and bool(b.text)  # inserts at one place


def merge_text(base: str, yours: str, theirs: str) -> TextMerge:
    """Two whole values edited from ``base``, merged (each diffed against base)."""
    if yours == theirs or theirs == base:
        return _one_side(base, yours, theirs)
    if yours == base:
        swapped = _one_side(base, theirs, yours)
        return TextMerge(swapped.text, False, swapped.theirs_over_yours, swapped.yours_over_theirs)
    mine, other = _Diff(base, yours), _Diff(base, theirs)
    shared = set(mine.raw) & set(other.raw)
    if shared:
        # Changes both sides made alike are taken as part of base first: the cleanup can
        # fold one shared change into different spans on the two sides ("ab" -> "aXb!"
        # and "?aXb" read as "b" -> "Xb!" and "a" -> "?aX"), which would apply twice.
        base = _apply(base, [e for e in mine.raw if e in shared])
        if yours == base or theirs == base:
            return merge_text(base, yours, theirs)
        mine, other = _Diff(base, yours), _Diff(base, theirs)
    m = merge(base, mine.edits, other.edits)
    return merge(base, mine.raw, other.raw) if m.overlapped else m


def merge_ops(base: str, yours: Sequence[Edit], theirs: str) -> TextMerge:
    """A client's exact edits of ``base`` merged with a whole value ``theirs`` (the
    server's text, diffed against base)."""
    if theirs == base:
        return merge(base, yours, [])
    other = _Diff(base, theirs)
    m = merge(base, yours, other.edits)
    return merge(base, yours, other.raw) if m.overlapped else m


def _one_side(base: str, yours: str, theirs: str) -> TextMerge:
    """Theirs is base or equal to yours: the merge is yours."""
    keep: list[TextOp] = [Retain(len(yours))] if yours else []
    if theirs == yours:
        return TextMerge(yours, False, keep, keep)
    return TextMerge(yours, False, ops_from_edits(len(base), diff(base, yours)), keep)


def _apply(base: str, edits: Sequence[Edit]) -> str:
    parts: list[str] = []
    cursor = 0
    for e in edits:
        parts.append(base[cursor : e.start])
        parts.append(e.text)
        cursor = e.end
    parts.append(base[cursor:])
    return "".join(parts)
