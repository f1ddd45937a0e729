"""`fieldsync-client`: the reference client's command line (SPEC §10; its names are fixed).

    fieldsync-client [--db PATH] [--server HOST:PORT] [--token JWT] COMMAND ...

Each setting comes from its flag, else its environment variable, else its
default: --db / FIELDSYNC_CLIENT_DB / ./fieldsync-client.db, --server /
FIELDSYNC_SERVER / 127.0.0.1:50051, --token / FIELDSYNC_TOKEN / none,
--tls-ca / FIELDSYNC_TLS_CA / plaintext (--tls-cert and --tls-key for mutual
TLS). The flags may also follow the command. Everything here goes through
the public SDK; this module only parses arguments and prints JSON (values
through `fieldsync.values.to_display`).
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
from collections.abc import Sequence
from typing import IO, Any

from fieldsync.textops import Delete, Insert, Retain, TextOp, normalize, ops_to_json
from fieldsync.values import FieldValue, Json, to_display

from . import (
    ClientError,
    Conflict,
    FieldSyncClient,
    QueuedMutation,
    Record,
    SyncPermissionDenied,
    SyncUnauthenticated,
    SyncUnavailable,
    tls_credentials,
)

__all__ = ["main", "parse_value"]

ENV_DB = "FIELDSYNC_CLIENT_DB"
ENV_SERVER = "FIELDSYNC_SERVER"
ENV_TOKEN = "FIELDSYNC_TOKEN"
ENV_TLS_CA = "FIELDSYNC_TLS_CA"
DEFAULT_DB = "./fieldsync-client.db"
DEFAULT_SERVER = "127.0.0.1:50051"

EXIT_OK = 0
EXIT_ERROR = 1
"""Any other failure; also `get` of a record this client does not know."""
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
"""The server could not be reached (or did not answer in time); the queue is kept."""
EXIT_REFUSED = 4
"""The server refused the token, or the caller is not allowed; the queue is kept."""

_EPILOG = """\
values: k=v reads v as JSON where it parses (amount=50000, vip=true, notes=null,
tags='["a","b"]'), else as a string (title=hello).

exit status: 0 done; 1 error, or `get` of an unknown record; 2 bad usage;
3 server unreachable (the queue is kept); 4 token refused or not allowed (the
queue is kept).
"""


def parse_value(text: str) -> FieldValue:
    """A k=v value: JSON where it parses as JSON, else the text itself."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    if isinstance(value, dict | list):
        return Json(text)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return text  # pragma: no cover - json.loads returns nothing else


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fieldsync-client",
        description="Write to a local FieldSync store offline; sync it with the server.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # The same flags after the command: SUPPRESS keeps the parent's value when
    # they are not repeated there.
    common = argparse.ArgumentParser(add_help=False)
    for target, default in ((parser, None), (common, argparse.SUPPRESS)):
        target.add_argument(
            "--db",
            metavar="PATH",
            default=default,
            help=f"the local database (${ENV_DB}, else {DEFAULT_DB})",
        )
        target.add_argument(
            "--server",
            metavar="HOST:PORT",
            default=default,
            help=f"the sync server (${ENV_SERVER}, else {DEFAULT_SERVER})",
        )
        target.add_argument(
            "--token", metavar="JWT", default=default, help=f"the bearer token (${ENV_TOKEN})"
        )
        target.add_argument(
            "--tls-ca",
            metavar="PEM",
            default=default,
            help=f"reach the server over TLS, verified with this CA (${ENV_TLS_CA})",
        )
        target.add_argument(
            "--tls-cert",
            metavar="PEM",
            default=default,
            help="client certificate to present (mutual TLS; with --tls-key)",
        )
        target.add_argument(
            "--tls-key", metavar="PEM", default=default, help="the key of --tls-cert"
        )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, parents=[common], help=help_text, description=help_text)

    for name, what in (("put", "a PUT (create or replace)"), ("patch", "a PATCH")):
        p = command(name, f"write locally and queue {what}; works offline")
        p.add_argument("collection", metavar="COLLECTION")
        p.add_argument("record_id", metavar="ID")
        p.add_argument("values", metavar="k=v", nargs="*")
    p = command("delete", "delete locally and queue a DELETE; works offline")
    p.add_argument("collection", metavar="COLLECTION")
    p.add_argument("record_id", metavar="ID")
    p = command(
        "edit",
        "edit a text field locally and queue only the edit (operations); works offline",
    )
    p.add_argument("collection", metavar="COLLECTION")
    p.add_argument("record_id", metavar="ID")
    p.add_argument("field", metavar="FIELD")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument(
        "--insert", nargs=2, metavar=("POS", "TEXT"), help="insert TEXT at code point POS"
    )
    how.add_argument(
        "--delete", nargs=2, metavar=("POS", "COUNT"), help="delete COUNT code points at POS"
    )
    p = command("get", "print the local view of a record, queued writes included")
    p.add_argument("collection", metavar="COLLECTION")
    p.add_argument("record_id", metavar="ID")
    p = command("list", "print the local view of a collection, one record a line")
    p.add_argument("collection", metavar="COLLECTION")
    p.add_argument("--include-deleted", action="store_true", help="also list tombstones")
    command("sync", "send the queue, then pull the changes since the last pull")
    command("queue", "print what is still queued (pending, and rejected with its reason)")
    p = command("conflicts", "print the open conflicts of this tenant, one a line")
    p.add_argument(
        "--local", action="store_true", help="the conflicts known locally (no server call)"
    )
    p = command("resolve", "queue the answer to a conflict; works offline")
    p.add_argument("conflict_id", metavar="CONFLICT_ID")
    p.add_argument("--keep-theirs", action="store_true", help="the server's values stay")
    p.add_argument("--take-yours", action="store_true", help="the losing values are applied")
    p.add_argument("values", metavar="k=v", nargs="*", help="these values are applied")
    return parser


