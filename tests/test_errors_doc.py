"""docs/errors.md and fieldsync.errors.Reason list the same reasons, with matching codes."""

from __future__ import annotations

import re
from pathlib import Path

import grpc

from fieldsync import errors
from fieldsync.errors import Reason

DOC = Path(__file__).resolve().parent.parent / "docs" / "errors.md"


def _documented() -> dict[str, str]:
    rows = re.findall(r"^\| `([A-Z_]+)` \| ([A-Z_]+) \|", DOC.read_text(), re.MULTILINE)
    return dict(rows)


def test_every_reason_is_documented_and_every_documented_reason_exists() -> None:
    assert set(_documented()) == {r.value for r in Reason}


def test_the_documented_status_codes_are_the_codes_the_error_classes_send() -> None:
    doc = _documented()
    codes = {c.name for c in grpc.StatusCode}
    assert set(doc.values()) <= codes
    # Each error class's code appears for the reasons raised with it in the doc.
    classes = [
        getattr(errors, n)
        for n in dir(errors)
        if isinstance(getattr(errors, n), type)
        and issubclass(getattr(errors, n), errors.FieldSyncError)
        and getattr(errors, n) is not errors.FieldSyncError
    ]
    assert {cls.code.name for cls in classes} <= set(doc.values())


def test_a_status_carries_its_reason_and_violations() -> None:
    err = errors.InvalidArgument(Reason.INVALID_CURSOR, "bad cursor", violations=[("cursor", "x")])
    status = err.to_status()
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert errors.reason_of(status) == "INVALID_CURSOR"
    assert len(status.details) == 2
