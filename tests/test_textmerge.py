"""The three-way character merge of ``text`` fields (sync_service.rules.textmerge, SPEC §3).

Examples first: the issue's, then each rule and boundary of the module docstring, then
real text (emoji, combining marks, CJK, right-to-left, CRLF, empty, a 1 MB page) and the
work budget. Then Hypothesis properties: edits kept apart merge to exactly the text the
generator expects; edits that may collide never lose an insertion without a conflict;
the merge is deterministic and treats the two sides alike.
"""

from __future__ import annotations

import importlib
import random
import time
from collections import Counter
from dataclasses import dataclass
from typing import Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sync_service.rules.textmerge import merge_text

PROPERTY = settings(max_examples=300, deadline=None)

FOX = "The quick brown fox"


# --- the examples ---------------------------------------------------------------


def test_an_insertion_and_an_append_both_survive() -> None:
    yours, theirs = "The very quick brown fox", "The quick brown fox jumps"
    assert merge_text(FOX, yours, theirs) == "The very quick brown fox jumps"
    assert merge_text(FOX, theirs, yours) == "The very quick brown fox jumps"


def test_two_rewrites_of_one_word_conflict() -> None:
    assert merge_text(FOX, "The slow brown fox", "The fast brown fox") is None


# --- the rules --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("yours", "theirs", "expected"),
    [
        ("The quick red fox", "The quick red fox", "The quick red fox"),  # same change
        ("The quick red fox", FOX, "The quick red fox"),  # only yours changed
        (FOX, "The quick red fox", "The quick red fox"),  # only theirs changed
        (FOX, FOX, FOX),
    ],
)
def test_when_only_one_side_changed_or_both_alike_that_text_wins(
    yours: str, theirs: str, expected: str
) -> None:
    assert merge_text(FOX, yours, theirs) == expected


def test_an_edit_made_on_both_sides_applies_once() -> None:
    base = "teh cat sat on the mat"
    yours = "the cat sat on the mat."  # fixes the typo, adds a period
    theirs = "the cat sat on a mat"  # fixes the same typo, changes an article
    assert merge_text(base, yours, theirs) == "the cat sat on a mat."


def test_insertions_at_one_point_both_survive_yours_first() -> None:
    assert merge_text("ab", "aXb", "aYb") == "aXYb"
    assert merge_text("ab", "aYb", "aXb") == "aYXb"


def test_the_same_insertion_at_one_point_is_made_once() -> None:
    # The cleanup reads yours as "b" -> "Xb!" and theirs as "a" -> "?aX"; the shared "X"
    # must still come out once.
    assert merge_text("ab", "aXb!", "?aXb") == "?aXb!"
    assert merge_text("ab", "aXb!", "aXb") == "aXb!"


BASE = "abc-def-ghi"  # theirs below deletes or replaces "def", base[4:7]


@pytest.mark.parametrize(
    ("yours", "theirs", "expected"),
    [
        # an insertion at either end of a span the other side deleted survives...
        ("abc-Xdef-ghi", "abc--ghi", "abc-X-ghi"),
        ("abc-defX-ghi", "abc--ghi", "abc-X-ghi"),
        # ...and of a span it replaced, on the matching side of the new text
        ("abc-Xdef-ghi", "abc-DEF-ghi", "abc-XDEF-ghi"),
        ("abc-defX-ghi", "abc-DEF-ghi", "abc-DEFX-ghi"),
        # edits that touch without sharing a character both apply
        ("-def-ghi", "abc+def-ghi", "+def-ghi"),
        ("abc-DEF-ghi", "abc-def+ghi", "abc-DEF+ghi"),
    ],
)
def test_edits_that_meet_at_a_boundary_both_apply(yours: str, theirs: str, expected: str) -> None:
    assert merge_text(BASE, yours, theirs) == expected
    assert merge_text(BASE, theirs, yours) == expected


@pytest.mark.parametrize(
    ("yours", "theirs"),
    [
        ("abc-dXef-ghi", "abc--ghi"),  # an insertion inside a deleted span
        ("abc-dXef-ghi", "abc-DEF-ghi"),  # an insertion inside a replaced span
        ("abc-deF-ghi", "abc-DEF-ghi"),  # two replacements that share a character
        ("abef-ghi", "abc--ghi"),  # two deletions that overlap ("c-d", "def")
        ("ab-ghi", "abc--ghi"),  # ... even when one contains the other ("c-def", "def")
    ],
)
def test_edits_that_share_a_character_conflict(yours: str, theirs: str) -> None:
    assert merge_text(BASE, yours, theirs) is None
    assert merge_text(BASE, theirs, yours) is None


