"""The write use case: when writes run (scheduler), what one transaction does (applier,
batch_run), its audit events and stored results, and the domain objects (model).

It imports the rules and the storage seam, never api/.
"""
