"""`python -m sync_service` / `fieldsync-sync`: run the sync service until SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import sys

from sync_service.config import SyncConfig


def main() -> int:
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
    from sync_service.schema import SchemaError
    from sync_service.server import serve
    from sync_service.storage.sql import SchemaDowngrade

    try:
        asyncio.run(serve(config))
    except (SchemaError, SchemaDowngrade) as err:
        # One line, no traceback: the operator's file or deployment is at fault.
        print(f"fieldsync-sync: schema error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
