"""The replies already given (the ``replies`` table) are re-sent only to their owner."""

from __future__ import annotations

from typing import Any

import orjson
from fakes import Harness

from app.transfer_service import Outbound
from schemas.wire import ErrorCode


def reply_of(h: Harness, outs: list[Outbound]) -> dict[str, Any]:
    """The single reply among ``outs``."""
    replies = [orjson.loads(o.value) for o in outs if o.topic == h.topics.replies]
    assert len(replies) == 1, replies
    return replies[0]  # type: ignore[no-any-return]


async def test_a_cached_reply_needs_a_genuine_token_of_its_operator() -> None:
    h = Harness()
    raw = h.command("transferInit", "alice", {"toAccountId": "acc-bob", "amountMinor": 100,
                                              "currency": "EUR"}, request_id="r-init")
    first = reply_of(h, await h.send(raw))
    assert first["status"] == "ok" and "transferToken" in first["data"]

    forged = orjson.loads(raw)
    forged["accessToken"] = h.access_token("bob")  # genuine, but another user's
    again = reply_of(h, await h.send(orjson.dumps(forged)))
    assert again["code"] == ErrorCode.FORBIDDEN and "data" not in again

    forged["accessToken"] = "x.y.z"
    again = reply_of(h, await h.send(orjson.dumps(forged)))
    assert again["code"] == ErrorCode.UNAUTHENTICATED and "data" not in again


async def test_a_replay_long_after_gets_the_same_reply_despite_the_expired_token() -> None:
    h = Harness()
    raw = h.command("transferInit", "alice", {"toAccountId": "acc-bob", "amountMinor": 100,
                                              "currency": "EUR"}, request_id="r-old")
    first = reply_of(h, await h.send(raw))
    h.clock.advance(3 * 24 * 3600)  # the access token expired long ago
    replayed = reply_of(h, await h.send(raw))
    assert replayed == first
