"""Text operations (SPEC §3, §9 ``TextEdit``): retain n / insert s / delete n, in code points.

What lives here: the plain form of one edit of a text (:data:`TextOp`), applying and
checking a list of them, a diff that turns (old text, new text) into them, and their
JSON form (a client's queue, the audit). Shared by the client SDK and the sync service; no
I/O, no protobuf. The three-way merge of concurrent edits is the server's
(``sync_service.rules.textmerge``).

A list of operations walks its text from the start: ``Retain(n)`` keeps the next ``n``
code points, ``Delete(n)`` removes them, ``Insert(s)`` puts ``s`` at the current place. It
must cover the text exactly (retains plus deletes = its length, so a trailing retain is
written out), hold at least one operation, and no count may be 0 nor any insert empty.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

from diff_match_patch import diff_match_patch

__all__ = [
    "Delete",
    "Insert",
    "Retain",
    "TextOp",
    "TextOpsError",
    "apply_ops",
    "check_ops",
    "compose",
    "diff_ops",
    "normalize",
    "ops_from_json",
    "ops_to_json",
    "transform",
]


@dataclass(frozen=True, slots=True)
class Retain:
    n: int


@dataclass(frozen=True, slots=True)
class Insert:
    text: str


@dataclass(frozen=True, slots=True)
class Delete:
    n: int


TextOp: TypeAlias = Retain | Insert | Delete


class TextOpsError(ValueError):
    """Operations that do not describe an edit of the given text (the message says why)."""


def check_ops(length: int, ops: Sequence[TextOp]) -> None:
    """Raise :class:`TextOpsError` unless ``ops`` cover a text of ``length`` code points."""
    if not ops:
        raise TextOpsError("no operations (an edit that changes nothing is not sent)")
    covered = 0
    for i, op in enumerate(ops):
        if isinstance(op, Insert):
            if not op.text:
                raise TextOpsError(f"operation {i}: an empty insert")
            continue
        if op.n <= 0:
            kind = "retain" if isinstance(op, Retain) else "delete"
            raise TextOpsError(f"operation {i}: {kind} {op.n} (counts start at 1)")
        covered += op.n
        if covered > length:
            raise TextOpsError(
                f"operation {i} reaches code point {covered}, past the end of the text "
                f"({length} code points)"
            )
    if covered != length:
        raise TextOpsError(
            f"the operations cover {covered} of the text's {length} code points "
            "(a trailing retain is written out)"
        )


def apply_ops(text: str, ops: Sequence[TextOp]) -> str:
    """``text`` with ``ops`` applied; :class:`TextOpsError` when they do not cover it."""
    check_ops(len(text), ops)
    parts: list[str] = []
    pos = 0
    for op in ops:
        if isinstance(op, Retain):
            parts.append(text[pos : pos + op.n])
            pos += op.n
        elif isinstance(op, Delete):
            pos += op.n
        else:
            parts.append(op.text)
    return "".join(parts)


def normalize(ops: Iterable[TextOp]) -> list[TextOp]:
    """Adjacent operations of one kind joined, empty ones dropped, an insert before a delete
    at the same place (one canonical spelling of each edit)."""
    out: list[TextOp] = []
    for op in ops:
        if isinstance(op, Insert):
            if not op.text:
                continue
            # An insert after a delete is the same edit as before it: keep inserts first.
            at = len(out)
            while at and isinstance(out[at - 1], Delete):
                at -= 1
            if at and isinstance(out[at - 1], Insert):
                prev = out[at - 1]
                assert isinstance(prev, Insert)
                out[at - 1] = Insert(prev.text + op.text)
            else:
                out.insert(at, op)
            continue
        if op.n <= 0:
            continue
        if out and type(out[-1]) is type(op):
            out[-1] = type(op)(out[-1].n + op.n)
        else:
            out.append(op)
    return out


def compose(first: Sequence[TextOp], then: Sequence[TextOp]) -> list[TextOp]:
    """One list doing ``first`` then ``then`` (``then`` covers ``first``'s result); ``[]``
    stands for "no change" on either side. TextOpsError when they do not fit together."""
    if not first:
        return list(then)
    if not then:
        return list(first)
    out: list[TextOp] = []
    a, b = list(first), list(then)
    i = j = 0
    a_left = b_left = 0  # what is left of a[i] / b[j] (counts, or insert length)
    while i < len(a) or j < len(b):
        if i < len(a) and isinstance(a[i], Delete):
            out.append(a[i])
            i += 1
            continue
        if j < len(b) and isinstance(b[j], Insert):
            out.append(b[j])
            j += 1
            continue
        if i >= len(a) or j >= len(b):
            raise TextOpsError("the second operations do not cover the first's result")
        x, y = a[i], b[j]
        xn = (len(x.text) if isinstance(x, Insert) else x.n) - a_left
        yn = y.n - b_left  # type: ignore[union-attr]  # a retain or delete here
        k = min(xn, yn)
        if isinstance(y, Retain):
            if isinstance(x, Insert):
                start = len(x.text) - xn
                out.append(Insert(x.text[start : start + k]))
            else:
                out.append(Retain(k))
        elif not isinstance(x, Insert):  # y deletes what x kept
            out.append(Delete(k))
        # (y deleting what x inserted: nothing of it remains)
        a_left, b_left = a_left + k, b_left + k
        if k == xn:
            i, a_left = i + 1, 0
        if k == yn:
            j, b_left = j + 1, 0
    return normalize(out)


def transform(ops: Sequence[TextOp], over: Sequence[TextOp]) -> list[TextOp]:
    """``ops`` rewritten to apply after ``over``, both edits of one text (``[]``: no
    change): what ``over`` deleted is gone from ``ops`` too, what it inserted is kept,
    and two insertions at one place come ``over``'s first (the server's order: theirs,
    the earlier arrival, first). TextOpsError when they are not edits of one text."""
    if not over:
        return list(ops)
    if not ops:
        return []
    out: list[TextOp] = []
    a, b = list(ops), list(over)
    i = j = 0
    a_used = b_used = 0  # how much of a[i] / b[j] (a retain or delete) is done
    while i < len(a) or j < len(b):
        x = a[i] if i < len(a) else None
        y = b[j] if j < len(b) else None
        if isinstance(y, Insert):
            out.append(Retain(len(y.text)))
            j += 1
            continue
        if isinstance(x, Insert):
            out.append(x)
            i += 1
            continue
        if x is None or y is None:
            raise TextOpsError("the two edits are not of one text")
        k = min(x.n - a_used, y.n - b_used)
        if isinstance(y, Retain):
            out.append(Retain(k) if isinstance(x, Retain) else Delete(k))
        # (over deleted these: nothing of them is left for ops to keep or delete)
        a_used, b_used = a_used + k, b_used + k
        if a_used == x.n:
            i, a_used = i + 1, 0
        if b_used == y.n:
            j, b_used = j + 1, 0
    return normalize(out)


def diff_ops(old: str, new: str, *, timeout: float = 0.1) -> list[TextOp]:
    """Operations that turn ``old`` into ``new``: a character diff (diff-match-patch, with
    its cleanup for human text, so a rewritten word is one replacement), cut short after
    ``timeout`` seconds into a coarser but still exact one. ``[]`` when they are equal.

    A client-side helper: the server applies the operations as sent, so how fine they are
    only decides how closely they merge with others' edits."""
    if old == new:
        return []
    dmp = diff_match_patch()
    dmp.Diff_Timeout = timeout
    diffs = dmp.diff_main(old, new)
    dmp.diff_cleanupSemantic(diffs)
    ops: list[TextOp] = []
    for kind, text in diffs:
        if kind == diff_match_patch.DIFF_EQUAL:
            ops.append(Retain(len(text)))
        elif kind == diff_match_patch.DIFF_INSERT:
            ops.append(Insert(text))
        else:
            ops.append(Delete(len(text)))
    return normalize(ops)


def ops_to_json(ops: Sequence[TextOp]) -> list[Any]:
    """The JSON form: ``{"retain": n}``, ``{"insert": s}``, ``{"delete": n}`` in order."""
    out: list[Any] = []
    for op in ops:
        if isinstance(op, Retain):
            out.append({"retain": op.n})
        elif isinstance(op, Delete):
            out.append({"delete": op.n})
        else:
            out.append({"insert": op.text})
    return out


def ops_from_json(data: Any) -> list[TextOp]:
    """The inverse of :func:`ops_to_json`; :class:`TextOpsError` on anything else."""
    if not isinstance(data, list):
        raise TextOpsError("operations are a JSON list")
    ops: list[TextOp] = []
    for item in data:
        if not isinstance(item, dict) or len(item) != 1:
            raise TextOpsError(f"not an operation: {item!r}")
        ((kind, value),) = item.items()
        if kind == "insert" and isinstance(value, str):
            ops.append(Insert(value))
        elif kind in ("retain", "delete") and type(value) is int:
            ops.append(Retain(value) if kind == "retain" else Delete(value))
        else:
            raise TextOpsError(f"not an operation: {item!r}")
    return ops