def test_an_ambiguous_insertion_follows_the_diffs_reading() -> None:
    # Yours types "Xa" after the first "a" of "aha"; the diff reads it as "aX" before
    # that "a", which theirs deletes. The result keeps every inserted character, in the
    # diff's reading rather than in the order typed (module docstring, "Limits").
    assert merge_text("aha", "aXaha", "ha") == "aXha"


# --- real text --------------------------------------------------------------------------


def _whole_code_points(text: str) -> bool:
    """No lone surrogate: every character is a whole code point, encodable as UTF-8."""
    return not any(0xD800 <= ord(ch) <= 0xDFFF for ch in text)


def test_emoji_beyond_the_bmp_are_never_split() -> None:
    base = "Status: 🙂 ok"
    merged = merge_text(base, "Status: 🎉 ok", "Status: 🙂 ok 👍🏽")
    assert merged == "Status: 🎉 ok 👍🏽"
    assert merge_text("𝄞𝄞", "𝄞😀𝄞", "𝄞𝄞🚀") == "𝄞😀𝄞🚀"
    assert merge_text(base, "Status: 🎉 ok", "Status: 🚀 ok") is None
    for yours, theirs in [("😀", "😁"), ("a😀b", "a😁b"), ("👨‍👩‍👧", "👨‍👩‍👦")]:
        merged = merge_text("", yours, theirs)
        assert merged is not None
        assert _whole_code_points(merged)
        merged.encode("utf-8")


def test_combining_marks() -> None:
    base = "cafe\u0301 au lait"
    assert (
        merge_text(base, "Le cafe\u0301 au lait", "cafe\u0301 au lait chaud")
        == "Le cafe\u0301 au lait chaud"
    )
    # yours swaps the accent of "é"; theirs adds a "!" right after it: both apply
    assert merge_text(base, "cafe\u0300 au lait", "cafe\u0301! au lait") == "cafe\u0300! au lait"
    # two different accents on the same letter
    assert merge_text(base, "cafe\u0300 au lait", "cafe\u0302 au lait") is None


def test_cjk() -> None:
    assert merge_text("我喜欢猫", "我很喜欢猫", "我喜欢猫和狗") == "我很喜欢猫和狗"
    assert merge_text("我喜欢猫", "我喜欢狗", "我喜欢鸟") is None


def test_right_to_left_text_keeps_its_logical_order() -> None:
    assert merge_text("שלום עולם", "היי שלום עולם", "שלום עולם!") == "היי שלום עולם!"
    assert merge_text("مرحبا بالعالم", "مرحبا بالعالم الجميل", "أهلا مرحبا بالعالم") == (
        "أهلا مرحبا بالعالم الجميل"
    )


def test_crlf_and_lf_line_endings() -> None:
    base = "one\r\ntwo\r\nthree\r\n"
    as_lf = "one\ntwo\nthree\n"
    # one side converts to LF while the other edits a line or adds one: both apply
    assert merge_text(base, as_lf, "one\r\nTWO\r\nthree\r\n") == "one\nTWO\nthree\n"
    assert merge_text(base, as_lf, base + "four\r\n") == as_lf + "four\r\n"
    # but deleting a line whose "\r" the other side deleted is a conflict
    assert merge_text(base, as_lf, "one\r\nthree\r\n") is None


def test_empty_texts() -> None:
    assert merge_text("", "hello", "world") == "helloworld"
    assert merge_text("", "", "world") == "world"
    assert merge_text("gone", "", "") == ""
    # theirs appended to what yours deleted: the append survives (boundary rule) ...
    assert merge_text("gone", "", "gone!") == "!"
    # ... an insertion inside it has nowhere to go
    assert merge_text("gone", "", "go-ne") is None


@dataclass(frozen=True)
class Edit:
    """Replace ``base[start:end]`` with ``text``, as the generators below make them."""

    start: int
    end: int
    text: str


def apply(base: str, edits: list[Edit]) -> str:
    """``base`` with ``edits`` (disjoint, any order) applied: the reference merge."""
    parts: list[str] = []
    cursor = 0
    for edit in sorted(edits, key=lambda e: (e.start, e.end)):
        parts += [base[cursor : edit.start], edit.text]
        cursor = edit.end
    return "".join(parts) + base[cursor:]


