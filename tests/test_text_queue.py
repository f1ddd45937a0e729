"""A client's queue of text edits on one base composes across batches and restarts
(SPEC §3), and history retention turns an unknown base into a durable conflict (§1).

The hard case: an edit of the queue that changes nothing on the server (another writer
made the same deletion first) leaves no history row, yet the client's next edit, in a
later batch or after the service restarted, is on the text that edit left it with.
"""

from __future__ import annotations

import json
import random
import sqlite3
import time
from pathlib import Path
from typing import Any

from fieldsync.auth import Principal
from fieldsync.textops import Delete, Insert, Retain, TextOp, apply_ops, ops_from_json
from fieldsync.values import FieldValue, decode
from sync_service.config import SyncConfig
from sync_service.rules.merge import Op
from sync_service.schema_file import DEFAULT_SCHEMA_PATH, load_schema
from sync_service.storage.sql import SqlStorage
from sync_service.writes.applier import Applier
from sync_service.writes.model import BatchIn, MutationIn, Status
from tests.conftest import make_config, running_sync
from tests.support import Client, S, SyncEnv, plain
from tests.test_text_fields import edit, page, with_edits

WORDS = [f"w{j}" for j in range(30)]


def _text(c: Client, rid: str = "p") -> tuple[str, int]:
    rec = c.get(rid, collection="pages")
    assert rec is not None
    body = plain(rec)["body"]
    assert isinstance(body, str)
    return body, rec.version


def _delete_word(text: str, word: str) -> list[TextOp]:
    at = text.index(word + " ")
    return [
        op
        for op in (Retain(at), Delete(len(word) + 1), Retain(len(text) - at - len(word) - 1))
        if op.n
    ]


