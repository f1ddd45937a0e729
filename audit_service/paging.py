"""QueryEvents page tokens: the last seq a page held, bound to the filters that produced it.

A token carries the seq and a digest of (seq, tenant, filters). A token sent
back with other filters (or another tenant's token, or an edited one) fails
the digest and is refused as INVALID_PAGE_TOKEN: continuing a listing under
other filters would silently skip or repeat events.

The digest is not keyed. It does not have to be: a token grants nothing, as
every query is confined to the caller's tenant by its JWT, so a hand-made
token can only move the caller's own listing. Leaving it unkeyed keeps tokens
valid across instances and restarts with no shared secret to manage.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json

from audit_service.model import EventFilter
from fieldsync.errors import InvalidArgument, Reason

__all__ = ["decode_page_token", "encode_page_token"]

_PREFIX = "fa1"


def _digest(seq: int, flt: EventFilter) -> str:
    canonical = json.dumps(
        [
            seq,
            flt.tenant_id,
            sorted(int(k) for k in flt.kinds),
            flt.collection,
            flt.record_id,
            flt.mutation_id,
            flt.since,
            flt.until,
            flt.newest_first,
        ],
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def encode_page_token(after_seq: int, flt: EventFilter) -> str:
    text = f"{_PREFIX}:{after_seq}:{_digest(after_seq, flt)}"
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode_page_token(token: str, flt: EventFilter) -> int:
    """The seq to continue after (0 for no token); INVALID_PAGE_TOKEN when it does not fit."""
    if not token:
        return 0
    try:
        text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        prefix, seq_text, digest = text.split(":")
        seq = int(seq_text)
        if prefix != _PREFIX or seq < 0 or digest != _digest(seq, flt):
            raise ValueError(text)
        return seq
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise InvalidArgument(
            Reason.INVALID_PAGE_TOKEN,
            "the page token was not issued by this server for these filters; "
            "start the listing again",
            violations=[("page_token", "not issued for this query")],
        ) from None
