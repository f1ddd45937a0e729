"""Text operations (fieldsync.textops): applying, checking, composing, their JSON form."""

from __future__ import annotations

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
