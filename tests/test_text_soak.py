"""Eight clients editing one page at once through `text_edits` (issue 16), real processes.

Real `python -m sync_service` processes (one on SQLite; three on one PostgreSQL database,
the clients spread over them), eight SDK clients with their own local files, each in its
own thread: random insertions of unique tokens and deletions of the page's other text,
some clients offline for bursts of edits. Then a final sync and pull: every replica is
byte-identical to the server's text, every token any client inserted is in it exactly
once, no deletion took a token with it, and nothing was a conflict or rejected.

`make test` runs it for FIELDSYNC_TEXT_SOAK_SECONDS (default 2 s); `make soak-text` for
the issue's 30 s.
"""

from __future__ import annotations

import os
import random
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fieldsync.textops import normalize
from fieldsync_client import Delete, FieldSyncClient, Insert, Retain, TextOp
from tests.pg import PG_SKIP_REASON, fresh_pg_database, pg_server_url
from tests.proc import SyncProcess, start_sync_service
from tests.test_client_support import open_client

CLIENTS = 8
SECONDS = float(os.environ.get("FIELDSYNC_TEXT_SOAK_SECONDS", "2"))
TOKEN = re.compile(r"<\d+\.\d+>")
# The filler shares "." with the tokens on purpose: were the server to diff its text against
# a client's instead of composing the operations it applied, a client's deletion of a
# filler "." could land on the "." of another's token.
FILLER = "Lorem ipsum dolor sit amet, café 🎉 naïve\r\nconsectetur adipiscing élit. "


def _ops(rng: random.Random, text: str, client: int, n: int) -> tuple[list[TextOp], str | None]:
    """One random edit of ``text`` that never touches a token: (operations, new token)."""
    tokens = [m.span() for m in TOKEN.finditer(text)]
    inside = {p for s, e in tokens for p in range(s + 1, e)}
    if rng.random() < 0.7 or len(text) - sum(e - s for s, e in tokens) < 4:
        pos = rng.choice([p for p in range(len(text) + 1) if p not in inside])
        token = f"<{client}.{n}>"
        return normalize([Retain(pos), Insert(token), Retain(len(text) - pos)]), token
    runs, last = [], 0  # the text between tokens
    for s, e in [*tokens, (len(text), len(text))]:
        if s > last:
            runs.append((last, s))
        last = e
    s, e = rng.choice(runs)
    start = rng.randrange(s, e)
    count = rng.randint(1, min(3, e - start))
    return normalize([Retain(start), Delete(count), Retain(len(text) - start - count)]), None


def _edit_for(
    c: FieldSyncClient,
    index: int,
    seconds: float,
    tokens: list[str],
    errors: list[BaseException],
    edits: list[int],
) -> None:
    rng = random.Random(1600 + index)
    deadline = time.monotonic() + seconds
    n = 0
    try:
        while time.monotonic() < deadline:
            burst = rng.randint(5, 20) if rng.random() < 0.25 else 1  # offline for a while
            for _ in range(burst):
                rec = c.get("pages", "p")
                assert rec is not None
                text = rec.fields["body"]
                assert isinstance(text, str)
                ops, token = _ops(rng, text, index, n)
                n += 1
                c.edit_text("pages", "p", "body", ops)
                edits[index] += 1
                if token:
                    tokens.append(token)
            report = c.sync()
            assert (report.conflicts, report.rejected) == (0, 0), report
    except BaseException as e:  # reported by the main thread
        errors.append(e)


def _soak(addresses: list[str], tmp_path: Path) -> None:
    clients = [
        open_client(tmp_path / f"c{i}.db", addresses[i % len(addresses)], sub=f"user{i}")
        for i in range(CLIENTS)
    ]
    try:
        clients[0].put("pages", "p", {"title": "soak", "body": FILLER * 4})
        clients[0].sync()
        for c in clients:
            c.sync()
        tokens: list[list[str]] = [[] for _ in clients]
        errors: list[BaseException] = []
        edits = [0] * CLIENTS
        started = time.monotonic()
        threads = [
            threading.Thread(target=_edit_for, args=(c, i, SECONDS, tokens[i], errors, edits))
            for i, c in enumerate(clients)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        for _ in range(2):  # the last one pulls what the others sent last
            for c in clients:
                report = c.sync()
                assert (report.conflicts, report.rejected, report.pending) == (0, 0, 0)
        texts = {c.get("pages", "p").fields["body"] for c in clients}  # type: ignore[union-attr]
        assert len(texts) == 1, "the replicas differ"
        (final,) = texts
        assert isinstance(final, str)
        inserted = [t for ts in tokens for t in ts]
        assert len(inserted) > CLIENTS
        assert sorted(TOKEN.findall(final)) == sorted(inserted)  # each exactly once, no other
        for c in clients:
            assert c.conflicts() == []
        # The figures (pytest -s shows them): what the run did.
        print(
            f"\ntext soak: {len(addresses)} instance(s), {CLIENTS} clients,"
            f" {time.monotonic() - started:.0f} s: {sum(edits)} edits, {len(inserted)} tokens"
            f" (each once), {len(final)} code points, 0 conflicts, 0 rejected,"
            f" {CLIENTS} replicas byte-identical"
        )
    finally:
        for c in clients:
            c.close()


def test_eight_clients_editing_one_page_on_sqlite_converge(tmp_path: Path) -> None:
    proc = start_sync_service(f"sqlite:///{tmp_path / 'sync.db'}", tmp_path)
    try:
        _soak([proc.address], tmp_path)
    finally:
        proc.stop()
        proc.close()


@pytest.fixture
def pg_instances(tmp_path: Path) -> Iterator[list[SyncProcess]]:
    server = pg_server_url()
    if server is None:
        pytest.skip(PG_SKIP_REASON)
    with fresh_pg_database(server) as url:
        procs: list[SyncProcess] = []
        try:
            for _ in range(3):
                procs.append(start_sync_service(url, tmp_path))
            yield procs
        finally:
            for p in procs:
                p.stop()
                p.close()


def test_eight_clients_editing_one_page_on_three_postgresql_instances_converge(
    tmp_path: Path, pg_instances: list[SyncProcess]
) -> None:
    _soak([p.address for p in pg_instances], tmp_path)
