"""Schema-tolerant decoding: every warning code, the coercion table both ways, defaults.

The table tests pin each accepted conversion next to a rejected neighbour, so
a loosened rule fails a test; the Hypothesis property checks the rule behind
the table: a value is kept, converted to the field's type in a way that
converts back to exactly what was sent, or dropped, and decoding never raises.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fieldsync.values import FieldValue, Json, Timestamp, parse_timestamp, same
from sync_service.rules.decode import (
    INT64_MAX,
    INT64_MIN,
    Repair,
    WarningCode,
    apply_defaults,
    decode_fields,
    zero_value,
)
from sync_service.rules.schema import CollectionSpec, FieldSpec, FieldType, Policy, parse_schema

W = WarningCode
TASKS = parse_schema(
    {
        "version": 1,
        "collections": {
            "tasks": {
                "fields": {
                    "title": {"type": "string", "required": True, "default": "untitled"},
                    "status": {
                        "type": "enum",
                        "values": ["todo", "doing", "done"],
                        "required": True,
                        "state": True,
                    },
                    "estimate": {"type": "int", "default": 0},
                    "assignee": {"type": "string", "aliases": ["assigned_to", "owner"]},
                    "notes": {"type": "text"},
                    "seen_at": {"type": "timestamp", "policy": "lww"},
                    "tags": {"type": "json"},
                    "done": {"type": "bool"},
                    "ratio": {"type": "float"},
                }
            }
        },
    },
    source="test",
).collections["tasks"]

# One field of the type, not required, named after it.
ENUM_VALUES = ("todo", "doing", "done")


def one_field(ftype: FieldType, *, required: bool = False) -> CollectionSpec:
    spec = FieldSpec(
        "f",
        ftype,
        Policy.TEXT if ftype is FieldType.TEXT else Policy.MERGE,
        required=required,
        values=ENUM_VALUES if ftype is FieldType.ENUM else (),
    )
    return CollectionSpec("c", {"f": spec})


def decode_one(ftype: FieldType, value: FieldValue) -> tuple[dict[str, FieldValue], list[Repair]]:
    return decode_fields(one_field(ftype), {"f": value})


def codes(repairs: list[Repair]) -> list[tuple[WarningCode, str]]:
    return [(r.code, r.field) for r in repairs]


# -- the codes -----------------------------------------------------------------


def test_values_of_the_right_type_pass_untouched_without_warnings() -> None:
    sent: dict[str, FieldValue] = {
        "title": "Fix the pump",
        "status": "doing",
        "estimate": 3,
        "assignee": "ann",
        "notes": "bring a wrench",
        "seen_at": Timestamp(1),
        "tags": Json("[1]"),
        "done": False,
        "ratio": float("nan"),
    }
    out, repairs = decode_fields(TASKS, sent)
    assert repairs == []
    assert list(out) == list(sent)
    assert all(out[k] is v for k, v in sent.items())


def test_unknown_field_is_ignored() -> None:
    out, repairs = decode_fields(TASKS, {"title": "x", "colour": "red"})
    assert out == {"title": "x"}
    assert codes(repairs) == [(W.UNKNOWN_FIELD, "colour")]
    assert repairs[0].message == '"colour" is not a field of tasks; string "red" was ignored'


def test_an_alias_is_applied_to_the_new_name() -> None:
    out, repairs = decode_fields(TASKS, {"assigned_to": "ann"})
    assert out == {"assignee": "ann"}
    assert codes(repairs) == [(W.FIELD_RENAMED, "assigned_to")]
    assert repairs[0].message == (
        '"assigned_to" is the old name of assignee; the value was applied to assignee'
    )


def test_an_alias_value_is_coerced_like_any_other() -> None:
    out, repairs = decode_fields(TASKS, {"assigned_to": 7})
    assert out == {"assignee": "7"}
    assert codes(repairs) == [(W.FIELD_RENAMED, "assigned_to"), (W.TYPE_COERCED, "assignee")]


@pytest.mark.parametrize(
    "sent",
    [
        {"assigned_to": "old", "assignee": "new"},
        {"assignee": "new", "assigned_to": "old"},
    ],
)
def test_the_new_name_wins_over_an_alias_in_the_same_mutation(sent: dict[str, FieldValue]) -> None:
    out, repairs = decode_fields(TASKS, sent)
    assert out == {"assignee": "new"}
    assert codes(repairs) == [(W.FIELD_DROPPED, "assigned_to")]
    assert repairs[0].message == (
        '"assigned_to" is an old name of assignee, which this mutation also sets as "assignee"; '
        'the value under "assignee" wins, string "old" was dropped'
    )


def test_of_two_aliases_of_one_field_the_first_sent_wins() -> None:
    out, repairs = decode_fields(TASKS, {"owner": "first", "assigned_to": "second"})
    assert out == {"assignee": "first"}
    assert codes(repairs) == [(W.FIELD_RENAMED, "owner"), (W.FIELD_DROPPED, "assigned_to")]
    assert 'the value under "owner" wins' in repairs[1].message


def test_null_clears_an_optional_field() -> None:
    out, repairs = decode_fields(TASKS, {"notes": None, "estimate": None})
    assert out == {"notes": None, "estimate": None}
    assert repairs == []


def test_null_for_a_required_field_is_dropped() -> None:
    out, repairs = decode_fields(TASKS, {"title": None, "notes": "kept"})
    assert out == {"notes": "kept"}
    assert codes(repairs) == [(W.FIELD_DROPPED, "title")]
    assert repairs[0].message == (
        "title: got null, expected a string: the field is required, so null cannot clear it; "
        "the field was skipped"
    )


def test_an_enum_value_no_longer_allowed_is_dropped() -> None:
    out, repairs = decode_fields(TASKS, {"status": "blocked", "title": "t"})
    assert out == {"title": "t"}
    assert codes(repairs) == [(W.FIELD_DROPPED, "status")]
    assert repairs[0].message == (
        'status: got string "blocked", expected one of "todo", "doing", "done": '
        "not one of its values (it may have been removed from the schema); the field was skipped"
    )


@pytest.mark.parametrize("ftype", list(FieldType))
def test_bytes_are_dropped_for_every_type(ftype: FieldType) -> None:
    out, repairs = decode_one(ftype, b"\x00\x01")
    assert out == {}
    assert codes(repairs) == [(W.FIELD_DROPPED, "f")]
    assert "got bytes (2 bytes)" in repairs[0].message
    assert "bytes are accepted by no field type" in repairs[0].message


def test_a_coercion_says_what_was_sent_and_what_it_became() -> None:
    out, repairs = decode_fields(TASKS, {"estimate": "42"})
    assert out == {"estimate": 42}
    assert repairs == [
        Repair(
            W.TYPE_COERCED,
            "estimate",
            'estimate: got string "42", expected an int: converted to int 42',
        )
    ]


def test_a_drop_names_the_value_type_and_the_expected_type() -> None:
    _, repairs = decode_fields(TASKS, {"estimate": 3.5})
    assert repairs == [
        Repair(
            W.FIELD_DROPPED,
            "estimate",
            "estimate: got float 3.5, expected an int: it has a fractional part; "
            "the field was skipped",
        )
    ]


def test_repairs_come_in_the_order_the_fields_were_sent() -> None:
    out, repairs = decode_fields(
        TASKS,
        {"ratio": 1, "zzz": 0, "assigned_to": "a", "status": "gone", "estimate": "5", "aaa": 1},
    )
    assert out == {"ratio": 1.0, "assignee": "a", "estimate": 5}
    assert codes(repairs) == [
        (W.TYPE_COERCED, "ratio"),
        (W.UNKNOWN_FIELD, "zzz"),
        (W.FIELD_RENAMED, "assigned_to"),
        (W.FIELD_DROPPED, "status"),
        (W.TYPE_COERCED, "estimate"),
        (W.UNKNOWN_FIELD, "aaa"),
    ]


def test_messages_clip_long_values_and_survive_lone_surrogates() -> None:
    _, repairs = decode_fields(TASKS, {"x" * 500: "y" * 10_000, "\ud800": 1})
    assert [r.code for r in repairs] == [W.UNKNOWN_FIELD, W.UNKNOWN_FIELD]
    assert len(repairs[0].message) < 200
    assert repairs[1].field == "\ud800"  # the name as sent, for the client to match
    repairs[1].message.encode("utf-8")  # but the message is valid UTF-8


@pytest.mark.parametrize(
    "name", ["UNKNOWN_FIELD", "FIELD_RENAMED", "DEFAULT_APPLIED", "TYPE_COERCED", "FIELD_DROPPED"]
)
def test_warning_codes_are_the_wire_strings(name: str) -> None:
    assert str(WarningCode[name]) == name  # SPEC §4's codes, sent as ValidationWarning.code


# -- the coercion table --------------------------------------------------------

IN, FL, S, TX, B, TS, J, E = (
    FieldType.INT,
    FieldType.FLOAT,
    FieldType.STRING,
    FieldType.TEXT,
    FieldType.BOOL,
    FieldType.TIMESTAMP,
    FieldType.JSON,
    FieldType.ENUM,
)
MAY_1 = 1_714_564_800 * 10**9  # 2024-05-01T12:00:00Z


@pytest.mark.parametrize(
    ("ftype", "sent", "expected"),
    [
        (IN, "42", 42),
        (IN, "-7", -7),
        (IN, "0", 0),
        (IN, "9223372036854775807", INT64_MAX),
        (IN, "-9223372036854775808", INT64_MIN),
        (IN, 3.0, 3),
        (IN, -0.0, 0),
        (IN, float(2**62), 2**62),
        (IN, -(2.0**63), INT64_MIN),
        (FL, 3, 3.0),
        (FL, 2**53, float(2**53)),
        (FL, -(2**53), -float(2**53)),
        (FL, "2.5", 2.5),
        (FL, "0.1", 0.1),
        (FL, "-0.0", -0.0),
        (FL, "1e+16", 1e16),
        (FL, "3", 3.0),
        (FL, "9007199254740992", float(2**53)),
        (S, 42, "42"),
        (S, -5, "-5"),
        (S, 2**70, str(2**70)),
        (TX, 0, "0"),
        (B, "true", True),
        (B, "false", False),
        (B, 1, True),
        (B, 0, False),
        (TS, "2024-05-01T12:00:00Z", Timestamp(MAY_1)),
        (TS, "2024-05-01T14:00:00+02:00", Timestamp(MAY_1)),
        (TS, "2024-05-01T07:30:00-0430", Timestamp(MAY_1)),
        (TS, "2024-05-01 12:00:00z", Timestamp(MAY_1)),
        (TS, "2024-05-01T12:00:00.5Z", Timestamp(MAY_1 + 500_000_000)),
        (TS, "2024-05-01T12:00:00.123456789Z", Timestamp(MAY_1 + 123_456_789)),
        (TS, "1969-12-31T23:59:59.999999999Z", Timestamp(-1)),
        (TS, "0001-01-01T00:00:00Z", Timestamp(-62_135_596_800 * 10**9)),
        (TS, "9999-12-31T23:59:59.999999999Z", Timestamp(253_402_300_799 * 10**9 + 999_999_999)),
        (J, '{"a": [1, 2]}', Json('{"a": [1, 2]}')),
        (J, '"x"', Json('"x"')),
        (J, "42", Json("42")),
        (J, " null ", Json(" null ")),
    ],
)
def test_accepted_coercions(ftype: FieldType, sent: FieldValue, expected: FieldValue) -> None:
    out, repairs = decode_one(ftype, sent)
    assert same(out["f"], expected), out
    assert codes(repairs) == [(W.TYPE_COERCED, "f")]


@pytest.mark.parametrize(
    ("ftype", "sent", "why"),
    [
        (IN, "4.2", "not a plain decimal integer"),
        (IN, "042", "not a plain decimal integer"),
        (IN, "+42", "not a plain decimal integer"),
        (IN, " 42", "not a plain decimal integer"),
        (IN, "-0", "not a plain decimal integer"),
        (IN, "4_2", "not a plain decimal integer"),
        (IN, "\u0664\u0662", "not a plain decimal integer"),  # Arabic-Indic 42: int() takes it
        (IN, "", "not a plain decimal integer"),
        (IN, "1e3", "not a plain decimal integer"),
        (IN, "9223372036854775808", "outside the int64 range"),
        (IN, "-9223372036854775809", "outside the int64 range"),
        (IN, "1" * 5000, "outside the int64 range"),
        (IN, 3.5, "it has a fractional part"),
        (IN, float(2**63), "outside the int64 range"),
        (IN, float("nan"), "not a finite number"),
        (IN, float("inf"), "not a finite number"),
        (IN, True, "no lossless conversion from bool"),
        (IN, Json("42"), "no lossless conversion from json"),
        (IN, Timestamp(0), "no lossless conversion from timestamp"),
        (FL, 2**53 + 1, "beyond ±2**53"),
        (FL, -(2**53) - 1, "beyond ±2**53"),
        (FL, 2**60, "beyond ±2**53"),  # exact as a double, but the rule is the range
        (FL, "9007199254740993", "beyond ±2**53"),
        (FL, "2.50", "not a number written the way a float is written back"),
        (FL, "1e3", "not a number written the way a float is written back"),
        (FL, "0.10000000000000001", "not a number written the way a float is written back"),
        (FL, "+2.5", "not a number written the way a float is written back"),
        (FL, "nan", "not a finite number"),
        (FL, "inf", "not a finite number"),
        (FL, "-inf", "not a finite number"),
        (FL, "1e400", "not a finite number"),
        (FL, "Infinity", "not a finite number"),
        (FL, "abc", "not a number"),
        (FL, False, "no lossless conversion from bool"),
        (S, 4.5, "no lossless conversion from float"),
        (S, True, "no lossless conversion from bool"),
        (S, Json('"x"'), "no lossless conversion from json"),
        (S, Timestamp(0), "no lossless conversion from timestamp"),
        (TX, 1.0, "no lossless conversion from float"),
        (B, "True", "only the strings 'true' and 'false' convert"),
        (B, "1", "only the strings 'true' and 'false' convert"),
        (B, 2, "only the numbers 0 and 1 convert"),
        (B, -1, "only the numbers 0 and 1 convert"),
        (B, 1.0, "no lossless conversion from float"),
        (TS, "2024-05-01T12:00:00", "with a timezone"),
        (TS, "2024-05-01", "with a timezone"),
        (TS, "2024-05-01T12:00Z", "with a timezone"),
        (TS, "2024-05-01T12:00:00.1234567891Z", "with a timezone"),
        (TS, "2024-02-30T00:00:00Z", "with a timezone"),
        (TS, "2024-05-01T24:00:00Z", "with a timezone"),
        (TS, "2016-12-31T23:59:60Z", "with a timezone"),
        (TS, "2024-05-01T12:00:00+24:00", "with a timezone"),
        (TS, "0001-01-01T00:00:00+00:01", "with a timezone"),  # before the wire's minimum
        (TS, "\uff12024-05-01T12:00:00Z", "with a timezone"),
        (TS, 1_714_564_800, "does not say its unit"),
        (TS, 1.7e9, "does not say its unit"),
        (J, "hello", "not valid JSON text"),
        (J, "NaN", "not valid JSON text"),
        (J, "[Infinity]", "not valid JSON text"),
        (J, "{'a': 1}", "not valid JSON text"),
        (J, "[" * 100_000, "not valid JSON text"),  # too deep for the parser
        (J, 42, "no lossless conversion from int"),
        (E, "Todo", "not one of its values"),
        (E, 1, "no lossless conversion from int"),
        (E, True, "no lossless conversion from bool"),
    ],
)
def test_rejected_neighbours(ftype: FieldType, sent: FieldValue, why: str) -> None:
    out, repairs = decode_one(ftype, sent)
    assert out == {}
    assert codes(repairs) == [(W.FIELD_DROPPED, "f")]
    assert why in repairs[0].message
    assert repairs[0].message.startswith("f: got ")
    assert repairs[0].message.endswith("; the field was skipped")


def test_special_floats_pass_a_float_field_untouched() -> None:
    for value in (float("nan"), float("inf"), float("-inf"), -0.0, 5e-324):
        out, repairs = decode_one(FL, value)
        assert out["f"] is value and repairs == []


@pytest.mark.parametrize(
    ("value", "kept"),
    [(INT64_MAX, True), (INT64_MIN, True), (INT64_MAX + 1, False), (INT64_MIN - 1, False)],
)
def test_int_fields_hold_int64(value: int, kept: bool) -> None:
    out, repairs = decode_one(IN, value)
    if kept:
        assert out == {"f": value} and repairs == []
    else:
        assert out == {}
        assert codes(repairs) == [(W.FIELD_DROPPED, "f")]
        assert "outside the int64 range" in repairs[0].message


@pytest.mark.parametrize(
    ("text", "nanos"),
    [
        ("1970-01-01T00:00:00Z", 0),
        ("1970-01-01T00:00:00.000000001Z", 1),
        ("1970-01-01T01:00:00+01:00", 0),
        ("1970-01-01T00:00:00-00:00", 0),
        ("2000-02-29T00:00:00Z", 951_782_400 * 10**9),
        ("2001-02-29T00:00:00Z", None),
        ("1970-01-01T00:00:00", None),
        ("1970-01-01T00:00:00+1:00", None),
        ("1970-01-01T00:00:00+01:60", None),
        ("1970-01-01T00:00:00.Z", None),
        ("1970-01-01T00:00:00Z ", None),
        ("1970-01-01T00:00:00Z\n", None),
        ("0000-01-01T00:00:00Z", None),
        ("9999-12-31T23:59:59-00:01", None),  # after the wire's maximum
    ],
)
def test_parse_timestamp(text: str, nanos: int | None) -> None:
    assert parse_timestamp(text) == (None if nanos is None else Timestamp(nanos))


# -- defaults ------------------------------------------------------------------


def test_apply_defaults_fills_missing_required_fields_in_schema_order() -> None:
    fields: dict[str, FieldValue] = {"estimate": 2}
    repairs = apply_defaults(TASKS, fields)
    assert fields == {"estimate": 2, "title": "untitled", "status": "todo"}
    assert repairs == [
        Repair(
            W.DEFAULT_APPLIED,
            "title",
            "title: required, and missing when the record was created; "
            'set to the schema default, string "untitled"',
        ),
        Repair(
            W.DEFAULT_APPLIED,
            "status",
            "status: required, and missing when the record was created; "
            'set to the zero value of an enum field, string "todo"',
        ),
    ]


def test_apply_defaults_leaves_present_values_and_optional_fields_alone() -> None:
    fields: dict[str, FieldValue] = {"title": "", "status": "done"}
    assert apply_defaults(TASKS, fields) == []
    assert fields == {"title": "", "status": "done"}  # "" is a value, not a missing one


def test_apply_defaults_treats_a_null_required_field_as_missing() -> None:
    fields: dict[str, FieldValue] = {"title": None, "status": "done"}
    repairs = apply_defaults(TASKS, fields)
    assert fields == {"title": "untitled", "status": "done"}
    assert codes(repairs) == [(W.DEFAULT_APPLIED, "title")]


def test_decode_then_defaults_repairs_a_create_with_a_null_title() -> None:
    out, repairs = decode_fields(TASKS, {"title": None, "status": "done"})
    repairs += apply_defaults(TASKS, out)
    assert out == {"status": "done", "title": "untitled"}
    assert codes(repairs) == [(W.FIELD_DROPPED, "title"), (W.DEFAULT_APPLIED, "title")]


@pytest.mark.parametrize(
    ("ftype", "zero"),
    [
        (FieldType.STRING, ""),
        (FieldType.TEXT, ""),
        (FieldType.INT, 0),
        (FieldType.FLOAT, 0.0),
        (FieldType.BOOL, False),
        (FieldType.ENUM, "todo"),
        (FieldType.JSON, Json("null")),
        (FieldType.TIMESTAMP, Timestamp(0)),
    ],
)
def test_zero_values(ftype: FieldType, zero: FieldValue) -> None:
    spec = one_field(ftype, required=True)
    assert same(zero_value(spec.fields["f"]), zero)
    fields: dict[str, FieldValue] = {}
    repairs = apply_defaults(spec, fields)
    assert same(fields["f"], zero)
    assert codes(repairs) == [(W.DEFAULT_APPLIED, "f")]
    article = "an" if ftype in (FieldType.INT, FieldType.ENUM) else "a"
    assert f"the zero value of {article} {ftype} field" in repairs[0].message


# -- the property --------------------------------------------------------------

_offsets = st.integers(min_value=-(23 * 60 + 59), max_value=23 * 60 + 59).map(
    lambda m: timezone(timedelta(minutes=m))
)
_iso_texts = st.builds(
    lambda dt, tz, sep, fmt: _iso(dt.replace(tzinfo=tz), sep, fmt),
    st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)),
    _offsets,
    st.sampled_from(["T", " "]),
    st.sampled_from(["+hh:mm", "Z", "+hhmm", "none"]),
)
_json_data = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)
# Text a parser might take: numbers, the bool words, enum values, ISO times, JSON.
_suggestive_text = st.one_of(
    st.integers().map(str),
    st.integers(min_value=-(2**64), max_value=2**64).map(str),
    st.floats().map(repr),
    st.floats().map(str),
    st.sampled_from(
        ["true", "false", "True", "1", "0", "-0", "todo", "Todo", "nan", "inf", "1e3", "2.50"]
    ),
    _iso_texts,
    _json_data.map(json.dumps),
)
_values: st.SearchStrategy[FieldValue] = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=INT64_MIN - 2, max_value=INT64_MAX + 2),
    st.sampled_from([2**53, 2**53 + 1, -(2**53), INT64_MAX, INT64_MIN, 0, 1, 2, -1]),
    st.floats(),
    st.sampled_from([0.0, -0.0, 1.0, 3.5, float(2**63), 2.0**53, float("nan"), float("inf")]),
    st.text(),
    _suggestive_text,
    st.binary(max_size=4),
    st.builds(Json, st.text() | _json_data.map(json.dumps)),
    st.builds(Timestamp, st.integers(min_value=-(2**70), max_value=2**70)),
)


def _iso(dt: datetime, sep: str, fmt: str) -> str:
    text = dt.isoformat(sep=sep)
    if fmt == "Z" and text.endswith("+00:00"):
        return text[:-6] + "Z"
    if fmt == "+hhmm":
        return text[:-3] + text[-2:]
    if fmt == "none":
        return text[:-6]
    return text


def _has_type(ftype: FieldType, value: FieldValue) -> bool:
    match ftype:
        case FieldType.STRING | FieldType.TEXT:
            return type(value) is str
        case FieldType.ENUM:
            return type(value) is str and value in ENUM_VALUES
        case FieldType.INT:
            return type(value) is int and INT64_MIN <= value <= INT64_MAX
        case FieldType.FLOAT:
            return type(value) is float
        case FieldType.BOOL:
            return type(value) is bool
        case FieldType.TIMESTAMP:
            return type(value) is Timestamp
        case FieldType.JSON:
            return type(value) is Json


def _iso_nanos(text: str) -> int:
    """The instant `text` names, by datetime's parser (an oracle independent of decode)."""
    dt = datetime.fromisoformat(text.replace("z", "Z"))
    assert dt.tzinfo is not None, "accepted a timestamp without a timezone"
    whole = dt.replace(microsecond=0) - datetime(1970, 1, 1, tzinfo=UTC)
    fraction = re.search(r"\.([0-9]+)", text)
    digits = (fraction.group(1) if fraction else "").ljust(9, "0")
    assert len(digits) == 9, "accepted more fraction digits than a Timestamp holds"
    return (whole.days * 86_400 + whole.seconds) * 10**9 + int(digits)


