"""Field values through their two encodings (fieldsync.values) and compact JSON (jsontext).

The fast paths (one C encoder call for stored JSON, no per-value walk when no
value is tagged, inline wire conversion of the common kinds) must give
exactly what the plain definitions give, for every kind of value.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fieldsync.jsontext import dumps, loads, make_dumps
from fieldsync.v1 import common_pb2
from fieldsync.values import (
    FieldValue,
    Json,
    Timestamp,
    decode_fields,
    dumps_fields,
    encode_fields,
    fields_from_proto,
    fields_to_proto,
    loads_fields,
)

VALUES: st.SearchStrategy[FieldValue] = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(),
    st.sampled_from(["$t", '{"$t": 1}', "$", '"$', "\\", "\x00", "é", "🚀"]),
    st.binary(max_size=20),
    st.text(max_size=20).map(lambda t: Json(json.dumps(t))),
    st.integers(-(2**63), 2**63 - 1).map(Timestamp),
)
FIELDS = st.dictionaries(st.text(min_size=1, max_size=12), VALUES, max_size=8)
PROPERTY = settings(max_examples=400, deadline=None)


def identical(a: FieldValue, b: FieldValue) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a):
            return math.isnan(b)
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    return a == b


def assert_identical(got: dict[str, FieldValue], want: dict[str, FieldValue]) -> None:
    assert list(got) == list(want)
    assert all(identical(got[k], want[k]) for k in want), (got, want)


def plain_dumps(o: Any) -> str:
    return json.dumps(o, separators=(",", ":"), ensure_ascii=False)


@PROPERTY
@given(FIELDS)
def test_stored_text_is_the_json_of_the_encoded_fields(fields: dict[str, FieldValue]) -> None:
    assert dumps_fields(fields) == plain_dumps(encode_fields(fields))


@PROPERTY
@given(FIELDS)
def test_stored_text_reads_back_identically(fields: dict[str, FieldValue]) -> None:
    text = dumps_fields(fields)
    assert_identical(loads_fields(text), fields)
    assert_identical(loads_fields(text), decode_fields(json.loads(text)))


@PROPERTY
@given(FIELDS)
def test_the_wire_form_reads_back_identically(fields: dict[str, FieldValue]) -> None:
    record = common_pb2.Record()
    fields_to_proto(fields, record.fields)
    parsed = common_pb2.Record.FromString(record.SerializeToString())
    got = fields_from_proto(parsed.fields)
    assert_identical(dict(sorted(got.items())), dict(sorted(fields.items())))


JSON_DOCS = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@PROPERTY
@given(JSON_DOCS)
def test_compact_json_is_exactly_json_dumps(doc: Any) -> None:
    assert dumps(doc) == plain_dumps(doc)


@PROPERTY
@given(JSON_DOCS, st.sampled_from([None, 1, 2]))
def test_reading_json_is_exactly_json_loads(doc: Any, indent: int | None) -> None:
    compact = dumps(doc)
    assert loads(compact) == json.loads(compact)
    spaced = " " + json.dumps(doc, indent=indent) + "\n"  # blanks the fast path does not take
    assert loads(spaced) == json.loads(spaced)


@pytest.mark.parametrize(
    "text", ["", " ", "{", '{"a":1}x', '{"a":1} {}', "nope", '{"a":NaNx}', "[1,]"]
)
def test_text_that_is_not_json_fails_as_json_loads_does(text: str) -> None:
    with pytest.raises(json.JSONDecodeError) as expected:
        json.loads(text)
    with pytest.raises(json.JSONDecodeError) as got:
        loads(text)
    assert (got.value.msg, got.value.pos) == (expected.value.msg, expected.value.pos)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_strict_encoder_refuses_numbers_json_cannot_hold(bad: float) -> None:
    with pytest.raises(ValueError):
        make_dumps(allow_nan=False)({"x": bad})


def test_an_object_json_has_no_form_of_is_refused() -> None:
    with pytest.raises(TypeError, match="not JSON serializable"):
        dumps({"x": object()})
