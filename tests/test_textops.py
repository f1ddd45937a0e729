"""Text operations (fieldsync.textops): applying, checking, composing, their JSON form."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fieldsync.textops import (
    Delete,
    Insert,
    Retain,
    TextOp,
    TextOpsError,
    apply_ops,
    compose,
    normalize,
    ops_from_json,
    ops_to_json,
    transform,
)

TEXTS = st.text(alphabet="ab\r\n🎉é\u0301", max_size=20)


@st.composite
def ops_on(draw: st.DrawFn, text: str) -> list[TextOp]:
    ops: list[TextOp] = []
    pos = 0
    while pos < len(text):
        if draw(st.booleans()):
            ops.append(Insert(draw(st.text(alphabet="xyz🚀", min_size=1, max_size=3))))
        k = draw(st.integers(1, len(text) - pos))
        ops.append(Retain(k) if draw(st.booleans()) else Delete(k))
        pos += k
    if draw(st.booleans()):
        ops.append(Insert("q"))
    return normalize(ops)


def run(text: str, ops: list[TextOp]) -> str:
    return apply_ops(text, ops) if ops else text


@settings(max_examples=100, deadline=None)
@given(st.data(), TEXTS)
def test_compose_is_one_then_the_other(data: st.DataObject, text: str) -> None:
    a = data.draw(ops_on(text))
    b = data.draw(ops_on(run(text, a)))
    assert run(text, compose(a, b)) == run(run(text, a), b)
    assert ops_from_json(ops_to_json(a)) == a


def test_ops_that_do_not_fit_are_refused() -> None:
    with pytest.raises(TextOpsError, match="past the end"):
        apply_ops("abc", [Retain(4)])
    with pytest.raises(TextOpsError, match="cover 2 of"):
        apply_ops("abc", [Retain(2)])
    with pytest.raises(TextOpsError, match="delete 0"):
        apply_ops("abc", [Delete(0), Retain(3)])
    with pytest.raises(TextOpsError, match="do not cover"):
        compose([Retain(3)], [Retain(5)])
    with pytest.raises(TextOpsError):
        ops_from_json([{"retain": "3"}])


def _tagged(ops: list[TextOp], tag: str) -> list[TextOp]:
    """The same edit with each insertion a token of its own (`<m0>`, `<m1>`, ...)."""
    out: list[TextOp] = []
    n = 0
    for op in ops:
        if isinstance(op, Insert):
            out.append(Insert(f"<{tag}{n}>"))
            n += 1
        else:
            out.append(op)
    return out


@settings(max_examples=300, deadline=None)
@given(st.data(), TEXTS)
def test_transform_moves_queued_edits_past_the_servers(data: st.DataObject, text: str) -> None:
    """The SDK's local view: its queued operations shown on the server's newer text."""
    mine = _tagged(data.draw(ops_on(text)), "m")
    theirs = _tagged(data.draw(ops_on(text)), "t")
    shown = run(run(text, theirs), transform(mine, theirs))
    tokens = re.findall(r"<[mt]\d+>", shown)
    expected = [op.text for op in mine + theirs if isinstance(op, Insert)]
    assert sorted(tokens) == sorted(expected)  # every insertion of either side, once
    # What is left of the base: the characters neither side deleted, in order.
    assert re.sub(r"<[mt]\d+>", "", shown) == _left(text, mine, theirs)
    assert transform(mine, []) == mine
    assert transform([], theirs) == []


def test_transform_puts_the_servers_insertion_first_at_one_place() -> None:
    shown = run(
        run("ab", [Retain(1), Insert("T"), Retain(1)]),
        transform([Retain(1), Insert("M"), Retain(1)], [Retain(1), Insert("T"), Retain(1)]),
    )
    assert shown == "aTMb"
    # An insertion inside a span the server deleted stays, where the span was.
    shown = run(
        run("abcd", [Delete(4)]), transform([Retain(2), Insert("M"), Retain(2)], [Delete(4)])
    )
    assert shown == "M"


def _left(text: str, *sides: list[TextOp]) -> str:
    keep = [True] * len(text)
    for ops in sides:
        pos = 0
        for op in ops:
            if isinstance(op, Retain):
                pos += op.n
            elif isinstance(op, Delete):
                for k in range(pos, pos + op.n):
                    keep[k] = False
                pos += op.n
    return "".join(ch for ch, k in zip(text, keep, strict=True) if k)
