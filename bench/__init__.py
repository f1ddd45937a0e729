"""FieldSync's benchmark harness (`make bench`, issue 6).

`bench/run.py` is the entry point; `bench.main` runs the scenario groups in
`bench.scenarios`, each against the real services started as processes
(`bench.procs`) on throwaway databases. Nothing here is imported by the
services or the tests.
"""
