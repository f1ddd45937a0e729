"""Field values: the plain Python form the domain works in, and its two encodings.

A value is one of: None (null), bool, int, float, str, bytes, `Json` (a JSON
document kept as its text) or `Timestamp` (nanoseconds since the epoch, so no
precision a client sent is lost). `to_proto`/`from_proto` convert to and from
the wire `Value`; `encode`/`decode` to and from the JSON form stored in the
database. `same` is the equality every merge decision uses: it never calls
True equal to 1, and two NaNs are the same value.

Nothing here knows about schemas or coercion (see sync_service.rules.decode).
"""

from __future__ import annotations

import base64
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any, Final, TypeAlias

from fieldsync.jsontext import dumps, loads, make_dumps
from fieldsync.v1 import common_pb2


@dataclass(frozen=True, slots=True)
class Json:
    """A JSON document, kept as the text the client sent."""

    text: str


@dataclass(frozen=True, slots=True, order=True)
class Timestamp:
    """An instant, in nanoseconds since the Unix epoch (UTC)."""

    nanos: int

    @classmethod
    def from_datetime(cls, dt: datetime) -> Timestamp:
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=UTC)
        delta = dt - datetime(1970, 1, 1, tzinfo=UTC)
        seconds = delta.days * 86_400 + delta.seconds
        return cls(seconds * 1_000_000_000 + delta.microseconds * 1000)

    def to_datetime(self) -> datetime:
        return datetime.fromtimestamp(self.nanos // 1_000_000_000, tz=UTC).replace(
            microsecond=(self.nanos % 1_000_000_000) // 1000
        )

    def isoformat(self) -> str:
        return self.to_datetime().isoformat().replace("+00:00", "Z")


# google.protobuf.Timestamp's range: a value outside it could not be sent back.
_MIN_TIMESTAMP_NANOS: Final = -62_135_596_800 * 10**9  # 0001-01-01T00:00:00Z
_MAX_TIMESTAMP_NANOS: Final = 253_402_300_799 * 10**9 + 999_999_999  # 9999-12-31T23:59:59.9…Z
# RFC 3339 (plus "+hhmm", which strftime's %z writes). The fraction stops at
# 9 digits because a Timestamp holds nanoseconds: a tenth digit would be lost.
_ISO_TIMESTAMP = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt ]([0-9]{2}):([0-9]{2}):([0-9]{2})"
    r"(?:\.([0-9]{1,9}))?"
    r"(?:[Zz]|([+-])([0-9]{2}):?([0-9]{2}))"
)
_EPOCH_ORDINAL: Final = date(1970, 1, 1).toordinal()


def parse_timestamp(text: str) -> Timestamp | None:
    """The instant an RFC 3339 timestamp names, or None if `text` is not one.

    A timezone (`Z` or an offset) is required: a local time names no instant.
    Up to 9 fraction digits are kept exactly; the offset is not kept (the
    instant is what the field holds). Used for timestamp fields
    (sync_service.rules.decode) and the schema file's defaults.
    """
    m = _ISO_TIMESTAMP.fullmatch(text)
    if m is None:
        return None
    year, month, day, hour, minute, second = (int(g) for g in m.group(1, 2, 3, 4, 5, 6))
    fraction, sign, off_hours, off_minutes = m.group(7, 8, 9, 10)
    if hour > 23 or minute > 59 or second > 59:  # no leap seconds: a Timestamp has none
        return None
    try:
        days = date(year, month, day).toordinal() - _EPOCH_ORDINAL
    except ValueError:
        return None
    offset = 0
    if sign is not None:
        if int(off_hours) > 23 or int(off_minutes) > 59:
            return None
        offset = (int(off_hours) * 3600 + int(off_minutes) * 60) * (1 if sign == "+" else -1)
    seconds = days * 86_400 + hour * 3600 + minute * 60 + second - offset
    nanos = seconds * 10**9 + (int(fraction.ljust(9, "0")) if fraction else 0)
    if not _MIN_TIMESTAMP_NANOS <= nanos <= _MAX_TIMESTAMP_NANOS:
        return None
    return Timestamp(nanos)


FieldValue: TypeAlias = bool | int | float | str | bytes | Json | Timestamp | None
Fields: TypeAlias = dict[str, FieldValue]


def same(a: FieldValue, b: FieldValue) -> bool:
    """Whether two values are the same value (type included)."""
    if type(a) is not type(b):
        return False
    if a == b:
        return True
    return isinstance(a, float) and math.isnan(a) and math.isnan(b)  # type: ignore[arg-type]


def type_name(v: FieldValue) -> str:
    """The value's kind as a user reads it in a message."""
    if v is None:
        return "null"
    return {
        bool: "bool",
        int: "int",
        float: "float",
        str: "string",
        bytes: "bytes",
        Json: "json",
        Timestamp: "timestamp",
    }[type(v)]


# -- wire --------------------------------------------------------------------


