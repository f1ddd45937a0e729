"""Schema-tolerant decoding of a mutation's fields (SPEC §4): pure, no I/O.

A client that was offline through a schema change must not lose its work, so
instead of rejecting a mutation whose fields do not fit the schema we repair
what can be repaired and say so. `decode_fields` maps the fields a client sent
onto the collection's schema (old names, lossless type conversions, values that
cannot fit); `apply_defaults` fills the required fields a new record lacks.
Each repair is a `Repair` with a stable `WarningCode`; the caller returns it as
a `ValidationWarning` and records it in the audit.

The one rule behind every conversion: a value of another type is accepted only
when nothing is lost, i.e. converting the result back gives the value sent
(`"42"` -> 42 -> `"42"`). Anything else is dropped, never guessed at.

Not here: whether a mutation with nothing left is rejected, when a record
counts as created, merging, storage, and the wire form of a value
(`fieldsync.values`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Final

from fieldsync.values import FieldValue, Json, Timestamp, parse_timestamp, type_name
from sync_service.rules.schema import CollectionSpec, FieldSpec, FieldType

__all__ = [
    "INT64_MAX",
    "INT64_MIN",
    "MAX_EXACT_FLOAT_INT",
    "Repair",
    "WarningCode",
    "apply_defaults",
    "decode_fields",
    "zero_value",
]

INT64_MIN: Final = -(2**63)
INT64_MAX: Final = 2**63 - 1
# Every integer up to 2**53 has an exact double; above it some do not, and a
# rule that held for 2**60 but not for 2**53 + 1 would look random to a user.
MAX_EXACT_FLOAT_INT: Final = 2**53


# [0-9], not \d: \d also matches other scripts' digits, which int() accepts.
# No sign on zero, no leading zeros, no '+': the forms str(int) never gives back.
_DECIMAL_INT = re.compile(r"0|-?[1-9][0-9]*")
_CLIP: Final = 60  # characters of a sent value or name quoted in a message


class WarningCode(StrEnum):
    """The repairs decoding makes; the values are the wire's `ValidationWarning.code`."""

    UNKNOWN_FIELD = "UNKNOWN_FIELD"  # not in the schema: ignored
    FIELD_RENAMED = "FIELD_RENAMED"  # sent under an old name (alias): applied to the new one
    DEFAULT_APPLIED = "DEFAULT_APPLIED"  # required, missing on create: default used
    TYPE_COERCED = "TYPE_COERCED"  # another type, converted without loss
    FIELD_DROPPED = "FIELD_DROPPED"  # cannot fit the schema: skipped, the rest applies
    # Not a decoding repair: a resolves_conflict_id naming no conflict of the record.
    CONFLICT_NOT_FOUND = "CONFLICT_NOT_FOUND"


@dataclass(frozen=True, slots=True)
class Repair:
    """One repair made to a mutation's fields.

    `field` is the name the repair is about: as the client sent it for
    UNKNOWN_FIELD, FIELD_RENAMED and a dropped old name; the schema's name
    otherwise. `message` is for people: what was sent and what was done.
    """

    code: WarningCode
    field: str
    message: str


