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
    from fieldsync.logs import configure

    configure(config.log_format)  # before the imports below: they log too
    from fieldsync.operations import START_ERRORS
    from sync_service.server import serve

    try:
        asyncio.run(serve(config))
    except START_ERRORS as err:
        print(f"fieldsync-sync: cannot start: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
