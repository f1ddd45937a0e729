"""The FieldSync sync service: applies clients' queued mutations, merges, serves the feed.

Layout (docs/architecture.md), each layer importing only the ones below it:
`server`/`__main__` (process and wiring) -> `api/` (gRPC <-> domain) ->
`writes/` (scheduling and applying writes) -> `storage/` (the database behind
one seam; each engine's differences in sqlite.py / postgres.py) -> `rules/`
(schema, decode, merge, textmerge: pure). Beside them: `config`,
`schema_file` (reads the schema file), `feed` (cursors, wake-ups), `relay`
(outbox to the audit service).
"""
