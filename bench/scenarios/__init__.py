"""The benchmark's scenarios, one module per group that shares a setup.

`reconnect` (reconnect_sqlite and its two floors), `online` (latency,
concurrent), `store` (store_size, memory, pull), `audit` (audit_relay) and
`postgres` (reconnect_pg, concurrent_pg). Each scenario runs its
repetitions (`Ctx.repetitions`) and returns, per scenario name, the median
of each figure over them (bench.stats.summarize); figures compared by a
ratio are measured inside the same repetition. bench.main calls them.
"""
