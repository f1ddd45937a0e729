"""The rules, pure (no I/O, no clock, no storage): the schema, decoding against it,
the merge decision and the text merge. They import nothing else of sync_service.
"""
