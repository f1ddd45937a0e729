"""Text fields through the real service (SPEC §3 `text` policy, §9 `text_edits`).

Whole values and operations, never a conflict; a queue of edits on one base applies as
typed while others edit the page; malformed operations are rejected alone, with a clear
reason, and the service keeps serving.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import grpc
import pytest

from fieldsync.errors import reason_of
from fieldsync.textops import Delete, Insert, Retain, TextOp, apply_ops, diff_ops
from fieldsync.v1 import sync_pb2
from tests.support import PUT, Client, S, SyncEnv, plain


def with_edits(m: sync_pb2.Mutation, field: str, ops: Sequence[TextOp]) -> sync_pb2.Mutation:
    te = m.text_edits[field]
    for op in ops:
        if isinstance(op, Retain):
            te.ops.add(retain=op.n)
        elif isinstance(op, Delete):
            te.ops.add(delete=op.n)
        else:
            te.ops.add(insert=op.text)
    return m


def edit(
    c: Client, rid: str, field: str, ops: Sequence[TextOp], base: int, collection: str = "pages"
) -> sync_pb2.MutationResult:
    (r,) = c.apply(with_edits(c.mut(rid, base=base, collection=collection), field, ops)).results
    return r


def page(c: Client, rid: str, body: str) -> None:
    r = c.one(rid, {"title": "t", "body": body}, op=PUT, collection="pages")
    assert r.status == S.MUTATION_STATUS_APPLIED


def reason(r: sync_pb2.MutationResult) -> str | None:
    return reason_of(r.error)


# --- whole values ------------------------------------------------------------------------


def test_two_clients_editing_one_page_from_the_same_base_both_keep_their_edit(
    sync_env: SyncEnv,
) -> None:
    ann, bob = sync_env.client(sub="ann"), sync_env.client(sub="bob")
    page(ann, "p", "The quick brown fox")
    first = ann.one("p", {"body": "The very quick brown fox"}, base=1, collection="pages")
    second = bob.one("p", {"body": "The quick brown fox jumps"}, base=1, collection="pages")
    assert first.status == S.MUTATION_STATUS_APPLIED
    assert second.status == S.MUTATION_STATUS_MERGED
    assert plain(second.record)["body"] == "The very quick brown fox jumps"
    assert list(second.text_overlaps) == []
    assert bob.conflicts() == []


def test_two_rewrites_of_one_word_merge_with_the_overlap_named(sync_env: SyncEnv) -> None:
    ann, bob = sync_env.client(sub="ann"), sync_env.client(sub="bob")
    ann.one("n", {"title": "t", "notes": "Call the quick courier"}, op=PUT)
    ann.one("n", {"notes": "Call the slow courier"}, base=1)
    r = bob.one("n", {"notes": "Call the fast courier"}, base=1)
    assert r.status == S.MUTATION_STATUS_MERGED
    assert list(r.text_overlaps) == ["notes"]
    assert plain(r.record)["notes"] == "Call the slowfast courier"  # theirs first
    assert bob.conflicts() == []


def test_text_beyond_the_bmp_and_line_endings_merge_through_the_wire(sync_env: SyncEnv) -> None:
    ann, bob = sync_env.client(sub="ann"), sync_env.client(sub="bob")
    base = "Réunion 🎉 à 10h\r\n議題: 予算\r\nשלום\r\n"  # noqa: RUF001 (Hebrew on purpose)
    page(ann, "kb", base)
    ann.one("kb", {"body": "🚀 " + base}, base=1, collection="pages")
    r = bob.one("kb", {"body": base + "الختام\r\n"}, base=1, collection="pages")
    assert r.status == S.MUTATION_STATUS_MERGED
    assert plain(r.record)["body"] == "🚀 " + base + "الختام\r\n"


# --- operations ---------------------------------------------------------------------------


def test_a_keystroke_travels_as_operations_and_merges_with_a_concurrent_edit(
    sync_env: SyncEnv,
) -> None:
    ann, bob = sync_env.client(sub="ann"), sync_env.client(sub="bob")
    page(ann, "p", "The quick fox")
    r = edit(ann, "p", "body", [Retain(4), Insert("🦊 "), Retain(9)], base=1)
    assert (r.status, plain(r.record)["body"]) == (S.MUTATION_STATUS_APPLIED, "The 🦊 quick fox")
    r = edit(bob, "p", "body", [Retain(13), Insert(" jumps")], base=1)
    assert r.status == S.MUTATION_STATUS_MERGED
    assert plain(r.record)["body"] == "The 🦊 quick fox jumps"
    # An insertion inside a span another deleted survives there.
    r = edit(bob, "p", "body", [Retain(4), Delete(7), Retain(10)], base=2)  # "🦊 quick"
    r = edit(ann, "p", "body", [Retain(6), Insert("very "), Retain(9)], base=2)
    assert r.status == S.MUTATION_STATUS_MERGED
    assert plain(r.record)["body"] == "The very  fox jumps"
    assert list(r.text_overlaps) == ["body"]
    # On the client's own base text (base_fields), whatever the server's version: the
    # server's text after "The" is theirs, inserted there first.
    m = with_edits(ann.mut("p", base=1, collection="pages"), "body", [Retain(3), Insert("!")])
    m.base_fields["body"].string_value = "The"
    (r,) = ann.apply(m).results
    assert plain(r.record)["body"] == "The very  fox jumps!"


def test_a_queue_of_50_offline_edits_on_one_base_applies_as_typed_while_two_others_edit(
    sync_env: SyncEnv,
) -> None:
    ann, bob, cy = (sync_env.client(sub=s) for s in ("ann", "bob", "cy"))
    page(ann, "p", "start.")
    rng = random.Random(16)
    mine = "start."  # ann's local text: she is offline, all her edits are on base 1
    queue: list[sync_pb2.Mutation] = []
    for i in range(50):
        pos = rng.randint(0, len(mine))
        token = f"<a{i}>"
        ops: list[TextOp] = [Retain(pos), Insert(token), Retain(len(mine) - pos)]
        if i % 7 == 3 and len(mine) > 12:  # some deletions of her own earlier text
            d = mine.index(">", pos) + 1 if ">" in mine[pos:] else len(mine)
            ops = [Retain(pos), Insert(token), Delete(d - pos), Retain(len(mine) - d)]
        ops = [op for op in ops if not isinstance(op, Retain | Delete) or op.n]
        mine = apply_ops(mine, ops)
        queue.append(with_edits(ann.mut("p", base=1, collection="pages"), "body", ops))
    bob_tokens: list[str] = []
    cy_tokens: list[str] = []
    for k in range(0, 50, 10):  # her queue arrives in five batches, others edit between
        for c, tokens in ((bob, bob_tokens), (cy, cy_tokens)):
            (cur,) = [r for r in c.pull()[0] if r.record_id == "p"]
            text = plain(cur)["body"]
            assert isinstance(text, str)
            token = f"<{c.sub}{k}>"
            tokens.append(token)
            r = edit(c, "p", "body", [Retain(len(text)), Insert(token)], base=cur.version)
            assert r.status == S.MUTATION_STATUS_APPLIED
        results = ann.apply(*queue[k : k + 10]).results
        assert {r.status for r in results} <= {S.MUTATION_STATUS_APPLIED, S.MUTATION_STATUS_MERGED}
    final = plain(ann.get("p", collection="pages"))["body"]  # type: ignore[arg-type]
    assert isinstance(final, str)
    kept = [t for t in (f"<a{i}>" for i in range(50)) if t in mine]
    for t in kept + bob_tokens + cy_tokens:
        assert final.count(t) == 1, t
    for t in (f"<a{i}>" for i in range(50)):
        if t not in mine:
            assert t not in final  # she deleted it herself: gone
    # Her text, in her order, is in the result: the others' tokens are additions only.
    stripped = final
    for t in bob_tokens + cy_tokens:
        stripped = stripped.replace(t, "")
    assert stripped == mine
    assert ann.conflicts() == []


# --- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ops", "why"),
    [
        ([Retain(7)], "past the end"),
        ([Retain(5), Delete(2)], "past the end"),
        ([Retain(2)], "cover 2 of"),
        ([Retain(3), Delete(0), Retain(3)], "delete 0"),
        ([Retain(2**64 - 1)], "past the end"),  # "-1" through a uint64
        ([], None),  # an empty op list: no text_edits entry is sent for it, see below
        ([Insert(""), Retain(6)], "empty insert"),
    ],
)
def test_malformed_operations_are_rejected_alone_and_nothing_else_changes(
    sync_env: SyncEnv, ops: list[TextOp], why: str | None
) -> None:
    ann = sync_env.client(sub="ann")
    page(ann, "p", "abcdef")
    bad = with_edits(ann.mut("p", base=1, collection="pages"), "body", ops)
    if not ops:
        bad.text_edits["body"].SetInParent()  # the field present, with no operations
        why = "no operations"
    good = ann.mut("q", {"title": "still applied"}, op=PUT, collection="pages")
    r_bad, r_good = ann.apply(bad, good).results
    assert r_bad.status == S.MUTATION_STATUS_REJECTED
    assert reason(r_bad) == "TEXT_EDITS_INVALID"
    assert r_bad.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert why is not None and why in r_bad.error.message
    assert r_good.status == S.MUTATION_STATUS_APPLIED
    assert plain(ann.get("p", collection="pages"))["body"] == "abcdef"  # type: ignore[arg-type]


def test_a_field_in_both_fields_and_text_edits_is_invalid(sync_env: SyncEnv) -> None:
    ann = sync_env.client(sub="ann")
    page(ann, "p", "abc")
    m = with_edits(ann.mut("p", {"body": "x"}, base=1, collection="pages"), "body", [Retain(3)])
    (r,) = ann.apply(m).results
    assert (r.status, reason(r)) == (S.MUTATION_STATUS_REJECTED, "TEXT_FIELD_TWICE")
    assert r.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]


def test_operations_on_a_field_that_is_not_text_or_an_op_with_nothing_set(
    sync_env: SyncEnv,
) -> None:
    ann = sync_env.client(sub="ann")
    page(ann, "p", "abc")
    r = edit(ann, "p", "title", [Retain(1)], base=1)
    assert (r.status, reason(r)) == (S.MUTATION_STATUS_REJECTED, "TEXT_EDITS_INVALID")
    m = ann.mut("p", base=1, collection="pages")
    m.text_edits["body"].ops.add()  # no retain, insert or delete
    (r,) = ann.apply(m).results
    assert (r.status, reason(r)) == (S.MUTATION_STATUS_REJECTED, "TEXT_EDITS_INVALID")
    many = with_edits(ann.mut("p", base=1, collection="pages"), "body", [Insert("x")] * 100_001)
    (r,) = ann.apply(many).results
    assert (r.status, reason(r)) == (S.MUTATION_STATUS_REJECTED, "TEXT_EDITS_INVALID")
    assert "at most 100000" in r.error.message


def test_ten_million_operations_or_a_50_mb_insert_are_refused_and_the_service_serves_on(
    sync_env: SyncEnv,
) -> None:
    ann = sync_env.client(sub="ann")
    page(ann, "p", "abc")
    # Built as bytes: TextEdits{ops: [TextEdit{retain: 1}] x 10 M} (40 MB), and one insert
    # of 50 MB, each as Mutation.text_edits["body"] (field 11) of a one-mutation batch.
    ten_million = b"\x0a\x02\x08\x01" * 10_000_000
    fifty_mb = b"\x0a\x02\x08\x03" + _len(b"\x1a", b"x" * 50_000_000)
    call: grpc.UnaryUnaryMultiCallable = sync_env.channel.unary_unary(  # type: ignore[type-arg]
        "/fieldsync.v1.SyncService/ApplyBatch",
        request_serializer=None,
        response_deserializer=sync_pb2.ApplyBatchResponse.FromString,
    )
    for ops in (ten_million, fifty_mb):
        entry = b"\x0a\x04body" + _len(b"\x12", ops)
        m = ann.mut("p", base=1, collection="pages").SerializeToString() + _len(b"\x5a", entry)
        batch = sync_pb2.MutationBatch(client_id=ann.client_id, schema_version=3)
        request = _len(b"\x0a", batch.SerializeToString() + _len(b"\x1a", m))
        with pytest.raises(grpc.RpcError) as e:
            call(request, metadata=ann.metadata)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    ann.next_seq -= 2  # neither arrived
    r = edit(ann, "p", "body", [Retain(3), Insert("!")], base=1)
    assert (r.status, plain(r.record)["body"]) == (S.MUTATION_STATUS_APPLIED, "abc!")


def _len(tag: bytes, body: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return tag + _varint(len(body)) + body


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def test_another_writers_insertion_is_never_taken_for_the_text_an_edit_deleted(
    sync_env: SyncEnv,
) -> None:
    """The server composes the operations it applied since the client's text; a diff of
    its text against the client's could align bob's deleted "day one" with letters of
    cy's new line and delete those instead."""
    ann, bob, cy = (sync_env.client(sub=s) for s in ("ann", "bob", "cy"))
    old = "New hires get a laptop on day one.\n"
    page(ann, "p", old)
    line = "Ask #it-help for anything else.\n"
    for c, new in (
        (cy, old + line),
        (ann, "New hires get a laptop and a badge in week one.\n"),
        (bob, "New hires get a configured laptop on their first day.\n"),
    ):
        r = edit(c, "p", "body", diff_ops(old, new), base=1)
        assert r.status in (S.MUTATION_STATUS_APPLIED, S.MUTATION_STATUS_MERGED)
    body = plain(r.record)["body"]
    assert isinstance(body, str) and body.endswith("\n" + line)
    for inserted in ("and a badge", "configured", "their first", "week"):
        assert inserted in body, body