def _fields(parser: argparse.ArgumentParser, items: Sequence[str]) -> dict[str, FieldValue]:
    fields: dict[str, FieldValue] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep or not name:
            parser.error(f"expected k=v, got {item!r}")
        fields[name] = parse_value(raw)
    return fields


def _display(fields: Any) -> dict[str, Any]:
    return {name: to_display(value) for name, value in fields.items()}


def _record_json(rec: Record) -> dict[str, Any]:
    return {
        "record_id": rec.record_id,
        "version": rec.version,
        "deleted": rec.deleted,
        "fields": _display(rec.fields),
        "pending": rec.pending,
    }


def _queued_json(m: QueuedMutation) -> dict[str, Any]:
    return {
        "client_seq": m.client_seq,
        "mutation_id": m.mutation_id,
        "op": m.op,
        "collection": m.collection,
        "record_id": m.record_id,
        "fields": _display(m.fields),
        "base_version": m.base_version,
        "client_time": to_display(m.client_time),
        "resolves_conflict_id": m.resolves_conflict_id,
        "state": m.state,
        "error": m.error,
        "reason": m.reason,
        **(
            {"text_edits": {k: ops_to_json(v) for k, v in m.text_edits.items()}}
            if m.text_edits
            else {}
        ),
    }


def _conflict_json(c: Conflict) -> dict[str, Any]:
    return {
        "conflict_id": c.conflict_id,
        "kind": c.kind,
        "collection": c.collection,
        "record_id": c.record_id,
        "base_version": c.base_version,
        "server_version": c.server_version,
        "fields": {
            f.field: {
                "base": to_display(f.base),
                "yours": to_display(f.yours),
                "theirs": to_display(f.theirs),
            }
            for f in c.fields
        },
        "mutation_id": c.mutation_id,
        "answer_queued": c.answer_queued,
    }


def _print(obj: dict[str, Any]) -> None:
    print(json.dumps(obj, ensure_ascii=False))


