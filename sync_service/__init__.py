"""The FieldSync sync service: applies clients' queued mutations, merges, serves the feed.

Layout: `merge` (the pure decision), `decode` (schema-tolerant decoding),
`apply` (one transaction per batch), `storage/` (the database behind one
interface), `servicer` (gRPC <-> domain), `server` (process and wiring).
"""
