"""What both storage engines can hold: one rule set, checked before any transaction.

SQLite stores any text in any column; PostgreSQL refuses a NUL character in
text and a value longer than its VARCHAR. A value only one engine refuses
used to fail a whole batch on PostgreSQL, on every resend, so the queue never
moved. So every identifier a mutation carries is checked here, with the
stricter engine's limits, when the wire message is read: a mutation that
breaks them is REJECTED (INVALID_MUTATION) and consumes its sequence, on both
engines alike. `storable` gives the form of a bad value that can still be
written (a rejected mutation's stored result, an audit event).

Pure: no I/O, no storage.
"""

from __future__ import annotations

from typing import Final

MAX_ID_LENGTH: Final = 200
"""mutation_id, client_id, collection (VARCHAR(200))."""
MAX_RECORD_ID_LENGTH: Final = 500
MAX_CONFLICT_ID_LENGTH: Final = 64

MARKER: Final = "…"


def problem(value: str, most: int, *, required: bool = True) -> str | None:
    """What is wrong with `value` as an identifier of at most `most` characters."""
    if not value:
        return "required" if required else None
    if len(value) > most:
        return f"at most {most} characters (got {len(value)})"
    if "\x00" in value:
        return "must not contain NUL characters"
    return None


def storable(value: str, most: int) -> str:
    """`value` as both engines can store it in a column of `most` characters: NUL
    characters shown as U+FFFD, and a longer value cut with a marker."""
    if "\x00" in value:
        value = value.replace("\x00", "\ufffd")
    if len(value) > most:
        value = value[: most - len(MARKER)] + MARKER
    return value


def mutation_problem(mutation_id: str, collection: str, record_id: str) -> tuple[str, str] | None:
    """(field, what is wrong) for the first identifier of a mutation that breaks the
    rules, or None. (A `resolves_conflict_id` that breaks them names no conflict:
    a warning, as for any unknown id; see `problem`.)"""
    for name, value, most, required in (
        ("mutation_id", mutation_id, MAX_ID_LENGTH, True),
        ("record_id", record_id, MAX_RECORD_ID_LENGTH, True),
        ("collection", collection, MAX_ID_LENGTH, False),
    ):
        wrong = problem(value, most, required=required)
        if wrong is not None:
            return name, wrong
    return None