class _ProgressBar:
    """A one-line bar on a terminal, for syncs of more than one batch."""

    _WIDTH = 30

    def __init__(self, stream: IO[str], threshold: int) -> None:
        self._stream = stream
        self._threshold = threshold
        self._shown = False

    def __call__(self, done: int, total: int) -> None:
        if total <= self._threshold:
            return
        filled = self._WIDTH * min(done, total) // total
        bar = "#" * filled + "." * (self._WIDTH - filled)
        self._stream.write(f"\rsync [{bar}] {done}/{total}")
        self._stream.flush()
        self._shown = True

    def close(self) -> None:
        if self._shown:
            self._stream.write("\n")
            self._stream.flush()


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; its exit status (usage errors too: nothing here calls sys.exit)."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        fields = _fields(parser, args.values) if args.command in ("put", "patch", "resolve") else {}
        if args.command == "resolve" and (args.keep_theirs + args.take_yours + bool(fields)) != 1:
            parser.error("resolve needs exactly one of --keep-theirs, --take-yours or k=v values")
    except SystemExit as done:  # argparse's way out, for --help and bad usage
        return done.code if isinstance(done.code, int) else EXIT_USAGE
    db = args.db or os.environ.get(ENV_DB) or DEFAULT_DB
    server = args.server or os.environ.get(ENV_SERVER) or DEFAULT_SERVER
    token = args.token or os.environ.get(ENV_TOKEN) or None

    def token_provider() -> str:
        if token is None:
            raise SyncUnauthenticated(f"no token: pass --token JWT or set {ENV_TOKEN}")
        return token

    tls_ca = args.tls_ca or os.environ.get(ENV_TLS_CA) or None
    try:
        if tls_ca is None and (args.tls_cert or args.tls_key):
            raise ValueError("--tls-cert and --tls-key need --tls-ca (the server's CA)")
        credentials = (
            tls_credentials(tls_ca, cert=args.tls_cert, key=args.tls_key) if tls_ca else None
        )
    except ValueError as err:
        print(f"fieldsync-client: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    try:
        with FieldSyncClient(db, server, token_provider, credentials=credentials) as client:
            return _run(args, client, fields)
    except SyncUnavailable as err:
        return _fail(err, EXIT_UNAVAILABLE, queue_kept=True)
    except (SyncUnauthenticated, SyncPermissionDenied) as err:
        return _fail(err, EXIT_REFUSED, queue_kept=True)
    except (ClientError, ValueError, sqlite3.Error) as err:
        return _fail(err, EXIT_ERROR, queue_kept=False)


def _edit(args: argparse.Namespace, client: FieldSyncClient) -> None:
    rec = client.get(args.collection, args.record_id)
    text = rec.fields.get(args.field) if rec is not None else None
    length = len(text) if isinstance(text, str) else 0
    pos_text, arg = args.insert if args.insert else args.delete
    try:
        pos = int(pos_text)
        count = 0 if args.insert else int(arg)
    except ValueError:
        raise ValueError("POS and COUNT are whole numbers") from None
    if not 0 <= pos <= length or count < 0 or pos + count > length:
        raise ValueError(f"{args.field} has {length} code points; POS/COUNT fall outside it")
    middle: list[TextOp] = [Insert(arg)] if args.insert else [Delete(count)]
    ops = [Retain(pos), *middle, Retain(length - pos - count)]
    client.edit_text(args.collection, args.record_id, args.field, normalize(ops))


def _fail(err: BaseException, status: int, *, queue_kept: bool) -> int:
    kept = " (the queue is kept)" if queue_kept else ""
    print(f"fieldsync-client: error: {err}{kept}", file=sys.stderr)
    return status


def _run(args: argparse.Namespace, client: FieldSyncClient, fields: dict[str, FieldValue]) -> int:
    command: str = args.command
    if command == "put":
        client.put(args.collection, args.record_id, fields)
    elif command == "patch":
        client.patch(args.collection, args.record_id, fields)
    elif command == "delete":
        client.delete(args.collection, args.record_id)
    elif command == "edit":
        _edit(args, client)
    elif command == "get":
        rec = client.get(args.collection, args.record_id)
        if rec is None:
            print(
                f"fieldsync-client: no record {args.collection}/{args.record_id} here",
                file=sys.stderr,
            )
            return EXIT_ERROR
        _print(_record_json(rec))
    elif command == "list":
        for rec in client.query(args.collection, include_deleted=args.include_deleted):
            _print(_record_json(rec))
    elif command == "sync":
        bar = _ProgressBar(sys.stderr, threshold=500) if sys.stderr.isatty() else None
        try:
            report = client.sync(progress=bar)
        finally:
            if bar is not None:
                bar.close()
        _print(
            {
                "applied": report.applied,
                "merged": report.merged,
                "conflicts": report.conflicts,
                "rejected": report.rejected,
                "duplicates": report.duplicates,
                "warnings": report.warnings,
                "pulled": report.pulled,
                "pending": report.pending,
            }
        )
    elif command == "queue":
        for m in sorted(client.queue() + client.rejected(), key=lambda m: m.client_seq):
            _print(_queued_json(m))
    elif command == "conflicts":
        for c in client.conflicts(refresh=not args.local):
            _print(_conflict_json(c))
    elif command == "resolve":
        client.resolve(
            args.conflict_id,
            keep_theirs=args.keep_theirs,
            take_yours=args.take_yours,
            values=fields or None,
        )
    return EXIT_OK
