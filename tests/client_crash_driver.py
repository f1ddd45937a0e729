"""The child process of the client crash test (tests/test_client_crash.py).

    python tests/client_crash_driver.py DB SERVER LOG RUN SEED

Writes and syncs through the SDK in a loop until it is killed: bursts of
PATCHes and PUTs to a few records, then a `sync()`. After each write the API
returned from, one JSON line `[client_seq, mutation_id, record_id, {field:
value}]` is appended to LOG and fsynced, so the log holds exactly the writes
the application was told are safe (and perhaps not the very last one). Every
value is "RUN:I:FIELD", unique, ordered by (RUN, I): the test can tell which of
two writes to a field came later. The token comes from FIELDSYNC_TOKEN.

LOG + ".phase" holds one byte, S while a sync runs and W otherwise (written,
not fsynced: a killed process's page cache survives, and it only feeds the
count of kills that landed mid-sync).
"""

from __future__ import annotations

import json
import os
import random
import sys

from fieldsync_client import FieldSyncClient

RECORDS = 12
FIELDS = ("title", "assignee")
BATCH_SIZE = 10  # small, so a sync of one burst is several pipelined batches


def main(argv: list[str]) -> None:
    db, server, log, run, seed = argv
    token = os.environ["FIELDSYNC_TOKEN"]
    rng = random.Random(int(seed))
    log_fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    phase_fd = os.open(log + ".phase", os.O_WRONLY | os.O_CREAT, 0o644)
    client = FieldSyncClient(db, server, lambda: token, batch_size=BATCH_SIZE, timeout=20)
    print("ready", flush=True)
    i = 0
    while True:
        for _ in range(rng.randint(1, 40)):
            i += 1
            record_id = f"r{rng.randrange(RECORDS)}"
            if rng.random() < 0.1:
                # A PUT replaces the record, so it writes every field the test watches.
                values = {f: f"{run}:{i}:{f}" for f in FIELDS}
                m = client.put("tasks", record_id, values)
            else:
                name = rng.choice(FIELDS)
                values = {name: f"{run}:{i}:{name}"}
                m = client.patch("tasks", record_id, values)
            line = json.dumps([m.client_seq, m.mutation_id, record_id, values]) + "\n"
            os.write(log_fd, line.encode())
            os.fsync(log_fd)
        os.pwrite(phase_fd, b"S", 0)
        client.sync()
        os.pwrite(phase_fd, b"W", 0)


if __name__ == "__main__":
    main(sys.argv[1:])
