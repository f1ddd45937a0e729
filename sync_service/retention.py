"""History retention (SPEC §1): the service's task that prunes old record history.

Every `interval` seconds, history rows (the values a version replaced) and text points
committed more than `retention` seconds ago are deleted (SqlStorage.prune_history). A
write on a base below what is left then reads that base as unknown: a conflict for
every field changed since, never an overwrite (sync_service.writes.batch_run,
sync_service.rules.merge). Several instances may prune at once: a delete of what is
already gone deletes nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time

from sync_service.storage.sql import SqlStorage

log = logging.getLogger("fieldsync.sync")


async def prune_history(storage: SqlStorage, retention: float, interval: float) -> None:
    """Prune until cancelled; a failed prune is logged and tried again next time."""
    while True:
        try:
            before = time.time_ns() - int(retention * 1e9)
            gone = await asyncio.to_thread(storage.prune_history, before)
            if gone:
                log.info(
                    "history retention: %d history rows older than %.0fs pruned", gone, retention
                )
        except Exception:
            log.exception("history retention: the prune failed; it runs again in %.0fs", interval)
        await asyncio.sleep(max(interval, 0.1))
