"""Three-way character merge for fields with policy ``text`` (SPEC §3).

What lives here: :func:`merge_text`, a pure function (base, yours, theirs) -> merged text,
or ``None`` when the two sides' edits collide so that no merge keeps every insertion of
both. No I/O, nothing that depends on the clock, no schema, storage or audit: the caller
decides where the three values come from and turns ``None`` into a durable conflict.

How. Each side is diffed against base; each diff becomes a list of edits in base
coordinates ("replace ``base[start:end]`` with ``text``"; a pure insertion has
``start == end``); the two lists are merged by position and applied to base.

- **diff-match-patch, not difflib.** ``difflib.SequenceMatcher`` is not a minimal diff:
  it matches longest blocks greedily and, on sequences of 200+ items, "autojunk" ignores
  any character that fills more than 1% of the text (spaces, "e"), so its character
  diffs of real prose come out coarse and arbitrary. diff-match-patch runs Myers' O(ND)
  diff, with a line-level first pass that keeps megabyte pages fast, and a cleanup made
  for human text. Its Python 3 version works on ``str``, i.e. on code points, so a
  character beyond the BMP (an emoji) is one unit and is never split into surrogates.
- **Diff_Timeout = 0, and a work budget instead.** With a timeout the library returns a
  coarser diff when the clock runs out, so the merge (and whether it conflicts) would
  depend on machine speed and load. With none, two long texts that differ almost
  everywhere take minutes (10,000 unrelated characters: 60 s; a 1 MB page converted from
  CRLF to LF: 9 minutes). So each diff gets a fixed budget of search steps (see
  ``_Differ``): past it the rest is diffed coarsely, as the timeout would, but at a point
  that depends on the texts alone. About 0.7 s per diff at worst (a merge makes two, or
  four when both sides share some edits); ordinary edits never reach it.
- **diff_cleanupSemantic.** A minimal diff of a rewrite is full of "chaff": single
  characters that happen to match ("Tuesday" -> "Sunday" keeps the "u"), splitting one
  rewrite into fragments the other side's edits could slip between, which yields text
  neither user wrote. The semantic cleanup folds such short equalities into the
  surrounding edit (only when an equality is no longer than the edits on both sides of
  it) and slides edits to word and line boundaries. The cost: a rewrite becomes one
  span, so an edit by the other side inside it is a conflict rather than a merge.
- **Not patch_apply.** Its fuzzy matching places a patch wherever the context looks most
  alike, and drops it when nothing is alike enough: an edit can land in the wrong place
  or vanish while the call reports success. Here every edit is placed exactly, by base
  coordinates, or the merge is refused.

Rules (edits of one side never touch each other: a diff separates them by at least one
unchanged character):

- yours == theirs: that text. Only one side changed: that side's text.
- Edits of the two sides that share no base character all apply. Edits that merely touch
  (one ends where the other starts) both apply, in base order.
- Two insertions at the same base position both survive, **yours first, then theirs**,
  unless they are identical, when the text is inserted once.
- An identical edit on both sides (same span, same text) applies once. Identical is
  judged on the diffs before the cleanup, which may fold one shared change into
  different spans on the two sides; the shared changes are then taken as part of base
  and the rest is diffed from there.
- Conflict (``None``): two edits share a base character (overlapping deletions too,
  though deleting their union would lose no insertion: two hands on the same text is
  the conservative reading), or one side's insertion falls strictly inside a span the
  other side deleted or replaced: there is nowhere to put it.
- Boundary: an insertion exactly at the start or end of a span the other side replaced
  or deleted is not inside it; it survives, next to the replacement text (before it at
  the start, after it at the end).

Limits.

- An insertion is what the diff reads as inserted. Where the same change reads more than
  one way, the merge follows the diff's reading: "Xa" typed after the first "a" of "aha"
  reads as "aX" before it, so if the other side deleted that "a" the result is "aXha",
  not "Xaha". Both are honest merges of the two texts; no character is lost or doubled.
- Positions are code points, not grapheme clusters: concurrent edits to different code
  points of one cluster (the "e" and the U+0301 of "e\u0301", two people of one ZWJ
  family emoji) merge into a cluster neither side wrote.
- The budget bounds the search, not the linear passes: callers should still cap the
  length of text fields. Past the budget a merge is likelier to conflict (a 100 KB note
  converted to LF line endings while someone else edits it does).
"""

from __future__ import annotations

from dataclasses import dataclass

from diff_match_patch import diff_match_patch

__all__ = ["merge_text"]


@dataclass(frozen=True, slots=True)
class _Edit:
    """Replace ``base[start:end]`` with ``text`` (an insertion when start == end)."""

    start: int
    end: int
    text: str

    @property
    def is_insertion(self) -> bool:
        return self.start == self.end