def _converts_back(result: FieldValue, sent: FieldValue) -> bool:
    """Whether converting `result` back to the type of `sent` gives exactly `sent`."""
    if type(sent) is str:
        if type(result) is int:
            return str(result) == sent
        if type(result) is float:
            return repr(result) == sent or (result.is_integer() and str(int(result)) == sent)
        if type(result) is bool:
            return ("true" if result else "false") == sent
        if type(result) is Timestamp:
            return _iso_nanos(sent) == result.nanos
        if type(result) is Json:
            json.loads(result.text)  # raises if not JSON
            return result.text == sent
    if type(sent) is int:
        if type(result) is float:
            return result.is_integer() and int(result) == sent
        if type(result) is str:
            return int(result) == sent
        if type(result) is bool:
            return int(result) == sent
    if type(sent) is float and type(result) is int:
        return same(float(result), sent) or float(result) == sent == 0.0  # -0.0 -> 0
    return False


@settings(max_examples=600, deadline=None)
@given(ftype=st.sampled_from(list(FieldType)), required=st.booleans(), value=_values)
def test_decode_keeps_converts_losslessly_or_drops(
    ftype: FieldType, required: bool, value: FieldValue
) -> None:
    collection = one_field(ftype, required=required)
    out, repairs = decode_fields(collection, {"f": value})
    kinds = [r.code for r in repairs]
    if "f" not in out:
        assert kinds == [W.FIELD_DROPPED]
        return
    result = out["f"]
    if kinds == []:
        assert result is value
        assert (value is None and not required) or _has_type(ftype, value)
    else:
        assert kinds == [W.TYPE_COERCED]
        assert _has_type(ftype, result), (ftype, result)
        assert _converts_back(result, value), (ftype, value, result)
    # What decoding gives is what the schema has: decoding it again changes nothing.
    again, more = decode_fields(collection, out)
    assert more == []
    assert again["f"] is result


@settings(max_examples=200, deadline=None)
@given(
    fields=st.dictionaries(
        st.sampled_from([*TASKS.fields, *TASKS.aliases, "unknown", "_id"]), _values, max_size=6
    )
)
def test_decode_never_raises_and_every_sent_name_is_accounted_for(
    fields: dict[str, FieldValue],
) -> None:
    out, repairs = decode_fields(TASKS, fields)
    assert set(out) <= set(TASKS.fields)
    for name in fields:
        # Every name sent is either decoded untouched, or named by a repair.
        named = {r.field for r in repairs}
        target = TASKS.aliases.get(name, name)
        assert name in named or target in named or out.get(target) is fields[name]
    assert all(isinstance(r.message, str) and r.message for r in repairs)