def test_a_1_mb_page_merges_fast() -> None:
    rng = random.Random(0)
    words = ["alpha", "beta", "épée", "中文", "שלום", "مرحبا", "😀", "fox", "quick", "lazy"]
    lines = [" ".join(rng.choices(words, k=rng.randint(5, 14))) for _ in range(24_000)]
    base = "\n".join(lines) + "\n"
    assert len(base) > 1_000_000
    half = len(base) // 2

    def scattered(lo: int, hi: int, tag: str) -> list[Edit]:
        spots = sorted(rng.sample(range(lo, hi, 100), 20))  # 100 apart: never touching
        return [
            Edit(p, p + (i % 3) * 5, f"⟦{tag}{i}⟧" if i % 3 != 1 else "")
            for i, p in enumerate(spots)
        ]

    yours, theirs = scattered(0, half, "Y"), scattered(half, len(base) - 20, "T")
    started = time.perf_counter()
    merged = merge_text(base, apply(base, yours), apply(base, theirs))
    elapsed = time.perf_counter() - started
    assert merged == apply(base, yours + theirs)
    assert elapsed < 2.0, f"1 MB merge took {elapsed:.2f} s"


def test_unrelated_long_texts_stay_within_the_work_budget() -> None:
    # Without the budget this diff takes hours (two 20,000-character texts with nothing
    # in common); with it, the diff turns coarse after ~0.7 s and the merge conflicts.
    rng = random.Random(1)
    base = "".join(rng.choices("abcdefgh ", k=20_000))
    yours = "".join(rng.choices("abcdefgh ", k=20_000))
    theirs = base[:100] + "X" + base[100:]
    started = time.perf_counter()
    merged = merge_text(base, yours, theirs)
    assert time.perf_counter() - started < 10.0
    assert merged is None
    assert merge_text(base, yours, theirs) is None


def test_the_result_does_not_depend_on_the_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    # diff-match-patch reads time.time() once per step of its search; the merge must
    # ignore it. A clock that jumps a billion years per read changes nothing.
    rng = random.Random(2)
    base = "".join(rng.choices("abcdefgh \n", k=3_000))
    yours = base[:500] + "".join(rng.choices("abcdefgh \n", k=1_500)) + base[2_000:]
    theirs = base[:2_500] + "THEIRS" + base[2_500:]
    expected = merge_text(base, yours, theirs)

    class JumpingClock:
        now = 0.0

        def time(self) -> float:
            self.now += 3e16
            return self.now

    clock = JumpingClock()
    dmp_module = importlib.import_module("diff_match_patch.diff_match_patch")
    monkeypatch.setattr(dmp_module, "time", clock)
    assert merge_text(base, yours, theirs) == expected
    assert clock.now > 0  # the library did read it


# --- properties -------------------------------------------------------------------------

# Inserted text never shares a character with base text, so a diff has only one reading
# of each insertion. Otherwise "ab" typed before "ay" may read as "ba" after the "a"
# (see test_an_ambiguous_insertion_follows_the_diffs_reading), and a check of the
# generator's own edits would test an intent that no diff can know.
BASE_TOKENS = (
    *"abcdefghijklmnopqrstuvwxyz0123456789 .,;\t",
    "\r\n",
    *"é\u0301\u0308",  # a precomposed letter, and combining acute and diaeresis
    *"中文字漢語日本",
    *"אבגדהוש",
    *"لمنهوي",
    *"😀🎉🚀𝄞🏽\u200d",  # beyond the BMP, a skin-tone modifier, a zero-width joiner
)
INSERT_TOKENS = (
    *"ABCDEFGHIJKLMNOPQRSTUVWXYZ!?",
    *"ñ\u0300\u0323",
    *"你好世界",
    *"םתצ",
    *"رحب",
    *"🙂🦊🌍👍",
)

Side = Literal["yours", "theirs", "both"]

# Each edit deletes at most MAX_EDIT base characters and inserts at most MAX_EDIT; at
# least MIN_GAP untouched base characters separate any two edits. MIN_GAP > MAX_EDIT
# keeps diff_cleanupSemantic from folding the gap into a larger edit, so each side's
# diff reads back exactly the edits generated.
MAX_EDIT = 4
MIN_GAP = MAX_EDIT + 1


def insert_text(min_size: int) -> st.SearchStrategy[str]:
    tokens = st.lists(st.sampled_from(INSERT_TOKENS), min_size=min_size, max_size=MAX_EDIT)
    return tokens.map("".join)


