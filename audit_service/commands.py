"""The `fieldsync-audit` commands besides serving: `prune`, `query` and `dead-letters`.

`dead-letters` prints, from the database, the events RecordEvents refused and
kept whole (one JSON object a line: key, tenant_id, reasons, the event).

`prune` deletes events older than a number of days (the flag, else
FIELDSYNC_AUDIT_RETENTION_DAYS) straight in the database FIELDSYNC_AUDIT_DB
names, and says which database and how many it deleted: retention is never
silent, and never runs unless asked. It never creates a database: a SQLite
file that is not there is an error (a wrong FIELDSYNC_AUDIT_DB would
otherwise "prune 0" from a new, empty one). `query` is a
client of a running service: it pages through QueryEvents with the token in
FIELDSYNC_TOKEN and prints one JSON object a line.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import time
from collections.abc import Iterator
from typing import Any, TextIO

import grpc
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import DecodeError
from grpc_status import rpc_status
from sqlalchemy.engine import make_url

from audit_service.config import ENV_DB, ENV_RETENTION_DAYS, AuditConfig
from audit_service.storage import SqlAuditStorage
from fieldsync.audit_kinds import EventKind
from fieldsync.errors import reason_of
from fieldsync.v1 import audit_pb2, audit_pb2_grpc
from fieldsync.values import Timestamp, fields_from_proto, to_display

__all__ = ["ENV_TOKEN", "add_commands", "run_dead_letters", "run_prune", "run_query"]

ENV_TOKEN = "FIELDSYNC_TOKEN"
NANOS_PER_DAY = 86_400 * 1_000_000_000
QUERY_PAGE = 1000


def add_commands(sub: Any) -> None:
    """Add `prune` and `query` to the argparse subparsers `sub`."""
    prune = sub.add_parser(
        "prune",
        help="delete events older than N days and print how many",
        description=(
            "Delete the audit events that occurred more than N days ago from the database "
            f"${ENV_DB} names (default {AuditConfig.db_url}; `make run` keeps its "
            "database in .run/audit.db), and print which database and how many were deleted. "
            f"N is --older-than-days, else ${ENV_RETENTION_DAYS}."
        ),
    )
    prune.add_argument("--older-than-days", type=int, metavar="N", help="the age limit, in days")
    query = sub.add_parser(
        "query",
        help="print a running service's events as JSON lines",
        description=(
            f"Print the events of your tenant (token from ${ENV_TOKEN}, role auditor), "
            "oldest first, as one JSON object a line."
        ),
    )
    query.add_argument(
        "--kind",
        action="append",
        default=[],
        metavar="KIND",
        help=f"only this kind (repeat for several): {', '.join(k.name for k in EventKind)}",
    )
    query.add_argument("--collection", default="", help="only events of this collection")
    query.add_argument("--record", default="", help="only events of this record id")
    query.add_argument("--mutation", default="", help="only events of this mutation id")
    query.add_argument("--limit", type=int, default=100, metavar="N", help="at most N events")
    query.add_argument("--newest-first", action="store_true", help="newest events first")
    letters = sub.add_parser(
        "dead-letters",
        help="print the refused events the service kept, as JSON lines",
        description=(
            "Print the events RecordEvents refused (a field over its limit, no kind, ...) and"
            " kept whole, oldest first, one JSON object a line; read from $FIELDSYNC_AUDIT_DB."
        ),
    )
    letters.add_argument("--limit", type=int, default=1000, metavar="N", help="at most N")


def run_prune(args: argparse.Namespace, config: AuditConfig, out: TextIO | None = None) -> int:
    days = args.older_than_days if args.older_than_days is not None else config.retention_days
    if days is None:
        print(
            f"fieldsync-audit prune: say how old: --older-than-days N or ${ENV_RETENTION_DAYS}",
            file=sys.stderr,
        )
        return 2
    if days < 1:
        print("fieldsync-audit prune: --older-than-days must be at least 1", file=sys.stderr)
        return 2
    url = make_url(config.db_url)
    shown = url.render_as_string(hide_password=True)
    if url.get_backend_name() == "sqlite" and not _sqlite_file_exists(url.database):
        print(
            f"fieldsync-audit prune: no audit database at {shown}: set ${ENV_DB} to the "
            "service's database (make run: sqlite:///.run/audit.db)",
            file=sys.stderr,
        )
        return 1
    cutoff = time.time_ns() - days * NANOS_PER_DAY
    storage = SqlAuditStorage(config.db_url, sqlite_synchronous=config.sqlite_synchronous)
    try:
        storage.migrate()
        deleted = storage.prune(cutoff)
    finally:
        storage.close()
    print(
        f"pruned {deleted} audit events that occurred before {Timestamp(cutoff).isoformat()}"
        f" (older than {days} day{'' if days == 1 else 's'}) from {shown}",
        file=out or sys.stdout,
    )
    return 0


def run_dead_letters(
    args: argparse.Namespace, config: AuditConfig, out: TextIO | None = None
) -> int:
    storage = SqlAuditStorage(config.db_url, sqlite_synchronous=config.sqlite_synchronous)
    try:
        storage.migrate()
        letters = storage.dead_letters(max(1, args.limit))
    finally:
        storage.close()
    for d in letters:
        event: Any
        try:
            event = MessageToDict(audit_pb2.AuditEvent.FromString(d.event))
        except DecodeError:
            event = {"bytes_base64": base64.b64encode(d.event).decode("ascii")}
        line = {"key": d.key, "tenant_id": d.tenant_id, "reasons": d.reasons, "event": event}
        print(json.dumps(line, ensure_ascii=False), file=out or sys.stdout)
    return 0


def _sqlite_file_exists(database: str | None) -> bool:
    # An in-memory database (no name, or ":memory:") holds nothing to prune either.
    if not database or database == ":memory:" or database.startswith("file::memory:"):
        return False
    path = database.removeprefix("file:").split("?", 1)[0]
    return os.path.isfile(path)


def _kind(text: str) -> EventKind:
    name = text.strip().upper().removeprefix("AUDIT_EVENT_KIND_")
    try:
        return EventKind[name]
    except KeyError:
        raise ValueError(
            f"unknown kind {text!r}: one of {', '.join(k.name for k in EventKind)}"
        ) from None


def _kind_name(kind: int) -> str | int:
    # A kind newer than this command is shown by number rather than failing.
    try:
        return EventKind(kind).name
    except ValueError:
        return kind


def _event_json(e: audit_pb2.AuditEvent) -> dict[str, Any]:
    occurred = Timestamp(e.occurred_at.seconds * 1_000_000_000 + e.occurred_at.nanos)
    return {
        "event_id": e.event_id,
        "tenant_id": e.tenant_id,
        "kind": _kind_name(int(e.kind)),
        "code": e.code,
        "collection": e.collection,
        "record_id": e.record_id,
        "field": e.field,
        "mutation_id": e.mutation_id,
        "client_id": e.client_id,
        "actor": e.actor,
        "occurred_at": occurred.isoformat(),
        "client_schema_version": e.client_schema_version,
        "message": e.message,
        "details": {k: to_display(v) for k, v in fields_from_proto(e.details).items()},
    }


def _events(
    stub: audit_pb2_grpc.AuditServiceStub, request: audit_pb2.QueryEventsRequest, token: str
) -> Iterator[audit_pb2.AuditEvent]:
    metadata = (("authorization", f"Bearer {token}"),)
    while True:
        page = stub.QueryEvents(request, metadata=metadata, timeout=30)
        yield from page.events
        if not page.next_page_token:
            return
        request.page_token = page.next_page_token


def run_query(args: argparse.Namespace, config: AuditConfig, out: TextIO | None = None) -> int:
    token = os.environ.get(ENV_TOKEN)
    if not token:
        print(
            f"fieldsync-audit query: set ${ENV_TOKEN} to a token with the role auditor",
            file=sys.stderr,
        )
        return 2
    try:
        kinds = [_kind(k) for k in args.kind]
    except ValueError as err:
        print(f"fieldsync-audit query: {err}", file=sys.stderr)
        return 2
    if args.limit < 1:
        print("fieldsync-audit query: --limit must be at least 1", file=sys.stderr)
        return 2
    request = audit_pb2.QueryEventsRequest(
        kinds=[audit_pb2.AuditEventKind.ValueType(int(k)) for k in kinds],
        collection=args.collection,
        record_id=args.record,
        mutation_id=args.mutation,
        page_size=min(args.limit, QUERY_PAGE),
        newest_first=args.newest_first,
    )
    out = out or sys.stdout  # looked up now, not at import: callers may have replaced it
    printed = 0
    with grpc.insecure_channel(config.addr) as channel:
        stub = audit_pb2_grpc.AuditServiceStub(channel)
        try:
            for event in _events(stub, request, token):
                print(json.dumps(_event_json(event), ensure_ascii=False), file=out)
                printed += 1
                if printed >= args.limit:
                    break
        except grpc.RpcError as err:
            print(f"fieldsync-audit query: {_describe(err)}", file=sys.stderr)
            return 1
    return 0


def _describe(err: grpc.RpcError) -> str:
    status = rpc_status.from_call(err)
    reason = reason_of(status) if status is not None else None
    code = err.code().name
    detail = err.details()
    return f"{code}{f' ({reason})' if reason else ''}: {detail}"
