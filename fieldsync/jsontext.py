"""Compact JSON text, made by the C encoder in one call.

`json.JSONEncoder.encode` builds a new C encoder object on every call, which
costs as much as encoding a small record; the services encode several small
documents per mutation, so they build one encoder here, once, and call it
directly. The text is exactly `json.dumps(o, separators=(",", ":"),
ensure_ascii=False)` (with `default` and `allow_nan` as given).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from json import encoder as _encoder
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
