"""The merge of concurrent text edits (sync_service.rules.textmerge, SPEC §3): never a conflict.

Examples first (the rules, real text: emoji, combining marks, CRLF, a 1 MB page, the work
budget), then Hypothesis properties over random texts and random concurrent edits, pairs,
triples and sequences: the merge equals a character-by-character oracle, converges (A then
B' = B then A'), keeps every inserted character exactly once and every base character
nobody deleted.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fieldsync.textops import Delete, Insert, Retain, TextOp, apply_ops
from sync_service.rules.textmerge import (
    WORK_BUDGET,
    Edit,
    TextMerge,
    diff,
    edits_from_ops,
    merge,
    merge_ops,
    merge_text,
    ops_from_edits,
)

PROPERTY = settings(max_examples=120, deadline=None)

FOX = "The quick brown fox"


def run(text: str, ops: Sequence[TextOp]) -> str:
    return apply_ops(text, ops) if ops else text


def converges(base: str, yours: str, theirs: str, m: TextMerge) -> bool:
    return run(theirs, m.yours_over_theirs) == m.text == run(yours, m.theirs_over_yours)


# --- the rules --------------------------------------------------------------------------


def test_an_insertion_and_an_append_both_survive() -> None:
    yours, theirs = "The very quick brown fox", "The quick brown fox jumps"
    m = merge_text(FOX, yours, theirs)
    assert (m.text, m.overlapped) == ("The very quick brown fox jumps", False)
    assert merge_text(FOX, theirs, yours).text == m.text
    assert converges(FOX, yours, theirs, m)


def test_two_rewrites_of_one_word_both_survive_theirs_first_and_overlap() -> None:
    m = merge_text(FOX, "The slow brown fox", "The fast brown fox")
    assert (m.text, m.overlapped) == ("The fastslow brown fox", True)


def test_insertions_at_one_place_both_survive_theirs_first() -> None:
    assert merge_text("ab", "aXb", "aYb").text == "aYXb"
    assert merge_text("ab", "aYb", "aXb").text == "aXYb"
    assert merge_text("ab", "aXb", "aYb").overlapped


def test_an_insertion_inside_a_span_the_other_deleted_survives_there() -> None:
    base = "abc-def-ghi"
    theirs_deletes_def = edits_from_ops(base, [Retain(4), Delete(3), Retain(4)])
    yours_inserts_in_it = edits_from_ops(base, [Retain(5), Insert("X"), Retain(6)])
    m = merge(base, yours_inserts_in_it, theirs_deletes_def)
    assert (m.text, m.overlapped) == ("abc-X-ghi", True)
    m = merge(base, theirs_deletes_def, yours_inserts_in_it)  # sides swapped
    assert m.text == "abc-X-ghi"


def test_an_identical_edit_applies_once_and_is_no_overlap() -> None:
    base = "teh cat sat on the mat"
    m = merge_text(base, "the cat sat on the mat.", "the cat sat on a mat")
    assert (m.text, m.overlapped) == ("the cat sat on a mat.", False)
    ops: list[TextOp] = [Retain(4), Insert("black "), Retain(18)]
    same = edits_from_ops(base, ops)
    assert merge(base, same, same).text == "teh black cat sat on the mat"
    # A shared change the cleanup reads differently on the two sides still comes out once.
    assert merge_text("ab", "aXb!", "?aXb").text == "?aXb!"


def test_deletions_are_a_union() -> None:
    m = merge_text("one two three four", "one three four", "one two four")
    assert m.text == "one four"


def test_edits_that_only_touch_do_not_overlap() -> None:
    m = merge_text("abcdef", "abXYdef", "abcZef")  # replaces "c"; replaces "d"
    assert (m.text, m.overlapped) == ("abXYZef", False)


def test_only_one_side_changed() -> None:
    for yours, theirs, expected in [
        ("The quick red fox", FOX, "The quick red fox"),
        (FOX, "The quick red fox", "The quick red fox"),
        (FOX, FOX, FOX),
        ("", "", ""),
    ]:
        m = merge_text(FOX, yours, theirs)
        assert (m.text, m.overlapped) == (expected, False)
        assert converges(FOX, yours, theirs, m)


# --- real text --------------------------------------------------------------------------


def test_emoji_beyond_the_bmp_are_one_code_point() -> None:
    base = "I 🎉 you"
    ops: list[TextOp] = [Retain(2), Delete(1), Insert("🚀"), Retain(4)]  # code points
    assert apply_ops(base, ops) == "I 🚀 you"
    m = merge(base, edits_from_ops(base, ops), diff(base, "I 🎉 you 👍🏽"))
    assert m.text == "I 🚀 you 👍🏽"


def test_a_diff_never_puts_an_insertion_between_a_letter_and_its_combining_mark() -> None:
    base = "a e\u0301 b"
    yours = "a e\u0300e\u0301 b"  # "è" typed before "é"; a diff may read "\u0300e" after e
    (edit,) = diff(base, yours)
    assert (edit.start, edit.end, edit.text) == (2, 2, "e\u0300")
    theirs = "a  b"  # the "é" deleted
    assert merge_text(base, yours, theirs).text == "a e\u0300 b"


def test_a_diff_keeps_crlf_and_zwj_sequences_whole() -> None:
    family = "\U0001f468\u200d\U0001f469\u200d\U0001f467"
    base = f"line\r\nx{family}y"
    for changed in (f"line\r\n\r\nx{family}y", f"line\r\nx{family}\u200d\U0001f467y"):
        for e in diff(base, changed):
            for p in {e.start, e.end}:
                assert p in (0, len(base)) or not _inside_cluster(base, p)


def _inside_cluster(text: str, i: int) -> bool:
    return (text[i - 1], text[i]) == ("\r", "\n") or "\u200d" in (text[i - 1], text[i])


def test_crlf_pages_merge() -> None:
    base = "a\r\nb\r\nc\r\n"
    m = merge_text(base, "a\r\nB\r\nb\r\nc\r\n", "a\r\nb\r\nc\r\nd\r\n")
    assert m.text == "a\r\nB\r\nb\r\nc\r\nd\r\n"


def test_a_1_mb_page_with_a_keystroke_on_each_side() -> None:
    rng = random.Random(7)
    words = ["alpha", "beta", "gamma", "delta", "épée", "数据", "🎉", "\r\n"]
    base = " ".join(rng.choice(words) for _ in range(200_000))[:1_000_000]
    yours = base[:1000] + "Y" + base[1000:]
    theirs = base[:900_000] + base[900_001:]
    m = merge_text(base, yours, theirs)
    assert m.text == base[:1000] + "Y" + base[1000:900_000] + base[900_001:]
    assert converges(base, yours, theirs, m)
    ops: list[TextOp] = [Retain(500_000), Insert("Z"), Retain(len(base) - 500_000)]
    m = merge(base, edits_from_ops(base, ops), diff(base, theirs))
    assert m.text == base[:500_000] + "Z" + base[500_000:900_000] + base[900_001:]


def test_unrelated_long_texts_stay_within_the_work_budget() -> None:
    # Without the budget these diffs take minutes; with it, a coarser but correct diff.
    rng = random.Random(3)
    a = "".join(rng.choice("abcdefgh ") for _ in range(20_000))
    b = "".join(rng.choice("abcdefgh ") for _ in range(20_000))
    c = a.replace(" ", "\n")
    m = merge_text(a, b, c)
    assert converges(a, b, c, m)
    assert WORK_BUDGET == 500_000


def test_the_result_does_not_depend_on_the_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    rng = random.Random(5)
    a = "".join(rng.choice("ab ") for _ in range(5_000))
    b = "".join(rng.choice("ab ") for _ in range(5_000))
    first = merge_text(a, b, a[::-1])
    monkeypatch.setattr(time, "time", lambda: 1e12)  # the clock jumps far ahead
    assert merge_text(a, b, a[::-1]) == first


def test_ops_and_edits_round_trip() -> None:
    base = "hello world"
    ops: list[TextOp] = [Retain(6), Insert("big "), Delete(5)]
    assert ops_from_edits(len(base), edits_from_ops(base, ops)) == ops


# --- properties -------------------------------------------------------------------------

# Base texts from characters that make trouble: emoji, combining marks, CRLF, RTL, CJK.
BASE_CHARS = st.sampled_from([*"abc \r\n", "é", "\u0301", "🎉", "数", "ש", "\u200d"])
BASES = st.lists(BASE_CHARS, max_size=40).map("".join)


@st.composite
def edit_lists(draw: st.DrawFn, base: str, tokens: Counter[str]) -> list[Edit]:
    """Random disjoint edits of ``base``; each inserted character is a fresh private-use
    one (so survival can be counted), recorded in ``tokens``."""
    n = len(base)
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=8)))
    edits: list[Edit] = []
    floor = 0
    for i in range(0, len(cuts) - 1, 2):
        start, end = max(cuts[i], floor), cuts[i + 1]
        if start > end or (edits and start <= edits[-1].end):
            continue
        k = draw(st.integers(0 if end > start else 1, 3))
        text = "".join(chr(0xE000 + len(tokens) + j) for j in range(k))
        tokens.update(text)
        edits.append(Edit(start, end, text))
        floor = end + 1
    return edits


def oracle(base: str, yours: list[Edit], theirs: list[Edit]) -> str:
    """The rules, one character at a time (theirs' insertions first at one place)."""
    gone = [False] * len(base)
    at: dict[int, list[str]] = {}
    for side in (theirs, yours):
        for e in side:
            for i in range(e.start, e.end):
                gone[i] = True
            if e.text and e.text not in at.get(e.start, []):
                at.setdefault(e.start, []).append(e.text)
    out = []
    for i in range(len(base) + 1):
        out += at.get(i, [])
        if i < len(base) and not gone[i]:
            out.append(base[i])
    return "".join(out)


def render(base: str, edits: list[Edit]) -> str:
    return run(base, ops_from_edits(len(base), edits))


@PROPERTY
@given(st.data(), BASES)
def test_a_pair_merges_as_the_rules_say_and_converges(data: st.DataObject, base: str) -> None:
    tokens: Counter[str] = Counter()
    yours = data.draw(edit_lists(base, tokens))
    theirs = data.draw(edit_lists(base, tokens))
    if data.draw(st.booleans()) and yours:
        theirs = sorted({*theirs, yours[0]} - {e for e in theirs if _touches(e, yours[0])},
                        key=lambda e: e.start)  # fmt: skip
    m = merge(base, yours, theirs)
    assert m.text == oracle(base, yours, theirs)
    assert converges(base, render(base, yours), render(base, theirs), m)
    counts = Counter(m.text)
    inserted = {c for e in (*yours, *theirs) for c in e.text}
    assert all(counts[c] == 1 for c in inserted)  # every inserted character, exactly once
    if not set(yours) & set(theirs) and not (yours and theirs):
        assert not m.overlapped  # one side only: nothing to overlap


def _touches(a: Edit, b: Edit) -> bool:
    return a.start <= b.end + 1 and b.start <= a.end + 1


@PROPERTY
@given(st.data(), BASES)
def test_whole_values_keep_every_insertion_and_every_base_character_nobody_deleted(
    data: st.DataObject, base: str
) -> None:
    # Unique base characters too, so the diff has one reading and "kept" is countable.
    base = "".join(chr(0x4E00 + i) + c for i, c in enumerate(base))
    tokens: Counter[str] = Counter()
    yours_e = data.draw(edit_lists(base, tokens))
    theirs_e = data.draw(edit_lists(base, tokens))
    yours, theirs = render(base, yours_e), render(base, theirs_e)
    m = merge_text(base, yours, theirs)
    assert converges(base, yours, theirs, m)
    counts = Counter(m.text)
    assert all(counts[c] == 1 for c in tokens)
    for c in set(yours) & set(theirs) & set(base[::2]):  # the unique ones
        assert counts[c] == 1  # kept by both sides: still there, once


@settings(max_examples=80, deadline=None)
@given(st.data(), BASES, st.integers(2, 4))
def test_a_sequence_of_clients_each_merged_on_arrival_keeps_every_insertion(
    data: st.DataObject, base: str, clients: int
) -> None:
    """Triples and longer: each client edits the same base offline; the server merges
    each arrival (its operations, exact) with the server's text (a whole value)."""
    base = "".join(chr(0x4E00 + i) + c for i, c in enumerate(base))
    tokens: Counter[str] = Counter()
    server = base
    kept = set(base[::2])  # the unique ones
    for _ in range(clients):
        edits = data.draw(edit_lists(base, tokens))
        for e in edits:
            kept -= set(base[e.start : e.end])
        m = merge_ops(base, edits, server)
        assert run(server, m.yours_over_theirs) == m.text
        server = m.text
    counts = Counter(server)
    assert all(counts[c] == 1 for c in tokens)
    assert all(counts[c] == 1 for c in kept)


@PROPERTY
@given(BASES, BASES)
def test_deterministic(a: str, b: str) -> None:
    assert merge_text(a, b, a + b) == merge_text(a, b, a + b)
