"""A loud failure at start when protobuf runs on its pure-Python backend (50-190x slower)."""

from __future__ import annotations

from google.protobuf.internal import api_implementation


def require_upb() -> None:
    kind = api_implementation.Type()
    if kind != "upb":
        raise SystemExit(
            f"protobuf is using its {kind!r} backend, not 'upb': install a protobuf wheel "
            "for this platform (and unset PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION)"
        )
