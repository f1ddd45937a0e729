"""The transport floor's server: `python -m bench.transport_floor --port N`.

A tiny grpc.aio server with one generic handler at the sync service's `Sync`
method: it parses each SyncRequest as the service does, answers the hello
with a welcome and each batch with a BatchResult of the same shape as the
service's (one APPLIED result per mutation, with its record), and stores
nothing. Run as a process of its own, like the service, so the client and
the server share the machine's cores the same way in both measurements.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import AsyncIterator
from typing import Any

import grpc

from fieldsync.v1 import sync_pb2

METHOD = "Sync"
SERVICE = "fieldsync.v1.SyncService"
MAX_MESSAGE = 64 * 1024 * 1024


def answer(batch: sync_pb2.MutationBatch, last_seq: int) -> tuple[sync_pb2.SyncResponse, int]:
    out = sync_pb2.BatchResult()
    for m in batch.mutations:
        r = out.results.add(
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
        last_seq = m.client_seq
    out.last_applied_seq = last_seq
    return sync_pb2.SyncResponse(result=out), last_seq


async def sync(
    requests: AsyncIterator[sync_pb2.SyncRequest], context: grpc.aio.ServicerContext[Any, Any]
) -> AsyncIterator[sync_pb2.SyncResponse]:
    last_seq = 0
    async for req in requests:
        if req.WhichOneof("message") == "hello":
            yield sync_pb2.SyncResponse(
                welcome=sync_pb2.SyncWelcome(last_applied_seq=0, server_schema_version=3)
            )
        else:
            resp, last_seq = answer(req.batch, last_seq)
            yield resp


async def serve(port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
        ]
    )
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            METHOD: grpc.stream_stream_rpc_method_handler(
                sync,
                request_deserializer=sync_pb2.SyncRequest.FromString,
                response_serializer=sync_pb2.SyncResponse.SerializeToString,
            )
        },
    )
    server.add_generic_rpc_handlers((handler,))
    if server.add_insecure_port(f"127.0.0.1:{port}") == 0:
        raise SystemExit(f"cannot listen on port {port}")
    await server.start()
    await stop.wait()
    await server.stop(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    asyncio.run(serve(parser.parse_args().port))


if __name__ == "__main__":
    main()
