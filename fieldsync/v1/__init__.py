"""Generated protobuf and gRPC stubs of protos/fieldsync/v1 (see scripts/gen_protos.py)."""