def to_proto(v: FieldValue, out: common_pb2.Value | None = None) -> common_pb2.Value:
    pv = common_pb2.Value() if out is None else out
    if v is None:
        return pv
    t = type(v)
    if t is str:
        pv.string_value = v  # type: ignore[assignment]
    elif t is bool:
        pv.bool_value = v  # type: ignore[assignment]
    elif t is int:
        pv.int_value = v  # type: ignore[assignment]
    elif t is float:
        pv.double_value = v  # type: ignore[assignment]
    elif t is Timestamp:
        nanos = v.nanos  # type: ignore[union-attr]
        pv.timestamp_value.seconds = nanos // 1_000_000_000
        pv.timestamp_value.nanos = nanos % 1_000_000_000
    elif t is Json:
        pv.json_value = v.text  # type: ignore[union-attr]
    elif t is bytes:
        pv.bytes_value = v  # type: ignore[assignment]
    else:  # pragma: no cover - the type alias is closed
        raise TypeError(f"not a field value: {v!r}")
    return pv


def from_proto(pv: common_pb2.Value) -> FieldValue:
    kind = pv.WhichOneof("kind")
    if kind is None:
        return None
    if kind == "string_value":
        return pv.string_value
    if kind == "int_value":
        return pv.int_value
    if kind == "double_value":
        return pv.double_value
    if kind == "bool_value":
        return pv.bool_value
    if kind == "timestamp_value":
        return Timestamp(pv.timestamp_value.seconds * 1_000_000_000 + pv.timestamp_value.nanos)
    if kind == "json_value":
        return Json(pv.json_value)
    return pv.bytes_value


def fields_to_proto(fields: Fields, out: Any) -> None:
    """Fill a protobuf map<string, Value> from plain fields."""
    for name, v in fields.items():
        t = type(v)  # the common kinds inline: this runs for every field of every result
        if t is str:
            out[name].string_value = v
        elif t is int:
            out[name].int_value = v
        else:
            to_proto(v, out[name])


def fields_from_proto(pmap: Any) -> Fields:
    # Keys, then lookups: the map's items() is the Python Mapping mixin, slower.
    return {name: _from_proto(pmap[name]) for name in pmap}


def _from_proto(pv: common_pb2.Value) -> FieldValue:
    kind = pv.WhichOneof("kind")
    if kind == "string_value":
        return pv.string_value
    if kind == "int_value":
        return pv.int_value
    return from_proto(pv)


# -- storage -----------------------------------------------------------------
# JSON scalars stand for themselves; the other kinds are one-key objects.


def encode(v: FieldValue) -> Any:
    t = type(v)
    if v is None or t is str or t is bool or t is int:
        return v
    if t is float:
        f: float = v  # type: ignore[assignment]
        return f if math.isfinite(f) else {"$f": repr(f)}
    if t is Timestamp:
        return {"$t": v.nanos}  # type: ignore[union-attr]
    if t is Json:
        return {"$j": v.text}  # type: ignore[union-attr]
    if t is bytes:
        return {"$b": base64.b64encode(v).decode("ascii")}  # type: ignore[arg-type]
    raise TypeError(f"not a field value: {v!r}")


def decode(j: Any) -> FieldValue:
    if isinstance(j, dict):
        ((tag, payload),) = j.items()
        if tag == "$t":
            return Timestamp(int(payload))
        if tag == "$j":
            return Json(str(payload))
        if tag == "$b":
            return base64.b64decode(payload)
        if tag == "$f":
            return float(payload)
        raise ValueError(f"unknown stored value tag {tag!r}")
    if isinstance(j, (str, bool, int, float)) or j is None:
        return j
    raise ValueError(f"not a stored value: {j!r}")


def encode_fields(fields: Mapping[str, FieldValue]) -> dict[str, Any]:
    return {k: encode(v) for k, v in fields.items()}


def decode_fields(j: dict[str, Any]) -> Fields:
    return {k: decode(v) for k, v in j.items()}


def _tagged(v: Any) -> Any:
    """JSON's fallback for the kinds it has no form of (the encoder calls it)."""
    t = type(v)
    if t is Timestamp or t is Json or t is bytes:
        return encode(v)
    raise TypeError(f"not a field value: {v!r}")


# Floats that are not finite raise instead of writing NaN (not JSON): dumps_fields
# then takes the long way, which tags them.
_dumps_plain = make_dumps(_tagged, allow_nan=False)


def dumps_fields(fields: Mapping[str, FieldValue]) -> str:
    """The stored JSON text of fields: the same text as JSON of encode_fields, made
    in one call of the C encoder for all but non-finite floats."""
    try:
        return _dumps_plain(fields)
    except ValueError:
        return dumps(encode_fields(fields))


def loads_fields(text: str) -> Fields:
    """Fields from their stored JSON text (encode_fields, then JSON).

    Every tagged value is an object whose key starts with `$`, so its text holds
    `"$`; most records hold none (plain strings, numbers, booleans), and their
    parsed JSON is already the fields. (A `"$` inside a string only sends that
    text the long way.)
    """
    j = loads(text)
    if '"$' not in text:
        return j  # type: ignore[no-any-return]
    return decode_fields(j)


def to_display(v: FieldValue) -> Any:
    """A JSON-friendly form for people (CLI output, log lines)."""
    if isinstance(v, Timestamp):
        return v.isoformat()
    if isinstance(v, Json):
        return v.text
    if isinstance(v, bytes):
        return base64.b64encode(v).decode("ascii")
    return v