def decode_fields(
    collection: CollectionSpec, fields: Mapping[str, FieldValue]
) -> tuple[dict[str, FieldValue], list[Repair]]:
    """The fields as the schema has them, and the repairs made to get there.

    Repairs come in the order the fields were sent. A field sent under its new
    name and an old name in one mutation keeps the new name's value (the
    client wrote it knowing the new schema); of two old names of one field,
    the first sent wins. Null clears a field, except a required one.
    """
    decoded: dict[str, FieldValue] = {}
    repairs: list[Repair] = []
    renamed_from: dict[str, str] = {}  # field name -> the old name its value came under
    plain = _plain_kinds(collection)
    for sent, value in fields.items():
        kind = plain.get(sent)
        if kind is not None:
            # The common case first: a field sent under its name, of its type.
            t = type(value)
            if t is kind:
                if t is not int or INT64_MIN <= value <= INT64_MAX:  # type: ignore[operator]
                    decoded[sent] = value
                    continue
            elif t is str and type(kind) is frozenset and value in kind:
                decoded[sent] = value  # an enum's value
                continue
        spec = collection.fields.get(sent)
        if spec is None:
            target = collection.aliases.get(sent)
            spec = None if target is None else collection.fields.get(target)
            if spec is None:
                repairs.append(
                    _repair(
                        WarningCode.UNKNOWN_FIELD,
                        sent,
                        f"{_quote(sent)} is not a field of {collection.name}; "
                        f"{_show(value)} was ignored",
                    )
                )
                continue
            if spec.name in fields or spec.name in renamed_from:
                winner = spec.name if spec.name in fields else renamed_from[spec.name]
                repairs.append(
                    _repair(
                        WarningCode.FIELD_DROPPED,
                        sent,
                        f"{_quote(sent)} is an old name of {spec.name}, which this mutation "
                        f"also sets as {_quote(winner)}; the value under {_quote(winner)} wins, "
                        f"{_show(value)} was dropped",
                    )
                )
                continue
            renamed_from[spec.name] = sent
            repairs.append(
                _repair(
                    WarningCode.FIELD_RENAMED,
                    sent,
                    f"{_quote(sent)} is the old name of {spec.name}; "
                    f"the value was applied to {spec.name}",
                )
            )
        outcome = _convert(spec, value)
        if isinstance(outcome, _Cannot):
            repairs.append(
                _repair(
                    WarningCode.FIELD_DROPPED,
                    spec.name,
                    f"{spec.name}: got {_show(value)}, expected {_expected(spec)}: "
                    f"{outcome.why}; the field was skipped",
                )
            )
            continue
        if type(outcome) is not type(value):
            repairs.append(
                _repair(
                    WarningCode.TYPE_COERCED,
                    spec.name,
                    f"{spec.name}: got {_show(value)}, expected {_expected(spec)}: "
                    f"converted to {_show(outcome)}",
                )
            )
        decoded[spec.name] = outcome
    return decoded, repairs


_PLAIN_TYPES: Final[dict[FieldType, type]] = {
    FieldType.STRING: str,
    FieldType.TEXT: str,
    FieldType.INT: int,
    FieldType.FLOAT: float,
    FieldType.BOOL: bool,
    FieldType.TIMESTAMP: Timestamp,
    FieldType.JSON: Json,
}
_plain_kinds_of: dict[int, tuple[CollectionSpec, dict[str, type | frozenset[str]]]] = {}


def _plain_kinds(collection: CollectionSpec) -> dict[str, type | frozenset[str]]:
    """Per field name, the type a value needs no conversion in (an enum: its values).

    Such a value passes unchanged (an int only within int64), so decode_fields
    takes it without the general conversion. Built once per collection spec.
    """
    known = _plain_kinds_of.get(id(collection))
    if known is not None and known[0] is collection:
        return known[1]
    kinds: dict[str, type | frozenset[str]] = {
        name: frozenset(spec.values) if spec.type is FieldType.ENUM else _PLAIN_TYPES[spec.type]
        for name, spec in collection.fields.items()
    }
    if len(_plain_kinds_of) > 1000:  # specs come and go (tests): keep this bounded
        _plain_kinds_of.clear()
    _plain_kinds_of[id(collection)] = (collection, kinds)  # holds it: the id stays its
    return kinds


def apply_defaults(collection: CollectionSpec, fields: dict[str, FieldValue]) -> list[Repair]:
    """Give every required field that `fields` lacks (or has as null) its default.

    For a record being created; the caller decides when that is. The value is
    the schema's `default`, else the type's zero value (`zero_value`).
    Mutates `fields`; returns one DEFAULT_APPLIED repair per field filled, in
    schema order.
    """
    repairs: list[Repair] = []
    for name, spec in collection.fields.items():
        if not spec.required or fields.get(name) is not None:
            continue
        value: FieldValue = spec.default
        source = "the schema default"
        if value is None:
            article = "an" if spec.type in (FieldType.INT, FieldType.ENUM) else "a"
            value, source = zero_value(spec), f"the zero value of {article} {spec.type} field"
        fields[name] = value
        repairs.append(
            _repair(
                WarningCode.DEFAULT_APPLIED,
                name,
                f"{name}: required, and missing when the record was created; "
                f"set to {source}, {_show(value)}",
            )
        )
    return repairs


