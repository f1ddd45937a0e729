"""Text fields through the real service (SPEC §3 `text` policy): both edits survive."""

from __future__ import annotations

from tests.support import PUT, S, SyncEnv, plain


def test_two_clients_editing_one_page_from_the_same_base_both_keep_their_edit(
    sync_env: SyncEnv,
) -> None:
    ann, bob = sync_env.client(sub="ann"), sync_env.client(sub="bob")
    ann.one("p", {"title": "Fox", "body": "The quick brown fox"}, op=PUT, collection="pages")
    first = ann.one("p", {"body": "The very quick brown fox"}, base=1, collection="pages")
    second = bob.one("p", {"body": "The quick brown fox jumps"}, base=1, collection="pages")
    assert first.status == S.MUTATION_STATUS_APPLIED
    assert second.status == S.MUTATION_STATUS_MERGED
    assert plain(second.record)["body"] == "The very quick brown fox jumps"
    assert second.record.version == 3
    assert bob.conflicts() == []


def test_an_overlapping_edit_is_a_conflict_with_the_three_texts(sync_env: SyncEnv) -> None:
    ann, bob = sync_env.client(sub="ann"), sync_env.client(sub="bob")
    ann.one("n", {"title": "t", "notes": "Call the quick courier"}, op=PUT)
    ann.one("n", {"notes": "Call the slow courier"}, base=1)
    r = bob.one("n", {"notes": "Call the fast courier"}, base=1)
    assert r.status == S.MUTATION_STATUS_CONFLICT
    (f,) = r.conflict.fields
    assert (f.field, f.base.string_value, f.yours.string_value, f.theirs.string_value) == (
        "notes",
        "Call the quick courier",
        "Call the fast courier",
        "Call the slow courier",
    )
    assert plain(r.record)["notes"] == "Call the slow courier"  # theirs kept until resolved


def test_text_beyond_the_bmp_and_line_endings_merge_through_the_wire(sync_env: SyncEnv) -> None:
    ann, bob = sync_env.client(sub="ann"), sync_env.client(sub="bob")
    base = "Réunion 🎉 à 10h\r\n議題: 予算\r\nשלום\r\n"  # noqa: RUF001 (Hebrew on purpose)
    ann.one("kb", {"title": "x", "body": base}, op=PUT, collection="pages")
    ann.one("kb", {"body": "🚀 " + base}, base=1, collection="pages")
    r = bob.one("kb", {"body": base + "الختام\r\n"}, base=1, collection="pages")
    assert r.status == S.MUTATION_STATUS_MERGED
    assert plain(r.record)["body"] == "🚀 " + base + "الختام\r\n"