@st.composite
def apart(draw: st.DrawFn) -> tuple[str, list[Edit], list[Edit]]:
    """A base of distinct characters and two edit lists kept MIN_GAP apart.

    Distinct characters (the "\\r\\n" token at most once) leave each deletion only one
    place to be read in. Edits marked "both" go to both sides: identical edits.
    """
    tokens = draw(st.lists(st.sampled_from(BASE_TOKENS), unique=True, max_size=len(BASE_TOKENS)))
    base = "".join(tokens)
    yours: list[Edit] = []
    theirs: list[Edit] = []
    pos = draw(st.integers(0, 3))
    while pos <= len(base) and draw(st.integers(0, 4)) > 0:
        kind = draw(st.sampled_from(["insert", "delete", "replace"]))
        length = 0 if kind == "insert" else draw(st.integers(1, MAX_EDIT))
        if pos + length > len(base):
            break
        text = "" if kind == "delete" else draw(insert_text(min_size=1))
        edit = Edit(pos, pos + length, text)
        side: Side = draw(st.sampled_from(["yours", "theirs", "both"]))
        if side != "theirs":
            yours.append(edit)
        if side != "yours":
            theirs.append(edit)
        pos = edit.end + draw(st.integers(MIN_GAP, MIN_GAP + 6))
    return base, yours, theirs


@PROPERTY
@given(apart())
def test_edits_kept_apart_merge_to_the_text_expected(
    case: tuple[str, list[Edit], list[Edit]],
) -> None:
    base, yours, theirs = case
    expected = apply(base, list(dict.fromkeys(yours + theirs)))  # shared edits once
    merged = merge_text(base, apply(base, yours), apply(base, theirs))
    assert merged == expected
    for edit in yours + theirs:
        assert edit.text in merged


BASE_CHARS = [t for t in BASE_TOKENS if t != "\r\n"] + ["\r", "\n"]
INSERT_ONLY = set("".join(INSERT_TOKENS)) - set("".join(BASE_CHARS))


@st.composite
def script(draw: st.DrawFn, base: str) -> list[Edit]:
    """Random edits of ``base``, in order and disjoint, free to touch each other."""
    edits: list[Edit] = []
    pos = 0
    for _ in range(draw(st.integers(0, 4))):
        start = draw(st.integers(pos, len(base)))
        end = draw(st.integers(start, min(len(base), start + 4)))
        text = draw(insert_text(min_size=0 if start < end else 1))
        edits.append(Edit(start, end, text))
        pos = end + 1
        if pos > len(base):
            break
    return edits


@st.composite
def free(draw: st.DrawFn) -> tuple[str, list[Edit], list[Edit]]:
    """A small base, repeats allowed, and two edit lists that may overlap each other.

    Some of yours' edits are also made by theirs (where they stay clear of theirs' own).
    """
    # "\r" and "\n" come apart here, so a base may hold lone ones and many "\r\n".
    base = "".join(draw(st.lists(st.sampled_from(BASE_CHARS), max_size=16)))
    yours, theirs = draw(script(base)), draw(script(base))
    shared = [
        edit
        for edit in yours
        if draw(st.booleans()) and all(edit.end < t.start or t.end < edit.start for t in theirs)
    ]
    return base, yours, sorted(theirs + shared, key=lambda e: (e.start, e.end))


@PROPERTY
@given(free())
def test_no_insertion_is_lost_without_a_conflict(
    case: tuple[str, list[Edit], list[Edit]],
) -> None:
    base, yours_edits, theirs_edits = case
    yours, theirs = apply(base, yours_edits), apply(base, theirs_edits)
    merged = merge_text(base, yours, theirs)
    if merged is None:
        return
    for edit in yours_edits + theirs_edits:
        assert edit.text in merged
    # Counted per character, the merge lies between "the two sides' changes together"
    # and "their common part": each inserted character at least as often as on either
    # side, at most as on both together; no deleted base character comes back, and none
    # goes that neither side deleted.
    counts, y, t, b = Counter(merged), Counter(yours), Counter(theirs), Counter(base)
    for ch in set(counts) | set(y) | set(t) | set(b):
        if ch in INSERT_ONLY:
            assert max(y[ch], t[ch]) <= counts[ch] <= y[ch] + t[ch]
        else:
            assert y[ch] + t[ch] - b[ch] <= counts[ch] <= min(y[ch], t[ch])


MIXED = st.lists(st.sampled_from(["a", "b", " ", "é", "e\u0301", "中", "א", "😀", "\r\n"]))


@PROPERTY
@given(MIXED.map("".join), MIXED.map("".join), MIXED.map("".join))
def test_deterministic_and_fair_to_both_sides(base: str, yours: str, theirs: str) -> None:
    # Any three texts, characters shared freely: no intent to check, only the contract.
    merged = merge_text(base, yours, theirs)
    assert merge_text(base, yours, theirs) == merged
    assert merge_text(base, yours, yours) == yours
    assert merge_text(base, yours, base) == yours
    assert merge_text(base, base, theirs) == theirs
    swapped = merge_text(base, theirs, yours)
    # Swapping the sides changes at most the order of two insertions at one point.
    assert (merged is None) == (swapped is None)
    if merged is not None and swapped is not None:
        assert Counter(merged) == Counter(swapped)
        assert _whole_code_points(merged)
