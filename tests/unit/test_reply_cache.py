"""The replies already given (the ``replies`` table) are re-sent only to their owner."""

from __future__ import annotations

import hashlib
from typing import Any

import orjson
from fakes import PIN, Harness

from app.record_failures import Outbound
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


async def test_an_expired_token_cannot_start_a_transfer() -> None:
    h = Harness()
    token = await h.transfer_token("alice", "acc-bob", 1_000)
    stale = h.access_token("alice", ttl_seconds=60)
    h.clock.advance(600)
    raw = h.command("transferConfirm", "alice", {"transferToken": token, "pin": PIN},
                    idem="k-exp", request_id="r-exp", token=stale)
    reply = reply_of(h, await h.send(raw))
    assert reply["code"] == ErrorCode.UNAUTHENTICATED
    assert h.account_commands == []


async def test_a_redelivered_confirm_with_an_expired_token_resends_its_debit() -> None:
    """The confirm's token expires while its debit goes unanswered; its redelivery must
    not turn into UNAUTHENTICATED but re-send what was decided."""
    h = Harness()
    token = await h.transfer_token("alice", "acc-bob", 1_000)
    access = h.access_token("alice", ttl_seconds=60)
    raw = h.command("transferConfirm", "alice", {"transferToken": token, "pin": PIN},
                    idem="k-red", request_id="r-red", token=access)
    await h.send(raw, deliver=False)  # the state is written, the sends are lost
    h.clock.advance(600)
    again = await h.send(raw, deliver=False)
    assert [o.topic for o in again].count(h.topics.account_commands) == 1
    assert not [o for o in again if o.topic == h.topics.replies
                and b"UNAUTHENTICATED" in o.value]


async def test_dead_letters_keep_no_secret() -> None:
    h = Harness()
    token = h.access_token("alice")
    raw = orjson.dumps({"type": "transferConfirm", "operatorId": "alice",  # no requestId
                        "accessToken": token,
                        "payload": {"transferToken": "t.t.t", "pin": "864209"}})
    outs = await h.send(raw, key=b"k")
    letters = [orjson.loads(o.value) for o in outs if o.topic == h.topics.dlq]
    assert len(letters) == 1 and letters[0]["reason"].startswith("invalid envelope")
    kept = b"".join(o.value for o in outs if o.topic == h.topics.dlq)
    assert token.encode() not in kept and b"864209" not in kept and b"t.t.t" not in kept
    # No value at all (issue 9): the original stays in its topic, found by its coordinates
    # and recognised by its digest.
    assert "valueB64" not in letters[0]
    assert letters[0]["valueSha256"] == hashlib.sha256(raw).hexdigest()