def zero_value(spec: FieldSpec) -> FieldValue:
    """The value a required field without a schema default starts at."""
    match spec.type:
        case FieldType.STRING | FieldType.TEXT:
            return ""
        case FieldType.INT:
            return 0
        case FieldType.FLOAT:
            return 0.0
        case FieldType.BOOL:
            return False
        case FieldType.ENUM:
            # The schema loader guarantees at least one value.
            return spec.values[0]
        case FieldType.JSON:
            return Json("null")
        case FieldType.TIMESTAMP:
            return Timestamp(0)


# -- conversions ---------------------------------------------------------------
# Each takes a non-null value and returns it in the field's type (the value
# itself when it already is) or _Cannot with the reason, phrased to follow
# "got <value>, expected <type>: ".


@dataclass(frozen=True, slots=True)
class _Cannot:
    why: str


def _convert(spec: FieldSpec, value: FieldValue) -> FieldValue | _Cannot:
    if value is None:
        if spec.required:
            return _Cannot("the field is required, so null cannot clear it")
        return None
    if isinstance(value, bytes):
        return _Cannot("bytes are accepted by no field type")
    match spec.type:
        case FieldType.STRING | FieldType.TEXT:
            return _to_string(value)
        case FieldType.INT:
            return _to_int(value)
        case FieldType.FLOAT:
            return _to_float(value)
        case FieldType.BOOL:
            return _to_bool(value)
        case FieldType.TIMESTAMP:
            return _to_timestamp(value)
        case FieldType.JSON:
            return _to_json(value)
        case FieldType.ENUM:
            return _to_enum(spec, value)


def _no_conversion(value: FieldValue) -> _Cannot:
    return _Cannot(f"there is no lossless conversion from {type_name(value)}")


def _to_string(value: FieldValue) -> FieldValue | _Cannot:
    if type(value) is str:
        return value
    if type(value) is int:
        try:
            return str(value)
        except ValueError:  # beyond sys.get_int_max_str_digits()
            return _Cannot("the number has too many digits")
    # Floats are not turned into text: "0.1" vs "0.10000000000000001" is a
    # formatting choice the client made, not one we should guess.
    return _no_conversion(value)


def _to_int(value: FieldValue) -> FieldValue | _Cannot:
    if type(value) is int:
        return value if INT64_MIN <= value <= INT64_MAX else _Cannot("outside the int64 range")
    if type(value) is float:
        if not math.isfinite(value):
            return _Cannot("not a finite number")
        if not value.is_integer():
            return _Cannot("it has a fractional part")
        n = int(value)
        return n if INT64_MIN <= n <= INT64_MAX else _Cannot("outside the int64 range")
    if type(value) is str:
        if not _DECIMAL_INT.fullmatch(value):
            return _Cannot(
                "not a plain decimal integer (digits, an optional '-', no leading zeros)"
            )
        if len(value) > 20:  # cheaper than int() on a huge string; 20 = len(str(INT64_MIN))
            return _Cannot("outside the int64 range")
        n = int(value)
        return n if INT64_MIN <= n <= INT64_MAX else _Cannot("outside the int64 range")
    return _no_conversion(value)


def _to_float(value: FieldValue) -> FieldValue | _Cannot:
    if type(value) is float:
        return value  # NaN and infinities too: a double may hold them
    if type(value) is int:
        if abs(value) <= MAX_EXACT_FLOAT_INT:
            return float(value)
        return _Cannot("beyond ±2**53, where a float cannot hold every integer")
    if type(value) is str:
        # "3" reads as the integer 3, then as 3.0: both steps are exact and
        # go back ("3.0" -> 3 -> "3"); JavaScript writes 3.0 as "3".
        if _DECIMAL_INT.fullmatch(value):
            if len(value) <= 17 and abs(int(value)) <= MAX_EXACT_FLOAT_INT:
                return float(int(value))
            return _Cannot("beyond ±2**53, where a float cannot hold every integer")
        if len(value) > 32:  # repr() of a float is at most 24 characters
            return _Cannot("not a number written the way a float is written back")
        try:
            f = float(value)
        except ValueError:
            return _Cannot("not a number")
        if not math.isfinite(f):
            # "nan"/"inf" would round-trip, but as text they are far more often a
            # client bug than a deliberate value; a double can carry them.
            return _Cannot("not a finite number")
        if repr(f) != value:
            # "0.10000000000000001", "2.50", "1e3": the float would be written
            # back differently, so something the client wrote would be lost.
            return _Cannot("not a number written the way a float is written back")
        return f
    return _no_conversion(value)


