"""The FieldSync audit service: stores each audit event once, and lets auditors read them.

Layout: `model` (plain values), `convert` (wire <-> model, with the checks an
event must pass), `paging` (query page tokens), `tables` + `migrations/` +
`storage` (the database), `tail` (following new events), `servicer`
(gRPC <-> domain), `server` (process and wiring), `commands` (`prune`,
`query`), `config` (the environment).
"""
