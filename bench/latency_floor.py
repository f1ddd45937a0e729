"""The latency floor's server: `python -m bench.latency_floor --port N --db PATH`.

A bare grpc.aio server with one generic handler at the sync service's
`ApplyBatch` method. Each call is parsed as the service parses it; then, in a
worker thread (as every database call of the service runs), one row is
written to a SQLite file and committed durably: WAL, synchronous=FULL and the
service's writer settings (fieldsync.db.SQLITE_WRITER_PRAGMAS), one
`INSERT OR REPLACE` of the record's id and its fields' bytes in a
`BEGIN IMMEDIATE` transaction. The answer is a BatchResult of the service's
shape (one APPLIED result per mutation, with its record). No decoding, merge,
history, results log, audit or authentication: the least a service that
answers one mutation only once it is durable must do. Run as a process of its
own, like the service, so both measurements share the machine the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sqlite3
import threading
from typing import Any

import grpc

from fieldsync.db import SQLITE_WRITER_PRAGMAS
from fieldsync.v1 import sync_pb2

METHOD = "ApplyBatch"
SERVICE = "fieldsync.v1.SyncService"


class OneRowStore:
    """One SQLite connection, written from worker threads one commit at a time."""

    def __init__(self, path: str) -> None:
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        for pragma in (
            "PRAGMA journal_mode=WAL",
            "PRAGMA synchronous=FULL",
            *SQLITE_WRITER_PRAGMAS,
        ):
            self._db.execute(pragma)
        self._db.execute("CREATE TABLE IF NOT EXISTS rows (id TEXT PRIMARY KEY, body BLOB)")
        self._lock = threading.Lock()

    def commit(self, record_id: str, body: bytes) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("INSERT OR REPLACE INTO rows VALUES (?, ?)", (record_id, body))
            self._db.execute("COMMIT")

    def close(self) -> None:
        self._db.close()


def answer(batch: sync_pb2.MutationBatch) -> sync_pb2.ApplyBatchResponse:
    out = sync_pb2.ApplyBatchResponse()
    result = out.result
    for m in batch.mutations:
        r = result.results.add(
            mutation_id=m.mutation_id,
            client_seq=m.client_seq,
            status=sync_pb2.MUTATION_STATUS_APPLIED,
        )
        rec = r.record
        rec.collection = m.collection
        rec.record_id = m.record_id
        rec.version = m.base_version + 1
        rec.deleted = m.op == sync_pb2.OP_DELETE
        rec.fields.MergeFrom(m.fields)
        result.last_applied_seq = m.client_seq
    return out


async def serve(port: int, db: str) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    store = OneRowStore(db)

    async def apply_batch(
        request: sync_pb2.ApplyBatchRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> sync_pb2.ApplyBatchResponse:
        for m in request.batch.mutations[:1]:  # the bench sends one a call
            await asyncio.to_thread(store.commit, m.record_id, m.SerializeToString())
        return answer(request.batch)

    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            METHOD: grpc.unary_unary_rpc_method_handler(
                apply_batch,
                request_deserializer=sync_pb2.ApplyBatchRequest.FromString,
                response_serializer=sync_pb2.ApplyBatchResponse.SerializeToString,
            )
        },
    )
    server.add_generic_rpc_handlers((handler,))
    if server.add_insecure_port(f"127.0.0.1:{port}") == 0:
        raise SystemExit(f"cannot listen on port {port}")
    await server.start()
    try:
        await stop.wait()
        await server.stop(1)
    finally:
        store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--db", required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.db))


if __name__ == "__main__":
    main()