def _to_bool(value: FieldValue) -> FieldValue | _Cannot:
    if type(value) is bool:
        return value
    if type(value) is str:
        if value in ("true", "false"):
            return value == "true"
        return _Cannot("only the strings 'true' and 'false' convert")
    if type(value) is int:
        if value in (0, 1):
            return value == 1
        return _Cannot("only the numbers 0 and 1 convert")
    return _no_conversion(value)


def _to_timestamp(value: FieldValue) -> FieldValue | _Cannot:
    if type(value) is Timestamp:
        return value
    if type(value) is str:
        ts = parse_timestamp(value)
        if ts is None:
            return _Cannot(
                "not an ISO-8601 timestamp with a timezone, such as 2024-05-01T12:00:00Z"
            )
        return ts
    if type(value) in (int, float):
        # Seconds or milliseconds? Guessing the unit wrong moves a date by decades.
        return _Cannot("a number does not say its unit; send a timestamp or ISO-8601 text")
    return _no_conversion(value)


def _to_json(value: FieldValue) -> FieldValue | _Cannot:
    if type(value) is Json:
        return value
    if type(value) is str:
        try:
            json.loads(value, parse_constant=_reject_json_constant)
        except (ValueError, RecursionError):
            return _Cannot("not valid JSON text")
        return Json(value)
    return _no_conversion(value)


def _reject_json_constant(name: str) -> object:
    # json.loads accepts NaN and Infinity, which are not JSON.
    raise ValueError(f"{name} is not JSON")


def _to_enum(spec: FieldSpec, value: FieldValue) -> FieldValue | _Cannot:
    if type(value) is str:
        if value in spec.values:
            return value
        return _Cannot("not one of its values (it may have been removed from the schema)")
    return _no_conversion(value)


# -- messages ------------------------------------------------------------------


def _repair(code: WarningCode, field: str, message: str) -> Repair:
    # A str from Python code may hold lone surrogates; the message goes on the
    # wire as UTF-8, so they are escaped rather than allowed to fail there.
    safe = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return Repair(code, field, safe)


def _expected(spec: FieldSpec) -> str:
    if spec.type is FieldType.ENUM:
        return "one of " + ", ".join(_quote(v) for v in spec.values)
    return _EXPECTED[spec.type]


_EXPECTED: Final = {
    FieldType.STRING: "a string",
    FieldType.TEXT: "text (a string)",
    FieldType.INT: "an int",
    FieldType.FLOAT: "a float",
    FieldType.BOOL: "a bool",
    FieldType.TIMESTAMP: "a timestamp",
    FieldType.JSON: "a json value",
}


def _quote(text: str) -> str:
    clipped = text if len(text) <= _CLIP else text[: _CLIP - 1] + "…"
    return json.dumps(clipped, ensure_ascii=False)


def _show(value: FieldValue) -> str:
    """The value with its type, as a person reads it in a message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool true" if value else "bool false"
    if isinstance(value, int):
        try:
            return f"int {value}"
        except ValueError:  # beyond sys.get_int_max_str_digits()
            return f"an int of {value.bit_length()} bits"
    if isinstance(value, float):
        return f"float {value!r}"
    if isinstance(value, str):
        return f"string {_quote(value)}"
    if isinstance(value, bytes):
        return f"bytes ({len(value)} bytes)"
    if isinstance(value, Json):
        text = value.text
        return "json " + (text if len(text) <= _CLIP else text[: _CLIP - 1] + "…")
    return f"timestamp {_format_nanos(value.nanos)}"


def _format_nanos(nanos: int) -> str:
    seconds, fraction = divmod(nanos, 10**9)
    try:
        dt = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(seconds=seconds)
    except OverflowError:
        return f"{nanos} ns from the epoch"
    frac = f".{fraction:09d}".rstrip("0") if fraction else ""
    return (
        f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d}T"
        f"{dt.hour:02d}:{dt.minute:02d}:{dt.second:02d}{frac}Z"
    )
