"""The services' log output: text (default) or one JSON object a line (FIELDSYNC_LOG_FORMAT).

`configure` sets up the root logger once, at process start. A JSON line has
`time` (UTC, ISO 8601 with milliseconds), `level`, `logger` and `message`,
`error` with the traceback when there is one, and, on a call's line (see
fieldsync.calls), `method`, `code`, `duration_ms`, `tenant`, `client_id` and
`trace_id`. Those come in as `extra=` fields named in `CALL_FIELDS`; nothing
else a record carries is written, so a stray attribute cannot leak a value.
Tokens and field values are never passed to a log call in the first place.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys

__all__ = ["CALL_FIELDS", "LOG_FORMATS", "JsonFormatter", "configure"]

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

CALL_FIELDS = ("method", "code", "duration_ms", "tenant", "client_id", "trace_id")


class JsonFormatter(logging.Formatter):
    """One JSON object a line; see the module docstring for its keys."""

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        out: dict[str, object] = {
            "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CALL_FIELDS:
            value = record.__dict__.get(name)
            if value is not None and value != "":
                out[name] = value
        if record.exc_info:
            out["error"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["error"] = record.exc_text
        return json.dumps(out, ensure_ascii=False, default=str)


def configure(log_format: str = "text", level: int = logging.INFO) -> None:
    """Send the process's logs to stderr in `log_format` (replaces earlier handlers)."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
