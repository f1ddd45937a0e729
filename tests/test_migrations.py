"""Upgrading a sync database that holds data: each migration keeps every row's meaning.

The conformance suite checks that a fresh database migrates to exactly the
current tables; this checks that a database written by an older release,
with records, history and feed positions in it, comes through an upgrade
whole, on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import dataclasses

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from fieldsync.db import normalize_url
from fieldsync.jsontext import dumps
from fieldsync.values import Timestamp, encode_fields
from sync_service.rules.merge import Change
from sync_service.storage import SqlStorage
from sync_service.storage.base import BatchWrite, HistoryRow, StoredRecord
from sync_service.storage.sql import MIGRATIONS
from tests import pg

storage_url = pg.storage_url

T = "acme"


def _at_revision(url: str, revision: str) -> None:
    engine = create_engine(normalize_url(url), poolclass=NullPool)
    try:
        with engine.begin() as conn:
            cfg = Config()
            cfg.set_main_option("script_location", str(MIGRATIONS))
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
    finally:
        engine.dispose()


def _execute(url: str, sql: str, rows: list[dict[str, object]]) -> None:
    engine = create_engine(normalize_url(url), poolclass=NullPool)
    try:
        with engine.begin() as conn:
            conn.execute(text(sql), rows)
    finally:
        engine.dispose()


def test_0003_files_history_under_record_keys_and_keeps_the_feed(storage_url: str) -> None:
    _at_revision(storage_url, "0002")
    # Two records as release 0002 stored them: r1 at version 3 (feed 7), r2 at 1 (feed 9).
    record = (
        "INSERT INTO records (tenant_id, collection, record_id, version, deleted, fields,"
        " field_versions, history_floor, updated_at, updated_by, feed_seq) VALUES"
        " (:t, 'tasks', :rid, :v, false, :f, :fv, 0, 1, 'ann', :seq)"
    )
    _execute(
        storage_url,
        record,
        [
            {
                "t": T,
                "rid": "r1",
                "v": 3,
                "f": dumps(encode_fields({"title": "c", "at": Timestamp(5)})),
                "fv": '{"title":3,"at":2}',
                "seq": 7,
            },
            {"t": T, "rid": "r2", "v": 1, "f": '{"title":"x"}', "fv": '{"title":1}', "seq": 9},
            {"t": "other", "rid": "r1", "v": 1, "f": "{}", "fv": "{}", "seq": 8},
        ],
    )
    history = (
        "INSERT INTO record_history (tenant_id, collection, record_id, version, client_id,"
        " mutation_id, old, committed_at) VALUES (:t, 'tasks', :rid, :v, :c, :m, :old, 1)"
    )
    _execute(
        storage_url,
        history,
        [
            {"t": T, "rid": "r1", "v": 1, "c": "a", "m": "m1", "old": '{"_deleted":true}'},
            {"t": T, "rid": "r1", "v": 2, "c": "b", "m": "m2", "old": '{"at":null}'},
            {"t": T, "rid": "r1", "v": 3, "c": "a", "m": "m3", "old": '{"title":"b"}'},
            {"t": "other", "rid": "r1", "v": 1, "c": "z", "m": "mz", "old": '{"_deleted":true}'},
        ],
    )

    st = SqlStorage(storage_url, sqlite_synchronous="NORMAL")
    try:
        st.migrate()
        r1, r2 = st.get_records(T, "tasks", ["r1", "r2"])
        assert (r1.version, r1.fields, r1.field_versions) == (
            3,
            {"title": "c", "at": Timestamp(5)},
            {"title": 3, "at": 2},
        )
        # Who wrote last is unknown for old rows: anyone's write reads the history.
        assert (r1.last_client, r1.others_version) == ("", 0)
        assert r1.changed_by_others_since("a", 2) and not r1.changed_by_others_since("a", 3)
        assert [r.record_id for r in st.pull(T, 0, [], 10)] == ["r1", "r2"]
        assert st.feed_head(T) == 9
        with st.write_transaction() as tx:
            assert tx.load_changes(T, "tasks", {"r1": 1, "r2": 0}) == {
                "r1": [Change(2, "b", "m2", {"at": None}), Change(3, "a", "m3", {"title": "b"})],
                "r2": [],
            }
            assert tx.load_changes("other", "tasks", {"r1": 0})["r1"][0].client_id == "z"
            # Writing on: new feed positions and keys come after every old one.
            r3 = StoredRecord(T, "tasks", "r3", 1, False, {"title": "n"}, {"title": 1}, 0, 2, "ann")
            tx.write(
                BatchWrite(
                    records=[dataclasses.replace(r2, version=2), r3],
                    history=[HistoryRow(T, "tasks", "r2", 2, "c", "m4", {"title": "x"}, 2)],
                )
            )
        pulled = st.pull(T, 9, [], 10)
        assert [(r.feed_seq, r.record_id) for r in pulled] == [(10, "r2"), (11, "r3")]
        (r3,) = st.get_records(T, "tasks", ["r3"])
        assert r3.key > 9
        with st.write_transaction() as tx:
            (change,) = tx.load_changes(T, "tasks", {"r2": 1})["r2"]
            assert change == Change(2, "c", "m4", {"title": "x"})
    finally:
        st.close()


def _rows(url: str, sql: str) -> list[tuple[object, ...]]:
    engine = create_engine(normalize_url(url), poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text(sql))]
    finally:
        engine.dispose()


def test_0005_per_tenant_feed_heads_go_on_past_every_cursor_issued_before(
    storage_url: str,
) -> None:
    """Release 0003 handed out positions from one global head (20 here). After 0005 each
    tenant's next position is past it, so a cursor issued before (at most the head)
    still sees every later change; record keys go on past the last one; and a
    downgrade gives the old release a head past every position."""
    _at_revision(storage_url, "0003")
    record = (
        "INSERT INTO records (tenant_id, collection, record_id, version, deleted, fields,"
        " field_versions, history_floor, updated_at, updated_by, feed_seq, record_key,"
        " last_client_id, others_version) VALUES"
        " (:t, 'tasks', :rid, 1, false, '{}', '{}', 0, 1, 'ann', :seq, :key, '', 0)"
    )
    _execute(
        storage_url,
        record,
        [
            {"t": T, "rid": "r1", "seq": 5, "key": 3},
            {"t": T, "rid": "r2", "seq": 12, "key": 7},
            {"t": "other", "rid": "r1", "seq": 20, "key": 20},
        ],
    )
    _execute(storage_url, "UPDATE sync_state SET feed_head = 20, record_keys = 20", [{}])
    cursor = 12  # T's head when its client last pulled
    st = SqlStorage(storage_url, sqlite_synchronous="NORMAL")
    try:
        st.migrate()
        for tenant, rid in ((T, "r3"), ("fresh", "f1"), ("other", "r2")):
            with st.write_transaction() as tx:
                tx.load_records(tenant, "tasks", [rid])
                new = StoredRecord(tenant, "tasks", rid, 1, False, {}, {}, 0, 2, "ann")
                tx.write(BatchWrite(records=[new]))
        (r3,) = st.pull(T, cursor, [], 10)
        assert r3.record_id == "r3" and r3.feed_seq > 20
        assert [r.record_id for r in st.pull("other", 20, [], 10)] == ["r2"]
        keys = [r.key for r in st.get_records(T, "tasks", ["r1", "r2", "r3"])]
        assert keys[:2] == [3, 7] and keys[2] > 20
        (f1,) = st.get_records("fresh", "tasks", ["f1"])
        assert f1.key > 20 and f1.key != keys[2]
    finally:
        st.close()
    if storage_url.startswith("postgresql"):
        heads = {
            t: h for t, h in _rows(storage_url, "SELECT tenant_id, feed_head FROM tenant_feed")
        }
        assert heads == {T: 21, "other": 21, "fresh": 1}
        _at_revision_down(storage_url, "0003")
        ((head, keys_after),) = _rows(storage_url, "SELECT feed_head, record_keys FROM sync_state")
        ((last_key,),) = _rows(storage_url, "SELECT max(record_key) FROM records")
        assert (head, keys_after) == (21, last_key)


def _at_revision_down(url: str, revision: str) -> None:
    engine = create_engine(normalize_url(url), poolclass=NullPool)
    try:
        with engine.begin() as conn:
            cfg = Config()
            cfg.set_main_option("script_location", str(MIGRATIONS))
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, revision)
    finally:
        engine.dispose()
