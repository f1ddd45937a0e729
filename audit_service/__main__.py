"""`python -m audit_service` / `fieldsync-audit`: serve (no command), `prune`, or `query`.

Serving runs until SIGTERM/SIGINT and exits 0; a configuration error exits 2
with a line saying which setting is wrong.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import textwrap
from collections.abc import Sequence

from audit_service.config import AuditConfig


def _parser() -> argparse.ArgumentParser:
    from audit_service.commands import add_commands
    from fieldsync.config_doc import help_epilog

    parser = argparse.ArgumentParser(
        prog="fieldsync-audit",
        description=textwrap.fill(
            "The FieldSync audit service. With no command it serves on $FIELDSYNC_AUDIT_ADDR "
            "(default 127.0.0.1:50052) until SIGTERM. Every setting comes from the "
            "environment; see docs/configuration.md.",
            79,
        ),
        epilog=help_epilog(AuditConfig),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="{prune,query,dead-letters}")
    add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    serving = args.command is None
    # A command's output is its answer; the migration's progress lines would be noise there.
    logging.basicConfig(
        level=logging.INFO if serving else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from fieldsync.protobuf_check import require_upb

    require_upb()
    try:
        # Only serving verifies tokens; prune and query work without JWT settings.
        config = AuditConfig.from_env(require_auth=serving)
    except ValueError as err:
        print(f"fieldsync-audit: configuration error: {err}", file=sys.stderr)
        return 2
    if args.command == "prune":
        from audit_service.commands import run_prune

        return run_prune(args, config)
    if args.command == "dead-letters":
        from audit_service.commands import run_dead_letters

        return run_dead_letters(args, config)
    if args.command == "query":
        from audit_service.commands import run_query

        return run_query(args, config)
    from fieldsync.logs import configure

    configure(config.log_format)  # before the imports below: they log too
    from audit_service.server import serve
    from fieldsync.db import SchemaTooNew
    from fieldsync.operations import START_ERRORS

    try:
        asyncio.run(serve(config))
    except START_ERRORS as err:
        print(f"fieldsync-audit: cannot start: {err}", file=sys.stderr)
        return 2
    except SchemaTooNew as err:
        print(f"fieldsync-audit: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