def test_a_queue_of_50_edits_composes_across_batches_a_restart_and_edits_that_change_nothing(
    sync_config: SyncConfig,
) -> None:
    rng = random.Random(1616)
    start = " ".join(WORDS) + " ."
    # Ann is offline on base 1; every tenth edit of hers deletes a word that bob will
    # have deleted already when it arrives: on the server it changes nothing.
    mine = start
    queue: list[tuple[list[TextOp], str | None]] = []  # (operations, the word it deletes)
    doomed = rng.sample(WORDS, 5)
    for i in range(50):
        if i % 10 == 9:
            word = doomed[i // 10]
            ops = _delete_word(mine, word)
        else:
            word = None
            spots = [0] + [k + 1 for k, ch in enumerate(mine) if ch == " "]
            pos = rng.choice(spots)  # before a word: the words stay whole
            ops = [
                op
                for op in (Retain(pos), Insert(f"<a{i}>"), Retain(len(mine) - pos))
                if not isinstance(op, Retain) or op.n
            ]
        mine = apply_ops(mine, ops)
        queue.append((ops, word))

    env_holder: list[SyncEnv] = []
    ann_id = "ann-device"
    others: list[str] = []
    with running_sync(sync_config) as env:
        ann = Client(env, sub="ann", client_id=ann_id)
        page(ann, "p", start)
        ann_seq = ann.next_seq
        env_holder.append(env)
    next_seq = {"ann": ann_seq, "bob": 1, "cy": 1}
    statuses = []
    for k in range(0, 50, 10):  # five batches; the service restarts before each one
        with running_sync(sync_config) as env:
            ann = Client(env, sub="ann", client_id=ann_id, next_seq=next_seq["ann"])
            bob = Client(env, sub="bob", client_id="bob-device", next_seq=next_seq["bob"])
            cy = Client(env, sub="cy", client_id="cy-device", next_seq=next_seq["cy"])
            for c in (bob, cy):
                text, version = _text(c)
                token = f"<{c.sub}{k}>"
                others.append(token)
                r = edit(c, "p", "body", [Retain(len(text)), Insert(token)], base=version)
                assert r.status == S.MUTATION_STATUS_APPLIED
            word = queue[k + 9][1]
            assert word is not None
            text, version = _text(bob)
            r = edit(bob, "p", "body", _delete_word(text, word), base=version)
            assert r.status == S.MUTATION_STATUS_APPLIED
            before = _text(ann)[1]
            batch = [
                with_edits(ann.mut("p", base=1, collection="pages"), "body", ops)
                for ops, _ in queue[k : k + 10]
            ]
            results = list(ann.apply(*batch[:5]).results) + list(ann.apply(*batch[5:]).results)
            statuses += [r.status for r in results]
            assert [r.error.message for r in results if r.error.message] == []
            # The last edit (the deletion bob made first) left the record as it was.
            assert results[-1].record.version == results[-2].record.version
            assert results[-2].record.version > before
            next_seq.update(ann=ann.next_seq, bob=bob.next_seq, cy=cy.next_seq)
            final, _ = _text(ann)
            conflicts = ann.conflicts()
    assert set(statuses) <= {S.MUTATION_STATUS_APPLIED, S.MUTATION_STATUS_MERGED}, statuses
    assert conflicts == []
    for t in [f"<a{i}>" for i in range(50) if i % 10 != 9] + others:
        assert final.count(t) == 1, (t, final)
    for word in doomed:
        assert word + " " not in final
    stripped = final
    for t in others:
        stripped = stripped.replace(t, "")
    assert stripped == mine  # her text as she typed it, the others' tokens added


# --- history retention -------------------------------------------------------------------


def _history_rows(config: SyncConfig) -> int:
    db = sqlite3.connect(config.db_url.removeprefix("sqlite:///"))
    try:
        return int(db.execute("SELECT count(*) FROM record_history").fetchone()[0])
    finally:
        db.close()


def test_pruned_history_turns_text_edits_on_a_lost_base_into_durable_audited_conflicts(
    tmp_path: Path,
) -> None:
    config = make_config(
        f"sqlite:///{tmp_path / 'sync.db'}",
        history_retention_seconds=0.3,
        history_prune_interval_seconds=0.1,
    )
    with running_sync(config) as env:
        ann, bob, cy = env.client(sub="ann"), env.client(sub="bob"), env.client(sub="cy")
        page(ann, "p", "one two three")
        r = edit(bob, "p", "body", [Retain(13), Insert(" four")], base=1)
        assert r.status == S.MUTATION_STATUS_APPLIED
        deadline = time.monotonic() + 10
        while _history_rows(config) and time.monotonic() < deadline:
            time.sleep(0.05)  # the service's retention task prunes both versions
        assert _history_rows(config) == 0
        # Ann, on base 1 (whose text the history no longer holds), inserts a word: her
        # text cannot be built, so her operations are what the conflict keeps.
        m = with_edits(
            ann.mut("p", base=1, collection="pages"), "body", [Retain(4), Insert("and "), Retain(9)]
        )
        mine_id = m.mutation_id
        (r,) = ann.apply(m).results
        assert r.status == S.MUTATION_STATUS_CONFLICT
        assert plain(r.record)["body"] == "one two three four"  # theirs kept, no overwrite
        # Cy sends her base text along (base_fields): her text is what it keeps.
        m = with_edits(cy.mut("p", base=1, collection="pages"), "body", [Retain(13), Insert("!")])
        cy_mutation = m.mutation_id
        m.base_fields["body"].string_value = "one two three"
        (r2,) = cy.apply(m).results
        assert r2.status == S.MUTATION_STATUS_CONFLICT
        found = {c.mutation_id == cy_mutation: c for c in ann.conflicts()}
        (mine,) = found[False].fields
        assert ops_from_json(json.loads(mine.yours.json_value)) == [
            Retain(4),
            Insert("and "),
            Retain(9),
        ]
        (hers,) = found[True].fields
        assert (hers.field, hers.yours.string_value) == ("body", "one two three!")
        assert hers.theirs.string_value == "one two three four"
        assert plain(bob.get("p", collection="pages"))["body"] == "one two three four"  # type: ignore[arg-type]
        # A base the history holds works as always.
        r = edit(ann, "p", "body", [Retain(18), Insert("!")], base=r.record.version)
        assert (r.status, plain(r.record)["body"]) == (
            S.MUTATION_STATUS_APPLIED,
            "one two three four!",
        )
    db = sqlite3.connect(tmp_path / "sync.db")
    events = [json.loads(p) for (p,) in db.execute("SELECT payload FROM outbox")]
    db.close()
    surfaced = {e["mutation_id"]: e for e in events if e["kind"] == 3}  # CONFLICT_SURFACED
    assert set(surfaced) == {mine_id, cy_mutation}
    assert surfaced[cy_mutation]["field"] == "body"
    assert decode(surfaced[cy_mutation]["details"]["yours"]) == "one two three!"


# --- on both engines ---------------------------------------------------------------------


class _Writer:
    """One client's mutations through the real applier on one storage."""

    def __init__(self, applier: Applier, sub: str) -> None:
        self.applier, self.who, self.seq = applier, Principal(sub, "acme", frozenset()), 0

    def send(self, base: int, *, ops: list[TextOp] | None = None, **fields: FieldValue) -> Any:
        self.seq += 1
        m = MutationIn(
            f"{self.who.sub}-{self.seq}",
            self.seq,
            int(Op.PUT if base == 0 else Op.PATCH),  # as the wire has it
            "pages",
            "p",
            dict(fields),
            base,
            text_edits={"body": ops} if ops else {},
        )
        (out,) = self.applier.apply_batch(self.who, BatchIn(self.who.sub, 3, [m])).results
        return out


def test_the_text_an_edit_left_and_pruned_history_hold_on_both_engines(storage_url: str) -> None:
    storage = SqlStorage(storage_url, sqlite_synchronous="NORMAL")
    try:
        storage.migrate()
        applier = Applier(storage, load_schema(DEFAULT_SCHEMA_PATH))
        ann, bob = _Writer(applier, "ann"), _Writer(applier, "bob")
        assert ann.send(0, title="t", body="one two three").status is Status.APPLIED
        assert bob.send(1, ops=[Retain(4), Delete(4), Retain(5)]).record.version == 2
        # Ann made the same deletion offline: it changes nothing on the server ...
        same = ann.send(1, ops=[Retain(4), Delete(4), Retain(5)])
        assert (same.status, same.record.version) == (Status.MERGED, 2)
        # ... and her next edit, in a later transaction, is on the text it left her.
        nxt = ann.send(1, ops=[Retain(9), Insert("!")])
        assert nxt.status is Status.MERGED, nxt.error
        assert nxt.record.fields["body"] == "one three!"
        assert storage.prune_history(time.time_ns() + 1) == 3
        late = bob.send(2, ops=[Insert("> "), Retain(9)])  # on a base that is gone
        assert late.status is Status.CONFLICT
        assert late.record.fields["body"] == "one three!"
        assert storage.prune_history(time.time_ns() + 1) == 0
    finally:
        storage.close()
