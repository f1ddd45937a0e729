"""JSON logs and call lines (FIELDSYNC_LOG_FORMAT=json, FIELDSYNC_LOG_CALLS=1) of a real process.

Every line the service writes is one JSON object with time, level, logger and
message; each finished call has a line with its method, code, duration,
tenant and client id. The token and the field values a call carried appear
nowhere in the log.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import grpc
import pytest

from fieldsync.logs import JsonFormatter
from fieldsync.v1 import sync_pb2, sync_pb2_grpc
from tests.proc import start_sync_service
from tests.support import PUT, S, SyncEnv, md, token

SECRET_VALUE = "the-field-value-nobody-may-log-4711"


def _lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_json_call_lines_name_the_call_and_never_the_token_or_a_value(tmp_path: Path) -> None:
    proc = start_sync_service(
        f"sqlite:///{tmp_path / 'sync.db'}",
        tmp_path,
        env={
            "FIELDSYNC_LOG_FORMAT": "json",
            "FIELDSYNC_LOG_CALLS": "1",
            "FIELDSYNC_AUDIT_RELAY": "0",
        },
    )
    tok = token("acme", "alice")
    try:
        with grpc.insecure_channel(proc.address) as ch:
            stub = sync_pb2_grpc.SyncServiceStub(ch)
            c = SyncEnv(proc.address, ch, stub, proc.db_url).client()
            res = c.one("t1", {"title": SECRET_VALUE, "colour": SECRET_VALUE}, op=PUT)
            assert res.status == S.MUTATION_STATUS_APPLIED
            with pytest.raises(grpc.RpcError):
                stub.GetSchema(sync_pb2.GetSchemaRequest(), metadata=md(tok + "x"))
    finally:
        proc.stop()
    text = proc.stderr_path.read_text()
    lines = _lines(text)  # every line parses
    assert all({"time", "level", "logger", "message"} <= line.keys() for line in lines)
    assert any("listening on" in line["message"] for line in lines)
    calls = {line["method"]: line for line in lines if "method" in line}
    apply = calls["/fieldsync.v1.SyncService/ApplyBatch"]
    assert apply["code"] == "OK" and apply["level"] == "INFO"
    assert apply["tenant"] == "acme" and apply["client_id"] == c.client_id
    assert apply["duration_ms"] > 0
    assert calls["/fieldsync.v1.SyncService/GetSchema"]["code"] == "UNAUTHENTICATED"
    assert SECRET_VALUE not in text
    assert tok not in text and tok.split(".")[2] not in text and "Bearer" not in text


def test_call_lines_are_off_by_default_and_text_stays_the_default(tmp_path: Path) -> None:
    proc = start_sync_service(
        f"sqlite:///{tmp_path / 'sync.db'}", tmp_path, env={"FIELDSYNC_AUDIT_RELAY": "0"}
    )
    try:
        with grpc.insecure_channel(proc.address) as ch:
            stub = sync_pb2_grpc.SyncServiceStub(ch)
            SyncEnv(proc.address, ch, stub, proc.db_url).client().one("t1", {"title": "x"}, op=PUT)
    finally:
        proc.stop()
    text = proc.stderr_path.read_text()
    assert "ApplyBatch" not in text
    assert not text.lstrip().startswith("{")


def test_the_json_formatter_writes_only_the_known_fields() -> None:
    record = logging.LogRecord("fieldsync.x", logging.WARNING, __file__, 1, "a %s", ("b",), None)
    record.tenant = "acme"
    record.password = "hunter2"  # a stray attribute is not written
    out = json.loads(JsonFormatter().format(record))
    assert out["message"] == "a b" and out["level"] == "WARNING" and out["tenant"] == "acme"
    assert out["time"].endswith("Z")
    assert "password" not in out
