"""How an answer to a conflict becomes a queued mutation. A pure function of the conflict.

The answer is an ordinary mutation on the conflict's `server_version` that
names the conflict in `resolves_conflict_id` (SPEC §3), so it is queued like
any write and works offline. What each choice writes:

    kind            keep_theirs                    take_yours
    FIELDS          PATCH theirs' values           PATCH yours' values
    CREATE_CREATE   PATCH theirs' values           PATCH yours' values
    DELETE_UPDATE   PATCH theirs' values           DELETE (yours was a delete)
    UPDATE_DELETE   DELETE (theirs was a delete)   PATCH yours' values (revives it)

`values={...}` is a PATCH of those values, whatever the kind. Keeping theirs
writes the values the server already holds, so it changes nothing there and
only closes the conflict; an UPDATE_DELETE is kept by a DELETE because any
PATCH, even of no fields, would bring the deleted record back.
"""

from __future__ import annotations

from collections.abc import Mapping

from fieldsync.values import Fields, FieldValue

from ._types import Conflict, Op

__all__ = ["answer"]


def answer(
    conflict: Conflict,
    *,
    keep_theirs: bool = False,
    take_yours: bool = False,
    values: Mapping[str, FieldValue] | None = None,
) -> tuple[Op, Fields]:
    """The op and fields that answer `conflict` as chosen (exactly one choice)."""
    if sum((keep_theirs, take_yours, values is not None)) != 1:
        raise ValueError("choose exactly one of keep_theirs=True, take_yours=True or values={...}")
    if values is not None:
        return "PATCH", dict(values)
    theirs: Fields = {f.field: f.theirs for f in conflict.fields}
    yours: Fields = {f.field: f.yours for f in conflict.fields}
    if conflict.kind == "UPDATE_DELETE":
        return ("DELETE", {}) if keep_theirs else ("PATCH", yours)
    if conflict.kind == "DELETE_UPDATE":
        return ("PATCH", theirs) if keep_theirs else ("DELETE", {})
    return "PATCH", theirs if keep_theirs else yours
