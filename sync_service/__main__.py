"""`python -m sync_service` / `fieldsync-sync`: run the sync service until SIGTERM.

It takes no arguments: every setting comes from the environment (`--help`
lists each variable with its default; docs/configuration.md is the same list).
A configuration error exits 2 with a line saying which setting is wrong.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import textwrap
from collections.abc import Sequence

from sync_service.config import SyncConfig


def _parser() -> argparse.ArgumentParser:
    from fieldsync.config_doc import help_epilog

    return argparse.ArgumentParser(
        prog="fieldsync-sync",
        description=textwrap.fill(
            "The FieldSync sync service. It serves on $FIELDSYNC_SYNC_ADDR until SIGTERM or "
            "SIGINT, then finishes the calls in flight within $FIELDSYNC_SHUTDOWN_GRACE and "
            "exits 0. Every setting comes from the environment; see docs/configuration.md.",
            79,
        ),
        epilog=help_epilog(SyncConfig),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def main(argv: Sequence[str] | None = None) -> int:
    _parser().parse_args(argv)  # --help, or a usage error for anything else
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from fieldsync.protobuf_check import require_upb

    require_upb()
    try:
        config = SyncConfig.from_env()
    except ValueError as err:
        print(f"fieldsync-sync: configuration error: {err}", file=sys.stderr)
        return 2
    from fieldsync.logs import configure

    configure(config.log_format)  # before the imports below: they log too
    from fieldsync.db import SchemaTooNew
    from fieldsync.operations import START_ERRORS
    from sync_service.rules.schema import SchemaError
    from sync_service.server import serve
    from sync_service.storage.sql import SchemaDowngrade

    try:
        asyncio.run(serve(config))
    except START_ERRORS as err:
        print(f"fieldsync-sync: cannot start: {err}", file=sys.stderr)
        return 2
    except SchemaTooNew as err:
        print(f"fieldsync-sync: {err}", file=sys.stderr)
        return 2
    except (SchemaError, SchemaDowngrade) as err:
        # One line, no traceback: the operator's file or deployment is at fault.
        print(f"fieldsync-sync: schema error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
