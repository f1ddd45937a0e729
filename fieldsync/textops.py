"""Text operations (SPEC §3, §9 ``TextEdit``): retain n / insert s / delete n, in code points.

What lives here: the plain form of one edit of a text (:data:`TextOp`), applying and
checking a list of them, a linear diff that turns (old text, new text) into them, and their
JSON form (a client's queue, the audit). Shared by the client SDK and the sync service; no
I/O, no protobuf. The three-way merge of concurrent edits is the server's
(``sync_service.textmerge``).

A list of operations walks its text from the start: ``Retain(n)`` keeps the next ``n``
code points, ``Delete(n)`` removes them, ``Insert(s)`` puts ``s`` at the current place. It
must cover the text exactly (retains plus deletes = its length, so a trailing retain is
written out), hold at least one operation, and no count may be 0 nor any insert empty.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

__all__ = [
    "Delete",
    "Insert",
    "Retain",
    "TextOp",
    "TextOpsError",
    "apply_ops",
    "check_ops",
    "diff_ops",
    "normalize",
    "ops_from_json",
    "ops_to_json",
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


def diff_ops(old: str, new: str) -> list[TextOp]:
    """Operations that turn ``old`` into ``new``: the common prefix and suffix kept, the
    middle replaced. Linear time; exact for one typed or pasted change (what an editor
    reports between two keystrokes), coarse for many scattered ones (still correct).
    ``[]`` when the texts are equal."""
    if old == new:
        return []
    n = min(len(old), len(new))
    lo = 0
    while lo < n and old[lo] == new[lo]:
        lo += 1
    hi = 0
    while hi < n - lo and old[len(old) - 1 - hi] == new[len(new) - 1 - hi]:
        hi += 1
    ops: list[TextOp] = []
    if lo:
        ops.append(Retain(lo))
    if len(new) - hi > lo:
        ops.append(Insert(new[lo : len(new) - hi]))
    if len(old) - hi > lo:
        ops.append(Delete(len(old) - hi - lo))
    if hi:
        ops.append(Retain(hi))
    return ops


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