def merge_text(base: str, yours: str, theirs: str) -> str | None:
    """Merge two edited copies of ``base``; ``None`` when their edits collide.

    Every insertion of both sides (as the diff reads it) is in the result, and every
    deletion of both sides is applied. See the module docstring for the exact rules.
    Deterministic: same inputs, same output, on every machine.
    """
    if yours == theirs or theirs == base:
        return yours
    if yours == base:
        return theirs
    mine, other = _Diff(base, yours), _Diff(base, theirs)
    shared = set(mine.raw) & set(other.raw)
    if shared:
        # Changes both sides made alike are measured out first, so that only the rest is
        # merged: the cleanup can fold one shared change into different spans on the two
        # sides ("ab" -> "aXb!" and "?aXb" become "b" -> "Xb!" and "a" -> "?aX"), which
        # would no longer be identical and would apply twice ("?aXXb!").
        base = _apply(base, [edit for edit in mine.raw if edit in shared])
        if yours == base:
            return theirs
        if theirs == base:
            return yours
        mine, other = _Diff(base, yours), _Diff(base, theirs)
    merged = _merge_edits(mine.edits, other.edits)
    if merged is None:
        return None
    return _apply(base, merged)


class _Diff:
    """The edits that turn ``base`` into ``changed``, in base order, read two ways.

    ``edits`` is the reading merged (after diff_cleanupSemantic, see the module
    docstring); ``raw`` is the diff before that cleanup, only used to find the changes
    both sides made alike.
    """

    __slots__ = ("edits", "raw")

    def __init__(self, base: str, changed: str) -> None:
        differ = _Differ()
        diffs: list[tuple[int, str]] = differ.diff_main(base, changed)
        self.raw = _to_edits(diffs)
        differ.diff_cleanupSemantic(diffs)  # in place
        self.edits = _to_edits(diffs)


def _to_edits(diffs: list[tuple[int, str]]) -> list[_Edit]:
    """A diff (equal / delete / insert runs) as edits in base coordinates."""
    edits: list[_Edit] = []
    pos = 0  # position in base
    start: int | None = None  # base position where the current run of changes began
    inserted: list[str] = []
    for op, text in diffs:
        if op == diff_match_patch.DIFF_EQUAL:
            if start is not None:
                edits.append(_Edit(start, pos, "".join(inserted)))
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
        edits.append(_Edit(start, pos, "".join(inserted)))
    return edits


# Search work allowed for one side's diff, in diagonals walked by the Myers search (see
# _Differ); measured: a 100 KB or 1 MB page with 50 scattered edits uses ~3,500, with 500
# edits ~230,000; spending all of it takes about 0.7 s.
_WORK_BUDGET = 500_000


class _Differ(diff_match_patch):  # type: ignore[misc]  # the library ships no type hints
    """diff-match-patch with a work budget in place of its clock.

    The library's only brake is ``Diff_Timeout``, checked in its Myers loop
    (``diff_bisect``) as ``time.time() > deadline`` once per step; when it fires, that
    piece is diffed as one replacement. A clock makes the result depend on machine speed,
    and no brake lets two long unrelated texts run for minutes (O(N x D)). So the timeout
    is off and each Myers pass gets a :class:`_Meter` as its "deadline" instead: the same
    check, counting work rather than seconds, so where a diff turns coarse depends on the
    texts alone. A coarse diff is still a correct diff; it only makes a conflict likelier.
    """

    def __init__(self) -> None:
        super().__init__()
        self.Diff_Timeout = 0
        self.work_left = _WORK_BUDGET

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
        # ``time.time() > meter`` lands here (a float cannot compare itself with a
        # _Meter), so the clock's value is ignored. Step d of a pass walks about d
        # diagonals, hence the growing charge.
        self._step += 1
        self._differ.work_left -= self._step
        return self._differ.work_left < 0


def _collide(a: _Edit, b: _Edit) -> bool:
    """Whether no order of ``a`` and ``b`` keeps both (they are not identical)."""
    if a.is_insertion and b.is_insertion:
        return False
    if a.is_insertion:
        return b.start < a.start < b.end
    if b.is_insertion:
        return a.start < b.start < a.end
    return max(a.start, b.start) < min(a.end, b.end)


def _merge_edits(yours: list[_Edit], theirs: list[_Edit]) -> list[_Edit] | None:
    """Both sides' edits in one base-ordered list, or ``None`` if two collide.

    Comparing only the two heads is enough: each list is sorted and its edits are
    disjoint, so once the earlier head is taken, nothing later on its side can reach back
    before the other head.
    """
    merged: list[_Edit] = []
    i = j = 0
    while i < len(yours) and j < len(theirs):
        mine, other = yours[i], theirs[j]
        if mine == other:
            merged.append(mine)
            i += 1
            j += 1
        elif _collide(mine, other):
            return None
        # (start, end) order puts an insertion before a span starting at the same point
        # and after one ending there; a tie (two insertions at one point) goes to yours.
        elif (other.start, other.end) < (mine.start, mine.end):
            merged.append(other)
            j += 1
        else:
            merged.append(mine)
            i += 1
    merged.extend(yours[i:])
    merged.extend(theirs[j:])
    return merged


def _apply(base: str, edits: list[_Edit]) -> str:
    """``base`` with ``edits`` (base-ordered, not overlapping) applied."""
    parts: list[str] = []
    cursor = 0
    for edit in edits:
        parts.append(base[cursor : edit.start])
        parts.append(edit.text)
        cursor = edit.end
    parts.append(base[cursor:])
    return "".join(parts)
