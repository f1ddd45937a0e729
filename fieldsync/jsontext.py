"""Compact JSON text, made by the C encoder in one call, and read by the C scanner.

`json.JSONEncoder.encode` builds a new C encoder object on every call, which
costs as much as encoding a small record; the services encode several small
documents per mutation, so they build one encoder here, once, and call it
directly. The text is exactly `json.dumps(o, separators=(",", ":"),
ensure_ascii=False)` (with `default` and `allow_nan` as given).

Reading is the same story the other way: `json.loads` (and
`JSONDecoder.decode`) wrap the C scanner in a whitespace regex and index
checks that cost as much as the scan of a small record, and the services read
one stored document per record they send. `loads` calls the scanner directly
and takes the long way only when the text is not one compact document.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from json import encoder as _encoder
from json import scanner as _scanner
from typing import Any


def make_dumps(
    default: Callable[[Any], Any] | None = None, *, allow_nan: bool = True
) -> Callable[[Any], str]:
    make = getattr(_encoder, "c_make_encoder", None)
    if make is None:  # an interpreter without the C accelerator
        return json.JSONEncoder(
            separators=(",", ":"), ensure_ascii=False, default=default, allow_nan=allow_nan
        ).encode
    fallback = json.JSONEncoder().default
    encode = make(
        None,  # no circular-reference check: our documents are trees
        default or fallback,
        _encoder.encode_basestring,
        None,  # no indent
        ":",
        ",",
        False,  # sort_keys
        False,  # skipkeys
        allow_nan,
    )

    def dumps(o: Any) -> str:
        if isinstance(o, str):  # the C encoder takes containers and scalars, but not a bare str
            return _encoder.encode_basestring(o)
        return "".join(encode(o, 0))

    return dumps


dumps = make_dumps()
"""Compact JSON text of a plain document."""


_decoder = json.JSONDecoder()
# The C scanner where there is one (typeshed has make_scanner take a scanner, not a decoder).
_scan: Callable[[str, int], tuple[Any, int]] = _scanner.make_scanner(_decoder)  # type: ignore[arg-type]


def loads(text: str) -> Any:
    """The document in JSON text: `json.loads(text)` (the same value, and the same
    JSONDecodeError for text that is not JSON)."""
    try:
        value, end = _scan(text, 0)
    except StopIteration:  # not a value at 0 (empty, leading blank, garbage)
        return _decoder.decode(text)
    if end != len(text):  # trailing blanks or garbage: decode accepts or says why
        return _decoder.decode(text)
    return value
